"""What is in a data set, and what preparation did to it: the report of ``data inspect`` and
``data prep`` (and the wizard's data step).

Pure Python and numpy; no heavy imports. ``DataReport.to_dict()`` is the ``--json`` form and
``render()`` the terminal form; ``from_dict`` reads a cached report back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

EXAMPLES_PER_KIND = 3
SHOWN_BAD = 5


@dataclass
class LengthStats:
    """Distribution of a per-row length (characters or tokens)."""

    count: int = 0
    total: int = 0
    mean: float = 0.0
    min: int = 0
    p50: int = 0
    p90: int = 0
    p95: int = 0
    p99: int = 0
    max: int = 0
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, rows)

    @classmethod
    def of(cls, values) -> LengthStats:
        import numpy as np

        a = np.asarray(values, dtype=np.int64)
        if a.size == 0:
            return cls()
        q = np.percentile(a, [50, 90, 95, 99], method="lower")
        return cls(count=int(a.size), total=int(a.sum()), mean=round(float(a.mean()), 1),
                   min=int(a.min()), p50=int(q[0]), p90=int(q[1]), p95=int(q[2]), p99=int(q[3]),
                   max=int(a.max()), histogram=_histogram(a))


def _histogram(a) -> list[tuple[int, int, int]]:
    """Power-of-two bins from the smallest to the largest length (at most 16 bins)."""
    import numpy as np

    lo = max(1, int(a.min()))
    hi = max(lo, int(a.max()))
    first = 1 << max(0, math.floor(math.log2(lo)))
    edges = [first]
    while edges[-1] <= hi:
        edges.append(edges[-1] * 2)
    if len(edges) > 17:  # merge the low end into one bin
        edges = [edges[0], *edges[-16:]]
    counts, _ = np.histogram(a, bins=[0, *edges[1:]])
    return [(edges[i], edges[i + 1] - 1, int(c)) for i, c in enumerate(counts)]


@dataclass
class StepResult:
    """One preparation step: rows it removed, rows it changed, CPU seconds it took."""

    name: str
    enabled: bool = True
    removed: int = 0
    changed: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class DataReport:
    sources: list[str] = field(default_factory=list)
    format: str = ""
    method: str = ""
    mode: str = "inspect"  # inspect | prep
    fingerprint: str | None = None
    cached: bool = False
    rows_read: int = 0
    rows_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    rows_out: int = 0
    train_rows: int = 0
    validation_rows: int = 0
    steps: list[StepResult] = field(default_factory=list)
    chars: LengthStats = field(default_factory=LengthStats)
    tokens: LengthStats = field(default_factory=LengthStats)
    tokenizer: str | None = None  # None: tokens are estimated
    max_seq_len: int = 0
    over_max_seq_len: int = 0
    over_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    near_duplicates: int = 0
    near_duplicate_examples: list[str] = field(default_factory=list)
    near_dedup_threshold: float = 0.0
    pii: dict[str, int] = field(default_factory=dict)
    pii_examples: dict[str, list[str]] = field(default_factory=dict)
    label_column: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    split_labels: dict[str, dict[str, int]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # wall time
    main_seconds: float = 0.0  # CPU of the main process's ordered decisions (steps 3-8)
    workers: int = 1
    warnings: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_estimated"] = self.tokenizer is None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        d = dict(d)
        d.pop("tokens_estimated", None)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        rep = cls(**known)
        rep.chars = LengthStats(**{**d.get("chars", {}), "histogram": [tuple(x) for x in d.get("chars", {}).get("histogram", [])]})
        rep.tokens = LengthStats(**{**d.get("tokens", {}), "histogram": [tuple(x) for x in d.get("tokens", {}).get("histogram", [])]})
        rep.steps = [StepResult(**s) for s in d.get("steps", [])]
        return rep

    def step(self, name: str) -> StepResult:
        for s in self.steps:
            if s.name == name:
                return s
        s = StepResult(name)
        self.steps.append(s)
        return s

    # ----------------------------------------------------------------------------------------
    def render(self) -> str:
        """The report for a terminal."""
        out: list[str] = []
        add = out.append
        add(f"{', '.join(self.sources)}")
        fp = f", fingerprint {self.fingerprint}" + (" (cached)" if self.cached else "") if self.fingerprint else ""
        add(f"  format {self.format} ({self.method}){fp}")
        rate = f", {self.rows_read / self.seconds:,.0f} rows/s" if self.seconds > 0 and not self.cached else ""
        add(f"  rows: {self.rows_read:,} read, {self.rows_bad:,} malformed"
            + (f", {self.rows_out:,} kept" if self.mode == "prep" else "")
            + (f" in {self.seconds:.1f} s{rate}" if self.seconds else ""))
        for e in self.bad_examples[:SHOWN_BAD]:
            add(f"    bad: {e}")
        if self.rows_bad > SHOWN_BAD:
            add(f"    ... and {self.rows_bad - SHOWN_BAD:,} more (--json lists up to {len(self.bad_examples)})")
        if self.mode == "prep" and self.steps:
            add("")
            add(f"  {'step':<12} {'removed':>9} {'changed':>9} {'cpu s':>7}")
            for s in self.steps:
                if not s.enabled:
                    add(f"  {s.name:<12} {'off':>9}")
                    continue
                add(f"  {s.name:<12} {s.removed:>9,} {s.changed:>9,} {s.seconds:>7.2f}"
                    + (f"  {s.note}" if s.note else ""))
            if self.main_seconds:
                add(f"  {'(ordering)':<12} {'':>9} {'':>9} {self.main_seconds:>7.2f}  main process: "
                    "duplicate look-ups, counting, writing")
            add(f"  => train {self.train_rows:,} rows, validation {self.validation_rows:,} rows")
            for name, path in self.outputs.items():
                add(f"     {name}: {path}")
        add("")
        for title, st, unit in (("characters", self.chars, "chars"),
                                ("tokens" + ("" if self.tokenizer else " (estimated: chars/4; "
                                             "--tokenizer for exact counts)"), self.tokens, "tokens")):
            if not st.count:
                continue
            add(f"  {title}: total {st.total:,}, mean {st.mean:,.0f}, min {st.min:,}, p50 {st.p50:,}, "
                f"p90 {st.p90:,}, p95 {st.p95:,}, p99 {st.p99:,}, max {st.max:,}")
            peak = max((c for _, _, c in st.histogram), default=0) or 1
            for lo, hi, c in st.histogram:
                bar = "#" * max(1 if c else 0, round(30 * c / peak))
                add(f"    {lo:>8,}-{hi:<8,} {unit:<6} {bar:<30} {c:,}")
        if self.max_seq_len:
            add(f"  rows longer than max_seq_len {self.max_seq_len}: {self.over_max_seq_len:,}"
                + (" (estimated)" if not self.tokenizer else ""))
            for e in self.over_examples:
                add(f"    {e}")
        add(f"  exact duplicates: {self.duplicates:,}")
        for e in self.duplicate_examples:
            add(f"    {e}")
        if self.near_dedup_threshold:
            add(f"  near-duplicates (Jaccard >= {self.near_dedup_threshold:g}): {self.near_duplicates:,}")
            for e in self.near_duplicate_examples:
                add(f"    {e}")
        total_pii = sum(self.pii.values())
        add(f"  personal data and secrets: {total_pii:,}" + ("" if total_pii else " found"))
        for kind, n in sorted(self.pii.items(), key=lambda kv: -kv[1]):
            ex = ", ".join(self.pii_examples.get(kind, [])[:EXAMPLES_PER_KIND])
            add(f"    {kind:<15} {n:>7,}  {ex}")
        if self.label_column:
            add(f"  labels ({self.label_column}):")
            total = sum(self.labels.values()) or 1
            for label, n in sorted(self.labels.items(), key=lambda kv: -kv[1]):
                split = ""
                if self.split_labels:
                    split = "  train {:,} / validation {:,}".format(
                        self.split_labels.get("train", {}).get(label, 0),
                        self.split_labels.get("validation", {}).get(label, 0))
                add(f"    {label:<20} {n:>8,} {100 * n / total:5.1f}%{split}")
        for w in self.warnings:
            add(f"  warning: {w}")
        return "\n".join(out)
