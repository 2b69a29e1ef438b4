"""Follow a run from the terminal: a progress bar (or plain lines when not a terminal), then
the summary. Attaching only reads the run directory and the database; detaching or closing
the terminal never touches the run.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from engine.events import EventTail
from engine.runs_cli import fmt_duration

POLL_S = 0.5
PLAIN_EVERY_S = 10.0


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def _num(x: Any, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def evaluation_line(ev: dict[str, Any]) -> str:
    """The after-training evaluation event in one line: each metric, and base -> tuned when
    the base model was evaluated too. Its rows are scored one by one (no packing), so its
    perplexity differs from the trainer's eval loss over packed blocks."""
    parts = []
    for row in ev.get("evaluation") or []:
        fmt = ".2f" if row["name"] == "perplexity" else ".4f"
        tuned = _num(row.get("tuned"), fmt)
        parts.append(f"{row['name']} {_num(row['base'], fmt)} -> {tuned}" if row.get("base") is not None
                     else f"{row['name']} {tuned}")
    return (f"held-out evaluation, {ev.get('heldout_rows', '?')} rows scored one by one: "
            + (", ".join(parts) if parts else "no metrics"))


class Progress:
    """Renders the state of a run from its events."""

    def __init__(self, out: TextIO, tty: bool):
        self.out, self.tty = out, tty
        self.step = 0
        self.total: int | None = None
        self.start_step = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.tokens_per_s: float | None = None
        self.t_first: float | None = None
        self.step_first = 0
        self.last_plain = 0.0
        self.drawn = False

    def feed(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "start":
            self.total = ev.get("total_steps")
            self.start_step = self.step = ev.get("start_step") or 0
            self.line(f"started: {ev.get('method')} on {ev.get('world_size')} rank(s), "
                      f"ZeRO-{ev.get('zero_stage')}, {ev.get('num_params', 0) / 1e6:.2f}M parameters, "
                      f"{self.total} steps" + (f", resuming at step {self.step}" if self.step else ""))
        elif kind == "step":
            self.step = ev.get("step", self.step)
            self.total = ev.get("total_steps") or self.total
            self.loss = ev.get("loss")
            self.tokens_per_s = ev.get("tokens_per_s") or self.tokens_per_s
            if self.t_first is None:
                self.t_first, self.step_first = ev["t"], self.step
            self.bar(ev["t"])
        elif kind == "eval" and ev.get("stage") == "evaluation":
            self.line(evaluation_line(ev))
        elif kind == "eval":
            self.eval_loss = ev.get("eval_loss")
            self.line(f"step {ev.get('step')}: eval loss {_num(self.eval_loss)}, "
                      f"perplexity {_num(ev.get('perplexity'), '.2f')}")
        elif kind == "checkpoint":
            self.line(f"step {ev.get('step')}: checkpoint {Path(ev.get('path', '')).name}")
        elif kind == "warning":
            self.line(f"warning: {ev.get('message')}")
        elif kind == "stopped":
            self.line(f"stopped at step {ev.get('step')}; checkpoint {ev.get('checkpoint')}")
        elif kind == "error":
            self.line(f"error: {ev.get('reason')}")

    def eta(self, now: float) -> float | None:
        if self.t_first is None or not self.total or self.step <= self.step_first:
            return None
        rate = (now - self.t_first) / (self.step - self.step_first)
        return rate * (self.total - self.step)

    def bar(self, now: float) -> None:
        total = self.total or 0
        frac = min(self.step / total, 1.0) if total else 0.0
        text = (f"step {self.step}/{total or '?'} loss {_num(self.loss)}"
                + (f" eval {_num(self.eval_loss)}" if self.eval_loss is not None else "")
                + f" | {fmt_rate(self.tokens_per_s)} tok/s | ETA {fmt_duration(self.eta(now))}")
        if self.tty:
            width = shutil.get_terminal_size((80, 24)).columns
            bar_w = max(10, min(30, width - len(text) - 10))
            filled = int(bar_w * frac)
            line = f"[{'#' * filled}{'.' * (bar_w - filled)}] {frac * 100:3.0f}% {text}"
            self.out.write("\r" + line[: width - 1].ljust(width - 1))
            self.out.flush()
            self.drawn = True
        elif now - self.last_plain >= PLAIN_EVERY_S or self.step == total or self.step <= 1:
            self.last_plain = now
            self.out.write(f"{frac * 100:3.0f}% {text}\n")
            self.out.flush()

    def line(self, text: str) -> None:
        if self.tty and self.drawn:
            self.out.write("\r" + " " * (shutil.get_terminal_size((80, 24)).columns - 1) + "\r")
            self.drawn = False
        self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\n")
            self.drawn = False


def summary_lines(run: dict[str, Any]) -> list[str]:
    rows = [
        ("run", run.get("id")),
        ("status", run.get("status") + (f": {run['reason']}" if run.get("reason") else "")),
        ("steps", f"{run.get('last_step')}/{run.get('total_steps')}"),
        ("final loss", _num(run.get("final_loss"))),
        ("final eval loss", _num(run.get("final_eval_loss"))),
        ("best eval loss", _num(run.get("best_eval_loss"))),
        ("perplexity", _num(run.get("perplexity"), ".2f")),
        ("tokens/s", fmt_rate(run.get("tokens_per_s"))),
        ("wall time", fmt_duration(run.get("wall_time"))),
        ("run directory", run.get("run_dir")),
    ]
    return [f"{k:<16} {v}" for k, v in rows]


def _ask(prompt: str) -> str:
    try:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        return sys.stdin.readline().strip().lower()
    except (EOFError, KeyboardInterrupt):
        return "d"


def attach(workspace: Path, run_id: str, *, interactive: bool, out: TextIO | None = None) -> int:
    """Follow a run until it ends (exit 0 if it completed, 1 otherwise) or the user detaches."""
    from engine import history
    from engine.supervisor import stop
    from engine.workspace import db_path

    out = out or sys.stderr
    db = history.open_db(db_path(workspace))
    try:
        run = history.get_run(db, run_id)
        tail = EventTail(Path(run["run_dir"]) / "events.jsonl", quiet=True)
        progress = Progress(out, tty=out.isatty())
        interrupted = False

        def on_int(signum: int, frame: Any) -> None:
            nonlocal interrupted
            interrupted = True

        old = signal.signal(signal.SIGINT, on_int)
        try:
            while True:
                for ev in tail.read_new():
                    progress.feed(ev)
                if interrupted:
                    interrupted = False
                    progress.finish()
                    answer = _ask("[s]top the run, [d]etach (it keeps running), or [c]ontinue? ") \
                        if interactive else "d"
                    if answer.startswith("s"):
                        print(stop(history.get_run(db, run_id)), file=sys.stderr)
                    elif answer.startswith("c"):
                        pass
                    else:
                        print(f"detached; the run goes on. Re-attach: zerotune runs logs {run_id} -f",
                              file=sys.stderr)
                        return 0
                run = history.get_run(db, run_id)
                if run["recorded_status"] not in history.ACTIVE_STATUSES:
                    for ev in tail.read_new():
                        progress.feed(ev)
                    break
                history.reconcile(db)
                time.sleep(POLL_S)
        finally:
            signal.signal(signal.SIGINT, old)
        progress.finish()
        for line in summary_lines(run):
            print(line)
        return 0 if run["recorded_status"] == "completed" else 1
    finally:
        db.close()
