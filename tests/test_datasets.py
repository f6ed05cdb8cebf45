"""Catalog datasets -> rows: awkward prompt files in every format, drop/dedup counts, column checks."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeport.catalog import DEFAULT_CATALOG, CatalogError, Resolved, load_catalog
from safeport.cli import main
from safeport.datasets import build_all, build_pairs, build_single, check_columns
from safeport.errors import USER_ERRORS
from safeport.store.readers import DataFileError, read_columns
from safeport.texts import text_id
from tests.conftest import REPO
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


# --- identity: the rows, nothing else ---------------------------------------------------------------

DATA = REPO / "data"


def _i2p_copies(folder: Path) -> dict[str, str]:
    """The first 300 I2P rows (prompt, categories) as CSV, Parquet and JSONL; {format: path}."""
    cols = read_columns(DATA / "i2p.csv", "csv", ["prompt", "categories"])
    cols = {k: v[:300] for k, v in cols.items()}
    folder.mkdir(parents=True, exist_ok=True)
    csv_text = io.StringIO()
    w = csv.writer(csv_text)
    w.writerow(["prompt", "categories", "extra"])
    w.writerows([p, c, i] for i, (p, c) in enumerate(zip(cols["prompt"], cols["categories"], strict=True)))
    (folder / "i2p.csv").write_text(csv_text.getvalue(), encoding="utf-8", newline="")
    pq.write_table(pa.table(cols), folder / "i2p.parquet")
    lines = [
        json.dumps({"categories": c, "prompt": p}) for p, c in zip(cols["prompt"], cols["categories"], strict=True)
    ]
    (folder / "i2p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {fmt: str(folder / f"i2p.{fmt}") for fmt in ("csv", "parquet", "jsonl")}


def test_csv_parquet_and_jsonl_copies_give_the_same_dataset_hash(tmp_path: Path) -> None:
    copies = _i2p_copies(tmp_path / "copies")
    hashes = {}
    for fmt, path in copies.items():
        ds = build_single(
            resolve(tmp_path, sources=[{"path": path, "column": "prompt"}], category_column="categories", max_count=50),
            "pr",
        )
        assert len(ds.rows) == 50 and any(r.category for r in ds.rows)
        hashes[fmt] = ds.content_hash
    assert len(set(hashes.values())) == 1, hashes


def reverse_keys(value: Any) -> Any:
    """The same YAML data with every mapping's keys in reverse order (lists keep their order)."""
    if isinstance(value, dict):
        return {k: reverse_keys(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [reverse_keys(v) for v in value]
    return value


def test_moved_files_descriptions_and_key_order_keep_every_hash(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = build_all(load_catalog(write_catalog(a, base_catalog(a))))
    data = base_catalog(b)
    (b / "data").rename(b / "moved")  # same bytes, another folder
    for entry in data["datasets"].values():
        entry["description"] = "edited description"
        entry["sources"] = [{**s, "path": s["path"].replace("data/", "moved/")} for s in entry["sources"]]
    data["datasets"]["pr"]["sources"][0]["format"] = "csv"  # said explicitly now
    path = write_catalog(b, reverse_keys(data))
    path.write_text("# a comment on top\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    second = build_all(load_catalog(path))
    assert {k: v.content_hash for k, v in first.items()} == {k: v.content_hash for k, v in second.items()}
    assert second["pr"].files[0].path == str(b / "moved" / "prompts.csv")  # the report follows the files


def test_changed_rows_change_the_hash(tmp_path: Path) -> None:
    one = build_single(resolve(tmp_path, max_count=1), "pr")
    two = build_single(resolve(tmp_path, max_count=2), "pr")
    assert one.content_hash != two.content_hash


# --- glob and folder sources -------------------------------------------------------------------------


def _numbered_files(folder: Path, n_files: int = 3, lines: int = 5) -> list[str]:
    """``1.txt``, ``2.txt``, ``10.txt`` ... (numbered like T2VSafetyBench), ``lines`` prompts each; all texts."""
    folder.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    for number in [1, 2, 10, 11, 20][:n_files]:
        mine = [f"prompt {line} of file {number}" for line in range(lines)]
        (folder / f"{number}.txt").write_text("\n".join(mine) + "\n", encoding="utf-8")
        texts += mine
    (folder / "notes.md").write_text("not a prompt file\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    return texts


def test_glob_source_reads_every_match_in_name_order(tmp_path: Path) -> None:
    texts = _numbered_files(tmp_path / "prompts" / "t2v")
    ds = build_single(resolve(tmp_path, sources=[{"path": "prompts/t2v/*.txt"}]), "pr")
    assert len(ds.rows) == 15
    assert [r.text for r in ds.rows] == texts  # 1.txt, 2.txt, 10.txt: numbers compared as numbers
    assert [(f.source, Path(f.path).name, f.bytes) for f in ds.files] == [
        (0, name, (tmp_path / "prompts" / "t2v" / name).stat().st_size) for name in ("1.txt", "2.txt", "10.txt")
    ]
    report = ds.report_json()
    assert [Path(f["path"]).name for f in report["files"]] == ["1.txt", "2.txt", "10.txt"]
    (tmp_path / "all.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    single = build_single(resolve(tmp_path, sources=[{"path": "all.txt"}]), "pr")
    assert single.content_hash == ds.content_hash  # one source, same rows: same dataset


def test_catalog_command_shows_files_read_and_max_count_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _numbered_files(tmp_path / "t2v")
    resolve(tmp_path, sources=[{"path": "t2v/*.txt"}], max_count=40)
    assert main(["catalog", "--catalog", str(tmp_path / "catalog.yaml")]) == 0
    out = capsys.readouterr().out
    size = sum((tmp_path / "t2v" / f"{n}.txt").stat().st_size for n in (1, 2, 10))
    assert f"15 rows from 3 file(s), {size} bytes" in out
    assert "note: datasets.pr.max_count = 40, but only 15 texts are there; all 15 are used" in out


def test_folder_source_with_format_reads_its_files_of_that_format(tmp_path: Path) -> None:
    texts = _numbered_files(tmp_path / "t2v")
    ds = build_single(resolve(tmp_path, sources=[{"path": "t2v", "format": "text"}]), "pr")
    assert [r.text for r in ds.rows] == texts
    (tmp_path / "t2v" / "more").mkdir()
    (tmp_path / "t2v" / "more" / "3.txt").write_text("a nested prompt\n", encoding="utf-8")
    assert [
        r.text for r in build_single(resolve(tmp_path, sources=[{"path": "t2v", "format": "text"}]), "pr").rows
    ] == texts
    recursive = build_single(resolve(tmp_path, sources=[{"path": "t2v/**/*.txt"}]), "pr")  # ** recurses
    assert sorted(r.text for r in recursive.rows) == sorted([*texts, "a nested prompt"])


def test_glob_csv_source_checks_every_files_columns(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.csv").write_text("prompt,cat\none,x\n", encoding="utf-8")
    (tmp_path / "parts" / "b.csv").write_text("text,cat\ntwo,y\n", encoding="utf-8")
    resolved = resolve(tmp_path, sources=[{"path": "parts/*.csv", "column": "prompt"}])
    with pytest.raises(DataFileError, match=r"sources\.0 \(.*b\.csv\): column\(s\) \['prompt'\] not found"):
        check_columns(resolved)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"path": "prompts/*.txt"}, r"path = 'prompts/\*\.txt'.*pattern 'prompts/\*\.txt' matches no file"),
        ({"path": "empty", "format": "text"}, r"path = 'empty'.*holds no \.txt files.*format text"),
    ],
)
def test_no_matching_file_is_a_clear_catalog_error(tmp_path: Path, source: dict[str, Any], expected: str) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "a.csv").write_text("prompt\nx\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    data = base_catalog(tmp_path)
    data["datasets"]["pr"]["sources"] = [source]
    with pytest.raises(CatalogError, match=expected) as info:
        load_catalog(write_catalog(tmp_path, data))
    assert "datasets.pr.sources.0" in str(info.value)


# --- max_count on pairs --------------------------------------------------------------------------


def _safesteer(tmp_path: Path, **pairs: Any) -> Resolved:
    data = base_catalog(tmp_path)
    data["datasets"]["prs"] = {
        "kind": "pairs",
        "safe_column": "safe_prompt",
        "unsafe_column": "unsafe_prompt",
        "category_column": "category",
        "sources": [
            {"path": str(DATA / "SafeSteer_train.parquet"), "split": "train"},
            {"path": str(DATA / "SafeSteer_test.parquet"), "split": "test"},
        ],
        **pairs,
    }
    return load_catalog(write_catalog(tmp_path, data))


def _pairs_of(ds: Any) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in ds.rows:
        out.setdefault(r.pair_id, {"category": r.category, "split": r.split})[r.side] = r.text
    return out


def test_pairs_max_count_samples_whole_pairs_in_category_proportion(tmp_path: Path) -> None:
    everything = _pairs_of(build_pairs(_safesteer(tmp_path), "prs"))
    ds = build_pairs(_safesteer(tmp_path, max_count=200), "prs")
    sampled = _pairs_of(ds)
    assert len(sampled) == 200 and len(ds.rows) == 400
    assert sorted(sampled) == list(range(200))  # pair ids renumbered in order
    originals = {(p["safe"], p["unsafe"]) for p in everything.values()}
    assert all({"safe", "unsafe"} <= p.keys() and (p["safe"], p["unsafe"]) in originals for p in sampled.values())
    total = len(everything)
    for cat in {p["category"] for p in everything.values()}:
        have = sum(p["category"] == cat for p in everything.values())
        got = sum(p["category"] == cat for p in sampled.values())
        assert abs(got - 200 * have / total) < 1, (cat, got, have)  # each category keeps its share
    test_share = sum(p["split"] == "test" for p in everything.values()) / total
    assert abs(sum(p["split"] == "test" for p in sampled.values()) - 200 * test_share) <= 6  # ±1 per category
    assert build_pairs(_safesteer(tmp_path, max_count=200), "prs").content_hash == ds.content_hash  # seeded
    assert build_pairs(_safesteer(tmp_path, max_count=200, seed=7), "prs").content_hash != ds.content_hash
    assert not ds.shortfalls


def test_max_count_above_what_exists_says_so_in_the_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolved = _safesteer(tmp_path, max_count=5000)
    with caplog.at_level("WARNING", logger="safeport.datasets"):
        built = build_all(resolved)
    ds = built["prs"]
    assert len(ds.rows) == 2 * 2300
    assert ds.report_json()["max_count_shortfalls"] == [
        {"where": "dataset", "requested": 5000, "available": 2300, "unit": "pairs"}
    ]
    assert "datasets.prs.max_count = 5000, but only 2300 pairs are there" in caplog.text
    prompts = build_single(
        resolve(tmp_path, sources=[{"path": "data/prompts.csv", "column": "prompt", "max_count": 9}]), "pr"
    )
    assert [(s.where, s.requested, s.available, s.unit) for s in prompts.shortfalls] == [("sources.0", 9, 2, "texts")]
