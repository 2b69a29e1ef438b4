"""The home screen: live and recent runs of the workspace, and the ways in (new run, open a
profile, history). Runs are read from ``runs/history.db`` in a worker that re-arms itself."""

from __future__ import annotations

import time
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
from textual.widgets import Button, DataTable, Footer, Label, Static

LIVE_STATUSES = ("starting", "running", "stalled", "stopping")
RECENT_LIMIT = 30
STATUS_STYLE = {
    "running": "bold green", "starting": "green", "stopping": "yellow", "stalled": "bold yellow",
    "completed": "green", "stopped": "yellow", "failed": "bold red", "killed": "red",
    "lost": "red",
}


@dataclass
class RunsSnapshot:
    live: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    exists: bool = True


def read_runs(workspace: Path, reconcile_first: bool) -> RunsSnapshot:
    """Live runs and the most recent ones, through engine.history (no database: no runs)."""
    from engine.history import list_runs, open_db, reconcile
    from engine.workspace import db_path

    path = db_path(workspace)
    if not path.exists():
        return RunsSnapshot(exists=False)
    db = open_db(path)
    try:
        if reconcile_first:
            try:
                reconcile(db)
            except Exception:  # bookkeeping never blocks the list
                pass
        recent = list_runs(db, limit=RECENT_LIMIT)
        live = [r for r in recent if r.get("status") in LIVE_STATUSES]
        if len(recent) >= RECENT_LIMIT:  # live runs older than the newest page
            seen = {r["id"] for r in live}
            live += [r for r in list_runs(db, status=["starting", "running", "stalled"],
                                          limit=RECENT_LIMIT) if r["id"] not in seen]
        return RunsSnapshot(live, [r for r in recent if r.get("status") not in LIVE_STATUSES])
    finally:
        db.close()


class RunsLoaded(Message):
    def __init__(self, snapshot: RunsSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%m-%d %H:%M", time.localtime(ts))


def _loss(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def _progress(r: dict[str, Any]) -> str:
    step, total = r.get("last_step"), r.get("total_steps")
    if step is None:
        return "-"
    return f"{step}/{total}" if total else str(step)


class HomeScreen(Screen):
    """Where the TUI opens."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "app.new_run", "New run"),
        Binding("o", "app.open_profile", "Open profile"),
        Binding("h", "app.history", "History"),
        Binding("r", "refresh", "Refresh", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, workspace: Path) -> None:
        super().__init__(id="home")
        self.workspace = Path(workspace)
        self.snapshot: RunsSnapshot | None = None
        self._loads = 0
        self._timer = None

    def compose(self) -> ComposeResult:
        with Vertical(id="home-body"):
            yield Static(f"[b]zerotune[/b]  plan, run and watch DeepSpeed fine-tuning  "
                         f"[dim]workspace {self.workspace}[/]", id="home-title")
            with Horizontal(id="home-actions"):
                yield Button("New run  n", id="home-new", compact=True, variant="primary")
                yield Button("Open profile  o", id="home-open", compact=True)
                yield Button("History  h", id="home-history", compact=True)
                yield Button("Quit  q", id="home-quit", compact=True)
            yield Label("Live runs", classes="section-title")
            yield DataTable(id="home-live", cursor_type="row")
            yield Label("Recent runs", classes="section-title")
            yield DataTable(id="home-recent", cursor_type="row")
            yield Static("", id="home-note", classes="info")
        yield Footer()

    def on_mount(self) -> None:
        for table_id in ("#home-live", "#home-recent"):
            t = self.query_one(table_id, DataTable)
            t.add_column("id", key="id")
            t.add_column("name", key="name")
            t.add_column("method", key="method")
            t.add_column("status", key="status")
            t.add_column("step", key="step")
            t.add_column("eval loss", key="loss")
            t.add_column("started", key="started")
        self.query_one("#home-live").display = False
        self.query_one("#home-note", Static).update("[dim]reading runs ...[/]")
        self.load()

    def on_screen_resume(self) -> None:
        if self._loads:
            self.load()

    # --- loading ------------------------------------------------------------------------------

    def load(self) -> None:
        self._loads += 1
        self._read(self._loads == 1)

    def action_refresh(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False, group="home-runs")
    def _read(self, reconcile_first: bool) -> None:
        try:
            snap = read_runs(self.workspace, reconcile_first)
        except Exception as exc:  # a locked or newer database: say so, keep the screen
            snap = RunsSnapshot(error=f"{type(exc).__name__}: {exc}")
        self.post_message(RunsLoaded(snap))

    @on(RunsLoaded)
    def _loaded(self, event: RunsLoaded) -> None:
        self.show(event.snapshot)
        # Re-arm after each read, so reads never overlap; slower when nothing is live.
        interval = getattr(self.app, "poll_interval", 2.0)
        if interval:
            if not event.snapshot.live:
                interval *= 3
            if self._timer is not None:
                self._timer.stop()
            self._timer = self.set_timer(interval, self._tick)

    def _tick(self) -> None:
        if self.is_current:
            self.load()
        else:
            self._timer = self.set_timer(getattr(self.app, "poll_interval", 2.0), self._tick)

    def show(self, snap: RunsSnapshot) -> None:
        self.snapshot = snap
        note = self.query_one("#home-note", Static)
        live = self.query_one("#home-live", DataTable)
        recent = self.query_one("#home-recent", DataTable)
        if snap.error:
            note.update(f"[red]Cannot read the run history: {snap.error}[/]")
            return
        self._fill(live, snap.live)
        self._fill(recent, snap.recent)
        live.display = bool(snap.live)
        self.query("Label.section-title").first().update(
            f"Live runs ({len(snap.live)})" if snap.live else "Live runs: none")
        if not snap.exists or not (snap.live or snap.recent):
            note.update("No runs yet. Press [b]n[/] to plan one, or [b]o[/] to open a profile.")
        else:
            note.update("[dim]Enter on a run: its monitor (live) or its details.[/]")

    def _fill(self, table: DataTable, runs: list[dict[str, Any]]) -> None:
        keep = table.cursor_row
        table.clear()
        for r in runs:
            status = r.get("status") or "?"
            table.add_row(
                str(r["id"])[:12], str(r.get("name") or "")[:24], str(r.get("method") or ""),
                Text(status, style=STATUS_STYLE.get(status, "")), _progress(r),
                _loss(r.get("final_eval_loss") or r.get("best_eval_loss")),
                _when(r.get("started_at") or r.get("created_at")), key=str(r["id"]))
        if runs and 0 <= keep < len(runs):
            table.move_cursor(row=keep, animate=False)

    # --- actions ------------------------------------------------------------------------------

    @on(DataTable.RowSelected)
    def _run_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value:
            finished = event.data_table.id == "home-recent"
            self.app.open_run(str(event.row_key.value), finished=finished)  # type: ignore[attr-defined]

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        event.stop()
        action = {"home-new": "new_run", "home-open": "open_profile",
                  "home-history": "history", "home-quit": "quit"}.get(event.button.id or "")
        if action:
            self.app.call_later(self.app.run_action, action)
