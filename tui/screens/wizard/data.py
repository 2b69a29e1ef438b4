"""Step 1, Data: pick the training files, see the first rows and the detected shape, map
columns, set the split and sequence length; a report of the whole data in a worker."""

from __future__ import annotations

import hashlib
import json
import time
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
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with a BPE tokenizer


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists()


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


@dataclass
class Preview:
    path: Path
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    saved_dataset: bool = False


def read_preview(path: Path) -> Preview:
    """The first rows of a data file or folder, and the columns they have."""
    if is_saved_dataset(path):
        return Preview(path, error="a saved datasets directory (save_to_disk): zerotune reads "
                       "data files; export it first, e.g. ds.to_json('train.jsonl')",
                       saved_dataset=True)
    if not path.exists():
        return Preview(path, error=f"file not found: {path}")
    rows: list[dict[str, Any]] = []
    errors: list[DataError] = []
    try:
        for row in iter_raw_rows(path, errors):
            rows.append(row.data)
            if len(rows) >= PREVIEW_ROWS:
                break
    except DataError as exc:
        return Preview(path, error=str(exc))
    if not rows:
        msg = str(errors[0]) if errors else "no rows"
        return Preview(path, error=msg)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    return Preview(path, columns, rows)


@dataclass
class DataReport:
    key: tuple
    format: str | None = None
    rows: int = 0
    bad: int = 0
    first_bad: str | None = None
    chars: int = 0
    tokens: int | None = None
    tokenizer: str | None = None
    duplicates: int = 0
    too_long: int = 0
    error: str | None = None
    seconds: float = 0.0


def _texts(row: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for v in row.values():
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            for m in v:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    out.append(m["content"])
    return out


def _load_tokenizer(path: Path | None) -> Any:
    """A ``tokenizers`` tokenizer from a local tokenizer.json (no transformers), or None."""
    if path is None:
        return None
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.name != "tokenizer.json" or not file.exists():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file))
    except Exception:  # a tokenizer we cannot read only costs the token count
        return None


def compute_report(key: tuple, path: Path, method: str, fmt: str, columns: dict[str, str],
                   max_seq_len: int, tokenizer_path: Path | None, cancelled=lambda: False
                   ) -> DataReport:
    """Rows, characters, tokens (with a local tokenizer), duplicates and rows too long."""
    from engine.data_formats import check_file, normalize_row

    t0 = time.perf_counter()
    report = DataReport(key)
    try:
        check = check_file(path, method, fmt, columns, "skip")
    except DataError as exc:
        report.error = str(exc)
        report.seconds = time.perf_counter() - t0
        return report
    report.format = check.format
    report.bad = len(check.bad)
    report.first_bad = str(check.bad[0]) if check.bad else None
    tok = _load_tokenizer(tokenizer_path)
    report.tokenizer = str(tokenizer_path) if tok else None
    tokens = 0
    seen: set[bytes] = set()
    errors: list[DataError] = []
    for i, row in enumerate(iter_raw_rows(path, errors)):
        if i % 512 == 0 and cancelled():
            break
        try:
            norm = normalize_row(row.data, check.format, columns)
        except ValueError:
            continue
        report.rows += 1
        texts = _texts(norm)
        n_chars = sum(len(t) for t in texts)
        report.chars += n_chars
        digest = hashlib.blake2b(json.dumps(norm, sort_keys=True).encode(), digest_size=16).digest()
        if digest in seen:
            report.duplicates += 1
        seen.add(digest)
        if tok is not None:
            n_tok = sum(len(tok.encode(t).ids) for t in texts)
            tokens += n_tok
        else:
            n_tok = n_chars // CHARS_PER_TOKEN
        if n_tok > max_seq_len:
            report.too_long += 1
    report.tokens = tokens if tok is not None else None
    report.seconds = time.perf_counter() - t0
    return report


class DataPreviewed(Message):
    def __init__(self, preview: Preview) -> None:
        super().__init__()
        self.preview = preview


