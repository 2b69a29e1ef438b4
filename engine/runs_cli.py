"""``zerotune runs ...``: list, show, follow, stop, resume, re-run, compare and delete runs.

Presentation only: every figure comes from :mod:`engine.history` and every action from
:mod:`engine.supervisor` / :mod:`engine.runner`. stdout carries results (tables, or JSON with
``--json``), diagnostics go to stderr. Exit codes: 0 ok, 1 the operation failed, 2 bad input.
Importing this module never loads torch, deepspeed, transformers, trl or datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from engine import history
from engine.workspace import db_path, resolve_workspace

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Parser


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``runs`` verb group; each leaf sets ``func(args) -> int`` (the exit code)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: do not clobber a --workspace given before the verb (zerotune --workspace X runs)
    common.add_argument("--workspace", default=argparse.SUPPRESS, metavar="DIR",
                        help="workspace holding runs/ (default: $ZEROTUNE_HOME or the current "
                             "directory)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON to stdout")
    stall = argparse.ArgumentParser(add_help=False)
    stall.add_argument("--stall-minutes", type=float, default=None, metavar="N",
                       help="show a running run as stalled after N minutes without an event "
                            f"(default: ${history.STALL_ENV} or {history.STALL_MINUTES_DEFAULT:g})")

    runs = subparsers.add_parser(
        "runs", help="list, inspect, stop, resume and compare runs",
        description="The run history of a workspace. IDs accept unique prefixes.",
    )
    sub = runs.add_subparsers(dest="runs_command", metavar="COMMAND")
    runs.set_defaults(func=lambda args: _usage(runs))

    p = sub.add_parser("list", parents=[common, as_json, stall], help="runs, newest first")
    p.add_argument("--status", choices=history.STATUSES, help="only runs with this status")
    p.add_argument("--name", help="only runs whose name contains this text")
    p.add_argument("--limit", type=int, default=50, help="at most N runs (default 50; 0: all)")
    p.set_defaults(func=_guarded(cmd_list))

    p = sub.add_parser("show", parents=[common, as_json, stall],
                       help="one run: profile summary, status, reason, losses, memory")
    p.add_argument("id", help="run id or unique prefix")
    p.set_defaults(func=_guarded(cmd_show))

    p = sub.add_parser("logs", parents=[common], help="print a run's engine.log")
    p.add_argument("id", help="run id or unique prefix")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the run ends")
    p.add_argument("--supervisor", action="store_true", help="print supervisor.log instead")
    p.set_defaults(func=_guarded(cmd_logs))

    p = sub.add_parser("stop", parents=[common],
                       help="stop a run gracefully (checkpoint first); --kill for a hung run")
    p.add_argument("id", help="run id or unique prefix")
    p.add_argument("--kill", action="store_true", help="SIGKILL the engine: no checkpoint")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the run to end")
    p.set_defaults(func=_guarded(cmd_stop))

    p = sub.add_parser("resume", parents=[common],
                       help="continue a run from its newest complete checkpoint, as a new run")
    p.add_argument("id", help="run id or unique prefix")
    p.set_defaults(func=_guarded(cmd_resume))

    p = sub.add_parser("rerun", parents=[common], help="start the same frozen profile again")
    p.add_argument("id", help="run id or unique prefix")
    p.set_defaults(func=_guarded(cmd_rerun))

    p = sub.add_parser("compare", parents=[common, as_json],
                       help="profile differences and results of two runs side by side")
    p.add_argument("id1", help="run id or unique prefix")
    p.add_argument("id2", help="run id or unique prefix")
    p.add_argument("--all", action="store_true", help="list equal profile keys too")
    p.set_defaults(func=_guarded(cmd_compare))

    p = sub.add_parser("delete", parents=[common],
                       help="delete a run's history rows (and with --remove-dir its directory)")
    p.add_argument("id", help="run id or unique prefix")
    p.add_argument("--remove-dir", action="store_true", help="also delete the run directory")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=_guarded(cmd_delete))
    return runs


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The handler with errors turned into one-line messages and exit codes, never tracebacks."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args) or 0)
        except history.RunActive as exc:
            _err(str(exc))
            return EXIT_FAILED
        except history.HistoryError as exc:  # unknown / ambiguous id, bad status
            _err(str(exc))
            return EXIT_BAD_INPUT
        except CliError as exc:
            _err(str(exc))
            return exc.code
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # `zerotune runs list | head`
            return EXIT_OK
        except sqlite3.Error as exc:
            _err(f"history database error: {exc}")
            return EXIT_FAILED

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def run_command(args: argparse.Namespace) -> int:
    """Run the handler the parser chose; returns the exit code."""
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.runs_cli runs ...`` (the same verbs without the zerotune entry)."""
    parser = argparse.ArgumentParser(prog="zerotune")
    parser.add_argument("--workspace", metavar="DIR", help=argparse.SUPPRESS)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args)


