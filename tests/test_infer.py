"""Batch inference: plain generate, DeepSpeed-Inference and ZeRO-Inference on a tiny CPU model.

The reference is ``model.generate`` in this process; the engines run under the real DeepSpeed
launcher on the CPU accelerator (gloo), with one rank and (slow) two ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, sample_rows, write_jsonl

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def build_tiny_model(out: Path, seed: int = 3) -> Path:
    """A random tiny Llama and a BPE tokenizer trained on the demo data, saved as an HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.train import _rows_text, _train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(_rows_text(sample_rows("sft", 60)), 320, out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY)
    model = LlamaForCausalLM(cfg)
    # Larger weights than the default init: confident, non-tied greedy choices.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    return out


def prompts_file(path: Path, n: int = 5) -> Path:
    rows = [{"prompt": r["prompt"][:60]} for r in sample_rows("sft", n)]
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("infer")
    return build_tiny_model(base / "model"), prompts_file(base / "prompts.jsonl")


def reference_outputs(model_dir: Path, prompts: Path, max_new_tokens: int, batch_size: int) -> list[str]:
    """Plain ``model.generate`` in this process, batch by batch as the engine batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in ids[:, enc["input_ids"].shape[1]:]:
            row = row.tolist()
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def launch_infer(run_dir: Path, model_dir: Path, prompts: Path, mode: str, ranks: int,
                 *extra: str) -> subprocess.CompletedProcess[str]:
    from engine.launcher import free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    argv = [str(deepspeed), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--module", "engine.infer", "--run-dir", str(run_dir),
            "--mode", mode, "--prompts", str(prompts), "--model-dir", str(model_dir),
            "--max-new-tokens", "6", "--batch-size", "2", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=run_dir)


def infer_event(run_dir: Path) -> dict:
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "infer"][-1]


FAST = {("deepspeed", 1), ("zero", 2)}


@pytest.mark.parametrize("mode,ranks", [
    pytest.param(m, n, marks=() if (m, n) in FAST else pytest.mark.slow, id=f"{m}-{n}rank")
    for m in ("deepspeed", "zero", "plain") for n in (1, 2) if not (m == "plain" and n == 2)
])
def test_engine_matches_plain_generate(tmp_path: Path, tiny, mode: str, ranks: int) -> None:
    model_dir, prompts = tiny
    run_dir = tmp_path / "run"
    r = launch_infer(run_dir, model_dir, prompts, mode, ranks)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "generations.jsonl").read_text().splitlines()]
    want = reference_outputs(model_dir, prompts, 6, 2)
    assert [x["output"] for x in rows] == want  # same greedy tokens, in prompt order
    assert [x["prompt"] for x in rows] == [json.loads(x)["prompt"] for x in prompts.read_text().splitlines()]
    assert all(x["tokens_out"] >= 1 and x["tokens_in"] > 0 and x["seconds"] > 0 for x in rows)
    ev = infer_event(run_dir)
    assert ev["mode"] == mode and ev["world_size"] == ranks and ev["prompts"] == len(rows)
    assert ev["tokens_per_s"] > 0 and 0 < ev["latency_p50_s"] <= ev["latency_p95_s"]
    assert ev["peak_mem_bytes"] > 0 and ev["peak_mem_kind"] == "host_rss"
    if mode == "deepspeed":
        # No GPU here: DeepSpeed-Inference says why it runs without fused kernels.
        assert ev["kernel_inject"] is False
        assert any("kernel injection off" in n for n in ev["notes"])
    if mode == "zero":
        # Every parameter is a ZeRO-3 placeholder; its partition lives on the offload device.
        from transformers import AutoConfig

        n_params = len(list(_param_names(AutoConfig.from_pretrained(model_dir))))
        assert ev["resident_param_bytes"] == 0
        assert ev["partitioned_params"] == n_params
        assert ev["partition_devices"] == ["cpu"]


def _param_names(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, _ in model.named_parameters()]


def test_infer_cli_on_a_profile(tmp_path: Path, tiny) -> None:
    """`zerotune infer PROFILE`: a new run directory with the outputs; summary on stdout."""
    import yaml

    from tests.conftest import zerotune

    model_dir, prompts = tiny
    profile = tmp_path / "p.yaml"
    data = write_jsonl(tmp_path / "sft.jsonl", sample_rows("sft", 20))
    profile.write_text(yaml.safe_dump({
        "name": "infer-only", "model": {"path": str(model_dir)},
        "data": {"train": str(data)}, "method": {"kind": "sft"},
        "inference": {"mode": "zero", "prompts": str(prompts), "max_new_tokens": 4, "batch_size": 4},
    }))
    ws = tmp_path / "ws"
    r = zerotune("--workspace", str(ws), "infer", str(profile), "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["mode"] == "zero" and out["prompts"] == 5
    assert Path(out["generations"]).exists() and Path(out["run_dir"]).parent == ws / "runs"
    bad = zerotune("--workspace", str(ws), "infer", str(profile), "--prompts", str(tmp_path / "none.jsonl"))
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_kernel_injection_needs_policy_half_precision_and_gpu() -> None:
    from transformers import GPT2Config, LlamaConfig

    from engine.infer import kernel_inject_support

    class M:
        def __init__(self, config):
            self.config = config

    assert kernel_inject_support(M(LlamaConfig()), "fp16", False) == (False, "inference.kernel_inject is off")
    ok, why = kernel_inject_support(M(GPT2Config()), "fp32", True)
    assert not ok and "fp16/bf16" in why
    cfg = LlamaConfig()
    cfg.model_type = "mamba"
    ok, why = kernel_inject_support(M(cfg), "fp16", True)
    assert not ok and "no kernel-injection policy" in why


def test_percentile_and_prompt_rows(tmp_path: Path) -> None:
    from engine.infer import load_prompts, percentile

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0 and percentile([], 50) is None
    assert abs(percentile(list(map(float, range(1, 101))), 95) - 95.05) < 1e-9
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}])
    assert len(load_prompts(f)) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_prompts(tmp_path / "bad.jsonl")


STAGE = r"""
import json, sys
from pathlib import Path
from engine.events import EventWriter
from engine.infer import run_inference_stage
from engine.train import load_run_profile
run_dir = Path(sys.argv[1])
profile = load_run_profile(run_dir).profile
fields = run_inference_stage(profile, run_dir, EventWriter(run_dir / "events.jsonl"))
print(json.dumps(fields))
"""


def test_inference_stage_after_training_in_process(tmp_path: Path, tiny) -> None:
    """What train.py calls after saving the model: the profile's inference, no launcher."""
    import shutil

    import yaml

    model_dir, prompts = tiny
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", sample_rows("sft", 10))
    (run_dir / "profile.yaml").write_text(yaml.safe_dump({
        "name": "stage", "model": {"path": str(model_dir)}, "data": {"train": str(data)},
        "method": {"kind": "sft"},
        "inference": {"mode": "zero", "prompts": str(prompts), "max_new_tokens": 6, "batch_size": 2},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-c", STAGE, str(run_dir)], capture_output=True, text=True,
                       timeout=300, env={**env, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    fields = json.loads(r.stdout.strip().splitlines()[-1])
    assert fields["mode"] == "zero" and fields["prompts"] == 5
    rows = [json.loads(x) for x in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [x["output"] for x in rows] == reference_outputs(model_dir, prompts, 6, 2)
    assert infer_event(run_dir)["tokens_out"] == sum(x["tokens_out"] for x in rows)
