"""Read-only SQL over a store, and writing result tables to CSV / JSON / Parquet."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from safeport.store.db import StoreError, database, default_wait
from safeport.store.text_guard import TEXT_HIDDEN, hide_implicit_text

# DuckDB settings of every query connection. They are the real defence; the screen in
# check_readonly_sql only turns the common refusals into clear messages.
#   read_only               the database file cannot be written (no INSERT, CHECKPOINT, WAL)
#   enable_external_access  no file, network or extension access: read_csv('/etc/passwd'),
#                           COPY ... TO, ATTACH, INSTALL/LOAD, EXPORT all fail inside DuckDB
#   lock_configuration      no SET/RESET can undo the two above
#   autoload/autoinstall    no extension is fetched or loaded behind the query's back
READONLY_CONFIG: dict[str, Any] = {
    "enable_external_access": False,
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "lock_configuration": True,
}

# Statement types (DuckDB's own parser) that only read. EXPLAIN does not run its statement.
_READ_TYPES = ("SELECT", "EXPLAIN")
# Table functions that read files or list folders: refused with a clear message before
# DuckDB refuses them too (enable_external_access = false).
_FILE_FUNCTIONS = re.compile(
    r"\b(read_[a-z_]+|glob|parquet_[a-z_]+|sniff_csv|json_scan|iceberg_[a-z_]+|delta_scan|"
    r"sqlite_scan|sqlite_attach|postgres_[a-z_]+|mysql_[a-z_]+|excel_[a-z_]+|st_read)\s*\(",
    re.IGNORECASE,
)
# One pass, left to right, so a quote inside a comment or "--" inside a string cannot
# hide the rest of the query from the screen.
_LITERALS = re.compile(
    r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|--[^\n]*|/\*.*?(?:\*/|\Z)|\$([A-Za-z_]*)\$.*?(?:\$\1\$|\Z)""",
    re.DOTALL,
)


_PLAIN_EXPLAIN = re.compile(r"\s*EXPLAIN\s+(?!ANALY[SZ]E\b|\()", re.IGNORECASE)


__all__ = ["TEXT_HIDDEN", "QueryError", "check_readonly_sql", "readonly_query", "write_table"]


class QueryError(ValueError):
    """A query that safeport refuses or DuckDB rejects; the message says why."""


def _strip_literals(sql: str) -> str:
    """Blank out string literals, quoted identifiers and comments before the function screen."""

    def blank(m: re.Match[str]) -> str:
        text = m.group(0)
        return "''" if text[:1] in ("'", "$") else '""' if text[:1] == '"' else " "

    return _LITERALS.sub(blank, sql)


def _statement_types(sql: str) -> list[str]:
    """DuckDB's own classification of each statement in ``sql`` (parsed only, never run)."""
    parser = duckdb.connect(":memory:", config=READONLY_CONFIG)
    try:
        return [st.type.name for st in parser.extract_statements(sql)]
    except duckdb.Error as err:
        raise QueryError(f"query does not parse: {err}") from None
    finally:
        parser.close()


def check_readonly_sql(sql: str) -> None:
    """Refuse anything but one read-only statement, with a message naming what was refused.

    DuckDB's own parser classifies the statement (no keyword guessing, so a column
    named ``copy`` or a string containing 'drop' is fine); file-reading table
    functions are refused by name. Raises :class:`QueryError`.
    """
    if not sql.strip():
        raise QueryError("empty query; pass a SELECT statement")
    statements = _statement_types(sql)
    if not statements:
        raise QueryError("empty query (only comments or ';'); pass a SELECT statement")
    if len(statements) != 1:
        raise QueryError(f"{len(statements)} statements refused: only one statement per query; remove the extra ';'")
    kind = statements[0]
    body = _strip_literals(sql)
    words = body.split(None, 2)
    first = words[0].upper() if words else kind
    if kind not in _READ_TYPES:
        named = first if first == kind else f"{first} ({kind})"
        raise QueryError(f"{named} statements are refused: `safeport query` is read-only; use one SELECT")
    if kind == "EXPLAIN":
        # EXPLAIN ANALYZE and EXPLAIN (ANALYZE) run their statement; plain EXPLAIN only plans it.
        plain = _PLAIN_EXPLAIN.match(body)
        if plain is None:
            raise QueryError(
                "EXPLAIN ANALYZE and EXPLAIN (options) run their statement and are refused; use plain EXPLAIN"
            )
        inner = _statement_types(body[plain.end() :])
        if inner != ["SELECT"]:
            raise QueryError(f"EXPLAIN of {', '.join(inner) or 'nothing'} is refused; EXPLAIN a SELECT")
    bad = _FILE_FUNCTIONS.search(body)
    if bad:
        raise QueryError(
            f"{bad.group(1)}() reads files and is refused: `safeport query` reads only the store's "
            "tables and views (see `safeport query 'SHOW TABLES'`)"
        )


