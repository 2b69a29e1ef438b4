"""Training data: reading rows, recognising their shape, and checking them against the method.

Shapes (``data.format``) and the columns each needs:

- ``text``: ``text`` -- raw documents (cpt)
- ``prompt_completion``: ``prompt`` + ``completion`` (sft); ``instruction`` [+ ``input``] +
  ``output`` rows are read as this shape too
- ``messages``: ``messages`` = [{role, content}, ...]; ShareGPT ``conversations`` =
  [{from, value}, ...] is read as this shape too (sft)
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (dpo), strings or message lists

Files: .jsonl/.ndjson, .json (a list of rows), .csv/.tsv, .parquet, .txt/.md (a file per
document, or documents split by blank lines with ``split_paragraphs``), or a folder of these.
Everything here streams row by row and is pure Python (pyarrow only for parquet).
"""

from __future__ import annotations

import csv
import difflib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.profile import LoadedProfile, Problem

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "cpt": ("text",),
    "sft": ("prompt_completion", "messages"),
    "dpo": ("preference",),
}
DATA_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"}
MAX_REPORTED = 5


class DataError(Exception):
    """A problem in a data file, located by file and line (or row)."""

    def __init__(self, file: str, line: int | None, message: str):
        self.file, self.line, self.message = file, line, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


