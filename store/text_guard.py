"""Which columns of a query result carry prompt texts (``texts.text``), decided by lineage, not by name.

Prompts include unsafe ones; `safeport query` shows them only when the top-level SELECT names
the ``text`` column (``SELECT text FROM texts``). Every other output column derived from
``texts.text`` that can hold a string is blanked: a star, a join that brings a second copy, a
subquery that renames it (``t(a, b, c)``), a row packed as a struct, ``to_json``, ``UNPIVOT``,
a function over a renamed copy, ``SUMMARIZE``. DuckDB itself decides:

1. **Plans** (DuckDB's optimiser): ``SELECT <column i> FROM (query)`` is planned on the store;
   projection pushdown drops every input the column does not need, so the column is derived
   from ``texts.text`` exactly when that plan still reads it. Lineage is about values, not rows:
   the query is first stripped of what only selects or orders rows (WHERE, HAVING, QUALIFY,
   ORDER BY, LIMIT, DISTINCT; set operations become UNION ALL, CTEs are inlined), so a filter
   on ``text`` does not make ``text_id`` look derived. Where the rows still need ``texts.text``
   after that (a join or GROUP BY on it, a nested SUMMARIZE or PIVOT), every column that can
   hold a string is hidden.
2. **Syntax** (DuckDB's parser, ``json_serialize_sql``): a top-level SELECT item that names a
   column ``text`` is an explicit request and is shown. A top-level ``SUMMARIZE`` blanks the
   statistics of the rows that describe text-derived columns only.

A query whose plan does not read ``texts.text`` at all is returned untouched, after one EXPLAIN.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

TEXT_HIDDEN = "<hidden: name the text column in the query to see texts>"
TEXT_TABLE = "texts"
TEXT_COLUMN = "text"
# SUMMARIZE columns that describe a column (its name and type), never its values.
_SUMMARY_KEYS = ("column_name", "column_type")


def can_hold_text(t: pa.DataType) -> bool:
    """Whether values of arrow type ``t`` can contain a string (directly or nested)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return True
    if pa.types.is_large_binary(t) or getattr(pa.types, "is_string_view", lambda _t: False)(t):
        return True
    if pa.types.is_dictionary(t):
        return can_hold_text(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return can_hold_text(t.value_type)
    if pa.types.is_map(t):
        return can_hold_text(t.key_type) or can_hold_text(t.item_type)
    if pa.types.is_struct(t) or pa.types.is_union(t):
        return any(can_hold_text(t.field(i).type) for i in range(t.num_fields))
    return False


def _blank(column: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else TEXT_HIDDEN for v in column.to_pylist()], pa.string())


@dataclass(frozen=True)
class TextLineage:
    """Output columns to blank, or (for a top-level SUMMARIZE) rows whose statistics to blank."""

    columns: frozenset[int] = frozenset()
    summary_rows: frozenset[int] = frozenset()


def hide_implicit_text(con: duckdb.DuckDBPyConnection, table: pa.Table, sql: str) -> pa.Table:
    """``table`` (the result of ``sql`` on ``con``) with every implicitly shown prompt text blanked."""
    if not any(can_hold_text(f.type) for f in table.schema):
        return table
    lineage = text_lineage(con, sql, table)
    for i in sorted(lineage.columns):
        if can_hold_text(table.schema.field(i).type):
            table = table.set_column(i, table.schema.field(i).name, _blank(table.column(i)))
    if lineage.summary_rows:
        for i, field in enumerate(table.schema):
            if field.name in _SUMMARY_KEYS or not can_hold_text(field.type):
                continue
            values = table.column(i).to_pylist()
            cells = [TEXT_HIDDEN if r in lineage.summary_rows and v is not None else v for r, v in enumerate(values)]
            table = table.set_column(i, field.name, pa.array([None if v is None else str(v) for v in cells]))
    return table


def text_lineage(con: duckdb.DuckDBPyConnection, sql: str, table: pa.Table) -> TextLineage:
    """Which output columns of ``sql`` (already run: ``table``) derive from ``texts.text`` and are not named."""
    strings = frozenset(i for i, f in enumerate(table.schema) if can_hold_text(f.type))
    if [s.type.name for s in con.extract_statements(sql)] == ["EXPLAIN"]:
        return TextLineage()  # the output is a plan, not rows
    try:
        if not _reads_text(con, sql):
            return TextLineage()
    except duckdb.Error:
        return TextLineage(strings)
    node = _parse(con, sql)
    if node is None:  # PIVOT and other statements the parser cannot serialise: hide every string column
        return TextLineage(strings)
    inner = _top_level_summary(node)
    if inner is not None:
        rows = _derived(con, inner, table.num_rows, frozenset(range(table.num_rows)))
        return TextLineage(summary_rows=rows)
    return TextLineage(_derived(con, node, table.num_columns, strings - _explicit(con, node)))


def _derived(
    con: duckdb.DuckDBPyConnection, node: dict[str, Any], n_columns: int, wanted: frozenset[int]
) -> frozenset[int]:
    """The columns among ``wanted`` whose values are computed from ``texts.text``."""
    if not wanted:
        return frozenset()
    if node.get("type") == "SET_OPERATION_NODE":  # each branch on its own: the columns line up
        out: frozenset[int] = frozenset()
        for child in node.get("children") or [c for c in (node.get("left"), node.get("right")) if c]:
            ctes = {e["key"]: e for e in (node.get("cte_map") or {}).get("map", [])}
            ctes |= {e["key"]: e for e in (child.get("cte_map") or {}).get("map", [])}
            out |= _derived(con, dict(child, cte_map={"map": list(ctes.values())}), n_columns, wanted)
        return out
    names = [f"_sp_c{i}" for i in range(n_columns)]
    try:
        wrapped = f"FROM ({_sql_of(con, _values_only(node))}) AS _sp({', '.join(names)})"
        if _reads_text(con, f"SELECT 1 {wrapped}"):
            return wanted  # the rows themselves need texts.text: no column can be cleared
        return frozenset(i for i in wanted if _reads_text(con, f"SELECT {names[i]} {wrapped}"))
    except duckdb.Error:
        return wanted


