"""``zerotune data inspect FILE`` and ``zerotune data prep PROFILE``.

``inspect`` measures a data set without changing it: rows, characters and tokens (percentiles
and a histogram), exact and near duplicates, personal data and secrets by type (masked), rows
longer than max_seq_len, label balance, malformed rows with file and line. ``prep`` runs the
profile's ``data.prep`` steps, caches the result by fingerprint and prints what each step
removed or changed.

stdout carries the report (``--json``: one JSON object); progress and diagnostics go to stderr.
Exit codes: 0 done, 1 failed, 2 bad input (a missing file, bad rows with
``on_bad_rows: fail``, a format that does not fit, bad arguments). Nothing heavy is imported
until a command runs, and a tokenizer only when one is asked for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
FORMATS = ("auto", "text", "prompt_completion", "messages", "preference")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` verb group; each leaf sets ``func(args) -> int`` (the exit code)."""
    data = subparsers.add_parser("data", help="inspect and prepare training data",
                                 description="Look at a data set before training on it, and "
                                 "prepare it as a profile says.")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: _usage(data))

    p = sub.add_parser("inspect", help="rows, lengths, duplicates, personal data, labels, bad rows",
                       description="Measure a data file (or folder) without changing it.")
    p.add_argument("files", nargs="+", metavar="FILE", help="data file(s) or folder(s)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="row shape (default: detected)")
    p.add_argument("--method", choices=("cpt", "sft", "dpo"), default=None,
                   help="check the data against this method (default: follow the format)")
    p.add_argument("--column", dest="columns", action="append", default=[], metavar="KEY=NAME",
                   help="map an expected column to yours, e.g. --column prompt=question (repeatable)")
    p.add_argument("--text-split", choices=("file", "blank_lines"), default="file",
                   help=".txt/.md: one document per file, or documents split by blank lines")
    p.add_argument("--label", default=None, metavar="COLUMN", help="show the balance of this column")
    p.add_argument("--max-seq-len", type=int, default=1024, metavar="N",
                   help="count rows longer than N tokens (default 1024)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer for exact token counts: a folder with tokenizer.json, the file, "
                        "or a model already in the local cache; without it tokens are estimated as "
                        "characters/4")
    p.add_argument("--threshold", type=float, default=0.85,
                   help="Jaccard similarity for near-duplicates (default 0.85)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: by size)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_guarded(cmd_inspect))

    p = sub.add_parser("prep", help="prepare a profile's data (cached) and report each step",
                       description="Run the profile's data.prep steps and write the prepared "
                       "train/validation files (cached by a fingerprint of the data and settings).")
    p.add_argument("profile", type=Path, help="run profile (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value, e.g. --set data.prep.dedup=true (repeatable)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="also copy train.jsonl, validation.jsonl and report.json here")
    p.add_argument("--workspace", default=argparse.SUPPRESS, metavar="DIR",
                   help="workspace whose runs/.cache/data holds prepared data (default: "
                        "$ZEROTUNE_HOME or the current directory)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: by size)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_guarded(cmd_prep))
    return data


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_BAD_INPUT


def _guarded(fn):
    """Data and preparation problems are bad input (exit 2) with a located message."""

    def run(args: argparse.Namespace) -> int:
        from engine.data_formats import DataError
        from engine.data_prep import PrepError

        try:
            return fn(args)
        except DataError as exc:
            _err(f"error: {exc}")
            return EXIT_BAD_INPUT
        except PrepError as exc:
            _err(f"error: {exc}")
            return EXIT_BAD_INPUT
        except MemoryError:
            _err("error: out of memory while reading the data (a huge JSON file? use JSON lines)")
            return EXIT_FAILED

    return run


def _progress(enabled: bool):
    if not enabled:
        return None

    def show(rows: int) -> None:
        print(f"\r  {rows:,} rows", end="", file=sys.stderr, flush=True)

    return show


def _print_report(report, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        print(json.dumps({**report.to_dict(), **(extra or {})}, indent=2))
    else:
        print(report.render())


def cmd_inspect(args: argparse.Namespace) -> int:
    from engine.data_prep import PrepSettings, inspect

    for f in args.files:
        if not f.startswith("hf:") and not Path(f).exists():
            _err(f"error: {f}: file not found")
            return EXIT_BAD_INPUT
    columns: dict[str, str] = {}
    for item in args.columns:
        key, sep, name = item.partition("=")
        if not sep or not key or not name:
            _err(f"error: --column {item!r}: expected KEY=NAME, e.g. --column prompt=question")
            return EXIT_BAD_INPUT
        columns[key.strip()] = name.strip()
    if not 0 < args.threshold <= 1:
        _err("error: --threshold: expected a number in (0, 1], e.g. 0.85")
        return EXIT_BAD_INPUT
    settings = PrepSettings(
        train=list(args.files), method=args.method, format=args.format, columns=columns,
        text_split=args.text_split, on_bad_rows="skip", label_column=args.label,
        near_dedup_threshold=args.threshold, max_seq_len=args.max_seq_len,
        tokenizer=args.tokenizer, workers=args.workers,
    )
    report = inspect(settings, progress=_progress(sys.stderr.isatty() and not args.json))
    if sys.stderr.isatty() and not args.json:
        print(file=sys.stderr)
    _print_report(report, args.json)
    return EXIT_OK


def cmd_prep(args: argparse.Namespace) -> int:
    from engine.data_prep import PrepSettings, prepare
    from engine.profile import load_profile
    from engine.workspace import resolve_workspace

    lp = load_profile(args.profile, args.overrides, check_data=False, check_model=False)
    for w in lp.warnings:
        _err(f"warning: {w}")
    settings = PrepSettings.from_profile(lp)
    settings.workers = args.workers
    ws = resolve_workspace(getattr(args, "workspace", None))
    prepared = prepare(settings, ws, progress=_progress(sys.stderr.isatty() and not args.json))
    if sys.stderr.isatty() and not args.json:
        print(file=sys.stderr)
    report = prepared.report
    if prepared.cached:
        _err(f"prepared data found in the cache ({prepared.fingerprint}): nothing to do")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "validation.jsonl", "report.json"):
            shutil.copyfile(prepared.directory / name, args.out / name)
        report.outputs = {"train": str(args.out / "train.jsonl"),
                          "validation": str(args.out / "validation.jsonl")}
    _print_report(report, args.json, {"directory": str(prepared.directory)})
    return EXIT_OK
