"""One runner for every stage that produces stored work: plan → claim → compute → commit → record.

A stage (:class:`Stage`) says three things: its **work** (pieces with content-keyed claim keys,
each belonging to a **group**, the thing one ``runs`` row reports: a unit, a fit, a sweep), how
to **compute** one piece (:meth:`Stage.prepare` returns a :class:`Call`: a module-level function
and its arguments, so it can run in this process or on a Dask worker) and what to **commit**
(:meth:`Stage.commit`, called inside the one short transaction that also releases the claim).
The runner does the rest, the same way for every stage:

- **claim** each piece's keys (a lease, renewed by the session's heartbeat; :mod:`safeport.store.claims`)
  in the transaction that checks they are not finished yet, so work another writer committed a
  moment ago is never done again; keys other writers hold are left to them;
- **compute** it through an executor: :class:`InProcess`, or :class:`OnDask` (Prefect's
  ``DaskTaskRunner``: workers compute and write arrays or files, never DuckDB);
- **commit** in one transaction: only the keys still this writer's (a writer paused past its
  lease loses them to the one that took them over), the stage's records, the claim release and
  the progress of the group's ``runs`` row;
- **record**: a ``running`` row per group while it has work (``total`` = what it set out to
  compute, for ETAs), ``done`` or ``skipped`` at the end; on Dask one more row per worker
  (``<task>@<worker>``) with its rate and projected share (:func:`share_workers`);
- **wait** at the end for pieces other writers hold (taking them over if their owner dies), with
  a log line every 30 s naming who holds them; a progress bar throughout. Interrupts propagate:
  the session marks the running rows failed and drops the claims; committed work is kept.

A stage that needs the store to compute (a fit reads rows and writes artefacts) sets
``remote = False`` and always computes here.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from tqdm import tqdm

from safeport.store.claims import RunEntry
from safeport.store.store import Store

log = logging.getLogger("safeport.runner")

WAIT_POLL_S = 1.0  # how often a writer looks again at work another writer holds
NOTE_EVERY_S = 30.0  # how often it says who holds that work
IN_FLIGHT = 32  # pieces sent to Dask ahead of the oldest uncommitted one


@dataclass(frozen=True)
class Group:
    """What one ``runs`` row reports: a unit, a fit, a sweep (``key``: its content key, if it has one)."""

    model: str
    dataset: str
    key: str | None = None
    record: bool = True  # False: part of another group's run (e.g. planning a unit), no ``runs`` row of its own


@dataclass(frozen=True)
class Work:
    """One piece of work: the claim keys it covers (all granted, or the granted part), its group, its size."""

    keys: tuple[str, ...]
    group: Group
    size: int = 1  # rows, outputs, texts: what progress and ETAs count
    unless: tuple[str, ...] = ()  # claims (held by another writer) that keep this piece unclaimed


@dataclass(frozen=True)
class Call:
    """What to compute: ``fn(*args)``, a module-level function (picklable, so it can run on a Dask worker).

    ``fn`` may return a result or an iterator of partial results: each part is committed as it
    comes when computing here (slow outputs reach the store sooner); a worker returns them all.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    label: str = ""


@dataclass(frozen=True)
class Done:
    """What a commit added to its group's ``runs`` row."""

    rows: int = 0
    tokens: int = 0


class Stage(Protocol):
    """A stage that produces stored work; see the module docstring."""

    flow: str  # ``runs.flow``
    task: str  # ``runs.task``
    unit: str  # what the progress bar counts ("text", "output", ...)
    remote: bool  # whether ``prepare``'s call may run on a Dask worker (it must not need the store)

    def groups(self) -> Sequence[Group]:
        """Every group of this run, those with nothing left to do included (they are recorded as skipped)."""
        ...

    def work(self) -> Sequence[Work]:
        """The pieces not finished when the run starts, in the order to do them."""
        ...

    def finished(self, keys: list[str]) -> Iterable[str]:
        """Which of these claim keys are committed already (called inside the claim's transaction)."""
        ...

    def prepare(self, work: Work, keys: list[str]) -> Call | None:
        """The computation of the claimed ``keys`` of ``work`` (reads what it needs from the store here)."""
        ...

    def commit(self, work: Work, keys: list[str], result: Any, remote: bool) -> Done:
        """Record ``result`` for ``keys`` (those still this writer's), inside the runner's transaction.

        ``remote``: it was computed on a worker, so files or arrays it wrote must be re-read and
        checked before they are recorded.
        """
        ...

    def close(self, group: Group, computed: bool) -> None:
        """Every piece of ``group`` is finished (by this writer or others): e.g. mark a unit done."""
        ...


