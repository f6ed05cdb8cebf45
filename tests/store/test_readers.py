"""store.readers: every format reads awkward files, and every bad file is a DataFileError.

Error messages name files, lines, byte offsets and columns, never row contents:
the rows are unsafe prompts, and messages end up in logs.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeport.store.readers import DataFileError, read_columns, read_header, split_lines

FORMATS = ("csv", "parquet", "jsonl", "text")
SECRET = "UNSAFE-SENTINEL-how-to-make-a-weapon"
ROUNDTRIP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(path: Path, fmt: str, rows: Sequence[str | None], column: str = "prompt") -> Path:
    """Write ``rows`` as one column of a ``fmt`` file (text: one row per line)."""
    path = path.with_suffix({"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl", "text": ".txt"}[fmt])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)  # "\r\n" rows, so fields holding \r or \n are quoted
        w.writerow([column, "other"])
        w.writerows([[r, "x"] for r in rows])
        path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    elif fmt == "parquet":
        pq.write_table(pa.table({column: pa.array(rows, pa.string()), "other": ["x"] * len(rows)}), path)
    elif fmt == "jsonl":
        lines = (json.dumps({column: r, "other": "x"}, ensure_ascii=False) + "\n" for r in rows)
        path.write_text("".join(lines), encoding="utf-8", newline="")
    else:
        path.write_text("".join(f"{r}\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_awkward_rows(tmp_path: Path, fmt: str) -> None:
    rows = ["plain", "", "   ", "comma, \"quote\" and 'apostrophe'", "ünïcødé ✓ 日本", "x" * 100_000, "nul\x00byte"]
    path = write(tmp_path / "f", fmt, rows)
    got = read_columns(path, fmt, ["prompt"])["prompt"]
    assert got == rows


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_embedded_newlines_stay_in_the_row(tmp_path: Path, fmt: str) -> None:
    rows = ["line one\nline two", "crlf\r\ninside", "cr\ronly", "u2028\u2028inside", "nel\x85inside"]
    path = write(tmp_path / "f", fmt, rows)
    assert read_columns(path, fmt, ["prompt"])["prompt"] == rows


def test_text_rows_split_only_at_newlines(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes("a\r\nb\nc\rd\u2028still d\x0cand\x1c\x85too\n".encode())
    assert read_columns(path, "text", ["text"])["text"] == ["a", "b", "c", "d\u2028still d\x0cand\x1c\x85too"]
    assert split_lines("") == [] and split_lines("a\n\n") == ["a", ""] and split_lines("a") == ["a"]


def test_mixed_newlines_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "f.csv"
    csv_path.write_bytes(b'prompt,n\r\none,1\ntwo,2\rthree,3\r\n"four\r\nlines",4')
    assert read_columns(csv_path, "csv", ["prompt"])["prompt"] == ["one", "two", "three", "four\r\nlines"]
    jl = tmp_path / "f.jsonl"
    jl.write_bytes(b'{"p": "a"}\r\n{"p": "b"}\r{"p": "c"}\n\n  \n{"p": "d"}')
    assert read_columns(jl, "jsonl", ["p"])["p"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text"])
def test_utf8_bom_is_dropped(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / "f", fmt, ["first", "second"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    column = "prompt" if fmt != "text" else "text"
    assert read_columns(path, fmt, [column])[column] == ["first", "second"]
    if fmt == "csv":
        assert read_header(path, fmt) == ["prompt", "other"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "text"])
def test_invalid_utf8_names_byte_line_and_fix(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / "f", fmt, ["café one", "café two"])
    raw = path.read_bytes().replace("é two".encode(), b"\xe9 two")  # latin-1 é on the last row
    path.write_bytes(raw)
    bad = raw.index(b"\xe9 two")
    line = raw[:bad].count(b"\n") + 1
    with pytest.raises(DataFileError) as info:
        read_columns(path, fmt, ["prompt"] if fmt != "text" else ["text"])
    message = str(info.value)
    assert str(path) in message and f"byte {bad}" in message and f"line {line}" in message
    assert "encoding:" in message and "latin-1" in message


def test_latin1_encoding_then_works(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes("prompt\ncafé\nnaïve\n".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"byte 10 \(line 2\)"):
        read_columns(path, "csv", ["prompt"])
    assert read_columns(path, "csv", ["prompt"], encoding="latin-1")["prompt"] == ["café", "naïve"]
    assert read_columns(path, "csv", ["prompt"], encoding="ISO-8859-1")["prompt"] == ["café", "naïve"]


def test_byte_offset_line_counts_cr_newlines(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"a\rb\r\n\xff")
    with pytest.raises(DataFileError, match=r"byte 5 \(line 3\)"):
        read_columns(path, "text", ["text"])


def test_utf16_file_gets_an_encoding_hint(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes("hello\nworld\n".encode("utf-16"))
    with pytest.raises(DataFileError, match="encoding: utf-16"):
        read_columns(path, "text", ["text"])
    assert read_columns(path, "text", ["text"], encoding="utf-16")["text"] == ["hello", "world"]


def test_unknown_encoding(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "csv", ["a"])
    with pytest.raises(DataFileError, match=r"encoding 'klingon' is unknown; use e\.g\. utf-8"):
        read_columns(path, "csv", ["prompt"], encoding="klingon")


@pytest.mark.parametrize("codec", ["rot13", "base64", "zlib", "idna"])
@pytest.mark.parametrize("fmt", ["csv", "text"])
def test_codec_that_is_not_a_file_encoding(tmp_path: Path, codec: str, fmt: str) -> None:
    path = write(tmp_path / "f", fmt, ["a"])
    with pytest.raises(DataFileError, match=rf"encoding '{codec}' is not a text encoding.*use e\.g\. utf-8"):
        read_columns(path, fmt, ["prompt"], encoding=codec)
    if fmt == "csv":
        with pytest.raises(DataFileError, match="not a text encoding"):
            read_header(path, fmt, codec)


# --- empty and broken files --------------------------------------------------------------


def test_empty_files(tmp_path: Path) -> None:
    for name in ("e.csv", "e.jsonl", "e.txt", "e.parquet"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataFileError, match=r"empty.*header"):
        read_columns(tmp_path / "e.csv", "csv", ["prompt"])
    with pytest.raises(DataFileError, match="no JSON objects"):
        read_columns(tmp_path / "e.jsonl", "jsonl", ["prompt"])
    assert read_columns(tmp_path / "e.txt", "text", ["text"]) == {"text": []}
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        read_columns(tmp_path / "e.parquet", "parquet", ["prompt"])


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("prompt,other\n", encoding="utf-8")
    assert read_columns(path, "csv", ["prompt"]) == {"prompt": []}


def test_csv_short_rows_read_as_none(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("a,prompt\n1\n2,two,extra\n", encoding="utf-8")
    assert read_columns(path, "csv", ["prompt"])["prompt"] == [None, "two"]


def test_jsonl_broken_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(f'{{"p": "ok"}}\n\n{{"p": "{SECRET}"\n{{"p": "ok"}}\n', encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        read_columns(path, "jsonl", ["p"])
    message = str(info.value)
    assert str(path) in message and "line 3 is not valid JSON" in message and "fix the line" in message
    assert SECRET not in message


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("5", "int"), ("null", "NoneType")])
def test_jsonl_non_object_line(tmp_path: Path, line: str, kind: str) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(f'{{"p": "ok"}}\n{line}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=f"line 2 is a JSON {kind}, not an object"):
        read_columns(path, "jsonl", ["p"])


@pytest.mark.parametrize("value", [[SECRET], {"nested": SECRET}])
def test_jsonl_non_scalar_value(tmp_path: Path, value: object) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"p": "ok"}) + "\n" + json.dumps({"p": value}) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        read_columns(path, "jsonl", ["p"])
    message = str(info.value)
    assert "line 2: 'p' is a JSON" in message and "not text" in message and SECRET not in message


def test_jsonl_deeply_nested_line(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="line 1"):
        read_columns(path, "jsonl", ["p"])


@pytest.mark.parametrize("value", ["9" * 5000, "-" + "9" * 5000])
def test_jsonl_integer_beyond_pythons_digit_limit_names_the_line(tmp_path: Path, value: str) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text(f'{{"p": "{SECRET}"}}\n{{"p": "x", "cat": {value}}}\n', encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        read_columns(path, "jsonl", ["p"])
    message = str(info.value)
    assert "line 2 is not valid JSON" in message and "4300" in message and SECRET not in message
    assert len(message) < 400


def test_jsonl_lone_surrogate_escape_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text('{"p": "bad \\ud800 escape"}\n', encoding="utf-8")
    assert read_columns(path, "jsonl", ["p"])["p"] == ["bad \ud800 escape"]  # normalise() replaces it


def test_jsonl_missing_key_in_some_lines_is_none(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text('{"p": "a"}\n{"q": "b"}\n', encoding="utf-8")
    assert read_columns(path, "jsonl", ["p"])["p"] == ["a", None]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_wrong_column_names_file_column_and_available(tmp_path: Path, fmt: str) -> None:
    """A Parquet schema or JSON keys are names, not a data row: they are listed (when they look like names)."""
    path = write(tmp_path / "f", fmt, [SECRET, "b"])
    with pytest.raises(DataFileError) as info:
        read_columns(path, fmt, ["promt"])
    message = str(info.value)
    assert str(path) in message and "['promt'] not found" in message
    assert "available columns: ['" in message and "'prompt'" in message and "'other'" in message
    assert "Fix column:" in message and SECRET not in message


def test_wrong_csv_column_counts_the_header_without_quoting_it(tmp_path: Path) -> None:
    """A CSV header cannot be told from a data row, so its cells are never echoed, even when they look like names."""
    path = write(tmp_path / "f", "csv", [SECRET, "b"])
    with pytest.raises(DataFileError) as info:
        read_columns(path, "csv", ["promt"])
    message = str(info.value)
    assert str(path) in message and "['promt'] not found" in message and "2 column(s)" in message
    assert "'other'" not in message and "head -n 1" in message and "Fix column:" in message


HEADERLESS = "A woman with a knife walks into the room,violent scene with blood\nsecond row,more\n"


@pytest.mark.parametrize("wanted", [["prompt"], ["safe_prompt", "unsafe_prompt"]], ids=["prompts", "pairs"])
def test_headerless_csv_never_quotes_its_first_row(tmp_path: Path, wanted: list[str]) -> None:
    path = tmp_path / "headerless.csv"
    path.write_text(HEADERLESS, encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        read_columns(path, "csv", wanted)
    message = str(info.value)
    assert "woman" not in message and "knife" not in message and "blood" not in message
    assert "2 column(s)" in message and "looks like data" in message and "add a header line" in message


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_column_names_that_look_like_data_are_counted_not_listed(tmp_path: Path, fmt: str) -> None:
    """A Parquet file converted from a headerless CSV has a prompt as a column name; JSON keys could too."""
    path = write(tmp_path / "f", fmt, ["x"], column="A woman with a knife walks into the room")
    with pytest.raises(DataFileError) as info:
        read_columns(path, fmt, ["prompt"])
    message = str(info.value)
    assert "woman" not in message and "2 column(s)" in message and "looks like data" in message


def test_wrong_column_lists_at_most_30_columns(tmp_path: Path) -> None:
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({f"c{i}": ["x"] for i in range(100)}), path)
    with pytest.raises(DataFileError) as info:
        read_columns(path, "parquet", ["prompt"])
    assert "'c29', '...'" in str(info.value) and "c30" not in str(info.value)


def test_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    path.write_text(f"prompt\n{SECRET}\n", encoding="utf-8")
    for call in (lambda: read_columns(path, "parquet", ["prompt"]), lambda: read_header(path, "parquet")):
        with pytest.raises(DataFileError) as info:
            call()
        assert str(path) in str(info.value) and "not a readable Parquet file" in str(info.value)
        assert SECRET not in str(info.value)


def test_truncated_parquet(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "parquet", ["a"] * 100)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        read_columns(path, "parquet", ["prompt"])


def test_parquet_corrupt_data_page(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "parquet", [f"row {i} " * 20 for i in range(200)])
    raw = bytearray(path.read_bytes())
    for i in range(8, len(raw) // 2):  # the data pages, well before the footer
        raw[i] = 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match=str(path.name)):
        read_columns(path, "parquet", ["prompt"])


def test_parquet_non_text_column(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"prompt": [[SECRET], ["b"]], "n": [1, 2]}), path)
    with pytest.raises(DataFileError) as info:
        read_columns(path, "parquet", ["prompt"])
    assert "column 'prompt' has type list<" in str(info.value) and SECRET not in str(info.value)
    assert read_columns(path, "parquet", ["n"]) == {"n": [1, 2]}


def test_parquet_dictionary_and_large_strings(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    table = pa.table(
        {
            "d": pa.array(["a", "b", "a"]).dictionary_encode(),
            "l": pa.array(["x", "y", None], pa.large_string()),
        }
    )
    pq.write_table(table, path)
    assert read_columns(path, "parquet", ["d", "l"]) == {"d": ["a", "b", "a"], "l": ["x", "y", None]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_file_and_folder(tmp_path: Path, fmt: str) -> None:
    for path in (tmp_path / "nope", tmp_path):
        with pytest.raises(DataFileError, match="file not found; fix the path"):
            read_columns(path, fmt, ["prompt"])


def test_unsupported_format(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "csv", ["a"])
    with pytest.raises(DataFileError, match="format 'xlsx' is not supported; use csv, parquet, jsonl or text"):
        read_columns(path, "xlsx", ["prompt"])


def test_text_file_has_one_column(tmp_path: Path) -> None:
    path = write(tmp_path / "f", "text", ["a"])
    with pytest.raises(DataFileError, match="a text file has one column"):
        read_columns(path, "text", ["text", "category"])


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "f", "csv", ["a"])

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 0 does not stop root
    with pytest.raises(DataFileError, match=r"cannot be read \(Permission denied\); check its permissions"):
        read_columns(path, "csv", ["prompt"])


def test_read_header(tmp_path: Path) -> None:
    assert read_header(write(tmp_path / "a", "csv", ["x"]), "csv") == ["prompt", "other"]
    assert read_header(write(tmp_path / "b", "parquet", ["x"]), "parquet") == ["prompt", "other"]
    assert read_header(write(tmp_path / "c", "jsonl", ["x"]), "jsonl") is None
    assert read_header(write(tmp_path / "d", "text", ["x"]), "text") is None
    (tmp_path / "e.csv").write_bytes(b"")
    assert read_header(tmp_path / "e.csv", "csv") == []
    (tmp_path / "q.csv").write_bytes(b'"multi\nline",b\n1,2\n')
    assert read_header(tmp_path / "q.csv", "csv") == ["multi\nline", "b"]
    with pytest.raises(DataFileError, match="file not found"):
        read_header(tmp_path / "nope.csv", "csv")


def test_read_header_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"pr\xffompt\nx\n")
    with pytest.raises(DataFileError, match=r"byte 2 \(line 1\).*encoding:"):
        read_header(path, "csv")
    assert read_header(path, "csv", "latin-1") == ["pr\xffompt"]


def test_errors_never_quote_rows(tmp_path: Path) -> None:
    """The same secret row in every kind of broken file; no message may contain it."""
    cases: list[tuple[str, bytes, str]] = [
        ("a.jsonl", f'{{"p": "{SECRET}"}}\n{{"p": "{SECRET}\n'.encode(), "jsonl"),
        ("b.jsonl", f'{{"p": "{SECRET}"}}\n["{SECRET}"]\n'.encode(), "jsonl"),
        ("c.jsonl", f'{{"q": "{SECRET}"}}\n'.encode(), "jsonl"),
        ("d.csv", f"q\n{SECRET}\n".encode(), "csv"),
        ("e.csv", f"p\n{SECRET}\xff\n".encode("latin-1"), "csv"),
        ("f.txt", f"{SECRET}\n\xff{SECRET}\n".encode("latin-1"), "text"),
        ("g.parquet", SECRET.encode() * 10, "parquet"),
    ]
    for name, raw, fmt in cases:
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(DataFileError) as info:
            read_columns(path, fmt, ["p"])
        assert SECRET not in str(info.value), name


# --- property-based round trips ---------------------------------------------------------

ROW = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60)


@ROUNDTRIP
@given(rows=st.lists(st.one_of(ROW, st.none()), min_size=1, max_size=20), fmt=st.sampled_from(["parquet", "jsonl"]))
def test_roundtrip_property_exact_formats(tmp_path: Path, rows: list[str | None], fmt: str) -> None:
    path = write(tmp_path / "p", fmt, rows)
    assert read_columns(path, fmt, ["prompt"])["prompt"] == rows


@ROUNDTRIP
@given(rows=st.lists(ROW, max_size=20))
def test_roundtrip_property_csv(tmp_path: Path, rows: list[str]) -> None:
    path = write(tmp_path / "p", "csv", rows)
    assert read_columns(path, "csv", ["prompt"])["prompt"] == rows


@ROUNDTRIP
@given(raw=st.binary(max_size=300), fmt=st.sampled_from(FORMATS))
def test_random_bytes_read_or_data_file_error(tmp_path: Path, raw: bytes, fmt: str) -> None:
    path = tmp_path / "r.bin"
    path.write_bytes(raw)
    try:
        out = read_columns(path, fmt, ["p"])
    except DataFileError:
        return
    assert set(out) == {"p"}
