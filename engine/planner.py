"""Which ZeRO stage and offload to use: every option side by side for the given hardware.

Each option gets the memory estimate of :mod:`engine.estimate` (per GPU, host RAM per node,
NVMe), whether it fits and by how much, and an estimated time per optimizer step. The
recommendation is the fastest option that fits, trying fewer partitions and no offload first
(ZeRO-0, 1, 2, 3, then CPU optimizer offload, parameter offload, NVMe), with one sentence of
why, and the largest micro-batch that still fits with it.

Time per step = FLOPs / (peak FLOPS x efficiency) + the offload traffic over PCIe (and NVMe)
and the CPU optimizer. FLOPs: 6 x parameters x tokens (forward 2, backward 4), 8 with gradient
checkpointing (the forward is recomputed), 4 with LoRA (no weight gradients for the frozen
base), plus attention (4 x seq x heads x head_dim per token and layer, forward); DPO adds the
reference model's forward. Communication between GPUs is not modelled. Pure Python.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.estimate import GiB, EstimateError, TrainEstimate, TrainSetup, estimate_training
from engine.model_shape import ModelShape, ParamCount, count_params

# Stated assumptions of the step-time model.
MFU = 0.40  # achieved share of peak FLOPS (model FLOPs utilisation) of a well-tuned run
PCIE_BYTES_PER_S = 25e9  # host <-> GPU per GPU (PCIe 4.0 x16, effective)
NVME_BYTES_PER_S = 3e9  # per node, read or write
CPU_ADAM_PARAMS_PER_S = 4e9  # DeepSpeed's CPU Adam, per node (ZeRO-Offload paper: ~1B in 0.22 s)
CPU_TFLOPS = 0.2  # a CPU rank, for the CPU accelerator
DEFAULT_GPU_TFLOPS = 312.0  # A100-class dense bf16 when the GPU is not known
GPU_TFLOPS = {  # dense bf16/fp16 tensor-core peak by name fragment (datasheets)
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "A6000": 155.0, "A40": 150.0, "A10": 125.0, "A30": 165.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "4090": 165.0, "3090": 71.0, "V100": 125.0,
    "T4": 65.0, "MI300": 1307.0, "MI250": 362.0,
}

# The options, fastest first: fewer partitions, then no offload, then CPU, then NVMe.
OPTIONS: tuple[tuple[int, str, str], ...] = (
    (0, "none", "none"),
    (1, "none", "none"),
    (2, "none", "none"),
    (3, "none", "none"),
    (1, "cpu", "none"),
    (2, "cpu", "none"),
    (3, "cpu", "none"),
    (3, "cpu", "cpu"),
    (3, "nvme", "none"),
    (3, "nvme", "nvme"),
)


@dataclass(frozen=True)
class Hardware:
    """What the run gets: per node GPUs and their memory, host RAM, free NVMe space."""

    gpus_per_node: int  # 0: no GPU, train on the CPU
    gpu_mem_bytes: int
    num_nodes: int = 1
    host_mem_bytes: int = 0  # 0: unknown (not checked)
    nvme_free_bytes: int = 0  # 0: unknown or none (NVMe options do not fit)
    gpu_name: str = ""
    gpu_tflops: float | None = None  # None: from the name, else the A100-class default
    source: str = "declared"  # declared | detected

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_node > 0 else "cpu"

    def peak_tflops(self, dtype: str) -> float:
        if self.device == "cpu":
            return CPU_TFLOPS
        tf = self.gpu_tflops
        if tf is None:
            tf = next((v for k, v in GPU_TFLOPS.items() if k in self.gpu_name.upper()),
                      DEFAULT_GPU_TFLOPS)
        return tf / 2 if dtype == "fp32" else tf  # fp32 runs on TF32 tensor cores at half rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_hardware(nvme_path: str | None = None) -> Hardware:
    """This machine: GPUs through NVML (imported lazily), host RAM through psutil, free space
    where NVMe offload would write (``nvme_path``, else the current directory)."""
    import psutil

    from engine.hardware import local_gpus

    gpus = local_gpus()
    host = int(psutil.virtual_memory().total)
    where = Path(nvme_path or ".").expanduser()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = int(shutil.disk_usage(where).free)
    except OSError:
        free = 0
    if gpus.count:
        return Hardware(gpus_per_node=gpus.count, gpu_mem_bytes=min(gpus.memory_bytes),
                        host_mem_bytes=host, nvme_free_bytes=free,
                        gpu_name=gpus.names[0] if gpus.names else "", source="detected")
    return Hardware(gpus_per_node=0, gpu_mem_bytes=0, host_mem_bytes=host,
                    nvme_free_bytes=free, source="detected")


@dataclass
class PlanRow:
    """One ZeRO stage x offload option."""

    zero_stage: int
    offload_optimizer: str
    offload_param: str
    label: str
    estimate: TrainEstimate
    fits: bool
    device_margin_bytes: int  # memory per device left over (negative: short by)
    host_margin_bytes: int | None  # None when host RAM is unknown
    why_not: str  # "" when it fits
    step_seconds: float
    step_detail: dict[str, float]

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        est = self.estimate
        d = {
            "zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
            "offload_param": self.offload_param, "label": self.label, "fits": self.fits,
            "device_bytes": _device_need(est), "host_bytes": est.host_bytes,
            "nvme_bytes": est.nvme_bytes, "device_margin_bytes": self.device_margin_bytes,
            "host_margin_bytes": self.host_margin_bytes, "why_not": self.why_not,
            "step_seconds": self.step_seconds, "step_detail": self.step_detail,
            "peak_phase": est.peak_phase,
        }
        if full:
            d["estimate"] = est.to_dict()
        return d


@dataclass
class Plan:
    """Every option, the recommendation and why, for one model, setup and hardware."""

    model: str
    hardware: Hardware
    setup: TrainSetup
    rows: list[PlanRow]
    recommended: PlanRow | None
    why: str
    max_micro_batch: int | None  # for the recommended option
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        rec = self.recommended
        return {
            "model": self.model,
            "hardware": self.hardware.to_dict(),
            "options": [r.to_dict(full=full) for r in self.rows],
            "recommended": rec.label if rec else None,
            "why": self.why,
            "max_micro_batch": self.max_micro_batch,
            "assumptions": self.assumptions,
        }


def option_label(stage: int, offload_optimizer: str, offload_param: str) -> str:
    parts = [f"ZeRO-{stage}"]
    if offload_optimizer != "none":
        parts.append(f"optimizer->{offload_optimizer}")
    if offload_param != "none":
        parts.append(f"params->{offload_param}")
    return " ".join(parts)


def _device_need(est: TrainEstimate) -> int:
    return est.gpu_peak_bytes if est.setup.device == "gpu" else est.device_total_bytes


def setup_for_hardware(setup: TrainSetup, hw: Hardware) -> TrainSetup:
    """The setup placed on ``hw``: ranks per node, nodes, device."""
    if hw.device == "cpu":
        return replace(setup, device="cpu", gpus_per_node=max(1, setup.gpus_per_node),
                       num_nodes=hw.num_nodes, world_size=None,
                       attn_implementation="sdpa" if setup.attn_implementation ==
                       "flash_attention_2" else setup.attn_implementation)
    return replace(setup, device="gpu", gpus_per_node=hw.gpus_per_node,
                   num_nodes=hw.num_nodes, world_size=None)


def _fit(est: TrainEstimate, hw: Hardware) -> tuple[bool, int, int | None, str]:
    gib = GiB
    need = _device_need(est)
    if hw.device == "gpu":
        dev_margin = hw.gpu_mem_bytes - need
    else:
        # CPU training: every local rank's memory is host RAM, checked below.
        dev_margin = (hw.host_mem_bytes - est.host_bytes) if hw.host_mem_bytes else 0
    host_margin = hw.host_mem_bytes - est.host_bytes if hw.host_mem_bytes else None
    reasons = []
    if hw.device == "gpu" and dev_margin < 0:
        reasons.append(f"needs {need / gib:.1f} GiB per GPU, has {hw.gpu_mem_bytes / gib:.1f}")
    if host_margin is not None and host_margin < 0:
        reasons.append(f"needs {est.host_bytes / gib:.1f} GiB host RAM per node, "
                       f"has {hw.host_mem_bytes / gib:.1f}")
    if est.nvme_bytes and est.nvme_bytes > hw.nvme_free_bytes:
        reasons.append(f"needs {est.nvme_bytes / gib:.1f} GiB on NVMe, "
                       f"{hw.nvme_free_bytes / gib:.1f} free")
    return not reasons, int(dev_margin), host_margin, "; ".join(reasons)


def step_time(shape: ModelShape, setup: TrainSetup, hw: Hardware,
              counts: ParamCount | None = None) -> tuple[float, dict[str, float]]:
    """Seconds per optimizer step (grad_accum micro-batches) on one rank, and its parts."""
    pc = counts or count_params(shape)
    s = setup
    d = s.ranks
    local = max(1, min(s.gpus_per_node, d))
    tokens = s.micro_batch * s.seq_len * s.grad_accum * (2 if s.method == "dpo" else 1)
    factor = 6.0 if s.adapter == "none" else 4.0
    if s.gradient_checkpointing:
        factor += 2.0
    if s.method == "dpo":
        factor += 2.0  # the reference model's forward
    attn = 4 * s.seq_len * shape.q_dim * shape.num_layers  # per token, forward
    flops = tokens * (factor * pc.active + factor / 2 * attn)
    compute = flops / (hw.peak_tflops(s.dtype) * 1e12 * MFU)
    detail = {"compute": compute}
    w = 4 if s.dtype == "fp32" else 2
    if s.adapter == "none":
        trainable = pc.total
    else:
        from engine.estimate import lora_params

        trainable = lora_params(shape, s.lora_r, s.lora_targets)
    part = trainable / d if s.zero_stage > 0 else trainable
    if s.offload_optimizer != "none":
        # Gradients to the host, updated 16-bit weights back, and the CPU's Adam.
        detail["pcie (optimizer offload)"] = 2 * w * part / PCIE_BYTES_PER_S
        detail["cpu adam"] = part * local / CPU_ADAM_PARAMS_PER_S
        if s.offload_optimizer == "nvme":
            detail["nvme (optimizer states)"] = 2 * 16 * part * local / NVME_BYTES_PER_S
    if s.offload_param != "none":
        passes = 3 if s.gradient_checkpointing else 2  # forward, backward (+ recompute)
        moved = passes * w * pc.total * s.grad_accum
        detail["pcie (parameter offload)"] = moved / PCIE_BYTES_PER_S
        if s.offload_param == "nvme":
            detail["nvme (parameters)"] = moved / d * local / NVME_BYTES_PER_S
    return sum(detail.values()), detail


def max_micro_batch(shape: ModelShape, setup: TrainSetup, hw: Hardware,
                    limit: int = 4096, counts: ParamCount | None = None) -> int | None:
    """The largest micro-batch that fits (None if even 1 does not)."""
    pc = counts or count_params(shape)

    def fits(mb: int) -> bool:
        est = estimate_training(shape, replace(setup, micro_batch=mb), counts=pc)
        return _fit(est, hw)[0]

    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan(shape: ModelShape, setup: TrainSetup, hw: Hardware,
         options: tuple[tuple[int, str, str], ...] = OPTIONS) -> Plan:
    """Every option side by side on ``hw``, and the fastest one that fits."""
    pc = count_params(shape)
    base = setup_for_hardware(setup, hw)
    rows: list[PlanRow] = []
    for stage, opt, par in options:
        if base.adapter == "qlora" and stage == 3:
            continue  # 4-bit base weights cannot be partitioned by ZeRO-3 here
        if hw.device == "cpu" and (opt == "nvme" or par == "nvme"):
            continue
        s = replace(base, zero_stage=stage, offload_optimizer=opt, offload_param=par)
        try:
            est = estimate_training(shape, s, counts=pc)
        except EstimateError:
            continue
        ok, dev_margin, host_margin, why_not = _fit(est, hw)
        seconds, detail = step_time(shape, s, hw, counts=pc)
        rows.append(PlanRow(stage, opt, par, option_label(stage, opt, par), est, ok, dev_margin,
                            host_margin, why_not, seconds, detail))

    rec = next((r for r in rows if r.fits), None)
    why = _why(rec, rows, hw, base)
    mmb = None
    if rec is not None:
        mmb = max_micro_batch(shape, rec.estimate.setup, hw, counts=pc)
    assumptions = [
        f"time per step: FLOPs at {MFU:.0%} of {hw.peak_tflops(base.dtype):.3g} TFLOPS"
        + (" per GPU" if hw.device == "gpu" else " per CPU rank")
        + f", PCIe {PCIE_BYTES_PER_S / 1e9:.0f} GB/s per GPU, NVMe {NVME_BYTES_PER_S / 1e9:.0f}"
        f" GB/s per node, CPU Adam {CPU_ADAM_PARAMS_PER_S / 1e9:.0f}e9 params/s per node; "
        "communication between GPUs not modelled",
    ]
    if hw.device == "gpu" and hw.gpu_tflops is None and not any(
            k in hw.gpu_name.upper() for k in GPU_TFLOPS):
        assumptions.append(f"GPU model unknown: assumed {DEFAULT_GPU_TFLOPS:.0f} TFLOPS (A100)")
    return Plan(shape.name or shape.model_type, hw, base, rows, rec, why, mmb, assumptions)


def _why(rec: PlanRow | None, rows: list[PlanRow], hw: Hardware, setup: TrainSetup) -> str:
    gib = GiB
    unit = "GPU" if hw.device == "gpu" else "node"
    if not rows:
        return "No option applies to this setup."
    if rec is None:
        best = min(rows, key=lambda r: _device_need(r.estimate))
        hints = []
        if not setup.gradient_checkpointing:
            hints.append("gradient checkpointing")
        if setup.micro_batch > 1:
            hints.append("a smaller micro-batch")
        if setup.adapter == "none":
            hints.append("LoRA")
        hints.append("more GPUs" if hw.device == "gpu" else "more memory")
        return (f"Nothing fits: the smallest option, {best.label}, {best.why_not}. "
                f"Try {', '.join(hints)}.")
    i = rows.index(rec)
    if i == 0:
        return (f"{rec.label} is the fastest option and fits with "
                f"{rec.device_margin_bytes / gib:.1f} GiB to spare per {unit}.")
    faster = rows[i - 1]
    return (f"{rec.label} is the fastest option that fits: {faster.label} {faster.why_not}; "
            f"{rec.label} leaves {rec.device_margin_bytes / gib:.1f} GiB per {unit}.")
