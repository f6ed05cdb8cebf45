"""Store upkeep: what is stale and why, garbage collection of orphan arrays, vector export/import.

Staleness is a label, not a deletion: a model that left the catalog (or was
superseded by a new revision or new weights) keeps its rows, maps and vectors,
so putting it back costs nothing and old results stay reproducible. ``gc`` only
removes arrays that no committed record refers to (left by a crash between the
array write and its record, or by a refit that replaced a vector), and by
default only says what it would remove.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from safeport.store import artifacts
from safeport.store.claims import live_writers
from safeport.store.schema import STALE_DDL
from safeport.store.store import Store, StoreError, checksum

STALE_KINDS = ("model", "unit", "map", "fit", "vector", "report")
IN_FLIGHT_MARGIN_S = 60.0  # clock and filesystem-timestamp slack when gc decides what may be in flight


def mark_stale(
    store: Store,
    profile: str,
    current_models: Mapping[str, str],
    current_fits: Collection[str],
    current_reports: Collection[str] | None = None,
) -> dict[str, int]:
    """Recompute the ``stale`` table from the profile's current model keys, fit keys and report keys.

    A model row is stale when its name left the profile or its key was superseded
    (new hub revision, changed local weights, changed options); its units and maps
    follow it. A fit is stale when this rebuild did not produce it. Maps and vectors
    are content-addressed and can be shared by several fits (``native:TARGET`` for two
    sources): one is stale only when no current fit lists it among its outputs (imported
    vectors belong to no local fit and are never stale). With ``current_reports``, report
    rows of prompt sets the profile no longer evaluates (or evaluates differently) are
    stale too. Returns counts per kind. Rebuilding a profile that brings something back clears it.
    """
    with store.reading() as con:
        models = con.execute("SELECT model_key, name FROM models").fetchall()
        units = con.execute("SELECT unit_key, model_key, dataset FROM units").fetchall()
        maps = con.execute("SELECT map_key, source, target, source_key, target_key, mapper FROM maps").fetchall()
        fits = con.execute("SELECT fit_key, source, target, inputs_json FROM fits").fetchall()
        vectors = con.execute("SELECT vector_key, name, fit_key, checksum FROM vectors").fetchall()
        produced = con.execute("SELECT fit_key, kind, key FROM fit_outputs").fetchall()
        report_sets = con.execute("SELECT report_key, fit_key, source, target, prompt_set FROM report_sets").fetchall()
    model_reason: dict[str, tuple[str, str]] = {}
    for key, name in models:
        if name not in current_models:
            model_reason[key] = (name, f"model {name!r} ({key}) is no longer in profile {profile!r} of the catalog")
        elif current_models[name] != key:
            model_reason[key] = (
                name,
                f"model {name!r} ({key}) was superseded by {current_models[name]} "
                "(new hub revision, changed weights or changed options)",
            )
    rows: list[tuple[str, str, str, str]] = [("model", k, n, r) for k, (n, r) in model_reason.items()]
    for ukey, mkey, dataset in units:
        if mkey in model_reason:
            rows.append(("unit", ukey, f"{model_reason[mkey][0]}/{dataset}", model_reason[mkey][1]))
    current_fits = set(current_fits)
    listed = {(kind, key) for _, kind, key in produced}
    current_out = {(kind, key) for fkey, kind, key in produced if fkey in current_fits}
    for mapk, src, tgt, skey, tkey, mapper in maps:
        why = model_reason.get(skey) or model_reason.get(tkey)
        if why:
            rows.append(("map", mapk, f"{src}->{tgt}:{mapper}", why[1]))
        elif ("map", mapk) in listed and ("map", mapk) not in current_out:
            rows.append(
                (
                    "map",
                    mapk,
                    f"{src}->{tgt}:{mapper}",
                    f"map {src}->{tgt}:{mapper} ({mapk}) is used by no fit of profile {profile!r} now "
                    "(its anchors, mapper settings or code changed)",
                )
            )
    current_pairs = {(s, t) for f, s, t, _ in fits if f in current_fits}  # pairs this rebuild fitted
    fit_reason: dict[str, str] = {}
    for fkey, src, tgt, inputs_json in fits:
        if fkey in current_fits:
            continue
        inputs = json.loads(inputs_json or "{}")
        why = model_reason.get(inputs.get("source_key", "")) or model_reason.get(inputs.get("target_key", ""))
        if why:
            fit_reason[fkey] = why[1]
        elif (src, tgt) in current_pairs:
            fit_reason[fkey] = f"fit {src}->{tgt} ({fkey}) was superseded by a newer fit (changed inputs or code)"
        else:
            fit_reason[fkey] = f"pair {src}->{tgt} ({fkey}) is no longer fitted by profile {profile!r}"
        rows.append(("fit", fkey, f"{src}->{tgt}", fit_reason[fkey]))
    current_values = {(name, sums): vkey for vkey, name, _, sums in vectors if ("vector", vkey) in current_out}
    for vkey, name, fkey, sums in vectors:
        if ("vector", vkey) in current_out:
            continue
        if fkey in fit_reason:
            reason = fit_reason[fkey]
        elif ("vector", vkey) in listed:
            reason = f"vector {name!r} ({vkey}) is produced by no current fit (its inputs changed)"
        else:
            continue  # imported: belongs to no local fit
        same = current_values.get((name, sums))
        if same is not None:  # a re-key (e.g. a store migrated from older keys): tell users the values did not change
            reason = f"{reason}; re-keyed: the same values are current as vector {same}"
        rows.append(("vector", vkey, name, reason))
    if current_reports is not None:
        current_reports = set(current_reports)
        for rkey, fkey, src, tgt, prompt_set in report_sets:
            if rkey in current_reports:
                continue
            left = fit_reason.get(fkey) or (
                f"report rows of prompt set {prompt_set!r} for {src}->{tgt} ({rkey}): the prompt set left "
                f"profile {profile!r} or changed (rows, α sweep or code)"
            )
            rows.append(("report", rkey, f"{src}->{tgt}/{prompt_set}", left))
    with store.transaction() as con:
        con.execute(STALE_DDL)
        con.execute("DELETE FROM stale")
        if rows:
            con.executemany("INSERT INTO stale VALUES (?, ?, ?, ?, now())", rows)
    return {k: sum(1 for r in rows if r[0] == k) for k in STALE_KINDS}


def stale_rows(store: Store) -> pa.Table:
    """Every stale artefact with its reason (empty before the first rebuild)."""
    if not store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'stale'"):
        return pa.table({c: pa.array([], pa.string()) for c in ("kind", "key", "name", "reason")})
    return store.sql("SELECT kind, key, name, reason FROM stale ORDER BY kind, name, key")


@dataclass(frozen=True)
class StoreStatus:
    """What ``safeport status`` shows: tables, ready to print or to assert on."""

    models: pa.Table
    datasets: pa.Table
    rows: pa.Table
    fits: pa.Table
    stale: pa.Table


def status(root: Path | str) -> StoreStatus:
    """Models (with staleness), datasets, rows cached per model and dataset, fits, and what is stale and why."""
    with Store(root, read_only=True) as store, store.reading() as con:
        stale = stale_rows(store)
        con.register("_stale", stale)
        try:
            models = store.sql(
                "SELECT m.name, m.role, m.family, m.model_key, m.revision, m.dim, m.current, "
                "s.reason IS NOT NULL AS stale, s.reason FROM models m "
                "LEFT JOIN _stale s ON s.kind = 'model' AND s.key = m.model_key ORDER BY m.name, m.registered_at"
            )
            fits = store.sql(
                "SELECT f.source, f.target, f.fit_key, f.status, f.finished_at, s.reason IS NOT NULL AS stale "
                "FROM fits f LEFT JOIN _stale s ON s.kind = 'fit' AND s.key = f.fit_key ORDER BY 1, 2, 5"
            )
        finally:
            con.unregister("_stale")
        datasets = store.sql("SELECT dataset, kind, n_rows, content_hash, registered_at FROM datasets ORDER BY 1")
        rows = store.sql(
            "SELECT m.name AS model, m.model_key, u.dataset, count(a.row) AS rows, sum(a.n_tokens) AS tokens "
            "FROM activation_rows a JOIN units u USING (unit_key) JOIN models m ON m.model_key = a.model_key "
            "GROUP BY ALL ORDER BY 1, 2, 3"
        )
    return StoreStatus(models, datasets, rows, fits, stale)


# -- garbage collection -----------------------------------------------------------
@dataclass(frozen=True)
class Garbage:
    path: str  # inside the store's arrays group
    kind: str  # acts | maps | vectors | partial (a write killed before its rename)
    bytes: int


def _children(group: zarr.Group, path: str) -> list[tuple[str, bool]]:
    """(name, is_array) of a group's members; empty when the group is absent."""
    try:
        node = group[path]
    except KeyError:
        return []
    if not isinstance(node, zarr.Group):
        return []
    return sorted((name, isinstance(member, zarr.Array)) for name, member in node.members())


