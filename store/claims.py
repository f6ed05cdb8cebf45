"""Claims with leases: several writers share one store and each piece of work is done once.

A writer (one :class:`Session` per open writable :class:`~safeport.store.store.Store`) claims a
piece of work by its key before computing it, in a write transaction, and releases the claim in
the transaction that commits the result. A claim names its owner (host, pid, process start
time, run id) and carries a lease: a heartbeat thread renews every claim of the session a few
times per lease. Another writer that meets the claim leaves the work alone (it does other work
first, then waits); it takes the claim over, with a log line saying why, when the owner is
dead: at once when the owner's pid is gone on this host, after the lease otherwise (a lost
machine, a process stopped or stuck).

Work keys are ``KIND:ID`` strings of any kind: ``unit:<unit key>`` (create or repair a unit),
``shard:<unit key>/<n>``, ``fit:<fit key>``, ``output:<output key>``, ``score:<metric>:<output
key>``, ``writer:<session>`` (a writer's presence, for ``gc`` and ``status``). The API is
general; a new kind needs no change here:

    session = store.session
    mine = session.claim(["output:ab12", "output:cd34"])     # those granted now
    ... compute them, outside any lock ...
    with store.transaction():                              # commit results and release together
        ...record the results...
        session.release(mine)

Running work is visible in SQL: :meth:`Session.start_run` inserts a ``runs`` row with status
``running``, its owner and heartbeat; progress (rows, tokens) is updated by the writer and the
heartbeat, and :meth:`Session.finish_run` sets the final status. A dead owner's ``running``
rows become ``abandoned`` when its claims are taken over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from safeport.store.db import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from safeport.store.core import StoreCore as Store

log = logging.getLogger("safeport.store")

LEASE_ENV = "SAFEPORT_LEASE_S"
DEFAULT_LEASE_S = 60.0
HOST = socket.gethostname()

CLAIMS_DDL = """
CREATE TABLE IF NOT EXISTS claims (
    work_key VARCHAR PRIMARY KEY, kind VARCHAR, owner VARCHAR, host VARCHAR, pid INTEGER, proc_start VARCHAR,
    run_id VARCHAR, claimed_at DOUBLE, heartbeat_at DOUBLE, expires_at DOUBLE);
"""
_COLUMNS = "work_key, kind, owner, host, pid, proc_start, run_id, claimed_at, heartbeat_at, expires_at"


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"{LEASE_ENV}={raw!r} is not a number of seconds; set it to e.g. 60") from None
    if value <= 0:
        raise StoreError(f"{LEASE_ENV}={raw!r} must be a positive number of seconds")
    return value


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (None where /proc is not available)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot: with the pid it names one process for good."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def pid_alive(pid: int, start: str = "") -> bool:
    """Whether ``pid`` on this host is the same, still running process (zombies and reused pids are not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):
        return False
    return not start or len(fields) <= 19 or fields[19] == start


@dataclass(frozen=True)
class Holder:
    """One row of ``claims``: who holds a piece of work and until when."""

    work_key: str
    kind: str
    owner: str
    host: str
    pid: int
    proc_start: str
    run_id: str
    claimed_at: float
    heartbeat_at: float
    expires_at: float

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (
            f"pid {self.pid} on {self.host} (run {self.run_id}, heartbeat {max(now - self.heartbeat_at, 0):.0f}s ago)"
        )

    def dead_because(self, now: float) -> str | None:
        """Why this claim may be taken over now, or None while its owner is alive and renewing it."""
        if self.host == HOST and not pid_alive(self.pid, self.proc_start):
            return f"its process {self.pid} is gone"
        if now > self.expires_at:
            where = "alive but not renewing it" if self.host == HOST else f"host {self.host} stopped renewing it"
            return f"its lease expired {now - self.expires_at:.0f}s ago ({where})"
        return None


@dataclass
class RunEntry:
    """A ``runs`` row this session keeps up to date while the work runs."""

    entry_id: str
    started: float
    rows: int = 0
    tokens: int = 0
    total: int | None = None  # what it sets out to compute, where known (may be revised: a worker's share)


