"""Device sampling: GPUs through NVML (nvidia-ml-py), the host through psutil.

Every sample has one ``host`` row: the CPU % of the run's process tree (the launcher and all
its children; 100 = one core), its total RSS, and host memory used/total. With NVML and GPUs,
one ``gpu<N>`` row per GPU: utilisation %, memory used/total, power (W), temperature (deg C)
and the memory of the run's own processes. NVML is initialised lazily on the first sample; a
metric a GPU does not support is ``None``, never an exception, and no GPU is a state, not an
error.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.25


@dataclass
class DeviceSample:
    t: float
    device: str  # "host" or "gpu<index>"
    kind: str  # "host" | "gpu"
    util: float | None = None  # GPU util %, or CPU % of the run's process tree
    mem_used: int | None = None
    mem_total: int | None = None
    power_w: float | None = None
    temp_c: float | None = None
    proc_mem: int | None = None  # memory of the run's own processes (RSS on the host)
    # Host only: sum over the run's processes of the kernel's peak RSS (VmHWM). Sampling every
    # 2 s misses millisecond peaks; the high-water mark does not.
    proc_mem_peak: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clamp_interval(interval: float | None) -> float:
    """The sampling interval in seconds: default 2 s, never below 0.25 s."""
    if interval is None:
        return DEFAULT_INTERVAL_S
    try:
        value = float(interval)
    except (TypeError, ValueError):
        return DEFAULT_INTERVAL_S
    if math.isnan(value):
        return DEFAULT_INTERVAL_S
    return max(MIN_INTERVAL_S, value)


def visible_gpu_indices(env: dict[str, str] | None) -> list[int] | None:
    """The physical GPU indices named by CUDA_VISIBLE_DEVICES, or None for all GPUs."""
    value = (env or {}).get("CUDA_VISIBLE_DEVICES")
    if value is None or value.strip() == "":
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:  # GPU UUIDs: keep all GPUs rather than guess
        return None


class _Nvml:
    """Lazy NVML session over a ``pynvml``-compatible module."""

    def __init__(self, module: Any | None):
        self._module = module
        self._tried = False
        self.available = False
        self.error: str | None = None
        self._handles: list[tuple[int, Any]] = []

    def init(self, indices: list[int] | None) -> bool:
        if self._tried:
            return self.available
        self._tried = True
        try:
            nv = self._module
            if nv is None:
                import pynvml as nv  # nvidia-ml-py
                self._module = nv
            nv.nvmlInit()
            count = nv.nvmlDeviceGetCount()
            wanted = range(count) if indices is None else [i for i in indices if 0 <= i < count]
            self._handles = [(i, nv.nvmlDeviceGetHandleByIndex(i)) for i in wanted]
            self.available = bool(self._handles)
        except Exception as exc:  # noqa: BLE001 - no driver, no library, no GPU: one state
            self.error = f"{type(exc).__name__}: {exc}"
            self.available = False
        return self.available

    def _get(self, fn_name: str, *args: Any) -> Any:
        fn = getattr(self._module, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends: N/A
            return None

    def sample(self, t: float, pids: set[int]) -> list[DeviceSample]:
        nv = self._module
        out = []
        for index, handle in self._handles:
            util = self._get("nvmlDeviceGetUtilizationRates", handle)
            mem = self._get("nvmlDeviceGetMemoryInfo", handle)
            power_mw = self._get("nvmlDeviceGetPowerUsage", handle)
            temp = self._get("nvmlDeviceGetTemperature", handle,
                             getattr(nv, "NVML_TEMPERATURE_GPU", 0))
            out.append(DeviceSample(
                t=t,
                device=f"gpu{index}",
                kind="gpu",
                util=_float(getattr(util, "gpu", None)),
                mem_used=_int(getattr(mem, "used", None)),
                mem_total=_int(getattr(mem, "total", None)),
                power_w=power_mw / 1000.0 if isinstance(power_mw, (int, float)) else None,
                temp_c=_float(temp),
                proc_mem=self._proc_mem(handle, pids),
            ))
        return out

    def _proc_mem(self, handle: Any, pids: set[int]) -> int | None:
        procs = self._get("nvmlDeviceGetComputeRunningProcesses", handle)
        if procs is None:
            return None
        ours = [p for p in procs if getattr(p, "pid", None) in pids]
        if procs and not ours:
            # Inside a container NVML reports host pids; unknown beats a wrong zero.
            return None
        used = [getattr(p, "usedGpuMemory", None) for p in ours]
        known = [u for u in used if isinstance(u, int)]
        if ours and not known:
            return None
        return sum(known)

    def shutdown(self) -> None:
        if self.available:
            with contextlib.suppress(Exception):
                self._module.nvmlShutdown()
        self.available = False


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class ProcessTree:
    """The processes of a run: the descendants of ``root_pid`` (and the root unless excluded).

    Keeps psutil.Process objects between samples so that ``cpu_percent`` measures the time
    since the previous sample.
    """

    def __init__(self, root_pid: int, include_root: bool = True):
        self.root_pid = root_pid
        self.include_root = include_root
        self._procs: dict[int, psutil.Process] = {}

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            found = root.children(recursive=True)
            if self.include_root:
                found.append(root)
        except psutil.Error:
            found = []
        current: dict[int, psutil.Process] = {}
        for proc in found:
            known = self._procs.get(proc.pid)
            # Same pid but a new process (recycled): start over with the new object.
            if known is not None and known.is_running():
                current[proc.pid] = known
            else:
                current[proc.pid] = proc
        self._procs = current
        return list(current.values())

    def usage(self) -> tuple[float, int, int | None, set[int]]:
        """(CPU % since the previous call, total RSS, total peak RSS or None, pids)."""
        cpu, rss, hwm, pids = 0.0, 0, 0, set()
        hwm_known = True
        for proc in self.processes():
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
                pids.add(proc.pid)
            except psutil.Error:
                continue
            peak = peak_rss(proc.pid)
            if peak is None:
                hwm_known = False
            else:
                hwm += peak
        return cpu, rss, (hwm if hwm_known and pids else None), pids


def peak_rss(pid: int) -> int | None:
    """The kernel's high-water mark of a process's RSS (Linux VmHWM), None elsewhere."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