def find_garbage(store: Store) -> list[Garbage]:
    """Arrays under ``acts/``, ``maps/`` and ``vectors/`` that no committed DuckDB record refers to,
    plus half-written ``*.partial`` files; see :func:`collect_garbage` for what is in flight."""
    with store.reading() as con:
        units = {r[0] for r in con.execute("SELECT array_path FROM units").fetchall()}
        maps = {r[0] for r in con.execute("SELECT map_key FROM maps").fetchall()}
        vectors = {r[0] for r in con.execute("SELECT vector_key FROM vectors").fetchall()}
    found: list[str] = []
    for model_key, is_array in _children(store.arrays, "acts"):
        if is_array:
            found.append(f"acts/{model_key}")
            continue
        members = _children(store.arrays, f"acts/{model_key}")
        orphans = [f"acts/{model_key}/{u}" for u, _ in members if f"acts/{model_key}/{u}" not in units]
        found.extend([f"acts/{model_key}"] if members and len(orphans) == len(members) else orphans)
    found.extend(f"maps/{k}" for k, _ in _children(store.arrays, "maps") if k not in maps)
    found.extend(f"vectors/{k}" for k, _ in _children(store.arrays, "vectors") if k not in vectors)
    arrays = [Garbage(p, p.split("/")[0], store.location.size(p)) for p in found]
    inside = tuple(f"{p}/" for p in found)  # removed with their array already
    partial = [
        Garbage(p, "partial", n) for p, n in sorted(store.location.leftovers().items()) if not p.startswith(inside)
    ]
    return arrays + partial


