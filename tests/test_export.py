"""Export and chat on tiny trained runs: round trips through the exported directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ZEROTUNE, tiny_profile, zerotune
from tests.test_train import check_completed_run, run_profile

PROMPT = "What does OWASP recommend against SQL injection?"

# Loads an exported directory with PEFT made unimportable, and prints greedy token ids.
NO_PEFT_GENERATE = r"""
import json, sys
sys.modules["peft"] = None  # any import of peft now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, prompt = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps(out[0, enc["input_ids"].shape[1]:].tolist()))
"""


def greedy_ids(model, tok, prompt: str = PROMPT) -> list[int]:
    import torch

    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def exported_ids(out_dir: Path) -> list[int]:
    r = subprocess.run([sys.executable, "-c", NO_PEFT_GENERATE, str(out_dir), PROMPT], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("lora")
    profile = tiny_profile(tmp, "sft", data={"max_seq_len": 256}, data_rows=40,
                           method={"adapter": "lora", "lora": {"r": 4, "alpha": 8}},
                           training={"max_steps": 4, "lr": 1.0e-2, "eval_every": 4, "save_every": 4})
    ws, r = run_profile(tmp, profile)
    run, _ = check_completed_run(ws, r)
    return ws, run["id"], Path(run["run_dir"])


def test_lora_run_exports_a_merged_model_that_needs_no_peft(lora_run, tmp_path: Path) -> None:
    from engine.run_model import load_run_model

    ws, run_id, run_dir = lora_run
    assert (run_dir / "model" / "adapter_config.json").exists()
    out = tmp_path / "merged"
    r = zerotune("--workspace", str(ws), "export", run_id, "--merge-lora", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert info["kind"] == "merged" and info["dtype"] == "fp32"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "adapter_config.json").exists()
    model, tok, src = load_run_model(run_dir, "fp32")  # base + adapter, merged by PEFT here
    assert src.kind == "adapter"
    assert exported_ids(out) == greedy_ids(model, tok)
    # The adapter itself, without --merge-lora; an existing non-empty folder is refused.
    r = zerotune("--workspace", str(ws), "export", run_id, "--out", str(tmp_path / "adapter"))
    assert r.returncode == 0 and (tmp_path / "adapter" / "adapter_config.json").exists()
    r = zerotune("--workspace", str(ws), "export", run_id, "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr


def test_chat_streams_replies_from_piped_stdin(lora_run) -> None:
    ws, run_id, _ = lora_run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([*ZEROTUNE, "--workspace", str(ws), "chat", run_id, "--max-new-tokens", "6"],
                       input="hello there\n/reset\nwhat is XSS?\n/exit\nnever read\n", capture_output=True,
                       text=True, timeout=180, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\n") == 2  # one line per reply; /reset and /exit are commands
    assert "conversation reset" in r.stderr
    bad = subprocess.run([*ZEROTUNE, "--workspace", str(ws), "chat", "nosuchrun"], input="", text=True,
                         capture_output=True, timeout=60, env=env, cwd=REPO)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_zero3_checkpoint_shards_are_consolidated(tmp_path: Path) -> None:
    """Full fine-tuning at ZeRO-3: the final export and a shards-only checkpoint agree."""
    from safetensors.torch import load_file

    from engine.run_model import load_run_model

    profile = tiny_profile(tmp_path, "cpt", deepspeed={"zero_stage": 3},
                           training={"max_steps": 4, "eval_every": 4, "save_every": 4})
    ws, r = run_profile(tmp_path, profile)
    run, _ = check_completed_run(ws, r)
    run_dir = Path(run["run_dir"])
    out = tmp_path / "final"
    r = zerotune("--workspace", str(ws), "export", run["id"], "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok, _ = load_run_model(run_dir, "fp32")
    assert exported_ids(out) == greedy_ids(model, tok)
    # Keep only DeepSpeed's partitioned shards in the checkpoint: zero_to_fp32 rebuilds them.
    ckpt = run_dir / "checkpoints" / "checkpoint-4"
    assert any(ckpt.glob("global_step*"))
    for f in list(ckpt.glob("*.safetensors")) + list(ckpt.glob("pytorch_model*.bin")):
        f.unlink()
    out4 = tmp_path / "ckpt4"
    r = zerotune("--workspace", str(ws), "export", run["id"], "--checkpoint", "4", "--out", str(out4), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["source_kind"] == "zero"
    a, b = load_file(out / "model.safetensors"), load_file(out4 / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    r = zerotune("--workspace", str(ws), "export", run["id"], "--checkpoint", "99", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no checkpoint 99" in r.stderr
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_infer_a_finished_run_is_kept_in_history(lora_run, tmp_path: Path) -> None:
    """`zerotune infer RUN_ID` on a LoRA run (merged on load); `runs show` reports it."""
    from tests.test_infer import prompts_file

    ws, run_id, run_dir = lora_run
    prompts = prompts_file(tmp_path / "prompts.jsonl", 3)
    r = zerotune("--workspace", str(ws), "infer", run_id, "--mode", "zero", "--prompts", str(prompts),
                 "--max-new-tokens", "4", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("mode          zero on 1 rank(s)")
    assert len((run_dir / "generations.jsonl").read_text().splitlines()) == 3
    shown = zerotune("--workspace", str(ws), "runs", "show", run_id)
    assert "inference  zero on 1 rank(s), 3 prompts" in shown.stdout
    assert (run_dir / "infer_command.txt").read_text().count("engine.infer") == 1
