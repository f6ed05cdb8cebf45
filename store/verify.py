"""Integrity check of a whole store, and invalidation of what is damaged so it can be recomputed.

Why: weeks of GPU time live in a store, and a bit flip, a truncated or deleted chunk or a
half-restored backup must never pass silently into a fit. :func:`verify_store` reads every
committed activation shard and every vector and checks each against the checksum recorded
when it was committed; fitted maps (no checksum is recorded for them) are checked for
readable, finite tensors. It names each damaged array (path, model/dataset or vector name,
shard and rows).

:func:`invalidate` turns a report into commit-record deletions, each in one transaction,
so the normal resumable stages recompute exactly what was lost: a damaged shard loses its
``shards`` row and its rows in ``unit_rows`` and its unit goes to status ``repair`` (extraction
resumes it); a damaged vector or map resets its fit (``safeport fit`` recomputes it). Chunks
on disk are left for recomputation to overwrite; only a unit whose array metadata cannot be
read gets its array recreated empty (every shard of it was unreadable anyway).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import zarr

from safeport.store import artifacts
from safeport.store.store import Store, UnitInfo, checksum, tensor_checksum
from safeport.store.units import ARRAY, UNIT_COLUMNS

REPAIR_STATUS = "repair"


@dataclass(frozen=True)
class Damage:
    """One damaged array (or inconsistent record) and what is wrong with it."""

    kind: str  # shard | unit | vector | map | record
    path: str  # array path inside the arrays group (the table name for record problems)
    owner: str  # model/dataset, vector name or map, for people
    problem: str
    key: str  # unit_key, vector_key or map_key
    shard: int | None = None
    rows: tuple[int, int] | None = None
    fit_key: str | None = None

    def describe(self) -> str:
        where = f" shard {self.shard} rows {self.rows[0]}-{self.rows[1]}" if self.rows is not None else ""
        return f"{self.kind:<6} {self.path}{where} ({self.owner}): {self.problem}"


@dataclass(frozen=True)
class Report:
    """What :func:`verify_store` checked and the damage it found (empty when the store is intact)."""

    root: str
    shards: int
    vectors: int
    maps: int
    damage: tuple[Damage, ...]

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def paths(self) -> list[str]:
        """Distinct damaged array paths, in report order."""
        return list(dict.fromkeys(d.path for d in self.damage))


def _chunk_missing(store: Store, array: zarr.Array, coords: tuple[int, ...]) -> bool:
    """True when the arrays location holds no object for the chunk at ``coords`` (it reads as fill value)."""
    return not store.location.exists(f"{array.path}/{array.metadata.encode_chunk_key(coords)}")


def _shard_damage(store: Store, unit: UnitInfo, owner: str) -> tuple[int, list[Damage]]:
    """(shards checked, damage) for one unit's committed shards."""
    records = sorted(store.shard_records(unit.unit_key).values(), key=lambda r: r.shard)
    found: list[Damage] = []

    def bad(shard: int, rows: tuple[int, int], problem: str) -> None:
        found.append(Damage("shard", unit.array_path, owner, problem, unit.unit_key, shard, rows))

    if not records:
        return 0, found
    if unit.layout == ARRAY:  # the unit's one array must open with the recorded shape
        try:
            array = store.arrays[unit.array_path]
            if not isinstance(array, zarr.Array):
                raise TypeError("it is a group, not an array")
            if array.shape != (unit.n_rows, unit.dim) or array.chunks != (unit.shard_rows, unit.dim):
                raise ValueError(
                    f"shape {array.shape} chunks {array.chunks}, the unit records "
                    f"({unit.n_rows}, {unit.dim}) chunks ({unit.shard_rows}, {unit.dim})"
                )
        except Exception as err:  # missing or garbled metadata: every committed shard is unreadable
            for r in records:
                bad(r.shard, (r.row_start, r.row_stop), f"array cannot be opened ({type(err).__name__}: {err})")
            return len(records), found
    for r in records:
        rows = (r.row_start, r.row_stop)
        if unit.layout == ARRAY and rows != unit.shard_range(r.shard):
            bad(r.shard, rows, f"recorded rows do not match the unit's shard layout {unit.shard_range(r.shard)}")
            continue
        try:
            array = store.arrays[r.array_path]
            if not isinstance(array, zarr.Array):
                raise TypeError("it is a group, not an array")
            block = np.asarray(array[r.row_start : r.row_stop, :])
        except Exception as err:  # truncated or garbled chunk, or a shard array whose metadata is gone
            what = "chunk cannot be decoded" if unit.layout == ARRAY else "shard array cannot be read"
            bad(r.shard, rows, f"{what} ({type(err).__name__}: {err})")
            continue
        if checksum(block, r.dtype) != r.checksum:
            missing = unit.layout == ARRAY and _chunk_missing(store, array, (r.shard, 0))
            bad(r.shard, rows, "chunk file missing" if missing else "checksum mismatch: the data changed on disk")
    return len(records), found


