"""`safeport query` is strictly read-only: refused statements leave the store byte-for-byte unchanged.

Two layers are tested separately: check_readonly_sql (clear messages) and DuckDB's
own settings (READONLY_CONFIG), which refuse the same things with the screen turned off.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import safeport.store.query as query
from safeport.store.query import (
    READONLY_CONFIG,
    QueryError,
    check_readonly_sql,
    format_table,
    readonly_connection,
    readonly_query,
    write_table,
)
from safeport.store.store import Store, StoreDamagedError, StoreError

ROWS = pa.table(
    {
        "idx": pa.array([0, 1, 2], pa.int32()),
        "text_id": ["t0", "t1", "t2"],
        "text": ["drop table texts", "a cat", "insert into x"],
        "split": ["train", "val", "test"],
        "category": ["a", None, "b"],
        "pair_id": pa.array([None, None, None], pa.int32()),
        "side": pa.array([None, None, None], pa.string()),
    }
)


def _fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under the store (and the listing itself, as the keys)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    with Store(root) as s:
        assert s.register_dataset("prompts", "prompts", "hash0", ROWS, {"empty_dropped": 0})
    return root


@pytest.fixture()
def unchanged(store_root: Path) -> Iterator[Path]:
    """The store root; after the test every file must be byte-for-byte what it was."""
    before = _fingerprint(store_root)
    yield store_root
    assert _fingerprint(store_root) == before


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the store where refused statements would write, if they could."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "in.csv").write_text("text_id,text,n_chars\nz,zz,2\n", encoding="utf-8")
    return folder


REFUSED = [
    "INSERT INTO texts VALUES ('z', 'z', 1)",
    "insert into texts select * from texts",
    "UPDATE texts SET text = 'x'",
    "DELETE FROM texts",
    "DROP TABLE texts",
    "DROP VIEW activations",
    "CREATE TABLE x (a INT)",
    "CREATE OR REPLACE VIEW activations AS SELECT 1",
    "CREATE MACRO m() AS 1",
    "ALTER TABLE texts ADD COLUMN z INT",
    "ATTACH '{out}/other.db' AS other",
    "DETACH meta",
    "COPY texts TO '{out}/copy.csv'",
    "COPY (SELECT * FROM texts) TO '{out}/copy2.parquet' (FORMAT parquet)",
    "COPY texts FROM '{out}/in.csv'",
    "EXPORT DATABASE '{out}/export'",
    "IMPORT DATABASE '{out}/export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{out}/evil.duckdb_extension'",
    "PRAGMA version",
    "PRAGMA enable_profiling",
    "SET threads = 1",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "SET VARIABLE v = 1",
    "USE memory",
    "CALL pragma_version()",
    "CHECKPOINT",
    "VACUUM",
    "BEGIN TRANSACTION",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "SELECT 1; SELECT 2",
    "SELECT 1; DROP TABLE texts",
    "select 1 -- it's a comment\n; drop table texts; -- '",
    "select 1 /* ' */; delete from texts",
    "WITH x AS (SELECT 1) INSERT INTO texts SELECT 'q', 'q', 1 FROM x",
    "EXPLAIN ANALYZE SELECT * FROM texts",
    "explain analyze delete from texts",
    "EXPLAIN (ANALYZE) DELETE FROM texts",
    "EXPLAIN (ANALYZE true) SELECT 1",
    "EXPLAIN DELETE FROM texts",
    "/* c */ EXPLAIN   ANALYSE SELECT 1",
    "",
    "   ",
    "-- only a comment",
    ";",
    "SELEC * FROM texts",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_refused_statements(unchanged: Path, outside: Path, sql: str) -> None:
    with pytest.raises(QueryError) as info:
        readonly_query(unchanged, sql.format(out=outside))
    assert str(info.value) and "\n" not in str(info.value).split(":")[0]
    assert sorted(p.name for p in outside.iterdir()) == ["in.csv"]  # nothing written outside either


FILE_FUNCTIONS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM READ_CSV ('/etc/passwd')",
    "SELECT * FROM read_parquet('/x.parquet')",
    "SELECT * FROM read_json('/x.json')",
    "SELECT * FROM read_json_auto('/x.json')",
    "SELECT * FROM read_ndjson('/x.json')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM parquet_scan('/x.parquet')",
    "SELECT * FROM parquet_metadata('/x.parquet')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM texts WHERE text IN (SELECT column0 FROM read_csv('/etc/passwd'))",
    "SELECT (SELECT content FROM read_text('/etc/hostname')) AS h",
]


@pytest.mark.parametrize("sql", FILE_FUNCTIONS)
def test_file_reading_functions_are_refused(unchanged: Path, sql: str) -> None:
    with pytest.raises(QueryError, match="reads files and is refused"):
        readonly_query(unchanged, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM '/etc/passwd'",  # a replacement scan: no function name for the screen to see
        "SELECT * FROM '{out}/in.csv'",
        "FROM '{out}/in.csv'",
        # SQL inside a string literal, run by DuckDB's query() table function
        "SELECT * FROM query('SELECT * FROM read_csv(''{out}/in.csv'')')",
        "SELECT * FROM query('DROP TABLE texts')",
        "SELECT * FROM query('COPY texts TO ''{out}/q.csv''')",
    ],
)
def test_what_the_screen_cannot_see_is_refused_by_duckdb(unchanged: Path, outside: Path, sql: str) -> None:
    with pytest.raises(QueryError) as info:
        readonly_query(unchanged, sql.format(out=outside))
    assert "zz" not in str(info.value)  # the file's contents never reach the message
    assert sorted(p.name for p in outside.iterdir()) == ["in.csv"]


ALLOWED = [
    ("SELECT text FROM texts WHERE text = 'drop table texts'", 1),
    ("SELECT 'insert into x; delete from y' AS s", 1),
    ("SELECT replace(text, 'a', 'b') AS r FROM texts", 3),
    ('SELECT count(*) AS copy, 1 AS reset, 2 AS load, 3 AS "drop" FROM texts', 1),
    ("SELECT * FROM texts WHERE text LIKE '%insert%' -- drop it\n", 1),
    ("/* update */ SELECT 1", 1),
    ("SELECT $$ drop table texts; $$ AS s", 1),
    ("SELECT 'it''s' AS s", 1),
    ("SELECT * FROM texts;", 3),
    ("(SELECT 1)", 1),
    ("WITH t AS (SELECT 1 AS a) SELECT a FROM t", 1),
    ("FROM texts", 3),
    ("FROM texts SELECT text", 3),
    ("SELECT * FROM activations", 0),
    ("SELECT * FROM dataset_texts ORDER BY idx", 3),
    ("SHOW TABLES", None),
    ("DESCRIBE texts", 3),
    ("SUMMARIZE texts", 3),
    ("EXPLAIN SELECT * FROM texts", None),
    ("-- plan\nexplain with t as (select 1) select * from t", None),
    ("VALUES (1), (2)", 2),
    ("SELECT * FROM range(5)", 5),
    ("select read_csv_ok from (select 1 as read_csv_ok)", 1),
]


@pytest.mark.parametrize(("sql", "n_rows"), ALLOWED)
def test_ordinary_selects_work(unchanged: Path, sql: str, n_rows: int | None) -> None:
    table = readonly_query(unchanged, sql)
    if n_rows is not None:
        assert table.num_rows == n_rows


def test_select_returns_the_data(unchanged: Path) -> None:
    table = readonly_query(unchanged, "SELECT text_id, text FROM texts ORDER BY text_id")
    assert table.to_pylist()[0] == {"text_id": "t0", "text": "drop table texts"}


def test_duckdb_errors_become_query_errors(unchanged: Path) -> None:
    with pytest.raises(QueryError, match=r"query failed: .*no_such_table"):
        readonly_query(unchanged, "SELECT * FROM no_such_table")


def test_missing_or_broken_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        readonly_query(tmp_path, "SELECT 1")
    (tmp_path / "meta.duckdb").write_text("not a database", encoding="utf-8")
    with pytest.raises(StoreDamagedError, match=r"meta\.duckdb is damaged .*it is not busy"):
        readonly_query(tmp_path, "SELECT 1")


# --- the second layer: DuckDB itself, with the screen turned off -------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        "COPY texts TO '{out}/layer2.csv'",
        "ATTACH '{out}/layer2.db' AS o",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "INSERT INTO texts VALUES ('z', 'z', 1)",
        "DROP TABLE texts",
        "CREATE TABLE x (a INT)",
        "EXPORT DATABASE '{out}/layer2'",
        "EXPLAIN (ANALYZE) DELETE FROM texts",
    ],
)
def test_duckdb_refuses_without_the_screen(
    unchanged: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, sql: str
) -> None:
    monkeypatch.setattr(query, "check_readonly_sql", lambda sql: None)
    with pytest.raises(QueryError):
        readonly_query(unchanged, sql.format(out=outside))
    assert sorted(p.name for p in outside.iterdir()) == ["in.csv"]


def test_readonly_connection_settings(unchanged: Path) -> None:
    """The settings readonly_query connects with refuse file access on their own."""
    assert READONLY_CONFIG["enable_external_access"] is False
    assert READONLY_CONFIG["lock_configuration"] is True
    with readonly_connection(unchanged) as con:
        with pytest.raises(duckdb.PermissionException):
            con.sql("SELECT * FROM read_csv('/etc/passwd')").fetchall()
        with pytest.raises(duckdb.Error):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            con.execute("DELETE FROM texts")
        assert con.sql("SELECT current_setting('access_mode')").fetchall() == [("read_only",)]


# --- the screen on its own ---------------------------------------------------------------------


def test_screen_messages() -> None:
    with pytest.raises(QueryError, match=r"^DROP statements are refused: `safeport query` is read-only"):
        check_readonly_sql("DROP TABLE texts")
    with pytest.raises(QueryError, match=r"^INSTALL \(LOAD\) statements are refused"):
        check_readonly_sql("install httpfs")
    with pytest.raises(QueryError, match=r"^2 statements refused: only one statement per query"):
        check_readonly_sql("select 1; select 2")
    with pytest.raises(QueryError, match=r"^read_csv\(\) reads files"):
        check_readonly_sql("select * from read_csv('x')")
    with pytest.raises(QueryError, match="empty query"):
        check_readonly_sql("-- nothing")
    check_readonly_sql("select 'read_csv(' as s, \"glob(\" from t")  # literals are not calls


# --- write_table and format_table ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_write_table_formats(tmp_path: Path, suffix: str) -> None:
    table = pa.table({"a": [1, 2], "s": ["x\ny", "ü"]})
    path = tmp_path / "sub" / f"out{suffix}"
    fmt = write_table(table, path)
    assert fmt == suffix[1:]
    if suffix == ".parquet":
        assert pq.read_table(path).equals(table)
    elif suffix == ".csv":
        assert path.read_text(encoding="utf-8").startswith('"a","s"\n1,"x\ny"')
    else:
        assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == table.to_pylist()


def test_write_table_json_has_no_nan(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    write_table(pa.table({"x": [1.0, math.nan, math.inf]}), path)
    assert [json.loads(x)["x"] for x in path.read_text(encoding="utf-8").splitlines()] == [1.0, None, None]


def test_write_table_refusals(tmp_path: Path, store_root: Path) -> None:
    table = pa.table({"a": [1]})
    with pytest.raises(QueryError, match=r"output format 'txt'.*--format csv"):
        write_table(table, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()
    with pytest.raises(QueryError, match="inside the store"):
        write_table(table, store_root / "meta.duckdb", "parquet")
    with pytest.raises(QueryError, match="inside the store"):
        write_table(table, store_root / "arrays.zarr" / "x.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(QueryError, match="cannot write"):
        write_table(table, tmp_path / "dir.csv")
    with pytest.raises(QueryError, match=r"cannot be written as csv.*--format parquet"):
        write_table(pa.table({"l": [[1, 2]]}), tmp_path / "nested.csv")


def test_format_table() -> None:
    table = pa.table({"a": [1, 2, 3], "t": ["line\nbreak", "\x1b[31mred", "x" * 100]})
    out = format_table(table, max_rows=2)
    assert "line\\nbreak" in out and "\\x1b[31mred" in out and "\x1b" not in out
    assert "... 1 more row(s)" in out and out.endswith("(3 rows)")
    assert "x" * 39 + "…" in format_table(table)
    assert format_table(pa.table({"a": pa.array([], pa.int64())})).endswith("(0 rows)")
    dup = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    assert "1 | 2" in format_table(dup)
    with pytest.raises(QueryError, match="--max-rows 0 or more"):
        format_table(table, max_rows=-1)


def test_store_busy_with_a_writer_in_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that holds the file read-write for good (not a safeport writer) is named after the wait."""
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "busy"
    Store(root).close()
    holder = textwrap.dedent(
        f"""
        import duckdb, sys, time
        con = duckdb.connect({str(root / "meta.duckdb")!r})
        print("ready", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        from safeport.store.store import StoreBusyError

        monkeypatch.setenv("SAFEPORT_STORE_WAIT", "0.5")
        with pytest.raises(
            StoreBusyError, match=rf"being written by process {proc.pid}.*waited \(limit 0\.5s.*Query it later"
        ):
            readonly_query(root, "SELECT 1")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


# --- texts are shown only when the top-level SELECT names the text column (lineage, not names) -----

TEXTS = [str(t) for t in ROWS.column("text").to_pylist()]

HIDDEN_FORMS = [
    "SELECT * FROM texts",
    "FROM texts",
    "SELECT COLUMNS(*) FROM texts",
    "SELECT * EXCLUDE (n_chars) FROM texts",
    "SELECT * FROM texts a JOIN texts b USING (text_id)",
    "SELECT * FROM texts a, texts b",
    "SELECT * FROM (SELECT * FROM texts) t(a, b, c)",
    "SELECT b FROM (SELECT * FROM texts) t(a, b, c)",
    "SELECT upper(b) AS u FROM (SELECT * FROM texts) t(a, b, c)",
    "SELECT list(b) AS l, string_agg(b, ',') AS s FROM (SELECT * FROM texts) t(a, b, c)",
    "SELECT 'x' AS s UNION ALL SELECT b FROM (SELECT * FROM texts) t(a, b, c)",
    "WITH c AS (SELECT * FROM texts) SELECT * FROM c",
    "WITH c AS (SELECT * FROM texts) SELECT * FROM c x JOIN c y USING (text_id)",
    "SELECT t FROM texts t",
    "SELECT to_json(t) AS j FROM texts t",
    "SELECT * FROM texts WHERE text LIKE '%a%'",
    "SELECT * FROM texts ORDER BY text LIMIT 2",
    "SELECT upper(b) FROM (SELECT * FROM texts ORDER BY text LIMIT 2) t(a, b, c)",
    "SELECT DISTINCT * FROM texts",
    "SELECT * FROM query('SELECT * FROM texts')",
    "SUMMARIZE texts",
    "SUMMARIZE SELECT * FROM texts a JOIN texts b USING (text_id)",
    "SELECT * FROM (SUMMARIZE texts)",
    "SELECT max FROM (SUMMARIZE texts)",
    "UNPIVOT texts ON text_id, text",
    "SELECT dt.*, t.* FROM dataset_texts dt JOIN texts t USING (text_id)",
]


def _dump(table: pa.Table) -> str:
    return repr(table.to_pylist()).lower()


@pytest.mark.parametrize("sql", HIDDEN_FORMS)
def test_every_implicit_form_hides_texts(unchanged: Path, sql: str) -> None:
    shown = readonly_query(unchanged, sql)
    assert any(t in _dump(shown) for t in TEXTS), "the form must reach the texts, or it tests nothing"
    hidden = readonly_query(unchanged, sql, hide_text=True)
    assert hidden.num_rows == shown.num_rows
    dump = _dump(hidden)
    assert not [t for t in TEXTS if t in dump]
    assert query.TEXT_HIDDEN in dump


@pytest.mark.parametrize(
    ("sql", "visible"),
    [
        ("SELECT text FROM texts", ["text"]),
        ("SELECT t.text FROM texts t", ["text"]),
        ('SELECT "TEXT" AS words, text_id FROM texts', ["words", "text_id"]),
        ("SELECT upper(text) AS u FROM texts", ["u"]),
        ("SELECT text_id, text FROM texts WHERE text LIKE '%a%'", ["text_id", "text"]),
        ("SELECT text FROM texts UNION ALL SELECT 'x'", ["text"]),
    ],
)
def test_naming_text_at_the_top_level_shows_it(unchanged: Path, sql: str, visible: list[str]) -> None:
    table = readonly_query(unchanged, sql, hide_text=True)
    assert table.equals(readonly_query(unchanged, sql))
    assert table.column_names == visible


def test_only_text_derived_columns_are_hidden(unchanged: Path) -> None:
    def columns(sql: str) -> dict[str, list[object]]:
        table = readonly_query(unchanged, sql, hide_text=True)
        return {f"{i}:{n}": table.column(i).to_pylist() for i, n in enumerate(table.column_names)}

    hidden = [query.TEXT_HIDDEN] * 3
    ids = ["t0", "t1", "t2"]
    star = columns("SELECT * FROM texts ORDER BY text_id")
    assert star == {"0:text_id": ids, "1:text": hidden, "2:n_chars": [16, 5, 13]}
    # A filter on text decides which rows are shown, not what the other columns hold.
    assert columns("SELECT * FROM texts WHERE text LIKE '%a%' ORDER BY text_id")["0:text_id"] == ["t0", "t1"]
    assert columns("SELECT text_id FROM texts WHERE upper(text) <> 'X' ORDER BY text_id") == {"0:text_id": ids}
    # The explicitly named column is shown, the one a star brings along is not.
    both = columns("SELECT a.text, * FROM texts a JOIN texts b USING (text_id) ORDER BY text_id")
    assert sorted(map(str, both["0:text"])) == sorted(TEXTS)
    assert both["2:text"] == hidden and both["4:text"] == hidden and both["1:text_id"] == ids
    # Renamed columns are followed: b is texts.text, a is text_id.
    renamed = columns("SELECT a, b, c FROM (SELECT * FROM texts) t(a, b, c) ORDER BY a")
    assert renamed == {"0:a": ids, "1:b": hidden, "2:c": [16, 5, 13]}


def test_summarize_hides_only_the_text_rows(unchanged: Path) -> None:
    table = readonly_query(unchanged, "SUMMARIZE texts", hide_text=True)
    rows = {r["column_name"]: r for r in table.to_pylist()}
    assert rows["text"]["min"] == query.TEXT_HIDDEN and rows["text"]["max"] == query.TEXT_HIDDEN
    assert (rows["text_id"]["min"], rows["text_id"]["max"]) == ("t0", "t2")
    assert rows["n_chars"]["max"] == "16"


@pytest.mark.parametrize(
    "sql", ["SELECT * FROM activations", "SELECT count(*) AS n FROM texts", "SHOW TABLES", "DESCRIBE texts"]
)
def test_queries_without_texts_are_untouched(unchanged: Path, sql: str) -> None:
    assert readonly_query(unchanged, sql, hide_text=True).equals(readonly_query(unchanged, sql))
