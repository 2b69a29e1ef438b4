"""The supervisor with real subprocesses, signals and SQLite files.

The engine is stood in for by tests/fixtures/fake_engine.py (it appends events like rank 0 of
engine.train and handles SIGTERM the same way); the launcher by tests/fixtures/fake_launcher.py
or DeepSpeed's own deepspeed.launcher.launch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import history
from engine.history import open_db
from engine.launcher import free_port, local_launch_argv
from engine.supervisor import classify_end, failure_reason, process_alive, spawn_supervisor, stop

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STEP_METRICS = 8  # numeric fields of a fake step event besides step/total_steps
EVAL_METRICS = 2


def make_run(ws: Path, run_id: str, *engine_args: str, launcher: str = "direct", nproc: int = 1,
             sample_interval: float = 0.25) -> Path:
    run_dir = ws / "runs" / run_id
    run_dir.mkdir(parents=True)
    engine = [str(FIXTURES / "fake_engine.py"), "--run-dir", str(run_dir),
              "--pid-file", str(run_dir / "rank"), *engine_args]
    env = {}
    if launcher == "fake":
        argv = [PY, str(FIXTURES / "fake_launcher.py"), str(nproc), *engine]
    elif launcher == "deepspeed":
        argv = local_launch_argv(nproc, "127.0.0.1", free_port(), ["--no_local_rank", *engine], module=False)
        env["DS_ACCELERATOR"] = "cpu"
    else:
        argv = [PY, *engine]
    launch = {
        "run_id": run_id, "name": f"test-{run_id}", "argv": argv, "env": env,
        "cwd": str(run_dir), "method": "sft", "adapter": "lora", "zero_stage": 2,
        "model": "tiny", "world_size": nproc, "parent_run_id": None, "relation": None,
        "profile_hash": "h-" + run_id, "estimate": None, "sample_interval": sample_interval,
    }
    (run_dir / "launch.json").write_text(json.dumps(launch))
    return run_dir


def db_of(ws: Path) -> Path:
    return ws / "runs" / "history.db"


def wait_for(ws: Path, run_id: str, predicate, timeout: float = 20.0) -> dict:
    db = open_db(db_of(ws))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                run = history.get_run(db, run_id)
            except history.RunNotFound:
                run = None
            if run is not None and predicate(run):
                return run
            if time.monotonic() > deadline:
                log = ""
                sup = ws / "runs" / run_id / "supervisor.log"
                if sup.exists():
                    log = sup.read_text()[-3000:]
                raise AssertionError(f"timed out waiting for {run_id}: {run}\n{log}")
            time.sleep(0.1)
    finally:
        db.close()


def ended(run: dict) -> bool:
    return run["recorded_status"] in history.FINAL_STATUSES


def rows(ws: Path, table: str, run_id: str) -> int:
    db = open_db(db_of(ws))
    try:
        return db.conn.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?",
                               (run_id,)).fetchone()[0]
    finally:
        db.close()


def test_completed_run_records_events_metrics_and_devices(tmp_path):
    make_run(tmp_path, "ok", "--steps", "8", "--step-time", "0.1", "--eval-every", "4",
             launcher="fake", nproc=2)
    pid = spawn_supervisor(tmp_path / "runs" / "ok", db_of(tmp_path))
    assert pid > 0
    run = wait_for(tmp_path, "ok", ended)
    assert run["status"] == "completed", run["reason"]
    assert (run["exit_code"], run["reason"], run["last_step"], run["total_steps"]) == (0, None, 8, 8)
    assert run["final_loss"] == pytest.approx(3.0 * 0.9**8)
    assert run["best_eval_loss"] == pytest.approx(3.0 * 0.9**8 + 0.1)
    assert run["supervisor_pid"] == pid and run["launcher_pgid"] == run["launcher_pid"]
    assert rows(tmp_path, "metrics", "ok") == 8 * STEP_METRICS + 2 * EVAL_METRICS
    assert rows(tmp_path, "events", "ok") == 1 + 8 + 2 + 1
    assert rows(tmp_path, "device_samples", "ok") >= 2
    assert run["peak_host_rss_bytes"] > 10 * 2**20  # three Python processes
    log = (tmp_path / "runs" / "ok" / "engine.log").read_text()
    assert "rank 0: done" in log and "rank 1: done" in log


def test_error_event_gives_the_reason(tmp_path):
    make_run(tmp_path, "bad", "--steps", "10", "--step-time", "0.02", "--error-at", "3")
    spawn_supervisor(tmp_path / "runs" / "bad", db_of(tmp_path))
    run = wait_for(tmp_path, "bad", ended)
    assert run["status"] == "failed"
    assert run["exit_code"] == 1
    assert run["reason"] == "bad data: data/train.jsonl:17: missing 'text' field"
    assert run["error_kind"] == "bad_data" and run["last_step"] == 3


def test_crash_without_error_event_is_explained_from_the_log(tmp_path):
    make_run(tmp_path, "oom", "--steps", "10", "--step-time", "0.02", "--crash-at", "2",
             "--log-at-crash", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    spawn_supervisor(tmp_path / "runs" / "oom", db_of(tmp_path))
    run = wait_for(tmp_path, "oom", ended)
    assert (run["status"], run["reason"], run["exit_code"]) == ("failed", "out of GPU memory", 1)


def test_malformed_and_truncated_event_lines_are_skipped_with_warnings(tmp_path):
    make_run(tmp_path, "junk", "--steps", "6", "--step-time", "0.02", "--garbage-at", "2",
             "--truncate-at-end")
    spawn_supervisor(tmp_path / "runs" / "junk", db_of(tmp_path))
    run = wait_for(tmp_path, "junk", ended)
    # The engine died mid-write of its last event: no completion, but nothing crashed
    assert run["status"] == "failed"
    assert run["reason"] == "the engine exited without reporting completion"
    assert run["last_step"] == 6 and run["warnings"] == 3
    db = open_db(db_of(tmp_path))
    messages = [e["payload"]["message"] for e in history.run_events(db, "junk", kinds=["warning"])]
    db.close()
    assert sum("skipped a malformed event line" in m for m in messages) == 2
    assert sum("skipped a truncated last event line" in m for m in messages) == 1
    assert rows(tmp_path, "metrics", "junk") == 6 * STEP_METRICS
    assert "skipped a malformed event line" in (tmp_path / "runs" / "junk" / "supervisor.log").read_text()


def test_graceful_stop_reaches_the_ranks_and_records_stopped(tmp_path):
    # Through DeepSpeed's real launcher with two ranks: the stop goes to the ranks (not to
    # launch.py, which would SIGKILL them after 30 s), so every rank saves and exits 0.
    make_run(tmp_path, "halt", "--steps", "400", "--step-time", "0.05", launcher="deepspeed",
             nproc=2)
    spawn_supervisor(tmp_path / "runs" / "halt", db_of(tmp_path))
    run = wait_for(tmp_path, "halt", lambda r: (r["last_step"] or 0) >= 3, timeout=30)
    what = stop(run)
    assert "supervisor" in what
    run = wait_for(tmp_path, "halt", ended, timeout=20)
    assert run["status"] == "stopped", run["reason"]
    assert run["exit_code"] == 0
    step = run["last_step"]
    assert 3 <= step < 400
    ckpt = tmp_path / "runs" / "halt" / "checkpoints" / f"checkpoint-{step}"
    assert ckpt.is_dir()
    assert run["reason"] == f"stopped on request at step {step}; checkpoint {ckpt}"
    assert run["last_checkpoint"] == str(ckpt)
    log = (tmp_path / "runs" / "halt" / "engine.log").read_text()
    assert log.count("stopped at step") == 2


def test_kill_9_of_a_rank_fails_the_run_within_10s_keeping_its_steps(tmp_path):
    run_dir = make_run(tmp_path, "k9", "--steps", "400", "--step-time", "0.05",
                       launcher="deepspeed", nproc=1)
    spawn_supervisor(run_dir, db_of(tmp_path))
    wait_for(tmp_path, "k9", lambda r: (r["last_step"] or 0) >= 3, timeout=30)
    os.kill(int((run_dir / "rank.0").read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    run = wait_for(tmp_path, "k9", ended, timeout=10)
    assert time.monotonic() - killed_at < 10
    assert run["status"] == "failed"
    assert run["reason"] == "killed by signal 9 (SIGKILL)"
    assert "exits with return code = -9" in (run_dir / "engine.log").read_text()
    db = open_db(db_of(tmp_path))
    steps = [s for s, _ in history.run_metrics(db, "k9", names=["loss"])["loss"]]
    db.close()
    assert steps == list(range(1, run["last_step"] + 1)) and len(steps) >= 3


def test_stop_kill_sigkills_the_group_and_says_so(tmp_path):
    make_run(tmp_path, "hard", "--steps", "400", "--step-time", "0.05", launcher="fake", nproc=2)
    spawn_supervisor(tmp_path / "runs" / "hard", db_of(tmp_path))
    run = wait_for(tmp_path, "hard", lambda r: (r["last_step"] or 0) >= 2)
    stop(run, kill=True)
    run = wait_for(tmp_path, "hard", ended, timeout=10)
    assert (run["status"], run["reason"]) == ("stopped", "killed on request (runs stop --kill)")
    assert not list((tmp_path / "runs" / "hard").glob("checkpoints/*"))
    with pytest.raises(history.HistoryError):
        stop(run)


def test_logs_follow_prints_the_engine_log_until_the_run_ends(tmp_path):
    make_run(tmp_path, "tailme", "--steps", "12", "--step-time", "0.1", launcher="fake")
    spawn_supervisor(tmp_path / "runs" / "tailme", db_of(tmp_path))
    wait_for(tmp_path, "tailme", lambda r: r["recorded_status"] == "running")
    out = subprocess.run(
        [PY, "-m", "engine.runs_cli", "runs", "logs", "tail", "-f", "--workspace", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert "rank 0: training 12 steps" in out.stdout and "rank 0: done" in out.stdout
    assert "completed" in out.stderr
    assert wait_for(tmp_path, "tailme", ended)["status"] == "completed"


def test_kill_9_of_the_supervisor_leaves_the_run_lost_not_running(tmp_path):
    # Long enough (3 s) that the engine is still running when the supervisor is killed, even
    # on a loaded machine where the first steps are seen late.
    make_run(tmp_path, "orphan", "--steps", "60", "--step-time", "0.05")
    sup = spawn_supervisor(tmp_path / "runs" / "orphan", db_of(tmp_path))
    run = wait_for(tmp_path, "orphan", lambda r: (r["last_step"] or 0) >= 2)
    os.kill(sup, signal.SIGKILL)
    db = open_db(db_of(tmp_path))
    try:
        assert history.reconcile(db) == []  # the engine still runs: not lost yet
        deadline = time.monotonic() + 15
        while history.get_run(db, "orphan")["recorded_status"] == "running":
            assert time.monotonic() < deadline, "the run stayed running"
            history.reconcile(db)
            time.sleep(0.2)
        run = history.get_run(db, "orphan")
        assert run["status"] == "lost"
        # The engine finished on its own; its later events were caught up from events.jsonl.
        assert run["last_step"] == 60
        assert "reported completion" in run["reason"]
        assert len(history.run_metrics(db, "orphan", names=["loss"])["loss"]) == 60
    finally:
        db.close()


def test_two_runs_write_one_database_while_it_is_listed(tmp_path):
    for run_id in ("par1", "par2"):
        make_run(tmp_path, run_id, "--steps", "150", "--step-time", "0.01", "--eval-every", "10")
    for run_id in ("par1", "par2"):
        spawn_supervisor(tmp_path / "runs" / run_id, db_of(tmp_path))
    cli_results = []
    done = threading.Event()

    def cli_loop():
        while not done.is_set() and len(cli_results) < 50:
            out = subprocess.run(
                [PY, "-m", "engine.runs_cli", "runs", "list", "--json",
                 "--workspace", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                check=False)
            cli_results.append((out.returncode, out.stdout, out.stderr))

    thread = threading.Thread(target=cli_loop)
    thread.start()
    db = open_db(db_of(tmp_path))
    reads = 0
    deadline = time.monotonic() + 30
    while True:
        runs = history.list_runs(db)
        for r in runs:
            history.get_run(db, r["id"])
            history.metric_summary(db, r["id"])
        reads += 1
        if len(runs) == 2 and all(ended(r) for r in runs):
            break
        assert time.monotonic() < deadline
    done.set()
    thread.join(timeout=30)
    db.close()
    assert reads > 5 and len(cli_results) >= 2
    for code, out, err in cli_results:
        assert code == 0, err
        json.loads(out)
    for run_id in ("par1", "par2"):
        run = wait_for(tmp_path, run_id, ended)
        assert run["status"] == "completed", run["reason"]
        assert rows(tmp_path, "metrics", run_id) == 150 * STEP_METRICS + 15 * EVAL_METRICS
        assert rows(tmp_path, "events", run_id) == 1 + 150 + 15 + 1


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_run_survives_the_tmux_session_that_started_it(tmp_path):
    run_dir = make_run(tmp_path, "tmux", "--steps", "12", "--step-time", "0.1")
    spawned = tmp_path / "spawned"
    script = tmp_path / "start.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from engine.supervisor import spawn_supervisor\n"
        f"pid = spawn_supervisor({str(run_dir)!r}, {str(db_of(tmp_path))!r})\n"
        f"open({str(spawned)!r}, 'w').write(f'{{os.getpid()}} {{pid}}')\n"
        "time.sleep(120)\n"
    )
    socket_name = f"zerotune-test-{os.getpid()}"
    subprocess.run(["tmux", "-L", socket_name, "new-session", "-d", "-s", "train",
                    f"{PY} {script}"], check=True, env={**os.environ, "TERM": "xterm"})
    try:
        deadline = time.monotonic() + 15
        while not spawned.exists() or not spawned.read_text():
            assert time.monotonic() < deadline, "the tmux session did not start the run"
            time.sleep(0.1)
        starter_pid, sup_pid = map(int, spawned.read_text().split())
        wait_for(tmp_path, "tmux", lambda r: (r["last_step"] or 0) >= 1)
    finally:
        subprocess.run(["tmux", "-L", socket_name, "kill-server"], check=False)
    deadline = time.monotonic() + 5
    while process_alive(starter_pid):  # the session's own process got its SIGHUP
        assert time.monotonic() < deadline, "killing the tmux server did not end its session"
        time.sleep(0.1)
    run = wait_for(tmp_path, "tmux", ended, timeout=20)
    assert run["status"] == "completed", run["reason"]
    assert run["supervisor_pid"] == sup_pid
    assert run["last_step"] == 12
    assert rows(tmp_path, "metrics", "tmux") == 12 * STEP_METRICS
    assert rows(tmp_path, "device_samples", "tmux") >= 3


# -- reasons, without processes ----------------------------------------------------------------

LAUNCH_PY_KILLED = (
    "[launch.py:319:sigkill_handler] Killing subprocess 4242\n"
    "[launch.py:328:sigkill_handler] ['python', '-u', '-m', 'engine.train'] exits with "
    "return code = -9\n"
)


@pytest.mark.parametrize(("exit_code", "log", "kwargs", "reason"), [
    (1, LAUNCH_PY_KILLED, {}, "killed by signal 9 (SIGKILL)"),
    (247, LAUNCH_PY_KILLED, {"oom_killed": True}, "out of host memory (killed by the kernel)"),
    (-9, "", {"host_mem_frac": 0.97}, "out of host memory (killed by the kernel)"),
    (-15, "", {}, "killed by signal 15 (SIGTERM)"),
    (1, "RuntimeError: CUDA error: out of memory\n" + LAUNCH_PY_KILLED, {}, "out of GPU memory"),
    (1, ("[E ProcessGroupNCCL.cpp:475] Watchdog caught collective operation timeout: "
         "WorkNCCL(SeqNum=1) ran for 1800000 ms before timing out.\n"), {},
     "NCCL timeout: a rank stopped communicating"),
    (1, "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out\n", {},
     "gloo timeout: a rank stopped communicating"),
    (1, "ModuleNotFoundError: No module named 'peft'\n", {}, "missing Python module 'peft'"),
    (1, "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 'input_ids'\n", {},
     "engine error: KeyError: 'input_ids'"),
    (3, "", {}, "the launcher exited with code 3"),
])
def test_failure_reasons(exit_code, log, kwargs, reason):
    assert failure_reason(exit_code, None, log, **kwargs) == reason


def test_end_classification():
    common = {"log_tail": "", "stop_requested": False, "kill_requested": False}
    assert classify_end(0, saw_done=True, stopped_event=None, error_event=None, **common) == (
        "completed", None)
    assert classify_end(0, saw_done=False, stopped_event=None, error_event=None, **common) == (
        "failed", "the engine exited without reporting completion")
    err = {"kind": "oom", "reason": "rank 0 needed 3 GiB more"}
    assert classify_end(1, saw_done=False, stopped_event=None, error_event=err, **common) == (
        "failed", "out of GPU memory: rank 0 needed 3 GiB more")
    assert classify_end(1, saw_done=False, stopped_event=None, error_event=None,
                        **{**common, "stop_requested": True})[0] == "stopped"
    assert classify_end(0, saw_done=False, stopped_event={"step": 7, "checkpoint": None},
                        error_event=None, **common) == (
        "stopped", "stopped on request at step 7; no checkpoint saved")


def test_stop_right_after_spawning_stops_before_the_engine_starts(tmp_path):
    run_dir = make_run(tmp_path, "early", "--steps", "400", "--step-time", "0.05")
    spawn_supervisor(run_dir, db_of(tmp_path))
    db = open_db(db_of(tmp_path))
    run = history.get_run(db, "early")
    db.close()
    assert run["recorded_status"] in ("starting", "running")
    stop(run)  # the supervisor may still be importing: the stop must not kill it
    run = wait_for(tmp_path, "early", ended)
    assert run["status"] == "stopped"
    assert run["reason"].startswith("stopped on request")
