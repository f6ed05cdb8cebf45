"""Read-only SQL over a store, and writing result tables to CSV / JSON / Parquet."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa

from store.store import StoreBusyError, StoreError

_FORBIDDEN = re.compile(
    r"\b(INSERT|UPDATE|DELETE|DROP|CREATE|ALTER|ATTACH|DETACH|COPY|EXPORT|IMPORT|INSTALL|LOAD|PRAGMA|SET|"
    r"RESET|CALL|CHECKPOINT|VACUUM|TRUNCATE|MERGE|UPSERT|GRANT)\b",
    re.IGNORECASE,
)


class QueryError(ValueError):
    """A query that safeport refuses or DuckDB rejects; the message says why."""


def _strip_literals(sql: str) -> str:
    """Drop string literals, quoted identifiers and comments before keyword checks."""
    sql = re.sub(r"'(?:[^']|'')*'", "''", sql)
    sql = re.sub(r'"(?:[^"]|"")*"', '""', sql)
    sql = re.sub(r"--[^\n]*", " ", sql)
    return re.sub(r"/\*.*?\*/", " ", sql, flags=re.DOTALL)


def readonly_query(root: Path, sql: str) -> pa.Table:
    """Run one SELECT/WITH/DESCRIBE/SHOW statement on a read-only connection with no file access.

    Two layers: a keyword screen that gives a clear message, and DuckDB itself
    (read-only database, ``enable_external_access = false``, configuration
    locked) so nothing slips through by syntax we did not anticipate.
    """
    body = _strip_literals(sql).strip().rstrip(";").strip()
    if not body:
        raise QueryError("empty query; pass a SELECT statement")
    if ";" in body:
        raise QueryError("only one statement per query; remove the extra ';'")
    first = body.split(None, 1)[0].upper()
    if first not in ("SELECT", "WITH", "DESCRIBE", "SHOW", "SUMMARIZE", "FROM", "VALUES", "TABLE", "EXPLAIN"):
        raise QueryError(f"{first} statements are refused: `safeport query` is read-only; use SELECT")
    bad = _FORBIDDEN.search(body)
    if bad:
        raise QueryError(f"{bad.group(1).upper()} is refused: `safeport query` is read-only")
    db = root / "meta.duckdb"
    if not db.exists():
        raise StoreError(f"no store at {root}; run `safeport run` or `safeport extract` first")
    try:
        con = duckdb.connect(str(db), read_only=True, config={"enable_external_access": False})
    except duckdb.IOException as err:
        raise StoreBusyError(
            f"store {root} is being written by another process ({err}); query it later"
        ) from None
    try:
        con.execute("SET lock_configuration = true")
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as err:
        raise QueryError(f"query failed: {err}") from None
    finally:
        con.close()


def write_table(table: pa.Table, path: Path, fmt: str | None = None) -> str:
    """Write ``table`` as csv / json (records, one per line) / parquet; returns the format used."""
    fmt = (fmt or path.suffix.lstrip(".") or "csv").lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    elif fmt in ("json", "jsonl"):
        import json

        with path.open("w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, default=str) + "\n")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        raise QueryError(f"output format {fmt!r} is not supported; use csv, json or parquet")
    return fmt


def format_table(table: pa.Table, max_rows: int = 50, max_width: int = 40) -> str:
    """Plain-text table for a terminal."""
    cols = table.column_names
    rows = table.slice(0, max_rows).to_pylist()

    def cell(v: object) -> str:
        s = "NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    grid = [cols] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in grid]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more row(s); use --output FILE for all")
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines)
