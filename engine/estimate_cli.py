"""``zerotune estimate``: will it fit, and which ZeRO option is fastest?

    zerotune estimate PROFILE [--set key=value ...] [hardware flags] [--json]
    zerotune estimate --model NAME_OR_PATH [--method sft] [--adapter lora] [--seq 2048]
                      [--micro-batch 1] [--gpus 8] [--gpu-mem 80] [--nodes 1] [--host-mem 512]
                      [--zero 2] [--offload cpu] [--json]

Without hardware flags the machine's own GPUs, RAM and disk are used (none: the CPU case).
A table goes to stdout by default, the full breakdown as JSON with ``--json``; errors go to
stderr with exit code 2. Nothing heavy is imported: no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``estimate`` verb to an argparse subparsers object."""
    p = subparsers.add_parser(
        "estimate",
        help="memory per GPU, host RAM and NVMe of a profile or model; the ZeRO option to use",
        description="Estimate training memory (per GPU, host RAM per node, NVMe) for every ZeRO "
        "stage and offload option, and recommend the fastest one that fits.",
    )
    p.add_argument("profile", nargs="?", default=None, help="run profile (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value, e.g. --set training.micro_batch_size=2")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="instead of a profile: a catalog name (llama-3.1-8b), local directory, "
                   "config.json or hub id")
    g = p.add_argument_group("training (with --model)")
    g.add_argument("--method", choices=("cpt", "sft", "dpo"), default="sft")
    g.add_argument("--adapter", choices=("none", "lora", "qlora"), default="none")
    g.add_argument("--lora-r", type=int, default=16, metavar="R")
    g.add_argument("--seq", type=int, default=2048, metavar="N", help="tokens per sequence")
    g.add_argument("--micro-batch", type=int, default=1, metavar="N", help="sequences per GPU")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", "--gc", action="store_true",
                   help="recompute activations in backward")
    g.add_argument("--attn", choices=("eager", "sdpa", "flash_attention_2"), default="sdpa")
    g = p.add_argument_group("ZeRO (default: the profile's, or the recommended option)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, metavar="STAGE")
    g.add_argument("--offload", choices=("none", "cpu", "nvme"), default=None,
                   help="optimizer offload")
    g.add_argument("--offload-param", choices=("none", "cpu", "nvme"), default=None)
    g = p.add_argument_group("hardware (default: this machine)")
    g.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs per node (0: CPU)")
    g.add_argument("--gpu-mem", type=float, default=None, metavar="GB",
                   help="memory per GPU in GiB, as nvidia-smi shows it (80 for an 80GB card)")
    g.add_argument("--nodes", type=int, default=None, metavar="N")
    g.add_argument("--host-mem", type=float, default=None, metavar="GB", help="RAM per node, GiB")
    g.add_argument("--nvme-free", type=float, default=None, metavar="GB",
                   help="free NVMe space per node, GiB")
    p.add_argument("--json", action="store_true", help="the full breakdown as JSON")
    p.set_defaults(func=cmd_estimate)
    return p


class _BadInput(Exception):
    pass


def cmd_estimate(args: argparse.Namespace) -> int:
    from engine.estimate import EstimateError
    from engine.model_shape import ModelShapeError

    try:
        result = _run(args)
    except (_BadInput, EstimateError, ModelShapeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a profile problem, or anything else: one line, no traceback
        report = getattr(exc, "report", None)
        print(report() if callable(report) else f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result["json"], indent=2))
    else:
        sys.stdout.write(result["text"])
    return EXIT_OK


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise _BadInput(f"{name} must be {'0 or more' if allow_zero else 'at least 1'}")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from engine.estimate import GiB, TrainSetup, estimate_inference, estimate_training
    from engine.model_shape import count_params, load_model_shape
    from engine.planner import Hardware, detect_hardware, plan

    for name in ("seq", "micro_batch", "grad_accum", "lora_r", "nodes"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--gpus", args.gpus, allow_zero=True)
    for name in ("gpu_mem", "host_mem", "nvme_free"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if bool(args.profile) == bool(args.model):
        raise _BadInput("give a PROFILE or --model NAME_OR_PATH (one of them)")
    if args.overrides and not args.profile:
        raise _BadInput("--set applies to a PROFILE")

    inference = None
    pinned_stage = args.zero is not None or args.offload is not None or \
        args.offload_param is not None
    if args.profile:
        from engine.estimate import (inference_setup_from_profile, setup_from_profile,
                                     shape_from_profile)
        from engine.profile import load_profile

        lp = load_profile(args.profile, args.overrides, check_data=False, check_model=False)
        shape = shape_from_profile(lp)
        setup = setup_from_profile(lp)
        inference = inference_setup_from_profile(lp)
        res = lp.profile.resources
        declared = {
            "gpus": None if res.gpus_per_node == "auto" or setup.device == "cpu"
            else int(res.gpus_per_node),
            "gpu_mem": None if res.gpu_memory_gb == "auto" else float(res.gpu_memory_gb),
            "host_mem": None if res.host_memory_gb == "auto" else float(res.host_memory_gb),
            "nodes": res.num_nodes if res.num_nodes > 1 else None,
        }
        pinned_stage = True
    else:
        shape = load_model_shape(args.model)
        setup = TrainSetup(
            method=args.method, adapter=args.adapter, lora_r=args.lora_r, seq_len=args.seq,
            micro_batch=args.micro_batch, grad_accum=args.grad_accum,
            gradient_checkpointing=args.gradient_checkpointing, attn_implementation=args.attn,
            dtype=args.dtype or "bf16",
        )
        declared = {"gpus": None, "gpu_mem": None, "host_mem": None, "nodes": None}
    for key in declared:
        if getattr(args, key) is not None:
            declared[key] = getattr(args, key)
    hw = _hardware(declared, args.nvme_free, detect_hardware, Hardware)
    if hw.device == "cpu" and args.dtype is None and not args.profile:
        setup = replace(setup, dtype="fp32")
    if args.zero is not None:
        setup = replace(setup, zero_stage=args.zero)
    if args.offload is not None:
        setup = replace(setup, offload_optimizer=args.offload)
    if args.offload_param is not None:
        setup = replace(setup, offload_param=args.offload_param)
    setup.validate()

    p = plan(shape, setup, hw)
    if pinned_stage:
        shown = next((r for r in p.rows if (r.zero_stage, r.offload_optimizer, r.offload_param)
                      == (p.setup.zero_stage, p.setup.offload_optimizer,
                          p.setup.offload_param)), None)
        est = shown.estimate if shown else estimate_training(shape, p.setup)
    elif p.recommended is not None:
        est = p.recommended.estimate
    else:
        est = min(p.rows, key=lambda r: r.estimate.gpu_peak_bytes).estimate
    inf_est = estimate_inference(shape, inference) if inference else None
    pc = count_params(shape)
    out_json = {
        "model": {"name": shape.name, "shape": shape.to_dict(), "params": pc.to_dict()},
        "estimate": est.to_dict(),
        "plan": p.to_dict(),
    }
    if inf_est is not None:
        out_json["inference"] = inf_est.to_dict()
    return {"json": out_json, "text": _table(shape, pc, est, p, inf_est, GiB)}


def _hardware(declared: dict[str, Any], nvme_free: float | None, detect, Hardware):
    gib = 2**30
    if all(v is None for v in declared.values()):
        hw = detect()
        if nvme_free is not None:
            hw = replace(hw, nvme_free_bytes=int(nvme_free * gib))
        return hw
    gpus = declared["gpus"]
    gpu_mem = declared["gpu_mem"]
    detected = None
    if gpus is None or (gpus and gpu_mem is None):
        detected = detect()
        if gpus is None:
            gpus = detected.gpus_per_node
        if gpus and gpu_mem is None:
            if not detected.gpu_mem_bytes:
                raise _BadInput("no GPU is detected here: give the memory per GPU with --gpu-mem GB"
                                " (or resources.gpu_memory_gb in the profile)")
            gpu_mem = detected.gpu_mem_bytes / gib
    host = declared["host_mem"]
    return Hardware(
        gpus_per_node=int(gpus), gpu_mem_bytes=int((gpu_mem or 0) * gib),
        num_nodes=int(declared["nodes"] or 1),
        host_mem_bytes=int(host * gib) if host else 0,
        nvme_free_bytes=int(nvme_free * gib) if nvme_free else 0,
        gpu_name=detected.gpu_name if detected and declared["gpus"] is None else "",
        source="declared",
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _table(shape, pc, est, plan, inf_est, GiB) -> str:
    s = est.setup
    hw = plan.hardware
    lines: list[str] = []
    trainable = f"{est.trainable_params / 1e9:.3g}B" if est.trainable_params >= 1e8 else \
        f"{est.trainable_params / 1e6:.3g}M"
    adapter = "full fine-tuning" if s.adapter == "none" else f"{s.adapter} r={s.lora_r}"
    if hw.device == "gpu":
        where = f"{hw.num_nodes} node(s) x {hw.gpus_per_node} GPU(s) x " \
                f"{hw.gpu_mem_bytes / GiB:.0f} GiB"
    else:
        where = f"CPU, {s.gpus_per_node} rank(s) per node"
    lines.append(f"{est.model}: {pc.total / 1e9:.3g}B parameters, {trainable} trainable "
                 f"({adapter}); {s.method}, {s.dtype}, seq {s.seq_len} x micro-batch "
                 f"{s.micro_batch}; {where} ({hw.source})")
    lines.append("")
    label = f"ZeRO-{s.zero_stage}"
    if s.offload_optimizer != "none":
        label += f", optimizer on {s.offload_optimizer}"
    if s.offload_param != "none":
        label += f", parameters on {s.offload_param}"
    dev = "GPU" if s.device == "gpu" else "rank"
    lines.append(f"Per {dev}, {label} (peak: {est.peak_phase})".ljust(62) + "GiB")
    for name, value in est.device_terms.items():
        lines.append(f"  {name}".ljust(62) + f"{_gib(value):>8}")
    lines.append("  " + "-" * 66)
    lines.append("  tensors at the peak".ljust(62) + f"{_gib(est.device_total_bytes):>8}")
    if s.device == "gpu":
        lines.append("  GPU overhead (CUDA context 1 GiB + 10% fragmentation)".ljust(62)
                     + f"{_gib(est.overhead_bytes):>8}")
        need = est.gpu_peak_bytes
        cap = hw.gpu_mem_bytes
        verdict = (f"fits, {_gib(cap - need)} spare" if need <= cap
                   else f"does NOT fit: short by {_gib(need - cap)}")
        lines.append("  per GPU".ljust(62) + f"{_gib(need):>8}  of {_gib(cap)}: {verdict}")
    lines.append("")
    lines.append(f"Host RAM per node: {_gib(est.host_bytes)} GiB"
                 + (f" of {_gib(hw.host_mem_bytes)}" if hw.host_mem_bytes else "")
                 + f" (training {_gib(est.host_train_bytes)}, checkpoint loading "
                 f"{_gib(est.host_load_bytes)});  NVMe: {_gib(est.nvme_bytes)} GiB")
    lines.append("")
    head = f"{'option':34s}{'per ' + dev:>10s}{'host/node':>11s}{'NVMe':>9s}  {'fits':5s}" \
           f"{'s/step':>8s}"
    lines.append(head + "   (GiB)")
    for r in plan.rows:
        need = r.estimate.gpu_peak_bytes if r.estimate.setup.device == "gpu" else \
            r.estimate.device_total_bytes
        mark = "*" if plan.recommended is r else " "
        lines.append(f"{mark} {r.label:32s}{_gib(need):>10s}{_gib(r.estimate.host_bytes):>11s}"
                     f"{_gib(r.estimate.nvme_bytes):>9s}  {'yes' if r.fits else 'no':5s}"
                     f"{r.step_seconds:8.2f}")
    lines.append("")
    if plan.recommended is not None:
        lines.append(f"Recommended: {plan.recommended.label}. {plan.why}")
        if plan.max_micro_batch:
            lines.append(f"Largest micro-batch that fits with it: {plan.max_micro_batch}.")
    else:
        lines.append(plan.why)
    for a in plan.assumptions:
        lines.append(f"Assumed: {a}.")
    for n in est.notes:
        lines.append(f"Note: {n}.")
    if inf_est is not None:
        lines.append("")
        lines.append(f"Inference ({inf_est.setup.mode}): {_gib(inf_est.gpu_peak_bytes)} GiB per "
                     f"GPU (KV cache {_gib(inf_est.kv_cache_bytes)}), host "
                     f"{_gib(inf_est.host_bytes)} GiB, NVMe {_gib(inf_est.nvme_bytes)} GiB")
    return "\n".join(lines) + "\n"
