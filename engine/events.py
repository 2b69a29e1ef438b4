"""The engine's event stream: JSON lines appended to ``runs/<id>/events.jsonl``.

Rank 0 of the engine is the only writer. The supervisor tails the file into the history
database; the CLI and TUI may tail it too. Every event is one JSON object on one line with at
least ``event`` (its kind) and ``t`` (unix time, float). Kinds and their fields:

- ``start``: world_size, method, adapter, zero_stage, model, total_steps, num_params,
  trainable_params, ds_config (the resolved DeepSpeed JSON), resumed_from (checkpoint or null)
- ``step``: step, total_steps, epoch, loss, lr, grad_norm, tokens_per_s, samples_per_s,
  tokens_seen, elapsed (seconds since start)
- ``eval``: step, eval_loss, perplexity, plus any other ``eval_*`` metric
- ``checkpoint``: step, path
- ``warning``: message
- ``stopped``: step, checkpoint (path or null)  -- after SIGTERM
- ``done``: summary {steps, final_loss, final_eval_loss, best_eval_loss, perplexity,
  tokens_per_s, wall_time, model_dir}
- ``error``: kind (oom|host_oom|bad_data|timeout|config|engine), reason (one line), step
- ``infer``: mode, world_size, prompts, tokens_in, tokens_out, tokens_per_s, latency_p50_s,
  latency_p95_s, peak_mem_bytes, peak_mem_kind, generations (path)  -- engine.infer

This module is pure Python and safe to import anywhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENT_KINDS = ("start", "step", "eval", "checkpoint", "warning", "stopped", "done", "error", "infer")


class EventWriter:
    """Appends events; each line is written with one ``write`` call and flushed."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def emit(self, event: str, /, **fields: Any) -> dict[str, Any]:
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {event!r}")
        record = {"event": event, "t": time.time(), **fields}
        self._fh.write(json.dumps(record, default=_json_default) + "\n")
        self._fh.flush()
        return record

    def close(self) -> None:
        self._fh.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


@dataclass
class EventTail:
    """Incremental reader of an events file.

    ``read_new()`` returns the complete events appended since the last call. A line without
    its newline yet (the writer is mid-write) is left for the next call; a complete line that
    is not valid JSON (the engine killed mid-write, then restarted) is skipped with a warning
    on ``warnings`` and stderr, never an exception.
    """

    path: Path
    offset: int = 0
    line_no: int = 0
    warnings: list[str] = field(default_factory=list)
    quiet: bool = False

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        complete = chunk[: end + 1]
        self.offset += len(complete)
        out: list[dict[str, Any]] = []
        for raw in complete.split(b"\n")[:-1]:
            self.line_no += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict) or "event" not in record:
                    raise ValueError("not an event object")
            except (ValueError, UnicodeDecodeError) as exc:
                msg = f"{self.path}:{self.line_no}: skipped a malformed event line ({exc})"
                self.warnings.append(msg)
                if not self.quiet:
                    print(f"warning: {msg}", file=sys.stderr)
                continue
            out.append(record)
        return out

    def read_trailing_partial(self) -> list[dict[str, Any]]:
        """At the end of a run: a last line with no newline is truncated; report and drop it."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size > self.offset:
            self.line_no += 1
            msg = f"{self.path}:{self.line_no}: skipped a truncated last event line"
            self.warnings.append(msg)
            if not self.quiet:
                print(f"warning: {msg}", file=sys.stderr)
            self.offset = size
        return []


def read_events(path: str | os.PathLike[str], quiet: bool = True) -> Iterator[dict[str, Any]]:
    """All complete, well-formed events of a file."""
    tail = EventTail(Path(path), quiet=quiet)
    yield from tail.read_new()


def end_rank(code: int) -> None:
    """End an engine rank without the interpreter's teardown of torch, DeepSpeed and gloo.

    That teardown costs about 2 s on 2 CPU cores, and with two ranks it can abort a rank
    ("terminate called without an active exception", exit -6) when a communication thread is
    destroyed while still joinable: a finished run reported as failed. By now every event,
    checkpoint, model and generations file is on disk (EventWriter writes each line through).
    On success the ranks first meet at a barrier, so none leaves while another still needs it;
    after a failure there is no barrier (the launcher stops the other ranks).
    """
    if code == 0 and "torch" in sys.modules:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
        except Exception as exc:  # noqa: BLE001 - the work is done; report and leave
            print(f"[zerotune] end-of-run barrier: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
