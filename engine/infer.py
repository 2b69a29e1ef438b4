"""Batch inference over a prompts file, on every rank under the DeepSpeed launcher.

    deepspeed --num_gpus N --module engine.infer --run-dir runs/<id> --mode deepspeed|zero|plain \
        [--prompts FILE] [--model-dir DIR]

Three engines over the same model and prompts:

- ``deepspeed``: DeepSpeed-Inference (``deepspeed.init_inference``). The model is split over
  the ranks by tensor parallelism (AutoTP); every rank runs every batch and rank 0 keeps the
  outputs. Fused kernels (``replace_with_kernel_inject``) only where DeepSpeed has a policy for
  the architecture, the dtype is half precision and a GPU exists; otherwise the reason is
  logged and the plain (non-injected) engine is used.
- ``zero``: ZeRO-Inference: ZeRO-3 partitions the parameters and offloads them to CPU (or
  NVMe); each layer is gathered when it runs. Prompts are sharded over the ranks; every rank
  makes the same number of ``generate(..., synced_gpus=True)`` calls (the ZeRO-3 gathers are
  collective) and rank 0 merges the outputs in prompt order.
- ``plain``: ``model.generate`` on one process, the reference the other two are checked against.

Rank 0 writes ``generations.jsonl`` (prompt, output, tokens_in, tokens_out, seconds) in the run
directory and appends an ``infer`` event: mode, tokens/s, per-batch latency p50/p95, peak
memory. ``run_inference_stage`` runs the profile's inference stage in-process after training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.events import EventWriter

MODES = ("deepspeed", "zero", "plain")
# model_type -> DeepSpeed has a kernel-injection policy for it (deepspeed.module_inject).
KERNEL_INJECT_TYPES = {"gpt2", "gptj", "gpt_neo", "gpt_neox", "opt", "bloom", "llama", "bert",
                       "distilbert", "internlm"}


@dataclass
class InferSettings:
    mode: str = "plain"
    max_new_tokens: int = 128
    batch_size: int = 4
    temperature: float = 0.0
    top_p: float = 1.0
    kernel_inject: bool = True
    offload: str = "cpu"
    nvme_path: str | None = None
    dtype: str = "fp32"
    seed: int = 42

    @classmethod
    def from_profile(cls, profile, mode: str | None = None, dtype: str = "fp32") -> InferSettings:
        inf = profile.inference
        return cls(mode=mode or (inf.mode if inf.mode != "none" else "plain"),
                   max_new_tokens=inf.max_new_tokens, batch_size=inf.batch_size,
                   temperature=inf.temperature, top_p=inf.top_p, kernel_inject=inf.kernel_inject,
                   offload=inf.offload, nvme_path=profile.deepspeed.nvme_path, dtype=dtype,
                   seed=profile.seed)


@dataclass
class InferResult:
    """What a rank produced: records keyed by prompt index, per-batch latencies, memory."""

    records: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    resident_param_bytes: int = 0
    kernel_inject: bool = False
    # ZeRO-3: parameters left as empty placeholders, and where their partitions are kept.
    partitioned_params: int = 0
    partition_devices: list[str] = field(default_factory=list)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def log(msg: str) -> None:
    if rank() == 0:
        print(f"[zerotune] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def load_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file: ``{"prompt": str}`` or ``{"messages": [...]}`` (chat template)."""
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not a JSON object ({exc})") from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def prompt_text(row: dict[str, Any], tokenizer) -> str:
    if isinstance(row.get("messages"), list):
        return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    return row["prompt"]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def generate_batch(model, tokenizer, texts: list[str], s: InferSettings, *, synced_gpus: bool = False,
                   device: Any = None) -> tuple[list[str], list[int], list[int], float]:
    """(outputs, tokens_in, tokens_out, seconds) for one left-padded batch."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if device is not None:
        enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if s.temperature > 0:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if synced_gpus:
        kwargs["synced_gpus"] = True
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    dt = time.perf_counter() - t0
    width = enc["input_ids"].shape[1]
    new = out[:, width:].cpu()
    eos = tokenizer.eos_token_id
    outputs, tin, tout = [], [], []
    for i in range(len(texts)):
        ids = new[i].tolist()
        n = len(ids)
        if eos is not None and eos in ids:
            n = ids.index(eos) + 1  # count the end-of-sequence token, drop the padding after it
        ids = ids[:n]
        outputs.append(tokenizer.decode(ids, skip_special_tokens=True))
        tout.append(n)
        tin.append(int(enc["attention_mask"][i].sum()))
    return outputs, tin, tout, dt


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _run_batches(model, tokenizer, rows, indices_batches, s: InferSettings, res: InferResult, *,
                 synced_gpus: bool = False, device: Any = None, pad_to: int | None = None) -> None:
    texts = [prompt_text(r, tokenizer) for r in rows]
    batches = list(indices_batches)
    # ZeRO-3: every rank makes the same number of generate calls; extra calls run a dummy batch.
    while pad_to is not None and len(batches) < pad_to:
        batches.append(None)
    t0 = time.perf_counter()
    for b in batches:
        idx = b if b is not None else [0]
        outs, tin, tout, dt = generate_batch(model, tokenizer, [texts[i] for i in idx], s,
                                             synced_gpus=synced_gpus, device=device)
        if b is None:
            continue
        res.latencies.append(dt)
        for i, o, a, z in zip(idx, outs, tin, tout, strict=True):
            res.records.append({"index": i, "prompt": texts[i], "output": o, "tokens_in": a,
                                "tokens_out": z, "seconds": dt})
    res.seconds = time.perf_counter() - t0


def resident_param_bytes(model) -> int:
    """Bytes of parameters materialised in the module (ZeRO-3 placeholders count 0)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kernel_inject_support(model, dtype: str, want: bool) -> tuple[bool, str]:
    """(use kernel injection?, why not)."""
    import torch

    if not want:
        return False, "inference.kernel_inject is off"
    mt = getattr(model.config, "model_type", "?")
    if mt not in KERNEL_INJECT_TYPES:
        return False, f"DeepSpeed has no kernel-injection policy for model type {mt!r}"
    if dtype not in ("fp16", "bf16"):
        return False, f"fused inference kernels run in fp16/bf16, the model is {dtype}"
    if not torch.cuda.is_available():
        return False, "no GPU: fused inference kernels are CUDA kernels"
    return True, ""


