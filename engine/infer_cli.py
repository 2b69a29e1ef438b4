"""``zerotune infer``, ``zerotune chat`` and ``zerotune export``: using a trained model.

No torch at CLI start: the heavy work runs under the DeepSpeed launcher (infer) or is imported
inside the command (chat, export). stdout carries results; diagnostics go to stderr.
Exit codes: 0 ok, 1 the operation failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
MODES = ("deepspeed", "zero", "plain")


class InferCliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    print(f"zerotune: {msg}", file=sys.stderr, flush=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", default=argparse.SUPPRESS, metavar="DIR",
                        help="workspace holding runs/ (default: $ZEROTUNE_HOME or the current folder)")

    p = subparsers.add_parser(
        "infer", parents=[common], help="batch inference over a prompts file (DeepSpeed-Inference or ZeRO-Inference)",
        description="Generate for every prompt of a JSONL file with a run's model (RUN_ID) or a "
        "profile's model (PROFILE, a new run directory). Writes generations.jsonl in the run directory.")
    p.add_argument("target", metavar="RUN_ID|PROFILE")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="deepspeed: DeepSpeed-Inference (tensor parallel); zero: ZeRO-Inference "
                        "(parameter offload, prompts sharded); plain: model.generate "
                        "(default: the profile's inference.mode, else deepspeed)")
    p.add_argument("--prompts", type=Path, default=None, help="JSONL of {prompt: ...} or {messages: [...]}")
    p.add_argument("--gpus", type=int, default=None,
                   help="ranks (default: inference.tensor_parallel for deepspeed, else the profile's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_guarded(cmd_infer))

    p = subparsers.add_parser("chat", parents=[common], help="chat with a run's model in the terminal",
                              description="Type a message; the reply streams back. /reset starts "
                              "over, /exit leaves. Reads stdin, so it can be piped.")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--checkpoint", type=int, default=None, metavar="N")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=_guarded(cmd_chat))

    p = subparsers.add_parser("export", parents=[common], help="a Hugging Face model directory from a run",
                              description="Save a run's final model (or a checkpoint) as safetensors "
                              "with its tokenizer; ZeRO-3 shards are consolidated.")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base model")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: the run's training precision")
    p.add_argument("--checkpoint", type=int, default=None, metavar="N", help="export checkpoint-N")
    p.add_argument("--out", type=Path, default=None, help="default: runs/<id>/export")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(cmd_export))


def _guarded(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args) or 0)
        except InferCliError as exc:
            _err(str(exc))
            return exc.code
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            return EXIT_OK
        except Exception as exc:  # a one-line reason, never a traceback
            from engine.problems import ProfileError

            if isinstance(exc, ProfileError):
                raise
            try:
                from engine.history import HistoryError
                if isinstance(exc, HistoryError):
                    _err(str(exc))
                    return EXIT_BAD_INPUT
            except ImportError:
                pass
            from engine.run_model import ModelNotFound

            if isinstance(exc, ModelNotFound):
                _err(str(exc))
                return EXIT_BAD_INPUT
            if os.environ.get("ZEROTUNE_DEBUG"):
                import traceback

                traceback.print_exc()
            _err(f"{type(exc).__name__}: {exc}")
            return EXIT_FAILED

    run.__name__ = handler.__name__
    return run


# --------------------------------------------------------------------------------------------
# Targets


def _workspace(args: argparse.Namespace) -> Path:
    from engine.workspace import resolve_workspace

    return resolve_workspace(getattr(args, "workspace", None))


def run_row(args: argparse.Namespace, run_id: str) -> dict[str, Any]:
    from engine import history
    from engine.workspace import db_path

    path = db_path(_workspace(args))
    if not path.exists():
        raise InferCliError(f"no run history in {_workspace(args)}; RUN_ID must be a run of this workspace")
    db = history.open_db(path)
    try:
        return history.get_run(db, run_id)
    finally:
        db.close()


def run_dir_of(args: argparse.Namespace, run_id: str) -> tuple[Path, dict[str, Any]]:
    row = run_row(args, run_id)
    rd = Path(row["run_dir"]) if row.get("run_dir") else None
    if rd is None or not rd.exists():
        raise InferCliError(f"the run directory of {row['id']} is gone")
    return rd, row


def _is_profile(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) and Path(target).is_file()


# --------------------------------------------------------------------------------------------
# infer


def inference_command(lp, run_dir: Path, mode: str, gpus: int, engine_args: list[str]):
    """The launcher command of engine.infer: the training command with the inference module."""
    from engine.dsconfig import resolve_placement
    from engine.launcher import build_command

    pl = replace(resolve_placement(lp), gpus_per_node=gpus, num_nodes=1)
    return build_command(lp, pl, run_dir, engine_args=["--mode", mode, *engine_args]).with_module("engine.infer")


def cmd_infer(args: argparse.Namespace) -> int:
    from engine.profile import load_profile

    recorded_run: dict[str, Any] | None = None
    engine_args: list[str] = []
    if _is_profile(args.target):
        from engine.runner import new_run_id
        from engine.workspace import runs_dir

        lp = load_profile(Path(args.target), check_data=False)
        p = lp.profile
        if p.model.init == "scratch":
            raise InferCliError("the profile's model is init: scratch (random weights); "
                                "infer with the RUN_ID of a run that trained it")
        from engine.profile import resolved_paths

        run_dir = (runs_dir(_workspace(args)) / new_run_id()).resolve()
        run_dir.mkdir(parents=True)
        (run_dir / "profile.yaml").write_text(resolved_paths(lp).to_yaml())
        engine_args += ["--model-dir", str(resolved_paths(lp).model.path)]
    else:
        run_dir, recorded_run = run_dir_of(args, args.target)
        lp = load_profile(run_dir / "profile.yaml", check_data=False, check_model=False)
        p = lp.profile
    prompts = args.prompts or (Path(p.inference.prompts) if p.inference.prompts else None)
    if prompts is None:
        raise InferCliError("no prompts: pass --prompts FILE or set inference.prompts in the profile")
    if not Path(prompts).is_file():
        raise InferCliError(f"prompts file not found: {prompts}")
    mode = args.mode or (p.inference.mode if p.inference.mode != "none" else "deepspeed")
    gpus = args.gpus or (p.inference.tensor_parallel if mode == "deepspeed" else None)
    if gpus is None:
        from engine.dsconfig import resolve_placement

        gpus = resolve_placement(lp).gpus_per_node
    engine_args += ["--prompts", str(Path(prompts).resolve())]
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--dtype", args.dtype)):
        if value is not None:
            engine_args += [flag, str(value)]
    cmd = inference_command(lp, run_dir, mode, gpus, engine_args)
    (run_dir / "infer_command.txt").write_text(cmd.shell() + "\n")
    events_path = run_dir / "events.jsonl"
    offset = events_path.stat().st_size if events_path.exists() else 0
    _err(f"{mode} inference on {gpus} rank(s) in {run_dir}")
    log_path = run_dir / "infer.log"
    with open(log_path, "ab") as log:
        proc = subprocess.run(cmd.run_argv, env={**os.environ, **cmd.env}, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    new_events = _events_after(events_path, offset)
    summary = next((e for e in reversed(new_events) if e["event"] == "infer"), None)
    if proc.returncode != 0 or summary is None:
        err = next((e for e in reversed(new_events) if e["event"] == "error"), None)
        reason = err["reason"] if err else f"the launcher exited with {proc.returncode}"
        raise InferCliError(f"inference failed: {reason} (log: {log_path})", EXIT_FAILED)
    if recorded_run is not None:
        _record(args, recorded_run, new_events)
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), **summary}, default=str))
    else:
        print(format_summary(summary))
    return EXIT_OK


def _events_after(path: Path, offset: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read().decode("utf-8", "replace")
    out = []
    for line in chunk.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _record(args: argparse.Namespace, run: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """A finished run has no supervisor tailing its events any more: add them to history."""
    from engine import history
    from engine.workspace import db_path

    if run.get("status") not in history.FINAL_STATUSES:
        return  # the live supervisor records them
    try:
        db = history.open_db(db_path(_workspace(args)))
        try:
            rec = history.RunRecorder(db, run["id"])
            rec.add_events(events)
            rec.flush()
        finally:
            db.close()
    except Exception as exc:  # the outputs are on disk either way
        _err(f"warning: could not record the inference in history: {exc}")


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f} ms"


def format_summary(s: dict[str, Any]) -> str:
    mem = "host RSS" if s.get("peak_mem_kind") == "host_rss" else "GPU allocated"
    lines = [
        f"mode          {s['mode']} on {s['world_size']} rank(s)"
        + ("  (fused kernels)" if s.get("kernel_inject") else ""),
        f"prompts       {s['prompts']}  tokens in {s['tokens_in']}  out {s['tokens_out']}",
        f"speed         {s['tokens_per_s']:.1f} tokens/s over {s['seconds']:.2f} s",
        f"latency       p50 {_ms(s.get('latency_p50_s'))}  p95 {_ms(s.get('latency_p95_s'))} per batch",
        f"peak memory   {_mb(s.get('peak_mem_bytes'))} ({mem})",
        f"outputs       {s.get('generations')}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# chat and export


def cmd_chat(args: argparse.Namespace) -> int:
    run_dir, _ = run_dir_of(args, args.run_id)
    from engine.chat import ChatSettings, chat_loop, stdin_lines
    from engine.export import training_dtype
    from engine.run_model import load_run_model

    interactive = sys.stdin.isatty()
    _err(f"loading the model of {run_dir.name}...")
    with contextlib.redirect_stdout(sys.stderr):  # library logs (DeepSpeed's) stay off stdout
        model, tok, _ = load_run_model(run_dir, training_dtype(run_dir), checkpoint=args.checkpoint)
    settings = ChatSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, system=args.system,
                            max_context=getattr(model.config, "max_position_embeddings", None))
    if settings.max_context:
        settings.max_context = max(settings.max_context - args.max_new_tokens, 8)
    chat_loop(model, tok, stdin_lines(interactive), sys.stdout, settings,
              note=lambda m: print(m, file=sys.stderr, flush=True), interactive=interactive)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    run_dir, _ = run_dir_of(args, args.run_id)
    from engine.export import ExportError, export_model

    out = args.out or (run_dir / "export")
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library logs (DeepSpeed's) stay off stdout
            info = export_model(run_dir, out, merge_lora=args.merge_lora, dtype=args.dtype,
                                checkpoint=args.checkpoint)
    except ExportError as exc:
        raise InferCliError(str(exc)) from None
    if info.get("note"):
        _err(f"note: {info['note']}")
    _err(f"exported {info['kind']} model ({info['dtype']}) in {time.time() - t0:.1f} s")
    if args.json:
        print(json.dumps({"out": str(out.resolve()), **info}))
    else:
        print(out.resolve())
    return EXIT_OK
