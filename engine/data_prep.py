"""Data preparation: the ``data.prep`` pipeline, its cache and its fingerprint.

Steps, always in this order (each sees only the rows the previous ones kept):

1. ``read``        rows read and put in the method's shape; malformed rows follow ``data.on_bad_rows``
2. ``normalize``   Unicode NFC; no zero-width characters or stray control characters; \\r\\n as \\n;
                   no trailing spaces; at most one blank line in a row (``prep.normalize``)
3. ``length``      drop rows outside ``min_chars``/``max_chars`` and ``min_tokens``/``max_tokens``
4. ``dedup``       drop exact duplicates (after normalisation) (``prep.dedup``)
5. ``near_dedup``  drop near-duplicates: MinHash signatures (datasketch) of word 3-grams, banded
                   as datasketch's MinHashLSH chooses for the threshold, kept in Bloom filters
                   (the LSHBloom scheme), so a billion rows need megabytes, not gigabytes
6. ``pii``         replace personal data and secrets by typed placeholders (``prep.scrub_pii``)
7. ``blocklist``   drop rows containing a blocklisted word or phrase (``prep.blocklist``)
8. ``split``       seeded train/validation split of ``validation_split`` (stratified by
                   ``prep.label_column`` when set), unless ``data.validation`` is given; then that
                   file goes through the same steps and rows it shares with train are dropped

The result is cached under ``<workspace>/runs/.cache/data/<fingerprint>/`` (``train.jsonl``,
``validation.jsonl``, ``report.json``). The fingerprint covers the bytes of every input file
and every setting that changes the output, so the same data and settings are prepared once and
a run records exactly what it trained on (``prep_fingerprint``).

Large inputs stream: rows go through worker processes in chunks (byte ranges of a JSON-lines
file are read by the workers themselves) and come back in order, so the result does not
depend on the number of workers and memory stays bounded by a few chunks plus the duplicate
indexes (8 bytes a row for exact duplicates, a few bytes a row for near-duplicates).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import unicodedata
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.data_formats import (
    DataError,
    FORMAT_METHOD,
    data_files,
    is_hub_name,
    iter_raw_rows,
    map_texts,
    no_rows_error,
    normalize_row,
    parse_json_line,
    read_line,
    resolve_format,
    row_texts,
)
from engine.data_report import EXAMPLES_PER_KIND, DataReport, LengthStats
import itertools

if TYPE_CHECKING:
    from engine.profile import LoadedProfile, Profile

PREP_VERSION = 1  # bump when the same input and settings would give a different output
NUM_PERM = 128
CHUNK_BYTES = 4 << 20
BATCH_ROWS = 2000
PARALLEL_MIN_BYTES = 64 << 20  # below this, one process is faster than starting workers
CHARS_PER_TOKEN = 4  # for estimates when no tokenizer is given
MAX_BAD_KEPT = 1000  # per chunk
MAX_BAD_EXAMPLES = 100  # in a report
STEP_NAMES = ("read", "normalize", "length", "dedup", "near_dedup", "pii", "blocklist", "split")


class PrepError(Exception):
    """Settings that cannot be prepared (exit 2), e.g. a token limit without a tokenizer."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class PrepSettings:
    """Everything that decides what preparation does; built from a profile or CLI flags."""

    train: list[str]
    validation: str | None = None
    method: str | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    text_split: str = "file"
    on_bad_rows: str = "fail"
    normalize: bool = True
    min_chars: int = 0
    max_chars: int | None = None
    min_tokens: int = 0
    max_tokens: int | None = None
    dedup: bool = False
    near_dedup: bool = False
    near_dedup_threshold: float = 0.85
    scrub_pii: bool = False
    blocklist: list[str] = field(default_factory=list)  # phrases, not the file
    blocklist_file: str | None = None
    label_column: str | None = None
    validation_split: float = 0.0
    seed: int = 42
    max_seq_len: int = 0
    tokenizer: str | None = None
    write: bool = True  # prep writes the prepared rows; inspect only measures
    workers: int | None = None

    @classmethod
    def from_profile(cls, lp: LoadedProfile) -> PrepSettings:
        p = lp.profile
        d, prep = p.data, p.data.prep
        trains = d.train if isinstance(d.train, list) else [d.train]
        resolve = lambda v: v if v is None or is_hub_name(v) else str(lp.resolve_path(v))  # noqa: E731
        blocklist_file = resolve(prep.blocklist)
        return cls(
            train=[resolve(t) for t in trains], validation=resolve(d.validation),
            method=p.method.kind, format=d.format, columns=dict(d.columns),
            text_split=getattr(d, "text_split", "file"), on_bad_rows=d.on_bad_rows,
            normalize=prep.normalize, min_chars=prep.min_chars, max_chars=prep.max_chars,
            min_tokens=getattr(prep, "min_tokens", 0), max_tokens=getattr(prep, "max_tokens", None),
            dedup=prep.dedup, near_dedup=prep.near_dedup, near_dedup_threshold=prep.near_dedup_threshold,
            scrub_pii=prep.scrub_pii, blocklist=read_blocklist(blocklist_file) if blocklist_file else [],
            blocklist_file=blocklist_file, label_column=getattr(prep, "label_column", None),
            validation_split=d.validation_split, seed=p.seed, max_seq_len=d.max_seq_len,
            tokenizer=profile_tokenizer(lp),
        )

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the prepared rows (for the fingerprint)."""
        token_filter = bool(self.min_tokens or self.max_tokens)
        return {
            "version": PREP_VERSION, "method": self.method, "format": self.format,
            "columns": dict(sorted(self.columns.items())), "text_split": self.text_split,
            "on_bad_rows": self.on_bad_rows, "normalize": self.normalize, "min_chars": self.min_chars,
            "max_chars": self.max_chars, "min_tokens": self.min_tokens, "max_tokens": self.max_tokens,
            "tokenizer": _tokenizer_identity(self.tokenizer) if token_filter else None,
            "dedup": self.dedup, "near_dedup": self.near_dedup,
            "near_dedup_threshold": self.near_dedup_threshold if self.near_dedup else None,
            "num_perm": NUM_PERM if self.near_dedup else None, "scrub_pii": self.scrub_pii,
            "blocklist": sorted(self.blocklist), "label_column": self.label_column,
            "validation_split": 0.0 if self.validation else self.validation_split,
            "seed": self.seed, "has_validation_file": bool(self.validation),
        }


def read_blocklist(path: str | Path) -> list[str]:
    """Words and phrases, one a line; blank lines and lines starting with # are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(path), None, f"cannot read the blocklist: {exc}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def profile_tokenizer(lp: LoadedProfile) -> str | None:
    """A local tokenizer for the profile's model, if there is one (hub ids are not fetched)."""
    from engine.profile import model_location

    for value in (lp.profile.model.tokenizer, lp.profile.model.path):
        loc = model_location(value, lp.base_dir)
        if loc.kind == "local" and loc.value and _tokenizer_file(Path(loc.value)):
            return loc.value
    return None


def _tokenizer_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".json":
        return path
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    return None


def _tokenizer_identity(path: str | None) -> str | None:
    if not path:
        return None
    f = _tokenizer_file(Path(path))
    return file_sha256(f) if f else path


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_files(settings: PrepSettings) -> list[tuple[str, str]]:
    """(role, source) of every input in reading order: train files, then the validation file."""
    out: list[tuple[str, str]] = []
    for t in settings.train:
        out += [("train", str(f)) for f in data_files(t)]
    if settings.validation:
        out += [("validation", str(f)) for f in data_files(settings.validation)]
    return out


def fingerprint(settings: PrepSettings, file_hashes: dict[str, str] | None = None) -> str:
    """Hash of the input bytes (in order) and the output settings: 16 hex digits.

    ``file_hashes`` (path -> sha256 hex, as the runner computes for environment.json) avoids
    reading the files twice. Hub datasets count by name: they are not pinned by their bytes."""
    h = hashlib.sha256()
    for role, source in input_files(settings):
        if is_hub_name(source):
            digest = source
        elif Path(source).is_dir():  # a saved dataset: every file in it
            digest = hashlib.sha256("".join(
                file_sha256(f) for f in sorted(Path(source).rglob("*")) if f.is_file()).encode()).hexdigest()
        else:
            digest = (file_hashes or {}).get(source) or file_sha256(Path(source))
        h.update(f"{role}:{digest}\n".encode())
    h.update(json.dumps(settings.output_settings(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def prep_fingerprint(lp: LoadedProfile, file_hashes: dict[str, str] | None = None) -> str:
    """The data fingerprint of a profile: input bytes + prep settings (for environment.json and
    the history row). Pass the runner's per-file sha256 map to avoid hashing the data again."""
    return fingerprint(PrepSettings.from_profile(lp), file_hashes)


def cache_root(workspace: str | Path) -> Path:
    return Path(workspace) / "runs" / ".cache" / "data"


# --------------------------------------------------------------------------------------------
# Row steps (pure functions, run in the workers)
# --------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\r]")
_FIX_ASCII = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r\n?|[ \t]+(?=\n)|\n{3,}")
_UNICODE_FIXES = {**dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None),
                  **dict.fromkeys(map(ord, "\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                                           "\u2008\u2009\u200a\u202f\u205f\u3000"), " "),
                  ord("\u2028"): "\n", ord("\u2029"): "\n"}


def _fix(m: re.Match[str]) -> str:
    s = m.group(0)
    if s[0] == "\r":
        return "\n"
    if s[0] == "\n":
        return "\n\n"
    return ""


_UNICODE_SPECIAL = re.compile("[" + "".join(chr(c) for c in _UNICODE_FIXES) + "]")


def normalize_text(text: str) -> str:
    """NFC, no zero-width or control characters, \\n line ends, no trailing spaces, at most one
    blank line in a row, no leading or trailing whitespace."""
    if not text.isascii():
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if _UNICODE_SPECIAL.search(text):  # translate() is slow on non-ASCII text: only if needed
            text = text.translate(_UNICODE_FIXES)
    # substring tests first: the substitution scans slowly and most text needs none
    if _CONTROL.search(text) or " \n" in text or "\t\n" in text or "\n\n\n" in text:
        text = _FIX_ASCII.sub(_fix, text)
        if "\r" in text or " \n" in text:  # "\r \n" and friends: a second pass settles them
            text = _FIX_ASCII.sub(_fix, text)
    return text.strip()


_K1, _K2 = 0x9E3779B1, 0x85EBCA77


class _Sketcher:
    """MinHash signatures (datasketch) of a text's word 3-grams, cut into LSH band keys."""

    def __init__(self, bands: int, rows: int):
        import numpy as np
        from datasketch import MinHash

        self.np = np
        # one sketch, cleared for each row; int() passes our 32-bit shingle hashes through
        self.sketch = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int, scheme="affine32")
        self.bands, self.rows = bands, rows
        rng = np.random.RandomState(7)
        self.mult = (rng.randint(1, 1 << 62, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
        self.band_salt = np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)

    def band_keys(self, text: str):
        """The band keys (a uint64 array), or None for a text without words."""
        np = self.np
        words = text.lower().encode("utf-8", "surrogatepass").split()
        if not words:
            return None
        h = np.fromiter(map(zlib.crc32, words), dtype=np.uint32, count=len(words))
        if len(h) >= 3:
            h = (h[:-2] * np.uint32(_K1)) ^ (h[1:-1] * np.uint32(_K2)) ^ h[2:]
        m = self.sketch
        m.clear()
        m.update_batch(h.tolist())
        hv = m.hashvalues[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        return (hv * self.mult).sum(axis=1, dtype=np.uint64) + self.band_salt


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class NearDupIndex:
    """The LSHBloom index: one Bloom filter (rbloom) over every band key seen. A row whose band
    key was seen before is a near-duplicate candidate, as in datasketch's MinHashLSHBloom;
    filters are added as it fills, so the false-positive rate holds for any number of rows."""

    def __init__(self, expected_rows: int, bands: int, error_rate: float = 1e-6):
        from rbloom import Bloom

        self._Bloom = Bloom
        self.error_rate = error_rate
        self.capacity = max(expected_rows, 10_000) * bands
        self.filters = [Bloom(self.capacity, error_rate)]
        self.used = 0

    def seen_or_add(self, keys: list[int]) -> bool:
        for f in self.filters:
            for k in keys:
                if k in f:
                    return True
        if self.used + len(keys) > self.capacity:
            self.capacity *= 2
            self.filters.append(self._Bloom(self.capacity, self.error_rate))
            self.used = 0
        last = self.filters[-1]
        for k in keys:
            last.add(k)
        self.used += len(keys)
        return False


class TokenCounter:
    """Token counts with a local tokenizer (tokenizers' fast Rust implementation)."""

    def __init__(self, path: str):
        f = _tokenizer_file(Path(path))
        if f is not None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(f))
            self._fast = True
        else:
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # transformers raises many kinds for a bad folder
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise PrepError(f"cannot load a tokenizer from {path}: {first} (give a folder with "
                                "tokenizer.json, the file itself, or a model in the local cache)") from None
            self._fast = False

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self._fast:
            return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [len(ids) for ids in self._tok(texts, add_special_tokens=False)["input_ids"]]


@dataclass
class ChunkResult:
    """What the workers send back for one chunk: per kept row a tuple, plus counts and times."""

    lines: int = 0  # lines consumed (byte-range chunks), to number the next chunk's lines
    relative: bool = False  # row lines count from the chunk start
    rows: list[tuple] = field(default_factory=list)
    bad: list[tuple[str, int | None, str]] = field(default_factory=list)
    bad_count: int = 0
    read: int = 0
    normalized: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # per row, as arrays: unpickling millions of big Python ints would cost the main process
    hashes: Any = None  # uint64 [rows]
    bands: Any = None  # uint64 [rows, bands], or None without near-duplicate detection
    no_bands: list[int] = field(default_factory=list)  # rows without words (no band keys)


# Row tuple fields
R_LINE, R_FILE, R_CHARS, R_TOKENS, R_HASH, R_BANDS, R_LABEL, R_PII, R_BLOCKED, R_PAYLOAD, R_SHORT = range(11)


class RowProcessor:
    """The per-row steps 2-7 (their decisions are applied in order by the main process)."""

    def __init__(self, ctx: dict[str, Any]):
        self.s: PrepSettings = ctx["settings"]
        self.fmt: str = ctx["format"]
        self.sketcher = _Sketcher(*ctx["lsh"]) if ctx.get("lsh") else None
        self.tokens = TokenCounter(self.s.tokenizer) if self.s.tokenizer else None
        from engine.data_pii import Scrubber, mask

        self.scrubber = Scrubber()
        self.detect_pii = ctx.get("detect_pii", True)
        self.mask = mask
        self.phrases = [p.lower() for p in self.s.blocklist]
        alternatives = "|".join(re.escape(p) for p in self.phrases)
        self.block = re.compile(r"(?<!\w)(?:" + alternatives + r")(?!\w)") if self.phrases else None

    def _blocked(self, low: str) -> bool:
        if len(self.phrases) <= 32 and not any(p in low for p in self.phrases):
            return False  # substring tests are much faster than the expression; it confirms
        return self.block.search(low) is not None

    def process(self, rows: Iterator[tuple[str, int, dict[str, Any]]], result: ChunkResult) -> None:
        s, fmt = self.s, self.fmt
        t = result.seconds
        clock = time.process_time
        pending: list[tuple] = []
        for name, line, data in rows:
            t0 = clock()
            try:
                shaped = normalize_row(data, fmt, s.columns)
            except ValueError as exc:
                result.bad_count += 1
                if len(result.bad) < MAX_BAD_KEPT:
                    result.bad.append((name, line, str(exc)))
                continue
            result.read += 1
            label = None
            if s.label_column:
                v = data.get(s.label_column)
                label = "(missing)" if v is None or v == "" else str(v)
            t1 = clock()
            t["read"] = t.get("read", 0.0) + (t1 - t0)
            if s.normalize:
                fixed = map_texts(shaped, normalize_text)
                if fixed != shaped:
                    result.normalized += 1
                    shaped = fixed
            texts = row_texts(shaped)
            joined = "\n".join(texts)
            t2 = clock()
            t["normalize"] = t.get("normalize", 0.0) + (t2 - t1)
            chars = len(joined)
            short = not joined.strip()
            canon = json.dumps(shaped, ensure_ascii=False)
            h = int.from_bytes(hashlib.blake2b(canon.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            t3 = clock()
            t["dedup"] = t.get("dedup", 0.0) + (t3 - t2)
            bands = self.sketcher.band_keys(joined) if self.sketcher else None
            t4 = clock()
            t["near_dedup"] = t.get("near_dedup", 0.0) + (t4 - t3)
            pii: dict[str, Any] | None = None
            found: list = []
            if self.detect_pii and self.scrubber.find(joined):
                def scrub(x: str, found: list = found) -> str:
                    out, hits = self.scrubber.scrub(x)
                    found.extend(hits)
                    return out

                scrubbed = map_texts(shaped, scrub)
                counts = Counter(hit.kind for hit in found)
                pii = {"counts": dict(counts),
                       "examples": [(hit.kind, self.mask(hit.value, hit.kind)) for hit in found[:4]]}
                if s.scrub_pii:
                    shaped = scrubbed
                    canon = json.dumps(shaped, ensure_ascii=False)
                    joined = "\n".join(row_texts(shaped))
            t5 = clock()
            t["pii"] = t.get("pii", 0.0) + (t5 - t4)
            blocked = bool(self.block and self._blocked(joined.lower()))
            t6 = clock()
            t["blocklist"] = t.get("blocklist", 0.0) + (t6 - t5)
            pending.append([line, name, chars, None, h, bands, label, pii, blocked,
                            canon if s.write else joined[:120], short, joined if self.tokens else None])
        if self.tokens:
            t0 = clock()
            counts = self.tokens.count([r[-1] for r in pending])
            for r, n in zip(pending, counts, strict=True):
                r[R_TOKENS] = n
            t["length"] = t.get("length", 0.0) + (clock() - t0)
        import numpy as np

        result.hashes = np.fromiter((r[R_HASH] for r in pending), dtype=np.uint64, count=len(pending))
        if self.sketcher is not None:
            zero = np.zeros(self.sketcher.bands, dtype=np.uint64)
            result.no_bands = [i for i, r in enumerate(pending) if r[R_BANDS] is None]
            result.bands = (np.stack([zero if r[R_BANDS] is None else r[R_BANDS] for r in pending])
                            if pending else np.zeros((0, self.sketcher.bands), dtype=np.uint64))
        for r in pending:
            r[R_HASH] = r[R_BANDS] = None
        result.rows.extend(tuple(r[:-1]) for r in pending)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------

_WORKER: RowProcessor | None = None


def _init_worker(ctx: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = RowProcessor(ctx)


def _run_range(task: tuple[str, int, int]) -> ChunkResult:
    """A byte range of a JSON-lines file, read and processed by a worker."""
    path, start, end = task
    result = ChunkResult(relative=True)
    bad: list[tuple[str, int | None, str]] = []

    def rows() -> Iterator[tuple[str, int, dict[str, Any]]]:
        clock = time.process_time
        spent = 0.0
        with open(path, "rb") as fh:
            fh.seek(start)
            n = 0
            while fh.tell() < end:
                t0 = clock()
                raw, err = read_line(fh, path, n + 1)
                if raw is None:
                    break
                n += 1
                if err is None:
                    if start == 0 and n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    if not raw.strip():
                        continue
                    try:
                        row = parse_json_line(raw, path, n)
                        spent += clock() - t0
                        yield path, n, row
                        continue
                    except DataError as exc:
                        err = exc
                bad.append((path, n, err.message))
            result.lines = n
        result.seconds["read"] = result.seconds.get("read", 0.0) + spent

    assert _WORKER is not None
    _WORKER.process(rows(), result)
    result.bad_count += len(bad)
    result.bad = sorted(bad + result.bad, key=lambda b: b[1] or 0)[:MAX_BAD_KEPT]
    return result


def _run_batch(batch: list[tuple[str, int, dict[str, Any]]]) -> ChunkResult:
    """Rows already read by the main process (formats other than JSON lines)."""
    result = ChunkResult()
    assert _WORKER is not None
    _WORKER.process(iter(batch), result)
    return result


def _byte_ranges(path: Path, size: int) -> list[tuple[str, int, int]]:
    """Chunks of about CHUNK_BYTES that start and end at line starts."""
    bounds = [0]
    with open(path, "rb") as fh:
        pos = CHUNK_BYTES
        while pos < size:
            fh.seek(pos)
            while True:  # to the next line start, in pieces: a line may be huge
                piece = fh.readline(1 << 20)
                if not piece or piece.endswith(b"\n"):
                    break
            nxt = fh.tell()
            if nxt >= size:
                break
            if nxt > bounds[-1]:
                bounds.append(nxt)
            pos = max(nxt, pos) + CHUNK_BYTES
    bounds.append(size)
    return [(str(path), a, b) for a, b in itertools.pairwise(bounds) if b > a]


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Decisions across all rows, in input order (main process)."""

    near: NearDupIndex | None
    # row hash -> where it was first seen (file index << 40 | line): 8-byte keys, no strings
    seen: dict[int, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    chars: array = field(default_factory=lambda: array("q"))
    tokens: array = field(default_factory=lambda: array("q"))
    label_ids: dict[str, int] = field(default_factory=dict)
    train_labels: array = field(default_factory=lambda: array("i"))
    kept: int = 0


class Pipeline:
    """Runs the steps over every input; ``run()`` returns the report (and writes the output
    files into ``out_dir`` when ``settings.write``)."""

    def __init__(self, settings: PrepSettings, out_dir: Path | None = None, mode: str = "prep",
                 progress=None):
        self.s = settings
        self.out_dir = out_dir
        self.mode = mode
        self.progress = progress
        self.near_on = settings.near_dedup or mode == "inspect"
        self.report = DataReport(
            mode=mode, sources=[*settings.train] + ([settings.validation] if settings.validation else []),
            max_seq_len=settings.max_seq_len, label_column=settings.label_column,
            near_dedup_threshold=settings.near_dedup_threshold if self.near_on else 0.0,
            tokenizer=settings.tokenizer)
        for name in STEP_NAMES:
            self.report.step(name)
        self.format: str | None = None if settings.format == "auto" else settings.format
        self._main_seconds: Counter[str] = Counter()

    # ----------------------------------------------------------------------------------------
    def run(self) -> DataReport:
        s, rep = self.s, self.report
        started = time.perf_counter()
        if (s.min_tokens or s.max_tokens) and not s.tokenizer:
            raise PrepError("data.prep.min_tokens/max_tokens need a tokenizer: set model.tokenizer, or a "
                            "local model.path with tokenizer.json (or use min_chars/max_chars)")
        if s.tokenizer:
            TokenCounter(s.tokenizer)  # a bad tokenizer is bad input, reported before any work
        inputs = input_files(s)
        total_bytes = sum(Path(src).stat().st_size for _, src in inputs
                          if not is_hub_name(src) and Path(src).is_file())
        lsh = lsh_params(s.near_dedup_threshold) if self.near_on else None
        # rows are rarely under 400 bytes; if they are, the index adds a filter as it fills
        state = _State(near=NearDupIndex(max(10_000, total_bytes // 400), lsh[0]) if lsh else None)
        workers = self._worker_count(total_bytes)
        rep.workers = workers
        tmp: dict[str, Path | None] = {"train": None, "validation": None}
        handles: dict[str, Any] = {}
        if s.write and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for role in ("train", "validation"):
                tmp[role] = self.out_dir / f".{role}.all.jsonl"
                handles[role] = open(tmp[role], "w", encoding="utf-8", newline="\n")
        pool = None
        try:
            for role, src in inputs:
                if not self._first_format(src):
                    continue  # skip mode: a file without a usable row only adds bad rows
                if pool is None and workers > 1:
                    pool = self._pool(workers, lsh)
                self._consume(self._chunks(src, pool, lsh), state, role, handles.get(role))
            if rep.rows_read == rep.rows_bad:
                first = f"; first: {rep.bad_examples[0]}" if rep.bad_examples else ""
                where = ", ".join(s.train)
                raise DataError(where, None, f"no usable rows ({rep.rows_bad:,} bad{first})")
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            for fh in handles.values():
                fh.close()
        self._finish(state, tmp)
        rep.seconds = round(time.perf_counter() - started, 3)
        return rep

    def _worker_count(self, total_bytes: int) -> int:
        if self.s.workers is not None:
            return max(1, self.s.workers)
        if total_bytes < PARALLEL_MIN_BYTES:
            return 1
        return max(1, min(os.cpu_count() or 1, 8))

    def _ctx(self, lsh: tuple[int, int] | None) -> dict[str, Any]:
        return {"settings": self.s, "format": self.format, "lsh": lsh,
                "detect_pii": self.s.scrub_pii or self.mode == "inspect"}

    def _pool(self, workers: int, lsh):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the caller may be a threaded UI, and forking a threaded process is unsafe
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self._ctx(lsh),))

    def _first_format(self, src: str) -> bool:
        """Resolve the format (and check it against the method) on the first usable row.
        False when the source has none (with on_bad_rows: skip; fail raises)."""
        errors: list[DataError] = []
        rows = iter_raw_rows(src, errors if self.s.on_bad_rows == "skip" else None, self.s.text_split)
        try:
            first = next(rows, None)
        except DataError as exc:
            raise _with_hint(exc) from None
        finally:
            rows.close()
        if first is None:
            if self.s.on_bad_rows == "fail" or not errors:
                raise no_rows_error(src, errors)
            self._bad_rows([(e.file, e.line, e.message) for e in errors], len(errors))
            return False
        self.format = resolve_format(first, self.s.method, self.format, self.s.columns)
        self.report.format = self.format
        self.report.method = self.s.method or FORMAT_METHOD[self.format]
        return True

    def _chunks(self, src: str, pool, lsh) -> Iterator[ChunkResult]:
        global _WORKER
        p = Path(src)
        jsonl = not is_hub_name(src) and p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson")
        if pool is None:
            _WORKER = RowProcessor(self._ctx(lsh))
            if jsonl:
                for task in _byte_ranges(p, p.stat().st_size):
                    yield _run_range(task)
            else:
                for batch in self._batches(src):
                    yield _run_batch(batch)
            return
        tasks: Iterator = iter(_byte_ranges(p, p.stat().st_size)) if jsonl else self._batches(src)
        fn = _run_range if jsonl else _run_batch
        inflight: deque = deque()
        limit = 2 * pool._max_workers + 2  # bounded: results wait in order, memory stays flat
        for task in tasks:
            inflight.append(pool.submit(fn, task))
            while len(inflight) >= limit:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()

    def _batches(self, src: str) -> Iterator[list[tuple[str, int, dict[str, Any]]]]:
        errors: list[DataError] = []
        batch: list[tuple[str, int, dict[str, Any]]] = []
        t0 = time.process_time()
        rows = iter_raw_rows(src, errors if self.s.on_bad_rows == "skip" else None, self.s.text_split)
        while True:
            try:
                row = next(rows, None)
            except DataError as exc:
                raise _with_hint(exc) from None
            if row is None:
                break
            batch.append((row.file, row.line, row.data))
            if errors:
                self._bad_rows([(e.file, e.line, e.message) for e in errors], len(errors))
                errors.clear()
            if len(batch) >= BATCH_ROWS:
                self._main_seconds["read"] += time.process_time() - t0
                yield batch
                t0 = time.process_time()
                batch = []
        if errors:
            self._bad_rows([(e.file, e.line, e.message) for e in errors], len(errors))
        self._main_seconds["read"] += time.process_time() - t0
        if batch:
            yield batch

    def _bad_rows(self, bad: list[tuple[str, int | None, str]], count: int) -> None:
        if not count:
            return
        rep = self.report
        if self.s.on_bad_rows == "fail":
            raise _with_hint(DataError(*bad[0]))
        rep.rows_bad += count
        rep.rows_read += count
        for file, line, msg in bad:
            if len(rep.bad_examples) < MAX_BAD_EXAMPLES:
                rep.bad_examples.append(str(DataError(file, line, msg)))

    def _consume(self, chunks: Iterator[ChunkResult], st: _State, role: str, out) -> None:
        s, rep = self.s, self.report
        steps = {x.name: x for x in rep.steps}
        length, dedup, near, pii_step, block = (steps[n] for n in ("length", "dedup", "near_dedup", "pii", "blocklist"))
        line_base = 0
        clock = time.process_time
        file_ids: dict[str, int] = {}
        for res in chunks:
            if res.relative:
                res.bad = [(f, (ln + line_base) if ln else ln, m) for f, ln, m in res.bad]
            self._bad_rows(res.bad, res.bad_count)
            rep.rows_read += res.read
            steps["normalize"].changed += res.normalized
            for k, v in res.seconds.items():
                steps[k].seconds += v
            t0 = clock()
            hashes = res.hashes.tolist() if res.hashes is not None else []
            bands = res.bands.tolist() if res.bands is not None else None
            if bands is not None:
                for i in res.no_bands:
                    bands[i] = None
            for i, r in enumerate(res.rows):
                line = r[R_LINE] + line_base if res.relative else r[R_LINE]
                chars = r[R_CHARS]
                exact_tokens = r[R_TOKENS]
                tokens = exact_tokens if exact_tokens is not None else -(-chars // CHARS_PER_TOKEN)
                if (r[R_SHORT] or chars < s.min_chars or (s.max_chars and chars > s.max_chars)
                        or (exact_tokens is not None and (tokens < s.min_tokens
                                                          or (s.max_tokens and tokens > s.max_tokens)))):
                    length.removed += 1
                    continue
                h = hashes[i]
                first = st.seen.get(h)
                if first is not None:
                    rep.duplicates += 1
                    if len(rep.duplicate_examples) < EXAMPLES_PER_KIND:
                        rep.duplicate_examples.append(
                            f"{r[R_FILE]}:{line} repeats {st.files[first >> 40]}:{first & ((1 << 40) - 1)}")
                    if s.dedup:
                        dedup.removed += 1
                        continue
                else:
                    fid = file_ids.get(r[R_FILE])
                    if fid is None:
                        fid = file_ids[r[R_FILE]] = len(st.files)
                        st.files.append(r[R_FILE])
                    st.seen[h] = (fid << 40) | line
                    keys = bands[i] if bands is not None else None
                    if keys is not None and st.near is not None and st.near.seen_or_add(keys):
                        rep.near_duplicates += 1
                        if len(rep.near_duplicate_examples) < EXAMPLES_PER_KIND:
                            rep.near_duplicate_examples.append(f"{r[R_FILE]}:{line}: {_snippet(r)}")
                        if s.near_dedup:
                            near.removed += 1
                            continue
                pii = r[R_PII]
                if pii:
                    for kind, n in pii["counts"].items():
                        rep.pii[kind] = rep.pii.get(kind, 0) + n
                    if s.scrub_pii:
                        pii_step.changed += 1
                    for kind, masked in pii["examples"]:
                        ex = rep.pii_examples.setdefault(kind, [])
                        if len(ex) < EXAMPLES_PER_KIND:
                            ex.append(f"{masked} ({r[R_FILE]}:{line})")
                if r[R_BLOCKED]:
                    block.removed += 1
                    continue
                st.kept += 1
                st.chars.append(chars)
                st.tokens.append(tokens)
                if s.max_seq_len and tokens > s.max_seq_len:
                    rep.over_max_seq_len += 1
                    if len(rep.over_examples) < EXAMPLES_PER_KIND:
                        rep.over_examples.append(f"{r[R_FILE]}:{line}: {tokens:,} tokens")
                if s.label_column:
                    label = r[R_LABEL]
                    rep.labels[label] = rep.labels.get(label, 0) + 1
                    lid = st.label_ids.setdefault(label, len(st.label_ids))
                    if role == "train":
                        st.train_labels.append(lid)
                if out is not None:
                    out.write(r[R_PAYLOAD])
                    out.write("\n")
                if role == "validation":
                    rep.validation_rows += 1
                else:
                    rep.train_rows += 1
            self._main_seconds["decide"] += clock() - t0
            if res.relative:
                line_base += res.lines
            if self.progress:
                self.progress(rep.rows_read)

    def _finish(self, st: _State, tmp: dict[str, Path | None]) -> None:
        s, rep = self.s, self.report
        steps = {x.name: x for x in rep.steps}
        steps["read"].removed = rep.rows_bad
        steps["read"].seconds += self._main_seconds["read"]
        # the main process's ordered decisions (duplicate look-ups, counting, writing)
        rep.main_seconds = round(self._main_seconds["decide"], 3)
        steps["normalize"].enabled = s.normalize
        steps["length"].enabled = bool(s.min_chars or s.max_chars or s.min_tokens or s.max_tokens
                                       or steps["length"].removed)
        steps["dedup"].enabled = s.dedup
        steps["near_dedup"].enabled = s.near_dedup
        steps["pii"].enabled = s.scrub_pii
        steps["blocklist"].enabled = bool(s.blocklist)
        if s.near_dedup:
            steps["near_dedup"].note = f"threshold {s.near_dedup_threshold:g}"
        rep.rows_out = st.kept
        rep.chars = LengthStats.of(st.chars)
        rep.tokens = LengthStats.of(st.tokens)
        if self.mode != "prep":
            steps["split"].enabled = False
            return
        t0 = time.process_time()
        if not s.validation:
            val_idx = split_indices(rep.train_rows, s.validation_split, s.seed,
                                    st.train_labels if s.label_column else None)
            rep.validation_rows = len(val_idx)
            rep.train_rows -= len(val_idx)
            steps["split"].note = (f"{s.validation_split:g} held out, seed {s.seed}"
                                   + (f", stratified by {s.label_column}" if s.label_column else ""))
            if s.label_column:
                names = {v: k for k, v in st.label_ids.items()}
                tr: Counter[str] = Counter()
                va: Counter[str] = Counter()
                for i, lid in enumerate(st.train_labels):
                    (va if i in val_idx else tr)[names[lid]] += 1
                rep.split_labels = {"train": dict(tr), "validation": dict(va)}
        else:
            val_idx = set()
            steps["split"].note = "validation file given"
        if s.write and self.out_dir is not None and tmp["train"] is not None:
            train_path = self.out_dir / "train.jsonl"
            val_path = self.out_dir / "validation.jsonl"
            if s.validation:
                os.replace(tmp["train"], train_path)
                os.replace(tmp["validation"], val_path)
            else:
                with open(tmp["train"], encoding="utf-8") as src, \
                        open(train_path, "w", encoding="utf-8") as ft, \
                        open(val_path, "w", encoding="utf-8") as fv:
                    for i, line in enumerate(src):
                        (fv if i in val_idx else ft).write(line)
                os.unlink(tmp["train"])
                if tmp["validation"] is not None and tmp["validation"].exists():
                    os.unlink(tmp["validation"])
            rep.outputs = {"train": str(train_path), "validation": str(val_path)}
        steps["split"].seconds += time.process_time() - t0


def _with_hint(exc: DataError) -> DataError:
    """A bad row under on_bad_rows: fail, with what to do about it."""
    if exc.line is None:
        return exc
    return DataError(exc.file, exc.line, f"{exc.message} (fix the row, or set data.on_bad_rows: skip "
                     "to leave bad rows out)")


def _snippet(r: tuple) -> str:
    payload = r[R_PAYLOAD]
    if not payload:
        return "near-duplicate of an earlier row"
    text = " ".join(str(payload).split())
    return (text[:70] + "...") if len(text) > 70 else text


def split_indices(n: int, share: float, seed: int, labels: array | None = None) -> set[int]:
    """Indices of the held-out rows: round(n * share) of them (at least 1 when n > 1), chosen
    with ``random.Random(seed)``; with labels, that share of each label."""
    import random

    if n <= 1 or share <= 0:
        return set()
    rng = random.Random(seed)
    if labels is None:
        k = max(1, round(n * share))
        return set(rng.sample(range(n), k))
    groups: dict[int, list[int]] = {}
    for i, lid in enumerate(labels):
        groups.setdefault(lid, []).append(i)
    out: set[int] = set()
    for lid in sorted(groups):
        idx = groups[lid]
        k = round(len(idx) * share)
        out.update(rng.sample(idx, k))
    if not out:
        out.add(rng.randrange(n))
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A prepared data set in the cache."""

    fingerprint: str
    directory: Path
    report: DataReport
    cached: bool


def prepare(settings: PrepSettings, workspace: str | Path, *, file_hashes: dict[str, str] | None = None,
            progress=None) -> Prepared:
    """Prepare the data (or find it in the cache). Raises DataError for bad data."""
    fp = fingerprint(settings, file_hashes)
    root = cache_root(workspace)
    final = root / fp
    if (final / "report.json").is_file() and (final / "train.jsonl").is_file():
        rep = DataReport.from_dict(json.loads((final / "report.json").read_text()))
        rep.cached = True
        return Prepared(fp, final, rep, True)
    work = root / f".{fp}.{os.getpid()}.tmp"
    if work.exists():
        shutil.rmtree(work)
    try:
        rep = Pipeline(settings, work, "prep", progress).run()
        rep.fingerprint = fp
        rep.outputs = {k: str(final / Path(v).name) for k, v in rep.outputs.items()}
        (work / "report.json").write_text(json.dumps(rep.to_dict(), indent=1))
        try:
            os.replace(work, final)
        except OSError:
            if not (final / "report.json").is_file():
                raise
            shutil.rmtree(work)  # prepared meanwhile by another process (a rank): same content
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Prepared(fp, final, rep, False)


def inspect(settings: PrepSettings, progress=None) -> DataReport:
    """Measure the data without changing it: every step's detector runs, nothing is written."""
    settings.write = False
    return Pipeline(settings, None, "inspect", progress).run()


def prepared_splits(p: Profile, workspace: str | Path) -> tuple[str, list[dict], list[dict], int]:
    """(format, train rows, validation rows, skipped bad rows) of a frozen profile (absolute
    paths), prepared through the cache: what the training engine trains on."""
    from engine.profile import LoadedProfile

    lp = LoadedProfile(p, None, Path("/"))
    prepared = prepare(PrepSettings.from_profile(lp), workspace)
    train = _read_jsonl(prepared.directory / "train.jsonl")
    val = _read_jsonl(prepared.directory / "validation.jsonl")
    return prepared.report.format, train, val, prepared.report.rows_bad


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
