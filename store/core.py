"""The core of a store handle: opening it (schema, locations, identity), short connections, queries, runs.

A store is a folder: ``meta.duckdb`` (metadata) + its Zarr arrays (``arrays.zarr`` there, or a
URL) + its outputs. :class:`StoreCore` keeps no DuckDB connection: each write is a short
transaction (:meth:`StoreCore.transaction`: lock, open, BEGIN, COMMIT, close, unlock) and each
read a short read-only connection (:meth:`StoreCore.reading` batches several), so readers and
several writers share a store; writers split the work through claims
(:mod:`safeport.store.claims`). See :mod:`safeport.store.db` for the DuckDB rules this is built
around. The parts that hold data build on it: units and their rows (:mod:`safeport.store.units`),
models, datasets and texts (:mod:`safeport.store.registry`); :class:`safeport.store.store.Store`
is all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import duckdb
import pyarrow as pa
import zarr
import zarr.errors

from safeport.store import location
from safeport.store.claims import HOST, Session
from safeport.store.db import StoreError, database, default_wait
from safeport.store.schema import CURRENT_VIEWS, MIGRATIONS, SCHEMA, SCHEMA_VERSION, check_version

log = logging.getLogger("safeport.store")


_READ_STATEMENTS = ("SELECT", "EXPLAIN")
_PARSER = threading.local()


def reads_only(query: str) -> bool:
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

    def __init__(self, store: StoreCore) -> None:
        self._store = store

    def execute(self, query: str, params: Sequence[Any] | None = None) -> _Result:
        write = not self._store.read_only and not reads_only(query)
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


class StoreCore:
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
                    self.schema_version = check_version(self.root, con)
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
            version = check_version(self.root, con, writing=True)
            if version == SCHEMA_VERSION:
                con.execute(CURRENT_VIEWS)  # what this release's queries read (idempotent)
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

    def __enter__(self) -> Self:
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
