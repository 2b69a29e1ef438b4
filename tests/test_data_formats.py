"""Reading every supported source and shape, and a clear located message for each kind of bad
input (never a traceback): engine/data_formats.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data_formats import (
    DataError,
    check_file,
    data_files,
    iter_raw_rows,
    load_rows,
    normalize_row,
    parse_json_line,
    resolve_format,
)
from tests.conftest import write_jsonl


def rows_of(path: Path, **kw) -> list[dict]:
    return [r.data for r in iter_raw_rows(path, **kw)]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_jsonl_json_csv_tsv_parquet_read_the_same_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows, "version": 2}))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"question {i},answer {i}\n" for i in range(5)))
    (tmp_path / "e.tsv").write_text("prompt\tcompletion\n" + "".join(f"question {i}\tanswer {i}\n" for i in range(5)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet"):
        assert rows_of(tmp_path / name) == rows, name


def test_csv_quoted_fields_with_commas_newlines_and_a_bom(tmp_path: Path) -> None:
    f = tmp_path / "q.csv"
    f.write_bytes('\ufeffprompt,completion\n"a, b","line one\nline two"\n"say ""hi""",ok\n'.encode())
    rows = list(iter_raw_rows(f))
    assert [r.data for r in rows] == [{"prompt": "a, b", "completion": "line one\nline two"},
                                     {"prompt": 'say "hi"', "completion": "ok"}]
    assert [r.line for r in rows] == [2, 4]


def test_text_files_one_document_per_file_or_split_by_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "doc.txt"
    f.write_text("First paragraph\nstill first.\n\n\nSecond.\n   \nThird\n")
    assert rows_of(f) == [{"text": "First paragraph\nstill first.\n\n\nSecond.\n   \nThird\n"}]
    rows = list(iter_raw_rows(f, text_split="blank_lines"))
    assert [r.data["text"] for r in rows] == ["First paragraph\nstill first.", "Second.", "Third"]
    assert [r.line for r in rows] == [1, 5, 7]
    fmt, shaped, bad = load_rows([f], "cpt", "auto", {}, "fail", text_split="blank_lines")
    assert (fmt, len(shaped), bad) == ("text", 3, [])


def test_folder_of_mixed_files_is_read_in_sorted_order_hidden_files_skipped(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Notes\nmarkdown body")
    (tmp_path / "a.txt").write_text("plain body")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "json body"}])
    (tmp_path / ".hidden.txt").write_text("not me")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert [p.name for p in data_files(tmp_path)] == ["a.txt", "b.md", "c.jsonl"]
    assert [r["text"] for r in rows_of(tmp_path)] == ["plain body", "# Notes\nmarkdown body", "json body"]


def test_empty_folder_names_the_data_suffixes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder holds no data files"):
        data_files(tmp_path)


def test_saved_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert data_files(tmp_path / "saved") == [tmp_path / "saved"]
    assert rows_of(tmp_path / "saved") == [{"text": "one"}, {"text": "two"}]
    assert rows_of(tmp_path / "dict") == [{"text": "one"}, {"text": "two"}]


def test_hub_name_without_network_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        list(iter_raw_rows("hf:nobody/no-such-dataset-zt:train"))
    assert "cannot stream the hub dataset 'nobody/no-such-dataset-zt'" in str(err.value)
    assert "network" in str(err.value)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, fmt, expected", [
    ({"text": "doc"}, "text", {"text": "doc"}),
    ({"prompt": "p", "completion": "c"}, "prompt_completion", {"prompt": "p", "completion": "c"}),
    ({"instruction": "Do it", "input": "with this", "output": "done"}, "prompt_completion",
     {"prompt": "Do it\n\nwith this", "completion": "done"}),
    ({"instruction": "Do it", "input": "", "output": "done"}, "prompt_completion",
     {"prompt": "Do it", "completion": "done"}),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "messages",
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}]}, "messages",
     {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}]}),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "yo"}]}, "messages",
     {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "yo"}]}),
    ({"system": "be brief", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     "messages", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]}),
    ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "preference",
     {"prompt": "q", "chosen": "good", "rejected": "bad"}),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}, "preference",
     {"prompt": "", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}),
])
def test_every_shape_normalises(raw: dict, fmt: str, expected: dict) -> None:
    from engine.data_formats import Row

    assert resolve_format(Row("f", 1, raw), None, None, {}) == fmt
    assert normalize_row(raw, fmt, {}) == expected