def _device():
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc, acc.current_device_name()


def run_plain(model, tokenizer, rows, s: InferSettings) -> InferResult:
    res = InferResult()
    res.resident_param_bytes = resident_param_bytes(model)
    _run_batches(model, tokenizer, rows, _batches(len(rows), s.batch_size), s, res)
    return res


def run_deepspeed(model, tokenizer, rows, s: InferSettings) -> InferResult:
    """DeepSpeed-Inference: tensor parallel over all ranks; every rank runs every batch."""
    import deepspeed

    from engine.train import torch_dtype

    res = InferResult()
    inject, why = kernel_inject_support(model, s.dtype, s.kernel_inject)
    if not inject and s.kernel_inject:
        res.notes.append(f"kernel injection off: {why}; using DeepSpeed-Inference without fused kernels")
    res.kernel_inject = inject
    tp = world_size()
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=torch_dtype(s.dtype),
                                      replace_with_kernel_inject=inject)
    _, dev = _device()
    res.resident_param_bytes = resident_param_bytes(engine.module)
    _run_batches(engine, tokenizer, rows, _batches(len(rows), s.batch_size), s, res, device=dev)
    if rank() != 0:
        res.records, res.latencies = [], []  # every rank ran the same batches
    return res


def zero_inference_config(s: InferSettings) -> dict[str, Any]:
    """ZeRO-3 with every parameter partitioned and offloaded (no training state at all)."""
    import torch

    on_gpu = torch.cuda.is_available()
    off: dict[str, Any] = {"device": s.offload, "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 1_000_000_000,
        "zero_optimization": {
            "stage": 3,
            "offload_param": off,
            # 0: even norms and biases are partitioned, so nothing stays resident by accident.
            "stage3_param_persistence_threshold": 0,
        },
        "bf16": {"enabled": s.dtype == "bf16"},
        "fp16": {"enabled": s.dtype == "fp16"},
    }
    if s.offload == "nvme":
        off.update({"nvme_path": s.nvme_path, "buffer_count": 5})
        cfg["aio"] = {"block_size": 1048576, "queue_depth": 8, "single_submit": False,
                      "overlap_events": True, "thread_count": 1}
    return cfg


