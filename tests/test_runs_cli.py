"""``zerotune runs ...`` as a subprocess over a real workspace, and import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import history
from engine.history import RunRecorder, open_db

REPO = Path(__file__).resolve().parent.parent
PROFILE_A = """\
name: sec-sft
model: {path: gpt2, dtype: fp32}
method: {kind: sft, adapter: lora, lora: {r: 16}}
training: {lr: 0.0002, epochs: 1, micro_batch_size: 4}
deepspeed: {zero_stage: 2}
"""
PROFILE_B = PROFILE_A.replace("lr: 0.0002", "lr: 0.0001").replace("r: 16", "r: 8")


def record(db, ws: Path, run_id: str, *, name: str, status: str, profile: str, created_at: float,
           steps: int = 5, reason: str | None = None) -> Path:
    run_dir = ws / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "profile.yaml").write_text(profile)
    (run_dir / "launch.json").write_text("{}")
    (run_dir / "engine.log").write_text(f"engine log of {run_id}\nline two\n")
    rec = RunRecorder(db, run_id)
    rec.start({"run_id": run_id, "name": name, "method": "sft", "adapter": "lora",
               "zero_stage": 2, "world_size": 1, "model": "gpt2",
               "estimate": {"peak_gpu_bytes": 4 * 2**30, "peak_host_bytes": 8 * 2**30}},
              run_dir, os.getpid(), None)
    rec.add_events([{"event": "step", "t": created_at + s, "step": s, "total_steps": steps,
                     "loss": 2.0 / s, "tokens_per_s": 500.0} for s in range(1, steps + 1)])
    rec.add_samples([{"t": created_at, "device": "host", "kind": "host", "util": 90.0,
                      "mem_used": 1, "mem_total": 2, "proc_mem": 3 * 2**30}])
    rec.finish(status, 0 if status == "completed" else 1, reason)
    rec.update(created_at=created_at)
    assert rec.flush()
    return run_dir


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    db = open_db(ws / "runs" / "history.db")
    now = time.time()
    record(db, ws, "aa11", name="sec-sft", status="completed", profile=PROFILE_A,
           created_at=now - 300)
    record(db, ws, "aa22", name="sec-sft-small", status="failed", profile=PROFILE_B,
           created_at=now - 200, steps=3, reason="out of GPU memory")
    record(db, ws, "bb33", name="chat", status="stopped", profile=PROFILE_A, created_at=now - 100)
    db.close()
    return ws


def zerotune(ws: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "--workspace", str(ws), "runs", *args],
        capture_output=True, text=True, cwd=REPO, input=stdin, timeout=60, check=False,
    )


def test_list_newest_first_with_filters(ws):
    out = zerotune(ws, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == ["bb33", "aa22", "aa11"]
    data = json.loads(zerotune(ws, "list", "--json", "--status", "failed").stdout)
    assert [r["id"] for r in data] == ["aa22"]
    assert data[0]["reason"] == "out of GPU memory" and data[0]["last_step"] == 3
    data = json.loads(zerotune(ws, "list", "--json", "--name", "SEC", "--limit", "1").stdout)
    assert [r["id"] for r in data] == ["aa22"]


def test_show_reports_measured_against_estimated(ws):
    out = zerotune(ws, "show", "aa2")
    assert out.returncode == 0, out.stderr
    assert "failed: out of GPU memory" in out.stdout
    assert "peak RSS 3.0 GiB   estimated 8.0 GiB   (-62%)" in out.stdout
    assert "training.lr" in out.stdout and "0.0001" in out.stdout
    report = json.loads(zerotune(ws, "show", "aa11", "--json").stdout)
    assert report["run"]["id"] == "aa11"
    assert report["profile"]["method"]["lora"]["r"] == 16
    assert report["metrics"]["loss"]["count"] == 5
    assert report["estimate"]["peak_gpu_bytes"] == 4 * 2**30
    assert report["devices"][0]["device"] == "host"


@pytest.mark.parametrize(("args", "message"), [
    (("show", "zz"), "no run with id 'zz'"),
    (("show", "aa"), "ambiguous"),
    (("compare", "aa11", "nope"), "no run with id 'nope'"),
    (("list", "--status", "weird"), "invalid choice"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(ws, args, message):
    out = zerotune(ws, *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_compare_diffs_profiles_key_by_key(ws):
    report = json.loads(zerotune(ws, "compare", "aa11", "aa22", "--json").stdout)
    diff = {d["key"]: (d["a"], d["b"]) for d in report["profile_diff"]}
    assert diff == {"training.lr": (0.0002, 0.0001), "method.lora.r": (16, 8)}
    summary = {s["name"]: (s["a"], s["b"]) for s in report["summary"]}
    assert summary["status"] == ("completed", "failed")
    assert summary["last_step"] == (5, 3)
    out = zerotune(ws, "compare", "aa11", "bb33")
    assert out.returncode == 0 and "identical" in out.stdout


def test_logs_and_stop_of_an_ended_run(ws):
    out = zerotune(ws, "logs", "bb")
    assert (out.returncode, out.stdout) == (0, "engine log of bb33\nline two\n")
    out = zerotune(ws, "logs", "bb", "-f")  # the run has ended: print and return
    assert out.returncode == 0 and out.stdout.startswith("engine log of bb33")
    out = zerotune(ws, "stop", "bb33")
    assert out.returncode == 1 and "not running" in out.stderr


def test_resume_refusal_is_an_operation_failure(ws):
    out = zerotune(ws, "resume", "aa11")  # no checkpoint in its run directory
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() and "Traceback" not in out.stderr


def test_delete_asks_then_removes_rows_and_optionally_the_directory(tmp_path):
    db = open_db(tmp_path / "runs" / "history.db")
    now = time.time()
    keep_dir = record(db, tmp_path, "d1", name="x", status="completed", profile=PROFILE_A,
                      created_at=now)
    gone_dir = record(db, tmp_path, "d2", name="y", status="failed", profile=PROFILE_A,
                      created_at=now)
    db.close()
    out = zerotune(tmp_path, "delete", "d1", stdin="")
    assert out.returncode == 2 and "--yes" in out.stderr
    assert zerotune(tmp_path, "delete", "d1", "--yes").returncode == 0
    assert zerotune(tmp_path, "delete", "d2", "--yes", "--remove-dir").returncode == 0
    assert keep_dir.exists() and not gone_dir.exists()
    db = open_db(tmp_path / "runs" / "history.db")
    assert history.list_runs(db) == []
    assert db.conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 0
    db.close()


def test_empty_workspace_lists_nothing(tmp_path):
    out = zerotune(tmp_path, "list", "--json")
    assert (out.returncode, json.loads(out.stdout)) == (0, [])


def test_cli_modules_import_no_heavy_libraries():
    code = (
        "import sys\n"
        "import engine.history, engine.supervisor, engine.devices, engine.runs_cli, "
        "engine.workspace\n"
        "heavy = {'torch', 'deepspeed', 'transformers', 'trl', 'datasets', 'pandas', 'numpy', "
        "'sqlite_utils'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True)
    assert out.stdout.strip() == "[]"
