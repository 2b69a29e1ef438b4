"""Everything about one run: for a failed run the reason first and the traceback below, then
the figures ``zerotune runs show`` prints, the frozen profile, the DeepSpeed JSON, the launch
command, the environment, the curves and the device timeline."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Group
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane

from engine import history
from engine.runs_cli import PROFILE_SUMMARY_KEYS, flatten, show_report
from tui.widgets.run_chart import SERIES_COLORS, RunChart, Series
from tui.widgets.run_format import (
    HistoryReader,
    display_path,
    fmt_bytes,
    fmt_duration,
    fmt_num,
    fmt_start,
    status_text,
)

LOG_TAIL_BYTES = 128 * 1024
_TRACEBACK_START = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*$")


def last_traceback(log: str) -> str | None:
    """The last Python traceback in a log, from its header to the exception line."""
    start = log.rfind(_TRACEBACK_START)
    if start < 0:
        return None
    lines = log[start:].splitlines()
    out = []
    for line in lines:
        out.append(line)
        if len(out) > 1 and _EXCEPTION_LINE.match(line):
            break
    return "\n".join(out)


def _read_text(path: Path, tail: int | None = None) -> str | None:
    try:
        with open(path, "rb") as fh:
            if tail is not None:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - tail))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None


@dataclass
class RunDetail:
    """What the detail screen shows, read in one go by a worker."""

    report: dict[str, Any]  # engine.runs_cli.show_report: the same as `zerotune runs show`
    files: dict[str, str | None] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float | None]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    error_event: dict[str, Any] | None = None
    traceback: str | None = None
    log_tail: str | None = None
    has_model: bool = False  # the run directory holds model/ (something to chat with)


def read_detail(db: history.HistoryDB, run_id: str, now: float | None = None) -> RunDetail:
    report = show_report(db, run_id)
    run = report["run"]
    if now is not None:
        run["status"] = history.effective_status({**run, "status": run["recorded_status"]}, now)
    run_dir = history.run_dir_of(run)
    files: dict[str, str | None] = {}
    log = None
    if run_dir is not None:
        for name in ("profile.yaml", "ds_config.json", "command.txt", "environment.json",
                     "launch.json"):
            files[name] = _read_text(run_dir / name)
        log = _read_text(run_dir / "engine.log", tail=LOG_TAIL_BYTES)
    errors = history.run_events(db, run["id"], kinds=["error"])
    detail = RunDetail(
        report=report,
        files=files,
        metrics=history.run_metrics(db, run["id"], names=["loss", "eval_loss", "lr"]),
        samples=history.device_samples(db, run["id"]),
        error_event=errors[-1] if errors else None,
        has_model=run_dir is not None and (run_dir / "model").is_dir(),
    )
    if run["recorded_status"] in ("failed", "lost") and log:
        detail.traceback = last_traceback(log)
        if detail.traceback is None:
            detail.log_tail = "\n".join(log.splitlines()[-30:])
    return detail


def _kv_table(rows: list[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(str(value)))
    return table


def _measured(measured: float | None, estimated: float | None) -> str:
    text = fmt_bytes(measured)
    if estimated:
        text += f"   estimated {fmt_bytes(estimated)}"
        if measured:
            text += f" ({(measured - estimated) / estimated:+.0%})"
    return text


def summary_rows(report: dict[str, Any], now: float,
                 workspace: str | Path = "/") -> list[tuple[str, Any]]:
    """The key figures of a run, the ones ``zerotune runs show`` prints (paths inside the
    workspace relative to it)."""
    r = report["run"]
    duration = r.get("wall_time")
    if duration is None and r.get("started_at"):
        duration = (r.get("ended_at") or now) - r["started_at"]
    method = f"{r.get('method') or '-'}, adapter {r.get('adapter') or '-'}, ZeRO stage " \
             f"{r.get('zero_stage') if r.get('zero_stage') is not None else '-'}, " \
             f"world size {r.get('world_size') or '-'}"
    final = "final" if r["recorded_status"] in history.FINAL_STATUSES else "latest"
    rows: list[tuple[str, Any]] = [
        ("status", status_text(r["status"])),
        ("method", method),
        ("model", r.get("model") or "-"),
        ("started", f"{fmt_start(r.get('started_at') or r.get('created_at'))}   ran "
                    f"{fmt_duration(duration)}"),
        ("steps", f"{r.get('last_step') if r.get('last_step') is not None else '-'}"
                  f"/{r.get('total_steps') or '-'}"),
        ("loss", f"{final} {fmt_num(r.get('final_loss'))}   eval "
                 f"{fmt_num(r.get('final_eval_loss'))}   best eval "
                 f"{fmt_num(r.get('best_eval_loss'))}   perplexity "
                 f"{fmt_num(r.get('perplexity'))}"),
        ("speed", f"{fmt_num(r.get('tokens_per_s'))} tokens/s"),
        ("gpu memory", _measured(r.get("peak_gpu_mem_bytes"), r.get("est_peak_gpu_bytes"))),
        ("host memory", _measured(r.get("peak_host_hwm_bytes") or r.get("peak_host_rss_bytes"),
                                  r.get("est_peak_host_bytes"))),
    ]
    if r.get("exit_code") is not None:
        rows.append(("exit code", str(r["exit_code"])))
    if r.get("last_checkpoint"):
        rows.append(("checkpoint", display_path(r["last_checkpoint"], workspace)))
    if r.get("parent_run_id"):
        rows.append(("lineage", f"{r.get('relation') or 'child'} of {r['parent_run_id']}"))
    for child in report.get("children") or []:
        rows.append(("lineage", f"{child.get('relation') or 'child'}: {child['id']} "
                                f"({child['status']})"))
    rows.append(("profile hash", r.get("profile_hash") or "-"))
    rows.append(("run dir", display_path(r.get("run_dir"), workspace)))
    for w in (report.get("warnings") or [])[:5]:
        rows.append(("warning", Text(str(w), style="yellow")))
    return rows


def metrics_table(metrics: dict[str, dict[str, Any]]) -> Table:
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for col in ("METRIC", "LAST", "MIN", "MAX", "STEP", "POINTS"):
        table.add_column(col, justify="left" if col == "METRIC" else "right")
    for name, m in metrics.items():
        table.add_row(name, fmt_num(m["last"]), fmt_num(m["min"]), fmt_num(m["max"]),
                      "-" if m["last_step"] is None else str(m["last_step"]), str(m["count"]))
    return table


def environment_rows(env: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in (env.get("versions") or {}).items():
        rows.append((key, value if value is not None else "-"))
    for key in ("host", "user", "platform", "cpu_count", "git_commit", "profile_source"):
        if env.get(key) is not None:
            rows.append((key, env[key]))
    for gpu in env.get("gpus") or []:
        rows.append(("gpu", json.dumps(gpu, default=str)))
    if env.get("placement"):
        rows.append(("placement", ", ".join(f"{k} {v}" for k, v in env["placement"].items())))
    if env.get("data_fingerprint"):
        rows.append(("data fingerprint", env["data_fingerprint"]))
    for path, digest in (env.get("data_files") or {}).items():
        rows.append(("data file", path))
        rows.append(("  sha256", digest))
    return rows


class RunDetailScreen(Screen):
    """The frozen record of ``run_id``; ``r`` reads it again (for a run still going)."""

    CSS_PATH = "../runs.tcss"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Reload"),
        Binding("m", "monitor", "Monitor"),
        Binding("t", "chat", "Chat"),
        Binding("escape,q", "back", "Back"),
    ]

    class Loaded(Message):
        def __init__(self, detail: RunDetail | None, error: str | None = None):
            super().__init__()
            self.detail = detail
            self.error = error

    def __init__(self, workspace: str | Path, run_id: str, *,
                 clock: Callable[[], float] = time.time, name: str | None = None,
                 id: str | None = None):
        super().__init__(name=name, id=id)
        self.workspace = Path(workspace)
        self.run_id = run_id
        self.clock = clock
        self.reader = HistoryReader(self.workspace)
        self.detail: RunDetail | None = None
        self.loads = 0

    def compose(self) -> ComposeResult:
        yield Static(Text(f"run {self.run_id}: loading...", style="dim"), id="detail-head")
        with TabbedContent(id="detail-tabs"):
            with TabPane("Summary", id="tab-summary"):
                with VerticalScroll():
                    yield Static("", id="detail-reason", classes="detail-text")
                    yield Static("", id="detail-traceback", classes="detail-text")
                    yield Static("", id="detail-summary", classes="detail-text")
            with TabPane("Profile", id="tab-profile"):
                with VerticalScroll():
                    yield Static("", id="detail-profile", classes="detail-text")
            with TabPane("DeepSpeed", id="tab-ds"):
                with VerticalScroll():
                    yield Static("", id="detail-ds", classes="detail-text")
            with TabPane("Command", id="tab-command"):
                with VerticalScroll():
                    yield Static("", id="detail-command", classes="detail-text")
            with TabPane("Environment", id="tab-env"):
                with VerticalScroll():
                    yield Static("", id="detail-env", classes="detail-text")
            with TabPane("Curves", id="tab-curves"):
                yield RunChart(title="loss", id="detail-loss", classes="detail-chart")
                yield RunChart(title="learning rate", id="detail-lr", classes="detail-chart")
            with TabPane("Devices", id="tab-devices"):
                yield RunChart(title="utilisation %", xlabel="seconds", id="detail-util",
                               classes="detail-chart", empty="no device samples")
                yield RunChart(title="memory GiB", xlabel="seconds", id="detail-mem",
                               classes="detail-chart", empty="no device samples")
        yield Footer()

    def on_mount(self) -> None:
        self._load()

    def on_unmount(self) -> None:
        self.reader.close()

    def action_reload(self) -> None:
        self._load()

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1 and self.app.screen is self:
            self.dismiss()

    def action_monitor(self) -> None:
        from tui.screens.monitor import MonitorScreen

        self.app.push_screen(MonitorScreen(self.workspace, self.run_id, clock=self.clock))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "chat":  # only offered for a run that left a model
            return self.detail is not None and self.detail.has_model
        return True

    def action_chat(self) -> None:
        from tui.screens.chat import ChatScreen

        self.app.push_screen(ChatScreen(self.workspace, self.run_id))

    @work(thread=True, exclusive=True, group="detail-load", exit_on_error=False)
    def _load(self) -> None:
        try:
            with self.reader.db() as db:
                if db is None:
                    raise history.RunNotFound("no run history in this workspace yet")
                detail = read_detail(db, self.run_id, now=self.clock())
        except Exception as exc:
            self.post_message(self.Loaded(None, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.Loaded(detail))

    @on(Loaded)
    def _show(self, message: Loaded) -> None:
        self.loads += 1
        head = self.query_one("#detail-head", Static)
        if message.detail is None:
            head.update(Text(f"run {self.run_id}: {message.error}", style="red"))
            return
        self.detail = d = message.detail
        self.refresh_bindings()
        run = d.report["run"]
        head.update(Text.assemble(status_text(run["status"]), "  ",
                                  (run.get("name") or "-", "bold"), "  ", (run["id"], "dim")))
        self._show_failure(d)
        summary = [_kv_table(summary_rows(d.report, self.clock(), self.workspace))]
        profile = d.report.get("profile")
        if profile:
            flat = flatten(profile)
            keys = [(k, json.dumps(flat[k]) if isinstance(flat[k], (dict, list)) else flat[k])
                    for k in PROFILE_SUMMARY_KEYS if flat.get(k) is not None]
            summary += [Text(""), Text("profile", style="bold underline"), _kv_table(keys)]
        if d.report.get("metrics"):
            summary += [Text(""), metrics_table(d.report["metrics"])]
        self.query_one("#detail-summary", Static).update(Group(*summary))
        self._show_file("#detail-profile", d.files.get("profile.yaml"), "yaml", "profile.yaml")
        self._show_file("#detail-ds", d.files.get("ds_config.json"), "json", "ds_config.json")
        self._show_command(d)
        self._show_environment(d)
        self._show_curves(d)
        self._show_devices(d)

    def _show_failure(self, d: RunDetail) -> None:
        run = d.report["run"]
        reason = self.query_one("#detail-reason", Static)
        tb = self.query_one("#detail-traceback", Static)
        failed = run["recorded_status"] in ("failed", "lost")
        reason.display = failed
        tb.display = failed and bool(d.traceback or d.log_tail)
        if not failed:
            return
        why = run.get("reason") or "no reason recorded"
        if d.error_event and isinstance(d.error_event.get("payload"), dict):
            p = d.error_event["payload"]
            if p.get("reason") and p["reason"] not in why:
                why += f"\n{p.get('kind') or 'error'}: {p['reason']}"
        reason.update(Text(f"{run['status']}: {why}"))
        if d.traceback:
            tb.update(Group(Text("traceback (engine.log)", style="bold"), Text(d.traceback),
                            Text("")))
        elif d.log_tail:
            tb.update(Group(Text("last lines of engine.log (no traceback)", style="bold"),
                            Text(d.log_tail), Text("")))

    def _show_file(self, selector: str, text: str | None, lexer: str, name: str) -> None:
        widget = self.query_one(selector, Static)
        if text is None:
            widget.update(Text(f"no {name} in the run directory", style="dim"))
            return
        widget.update(Syntax(text.rstrip("\n"), lexer, theme="ansi_dark", word_wrap=True,
                             background_color="default"))

    def _show_command(self, d: RunDetail) -> None:
        parts: list[Any] = []
        if d.files.get("command.txt"):
            parts += [Text("command.txt", style="bold"), Text(d.files["command.txt"].strip())]
        launch = None
        try:
            launch = json.loads(d.files.get("launch.json") or "null")
        except ValueError:
            pass
        if isinstance(launch, dict):
            rows = [("cwd", launch.get("cwd") or "-"),
                    ("env", " ".join(f"{k}={v}" for k, v in (launch.get("env") or {}).items())
                     or "-"),
                    ("argv", "\n".join(launch.get("argv") or []))]
            if launch.get("resume_from"):
                rows.append(("resume from", launch["resume_from"]))
            parts += [Text(""), Text("launch.json", style="bold"), _kv_table(rows)]
        self.query_one("#detail-command", Static).update(
            Group(*parts) if parts else Text("no command.txt in the run directory", style="dim"))

    def _show_environment(self, d: RunDetail) -> None:
        widget = self.query_one("#detail-env", Static)
        try:
            env = json.loads(d.files.get("environment.json") or "null")
        except ValueError:
            env = None
        if not isinstance(env, dict):
            widget.update(Text("no environment.json in the run directory", style="dim"))
            return
        widget.update(_kv_table(environment_rows(env)))

    def _show_curves(self, d: RunDetail) -> None:
        loss, evals, lr = (d.metrics.get(n, []) for n in ("loss", "eval_loss", "lr"))
        self.query_one("#detail-loss", RunChart).set_series([
            Series("train", [s for s, _ in loss], [v for _, v in loss], SERIES_COLORS[0]),
            Series("eval", [s for s, _ in evals], [v for _, v in evals], SERIES_COLORS[1]),
        ])
        self.query_one("#detail-lr", RunChart).set_series([
            Series("lr", [s for s, _ in lr], [v for _, v in lr], SERIES_COLORS[2]),
        ])

    def _show_devices(self, d: RunDetail) -> None:
        if not d.samples:
            self.query_one("#detail-util", RunChart).set_series([])
            self.query_one("#detail-mem", RunChart).set_series([])
            return
        t0 = d.samples[0]["t"]
        by_device: dict[str, list[dict[str, Any]]] = {}
        for s in d.samples:
            by_device.setdefault(str(s["device"]), []).append(s)
        util, mem = [], []
        gib = 1024 ** 3
        for device, rows in by_device.items():
            xs = [r["t"] - t0 for r in rows]
            label = "cpu" if rows[0].get("kind") == "host" else device
            util.append(Series(label, xs, [r.get("util") for r in rows]))
            # GPU: the run's processes' memory where known; host: the run's resident memory.
            mem.append(Series(f"{label} run" if rows[0].get("kind") == "host" else label, xs,
                              [(r.get("proc_mem") if r.get("proc_mem") is not None
                                else r.get("mem_used") or 0) / gib for r in rows]))
        self.query_one("#detail-util", RunChart).set_series(util)
        self.query_one("#detail-mem", RunChart).set_series(mem)
