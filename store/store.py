"""The activation store: Zarr v3 arrays for rows, DuckDB for everything else.

Commit protocol (why a crash can neither lose nor duplicate rows):
1. a work unit's text list and its empty array are created in one transaction;
2. each shard's rows are written to the array region the shard owns
   (idempotent: a rewrite after a crash overwrites the same chunk);
3. only then one DuckDB transaction records the shard, its checksum and its
   ``activation_rows``. Readers see rows through those records only, so a
   half-written chunk without a record is invisible and simply rewritten.

One process writes (guarded by a file lock); readers open DuckDB read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import zarr
import zarr.codecs
import zarr.errors

from safeport.store import location
from safeport.store.migrate import migrate
from safeport.store.schema import SCHEMA

SCHEMA_VERSION = 1

log = logging.getLogger("safeport.store")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock."""


@dataclass(frozen=True)
class UnitInfo:
    unit_key: str
    model_key: str
    dataset: str
    array_path: str
    n_rows: int
    dim: int
    shard_rows: int
    status: str

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)


def checksum(values: np.ndarray) -> str:
    """sha256 of the C-ordered float32 bytes (what a reader recomputes to detect corruption)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()[:32]


def tensor_checksum(values: np.ndarray) -> str:
    """sha256 of a tensor's dtype, shape and C-ordered bytes (maps keep their own dtype)."""
    values = np.ascontiguousarray(values)
    head = f"{values.dtype.str}{values.shape}".encode()
    return hashlib.sha256(head + values.tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class ShardDescriptor:
    """A written shard, small enough to send between processes: the commit step records it.

    Workers write the rows themselves (step 2 of the commit protocol) and return
    only this; the one DuckDB writer commits it (step 3).
    """

    unit_key: str
    shard: int
    row_start: int
    row_stop: int
    checksum: str
    text_ids: tuple[str, ...]
    n_tokens: np.ndarray  # int, one per row
    truncated: np.ndarray  # bool, one per row

    @property
    def tokens(self) -> int:
        return int(np.asarray(self.n_tokens, dtype=np.int64).sum())


def write_shard_array(
    arrays: zarr.Group | str,
    unit: UnitInfo,
    shard: int,
    text_ids: Sequence[str],
    values: np.ndarray,
    n_tokens: np.ndarray,
    truncated: np.ndarray,
) -> ShardDescriptor:
    """Step 2 of the commit protocol: write a shard's region of its unit array; nothing is recorded.

    ``arrays`` is the store's open Zarr group, or its location (a path or fsspec
    URL) when called from a worker process that has no DuckDB connection.
    """
    start, stop = unit.shard_range(shard)
    if values.shape != (stop - start, unit.dim) or len(text_ids) != stop - start:
        raise StoreError(
            f"shard {shard} of unit {unit.unit_key} expects {stop - start} rows of dim {unit.dim}, "
            f"got values {values.shape} and {len(text_ids)} ids"
        )
    values = np.ascontiguousarray(values, dtype=np.float32)
    try:
        if isinstance(arrays, zarr.Group):
            target = arrays[unit.array_path]
        else:
            target = location.ArrayLocation(arrays).open_array(unit.array_path)
        target[start:stop, :] = values  # type: ignore[index]
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
        start,
        stop,
        checksum(values),
        tuple(text_ids),
        np.asarray(n_tokens).astype(np.int32),
        np.asarray(truncated).astype(bool),
    )


