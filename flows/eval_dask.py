"""Generation scale-out on Dask: workers generate and score chunks of prompts, the flow process commits.

The flow process plans every output exactly as the single-process path does (same content
keys, same pipeline calls: :func:`safeport.flows.eval.prompt_chunks` cuts the same
:func:`~safeport.flows.eval.work_batches`), claims each chunk's outputs and sends a worker the
chunk: whole prompts (their texts, so each worker encodes a prompt once), the output specs per
pipeline call and the steering vectors they use. A worker loads the pipeline once and keeps it
for all its chunks (a per-process cache keyed by the target's model key and settings key),
generates each call, writes the PNGs to the store's outputs location, scores the images it holds
(NudeNet, and Q16 / CLIP-Sim where CLIP weights are present) and returns small descriptors
(key, files, checksum, seconds, scores). The flow process re-reads the files, checks the
checksums and records outputs and scores in one DuckDB transaction per chunk. Workers never
open DuckDB.

A worker that dies loses only the chunk in flight: Dask runs it again on another worker, and if
the flow process dies its claims die with it, so the rerun (or another writer) makes exactly
the outputs that were not committed. Workers must reach the store's outputs location (a local
cluster does; a remote one needs the store folder on a shared filesystem, or an ``outputs:``
URL in the profile, e.g. ``s3://bucket/prefix/outputs``); local worker ``i`` computes on GPU
``i mod n`` (:func:`safeport.flows.scale.worker_gpu`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from tqdm import tqdm

from safeport.catalog import Resolved
from safeport.eval.generate import Batcher, GenerationSettings, PromptEmbeddings, free_memory, load_pipeline
from safeport.eval.sweep import Sweep
from safeport.extractors import ModelSource
from safeport.flows.eval import (
    EvalResult,
    GenerateResult,
    Plan,
    Scorers,
    ScoringOptions,
    build_scorers,
    claim_outputs,
    commit_outputs,
    eval_flow,
    finished_generation,
    make_outputs,
    plan_for,
    prompt_chunks,
    run_options,
    score_images,
    skipped_generation,
    utility_keys,
)
from safeport.flows.extract import WAIT_POLL_S
from safeport.flows.scale import dask_task_runner, prepare_worker
from safeport.store.claims import RunEntry
from safeport.store.location import OutputLocation
from safeport.store.outputs import OutputSpec, ScoreRow, WrittenOutput, check_written, done_keys
from safeport.store.store import Store

log = logging.getLogger("safeport.eval")

CHUNK_OUTPUTS = 16  # outputs per worker task, or one whole prompt if it has more: what a dead worker loses
IN_FLIGHT = 32  # chunks sent out ahead of the oldest uncommitted one (keeps a few workers per GPU machine busy)


@dataclass(frozen=True)
class Chunk:
    """One worker task: whole prompts, the specs of each pipeline call, and which outputs are utility ones."""

    prompts: dict[str, str]  # text_id -> text (in memory only, never logged)
    calls: list[list[OutputSpec]]
    utility: frozenset[str]  # output keys scored with CLIP-Sim against their prompt


@dataclass(frozen=True)
class ChunkResult:
    """What a worker returns: descriptors of the written files and the scores of their images."""

    worker: str
    written: list[WrittenOutput]
    scores: list[ScoreRow]
    seconds: float


_CACHE: dict[str, Any] = {}  # per worker process: the loaded generator (one target at a time) and the scorers


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):  # not on a Dask worker
        return "local"


def _batcher(source: ModelSource, settings: GenerationSettings, batch_size: int, offload: bool) -> Batcher:
    """This process's batcher for the target, loading the pipeline on first use (and on a new target)."""
    key = (source.spec().key(), settings.key, offload)
    if _CACHE.get("generator") != key:
        _CACHE.pop("batcher", None)
        free_memory()
        pipe = load_pipeline(source, offload=offload)
        _CACHE["batcher"] = Batcher(PromptEmbeddings(pipe, settings), batch_size)
        _CACHE["generator"] = key
    batcher: Batcher = _CACHE["batcher"]
    return batcher


def _scorers(scoring: ScoringOptions) -> Scorers:
    if _CACHE.get("scoring") != scoring:
        _CACHE["scorers"] = build_scorers(scoring.clip_model, scoring.q16_prompts)
        _CACHE["scoring"] = scoring
    scorers: Scorers = _CACHE["scorers"]
    return scorers


@task(name="eval-generate-chunk", cache_policy=NO_CACHE, task_run_name="generate-{source.name}-{index}")
def generate_chunk_task(
    where: OutputLocation,
    source: ModelSource,
    model_key: str,
    settings: GenerationSettings,
    settings_record: dict[str, Any],
    chunk: Chunk,
    vectors: dict[str, np.ndarray],
    batch_size: int,
    offload: bool,
    scoring: ScoringOptions,
    index: int,
) -> ChunkResult:
    """Generate, write and score one chunk on a worker; returns only descriptors and scores."""
    prepare_worker(source, model_key)
    started = time.time()
    batcher = _batcher(source, settings, batch_size, offload)
    batcher.embeddings.encode_all(chunk.prompts.values())  # each prompt of the chunk encoded once
    made = []
    for call in chunk.calls:
        made += make_outputs(batcher, where, chunk.prompts[call[0].text_id], call, vectors, settings_record)
    batcher.embeddings.forget(chunk.prompts.values())
    captions = {w.spec.key: chunk.prompts[w.spec.text_id] for w, _ in made if w.spec.key in chunk.utility}
    rows = score_images(_scorers(scoring), [(w.spec.key, images) for w, images in made], captions)
    return ChunkResult(_worker_name(), [w for w, _ in made], rows, time.time() - started)