class DataReported(Message):
    def __init__(self, report: DataReport) -> None:
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
        self.report: DataReport | None = None
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
        path = self.train_path()
        if path is not None:
            self.start_preview(path)
            self.reveal(path)
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

    def train_path(self) -> Path | None:
        value = self.draft.get("data.train")
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, str) or not value.strip():
            return None
        return self.draft.resolve(value)

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
        p = self.train_path()
        if p is not None:
            self.start_preview(p)

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
        self.start_preview(path)
        self.refresh_errors()
        self.wizard.draft_changed("data.train")

    # --- preview ------------------------------------------------------------------------------

    def start_preview(self, path: Path) -> None:
        self.preview = None
        self.report = None
        show(self.query_one("#data-report", Static), "reading ...")
        self._preview_w = self._preview_worker(path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="data-preview")
    def _preview_worker(self, path: Path) -> Preview:
        preview = read_preview(path)
        if not get_current_worker().is_cancelled:
            self.post_message(DataPreviewed(preview))
        return preview

    @on(DataPreviewed)
    def _previewed(self, event: DataPreviewed) -> None:
        self.apply_preview(event.preview)

    def apply_preview(self, preview: Preview) -> None:
        if preview.path != self.train_path() or preview is self.preview:
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
        path = self.train_path()
        if path is None or self.preview is None or self.preview.error:
            return None
        tok = self.tokenizer_path()
        return (str(path), self.method(), str(self.draft.value("data.format")),
                tuple(sorted(self.mapped_columns().items())),
                int(self.draft.value("data.max_seq_len")) if isinstance(
                    self.draft.value("data.max_seq_len"), int) else 0, str(tok))

    def tokenizer_path(self) -> Path | None:
        for key in ("model.tokenizer", "model.path"):
            v = self.draft.get(key)
            if isinstance(v, str) and v:
                p = self.draft.resolve(v)
                if p is not None and p.exists():
                    return p
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
    def _run_report(self, key: tuple) -> DataReport:
        worker = get_current_worker()
        path, method, fmt, cols, max_len, _ = key
        report = compute_report(key, Path(path), method, fmt, dict(cols), max_len or 1024,
                                self.tokenizer_path(), cancelled=lambda: worker.is_cancelled)
        if not worker.is_cancelled:
            self.post_message(DataReported(report))
        return report

    @on(DataReported)
    def _reported(self, event: DataReported) -> None:
        if event.report.key != self._report_key:
            return
        self.set_report(event.report)

    def set_report(self, report: DataReport) -> None:
        self.report = report
        out = self.query_one("#data-report", Static)
        if report.error:
            show(out, Text(report.error, style="red"))
        else:
            t = Text()
            t.append(f"{report.rows:,} rows", style="bold")
            t.append(f", {human_count(report.chars)} characters, ")
            if report.tokens is not None:
                t.append(f"{human_count(report.tokens)} tokens")
            else:
                t.append(f"~{human_count(report.chars // CHARS_PER_TOKEN)} tokens "
                         "(estimated: the tokenizer is not known yet)")
            t.append(f"\n{report.duplicates} duplicate(s), ")
            approx = "" if report.tokens is not None else " (approx.)"
            t.append(f"{report.too_long} longer than max_seq_len{approx}",
                     style="yellow" if report.too_long else "")
            if report.bad:
                t.append(f"\n{report.bad} bad row(s)", style="red")
                t.append(f"; first: {report.first_bad}")
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
        path = self.train_path()
        if path is None:
            out.append(Problem("data.train", "required: pick a data file in the tree or type "
                               "its path"))
            return out
        if pv is not None and pv.error and path.exists():
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
            elif rep.bad and self.draft.value("data.on_bad_rows") == "fail":
                out.append(Problem("data.on_bad_rows",
                                   f"{rep.bad} bad row(s), first: {rep.first_bad}; fix them or "
                                   "choose skip"))
        return out