def _unit_damage(store: Store) -> tuple[int, list[Damage]]:
    rows = store.fetchall(
        f"SELECT {', '.join('u.' + c.strip() for c in UNIT_COLUMNS.split(','))}, m.name, "
        "(SELECT count(*) FROM shards s WHERE s.unit_key = u.unit_key) "
        "FROM units u LEFT JOIN models m USING (model_key) ORDER BY u.array_path"
    )
    checked, found = 0, []
    for *fields, name, committed in rows:
        unit = UnitInfo(*fields)
        owner = f"model {name or '?'} ({unit.model_key}), dataset {unit.dataset}"
        if unit.position:
            owner += f", position {unit.position}"
        n, damage = _shard_damage(store, unit, owner)
        checked += n
        found.extend(damage)
        if unit.status == REPAIR_STATUS:
            found.append(
                Damage(
                    "unit",
                    unit.array_path,
                    owner,
                    f"{unit.n_shards - committed} shard(s) are uncommitted after a repair and await "
                    "re-extraction; run `safeport verify --repair` (or `safeport extract`)",
                    unit.unit_key,
                )
            )
        elif unit.status == "done" and committed < unit.n_shards:
            found.append(
                Damage(
                    "unit",
                    unit.array_path,
                    owner,
                    f"marked done but {unit.n_shards - committed} of {unit.n_shards} shard(s) have no commit record",
                    unit.unit_key,
                )
            )
    for unit_key, n in store.fetchall(f"SELECT unit_key, count(*) FROM ({_ORPHAN_ROWS}) GROUP BY 1 ORDER BY 1"):
        found.append(
            Damage(
                "record",
                "unit_rows",
                f"unit {unit_key}",
                f"{n} row record(s) point at no committed shard, so readers would see uncommitted data",
                str(unit_key),
            )
        )
    return checked, found


# Rows of the index whose shard has no commit record (a damaged or hand-edited store).
_ORPHAN_ROWS = """SELECT r.unit_key, r.shard, r.row FROM unit_rows r WHERE NOT EXISTS (
    SELECT 1 FROM shards s WHERE s.unit_key = r.unit_key AND s.shard = r.shard)"""


def _vector_problem(store: Store, path: str, dim: int, want: str) -> str | None:
    """What is wrong with one stored vector, or None."""
    try:
        array = store.arrays[path]
        if not isinstance(array, zarr.Array):
            raise TypeError("it is a group, not an array")
    except Exception as err:
        return f"array missing or cannot be opened ({type(err).__name__}: {err})"
    try:
        values = np.asarray(array[...], dtype=np.float32)
    except Exception as err:
        return f"chunk cannot be decoded ({type(err).__name__}: {err})"
    if values.shape != (dim,):
        return f"shape {values.shape}, the record says ({dim},)"
    if checksum(values.reshape(1, -1)) != want:
        return (
            "chunk file missing"
            if _chunk_missing(store, array, (0,))
            else "checksum mismatch: the data changed on disk"
        )
    return None