# --------------------------------------------------------------------------------------------
# Helpers


def _err(message: str) -> None:
    print(f"zerotune: {message}", file=sys.stderr)


def _workspace(args: argparse.Namespace) -> Path:
    return resolve_workspace(getattr(args, "workspace", None))


def _open(args: argparse.Namespace, must_exist: bool = True):
    ws = _workspace(args)
    path = db_path(ws)
    if must_exist and not path.exists():
        raise CliError(f"no run history in {ws} (no {path}); start a run with `zerotune run`",
                       EXIT_BAD_INPUT)
    db = history.open_db(path)
    try:
        history.reconcile(db)
    except Exception as exc:
        _err(f"warning: could not reconcile runs: {exc}")
    return db


def _print_json(value: Any) -> None:
    # One write: json.dump streams thousands of small writes, 10x slower into a pipe.
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def fmt_time(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _duration_of(run: dict[str, Any]) -> float | None:
    if run.get("wall_time") is not None:
        return run["wall_time"]
    start = run.get("started_at")
    if start is None:
        return None
    return (run.get("ended_at") or time.time()) - start


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in cells]
    return "\n".join(lines)


def _steps(run: dict[str, Any]) -> str:
    last, total = run.get("last_step"), run.get("total_steps")
    if last is None and total is None:
        return "-"
    return f"{last if last is not None else 0}/{total}" if total else str(last)


def _method(run: dict[str, Any]) -> str:
    method = run.get("method") or "-"
    if run.get("adapter") and run["adapter"] != "none":
        method += f"+{run['adapter']}"
    if run.get("zero_stage") is not None:
        method += f" z{run['zero_stage']}"
    return method


def load_profile(run: dict[str, Any]) -> dict[str, Any] | None:
    """The frozen profile.yaml of a run, parsed; None when missing or unreadable."""
    run_dir = history.run_dir_of(run)
    if run_dir is None:
        return None
    path = run_dir / "profile.yaml"
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, ImportError) as exc:
        if not isinstance(exc, FileNotFoundError):
            _err(f"warning: cannot read {path}: {exc}")
        return None
    except Exception as exc:
        _err(f"warning: cannot read {path}: {exc}")
        return None
    return data if isinstance(data, dict) else None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists stay values (compared whole)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        if not value and prefix:
            out[prefix] = {}
        return out
    return {prefix: value}


def _show_value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    if v is None:
        return "null"
    return str(v)


# --------------------------------------------------------------------------------------------
# Commands


def cmd_list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise CliError("--limit must be 0 (all) or more", EXIT_BAD_INPUT)
    path = db_path(_workspace(args))
    if not path.exists():
        runs: list[dict[str, Any]] = []
    else:
        db = _open(args)
        runs = history.list_runs(db, status=args.status, name=args.name,
                                 limit=args.limit or None, stall_minutes=args.stall_minutes)
    if args.json:
        _print_json(runs)
        return EXIT_OK
    if not runs:
        _err("no runs" + (" match" if args.status or args.name else " yet"))
        return EXIT_OK
    rows = []
    for r in runs:
        rows.append([
            r["id"], r.get("name") or "-", r["status"], _method(r), _steps(r),
            fmt_num(r.get("final_loss")), fmt_num(r.get("best_eval_loss")),
            fmt_num(r.get("tokens_per_s")), fmt_time(r.get("created_at")),
            fmt_duration(_duration_of(r)),
        ])
    print(table(["ID", "NAME", "STATUS", "METHOD", "STEP", "LOSS", "BEST EVAL", "TOK/S",
                 "CREATED", "TIME"], rows))
    return EXIT_OK


