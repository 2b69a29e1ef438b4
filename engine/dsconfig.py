"""The DeepSpeed JSON of a profile, fully resolved: no "auto" is left for anyone to guess.

The Trainer's own arguments are derived from the same profile (``engine.train``), so the
values that transformers cross-checks (batch sizes, lr, betas, eps, weight decay, clipping,
precision) always agree with this file. The learning-rate schedule is left to the Trainer
(DeepSpeed optimizer + transformers scheduler), so the JSON does not depend on the data size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from engine.profile import LoadedProfile


@dataclass(frozen=True)
class Placement:
    """Where a profile runs, once the hardware is known."""

    device: str  # "gpu" | "cpu"
    gpus_per_node: int  # ranks per node
    num_nodes: int
    dtype: str  # "bf16" | "fp16" | "fp32"

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes


def resolve_placement(lp: LoadedProfile) -> Placement:
    """Device, ranks and precision for this profile on this machine."""
    from engine.hardware import local_gpus

    r = lp.profile.resources
    gpus = local_gpus()
    if r.device == "cpu" or (r.device == "auto" and gpus.count == 0):
        device = "cpu"
    else:
        device = "gpu"
    if r.gpus_per_node == "auto":
        per_node = gpus.count if device == "gpu" and gpus.count else 1
    else:
        per_node = int(r.gpus_per_node)
    dtype = lp.profile.model.dtype
    if dtype == "auto":
        if device == "cpu":
            dtype = "fp32"
        else:
            dtype = "bf16" if (gpus.bf16 or gpus.count == 0) else "fp16"
    return Placement(device, per_node, r.num_nodes, dtype)


def _hidden_size(lp: LoadedProfile) -> int | None:
    from engine.model_source import profile_config

    cfg = profile_config(lp) or {}
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(lp: LoadedProfile, placement: Placement | None = None) -> dict[str, Any]:
    p = lp.profile
    pl = placement or resolve_placement(lp)
    t, ds = p.training, p.deepspeed
    on_gpu = pl.device == "gpu"
    hidden = _hidden_size(lp)
    # transformers' "auto" is hidden^2; unknown hidden size: 2e8 elements, a common choice.
    bucket = ds.reduce_bucket_size or (hidden * hidden if hidden else 200_000_000)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        overlap = ds.overlap_comm if ds.overlap_comm is not None else (on_gpu and ds.zero_stage >= 2)
        zero.update({
            "overlap_comm": bool(overlap),
            "contiguous_gradients": True,
            "reduce_bucket_size": int(bucket),
        })
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = int(bucket)
    if ds.zero_stage == 3:
        h = hidden or 4096
        zero.update({
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": int(10 * h),
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    for key, where in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if where == "none":
            continue
        off: dict[str, Any] = {"device": where, "pin_memory": on_gpu}
        if where == "nvme":
            off.update({"nvme_path": ds.nvme_path, "buffer_count": 5 if key == "offload_param" else 4})
        zero[key] = off
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * pl.world_size,
        "gradient_clipping": t.max_grad_norm,
        "steps_per_print": 1_000_000_000,  # zerotune reports progress itself
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.adam_betas),
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": pl.dtype == "bf16"},
        "fp16": {
            "enabled": pl.dtype == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
    }
    if ds.offload_optimizer == "none" and not on_gpu:
        # On the CPU accelerator, torch's AdamW avoids compiling a fused op for nothing.
        cfg["optimizer"]["params"]["torch_adam"] = True
    if "nvme" in (ds.offload_optimizer, ds.offload_param):
        cfg["aio"] = {"block_size": 1048576, "queue_depth": 8, "single_submit": False,
                      "overlap_events": True, "thread_count": 1}
    return _merge(cfg, ds.overrides)
