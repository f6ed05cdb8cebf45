"""Fitted maps, vectors, evaluation results and reports: stored with their lineage.

Maps and vectors are Zarr arrays under ``maps/<key>/`` and ``vectors/<key>``;
their DuckDB rows carry the full lineage (source, target, mapper, chosen
hyper-parameters, split hash, input unit keys, code version). Every write is
array-first, record-second, like activation shards.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import zarr
import zarr.codecs

from safeport.store.store import Store, StoreError, checksum, tensor_checksum


@dataclass(frozen=True)
class VectorRecord:
    vector_key: str
    name: str
    kind: str
    source: str | None
    target: str
    mapper: str | None
    category: str | None
    values: np.ndarray
    lineage: dict[str, Any]


def _array(store: Store, path: str, values: np.ndarray) -> None:
    try:
        store.arrays.create_array(
            path, data=np.ascontiguousarray(values), compressors=zarr.codecs.ZstdCodec(level=3), overwrite=True
        )
    except OSError as err:
        raise StoreError(f"cannot write array {path} in {store.location}: {err}") from None


def fit_done(store: Store, fit_key: str) -> bool:
    return store.scalar("SELECT status FROM fits WHERE fit_key = ?", [fit_key]) == "done"


def start_fit(store: Store, fit_key: str, source: str, target: str, inputs: Mapping[str, Any]) -> None:
    """Mark a fit as running; a crashed fit's partial rows are cleared on restart.

    Its vectors go too, except those another fit also produced (a shared ``native:TARGET``
    or ``source:SOURCE`` has one key for every pair that computes it).
    """
    with store.transaction() as con:
        con.execute(
            """DELETE FROM vectors WHERE fit_key = ? AND vector_key NOT IN (
                   SELECT key FROM fit_outputs WHERE kind = 'vector' AND fit_key <> ?)""",
            [fit_key, fit_key],
        )
        for table in ("eval_results", "fit_outputs", "fits"):
            con.execute(f"DELETE FROM {table} WHERE fit_key = ?", [fit_key])
        con.execute(
            "INSERT INTO fits (fit_key, source, target, status, inputs_json, created_at) "
            "VALUES (?, ?, ?, 'running', ?, now())",
            [fit_key, source, target, json.dumps(inputs, sort_keys=True, default=str)],
        )


def finish_fit(
    store: Store,
    fit_key: str,
    report_path: str,
    outputs: Sequence[tuple[str, str, str]] = (),
    summary: Mapping[str, Any] | None = None,
) -> None:
    """Mark a fit done with what it produced: ``outputs`` are (kind 'map' | 'vector', key, name).

    ``summary`` (map hyper-parameters, input counts) lets a later run re-render the
    report without refitting. One transaction: a fit is done with its outputs or not at all.
    """
    rows = sorted({(fit_key, kind, key, name) for kind, key, name in outputs})
    with store.transaction() as con:
        con.execute("DELETE FROM fit_outputs WHERE fit_key = ?", [fit_key])
        if rows:
            con.executemany("INSERT INTO fit_outputs VALUES (?, ?, ?, ?)", rows)
        con.execute(
            "UPDATE fits SET status = 'done', report_path = ?, finished_at = now(), summary_json = ? WHERE fit_key = ?",
            [report_path, json.dumps(summary or {}, sort_keys=True, default=str), fit_key],
        )


def fit_outputs(store: Store, fit_key: str, kind: str) -> dict[str, str]:
    """{name: key} of the maps or vectors a done fit produced."""
    rows = store.fetchall(
        "SELECT name, key FROM fit_outputs WHERE fit_key = ? AND kind = ? ORDER BY name", [fit_key, kind]
    )
    return {str(n): str(k) for n, k in rows}


def report_done(store: Store, report_key: str) -> bool:
    return bool(store.scalar("SELECT count(*) FROM report_sets WHERE report_key = ?", [report_key]))


def save_report_rows(
    store: Store,
    report_key: str,
    fit_key: str,
    source: str,
    target: str,
    prompt_set: str,
    inputs: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """One prompt set's report rows (``eval_results`` under ``fit_key = report_key``) and their record, atomically."""
    with store.transaction() as con:
        con.execute("DELETE FROM eval_results WHERE fit_key = ?", [report_key])
        con.execute("DELETE FROM report_sets WHERE report_key = ?", [report_key])
        _insert_results(con, report_key, rows)
        con.execute(
            "INSERT INTO report_sets VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                report_key,
                fit_key,
                source,
                target,
                prompt_set,
                inputs.get("prompt_hash"),
                json.dumps(inputs, sort_keys=True, default=str),
                len(rows),
            ],
        )


