"""Training data: reading rows, recognising their shape, and checking them against the method.

Shapes (``data.format``) and the columns each needs:

- ``text``: ``text`` -- raw documents (cpt)
- ``prompt_completion``: ``prompt`` + ``completion`` (sft); ``instruction`` [+ ``input``] +
  ``output`` rows are read as this shape too
- ``messages``: ``messages`` = [{role, content}, ...], with or without a system message;
  ShareGPT ``conversations`` = [{from, value}, ...] is read as this shape too (sft)
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (dpo), strings or message lists

Sources: .jsonl/.ndjson, .json (a list of rows), .csv/.tsv, .parquet, .txt/.md (a file per
document, or documents separated by blank lines with ``data.text_split: blank_lines``), a folder
of these, a folder written by ``datasets``' ``save_to_disk``, or ``hf:owner/name[:split]`` for a
hub dataset (streamed; needs network). Local files are read here row by row, so every bad row
is named by file and line and a large file never has to fit in memory (a JSON line is parsed by
orjson, with the json module deciding wherever the two could differ: see parse_json_line); the
``datasets`` library (and pyarrow for parquet) is imported only for the sources that need it.
"""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from orjson import loads as _orjson_loads

if TYPE_CHECKING:
    from engine.problems import Problem
    from engine.profile import LoadedProfile

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
FORMAT_METHOD = {"text": "cpt", "prompt_completion": "sft", "messages": "sft", "preference": "dpo"}
DATA_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"}
TEXT_SPLITS = ("file", "blank_lines")
HUB_PREFIX = "hf:"
MAX_REPORTED = 5
# One row larger than this is almost always a broken file (a JSON array on one line, old Mac
# line endings, an unclosed CSV quote), and reading it whole could exhaust memory.
MAX_ROW_BYTES = 16_000_000


class DataError(Exception):
    """A problem in a data file, located by file and line (or row)."""

    def __init__(self, file: str, line: int | None, message: str):
        self.file, self.line, self.message = file, line, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