@dataclass
class Row:
    file: str
    line: int  # 1-based line (jsonl, csv, txt) or row number (json, parquet)
    data: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def data_files(path: Path) -> list[Path]:
    """The data files of a path: the file itself, or the data files of a folder, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(str(path), None, f"folder holds no data files ({', '.join(sorted(DATA_SUFFIXES))})")
        return files
    return [path]


def iter_raw_rows(path: Path, errors: list[DataError] | None = None) -> Iterator[Row]:
    """Rows of one file as dicts. Malformed rows raise DataError, or are appended to
    ``errors`` and skipped when a list is given."""
    for f in data_files(path):
        yield from _iter_file(f, errors)


def _bad(errors: list[DataError] | None, err: DataError) -> None:
    if errors is None:
        raise err
    errors.append(err)


def _iter_file(f: Path, errors: list[DataError] | None) -> Iterator[Row]:
    suffix = f.suffix.lower()
    name = str(f)
    try:
        size = f.stat().st_size
    except OSError as exc:
        raise DataError(name, None, f"cannot read: {exc.strerror}") from None
    if size == 0:
        raise DataError(name, None, "the file is empty")
    if suffix in (".jsonl", ".ndjson"):
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    _bad(errors, DataError(name, n, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); re-save the file as UTF-8"))
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    hint = " (the line looks cut off)" if exc.pos >= len(text.rstrip()) - 1 else ""
                    _bad(errors, DataError(name, n, f"not valid JSON: {exc.msg} at column {exc.colno}{hint}"))
                    continue
                if not isinstance(obj, dict):
                    _bad(errors, DataError(name, n, f"expected a JSON object per line, got {type(obj).__name__}"))
                    continue
                yield Row(name, n, obj)
    elif suffix == ".json":
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(name, None, f"not UTF-8 (at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataError(name, exc.lineno, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1:
                obj = lists[0]
        if not isinstance(obj, list):
            raise DataError(name, None, "expected a JSON list of row objects (or JSON lines in a .jsonl file)")
        for n, item in enumerate(obj, 1):
            if not isinstance(item, dict):
                _bad(errors, DataError(name, n, f"row {n}: expected an object, got {type(item).__name__}"))
                continue
            yield Row(name, n, item)
    elif suffix in (".csv", ".tsv"):
        csv.field_size_limit(sys.maxsize)
        with open(f, newline="", encoding="utf-8", errors="strict") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",", strict=True)
            try:
                for rec in reader:
                    line = reader.line_num
                    if None in rec:
                        _bad(errors, DataError(name, line, f"more fields than the {len(reader.fieldnames or [])} columns of the header (an unquoted delimiter?)"))
                        continue
                    yield Row(name, line, dict(rec))
            except csv.Error as exc:
                raise DataError(name, reader.line_num, f"CSV quoting error: {exc}") from None
            except UnicodeDecodeError as exc:
                raise DataError(name, reader.line_num + 1, f"not UTF-8 (at byte {exc.start} of the line)") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises several kinds for corrupt files
            raise DataError(name, None, f"not a readable Parquet file: {exc}") from None
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield Row(name, n, rec)
    elif suffix in (".txt", ".md"):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(name, None, f"not UTF-8 (at byte {exc.start})") from None
        yield Row(name, 1, {"text": text})
    else:
        raise DataError(name, None, f"unknown data file type {suffix!r}; expected one of {', '.join(sorted(DATA_SUFFIXES))}")


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def detect_format(columns: set[str]) -> str | None:
    if {"prompt", "chosen", "rejected"} <= columns or {"chosen", "rejected"} <= columns:
        return "preference"
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns or {"instruction", "output"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    return None


def missing_columns_message(fmt: str, columns: set[str], method: str) -> str:
    need = FORMAT_COLUMNS[fmt]
    missing = [c for c in need if c not in columns]
    found = ", ".join(sorted(columns)) or "none"
    parts = [f"{method} with {fmt} data needs columns {', '.join(need)}; found {found}"]
    for m in missing:
        close = difflib.get_close_matches(m, sorted(columns), n=1, cutoff=0.5)
        if close:
            parts.append(f"'{close[0]}' looks like '{m}': map it with data.columns: {{{m}: {close[0]}}}")
    return "; ".join(parts)


_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system", "bot": "assistant", "model": "assistant"}


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"{where}[{i}]: expected an object with role and content")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role not in _ROLE_MAP:
            raise ValueError(f"{where}[{i}].role: expected system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected text, got {type(content).__name__}")
        out.append({"role": _ROLE_MAP[role], "content": content})
    return out


def _text(value: Any, col: str) -> str:
    if value is None:
        raise ValueError(f"{col}: null")
    if not isinstance(value, str):
        raise ValueError(f"{col}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{col}: empty")
    return value


def normalize_row(data: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    """One raw row in the internal shape of ``fmt``; ValueError names the bad field."""
    get = {k: data.get(columns.get(k, k)) for k in
           ("text", "prompt", "completion", "instruction", "input", "output", "messages",
            "conversations", "chosen", "rejected", "system")}
    if fmt == "text":
        return {"text": _text(get["text"], columns.get("text", "text"))}
    if fmt == "prompt_completion":
        if get["prompt"] is None and get["instruction"] is not None:
            prompt = _text(get["instruction"], "instruction")
            if isinstance(get["input"], str) and get["input"].strip():
                prompt = f"{prompt}\n\n{get['input']}"
            return {"prompt": prompt, "completion": _text(get["output"], "output")}
        return {"prompt": _text(get["prompt"], columns.get("prompt", "prompt")),
                "completion": _text(get["completion"], columns.get("completion", "completion"))}
    if fmt == "messages":
        key = columns.get("messages", "messages")
        value = data.get(key) if key in data else get["conversations"]
        msgs = _messages(value, key)
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{key}: the last message must be the assistant's answer (it is what is learned)")
        return {"messages": msgs}
    if fmt == "preference":
        out: dict[str, Any] = {}
        for k in ("prompt", "chosen", "rejected"):
            v = get[k]
            col = columns.get(k, k)
            if k == "prompt" and v is None:
                out[k] = ""  # implicit prompt: chosen/rejected are whole conversations
                continue
            out[k] = _messages(v, col) if isinstance(v, list) else _text(v, col)
        return out
    raise ValueError(f"unknown format {fmt}")


@dataclass
class DataCheck:
    format: str
    rows: int
    bad: list[DataError]


def _first_row_format(row: Row, method: str, fmt: str | None, columns: dict[str, str]) -> str:
    """The format of the data (detected when ``fmt`` is None), checked against the method
    and the columns of the first row."""
    present = set(row.data) | {k for k, v in columns.items() if v in row.data}
    if fmt is None:
        fmt = detect_format(present)
        if fmt is None:
            wanted = " or ".join("/".join(FORMAT_COLUMNS[f]) for f in METHOD_FORMATS[method])
            raise DataError(row.file, row.line, f"cannot tell the data format from the columns "
                            f"{', '.join(sorted(row.data)) or 'none'}; {method} needs {wanted} "
                            "(set data.format and data.columns)")
    if fmt not in METHOD_FORMATS[method]:
        need = " or ".join(METHOD_FORMATS[method])
        raise DataError(row.file, None, f"{method} cannot train on {fmt} data; it needs {need} "
                        f"(columns {', '.join(FORMAT_COLUMNS[METHOD_FORMATS[method][0]])})")
    need: tuple[str, ...] = FORMAT_COLUMNS[fmt]
    if fmt == "prompt_completion" and {"instruction", "output"} <= present:
        need = ()
    elif fmt == "messages" and "conversations" in present:
        need = ()
    elif fmt == "preference":
        need = ("chosen", "rejected")  # the prompt may be inside the conversations
    if any(c not in present for c in need):
        raise DataError(row.file, row.line, missing_columns_message(fmt, set(row.data), method))
    return fmt


def check_file(path: Path, method: str, fmt: str, columns: dict[str, str], on_bad_rows: str) -> DataCheck:
    """Read every row of ``path``; find the format, and every malformed or unusable row."""
    errors: list[DataError] = []
    rows = 0
    resolved = None if fmt == "auto" else fmt
    first = True
    for row in iter_raw_rows(path, errors):
        if first:
            first = False
            resolved = _first_row_format(row, method, resolved, columns)
        try:
            normalize_row(row.data, resolved, columns)
        except ValueError as exc:
            errors.append(DataError(row.file, row.line, str(exc)))
            continue
        rows += 1
    if resolved is None:
        raise DataError(str(path), None, "no rows: the data holds no usable row")
    if rows == 0:
        first_bad = f"; first: {errors[0]}" if errors else ""
        raise DataError(str(path), None, f"no usable rows ({len(errors)} bad{first_bad})")
    return DataCheck(resolved, rows, errors)


def check_profile_data(lp: LoadedProfile) -> list[Problem]:
    """Problems with the profile's data files, for profile validation."""
    from engine.profile import Problem

    p = lp.profile
    problems: list[Problem] = []
    trains = p.data.train if isinstance(p.data.train, list) else [p.data.train]
    items = [("data.train", t) for t in trains]
    if p.data.validation:
        items.append(("data.validation", p.data.validation))
    fmt = p.data.format
    if fmt != "auto" and fmt not in METHOD_FORMATS[p.method.kind]:
        problems.append(Problem("data.format", f"{p.method.kind} cannot train on {fmt} data; it needs "
                                f"{' or '.join(METHOD_FORMATS[p.method.kind])}"))
        return problems
    for key, value in items:
        path = lp.resolve_path(value)
        if path is None or not path.exists():
            continue
        try:
            result = check_file(path, p.method.kind, fmt, p.data.columns, p.data.on_bad_rows)
        except DataError as exc:
            problems.append(Problem(key, str(exc)))
            continue
        if result.bad and p.data.on_bad_rows == "fail":
            shown = [str(e) for e in result.bad[:MAX_REPORTED]]
            more = len(result.bad) - len(shown)
            msg = f"{len(result.bad)} bad row(s): " + "; ".join(shown)
            if more:
                msg += f"; and {more} more"
            msg += " (fix them, or set data.on_bad_rows: skip to train without them)"
            problems.append(Problem(key, msg))
        elif result.bad:
            lp.warnings.append(f"{key}: {len(result.bad)} bad row(s) will be skipped, first: {result.bad[0]}")
    return problems


def load_rows(paths: list[Path], method: str, fmt: str, columns: dict[str, str],
              on_bad_rows: str) -> tuple[str, list[dict[str, Any]], list[DataError]]:
    """All usable rows of the given files in internal shape, plus the skipped bad rows."""
    rows: list[dict[str, Any]] = []
    bad: list[DataError] = []
    resolved = fmt
    for path in paths:
        check = check_file(path, method, resolved, columns, on_bad_rows)
        resolved = check.format
        if check.bad and on_bad_rows == "fail":
            raise check.bad[0]
        errors: list[DataError] = []
        for row in iter_raw_rows(path, errors):
            try:
                rows.append(normalize_row(row.data, resolved, columns))
            except ValueError:
                continue
        bad.extend(check.bad)
    return resolved, rows, bad
