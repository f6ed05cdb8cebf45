"""The activation store: Zarr v3 arrays for rows, DuckDB for everything else.

Commit protocol (why a crash can neither lose nor duplicate rows):
1. a work unit's text list and its empty array are created in one transaction;
2. each shard's rows are written to the array region the shard owns
   (idempotent: a rewrite after a crash overwrites the same chunk);
3. only then one DuckDB transaction records the shard, its checksum and its
   ``activation_rows``. Readers see rows through those records only, so a
   half-written chunk without a record is invisible and simply rewritten.

Concurrency: a ``Store`` keeps no DuckDB connection. Each write is a short transaction
(:meth:`Store.transaction`: lock, open, BEGIN, COMMIT, close, unlock) and each read a short
read-only connection (:meth:`Store.reading` batches several), so readers and several writers
share a store; writers split the work through claims (:mod:`safeport.store.claims`). See
:mod:`safeport.store.db` for the DuckDB rules this is built around.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import zarr
import zarr.codecs
import zarr.errors

from safeport.keys import content_key
from safeport.store import location
from safeport.store.claims import CLAIMS_DDL, HOST, Session
from safeport.store.db import (
    StoreBusyError as StoreBusyError,
)
from safeport.store.db import (
    StoreDamagedError as StoreDamagedError,
)
from safeport.store.db import (
    StoreError as StoreError,
)
from safeport.store.db import (
    database,
    default_wait,
)
from safeport.store.migrate import migrate as migrate_content_keys
from safeport.store.schema import SCHEMA

log = logging.getLogger("safeport.store")


# -- schema versions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply`` turns a store of version ``version - 1`` into ``version``.

    Each step runs in its own write transaction together with the version bump, so a crash
    leaves the store at the last finished step and the next writer resumes from there. A step
    must be idempotent (``IF NOT EXISTS``, or check before changing). To add one: write the
    function, append ``Migration(N + 1, "what it changes", fn)`` to :data:`MIGRATIONS`; every
    writer that opens an older store then migrates it, and readers of it meanwhile are told
    which version they found.
    """

    version: int
    what: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