def _vector_damage(store: Store) -> tuple[int, list[Damage]]:
    rows = store.fetchall("SELECT vector_key, name, fit_key, dim, checksum FROM vectors ORDER BY name")
    found: list[Damage] = []
    for key, name, fit_key, dim, want in rows:
        path = f"vectors/{key}"
        problem = _vector_problem(store, path, int(dim), str(want))
        if problem is not None:
            found.append(Damage("vector", path, f"vector {name!r}", problem, str(key), fit_key=fit_key))
    return len(rows), found


def _map_damage(store: Store) -> tuple[int, list[Damage]]:
    """Each recorded tensor must exist, decode and match its checksum (older maps: be finite)."""
    rows = store.fetchall("SELECT map_key, source, target, mapper FROM maps ORDER BY map_key")
    found: list[Damage] = []
    for key, source, target, mapper in rows:
        owner = f"map {source}->{target} {mapper}"
        try:
            group = store.arrays[f"maps/{key}"]
            if not isinstance(group, zarr.Group):
                raise TypeError("it is an array, not a group")
            members = sorted(group.arrays(), key=lambda kv: kv[0])
            if not members:
                raise ValueError("it holds no tensors")
        except Exception as err:
            found.append(
                Damage("map", f"maps/{key}", owner, f"cannot be opened ({type(err).__name__}: {err})", str(key))
            )
            continue
        sums = artifacts.map_checksums(store, str(key))
        have = dict(members)
        for name in sorted(set(sums) - set(have)):
            found.append(Damage("map", f"maps/{key}/{name}", owner, "tensor missing", str(key)))
        for name, array in members:
            path = f"maps/{key}/{name}"
            try:
                values = np.asarray(array[...])
            except Exception as err:
                found.append(
                    Damage("map", path, owner, f"chunk cannot be decoded ({type(err).__name__}: {err})", str(key))
                )
                continue
            if name in sums and tensor_checksum(values) != sums[name]:
                found.append(Damage("map", path, owner, "checksum mismatch", str(key)))
            elif np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                found.append(Damage("map", path, owner, "holds NaN/inf values", str(key)))
    return len(rows), found


def verify_store(store: Store) -> Report:
    """Read every committed shard, vector and map of ``store`` and report what is damaged."""
    n_shards, units = _unit_damage(store)
    n_vectors, vectors = _vector_damage(store)
    n_maps, maps = _map_damage(store)
    return Report(str(store.root), n_shards, n_vectors, n_maps, tuple(units + vectors + maps))


@dataclass(frozen=True)
class Invalidation:
    """What :func:`invalidate` removed from the commit records, and what it could not repair."""

    shards: tuple[tuple[str, tuple[int, ...]], ...]  # (unit_key, shards) now uncommitted
    rows_removed: int
    fits_reset: tuple[tuple[str, str, str], ...]  # (fit_key, source, target) no longer done
    vectors_removed: tuple[str, ...]
    maps_removed: tuple[str, ...]
    kept: tuple[tuple[Damage, str], ...]  # damage left as it is, and why