@dataclass(frozen=True)
class GcReport:
    garbage: list[Garbage]
    applied: bool
    in_flight: list[Garbage] = field(default_factory=list)  # written since a running writer started: kept

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.garbage)


def collect_garbage(root: Path | str, apply: bool = False, wait_s: float = 0.0) -> GcReport:
    """List (and with ``apply`` delete) unreferenced arrays; what a running writer may be writing is kept.

    Writers run beside gc: an extraction creates a unit's array a moment before its record, a
    fit writes vector arrays before their rows. So while writers are running (their presence
    claims are alive), an unreferenced array or ``*.partial`` file written since the earliest of
    them started (less a minute for clocks) is reported as in flight and kept; a later gc, or one
    with no writer running, removes it if it is still unreferenced then.
    """
    root = Path(root)
    if not (root / "meta.duckdb").exists():
        raise StoreError(f"no store at {root}; check --store")
    with Store(root, wait_s=wait_s or None) as store:
        writers = live_writers(store)
        since = min((w.claimed_at for w in writers), default=None)
        garbage: list[Garbage] = []
        in_flight: list[Garbage] = []
        for g in find_garbage(store):
            newest = store.location.newest(g.path) if since is not None else None
            recent = since is not None and (newest is None or newest >= since - IN_FLIGHT_MARGIN_S)
            (in_flight if recent else garbage).append(g)
        if apply:
            for g in garbage:
                if g.kind != "partial":
                    with contextlib.suppress(KeyError):  # already gone
                        del store.arrays[g.path]
                store.location.remove(g.path)  # a partial file, or what a store that does not delete prefixes leaves
    return GcReport(garbage, apply, in_flight)


# -- vector export / import -------------------------------------------------------
@dataclass(frozen=True)
class ImportedVector:
    name: str
    vector_key: str
    status: str  # imported | present
    file: str


# Fields that are columns of ``vectors`` (or describe the export itself), not lineage.
_DESCRIPTIVE = (
    "name",
    "vector_key",
    "kind",
    "source",
    "target",
    "mapper",
    "category",
    "norm",
    "checksum",
    "exported_from",
    "exported_at",
)