def _v2_claims_and_progress(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(CLAIMS_DDL)
    for column, kind in (("owner", "VARCHAR"), ("heartbeat_at", "TIMESTAMP"), ("entry_id", "VARCHAR")):
        con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {column} {kind}")
    con.execute(RUNNING_VIEW_V2)


# Work in progress, for `safeport status` and SQL: each running ``runs`` row with its writer.
# ``lease_alive`` is false once the writer stopped renewing (it died or hangs; see safeport.store.claims);
# ``total`` is what the work set out to compute (rows, outputs), NULL where it is not known up front.
RUNNING_VIEW = """
CREATE OR REPLACE VIEW running AS
    SELECT r.flow, r.task, r.model, r.dataset, r.unit_key AS work_key, r.rows, r.total, r.tokens, r.started_at,
           r.heartbeat_at, c.host, c.pid, r.run_id, coalesce(c.expires_at > epoch(now()), false) AS lease_alive
    FROM runs r LEFT JOIN claims c ON c.work_key = 'writer:' || r.owner
    WHERE r.status = 'running';
"""
RUNNING_VIEW_V2 = RUNNING_VIEW.replace(" r.total,", "")  # as schema step 2 made it (no runs.total yet)


def _v3_content_keys(con: duckdb.DuckDBPyConnection) -> None:
    for step in migrate_content_keys(con):
        log.info("migrated: %s", step)


def _v4_run_totals(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS total BIGINT")
    con.execute(RUNNING_VIEW)


MIGRATIONS: list[Migration] = [
    Migration(2, "claims table; runs.owner, runs.heartbeat_at, runs.entry_id (progress)", _v2_claims_and_progress),
    Migration(3, "dataset hashes from rows (rows-v1), fit report columns, fit_outputs backfilled", _v3_content_keys),
    Migration(4, "runs.total: what running work set out to compute (ETAs in status)", _v4_run_totals),
]
SCHEMA_VERSION = max(m.version for m in MIGRATIONS)  # version 1: store/schema.py as first released


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
    return content_key(np.ascontiguousarray(values, dtype=np.float32), 32)


def tensor_checksum(values: np.ndarray) -> str:
    """sha256 of a tensor's dtype, shape and C-ordered bytes (maps keep their own dtype)."""
    values = np.ascontiguousarray(values)
    head = f"{values.dtype.str}{values.shape}".encode()
    return content_key(head + values.tobytes(), 32)


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
    """Kept for callers written before short transactions: it no longer excludes other writers.

    Writers now share a store (each transaction takes the store's lock for milliseconds, work
    is split by claims), so there is nothing to hold for a whole run. Remove calls to it.
    """
    del wait_s
    root.mkdir(parents=True, exist_ok=True)
    yield


def _check_version(root: Path, con: duckdb.DuckDBPyConnection, writing: bool = False) -> int:
    """The store's schema version; a newer one, or (for readers) a migration in progress, is refused by name."""
    meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('schema_version', 'migrating')").fetchall())
    raw = meta.get("schema_version", "1")
    try:
        version = int(raw)
    except ValueError:
        raise StoreError(
            f"store {root} records schema version {raw!r}, which is not a number; is it damaged?"
        ) from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {root} has schema version {version}, written by a newer safeport; this one reads versions up to "
            f"{SCHEMA_VERSION}. Upgrade safeport to use this store"
        )
    if "migrating" in meta and not writing:
        raise StoreError(
            f"store {root} is being migrated (schema version {version} found; migration {meta['migrating']}); "
            "wait for it to finish and retry. If that process died, run any writing command (e.g. `safeport "
            "extract`) to finish the migration"
        )
    return version


_READ_STATEMENTS = ("SELECT", "EXPLAIN")
_PARSER = threading.local()


def _reads_only(query: str) -> bool:
    """Whether every statement of ``query`` only reads (DuckDB's own parser decides)."""
    parser = getattr(_PARSER, "con", None)
    if parser is None:
        parser = _PARSER.con = duckdb.connect(":memory:")
    try:
        return all(st.type.name in _READ_STATEMENTS for st in parser.extract_statements(query))
    except duckdb.Error:
        return True  # let the real connection report the syntax error


class _Result:
    """A statement's whole result, fetched before its short connection closed."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table
        self._rows: list[tuple[Any, ...]] | None = None
        self._pos = 0

    def _all(self) -> list[tuple[Any, ...]]:
        if self._rows is None:
            conv = duckdb.connect(":memory:")  # DuckDB's own Python conversion of every type
            try:
                self._rows = [tuple(r) for r in conv.from_arrow(self._table).fetchall()]
            finally:
                conv.close()
        return self._rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows = self._all()[self._pos :]
        self._pos = len(self._all())
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self._all()
        if self._pos >= len(rows):
            return None
        self._pos += 1
        return rows[self._pos - 1]

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        rows = self._all()[self._pos : self._pos + size]
        self._pos += len(rows)
        return rows

    def to_arrow_table(self) -> pa.Table:
        return self._table

    fetch_arrow_table = arrow = to_arrow_table

    def df(self) -> Any:
        return self._table.to_pandas()

    fetchdf = df


class _StatementConnection:
    """``store.con`` outside a block: each statement on its own short connection (see :attr:`Store.con`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def execute(self, query: str, params: Sequence[Any] | None = None) -> _Result:
        write = not self._store.read_only and not _reads_only(query)
        block = self._store.transaction() if write else self._store.reading()
        with block as con:
            if write:
                for name, obj in self._store._registered.items():
                    con.register(name, obj)
            rel = con.sql(query, params=list(params or []))
            return _Result(rel.to_arrow_table() if rel is not None else pa.table({}))

    sql = execute

    def executemany(self, query: str, params: Sequence[Sequence[Any]]) -> None:
        with self._store.transaction() as con:
            con.executemany(query, [list(p) for p in params])

    def register(self, name: str, obj: Any) -> None:
        self._store._registered[name] = obj

    def unregister(self, name: str) -> None:
        self._store._registered.pop(name, None)


class Store:
    """Handle on one store: ``meta.duckdb`` in its folder + its Zarr arrays (``arrays.zarr`` there, or a URL).

    ``arrays`` is where the arrays should be (an absolute path or fsspec URL, see
    :mod:`safeport.store.location`); None means wherever the store recorded them, the
    store folder for a new store. A store keeps one arrays location for life: the
    location is recorded in ``meta`` and the arrays group carries the store's id,
    so a catalog pointing elsewhere, or two stores sharing one location, is refused
    by name instead of mixing data.

    No DuckDB connection is kept: every method opens a short one (see the module docstring).
    ``wait_s`` bounds each wait for the file while another process holds it (default
    ``SAFEPORT_STORE_WAIT``, else 10 s to read and 60 s to write).
    """

    def __init__(
        self,
        root: Path | str,
        read_only: bool = False,
        arrays: str | None = None,
        wait_s: float | None = None,
        outputs: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self.wait_s = wait_s
        self.run_id = uuid.uuid4().hex  # flows set their Prefect run id; recorded with claims and runs rows
        self._db = database(self.root)
        self._session: Session | None = None
        self._session_lock = threading.Lock()
        self._registered: dict[str, Any] = {}  # tables registered through the per-statement ``con``
        self._ensured: set[str] = set()  # stage schemas created by this handle (ensure_schema)
        if read_only and not self._db.path.exists():
            raise StoreError(f"no store at {self.root}; run `safeport extract` (or `safeport run`) first")
        try:
            if read_only:
                with self.reading() as con:
                    self.schema_version = _check_version(self.root, con)
            else:
                self.schema_version = self._migrate(arrays)
            with self.reading() as con:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                has_shards = bool(con.execute("SELECT count(*) FROM shards").fetchall()[0][0])
            self.location = self._location(arrays, meta.get("arrays"))
            self.outputs = self._outputs_location(outputs, meta.get("outputs"))
            self.arrays = self._open_arrays(meta.get("store_id"), has_shards)
        except BaseException:  # a refused open holds nothing
            self.close()
            raise

    def _migrate(self, arrays: str | None) -> int:
        """Create a new store's tables, or bring an older store to :data:`SCHEMA_VERSION` step by step."""
        with self.transaction() as con:
            con.execute(SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
            self._record_identity(con, arrays)
            version = _check_version(self.root, con, writing=True)
            if version == SCHEMA_VERSION:
                return version
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('migrating', ?)",
                [f"{version}->{SCHEMA_VERSION} by pid {os.getpid()} on {HOST} since {time.ctime()}"],
            )
        for step in MIGRATIONS:
            with self.transaction() as con:
                now = int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0])
                if now >= step.version:  # another writer did this step meanwhile
                    continue
                step.apply(con)
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(step.version)])
            log.info("store %s: schema %d -> %d (%s)", self.root, step.version - 1, step.version, step.what)
        with self.transaction() as con:
            con.execute("DELETE FROM meta WHERE key = 'migrating'")
        return SCHEMA_VERSION

    def _record_identity(self, con: duckdb.DuckDBPyConnection, arrays: str | None) -> None:
        """First writer open: record the store id and its arrays location (the folder for pre-existing data)."""
        if not con.execute("SELECT 1 FROM meta WHERE key = 'arrays'").fetchall():
            used = bool(con.execute("SELECT count(*) FROM units").fetchall()[0][0])
            used = used or (self.root / location.DEFAULT).exists()
            con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('arrays', ?)",
                [location.DEFAULT if used or arrays is None or arrays == self._local_default() else arrays],
            )
        con.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", [uuid.uuid4().hex])

    def _local_default(self) -> str:
        return location.resolve(location.DEFAULT, self.root)

    def _location(self, wanted: str | None, recorded: str | None) -> location.ArrayLocation:
        have = location.resolve(str(recorded), self.root) if recorded is not None else self._local_default()
        if wanted is not None and wanted != have:
            raise StoreError(
                f"store {self.root} keeps its arrays at {have}, but {wanted} was asked for. A store keeps one "
                f"arrays location: set `arrays: {have}` in the profile (or remove the setting if it is the "
                f"store folder), or use a new store folder for {wanted}"
            )
        return location.ArrayLocation(have)

    def _outputs_location(self, wanted: str | None, recorded: str | None) -> location.OutputLocation:
        """Where generated PNGs go: the recorded location; a new one only while no output is recorded."""
        have = location.resolve(recorded or location.OUTPUTS, self.root)
        if wanted is None or wanted == have:
            return location.OutputLocation(have)
        try:
            location.check_url(wanted)
        except location.LocationError as err:
            raise StoreError(str(err)) from None
        with self.reading() as con:
            has_table = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'generations'"
            ).fetchall()[0][0]
            n = con.execute("SELECT count(*) FROM generations").fetchall()[0][0] if has_table else 0
        if n or self.read_only:
            raise StoreError(
                f"store {self.root} keeps its generated outputs at {have}"
                + (f" ({n} recorded)" if n else "")
                + f", but {wanted} was asked for. Set `outputs: {have}` in the profile (or remove the setting if "
                "it is the store's outputs folder), or use a new store folder for the other location"
            )
        with self.transaction() as con:  # nothing generated yet: the profile decides
            con.execute("INSERT OR REPLACE INTO meta VALUES ('outputs', ?)", [wanted])
        return location.OutputLocation(wanted)

    def _open_arrays(self, store_id: str | None, has_shards: bool) -> zarr.Group:
        """Open the arrays group and check it belongs to this store (claiming it on first write)."""
        url = self.location.url
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
        if not members and has_shards:
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
        """End this handle's writing session: stop its heartbeat, drop its claims, close its running rows."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
        self._db.close_idle()  # code that opens meta.duckdb directly next must find it free

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> Path | None:
        """Keep a copy of the committed metadata for ``safeport recover`` (a failure only warns)."""
        self._writable()
        try:
            return self._db.snapshot(self._wait(True))
        except (OSError, StoreError, duckdb.Error) as err:
            log.warning("store %s: no metadata snapshot was kept this time (%s)", self.root, err)
            return None

    @property
    def session(self) -> Session:
        """This handle's writing session (claims, leases, running ``runs`` rows), started on first use."""
        self._writable()
        with self._session_lock:
            if self._session is None:
                self._session = Session(self, self.run_id)
            return self._session

    def _wait(self, write: bool) -> float:
        return default_wait(write) if self.wait_s is None else self.wait_s

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction: lock, open, BEGIN, the block, COMMIT, close, unlock.

        A transaction started inside another one of this thread joins it (one COMMIT for both),
        so steps compose: e.g. commit a shard, release its claim and claim the next at once.
        """
        self._writable()
        with self._db.transaction(self._wait(True)) as con:
            yield con

    @contextlib.contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for a few statements (inside a transaction: the transaction's own).

        Keep the block short and free of array reads or model work: while it is open no other
        process can start a write transaction on this store.
        """
        fresh = self._db.current() is None
        with self._db.reading(self._wait(False)) as con:
            if fresh:  # tables registered through the per-statement ``con`` (see :attr:`con`)
                for name, obj in self._registered.items():
                    con.register(name, obj)
            yield con

    def in_transaction(self) -> bool:
        return self._db.in_transaction()

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError("this store handle is read-only")

    @property
    def con(self) -> Any:
        """The connection of the current ``transaction()`` / ``reading()`` block of this thread.

        Outside a block this is a stand-in that runs each statement on its own short connection
        (reads read-only; writes, on a writable handle, in their own transaction), so code that
        predates short connections keeps working; batch statements in a block instead.
        """
        current = self._db.current()
        return current if current is not None else _StatementConnection(self)

    def ensure_schema(self, name: str, ddl: str) -> None:
        """Run a stage's own ``CREATE ... IF NOT EXISTS`` statements once per handle (in a transaction)."""
        self._writable()
        if name not in self._ensured:
            with self.transaction() as con:
                con.execute(ddl)
            self._ensured.add(name)

    def tables(self) -> set[str]:
        """Names of the store's tables and views."""
        return {r[0] for r in self.fetchall("SELECT table_name FROM information_schema.tables")}

    # -- queries -----------------------------------------------------------
    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        with self.reading() as con:
            return con.sql(query, params=list(params or [])).to_arrow_table()

    def fetchall(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with self.reading() as con:
            return [tuple(r) for r in con.execute(query, list(params or [])).fetchall()]

    def scalar(self, query: str, params: Sequence[Any] | None = None) -> Any:
        row = self.one(query, params)
        return None if row is None else row[0]

    def one(self, query: str, params: Sequence[Any] | None = None) -> tuple[Any, ...] | None:
        """First row or None; the whole result is consumed (DuckDB 2 refuses a half-read cursor)."""
        rows = self.fetchall(query, params)
        return rows[0] if rows else None

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
            have = con.execute("SELECT content_hash FROM datasets WHERE dataset = ?", [name]).fetchall()
            if have and have[0][0] == content_hash:  # another writer registered it meanwhile
                return False
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
        rows = self.fetchall(
            """SELECT DISTINCT dt.text_id FROM dataset_texts dt
               WHERE dt.dataset = ? AND NOT EXISTS (
                   SELECT 1 FROM activation_rows a WHERE a.model_key = ? AND a.text_id = dt.text_id)
               ORDER BY dt.text_id""",
            [dataset, model_key],
        )
        return [r[0] for r in rows]

    def texts(self, text_ids: Sequence[str]) -> list[str]:
        """Texts for ids, in the given order."""
        tbl = pa.table({"text_id": list(text_ids), "pos": np.arange(len(text_ids))})
        with self.reading() as con:
            con.register("_ids", tbl)
            try:
                rows = con.execute("SELECT t.text FROM _ids i JOIN texts t USING (text_id) ORDER BY i.pos").fetchall()
            finally:
                con.unregister("_ids")
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
        """Create the unit's array and record its text list (rows in this order) atomically.

        Callers claim ``unit:<key>`` first, so two writers never plan the same unit; should one
        still find it recorded, the recorded unit wins and is returned.
        """
        path = f"acts/{model_key}/{unit_key}"
        n = len(text_ids)
        existing = self.unit(unit_key)
        if existing is not None:
            return existing
        self._require_array(path, (n, dim), (shard_rows, dim))
        with self.transaction() as con:
            raced = self.unit(unit_key)  # recorded by another writer since the check above
            if raced is not None:
                return raced
            con.register("_ut", pa.table({"row": np.arange(n, dtype=np.int32), "text_id": list(text_ids)}))
            con.execute("INSERT INTO unit_texts SELECT ?, row, text_id FROM _ut", [unit_key])
            con.unregister("_ut")
            con.execute(
                "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, 'float32', ?, 'running', now(), NULL)",
                [unit_key, model_key, dataset, dataset_hash, path, n, dim, shard_rows],
            )
        return UnitInfo(unit_key, model_key, dataset, path, n, dim, shard_rows, "running")

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
        rows = self.fetchall("SELECT text_id FROM unit_texts WHERE unit_key = ? ORDER BY row", [unit_key])
        return [r[0] for r in rows]

    def committed_shards(self, unit_key: str) -> set[int]:
        rows = self.fetchall("SELECT shard FROM shards WHERE unit_key = ?", [unit_key])
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
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, now())",
                [unit.unit_key, desc.shard, desc.row_start, desc.row_stop, desc.checksum, desc.tokens],
            )
            con.register("_rows", tbl)
            con.execute(
                "INSERT OR IGNORE INTO activation_rows SELECT ?, text_id, ?, row, n_tokens, truncated FROM _rows",
                [unit.model_key, unit.unit_key],
            )
            con.unregister("_rows")

    def finish_unit(self, unit_key: str) -> bool:
        """Mark the unit done if every one of its shards is committed (by whichever writer); returns whether it is."""
        with self.transaction() as con:
            con.execute(
                "UPDATE units SET status = 'done', finished_at = now() WHERE unit_key = ? AND status <> 'done' "
                "AND (SELECT count(*) FROM shards s WHERE s.unit_key = units.unit_key) = "
                "(n_rows + shard_rows - 1) // shard_rows",
                [unit_key],
            )
            return bool(
                con.execute("SELECT 1 FROM units WHERE unit_key = ? AND status = 'done'", [unit_key]).fetchall()
            )

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
        owner = self._session.owner if self._session is not None else None
        with self.transaction() as con:
            con.execute(
                "INSERT INTO runs (run_id, flow, task, model, dataset, unit_key, status, rows, tokens, seconds, "
                "started_at, finished_at, message, owner, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?), now(), ?, ?, now())",
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
                    owner,
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
        wanted = list(dict.fromkeys(keys))
        with self.reading():  # metadata in one short block; the arrays are read after it
            units = {key: self.unit(key) for key in wanted}
            sums = {
                key: dict(self.fetchall("SELECT shard, checksum FROM shards WHERE unit_key = ?", [key]))
                for key in wanted
            }
        out: np.ndarray | None = None
        for key in wanted:
            unit = units[key]
            if unit is None:
                raise StoreError(f"unit {key} is referenced but not recorded; run `safeport verify`")
            if out is None:
                out = np.empty((len(keys), unit.dim), dtype=np.float32)
            mine = np.flatnonzero(np.asarray(keys) == key)
            for shard in np.unique(rows[mine] // unit.shard_rows):
                start, stop = unit.shard_range(int(shard))
                if int(shard) not in sums[key]:
                    raise StoreError(f"shard {shard} of {unit.array_path} is not committed")
                block = self.read_shard(unit, int(shard))
                if verify and checksum(block) != sums[key][int(shard)]:
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
