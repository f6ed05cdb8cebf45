"""Fitted maps, vectors, evaluation results and reports: stored with their lineage.

Maps and vectors are Zarr arrays under ``maps/<key>/`` and ``vectors/<key>``;
their DuckDB rows carry the full lineage (source, target, mapper, chosen
hyper-parameters, split hash, input unit keys, code version). Every write is
array-first, record-second, like activation shards.
"""

from __future__ import annotations

import json
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
    """Mark a fit as running; a crashed fit's partial rows are cleared on restart."""
    with store.transaction() as con:
        for table in ("eval_results", "vectors", "fits"):
            con.execute(f"DELETE FROM {table} WHERE fit_key = ?", [fit_key])
        con.execute(
            "INSERT INTO fits VALUES (?, ?, ?, 'running', ?, NULL, now(), NULL)",
            [fit_key, source, target, json.dumps(inputs, sort_keys=True, default=str)],
        )


def finish_fit(store: Store, fit_key: str, report_path: str) -> None:
    with store.transaction() as con:
        con.execute(
            "UPDATE fits SET status = 'done', report_path = ?, finished_at = now() WHERE fit_key = ?",
            [report_path, fit_key],
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
    """A vector by name (newest if refitted) with its lineage; checksum-verified."""
    row = store.one(
        "SELECT vector_key, checksum, lineage_json, kind, source, target, mapper, category, norm FROM vectors "
        "WHERE name = ? ORDER BY created_at DESC LIMIT 1",
        [name],
    )
    if row is None:
        hint = store.fetchall("SELECT name FROM vectors ORDER BY name LIMIT 8")
        raise StoreError(
            f"no vector named {name!r} in {store.root}; known names include {[h[0] for h in hint]} "
            '(list all with: safeport query "select name from vectors")'
        )
    key, want, lineage_json, kind, source, target, mapper, category, norm = row
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


def save_results(store: Store, fit_key: str, rows: Sequence[Mapping[str, Any]]) -> None:
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
    with store.transaction() as con:
        con.register("_res", tbl)
        con.execute(f"INSERT INTO eval_results SELECT ?, {', '.join(cols)}, now() FROM _res", [fit_key])
        con.unregister("_res")


def write_report(store: Store, name: str, markdown: str, figures: Mapping[str, Any]) -> Path:
    """Write ``reports/<name>.md`` and its PNG figures (matplotlib Figures) next to it."""
    folder = store.root / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, fig in figures.items():
        fig.savefig(folder / fname, dpi=110, bbox_inches="tight")
    path = folder / f"{name}.md"
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


def read_exported_vector(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Load an exported vector (``.safetensors``; lineage from the sibling ``.json`` if present)."""
    from safetensors.numpy import load_file

    st = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    if not st.is_file():
        raise StoreError(f"{st} does not exist; export one with `safeport export NAME -o {path}`")
    tensors = load_file(str(st))
    if "vector" not in tensors:
        raise StoreError(f"{st} has no tensor named 'vector' (has {sorted(tensors)})")
    js = st.with_suffix(".json")
    lineage = json.loads(js.read_text(encoding="utf-8")) if js.is_file() else {}
    return tensors["vector"].astype(np.float32), lineage