def export_vectors(root: Path | str, out: Path | str, names: Sequence[str] = ()) -> list[Path]:
    """Write ``<vector_key>.safetensors`` + ``.json`` per vector (all names by default) and a manifest.

    The JSON carries the full lineage plus the checksum, so ``import_vectors`` can
    refuse a file that changed on the way. Every vector is read and every key checked
    (keys become file names) before the first file is written.
    """
    out = Path(out)
    loaded: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    with Store(root, read_only=True) as store:
        wanted = list(names) or [r[0] for r in store.fetchall("SELECT DISTINCT name FROM vectors ORDER BY 1")]
        if not wanted:
            raise StoreError(f"store {store.root} has no vectors to export; run `safeport fit` first")
        for name in wanted:
            key = store.scalar("SELECT vector_key FROM vectors WHERE name = ? ORDER BY created_at DESC LIMIT 1", [name])
            if key is not None:
                try:
                    artifacts.check_vector_key(key, f"store {store.root}, vector {name!r}")
                except StoreError as err:
                    raise StoreError(
                        f"{err}. Nothing was exported; export the other vectors by name "
                        "(`safeport export NAME... -o DIR`)"
                    ) from None
            values, lineage = artifacts.load_vector(store, name)
            lineage.update(
                {
                    "checksum": checksum(values.reshape(1, -1)),
                    "exported_from": str(store.root.resolve()),
                    "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
            loaded.append((name, values, lineage))
    written: list[Path] = []
    manifest: list[dict[str, Any]] = []
    for name, values, lineage in loaded:
        st, _ = artifacts.export_vector(values, lineage, out / lineage["vector_key"])
        written.append(st)
        manifest.append(
            {"name": name, "vector_key": lineage["vector_key"], "file": st.name, "checksum": lineage["checksum"]}
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return written


def _exported_files(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(src.glob("*.safetensors"))
        if not files:
            raise StoreError(f"{src} holds no .safetensors files; export some with `safeport export -o {src}`")
        return files
    if not src.exists() and not src.with_suffix(".safetensors").exists():
        raise StoreError(f"{src} does not exist; pass a folder written by `safeport export` or one .safetensors file")
    return [src]


def import_vectors(root: Path | str, src: Path | str, wait_s: float = 0.0) -> list[ImportedVector]:
    """Add exported vectors to a store, checksum-verified, with their lineage and where they came from.

    A vector already present under the same key with the same checksum is left as
    it is; the same key with different values is refused (keys are content hashes,
    so that means one side is damaged).
    """
    root, src = Path(root), Path(src)
    files = _exported_files(src)
    loaded = []
    for f in files:
        values, lineage = artifacts.read_exported_vector(f)  # file, tensor, JSON schema and checksum checked
        missing = [k for k in ("name", "vector_key", "kind", "target", "checksum") if not lineage.get(k)]
        if missing:
            raise StoreError(f"{f}: its lineage JSON lacks {missing}; re-export it with `safeport export`")
        loaded.append((f, values, lineage))
    out: list[ImportedVector] = []
    rid = uuid.uuid4().hex
    with Store(root, wait_s=wait_s or None) as store:
        for f, values, lineage in loaded:  # every check against the store first: a refusal writes nothing
            _check_against(store, f, values, lineage)
        for f, values, lineage in loaded:
            started = time.time()
            key, name = str(lineage["vector_key"]), str(lineage["name"])
            if store.scalar("SELECT checksum FROM vectors WHERE vector_key = ?", [key]) is not None:
                out.append(ImportedVector(name, key, "present", str(f)))
                continue
            kept = {k: v for k, v in lineage.items() if k not in _DESCRIPTIVE}
            kept["imported_from"] = {
                "store": lineage.get("exported_from"),
                "exported_at": lineage.get("exported_at"),
                "file": str(f.resolve()),
                "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            record = artifacts.VectorRecord(
                key,
                name,
                str(lineage["kind"]),
                lineage.get("source"),
                str(lineage["target"]),
                lineage.get("mapper"),
                lineage.get("category"),
                np.asarray(values, dtype=np.float32),
                kept,
            )
            artifacts.save_vectors(store, str(lineage.get("fit_key") or f"imported:{key}"), [record])
            store.record_run(
                rid, "import", "import_vector", name, "", key, "done", 1, 0, time.time() - started, started, f"from {f}"
            )
            out.append(ImportedVector(name, key, "imported", str(f)))
    return out


def _check_against(store: Store, f: Path, values: np.ndarray, lineage: Mapping[str, Any]) -> None:
    """Refuse an exported vector that contradicts the store: same key, other values; or not its target's dim."""
    key, name = str(lineage["vector_key"]), str(lineage["name"])
    have = store.scalar("SELECT checksum FROM vectors WHERE vector_key = ?", [key])
    if have is not None and have != lineage["checksum"]:
        raise StoreError(
            f"{f}: vector {name!r} ({key}) is already in {store.root} with checksum {have}, not "
            f"{lineage['checksum']}; one of the two is damaged, run `safeport verify` on both stores"
        )
    target, target_key = str(lineage["target"]), lineage.get("target_key")
    row = store.one("SELECT model_key, dim FROM models WHERE model_key = ?", [target_key]) if target_key else None
    row = row or store.one(
        "SELECT model_key, dim FROM models WHERE name = ? AND current ORDER BY registered_at DESC LIMIT 1", [target]
    )
    if row is not None and row[1] is not None and int(row[1]) != values.shape[0]:
        raise StoreError(
            f"{f}: vector {name!r} has {values.shape[0]} values but model {target!r} ({row[0]}) in {store.root} has "
            f"dim {row[1]}; import it into a store of that target, or export the right vector"
        )