def set_rendered(store: Store, fit_key: str, render_key: str, report_path: str) -> None:
    """Record which fit and report rows the pair's markdown report now shows."""
    with store.transaction() as con:
        con.execute(
            "UPDATE fits SET report_key = ?, report_path = ? WHERE fit_key = ?", [render_key, report_path, fit_key]
        )


def save_map(store: Store, map_key: str, state: Mapping[str, np.ndarray], row: Mapping[str, Any]) -> None:
    """Write a fitted map's tensors, then its lineage row (idempotent per key)."""
    for name, value in state.items():
        _array(store, f"maps/{map_key}/{name}", value)
    tensors = [
        (map_key, name, json.dumps(list(np.shape(v))), np.asarray(v).dtype.str, tensor_checksum(np.asarray(v)))
        for name, v in sorted(state.items())
    ]
    with store.transaction() as con:
        con.execute("DELETE FROM map_tensors WHERE map_key = ?", [map_key])
        if tensors:
            con.executemany("INSERT INTO map_tensors VALUES (?, ?, ?, ?, ?)", tensors)
        con.execute("DELETE FROM maps WHERE map_key = ?", [map_key])
        con.execute(
            "INSERT INTO maps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                map_key,
                row["source"],
                row["target"],
                row["source_key"],
                row["target_key"],
                row["mapper"],
                json.dumps(row["params"], sort_keys=True),
                row["split_hash"],
                row["anchors"],
                row["anchors_hash"],
                json.dumps(row["input_units"]),
                row["code_version"],
                row["n_train"],
            ],
        )


