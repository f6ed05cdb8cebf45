"""Getting into ``meta.duckdb``: short connections, one cross-process write lock, bounded waits.

DuckDB lets one process hold a database file read-write, and then no other process can
open it, not even read-only; read-only connections of several processes coexist but keep
every read-write open out; inside one process, connections with different settings
(read-only or not) to one file refuse each other. So nothing here keeps a connection:

* a **write transaction** takes this process's lock for the file and the store's
  ``writer.lock`` (``flock``, exclusive, released by the kernel if the process dies), opens
  the file read-write, runs BEGIN … COMMIT and closes it again, typically in tens of ms;
* a **read** opens the file read-only for one statement or one short ``reading()`` block.

Either side that finds the file held by another process retries for a bounded time
(``SAFEPORT_STORE_WAIT``, or the caller's ``wait_s``) and then fails saying who holds it and
how long it waited. A file DuckDB cannot read is reported as damaged, never as busy.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import duckdb

log = logging.getLogger("safeport.store")

DB_NAME = "meta.duckdb"
LOCK_NAME = "writer.lock"
SNAPSHOT_NAME = "meta.snapshot.duckdb"  # a copy taken at the end of each successful writer run
WAITING_NAME = "waiting.lock"  # processes waiting for the file hold it shared (see Database)
LINGER_S = 0.1  # a connection is kept this long after its block for the next one ...
MAX_HOLD_S = 1.0  # ... but never longer than this in all, nor once another process waits
YIELD_S = 0.05  # after handing the file to a waiter, this process waits this long before taking it back
WAITER_POLL_S = 0.02  # how often a waiting process tries again
WAIT_ENV = "SAFEPORT_STORE_WAIT"
READ_WAIT_S = 10.0  # a reader waits this long for an in-flight transaction (or SAFEPORT_STORE_WAIT)
WRITE_WAIT_S = 60.0  # a write transaction waits this long for the file (or SAFEPORT_STORE_WAIT / --wait)

# DuckDB's words for "another process holds the file" and for "this file cannot be read".
_BUSY = re.compile(r"Could not set lock|Conflicting lock|different configuration", re.IGNORECASE)
_HOLDER = re.compile(r"\(PID (\d+)\)")
_DAMAGED = re.compile(
    r"not a valid DuckDB database file|Could not read enough bytes|Corrupt database file|Failed to read",
    re.IGNORECASE,
)
_DAMAGE_TYPES = (duckdb.IOException, duckdb.InternalException, duckdb.SerializationException, duckdb.FatalException)
# errno values a filesystem answers when it does not implement advisory locks.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class StoreBusyError(StoreError):
    """Another process held the store's metadata longer than this one was willing to wait."""


class StoreDamagedError(StoreError):
    """``meta.duckdb`` cannot be read: it is damaged, not busy."""