def invalidate(store: Store, report: Report) -> Invalidation:
    """Delete the commit records of everything damaged in ``report`` so the normal stages recompute it.

    Shards: see :meth:`Store.invalidate_shards` (status ``repair``; an unreadable array is
    recreated empty). Vectors: the damaged vector rows and their fit's ``fits`` row go, so
    ``safeport fit`` refits that pair (same inputs, same seed: same values). Maps: the map
    row and every fit that used it. A vector no fit of this store produced (an import) is
    kept, to be re-imported.
    """
    by_unit: dict[str, set[int]] = defaultdict(set)
    unreadable: set[str] = set()
    rows_removed = 0
    kept: list[tuple[Damage, str]] = []
    for d in report.damage:
        if d.kind == "shard" and d.shard is not None:
            by_unit[d.key].add(d.shard)
            if d.problem.startswith("array cannot be opened"):
                unreadable.add(d.key)
    for unit_key, shards in sorted(by_unit.items()):
        rows_removed += store.invalidate_shards(unit_key, sorted(shards))
    for unit_key in sorted(unreadable):
        store.reset_unit_array(unit_key)

    incomplete = sorted({d.key for d in report.damage if d.kind in ("unit", "record")})
    if incomplete:
        with store.transaction() as con:
            for unit_key in incomplete:
                n = con.execute(f"SELECT count(*) FROM ({_ORPHAN_ROWS}) WHERE unit_key = ?", [unit_key]).fetchall()[0][
                    0
                ]
                con.execute(
                    "DELETE FROM unit_rows r WHERE r.unit_key = ? AND NOT EXISTS ("
                    "SELECT 1 FROM shards s WHERE s.unit_key = r.unit_key AND s.shard = r.shard)",
                    [unit_key],
                )
                rows_removed += int(n)
                con.execute(
                    "UPDATE units SET status = ?, finished_at = NULL WHERE unit_key = ? AND status = 'done'",
                    [REPAIR_STATUS, unit_key],
                )

    fits = {r[0]: (r[1], r[2]) for r in store.fetchall("SELECT fit_key, source, target FROM fits")}
    reset: dict[str, tuple[str, str]] = {}
    vectors: list[str] = []
    maps: list[str] = []
    for d in report.damage:
        if d.kind == "vector":
            # A vector key can be an output of several fits (native:TARGET for two sources): reset them all.
            producers = [f for f in {d.fit_key, *_producers(store, "vector", d.key)} if f is not None and f in fits]
            if producers:
                vectors.append(d.key)
                reset.update({f: fits[f] for f in producers})
            else:
                kept.append((d, "no fit of this store produced it (imported?): import it again with `safeport import`"))
        elif d.kind == "map" and d.key not in maps:
            maps.append(d.key)
            users = store.fetchall("SELECT DISTINCT fit_key FROM vectors WHERE map_key = ?", [d.key])
            for fit_key in {str(u) for (u,) in users} | _producers(store, "map", d.key):
                if fit_key in fits:
                    reset[fit_key] = fits[fit_key]
    if vectors or maps or reset:
        with store.transaction() as con:
            for key in vectors:
                con.execute("DELETE FROM vectors WHERE vector_key = ?", [key])
            for key in maps:
                con.execute("DELETE FROM maps WHERE map_key = ?", [key])
                con.execute("DELETE FROM map_tensors WHERE map_key = ?", [key])
            for fit_key in reset:
                con.execute("DELETE FROM fits WHERE fit_key = ?", [fit_key])
    return Invalidation(
        tuple((u, tuple(sorted(s))) for u, s in sorted(by_unit.items())),
        rows_removed,
        tuple((k, s, t) for k, (s, t) in sorted(reset.items())),
        tuple(vectors),
        tuple(maps),
        tuple(kept),
    )


def _producers(store: Store, kind: str, key: str) -> set[str]:
    """The fits that list a map or vector among their outputs (none in a store opened read-only before migration)."""
    try:
        rows = store.fetchall("SELECT fit_key FROM fit_outputs WHERE kind = ? AND key = ?", [kind, key])
    except duckdb.CatalogException:
        return set()
    return {str(r[0]) for r in rows}


def units_to_resume(store: Store) -> list[UnitInfo]:
    """Units whose damaged shards were invalidated and are not recomputed yet (also after a crashed repair)."""
    keys = store.fetchall("SELECT unit_key FROM units WHERE status = ? ORDER BY array_path", [REPAIR_STATUS])
    return [u for (k,) in keys if (u := store.unit(k)) is not None]


def verify_path(root: Path | str) -> Report:
    """:func:`verify_store` on a store folder opened read-only (fails clearly while a writer holds it)."""
    with Store(root, read_only=True) as store:
        return verify_store(store)
