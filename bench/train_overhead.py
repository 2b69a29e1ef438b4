"""What zerotune costs on top of DeepSpeed: tokens/s and time to the first step, side by side.

Runs, in one go and on the same model, data, tokenizer, DeepSpeed config and steps:
  A. `zerotune run PROFILE` (CLI -> supervisor -> deepspeed launcher -> engine.train)
  B. a minimal hand-written DeepSpeed loop (deepspeed launcher -> forward/backward/step)
  C. the same loop started the way zerotune starts one node (python -m deepspeed.launcher.launch
     with the world info, without the `deepspeed` runner process in front): start-up only
and prints throughput over the same window of steps (first steps excluded as warm-up) and the
wall time from the command's start to the end of the first optimizer step.
Targets: throughput ratio A/B >= 0.97; A's start-up no more than 2 s longer than B's.
A - C is what zerotune's own work (CLI, data cache check, supervisor, Trainer) costs at start.

Throughput is given two ways: tokens over the window's wall time, and tokens per median step
time (robust to a stall of the shared machine in one step). Before the timed rounds, one
untimed round of each warms the page cache, zerotune's data preparation cache and the history
database; what that first run costs zerotune once per workspace is printed on its own line.

    .venv/bin/python bench/train_overhead.py [--steps 60] [--warmup 10] [--repeat 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
         "tie_word_embeddings": True}
SEQ, MBS = 256, 8

HAND_LOOP = r'''
import json, os, sys, time
T0 = float(os.environ["BENCH_T0"])
import torch, deepspeed
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
run_dir, steps, out = sys.argv[-3], int(sys.argv[-2]), sys.argv[-1]
cfg = json.load(open(os.path.join(run_dir, "ds_config.json")))
prof = json.load(open(os.path.join(run_dir, "bench_model.json")))
deepspeed.init_distributed(dist_backend="gloo")
tok = AutoTokenizer.from_pretrained(prof["tokenizer"])
text = [json.loads(l)["text"] for l in open(prof["data"]) if l.strip()]
ids = [t for doc in tok(text, add_special_tokens=False)["input_ids"] for t in doc + [tok.eos_token_id]]
seq, mbs = prof["seq"], cfg["train_micro_batch_size_per_gpu"]
blocks = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
torch.manual_seed(prof["seed"])
mc = dict(prof["model"]); mt = mc.pop("model_type")
config = AutoConfig.for_model(mt, **mc); config.vocab_size = len(tok)
model = AutoModelForCausalLM.from_config(config)
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
times = []
for step in range(steps):
    batch = torch.tensor(blocks[(step * mbs) % (len(blocks) - mbs):][:mbs])
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    times.append(time.time())
    if step == 0:
        first = time.time() - T0
json.dump({"times": times, "first_step_s": first, "tokens_per_step": mbs * seq}, open(out, "w"))
'''


def zerotune_run(tmp: Path, profile: Path, steps: int) -> dict:
    ws = tmp / "ws"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--workspace", str(ws), "run", str(profile),
                        "--set", f"training.max_steps={steps}"],
                       cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        sys.exit(f"zerotune run failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    run_dir = max((d for d in (ws / "runs").iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().split("\n") if x.strip()]
    steps_ev = [e for e in events if e["event"] == "step"]
    return {"times": [e["t"] for e in steps_ev], "first_step_s": steps_ev[0]["t"] - t0,
            "tokens_per_step": MBS * SEQ, "run_dir": run_dir}


def hand_loop(tmp: Path, run_dir: Path, steps: int, idx: int, direct: bool = False) -> dict:
    script = tmp / "hand_loop.py"
    script.write_text(HAND_LOOP)
    out = tmp / f"hand{idx}{'c' if direct else ''}.json"
    port = str(29700 + 2 * idx + direct)
    if direct:
        from engine.launcher import local_launch_argv

        cmd = local_launch_argv(1, "127.0.0.1", int(port), [], module=False)
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_addr", "127.0.0.1",
               "--master_port", port]
    t0 = time.time()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "BENCH_T0": str(t0)}
    r = subprocess.run([*cmd, str(script), str(run_dir), str(steps), str(out)],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"hand-written loop failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def throughput(res: dict, warmup: int) -> float:
    t = res["times"]
    return res["tokens_per_step"] * (len(t) - 1 - warmup) / (t[-1] - t[warmup])


def median_step_throughput(res: dict, warmup: int) -> float:
    t = res["times"][warmup:]
    return res["tokens_per_step"] / statistics.median(b - a for a, b in itertools.pairwise(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2, help="alternate A and B this many times")
    args = ap.parse_args()
    import yaml

    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="zt-bench-") as d:
        tmp = Path(d)
        data = REPO / "profiles" / "data" / "owasp-text.jsonl"
        # A tokenizer made once and shared by both sides, so neither pays for training it.
        tok_dir = tmp / "tokenizer"
        from engine.train import _train_tokenizer  # heavy imports are fine in a bench

        texts = [json.loads(x)["text"] for x in data.read_text().split("\n") if x.strip()]
        _train_tokenizer(texts, 4096, tok_dir)
        profile = tmp / "bench.yaml"
        profile.write_text(yaml.safe_dump({
            "name": "bench", "seed": 1,
            "model": {"init": "scratch", "config": MODEL, "tokenizer": str(tok_dir)},
            "data": {"train": str(data), "format": "text", "validation_split": 0.0, "max_seq_len": SEQ},
            "method": {"kind": "cpt"},
            "training": {"max_steps": args.steps, "micro_batch_size": MBS, "lr": 1e-3,
                         "eval_every": 100000, "save_every": 100000, "warmup_ratio": 0.0},
            "deepspeed": {"zero_stage": 2},
        }, sort_keys=False))
        a_runs, b_runs, c_runs = [], [], []
        for i in range(args.repeat + 1):  # round 0 warms up and is not counted
            a = zerotune_run(tmp, profile, args.steps if i else 2)
            (a["run_dir"] / "bench_model.json").write_text(json.dumps(
                {"tokenizer": str(tok_dir), "data": str(data), "seq": SEQ, "seed": 1, "model": MODEL}))
            b = hand_loop(tmp, a["run_dir"], args.steps if i else 2, i)
            if i == 0:
                first_a, first_b = a["first_step_s"], b["first_step_s"]
                continue
            c_runs.append(hand_loop(tmp, a["run_dir"], 2, i, direct=True))
            a_runs.append(a)
            b_runs.append(b)
        ta = [throughput(r, args.warmup) for r in a_runs]
        tb = [throughput(r, args.warmup) for r in b_runs]
        ma = [median_step_throughput(r, args.warmup) for r in a_runs]
        mb = [median_step_throughput(r, args.warmup) for r in b_runs]
        fa = [r["first_step_s"] for r in a_runs]
        fb = [r["first_step_s"] for r in b_runs]
        fc = [r["first_step_s"] for r in c_runs]
    print(f"model: llama hidden {MODEL['hidden_size']} x {MODEL['num_hidden_layers']} layers, "
          f"seq {SEQ}, micro-batch {MBS}, ZeRO-2, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.repeat} alternating repeats, CPU")
    print(f"{'':28}{'zerotune run':>14}{'hand loop':>12}{'ratio/diff':>12}")
    print(f"{'tokens/s (median)':28}{statistics.median(ta):14.0f}{statistics.median(tb):12.0f}"
          f"{statistics.median(ta) / statistics.median(tb):12.3f}")
    print(f"{'tokens/s per median step':28}{statistics.median(ma):14.0f}{statistics.median(mb):12.0f}"
          f"{statistics.median(ma) / statistics.median(mb):12.3f}")
    print(f"{'time to first step s (med)':28}{statistics.median(fa):14.2f}{statistics.median(fb):12.2f}"
          f"{statistics.median(fa) - statistics.median(fb):+12.2f}")
    print(f"{'first run, new workspace s':28}{first_a:14.2f}{first_b:12.2f}{first_a - first_b:+12.2f}"
          "   (untimed warm-up round: cold page cache, data preparation, new history database)")
    print(f"{'C: hand loop via launch.py':28}{'':14}{statistics.median(fc):12.2f}"
          f"{statistics.median(fa) - statistics.median(fc):+12.2f}   (time to first step; A - C: zerotune's own start-up)")
    print("per repeat tokens/s A:", [round(x) for x in ta], "B:", [round(x) for x in tb])
    print("per repeat first step s A:", [round(x, 2) for x in fa], "B:", [round(x, 2) for x in fb],
          "C:", [round(x, 2) for x in fc])
    ok_t = statistics.median(ta) / statistics.median(tb) >= 0.97
    ok_s = statistics.median(fa) - statistics.median(fb) <= 2.0
    print(f"targets: throughput ratio >= 0.97: {'met' if ok_t else 'NOT met'}; "
          f"start-up <= +2 s: {'met' if ok_s else 'NOT met'}")


if __name__ == "__main__":
    main()