class KeyedStage:
    """The common stage shape: one piece per group, named by the group's content key, finished when its artefact is.

    A subclass sets ``prefix`` (the claim kind), lists its groups (``Group.key`` set) and says when a
    key's artefact is stored (:meth:`done`); it adds ``prepare`` and ``commit``.
    """

    prefix = ""
    remote = False

    def groups(self) -> list[Group]:
        raise NotImplementedError

    def done(self, key: str) -> bool:
        raise NotImplementedError

    def work(self) -> list[Work]:
        return [Work((f"{self.prefix}:{g.key}",), g) for g in self.groups() if not self.done(g.key or "")]

    def finished(self, keys: list[str]) -> list[str]:
        return [k for k in keys if self.done(k.split(":", 1)[1])]

    def close(self, group: Group, computed: bool) -> None:
        """Nothing to do once a keyed piece is committed: its artefact is its record."""


@dataclass(frozen=True)
class GroupResult:
    group: Group
    status: str  # done | skipped
    rows: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class Finished:
    """A computed piece, back from an executor."""

    work: Work
    keys: list[str]
    parts: Iterator[Any]
    worker: str
    seconds: float


class Executor(Protocol):
    remote: bool

    def submit(self, work: Work, keys: list[str], call: Call) -> None: ...

    def ready(self, keep: int) -> Iterator[Finished]:
        """Computed pieces in submission order: waits until at most ``keep`` are in flight, then takes
        those already computed at the front too."""
        ...

    def pending(self) -> int: ...


class InProcess:
    """Computes each piece here, when it is submitted (its parts are committed as they come)."""

    remote = False

    def __init__(self) -> None:
        self._done: deque[Finished] = deque()

    def submit(self, work: Work, keys: list[str], call: Call) -> None:
        started = time.time()
        out = call.fn(*call.args)
        parts = out if isinstance(out, Iterator) else iter([out])
        self._done.append(Finished(work, keys, parts, "local", time.time() - started))

    def ready(self, keep: int) -> Iterator[Finished]:
        while self._done:
            yield self._done.popleft()

    def pending(self) -> int:
        return len(self._done)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):  # not on a Dask worker
        return "local"


@task(name="compute", cache_policy=NO_CACHE, task_run_name="{label}")
def compute_task(fn: Callable[..., Any], args: tuple[Any, ...], label: str) -> tuple[str, float, list[Any]]:
    """A piece computed on a Dask worker: (worker name, seconds, its parts)."""
    started = time.time()
    out = fn(*args)
    parts = list(out) if isinstance(out, Iterator) else [out]
    return _worker_name(), time.time() - started, parts


class OnDask:
    """Sends each piece to Prefect's task runner (a ``DaskTaskRunner``); results come back in order."""

    remote = True

    def __init__(self) -> None:
        self._futures: deque[tuple[Work, list[str], PrefectFuture[tuple[str, float, list[Any]]]]] = deque()

    def submit(self, work: Work, keys: list[str], call: Call) -> None:
        label = call.label or work.group.model
        self._futures.append((work, keys, compute_task.submit(call.fn, call.args, label)))

    def ready(self, keep: int) -> Iterator[Finished]:
        while self._futures and (len(self._futures) > keep or self._futures[0][2].state.is_final()):
            work, keys, future = self._futures.popleft()
            worker, seconds, parts = future.result()
            yield Finished(work, keys, iter(parts), worker, seconds)

    def pending(self) -> int:
        return len(self._futures)


def on_dask() -> bool:
    """Whether the running flow's tasks go to Dask workers (its task runner is a ``DaskTaskRunner``)."""
    ctx = FlowRunContext.get()
    return ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner"


def executor_for_flow() -> Executor:
    """The executor of the running flow: Dask when its task runner is Dask's, else this process."""
    return OnDask() if on_dask() else InProcess()


