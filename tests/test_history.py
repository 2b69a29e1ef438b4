"""The history database: schema, query layer, recorder and reconciliation, on real SQLite files."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from engine import history
from engine.history import (
    AmbiguousRunId,
    RunActive,
    RunNotFound,
    RunRecorder,
    SchemaTooNew,
    open_db,
)


@pytest.fixture
def db(tmp_path):
    database = open_db(tmp_path / "runs" / "history.db")
    yield database
    database.close()


def add_run(db, run_id, name="demo", status="completed", created_at=None, **fields):
    with history.write_transaction(db):
        history.upsert_run(db, run_id, {"name": name, "status": status,
                                        "created_at": created_at or time.time(), **fields})


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_open_db_sets_wal_busy_timeout_and_schema(tmp_path):
    path = tmp_path / "runs" / "history.db"
    db = open_db(path)
    assert path.exists()
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert history.schema_version(db) == history.SCHEMA_VERSION >= 1
    assert {"runs", "metrics", "device_samples", "events"} <= set(db.table_names())
    indexes = {row[1] for row in db.conn.execute(
        "SELECT type, name FROM sqlite_master WHERE type = 'index'")}
    assert {"runs_created", "runs_status_created", "metrics_run_name_step",
            "device_samples_run_t", "events_run"} <= indexes
    plan = " ".join(str(r) for r in db.conn.execute(
        "EXPLAIN QUERY PLAN SELECT name, step, value FROM metrics WHERE run_id = ? AND name = ? "
        "ORDER BY step", ("a", "loss")))
    assert "metrics_run_name_step" in plan
    db.close()


def test_migrations_run_once_and_refuse_a_newer_schema(tmp_path):
    path = tmp_path / "history.db"
    db = open_db(path)
    add_run(db, "keep-me")
    db.close()
    db = open_db(path)  # reopening applies nothing and keeps the rows
    assert history.get_run(db, "keep-me")["name"] == "demo"
    db.conn.execute(f"PRAGMA user_version = {history.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaTooNew):
        open_db(path)


def test_a_v1_database_is_migrated_in_order_keeping_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "history.db"
    # A database as the first release wrote it: migration 1 only.
    monkeypatch.setattr(history, "MIGRATIONS", history.MIGRATIONS[:1])
    monkeypatch.setattr(history, "SCHEMA_VERSION", 1)
    db = open_db(path)
    add_run(db, "old-run")
    assert "peak_host_hwm_bytes" not in db["runs"].columns_dict
    db.close()
    monkeypatch.undo()

    applied = []

    def later(db):
        applied.append(len(history.MIGRATIONS))
        db.conn.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    monkeypatch.setattr(history, "MIGRATIONS", [*history.MIGRATIONS, later])
    monkeypatch.setattr(history, "SCHEMA_VERSION", len(history.MIGRATIONS))
    db = open_db(path)
    assert history.schema_version(db) == len(history.MIGRATIONS)
    assert applied == [len(history.MIGRATIONS)]
    columns = db["runs"].columns_dict
    assert "peak_host_hwm_bytes" in columns and "note" in columns
    assert "proc_mem_peak" in db["device_samples"].columns_dict
    assert history.get_run(db, "old-run")["status"] == "completed"
    db.close()
    open_db(path).close()
    assert len(applied) == 1


def test_list_runs_newest_first_with_filters(db):
    now = time.time()
    add_run(db, "a1", name="security-sft", status="completed", created_at=now - 30)
    add_run(db, "b2", name="Security-DPO", status="failed", created_at=now - 20)
    add_run(db, "c3", name="chat-cpt", status="completed", created_at=now - 10)
    assert [r["id"] for r in history.list_runs(db)] == ["c3", "b2", "a1"]
    assert [r["id"] for r in history.list_runs(db, status="completed")] == ["c3", "a1"]
    assert [r["id"] for r in history.list_runs(db, name="security")] == ["b2", "a1"]
    assert [r["id"] for r in history.list_runs(db, status=["failed", "completed"], limit=2)] == [
        "c3", "b2"]
    with pytest.raises(history.HistoryError):
        history.list_runs(db, status="finished")


def test_get_run_accepts_unique_prefixes_only(db):
    add_run(db, "7f3a10c2d4e5")
    add_run(db, "7f3a99aa0000")
    add_run(db, "7f3a10")  # an id that is also a prefix of another: exact match wins
    assert history.get_run(db, "7f3a10c")["id"] == "7f3a10c2d4e5"
    assert history.get_run(db, "7f3a10")["id"] == "7f3a10"
    with pytest.raises(AmbiguousRunId) as err:
        history.get_run(db, "7f3a")
    assert "7f3a10c2d4e5" in str(err.value) and "7f3a99aa0000" in str(err.value)
    with pytest.raises(RunNotFound):
        history.get_run(db, "zzz")
    with pytest.raises(RunNotFound):
        history.get_run(db, "")


def test_stalled_is_computed_when_read(db):
    now = time.time()
    add_run(db, "slow", status="running", created_at=now - 3600, started_at=now - 3600,
            last_event_at=now - 20 * 60)
    add_run(db, "busy", status="running", created_at=now - 60, started_at=now - 60,
            last_event_at=now - 5)
    assert history.get_run(db, "slow")["status"] == "stalled"
    assert history.get_run(db, "slow")["recorded_status"] == "running"
    assert history.get_run(db, "slow", stall_minutes=30)["status"] == "running"
    assert [r["id"] for r in history.list_runs(db, status="stalled")] == ["slow"]
    assert [r["id"] for r in history.list_runs(db, status="running")] == ["busy"]


def step_events(n, t0=None, eval_every=0):
    t0 = time.time() - n if t0 is None else t0
    out = [{"event": "start", "t": t0, "world_size": 2, "total_steps": n, "model": "tiny"}]
    for step in range(1, n + 1):
        out.append({"event": "step", "t": t0 + step, "step": step, "total_steps": n,
                    "loss": 2.0 / step, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 100.0 * step,
                    "epoch": step / n, "ok": True, "note": "text"})
        if eval_every and step % eval_every == 0:
            out.append({"event": "eval", "t": t0 + step, "step": step,
                        "eval_loss": 3.0 / step + (0.5 if step == n else 0), "perplexity": 5.0})
    return out


def test_recorder_writes_events_metrics_and_run_figures(db, tmp_path):
    rec = RunRecorder(db, "r1")
    rec.start({"run_id": "r1", "name": "demo", "method": "sft", "estimate":
               {"peak_gpu_bytes": 5 * 2**30, "host_bytes": 2**30}}, tmp_path, os.getpid(), None)
    rec.add_events(step_events(10, eval_every=5))
    rec.add_samples([
        {"t": 1.0, "device": "host", "kind": "host", "util": 50.0, "mem_used": 10,
         "mem_total": 100, "proc_mem": 300},
        {"t": 1.0, "device": "gpu0", "kind": "gpu", "util": 80.0, "mem_used": 900,
         "mem_total": 1000, "proc_mem": 700},
        {"t": 3.0, "device": "host", "kind": "host", "util": 150.0, "mem_used": 10,
         "mem_total": 100, "proc_mem": 500, "proc_mem_peak": 640},
        {"t": 3.0, "device": "gpu0", "kind": "gpu", "util": 40.0, "mem_used": 950,
         "mem_total": 1000, "proc_mem": None},
        # Another job's GPU: sampled, but not part of the run's figures.
        {"t": 3.0, "device": "gpu1", "kind": "gpu", "util": 99.0, "mem_used": 2000,
         "mem_total": 4000, "proc_mem": 0},
    ])
    assert history.run_metrics(db, "r1") == {}  # buffered until the flush
    assert rec.flush()
    run = history.get_run(db, "r1")
    assert run["status"] == "running"
    assert run["last_step"] == 10 and run["total_steps"] == 10 and run["world_size"] == 2
    assert run["final_loss"] == pytest.approx(0.2)
    assert run["final_eval_loss"] == pytest.approx(0.8)  # the last eval
    assert run["best_eval_loss"] == pytest.approx(0.6)  # step 5: 3/5
    assert run["tokens_per_s"] == 1000.0
    assert run["est_peak_gpu_bytes"] == 5 * 2**30 and run["est_peak_host_bytes"] == 2**30
    assert run["peak_gpu_mem_bytes"] == 950 and run["peak_host_rss_bytes"] == 500
    assert run["peak_host_hwm_bytes"] == 640
    assert run["mean_cpu_percent"] == pytest.approx(100.0)
    assert run["mean_gpu_util"] == pytest.approx(60.0)
    metrics = history.run_metrics(db, "r1")
    # numbers only; booleans and text are not metrics; step/total_steps are the x axis
    assert set(metrics) == {"loss", "lr", "grad_norm", "tokens_per_s", "epoch", "eval_loss",
                            "perplexity"}
    assert metrics["loss"][0] == (1, 2.0) and len(metrics["loss"]) == 10
    assert history.run_metrics(db, "r1", names=["loss"], after_step=8) == {
        "loss": [(9, pytest.approx(2 / 9)), (10, pytest.approx(0.2))]}
    summary = history.metric_summary(db, "r1")
    assert summary["loss"] == {"last": pytest.approx(0.2), "last_step": 10, "min": pytest.approx(0.2),
                               "max": 2.0, "count": 10}
    events = history.run_events(db, "r1")
    assert [e["kind"] for e in events[:2]] == ["start", "step"]
    assert len(events) == 1 + 10 + 2
    assert events[1]["payload"]["loss"] == 2.0 and events[1]["step"] == 1
    devices = {d["device"]: d for d in history.device_summary(db, "r1")}
    assert devices["gpu0"]["peak_util"] == 80.0 and devices["host"]["samples"] == 2
    assert len(history.device_samples(db, "r1", device="gpu0")) == 2

    rec.add_events([{"event": "done", "t": 2000.0, "summary": {
        "steps": 10, "final_loss": 0.25, "best_eval_loss": 0.55, "wall_time": 42.0}}])
    rec.finish("completed", 0, None)
    assert rec.flush()
    run = history.get_run(db, "r1")
    assert (run["status"], run["exit_code"], run["final_loss"], run["best_eval_loss"],
            run["wall_time"]) == ("completed", 0, 0.25, 0.55, 42.0)


def test_a_flush_that_finds_the_database_locked_keeps_its_rows(tmp_path):
    path = tmp_path / "history.db"
    db = open_db(path)
    db.conn.execute("PRAGMA busy_timeout = 50")
    rec = RunRecorder(db, "r1")
    rec.start({"run_id": "r1"}, tmp_path, os.getpid(), None)
    other = sqlite3.connect(path)
    other.execute("BEGIN IMMEDIATE")
    rec.add_events(step_events(3))
    assert rec.flush() is False
    assert rec.pending() == 1 + 3 + 3 * 5
    other.rollback()
    other.close()
    assert rec.flush() is True
    assert len(history.run_metrics(db, "r1")["loss"]) == 3
    assert rec.pending() == 0
    db.close()


def test_delete_run_removes_rows_and_only_on_request_the_directory(db, tmp_path):
    run_dir = tmp_path / "runs" / "d1"
    run_dir.mkdir(parents=True)
    (run_dir / "launch.json").write_text("{}")
    rec = RunRecorder(db, "d1")
    rec.start({"run_id": "d1"}, run_dir, os.getpid(), None)
    rec.add_events(step_events(4))
    rec.add_samples([{"t": 1.0, "device": "host", "kind": "host", "util": 1.0}])
    rec.flush()
    with pytest.raises(RunActive):
        history.delete_run(db, "d1")
    rec.finish("completed", 0, None)
    rec.flush()
    add_run(db, "other")
    counts = history.delete_run(db, "d1")
    assert (counts["metrics"], counts["events"], counts["device_samples"], counts["runs"]) == (
        4 * 5, 5, 1, 1)
    assert run_dir.exists()
    assert [r["id"] for r in history.list_runs(db)] == ["other"]
    for table in ("metrics", "events", "device_samples"):
        assert db.conn.execute(f"SELECT count(*) FROM {table} WHERE run_id = 'd1'").fetchone()[0] == 0

    rec = RunRecorder(db, "d2")
    rec.start({"run_id": "d2"}, run_dir, os.getpid(), None)
    rec.finish("failed", 1, "x")
    rec.flush()
    history.delete_run(db, "d2", remove_dir=True)
    assert not run_dir.exists()


def test_reconcile_marks_dead_runs_lost_and_keeps_live_ones(db, tmp_path):
    pid, started = dead_pid()
    me = psutil.Process(os.getpid())
    now = time.time()
    run_dir = tmp_path / "runs" / "gone"
    run_dir.mkdir(parents=True)
    events = [json.dumps(e) for e in step_events(6)]
    # The supervisor had recorded the first 3 steps (offset after them) before it died.
    head = "\n".join(events[:4]) + "\n"
    (run_dir / "events.jsonl").write_text(head + "\n".join(events[4:]) + "\n")
    common = {"status": "running", "host": socket.gethostname(), "created_at": now - 100}
    add_run(db, "gone", **common, supervisor_pid=pid, supervisor_started=started,
            launcher_pgid=pid, launcher_started=started, last_step=3, run_dir=str(run_dir),
            events_offset=len(head.encode()))
    add_run(db, "alive", **common, supervisor_pid=me.pid, supervisor_started=me.create_time())
    # Our pid with another start time: a recycled pid, not the run's supervisor.
    add_run(db, "recycled", **common, supervisor_pid=me.pid,
            supervisor_started=me.create_time() - 1000, launcher_pgid=pid,
            launcher_started=started)
    add_run(db, "elsewhere", **{**common, "host": "another-host"}, supervisor_pid=pid)
    add_run(db, "just-spawned", status="starting", created_at=now)
    add_run(db, "never-started", status="starting", created_at=now - 3600)

    lost = history.reconcile(db)
    assert sorted(lost) == ["gone", "never-started", "recycled"]
    gone = history.get_run(db, "gone")
    assert gone["status"] == "lost" and gone["ended_at"] is not None
    assert gone["last_step"] == 6  # the steps appended after the supervisor died are caught up
    assert len(history.run_metrics(db, "gone", names=["loss"])["loss"]) == 3
    assert "supervisor" in gone["reason"]
    for run_id, status in [("alive", "running"), ("elsewhere", "running"),
                           ("just-spawned", "starting")]:
        assert history.get_run(db, run_id)["status"] == status
    assert "never started" in history.get_run(db, "never-started")["reason"]
    assert history.reconcile(db) == []
