"""The data.prep pipeline: each step, its order, the split, the cache and the fingerprint; and
PII scrubbing measured on a corpus of planted secrets and look-alike ordinary text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import data_prep
from engine.data_formats import DataError
from engine.data_pii import KINDS, Scrubber, mask
from engine.data_prep import (
    NearDupIndex,
    PrepError,
    PrepSettings,
    fingerprint,
    inspect,
    normalize_text,
    normalize_texts,
    prep_fingerprint,
    prepare,
    prepared_splits,
    split_indices,
)
from tests.conftest import PROFILES, write_jsonl

PII = Path(__file__).parent / "fixtures" / "pii"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def words(n: int, seed: int) -> str:
    import random

    rnd = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    return " ".join(rnd.choice(vocab) for _ in range(n))


# --------------------------------------------------------------------------------------------
# PII corpus: precision and recall
# --------------------------------------------------------------------------------------------


def test_pii_corpus_precision_and_recall(capsys: pytest.CaptureFixture[str]) -> None:
    scrubber = Scrubber()
    tp = fp = fn = 0
    per_kind: dict[str, list[int]] = {k: [0, 0] for k in KINDS}  # found, planted
    problems = []
    for row in read_jsonl(PII / "planted.jsonl"):
        text, planted = row["text"], [tuple(p) for p in row["planted"]]
        out, hits = scrubber.scrub(text)
        expected = text
        for kind, value in planted:
            expected = expected.replace(value, f"<{kind}>")
            found = value not in out and any(h.kind == kind and value in h.value for h in hits)
            per_kind[kind][1] += 1
            per_kind[kind][0] += found
            tp += found
            fn += not found
            if not found:
                problems.append(f"missed {kind} {value!r} in {text!r}")
        for h in hits:
            if not any(h.value in v for _, v in planted):
                fp += 1
                problems.append(f"false {h.kind} {h.value!r} in {text!r}")
        if out != expected:
            problems.append(f"changed more than the planted values: {out!r}")
    clean_rows = read_jsonl(PII / "clean.jsonl")
    for row in clean_rows:
        out, hits = scrubber.scrub(row["text"])
        fp += len(hits)
        problems += [f"false {h.kind} {h.value!r} in {row['text']!r}" for h in hits]
        assert out == row["text"] or hits
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    with capsys.disabled():
        print(f"\nPII corpus: {tp + fn} planted secrets of {len(KINDS)} kinds in "
              f"{len(read_jsonl(PII / 'planted.jsonl'))} rows, {len(clean_rows)} rows of look-alike "
              f"ordinary text: precision {precision:.3f}, recall {recall:.3f} (tp {tp}, fp {fp}, fn {fn})")
        print("  " + ", ".join(f"{k} {f}/{n}" for k, (f, n) in per_kind.items()))
    assert all(n > 0 for _, n in per_kind.values()), "every kind is planted"
    assert problems == []
    assert precision == 1.0 and recall == 1.0


def test_masked_examples_never_show_the_whole_value() -> None:
    for row in read_jsonl(PII / "planted.jsonl"):
        for kind, value in row["planted"]:
            shown = mask(value, kind)
            assert value not in shown and shown, (kind, value, shown)


def test_luhn_and_issuer_decide_card_numbers() -> None:
    s = Scrubber()
    assert s.scrub("card 4111 1111 1111 1111 ok")[0] == "card <CARD_NUMBER> ok"
    assert s.scrub("card 4111 1111 1111 1112 ok")[1] == []  # checksum fails
    assert s.scrub("ref 9111111111111111 ok")[1] == []  # no issuer starts with 9


def pii_like_texts(n: int, seed: int) -> list[str]:
    """Texts mixing planted secrets, look-alikes, digit runs, colons and non-ASCII characters."""
    import random

    rnd = random.Random(seed)
    corpus = [r["text"] for name in ("planted.jsonl", "clean.jsonl") for r in read_jsonl(PII / name)]
    pieces = [*corpus, "key = abcdef123456", "\u212aEY: Abc123def456", "İ token=Zx9Yw8Vu7Ts6",
              "ip 10.1.2.3", "fe80::1%eth0", "2001:db8::8a2e:370:7334", "a:b:c:d:e:f:g:h", "call +1 (415) 555-0100",
              "card 4111-1111-1111-1111", "order 1234 5678 9012 3456", "v1.2.3.4", "1 2 3 4 5 6",
              "(555) 123-4567", "jane.roe@example.org", "ssh://u:pw123456@h", "é", "日本語", "\ud800", "\t", "\n"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(0, 8)):
            piece = rnd.choice(pieces)
            if rnd.random() < 0.3 and piece:  # a cut-off piece: prefixes split at any place
                a = rnd.randrange(len(piece))
                piece = piece[a:a + rnd.randint(1, 30)]
            parts += [piece, rnd.choice([" ", "\n", "", ": ", "=", "é", "\u212a", "-", "."])]
        out.append("".join(parts))
    return out


def test_scanning_many_texts_finds_exactly_what_find_finds() -> None:
    """find_many skips finders by a pre-scan of a batch of texts; it must never change a result."""
    s = Scrubber()
    texts = pii_like_texts(3000, 1)
    expected = [s.find(t) for t in texts]
    assert sum(map(bool, expected)) > 1000  # the texts do hold plenty to find
    assert s.find_many(texts) == expected
    assert s.find_many(texts, [t.lower() for t in texts]) == expected
    assert s.find_many([]) == [] and s.find_many([""]) == [[]]
    assert [s.find_many([t]) for t in texts[:600]] == [[e] for e in expected[:600]]  # alone


def near_miss_texts(n: int, seed: int) -> list[str]:
    """Texts of what the pre-scan judges by the bytes around a place: keywords in any case with
    what may or may not come before ":"/"=", "@" and "://" with every kind of neighbour, token
    prefixes cut anywhere, short and long runs of digits and dots, clusters of colons."""
    import random

    rnd = random.Random(seed)
    keywords = ["password", "passwd", "pwd", "secret", "token", "key", "bearer", "authorization"]
    gap = ["", " ", "  ", "\t", "\n", "\u00a0", "\u2003", "\x1c", "\x85", '"', "'", "_", "-", "access",
           "_key", "-KEY_ID", "key", "id", "_string", "s", "x", "é", "\u212a", "\u017f", "İ", "ı", ".", "(", ""]
    after = [":", "=", "=>", ": ", " = ", ":\t", "", " ", "\n", "(", "s", "_x", "-", ";"]
    values = ["Zx9Yw8Vu7Ts6Rq", "hunter2x9", "abcdefghijklmnop", "Abc123def456ghi789jkl012mno345pqr678stu9",
              "${VAR}", "<secret>", "short", "QWxhZGRpbjpvcGVuc2VzYW1l", "Basic QWxhZGRpbjpvcGVuc2VzYW1lMTIz",
              "Token abcdefghij1234567890", "os.environ", "x" * 20, "a1" * 10, ""]
    before = ["", " ", "\n", "api", "API_", "secret-", "client", "auth", "private_", "my", "x", "é", "_", "-",
              "Access", "aut", "SECRET"]
    around_at = ["", " ", "\n", "a", "Z", "9", ".", "%", "+", "-", "_", "é", "(", "@", "x\n", ".\n"]
    tokens = ["AKIA", "ASIA", "ghp_", "github_pat_", "xox", "xoxb-", "xapp-", "https://hooks.slack.com/",
              "sk-", "sk-proj-", "sk_live_", "rk_test_", "AIza", "hf_", "glpat-", "npm_", "eyJ", "PRIVATE KEY",
              "-----BEGIN RSA PRIVATE KEY-----\n"]
    filler = ["word", "The", "and", "1", "12", "10.0", "5.5.5", "192.168", " ", "\n", "é", "日本", ":", "::", "/"]

    def piece() -> str:
        r = rnd.random()
        if r < 0.35:
            w = rnd.choice(keywords)
            w = "".join(c.upper() if rnd.random() < 0.3 else c for c in w)
            return (rnd.choice(before) + w + "".join(rnd.choice(gap) for _ in range(rnd.randint(0, 3)))
                    + rnd.choice(after) + rnd.choice(values))
        if r < 0.5:
            return rnd.choice(around_at) + "@" + rnd.choice(around_at) + rnd.choice(["example.com", "x.io", "b", "", "mail.example.org"])
        if r < 0.6:
            user = "".join(rnd.choice(["u", "ser", ":", "pw1234", " ", "/", "'", "<", "é", "\t", "x" * 70,
                                       "日" * 60 + ":" + "語" * 40])
                           for _ in range(rnd.randint(0, 4)))
            return rnd.choice(["https", "ssh", "", "x"]) + "://" + user + rnd.choice(["@", "", "@@"]) + rnd.choice(
                ["host", "[::1]", "1.2.3.4", "", "/path"])
        if r < 0.75:
            t = rnd.choice(tokens)
            t = t[:rnd.randint(1, len(t))] if rnd.random() < 0.4 else t
            return rnd.choice(["", " ", "x", "_"]) + t + "".join(
                rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567abcdef_-.") for _ in range(rnd.randint(0, 45)))
        if r < 0.9:
            return rnd.choice(["", "call ", "ip ", "card ", "tel: ", "order ", "+"]) + "".join(
                rnd.choice("0123456789" * 3 + " .()/-") for _ in range(rnd.randint(2, 22)))
        return ":".join(rnd.choice(["", "a", "fe80", "1", "db8", "0", "ffff", "é"]) for _ in range(rnd.randint(2, 10)))

    return ["".join(piece() + rnd.choice(filler) for _ in range(rnd.randint(0, 8))) for _ in range(n)]


def test_the_pre_scan_never_drops_a_place_a_finder_matches() -> None:
    """_place_may_match and the digit-run and colon tests leave out places and texts by the bytes
    around them; texts built around exactly those bytes must still give what find gives."""
    s = Scrubber()
    for seed in range(3):
        texts = near_miss_texts(4000, seed)
        expected = [s.find(t) for t in texts]
        assert sum(map(bool, expected)) > 500
        assert s.find_many(texts) == expected
        assert s.find_many(texts, [t.lower() for t in texts]) == expected
        assert [s.find_many([t]) for t in texts[:500]] == [[e] for e in expected[:500]]


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("  hello  ", "hello"),
    ("a\r\nb\rc", "a\nb\nc"),
    ("trailing   \nspaces\t\nok", "trailing\nspaces\nok"),
    ("one\n\n\n\n\ntwo", "one\n\ntwo"),
    ("zero\u200bwidth\ufeff and soft\u00adhyphen", "zerowidth and softhyphen"),
    ("non\u00a0breaking\u2009thin", "non breaking thin"),
    ("cafe\u0301", "caf\u00e9"),  # NFC
    ("bell\x07 and nul\x00", "bell and nul"),
    ("    indented code\n        kept", "indented code\n        kept"),
])
def test_normalize_text(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean
    assert normalize_texts([raw, raw]) == [clean, clean]


def test_normalizing_many_texts_gives_what_normalize_text_gives() -> None:
    import random

    rnd = random.Random(2)
    alphabet = ["a", " ", "  ", "\t", "\n", "\r", "\r\n", "\x00", "\x0b", "\x1f", "\x7f", "é", "e\u0301",
                "\ud800", "日", "’", "\u2028", "\u3000", "\ufeff", "\u00a0", "\u00ad", "\u200b", "\u2001",
                "\u200c", "\n\n\n", " \n", "\x85", "\x1c", "\U0001F600"]
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 25))) for _ in range(20000)]
    texts += [words(200, i) for i in range(50)]
    assert normalize_texts(texts) == [normalize_text(t) for t in texts]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}: {words(8, seed * 1000 + i)}",
             "completion": words(60, seed * 1000 + 500 + i), "topic": "ab"[i % 2]} for i in range(n)]


def settings_for(path: Path, **kw) -> PrepSettings:
    base = {"train": [str(path)], "method": "sft", "on_bad_rows": "skip", "seed": 7}
    return PrepSettings(**{**base, **kw})


def test_each_step_removes_or_changes_what_it_should(tmp_path: Path) -> None:
    rows = sft_rows(60)
    dup = dict(rows[3])
    near = dict(rows[5])
    near["completion"] = near["completion"].replace(near["completion"].split()[10], "changed", 1)
    rows += [
        dup,  # exact duplicate
        near,  # near-duplicate: one word of 60 changed
        {"prompt": "short", "completion": "tiny"},  # under min_chars
        {"prompt": "Mail me", "completion": "at jane.roe@example.org " + words(40, 99)},  # PII
        {"prompt": "Spam", "completion": "click HERE now " + words(40, 98)},  # blocklisted
        {"prompt": "  spaced  ", "completion": words(40, 97) + "   \r\n"},  # normalised
        {"prompt": None, "completion": "bad"},  # malformed
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    s = settings_for(f, min_chars=40, dedup=True, near_dedup=True, scrub_pii=True,
                     blocklist=["click here"], validation_split=0.1)
    prepared = prepare(s, tmp_path / "ws")
    rep = prepared.report
    steps = {x.name: x for x in rep.steps}
    assert [x.name for x in rep.steps] == list(data_prep.STEP_NAMES)
    assert (rep.rows_read, rep.rows_bad, steps["read"].removed) == (67, 1, 1)
    assert steps["normalize"].changed == 1
    assert steps["length"].removed == 1
    assert steps["dedup"].removed == 1 and rep.duplicates == 1
    assert steps["near_dedup"].removed == 1
    assert steps["pii"].changed == 1 and rep.pii == {"EMAIL": 1}
    assert steps["blocklist"].removed == 1
    assert rep.train_rows + rep.validation_rows == rep.rows_out == 62
    assert rep.validation_rows == 6
    train = read_jsonl(prepared.directory / "train.jsonl")
    val = read_jsonl(prepared.directory / "validation.jsonl")
    everything = train + val
    assert len(everything) == 62 and set(everything[0]) == {"prompt", "completion"}
    texts = json.dumps(everything)
    assert "jane.roe@example.org" not in texts and "<EMAIL>" in texts
    assert "click HERE" not in texts
    assert {"prompt": "spaced", "completion": words(40, 97)} in everything


def test_steps_that_are_off_leave_rows_alone(tmp_path: Path) -> None:
    rows = sft_rows(20)
    rows.append(dict(rows[0]))
    rows.append({"prompt": "Mail", "completion": "jane.roe@example.org " + words(30, 5)})
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(settings_for(f, validation_split=0.0), tmp_path / "ws")
    assert prepared.report.rows_out == 22
    assert "jane.roe@example.org" in (prepared.directory / "train.jsonl").read_text()
    assert prepared.report.validation_rows == 0


def test_the_blocklist_looked_for_in_a_whole_chunk_blocks_the_same_rows(tmp_path: Path) -> None:
    import random

    rnd = random.Random(4)
    phrases = ["click here", "buy now", "é-mail", "x"]
    bits = ["click", "here", "click here", "clickhere", "buy now", "buy", "now", "é-mail", "xé-mail",
            "x", "box", "x-ray", "\n", " ", "", "."]
    rows = ["".join(rnd.choice(bits) + rnd.choice(["", " ", "\n"]) for _ in range(rnd.randint(0, 6)))
            for _ in range(3000)]
    for block in (phrases, [*phrases, *(f"w{i} w{i + 1}" for i in range(40))]):  # few, many (regex)
        proc = data_prep.RowProcessor({"settings": settings_for(tmp_path, blocklist=block),
                                       "format": "prompt_completion", "lsh": None, "detect_pii": False})
        lowered = [r.lower() for r in rows]
        got = proc._blocked_rows(lowered)
        assert got == [proc._blocked(x) for x in lowered] and 100 < sum(got) < 2900


def test_prepared_rows_are_utf8_json_with_the_same_text(tmp_path: Path) -> None:
    """Rows are written by orjson: UTF-8 (not \\u escapes), keys in order; a lone surrogate,
    which orjson refuses, is written escaped, and every line still reads back as the row."""
    rows = [{"prompt": "Café ☕ \"quoted\" \\ back\tslash", "completion": "line\nbreak 日本語 " + words(20, 1)},
            {"prompt": "lone \ud800 surrogate", "completion": words(20, 2)},
            {"prompt": "big", "completion": words(20, 3), "n": 123456789012345678901234567890}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare(settings_for(f, validation_split=0.0), tmp_path / "ws")
    raw = (prepared.directory / "train.jsonl").read_bytes()
    raw.decode("utf-8")  # strict: valid UTF-8
    assert "Café ☕".encode() in raw and "日本語".encode() in raw
    back = [json.loads(line) for line in raw.decode().splitlines()]
    assert back == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    assert all(list(r) == ["prompt", "completion"] for r in back)


def test_split_is_seeded_and_stratified(tmp_path: Path) -> None:
    assert split_indices(100, 0.1, 1) == split_indices(100, 0.1, 1)
    assert split_indices(100, 0.1, 1) != split_indices(100, 0.1, 2)
    assert len(split_indices(100, 0.1, 1)) == 10
    assert split_indices(1, 0.5, 1) == set() and len(split_indices(5, 0.01, 1)) == 1
    from array import array

    labels = array("i", [0] * 90 + [1] * 10)
    held = split_indices(100, 0.2, 3, labels)
    assert sum(1 for i in held if labels[i] == 0) == 18 and sum(1 for i in held if labels[i] == 1) == 2
    rows = [{"text": words(30, i), "label": "rare" if i % 10 == 0 else "common"} for i in range(200)]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    rep = prepare(settings_for(f, method="cpt", label_column="label", validation_split=0.25),
                  tmp_path / "ws").report
    assert rep.labels == {"common": 180, "rare": 20}
    assert rep.split_labels == {"train": {"common": 135, "rare": 15}, "validation": {"common": 45, "rare": 5}}


def test_a_validation_file_goes_through_the_same_steps_and_loses_rows_shared_with_train(tmp_path: Path) -> None:
    rows = sft_rows(30)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:25])
    val = write_jsonl(tmp_path / "val.jsonl", rows[20:])  # 5 rows leak from train
    prepared = prepare(settings_for(train, validation=str(val), dedup=True, validation_split=0.5), tmp_path / "ws")
    rep = prepared.report
    assert (rep.train_rows, rep.validation_rows, rep.duplicates) == (25, 5, 5)
    assert read_jsonl(prepared.directory / "validation.jsonl") == [
        {"prompt": r["prompt"], "completion": r["completion"]} for r in rows[25:]]


def test_on_bad_rows_fail_stops_with_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "fine doc"}) + "\n{broken\n")
    with pytest.raises(DataError) as err:
        prepare(settings_for(f, method="cpt", on_bad_rows="fail"), tmp_path / "ws")
    assert (err.value.file, err.value.line) == (str(f), 2)
    assert "on_bad_rows: skip" in str(err.value)
    assert not list((tmp_path / "ws" / "runs" / ".cache" / "data").glob("*"))  # nothing half-written


def test_token_limits_need_a_tokenizer_and_use_it(tmp_path: Path) -> None:
    rows = [{"text": words(n, n)} for n in (5, 50, 500)]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(PrepError, match="need a tokenizer"):
        prepare(settings_for(f, method="cpt", max_tokens=100), tmp_path / "ws")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rep = prepare(settings_for(f, method="cpt", min_tokens=10, max_tokens=100, tokenizer=str(tmp_path),
                               max_seq_len=40), tmp_path / "ws").report
    assert rep.rows_out == 1 and rep.tokens.max == 50 and rep.tokenizer == str(tmp_path)
    assert {x.name: x.removed for x in rep.steps}["length"] == 2
    assert rep.over_max_seq_len == 1


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------


def test_near_duplicates_are_found_and_distinct_rows_kept(tmp_path: Path) -> None:
    import random

    rnd = random.Random(3)
    base = [words(400, 10_000 + i) for i in range(300)]
    rows = [{"text": t} for t in base]
    near, related = [], []
    for i in range(0, 300, 10):
        ws = base[i].split()
        for _ in range(2):  # 2 of 400 words changed: Jaccard of 3-grams >= 0.97
            ws[rnd.randrange(len(ws))] = "edited"
        near.append(" ".join(ws))
        ws = base[i + 5].split()
        for k in rnd.sample(range(400), 100):  # a quarter changed: Jaccard ~0.2, not near
            ws[k] = "other"
        related.append(" ".join(ws))
    rows += [{"text": t} for t in near + related]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    prepared = prepare(settings_for(f, method="cpt", near_dedup=True), tmp_path / "ws")
    removed = {x.name: x for x in prepared.report.steps}["near_dedup"].removed
    # LSH finds a pair at Jaccard 0.97 with probability 0.9995 (8 bands of 16 rows)
    assert removed >= 29
    kept = {r["text"] for r in read_jsonl(prepared.directory / "train.jsonl")}
    assert set(base) <= kept and set(related) <= kept  # only near copies were removed
    assert len(kept) == 360 - removed


def test_near_duplicate_detection_follows_the_threshold(tmp_path: Path) -> None:
    """At Jaccard ~0.9 (just over the 0.85 threshold) LSH finds a pair with probability ~0.8:
    about 24 of 30, whatever MinHash implementation computes the signatures."""
    import random

    rnd = random.Random(3)
    base = [words(120, 10_000 + i) for i in range(300)]
    rows = [{"text": t} for t in base]
    for i in range(0, 300, 10):  # 30 copies with 2 of 120 words changed (Jaccard ~0.9)
        ws = base[i].split()
        for _ in range(2):
            ws[rnd.randrange(len(ws))] = "edited"
        rows.append({"text": " ".join(ws)})
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    rep = prepare(settings_for(f, method="cpt", near_dedup=True), tmp_path / "ws").report
    near = {x.name: x for x in rep.steps}["near_dedup"].removed
    assert 16 <= near <= 30  # mean ~24, standard deviation ~2.2
    assert rep.rows_out == 330 - near


def test_band_keys_do_not_depend_on_the_batch_or_the_row_length() -> None:
    """A row's band keys are the same alone, among other rows (chunks cut the data differently
    with 1 or 2 workers) and when it is longer than a numpy batch (SKETCH_BYTES)."""
    import numpy as np

    sketcher = data_prep._Sketcher(*data_prep.lsh_params(0.85))
    long_text = words(60_000, 5)  # about 330 kB: longer than SKETCH_BYTES
    assert len(long_text) > data_prep.SKETCH_BYTES
    texts = ["", "one", "two words", words(50, 1), long_text, words(80, 2), "   ", words(3, 3)]
    keys, empty = sketcher.band_keys(texts)
    assert empty == [0, 6]
    for i, t in enumerate(texts):
        alone, _ = sketcher.band_keys([t])
        if i not in empty:
            assert np.array_equal(alone[0], keys[i])
    near = long_text.split()
    near[100] = near[30_000] = "edited"
    near_keys, _ = sketcher.band_keys([" ".join(near)])
    assert (near_keys[0] == keys[4]).any()  # Jaccard 0.9999: some band agrees
    assert not (keys[3] == keys[5]).any()


def test_the_near_duplicate_index_grows_past_its_capacity() -> None:
    index = NearDupIndex(expected_rows=10, bands=2)
    for i in range(30_000):
        assert not index.seen_or_add([i * 2, i * 2 + 1])
    assert len(index.filters) > 1
    assert index.seen_or_add([10, 99_999_999])


# --------------------------------------------------------------------------------------------
# Fingerprint and cache
# --------------------------------------------------------------------------------------------


def test_fingerprint_follows_bytes_and_settings(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha beta"}, {"text": "gamma delta"}])
    s = settings_for(f, method="cpt", dedup=True)
    fp = fingerprint(s)
    assert fp == fingerprint(settings_for(f, method="cpt", dedup=True)) and len(fp) == 16
    data = bytearray(f.read_bytes())
    data[12] ^= 1  # one changed byte
    f.write_bytes(bytes(data))
    assert fingerprint(s) != fp
    data[12] ^= 1
    f.write_bytes(bytes(data))
    assert fingerprint(s) == fp
    assert fingerprint(settings_for(f, method="cpt", dedup=False)) != fp
    assert fingerprint(settings_for(f, method="cpt", dedup=True, seed=8)) != fp
    assert fingerprint(s, {str(f): data_prep.file_sha256(f)}) == fp


def test_rerunning_prep_on_unchanged_data_hits_the_cache(tmp_path: Path, monkeypatch) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": words(20, i)} for i in range(30)])
    first = prepare(settings_for(f, method="cpt", validation_split=0.2), tmp_path / "ws")
    assert not first.cached and first.directory.parent == tmp_path / "ws" / "runs" / ".cache" / "data"

    def boom(self):
        raise AssertionError("the pipeline ran again")

    monkeypatch.setattr(data_prep.Pipeline, "run", boom)
    again = prepare(settings_for(f, method="cpt", validation_split=0.2), tmp_path / "ws")
    assert again.cached and again.fingerprint == first.fingerprint
    assert again.report.train_rows == first.report.train_rows == 24


def test_profile_fingerprint_and_prepared_splits(tmp_path: Path) -> None:
    from engine.profile import load_profile, resolved_paths
    from tests.conftest import tiny_profile

    path = tiny_profile(tmp_path, "sft", data_rows=40, data={"prep": {"dedup": True}})
    lp = load_profile(path, check_model=False)
    fp = prep_fingerprint(lp)
    assert fp == prep_fingerprint(load_profile(path, ["data.prep.dedup=true"], check_model=False))
    assert fp != prep_fingerprint(load_profile(path, ["data.prep.scrub_pii=true"], check_model=False))
    fmt, train, val, bad = prepared_splits(resolved_paths(lp), tmp_path / "ws")
    assert (fmt, len(train) + len(val), bad) == ("prompt_completion", 40, 0)
    assert len(val) == 4


def test_inspect_measures_without_changing(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (PROFILES / "data" / "owasp-sft.jsonl").read_text().split("\n") if line]
    rows = rows[:50] + rows[:5] + [{"prompt": "who?", "completion": "ssh root@10.1.2.3 with key AKIAIOSFODNN7EXAMPLE"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = inspect(settings_for(f, max_seq_len=64))
    assert (rep.rows_read, rep.duplicates, rep.rows_out) == (56, 5, 56)
    assert rep.pii.get("AWS_ACCESS_KEY") == 1 and rep.pii.get("IPV4") == 1
    assert rep.over_max_seq_len > 0 and rep.tokenizer is None
    assert rep.chars.count == 56 and rep.chars.p50 <= rep.chars.p90 <= rep.chars.max
    assert sum(c for _, _, c in rep.chars.histogram) == 56
    text = rep.render()
    assert "exact duplicates: 5" in text and "AWS_ACCESS_KEY" in text and "AKIAIOSFODNN7EXAMPLE" not in text


def test_parallel_workers_give_the_same_result_and_line_numbers(tmp_path: Path, monkeypatch) -> None:
    rows = sft_rows(600)
    rows += [dict(r) for r in rows[:40]]
    for r in rows[100:160]:  # near-duplicates: one completion word changed
        ws = r["completion"].split()
        ws[30] = "edited"
        rows.append({**r, "completion": " ".join(ws)})
    lines = [json.dumps(r) for r in rows]
    lines.insert(450, "{broken")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(data_prep, "CHUNK_BYTES", 16_000)  # many chunks
    one = prepare(settings_for(f, dedup=True, near_dedup=True, validation_split=0.1, workers=1), tmp_path / "a")
    two = prepare(settings_for(f, dedup=True, near_dedup=True, validation_split=0.1, workers=2), tmp_path / "b")
    assert two.report.workers == 2
    near = [{x.name: x for x in p.report.steps}["near_dedup"].removed for p in (one, two)]
    assert near[0] == near[1] > 0
    assert (one.directory / "train.jsonl").read_bytes() == (two.directory / "train.jsonl").read_bytes()
    assert (one.directory / "validation.jsonl").read_bytes() == (two.directory / "validation.jsonl").read_bytes()
    assert one.report.bad_examples == two.report.bad_examples == [
        f"{f}:451: not valid JSON: Expecting property name enclosed in double quotes at column 2"]
    assert one.report.duplicate_examples == two.report.duplicate_examples
    assert two.report.duplicate_examples[0] == f"{f}:602 repeats {f}:1"


def test_byte_ranges_give_the_lines_read_line_gives(tmp_path: Path, monkeypatch) -> None:
    """A worker reads its byte range at once and cuts it into lines (or line by line when the
    range may hold a line over the limit): the lines, errors and line numbers of read_line."""
    import random

    from engine import data_formats

    rnd = random.Random(3)
    lines = [json.dumps(r) for r in sft_rows(400)]
    for _ in range(40):
        lines.insert(rnd.randrange(len(lines)), rnd.choice(["", "   ", "\r", '{"prompt": "cut off', "[1, 2]",
                                                             json.dumps({"prompt": "x" * 30_000, "completion": "y"}),
                                                             json.dumps({"prompt": "p" * 9_000, "completion": "c"})]))
    lines[5] += "\r"
    f = tmp_path / "d.jsonl"
    f.write_bytes(("\n".join(lines)).encode())  # no "\n" after the last line
    monkeypatch.setattr(data_prep, "CHUNK_BYTES", 16_000)
    monkeypatch.setattr(data_prep, "MAX_ROW_BYTES", 20_000)
    monkeypatch.setattr(data_formats, "MAX_ROW_BYTES", 20_000)
    tasks = data_prep._byte_ranges(f, f.stat().st_size)
    modes = set()
    for path, start, end in tasks:
        with open(path, "rb") as fh:
            fh.seek(start)
            expected, n = [], 0
            while fh.tell() < end:  # the line-by-line reference
                raw, err = data_formats.read_line(fh, path, n + 1)
                if raw is None:
                    break
                n += 1
                expected.append((raw, err and str(err)))
            fh.seek(start)
            got = [(raw, err and str(err)) for raw, err in data_prep._range_lines(fh, path, start, end)]
        assert got == expected
        modes.add(end - start <= 20_000)
    assert modes == {True, False}
    errors: list[DataError] = []
    with open(f, "rb") as fh:
        reference = list(data_formats.iter_jsonl(fh, str(f), errors))
    rep = prepare(settings_for(f, workers=1), tmp_path / "ws").report
    assert rep.rows_read == len(reference) + len(errors) and rep.rows_bad == len(errors) > 0
    assert sorted(rep.bad_examples) == sorted(str(e) for e in errors)


def test_folders_text_csv_and_parquet_go_through_the_pipeline(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(f"{words(30, 1)}\n\n{words(30, 2)}\n\n\n{words(30, 1)}\n")
    (docs / "b.md").write_text(f"# Title\n{words(30, 3)}\n")
    (docs / "empty.txt").write_text("")
    rep = prepare(settings_for(docs, method="cpt", text_split="blank_lines", dedup=True), tmp_path / "ws").report
    assert (rep.rows_read, rep.rows_bad, rep.duplicates, rep.rows_out) == (5, 1, 1, 3)
    assert rep.bad_examples == [f"{docs / 'empty.txt'}: the file is empty"]
    with pytest.raises(DataError, match="the file is empty"):
        prepare(settings_for(docs, method="cpt", on_bad_rows="fail"), tmp_path / "ws")
    rows = sft_rows(12)
    (tmp_path / "d.csv").write_text("prompt,completion,topic\n" + "".join(
        f"{r['prompt']},{r['completion']},{r['topic']}\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = prepare(settings_for(tmp_path / "d.csv", label_column="topic", validation_split=0.5), tmp_path / "ws")
    b = prepare(settings_for(tmp_path / "d.parquet", label_column="topic", validation_split=0.5), tmp_path / "ws")
    assert a.fingerprint != b.fingerprint  # different bytes
    assert (a.directory / "train.jsonl").read_text() == (b.directory / "train.jsonl").read_text()
    assert a.report.split_labels == {"train": {"a": 3, "b": 3}, "validation": {"a": 3, "b": 3}}
