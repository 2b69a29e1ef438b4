"""Data preparation: the ``data.prep`` pipeline, its cache and its fingerprint.

Steps, always in this order (each sees only the rows the previous ones kept):

1. ``read``        rows read and put in the method's shape; malformed rows follow ``data.on_bad_rows``
2. ``normalize``   Unicode NFC; no zero-width characters or stray control characters; \\r\\n as \\n;
                   no trailing spaces; at most one blank line in a row (``prep.normalize``)
3. ``length``      drop rows outside ``min_chars``/``max_chars`` and ``min_tokens``/``max_tokens``
4. ``dedup``       drop exact duplicates (after normalisation) (``prep.dedup``)
5. ``near_dedup``  drop near-duplicates: MinHash signatures (rensa's R-MinHash) of lower-cased
                   word 3-grams, banded as datasketch's MinHashLSH chooses for the threshold, kept
                   in Bloom filters (the LSHBloom scheme), so a billion rows need megabytes, not
                   gigabytes
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

Speed: a worker runs each step over a whole chunk before the next (RowProcessor.process), so
the costly parts work on many rows at once: MinHash signatures for a batch in one rensa call,
numpy scans that tell which rows can need normalising or hold anything the PII finders look
for, one search of the chunk's text per blocklist phrase. Each is checked to decide exactly
what the row-by-row version decides (tests/test_data_prep.py). Rows are read and written as
JSON by orjson; the prepared files hold compact JSON lines (no spaces after ":" and ",").
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import struct
import threading
import time
import unicodedata
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.data_formats import (
    MAX_ROW_BYTES,
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
from orjson import dumps as _orjson_dumps

if TYPE_CHECKING:
    from engine.profile import LoadedProfile, Profile

PREP_VERSION = 2  # bump when the same input and settings would give a different output
# 2: rensa MinHash (different near-duplicate choices), compact JSON lines from orjson
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


# normalize_texts: what normalize_text would change, looked for in UTF-8 bytes with numpy
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), 0x7F])  # _CONTROL
_SPECIAL_UTF8 = [chr(c).encode() for c in _UNICODE_FIXES]  # 2 and 3 bytes each
_NORMALIZE_SCAN: dict[str, Any] = {}


def normalize_texts(texts: list[str]) -> list[str]:
    """``[normalize_text(t) for t in texts]``, several times faster on text that needs little.

    normalize_text returns ``t.strip()`` unless ``t`` holds a control character, a space or tab
    before a line end, three line ends in a row, one of the characters it replaces, or is not
    NFC. All but the last show in the UTF-8 bytes (ASCII bytes there are only ASCII characters),
    so numpy finds them for a batch of texts at once; only the texts that have one (or are not
    NFC) go through normalize_text."""
    import numpy as np

    sc = _NORMALIZE_SCAN
    if not sc:
        control = np.arange(256, dtype=np.uint8)
        assert bytes(np.flatnonzero(((control < 32) & ((control - np.uint8(9)) > 1)) | (control == 127)).tolist()) == _CONTROL_BYTES
        sc["lead"] = np.zeros(256, dtype=bool)
        sc["lead"][sorted({b[0] for b in _SPECIAL_UTF8})] = True
        sc["two"] = np.array(sorted(int.from_bytes(b, "big") for b in _SPECIAL_UTF8 if len(b) == 2))
        sc["three"] = np.array(sorted(int.from_bytes(b, "big") for b in _SPECIAL_UTF8 if len(b) == 3))
        assert all(len(b) in (2, 3) for b in _SPECIAL_UTF8) and min(np.flatnonzero(sc["lead"])) >= 0x80
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    slow = [False] * len(texts)
    i = 0
    while i < len(texts):
        size, j = len(encoded[i]), i + 1
        while j < len(texts) and size + 1 + len(encoded[j]) <= SKETCH_BYTES:
            size += 1 + len(encoded[j])
            j += 1
        # 0xff (never in UTF-8) between texts and after the last: no pattern spans two texts
        data = np.frombuffer(b"\xff".join(encoded[i:j]) + b"\xff\xff", dtype=np.uint8)
        # every pattern holds a byte below 32, 127 or one of 0x80 and up (a lead byte): one
        # pass finds those few places (byte - 32 wraps below 32), the tests look only there
        pos = np.flatnonzero((data[:-2] - np.uint8(32)) >= 95)
        value = data[pos]
        # control characters: below 32 but tab (9) and line end (10), or 127
        bad = ((value < 32) & ((value - np.uint8(9)) > 1)) | (value == 127)
        nl = value == 10
        bad |= nl & ((data[pos - 1] == 32) | (data[pos - 1] == 9))  # " \n", "\t\n" (-1: a 0xff)
        bad |= nl & (data[pos + 1] == 10) & (data[pos + 2] == 10)  # "\n\n\n"
        lead = np.flatnonzero(sc["lead"][value])
        if len(lead):
            at = pos[lead]
            code = (data[at].astype(np.int64) << 16) | (data[at + 1].astype(np.int64) << 8) | data[at + 2]
            bad[lead] |= _sorted_member(code, sc["three"]) | _sorted_member(code >> 8, sc["two"])
        places = pos[bad]
        if len(places):
            start = np.zeros(j - i, dtype=np.int64)
            np.cumsum([len(e) + 1 for e in encoded[i:j - 1]], out=start[1:])
            for k in np.unique(np.searchsorted(start, places, side="right") - 1).tolist():
                slow[i + k] = True
        i = j
    return [normalize_text(t) if bad or not (t.isascii() or unicodedata.is_normalized("NFC", t))
            else t.strip() for t, bad in zip(texts, slow, strict=True)]


def _sorted_member(values, known):
    """``np.isin(values, known)`` for a sorted ``known``, without isin's set-up cost."""
    import numpy as np

    at = np.minimum(np.searchsorted(known, values), len(known) - 1)
    return known[at] == values