class DeviceSampler:
    """Samples the host and GPUs for one run at a fixed interval.

    Use :meth:`poll` from a loop (returns samples when the interval has elapsed, else ``[]``)
    or :meth:`start` a background thread that hands each batch to a callback and keeps the
    latest batch for :meth:`latest`. ``nvml`` is a ``pynvml``-compatible module (default: the
    real one, imported on first use). ``root_pid=None`` samples the host without a process tree.
    """

    def __init__(self, root_pid: int | None = None, interval: float | None = None,
                 nvml: Any | None = None, gpu_indices: Iterable[int] | None = None,
                 include_root: bool = True, use_nvml: bool = True):
        self.interval = clamp_interval(interval)
        self.tree = ProcessTree(root_pid, include_root) if root_pid is not None else None
        self._nvml = _Nvml(nvml) if use_nvml else None
        self._gpu_indices = list(gpu_indices) if gpu_indices is not None else None
        self._next_due = 0.0
        self._lock = threading.Lock()
        self._latest: list[DeviceSample] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if self.tree is not None:
            self.tree.usage()  # prime cpu_percent so the first sample is meaningful

    @property
    def gpu_available(self) -> bool:
        return bool(self._nvml and self._nvml.init(self._gpu_indices))

    @property
    def nvml_error(self) -> str | None:
        return self._nvml.error if self._nvml else "NVML disabled"

    def sample(self) -> list[DeviceSample]:
        """One batch now: the host row, then one row per GPU."""
        t = time.time()
        if self.tree is not None:
            cpu, rss, hwm, pids = self.tree.usage()
        else:
            cpu, rss, hwm, pids = None, None, None, set()
        vm = psutil.virtual_memory()
        batch = [DeviceSample(t=t, device="host", kind="host", util=cpu,
                              mem_used=int(vm.total - vm.available), mem_total=int(vm.total),
                              proc_mem=rss, proc_mem_peak=hwm)]
        if self.gpu_available:
            batch.extend(self._nvml.sample(t, pids))
        with self._lock:
            self._latest = batch
        return batch

    def poll(self, now: float | None = None) -> list[DeviceSample]:
        """A batch if the interval has elapsed since the previous one, else ``[]``."""
        now = time.monotonic() if now is None else now
        if now < self._next_due:
            return []
        self._next_due = now + self.interval
        return self.sample()

    def latest(self) -> list[DeviceSample]:
        with self._lock:
            return list(self._latest)

    def start(self, callback: Callable[[list[DeviceSample]], None] | None = None) -> None:
        """Sample in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                started = time.monotonic()
                batch = self.sample()
                if callback is not None:
                    callback(batch)
                # Re-arm after the work so samples never overlap.
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

        self._thread = threading.Thread(target=loop, name="device-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1.0)
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._nvml is not None:
            self._nvml.shutdown()


def describe_gpus(nvml: Any | None = None) -> list[dict[str, Any]]:
    """Name and total memory of each GPU NVML sees (``[]`` without NVML)."""
    session = _Nvml(nvml)
    if not session.init(None):
        return []
    out = []
    for index, handle in session._handles:
        name = session._get("nvmlDeviceGetName", handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        mem = session._get("nvmlDeviceGetMemoryInfo", handle)
        out.append({"index": index, "name": name, "mem_total": _int(getattr(mem, "total", None))})
    session.shutdown()
    return out


def own_cpu_seconds() -> float:
    """CPU time (user + system) of this process, for overhead measurements."""
    t = os.times()
    return t.user + t.system