def _values_only(node: Any) -> Any:
    """A copy of a parsed query without what only selects or orders rows (see the module docstring)."""
    if isinstance(node, list):
        return [_values_only(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _values_only(v) for k, v in node.items()}
    if out.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE"):
        out["modifiers"] = []
    if out.get("type") == "SELECT_NODE":
        out.update(where_clause=None, having=None, qualify=None, sample=None)
    if out.get("type") == "SET_OPERATION_NODE":
        out.update(setop_type="UNION", setop_all=True)
    if "materialized" in out:
        out["materialized"] = "CTE_MATERIALIZE_NEVER"
    return out


# --- plans --------------------------------------------------------------------------------------


def _reads_text(con: duckdb.DuckDBPyConnection, sql: str) -> bool:
    """Whether DuckDB's optimised plan of ``sql`` reads the ``text`` column of the ``texts`` table."""
    rows = con.execute(f"EXPLAIN (FORMAT json) {sql}").fetchall()
    return any(_scan_reads_text(node) for _kind, plan in rows for node in _nodes(json.loads(plan)))


def _nodes(tree: Any) -> Iterator[dict[str, Any]]:
    if isinstance(tree, list):
        for item in tree:
            yield from _nodes(item)
    elif isinstance(tree, dict):
        yield tree
        yield from _nodes(tree.get("children", []))


def _scan_reads_text(node: dict[str, Any]) -> bool:
    info = node.get("extra_info")
    if not isinstance(info, dict) or not isinstance(info.get("Table"), str):
        return False
    if info["Table"].rsplit(".", 1)[-1].lower() != TEXT_TABLE:
        return False
    projected = info.get("Projections")
    if projected is None:
        return True  # a scan that does not list its columns reads them all
    columns = [projected] if isinstance(projected, str) else list(projected)
    return any(str(c).strip('"').lower() == TEXT_COLUMN for c in columns)


# --- syntax -------------------------------------------------------------------------------------


def _parse(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any] | None:
    """The top-level query node of ``sql`` (DuckDB's parser, as JSON), or None if it cannot be serialised."""
    try:
        raw = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    except duckdb.Error:
        return None
    doc = json.loads(raw)
    if doc.get("error") or len(doc.get("statements", [])) != 1:
        return None
    node = doc["statements"][0]["node"]
    return node if isinstance(node, dict) else None


def _sql_of(con: duckdb.DuckDBPyConnection, node: dict[str, Any]) -> str:
    """SQL text of a query node (comments and a trailing ';' are gone, so it nests in a subquery)."""
    doc = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    return str(con.execute("SELECT json_deserialize_sql(?)", [json.dumps(doc)]).fetchall()[0][0])


def _top_level_summary(node: dict[str, Any]) -> dict[str, Any] | None:
    """The summarised query of ``SUMMARIZE x`` (parsed as ``SELECT * FROM <summary of x>``), else None."""
    source = node.get("from_table") or {}
    if node.get("type") != "SELECT_NODE" or source.get("type") != "SHOW_REF" or source.get("show_type") != "SUMMARY":
        return None
    plain = [e.get("class") for e in node.get("select_list", [])] == ["STAR"] and not node.get("where_clause")
    inner = source.get("query")
    if not plain or not isinstance(inner, dict):
        return None
    return inner


def _names_text(expr: Any) -> bool:
    if isinstance(expr, list):
        return any(_names_text(e) for e in expr)
    if not isinstance(expr, dict):
        return False
    names = expr.get("column_names")
    if (
        expr.get("class") == "COLUMN_REF"
        and isinstance(names, list)
        and names
        and str(names[-1]).lower() == TEXT_COLUMN
    ):
        return True
    return any(_names_text(v) for v in expr.values())


def _explicit(con: duckdb.DuckDBPyConnection, node: dict[str, Any]) -> set[int]:
    """Output positions whose top-level SELECT item names a ``text`` column."""
    if node.get("type") == "SET_OPERATION_NODE":
        out: set[int] = set()
        for key in ("left", "right"):
            child = node.get(key)
            if isinstance(child, dict):
                out |= _explicit(con, child)
        for child in node.get("children", []) or []:
            if isinstance(child, dict):
                out |= _explicit(con, child)
        return out
    if node.get("type") != "SELECT_NODE":
        return set()
    items = node.get("select_list", [])
    out, position = set(), 0
    for item in items:
        if item.get("class") == "STAR":
            width = _star_width(con, node, item)
            if width is None:
                break  # later positions are unknown: nothing after this star counts as named
            position += width
            continue
        if _names_text(item):
            out.add(position)
        position += 1
    return out


def _star_width(con: duckdb.DuckDBPyConnection, node: dict[str, Any], star: dict[str, Any]) -> int | None:
    """How many columns one ``*`` / ``COLUMNS(...)`` item of ``node`` expands to (bound, not run)."""
    alone = dict(node, select_list=[star], modifiers=[])
    try:
        return len(con.execute(f"DESCRIBE {_sql_of(con, alone)}").fetchall())
    except duckdb.Error:
        return None
