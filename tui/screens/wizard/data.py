"""Step 1, Data: pick the training files, see the first rows and the detected shape, map
columns, set the split and sequence length; a report of the whole data in a worker."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, DirectoryTree, Label, Select, Static
from textual.worker import get_current_worker

from engine.data_formats import (
    DATA_SUFFIXES,
    FORMAT_COLUMNS,
    METHOD_FORMATS,
    DataError,
    detect_format,
    is_hub_name,
    is_saved_dataset,
    iter_raw_rows,
    missing_columns_message,
)
from engine.profile import Problem
from tui.screens.wizard.base import StepScroll, WizardStep, problems_box, show
from tui.widgets.wizard_field import Field, choices

PREVIEW_ROWS = 5
PREVIEW_DELAY = 0.25  # seconds of no typing before a typed path is read
FORMAT_LABELS = {"auto": "auto (detect)", "text": "text", "prompt_completion": "prompt/completion",
                 "messages": "messages (chat)", "preference": "preference"}
# The method a data shape suggests when the user has not chosen one.
METHOD_FOR_FORMAT = {"text": "cpt", "prompt_completion": "sft", "messages": "sft",
                     "preference": "dpo"}
SKIP_DIRS = {"runs", "node_modules", "__pycache__", "checkpoints"}


class DataTree(DirectoryTree):
    """The workspace's folders and data files (hidden folders and run directories left out)."""

    # Plain marks instead of emoji, which many SSH terminals render at the wrong width.
    ICON_NODE_EXPANDED = "- "
    ICON_NODE = "+ "
    ICON_FILE = "  "

    def filter_paths(self, paths):
        out = []
        for p in paths:
            if p.name.startswith("."):
                continue
            try:
                if p.is_dir():
                    if p.name not in SKIP_DIRS:
                        out.append(p)
                elif p.suffix.lower() in DATA_SUFFIXES:
                    out.append(p)
            except OSError:
                continue
        return out


# --------------------------------------------------------------------------------------------
# Reading the data (in workers)
# --------------------------------------------------------------------------------------------

# Saved datasets folders and hub datasets are read with the ``datasets`` library, which the UI
# process never imports: those are read by a child process instead.
_PREVIEW_CHILD = """
import json, sys
from engine.data_formats import DataError, iter_raw_rows
rows, errors = [], []
try:
    for row in iter_raw_rows(sys.argv[1], errors):
        rows.append(row.data)
        if len(rows) >= int(sys.argv[2]):
            break
except DataError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
print(json.dumps({"rows": rows, "errors": [str(e) for e in errors[:1]]}, default=str))
"""


def needs_child(source: str) -> bool:
    """Whether reading ``source`` needs the datasets library (so another process)."""
    return is_hub_name(source) or is_saved_dataset(Path(source))