@contextlib.contextmanager
def readonly_connection(root: Path, wait_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only DuckDB connection to a store's ``meta.duckdb`` with :data:`READONLY_CONFIG`.

    It waits (``wait_s``, default ``SAFEPORT_STORE_WAIT`` or 10 s) for a writer's in-flight
    transaction and then sees the last committed state; a damaged file is reported as such.
    """
    if not (root / "meta.duckdb").is_file():
        raise StoreError(f"no store at {root}; run `safeport run` or `safeport extract` first")
    with database(root).reading(default_wait(False) if wait_s is None else wait_s, READONLY_CONFIG) as con:
        yield con


def readonly_query(root: Path, sql: str, hide_text: bool = False) -> pa.Table:
    """Run one SELECT (WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) on a read-only connection.

    Two layers: :func:`check_readonly_sql` gives a clear message for what is refused,
    and DuckDB itself (read-only database, no external access, configuration locked,
    see :data:`READONLY_CONFIG`) stops anything the screen did not anticipate.
    ``hide_text`` blanks every output column derived from ``texts.text`` that the top-level
    SELECT does not name (see :mod:`safeport.store.text_guard`): what `safeport query` shows.
    """
    check_readonly_sql(sql)
    with readonly_connection(root) as con:
        try:
            rel = con.sql(sql)
            if rel is None:  # pragma: no cover - check_readonly_sql lets only result statements through
                raise QueryError("the statement returned no result; use a SELECT")
            table = rel.to_arrow_table()
            return hide_implicit_text(con, table, sql) if hide_text else table
        except duckdb.PermissionException as err:
            raise QueryError(
                f"refused by DuckDB ({err}); `safeport query` reads only the store's tables and views"
            ) from None
        except duckdb.Error as err:
            raise QueryError(f"query failed: {err}") from None


_OUTPUT_FORMATS = ("csv", "json", "jsonl", "parquet")
# Control characters in a cell (newlines, ANSI escapes from a prompt) would break the table
# or act on the terminal; they are shown as visible escapes instead.
_CELL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _inside_store(path: Path) -> Path | None:
    """The store folder that ``path`` would land in, if any (a folder holding ``meta.duckdb``)."""
    target = path.resolve()
    for folder in (target, *target.parents):
        if (folder / "meta.duckdb").is_file():
            return folder
    return None


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_table(table: pa.Table, path: Path, fmt: str | None = None) -> str:
    """Write ``table`` as csv / json (records, one per line) / parquet; returns the format used.

    Refuses to write into a store folder, so ``safeport query -o`` cannot overwrite
    ``meta.duckdb`` or an array of the store it just read.
    """
    fmt = (fmt or path.suffix.lstrip(".") or "csv").lower()
    if fmt not in _OUTPUT_FORMATS:
        raise QueryError(
            f"output format {fmt!r} (from {str(path)!r}) is not supported; use a .csv, .json or .parquet "
            "file name or --format csv|json|parquet"
        )
    store = _inside_store(path)
    if store is not None:
        raise QueryError(
            f"output {str(path)!r} is inside the store {str(store)!r}; `safeport query` never writes "
            "there, choose a path outside it"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, path)
        elif fmt in ("json", "jsonl"):
            with path.open("w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    clean = {k: _json_value(v) for k, v in row.items()}
                    f.write(json.dumps(clean, default=str, ensure_ascii=False, allow_nan=False) + "\n")
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, path)
    except OSError as err:
        raise QueryError(f"cannot write {str(path)!r} ({err}); choose another --output path") from None
    except (pa.ArrowException, ValueError) as err:
        raise QueryError(f"the result cannot be written as {fmt} ({err}); use --format parquet or json") from None
    return fmt


def format_table(table: pa.Table, max_rows: int = 50, max_width: int = 40) -> str:
    """Plain-text table for a terminal (control characters in cells are escaped)."""
    if max_rows < 0 or max_width < 2:
        raise QueryError(f"max_rows={max_rows}, max_width={max_width}: pass --max-rows 0 or more")
    cols = table.column_names

    def cell(v: object) -> str:
        s = "NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
        s = _CELL_CONTROL.sub(lambda m: repr(m.group(0))[1:-1], s)
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    head = table.slice(0, max_rows)
    columns = [[cell(v) for v in head.column(i).to_pylist()] for i in range(len(cols))]
    grid = [[cell(c) for c in cols]] + [list(r) for r in zip(*columns, strict=True)]
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in grid]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more row(s); use --output FILE for all")
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines)