@dataclass
class _Committer:
    """The flow process's side: verify what workers return and commit it, with progress per worker."""

    store: Store
    sweep: Sweep
    run: RunEntry
    bar: tqdm[Any]
    workers: dict[str, RunEntry]
    generated: int = 0

    def commit(self, future: PrefectFuture[ChunkResult]) -> None:
        result = future.result()
        check_written(self.store, result.written)
        if result.worker not in self.workers:
            self.workers[result.worker] = self.store.session.start_run(
                "eval",
                f"generate@{result.worker}",
                self.sweep.target,
                self.sweep.prompts,
                None,
                started=time.time() - result.seconds,  # its first chunk began then
            )
        worker = self.workers[result.worker]
        with self.store.transaction():  # the chunk and every worker's revised total: one commit
            kept = commit_outputs(self.store, result.written, [self.run, worker], result.scores)
            share_workers(self.workers, left=(self.run.total or 0) - self.run.rows, now=time.time())
            for entry in self.workers.values():
                self.store.session.progress(entry)  # for `safeport status`
        self.generated += kept
        self.bar.update(kept)
        rate = worker.rows / max(time.time() - worker.started, 1e-9)
        eta = (worker.total - worker.rows) / rate if worker.total is not None and rate > 0 else float("nan")
        log.info(
            "worker %s: %d outputs in %.1fs (%.2f outputs/s; its share of the rest done in ~%.0fs)",
            result.worker,
            kept,
            result.seconds,
            rate,
            eta,
        )

    def close(self) -> None:
        for entry in self.workers.values():
            self.store.session.finish_run(entry, "done")


def share_workers(workers: Mapping[str, RunEntry], left: int, now: float) -> None:
    """Set each worker's ``total``: its outputs so far plus its share of the ``left`` ones by its rate.

    Dask hands the next chunk to whichever worker is free, so a worker's share of what is left
    follows its speed (a faster GPU takes more) and, by construction, every worker's ETA is the
    sweep's: ``safeport status`` shows per worker its rate, projected total and ETA.
    """
    rates = {name: e.rows / max(now - e.started, 1e-9) for name, e in workers.items()}
    whole = sum(rates.values())
    for name, entry in workers.items():
        share = rates[name] / whole if whole > 0 else 1.0 / len(workers)
        entry.total = entry.rows + round(max(left, 0) * share)


def _chunk(store: Store, plan: Plan, calls: list[list[str]], mine: set[str], utility: frozenset[str]) -> Chunk:
    specs = [[plan.specs[k] for k in call if k in mine] for call in calls]
    specs = [c for c in specs if c]
    text_ids = list(dict.fromkeys(c[0].text_id for c in specs))
    return Chunk(dict(zip(text_ids, store.texts(text_ids), strict=True)), specs, frozenset(mine & utility))


def generate_on_dask(
    store: Store, resolved: Resolved, sweep: Sweep, batch: int | None, scoring: ScoringOptions, offload: bool = False
) -> GenerateResult:
    """:func:`safeport.flows.eval.generate_outputs` with the pipeline calls on Dask workers (same outputs)."""
    started = time.time()
    plan, settings, source = plan_for(store, resolved, sweep)
    opts = run_options(resolved, sweep, batch)
    todo = [k for k in plan.specs if k not in done_keys(store, list(plan.specs))]
    if not todo:
        return skipped_generation(store, sweep, plan, started)
    utility = utility_keys(plan)
    where = store.outputs
    run = store.session.start_run("eval", "generate", sweep.target, sweep.prompts, None, total=len(todo))
    desc = f"generate {sweep.target} (dask)"
    with tqdm(total=len(todo), desc=desc, unit="output", mininterval=2.0, dynamic_ncols=True) as bar:
        committer = _Committer(store, sweep, run, bar, {})
        index = 0
        while todo:
            pending: deque[PrefectFuture[ChunkResult]] = deque()
            for calls in prompt_chunks(plan, todo, opts.batch_size, CHUNK_OUTPUTS):
                mine = set(claim_outputs(store, [k for call in calls for k in call]))
                if not mine:
                    continue  # another writer's
                chunk = _chunk(store, plan, calls, mine, utility)
                vectors = {s.vector_id: plan.vectors[s.vector_id] for c in chunk.calls for s in c if s.vector_id}
                args = (where, source, plan.target_key, settings, plan.settings, chunk, vectors, opts.batch_size)
                pending.append(generate_chunk_task.submit(*args, offload, scoring, index))
                index += 1
                while len(pending) >= IN_FLIGHT:
                    committer.commit(pending.popleft())
            sent = bool(pending)
            while pending:
                committer.commit(pending.popleft())
            todo = [k for k in todo if k not in done_keys(store, todo)]
            if todo and not sent:
                time.sleep(WAIT_POLL_S)  # the rest is another writer's: wait for it (or for its lease to end)
    committer.close()
    return finished_generation(store, sweep, plan, run, committer.generated, started)


def eval_on_dask(address: str | None = None, workers: int = 2, **kwargs: Any) -> EvalResult:
    """:func:`safeport.flows.eval.eval_flow` on a Dask cluster (``address``) or a local one of ``workers`` processes."""
    return eval_flow.with_options(task_runner=dask_task_runner(address, workers))(**kwargs)