@dataclass
class Preview:
    source: str
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _child_env() -> dict[str, str]:
    import os

    root = str(Path(__file__).resolve().parents[3])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def read_preview(source: str) -> Preview:
    """The first rows of a data source, and the columns they have."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    if not is_hub_name(source) and not Path(source).exists():
        return Preview(source, error=f"file not found: {source}")
    if needs_child(source):
        import subprocess
        import sys

        try:
            out = subprocess.run([sys.executable, "-c", _PREVIEW_CHILD, source, str(PREVIEW_ROWS)],
                                 capture_output=True, text=True, timeout=300, env=_child_env(),
                                 stdin=subprocess.DEVNULL)
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
            return Preview(source, error=f"cannot read {source}: {exc}")
        if result.get("error"):
            return Preview(source, error=result["error"])
        rows, errors = result["rows"], result["errors"]
    else:
        bad: list[DataError] = []
        try:
            for row in iter_raw_rows(source, bad):
                rows.append(row.data)
                if len(rows) >= PREVIEW_ROWS:
                    break
        except DataError as exc:
            return Preview(source, error=str(exc))
        errors = [str(e) for e in bad[:1]]
    if not rows:
        return Preview(source, error=errors[0] if errors else "no rows")
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    return Preview(source, columns, rows)


@dataclass
class ReportResult:
    """engine.data_report.DataReport of one set of choices, or why there is none."""

    key: tuple
    report: Any = None
    error: str | None = None


class _Cancelled(Exception):
    pass


def compute_report(key: tuple, source: str, method: str, fmt: str, columns: dict[str, str],
                   max_seq_len: int, tokenizer: str | None, cancelled=lambda: False
                   ) -> ReportResult:
    """``zerotune data inspect`` of the source for these choices (engine.data_prep): rows,
    characters, tokens, duplicates and near-duplicates, personal data, rows too long, bad
    rows. In this process for files; in a child process for what needs ``datasets``."""
    if needs_child(source):
        return _report_in_child(key, source, method, fmt, columns, max_seq_len, tokenizer)
    from engine.data_prep import PrepSettings, inspect

    def progress(_rows: int) -> None:
        if cancelled():
            raise _Cancelled

    settings = PrepSettings(train=[source], method=method, format=fmt, columns=dict(columns),
                            on_bad_rows="skip", max_seq_len=max_seq_len, tokenizer=tokenizer)
    try:
        return ReportResult(key, inspect(settings, progress))
    except _Cancelled:
        return ReportResult(key, error="cancelled")
    except Exception as exc:  # DataError, PrepError: the message says what is wrong
        return ReportResult(key, error=str(exc))


def _report_in_child(key: tuple, source: str, method: str, fmt: str, columns: dict[str, str],
                     max_seq_len: int, tokenizer: str | None) -> ReportResult:
    import subprocess
    import sys

    from engine.data_report import DataReport

    argv = [sys.executable, "-m", "engine.cli", "data", "inspect", source, "--json",
            "--method", method, "--format", fmt, "--max-seq-len", str(max_seq_len)]
    for k, v in columns.items():
        argv += ["--column", f"{k}={v}"]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=_child_env(),
                             stdin=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as exc:
        return ReportResult(key, error=f"cannot inspect {source}: {exc}")
    if out.returncode != 0:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        msg = lines[-1] if lines else f"data inspect failed ({out.returncode})"
        return ReportResult(key, error=msg.removeprefix("error: "))
    try:
        return ReportResult(key, DataReport.from_dict(json.loads(out.stdout)))
    except ValueError as exc:
        return ReportResult(key, error=f"unreadable report: {exc}")


class DataPreviewed(Message):
    def __init__(self, preview: Preview) -> None:
        super().__init__()
        self.preview = preview


class DataReported(Message):
    def __init__(self, report: ReportResult) -> None:
        super().__init__()
        self.report = report


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _cell(value: Any, width: int = 36) -> str:
    if isinstance(value, list):
        parts = []
        for m in value:
            if isinstance(m, dict):
                parts.append(f"{m.get('role', m.get('from', '?'))}: {m.get('content', m.get('value', ''))}")
            else:
                parts.append(str(m))
        text = f"[{len(value)}] " + " | ".join(parts)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


class DataStep(WizardStep):
    step_id = "data"
    title = "Data"
    summary = "Training data: pick a file, check the detected shape, split and sequence length."
    owns = ("data",)

    def __init__(self) -> None:
        super().__init__()
        self.preview: Preview | None = None
        self.report: ReportResult | None = None
        self._report_worker = None
        self._report_key: tuple | None = None
        self._preview_timer = None
        self._preview_w = None
        self._reveal_timer = None
        self._reveal_parts: list[str] = []
        self._reveal_tries = 0

    def compose(self) -> ComposeResult:
        with Horizontal(id="data-main"):
            tree = DataTree(self.app.workspace, id="data-tree")  # type: ignore[attr-defined]
            tree.show_root = True
            tree.guide_depth = 2
            yield tree
            with StepScroll(id="data-side"):
                yield Field("data.train", "Training data", wide=True, show_help=False,
                            placeholder="a file or folder; pick one in the tree")
                yield Static("", id="data-detected", classes="info")
                yield Field("data.format", "Format", kind="select", show_help=False,
                            options=choices(list(FORMAT_LABELS), FORMAT_LABELS))
                yield Vertical(id="data-columns")
                yield Field("data.validation_split", "Validation split", show_help=False)
                yield Field("data.max_seq_len", "Max sequence len", show_help=False)
                yield Field("data.packing", "Packing (cpt)", kind="bool", show_help=False)
                yield Field("data.on_bad_rows", "Bad rows", kind="select", show_help=False,
                            options=choices(["fail", "skip"]))
                yield problems_box()
                yield Label("Report", classes="section-title")
                yield Static("pick a data file", id="data-report", classes="info")
                yield Label("Preview (first rows)", classes="section-title")
                yield DataTable(id="data-preview", cursor_type="none", zebra_stripes=True,
                                show_cursor=False)

    # --- loading and editing ------------------------------------------------------------------

    def after_load(self) -> None:
        self.preview = None
        self.report = None
        self._report_key = None
        source = self.train_source()
        if source is not None:
            self.start_preview(source)
            if not is_hub_name(source):
                self.reveal(Path(source))
        else:
            self.show_preview()

    # --- showing the chosen file in the tree --------------------------------------------------

    def reveal(self, path: Path) -> None:
        """Expand the tree down to ``path`` (folders load in the tree's own worker)."""
        try:
            parts = path.resolve().relative_to(self.app.workspace.resolve()).parts  # type: ignore[attr-defined]
        except ValueError:
            return  # outside the workspace: the field shows the path
        self._reveal_parts = list(parts)
        self._reveal_tries = 0
        if self._reveal_timer is None:
            self._reveal_timer = self.set_interval(0.05, self._reveal_step)

    def _reveal_step(self) -> None:
        tree = self.query_one("#data-tree", DataTree)
        node = tree.root
        self._reveal_tries += 1
        for i, part in enumerate(self._reveal_parts):
            child = next((c for c in node.children if c.data and c.data.path.name == part), None)
            if child is None:
                if self._reveal_tries > 60:  # not in the tree (hidden, filtered): give up
                    break
                return  # its folder is still loading
            node = child
            if i < len(self._reveal_parts) - 1 and not node.is_expanded:
                node.expand()
                return
        else:
            tree.move_cursor(node)
            tree.scroll_to_node(node, animate=False)
        self._reveal_timer.stop()
        self._reveal_timer = None

    def on_enter(self) -> None:
        super().on_enter()
        self.update_detected()

    def train_source(self) -> str | None:
        """The (first) training source: an absolute path, or a hub name (``hf:org/name``)."""
        value = self.draft.get("data.train")
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, str) or not value.strip():
            return None
        if is_hub_name(value.strip()):
            return value.strip()
        return str(self.draft.resolve(value.strip()))

    def after_edit(self, path: str) -> None:
        if path == "data.train":
            # A path being typed: read it once the typing pauses, not at every key.
            if self._preview_timer is not None:
                self._preview_timer.stop()
            self._preview_timer = self.set_timer(PREVIEW_DELAY, self._typed_path)
        elif path in ("data.format", "data.max_seq_len", "data.columns"):
            self.update_detected()
            self.start_report()

    def _typed_path(self) -> None:
        self._preview_timer = None
        source = self.train_source()
        if source is not None:
            self.start_preview(source)

    @on(DirectoryTree.FileSelected, "#data-tree")
    def _file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.choose(event.path)

    @on(DirectoryTree.DirectorySelected, "#data-tree")
    def _dir_selected(self, event: DirectoryTree.DirectorySelected) -> None:
        # A folder of data files is a valid data.train; a saved datasets dir is explained.
        event.stop()
        if is_saved_dataset(event.path):
            self.choose(event.path)

    def choose(self, path: Path) -> None:
        """Use ``path`` as the training data."""
        rel = self.draft.relative(path)
        f = self.query_one("Field", Field)  # data.train is the first field
        f.show_value(rel)
        self.draft.put("data.train", rel)
        self.start_preview(str(path.resolve()))
        self.refresh_errors()
        self.wizard.draft_changed("data.train")

    # --- preview ------------------------------------------------------------------------------

    def start_preview(self, source: str) -> None:
        self.preview = None
        self.report = None
        show(self.query_one("#data-report", Static), "reading ...")
        self._preview_w = self._preview_worker(source)

    @work(thread=True, exclusive=True, exit_on_error=False, group="data-preview")
    def _preview_worker(self, source: str) -> Preview:
        preview = read_preview(source)
        if not get_current_worker().is_cancelled:
            self.post_message(DataPreviewed(preview))
        return preview

    @on(DataPreviewed)
    def _previewed(self, event: DataPreviewed) -> None:
        self.apply_preview(event.preview)

    def apply_preview(self, preview: Preview) -> None:
        if preview.source != self.train_source() or preview is self.preview:
            return  # an older pick, or already shown
        self.preview = preview
        self.wizard.data_columns = set(preview.columns) if not preview.error else None
        self.maybe_follow_method()
        self.show_preview()
        self.update_detected()
        self.start_report()
        self.refresh_errors()

    def show_preview(self) -> None:
        table = self.query_one("#data-preview", DataTable)
        table.clear(columns=True)
        pv = self.preview
        if pv is None or pv.error:
            return
        cols = pv.columns[:4]
        room = self.query_one("#data-side").size.width or 54
        width = max(12, (room - 4) // max(1, len(cols)) - 2)
        for c in cols:
            table.add_column(c, key=c)
        for r in pv.rows:
            table.add_row(*[_cell(r.get(c), width) for c in cols])

    # --- shape and columns --------------------------------------------------------------------

    def method(self) -> str:
        return str(self.draft.value("method.kind") or "sft")

    def mapped_columns(self) -> dict[str, str]:
        cols = self.draft.get("data.columns", {})
        return dict(cols) if isinstance(cols, dict) else {}

    def resolved_format(self) -> str | None:
        """The data shape: the chosen format, else what the columns suggest."""
        fmt = self.draft.value("data.format")
        if fmt and fmt != "auto":
            return str(fmt)
        if not self.preview or self.preview.error:
            return None
        present = set(self.preview.columns)
        mapping = self.mapped_columns()
        present |= {k for k, v in mapping.items() if v in self.preview.columns}
        return detect_format(present)

    def maybe_follow_method(self) -> None:
        """A new profile's method follows the data until the user picks one."""
        if self.draft.source is not None or "method.kind" in self.draft.touched:
            return
        fmt = self.resolved_format()
        kind = METHOD_FOR_FORMAT.get(fmt or "")
        if kind and kind != self.draft.get("method.kind"):
            self.draft.set("method.kind", kind)
            self.wizard.draft_changed("method.kind")

    def update_detected(self) -> None:
        pv = self.preview
        label = self.query_one("#data-detected", Static)
        if pv is None:
            show(label, "")
            self.build_mapping(None)
            return
        if pv.error:
            show(label, "")  # the field under which it belongs says what is wrong
            self.build_mapping(None)
            return
        fmt = self.resolved_format()
        method = self.method()
        text = Text()
        text.append("Columns: ", style="bold")
        text.append(", ".join(pv.columns))
        text.append("\nShape: ", style="bold")
        chosen = self.draft.value("data.format")
        if fmt:
            text.append(f"{FORMAT_LABELS.get(fmt, fmt)}")
            text.append(" (detected)" if chosen == "auto" else " (chosen)", style="dim")
            ok = fmt in METHOD_FORMATS[method]
            text.append(f"  method {method}: ")
            text.append("fits" if ok else f"needs {' or '.join(METHOD_FORMATS[method])}",
                        style="green" if ok else "red")
        else:
            text.append("not recognised", style="red")
            text.append(f"; {method} needs {' or '.join(METHOD_FORMATS[method])}: map columns below")
        show(label, text)
        self.build_mapping(fmt or METHOD_FORMATS[method][0])

    def build_mapping(self, fmt: str | None) -> None:
        """One column picker per column the shape needs, when the file's names differ."""
        box = self.query_one("#data-columns", Vertical)
        pv = self.preview
        mapping = self.mapped_columns()
        need = FORMAT_COLUMNS.get(fmt or "", ())
        if pv is None or pv.error or not need:
            box.remove_children()
            return
        if all(c in pv.columns for c in need) and not mapping:
            box.remove_children()
            return
        key = (fmt, tuple(pv.columns), tuple(sorted(mapping.items())))
        if getattr(box, "_built_for", None) == key:
            return
        box._built_for = key  # type: ignore[attr-defined]
        box.remove_children()
        rows = []
        opts = [(c, c) for c in pv.columns]
        for c in need:
            current = mapping.get(c, c if c in pv.columns else None)
            sel = Select(opts, prompt="(choose a column)", allow_blank=True, compact=True,
                         value=current if current in pv.columns else Select.NULL,
                         id=f"map-{c}", classes="field-control")
            rows.append(Horizontal(Label(f"column '{c}'", classes="field-label"), sel,
                                   classes="field-row mapping-row"))
        box.mount_all(rows)

    @on(Select.Changed, ".mapping-row Select")
    def _mapping_changed(self, event: Select.Changed) -> None:
        event.stop()
        need = (event.select.id or "").removeprefix("map-")
        mapping = self.mapped_columns()
        if event.value is Select.NULL or event.value == need:
            mapping.pop(need, None)
        else:
            mapping[need] = str(event.value)
        if mapping or self.draft.has("data.columns"):
            self.draft.put("data.columns", mapping)
        self.draft.touched.add("data.columns")
        self.update_detected()
        self.start_report()
        self.refresh_errors()

    # --- the report ---------------------------------------------------------------------------

    def report_key(self) -> tuple | None:
        source = self.train_source()
        if source is None or self.preview is None or self.preview.error:
            return None
        max_len = self.draft.value("data.max_seq_len")
        return (source, self.method(), str(self.draft.value("data.format")),
                tuple(sorted(self.mapped_columns().items())),
                max_len if isinstance(max_len, int) and max_len > 0 else 1024,
                self.tokenizer())

    def tokenizer(self) -> str | None:
        """A local tokenizer (tokenizer.json) of the model, for exact token counts; hub
        tokenizers are not fetched here, so their counts are estimated."""
        for key in ("model.tokenizer", "model.path"):
            v = self.draft.get(key)
            if isinstance(v, str) and v:
                p = self.draft.resolve(v)
                if p is not None and ((p / "tokenizer.json").is_file() or (
                        p.is_file() and p.suffix == ".json")):
                    return str(p)
        return None

    def start_report(self) -> None:
        key = self.report_key()
        if key is None:
            if self.preview is not None and self.preview.error:
                show(self.query_one("#data-report", Static), "")
            return
        if key == self._report_key:
            return
        self._report_key = key
        self.report = None
        show(self.query_one("#data-report", Static), "counting rows ...")
        self._report_worker = self._run_report(key)

    @work(thread=True, exclusive=True, exit_on_error=False, group="data-report")
    def _run_report(self, key: tuple) -> ReportResult:
        worker = get_current_worker()
        source, method, fmt, cols, max_len, tokenizer = key
        report = compute_report(key, source, method, fmt, dict(cols), max_len, tokenizer,
                                cancelled=lambda: worker.is_cancelled)
        if not worker.is_cancelled:
            self.post_message(DataReported(report))
        return report

    @on(DataReported)
    def _reported(self, event: DataReported) -> None:
        if event.report.key != self._report_key:
            return
        self.set_report(event.report)

    def set_report(self, result: ReportResult) -> None:
        self.report = result
        out = self.query_one("#data-report", Static)
        rep = result.report
        if result.error or rep is None:
            show(out, Text(result.error or "no report", style="red"))
            self.refresh_errors()
            return
        t = Text()
        t.append(f"{rep.rows_read - rep.rows_bad:,} rows", style="bold")
        t.append(f", {human_count(rep.chars.total)} characters, ")
        t.append(f"{human_count(rep.tokens.total)} tokens")
        if rep.tokenizer is None:
            t.append(" (estimated: chars/4)", style="dim")
        if rep.tokens.count:
            t.append(f"; tokens per row p50 {rep.tokens.p50:,}, p95 {rep.tokens.p95:,}, "
                     f"max {rep.tokens.max:,}")
        t.append(f"\n{rep.duplicates} duplicate(s), {rep.near_duplicates} near-duplicate(s), ")
        t.append(f"{rep.over_max_seq_len} longer than {rep.max_seq_len} tokens",
                 style="yellow" if rep.over_max_seq_len else "")
        if rep.pii:
            found = ", ".join(f"{k} {v}" for k, v in sorted(rep.pii.items()))
            t.append(f"\npersonal data or secrets: {found} (data.prep.scrub_pii)",
                     style="yellow")
        if rep.rows_bad:
            t.append(f"\n{rep.rows_bad} bad row(s)", style="red")
            if rep.bad_examples:
                t.append(f"; first: {rep.bad_examples[0]}")
        for w in rep.warnings[:2]:
            t.append(f"\n{w}", style="yellow")
        show(out, t)
        self.refresh_errors()

    async def prepare_check(self) -> None:
        if self._preview_timer is not None:  # Next right after typing a path
            self._preview_timer.stop()
            self._typed_path()
        pw = self._preview_w
        if pw is not None:
            try:
                await pw.wait()
            except Exception:  # cancelled by a newer pick, or failed: nothing to apply
                pass
            if pw.result is not None:
                self.apply_preview(pw.result)
        key = self.report_key()
        if key is None:
            return
        if key != self._report_key:
            self.start_report()
        worker = self._report_worker
        if worker is not None and (self.report is None or self.report.key != key):
            try:
                await worker.wait()
            except Exception:  # cancelled by a newer change: its result is not this key's
                return
            if worker.result is not None and worker.result.key == key:
                self.set_report(worker.result)

    # --- problems beyond the schema -----------------------------------------------------------

    def extra_problems(self) -> list[Problem]:
        out: list[Problem] = []
        pv = self.preview
        source = self.train_source()
        if source is None:
            out.append(Problem("data.train", "required: pick a data file in the tree or type "
                               "its path"))
            return out
        if pv is not None and pv.error and (is_hub_name(source) or Path(source).exists()):
            out.append(Problem("data.train", pv.error))
            return out
        if pv is None or pv.error:
            return out
        fmt = self.resolved_format()
        method = self.method()
        if fmt is None:
            out.append(Problem("data.columns", missing_columns_message(
                METHOD_FORMATS[method][0], set(pv.columns), method)))
            return out
        rep = self.report
        if rep is not None and rep.key == self.report_key():
            if rep.error:
                hint = ""
                found = detect_format(set(pv.columns))
                if found and found not in METHOD_FORMATS[method]:
                    hint = (f" (the file holds {found} data, which suits "
                            f"{METHOD_FOR_FORMAT[found]}: change the method in step 3 and the "
                            "format here, or map the columns)")
                elif fmt not in METHOD_FORMATS[method]:
                    hint = " (or change the method in step 3)"
                out.append(Problem("data.train", rep.error + hint))
            elif rep.report.rows_bad and self.draft.value("data.on_bad_rows") == "fail":
                first = rep.report.bad_examples[0] if rep.report.bad_examples else ""
                out.append(Problem("data.on_bad_rows",
                                   f"{rep.report.rows_bad} bad row(s), first: {first}; fix them "
                                   "or choose skip"))
        return out
