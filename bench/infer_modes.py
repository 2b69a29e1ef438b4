"""The three inference engines side by side: plain generate, DeepSpeed-Inference, ZeRO-Inference.

In one go, on the same small random Llama, tokenizer and prompts (the shipped demo prompts),
each mode runs under the DeepSpeed launcher (``engine.infer``) and the table shows tokens/s,
per-batch latency p50/p95, peak memory (host RSS on CPU, GPU allocation on a GPU) and the
parameter bytes resident in the module (ZeRO-Inference: 0, the weights live on the offload
device and are gathered a layer at a time). The outputs of the three are checked to be equal.
Context figures, no target: on CPU the "device" and the offload target are the same memory, and
the peak RSS is mostly torch and DeepSpeed themselves (about 430 MiB) for a model this small.

    .venv/bin/python bench/infer_modes.py [--ranks 1] [--prompts 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512)


def build_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.train import _rows_text, _train_tokenizer

    rows = [json.loads(x) for x in (REPO / "profiles/data/owasp-sft.jsonl").read_text().splitlines() if x]
    tok = _train_tokenizer(_rows_text(rows), 2048, out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **MODEL)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def run_mode(work: Path, model: Path, prompts: Path, mode: str, ranks: int, args) -> dict:
    from engine.launcher import free_port

    run_dir = work / mode
    run_dir.mkdir()
    argv = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks if mode != "plain" else 1),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--module", "engine.infer",
            "--run-dir", str(run_dir), "--mode", mode, "--prompts", str(prompts), "--model-dir", str(model),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not _has_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=run_dir)
    if r.returncode != 0:
        sys.exit(f"{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    ev = [e for e in events if e["event"] == "infer"][-1]
    ev["outputs"] = [json.loads(x)["output"] for x in (run_dir / "generations.jsonl").read_text().splitlines()]
    return ev


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1, help="ranks for deepspeed and zero (plain: 1)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zt-infer-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model")
        rows = [json.loads(x) for x in (REPO / "profiles/data/owasp-prompts.jsonl").read_text().splitlines() if x]
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.prompts]))
        results = {m: run_mode(work, model, prompts, m, args.ranks, args) for m in ("plain", "deepspeed", "zero")}
    print(f"model: llama {MODEL['hidden_size']}x{MODEL['num_hidden_layers']} layers, "
          f"{args.prompts} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{args.ranks} rank(s) for deepspeed/zero")
    head = f"{'mode':<10} {'ranks':>5} {'tokens/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'peak MiB':>9} " \
           f"{'resident params MiB':>20}  kind"
    print(head)
    for mode, ev in results.items():
        print(f"{mode:<10} {ev['world_size']:>5} {ev['tokens_per_s']:>9.1f} {ev['latency_p50_s'] * 1000:>8.0f} "
              f"{ev['latency_p95_s'] * 1000:>8.0f} {ev['peak_mem_bytes'] / 2**20:>9.0f} "
              f"{ev['resident_param_bytes'] / 2**20:>20.2f}  {ev['peak_mem_kind']}")
    same = results["plain"]["outputs"] == results["deepspeed"]["outputs"] == results["zero"]["outputs"]
    print(f"greedy outputs identical across modes: {'yes' if same else 'NO'}")
    notes = sorted({n for ev in results.values() for n in ev.get("notes", [])})
    for n in notes:
        print(f"note: {n}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
