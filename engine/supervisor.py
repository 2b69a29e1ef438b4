"""The run supervisor: one detached process per run that owns the engine and records it.

``python -m engine.supervisor RUN_DIR [--db PATH]``, started by :func:`spawn_supervisor` in a
new session (so closing the terminal, SSH session or tmux does not reach it). It

1. takes over the run's row in the history database (status ``running``),
2. starts the launcher from ``launch.json`` in its own process group (stdout and stderr to
   ``engine.log``),
3. tails ``events.jsonl`` into ``events`` and ``metrics`` and samples devices at the run's
   interval, in batched transactions,
4. records the end: ``completed | failed | stopped``, the exit code and a human reason (the
   engine's ``error`` event, else what ``engine.log`` shows, else the signal that killed a rank).

SIGTERM to the supervisor (``zerotune runs stop``) is forwarded to the engine ranks, which
save a checkpoint and exit; SIGUSR1 (``runs stop --kill``) kills the engine's process group.
If the supervisor itself dies, :func:`engine.history.reconcile` marks the run ``lost`` once
no process of the run is left.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from engine.devices import DeviceSampler, visible_gpu_indices
from engine.events import EventTail
from engine.history import FINAL_STATUSES, HistoryError, RunRecorder, open_db, register_run

POLL_INTERVAL_S = 0.5
# After the launcher exits, how long to wait for the rest of its process group.
LINGER_S = 60.0
LOG_TAIL_BYTES = 256 * 1024

STOP_SIGNAL = signal.SIGTERM  # to the supervisor: graceful stop
KILL_SIGNAL = signal.SIGUSR1  # to the supervisor: kill the engine's process group


class NotRunning(HistoryError):
    """The run has no live process to signal."""


# --------------------------------------------------------------------------------------------
# Process identity: pids are recycled, so a pid is only "ours" with the same start time.


def process_start_time(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, started at ``started``."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


def group_members(pgid: int | None, leader_started: float | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group ``pgid``.

    Linux keeps a pid allocated while any process uses it as its process group id, so live
    members of the group are the run's processes unless the leader pid is in use by another
    process (a different start time): then the group is a new one and ours is gone.
    """
    if not pgid:
        return []
    try:
        leader = psutil.Process(pgid)
        if leader_started is not None and abs(leader.create_time() - leader_started) >= 1.0:
            return []
    except psutil.Error:
        pass
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def group_alive(pgid: int | None, leader_started: float | None = None) -> bool:
    return bool(group_members(pgid, leader_started))


def run_processes_alive(run: dict[str, Any]) -> bool:
    """True while the run's supervisor or any process of its launcher group lives."""
    if process_alive(run.get("supervisor_pid"), run.get("supervisor_started")):
        return True
    return group_alive(run.get("launcher_pgid"), run.get("launcher_started"))


def engine_ranks(pgid: int, leader_started: float | None = None) -> list[psutil.Process]:
    """The engine's rank processes: the top-most group members with LOCAL_RANK set.

    DeepSpeed's launch.py and torchrun set LOCAL_RANK for each rank; data loader workers
    inherit it but their parent has it too, so they are not top-most.
    """
    members = group_members(pgid, leader_started)
    with_rank = {}
    for proc in members:
        try:
            if "LOCAL_RANK" in proc.environ():
                with_rank[proc.pid] = proc
        except psutil.Error:
            continue
    ranks = []
    for proc in with_rank.values():
        try:
            if proc.ppid() not in with_rank:
                ranks.append(proc)
        except psutil.Error:
            continue
    return ranks


def signal_engine(pgid: int, sig: int, leader_started: float | None = None) -> str:
    """Send ``sig`` to the engine: to its ranks for SIGTERM, to the whole group otherwise.

    A graceful stop goes to the ranks only: DeepSpeed's launch.py answers SIGTERM by
    terminating the ranks itself and SIGKILLing them after 30 s, which could cut a checkpoint
    save short. Without identifiable ranks (a single-process engine) the group gets it.
    """
    if sig == signal.SIGTERM:
        ranks = engine_ranks(pgid, leader_started)
        if ranks:
            for proc in ranks:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            return f"sent {signal.Signals(sig).name} to {len(ranks)} engine rank(s)"
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return "the engine's process group is already gone"
    return f"sent {signal.Signals(sig).name} to the engine's process group {pgid}"


