"""Compare two or more runs: what changed in their profiles, their loss curves on one chart,
and their results side by side.

The profile diff and the results come from :func:`engine.runs_cli.compare_report` (what
``zerotune runs compare`` prints), taken against the first run for each other run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from engine import history
from engine.runs_cli import compare_report
from tui.widgets.run_chart import SERIES_COLORS, RunChart, Series, series_style
from tui.widgets.run_format import HistoryReader, fmt_bytes, fmt_duration, fmt_num

_ABSENT = object()
# Results where lower is better / higher is better: the best run's value is shown in green.
LOWER_BETTER = {"final_loss", "final_eval_loss", "best_eval_loss", "perplexity", "wall_time",
                "peak_gpu_mem_bytes", "peak_host_rss_bytes", "peak_host_hwm_bytes"}
HIGHER_BETTER = {"tokens_per_s"}


@dataclass
class Comparison:
    """N runs side by side; ``profile`` rows are (key, [value per run], changed)."""

    runs: list[dict[str, Any]]
    profile: list[tuple[str, list[Any], bool]] = field(default_factory=list)
    profiles_found: list[bool] = field(default_factory=list)
    results: list[tuple[str, list[Any]]] = field(default_factory=list)
    curves: list[dict[str, list[tuple[int, float | None]]]] = field(default_factory=list)

    @property
    def changed_keys(self) -> list[str]:
        return [key for key, _, changed in self.profile if changed]


def read_comparison(db: history.HistoryDB, run_ids: Sequence[str]) -> Comparison:
    """Compare the runs through ``compare_report`` of the first against each other one."""
    runs = [history.get_run(db, rid) for rid in run_ids]
    base = runs[0]["id"]
    reports = [compare_report(db, base, r["id"], include_equal=True) for r in runs[1:]]
    n = len(runs)
    values: dict[str, list[Any]] = {}
    for i, report in enumerate(reports, start=1):
        for d in report["profile_diff"]:
            row = values.setdefault(d["key"], [_ABSENT] * n)
            if d["only_in"] != "b":
                row[0] = d["a"]
            row[i] = d["b"] if d["only_in"] != "a" else _ABSENT
    profile = []
    for key in sorted(values):
        row = values[key]
        changed = any(not _same(v, row[0]) for v in row[1:])
        profile.append((key, row, changed))
    found = [reports[0]["profiles_found"][0]] + [r["profiles_found"][1] for r in reports] \
        if reports else [False]
    results = []
    if reports:
        names = [s["name"] for s in reports[0]["summary"]]
        for j, name in enumerate(names):
            results.append((name, [reports[0]["summary"][j]["a"]] +
                            [r["summary"][j]["b"] for r in reports]))
        metric_names = sorted({m["name"] for r in reports for m in r["metrics"]})
        for name in metric_names:
            row: list[Any] = [None] * n
            for i, r in enumerate(reports, start=1):
                for m in r["metrics"]:
                    if m["name"] == name:
                        if m["a_last"] is not None:
                            row[0] = m["a_last"]
                        row[i] = m["b_last"]
            results.append((f"{name} (last)", row))
    curves = [history.run_metrics(db, r["id"], names=["loss", "eval_loss"]) for r in runs]
    return Comparison(runs, profile, found, results, curves)


def _same(a: Any, b: Any) -> bool:
    return a is b or (a is not _ABSENT and b is not _ABSENT and a == b)


def _show(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    if v is None:
        return "null"
    return str(v)


def _result_text(name: str, v: Any) -> str:
    if v is None:
        return "-"
    if name.endswith("_bytes"):
        return fmt_bytes(v)
    if name == "wall_time":
        return fmt_duration(v)
    return fmt_num(v)


def id_prefix_length(ids: Sequence[str], minimum: int = 6) -> int:
    """The shortest prefix length (at least ``minimum``) that tells the ids apart."""
    longest = max((len(i) for i in ids), default=minimum)
    for n in range(minimum, longest + 1):
        if len({i[:n] for i in ids}) == len(set(ids)):
            return n
    return longest


def run_column_label(run: dict[str, Any], prefix: int = 6) -> str:
    return f"{run.get('name') or '-'} {run['id'][:prefix]}"


class CompareScreen(Screen):
    """``run_ids`` (two or more) side by side; ``a`` shows equal profile keys too."""

    CSS_PATH = "../runs.tcss"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "toggle_all", "All keys"),
        Binding("escape,q", "back", "Back"),
    ]

    class Loaded(Message):
        def __init__(self, comparison: Comparison | None, error: str | None = None):
            super().__init__()
            self.comparison = comparison
            self.error = error

    def __init__(self, workspace: str | Path, run_ids: Sequence[str], *,
                 name: str | None = None, id: str | None = None):
        super().__init__(name=name, id=id)
        if len(run_ids) < 2:
            raise ValueError("compare needs two or more runs")
        self.workspace = Path(workspace)
        self.run_ids = list(run_ids)
        self.reader = HistoryReader(self.workspace)
        self.comparison: Comparison | None = None
        self.show_all = False
        self.loads = 0

    def compose(self) -> ComposeResult:
        yield Static(Text(f"comparing {len(self.run_ids)} runs: loading...", style="dim"),
                     id="compare-head")
        with TabbedContent(id="compare-tabs"):
            with TabPane("Profile diff", id="tab-diff"):
                yield DataTable(id="compare-diff", cursor_type="row", zebra_stripes=True,
                                fixed_columns=1)
            with TabPane("Curves", id="tab-curves"):
                yield RunChart(title="train loss", id="compare-loss", classes="compare-chart")
                yield RunChart(title="eval loss", id="compare-eval", classes="compare-chart")
            with TabPane("Results", id="tab-results"):
                yield DataTable(id="compare-results", cursor_type="row", zebra_stripes=True,
                                fixed_columns=1)
        yield Footer()

    def on_mount(self) -> None:
        self._load()

    def on_unmount(self) -> None:
        self.reader.close()

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1 and self.app.screen is self:
            self.dismiss()

    def action_toggle_all(self) -> None:
        self.show_all = not self.show_all
        if self.comparison is not None:
            self._fill_diff(self.comparison)

    @work(thread=True, exclusive=True, group="compare-load", exit_on_error=False)
    def _load(self) -> None:
        try:
            with self.reader.db() as db:
                if db is None:
                    raise history.RunNotFound("no run history in this workspace yet")
                comparison = read_comparison(db, self.run_ids)
        except Exception as exc:
            self.post_message(self.Loaded(None, f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(self.Loaded(comparison))

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        self.loads += 1
        head = self.query_one("#compare-head", Static)
        if message.comparison is None:
            head.update(Text(f"cannot compare: {message.error}", style="red"))
            return
        self.comparison = c = message.comparison
        head_text = Text(f"{len(c.runs)} runs, {len(c.changed_keys)} profile keys differ: ")
        for i, run in enumerate(c.runs):
            if i:
                head_text.append(" · ")
            head_text.append(self._label(run), style=series_style(i))
        missing = [r["id"] for r, ok in zip(c.runs, c.profiles_found, strict=False) if not ok]
        if missing:
            head_text.append(f"  (no profile.yaml: {', '.join(missing)})", style="yellow")
        head.update(head_text)
        self._fill_diff(c)
        self._fill_results(c)
        self._fill_curves(c)

    def _label(self, run: dict[str, Any]) -> str:
        c = self.comparison
        n = id_prefix_length([r["id"] for r in c.runs]) if c else 6
        return run_column_label(run, n)

    def _fill(self, table: DataTable, first: str, c: Comparison,
              rows: list[tuple[Text, list[Text]]]) -> None:
        """Replace the table; widths are given, not measured (a table refilled in one go
        could be drawn before it had measured its new rows)."""
        table.clear(columns=True)
        widths = [max([len(first), *(len(r[0].plain) for r in rows)])]
        for i, run in enumerate(c.runs):
            label = self._label(run)
            widths.append(min(48, max([len(label), *(len(r[1][i].plain) for r in rows)])))
        table.add_column(first, key="key", width=widths[0])
        for i, run in enumerate(c.runs):
            table.add_column(Text(self._label(run), style=series_style(i)), key=run["id"],
                             width=widths[i + 1])
        for key_cell, cells in rows:
            table.add_row(key_cell, *cells)

    def _fill_diff(self, c: Comparison) -> None:
        rows: list[tuple[Text, list[Text]]] = []
        for key, values, changed in c.profile:
            if changed:
                first = values[0]
                rows.append((Text(key, style="bold yellow"),
                             [Text(_show(v), style="yellow" if i == 0 or _same(v, first)
                                   else "bold yellow") for i, v in enumerate(values)]))
            elif self.show_all:
                rows.append((Text(key, style="dim"), [Text(_show(v), style="dim")
                                                      for v in values]))
        if not rows:
            rows.append((Text("the profiles are identical (a: show all keys)", style="dim"),
                         [Text("") for _ in c.runs]))
        self._fill(self.query_one("#compare-diff", DataTable), "KEY", c, rows)

    def _fill_results(self, c: Comparison) -> None:
        rows: list[tuple[Text, list[Text]]] = []
        for name, values in c.results:
            base = name.removesuffix(" (last)")
            best = None
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) > 1 and len(set(numbers)) > 1:
                if base in LOWER_BETTER or base in ("loss", "eval_loss"):
                    best = min(numbers)
                elif base in HIGHER_BETTER:
                    best = max(numbers)
            rows.append((Text(name), [Text(_result_text(base, v), justify="right",
                                           style="green" if best is not None and v == best
                                           else "") for v in values]))
        self._fill(self.query_one("#compare-results", DataTable), "RESULT", c, rows)

    def _fill_curves(self, c: Comparison) -> None:
        train, evals = [], []
        for i, (run, curves) in enumerate(zip(c.runs, c.curves, strict=False)):
            color = SERIES_COLORS[i % len(SERIES_COLORS)]
            label = self._label(run)
            loss, ev = curves.get("loss", []), curves.get("eval_loss", [])
            train.append(Series(label, [s for s, _ in loss], [v for _, v in loss], color))
            evals.append(Series(label, [s for s, _ in ev], [v for _, v in ev], color))
        self.query_one("#compare-loss", RunChart).set_series(train)
        self.query_one("#compare-eval", RunChart).set_series(evals)