PROFILE_SUMMARY_KEYS = (
    "model.path", "model.dtype", "data.train", "data.format", "data.max_seq_len",
    "method.kind", "method.adapter", "method.lora.r", "training.epochs", "training.max_steps",
    "training.micro_batch_size", "training.grad_accum", "training.lr", "training.scheduler",
    "deepspeed.zero_stage", "deepspeed.offload_optimizer", "deepspeed.offload_param",
    "resources.launcher", "resources.num_nodes", "resources.gpus_per_node", "inference.mode",
)


def show_report(db, run_id: str, stall_minutes: float | None = None) -> dict[str, Any]:
    """Everything ``runs show`` prints, as one dict (the --json output)."""
    run = history.get_run(db, run_id, stall_minutes=stall_minutes)
    profile = load_profile(run)
    warnings = [e["payload"].get("message") for e in
                history.run_events(db, run["id"], kinds=["warning"], limit=50)]
    estimate = None
    if run.get("estimate"):
        try:
            estimate = json.loads(run["estimate"])
        except ValueError:
            estimate = run["estimate"]
    evaluation = [e["payload"] for e in history.run_events(db, run["id"], kinds=["eval"])
                  if isinstance(e["payload"], dict) and e["payload"].get("evaluation")]
    inference = [e["payload"] for e in history.run_events(db, run["id"], kinds=["infer"])]
    return {
        "run": run,
        "profile": profile,
        "estimate": estimate,
        "metrics": history.metric_summary(db, run["id"]),
        "devices": history.device_summary(db, run["id"]),
        "children": history.run_children(db, run["id"]),
        "warnings": warnings,
        "evaluation": evaluation[-1] if evaluation else None,
        "inference": inference[-1] if inference else None,
    }