def default_wait(write: bool) -> float:
    """Seconds to wait for the file: ``SAFEPORT_STORE_WAIT`` if set, else 10 s to read, 60 s to write."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise StoreError(f"{WAIT_ENV}={raw!r} is not a number of seconds; set it to e.g. 30") from None
        if value >= 0:
            return value
        raise StoreError(f"{WAIT_ENV}={raw!r} is negative; set it to 0 or more seconds")
    return WRITE_WAIT_S if write else READ_WAIT_S


def damaged_message(path: Path, why: str) -> str:
    """The one message for a ``meta.duckdb`` DuckDB cannot read (shared by every command)."""
    snapshot = path.with_name(SNAPSHOT_NAME)
    restore = (
        f"`safeport recover --store {path.parent}` moves it aside and restores the snapshot {snapshot.name} taken "
        "at the end of the last successful writer run; rerunning the jobs then recomputes only what came after it"
        if snapshot.is_file()
        else "no snapshot of it exists yet (one is kept after each successful writer run); move it aside and "
        "rerun `safeport run`, which rebuilds the metadata and recomputes the rows"
    )
    return (
        f"store metadata {path} is damaged and cannot be read ({why.splitlines()[0][:200]}); it is not busy. "
        f"The Zarr arrays and output files are not affected. {restore} (README: Reliability, damaged metadata)"
    )


def interrupted(err: BaseException) -> bool:
    """Whether DuckDB stopped a statement because of Ctrl-C.

    DuckDB runs Python's signal handlers while a statement executes and turns the
    KeyboardInterrupt they raise into "Query interrupted" (an InterruptException, or a plain
    RuntimeError from some calls); the blocks below hand it back as the KeyboardInterrupt it was.
    A Ctrl-C between ``execute`` and its fetch leaves the result unfinished, so cleanup in a
    ``finally`` (``unregister``) then raises ResourceInUseException with the interrupt as its
    context: the whole chain is looked at. A KeyboardInterrupt raised while DuckDB reads a
    registered Arrow object comes back inside DuckDB's own error text ("... failed:
    KeyboardInterrupt: "), with no chain.
    """
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (KeyboardInterrupt, duckdb.InterruptException)) or (
            type(cur) is RuntimeError and str(cur) == "Query interrupted"
        ):
            return True
        if isinstance(cur, duckdb.Error) and str(cur).rstrip().endswith("failed: KeyboardInterrupt:"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _reraise(path: Path, err: BaseException) -> NoReturn:
    """Raise what a store block's caller should see for ``err`` raised inside the block.

    Ctrl-C inside a statement as the KeyboardInterrupt it was, a DuckDB error that means the
    file is damaged as :class:`StoreDamagedError`; anything else unchanged.
    """
    if interrupted(err):
        raise KeyboardInterrupt from None
    if isinstance(err, duckdb.Error):
        raise (classify(path, err) or err) from None
    raise err


def classify(path: Path, err: duckdb.Error) -> StoreError | None:
    """A damaged-file error for a DuckDB error that means the file cannot be read; None for any other error."""
    text = str(err)
    plain = type(err) is duckdb.Error  # DuckDB raises its base class for "Corrupt database file"
    if (plain or isinstance(err, _DAMAGE_TYPES)) and _DAMAGED.search(text) and not _BUSY.search(text):
        return StoreDamagedError(damaged_message(path, text))
    return None


def _holder(text: str) -> str:
    m = _HOLDER.search(text)
    return f"process {m.group(1)}" if m else "another process"


@dataclass
class _Thread(threading.local):
    con: duckdb.DuckDBPyConnection | None = None
    write: bool = False


@dataclass
class _Idle:
    """A connection kept open for a moment after its block, for the next block of this process."""

    con: duckdb.DuckDBPyConnection
    write: bool  # read-write: this process still holds writer.lock
    opened: float  # monotonic
    until: float  # monotonic: closed by then


class Database:
    """Every connection this process makes to one ``meta.duckdb`` goes through here (see module docstring).

    Opening DuckDB costs ~20 ms, so a connection is kept for :data:`LINGER_S` after its block in
    case another block follows (a burst of small reads and commits), but never once another
    safeport process is waiting for the file (it announces itself in ``waiting.lock``) and never
    longer than :data:`MAX_HOLD_S` in all; then it is closed and the waiter gets its turn.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / DB_NAME
        self.lock_path = root / LOCK_NAME
        self._mutex = threading.RLock()  # one connection at a time in this process (DuckDB's same-file rule)
        self._local = _Thread()
        self._lock_fd: int | None = None
        self._lock_checked = False
        self._waiting_fd: int | None = None
        self._idle: _Idle | None = None
        self._yield_until = 0.0  # after handing the file to a waiter, do not take it back before this
        self._closer: threading.Thread | None = None
        self._wake = threading.Condition(self._mutex)

    # -- the connection of the current block -----------------------------------------------------
    def current(self) -> duckdb.DuckDBPyConnection | None:
        """The connection of this thread's open transaction or reading block, if any."""
        return self._local.con

    def in_transaction(self) -> bool:
        return self._local.con is not None and self._local.write

    # -- reading ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(
        self, wait_s: float, config: Mapping[str, Any] | None = None, linger: bool = True
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for one block (or the enclosing transaction's / reading block's own)."""
        here = self._local
        if here.con is not None and config is None:
            yield here.con
            return
        if here.con is not None:
            raise StoreError("a query connection cannot open inside another block of the same store; close it first")
        if not self.path.is_file():
            raise StoreError(f"no store at {self.root}; run `safeport extract` (or `safeport run`) first")
        with self._mutex:
            idle = self._take_idle(write=False) if config is None else None
            if idle is None:
                self._close_idle()  # another configuration cannot open beside it in this process
                idle = _Idle(self._open(read_only=True, wait_s=wait_s, config=config), False, time.monotonic(), 0.0)
            here.con, here.write = idle.con, False  # a read block, even on a kept read-write connection
            ok = False
            try:
                yield idle.con
                ok = True
            except (duckdb.Error, RuntimeError) as err:
                _reraise(self.path, err)
            finally:
                here.con = None
                self._park(idle, keep=ok and linger and config is None)

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, wait_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
        """BEGIN … COMMIT on a read-write connection; a nested call joins the outer transaction."""
        here = self._local
        if here.con is not None:
            if not here.write:
                raise StoreError(
                    "a write transaction cannot start inside a reading block of the same store; end the "
                    "`with store.reading()` block first"
                )
            yield here.con  # joins the enclosing transaction: one COMMIT for both
            return
        with self._mutex:
            idle = self._take_idle(write=True)
            if idle is None:
                self._close_idle()
                self._acquire(wait_s)
                try:
                    idle = _Idle(self._open(read_only=False, wait_s=wait_s), True, time.monotonic(), 0.0)
                except BaseException:
                    self._release()
                    raise
            con = idle.con
            here.con, here.write = con, True
            ok = False
            try:
                try:
                    con.execute("BEGIN TRANSACTION")
                    yield con
                except BaseException as err:
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    _reraise(self.path, err)
                try:
                    con.execute("COMMIT")
                except (duckdb.Error, RuntimeError) as err:
                    # A failed COMMIT (disk full, I/O error, Ctrl-C) must not leave the transaction open:
                    # later statements would otherwise join it and could commit half of this step. (The
                    # connection is closed, not kept, which ends any transaction DuckDB still holds.)
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    if interrupted(err) or not isinstance(err, duckdb.Error):
                        _reraise(self.path, err)
                    raise StoreError(
                        f"committing to {self.path} failed: {err}. Nothing of this step was recorded and earlier "
                        "commits are intact; if the disk is full free some space, then rerun (work resumes)"
                    ) from None
                ok = True
            finally:
                here.con = None
                self._park(idle, keep=ok)

    # -- lingering connections -------------------------------------------------------------------
    def _take_idle(self, write: bool) -> _Idle | None:
        """The idle connection if it serves this block (a read-write one serves reads too)."""
        idle = self._idle
        if idle is None or (write and not idle.write):
            return None
        self._idle = None
        return idle

    def _park(self, idle: _Idle, keep: bool) -> None:
        """Keep a connection for the next block, or close it (a waiter, the hold limit, an error)."""
        now = time.monotonic()
        waiters = keep and self._others_waiting()
        if keep and not waiters and now - idle.opened < MAX_HOLD_S:
            idle.until = now + LINGER_S
            self._idle = idle
            self._start_closer()
            self._wake.notify_all()
            return
        self._close(idle)
        if waiters:  # handed over: let the waiter in before this process takes the file again
            self._yield_until = now + YIELD_S

    def _close(self, idle: _Idle) -> None:
        try:
            idle.con.close()
        finally:
            if idle.write:
                self._release()

    def _close_idle(self) -> None:
        with self._mutex:
            idle, self._idle = self._idle, None
            if idle is not None:
                self._close(idle)
            wait = self._yield_until - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def close_idle(self) -> None:
        """Close a lingering connection now (before handing the file to code that opens it directly)."""
        with self._mutex:
            idle, self._idle = self._idle, None
            if idle is not None:
                self._close(idle)

    def _start_closer(self) -> None:
        if self._closer is None or not self._closer.is_alive():
            self._closer = threading.Thread(target=self._close_when_idle, name="safeport-db-closer", daemon=True)
            self._closer.start()

    def _close_when_idle(self) -> None:
        with self._mutex:
            while self._idle is not None:
                left = self._idle.until - time.monotonic()
                if left <= 0 or self._others_waiting():
                    idle, self._idle = self._idle, None
                    self._close(idle)
                    break
                self._wake.wait(min(left, WAITER_POLL_S))

    def _others_waiting(self) -> bool:
        """Whether another safeport process announced it waits for the file (holds ``waiting.lock`` shared)."""
        fd = self._waiting_file()
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def _waiting_file(self) -> int | None:
        if self._waiting_fd is None:
            with contextlib.suppress(OSError):  # a read-only store folder: nobody can wait for a write there
                self._waiting_fd = os.open(self.root / WAITING_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        return self._waiting_fd

    @contextlib.contextmanager
    def _announce(self) -> Iterator[None]:
        """Tell the process that holds the file that this one waits (so it stops keeping it)."""
        fd = self._waiting_file()
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def check_locking(self) -> None:
        """Refuse a store folder whose filesystem ignores or rejects ``flock`` (some network mounts)."""
        if self._lock_checked:
            return
        fd = self._lock_file()
        probe = os.open(self.lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_checked = True  # another process holds it: locks work
                return
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_checked = True
            else:
                raise StoreError(self._no_locks("an exclusive lock was granted twice: the filesystem ignores it"))
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as err:
            if err.errno in _NO_LOCKS:
                raise StoreError(self._no_locks(f"flock failed: {err.strerror}")) from None
            raise
        finally:
            os.close(probe)

    def _no_locks(self, why: str) -> str:
        return (
            f"store folder {self.root} is on a filesystem where file locks do not work ({why}). Several safeport "
            "processes share a store through a lock in that folder, so it is refused. Put the store folder (its "
            "meta.duckdb) on a local disk; the arrays may stay on the shared or network location (profile setting "
            "`arrays:`)"
        )

    def _lock_file(self) -> int:
        if self._lock_fd is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise StoreError(
                    f"cannot create the lock file {self.lock_path} ({err.strerror}); writing needs a writable "
                    "store folder (reading does not)"
                ) from None
        return self._lock_fd

    def _acquire(self, wait_s: float) -> None:
        """Take the store's exclusive ``writer.lock``; a lock a dead process left is recovered with a log line."""
        self.check_locking()
        fd = self._lock_file()
        deadline = time.monotonic() + wait_s
        pause = 0.001
        with self._announce():
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _read_holder(fd) or "another process"
                        raise StoreBusyError(
                            f"store {self.root} is busy: {holder} has held its write lock ({self.lock_path.name}) "
                            f"for longer than this process waited ({wait_s:.0f}s). A transaction takes "
                            f"milliseconds, so that process is stuck or paused; pass --wait SECONDS or set "
                            f"{WAIT_ENV} to wait longer"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, WAITER_POLL_S)
        left = _read_holder(fd)
        if left:
            log.warning(
                "store %s: recovered the write lock left by %s, which died holding it; DuckDB rolled back what it "
                "had not committed, nothing committed is lost",
                self.root,
                left,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)

    def _release(self) -> None:
        fd = self._lock_file()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty file means "released cleanly"
        fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def write_lock(self, wait_s: float) -> Iterator[None]:
        """The store's exclusive ``writer.lock`` held for a block, with no DuckDB connection of this process open."""
        with self._mutex:
            self.close_idle()
            self._acquire(wait_s)
            try:
                yield
            finally:
                self._release()

    def snapshot(self, wait_s: float) -> Path:
        """Copy the committed metadata to :data:`SNAPSHOT_NAME` (atomically), under the write lock."""
        dest = self.root / SNAPSHOT_NAME
        with self.write_lock(wait_s):
            if self.path.with_name(self.path.name + ".wal").exists():  # fold a leftover WAL in first
                con = self._open(read_only=False, wait_s=wait_s)
                try:
                    con.execute("CHECKPOINT")
                finally:
                    con.close()
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                shutil.copyfile(self.path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return dest

    # -- opening ---------------------------------------------------------------------------------
    def _open(
        self, read_only: bool, wait_s: float, config: Mapping[str, Any] | None = None
    ) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying while another process holds it; damaged files fail at once.

        While it retries, this process announces that it waits (``waiting.lock``), so a safeport
        process keeping the file between its blocks hands it over at once.
        """
        started = time.monotonic()
        pause = 0.001
        with contextlib.ExitStack() as waiting:
            while True:
                try:
                    if config is None:
                        return duckdb.connect(str(self.path), read_only=read_only)
                    return duckdb.connect(str(self.path), read_only=read_only, config=dict(config))
                except duckdb.Error as err:
                    self._check_busy(err, read_only, started, wait_s)
                if pause == 0.001:
                    waiting.enter_context(self._announce())
                time.sleep(pause)
                pause = min(pause * 2, WAITER_POLL_S)

    def _check_busy(self, err: duckdb.Error, read_only: bool, started: float, wait_s: float) -> None:
        """Raise for a damaged or foreign file, or once ``wait_s`` is spent; return to retry."""
        damaged = classify(self.path, err)
        if damaged is not None:
            raise damaged from None
        text = str(err)
        if not _BUSY.search(text):
            raise StoreError(
                f"store {self.root}: {self.path} cannot be opened ({text.splitlines()[0]}); is it a safeport store?"
            ) from None
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise StoreBusyError(self._busy(read_only, text, waited, wait_s)) from None

    def _busy(self, read_only: bool, text: str, waited: float, wait_s: float) -> str:
        who = _holder(text)
        if read_only:
            return (
                f"store {self.root} is being written by {who}: it held {self.path.name} during all {waited:.1f}s "
                f"this reader waited (limit {wait_s:g}s; transactions normally take milliseconds). Query it later, "
                f"or set {WAIT_ENV}=SECONDS to wait longer"
            )
        return (
            f"store {self.root}: {self.path.name} was held open by {who} during all {waited:.1f}s this writer "
            f"waited (limit {wait_s:g}s), most likely a read-only connection kept open by a notebook or tool; close "
            "it (safeport.store.connect() holds the file only inside its `with` block), or pass --wait SECONDS / "
            f"set {WAIT_ENV} to wait longer"
        )


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


_DATABASES: dict[str, Database] = {}
_REGISTRY = threading.Lock()


@atexit.register
def _close_all() -> None:
    """Close lingering connections at exit (DuckDB checkpoints on close; writer.lock is released)."""
    for db in list(_DATABASES.values()):
        with contextlib.suppress(Exception):
            db.close_idle()


def database(root: Path) -> Database:
    """The one :class:`Database` of this process for the store folder ``root``."""
    key = os.path.realpath(root)
    with _REGISTRY:
        if key not in _DATABASES:
            _DATABASES[key] = Database(Path(key))
        return _DATABASES[key]


@contextlib.contextmanager
def connect(store: Path | str, wait_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only DuckDB connection to a store's metadata, for pandas, notebooks and other tools.

    It waits (``wait_s``, default ``SAFEPORT_STORE_WAIT`` or 10 s) while a safeport writer is in
    the middle of a transaction, then sees the last committed state; it holds the file only
    inside the ``with`` block, so writers are never kept out for longer than that::

        from safeport.store import connect
        with connect("safeport-store") as con:
            df = con.sql("select model, dataset, count(*) from activations group by all").df()
    """
    root = Path(store)
    if root.name == DB_NAME:
        root = root.parent
    db = database(root)
    with db.reading(default_wait(False) if wait_s is None else wait_s, linger=False) as con:
        yield con
