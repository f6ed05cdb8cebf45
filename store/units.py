"""Units of stored rows: what a unit is, how its shards are written, committed and read back.

A **unit** is the rows one computation produces for one model on one dataset: one pooled row per
text (kind ``pooled``) or token rows at one position (kind ``tokens``: several rows per text, each
with coordinates). Its texts are planned up front, in a fixed order, and cut into **shards** of
``shard_texts`` texts: the piece of work that is claimed, computed, written and committed as one.

Commit protocol (why a crash can neither lose nor duplicate rows):

1. a unit's text list (and, for layout ``array``, its empty array) is created in one transaction;
2. a shard's rows are written to the arrays: into the region the shard owns in the unit's array
   (layout ``array``: pooled rows, one chunk per shard) or as the shard's own array (layout
   ``shards``: token rows, whose count per text is known only once computed). The write is
   idempotent: after a crash it is simply written again;
3. only then one DuckDB transaction records the shard (where its rows are, their dtype and
   checksum) and its rows in the row index ``unit_rows``. Readers see rows through those records
   only, so a half-written array without a record is invisible and rewritten.

Rows are stored float32, or float16 where every value fits (:func:`storage_values`): a shard whose
values would overflow float16 is stored float32 and its record says so (``shards.dtype``).
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
import zarr.codecs
import zarr.errors

from safeport.keys import content_key
from safeport.store import location
from safeport.store.core import StoreCore
from safeport.store.db import StoreError

log = logging.getLogger("safeport.store")

POOLED, TOKENS = "pooled", "tokens"
ARRAY, SHARDS = "array", "shards"
FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_ROWS = 4096  # rows per Zarr chunk of a shard array (layout ``shards``): reads of a few MB
# The coordinates a token row carries in the row index (NULL for pooled rows).
COORDS = ("position", "step", "token", "stream", "seed")
_COORD_TYPES = {"position": pa.string(), "step": pa.int16(), "token": pa.int32(), "stream": pa.string()}

UNIT_COLUMNS = (
    "unit_key, model_key, dataset, array_path, n_texts, dim, shard_texts, status, kind, layout, position, dtype"
)


@dataclass(frozen=True)
class UnitInfo:
    """A unit's record. Texts are planned up front and cut into shards of ``shard_texts`` texts."""

    unit_key: str
    model_key: str
    dataset: str
    array_path: str
    n_texts: int
    dim: int
    shard_texts: int
    status: str
    kind: str = POOLED
    layout: str = ARRAY
    position: str | None = None
    dtype: str = "float32"

    @property
    def n_shards(self) -> int:
        return -(-self.n_texts // self.shard_texts)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The shard's texts (positions in the unit's text list); for layout ``array`` also its rows."""
        start = shard * self.shard_texts
        return start, min(start + self.shard_texts, self.n_texts)

    # Pooled units have one row per text: their row counts are their text counts.
    @property
    def n_rows(self) -> int:
        return self.n_texts

    @property
    def shard_rows(self) -> int:
        return self.shard_texts

    def shard_path(self, shard: int) -> str:
        """Where a shard's rows are: the unit's array (layout ``array``) or the shard's own array."""
        return self.array_path if self.layout == ARRAY else f"{self.array_path}/{shard}"


def checksum(values: np.ndarray, dtype: str = "float32") -> str:
    """sha256 of the C-ordered bytes in the stored dtype (what a reader recomputes to detect corruption)."""
    return content_key(np.ascontiguousarray(values, dtype=np.dtype(dtype)), 32)


def tensor_checksum(values: np.ndarray) -> str:
    """sha256 of a tensor's dtype, shape and C-ordered bytes (maps keep their own dtype)."""
    values = np.ascontiguousarray(values)
    head = f"{values.dtype.str}{values.shape}".encode()
    return content_key(head + values.tobytes(), 32)


def storage_values(values: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """``values`` in the unit's dtype: float16 only where every value fits, float32 otherwise.

    Why check: float16 turns anything beyond ±65,504 into ±inf, and a single huge activation
    (attention sinks, some DiT blocks) would then poison every statistic computed from the shard.
    """
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype=np.float32), "float32"
    if dtype != "float16":
        raise StoreError(f"unit dtype {dtype!r} is not stored; use float32 or float16")
    peak = float(np.abs(values).max()) if values.size else 0.0
    if not np.isfinite(peak) or peak > FLOAT16_MAX:
        return np.ascontiguousarray(values, dtype=np.float32), "float32"
    return np.ascontiguousarray(values, dtype=np.float16), "float16"


@dataclass(frozen=True)
class ShardDescriptor:
    """A written shard, small enough to send between processes: the commit step records it.

    Workers write the rows themselves (step 2 of the commit protocol) and return only this; the
    one DuckDB writer commits it (step 3). ``text_ids``, ``n_tokens`` and ``truncated`` have one
    entry per row; ``coords`` (token units) maps each of :data:`COORDS` to one value per row.
    """

    unit_key: str
    shard: int
    row_start: int
    row_stop: int
    checksum: str
    text_ids: tuple[str, ...]
    n_tokens: np.ndarray  # int, one per row
    truncated: np.ndarray  # bool, one per row
    array_path: str = ""
    dtype: str = "float32"
    coords: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(np.asarray(self.n_tokens, dtype=np.int64).sum())

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def _open_target(arrays: zarr.Group | str, path: str) -> Any:
    if isinstance(arrays, zarr.Group):
        return arrays[path]
    return location.ArrayLocation(arrays).open_array(path)


def _group_of(arrays: zarr.Group | str) -> zarr.Group:
    return arrays if isinstance(arrays, zarr.Group) else location.ArrayLocation(arrays).open_group("a")


def write_shard_array(
    arrays: zarr.Group | str,
    unit: UnitInfo,
    shard: int,
    text_ids: Sequence[str],
    values: np.ndarray,
    n_tokens: np.ndarray,
    truncated: np.ndarray,
    coords: Mapping[str, np.ndarray] | None = None,
) -> ShardDescriptor:
    """Step 2 of the commit protocol: write a shard's rows to the arrays; nothing is recorded.

    ``arrays`` is the store's open Zarr group, or its location (a path or fsspec URL) when called
    from a worker process that has no DuckDB connection. Pooled units (layout ``array``) take
    exactly one row per text of the shard; token units any number of rows, each with its text id
    and ``coords``.
    """
    start, stop = unit.shard_range(shard)
    n = len(text_ids)
    if unit.layout == ARRAY and (values.shape != (stop - start, unit.dim) or n != stop - start):
        raise StoreError(
            f"shard {shard} of unit {unit.unit_key} expects {stop - start} rows of dim {unit.dim}, "
            f"got values {values.shape} and {n} ids"
        )
    if values.ndim != 2 or values.shape != (n, unit.dim) or len(n_tokens) != n or len(truncated) != n:
        raise StoreError(
            f"shard {shard} of unit {unit.unit_key}: values {values.shape}, {n} text ids, {len(n_tokens)} token "
            f"counts and {len(truncated)} truncation flags must all describe the same rows of dim {unit.dim}"
        )
    coords = dict(coords or {})
    if unit.kind == TOKENS and (sorted(coords) != sorted(COORDS) or any(len(v) != n for v in coords.values())):
        raise StoreError(f"token rows of unit {unit.unit_key} need one value per row for each of {COORDS}")
    stored, dtype = storage_values(values, unit.dtype)
    if dtype != unit.dtype:
        log.warning(
            "shard %d of %s: values reach %.3g, beyond float16's range; stored as float32 (shards.dtype says so)",
            shard,
            unit.array_path,
            float(np.abs(values).max()),
        )
    path = unit.shard_path(shard)
    try:
        if unit.layout == ARRAY:
            _open_target(arrays, path)[start:stop, :] = stored
            row_start, row_stop = start, stop
        else:
            target = _group_of(arrays).create_array(
                path,
                shape=stored.shape,
                chunks=(max(1, min(n, CHUNK_ROWS)), unit.dim),
                dtype=dtype,
                compressors=zarr.codecs.ZstdCodec(level=3),
                fill_value=0,
                overwrite=True,
            )
            if n:
                target[...] = stored
            row_start, row_stop = 0, n
    except location.LocationError as err:
        raise StoreError(str(err)) from None
    except zarr.errors.NodeNotFoundError:
        where = arrays if isinstance(arrays, str) else "the store's arrays"
        raise StoreError(
            f"shard {shard}: array {unit.array_path} is not at {where}, where the flow process created it: "
            "workers must write where this process reads (the store folder on a shared filesystem, or an "
            "arrays: URL every worker reaches, not memory:// across processes); nothing of this shard was committed"
        ) from None
    except OSError as err:
        why = "the disk is full, free some space" if err.errno == errno.ENOSPC else "check the disk"
        raise StoreError(
            f"writing shard {shard} of {unit.array_path} failed: {err}. Nothing of this shard was "
            f"committed and committed shards are kept; {why} and rerun (work resumes)"
        ) from None
    return ShardDescriptor(
        unit.unit_key,
        shard,
        row_start,
        row_stop,
        checksum(stored, dtype),
        tuple(text_ids),
        np.asarray(n_tokens).astype(np.int32),
        np.asarray(truncated).astype(bool),
        path,
        dtype,
        {k: np.asarray(v) for k, v in coords.items()},
    )


@dataclass(frozen=True)
class ShardRecord:
    """A committed shard: where its rows are and what they must hash to."""

    shard: int
    array_path: str
    row_start: int
    row_stop: int
    dtype: str
    checksum: str


def _rows_table(unit: UnitInfo, desc: ShardDescriptor) -> pa.Table:
    n = desc.rows
    columns: dict[str, Any] = {
        "row": np.arange(desc.row_start, desc.row_stop, dtype=np.int32),
        "text_id": pa.array(list(desc.text_ids), pa.string()),
    }
    for name in COORDS:
        value = desc.coords.get(name)
        kind = _COORD_TYPES.get(name, pa.int64())
        columns[name] = pa.array([None] * n, kind) if value is None else pa.array(np.asarray(value).tolist(), kind)
    columns["n_tokens"] = np.asarray(desc.n_tokens).astype(np.int32)
    columns["truncated"] = np.asarray(desc.truncated).astype(bool)
    return pa.table(columns)


class UnitStore(StoreCore):
    """Units, shards and their rows: the part of :class:`safeport.store.store.Store` that holds activations."""

    # -- records -------------------------------------------------------------------------------
    def unit(self, unit_key: str) -> UnitInfo | None:
        row = self.one(f"SELECT {UNIT_COLUMNS} FROM units WHERE unit_key = ?", [unit_key])
        return None if row is None else UnitInfo(*row)

    def done_unit(self, model_key: str, dataset: str, dataset_hash: str) -> str | None:
        """The finished pooled unit of ``model_key`` on this version of ``dataset``, if any."""
        value = self.scalar(
            "SELECT unit_key FROM units WHERE model_key = ? AND dataset = ? AND dataset_hash = ? AND status = 'done' "
            "AND kind = 'pooled'",
            [model_key, dataset, dataset_hash],
        )
        return None if value is None else str(value)

    def unit_text_ids(self, unit_key: str) -> list[str]:
        rows = self.fetchall("SELECT text_id FROM unit_texts WHERE unit_key = ? ORDER BY row", [unit_key])
        return [r[0] for r in rows]

    def committed_shards(self, unit_key: str) -> set[int]:
        rows = self.fetchall("SELECT shard FROM shards WHERE unit_key = ?", [unit_key])
        return {int(r[0]) for r in rows}

    def shard_records(self, unit_key: str) -> dict[int, ShardRecord]:
        rows = self.fetchall(
            "SELECT shard, array_path, row_start, row_stop, dtype, checksum FROM shards WHERE unit_key = ?", [unit_key]
        )
        return {int(r[0]): ShardRecord(int(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]), str(r[5])) for r in rows}

    def create_unit(
        self,
        unit_key: str,
        model_key: str,
        dataset: str,
        dataset_hash: str,
        text_ids: Sequence[str],
        dim: int,
        shard_texts: int,
        kind: str = POOLED,
        position: str | None = None,
        spec: Mapping[str, Any] | None = None,
        dtype: str = "float32",
    ) -> UnitInfo:
        """Record a unit's text list (rows in this order) and, for pooled rows, create its empty array.

        Callers claim ``unit:<key>`` first, so two writers never plan the same unit; should one
        still find it recorded, the recorded unit wins and is returned.
        """
        if kind not in (POOLED, TOKENS):
            raise StoreError(f"unit kind {kind!r} is unknown; use {POOLED!r} or {TOKENS!r}")
        if dtype not in ("float32", "float16"):
            raise StoreError(f"unit dtype {dtype!r} is not stored; use float32 or float16")
        path = f"acts/{model_key}/{unit_key}"
        n = len(text_ids)
        existing = self.unit(unit_key)
        if existing is not None:
            return existing
        layout = ARRAY if kind == POOLED else SHARDS
        if layout == ARRAY:
            self._require_array(path, (n, dim), (shard_texts, dim), dtype)
        with self.transaction() as con:
            raced = self.unit(unit_key)  # recorded by another writer since the check above
            if raced is not None:
                return raced
            con.register("_ut", pa.table({"row": np.arange(n, dtype=np.int32), "text_id": list(text_ids)}))
            try:
                con.execute("INSERT INTO unit_texts SELECT ?, row, text_id FROM _ut", [unit_key])
            finally:
                con.unregister("_ut")
            con.execute(
                "INSERT INTO units (unit_key, model_key, dataset, dataset_hash, array_path, n_rows, dim, dtype, "
                "shard_rows, status, created_at, finished_at, kind, layout, position, spec_json, n_texts, shard_texts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', now(), NULL, ?, ?, ?, ?, ?, ?)",
                [
                    unit_key,
                    model_key,
                    dataset,
                    dataset_hash,
                    path,
                    n if layout == ARRAY else None,
                    dim,
                    dtype,
                    shard_texts,
                    kind,
                    layout,
                    position,
                    None if spec is None else json.dumps(spec, sort_keys=True),
                    n,
                    shard_texts,
                ],
            )
        return UnitInfo(
            unit_key, model_key, dataset, path, n, dim, shard_texts, "running", kind, layout, position, dtype
        )

    # -- arrays of pooled units ----------------------------------------------------------------
    def _require_array(
        self, path: str, shape: tuple[int, int], chunks: tuple[int, int], dtype: str = "float32"
    ) -> zarr.Array:
        arr = self._usable_array(path, shape, chunks)
        return arr if arr is not None else self._new_unit_array(path, shape, chunks, "create", dtype)

    def _usable_array(self, path: str, shape: tuple[int, int], chunks: tuple[int, int]) -> zarr.Array | None:
        """The array at ``path`` if it opens with this shape and chunking; None if missing, garbled or other."""
        try:
            arr = self.arrays[path]
        except Exception:  # missing (KeyError), or metadata a crash or a full disk left unparsable
            return None
        return arr if isinstance(arr, zarr.Array) and arr.shape == shape and arr.chunks == chunks else None

    def ensure_unit_array(self, unit: UnitInfo) -> None:
        """Before shards are written: recreate the unit's array if it is unusable and none of its shards is committed.

        Why: a repair can stop between invalidating the shards of an unreadable array and
        recreating it, or while recreating it (disk full); the unit is then left with no
        committed shard and no usable array, and the next resume must rebuild it, not crash.
        With committed shards the array is damage for ``verify --repair`` to handle. Units of
        layout ``shards`` have no unit array: each shard writes its own.
        """
        self._writable()
        if unit.layout != ARRAY:
            return
        shape, chunks = (unit.n_rows, unit.dim), (unit.shard_rows, unit.dim)
        if self._usable_array(unit.array_path, shape, chunks) is not None:
            return
        if self.committed_shards(unit.unit_key):
            raise StoreError(
                f"array {unit.array_path} of unit {unit.unit_key} is missing or cannot be opened but has committed "
                "shards; run `safeport verify --repair` to recompute them"
            )
        self._new_unit_array(unit.array_path, shape, chunks, "recreate", unit.dtype)

    def _new_unit_array(
        self, path: str, shape: tuple[int, int], chunks: tuple[int, int], verb: str, dtype: str = "float32"
    ) -> zarr.Array:
        """An empty NaN-filled unit array (zstd) of the unit's dtype, replacing whatever was at ``path``."""
        try:
            return self.arrays.create_array(
                path,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                compressors=zarr.codecs.ZstdCodec(level=3),
                fill_value=np.nan,
                overwrite=True,
            )
        except OSError as err:
            raise StoreError(f"cannot {verb} array {path} in {self.location}: {err}") from None

    def reset_unit_array(self, unit_key: str) -> None:
        """Recreate a unit's empty array (its metadata was damaged); call after invalidating all its shards."""
        self._writable()
        unit = self.unit(unit_key)
        if unit is None:
            raise StoreError(f"unit {unit_key} is not recorded; nothing to reset")
        if self.committed_shards(unit_key):
            raise StoreError(f"unit {unit_key} still has committed shards; invalidate them before resetting its array")
        if unit.layout == ARRAY:
            shape, chunks = (unit.n_rows, unit.dim), (unit.shard_rows, unit.dim)
            self._new_unit_array(unit.array_path, shape, chunks, "recreate", unit.dtype)

    # -- committing ----------------------------------------------------------------------------
    def write_shard(
        self,
        unit: UnitInfo,
        shard: int,
        text_ids: Sequence[str],
        values: np.ndarray,
        n_tokens: np.ndarray,
        truncated: np.ndarray,
        coords: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write one shard's rows, then commit its record; see the module docstring."""
        self._writable()
        desc = write_shard_array(self.arrays, unit, shard, text_ids, values, n_tokens, truncated, coords)
        self.commit_shard(unit, desc)

    def commit_shard(self, unit: UnitInfo, desc: ShardDescriptor, verify: bool = False) -> None:
        """Step 3 of the commit protocol for a shard whose rows are already written.

        ``verify`` re-reads the rows and checks the checksum: a shard written by another process
        (a Dask worker) must be visible here before it is recorded, or a worker writing to its
        own private disk would commit rows nobody can read.
        """
        expected = unit.shard_range(desc.shard) if unit.layout == ARRAY else (0, desc.rows)
        if desc.unit_key != unit.unit_key or (desc.row_start, desc.row_stop) != expected:
            raise StoreError(
                f"shard descriptor {desc.unit_key}/{desc.shard} rows {desc.row_start}-{desc.row_stop} does not "
                f"belong to unit {unit.unit_key} (rows {expected}); rerun the extraction"
            )
        path = desc.array_path or unit.shard_path(desc.shard)
        record = ShardRecord(desc.shard, path, desc.row_start, desc.row_stop, desc.dtype, desc.checksum)
        if verify and checksum(self._read_record(unit, record), desc.dtype) != desc.checksum:
            raise StoreError(
                f"shard {desc.shard} of {unit.array_path} was written by a worker but the store's arrays at "
                f"{self.location} hold different data: workers must write where this process reads (the "
                "store folder on a shared filesystem, or an arrays: URL every worker reaches, not memory:// "
                "across processes); nothing of this shard was committed, rerun once the arrays are shared"
            )
        rows = _rows_table(unit, desc)
        with self.transaction() as con:
            have = con.execute(
                "SELECT checksum FROM shards WHERE unit_key = ? AND shard = ?", [unit.unit_key, desc.shard]
            ).fetchall()
            if have:  # committed by another writer meanwhile: keep its record
                if have[0][0] != desc.checksum:
                    log.warning(
                        "shard %d of %s was committed by another writer with checksum %s, this one computed %s",
                        desc.shard,
                        unit.array_path,
                        have[0][0],
                        desc.checksum,
                    )
                return
            con.execute(
                "INSERT INTO shards (unit_key, shard, row_start, row_stop, checksum, tokens, committed_at, array_path, "
                "dtype) VALUES (?, ?, ?, ?, ?, ?, now(), ?, ?)",
                (
                    unit.unit_key,
                    desc.shard,
                    desc.row_start,
                    desc.row_stop,
                    desc.checksum,
                    desc.tokens,
                    path,
                    desc.dtype,
                ),
            )
            con.register("_rows", rows)
            try:
                con.execute(
                    "INSERT INTO unit_rows SELECT ?, ?, row, text_id, position, step, token, stream, seed, n_tokens, "
                    "truncated FROM _rows",
                    [unit.unit_key, desc.shard],
                )
            finally:
                con.unregister("_rows")

    def finish_unit(self, unit_key: str) -> bool:
        """Mark the unit done if every one of its shards is committed (by whichever writer); returns whether it is.

        A unit of layout ``shards`` learns its row count here (the sum of its shards' rows).
        """
        with self.transaction() as con:
            con.execute(
                "UPDATE units SET status = 'done', finished_at = now(), n_rows = coalesce(n_rows, "
                "(SELECT sum(s.row_stop - s.row_start) FROM shards s WHERE s.unit_key = units.unit_key)) "
                "WHERE unit_key = ? AND status <> 'done' "
                "AND (SELECT count(*) FROM shards s WHERE s.unit_key = units.unit_key) = "
                "(n_texts + shard_texts - 1) // shard_texts",
                [unit_key],
            )
            return bool(
                con.execute("SELECT 1 FROM units WHERE unit_key = ? AND status = 'done'", [unit_key]).fetchall()
            )

    def invalidate_shards(self, unit_key: str, shards: Sequence[int]) -> int:
        """Forget committed shards (damaged on disk) so the unit's normal resume recomputes exactly them.

        One transaction deletes each shard's record and its rows in the row index and sets the
        unit's status to ``repair`` (not ``done``, so extraction resumes it; the unit keeps its
        text list, so the same texts land in the same rows). Returns the number of rows removed.
        """
        if self.unit(unit_key) is None:
            raise StoreError(f"unit {unit_key} is not recorded; nothing to invalidate")
        removed = 0
        with self.transaction() as con:
            for shard in sorted({int(s) for s in shards}):
                before = con.execute(
                    "SELECT count(*) FROM unit_rows WHERE unit_key = ? AND shard = ?", [unit_key, shard]
                ).fetchall()[0][0]
                con.execute("DELETE FROM unit_rows WHERE unit_key = ? AND shard = ?", [unit_key, shard])
                con.execute("DELETE FROM shards WHERE unit_key = ? AND shard = ?", [unit_key, shard])
                removed += int(before)
            con.execute("UPDATE units SET status = 'repair', finished_at = NULL WHERE unit_key = ?", [unit_key])
        return removed

    # -- reading -------------------------------------------------------------------------------
    def _read_record(self, unit: UnitInfo, record: ShardRecord) -> np.ndarray:
        """A shard's rows in their stored dtype, unverified; a damaged array is a StoreError naming it.

        Decoding errors of a truncated or garbled chunk (zstd, zarr metadata) would otherwise
        surface as a bare RuntimeError without saying which array is damaged.
        """
        try:
            arr = self.arrays[record.array_path]
            return np.asarray(arr[record.row_start : record.row_stop, :])  # type: ignore[index]
        except Exception as err:  # any decoding failure means damaged data
            raise StoreError(
                f"array {record.array_path} shard {record.shard} (rows {record.row_start}-{record.row_stop}) of unit "
                f"{unit.unit_key} cannot be read ({type(err).__name__}: {err}): the data on disk is damaged. Run "
                "`safeport verify --repair`"
            ) from None

    def read_shard(self, unit: UnitInfo, shard: int, record: ShardRecord | None = None) -> np.ndarray:
        """One shard's rows as float32, unverified (pooled units need no record: their layout says where)."""
        if record is None:
            if unit.layout == ARRAY:
                start, stop = unit.shard_range(shard)
                record = ShardRecord(shard, unit.array_path, start, stop, "float32", "")
            else:
                found = self.shard_records(unit.unit_key).get(shard)
                if found is None:
                    raise StoreError(f"shard {shard} of {unit.array_path} is not committed")
                record = found
        return np.asarray(self._read_record(unit, record), dtype=np.float32)

    def verified_shard(self, unit: UnitInfo, record: ShardRecord) -> np.ndarray:
        """One committed shard's rows as float32, checked against its recorded checksum."""
        block = self._read_record(unit, record)
        if checksum(block, record.dtype) != record.checksum:
            raise StoreError(
                f"array {record.array_path} shard {record.shard} (rows {record.row_start}-{record.row_stop}) fails its "
                "checksum: the data on disk is damaged. Run `safeport verify --repair`"
            )
        return np.asarray(block, dtype=np.float32)

    def read_rows(self, selection: pa.Table, verify: bool = True) -> np.ndarray:
        """Values for rows listed in ``selection`` (columns unit_key, row, and shard unless pooled), in that order.

        Reads whole shards and, with ``verify``, checks each against its committed checksum so
        corruption cannot pass silently. Everything selected is held at once: for a stream of
        batches with bounded memory use :meth:`batches`.
        """
        keys = np.asarray(selection.column("unit_key").to_pylist(), dtype=object)
        rows = np.asarray(selection.column("row").to_pylist(), dtype=np.int64)
        has_shard = "shard" in selection.column_names
        shards_of = np.asarray(selection.column("shard").to_pylist(), dtype=np.int64) if has_shard else None
        if not len(keys):
            return np.zeros((0, 0), dtype=np.float32)
        wanted = list(dict.fromkeys(keys.tolist()))
        with self.reading():  # metadata in one short block; the arrays are read after it
            units = {key: self.unit(key) for key in wanted}
            records = {key: self.shard_records(key) for key in wanted}
        out: np.ndarray | None = None
        for key in wanted:
            unit = units[key]
            if unit is None:
                raise StoreError(f"unit {key} is referenced but not recorded; run `safeport verify`")
            if out is None:
                out = np.empty((len(keys), unit.dim), dtype=np.float32)
            mine = np.flatnonzero(keys == key)
            if shards_of is not None:
                shard_of = shards_of[mine]
            elif unit.layout == ARRAY:
                shard_of = rows[mine] // unit.shard_rows
            else:
                raise StoreError(f"rows of unit {key} (layout {unit.layout}) are selected by (shard, row); add shard")
            for shard in np.unique(shard_of):
                record = records[key].get(int(shard))
                if record is None:
                    raise StoreError(f"shard {shard} of {unit.array_path} is not committed")
                block = self.verified_shard(unit, record) if verify else self.read_shard(unit, int(shard), record)
                sel = mine[shard_of == shard]
                out[sel] = block[rows[sel] - record.row_start]
        if out is None:  # pragma: no cover
            raise StoreError("no rows selected")
        return out

    def activations(
        self, model: str, dataset: str, where: str = "", params: Sequence[Any] = (), verify: bool = True
    ) -> tuple[pa.Table, np.ndarray]:
        """(metadata, values) of ``model`` (name or key) on ``dataset`` in dataset order (pooled rows).

        ``where`` is an extra SQL filter over the ``activations`` view, e.g.
        ``"split = 'train' AND side = 'safe'"``.
        """
        meta = self.sql(
            f"SELECT * FROM activations WHERE (model_key = ? OR (model = ? AND current)) AND dataset = ? "
            f"{'AND (' + where + ')' if where else ''} ORDER BY idx",
            [model, model, dataset, *params],
        )
        return meta, self.read_rows(meta, verify=verify)