def cmd_show(args: argparse.Namespace) -> int:
    db = _open(args)
    report = show_report(db, args.id, stall_minutes=args.stall_minutes)
    if args.json:
        _print_json(report)
        return EXIT_OK
    r = report["run"]
    lines: list[tuple[str, str]] = []
    add = lines.append
    add(("run", f"{r['id']}  {r.get('name') or ''}".rstrip()))
    status = r["status"]
    if status == "stalled":
        status += f" (no event since {fmt_time(r.get('last_event_at') or r.get('started_at'))})"
    add(("status", status + (f": {r['reason']}" if r.get("reason") else "")))
    if r.get("exit_code") is not None:
        add(("exit code", str(r["exit_code"])))
    method = f"{r.get('method') or '-'}, adapter {r.get('adapter') or '-'}, " \
             f"ZeRO stage {r.get('zero_stage') if r.get('zero_stage') is not None else '-'}, " \
             f"world size {r.get('world_size') or '-'}"
    add(("method", method))
    add(("model", r.get("model") or "-"))
    add(("created", f"{fmt_time(r.get('created_at'))}   ran {fmt_duration(_duration_of(r))}"
                    + (f"   ended {fmt_time(r['ended_at'])}" if r.get("ended_at") else "")))
    add(("steps", _steps(r)))
    last = "final" if r["recorded_status"] in history.FINAL_STATUSES else "latest"
    loss = (f"{last} {fmt_num(r.get('final_loss'))}   eval {fmt_num(r.get('final_eval_loss'))}"
            f"   best eval {fmt_num(r.get('best_eval_loss'))}"
            f"   perplexity {fmt_num(r.get('perplexity'))}")
    add(("loss", loss))
    add(("speed", f"{fmt_num(r.get('tokens_per_s'))} tokens/s"))
    add(("gpu memory", _measured_vs_estimate(r.get("peak_gpu_mem_bytes"),
                                             r.get("est_peak_gpu_bytes"), "peak")))
    host = _measured_vs_estimate(r.get("peak_host_hwm_bytes") or r.get("peak_host_rss_bytes"),
                                 r.get("est_peak_host_bytes"),
                                 "peak RSS" if r.get("peak_host_hwm_bytes") else "sampled peak RSS")
    if r.get("peak_host_hwm_bytes"):
        host += f"   (sampled every {r.get('sample_interval') or 2:g}s: " \
                f"{fmt_bytes(r.get('peak_host_rss_bytes'))})"
    add(("host memory", host))
    if r.get("mean_gpu_util") is not None:
        add(("gpu util", f"mean {r['mean_gpu_util']:.0f}%   peak {r['peak_gpu_util']:.0f}%"))
    if r.get("mean_cpu_percent") is not None:
        cpu = f"mean {r['mean_cpu_percent']:.0f}%   peak {r['peak_cpu_percent']:.0f}%"
        add(("cpu", cpu + " (100% = one core)"))
    if r.get("last_checkpoint"):
        add(("checkpoint", r["last_checkpoint"]))
    if r.get("parent_run_id"):
        add(("lineage", f"{r.get('relation') or 'child'} of {r['parent_run_id']}"))
    for child in report["children"]:
        add(("lineage", f"{child.get('relation') or 'child'}: {child['id']} ({child['status']})"))
    add(("profile hash", r.get("profile_hash") or "-"))
    add(("run dir", r.get("run_dir") or "-"))
    profile = report["profile"]
    if profile:
        flat = flatten(profile)
        adapter = flat.get("method.adapter")
        for key in PROFILE_SUMMARY_KEYS:
            if key.startswith("method.lora.") and adapter in (None, "none"):
                continue
            if key in flat and flat[key] is not None:
                add((f"  {key}", _show_value(flat[key])))
    if report["warnings"]:
        add(("warnings", f"{r.get('warnings') or len(report['warnings'])}"))
        for w in report["warnings"][:5]:
            add(("", str(w)))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    if report["metrics"]:
        print()
        rows = [[name, fmt_num(m["last"]), fmt_num(m["min"]), fmt_num(m["max"]),
                 m["last_step"] if m["last_step"] is not None else "-", m["count"]]
                for name, m in report["metrics"].items()]
        print(table(["METRIC", "LAST", "MIN", "MAX", "STEP", "POINTS"], rows))
    _print_evaluation(report.get("evaluation"), report.get("inference"))
    if report["devices"]:
        print()
        rows = []
        for d in report["devices"]:
            util = "-" if d["mean_util"] is None else f"{d['mean_util']:.0f}%/{d['peak_util']:.0f}%"
            rows.append([d["device"], d["samples"], util, fmt_bytes(d["peak_proc_mem"]),
                         fmt_bytes(d["peak_mem_used"]), fmt_bytes(d["mem_total"]),
                         fmt_num(d["mean_power_w"]), fmt_num(d["peak_temp_c"])])
        print(table(["DEVICE", "SAMPLES", "UTIL MEAN/PEAK", "RUN PEAK", "USED PEAK", "TOTAL",
                     "POWER W", "TEMP C"], rows))
    return EXIT_OK


def _print_evaluation(evaluation: dict[str, Any] | None, inference: dict[str, Any] | None) -> None:
    """Held-out evaluation (base vs tuned) and the latest batch inference, when recorded."""
    if evaluation:
        print()
        print(f"evaluation on {evaluation.get('heldout_rows', '?')} held-out rows")
        rows = []
        for m in evaluation["evaluation"]:
            delta = m.get("delta")
            better = None if delta is None else (delta > 0) == bool(m.get("higher_is_better", True))
            mark = "" if delta is None or delta == 0 else ("  better" if better else "  worse")
            rows.append([m["name"], fmt_num(m.get("base")), fmt_num(m.get("tuned")),
                         ("-" if delta is None else f"{delta:+.4g}") + mark])
        print(table(["METRIC", "BASE", "TUNED", "DIFFERENCE"], rows))
    if inference:
        print()
        mem = "host RSS" if inference.get("peak_mem_kind") == "host_rss" else "GPU"
        p50, p95 = inference.get("latency_p50_s"), inference.get("latency_p95_s")
        print(f"inference  {inference.get('mode')} on {inference.get('world_size')} rank(s), "
              f"{inference.get('prompts')} prompts: {fmt_num(inference.get('tokens_per_s'))} tokens/s, "
              f"latency p50 {fmt_num(None if p50 is None else p50 * 1000)} ms "
              f"p95 {fmt_num(None if p95 is None else p95 * 1000)} ms, "
              f"peak {fmt_bytes(inference.get('peak_mem_bytes'))} ({mem})")
        if inference.get("generations"):
            print(f"           {inference['generations']}")


