"""The run history browser: every run of the workspace, filtered and sorted as you type.

The table holds one page of runs (:data:`PAGE_SIZE`) that :func:`engine.history.page_runs`
filters and sorts in SQL, in a worker, and draws only the rows in view
(:class:`~tui.widgets.run_table.RunTable`); moving past the last row loads the next page. So opening
the screen and applying a filter cost the same with 10 runs or 10,000 (``bench/tui_history.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Select, Static

from engine import history
from tui.widgets.run_confirm import Confirmed, ConfirmRunAction
from tui.widgets.run_table import RunTable, TableColumn
from tui.widgets.run_format import (
    HistoryReader,
    fmt_duration,
    fmt_num,
    run_label,
    short_bytes,
    status_text,
)

PAGE_SIZE = 500
_KEEP = object()  # keep the cursor on its run across a reload
# Refresh the page this often while it shows a live run (starting, running, stalled).
LIVE_REFRESH_S = 2.0


@dataclass(frozen=True)
class Column:
    key: str  # a sort key of engine.history.page_runs, or "mark"
    label: str
    width: int
    descending: bool = False  # the first direction when sorting by this column
    render: Callable[[dict[str, Any]], Any] = lambda r: "-"
    justify: str = "left"


def _method(r: dict[str, Any]) -> str:
    method = r.get("method") or "-"
    if r.get("adapter") and r["adapter"] != "none":
        method += f"+{r['adapter']}"
    return method


def _peak(r: dict[str, Any]) -> Text:
    if r.get("peak_mem_bytes") is None:
        return Text("-")
    # Where no GPU was used the peak is host memory: say so, it is not comparable to VRAM.
    return Text.assemble(short_bytes(r["peak_mem_bytes"]),
                         (" ram" if r.get("peak_mem_kind") == "host" else "", "dim"))


def _started(r: dict[str, Any]) -> str:
    t = r.get("started_at") or r.get("created_at")
    return time.strftime("%m-%d %H:%M", time.localtime(t)) if t else "-"


COLUMNS: tuple[Column, ...] = (
    Column("mark", " ", 1, render=lambda r: ""),
    Column("status", "STATUS", 9, render=lambda r: status_text(r.get("status"))),
    Column("name", "NAME", 16, render=lambda r: r.get("name") or "-"),
    Column("method", "METHOD", 9, render=_method),
    Column("model", "MODEL", 12, render=lambda r: r.get("model") or "-"),
    Column("zero_stage", "ZeRO", 4, justify="right",
           render=lambda r: "-" if r.get("zero_stage") is None else str(r["zero_stage"])),
    Column("final_eval_loss", "EVAL", 6, justify="right",
           render=lambda r: fmt_num(r.get("final_eval_loss"))),
    Column("best_eval_loss", "BEST", 6, justify="right",
           render=lambda r: fmt_num(r.get("best_eval_loss"))),
    Column("tokens_per_s", "TOK/S", 6, True, justify="right",
           render=lambda r: fmt_num(r.get("tokens_per_s"), 3)),
    Column("peak_mem_bytes", "PEAK MEM", 9, True, render=_peak),
    Column("duration_s", "TIME", 7, True, justify="right",
           render=lambda r: fmt_duration(r.get("duration_s"))),
    Column("created_at", "STARTED", 11, True, render=_started),
    Column("id", "ID", 12, render=lambda r: Text(r["id"], style="dim")),
)
SORTABLE = [c for c in COLUMNS if c.key != "mark"]
STATUS_CHOICES = ("running", "stalled", "completed", "failed", "stopped", "lost", "starting")


@dataclass(frozen=True)
class Query:
    text: str = ""
    status: str | None = None
    sort: str = "created_at"
    descending: bool = True
    offset: int = 0


@dataclass
class Page:
    query: Query
    rows: list[dict[str, Any]]
    total: int
    elapsed_ms: float
    lost: list[str] = field(default_factory=list)


class HistoryScreen(Screen):
    """Every run of ``workspace``: status in colour, results, sortable and filtered as you type.

    ``clock`` gives "now" for durations of live runs and the stalled status (tests freeze it).
    """

    CSS_PATH = "../runs.tcss"
    AUTO_FOCUS = "#runs-table"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("m", "monitor", "Monitor"),
        Binding("d", "detail", "Detail"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("r", "rerun", "Re-run"),
        Binding("u", "resume", "Resume"),
        Binding("e", "edit", "Edit profile"),
        Binding("x,delete", "delete", "Delete"),
        Binding("s", "sort_next", "Sort"),
        Binding("S", "sort_reverse", "Reverse", show=False),
        Binding("t", "status_next", "Status", show=False),
        Binding("right_square_bracket", "page(1)", "Next page", show=False),
        Binding("left_square_bracket", "page(-1)", "Prev page", show=False),
        Binding("escape", "back", "Back", show=False),
    ]

    class PageLoaded(Message):
        def __init__(self, generation: int, page: Page | None, error: str | None = None):
            super().__init__()
            self.generation = generation
            self.page = page
            self.error = error

    def __init__(self, workspace: str | Path, *, clock: Callable[[], float] = time.time,
                 page_size: int = PAGE_SIZE, name: str | None = None, id: str | None = None):
        super().__init__(name=name, id=id)
        self.workspace = Path(workspace)
        self.clock = clock
        self.page_size = page_size
        self.reader = HistoryReader(self.workspace)
        self.query_state = Query()
        self.page: Page | None = None
        self.marked: dict[str, dict[str, Any]] = {}
        self.loads = 0  # pages applied, for tests and the benchmark
        self._generation = 0
        self._reconciled = False
        self._cursor_to: str | int | object | None = None
        self._refresh_timer = None

    # -- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="runs-filters"):
            yield Input(placeholder="/ filter: name, id, model, method", id="runs-filter",
                        compact=True)
            yield Select([(s, s) for s in STATUS_CHOICES], prompt="any status",
                         id="runs-status", compact=True, allow_blank=True)
        # Mark, status and name stay in view when the table scrolls sideways.
        yield RunTable(id="runs-table", fixed_columns=3)
        yield Static("loading runs...", id="runs-info")
        yield Footer()

    def on_mount(self) -> None:
        self._set_columns()
        self.load()

    def on_unmount(self) -> None:
        self.reader.close()

    def on_screen_resume(self) -> None:
        if self.loads:
            self.load(keep_cursor=True)

    def _set_columns(self) -> None:
        q = self.query_state
        columns = []
        for col in COLUMNS:
            label, width = col.label, col.width
            if col.key == q.sort:
                label, width = col.label + (" ▼" if q.descending else " ▲"), width + 2
            columns.append(TableColumn(col.key, label, width, col.justify))
        self.query_one(RunTable).set_columns(columns)

    # -- loading -------------------------------------------------------------------------

    def load(self, keep_cursor: bool = False, cursor: str | int | None = None) -> None:
        """Query the page for the current filter and sort in a worker."""
        self._generation += 1
        if cursor is not None:
            self._cursor_to = cursor
        elif keep_cursor:
            self._cursor_to = _KEEP  # decided when the page arrives: the user may move on
        else:
            self._cursor_to = 0
        self._fetch(self._generation, self.query_state)

    @work(thread=True, exclusive=True, group="history-page", exit_on_error=False)
    def _fetch(self, generation: int, query: Query) -> None:
        started = time.perf_counter()
        try:
            with self.reader.db() as db:
                if db is None:
                    page = Page(query, [], 0, 0.0)
                else:
                    lost = []
                    if not self._reconciled:
                        # Runs whose supervisor died while nobody watched: mark them lost now.
                        self._reconciled = True
                        lost = history.reconcile(db)
                    rows, total = history.page_runs(
                        db, text=query.text, status=query.status, sort=query.sort,
                        descending=query.descending, limit=self.page_size,
                        offset=query.offset, now=self.clock())
                    page = Page(query, rows, total, (time.perf_counter() - started) * 1000, lost)
        except Exception as exc:
            self.post_message(self.PageLoaded(generation, None, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.PageLoaded(generation, page))

    @on(PageLoaded)
    def _apply_page(self, message: PageLoaded) -> None:
        if message.generation != self._generation:
            return  # superseded by a newer filter or sort
        info = self.query_one("#runs-info", Static)
        if message.page is None:
            info.update(Text(f"cannot read the history: {message.error}", style="red"))
            return
        page = message.page
        same = (self.page is not None and self.page.query == page.query
                and self.page.rows == page.rows)
        target = self._cursor_to
        if target is _KEEP:
            # The run under the cursor, else the same row (that run was deleted).
            target = self.current_run_id() or 0
            if target not in {r["id"] for r in page.rows}:
                target = self.query_one(RunTable).cursor_row
        self.page = page
        if not same:
            self._fill_table(page, target)
        self.loads += 1
        self._update_info()
        self._schedule_live_refresh()

    def _fill_table(self, page: Page, target: str | int | None) -> None:
        ids = [r["id"] for r in page.rows]
        cursor = ids.index(target) if isinstance(target, str) and target in ids else \
            target if isinstance(target, int) else 0
        self.query_one(RunTable).set_rows(page.rows, cursor=cursor, render_row=self._cells)

    def _cells(self, run: dict[str, Any]) -> list[Any]:
        return ["●" if run["id"] in self.marked else "", *(c.render(run) for c in COLUMNS[1:])]

    def _update_info(self) -> None:
        page = self.page
        if page is None:
            return
        q = page.query
        sort_label = next(c.label for c in COLUMNS if c.key == q.sort)
        if page.total == 0:
            if q.text or q.status:
                span = "no run matches"
            else:
                span = "no runs yet: start one with New run or `zerotune run PROFILE`"
        else:
            runs = "run" if page.total == 1 else "runs"
            span = (f"{q.offset + 1}-{q.offset + len(page.rows)} of {page.total:,} {runs}"
                    if page.total > len(page.rows) else f"{page.total:,} {runs}")
        parts = [span, f"sorted by {sort_label} {'▼' if q.descending else '▲'}"]
        if q.status:
            parts.append(f"status {q.status}")
        if self.marked:
            parts.append(f"{len(self.marked)} marked (c: compare)")
        if page.lost:
            parts.append(f"{len(page.lost)} marked lost")
        self.query_one("#runs-info", Static).update(" · ".join(parts))

    def _schedule_live_refresh(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.stop()
            self._refresh_timer = None
        page = self.page
        if page and any(r["status"] in ("starting", "running", "stalled") for r in page.rows):
            self._refresh_timer = self.set_timer(LIVE_REFRESH_S, self._live_refresh)

    def _live_refresh(self) -> None:
        self._refresh_timer = None
        if self.is_current:
            self.load(keep_cursor=True)

    # -- filter and sort -----------------------------------------------------------------

    @on(Input.Changed, "#runs-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self._requery(text=event.value.strip())

    @on(Input.Submitted, "#runs-filter")
    def _filter_submitted(self) -> None:
        self.query_one(RunTable).focus()

    @on(Select.Changed, "#runs-status")
    def _status_changed(self, event: Select.Changed) -> None:
        value = None if event.value is Select.NULL else str(event.value)
        self._requery(status=value)

    def _requery(self, **changes: Any) -> None:
        q = self.query_state
        new = replace(q, **{"offset": 0, **changes})
        if new == q:
            return
        sort_changed = (new.sort, new.descending) != (q.sort, q.descending)
        self.query_state = new
        if sort_changed:
            self._set_columns()
        self.load()

    @on(RunTable.HeaderClicked)
    def _header_clicked(self, event: RunTable.HeaderClicked) -> None:
        key = event.key
        col = next((c for c in SORTABLE if c.key == key), None)
        if col is None:
            return
        q = self.query_state
        if q.sort == key:
            self._requery(descending=not q.descending)
        else:
            self._requery(sort=key, descending=col.descending)

    def action_sort_next(self) -> None:
        keys = [c.key for c in SORTABLE]
        i = keys.index(self.query_state.sort) if self.query_state.sort in keys else -1
        col = SORTABLE[(i + 1) % len(SORTABLE)]
        self._requery(sort=col.key, descending=col.descending)

    def action_sort_reverse(self) -> None:
        self._requery(descending=not self.query_state.descending)

    def action_status_next(self) -> None:
        select = self.query_one("#runs-status", Select)
        order = [None, *STATUS_CHOICES]
        current = None if select.value is Select.NULL else select.value
        nxt = order[(order.index(current) + 1) % len(order)]
        if nxt is None:
            select.clear()
        else:
            select.value = nxt

    def action_focus_filter(self) -> None:
        self.query_one("#runs-filter", Input).focus()

    def action_back(self) -> None:
        if self.focused is not None and self.focused.id == "runs-filter":
            self.query_one(RunTable).focus()
        elif len(self.app.screen_stack) > 1 and self.app.screen is self:
            self.dismiss()
        elif callable(getattr(self.app, "action_home", None)):
            self.app.action_home()  # the runs mode of the app: back to its home

    def action_page(self, step: int) -> None:
        self._go_page(step)

    @on(RunTable.EdgeReached)
    def _edge(self, event: RunTable.EdgeReached) -> None:
        self._go_page(event.step)

    def _go_page(self, step: int) -> None:
        page = self.page
        if page is None:
            return
        offset = page.query.offset + step * self.page_size
        if offset < 0 or offset >= page.total:
            return
        self.query_state = replace(self.query_state, offset=offset)
        self.load(cursor=0 if step > 0 else -1)

    # -- the run under the cursor --------------------------------------------------------

    def current_run(self) -> dict[str, Any] | None:
        table = self.query_one(RunTable)
        if self.page is None or not self.page.rows or table.cursor_row < 0:
            return None
        if table.cursor_row >= len(self.page.rows):
            return None
        return self.page.rows[table.cursor_row]

    def current_run_id(self) -> str | None:
        run = self.current_run()
        return run["id"] if run else None

    def _need_run(self) -> dict[str, Any] | None:
        run = self.current_run()
        if run is None:
            self.notify("no run selected", severity="warning")
        return run

    @on(RunTable.RowSelected, "#runs-table")
    def _row_selected(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        run = self._need_run()
        if run is None:
            return
        if run["recorded_status"] in history.ACTIVE_STATUSES:
            self._push_monitor(run["id"])
        else:
            self._push_detail(run["id"])

    def action_monitor(self) -> None:
        run = self._need_run()
        if run is not None:
            self._push_monitor(run["id"])

    def action_detail(self) -> None:
        run = self._need_run()
        if run is not None:
            self._push_detail(run["id"])

    def _push_monitor(self, run_id: str) -> None:
        from tui.screens.monitor import MonitorScreen

        self.app.push_screen(MonitorScreen(self.workspace, run_id))

    def _push_detail(self, run_id: str) -> None:
        from tui.screens.run_detail import RunDetailScreen

        self.app.push_screen(RunDetailScreen(self.workspace, run_id))

    def action_mark(self) -> None:
        run = self._need_run()
        if run is None:
            return
        if run["id"] in self.marked:
            del self.marked[run["id"]]
        else:
            self.marked[run["id"]] = run
        table = self.query_one(RunTable)
        row = table.cursor_row
        table.refresh_row(row)
        if row < table.row_count - 1:
            table.move_cursor(row + 1)
        self._update_info()

    def action_compare(self) -> None:
        ids = list(self.marked)
        current = self.current_run_id()
        if len(ids) == 1 and current and current not in ids:
            ids.append(current)
        if len(ids) < 2:
            self.notify("mark two or more runs with space, then press c", severity="warning")
            return
        from tui.screens.compare import CompareScreen

        self.app.push_screen(CompareScreen(self.workspace, ids))

    def action_edit(self) -> None:
        run = self._need_run()
        if run is None:
            return
        path = Path(run["run_dir"]) / "profile.yaml" if run.get("run_dir") else None
        if path is None or not path.exists():
            self.notify(f"run {run['id']} has no frozen profile.yaml", severity="error")
            return
        opener = getattr(self.app, "open_profile_in_wizard", None)
        if opener is None:
            self.notify("this app has no wizard to open the profile in", severity="error")
            return
        opener(path)

    # -- actions that start or delete runs -----------------------------------------------

    def action_rerun(self) -> None:
        run = self._need_run()
        if run is None:
            return
        self.app.push_screen(
            ConfirmRunAction("Re-run", f"Start the frozen profile of {run_label(run)} again, "
                             "as a new run?", confirm_label="Re-run"),
            lambda answer: answer and self._lineage("rerun_run", run),
        )

    def action_resume(self) -> None:
        run = self._need_run()
        if run is None:
            return
        if run["recorded_status"] in history.ACTIVE_STATUSES:
            self.notify(f"run {run['id']} is still {run['status']}", severity="warning")
            return
        self.app.push_screen(
            ConfirmRunAction("Resume", f"Continue {run_label(run)} from its newest complete "
                             "checkpoint, as a new run?", confirm_label="Resume"),
            lambda answer: answer and self._lineage("resume_run", run),
        )

    @work(thread=True, group="history-action", exit_on_error=False)
    def _lineage(self, fn_name: str, run: dict[str, Any]) -> None:
        from engine import runner

        verb = "resume" if fn_name == "resume_run" else "re-run"
        try:
            prepared = getattr(runner, fn_name)(self.workspace, run["id"])
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"cannot {verb} {run['id']}: {exc}",
                                      severity="error", timeout=8)
            return
        self.app.call_from_thread(self._started, prepared.run_id, verb)

    def _started(self, run_id: str, verb: str) -> None:
        self.notify(f"{verb}: started run {run_id}")
        self.load(keep_cursor=True)
        self._push_monitor(run_id)

    def action_delete(self) -> None:
        run = self._need_run()
        if run is None:
            return
        if run["recorded_status"] in history.ACTIVE_STATUSES:
            self.notify(f"run {run['id']} is {run['status']}; stop it first", severity="warning")
            return
        where = run.get("run_dir") or "(no run directory recorded)"
        self.app.push_screen(
            ConfirmRunAction(
                "Delete run",
                f"Delete {run_label(run)} from the history? Its metrics, events and device "
                "samples go; the run directory stays unless you tick the box.",
                confirm_label="Delete", option=f"also delete {where}", danger=True),
            lambda answer: answer and self._delete(run, answer),
        )

    @work(thread=True, group="history-action", exit_on_error=False)
    def _delete(self, run: dict[str, Any], answer: Confirmed) -> None:
        try:
            with self.reader.db() as db:
                if db is None:
                    raise history.RunNotFound(run["id"])
                counts = history.delete_run(db, run["id"], remove_dir=answer.option)
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"cannot delete {run['id']}: {exc}",
                                      severity="error", timeout=8)
            return
        message = f"deleted run {run['id']}"
        if counts.get("removed_dir"):
            message += f" and {counts['removed_dir']}"
        self.app.call_from_thread(self._deleted, run["id"], message)

    def _deleted(self, run_id: str, message: str) -> None:
        self.marked.pop(run_id, None)
        self.notify(message)
        self.load(keep_cursor=True)