def zero_engine(model, s: InferSettings):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=zero_inference_config(s))
    engine.module.eval()
    return engine


def run_zero(model, tokenizer, rows, s: InferSettings) -> InferResult:
    """ZeRO-Inference: prompts sharded over ranks, synced generate, outputs gathered."""
    res = InferResult()
    engine = zero_engine(model, s)
    _, dev = _device()
    res.resident_param_bytes = resident_param_bytes(engine.module)
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_tensor")]
    res.partitioned_params = sum(1 for p in params if p.numel() == 0)
    res.partition_devices = sorted({p.ds_tensor.device.type for p in params})
    all_batches = _batches(len(rows), s.batch_size)
    mine = all_batches[rank()::world_size()]
    most = math.ceil(len(all_batches) / world_size())
    _run_batches(engine.module, tokenizer, rows, mine, s, res, synced_gpus=world_size() > 1,
                 device=dev, pad_to=most)
    return res


# --------------------------------------------------------------------------------------------
# Summary and outputs
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def peak_memory() -> tuple[int, str]:
    """(bytes, what): peak GPU allocation on a GPU, else this process's peak host RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "gpu_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_rss"


def summarize(mode: str, parts: list[dict[str, Any]], n_prompts: int) -> dict[str, Any]:
    """One event's worth of figures from every rank's part."""
    latencies = [x for p in parts for x in p["latencies"]]
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
    seconds = max(p["seconds"] for p in parts) or 1e-9
    tokens_out = sum(r["tokens_out"] for r in records)
    peaks = [p["peak_mem_bytes"] for p in parts]
    return {
        "mode": mode, "world_size": len(parts), "prompts": n_prompts,
        "tokens_in": sum(r["tokens_in"] for r in records), "tokens_out": tokens_out,
        "tokens_per_s": tokens_out / seconds, "seconds": seconds,
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "batches": len(latencies),
        "peak_mem_bytes": max(peaks), "peak_mem_kind": parts[0]["peak_mem_kind"],
        "resident_param_bytes": parts[0]["resident_param_bytes"],
        "kernel_inject": parts[0]["kernel_inject"],
        "partitioned_params": parts[0]["partitioned_params"],
        "partition_devices": parts[0]["partition_devices"],
        "notes": sorted({n for p in parts for n in p["notes"]}),
        "records": records,
    }


def write_generations(path: Path, records: list[dict[str, Any]]) -> None:
    keys = ("prompt", "output", "tokens_in", "tokens_out", "seconds")
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _gather(part: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [part]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, part)
    return out


def infer(model, tokenizer, rows: list[dict[str, Any]], s: InferSettings) -> dict[str, Any] | None:
    """Run one mode on this rank; on rank 0 return the merged summary (with records)."""
    import torch

    torch.manual_seed(s.seed)
    runner = {"plain": run_plain, "deepspeed": run_deepspeed, "zero": run_zero}[s.mode]
    res = runner(model, tokenizer, rows, s)
    for n in res.notes:
        log(n)
    peak, kind = peak_memory()
    part = {**asdict(res), "peak_mem_bytes": peak, "peak_mem_kind": kind}
    parts = _gather(part)
    return summarize(s.mode, parts, len(rows)) if rank() == 0 else None


def record_summary(summary: dict[str, Any], run_dir: Path, events: EventWriter | None,
                   out_name: str = "generations.jsonl") -> dict[str, Any]:
    """Write generations.jsonl and the ``infer`` event; return the event's fields."""
    write_generations(run_dir / out_name, summary["records"])
    fields = {k: v for k, v in summary.items() if k != "records"}
    fields["generations"] = str(run_dir / out_name)
    if events is not None:
        events.emit("infer", **fields)
    return fields