def _measured_vs_estimate(measured: float | None, estimated: float | None, label: str) -> str:
    text = f"{label} {fmt_bytes(measured)}"
    if estimated:
        text += f"   estimated {fmt_bytes(estimated)}"
        if measured:
            text += f"   ({(measured - estimated) / estimated:+.0%})"
    return text


def _follow_file(path: Path, still_running: Callable[[], bool], poll: float = 0.5) -> None:
    offset = 0
    checked = time.monotonic()
    running = True
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if not running:
            return
        if time.monotonic() - checked >= 1.0:
            checked = time.monotonic()
            running = still_running()  # one more read after the end, then stop
            continue
        time.sleep(poll)


def cmd_logs(args: argparse.Namespace) -> int:
    db = _open(args)
    run = history.get_run(db, args.id)
    run_dir = history.run_dir_of(run)
    if run_dir is None:
        raise CliError(f"run {run['id']} has no run directory recorded")
    path = run_dir / ("supervisor.log" if args.supervisor else "engine.log")
    if not args.follow:
        if not path.exists():
            raise CliError(f"{path} does not exist (has the run started?)")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 16), b""):
                sys.stdout.write(block.decode("utf-8", errors="replace"))
        sys.stdout.flush()
        return EXIT_OK
    run_id = run["id"]
    last_reconcile = [time.monotonic()]

    def still_running() -> bool:
        if time.monotonic() - last_reconcile[0] > 5.0:
            last_reconcile[0] = time.monotonic()
            history.reconcile(db)
        row = history.get_run(db, run_id)
        return row["recorded_status"] in history.ACTIVE_STATUSES

    _follow_file(path, still_running)
    final = history.get_run(db, run_id)
    _err(f"run {run_id} {final['status']}" + (f": {final['reason']}" if final.get("reason") else ""))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from engine.supervisor import NotRunning, stop

    db = _open(args)
    run = history.get_run(db, args.id)
    if run["recorded_status"] not in history.ACTIVE_STATUSES:
        raise CliError(f"run {run['id']} is not running (status: {run['status']})")
    try:
        what = stop(run, kill=args.kill)
    except NotRunning as exc:
        raise CliError(str(exc)) from exc
    except PermissionError as exc:
        raise CliError(f"not allowed to signal run {run['id']}: {exc}") from exc
    _err(f"run {run['id']}: {what}")
    if args.wait > 0:
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            row = history.get_run(db, run["id"])
            if row["recorded_status"] not in history.ACTIVE_STATUSES:
                print(f"{row['id']} {row['status']}" + (f": {row['reason']}" if row.get("reason") else ""))
                return EXIT_OK
            time.sleep(0.5)
            history.reconcile(db)
        raise CliError(f"run {run['id']} still running after {args.wait:g}s")
    return EXIT_OK


def _lineage(args: argparse.Namespace, fn_name: str) -> int:
    db = _open(args)
    run = history.get_run(db, args.id)
    db.close()
    try:
        from engine import runner

        fn = getattr(runner, fn_name)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"`runs {fn_name.split('_')[0]}` is not available: {exc}") from exc
    try:
        result = fn(_workspace(args), run["id"])
    except (history.HistoryError, CliError):
        raise
    except Exception as exc:  # the runner explains refusals (incomplete checkpoint, ...)
        raise CliError(str(exc) or type(exc).__name__) from exc
    if result is not None:
        new_id = getattr(result, "run_id", result)
        print(new_id)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    return _lineage(args, "resume_run")


def cmd_rerun(args: argparse.Namespace) -> int:
    return _lineage(args, "rerun_run")