def test_column_mapping_and_the_missing_column_message(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answr": "a."}])
    _fmt, rows, _ = load_rows([f], "sft", "prompt_completion", {"prompt": "question", "completion": "answr"}, "fail")
    assert rows == [{"prompt": "q?", "completion": "a."}]
    with pytest.raises(DataError) as err:
        load_rows([f], "sft", "prompt_completion", {}, "fail")
    msg = str(err.value)
    assert "needs columns prompt, completion; found answr, question" in msg
    with pytest.raises(DataError, match="cannot tell the data format from the columns answr, question"):
        load_rows([f], "sft", "auto", {}, "fail")


def test_method_and_format_mismatch_is_reported(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "doc"}])
    with pytest.raises(DataError, match="dpo cannot train on text data"):
        load_rows([f], "dpo", "auto", {}, "fail")


def test_the_last_chat_message_must_be_the_assistants(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: messages: the last message must be the assistant's"):
        load_rows([f], "sft", "auto", {}, "fail")


# --------------------------------------------------------------------------------------------
# Bad input: a located message each, fail stops, skip counts
# --------------------------------------------------------------------------------------------


def bad_jsonl(tmp_path: Path) -> Path:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "fine"}\n'
                  b'{"text": null}\n'
                  b'{"text": "caf\xe9 latin-1"}\n'
                  b'{"text": "cut off\n'
                  b'[1, 2]\n'
                  b'{"text": 5}\n'
                  b'{"text": "also fine"}\n')
    return f


def test_skip_counts_every_bad_row_with_file_line_and_reason(tmp_path: Path) -> None:
    f = bad_jsonl(tmp_path)
    _fmt, rows, bad = load_rows([f], "cpt", "auto", {}, "skip")
    assert rows == [{"text": "fine"}, {"text": "also fine"}]
    assert [e.line for e in bad] == [2, 3, 4, 5, 6]
    assert bad[0].message == "column 'text' is null; expected text"
    assert bad[1].message == ("not UTF-8 (byte 0xe9 at column 14); it looks like Latin-1/Windows-1252 "
                              "text: re-save the file as UTF-8")
    assert bad[2].message.startswith("not valid JSON") and bad[2].message.endswith("(the line looks cut off)")
    assert bad[3].message == "expected a JSON object per line, got a list"
    assert bad[4].message == "column 'text': expected text, got a number"
    assert all(str(e).startswith(f"{f}:") for e in bad)


def test_json_lines_parse_exactly_as_the_json_module_parses_them() -> None:
    """orjson parses the lines, but where it would differ from json (integers over 64 bits,
    NaN, lone surrogates, floats) the row is what json.loads gives."""
    lines = [b'{"a": 123456789012345678901234567890, "b": -9223372036854775809, "c": 18446744073709551615}',
             b'{"nan": NaN, "inf": -Infinity, "big": 1e400, "f": 0.1, "e": 1E-7, "z": -0.0}',
             b'{"s": "\\ud800 lone", "pair": "\\ud83d\\ude00", "ctl": "\\u0000"}',
             b'{"x": [1, {"y": 2.50, "w": [true, false, null]}], "t": "caf\xc3\xa9"}',
             b'{"a": 1, "b": 2, "a": 3}',
             b'  {"spaced": "out"}  \r\n']
    for raw in lines:
        got = parse_json_line(raw, "f.jsonl", 1)
        want = json.loads(raw.decode())
        assert repr(got) == repr(want) and list(got) == list(want), raw


def test_fail_stops_at_the_first_bad_row(tmp_path: Path) -> None:
    f = bad_jsonl(tmp_path)
    with pytest.raises(DataError) as err:
        load_rows([f], "cpt", "auto", {}, "fail")
    assert (err.value.file, err.value.line) == (str(f), 2)


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_rows([f], "cpt", "auto", {}, "fail")
    with pytest.raises(DataError, match="the file is empty"):
        load_rows([f], "cpt", "auto", {}, "skip")  # nothing usable at all


