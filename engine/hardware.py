"""What this machine has, learned without torch: NVIDIA GPUs through NVML, host RAM through
psutil. No GPU (or no driver) is a normal state, reported as zero GPUs."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class LocalGpus:
    count: int
    names: tuple[str, ...] = ()
    memory_bytes: tuple[int, ...] = ()
    compute_capability: tuple[tuple[int, int], ...] = ()
    reason: str = ""  # why there are none, for messages

    @property
    def bf16(self) -> bool:
        return self.count > 0 and all(cc >= (8, 0) for cc in self.compute_capability)


@functools.lru_cache(maxsize=1)
def local_gpus() -> LocalGpus:
    """GPUs visible through NVML (honours CUDA_VISIBLE_DEVICES only by count)."""
    try:
        import pynvml
    except ImportError:
        return LocalGpus(0, reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return LocalGpus(0, reason=f"no NVIDIA driver ({exc.__class__.__name__})")
    try:
        n = pynvml.nvmlDeviceGetCount()
        names, mems, ccs = [], [], []
        for i in range(n):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            names.append(name.decode() if isinstance(name, bytes) else str(name))
            mems.append(int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
            try:
                ccs.append(tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)))
            except Exception:
                ccs.append((0, 0))
        return LocalGpus(n, tuple(names), tuple(mems), tuple(ccs), "" if n else "NVML found no GPU")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