@dataclass
class _State:
    expiry: dict[str, float] = field(default_factory=dict)  # work key -> local monotonic deadline
    runs: dict[str, RunEntry] = field(default_factory=dict)


def _keys(keys: Iterable[str]) -> pa.Table:
    return pa.table({"work_key": pa.array(list(dict.fromkeys(keys)), pa.string())})


class Session:
    """This process's writing session on one store: identity, claims, running runs rows, heartbeat."""

    def __init__(self, store: Store, run_id: str, lease_s: float | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.lease_s = lease_seconds() if lease_s is None else float(lease_s)
        self.owner = uuid.uuid4().hex[:16]
        self.pid = os.getpid()
        self.proc_start = process_start(self.pid)
        self._state = _State()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with store.transaction():
            self.claim([f"writer:{self.owner}"])  # presence: `safeport status` and `gc` see a running writer
            self._reap()

    # -- claims ------------------------------------------------------------------------------------
    def claim(self, keys: Sequence[str], unless: Sequence[str] = (), unless_prefix: Sequence[str] = ()) -> list[str]:
        """Claim those of ``keys`` nobody alive holds (taking over dead owners' claims); returns them.

        Nothing is granted while another live owner holds a key of ``unless`` or a key starting
        with one of ``unless_prefix`` (e.g. a unit's shards are not claimed while someone
        repairs the whole unit). Keys this session already holds are granted again (renewed).
        """
        keys = list(dict.fromkeys(keys))
        if not keys:
            return []
        with self.store.transaction() as con:
            now = time.time()
            con.register("_want", _keys([*keys, *unless]))
            try:
                found = con.execute(f"SELECT {_COLUMNS} FROM claims JOIN _want USING (work_key)").fetchall()
            finally:
                con.unregister("_want")
            for prefix in unless_prefix:
                found += con.execute(
                    f"SELECT {_COLUMNS} FROM claims WHERE starts_with(work_key, ?) AND owner <> ?", [prefix, self.owner]
                ).fetchall()
            held = {h.work_key: h for h in (Holder(*r) for r in found)}
            blocking = [h for k, h in held.items() if k not in keys and h.owner != self.owner]
            if any(h.dead_because(now) is None for h in blocking):
                return []
            granted: list[str] = []
            for key in keys:
                h = held.get(key)
                if h is not None and h.owner != self.owner:
                    why = h.dead_because(now)
                    if why is None:
                        continue
                    self._take_over(con, h, why, now)
                granted.append(key)
            if granted:
                expires = now + self.lease_s
                con.executemany(
                    f"INSERT OR REPLACE INTO claims ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            k,
                            k.split(":", 1)[0],
                            self.owner,
                            HOST,
                            self.pid,
                            self.proc_start,
                            self.run_id,
                            now,
                            now,
                            expires,
                        )
                        for k in granted
                    ],
                )
        deadline = time.monotonic() + self.lease_s
        with self._lock:
            for k in granted:
                self._state.expiry[k] = deadline
        self._start_heartbeat()
        return granted

    def claim_unfinished(
        self, keys: Sequence[str], finished: Callable[[list[str]], Iterable[str]], unless: Sequence[str] = ()
    ) -> list[str]:
        """Claim those of ``keys`` that nobody alive holds and that are not finished yet.

        ``finished(granted)`` names the granted keys whose result is already committed; it runs in
        the same transaction as the claim, so work another writer committed a moment ago (and
        released) is never done again. Those keys are released at once.
        """
        with self.store.transaction():
            granted = self.claim(keys, unless=unless)
            done = set(finished(granted)) if granted else set()
            if done:
                self.release(done)
        return [k for k in granted if k not in done]

    def _take_over(self, con: Any, h: Holder, why: str, now: float) -> None:
        """Log the takeover and mark the dead owner's running ``runs`` rows abandoned."""
        log.warning("taking over %s from %s: %s", h.work_key, h.describe(now), why)
        con.execute(
            "UPDATE runs SET status = 'abandoned', finished_at = now(), message = ? "
            "WHERE owner = ? AND status = 'running'",
            [f"owner {h.describe(now)} died: {why}; its work was taken over", f"{h.owner}"],
        )

    def _reap(self) -> None:
        """Release every claim of writers that died (and close their running rows), with a log line each."""
        with self.store.transaction() as con:
            now = time.time()
            rows = con.execute(f"SELECT {_COLUMNS} FROM claims WHERE kind = 'writer' AND owner <> ?", [self.owner])
            for h in (Holder(*r) for r in rows.fetchall()):
                why = h.dead_because(now)
                if why is not None:
                    self._take_over(con, h, why, now)
                    con.execute("DELETE FROM claims WHERE owner = ?", [h.owner])

    def release(self, keys: Iterable[str]) -> None:
        """Drop claims of this session (inside the caller's transaction when there is one)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return
        with self.store.transaction() as con:
            con.register("_rel", _keys(keys))
            try:
                con.execute(
                    "DELETE FROM claims WHERE owner = ? AND work_key IN (SELECT work_key FROM _rel)", [self.owner]
                )
            finally:
                con.unregister("_rel")
        with self._lock:
            for k in keys:
                self._state.expiry.pop(k, None)

    def still_mine(self, keys: Sequence[str]) -> bool:
        """Inside a transaction: whether every key is still claimed by this session (not taken over)."""
        keys = list(dict.fromkeys(keys))
        with self.store.transaction() as con:
            con.register("_mine", _keys(keys))
            try:
                n = con.execute(
                    "SELECT count(*) FROM claims JOIN _mine USING (work_key) WHERE owner = ?", [self.owner]
                ).fetchall()[0][0]
            finally:
                con.unregister("_mine")
        return int(n) == len(keys)

    def valid(self, key: str) -> bool:
        """Whether this session may still write for ``key``: held, and renewed recently enough locally.

        Checked before an array write, so a process paused past its lease (and taken over) does not
        write where the new owner writes; the commit re-checks ownership in its transaction.
        """
        with self._lock:
            deadline = self._state.expiry.get(key)
        return deadline is not None and time.monotonic() < deadline - self.lease_s / 4

    def holders(self, keys: Sequence[str], prefix: str | None = None) -> dict[str, Holder]:
        """Claims of other owners among ``keys`` (and keys starting with ``prefix``), live or dead."""
        with self.store.reading() as con:
            found = []
            if keys:
                con.register("_who", _keys(keys))
                try:
                    found = con.execute(
                        f"SELECT {_COLUMNS} FROM claims JOIN _who USING (work_key) WHERE owner <> ?", [self.owner]
                    ).fetchall()
                finally:
                    con.unregister("_who")
            if prefix is not None:
                found += con.execute(
                    f"SELECT {_COLUMNS} FROM claims WHERE starts_with(work_key, ?) AND owner <> ?", [prefix, self.owner]
                ).fetchall()
        return {h.work_key: h for h in (Holder(*r) for r in found)}

    # -- runs rows ---------------------------------------------------------------------------------
    def start_run(
        self,
        flow: str,
        task: str,
        model: str,
        dataset: str,
        key: str | None,
        total: int | None = None,
        started: float | None = None,
    ) -> RunEntry:
        """Insert a ``running`` row for work this session starts; the heartbeat keeps it fresh.

        ``total``: the rows or outputs it sets out to compute, if known (``safeport status`` shows an ETA).
        ``started``: when the work began (epoch seconds), if before now (a worker's first chunk).
        """
        entry = RunEntry(uuid.uuid4().hex[:16], time.time() if started is None else started, total=total)
        with self.store.transaction() as con:
            con.execute(
                "INSERT INTO runs (run_id, flow, task, model, dataset, unit_key, status, rows, tokens, seconds, "
                "started_at, finished_at, message, owner, heartbeat_at, entry_id, total) "
                "VALUES (?, ?, ?, ?, ?, ?, 'running', 0, 0, 0, to_timestamp(?), NULL, '', ?, now(), ?, ?)",
                [self.run_id, flow, task, model, dataset, key, entry.started, self.owner, entry.entry_id, total],
            )
        with self._lock:
            self._state.runs[entry.entry_id] = entry
        self._start_heartbeat()
        return entry

    def progress(self, entry: RunEntry, rows: int = 0, tokens: int = 0) -> None:
        """Add to a running row's counts; written with the caller's transaction if it has one, else by the heartbeat."""
        entry.rows += rows
        entry.tokens += tokens
        if self.store.in_transaction():
            with self.store.transaction() as con:  # joins the caller's transaction
                self._write_progress(con, [entry])

    def finish_run(self, entry: RunEntry, status: str, message: str = "") -> None:
        with self.store.transaction() as con:
            con.execute(
                "UPDATE runs SET status = ?, rows = ?, tokens = ?, seconds = ?, finished_at = now(), "
                "heartbeat_at = now(), message = ? WHERE entry_id = ?",
                [status, entry.rows, entry.tokens, time.time() - entry.started, message, entry.entry_id],
            )
        with self._lock:
            self._state.runs.pop(entry.entry_id, None)

    @staticmethod
    def _write_progress(con: Any, entries: Sequence[RunEntry]) -> None:
        if entries:
            con.executemany(
                "UPDATE runs SET rows = ?, tokens = ?, seconds = ?, total = ?, heartbeat_at = now() WHERE entry_id = ?",
                [(e.rows, e.tokens, time.time() - e.started, e.total, e.entry_id) for e in entries],
            )

    # -- heartbeat -----------------------------------------------------------------------------------
    def renew(self) -> None:
        """Extend every lease of this session and write running rows' progress (one transaction)."""
        with self._lock:
            runs = list(self._state.runs.values())
        now = time.time()
        with self.store.transaction() as con:
            kept = {
                r[0]
                for r in con.execute(
                    "UPDATE claims SET heartbeat_at = ?, expires_at = ? WHERE owner = ? RETURNING work_key",
                    [now, now + self.lease_s, self.owner],
                ).fetchall()
            }
            self._write_progress(con, runs)
        deadline = time.monotonic() + self.lease_s
        with self._lock:
            lost = set(self._state.expiry) - kept
            for k in lost:
                self._state.expiry.pop(k)
            for k in kept:
                self._state.expiry[k] = deadline
        if lost:
            log.warning(
                "store %s: %d claim(s) of this process were taken over by another writer while its lease had "
                "expired (%s); that work is left to the new owner",
                self.store.root,
                len(lost),
                ", ".join(sorted(lost)[:3]),
            )

    def _start_heartbeat(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._beat, name=f"safeport-heartbeat-{self.owner}", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except Exception as err:  # a busy or failing store: the next beat tries again
                log.warning("store %s: heartbeat failed (%s); retrying", self.store.root, err)

    def close(self) -> None:
        """Stop the heartbeat, drop every claim of this session and mark rows still running ``failed``."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            runs = list(self._state.runs.values())
            self._state.runs.clear()
            self._state.expiry.clear()
        with self.store.transaction() as con:
            con.execute("DELETE FROM claims WHERE owner = ?", [self.owner])
            for e in runs:
                con.execute(
                    "UPDATE runs SET status = 'failed', rows = ?, tokens = ?, seconds = ?, finished_at = now(), "
                    "message = 'stopped before it finished (an error or an interrupt); rerun to resume' "
                    "WHERE entry_id = ?",
                    [e.rows, e.tokens, time.time() - e.started, e.entry_id],
                )


def live_writers(store: Store) -> list[Holder]:
    """Writers whose presence claim is alive (``writer:`` claims whose owner is not dead)."""
    if "claims" not in store.tables():
        return []
    now = time.time()
    rows = store.fetchall(f"SELECT {_COLUMNS} FROM claims WHERE kind = 'writer' ORDER BY claimed_at")
    return [h for h in (Holder(*r) for r in rows) if h.dead_because(now) is None]
