"""``zerotune data inspect`` and ``zerotune data prep`` as subprocesses: output, exit codes,
messages without tracebacks, the cache, and no heavy import at start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROFILES, REPO, tiny_profile, write_jsonl, zerotune

HEAVY = ("torch", "deepspeed", "transformers", "trl", "datasets", "peft", "accelerate")


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


def test_inspect_reports_every_section(tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (PROFILES / "data" / "owasp-sft.jsonl").read_text().split("\n") if x][:40]
    rows += [*rows[:3], {"prompt": "admin?", "completion": "write to ops@example.com", "kind": "x"}]
    for i, r in enumerate(rows):
        r.setdefault("kind", "ab"[i % 2])
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(f, "a") as fh:
        fh.write("{not json\n")
    r = zerotune("data", "inspect", str(f), "--label", "kind", "--max-seq-len", "64")
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    out = r.stdout
    for expected in ("format prompt_completion (sft)", "rows: 45 read, 1 malformed",
                     f"bad: {f}:45: not valid JSON", "characters: total", "p50", "p99",
                     "tokens (estimated", "rows longer than max_seq_len 64", "exact duplicates: 3",
                     "near-duplicates (Jaccard >= 0.85)", "EMAIL", "o***@e***.com", "labels (kind):"):
        assert expected in out, expected
    assert "ops@example.com" not in out
    j = zerotune("data", "inspect", str(f), "--json")
    assert j.returncode == 0
    report = json.loads(j.stdout)
    assert (report["rows_read"], report["rows_bad"], report["duplicates"]) == (45, 1, 3)
    assert report["tokens_estimated"] is True and report["pii"] == {"EMAIL": 1}


def test_inspect_with_a_tokenizer_counts_exactly(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three"}, {"text": "four five"}])
    r = zerotune("data", "inspect", str(f), "--tokenizer", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tokens"]["total"] == 5 and rep["tokens_estimated"] is False


def test_inspect_bad_input_exits_2_with_a_located_message(tmp_path: Path) -> None:
    r = zerotune("data", "inspect", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl: file not found" in r.stderr
    no_traceback(r)
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "doc"}])
    r = zerotune("data", "inspect", str(t), "--method", "dpo")
    assert r.returncode == 2 and "dpo cannot train on text data" in r.stderr
    c = tmp_path / "c.csv"
    c.write_text('text\n"open quote\nnever closed\n')
    r = zerotune("data", "inspect", str(c))
    assert r.returncode == 2 and f"{c}:" in r.stderr and "never closed" in r.stderr
    no_traceback(r)
    e = tmp_path / "e.jsonl"
    e.write_text("")
    r = zerotune("data", "inspect", str(e))
    assert r.returncode == 2 and "the file is empty" in r.stderr
    r = zerotune("data", "inspect", str(t), "--column", "prompt")
    assert r.returncode == 2 and "expected KEY=NAME" in r.stderr
    r = zerotune("data", "inspect", str(t), "--format", "csv")
    assert r.returncode == 2
    no_traceback(r)
    r = zerotune("data", "inspect", str(t), "--tokenizer", str(tmp_path / "no-such-tokenizer"),
                 env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "cannot load a tokenizer from" in r.stderr
    no_traceback(r)


def test_prep_writes_reports_and_hits_the_cache(tmp_path: Path) -> None:
    prof = tiny_profile(tmp_path, "sft", data_rows=60,
                        data={"prep": {"dedup": True, "scrub_pii": True}, "validation_split": 0.1})
    data = tmp_path / "sft.jsonl"
    with open(data, "a") as fh:
        fh.write(data.read_text().splitlines()[0] + "\n")  # one exact duplicate
    ws = tmp_path / "ws"
    r = zerotune("--workspace", str(ws), "data", "prep", str(prof))
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    for expected in ("step", "removed", "dedup", "split", "=> train 54 rows, validation 6 rows"):
        assert expected in r.stdout, expected
    cache = list((ws / "runs" / ".cache" / "data").iterdir())
    assert len(cache) == 1 and {p.name for p in cache[0].iterdir()} == {"train.jsonl", "validation.jsonl", "report.json"}
    again = zerotune("data", "prep", str(prof), "--workspace", str(ws), "--json", "--out", str(tmp_path / "out"))
    assert again.returncode == 0, again.stderr
    assert "found in the cache" in again.stderr
    rep = json.loads(again.stdout)
    assert rep["cached"] is True and rep["fingerprint"] == cache[0].name
    assert (tmp_path / "out" / "train.jsonl").read_text() == (cache[0] / "train.jsonl").read_text()
    other = zerotune("data", "prep", str(prof), "--workspace", str(ws), "--set", "data.prep.dedup=false", "--json")
    assert other.returncode == 0 and json.loads(other.stdout)["fingerprint"] != cache[0].name


def test_prep_bad_rows_and_bad_profiles_exit_2(tmp_path: Path) -> None:
    prof = tiny_profile(tmp_path, "cpt", data_rows=10)
    data = tmp_path / "cpt.jsonl"
    with open(data, "ab") as fh:
        fh.write(b'{"text": "caf\xe9"}\n')
    r = zerotune("data", "prep", str(prof), "--workspace", str(tmp_path / "ws"))
    assert r.returncode == 2
    assert f"{data}:11: not UTF-8" in r.stderr and "on_bad_rows: skip" in r.stderr
    no_traceback(r)
    r = zerotune("data", "prep", str(prof), "--workspace", str(tmp_path / "ws"), "--set", "data.on_bad_rows=skip")
    assert r.returncode == 0 and "1 malformed" in r.stdout
    r = zerotune("data", "prep", str(prof), "--set", "data.prep.dedupe=true")
    assert r.returncode == 2 and "did you mean 'dedup'" in r.stderr
    r = zerotune("data", "prep", str(prof), "--workspace", str(tmp_path / "ws"), "--set", "data.prep.max_tokens=50")
    assert r.returncode == 2 and "need a tokenizer" in r.stderr
    no_traceback(r)


def test_data_commands_import_nothing_heavy(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a small document"}, {"text": "another one"}])
    probe = (
        "import json, sys\n"
        "from engine import cli\n"
        "for argv in ([\"data\", \"--help\"], [\"data\", \"inspect\", sys.argv[1], \"--json\"]):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(f)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []
