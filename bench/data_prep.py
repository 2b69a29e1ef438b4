"""Data preparation at scale: a 1 GB JSON-lines file through every ``data.prep`` step.

    .venv/bin/python bench/data_prep.py [--size-mb 1024] [--workers N] [--dir DIR] [--keep]

Generates prompt/completion rows (words drawn from the shipped demo text with a Zipf law, so
lengths and vocabulary look like real data) with planted exact duplicates (1 row in 20),
near-duplicates (1 in 33: an earlier row with two words changed), personal data and secrets
(1 in 40) and a few malformed lines, then streams the file through the whole pipeline:
normalisation, length filter, exact and near-duplicate removal, PII scrubbing, a blocklist and
a stratified split. Prints rows/s, peak RSS (the process and its workers together, sampled) and
the CPU time of each step, each beside its target. A last figure times exact token counting
(a byte-level BPE tokenizer trained here) on a sample, as that step runs only with a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from operator import itemgetter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.data_prep import PrepSettings, TokenCounter, prepare  # noqa: E402

TARGET_ROWS_PER_S = 20_000
TARGET_RSS_GB = 2.0
LABELS = ("howto", "concept", "incident", "policy", "code")
BLOCKLIST = ("lorem ipsum", "buy now", "click here", "free money", "unsubscribe")


def vocabulary() -> list[str]:
    words: dict[str, int] = {}
    for name in ("owasp-text.jsonl", "owasp-sft.jsonl"):
        for line in (REPO / "profiles" / "data" / name).read_text().split("\n"):
            if not line.strip():
                continue
            for v in json.loads(line).values():
                if isinstance(v, str):
                    for w in v.split():
                        words[w] = words.get(w, 0) + 1
    return [w for w, _ in sorted(words.items(), key=lambda kv: -kv[1])]


def pii_snippet(rnd: random.Random) -> str:
    n = rnd.randrange(6)
    if n == 0:
        return f"contact jane.doe{rnd.randrange(10**6)}@example.com"
    if n == 1:
        return f"call +1 (415) 555-{rnd.randrange(10**4):04d}"
    if n == 2:
        return f"server 10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
    if n == 3:
        return "key AKIA" + "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    if n == 4:
        return "card 4111 1111 1111 1111"
    return "token ghp_" + "".join(rnd.choice("abcdefghijkLMNOPQRSTUVWXYZ0123456789") for _ in range(36))


def generate(path: Path, size_bytes: int, seed: int = 1) -> dict[str, int]:
    """Write the benchmark file; return what was planted."""
    import numpy as np

    vocab = vocabulary()
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    recent: list[str] = []
    planted = {"rows": 0, "duplicates": 0, "near_duplicates": 0, "pii": 0, "malformed": 0}
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_bytes:
            n = 5000
            plen = rng.integers(12, 60, n)
            clen = rng.integers(40, 200, n)
            idx = rng.choice(len(vocab), size=int(plen.sum() + clen.sum()), p=p)
            words = itemgetter(*idx.tolist())(vocab)
            pos = 0
            lines = []
            for i in range(n):
                prompt = " ".join(words[pos:pos + plen[i]])
                pos += plen[i]
                completion = " ".join(words[pos:pos + clen[i]])
                pos += clen[i]
                k = planted["rows"] + i
                if k % 40 == 7:
                    completion += " " + pii_snippet(rnd)
                    planted["pii"] += 1
                row = {"prompt": prompt, "completion": completion, "category": LABELS[k % len(LABELS)]}
                line = json.dumps(row)
                if k % 20 == 3 and recent:
                    line = rnd.choice(recent)
                    planted["duplicates"] += 1
                elif k % 33 == 5 and recent:
                    base = json.loads(rnd.choice(recent))
                    ws = base["completion"].split()
                    for _ in range(2):
                        ws[rnd.randrange(len(ws))] = rnd.choice(vocab[:2000])
                    base["completion"] = " ".join(ws)
                    line = json.dumps(base)
                    planted["near_duplicates"] += 1
                elif k % 100_003 == 11:
                    line = '{"prompt": "cut off'
                    planted["malformed"] += 1
                lines.append(line)
                if k % 7 == 0:
                    recent.append(line)
                    if len(recent) > 2000:
                        recent.pop(0)
            chunk = "\n".join(lines) + "\n"
            fh.write(chunk)
            written += len(chunk.encode())
            planted["rows"] += n
    return planted


class RssSampler:
    """Peak resident memory of this process and all its children, sampled every 0.1 s."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def token_figure(path: Path, work: Path, rows: int = 20_000) -> str:
    """Exact token counting on a sample, with a byte-level BPE tokenizer trained on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            texts.append(row["prompt"] + "\n" + row["completion"])
            if len(texts) >= rows:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts[:5000], trainers.BpeTrainer(vocab_size=8000, show_progress=False))
    tok.save(str(work / "tokenizer.json"))
    counter = TokenCounter(str(work / "tokenizer.json"))
    t0 = time.perf_counter()
    counts = []
    for i in range(0, len(texts), 2000):
        counts += counter.count(texts[i:i + 2000])
    dt = time.perf_counter() - t0
    return (f"token counting (BPE, 8k vocab, {len(texts):,} rows sample): {len(texts) / dt:,.0f} rows/s, "
            f"{sum(counts) / dt:,.0f} tokens/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args()

    base = args.dir or Path(tempfile.mkdtemp(prefix="zerotune-bench-data-"))
    base.mkdir(parents=True, exist_ok=True)
    data = base / "bench.jsonl"
    try:
        if not data.exists() or data.stat().st_size < args.size_mb * 1_000_000 * 0.99:
            t0 = time.perf_counter()
            planted = generate(data, args.size_mb * 1_000_000)
            print(f"generated {data.stat().st_size / 1e6:,.0f} MB, {planted['rows']:,} rows in "
                  f"{time.perf_counter() - t0:.0f} s: planted {planted['duplicates']:,} duplicates, "
                  f"{planted['near_duplicates']:,} near-duplicates, {planted['pii']:,} rows with PII, "
                  f"{planted['malformed']} malformed lines", flush=True)
        (base / "blocklist.txt").write_text("\n".join(BLOCKLIST) + "\n")
        settings = PrepSettings(
            train=[str(data)], method="sft", on_bad_rows="skip", normalize=True, min_chars=20,
            dedup=True, near_dedup=True, near_dedup_threshold=0.85, scrub_pii=True,
            blocklist=list(BLOCKLIST), label_column="category", validation_split=0.01, seed=42,
            max_seq_len=1024, workers=args.workers,
        )
        ws = base / "workspace"
        shutil.rmtree(ws, ignore_errors=True)
        with RssSampler() as rss:
            t0 = time.perf_counter()
            prepared = prepare(settings, ws)
            wall = time.perf_counter() - t0
        rep = prepared.report
        rate = rep.rows_read / wall
        print(f"\n{rep.rows_read:,} rows ({data.stat().st_size / 1e6:,.0f} MB) in {wall:.1f} s with "
              f"{rep.workers} worker process(es) (includes hashing the input for the fingerprint)")
        print(f"{'rows/s':<18} {rate:>12,.0f}   target >= {TARGET_ROWS_PER_S:,}  "
              f"{'ok' if rate >= TARGET_ROWS_PER_S else 'BELOW TARGET'}")
        print(f"{'peak RSS':<18} {rss.peak / 1e9:>11.2f}G   target < {TARGET_RSS_GB:g} GB  "
              f"{'ok' if rss.peak / 1e9 < TARGET_RSS_GB else 'OVER TARGET'}")
        print(f"\n{'step':<12} {'removed':>10} {'changed':>10} {'cpu s':>8}")
        for s in rep.steps:
            print(f"{s.name:<12} {s.removed:>10,} {s.changed:>10,} {s.seconds:>8.1f}")
        print(f"{'(ordering)':<12} {'':>10} {'':>10} {rep.main_seconds:>8.1f}  main process: duplicate "
              "look-ups, counting, writing")
        cpu = sum(s.seconds for s in rep.steps) + rep.main_seconds
        print(f"CPU {cpu:.0f} s in all = {1e6 * cpu / max(rep.rows_read, 1):.0f} us a row; "
              f"{rep.workers} idle cores would give about {rep.workers * rep.rows_read / cpu:,.0f} rows/s")
        print(f"=> train {rep.train_rows:,}, validation {rep.validation_rows:,}; "
              f"PII found {sum(rep.pii.values()):,} ({', '.join(f'{k} {v:,}' for k, v in sorted(rep.pii.items()))})")
        print(token_figure(data, base))
        return 0
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(base / "workspace", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
