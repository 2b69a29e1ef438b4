"""``zerotune``: the command line. Alone, it opens the TUI.

stdout carries results (tables, YAML, JSON with ``--json``); diagnostics go to stderr.
Exit codes: 0 success, 1 the run or operation failed, 2 bad input (profile, data, arguments).
Nothing heavy (torch, deepspeed, transformers, trl, datasets) is imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input that is not a profile problem; exit 2 with the message."""


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Profile commands
# --------------------------------------------------------------------------------------------


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", type=Path, help="run profile (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value, e.g. --set training.lr=1e-4 (repeatable)")


def _load(args: argparse.Namespace, **kw: Any):
    from engine.profile import load_profile

    return load_profile(args.profile, args.overrides, **kw)


def cmd_profile_validate(args: argparse.Namespace) -> int:
    lp = _load(args)
    for w in lp.warnings:
        _err(f"warning: {w}")
    p = lp.profile
    if args.json:
        print(json.dumps({"valid": True, "name": p.name, "warnings": lp.warnings}))
    else:
        print(f"{args.profile}: valid ({p.method.kind}, adapter {p.method.adapter}, "
              f"ZeRO-{p.deepspeed.zero_stage})")
    return EXIT_OK


def cmd_profile_show(args: argparse.Namespace) -> int:
    lp = _load(args, check_data=False, check_model=False)
    if args.json:
        print(json.dumps(lp.profile.to_dict(), indent=2))
    else:
        sys.stdout.write(lp.profile.to_yaml())
    return EXIT_OK


def _placement(args: argparse.Namespace, lp):
    from engine.dsconfig import resolve_placement

    pl = resolve_placement(lp)
    if getattr(args, "gpus", None):
        from dataclasses import replace

        pl = replace(pl, gpus_per_node=args.gpus)
    return pl


def cmd_profile_dsconfig(args: argparse.Namespace) -> int:
    from engine.dsconfig import build_ds_config

    lp = _load(args, check_data=False)
    print(json.dumps(build_ds_config(lp, _placement(args, lp)), indent=2))
    return EXIT_OK


def cmd_profile_command(args: argparse.Namespace) -> int:
    from engine.launcher import build_command
    from engine.workspace import resolve_workspace, runs_dir

    lp = _load(args, check_data=False)
    pl = _placement(args, lp)
    run_dir = runs_dir(resolve_workspace(args.workspace)) / "<run-id>"
    cmd = build_command(lp, pl, run_dir, node_rank=args.node_rank)
    if args.json:
        print(json.dumps({"argv": cmd.argv, "env": cmd.env, "exec_argv": cmd.run_argv}))
    else:
        print(cmd.shell())
        if pl.num_nodes > 1 and lp.profile.resources.no_ssh:
            _err(f"note: with no_ssh, run this on every node with --node_rank 0..{pl.num_nodes - 1} "
                 "(zerotune run PROFILE --node-rank K)")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from engine.attach import attach
    from engine.runner import start_run
    from engine.workspace import resolve_workspace

    lp = _load(args)
    ws = resolve_workspace(args.workspace)
    started = start_run(lp, ws, resume_from=args.resume_from, node_rank=args.node_rank,
                        run_id=args.run_id)
    for w in started.warnings:
        _err(f"warning: {w}")
    if args.detach:
        print(started.run_id)
        _err(f"started run {started.run_id} in {started.run_dir}; "
             f"follow it with: zerotune runs logs {started.run_id} -f")
        return EXIT_OK
    _err(f"run {started.run_id}: {started.run_dir}")
    return attach(ws, started.run_id, interactive=sys.stdin.isatty())


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerotune",
        description="Plan, run, watch and compare DeepSpeed fine-tuning runs. "
        "Without a command, opens the terminal UI.",
    )
    parser.add_argument("--workspace", default=None,
                        help="folder holding runs/ (default: $ZEROTUNE_HOME or the current folder)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tui", help="open the terminal UI")
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("run", help="start a run from a profile and follow it")
    _profile_args(p)
    p.add_argument("--detach", action="store_true", help="print the run id and return at once")
    p.add_argument("--resume-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint directory")
    p.add_argument("--node-rank", type=int, default=None,
                   help="multi-node with no_ssh: this node's rank (run once per node)")
    p.add_argument("--run-id", default=None, help="use this run id (multi-node: the same on every node)")
    p.set_defaults(func=cmd_run)

    prof = sub.add_parser("profile", help="validate and inspect run profiles")
    psub = prof.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    for name, func, helptext in (
        ("validate", cmd_profile_validate, "check a profile and its data; every problem at once"),
        ("show", cmd_profile_show, "the profile with every default filled in"),
        ("dsconfig", cmd_profile_dsconfig, "the fully resolved DeepSpeed JSON"),
        ("command", cmd_profile_command, "the exact launcher command"),
    ):
        p = psub.add_parser(name, help=helptext)
        _profile_args(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("dsconfig", "command"):
            p.add_argument("--gpus", type=int, default=None,
                           help="ranks per node to plan for (default: the profile's, or detected)")
        if name == "command":
            p.add_argument("--node-rank", type=int, default=None, help="multi-node: the node's rank")
        p.set_defaults(func=func)

    for module in ("engine.estimate_cli", "engine.runs_cli", "engine.data_cli", "engine.infer_cli"):
        _register(module, sub)
    return parser


def _register(module: str, sub: Any) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return  # that part of zerotune is not installed in this build
        raise
    mod.register(sub)


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from tui.app import main as tui_main
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("tui"):
            _err("the terminal UI is not part of this build yet; use the commands (zerotune --help)")
            return EXIT_FAILED
        raise
    return tui_main(workspace=args.workspace)


def _reconcile(args: argparse.Namespace) -> None:
    """Runs whose processes are gone become 'lost' before anything is shown."""
    try:
        from engine.history import open_db, reconcile
        from engine.workspace import db_path, resolve_workspace

        path = db_path(resolve_workspace(args.workspace))
        if path.exists():
            db = open_db(path)
            try:
                reconcile(db)
            finally:
                db.close()
    except Exception as exc:  # never block a command on bookkeeping
        _err(f"warning: could not check for lost runs: {exc}")


def main(argv: list[str] | None = None) -> int:
    from engine.problems import ProfileError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args.func = cmd_tui
    try:
        if args.command not in ("profile", "estimate", "data"):
            _reconcile(args)
        return int(args.func(args) or 0)
    except ProfileError as exc:
        _err(exc.report())
        return EXIT_BAD_INPUT
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        from engine.data_formats import DataError

        if isinstance(exc, DataError):
            _err(f"error: {exc}")
            return EXIT_BAD_INPUT
        try:
            from engine.history import HistoryError
        except ImportError:
            HistoryError = ()  # type: ignore[assignment]
        if isinstance(exc, HistoryError):
            _err(f"error: {exc}")
            return EXIT_BAD_INPUT
        if os.environ.get("ZEROTUNE_DEBUG"):
            traceback.print_exc()
        _err(f"error: {type(exc).__name__}: {exc}\n(set ZEROTUNE_DEBUG=1 for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