@dataclass
class Row:
    file: str
    line: int  # 1-based line (jsonl, csv, txt) or row number (json, parquet, datasets)
    data: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def is_hub_name(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def data_files(path: str | Path) -> list[Path]:
    """The data files of a path: the file itself, a saved dataset folder as one source, or the
    data files of a folder, sorted."""
    path = Path(path)
    if is_hub_name(path) or is_saved_dataset(path):
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(str(path), None, f"folder holds no data files ({', '.join(sorted(DATA_SUFFIXES))})")
        return files
    return [path]


def iter_raw_rows(path: str | Path, errors: list[DataError] | None = None,
                  text_split: str = "file") -> Iterator[Row]:
    """Rows of a file or folder as dicts. Malformed rows raise DataError, or are appended to
    ``errors`` and skipped when a list is given."""
    for f in data_files(path):
        yield from iter_file_rows(f, errors, text_split)


def _bad(errors: list[DataError] | None, err: DataError) -> None:
    if errors is None:
        raise err
    errors.append(err)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def utf8_problem(raw: bytes, pos: int) -> str:
    """Why ``raw`` (a line, or a whole file) is not UTF-8 at byte ``pos``, and what to do."""
    head = raw[:4096]
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or head.count(b"\x00") > len(head) // 4:
        return "the file is UTF-16, not UTF-8; re-save it as UTF-8"
    hint = "re-save the file as UTF-8"
    start = raw.rfind(b"\n", 0, pos) + 1
    end = raw.find(b"\n", pos)
    try:
        raw[start:end if end >= 0 else len(raw)].decode("cp1252")
        hint = "it looks like Latin-1/Windows-1252 text: re-save the file as UTF-8"
    except UnicodeDecodeError:
        pass
    return f"not UTF-8 (byte 0x{raw[pos]:02x} at column {pos - start + 1}); {hint}"


def _line_of(raw: bytes, pos: int) -> int:
    return raw.count(b"\n", 0, pos) + 1


def read_line(fh: IO[bytes], name: str, n: int) -> tuple[bytes | None, DataError | None]:
    """The next line of a binary file, or an error for a line longer than MAX_ROW_BYTES (whose
    rest is skipped, never held in memory). (None, None) at the end of the file."""
    raw = fh.readline(MAX_ROW_BYTES + 1)
    if not raw:
        return None, None
    if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
        size = len(raw)
        while True:
            more = fh.readline(1 << 20)
            size += len(more)
            if not more or more.endswith(b"\n"):
                break
        return b"", DataError(name, n, f"the line is {_size(size)} long, over the {_size(MAX_ROW_BYTES)} "
                              "limit for one row (a JSON array belongs in a .json file; a file with "
                              "\\r line endings needs \\n)")
    return raw, None


def _has_float(obj: dict[str, Any]) -> bool:
    """Whether a parsed JSON object holds a float anywhere (see ``parse_json_line``)."""
    stack: list[Any] = [obj]
    while stack:  # a loop, not recursion: orjson accepts nesting deeper than Python's stack
        value = stack.pop()
        for x in value.values() if type(value) is dict else value:
            t = type(x)
            if t is float:
                return True
            if t is dict or t is list:
                stack.append(x)
    return False


def parse_json_line(raw: bytes, name: str, n: int) -> dict[str, Any]:
    """One JSON-lines row; DataError names what is wrong with it.

    orjson parses the line (3-5x faster than the json module), but the json module decides
    whenever the two could disagree: orjson refuses lone surrogates, NaN and Infinity, which
    json accepts, and turns integers over 64 bits into floats, so a row orjson refuses or
    whose result holds a float is parsed again by json. Every row therefore parses exactly as
    json parses it, and a bad row gets json's message."""
    try:
        obj = _orjson_loads(raw)
    except ValueError:  # orjson.JSONDecodeError
        pass
    else:
        if type(obj) is dict and not _has_float(obj):
            return obj
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(name, n, utf8_problem(raw, exc.start)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        stripped = text.rstrip()
        hint = " (the line looks cut off)" if exc.pos >= len(stripped) - 1 else ""
        if stripped.startswith("[") and n == 1:
            hint = " (a JSON array belongs in a .json file, a JSON-lines file holds one object per line)"
        msg = exc.msg.removesuffix(" at")
        raise DataError(name, n, f"not valid JSON: {msg} at column {exc.colno}{hint}") from None
    if not isinstance(obj, dict):
        hint = " (a JSON array belongs in a .json file)" if isinstance(obj, list) and n == 1 else ""
        raise DataError(name, n, f"expected a JSON object per line, got {_json_kind(obj)}{hint}")
    return obj


def _json_kind(obj: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def iter_jsonl(fh: IO[bytes], name: str, errors: list[DataError] | None, first_line: int = 1,
               end: int | None = None) -> Iterator[Row]:
    """Rows of a JSON-lines file from the current position to ``end`` (a byte offset at a line
    start) or the end of the file; ``first_line`` is the number of the first line read."""
    n = first_line - 1
    while end is None or fh.tell() < end:
        raw, err = read_line(fh, name, n + 1)
        if raw is None:
            break
        n += 1
        if err is not None:
            _bad(errors, err)
            continue
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            yield Row(name, n, parse_json_line(raw, name, n))
        except DataError as exc:
            _bad(errors, exc)


def _decoded_lines(fh: IO[bytes], name: str, state: dict[str, Any]) -> Iterator[str]:
    """Lines of a binary file as text for the csv module; non-UTF-8 lines are recorded in
    ``state['bad']`` (line -> reason) and passed on with replacement characters."""
    n = 0
    while True:
        raw, err = read_line(fh, name, n + 1)
        if raw is None:
            return
        n += 1
        state["line"] = n
        if err is not None:
            state["bad"][n] = err.message
            yield "\n"
            continue
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            state["bad"][n] = utf8_problem(raw, exc.start)
            yield raw.decode("utf-8", errors="replace")


def _iter_csv(f: Path, name: str, errors: list[DataError] | None, delimiter: str) -> Iterator[Row]:
    csv.field_size_limit(MAX_ROW_BYTES)
    state: dict[str, Any] = {"line": 0, "bad": {}}
    with open(f, "rb") as fh:
        reader = csv.reader(_decoded_lines(fh, name, state), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        last_line = 0
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                line = state["line"]
                msg = str(exc)
                if "field larger" in msg:
                    reason = (f"a field is longer than {_size(MAX_ROW_BYTES)}: an unclosed quote "
                              "(\") probably swallows the lines after it")
                elif "unexpected end of data" in msg:
                    reason = (f"a quoted field opened after line {last_line} is never closed "
                              "(an unmatched \")")
                else:
                    reason = f"CSV quoting error: {msg}; a quote inside a quoted field must be doubled (\"\")"
                err = DataError(name, line, reason)
                if header is None or errors is None or line == last_line:
                    raise err from None
                errors.append(err)
                last_line = line
                continue
            line = state["line"]
            span = range(last_line + 1, line + 1)
            last_line = line
            bad = next((state["bad"][n] for n in span if n in state["bad"]), None)
            if header is None:
                if bad:
                    raise DataError(name, line, f"header line: {bad}")
                header = [h.strip() for h in rec]
                if not any(header):
                    raise DataError(name, line, "the first line must be a header naming the columns")
                continue
            if bad:
                _bad(errors, DataError(name, span.start, bad))
                continue
            if not rec or rec == [""]:
                continue  # blank line
            if len(rec) != len(header):
                what = "more" if len(rec) > len(header) else "fewer"
                hint = " (an unquoted delimiter inside a field?)" if what == "more" else ""
                _bad(errors, DataError(name, span.start, f"{len(rec)} fields, {what} than the "
                                       f"{len(header)} columns of the header{hint}"))
                continue
            yield Row(name, span.start, dict(zip(header, rec, strict=True)))
        if header is None:
            raise DataError(name, None, "the file holds no header line")


def _read_utf8(f: Path, name: str) -> str:
    """A whole file as text (a UTF-8 byte-order mark dropped); DataError names the bad line."""
    raw = f.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(name, _line_of(raw, exc.start), utf8_problem(raw, exc.start)) from None


def _iter_text(f: Path, name: str, errors: list[DataError] | None, text_split: str) -> Iterator[Row]:
    if text_split == "file":
        try:
            text = _read_utf8(f, name)
        except DataError as exc:
            _bad(errors, exc)
            return
        yield Row(name, 1, {"text": text})
        return
    # blank_lines: a document is a run of non-blank lines
    with open(f, "rb") as fh:
        n = 0
        start = 0
        parts: list[str] = []
        broken: DataError | None = None
        while True:
            raw, err = read_line(fh, name, n + 1)
            if raw is None:
                break
            n += 1
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if err is None:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    err = DataError(name, n, utf8_problem(raw, exc.start))
                    line = "x"
            else:
                line = "x"
            if not line.strip():
                if parts or broken:
                    if broken:
                        _bad(errors, broken)
                    else:
                        yield Row(name, start, {"text": "".join(parts).rstrip("\r\n")})
                parts, broken = [], None
                continue
            if not parts and not broken:
                start = n
            if err is not None:
                broken = broken or err
            else:
                parts.append(line)
        if broken:
            _bad(errors, broken)
        elif parts:
            yield Row(name, start, {"text": "".join(parts).rstrip("\r\n")})


def _iter_parquet(f: Path, name: str) -> Iterator[Row]:
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


def _iter_saved_dataset(f: Path, name: str) -> Iterator[Row]:
    try:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(f))
    except Exception as exc:  # datasets raises many kinds for damaged folders
        raise DataError(name, None, f"not a readable saved dataset: {exc}") from None
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds), None)
        if split is None:
            raise DataError(name, None, "the saved dataset has no splits")
        ds = ds[split]
    for n, rec in enumerate(ds, 1):
        yield Row(name, n, dict(rec))


def _iter_hub(spec: str) -> Iterator[Row]:
    ident = spec[len(HUB_PREFIX):].strip("/")
    name_, _, split = ident.partition(":")
    if not name_:
        raise DataError(spec, None, "expected hf:owner/name or hf:owner/name:split")
    try:
        from datasets import load_dataset

        ds = load_dataset(name_, split=split or "train", streaming=True)
        it = iter(ds)
        n = 0
        for rec in it:
            n += 1
            yield Row(spec, n, dict(rec))
    except DataError:
        raise
    except Exception as exc:  # network, authentication, unknown dataset or split
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(spec, None, f"cannot stream the hub dataset {name_!r} (split "
                        f"{split or 'train'}): {first}; this needs network access (and HF_TOKEN "
                        "for gated data), or download it and point data.train at the files") from None


def iter_file_rows(f: Path, errors: list[DataError] | None, text_split: str = "file") -> Iterator[Row]:
    """Rows of one data source (a file, a saved dataset folder or a hub name)."""
    name = str(f)
    if is_hub_name(f):
        yield from _iter_hub(name)
        return
    if is_saved_dataset(f):
        yield from _iter_saved_dataset(f, name)
        return
    suffix = f.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(name, None, f"unknown data file type {suffix or '(none)'!r}; expected one of "
                        f"{', '.join(sorted(DATA_SUFFIXES))}")
    try:
        size = f.stat().st_size
    except OSError as exc:
        raise DataError(name, None, f"cannot read: {exc.strerror}") from None
    if size == 0:
        _bad(errors, DataError(name, None, "the file is empty"))
        return
    try:
        if suffix in (".jsonl", ".ndjson"):
            with open(f, "rb") as fh:
                yield from iter_jsonl(fh, name, errors)
        elif suffix == ".json":
            yield from _iter_json(f, name, errors)
        elif suffix in (".csv", ".tsv"):
            yield from _iter_csv(f, name, errors, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _iter_parquet(f, name)
        else:
            yield from _iter_text(f, name, errors, text_split)
    except OSError as exc:
        raise DataError(name, None, f"cannot read: {exc.strerror or exc}") from None


def _iter_json(f: Path, name: str, errors: list[DataError] | None) -> Iterator[Row]:
    text = _read_utf8(f, name)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            hint = " (one object per line is JSON lines: name the file .jsonl)"
        raise DataError(name, exc.lineno, f"not valid JSON: {exc.msg} at column {exc.colno}{hint}") from None
    del text  # the parsed rows are what is kept; free the big string
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(name, None, "expected a JSON list of row objects (or JSON lines in a .jsonl file)")
    for n, item in enumerate(obj, 1):
        if not isinstance(item, dict):
            _bad(errors, DataError(name, n, f"row {n}: expected an object, got {_json_kind(item)}"))
            continue
        yield Row(name, n, item)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def detect_format(columns: set[str]) -> str | None:
    """The row shape that a set of column names suggests, or None."""
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


def _content(value: Any) -> Any:
    """Message content as text; OpenAI-style lists of parts are joined."""
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if value is None:
        raise ValueError(f"column '{where}' is null; expected a list of messages")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {_json_kind(value)}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ValueError(f"{where}[{i}]: expected an object with role and content")
        role = msg.get("role", msg.get("from"))
        content = _content(msg.get("content", msg.get("value")))
        if role not in _ROLE_MAP:
            raise ValueError(f"{where}[{i}].role: expected system, user or assistant (or ShareGPT "
                             f"human/gpt), got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected text, got {_json_kind(content)}")
        out.append({"role": _ROLE_MAP[role], "content": content})
    return out


def _text(value: Any, col: str) -> str:
    if value is None:
        raise ValueError(f"column '{col}' is null; expected text")
    if not isinstance(value, str):
        raise ValueError(f"column '{col}': expected text, got {_json_kind(value)}")
    if not value.strip():
        raise ValueError(f"column '{col}' is empty")
    return value


def normalize_row(data: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    """One raw row in the internal shape of ``fmt``; ValueError names the bad field."""

    def get(k: str) -> Any:  # looked up when needed: most rows need two or three columns
        return data.get(columns.get(k, k))

    if fmt == "text":
        return {"text": _text(get("text"), columns.get("text", "text"))}
    if fmt == "prompt_completion":
        if get("prompt") is None and get("instruction") is not None:
            prompt = _text(get("instruction"), columns.get("instruction", "instruction"))
            if isinstance(get("input"), str) and get("input").strip():
                prompt = f"{prompt}\n\n{get('input')}"
            return {"prompt": prompt, "completion": _text(get("output"), columns.get("output", "output"))}
        return {"prompt": _text(get("prompt"), columns.get("prompt", "prompt")),
                "completion": _text(get("completion"), columns.get("completion", "completion"))}
    if fmt == "messages":
        key = columns.get("messages", "messages")
        if key in data:
            value, where = data[key], key
        else:
            where = columns.get("conversations", "conversations")
            value = get("conversations")
        msgs = _messages(value, where)
        if isinstance(get("system"), str) and get("system").strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": get("system")})
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer (it is what is learned)")
        return {"messages": msgs}
    if fmt == "preference":
        out: dict[str, Any] = {}
        for k in ("prompt", "chosen", "rejected"):
            v = get(k)
            col = columns.get(k, k)
            if k == "prompt" and v is None:
                out[k] = ""  # implicit prompt: chosen/rejected are whole conversations
                continue
            out[k] = _messages(v, col) if isinstance(v, list) else _text(v, col)
        return out
    raise ValueError(f"unknown format {fmt}")


def row_texts(row: dict[str, Any]) -> list[str]:
    """Every piece of text of a row in internal shape, in a fixed order."""
    out: list[str] = []
    for value in row.values():
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(m["content"] for m in value)
    return out


def map_texts(row: dict[str, Any], fn) -> dict[str, Any]:
    """A copy of a row in internal shape with ``fn`` applied to every piece of text."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, str):
            out[key] = fn(value)
        elif isinstance(value, list):
            out[key] = [{"role": m["role"], "content": fn(m["content"])} for m in value]
        else:
            out[key] = value
    return out


@dataclass
class DataCheck:
    format: str
    rows: int
    bad: list[DataError]


def resolve_format(row: Row, method: str | None, fmt: str | None, columns: dict[str, str]) -> str:
    """The format of the data (detected when ``fmt`` is None), checked against the method
    (any method when None) and the columns of the first row."""
    present = set(row.data) | {k for k, v in columns.items() if v in row.data}
    if fmt is None:
        fmt = detect_format(present)
        if fmt is None:
            formats = METHOD_FORMATS[method] if method else tuple(FORMAT_COLUMNS)
            wanted = " or ".join("/".join(FORMAT_COLUMNS[f]) for f in formats)
            raise DataError(row.file, row.line, f"cannot tell the data format from the columns "
                            f"{', '.join(sorted(row.data)) or 'none'}; {method or 'zerotune'} needs "
                            f"{wanted} (set data.format and map your columns with data.columns)")
    if method and fmt not in METHOD_FORMATS[method]:
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
        raise DataError(row.file, row.line, missing_columns_message(fmt, set(row.data), method or FORMAT_METHOD[fmt]))
    return fmt


_first_row_format = resolve_format  # older name


def check_file(path: Path, method: str, fmt: str, columns: dict[str, str], on_bad_rows: str,
               text_split: str = "file") -> DataCheck:
    """Read every row of ``path``; find the format, and every malformed or unusable row."""
    errors: list[DataError] = []
    rows = 0
    resolved = None if fmt == "auto" else fmt
    first = True
    for row in iter_raw_rows(path, errors, text_split):
        if first:
            first = False
            resolved = resolve_format(row, method, resolved, columns)
        try:
            normalize_row(row.data, resolved, columns)
        except ValueError as exc:
            errors.append(DataError(row.file, row.line, str(exc)))
            continue
        rows += 1
    if resolved is None or rows == 0:
        raise no_rows_error(str(path), errors)
    return DataCheck(resolved, rows, errors)


def no_rows_error(name: str, errors: list[DataError]) -> DataError:
    if not errors:
        return DataError(name, None, "no rows: the data holds no usable row")
    first = errors[0]
    if len(errors) == 1 and first.file == name and first.line is None:
        return first
    return DataError(name, None, f"no usable rows ({len(errors)} bad; first: {first})")


def check_profile_data(lp: LoadedProfile) -> list[Problem]:
    """Problems with the profile's data files, for profile validation."""
    from engine.problems import Problem

    p = lp.profile
    problems: list[Problem] = []
    trains = p.data.train if isinstance(p.data.train, list) else [p.data.train]
    items = [("data.train", t) for t in trains]
    if p.data.validation:
        items.append(("data.validation", p.data.validation))
    fmt = p.data.format
    text_split = getattr(p.data, "text_split", "file")
    if fmt != "auto" and fmt not in METHOD_FORMATS[p.method.kind]:
        problems.append(Problem("data.format", f"{p.method.kind} cannot train on {fmt} data; it needs "
                                f"{' or '.join(METHOD_FORMATS[p.method.kind])}"))
        return problems
    for key, value in items:
        if is_hub_name(value):
            continue  # streamed at prep time; checking it here would need the network
        path = lp.resolve_path(value)
        if path is None or not path.exists():
            continue
        try:
            result = check_file(path, p.method.kind, fmt, p.data.columns, p.data.on_bad_rows, text_split)
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


def iter_rows(paths: Iterable[str | Path], method: str | None, fmt: str, columns: dict[str, str],
              on_bad_rows: str, bad: list[DataError], text_split: str = "file",
              formats: list[str] | None = None) -> Iterator[tuple[Row, dict[str, Any]]]:
    """(raw row, row in internal shape) for every usable row of ``paths``, in one pass.

    With ``on_bad_rows='fail'`` the first bad row raises DataError; with ``skip`` bad rows are
    appended to ``bad``. The resolved format is appended to ``formats`` once known."""
    resolved = None if fmt == "auto" else fmt
    errors: list[DataError] | None = None if on_bad_rows == "fail" else bad
    for path in paths:
        usable = 0
        start = len(bad)
        for row in iter_raw_rows(path, errors, text_split):
            if resolved is None or usable == 0:
                resolved = resolve_format(row, method, resolved, columns)
                if formats is not None and not formats:
                    formats.append(resolved)
            try:
                shaped = normalize_row(row.data, resolved, columns)
            except ValueError as exc:
                err = DataError(row.file, row.line, str(exc))
                if errors is None:
                    raise err from None
                errors.append(err)
                continue
            usable += 1
            yield row, shaped
        if usable == 0:
            raise no_rows_error(str(path), bad[start:])


def load_rows(paths: list[Path], method: str, fmt: str, columns: dict[str, str],
              on_bad_rows: str, text_split: str = "file") -> tuple[str, list[dict[str, Any]], list[DataError]]:
    """All usable rows of the given files in internal shape, plus the skipped bad rows."""
    bad: list[DataError] = []
    formats: list[str] = []
    rows = [shaped for _, shaped in iter_rows(paths, method, fmt, columns, on_bad_rows, bad,
                                              text_split, formats)]
    return (formats[0] if formats else fmt), rows, bad