# Text per numpy pass (sketching, normalising): small enough that the arrays stay in cache and
# are reused from the heap; with larger ones a pass can map fresh pages, and page faults then
# cost more than the arithmetic
SKETCH_BYTES = 1 << 16


class _Sketcher:
    """MinHash signatures (rensa's R-MinHash) of each text's lower-cased word 3-grams, cut into
    LSH band keys; a text of one or two words is its own words.

    Speed: a batch of texts is handled at once and no Python object is made per word. Words are
    found and hashed with numpy over the batch's concatenated UTF-8 bytes (a polynomial hash
    from prefix sums, then a mix), 3-grams are combined from neighbouring word hashes (dropping
    those that would straddle two rows), and rensa computes every signature from one flat array
    of 3-gram hashes plus row offsets.

    Words are split at bytes.split()'s ASCII whitespace (bytes 9-13 and 32): a non-ASCII
    character is never one, and in UTF-8 its bytes are all >= 0x80, so splitting the bytes
    splits the text at the same places."""

    BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2**64
    _pack_row = struct.Struct(f"{NUM_PERM}I").pack  # a signature's 32-bit values (see _batch)
    assert struct.calcsize("I") == 4

    def __init__(self, bands: int, rows: int):
        import numpy as np
        from rensa import RMinHash

        self.np = np
        self._digests = RMinHash.digest_matrix_from_flat_token_hashes
        self.bands, self.rows = bands, rows
        rng = np.random.RandomState(7)
        self.mult = (rng.randint(1, 1 << 62, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
        self.band_salt = np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        self.inverse = pow(self.BASE, -1, 1 << 64)
        # BASE**i and BASE**-i (modulo 2**64) for i < SKETCH_BYTES; see _powers for longer texts
        self.pow_table = self._power_table(self.BASE, SKETCH_BYTES)
        self.inv_table = self._power_table(self.inverse, SKETCH_BYTES)

    def _power_table(self, base: int, n: int):
        np = self.np
        t = np.full(n, base, dtype=np.uint64)
        t[0] = 1
        return np.cumprod(t, dtype=np.uint64)  # uint64 products wrap: arithmetic modulo 2**64

    def _powers(self, table, base: int, positions):
        """``base ** positions`` (modulo 2**64) from ``table`` = base ** range(SKETCH_BYTES); a
        position past the table (in a text longer than SKETCH_BYTES) takes two look-ups."""
        np = self.np
        if len(positions) == 0 or int(positions.max()) < SKETCH_BYTES:
            return np.take(table, positions)
        high = self._power_table(pow(base, SKETCH_BYTES, 1 << 64), int(positions.max()) // SKETCH_BYTES + 1)
        return table[positions % SKETCH_BYTES] * high[positions // SKETCH_BYTES]

    def band_keys(self, lowered: list[str]):
        """Band keys of lower-cased texts: a uint64 array [texts, bands], and the indices of the
        texts without words (their keys are meaningless)."""
        np = self.np
        out = np.zeros((len(lowered), self.bands), dtype=np.uint64)
        empty: list[int] = []
        encoded = [t.encode("utf-8", "surrogatepass") for t in lowered]
        i = 0
        while i < len(encoded):  # batches of up to SKETCH_BYTES (or one longer text)
            size, j = len(encoded[i]), i + 1
            while j < len(encoded) and size + 1 + len(encoded[j]) <= SKETCH_BYTES:
                size += 1 + len(encoded[j])
                j += 1
            keys, no_words = self._batch(encoded[i:j])
            out[i:j] = keys
            empty += (no_words + i).tolist()
            i = j
        return out, empty

    def _batch(self, encoded: list[bytes]):
        np = self.np
        n = len(encoded)
        u64 = np.uint64
        # "\n" (a space) between rows: no word runs from one row into the next
        data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
        row_start = np.zeros(n, dtype=np.int64)
        np.cumsum([len(e) + 1 for e in encoded[:-1]], out=row_start[1:])
        inside = np.zeros(len(data) + 2, dtype=bool)
        # not whitespace (9-13 or 32); comparisons run several times faster than a table look-up
        inside[1:-1] = ~(((data - np.uint8(9)) < 5) | (data == 32))
        edges = np.flatnonzero(inside[1:] != inside[:-1])
        start, end = edges[0::2], edges[1::2]  # words: data[start[k]:end[k]]
        # word hash = sum((byte + 1) * BASE**offset in the word), from prefix sums over the batch
        if len(data) <= SKETCH_BYTES:
            powers = self.pow_table[: len(data)]
        else:
            powers = self._powers(self.pow_table, self.BASE, np.arange(len(data)))
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        values = data.astype(np.uint64)
        values += 1
        values *= powers
        np.cumsum(values, out=prefix[1:])
        words = (np.take(prefix, end) - np.take(prefix, start)) * self._powers(self.inv_table, self.inverse, start)
        words ^= words >> u64(32)
        words *= u64(0xD6E8FEB86659FD93)
        words ^= words >> u64(32)
        # words of row r: first[r] to first[r + 1]
        first = np.searchsorted(start, row_start)
        count = np.diff(first, append=len(words))
        # 3-gram k = words k, k+1, k+2; a row of n >= 3 words has n - 2 of them (the last two
        # starts would run into the next row), a row of one or two words keeps its words
        tokens = words.copy()
        if len(words) >= 3:
            g = (words[:-2] * u64(0x9E3779B97F4A7C15)) ^ (words[1:-1] * u64(0xC2B2AE3D27D4EB4F)) ^ words[2:]
            g ^= g >> u64(29)
            g *= u64(0xBF58476D1CE4E5B9)
            g ^= g >> u64(32)
            tokens[:-2] = g
        keep = np.ones(len(words), dtype=bool)
        long_end = (first + count)[count >= 3]
        keep[long_end - 1] = keep[long_end - 2] = False
        for r in np.flatnonzero((count == 1) | (count == 2)).tolist():  # rare
            tokens[first[r]:first[r] + count[r]] = words[first[r]:first[r] + count[r]]
        tokens = tokens[keep]
        offsets = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(np.where(count >= 3, count - 2, count), out=offsets[1:])
        # rensa gives the signatures as lists; packing each into bytes is faster than np.array
        # or array("I") over all of them
        rows = self._digests(tokens, offsets, NUM_PERM, 1).to_rows()
        sig = np.frombuffer(b"".join(itertools.starmap(self._pack_row, rows)), dtype=np.uint32)
        sig = sig.reshape(n, NUM_PERM).astype(np.uint64)
        hv = sig[:, : self.bands * self.rows].reshape(n, self.bands, self.rows)
        keys = (hv * self.mult).sum(axis=2, dtype=np.uint64) + self.band_salt
        return keys, np.flatnonzero(count == 0)


_LSH_PARAMS: dict[tuple[float, int], tuple[int, int]] = {}
_LSH_LOCK = threading.Lock()


def _warm_lsh_params(threshold: float) -> None:
    try:
        lsh_params(threshold)
    except Exception:  # noqa: BLE001 - raised again where the pipeline asks for them
        pass


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold (once a
    process: importing datasketch takes half a second, see prepare)."""
    with _LSH_LOCK:
        if (threshold, num_perm) not in _LSH_PARAMS:
            from datasketch import MinHashLSH

            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            _LSH_PARAMS[threshold, num_perm] = (lsh.b, lsh.r)
        return _LSH_PARAMS[threshold, num_perm]


class NearDupIndex:
    """The LSHBloom index: one Bloom filter (rbloom) over every band key seen. A row whose band
    key was seen before is a near-duplicate candidate, as in datasketch's MinHashLSHBloom;
    filters are added as it fills, so the false-positive rate holds for any number of rows.

    Speed: each key added sets ``hashes`` bits at random places of a filter far larger than the
    CPU caches, so it costs about one memory access per hash. A filter of the optimal size for
    1e-6 needs 19 hashes; one 1.6 times larger needs 7 for the same rate, which makes adding a
    row's keys about twice as fast. rbloom derives its size and hash count from the capacity
    and rate it is given, so it gets the pair that yields those two numbers."""

    def __init__(self, expected_rows: int, bands: int, error_rate: float = 1e-6, hashes: int = 7):
        from rbloom import Bloom

        self._Bloom = Bloom
        self.error_rate, self.hashes = error_rate, hashes
        self.capacity = max(expected_rows, 10_000) * bands
        self.filters = [self._new_filter()]
        self.used = 0

    def _new_filter(self):
        """A filter holding ``capacity`` keys at ``error_rate`` with ``hashes`` hash functions.

        m bits and k hashes give (1 - exp(-k n / m)) ** k false positives at n keys; rbloom
        makes m = -n' ln p' / ln(2)**2 bits and int(m / n' ln 2) hashes from (n', p'), so
        p' = 2 ** -(k + 0.5) gives k hashes and n' scales m to the size needed."""
        k = self.hashes
        bits = self.capacity * -k / math.log(1 - self.error_rate ** (1 / k))
        rate = 2.0 ** -(k + 0.5)
        return self._Bloom(math.ceil(bits * math.log(2) ** 2 / -math.log(rate)), rate)

    def seen_or_add(self, keys: list[int]) -> bool:
        for f in self.filters:
            if any(map(f.__contains__, keys)):
                return True
        if self.used + len(keys) > self.capacity:
            self.capacity *= 2
            self.filters.append(self._new_filter())
            self.used = 0
        self.filters[-1].update(keys)
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
    """What the workers send back for one chunk: counts, times and, for every row read, what the
    main process needs to decide on it. Per-row values travel as arrays and one byte string:
    unpickling millions of small Python objects would cost the main process."""

    lines: int = 0  # lines consumed (byte-range chunks), to number the next chunk's lines
    relative: bool = False  # row lines count from the chunk start
    bad: list[tuple[str, int | None, str]] = field(default_factory=list)
    bad_count: int = 0
    read: int = 0
    normalized: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # per row (the same string object repeated)
    row_lines: Any = None  # int64 [rows]
    chars: Any = None  # int64 [rows], before PII placeholders
    short: Any = None  # bool [rows]: no text at all
    tokens: Any = None  # int64 [rows] exact token counts, or None without a tokenizer
    labels: list[str | None] | None = None  # with a label column
    pii: dict[int, dict[str, Any]] = field(default_factory=dict)  # rows holding personal data
    blocked: list[int] = field(default_factory=list)  # rows holding a blocklisted phrase
    payload: bytes = b""  # when writing: the rows' JSON lines ("\n" after each), in row order
    payload_ends: Any = None  # int64 [rows]: where each row's line ends in payload
    snippets: list[str] | None = None  # when not writing: the start of each row's text
    hashes: Any = None  # uint64 [rows]
    bands: Any = None  # uint64 [rows, bands], or None without near-duplicate detection
    no_bands: list[int] = field(default_factory=list)  # rows without words (no band keys)


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

    def _blocked_rows(self, lowered: list[str]) -> list[bool]:
        """``[self._blocked(low) for low in lowered]``. With a few phrases, each is looked for
        once in the whole chunk's text, and only the rows where one occurs are tested."""
        if len(self.phrases) > 32 or not all(self.phrases):
            return [self._blocked(low) for low in lowered]
        import bisect

        # a phrase found across two rows only makes a row a candidate: every candidate is tested
        text = "\n".join(lowered)
        starts = list(itertools.accumulate((len(x) + 1 for x in lowered[:-1]), initial=0))
        maybe: set[int] = set()
        for phrase in self.phrases:
            pos = text.find(phrase)
            while pos >= 0:
                maybe.add(bisect.bisect_right(starts, pos) - 1)
                pos = text.find(phrase, pos + 1)
        blocked = [False] * len(lowered)
        for i in maybe:
            blocked[i] = self._blocked(lowered[i])
        return blocked

    def process(self, rows: Iterator[tuple[str, int, dict[str, Any]]], result: ChunkResult) -> None:
        """Steps 2-7 over a chunk of rows. Each step runs over the whole chunk before the next,
        so the chunk-level work (MinHash, PII pre-scan, token counting) sees every row at once
        and each step is timed once a chunk rather than once a row."""
        with _gc_paused():
            self._process(rows, result)

    def _process(self, rows: Iterator[tuple[str, int, dict[str, Any]]], result: ChunkResult) -> None:
        import numpy as np

        s, fmt = self.s, self.fmt
        t = result.seconds
        clock = time.process_time

        def spent(step: str, since: float) -> float:
            now = clock()
            t[step] = t.get(step, 0.0) + (now - since)
            return now

        t0 = clock()
        names: list[str] = []
        lines: list[int] = []
        shaped: list[dict[str, Any]] = []
        labels: list[str | None] = []
        for name, line, data in rows:  # reading the lines happens in this loop too
            try:
                shaped.append(normalize_row(data, fmt, s.columns))
            except ValueError as exc:
                result.bad_count += 1
                if len(result.bad) < MAX_BAD_KEPT:
                    result.bad.append((name, line, str(exc)))
                continue
            names.append(name)
            lines.append(line)
            if s.label_column:
                v = data.get(s.label_column)
                labels.append("(missing)" if v is None or v == "" else str(v))
        n = len(shaped)
        result.read += n
        if not s.label_column:
            labels = [None] * n
        t0 = spent("read", t0)

        pieces = [row_texts(row) for row in shaped]
        if s.normalize:
            flat = [x for p in pieces for x in p]
            fixed = iter(normalize_texts(flat))
            for i, p in enumerate(pieces):
                new = [next(fixed) for _ in p]
                if new != p:  # as map_texts(row, normalize_text) != row
                    result.normalized += 1
                    it = iter(new)
                    shaped[i] = map_texts(shaped[i], lambda _x, it=it: next(it))
                    pieces[i] = new
        joined = ["\n".join(p) for p in pieces]
        chars = [len(x) for x in joined]  # before PII placeholders change the text
        short = [not x.strip() for x in joined]
        t0 = spent("normalize", t0)

        canon = [_dumps(row) for row in shaped]
        # 8-byte BLAKE2b digests read as little-endian uint64, straight into the array sent back
        result.hashes = np.frombuffer(b"".join([_digest8(c) for c in canon]), dtype="<u8").astype(np.uint64)
        t0 = spent("dedup", t0)

        lowered: list[str] | None = None  # joined.lower(): for near-duplicates, PII keywords, blocklist
        if self.sketcher is not None:
            lowered = [x.lower() for x in joined]
            result.bands, result.no_bands = self.sketcher.band_keys(lowered)
            t0 = spent("near_dedup", t0)

        pii: list[dict[str, Any] | None] = [None] * n
        if self.detect_pii:
            sc = self.scrubber
            hit_rows = [i for i, spans in enumerate(sc.find_many(joined, lowered)) if spans]
            # each text of those rows is scrubbed on its own (as the row's JSON holds them)
            pieces = [row_texts(shaped[i]) for i in hit_rows]
            found_in = iter(sc.find_many([x for p in pieces for x in p]))
            for i, texts in zip(hit_rows, pieces, strict=True):
                found: list = []
                replaced = []
                for x in texts:
                    out, hits = sc.replace(x, next(found_in))
                    replaced.append(out)
                    found.extend(hits)
                it = iter(replaced)
                scrubbed = map_texts(shaped[i], lambda _x, it=it: next(it))
                counts = Counter(hit.kind for hit in found)
                pii[i] = {"counts": dict(counts),
                          "examples": [(hit.kind, self.mask(hit.value, hit.kind)) for hit in found[:4]]}
                if s.scrub_pii:
                    shaped[i] = scrubbed
                    canon[i] = _dumps(scrubbed)
                    joined[i] = "\n".join(row_texts(scrubbed))
                    if lowered is not None:
                        lowered[i] = joined[i].lower()
            t0 = spent("pii", t0)

        blocked = [False] * n
        if self.block is not None:
            if lowered is None:
                lowered = [x.lower() for x in joined]
            blocked = self._blocked_rows(lowered)
            t0 = spent("blocklist", t0)

        tokens: list[int] = []
        if self.tokens:
            tokens = list(self.tokens.count(joined))
            t0 = spent("length", t0)

        result.files = names
        result.row_lines = np.array(lines, dtype=np.int64)
        result.chars = np.array(chars, dtype=np.int64)
        result.short = np.array(short, dtype=bool)
        if self.tokens:
            result.tokens = np.array(tokens, dtype=np.int64)
        if s.label_column:
            cache: dict[str | None, str | None] = {}  # one object per label: pickled once
            result.labels = [cache.setdefault(x, x) for x in labels]
        result.pii = {i: p for i, p in enumerate(pii) if p}
        result.blocked = [i for i, b in enumerate(blocked) if b]
        if s.write:
            canon.append(b"")
            result.payload = b"\n".join(canon)
            result.payload_ends = np.cumsum([len(c) + 1 for c in canon[:-1]], dtype=np.int64)
        else:
            result.snippets = [x[:120] for x in joined]
        if self.sketcher is not None and n == 0:
            result.bands = np.zeros((0, self.sketcher.bands), dtype=np.uint64)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a chunk is handled: it makes (and frees) many small
    objects, whose collections would cost a worker about 5% of its time and find nothing (rows
    hold no reference cycles). Any cycle made meanwhile is collected afterwards."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _digest8(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _dumps(row: dict[str, Any]) -> bytes:
    """A row as one line of JSON (UTF-8, keys in order), as written to the prepared files.

    orjson writes what json.dumps(ensure_ascii=False) writes, without the spaces after ":" and
    ",", at a fraction of the cost. It refuses lone surrogates (which JSON input can hold as
    escapes): such a row is written with them escaped, so every output line is valid UTF-8."""
    try:
        return _orjson_dumps(row)
    except TypeError:
        return json.dumps(row).encode("ascii")


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
        # timed by RowProcessor.process, which runs this loop
        with open(path, "rb") as fh:
            fh.seek(start)
            n = 0
            for raw, err in _range_lines(fh, path, start, end):
                n += 1
                if err is None:
                    if start == 0 and n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    if not raw.strip():
                        continue
                    try:
                        row = parse_json_line(raw, path, n)
                        yield path, n, row
                        continue
                    except DataError as exc:
                        err = exc
                bad.append((path, n, err.message))
            result.lines = n

    assert _WORKER is not None
    _WORKER.process(rows(), result)
    result.bad_count += len(bad)
    result.bad = sorted(bad + result.bad, key=lambda b: b[1] or 0)[:MAX_BAD_KEPT]
    return result


def _range_lines(fh, path: str, start: int, end: int) -> Iterator[tuple[bytes, DataError | None]]:
    """The lines of bytes ``start`` to ``end`` (at line starts) of an open file, as read_line
    gives them (with their "\n"). A range that holds no line over MAX_ROW_BYTES (a chunk, as
    a rule) is read at once and cut at each "\n": a read and a seek per line cost more."""
    if end - start <= min(MAX_ROW_BYTES, 4 * CHUNK_BYTES):
        block = fh.read(end - start)
        find, pos, size = block.find, 0, len(block)
        while pos < size:
            nxt = find(b"\n", pos) + 1 or size
            yield block[pos:nxt], None
            pos = nxt
        return
    pos, n = start, 0
    while pos < end:
        raw, err = read_line(fh, path, n + 1)
        if raw is None:
            break
        n += 1
        pos = pos + len(raw) if err is None else fh.tell()
        yield raw, err


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
    # where each row written to the train file ends, for the split (see Pipeline._finish)
    train_ends: array = field(default_factory=lambda: array("q"))
    train_bytes: int = 0


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
                handles[role] = open(tmp[role], "wb")  # rows arrive as UTF-8 JSON bytes
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
        # settings and state as locals: this loop runs once per row in one process
        min_chars, max_chars, min_tokens, max_tokens = s.min_chars, s.max_chars, s.min_tokens, s.max_tokens
        max_seq_len, label_column = s.max_seq_len, s.label_column
        seen, seen_get, index = st.seen, st.seen.get, st.near
        keep_chars, keep_tokens, train_labels, train_ends = (st.chars.append, st.tokens.append,
                                                             st.train_labels.append, st.train_ends.append)
        is_train = role == "train"
        for res in chunks:
            with _gc_paused():  # see RowProcessor.process
                if res.relative:
                    res.bad = [(f, (ln + line_base) if ln else ln, m) for f, ln, m in res.bad]
                self._bad_rows(res.bad, res.bad_count)
                rep.rows_read += res.read
                steps["normalize"].changed += res.normalized
                for k, v in res.seconds.items():
                    steps[k].seconds += v
                t0 = clock()
                hashes = res.hashes.tolist() if res.hashes is not None else []
                bands = res.bands.tolist() if res.bands is not None and index is not None else None
                if bands is not None:
                    for i in res.no_bands:
                        bands[i] = None
                base = line_base if res.relative else 0
                files, lines, chars_of = res.files, res.row_lines.tolist(), res.chars.tolist()
                short, pii_of, blocked = res.short.tolist(), res.pii, set(res.blocked)
                exact = res.tokens.tolist() if res.tokens is not None else None
                labels = res.labels
                ends = res.payload_ends.tolist() if res.payload_ends is not None else None
                runs: list[tuple[int, int]] = []  # kept rows' byte ranges in res.payload, merged
                kept = 0
                for i in range(len(files)):
                    chars = chars_of[i]
                    exact_tokens = exact[i] if exact is not None else None
                    tokens = exact_tokens if exact_tokens is not None else -(-chars // CHARS_PER_TOKEN)
                    if (short[i] or chars < min_chars or (max_chars and chars > max_chars)
                            or (exact_tokens is not None and (tokens < min_tokens
                                                              or (max_tokens and tokens > max_tokens)))):
                        length.removed += 1
                        continue
                    line = lines[i] + base
                    h = hashes[i]
                    first = seen_get(h)
                    if first is not None:
                        rep.duplicates += 1
                        if len(rep.duplicate_examples) < EXAMPLES_PER_KIND:
                            rep.duplicate_examples.append(
                                f"{files[i]}:{line} repeats {st.files[first >> 40]}:{first & ((1 << 40) - 1)}")
                        if s.dedup:
                            dedup.removed += 1
                            continue
                    else:
                        fid = file_ids.get(files[i])
                        if fid is None:
                            fid = file_ids[files[i]] = len(st.files)
                            st.files.append(files[i])
                        seen[h] = (fid << 40) | line
                        keys = bands[i] if bands is not None else None
                        if keys is not None and index.seen_or_add(keys):
                            rep.near_duplicates += 1
                            if len(rep.near_duplicate_examples) < EXAMPLES_PER_KIND:
                                rep.near_duplicate_examples.append(f"{files[i]}:{line}: {_snippet(res, i)}")
                            if s.near_dedup:
                                near.removed += 1
                                continue
                    pii = pii_of.get(i)
                    if pii:
                        for kind, n in pii["counts"].items():
                            rep.pii[kind] = rep.pii.get(kind, 0) + n
                        if s.scrub_pii:
                            pii_step.changed += 1
                        for kind, masked in pii["examples"]:
                            ex = rep.pii_examples.setdefault(kind, [])
                            if len(ex) < EXAMPLES_PER_KIND:
                                ex.append(f"{masked} ({files[i]}:{line})")
                    if i in blocked:
                        block.removed += 1
                        continue
                    kept += 1
                    keep_chars(chars)
                    keep_tokens(tokens)
                    if max_seq_len and tokens > max_seq_len:
                        rep.over_max_seq_len += 1
                        if len(rep.over_examples) < EXAMPLES_PER_KIND:
                            rep.over_examples.append(f"{files[i]}:{line}: {tokens:,} tokens")
                    if label_column:
                        label = labels[i]
                        rep.labels[label] = rep.labels.get(label, 0) + 1
                        lid = st.label_ids.setdefault(label, len(st.label_ids))
                        if is_train:
                            train_labels(lid)
                    if out is not None:
                        start, end = ends[i - 1] if i else 0, ends[i]
                        if runs and runs[-1][1] == start:
                            runs[-1] = (runs[-1][0], end)
                        else:
                            runs.append((start, end))
                        if is_train:
                            st.train_bytes += end - start
                            train_ends(st.train_bytes)
                st.kept += kept
                if is_train:
                    rep.train_rows += kept
                else:
                    rep.validation_rows += kept
                if runs:
                    view = memoryview(res.payload)
                    for start, end in runs:
                        out.write(view[start:end])
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
                _split_file(tmp["train"], st.train_ends, val_idx, train_path, val_path)
                os.unlink(tmp["train"])
                if tmp["validation"] is not None and tmp["validation"].exists():
                    os.unlink(tmp["validation"])
            rep.outputs = {"train": str(train_path), "validation": str(val_path)}
        steps["split"].seconds += time.process_time() - t0


def _split_file(src: Path, ends: array, held_out: set[int], train: Path, validation: Path) -> None:
    """Write the rows of ``src`` (row i ends at byte ``ends[i]``) to ``validation`` if their
    index is in ``held_out``, else to ``train``: one sequential pass through a reused buffer,
    a read and a write per run of rows rather than per row."""
    buf = memoryview(bytearray(1 << 20))
    cut: list[tuple[int, bool]] = []  # (end of a run of rows, whether it is held out)
    for i in sorted(held_out):
        cut += [(ends[i - 1] if i else 0, False), (ends[i], True)]
    cut.append((ends[-1] if len(ends) else 0, False))
    with open(src, "rb", buffering=0) as fi, open(train, "wb", buffering=0) as ft, \
            open(validation, "wb", buffering=0) as fv:
        pos = 0
        for end, held in cut:
            out = fv if held else ft
            while pos < end:
                n = fi.readinto(buf[:min(end - pos, len(buf))])
                if not n:
                    raise OSError(f"{src} ended at byte {pos}, before {end}")
                view = buf[:n]
                while view:
                    view = view[out.write(view):]
                pos += n


def _with_hint(exc: DataError) -> DataError:
    """A bad row under on_bad_rows: fail, with what to do about it."""
    if exc.line is None:
        return exc
    return DataError(exc.file, exc.line, f"{exc.message} (fix the row, or set data.on_bad_rows: skip "
                     "to leave bad rows out)")


def _snippet(res: ChunkResult, i: int) -> str:
    """The start of row i's text (of its JSON when writing), for a report."""
    if res.snippets is not None:
        payload = res.snippets[i]
    else:
        ends = res.payload_ends
        payload = res.payload[int(ends[i - 1]) if i else 0:int(ends[i])].decode("utf-8", "replace")
    if not payload:
        return "near-duplicate of an earlier row"
    text = " ".join(payload.split())
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
    if settings.near_dedup:  # its import runs while the input is hashed (which frees the GIL)
        threading.Thread(target=_warm_lsh_params, args=(settings.near_dedup_threshold,), daemon=True).start()
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
