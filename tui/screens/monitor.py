"""The live monitor of one run: progress, curves, devices, log tail and events.

A worker reads what is new since the last poll (run row, metric points, events, device
samples, log bytes) and posts one :class:`RunPoll`; the next poll is armed only after that
message has been applied, so polls never overlap and a UI that falls behind simply gets
everything since the last poll in one message. Nothing here writes to the run: closing the
monitor or the whole TUI leaves it running.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Log, ProgressBar, Static, TabbedContent, TabPane

from engine import history
from tui.widgets.run_chart import SERIES_COLORS, RunChart, Series
from tui.widgets.run_confirm import ConfirmRunAction
from tui.widgets.run_format import (
    HistoryReader,
    fmt_clock,
    fmt_num,
    run_label,
    short_bytes,
    status_text,
)
from tui.widgets.run_gauges import DeviceGauges

POLL_INTERVAL_S = 1.0
RECONCILE_EVERY_S = 5.0
LOG_FIRST_BYTES = 64 * 1024  # how much of an existing log to show on opening
LOG_MAX_LINES = 5000  # scrollback
LOG_MAX_BYTES_PER_POLL = 256 * 1024  # a log growing faster is skipped ahead, said so
CHART_METRICS = ("loss", "eval_loss", "lr", "tokens_per_s", "elapsed")
EVENT_KINDS_SHOWN = ("start", "eval", "checkpoint", "warning", "stopped", "done", "error",
                     "infer")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --------------------------------------------------------------------------------------------
# Reading (worker thread)


@dataclass
class PollCursor:
    """Where the previous poll stopped reading; only the worker touches it."""

    metric_steps: dict[str, int] = field(default_factory=dict)
    event_id: int | None = None
    sample_t: float | None = None
    log_offset: int | None = None
    log_partial: str = ""
    last_reconcile: float = 0.0
    environment: dict[str, Any] | None = None


@dataclass
class RunPoll:
    """What is new since the previous poll."""

    run: dict[str, Any] | None
    metrics: dict[str, list[tuple[int, float | None]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    environment: dict[str, Any] | None = None
    error: str | None = None


def _clean_log_line(line: str) -> str:
    # tqdm redraws with carriage returns: keep what the terminal would show last.
    if "\r" in line:
        parts = [p for p in line.split("\r") if p.strip()]
        line = parts[-1] if parts else ""
    return _ANSI.sub("", line)


def read_log(path: Path, cursor: PollCursor) -> list[str]:
    """Complete lines appended to ``path`` since the cursor (the last part of it at first)."""
    try:
        size = path.stat().st_size
    except OSError:
        return []
    lines: list[str] = []
    if cursor.log_offset is None or size < cursor.log_offset:
        cursor.log_offset = max(0, size - LOG_FIRST_BYTES)
        cursor.log_partial = ""
        if cursor.log_offset:
            lines.append(f"... (showing the last {LOG_FIRST_BYTES // 1024} KiB of {path.name})")
            skip_partial = True
        else:
            skip_partial = False
    else:
        skip_partial = False
    if size - cursor.log_offset > LOG_MAX_BYTES_PER_POLL:
        skipped = size - cursor.log_offset - LOG_MAX_BYTES_PER_POLL
        lines.append(f"... ({skipped:,} bytes skipped to keep up)")
        cursor.log_offset = size - LOG_MAX_BYTES_PER_POLL
        cursor.log_partial = ""
        skip_partial = True
    if size == cursor.log_offset:
        return lines
    with open(path, "rb") as fh:
        fh.seek(cursor.log_offset)
        data = fh.read(size - cursor.log_offset)
    cursor.log_offset += len(data)
    text = cursor.log_partial + data.decode("utf-8", errors="replace")
    parts = text.split("\n")
    cursor.log_partial = parts.pop()  # an unfinished line waits for its end
    if skip_partial and parts:
        parts = parts[1:]  # we started in the middle of a line
    lines.extend(_clean_log_line(p) for p in parts)
    return lines


def poll_run(db: history.HistoryDB | None, run_id: str, cursor: PollCursor,
             reconcile: bool = True, now: float | None = None) -> RunPoll:
    """Everything new about ``run_id`` since ``cursor`` (which it advances); ``now`` decides
    whether a running run shows as stalled."""
    if db is None:
        return RunPoll(None, error="no run history in this workspace yet")
    now = time.monotonic()
    if reconcile and now - cursor.last_reconcile >= RECONCILE_EVERY_S:
        cursor.last_reconcile = now
        history.reconcile(db)  # a supervisor that died is noticed while we watch
    run = history.get_run(db, run_id)
    if now is not None:
        run["status"] = history.effective_status({**run, "status": run["recorded_status"]}, now)
    metrics: dict[str, list[tuple[int, float | None]]] = {}
    for name in CHART_METRICS:
        # Per name: an eval point for step N may be recorded after the step point of N.
        new = history.run_metrics(db, run["id"], names=[name],
                                  after_step=cursor.metric_steps.get(name)).get(name, [])
        if new:
            metrics[name] = new
            steps = [s for s, _ in new if s is not None]
            if steps:
                cursor.metric_steps[name] = max(steps)
    events = history.run_events(db, run["id"], kinds=EVENT_KINDS_SHOWN, after_id=cursor.event_id)
    if events:
        cursor.event_id = events[-1]["id"]
    samples = history.device_samples(db, run["id"], after_t=cursor.sample_t)
    if samples:
        cursor.sample_t = samples[-1]["t"]
    latest: dict[str, dict[str, Any]] = {}
    for s in samples:
        latest[s["device"]] = s
    log_lines: list[str] = []
    environment = None
    run_dir = history.run_dir_of(run)
    if run_dir is not None:
        log_lines = read_log(run_dir / "engine.log", cursor)
        if cursor.environment is None:
            try:
                cursor.environment = json.loads((run_dir / "environment.json").read_text())
            except (OSError, ValueError):
                cursor.environment = {}
            environment = cursor.environment
    return RunPoll(run, metrics, events, list(latest.values()), log_lines, environment)


# --------------------------------------------------------------------------------------------
# Presentation helpers


def eta_seconds(run: dict[str, Any], elapsed: list[tuple[int, float | None]]) -> float | None:
    """Seconds left at the recent pace (the last 20 step points of ``elapsed``)."""
    total, last = run.get("total_steps"), run.get("last_step")
    if not total or last is None or last >= total:
        return None
    pts = [(s, e) for s, e in elapsed if s is not None and e is not None][-20:]
    if len(pts) < 2:
        return None
    (s0, e0), (s1, e1) = pts[0], pts[-1]
    if s1 <= s0 or e1 <= e0:
        return None
    return (total - last) * (e1 - e0) / (s1 - s0)


def measured_vs_estimate(label: str, measured: float | None, estimated: float | None) -> Text:
    text = Text.assemble((f"{label:<9}", "bold"), short_bytes(measured))
    if estimated:
        text.append(f" / est {short_bytes(estimated)}")
        if measured:
            delta = (measured - estimated) / estimated
            text.append(f" {delta:+.0%}", style="red" if delta > 0.1 else "green")
    else:
        text.append(" / est -", style="dim")
    return text


def event_detail(ev: dict[str, Any]) -> str:
    p = ev.get("payload") if isinstance(ev.get("payload"), dict) else {}
    kind = ev["kind"]
    if kind == "eval":
        out = f"eval loss {fmt_num(p.get('eval_loss'))}"
        if p.get("perplexity") is not None:
            out += f"  perplexity {fmt_num(p.get('perplexity'))}"
        return out
    if kind == "checkpoint":
        return Path(str(p.get("path") or "")).name or "-"
    if kind == "warning":
        return str(p.get("message") or "")
    if kind == "start":
        parts = [f"{p.get('method') or '-'} on {p.get('world_size') or '?'} process(es)"]
        if p.get("num_params"):
            parts.append(f"{p['num_params']:,} parameters")
        if p.get("resumed_from"):
            parts.append(f"resumed from {Path(str(p['resumed_from'])).name}")
        return ", ".join(parts)
    if kind == "stopped":
        ckpt = p.get("checkpoint")
        return f"checkpoint {Path(str(ckpt)).name}" if ckpt else "no checkpoint"
    if kind == "done":
        s = p.get("summary") if isinstance(p.get("summary"), dict) else {}
        return f"final loss {fmt_num(s.get('final_loss'))}, {s.get('steps', '?')} steps"
    if kind == "error":
        return f"{p.get('kind') or 'error'}: {p.get('reason') or ''}"
    if kind == "infer":
        return (f"{p.get('mode') or 'inference'}: {p.get('prompts', '?')} prompts, "
                f"{fmt_num(p.get('tokens_per_s'))} tokens/s, p50 "
                f"{fmt_num(p.get('latency_p50_s'))} s")
    return json.dumps(p, default=str)[:200]


EVENT_STYLES = {"error": "bold red", "warning": "yellow", "stopped": "yellow",
                "done": "green", "checkpoint": "cyan", "eval": "", "start": "dim",
                "infer": "magenta"}


# --------------------------------------------------------------------------------------------
# The screen


class MonitorScreen(Screen):
    """Watch ``run_id`` of ``workspace`` live; works as well for a run that has ended."""

    CSS_PATH = "../runs.tcss"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "stop", "Stop"),
        Binding("k", "kill", "Kill"),
        Binding("u", "resume", "Resume"),
        Binding("y", "copy_path", "Copy dir"),
        Binding("f", "follow", "Follow log"),
        Binding("d", "detail", "Detail"),
        Binding("escape,q", "back", "Back"),
    ]

    class Polled(Message):
        def __init__(self, poll: RunPoll):
            super().__init__()
            self.poll = poll

    def __init__(self, workspace: str | Path, run_id: str, *,
                 clock: Callable[[], float] = time.time,
                 poll_interval: float = POLL_INTERVAL_S, reconcile: bool = True,
                 name: str | None = None, id: str | None = None):
        super().__init__(name=name, id=id)
        self.workspace = Path(workspace)
        self.run_id = run_id
        self.clock = clock
        self.poll_interval = poll_interval
        self.reconcile = reconcile
        self.reader = HistoryReader(self.workspace)
        self.cursor = PollCursor()
        self.run: dict[str, Any] | None = None
        self.series: dict[str, list[tuple[int, float | None]]] = {}
        self.samples: dict[str, dict[str, Any]] = {}
        self.polls = 0  # applied polls, for tests
        self._ended_polls = 0
        self._timer = None

    def compose(self) -> ComposeResult:
        yield Static("", id="mon-head")
        with Horizontal(id="mon-progress-row"):
            yield Static("step -", id="mon-step")
            yield ProgressBar(id="mon-progress", show_eta=False, show_percentage=True)
            yield Static("", id="mon-eta")
        with Horizontal(id="mon-main"):
            yield RunChart(title="loss", id="mon-chart", empty="no loss recorded yet")
            with Vertical(id="mon-side"):
                yield Static("", id="mon-stats")
                yield DeviceGauges(id="mon-gauges")
        with TabbedContent(id="mon-tabs"):
            with TabPane("Log", id="mon-log-tab"):
                yield Log(id="mon-log", max_lines=LOG_MAX_LINES, auto_scroll=True)
            with TabPane("Events", id="mon-events-tab"):
                yield DataTable(id="mon-events", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        events = self.query_one("#mon-events", DataTable)
        events.add_column("TIME", width=8, key="t")
        events.add_column("STEP", width=6, key="step")
        events.add_column("EVENT", width=10, key="kind")
        events.add_column("DETAIL", key="detail")
        self.query_one("#mon-head", Static).update(Text(f"run {self.run_id}: loading...",
                                                        style="dim"))
        self._poll()

    def on_unmount(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.reader.close()

    # -- polling -------------------------------------------------------------------------

    def _poll(self) -> None:
        self._timer = None
        self._read(self.cursor)

    @work(thread=True, exclusive=True, group="monitor-poll", exit_on_error=False)
    def _read(self, cursor: PollCursor) -> None:
        try:
            with self.reader.db() as db:
                poll = poll_run(db, self.run_id, cursor, reconcile=self.reconcile,
                                now=self.clock())
        except Exception as exc:
            poll = RunPoll(None, error=f"{type(exc).__name__}: {exc}")
        self.post_message(self.Polled(poll))

    @on(Polled)
    def _apply(self, message: Polled) -> None:
        poll = message.poll
        try:
            self._apply_poll(poll)
        finally:
            self.polls += 1
            self._rearm()

    def _rearm(self) -> None:
        if not self.is_attached:
            return
        run = self.run
        if run is not None and run["recorded_status"] in history.FINAL_STATUSES:
            # One more poll after the end picks up the last events and log lines.
            self._ended_polls += 1
            if self._ended_polls > 1:
                return
        self._timer = self.set_timer(self.poll_interval, self._poll)

    def _apply_poll(self, poll: RunPoll) -> None:
        if poll.run is None:
            self.query_one("#mon-head", Static).update(
                Text(f"run {self.run_id}: {poll.error}", style="red"))
            return
        self.run = run = poll.run
        for name, points in poll.metrics.items():
            self.series.setdefault(name, []).extend(points)
        for s in poll.samples:
            self.samples[s["device"]] = s
        gauges = self.query_one(DeviceGauges)
        if poll.environment is not None:
            gauges.cpu_count = poll.environment.get("cpu_count") or os.cpu_count()
        self._show_head(run)
        self._show_progress(run)
        if poll.metrics or self.polls == 0:
            self._show_chart()
        self._show_stats(run)
        if poll.samples:
            gauges.update_samples(list(self.samples.values()))
        if poll.log_lines:
            self.query_one("#mon-log", Log).write_lines(poll.log_lines)
        if poll.events:
            self._add_events(poll.events)

    def _show_head(self, run: dict[str, Any]) -> None:
        method = run.get("method") or "-"
        if run.get("adapter") and run["adapter"] != "none":
            method += f"+{run['adapter']}"
        text = Text.assemble(
            status_text(run["status"]), "  ", (run.get("name") or "-", "bold"), "  ",
            (run["id"], "dim"), "  ", method,
            f" ZeRO-{run['zero_stage']}" if run.get("zero_stage") is not None else "",
            f"  {run.get('model') or ''}",
        )
        if run.get("reason"):
            text.append(f"  {run['reason']}", style="red" if run["status"] == "failed" else "")
        self.query_one("#mon-head", Static).update(text)

    def _elapsed(self, run: dict[str, Any]) -> float | None:
        if run.get("wall_time") is not None and run["recorded_status"] in history.FINAL_STATUSES:
            return run["wall_time"]
        start = run.get("started_at")
        if start is None:
            return None
        return (run.get("ended_at") or self.clock()) - start

    def _show_progress(self, run: dict[str, Any]) -> None:
        total, last = run.get("total_steps"), run.get("last_step")
        bar = self.query_one("#mon-progress", ProgressBar)
        if total:
            bar.update(total=total, progress=min(last or 0, total))
        step = f"step {last if last is not None else 0}/{total}" if total else \
            f"step {last if last is not None else '-'}"
        self.query_one("#mon-step", Static).update(step)
        parts = []
        if run["recorded_status"] in history.ACTIVE_STATUSES:
            eta = eta_seconds(run, self.series.get("elapsed", []))
            parts.append(f"ETA {fmt_clock(eta)}")
        parts.append(f"{fmt_clock(self._elapsed(run))} elapsed")
        self.query_one("#mon-eta", Static).update("  ".join(parts))

    def _show_chart(self) -> None:
        loss = self.series.get("loss", [])
        evals = self.series.get("eval_loss", [])
        self.query_one("#mon-chart", RunChart).set_series([
            Series("train", [s for s, _ in loss], [v for _, v in loss], SERIES_COLORS[0]),
            Series("eval", [s for s, _ in evals], [v for _, v in evals], SERIES_COLORS[1]),
        ])

    def _last(self, name: str) -> float | None:
        points = self.series.get(name)
        return points[-1][1] if points else None

    def _show_stats(self, run: dict[str, Any]) -> None:
        live = run["recorded_status"] in history.ACTIVE_STATUSES
        # Live: the latest step's figures. Ended: the run's summary (mean tokens/s), as
        # `zerotune runs show` prints it.
        loss = self._last("loss") if live or run.get("final_loss") is None else run["final_loss"]
        speed = self._last("tokens_per_s") if live else run.get("tokens_per_s")
        lines = [
            Text.assemble(("loss     ", "bold"), fmt_num(loss)),
            Text.assemble(("eval     ", "bold"), fmt_num(run.get("final_eval_loss")),
                          ("  best ", "dim"), fmt_num(run.get("best_eval_loss"))),
            Text.assemble(("lr       ", "bold"), fmt_num(self._last("lr"), 3)),
            Text.assemble(("tokens/s ", "bold"), fmt_num(speed, 4)),
        ]
        # The GPU line only for runs that used a GPU: an estimate alone says nothing here.
        if run.get("peak_gpu_mem_bytes") is not None:
            lines.append(measured_vs_estimate("peak GPU", run.get("peak_gpu_mem_bytes"),
                                              run.get("est_peak_gpu_bytes")))
        lines.append(measured_vs_estimate(
            "peak RAM", run.get("peak_host_hwm_bytes") or run.get("peak_host_rss_bytes"),
            run.get("est_peak_host_bytes")))
        self.query_one("#mon-stats", Static).update(Text("\n").join(lines))

    def _add_events(self, events: list[dict[str, Any]]) -> None:
        table = self.query_one("#mon-events", DataTable)
        follow = table.row_count == 0 or table.cursor_row >= table.row_count - 1
        for ev in events:
            style = EVENT_STYLES.get(ev["kind"], "")
            table.add_row(
                time.strftime("%H:%M:%S", time.localtime(ev["t"])) if ev.get("t") else "-",
                "-" if ev.get("step") is None else str(ev["step"]),
                Text(ev["kind"], style=style),
                Text(event_detail(ev), style=style if ev["kind"] == "error" else ""),
            )
        if follow:
            table.move_cursor(row=table.row_count - 1, animate=False)

    # -- actions -------------------------------------------------------------------------

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1 and self.app.screen is self:
            self.dismiss()

    def action_detail(self) -> None:
        from tui.screens.run_detail import RunDetailScreen

        self.app.push_screen(RunDetailScreen(self.workspace, self.run_id, clock=self.clock))

    def action_copy_path(self) -> None:
        if self.run is None or not self.run.get("run_dir"):
            self.notify("no run directory known yet", severity="warning")
            return
        self.app.copy_to_clipboard(self.run["run_dir"])
        self.notify(f"copied {self.run['run_dir']}")

    def action_follow(self) -> None:
        log = self.query_one("#mon-log", Log)
        log.auto_scroll = not log.auto_scroll
        if log.auto_scroll:
            log.scroll_end(animate=False)
        self.notify("following the log" if log.auto_scroll else "log paused: scroll freely")

    def _live_run(self) -> dict[str, Any] | None:
        run = self.run
        if run is None or run["recorded_status"] not in history.ACTIVE_STATUSES:
            self.notify("the run is not running", severity="warning")
            return None
        return run

    def action_stop(self) -> None:
        run = self._live_run()
        if run is None:
            return
        self.app.push_screen(
            ConfirmRunAction("Stop run", f"Stop {run_label(run)}? The engine finishes its step, "
                             "saves a checkpoint and exits; resume it later.",
                             confirm_label="Stop"),
            lambda answer: answer and self._signal(kill=False),
        )

    def action_kill(self) -> None:
        run = self._live_run()
        if run is None:
            return
        self.app.push_screen(
            ConfirmRunAction("Kill run", f"Kill {run_label(run)} now? No checkpoint is saved: "
                             "use this for a run that does not stop.", confirm_label="Kill",
                             danger=True),
            lambda answer: answer and self._signal(kill=True),
        )

    @work(thread=True, group="monitor-action", exit_on_error=False)
    def _signal(self, kill: bool) -> None:
        from engine.supervisor import stop

        try:
            with self.reader.db() as db:
                if db is None:
                    raise history.RunNotFound(self.run_id)
                run = history.get_run(db, self.run_id)
            what = stop(run, kill=kill)
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"cannot {'kill' if kill else 'stop'}: {exc}",
                                      severity="error", timeout=8)
            return
        self.app.call_from_thread(self.notify, what, timeout=6)

    def action_resume(self) -> None:
        run = self.run
        if run is None:
            return
        if run["recorded_status"] in history.ACTIVE_STATUSES:
            self.notify("the run is still going; stop it first to resume later",
                        severity="warning")
            return
        self.app.push_screen(
            ConfirmRunAction("Resume", f"Continue {run_label(run)} from its newest complete "
                             "checkpoint, as a new run?", confirm_label="Resume"),
            lambda answer: answer and self._resume(),
        )

    @work(thread=True, group="monitor-action", exit_on_error=False)
    def _resume(self) -> None:
        from engine import runner

        try:
            prepared = runner.resume_run(self.workspace, self.run_id)
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"cannot resume: {exc}", severity="error",
                                      timeout=8)
            return
        self.app.call_from_thread(self._resumed, prepared.run_id)

    def _resumed(self, new_id: str) -> None:
        self.notify(f"resumed as run {new_id}")
        self.app.push_screen(MonitorScreen(self.workspace, new_id, clock=self.clock))