def share_workers(workers: Mapping[str, RunEntry], left: int, now: float) -> None:
    """Set each worker's ``total``: its rows so far plus its share of the ``left`` ones by its rate.

    Dask hands the next piece to whichever worker is free, so a worker's share of what is left
    follows its speed (a faster GPU takes more) and, by construction, every worker's ETA is the
    run's: ``safeport status`` shows per worker its rate, projected total and ETA.
    """
    rates = {name: e.rows / max(now - e.started, 1e-9) for name, e in workers.items()}
    whole = sum(rates.values())
    for name, entry in workers.items():
        share = rates[name] / whole if whole > 0 else 1.0 / len(workers)
        entry.total = entry.rows + round(max(left, 0) * share)


@dataclass
class _Tally:
    entry: RunEntry | None = None
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0  # computing and committing its pieces (a generator's parts compute as they are taken)
    computed: bool = False
    open: set[str] = field(default_factory=set)  # claim keys not known finished
    closed: bool = False


class _Run:
    """One stage run by one writer: claims, commits, runs rows, progress (see the module docstring)."""

    def __init__(self, store: Store, stage: Stage, executor: Executor, desc: str) -> None:
        self.store, self.stage, self.executor = store, stage, executor
        self.remote = executor.remote and stage.remote
        self.started = time.time()
        self.tallies: dict[Group, _Tally] = {g: _Tally() for g in stage.groups()}
        self.work = list(stage.work())
        for w in self.work:
            self.tallies.setdefault(w.group, _Tally()).open.update(w.keys)
        self.workers: dict[str, RunEntry] = {}
        self.committed: set[str] = set()  # claim keys this writer committed (counted on the bar already)
        total = sum(w.size for w in self.work)
        self.bar = tqdm(total=total, desc=desc, unit=stage.unit, mininterval=2.0, dynamic_ncols=True, disable=not total)

    # -- claims ----------------------------------------------------------------------------------
    def _claim(self, work: Work) -> list[str]:
        stage = self.stage
        return self.store.session.claim_unfinished(list(work.keys), lambda ks: list(stage.finished(ks)), work.unless)

    def _entry(self, group: Group) -> RunEntry | None:
        tally = self.tallies[group]
        if tally.entry is None and group.record:
            total = sum(w.size for w in self.work if w.group == group)
            tally.entry = self.store.session.start_run(
                self.stage.flow, self.stage.task, group.model, group.dataset, group.key, total=total
            )
        return tally.entry

    # -- commits ---------------------------------------------------------------------------------
    def _commit(self, done: Finished) -> None:
        store, work = self.store, done.work
        tally = self.tallies[work.group]
        started = time.monotonic()
        entry = self._entry(work.group)
        worker = self._worker(done) if self.remote and work.group.record else None
        parts = list(done.parts) if self.remote else done.parts
        last: tuple[int, ...] = ()
        for part in parts:
            with store.transaction():
                kept = [k for k in done.keys if store.session.still_mine([k])]
                if len(kept) < len(done.keys):
                    log.warning(
                        "%d piece(s) of %s were taken over by another writer while this one computed them (its "
                        "lease had expired); their results here are dropped",
                        len(done.keys) - len(kept),
                        work.group.model,
                    )
                added = self.stage.commit(work, kept, part, self.remote)
                if entry is not None:
                    store.session.progress(entry, added.rows, added.tokens)
                if worker is not None:
                    store.session.progress(worker, added.rows, added.tokens)
                    left = (entry.total or 0) - entry.rows if entry is not None else 0
                    share_workers(self.workers, left=left, now=time.time())
                    for w in self.workers.values():
                        store.session.progress(w)
            tally.rows, tally.tokens = tally.rows + added.rows, tally.tokens + added.tokens
            tally.computed = tally.computed or bool(kept)
            last = (added.rows,)
        with store.transaction():
            store.session.release(done.keys)
        tally.seconds += done.seconds + time.monotonic() - started
        tally.open.difference_update(done.keys)
        self.committed.update(done.keys)
        self.bar.update(work.size)
        if worker is not None and last:
            rate = worker.rows / max(time.time() - worker.started, 1e-9)
            eta = (worker.total - worker.rows) / rate if worker.total is not None and rate > 0 else float("nan")
            log.info(
                "worker %s: %s in %.1fs (%.2f %s/s; its share of the rest done in ~%.0fs)",
                done.worker,
                work.group.model,
                done.seconds,
                rate,
                self.stage.unit,
                eta,
            )
        self._close_if_done(work.group)

    def _worker(self, done: Finished) -> RunEntry:
        if done.worker not in self.workers:
            group = done.work.group
            self.workers[done.worker] = self.store.session.start_run(
                self.stage.flow,
                f"{self.stage.task}@{done.worker}",
                group.model,
                group.dataset,
                None,
                started=time.time() - done.seconds,  # its first piece began then
            )
        return self.workers[done.worker]

    def _close_if_done(self, group: Group) -> None:
        tally = self.tallies[group]
        if tally.open or tally.closed:
            return
        tally.closed = True
        self.stage.close(group, tally.computed)
        status = "done" if tally.computed else "skipped"
        if not group.record:
            return
        with self.store.transaction():
            if tally.entry is not None:
                self.store.session.finish_run(tally.entry, status)
            else:
                seconds = time.time() - self.started
                self.store.record_run(
                    self.store.run_id, self.stage.flow, self.stage.task, group.model, group.dataset, group.key,
                    status, 0, 0, seconds, self.started,
                )  # fmt: skip

    def _drain(self, keep: int) -> None:
        for done in self.executor.ready(keep):
            self._commit(done)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> list[GroupResult]:
        for group, tally in self.tallies.items():
            if not tally.open:
                self._close_if_done(group)
        todo = self.work
        last_note = time.monotonic()
        try:
            while todo:
                progressed = False
                for work in todo:
                    keys = self._claim(work)
                    if not keys:
                        continue
                    self._entry(work.group)
                    call = self.stage.prepare(work, keys)
                    if call is None:  # nothing to compute after all (e.g. found done while preparing)
                        with self.store.transaction():
                            self.store.session.release(keys)
                        continue
                    if not self.remote and not all(self.store.session.valid(k) for k in keys):
                        continue  # the lease ran out before it started: left to whoever takes it over
                    self.executor.submit(work, keys, call)
                    progressed = True
                    self._drain(keep=IN_FLIGHT)
                self._drain(keep=0)
                todo = self._unfinished(todo)
                if todo and not progressed:
                    last_note = self._note(todo, last_note)
                    time.sleep(WAIT_POLL_S)  # the rest is another writer's: wait for it (or its lease to end)
        finally:
            self.bar.close()
        for group in self.tallies:
            self._close_if_done(group)
        for entry in self.workers.values():
            self.store.session.finish_run(entry, "done")
        return [
            GroupResult(g, "done" if t.computed else "skipped", t.rows, t.tokens, t.seconds)
            for g, t in self.tallies.items()
        ]

    def _unfinished(self, todo: list[Work]) -> list[Work]:
        """Pieces with a key not committed yet; groups whose pieces are all finished (by anyone) are closed."""
        keys = [k for w in todo for k in w.keys]
        done = set(self.stage.finished(keys)) if keys else set()
        left = []
        for w in todo:
            rest = tuple(k for k in w.keys if k not in done)
            self.tallies[w.group].open.difference_update(set(w.keys) - set(rest))
            if rest:
                left.append(Work(rest, w.group, w.size, w.unless))
            elif not set(w.keys) <= self.committed:  # finished by another writer
                self.bar.update(w.size)
        for group in {w.group for w in todo}:
            self._close_if_done(group)
        return left

    def _note(self, todo: list[Work], last: float) -> float:
        if time.monotonic() - last < NOTE_EVERY_S:
            return last
        holders = self.store.session.holders([k for w in todo for k in w.keys])
        who = sorted({h.describe() for h in holders.values()})
        log.info(
            "%s: waiting for %d piece(s) held by %s", self.stage.flow, len(todo), "; ".join(who) or "another writer"
        )
        return time.monotonic()


def run_stage(store: Store, stage: Stage, executor: Executor | None = None, desc: str = "") -> list[GroupResult]:
    """Run ``stage`` to completion on ``store`` (see the module docstring); one result per group."""
    return _Run(store, stage, executor or InProcess(), desc or stage.flow).run()