@contextlib.contextmanager
def writer_lock(root: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Exclusive advisory lock: one writer per store, released on exit or process death."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "writer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
                    raise StoreBusyError(
                        f"store {root} is being written by another safeport process ({holder}); "
                        "wait for it to finish, or pass --wait SECONDS to queue behind it"
                    ) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Store:
    """Handle on one store: ``meta.duckdb`` in its folder + its Zarr arrays (``arrays.zarr`` there, or a URL).

    ``arrays`` is where the arrays should be (an absolute path or fsspec URL, see
    :mod:`safeport.store.location`); None means wherever the store recorded them, the
    store folder for a new store. A store keeps one arrays location for life: the
    location is recorded in ``meta`` and the arrays group carries the store's id,
    so a catalog pointing elsewhere, or two stores sharing one location, is refused
    by name instead of mixing data.
    """

    def __init__(self, root: Path | str, read_only: bool = False, arrays: str | None = None) -> None:
        self.root = Path(root)
        self.read_only = read_only
        db = self.root / "meta.duckdb"
        if read_only and not db.exists():
            raise StoreError(f"no store at {self.root}; run `safeport extract` (or `safeport run`) first")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(db), read_only=read_only)
        except duckdb.IOException as err:
            raise StoreBusyError(
                f"store {self.root} is open for writing by another process ({err}); read it when that run has finished"
            ) from None
        try:
            if not read_only:
                self.con.execute(SCHEMA)
                self.con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
                with self.transaction() as con:  # an older store is brought up to date here, in place
                    for step in migrate(con):
                        log.info("store %s migrated: %s", self.root, step)
                self._record_identity(arrays)
            self.location = self._location(arrays)
            self.arrays = self._open_arrays()
        except BaseException:  # a refused open holds nothing: the next open in this process must work
            self.close()
            raise

    def _record_identity(self, arrays: str | None) -> None:
        """First writer open: record the store id and its arrays location (the folder for pre-existing data)."""
        recorded = self.scalar("SELECT value FROM meta WHERE key = 'arrays'")
        if recorded is None:
            used = bool(self.scalar("SELECT count(*) FROM units")) or (self.root / location.DEFAULT).exists()
            self.con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('arrays', ?)",
                [location.DEFAULT if used or arrays is None or arrays == self._local_default() else arrays],
            )
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", [uuid.uuid4().hex])

    def _local_default(self) -> str:
        return location.resolve(location.DEFAULT, self.root)

    def _location(self, wanted: str | None) -> location.ArrayLocation:
        recorded = self.scalar("SELECT value FROM meta WHERE key = 'arrays'")
        have = location.resolve(str(recorded), self.root) if recorded is not None else self._local_default()
        if wanted is not None and wanted != have:
            raise StoreError(
                f"store {self.root} keeps its arrays at {have}, but {wanted} was asked for. A store keeps one "
                f"arrays location: set `arrays: {have}` in the profile (or remove the setting if it is the "
                f"store folder), or use a new store folder for {wanted}"
            )
        return location.ArrayLocation(have)

    def _open_arrays(self) -> zarr.Group:
        """Open the arrays group and check it belongs to this store (claiming it on first write)."""
        url = self.location.url
        store_id = self.scalar("SELECT value FROM meta WHERE key = 'store_id'")
        try:
            group = self.location.open_group("r" if self.read_only else "a")
            owner = group.attrs.get("safeport_store")
            members = next(iter(group.group_keys()), None) is not None  # acts/, maps/, vectors/
        except location.LocationError as err:
            raise StoreError(str(err)) from None
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            group, owner, members = None, None, False
        except Exception as err:  # network, permissions, a missing bucket: say where and why
            raise StoreError(
                f"cannot open the arrays of store {self.root} at {url} ({type(err).__name__}: {err}); check the "
                "location and its credentials (fsspec reads them from the environment)"
            ) from None
        if owner is not None and store_id is not None and owner != store_id:
            raise StoreError(
                f"arrays location {url} belongs to another store (id {owner}), not to {self.root} (id {store_id}); "
                "give each store its own arrays location"
            )
        if not members and self.scalar("SELECT count(*) FROM shards"):
            why = (
                f"store {self.root} records committed shards, but its arrays location {url} holds no arrays "
                "(memory:// lives only in the process that wrote it; a bucket or mount may be missing or empty)"
            )
            if self.read_only or group is None:
                raise StoreError(f"{why}; run `safeport verify --repair` to recompute them")
            log.warning("%s; reads will fail until `safeport verify --repair` recomputes them", why)
        if group is None:
            raise StoreError(f"store {self.root} has no arrays at {url}; run `safeport extract` first")
        if owner is None and store_id is not None and not self.read_only:
            group.attrs["safeport_store"] = store_id
        return group

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        """Close DuckDB and drop the handle, so a traceback that keeps this Store alive keeps no
        DuckDB object alive past interpreter shutdown."""
        con = self.__dict__.pop("con", None)
        if con is not None:
            con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._writable()
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        try:
            self.con.execute("COMMIT")
        except duckdb.Error as err:
            # A failed COMMIT (disk full, I/O error) must not leave the transaction open: later
            # statements would otherwise join it and could commit half of this step.
            with contextlib.suppress(duckdb.Error):
                self.con.execute("ROLLBACK")
            raise StoreError(
                f"committing to {self.root / 'meta.duckdb'} failed: {err}. Nothing of this step was recorded and "
                "earlier commits are intact; if the disk is full free some space, then rerun (work resumes)"
            ) from None

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError("this store handle is read-only")

    # -- queries -----------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        return self.con.sql(query, params=list(params or [])).to_arrow_table()

    def scalar(self, query: str, params: Sequence[Any] | None = None) -> Any:
        row = self.one(query, params)
        return None if row is None else row[0]

    def one(self, query: str, params: Sequence[Any] | None = None) -> tuple[Any, ...] | None:
        """First row or None; the whole result is consumed (DuckDB 2 refuses a half-read cursor)."""
        rows = self.con.execute(query, params or []).fetchall()
        return tuple(rows[0]) if rows else None

    # -- models and datasets ----------------------------------------------
    def register_model(self, model_key: str, name: str, role: str, spec: dict[str, Any], dim: int) -> None:
        with self.transaction() as con:
            con.execute("UPDATE models SET current = false WHERE name = ? AND model_key <> ?", [name, model_key])
            con.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now(), true)",
                [
                    model_key,
                    name,
                    role,
                    spec["family"],
                    spec["model_id"],
                    spec["revision"],
                    spec["weights"],
                    json.dumps(spec, sort_keys=True),
                    dim,
                ],
            )

    def model_dim(self, model_key: str) -> int | None:
        dim = self.scalar("SELECT dim FROM models WHERE model_key = ?", [model_key])
        return None if dim is None else int(dim)

    def dataset_hash(self, dataset: str) -> str | None:
        value = self.scalar("SELECT content_hash FROM datasets WHERE dataset = ?", [dataset])
        return None if value is None else str(value)

    def register_dataset(
        self, name: str, kind: str, content_hash: str, rows: pa.Table, report: Mapping[str, Any]
    ) -> bool:
        """Replace a dataset's rows if its content changed; returns False when its rows did not change.

        ``rows`` columns: idx, text_id, text, split, category, pair_id, side. Texts are
        kept forever (activations refer to them); only the dataset's membership changes.
        Same rows with a new report (the files moved, a format changed) update only the report.
        """
        report_json = json.dumps(report, sort_keys=True)
        if self.dataset_hash(name) == content_hash:
            if self.scalar("SELECT report_json FROM datasets WHERE dataset = ?", [name]) != report_json:
                with self.transaction() as con:
                    con.execute("UPDATE datasets SET report_json = ? WHERE dataset = ?", [report_json, name])
            return False
        with self.transaction() as con:
            con.register("_incoming", rows)
            con.execute("INSERT OR IGNORE INTO texts SELECT DISTINCT text_id, text, length(text) FROM _incoming")
            con.execute("DELETE FROM dataset_texts WHERE dataset = ?", [name])
            con.execute(
                "INSERT INTO dataset_texts SELECT ?, idx, text_id, split, category, pair_id, side FROM _incoming",
                [name],
            )
            con.execute(
                "INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?, now())",
                [name, kind, content_hash, rows.num_rows, report_json],
            )
            con.unregister("_incoming")
        return True

    def missing_texts(self, model_key: str, dataset: str) -> list[str]:
        """Text ids of ``dataset`` with no committed row for ``model_key``, sorted (deterministic)."""
        rows = self.con.execute(
            """SELECT DISTINCT dt.text_id FROM dataset_texts dt
               WHERE dt.dataset = ? AND NOT EXISTS (
                   SELECT 1 FROM activation_rows a WHERE a.model_key = ? AND a.text_id = dt.text_id)
               ORDER BY dt.text_id""",
            [dataset, model_key],
        ).fetchall()
        return [r[0] for r in rows]

    def texts(self, text_ids: Sequence[str]) -> list[str]:
        """Texts for ids, in the given order."""
        tbl = pa.table({"text_id": list(text_ids), "pos": np.arange(len(text_ids))})
        self.con.register("_ids", tbl)
        try:
            rows = self.con.execute("SELECT t.text FROM _ids i JOIN texts t USING (text_id) ORDER BY i.pos").fetchall()
        finally:
            self.con.unregister("_ids")
        if len(rows) != len(text_ids):
            raise StoreError(f"{len(text_ids) - len(rows)} text id(s) are not in the store's texts table")
        return [r[0] for r in rows]

    # -- work units ----------------------------------------------------------
    def unit(self, unit_key: str) -> UnitInfo | None:
        row = self.one(
            "SELECT unit_key, model_key, dataset, array_path, n_rows, dim, shard_rows, status "
            "FROM units WHERE unit_key = ?",
            [unit_key],
        )
        return None if row is None else UnitInfo(*row)

    def create_unit(
        self,
        unit_key: str,
        model_key: str,
        dataset: str,
        dataset_hash: str,
        text_ids: Sequence[str],
        dim: int,
        shard_rows: int,
    ) -> UnitInfo:
        """Create the unit's array and record its text list (rows in this order) atomically."""
        path = f"acts/{model_key}/{unit_key}"
        n = len(text_ids)
        self._require_array(path, (n, dim), (shard_rows, dim))
        with self.transaction() as con:
            con.register("_ut", pa.table({"row": np.arange(n, dtype=np.int32), "text_id": list(text_ids)}))
            con.execute("INSERT INTO unit_texts SELECT ?, row, text_id FROM _ut", [unit_key])
            con.unregister("_ut")
            con.execute(
                "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, 'float32', ?, 'running', now(), NULL)",
                [unit_key, model_key, dataset, dataset_hash, path, n, dim, shard_rows],
            )
        info = self.unit(unit_key)
        if info is None:  # pragma: no cover - the transaction above just inserted it
            raise StoreError(f"unit {unit_key} vanished after creation")
        return info

    def _require_array(self, path: str, shape: tuple[int, int], chunks: tuple[int, int]) -> zarr.Array:
        arr = self._usable_array(path, shape, chunks)
        return arr if arr is not None else self._new_unit_array(path, shape, chunks, "create")

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
        With committed shards the array is damage for ``verify --repair`` to handle.
        """
        self._writable()
        shape, chunks = (unit.n_rows, unit.dim), (unit.shard_rows, unit.dim)
        if self._usable_array(unit.array_path, shape, chunks) is not None:
            return
        if self.committed_shards(unit.unit_key):
            raise StoreError(
                f"array {unit.array_path} of unit {unit.unit_key} is missing or cannot be opened but has committed "
                "shards; run `safeport verify --repair` to recompute them"
            )
        self._new_unit_array(unit.array_path, shape, chunks, "recreate")

    def _new_unit_array(self, path: str, shape: tuple[int, int], chunks: tuple[int, int], verb: str) -> zarr.Array:
        """An empty NaN-filled float32 unit array (zstd), replacing whatever was at ``path``."""
        try:
            return self.arrays.create_array(
                path,
                shape=shape,
                chunks=chunks,
                dtype="float32",
                compressors=zarr.codecs.ZstdCodec(level=3),
                fill_value=np.nan,
                overwrite=True,
            )
        except OSError as err:
            raise StoreError(f"cannot {verb} array {path} in {self.location}: {err}") from None

    def unit_text_ids(self, unit_key: str) -> list[str]:
        rows = self.con.execute("SELECT text_id FROM unit_texts WHERE unit_key = ? ORDER BY row", [unit_key]).fetchall()
        return [r[0] for r in rows]

    def committed_shards(self, unit_key: str) -> set[int]:
        rows = self.con.execute("SELECT shard FROM shards WHERE unit_key = ?", [unit_key]).fetchall()
        return {int(r[0]) for r in rows}

    def write_shard(
        self,
        unit: UnitInfo,
        shard: int,
        text_ids: Sequence[str],
        values: np.ndarray,
        n_tokens: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        """Write one shard's rows, then commit its record; see the module docstring."""
        self._writable()
        self.commit_shard(unit, write_shard_array(self.arrays, unit, shard, text_ids, values, n_tokens, truncated))

    def commit_shard(self, unit: UnitInfo, desc: ShardDescriptor, verify: bool = False) -> None:
        """Step 3 of the commit protocol for a shard whose array region is already written.

        ``verify`` re-reads the region and checks the checksum: a shard written by
        another process (a Dask worker) must be visible here before it is recorded,
        or a worker writing to its own private disk would commit rows nobody can read.
        """
        if desc.unit_key != unit.unit_key or (desc.row_start, desc.row_stop) != unit.shard_range(desc.shard):
            raise StoreError(
                f"shard descriptor {desc.unit_key}/{desc.shard} rows {desc.row_start}-{desc.row_stop} does not "
                f"belong to unit {unit.unit_key} (rows {unit.shard_range(desc.shard)}); rerun the extraction"
            )
        if verify:
            block = self.read_shard(unit, desc.shard)
            if checksum(block) != desc.checksum:
                raise StoreError(
                    f"shard {desc.shard} of {unit.array_path} was written by a worker but the store's arrays at "
                    f"{self.location} hold different data: workers must write where this process reads (the "
                    "store folder on a shared filesystem, or an arrays: URL every worker reaches, not memory:// "
                    "across processes); nothing of this shard was committed, rerun once the arrays are shared"
                )
        tbl = pa.table(
            {
                "text_id": list(desc.text_ids),
                "row": np.arange(desc.row_start, desc.row_stop, dtype=np.int32),
                "n_tokens": np.asarray(desc.n_tokens).astype(np.int32),
                "truncated": np.asarray(desc.truncated).astype(bool),
            }
        )
        with self.transaction() as con:
            con.execute(
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, now())",
                [unit.unit_key, desc.shard, desc.row_start, desc.row_stop, desc.checksum, desc.tokens],
            )
            con.register("_rows", tbl)
            con.execute(
                "INSERT OR IGNORE INTO activation_rows SELECT ?, text_id, ?, row, n_tokens, truncated FROM _rows",
                [unit.model_key, unit.unit_key],
            )
            con.unregister("_rows")

    def finish_unit(self, unit_key: str) -> None:
        with self.transaction() as con:
            con.execute("UPDATE units SET status = 'done', finished_at = now() WHERE unit_key = ?", [unit_key])

    def invalidate_shards(self, unit_key: str, shards: Sequence[int]) -> int:
        """Forget committed shards (damaged on disk) so the unit's normal resume recomputes exactly them.

        One transaction deletes each shard's record and its ``activation_rows`` and sets the
        unit's status to ``repair`` (not ``done``, so extraction resumes it; the unit keeps its
        text list, so the same texts land in the same rows). Returns the number of rows removed.
        """
        unit = self.unit(unit_key)
        if unit is None:
            raise StoreError(f"unit {unit_key} is not recorded; nothing to invalidate")
        removed = 0
        with self.transaction() as con:
            for shard in sorted(set(shards)):
                start, stop = unit.shard_range(int(shard))
                before = con.execute(
                    "SELECT count(*) FROM activation_rows WHERE unit_key = ? AND row >= ? AND row < ?",
                    [unit_key, start, stop],
                ).fetchall()[0][0]
                con.execute(
                    "DELETE FROM activation_rows WHERE unit_key = ? AND row >= ? AND row < ?", [unit_key, start, stop]
                )
                con.execute("DELETE FROM shards WHERE unit_key = ? AND shard = ?", [unit_key, int(shard)])
                removed += int(before)
            con.execute("UPDATE units SET status = 'repair', finished_at = NULL WHERE unit_key = ?", [unit_key])
        return removed

    def reset_unit_array(self, unit_key: str) -> None:
        """Recreate a unit's empty array (its metadata was damaged); call after invalidating all its shards."""
        self._writable()
        unit = self.unit(unit_key)
        if unit is None:
            raise StoreError(f"unit {unit_key} is not recorded; nothing to reset")
        if self.committed_shards(unit_key):
            raise StoreError(f"unit {unit_key} still has committed shards; invalidate them before resetting its array")
        self._new_unit_array(unit.array_path, (unit.n_rows, unit.dim), (unit.shard_rows, unit.dim), "recreate")

    def done_unit(self, model_key: str, dataset: str, dataset_hash: str) -> str | None:
        value = self.scalar(
            "SELECT unit_key FROM units WHERE model_key = ? AND dataset = ? AND dataset_hash = ? AND status = 'done'",
            [model_key, dataset, dataset_hash],
        )
        return None if value is None else str(value)

    # -- runs ----------------------------------------------------------------
    def record_run(
        self,
        run_id: str,
        flow: str,
        task: str,
        model: str,
        dataset: str,
        unit_key: str | None,
        status: str,
        rows: int,
        tokens: int,
        seconds: float,
        started: float,
        message: str = "",
    ) -> None:
        with self.transaction() as con:
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?), now(), ?)",
                [
                    run_id,
                    flow,
                    task,
                    model,
                    dataset,
                    unit_key,
                    status,
                    rows,
                    tokens,
                    seconds,
                    started,
                    message,
                ],
            )

    # -- reading rows ------------------------------------------------------------
    def read_shard(self, unit: UnitInfo, shard: int) -> np.ndarray:
        """One shard's rows as stored, unverified; a damaged array or chunk is a StoreError naming it.

        Decoding errors of a truncated or garbled chunk (zstd, zarr metadata) would otherwise
        surface as a bare RuntimeError without saying which array is damaged.
        """
        start, stop = unit.shard_range(shard)
        try:
            arr = self.arrays[unit.array_path]
            return np.asarray(arr[start:stop, :], dtype=np.float32)  # type: ignore[index]
        except Exception as err:  # any decoding failure means damaged data
            raise StoreError(
                f"array {unit.array_path} shard {shard} (rows {start}-{stop}) cannot be read "
                f"({type(err).__name__}: {err}): the data on disk is damaged. Run `safeport verify --repair`"
            ) from None

    def read_rows(self, selection: pa.Table, verify: bool = True) -> np.ndarray:
        """Values for rows listed in ``selection`` (columns unit_key, row), in that order.

        Reads whole shards (a shard is one chunk) and, with ``verify``, checks
        each against its committed checksum so corruption cannot pass silently.
        """
        keys = selection.column("unit_key").to_pylist()
        rows = np.asarray(selection.column("row").to_pylist(), dtype=np.int64)
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        out: np.ndarray | None = None
        for key in dict.fromkeys(keys):
            unit = self.unit(key)
            if unit is None:
                raise StoreError(f"unit {key} is referenced but not recorded; run `safeport verify`")
            if out is None:
                out = np.empty((len(keys), unit.dim), dtype=np.float32)
            mine = np.flatnonzero(np.asarray(keys) == key)
            sums = dict(self.con.execute("SELECT shard, checksum FROM shards WHERE unit_key = ?", [key]).fetchall())
            for shard in np.unique(rows[mine] // unit.shard_rows):
                start, stop = unit.shard_range(int(shard))
                if int(shard) not in sums:
                    raise StoreError(f"shard {shard} of {unit.array_path} is not committed")
                block = self.read_shard(unit, int(shard))
                if verify and checksum(block) != sums[int(shard)]:
                    raise StoreError(
                        f"array {unit.array_path} shard {shard} (rows {start}-{stop}) fails its checksum: "
                        "the data on disk is damaged. Run `safeport verify --repair`"
                    )
                sel = mine[rows[mine] // unit.shard_rows == shard]
                out[sel] = block[rows[sel] - start]
        if out is None:  # pragma: no cover
            raise StoreError("no rows selected")
        return out

    def activations(
        self, model: str, dataset: str, where: str = "", params: Sequence[Any] = (), verify: bool = True
    ) -> tuple[pa.Table, np.ndarray]:
        """(metadata, values) of ``model`` (name or key) on ``dataset`` in dataset order.

        ``where`` is an extra SQL filter over the ``activations`` view, e.g.
        ``"split = 'train' AND side = 'safe'"``.
        """
        meta = self.sql(
            f"SELECT * FROM activations WHERE (model_key = ? OR (model = ? AND current)) AND dataset = ? "
            f"{'AND (' + where + ')' if where else ''} ORDER BY idx",
            [model, model, dataset, *params],
        )
        return meta, self.read_rows(meta, verify=verify)
