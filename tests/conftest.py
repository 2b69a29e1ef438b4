"""Shared test helpers: tiny profiles, temporary workspaces and the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# No test may reach a model or dataset hub: set before anything imports huggingface_hub (which
# reads these once, at import), and inherited by every subprocess the tests start. Without
# them a hub lookup on a machine whose network drops packets waits minutes in retries.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")

HEAVY_PACKAGES = ("torch", "deepspeed", "transformers", "trl", "peft", "datasets", "accelerate",
                  "huggingface_hub", "textual")
PROFILES = REPO / "profiles"
ZEROTUNE = [sys.executable, "-m", "engine.cli"]

# The smallest Llama-shaped model that still trains: seconds per run on 2 CPU cores.
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}


def pytest_sessionstart(session):
    """Print the versions the run was made with (also under -q), so that a failure in CI can
    be matched to a release of a dependency."""
    from importlib import metadata

    found = []
    for name in HEAVY_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
        except Exception:  # a broken install's metadata: still print the others
            found.append(f"{name} ?")
    sys.stderr.write("zerotune stack: " + ", ".join(found) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """Print a failure's traceback the moment it happens, not only in the final summary: a run
    cut off by a time limit still shows why its first failures failed."""
    if not report.failed:
        return
    text = report.longreprtext or ""
    if len(text) > 6000:
        text = text[:1500] + "\n[...]\n" + text[-4500:]
    sys.stderr.write(f"\n--- {report.when} of {report.nodeid} failed:\n{text}\n---\n")
    for title, content in report.sections:
        if "stderr" in title or "stdout" in title:
            sys.stderr.write(f"[{title}, last 2000 chars]\n{content[-2000:]}\n")
    sys.stderr.flush()


@pytest.fixture(autouse=True)
def _reap_processes_left_by_the_test(request):
    """After each test, kill what it started in its temporary folders and left running
    (a detached supervisor, launcher or engine rank of a test that failed half-way), so that
    one failure cannot starve the tests after it of CPU."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp = str(request.getfixturevalue("tmp_path"))
    yield
    me = os.getpid()
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != me and tmp in " ".join(proc.info["cmdline"] or ()):
                left.append(proc)
        except (psutil.Error, TypeError):
            continue
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ZEROTUNE_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow end-to-end case: run with ZEROTUNE_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_rows(kind: str, n: int | None = None) -> list[dict[str, Any]]:
    """Rows of the shipped demo data (real text), for the given method."""
    name = {"cpt": "owasp-text.jsonl", "sft": "owasp-sft.jsonl", "dpo": "owasp-dpo.jsonl",
            "chat": "owasp-chat.jsonl"}[kind]
    rows = [json.loads(line) for line in (PROFILES / "data" / name).read_text().split("\n") if line]
    return rows[:n] if n else rows


def tiny_profile(tmp: Path, kind: str = "cpt", *, name: str | None = None, data_rows: int = 120,
                 **sections: dict[str, Any]) -> Path:
    """Write a tiny runnable profile (and its data) into ``tmp``; sections override defaults."""
    data_kind = kind
    method = "sft" if kind == "chat" else kind
    data = write_jsonl(tmp / f"{data_kind}.jsonl", sample_rows(data_kind, data_rows or None))
    prof: dict[str, Any] = {
        "name": name or f"t-{kind}",
        "seed": 7,
        "model": {"init": "scratch", "config": dict(TINY_LLAMA), "tokenizer_vocab_size": 320},
        "data": {"train": data.name, "max_seq_len": 64, "validation_split": 0.1},
        "method": {"kind": method},
        "training": {"max_steps": 6, "micro_batch_size": 2, "lr": 1.0e-3, "eval_every": 3,
                     "save_every": 3, "keep_checkpoints": 2, "eval_max_rows": 8,
                     "warmup_ratio": 0.0},
        "deepspeed": {"zero_stage": 2},
    }
    for key, value in sections.items():
        prof.setdefault(key, {}).update(value)
    path = tmp / f"{prof['name']}.yaml"
    path.write_text(yaml.safe_dump(prof, sort_keys=False))
    return path


def zerotune(*args: str, cwd: Path | None = None, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess, with stdin closed (as in CI)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*ZEROTUNE, *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=full_env)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def only_run_dir(workspace: Path) -> Path:
    dirs = [d for d in (workspace / "runs").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]
