"""Catalog datasets -> rows: awkward prompt files in every format, drop/dedup counts, column checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeport.catalog import DEFAULT_CATALOG, Resolved, load_catalog
from safeport.datasets import build_all, build_pairs, build_single, check_columns
from safeport.errors import USER_ERRORS
from safeport.store.readers import DataFileError
from safeport.texts import text_id
from tests.test_catalog import base_catalog, write_catalog

SECRET = "UNSAFE-SENTINEL-how-to-make-a-weapon"
SUFFIX = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl", "text": ".txt"}


def write_prompts(root: Path, fmt: str, rows: list[str], cats: list[str] | None = None) -> str:
    """A prompt file with columns prompt (+ cat); returns its path relative to ``root``."""
    name = "data/p" + SUFFIX[fmt]
    path = root / name
    path.parent.mkdir(exist_ok=True)
    cats = cats if cats is not None else ["c"] * len(rows)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["prompt", "cat"])
        w.writerows(zip(rows, cats, strict=True))
        path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    elif fmt == "parquet":
        pq.write_table(pa.table({"prompt": rows, "cat": cats}), path)
    elif fmt == "jsonl":
        text = "".join(json.dumps({"prompt": r, "cat": c}) + "\n" for r, c in zip(rows, cats, strict=True))
        path.write_text(text, encoding="utf-8")
    else:
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8", newline="")
    return name


def resolve(root: Path, **prompts: Any) -> Resolved:
    """The base catalog with its prompts dataset ``pr`` changed by ``prompts``."""
    data = base_catalog(root)
    data["datasets"]["pr"].update(prompts)
    return load_catalog(write_catalog(root, data))


FORMATS = ("csv", "parquet", "jsonl", "text")


def _source(fmt: str, name: str) -> dict[str, Any]:
    return {"path": name, "column": "prompt"} if fmt != "text" else {"path": name}


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_and_whitespace_rows_are_dropped_and_counted(tmp_path: Path, fmt: str) -> None:
    rows = ["first prompt", "", "   ", "\t", "second  prompt\r\n", "\x00\x00", "third"]
    if fmt == "text":
        rows = ["first prompt", "", "   ", "\t", "second  prompt", "\x00\x00", "third"]
    name = write_prompts(tmp_path, fmt, rows)
    ds = build_single(resolve(tmp_path, sources=[_source(fmt, name)]), "pr")
    assert [r.text for r in ds.rows] == ["first prompt", "second prompt", "third"]
    assert ds.report["empty_dropped"] == 4
    assert [r.idx for r in ds.rows] == [0, 1, 2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicates_dropped_and_counted_when_dedup_is_on(tmp_path: Path, fmt: str) -> None:
    rows = ["a prompt", "b prompt", "a prompt", "  a   prompt ", "b prompt"]
    name = write_prompts(tmp_path, fmt, rows)
    on = build_single(resolve(tmp_path, sources=[_source(fmt, name)]), "pr")
    assert [r.text for r in on.rows] == ["a prompt", "b prompt"]
    assert on.report["duplicates_dropped"] == 3
    off = build_single(resolve(tmp_path, sources=[_source(fmt, name)], dedup=False), "pr")
    assert len(off.rows) == 5 and "duplicates_dropped" not in off.report
    assert on.content_hash != off.content_hash


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_rows_nul_bytes_and_unicode(tmp_path: Path, fmt: str) -> None:
    rows = ["x" * 100_000, "nul\x00inside", "café ✓ 日本", "esc\x1b[31m"]
    name = write_prompts(tmp_path, fmt, rows)
    ds = build_single(resolve(tmp_path, sources=[_source(fmt, name)]), "pr")
    assert [r.text for r in ds.rows] == ["x" * 100_000, "nul inside", "café ✓ 日本", "esc [31m"]
    assert all(r.text_id == text_id(r.text) for r in ds.rows)


def test_mixed_newlines_bom_and_quoted_newlines_in_csv(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    raw = b'\xef\xbb\xbfprompt,cat\r\none,a\ntwo,b\rthree,c\r\n"four\r\nlines, quoted",d\n'
    (tmp_path / "data" / "p.csv").write_bytes(raw)
    ds = build_single(resolve(tmp_path, sources=[{"path": "data/p.csv", "column": "prompt"}]), "pr")
    assert [r.text for r in ds.rows] == ["one", "two", "three", "four lines, quoted"]
    assert [r.category for r in ds.rows] == ["a", "b", "c", "d"]


def test_mixed_newlines_and_bom_in_text(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\nthree\rfour")
    ds = build_single(resolve(tmp_path, sources=[{"path": "data/p.txt"}]), "pr")
    assert [r.text for r in ds.rows] == ["one", "two", "three", "four"]
    assert all(r.category is None for r in ds.rows)  # a text file has no category column


def test_invalid_utf8_then_latin1(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.csv").write_bytes("prompt,cat\ncafé,a\n".encode("latin-1"))
    src = {"path": "data/p.csv", "column": "prompt"}
    with pytest.raises(DataFileError, match=r"byte 14 \(line 2\).*encoding:"):
        build_single(resolve(tmp_path, sources=[src]), "pr")
    ds = build_single(resolve(tmp_path, sources=[{**src, "encoding": "latin-1"}]), "pr")
    assert [r.text for r in ds.rows] == ["café"]


def test_all_empty_file_is_a_user_error(tmp_path: Path) -> None:
    name = write_prompts(tmp_path, "csv", ["", "  ", "\x00"])
    with pytest.raises(DataFileError, match=r"'pr' has no usable texts.*empty_dropped=3") as info:
        build_single(resolve(tmp_path, sources=[{"path": name, "column": "prompt"}]), "pr")
    assert isinstance(info.value, USER_ERRORS)


def test_empty_text_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_bytes(b"")
    with pytest.raises(DataFileError, match="no usable texts"):
        build_single(resolve(tmp_path, sources=[{"path": "data/p.txt"}]), "pr")


def test_category_column(tmp_path: Path) -> None:
    name = write_prompts(tmp_path, "jsonl", ["a one", "b two", "c three"], cats=["x", "  ", "y\x00"])
    ds = build_single(resolve(tmp_path, sources=[{"path": name, "column": "prompt"}]), "pr")
    assert [r.category for r in ds.rows] == ["x", None, "y"]


def test_text_and_csv_sources_mixed_with_a_category_column(tmp_path: Path) -> None:
    name = write_prompts(tmp_path, "csv", ["from csv"], cats=["k"])
    (tmp_path / "data" / "t.txt").write_text("from text\n", encoding="utf-8")
    sources = [{"path": name, "column": "prompt"}, {"path": "data/t.txt"}]
    ds = build_single(resolve(tmp_path, sources=sources, category_column="cat"), "pr")
    assert [(r.text, r.category) for r in ds.rows] == [("from csv", "k"), ("from text", None)]


def _pairs_root(
    tmp_path: Path, rows: list[tuple[str, str, str]], dedup: bool = True, test_rows: Sequence[tuple[str, str, str]] = ()
) -> Resolved:
    """The base catalog with ``rows`` as its train pairs and ``test_rows`` (default none) as its test pairs."""
    data = base_catalog(tmp_path)
    sources = []
    for split, split_rows in (("train", rows), ("test", list(test_rows))):
        path = tmp_path / "data" / f"pairs_{split}.parquet"
        safe, unsafe, cat = (list(x) for x in zip(*split_rows, strict=True)) if split_rows else ([], [], [])
        schema = pa.schema([("safe", pa.string()), ("unsafe", pa.string()), ("cat", pa.string())])
        pq.write_table(pa.table({"safe": safe, "unsafe": unsafe, "cat": cat}, schema=schema), path)
        sources.append({"path": f"data/pairs_{split}.parquet", "split": split})
    data["datasets"]["prs"]["sources"] = sources
    data["datasets"]["prs"]["dedup"] = dedup
    return load_catalog(write_catalog(tmp_path, data))


def test_pairs_drop_empty_sides_and_duplicates(tmp_path: Path) -> None:
    rows = [
        ("a cat", "a bad cat", "x"),
        ("", "unsafe only", "x"),
        ("safe only", "   ", "x"),
        ("a  cat", "a bad cat ", "y"),  # the same pair after cleaning
        ("a dog", "a bad dog", "z"),
    ]
    ds = build_pairs(_pairs_root(tmp_path, rows), "prs")
    assert [(r.pair_id, r.side, r.text) for r in ds.rows] == [
        (0, "safe", "a cat"),
        (0, "unsafe", "a bad cat"),
        (1, "safe", "a dog"),
        (1, "unsafe", "a bad dog"),
    ]
    assert ds.report == {"empty_pairs_dropped": 2, "duplicate_pairs_dropped": 1}
    kept = build_pairs(_pairs_root(tmp_path, rows, dedup=False), "prs")
    assert len(kept.rows) == 6 and "duplicate_pairs_dropped" not in kept.report


def test_pairs_all_empty_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"'prs' has no usable pairs.*empty_pairs_dropped=1"):
        build_pairs(_pairs_root(tmp_path, [("", SECRET, "x")]), "prs")


def test_build_all_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    resolved = load_catalog(write_catalog(tmp_path, base_catalog(tmp_path)))
    a, b = build_all(resolved), build_all(resolved)
    assert {k: v.content_hash for k, v in a.items()} == {k: v.content_hash for k, v in b.items()}
    assert a["anc"].rows == b["anc"].rows
    pair_ids = {r.text_id for r in a["prs"].rows}
    assert not pair_ids & {r.text_id for r in a["anc"].rows}


# --- wrong columns, caught early ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_check_columns_names_key_file_column_and_available(tmp_path: Path, fmt: str) -> None:
    name = write_prompts(tmp_path, fmt, [SECRET])
    resolved = resolve(tmp_path, sources=[{"path": name, "column": "promt"}])
    with pytest.raises(DataFileError) as info:
        check_columns(resolved)
    message = str(info.value)
    assert "datasets.pr.sources.0" in message and str(tmp_path / name) in message
    assert "['promt'] not found" in message
    if fmt == "parquet":  # a schema lists names; a CSV header might be a data row, so it is only counted
        assert "available columns: ['prompt', 'cat']" in message
    else:
        assert "2 column(s)" in message and "'cat'" not in message
    assert "Fix column:" in message and SECRET not in message


@pytest.mark.parametrize("dataset", ["pr", "prs"])
def test_check_columns_never_quotes_the_first_row_of_a_headerless_csv(tmp_path: Path, dataset: str) -> None:
    data = base_catalog(tmp_path)
    file = {"pr": "prompts.csv", "prs": "pairs.csv"}[dataset]
    (tmp_path / "data" / file).write_text(f"{SECRET} first,{SECRET} second,x\nmore,rows,y\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        build_all(load_catalog(write_catalog(tmp_path, data)))
    message = str(info.value)
    assert f"datasets.{dataset}.sources.0" in message and "3 column(s)" in message and "looks like data" in message
    assert SECRET not in message


def test_check_columns_reports_every_problem_at_once(tmp_path: Path) -> None:
    data = base_catalog(tmp_path)
    data["datasets"]["prs"]["unsafe_column"] = "unsafe_prompt"
    data["datasets"]["pr"]["category_column"] = "categories"
    with pytest.raises(DataFileError) as info:
        build_all(load_catalog(write_catalog(tmp_path, data)))
    message = str(info.value)
    assert "datasets.prs.sources.0" in message and "['unsafe_prompt']" in message
    assert "datasets.pr.sources.0" in message and "['categories']" in message


def test_check_columns_reads_only_the_header(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    # A valid header followed by bytes that are not UTF-8: only a full read would fail.
    (tmp_path / "data" / "p.csv").write_bytes(b"prompt,cat\n" + b"x,y\n" * 5000 + b"\xff\n")
    check_columns(resolve(tmp_path, sources=[{"path": "data/p.csv", "column": "prompt"}]))


def test_jsonl_wrong_column_is_caught_when_read(tmp_path: Path) -> None:
    name = write_prompts(tmp_path, "jsonl", ["a"])
    resolved = resolve(tmp_path, sources=[{"path": name, "column": "promt"}])
    check_columns(resolved)  # JSONL keys can vary per line: checked on the full read
    with pytest.raises(DataFileError, match=r"\['promt'\] not found; available columns: \['cat', 'prompt'\]"):
        build_single(resolved, "pr")


def test_real_catalog_columns_are_right() -> None:
    for profile in ("default", "paper"):
        check_columns(load_catalog(DEFAULT_CATALOG, profile))