def test_a_50_mb_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    f = tmp_path / "huge.jsonl"
    with open(f, "wb") as fh:
        fh.write(b'{"text": "before"}\n{"text": "')
        block = b"x" * (1 << 20)
        for _ in range(50):
            fh.write(block)
        fh.write(b'"}\n{"text": "after"}\n')
    _fmt, rows, bad = load_rows([f], "cpt", "auto", {}, "skip")
    assert rows == [{"text": "before"}, {"text": "after"}]
    assert bad[0].line == 2 and "52.4 MB long, over the 16.0 MB limit" in bad[0].message
    with pytest.raises(DataError, match=r"huge\.jsonl:2: the line is 52\.4 MB long"):
        load_rows([f], "cpt", "auto", {}, "fail")


def test_utf16_file_is_named_as_such(tmp_path: Path) -> None:
    f = tmp_path / "u16.jsonl"
    f.write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="the file is UTF-16, not UTF-8; re-save it as UTF-8"):
        load_rows([f], "cpt", "auto", {}, "fail")


def test_non_utf8_text_and_csv_files(tmp_path: Path) -> None:
    t = tmp_path / "latin.txt"
    t.write_bytes(b"line one\nna\xefve line two\n")
    with pytest.raises(DataError, match=r"latin.txt:2: not UTF-8 \(byte 0xef at column 3\)"):
        load_rows([t], "cpt", "auto", {}, "fail")
    c = tmp_path / "latin.csv"
    c.write_bytes(b"text\nfine\ncaf\xe9\nalso fine\n")
    _fmt, rows, bad = load_rows([c], "cpt", "auto", {}, "skip")
    assert rows == [{"text": "fine"}, {"text": "also fine"}]
    assert bad[0].line == 3 and "not UTF-8" in bad[0].message


def test_csv_quoting_errors_and_field_counts(tmp_path: Path) -> None:
    c = tmp_path / "q.csv"
    c.write_text('prompt,completion\nok,fine\n"bad"quote,x\nonly one field\na,b,c\nlast,row\n')
    _fmt, rows, bad = load_rows([c], "sft", "auto", {}, "skip")
    assert rows == [{"prompt": "ok", "completion": "fine"}, {"prompt": "last", "completion": "row"}]
    assert [(e.line, e.message.split(";")[0]) for e in bad] == [
        (3, "CSV quoting error: ',' expected after '\"'"),
        (4, "1 fields, fewer than the 2 columns of the header"),
        (5, "3 fields, more than the 2 columns of the header (an unquoted delimiter inside a field?)"),
    ]
    u = tmp_path / "unclosed.csv"
    u.write_text('prompt,completion\nok,fine\n"never closed,x\nmore,rows\n')
    with pytest.raises(DataError) as err:
        list(iter_raw_rows(u))
    assert "is never closed" in str(err.value) and err.value.file == str(u)


def test_json_file_errors(tmp_path: Path) -> None:
    f = tmp_path / "rows.json"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"one object per line is JSON lines: name the file .jsonl"):
        list(iter_raw_rows(f))
    g = tmp_path / "arr.jsonl"
    g.write_text('[{"text": "a"}, {"text": "b"}]\n')
    with pytest.raises(DataError, match=r"a JSON array belongs in a \.json file"):
        list(iter_raw_rows(g))


def test_unknown_suffix_and_unreadable_parquet(tmp_path: Path) -> None:
    x = tmp_path / "data.xlsx"
    x.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"unknown data file type '\.xlsx'"):
        list(iter_raw_rows(x))
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(iter_raw_rows(p))


def test_check_file_reports_format_rows_and_bad(tmp_path: Path) -> None:
    f = bad_jsonl(tmp_path)
    check = check_file(f, "cpt", "auto", {}, "skip")
    assert (check.format, check.rows, len(check.bad)) == ("text", 2, 5)
