"""How close is zerotune's memory estimate to the real peak? Measured on CPU with real DeepSpeed.

Trains tiny GPT-2- and Llama-shaped models from config for a few steps under every ZeRO stage,
with and without CPU optimizer offload and gradient checkpointing, full and LoRA, with one and
two ranks. Each case runs in a fresh process under an LD_PRELOAD malloc interposer
(``bench/malloc_peak.c``, built here with gcc) that counts the live and peak bytes of every
heap allocation: the CPU analogue of ``torch.cuda.max_memory_allocated``. The peak is taken
relative to a baseline after DeepSpeed has warmed up (imports, JIT-built ops) on a tiny model
of the same kind. Prints estimate vs measured per case, the error distribution, DeepSpeed's own
``estimate_zero{2,3}_model_states_mem_needs`` on the same cases, and the time one estimate and
the full option table take.

    .venv/bin/python bench/estimate_accuracy.py            # default cases, ~5 minutes
    .venv/bin/python bench/estimate_accuracy.py --full     # every case
    .venv/bin/python bench/estimate_accuracy.py --only llama --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 2**20


# --- the cases ------------------------------------------------------------------------------

def _gpt2(h: int, L: int, heads: int, V: int, **kw) -> dict:
    return {"arch": "gpt2", "config": {"model_type": "gpt2", "n_embd": h, "n_layer": L,
                                        "n_head": heads, "vocab_size": V, "n_positions": 1024,
                                        "bos_token_id": 0, "eos_token_id": 0}, **kw}


def _llama(h: int, L: int, heads: int, kv: int, inter: int, V: int, **kw) -> dict:
    return {"arch": "llama", "config": {"model_type": "llama", "hidden_size": h,
                                         "num_hidden_layers": L, "num_attention_heads": heads,
                                         "num_key_value_heads": kv, "intermediate_size": inter,
                                         "vocab_size": V, "max_position_embeddings": 4096,
                                         "tie_word_embeddings": False, "bos_token_id": 0,
                                         "eos_token_id": 0}, **kw}


def default_cases() -> list[dict]:
    """About five minutes on two cores: every stage, offload, checkpointing, LoRA, 2 ranks."""
    g = _gpt2(384, 4, 6, 16000)
    lm = _llama(384, 4, 6, 2, 1024, 32000)
    cases = []
    for stage in (0, 1, 2, 3):
        cases.append({**g, "stage": stage, "dtype": "fp32", "seq": 256, "mb": 2})
        cases.append({**lm, "stage": stage, "dtype": "bf16", "seq": 256, "mb": 2})
    cases += [
        {**g, "stage": 2, "dtype": "fp32", "seq": 256, "mb": 2, "offload": "cpu"},
        {**lm, "stage": 3, "dtype": "bf16", "seq": 256, "mb": 2, "offload": "cpu"},
        {**g, "stage": 1, "dtype": "fp32", "seq": 512, "mb": 2, "gc": True},
        {**lm, "stage": 0, "dtype": "bf16", "seq": 512, "mb": 2, "gc": True},
        {**lm, "stage": 2, "dtype": "bf16", "seq": 256, "mb": 2, "adapter": "lora"},
        {**g, "stage": 0, "dtype": "fp32", "seq": 256, "mb": 2, "adapter": "lora"},
        {**lm, "stage": 2, "dtype": "bf16", "seq": 256, "mb": 2, "world": 2},
        {**g, "stage": 3, "dtype": "fp32", "seq": 256, "mb": 2, "world": 2},
        {**lm, "stage": 2, "dtype": "bf16", "seq": 256, "mb": 2, "method": "sft"},
        {**g, "stage": 0, "dtype": "fp32", "seq": 512, "mb": 1, "method": "sft"},
        {**_llama(384, 4, 6, 2, 1024, 2000), "stage": 0, "dtype": "bf16", "seq": 2048, "mb": 1,
         "gc": True},
    ]
    return cases


def full_cases() -> list[dict]:
    """Widths, depths, vocabularies, sequence lengths and micro-batches on top of the default."""
    cases = default_cases()
    shapes = [
        _gpt2(256, 3, 4, 50257), _gpt2(512, 6, 8, 8000), _gpt2(768, 2, 12, 50257),
        _llama(256, 2, 4, 4, 688, 128256), _llama(512, 6, 8, 2, 1376, 16000),
        _llama(640, 3, 10, 5, 1728, 32000),
    ]
    for i, shape in enumerate(shapes):
        for stage in (0, 1, 2, 3):
            seq, mb = [(128, 4), (512, 1), (256, 2), (1024, 1)][(i + stage) % 4]
            dtype = "fp32" if shape["arch"] == "gpt2" else "bf16"
            cases.append({**shape, "stage": stage, "dtype": dtype, "seq": seq, "mb": mb,
                          "gc": bool((i + stage) % 2), "offload": "cpu" if stage == 2 else "none"})
    lm = _llama(384, 4, 6, 2, 1024, 32000)
    g = _gpt2(384, 4, 6, 16000)
    cases += [
        {**lm, "stage": 3, "dtype": "bf16", "seq": 256, "mb": 2, "adapter": "lora", "gc": True},
        {**lm, "stage": 1, "dtype": "fp32", "seq": 256, "mb": 4, "attn": "eager"},
        {**g, "stage": 2, "dtype": "bf16", "seq": 256, "mb": 2},
        {**g, "stage": 0, "dtype": "fp32", "seq": 256, "mb": 2, "attn": "eager"},
        {**lm, "stage": 1, "dtype": "bf16", "seq": 256, "mb": 2, "world": 2, "offload": "cpu"},
        {**g, "stage": 0, "dtype": "fp32", "seq": 256, "mb": 2, "world": 2},
        {**lm, "stage": 1, "dtype": "bf16", "seq": 256, "mb": 2, "world": 2},
        {**lm, "stage": 0, "dtype": "fp32", "seq": 512, "mb": 2, "method": "sft"},
        {**lm, "stage": 3, "dtype": "bf16", "seq": 256, "mb": 2, "world": 2, "gc": True},
        {**_gpt2(384, 4, 6, 2000), "stage": 0, "dtype": "fp32", "seq": 1024, "mb": 1,
         "gc": True, "attn": "eager"},
        {**_gpt2(384, 4, 6, 2000), "stage": 2, "dtype": "fp32", "seq": 1024, "mb": 1, "gc": True},
        {**_llama(384, 4, 6, 2, 1024, 2000), "stage": 3, "dtype": "fp32", "seq": 1024, "mb": 2,
         "gc": True},
        {**lm, "stage": 2, "dtype": "bf16", "seq": 256, "mb": 2, "method": "sft",
         "adapter": "lora"},
    ]
    return cases


def case_label(c: dict) -> str:
    cfg = c["config"]
    h = cfg.get("n_embd", cfg.get("hidden_size"))
    L = cfg.get("n_layer", cfg.get("num_hidden_layers"))
    parts = [f"{c['arch']}-h{h}-L{L}-V{cfg['vocab_size'] // 1000}k", f"z{c['stage']}", c["dtype"],
             f"s{c['seq']}x{c['mb']}"]
    if c.get("offload", "none") != "none":
        parts.append("off-" + c["offload"])
    if c.get("gc"):
        parts.append("gc")
    if c.get("adapter", "none") != "none":
        parts.append(c["adapter"])
    if c.get("attn", "sdpa") != "sdpa":
        parts.append(c["attn"])
    if c.get("world", 1) > 1:
        parts.append(f"w{c['world']}")
    if c.get("method", "cpt") != "cpt":
        parts.append(c["method"])
    return " ".join(parts)


def ds_config(c: dict, hidden: int) -> dict:
    """The DeepSpeed config of a case: what zerotune generates ("auto"-style buckets)."""
    zero: dict = {"stage": c["stage"]}
    if c["stage"] > 0:  # as engine/dsconfig.py writes it for the CPU accelerator
        zero.update({"reduce_bucket_size": hidden * hidden, "overlap_comm": False,
                     "contiguous_gradients": True})
    if c["stage"] in (1, 2):
        zero["allgather_bucket_size"] = hidden * hidden
    if c["stage"] == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
        zero["stage3_param_persistence_threshold"] = 10 * hidden
        zero["stage3_max_live_parameters"] = 1_000_000_000
        zero["stage3_max_reuse_distance"] = 1_000_000_000
    optimizer = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}
    if c.get("offload", "none") != "none":
        zero["offload_optimizer"] = {"device": c["offload"], "pin_memory": False}
    else:
        optimizer["params"]["torch_adam"] = True
    cfg = {"train_micro_batch_size_per_gpu": c["mb"], "gradient_accumulation_steps": 1,
           "optimizer": optimizer, "zero_optimization": zero, "steps_per_print": 10**6,
           "gradient_clipping": 1.0, "wall_clock_breakdown": False}
    if c["dtype"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


# --- the worker: one case in a fresh process ---------------------------------------------

def worker(case: dict, lib_path: str, steps: int) -> dict:
    import ctypes
    import gc
    import logging

    lib = ctypes.CDLL(lib_path)
    lib.mp_live.restype = ctypes.c_longlong
    lib.mp_peak.restype = ctypes.c_longlong

    import deepspeed
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["dtype"]]
    attn = case.get("attn", "sdpa")

    def build(config: dict):
        cfg = dict(config)
        hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = transformers.AutoModelForCausalLM.from_config(
            hf, attn_implementation=attn, dtype=dtype)
        if case.get("gc"):
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.config.use_cache = False
        if case.get("method", "cpt") == "sft":
            # What TRL's SFTTrainer does: a chunked LM head that never materialises the logits.
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if case.get("adapter", "none") == "lora":
            import peft

            targets = ["c_attn", "c_proj", "c_fc"] if case["arch"] == "gpt2" else [
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            lcfg = peft.LoraConfig(r=case.get("lora_r", 16), lora_alpha=32, lora_dropout=0.0,
                                   target_modules=targets, task_type="CAUSAL_LM",
                                   fan_in_fan_out=case["arch"] == "gpt2")
            model = peft.get_peft_model(model, lcfg)
        return model

    def train(model, config: dict, seq: int, mb: int, vocab: int, n_steps: int, record=None):
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        if record is not None:
            record["init_live"] = lib.mp_live()
            record["init_peak"] = lib.mp_peak()
        g = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
        for _ in range(n_steps):
            x = torch.randint(0, vocab, (mb, seq), generator=g)
            lib.mp_reset_peak()
            extra = {"fused_lm_head": True} if case.get("method", "cpt") == "sft" else {}
            loss = engine(input_ids=x, labels=x, **extra).loss
            fwd_live, fwd_peak = lib.mp_live(), lib.mp_peak()
            engine.backward(loss)
            bwd_live, bwd_peak = lib.mp_live(), lib.mp_peak()
            lib.mp_reset_peak()
            engine.step()
            step_peak = lib.mp_peak()
            del loss
            if record is not None:
                record.setdefault("steps", []).append(
                    {"fwd_live": fwd_live, "fwd_peak": fwd_peak, "bwd_live": bwd_live,
                     "bwd_peak": bwd_peak, "step_peak": step_peak, "step_live": lib.mp_live()})
        return engine

    # Warm up on a tiny model of the same kind so that imports, JIT-built ops and DeepSpeed's
    # one-time allocations are in the baseline.
    tiny = dict(case["config"])
    for key in ("n_embd", "hidden_size"):
        if key in tiny:
            tiny[key] = 64
    for key in ("n_head", "num_attention_heads"):
        if key in tiny:
            tiny[key] = 2
    if "num_key_value_heads" in tiny:
        tiny["num_key_value_heads"] = 1
    if "intermediate_size" in tiny:
        tiny["intermediate_size"] = 128
    tiny["vocab_size"] = 512
    for key in ("n_layer", "num_hidden_layers"):
        if key in tiny:
            tiny[key] = 1
    warm_case = {**case, "mb": 1}
    engine = train(build(tiny), ds_config(warm_case, 64), 16, 1, 512, 2)
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine
    gc.collect()
    baseline = lib.mp_live()
    lib.mp_reset_peak()

    record: dict = {}
    model = build(case["config"])
    record["model_live"] = lib.mp_live() - baseline
    record["params"] = sum(p.numel() for p in model.parameters())
    record["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record["largest_layer"] = max(sum(p.numel() for p in m.parameters(recurse=False))
                                  for m in model.modules())
    hidden = case["config"].get("n_embd", case["config"].get("hidden_size"))
    t0 = time.perf_counter()
    train(model, ds_config(case, hidden), case["seq"], case["mb"],
                   case["config"]["vocab_size"], steps, record)
    record["seconds_per_step"] = (time.perf_counter() - t0) / steps
    for key in ("init_live", "init_peak"):
        record[key] -= baseline
    for step in record["steps"]:
        for key in list(step):
            step[key] -= baseline
    record["train_peak"] = max(max(s["fwd_peak"], s["bwd_peak"], s["step_peak"])
                               for s in record["steps"])
    record["overall_peak"] = max(record["train_peak"], record["init_peak"])
    return record


def _run_worker_process(case: dict, lib: str, steps: int, timeout: float) -> list[dict]:
    world = case.get("world", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "LD_PRELOAD": lib, "MKL_DISABLE_FAST_MM": "1",
               "OMP_NUM_THREADS": str(max(1, 2 // world)), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(case), "--lib", lib,
             "--steps", str(steps)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-8:])
            raise RuntimeError(f"worker failed ({p.returncode}):\n{tail}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def build_interposer(workdir: Path) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise SystemExit("gcc is needed to build bench/malloc_peak.c")
    out = workdir / "malloc_peak.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(out),
                    str(ROOT / "bench" / "malloc_peak.c"), "-ldl"], check=True)
    return str(out)


# --- estimates ----------------------------------------------------------------------------

def estimate_case(case: dict) -> dict:
    from engine.estimate import TrainSetup, estimate_training
    from engine.model_shape import shape_from_config

    shape = shape_from_config(case["config"])
    if case["arch"] == "gpt2":
        lora_targets = ("c_attn", "c_proj", "c_fc")
    else:
        lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")
    setup = TrainSetup(
        method=case.get("method", "cpt"), adapter=case.get("adapter", "none"),
        lora_r=case.get("lora_r", 16), lora_dropout=0.0,
        lora_targets=lora_targets, dtype=case["dtype"], zero_stage=case["stage"],
        offload_optimizer=case.get("offload", "none"), micro_batch=case["mb"], seq_len=case["seq"],
        gradient_checkpointing=bool(case.get("gc")), attn_implementation=case.get("attn", "sdpa"),
        world_size=case.get("world", 1), gpus_per_node=case.get("world", 1), num_nodes=1,
        device="cpu", reduce_bucket_size=shape.hidden_size ** 2,
        prefetch_bucket_size=int(0.9 * shape.hidden_size ** 2),
        param_persistence_threshold=10 * shape.hidden_size, gradient_clipping=True,
    )
    est = estimate_training(shape, setup)
    return {"estimate": est.device_total_bytes, "breakdown": est.to_dict()}


def deepspeed_estimate(case: dict, params: int, largest_layer: int) -> int | None:
    """DeepSpeed's own model-states estimate for the same case (what it says a GPU needs)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = case.get("world", 1)
    offload = case.get("offload", "none") != "none"
    if case["stage"] == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=world, cpu_offload=offload,
            cpu_offload_params=False)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=world, cpu_offload=offload)
    # On CPU the host and device share one memory; with offload the states live on the host.
    return gpu + (cpu if offload else 0)