def load_map(store: Store, map_key: str, names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors (by their state names) and params of a stored map."""
    params = store.scalar("SELECT params_json FROM maps WHERE map_key = ?", [map_key])
    if params is None:
        raise StoreError(f"map {map_key} is not in the store; run `safeport fit`")
    state = {n: np.asarray(store.arrays[f"maps/{map_key}/{n}"][...]) for n in names}  # type: ignore[index]
    sums = map_checksums(store, map_key)
    for name, values in state.items():
        if name in sums and tensor_checksum(values) != sums[name]:
            raise StoreError(
                f"map tensor maps/{map_key}/{name} fails its checksum: the data on disk is damaged. "
                "Run `safeport verify --repair`, then `safeport fit`"
            )
    return state, json.loads(params)


def map_checksums(store: Store, map_key: str) -> dict[str, str]:
    """Recorded checksum per tensor name; empty for a map written before checksums were recorded."""
    try:
        rows = store.fetchall("SELECT name, checksum FROM map_tensors WHERE map_key = ?", [map_key])
    except duckdb.CatalogException:  # an older store opened read-only: the table does not exist yet
        return {}
    return {str(n): str(c) for n, c in rows}


def map_state_names(store: Store, map_key: str) -> list[str]:
    group = store.arrays[f"maps/{map_key}"]
    if not isinstance(group, zarr.Group):
        raise StoreError(f"maps/{map_key} is not a group")
    return sorted(group.array_keys())


def save_vectors(store: Store, fit_key: str, records: Sequence[VectorRecord]) -> None:
    for r in records:
        _array(store, f"vectors/{r.vector_key}", r.values.astype(np.float32))
    with store.transaction() as con:
        for r in records:
            con.execute("DELETE FROM vectors WHERE vector_key = ?", [r.vector_key])
            con.execute(
                "INSERT INTO vectors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [
                    r.vector_key,
                    r.name,
                    r.kind,
                    r.source,
                    r.target,
                    r.mapper,
                    r.category,
                    r.lineage.get("map_key"),
                    fit_key,
                    int(r.values.shape[0]),
                    float(np.linalg.norm(r.values)),
                    checksum(r.values.reshape(1, -1)),
                    json.dumps(r.lineage, sort_keys=True, default=str),
                ],
            )


def load_vector(store: Store, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A vector by name with its lineage; checksum-verified.

    A name can have several keys (its inputs changed over time): the newest one not
    marked stale wins, so a profile that went back to earlier inputs gets their vector.
    """
    stale = "(SELECT key FROM stale WHERE kind = 'vector')" if _has_table(store, "stale") else "(SELECT NULL)"
    row = store.one(
        f"SELECT vector_key FROM vectors WHERE name = ? ORDER BY vector_key IN {stale}, created_at DESC LIMIT 1",
        [name],
    )
    if row is None:
        hint = store.fetchall("SELECT name FROM vectors ORDER BY name LIMIT 8")
        raise StoreError(
            f"no vector named {name!r} in {store.root}; known names include {[h[0] for h in hint]} "
            '(list all with: safeport query "select name from vectors")'
        )
    return load_vector_key(store, str(row[0]))


def load_vector_key(store: Store, key: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A vector by its key (a content address of its inputs) with its lineage; checksum-verified."""
    row = store.one(
        "SELECT name, checksum, lineage_json, kind, source, target, mapper, category, norm FROM vectors "
        "WHERE vector_key = ?",
        [key],
    )
    if row is None:
        raise StoreError(f"no vector with key {key!r} in {store.root}; run `safeport fit`")
    name, want, lineage_json, kind, source, target, mapper, category, norm = row
    values = np.asarray(store.arrays[f"vectors/{key}"][...], dtype=np.float32)  # type: ignore[index]
    if checksum(values.reshape(1, -1)) != want:
        raise StoreError(f"vector {name!r} ({key}) fails its checksum; the store is damaged")
    lineage = json.loads(lineage_json)
    lineage.update(
        {
            "name": name,
            "vector_key": key,
            "kind": kind,
            "source": source,
            "target": target,
            "mapper": mapper,
            "category": category,
            "norm": norm,
        }
    )
    return values, lineage


def _has_table(store: Store, name: str) -> bool:
    return bool(store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]))


def save_results(store: Store, fit_key: str, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    with store.transaction() as con:
        _insert_results(con, fit_key, rows)


def _insert_results(con: duckdb.DuckDBPyConnection, fit_key: str, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    cols = ["kind", "source", "target", "method", "category", "metric", "alpha", "value", "n"]
    tbl = pa.table({c: [r.get(c) for r in rows] for c in cols}).cast(
        pa.schema(
            [
                ("kind", pa.string()),
                ("source", pa.string()),
                ("target", pa.string()),
                ("method", pa.string()),
                ("category", pa.string()),
                ("metric", pa.string()),
                ("alpha", pa.float64()),
                ("value", pa.float64()),
                ("n", pa.int32()),
            ]
        )
    )
    con.register("_res", tbl)
    try:
        con.execute(f"INSERT INTO eval_results SELECT ?, {', '.join(cols)}, now() FROM _res", [fit_key])
    finally:
        con.unregister("_res")


def report_path(store: Store, name: str) -> Path:
    """Where ``write_report`` puts ``reports/<name>.md``."""
    return store.root / "reports" / f"{name}.md"


def write_report(store: Store, name: str, markdown: str, figures: Mapping[str, Any]) -> Path:
    """Write ``reports/<name>.md`` and its PNG figures (matplotlib Figures) next to it."""
    folder = store.root / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, fig in figures.items():
        fig.savefig(folder / fname, dpi=110, bbox_inches="tight")
    path = report_path(store, name)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(markdown, encoding="utf-8")
    tmp.replace(path)
    return path


def export_vector(values: np.ndarray, lineage: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """``out.safetensors`` (tensor ``vector``) + ``out.json`` lineage, loadable with one call."""
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    st = out.with_suffix(".safetensors")
    meta = {k: str(v) for k, v in lineage.items() if isinstance(v, (str, int, float)) and v is not None}
    save_file({"vector": np.ascontiguousarray(values, dtype=np.float32)}, str(st), metadata=meta)
    js = out.with_suffix(".json")
    js.write_text(json.dumps(dict(lineage), indent=2, sort_keys=True, default=str), encoding="utf-8")
    return st, js


# The format of a vector key (``flows/fit.py`` makes them: 20 hex digits of a SHA-256). Keys become
# file names on export (``<key>.safetensors``) and array paths in the store, so an imported or
# exported key must match it exactly: a path-like key would write outside the export folder.
VECTOR_KEY = re.compile(r"[0-9a-f]{20}")
CHECKSUM = re.compile(r"[0-9a-f]{32}")  # :func:`safeport.store.store.checksum`
VECTOR_KIND = re.compile(r"[a-z][a-z_]{0,31}")  # source, native, raw, calibrated, ... (mappers/transfer.py)
_MAX_LINEAGE_BYTES = 1 << 20
_MAX_LINEAGE_DEPTH = 32
# Lineage fields that must be text when present (None allowed where a vector has none).
_TEXT_FIELDS = (
    "name",
    "kind",
    "target",
    "target_key",
    "source",
    "source_key",
    "mapper",
    "category",
    "fit_key",
    "map_key",
    "exported_from",
    "exported_at",
)


def _short(value: Any) -> str:
    shown = reprlib.repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def check_vector_key(key: Any, where: str) -> str:
    """``key`` if it is a vector key (20 lowercase hex digits), else a :class:`StoreError` naming ``where``."""
    if not isinstance(key, str) or not VECTOR_KEY.fullmatch(key):
        raise StoreError(
            f"{where}: vector_key {_short(key)} is not a vector key (20 lowercase hex digits); keys become file "
            "names, so nothing else is accepted. Use the files `safeport export` wrote, unchanged"
        )
    return key


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest


def _read_lineage(js: Path) -> dict[str, Any]:
    """The lineage object of an export's ``.json``, checked for size, syntax, type and nesting."""
    try:
        raw = js.read_bytes()
    except OSError as err:
        raise StoreError(f"{js}: cannot be read ({err.strerror}); check its permissions") from None
    if len(raw) > _MAX_LINEAGE_BYTES:
        raise StoreError(
            f"{js}: {len(raw)} bytes, more than a lineage file holds; use the file `safeport export` wrote"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StoreError(f"{js}: byte {err.start} is not valid UTF-8; use the file `safeport export` wrote") from None
    try:
        lineage = json.loads(text)
    except RecursionError:
        raise StoreError(f"{js}: the JSON is nested too deeply; use the file `safeport export` wrote") from None
    except ValueError as err:  # JSONDecodeError, or an integer beyond Python's digit limit
        why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0]
        raise StoreError(f"{js}: not valid JSON ({why}); use the file `safeport export` wrote") from None
    if not isinstance(lineage, dict):
        raise StoreError(
            f"{js}: a JSON {type(lineage).__name__}, not an object of lineage fields; "
            "use the file `safeport export` wrote"
        )
    if _depth(lineage) > _MAX_LINEAGE_DEPTH:
        raise StoreError(f"{js}: the JSON is nested more than {_MAX_LINEAGE_DEPTH} levels deep; lineage never is")
    for field in _TEXT_FIELDS:
        if lineage.get(field) is not None and not isinstance(lineage[field], str):
            raise StoreError(
                f"{js}: {field} is a JSON {type(lineage[field]).__name__}, not a string; fix or re-export it"
            )
    if "vector_key" in lineage:
        check_vector_key(lineage["vector_key"], str(js))
    if lineage.get("kind") is not None and not VECTOR_KIND.fullmatch(lineage["kind"]):
        raise StoreError(
            f"{js}: kind {_short(lineage['kind'])} is not a vector kind (a lowercase word such as native or "
            "calibrated); use the file `safeport export` wrote"
        )
    if "checksum" in lineage and not (isinstance(lineage["checksum"], str) and CHECKSUM.fullmatch(lineage["checksum"])):
        raise StoreError(
            f"{js}: checksum {_short(lineage['checksum'])} is not a checksum (32 hex digits); re-export it"
        )
    return lineage


def _read_tensor(st: Path) -> np.ndarray:
    """The ``vector`` tensor of a safetensors file: readable, a float type, 1-D, non-empty, finite."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(st))
    except Exception as err:  # SafetensorError, OSError, a dtype numpy lacks (bfloat16)
        raise StoreError(
            f"{st}: not a readable safetensors file ({type(err).__name__}: {err}); export the vector again"
        ) from None
    if "vector" not in tensors:
        raise StoreError(f"{st} has no tensor named 'vector' (has {_short(sorted(tensors))}); export the vector again")
    values = tensors["vector"]
    if not np.issubdtype(values.dtype, np.floating):
        raise StoreError(f"{st}: tensor 'vector' has dtype {values.dtype}, not a float type; export the vector again")
    if values.ndim != 1 or values.shape[0] == 0:
        raise StoreError(
            f"{st}: tensor 'vector' has shape {values.shape}; a steering vector is 1-D and non-empty (shape (dim,))"
        )
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise StoreError(f"{st}: tensor 'vector' holds NaN/inf values; export the vector again")
    return values


def read_exported_vector(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Load an exported vector (``.safetensors``; lineage from the sibling ``.json`` if present), checked.

    Every problem is a :class:`StoreError` naming the file, raised before the caller writes
    anything: an unreadable file, a tensor that is not one finite 1-D float vector, lineage
    JSON that is not a small object of the expected fields, a checksum that does not match.
    Without a ``.json`` (a hand-made vector for ``generate``) the lineage is empty.
    """
    st = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    if not st.is_file():
        raise StoreError(f"{st} does not exist; export one with `safeport export NAME -o {path}`")
    js = st.with_suffix(".json")
    lineage = _read_lineage(js) if js.is_file() else {}
    values = _read_tensor(st)
    if "checksum" in lineage and checksum(values.reshape(1, -1)) != lineage["checksum"]:
        raise StoreError(
            f"{st}: values have checksum {checksum(values.reshape(1, -1))} but the export recorded "
            f"{lineage['checksum']}; the file was damaged or edited, export it again"
        )
    return values, lineage