COMPARE_FIELDS = (
    "status", "reason", "method", "adapter", "zero_stage", "world_size", "model", "last_step",
    "total_steps", "final_loss", "final_eval_loss", "best_eval_loss", "perplexity",
    "tokens_per_s", "wall_time", "peak_gpu_mem_bytes", "est_peak_gpu_bytes",
    "peak_host_rss_bytes", "peak_host_hwm_bytes", "est_peak_host_bytes", "mean_gpu_util",
    "mean_cpu_percent",
    "profile_hash", "data_fingerprint",
)


def compare_report(db, id1: str, id2: str, include_equal: bool = False) -> dict[str, Any]:
    """Profile key differences and results of two runs (the --json output of compare)."""
    a, b = history.get_run(db, id1), history.get_run(db, id2)
    pa, pb = flatten(load_profile(a) or {}), flatten(load_profile(b) or {})
    missing = object()
    diff = []
    for key in sorted(set(pa) | set(pb)):
        va, vb = pa.get(key, missing), pb.get(key, missing)
        if va == vb and not include_equal:
            continue
        diff.append({"key": key, "a": None if va is missing else va,
                     "b": None if vb is missing else vb, "equal": va == vb,
                     "only_in": "a" if vb is missing else "b" if va is missing else None})
    summary = [{"name": f, "a": a.get(f), "b": b.get(f)} for f in COMPARE_FIELDS]
    ma, mb = history.metric_summary(db, a["id"]), history.metric_summary(db, b["id"])
    metrics = [
        {"name": name,
         "a_last": ma.get(name, {}).get("last"), "b_last": mb.get(name, {}).get("last"),
         "a_min": ma.get(name, {}).get("min"), "b_min": mb.get(name, {}).get("min")}
        for name in sorted(set(ma) | set(mb))
    ]
    return {"a": a["id"], "b": b["id"], "profiles_found": [bool(pa), bool(pb)],
            "profile_diff": diff, "summary": summary, "metrics": metrics}


def cmd_compare(args: argparse.Namespace) -> int:
    db = _open(args)
    report = compare_report(db, args.id1, args.id2, include_equal=args.all)
    if args.json:
        _print_json(report)
        return EXIT_OK
    a, b = report["a"], report["b"]
    for found, rid in zip(report["profiles_found"], (a, b), strict=True):
        if not found:
            _err(f"warning: no readable profile.yaml for run {rid}")
    print(f"profile ({a} vs {b})")
    if report["profile_diff"]:
        print(table(["KEY", a, b], [[d["key"], _show_value(d["a"]) if d["only_in"] != "b" else "(absent)",
                                     _show_value(d["b"]) if d["only_in"] != "a" else "(absent)"]
                                    for d in report["profile_diff"]]))
    else:
        print("  identical")
    print()
    rows = []
    for s in report["summary"]:
        fmt = fmt_bytes if s["name"].endswith("_bytes") else (
            fmt_duration if s["name"] == "wall_time" else fmt_num)
        rows.append([s["name"], fmt(s["a"]) if s["a"] is not None else "-",
                     fmt(s["b"]) if s["b"] is not None else "-"])
    for m in report["metrics"]:
        rows.append([f"{m['name']} (last)", fmt_num(m["a_last"]), fmt_num(m["b_last"])])
    print(table(["RESULT", a, b], rows))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    db = _open(args)
    run = history.get_run(db, args.id)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("refusing to delete without confirmation; add --yes", EXIT_BAD_INPUT)
        what = "its rows and its directory " + str(run.get("run_dir")) if args.remove_dir \
            else "its rows (the run directory stays)"
        sys.stderr.write(f"delete run {run['id']} ({run.get('name')}): {what}? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            _err("nothing deleted")
            return EXIT_FAILED
    counts = history.delete_run(db, run["id"], remove_dir=args.remove_dir)
    _err(f"deleted run {run['id']}: {counts['metrics']} metric rows, {counts['events']} events, "
         f"{counts['device_samples']} device samples"
         + (f"; removed {counts['removed_dir']}" if counts["removed_dir"] else ""))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