# --------------------------------------------------------------------------------------------
# In-process stage after training
# --------------------------------------------------------------------------------------------


def run_inference_stage(profile, run_dir: Path, events: EventWriter | None) -> dict[str, Any]:
    """The profile's inference stage, in the training process, after the model is saved.

    Every rank must call it (ZeRO-Inference and tensor parallelism are collective). The
    trained model is loaded back from ``run_dir/model`` (adapters merged). Returns the
    ``infer`` event's fields on rank 0, ``{}`` on the other ranks or when there is nothing to
    do (``inference.mode: none`` or no prompts).
    """
    inf = profile.inference
    if inf.mode == "none" or not inf.prompts:
        return {}
    import torch.distributed as dist

    from engine.run_model import load_run_model

    from engine.export import training_dtype

    s = InferSettings.from_profile(profile, dtype=training_dtype(Path(run_dir)))
    ensure_distributed()
    if dist.get_world_size() > 1:
        dist.barrier()  # rank 0 has finished writing model/
    if s.mode == "deepspeed" and inf.tensor_parallel != dist.get_world_size():
        log(f"inference.tensor_parallel is {inf.tensor_parallel}; after training the model is split "
            f"over the run's {dist.get_world_size()} rank(s) (zerotune infer --gpus N for another size)")
    model, tok, _ = load_run_model(Path(run_dir), s.dtype)
    rows = load_prompts(Path(inf.prompts))
    summary = infer(model, tok, rows, s)
    if summary is None:
        return {}
    return record_summary(summary, Path(run_dir), events)


# --------------------------------------------------------------------------------------------
# Entry point under the launcher
# --------------------------------------------------------------------------------------------


def ensure_distributed() -> None:
    """A process group for DeepSpeed: the launcher's, or a one-rank group when run alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        from engine.launcher import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    deepspeed.init_distributed()


def run(args: argparse.Namespace) -> int:
    from engine.run_model import load_run_model

    run_dir = args.run_dir.resolve()
    events = EventWriter(run_dir / "events.jsonl") if rank() == 0 else None
    try:
        profile = None
        if (run_dir / "profile.yaml").exists():
            from engine.train import load_run_profile

            profile = load_run_profile(run_dir).profile
        if profile is not None:
            dtype = args.dtype or (profile.model.dtype if profile.model.dtype != "auto" else "fp32")
            s = InferSettings.from_profile(profile, args.mode, dtype)
        else:
            s = InferSettings(mode=args.mode, dtype=args.dtype or "fp32")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(args, key) is not None:
                setattr(s, key, getattr(args, key))
        prompts = args.prompts or (Path(profile.inference.prompts) if profile and profile.inference.prompts else None)
        if prompts is None:
            raise ValueError("no prompts: pass --prompts FILE or set inference.prompts in the profile")
        rows = load_prompts(prompts)
        if s.mode != "plain":
            ensure_distributed()
        model, tok, src = load_run_model(run_dir, s.dtype, model_dir=args.model_dir)
        log(f"{s.mode} inference of {len(rows)} prompts on {world_size()} rank(s), "
            f"model {src.path} ({src.kind}), {s.dtype}")
        summary = infer(model, tok, rows, s)
        if summary is not None:
            fields = record_summary(summary, run_dir, events, args.out_name)
            log("inference: " + json.dumps({k: v for k, v in fields.items() if k != "notes"}))
        return 0
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        traceback.print_exc()
        if rank() == 0:
            from engine.train import classify_error

            kind, reason = classify_error(exc)
            EventWriter(run_dir / "events.jsonl").emit("error", kind=kind, reason=reason,
                                                       rank=rank(), step=None, stage="infer")
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--mode", choices=MODES, default="plain")
    parser.add_argument("--prompts", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    parser.add_argument("--out-name", default="generations.jsonl")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    from engine.events import end_rank

    end_rank(main())