# --------------------------------------------------------------------------------------------
# Spawning and stopping


def spawn_supervisor(run_dir: str | os.PathLike[str], db_path: str | os.PathLike[str],
                     python: str | None = None) -> int:
    """Start the supervisor of a prepared run directory, detached; returns its pid.

    Registers the run (status ``starting``) first so that it is listed at once. The
    supervisor runs in a new session with stdin from /dev/null and its output in
    ``RUN_DIR/supervisor.log``, so it survives SIGHUP and the terminal closing.
    """
    run_dir = Path(run_dir).resolve()
    db_path = Path(db_path).resolve()
    launch = json.loads((run_dir / "launch.json").read_text())
    db = open_db(db_path)
    try:
        run_id = register_run(db, launch, run_dir)
    finally:
        db.close()
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(run_dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "engine.supervisor", str(run_dir),
             "--db", str(db_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=str(run_dir), env=env, start_new_session=True, close_fds=True,
        )
    # So that reconciliation can tell a supervisor that died early from one still starting.
    started = process_start_time(proc.pid)
    db = open_db(db_path)
    try:
        with db.conn:
            db.conn.execute(
                "UPDATE runs SET supervisor_pid = ?, supervisor_started = ? "
                "WHERE id = ? AND supervisor_pid IS NULL",
                (proc.pid, started, run_id),
            )
    finally:
        db.close()
    return proc.pid


def catches_signal(pid: int, sig: int) -> bool | None:
    """Whether a process has a handler for ``sig`` (Linux: SigCgt), None when unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _wait_until_catching(pid: int, sig: int, timeout: float = 10.0) -> None:
    # A supervisor that is still importing has not installed its handlers yet, and the
    # default action of SIGTERM/SIGUSR1 would kill it instead of stopping the run.
    deadline = time.monotonic() + timeout
    while catches_signal(pid, sig) is False and time.monotonic() < deadline:
        time.sleep(0.05)


def stop(run: dict[str, Any], kill: bool = False) -> str:
    """Stop a run given its row (``engine.history.get_run``); returns what was done.

    Graceful: SIGTERM to the supervisor, which forwards it to the engine (checkpoint, then
    exit; status ``stopped``). ``kill``: SIGUSR1 to the supervisor and SIGKILL to the engine's
    process group. With the supervisor gone, the engine is signalled directly. Raises
    NotRunning when no process of the run is alive.
    """
    status = run.get("recorded_status") or run.get("status")
    if status in FINAL_STATUSES:
        raise NotRunning(f"run {run['id']} has already ended (status: {status})")
    sup_alive = process_alive(run.get("supervisor_pid"), run.get("supervisor_started"))
    pgid, started = run.get("launcher_pgid"), run.get("launcher_started")
    grp_alive = group_alive(pgid, started)
    if not sup_alive and not grp_alive:
        raise NotRunning(f"run {run['id']} has no live process (status: {status}); "
                         "it will be marked lost")
    if kill:
        done = []
        if sup_alive:
            _wait_until_catching(run["supervisor_pid"], KILL_SIGNAL)
            os.kill(run["supervisor_pid"], KILL_SIGNAL)
            done.append("told the supervisor")
        if grp_alive:
            done.append(signal_engine(pgid, signal.SIGKILL, started))
        return "; ".join(done)
    if sup_alive:
        _wait_until_catching(run["supervisor_pid"], STOP_SIGNAL)
        os.kill(run["supervisor_pid"], STOP_SIGNAL)
        return ("asked the supervisor to stop the run: the engine finishes its step, saves a "
                "checkpoint and exits")
    return "the supervisor is gone; " + signal_engine(pgid, signal.SIGTERM, started)


# --------------------------------------------------------------------------------------------
# Why a run ended


ERROR_KIND_LABELS = {
    "oom": "out of GPU memory",
    "host_oom": "out of host memory",
    "bad_data": "bad data",
    "timeout": "timeout",
    "config": "configuration error",
    "engine": "engine error",
}

# (pattern, reason) checked against the tail of engine.log, first match wins.
LOG_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|"
                r"CUBLAS_STATUS_ALLOC_FAILED"), "out of GPU memory"),
    (re.compile(r"DefaultCPUAllocator: can't allocate memory|\bMemoryError\b|"
                r"Cannot allocate memory"), "out of host memory"),
    # One line each (no DOTALL): "NCCL" early in a log and "timeout" much later are unrelated.
    (re.compile(r"Watchdog caught collective operation timeout|NCCL.*[Tt]ime(d )?out|"
                r"ProcessGroupNCCL.*timeout"), "NCCL timeout: a rank stopped communicating"),
    (re.compile(r"[Gg]loo.*[Tt]imed? ?out|Timed out waiting.*gloo"),
     "gloo timeout: a rank stopped communicating"),
    (re.compile(r"NCCL error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError"),
     "NCCL error between ranks"),
    (re.compile(r"No space left on device"), "disk full (no space left on device)"),
    (re.compile(r"Address already in use|EADDRINUSE"),
     "the rendezvous port is already in use (set a different master port)"),
]
_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_RETURN_CODE = re.compile(r"exits with return code = (-?\d+)")
_TORCHRUN_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)): (.+)$", re.MULTILINE)
_KILLED_LINE = re.compile(r"^Killed$", re.MULTILINE)


def read_log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def oom_kill_count() -> int | None:
    """The kernel's count of OOM kills (host-wide, /proc/vmstat), None when unknown."""
    try:
        with open("/proc/vmstat") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _signal_label(signum: int) -> str:
    try:
        return f"killed by signal {signum} ({signal.Signals(signum).name})"
    except ValueError:
        return f"killed by signal {signum}"


def failure_reason(exit_code: int | None, error_event: dict[str, Any] | None, log_tail: str,
                   oom_killed: bool = False, host_mem_frac: float | None = None) -> str:
    """A one-line human reason for a failed run.

    The engine's ``error`` event wins (it knows best); then what the log shows; then the
    signal that killed a rank (from the launcher's "exits with return code = -N" line or the
    launcher's own exit status); then the last exception line; then the exit code.
    """
    if error_event:
        kind = str(error_event.get("kind") or "")
        text = str(error_event.get("reason") or "").strip()
        label = ERROR_KIND_LABELS.get(kind, kind)
        if label and text and not text.lower().startswith(label.lower()):
            return f"{label}: {text}"
        return text or label or "the engine reported an error"
    for pattern, reason in LOG_PATTERNS:
        if pattern.search(log_tail):
            return reason
    missing = _MISSING_MODULE.findall(log_tail)
    if missing:
        return f"missing Python module '{missing[-1]}'"
    signum = None
    codes = _RETURN_CODE.findall(log_tail) or _TORCHRUN_EXIT.findall(log_tail)
    negative = [int(c) for c in codes if int(c) < 0]
    if negative:
        signum = -negative[-1]
    elif exit_code is not None and exit_code < 0:
        signum = -exit_code
    elif exit_code is not None and 128 < exit_code < 160 and not codes:
        signum = exit_code - 128  # a shell reporting its child's signal
    if signum is not None:
        mem = host_mem_frac or 0.0
        # SIGKILL is also what the kernel's OOM killer sends: tell them apart by the kernel's
        # OOM-kill counter or by host memory being nearly full at the last sample.
        likely_oom = oom_killed or mem >= 0.95 or (bool(_KILLED_LINE.search(log_tail)) and mem >= 0.9)
        if signum == signal.SIGKILL and likely_oom:
            return "out of host memory (killed by the kernel)"
        return _signal_label(signum)
    exceptions = _EXCEPTION_LINE.findall(log_tail)
    if exceptions:
        name, message = exceptions[-1]
        return f"engine error: {name}: {message.strip()[:300]}"
    positive = [int(c) for c in codes if int(c) > 0]
    if positive:
        return f"a rank exited with code {positive[-1]}"
    if exit_code is None:
        return "the engine did not start"
    return f"the launcher exited with code {exit_code}"


def classify_end(exit_code: int | None, *, saw_done: bool, stopped_event: dict[str, Any] | None,
                 error_event: dict[str, Any] | None, stop_requested: bool, kill_requested: bool,
                 log_tail: str, oom_killed: bool = False,
                 host_mem_frac: float | None = None) -> tuple[str, str | None]:
    """(status, reason) of an ended run."""
    if stopped_event is not None:
        step = stopped_event.get("step")
        ckpt = stopped_event.get("checkpoint")
        where = f" at step {step}" if step is not None else ""
        saved = f"; checkpoint {ckpt}" if ckpt else "; no checkpoint saved"
        return "stopped", f"stopped on request{where}{saved}"
    if kill_requested:
        return "stopped", "killed on request (runs stop --kill)"
    if exit_code == 0 and saw_done and error_event is None:
        return "completed", None
    if stop_requested:
        return "stopped", (
            "stopped on request; the engine exited "
            + ("cleanly" if exit_code == 0 else f"with code {exit_code}")
            + " without confirming a checkpoint"
        )
    if exit_code == 0 and error_event is None:
        reason = failure_reason(None, None, log_tail, oom_killed, host_mem_frac)
        if reason in ("the engine did not start",):
            reason = "the engine exited without reporting completion"
        return "failed", reason
    return "failed", failure_reason(exit_code, error_event, log_tail, oom_killed, host_mem_frac)


# --------------------------------------------------------------------------------------------
# The supervisor process


def _become_subreaper() -> bool:
    # Orphaned descendants (a rank whose launcher died) are reparented to us instead of
    # PID 1, so we can reap them and sample them as part of the run.
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_orphans(keep_pid: int | None) -> None:
    """Reap exited descendants other than ``keep_pid`` (which Popen reaps)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == keep_pid:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] supervisor: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Runs one launch.json to its end and records it. See the module docstring."""

    def __init__(self, run_dir: str | os.PathLike[str], db_path: str | os.PathLike[str],
                 poll_interval: float = POLL_INTERVAL_S, linger: float = LINGER_S):
        self.run_dir = Path(run_dir).resolve()
        self.db_path = Path(db_path)
        self.poll_interval = poll_interval
        self.linger = linger
        self.stop_requested = False
        self.kill_requested = False
        self._stop_forwarded = False
        self._killed = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.launcher_started: float | None = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == KILL_SIGNAL:
            self.kill_requested = True
        else:
            self.stop_requested = True

    def run(self) -> int:
        launch_path = self.run_dir / "launch.json"
        try:
            launch = json.loads(launch_path.read_text())
            argv = [str(a) for a in launch["argv"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log(f"cannot read {launch_path}: {exc}")
            self._record_unlaunchable(f"invalid launch.json: {exc}")
            return 2
        run_id = launch.get("run_id") or self.run_dir.name
        self.db = open_db(self.db_path)
        rec = self.recorder = RunRecorder(self.db, run_id)
        me = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT, KILL_SIGNAL):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        rec.start(launch, self.run_dir, me, process_start_time(me))
        _become_subreaper()
        oom_before = oom_kill_count()
        _log(f"run {run_id}: starting {' '.join(argv)}")

        if self.stop_requested or self.kill_requested:
            rec.finish("stopped", None, "stopped on request before the engine started")
            rec.flush()
            return 0
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (launch.get("env") or {}).items()})
        cwd = launch.get("cwd") or str(self.run_dir)
        try:
            with open(self.run_dir / "engine.log", "ab") as log:
                self.proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                )
        except OSError as exc:
            reason = f"could not start the launcher: {exc}"
            _log(reason)
            rec.finish("failed", None, reason)
            rec.flush()
            return 1
        proc = self.proc
        self.launcher_started = process_start_time(proc.pid)
        rec.update(launcher_pid=proc.pid, launcher_pgid=proc.pid,
                   launcher_started=self.launcher_started)
        rec.flush()

        sampler = DeviceSampler(root_pid=me, include_root=False,
                                interval=launch.get("sample_interval"),
                                gpu_indices=visible_gpu_indices(env))
        tail = EventTail(self.run_dir / "events.jsonl")
        exit_code = self._loop(proc, rec, sampler, tail)

        # The last events, and a last line cut mid-write.
        self._read_events(tail, rec)
        tail.read_trailing_partial()
        self._record_tail_warnings(tail, rec)
        rec.update(events_offset=tail.offset)
        sampler.close()

        oom_after = oom_kill_count()
        used, total = rec.last_host_mem
        status, reason = classify_end(
            exit_code,
            saw_done=rec.saw_done,
            stopped_event=rec.stopped_event,
            error_event=rec.error_event,
            stop_requested=self.stop_requested,
            kill_requested=self.kill_requested,
            log_tail=read_log_tail(self.run_dir / "engine.log"),
            oom_killed=oom_before is not None and oom_after is not None and oom_after > oom_before,
            host_mem_frac=(used / total) if used and total else None,
        )
        rec.finish(status, exit_code, reason)
        for _ in range(60):  # the end must be recorded; wait out a busy database
            if rec.flush():
                break
            time.sleep(1.0)
        _log(f"run {run_id}: {status} (exit code {exit_code})" + (f": {reason}" if reason else ""))
        self.db.close()
        return 0

    def _loop(self, proc: subprocess.Popen[bytes], rec: RunRecorder, sampler: DeviceSampler,
              tail: EventTail) -> int | None:
        exit_code: int | None = None
        exited_at: float | None = None
        errors = 0
        while True:
            try:
                if self.kill_requested and not self._killed:
                    _log("kill requested: " + signal_engine(proc.pid, signal.SIGKILL,
                                                              self.launcher_started))
                    self._killed = True
                elif self.stop_requested and not self._stop_forwarded:
                    _log("stop requested: " + signal_engine(proc.pid, signal.SIGTERM,
                                                              self.launcher_started))
                    self._stop_forwarded = True
                self._read_events(tail, rec)
                rec.add_samples(sampler.poll())
                if rec.flush_due():
                    rec.flush()
                _reap_orphans(proc.pid)
            except Exception:  # noqa: BLE001 - keep supervising; one bad iteration is not the run
                errors += 1
                if errors <= 20:
                    _log("error in the supervisor loop:\n" + traceback.format_exc())
            if exit_code is None:
                exit_code = proc.poll()
                if exit_code is not None:
                    exited_at = time.monotonic()
                    _log(f"launcher exited with code {exit_code}")
            if exit_code is not None:
                lingering = group_alive(proc.pid, self.launcher_started)
                if not lingering or time.monotonic() - exited_at > self.linger:
                    return exit_code
            time.sleep(self.poll_interval)

    def _read_events(self, tail: EventTail, rec: RunRecorder) -> None:
        events = tail.read_new()
        if events:
            rec.add_events(events)
        self._record_tail_warnings(tail, rec)
        if events or tail.warnings:
            rec.update(events_offset=tail.offset)

    def _record_tail_warnings(self, tail: EventTail, rec: RunRecorder) -> None:
        while tail.warnings:
            rec.add_warning(tail.warnings.pop(0))

    def _record_unlaunchable(self, reason: str) -> None:
        run_id = self.run_dir.name
        try:
            db = open_db(self.db_path)
            rec = RunRecorder(db, run_id)
            exists = db.conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone()
            if exists:
                rec.finish("failed", None, reason)
                rec.flush()
            db.close()
        except Exception as exc:  # noqa: BLE001 - nothing more to do; the log has it
            _log(f"could not record the failure: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.supervisor",
        description="Supervise one prepared run directory (started by zerotune, detached).",
    )
    parser.add_argument("run_dir", help="the run directory holding launch.json")
    parser.add_argument("--db", help="history database (default: RUN_DIR/../history.db)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    db_path = Path(args.db) if args.db else run_dir.resolve().parent / "history.db"
    _log(f"pid {os.getpid()} on {socket.gethostname()}, run dir {run_dir}")
    return Supervisor(run_dir, db_path).run()


if __name__ == "__main__":
    sys.exit(main())
