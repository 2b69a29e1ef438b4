"""History at scale: 10,000 runs and 5 million metric rows; and the cost of device sampling.

    .venv/bin/python bench/history_scale.py [--runs 10000] [--steps 100] [--window 20]

Builds a history database (bulk insert), then times ``runs list`` and ``runs show`` as the
query functions the CLI and TUI call and as ``zerotune`` subprocesses, and measures the CPU
cost of sampling devices every 2 s (the sampler alone, and a whole supervisor) over a window,
as % of one core. Prints each figure beside its target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine import history  # noqa: E402 - after the sys.path line
from engine.devices import DeviceSampler, own_cpu_seconds  # noqa: E402 - after the sys.path line
from engine.runs_cli import show_report  # noqa: E402 - after the sys.path line
from engine.workspace import db_path  # noqa: E402 - after the sys.path line

METRIC_NAMES = ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss")
TARGET_MS = 300.0
TARGET_CPU_PCT = 1.0


def build(ws: Path, n_runs: int, steps: int, seed: int = 0) -> tuple[list[str], float]:
    """A workspace whose history has n_runs runs of steps x 5 metrics each; returns ids."""
    rng = random.Random(seed)
    path = db_path(ws)
    history.open_db(path).close()  # the real schema, through the migrations
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    # Bulk load: no journal, no fsync, the metrics index rebuilt once at the end.
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("DROP INDEX metrics_run_name_step")
    t0 = time.time() - n_runs * 600
    ids = [f"{int((t0 + i * 600) * 16) & 0xFFFFFFFFF:09x}{rng.randrange(4096):03x}"
           for i in range(n_runs)]
    statuses = ["completed"] * 8 + ["failed", "stopped"]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO runs (id, name, status, method, adapter, zero_stage, model, world_size, "
        "created_at, started_at, ended_at, exit_code, last_step, total_steps, final_loss, "
        "best_eval_loss, tokens_per_s, wall_time, peak_host_rss_bytes, est_peak_host_bytes, "
        "run_dir, host) VALUES (?, ?, ?, 'sft', 'lora', 2, 'qwen2.5-0.5b', 2, ?, ?, ?, 0, ?, ?, "
        "?, ?, ?, ?, ?, ?, ?, 'bench')",
        (
            (rid, f"{rng.choice(['security', 'legal', 'chat', 'code'])}-sft-{i % 97}",
             rng.choice(statuses), t0 + i * 600, t0 + i * 600 + 5, t0 + i * 600 + 500, steps,
             steps, rng.uniform(0.5, 2), rng.uniform(0.6, 2.2), rng.uniform(800, 1200), 495.0,
             rng.randrange(2**30, 2**33), 2**32, str(ws / "runs" / rid))
            for i, rid in enumerate(ids)
        ),
    )

    def metric_rows():
        for i, rid in enumerate(ids):
            t = t0 + i * 600
            for step in range(1, steps + 1):
                loss = 3.0 / (1 + 0.05 * step)
                yield (rid, step, "loss", loss, t + step)
                yield (rid, step, "lr", 2e-4, t + step)
                yield (rid, step, "grad_norm", 1.0 + (step % 7) * 0.1, t + step)
                yield (rid, step, "tokens_per_s", 1000.0 + step % 13, t + step)
                yield (rid, step, "eval_loss", loss + 0.1, t + step)

    conn.executemany("INSERT INTO metrics (run_id, step, name, value, t) VALUES (?, ?, ?, ?, ?)",
                     metric_rows())

    def sample_rows():
        for i, rid in enumerate(ids):
            for k in range(10):
                yield (rid, t0 + i * 600 + 2 * k, "host", "host", 180.0, 2**33, 2**34, None,
                       None, 2**31)

    conn.executemany(
        "INSERT INTO device_samples (run_id, t, device, kind, util, mem_used, mem_total, "
        "power_w, temp_c, proc_mem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", sample_rows())
    conn.executemany(
        "INSERT INTO events (run_id, t, kind, step, payload) VALUES (?, ?, ?, ?, ?)",
        ((rid, t0 + i * 600, kind, None, json.dumps({"bench": True}))
         for i, rid in enumerate(ids) for kind in ("start", "done")),
    )
    conn.execute("COMMIT")
    conn.execute("CREATE INDEX metrics_run_name_step ON metrics (run_id, name, step)")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return ids, time.perf_counter() - started


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first call, median of the rest) in milliseconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times[0], statistics.median(times[1:] if len(times) > 1 else times)


def cli_ms(ws: Path, args: list[str], repeat: int,
           module: str = "engine.cli") -> tuple[float, float]:
    """Median (wall ms, CPU ms) of a zerotune subprocess; CPU time does not depend on how
    busy the machine's other cores are, wall time does."""
    cmd = [sys.executable, "-m", module, "--workspace", str(ws), *args]
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        walls.append((time.perf_counter() - t) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return statistics.median(walls), statistics.median(cpus)


def row(label: str, value: float, unit: str, target: float | None) -> None:
    if target is None:  # a figure for context, not one of the targets
        print(f"  {label:<46} {value:9.2f} {unit:<3}")
        return
    verdict = "ok" if value < target else "OVER"
    print(f"  {label:<46} {value:9.2f} {unit:<3}  target < {target:g} {unit}  {verdict}")


def sampler_cpu(window: float, interval: float = 2.0) -> tuple[float, int]:
    """% of one core spent by DeviceSampler sampling a 4-process tree every ``interval``."""
    code = "import subprocess, sys, time\n" + \
        "ps = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']) " + \
        "for _ in range(3)]\ntime.sleep(600)\n"
    root = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        samples = []
        sampler = DeviceSampler(root_pid=root.pid, interval=interval)
        before = own_cpu_seconds()
        sampler.start(samples.append)
        time.sleep(window)
        sampler.stop()
        spent = own_cpu_seconds() - before
    finally:
        for p in __import__("psutil").Process(root.pid).children(recursive=True):
            p.kill()
        root.kill()
        root.wait()
    return spent / window * 100.0, len(samples)


def supervisor_cpu(ws: Path, window: float) -> tuple[float, int]:
    """% of one core used by a whole supervisor (tailing, sampling at 2 s, writing)."""
    import psutil

    from engine.supervisor import spawn_supervisor

    run_dir = ws / "runs" / "bench-supervisor"
    run_dir.mkdir(parents=True)
    steps = int(window) + 10
    engine = [sys.executable, str(REPO / "tests" / "fixtures" / "fake_engine.py"), "--run-dir",
              str(run_dir), "--steps", str(steps), "--step-time", "1.0"]
    (run_dir / "launch.json").write_text(json.dumps({
        "run_id": "bench-supervisor", "name": "bench", "argv": engine, "env": {},
        "cwd": str(run_dir), "method": "sft", "adapter": "none", "zero_stage": 0,
        "model": "tiny", "world_size": 1, "parent_run_id": None, "relation": None,
        "profile_hash": "bench", "estimate": None, "sample_interval": 2.0}))
    pid = spawn_supervisor(run_dir, db_path(ws))
    proc = psutil.Process(pid)
    time.sleep(3.0)  # past the start-up imports
    cpu = proc.cpu_times()
    before = cpu.user + cpu.system
    time.sleep(window)
    cpu = proc.cpu_times()
    spent = cpu.user + cpu.system - before
    os.kill(pid, 15)  # stop the run; the supervisor records it
    db = history.open_db(db_path(ws))
    samples = db.conn.execute("SELECT count(*) FROM device_samples WHERE run_id = ?",
                              ("bench-supervisor",)).fetchone()[0]
    db.close()
    return spent / window * 100.0, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100, help="steps per run (x5 metrics)")
    parser.add_argument("--window", type=float, default=20.0, help="CPU window in seconds")
    parser.add_argument("--repeat", type=int, default=20, help="repetitions per query timing")
    parser.add_argument("--workdir", help="keep the workspace here (default: a temp dir)")
    args = parser.parse_args()

    tmp = None
    if args.workdir:
        ws = Path(args.workdir)
        ws.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="zerotune-bench-")
        ws = Path(tmp.name)
    try:
        print(f"history at scale: {args.runs:,} runs x {args.steps * 5} metric rows "
              f"= {args.runs * args.steps * 5:,} metric rows")
        ids, build_s = build(ws, args.runs, args.steps)
        size = sum(f.stat().st_size for f in db_path(ws).parent.glob("history.db*"))
        print(f"  built in {build_s:.1f} s, database {size / 2**20:.0f} MiB")
        db = history.open_db(db_path(ws))
        target = ids[len(ids) // 2]
        print("query functions (first call / median of the rest):")
        for label, fn in [
            ("list_runs (newest 50)", lambda: history.list_runs(db, limit=50)),
            ("list_runs --status failed", lambda: history.list_runs(db, status="failed")),
            ("list_runs --name legal", lambda: history.list_runs(db, name="legal")),
            (f"list_runs (all {args.runs:,}, no target)",
             lambda: history.list_runs(db, limit=None)),
            ("show_report (runs show)", lambda: show_report(db, target[:8])),
            ("run_metrics (all series of one run)", lambda: history.run_metrics(db, target)),
            ("reconcile", lambda: history.reconcile(db)),
        ]:
            first, median = timed(fn, args.repeat)
            row(f"{label} first", first, "ms", TARGET_MS)
            row(f"{label} median", median, "ms", TARGET_MS)
        db.close()
        load = os.getloadavg()[0]
        print(f"zerotune as a subprocess (median of 5, includes Python start-up; "
              f"load average {load:.1f} on {os.cpu_count()} cores):")
        for label, cli_args, module, goal in [
            ("zerotune runs list", ["runs", "list"], "engine.cli", TARGET_MS),
            ("zerotune runs show ID", ["runs", "show", target[:8]], "engine.cli", TARGET_MS),
            ("runs list via engine.runs_cli alone", ["runs", "list"], "engine.runs_cli", None),
            (f"zerotune runs list --json --limit 0 (all {args.runs:,})",
             ["runs", "list", "--json", "--limit", "0"], "engine.cli", None),
        ]:
            wall, cpu = cli_ms(ws, cli_args, 5, module=module)
            row(f"{label} wall", wall, "ms", goal)
            row(f"{label} CPU", cpu, "ms", goal)
        print(f"device sampling every 2 s, over {args.window:g} s (% of one core):")
        pct, n = sampler_cpu(args.window)
        row(f"DeviceSampler alone ({n} samples, 4-process tree)", pct, "%", TARGET_CPU_PCT)
        pct, n = supervisor_cpu(ws, args.window)
        row(f"whole supervisor ({n} samples, 1 step/s)", pct, "%", TARGET_CPU_PCT)
    finally:
        if tmp is not None:
            time.sleep(1.0)  # let the stopped bench supervisor finish writing
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