def time_estimates() -> dict:
    from engine.planner import Hardware, plan

    from engine.estimate import TrainSetup, estimate_training
    from engine.model_shape import load_model_shape

    shape = load_model_shape("llama-3.1-8b")
    setup = TrainSetup(method="sft", seq_len=2048, micro_batch=1, world_size=8, gpus_per_node=8)
    hw = Hardware(gpus_per_node=8, gpu_mem_bytes=80 * 10**9, num_nodes=1,
                  host_mem_bytes=1024 * 2**30, nvme_free_bytes=4 * 10**12)
    estimate_training(shape, setup)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        estimate_training(shape, setup)
    one = (time.perf_counter() - t0) / n
    plan(shape, setup, hw)
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        plan(shape, setup, hw)
    table = (time.perf_counter() - t0) / n
    return {"one_estimate_ms": one * 1e3, "option_table_ms": table * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="run every case (56, about 20 minutes)")
    ap.add_argument("--only", default="", help="run only cases whose label contains this")
    ap.add_argument("--steps", type=int, default=3, help="training steps per case")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    args = ap.parse_args(argv)

    cases = full_cases() if args.full else default_cases()
    if args.only:
        cases = [c for c in cases if args.only in case_label(c)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_interposer(Path(tmp))
        print(f"{'case':58s} {'measured':>9s} {'zerotune':>9s} {'error':>7s} {'deepspeed':>9s}"
              f" {'error':>7s}", flush=True)
        for case in cases:
            label = case_label(case)
            try:
                ranks = _run_worker_process(case, lib, args.steps, args.timeout)
            except RuntimeError as exc:
                print(f"{label:58s} FAILED {exc}", flush=True)
                continue
            measured = max(r["train_peak"] for r in ranks)
            est = estimate_case(case)
            ds = ranks[0].get("ds_estimate")
            err = (est["estimate"] - measured) / measured
            ds_err = (ds - measured) / measured if ds else float("nan")
            print(f"{label:58s} {measured / MiB:8.1f}M {est['estimate'] / MiB:8.1f}M {err:+7.1%}"
                  f" {ds / MiB if ds else float('nan'):8.1f}M {ds_err:+7.1%}", flush=True)
            rows.append({"case": label, "config": case, "measured": measured,
                         "estimate": est["estimate"], "error": err, "ds_estimate": ds,
                         "ds_error": ds_err, "ranks": ranks, "breakdown": est["breakdown"]})
    if rows:
        errs = [abs(r["error"]) for r in rows]
        ds_errs = [abs(r["ds_error"]) for r in rows]
        print(f"\nzerotune:  median |error| {statistics.median(errs):.1%}, worst {max(errs):.1%}, "
              f"within 10%: {sum(e <= 0.10 for e in errs)}/{len(errs)}, mean signed "
              f"{statistics.mean(r['error'] for r in rows):+.1%}")
        print(f"deepspeed: median |error| {statistics.median(ds_errs):.1%}, worst "
              f"{max(ds_errs):.1%}, within 10%: {sum(e <= 0.10 for e in ds_errs)}/{len(ds_errs)}"
              f" (model states only)")
    try:
        timing = time_estimates()
    except ImportError as exc:  # the planner is optional for the accuracy part
        print(f"timing skipped: {exc}")
        timing = {"one_estimate_ms": float("nan"), "option_table_ms": float("nan")}
    print(f"one estimate: {timing['one_estimate_ms']:.2f} ms; full option table: "
          f"{timing['option_table_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "timing": timing}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        wp = argparse.ArgumentParser()
        wp.add_argument("--worker")
        wp.add_argument("--lib")
        wp.add_argument("--steps", type=int, default=3)
        wa = wp.parse_args()
        c = json.loads(wa.worker)
        result = worker(c, wa.lib, wa.steps)
        # DeepSpeed's largest_layer_params: the largest module's direct parameters.
        result["ds_estimate"] = deepspeed_estimate(
            c, result["params"], result.pop("largest_layer", result["params"]))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
