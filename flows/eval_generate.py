"""The generation and scoring stages of ``safeport eval``, on the one runner (:mod:`safeport.flows.runner`).

**Generation.** A piece is a chunk of whole prompts (:func:`safeport.flows.eval.prompt_chunks`: the
same pipeline calls wherever it runs, so the same outputs): its claim keys are its outputs
(``output:<key>``, content-addressed, so a writer with another batch size never makes an output
another writer claimed). :func:`generate_chunk` runs here or on a Dask worker: it loads the
pipeline once per process (kept for later chunks), encodes each prompt of the chunk once with the
pipeline's own ``encode_prompt``, generates the calls (batched, halved on out-of-memory), writes
the PNGs to the store's outputs location and scores the images it holds (NudeNet always; Q16 and
CLIP-Sim with CLIP weights). The commit records the outputs still claimed and their scores in one
transaction; outputs computed on a worker are re-read and checksum-checked first. Computed here,
a chunk commits as it goes (every :data:`COMMIT_EVERY_S`), so slow outputs (video) reach the store
soon; in this process the text encoders are released after the last chunk's prompts are encoded
(the denoiser alone then holds the GPU).

**Scoring.** Fills gaps only (a crashed writer's outputs, or a detector added later): a piece is
:data:`SCORE_BATCH` committed outputs lacking one metric's score (``score:<metric>:<key>``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from safeport.catalog import Resolved
from safeport.eval.generate import (
    Batcher,
    GenerationSettings,
    Job,
    PromptEmbeddings,
    SafeDigSteering,
    free_memory,
    load_pipeline,
)
from safeport.eval.sweep import Sweep
from safeport.extractors import ModelSource
from safeport.flows.eval import (
    GenerateResult,
    Plan,
    Scorers,
    ScoringOptions,
    build_scorers,
    clip_rows,
    detector_rows,
    load_steering,
    plan_for,
    prompt_chunks,
    run_options,
    score_images,
    utility_keys,
)
from safeport.flows.runner import Call, Done, Executor, Group, Work, run_stage
from safeport.flows.workers import prepare_worker
from safeport.store.location import OutputLocation
from safeport.store.outputs import (
    OutputSpec,
    ScoreRow,
    WrittenOutput,
    check_written,
    done_keys,
    load_images,
    record_outputs,
    save_scores,
    unscored,
    write_output_files_to,
)
from safeport.store.store import Store

log = logging.getLogger("safeport.eval")

GEN_BATCH = 4  # outputs per piece in this process (a crash loses at most one piece in flight) ...
CHUNK_OUTPUTS = 16  # ... and per piece on a Dask worker (or one whole prompt if it has more)
COMMIT_EVERY_S = 10.0  # a piece computed here commits what it made whenever this much time passed
SCORE_BATCH = 16


@dataclass(frozen=True)
class Chunk:
    """One piece of generation: whole prompts, the specs of each pipeline call, which outputs are utility ones."""

    prompts: dict[str, str]  # text_id -> text (in memory only, never logged)
    calls: list[list[OutputSpec]]
    utility: frozenset[str]  # output keys scored with CLIP-Sim against their prompt


@dataclass(frozen=True)
class ChunkResult:
    """What :func:`generate_chunk` returns (per part): the written files' descriptors and their scores."""

    written: list[WrittenOutput]
    scores: list[ScoreRow]


_CACHE: dict[str, Any] = {}  # per process: the loaded generator (one target at a time) and the scorers


def _batcher(source: ModelSource, settings: GenerationSettings, batch_size: int, offload: bool) -> Batcher:
    """This process's batcher for the target, loading the pipeline on first use (and on a new target).

    A pipeline whose text encoders were released is loaded again when new prompts arrive (work
    taken over from a writer that died after this one finished its own prompts).
    """
    key = (source.spec().key(), settings.key, offload)
    held: Batcher | None = _CACHE.get("batcher")
    if _CACHE.get("generator") != key or (held is not None and held.embeddings.released):
        _CACHE.pop("batcher", None)
        free_memory()
        pipe = load_pipeline(source, offload=offload)
        _CACHE["batcher"] = Batcher(PromptEmbeddings(pipe, settings), batch_size)
        _CACHE["generator"] = key
    batcher: Batcher = _CACHE["batcher"]
    batcher.batch_size = min(batcher.batch_size, batch_size)  # a size halved on out-of-memory is kept
    return batcher


def _scorers(scoring: ScoringOptions | None) -> Scorers | None:
    if scoring is None:
        return None
    if _CACHE.get("scoring") != scoring:
        _CACHE["scorers"] = build_scorers(scoring.clip_model, scoring.q16_prompts)
        _CACHE["scoring"] = scoring
    scorers: Scorers = _CACHE["scorers"]
    return scorers


def release_generator() -> None:
    """Drop this process's pipeline and scorers (after a sweep run in the flow process)."""
    _CACHE.clear()
    free_memory()


def generate_chunk(
    where: OutputLocation,
    source: ModelSource,
    model_key: str,
    settings: GenerationSettings,
    settings_record: dict[str, Any],
    chunk: Chunk,
    vectors: dict[str, np.ndarray],
    steering: dict[str, SafeDigSteering],
    batch_size: int,
    offload: bool,
    scoring: ScoringOptions | None,
    release_encoders: bool,
) -> Iterator[ChunkResult]:
    """Generate, write and score one chunk; yields its outputs in parts (every :data:`COMMIT_EVERY_S`).

    ``vectors`` and ``steering`` (SafeDIG variants, with their arrays) are keyed by the outputs'
    ``vector_id``. A SafeDIG variant with text-encoder positions encodes its prompts under the hooks,
    so this chunk keeps the text encoders until its last call.
    """
    prepare_worker(source, model_key)
    batcher = _batcher(source, settings, batch_size, offload)
    batcher.embeddings.encode_all(chunk.prompts.values())  # each prompt of the chunk encoded once
    hooked_encoding = any(v.split()[0].positions for v in steering.values())
    if release_encoders and not hooked_encoding:
        batcher.embeddings.release_text_encoders()
    scorers = _scorers(scoring)
    made: list[tuple[WrittenOutput, list[Any]]] = []
    since = time.monotonic()
    for i, call in enumerate(chunk.calls):
        prompt = chunk.prompts[call[0].text_id]
        jobs = [_job(s, vectors, steering) for s in call]
        for s, g in zip(call, batcher.run(prompt, jobs), strict=True):
            made.append((write_output_files_to(where, s, g.images, settings_record, g.seconds), g.images))
        if i == len(chunk.calls) - 1 or time.monotonic() - since >= COMMIT_EVERY_S:
            captions = {w.spec.key: chunk.prompts[w.spec.text_id] for w, _ in made if w.spec.key in chunk.utility}
            rows = score_images(scorers, [(w.spec.key, images) for w, images in made], captions)
            yield ChunkResult([w for w, _ in made], rows)
            made, since = [], time.monotonic()
    batcher.embeddings.forget(chunk.prompts.values())
    if release_encoders and hooked_encoding:
        batcher.embeddings.release_text_encoders()


def _job(spec: OutputSpec, vectors: Mapping[str, np.ndarray], steering: Mapping[str, SafeDigSteering]) -> Job:
    """The generation job of one output: SafeDIG (strength s in ``alpha``), a vector, or the original."""
    if spec.vector_id in steering:
        return Job(None, spec.alpha, spec.seed, steering[spec.vector_id])
    return Job(vectors[spec.vector_id] if spec.vector_id else None, spec.alpha, spec.seed)


class GenerateStage:
    """Every output of one target's sweep that is not committed yet (see the module docstring)."""

    flow, task, unit, remote = "eval", "generate", "output", True

    def __init__(
        self,
        store: Store,
        resolved: Resolved,
        sweep: Sweep,
        batch: int | None,
        scoring: ScoringOptions | None,
        offload: bool,
        on_workers: bool,
    ) -> None:
        self.store, self.sweep, self.scoring, self.offload = store, sweep, scoring, offload
        self.plan, self.settings, self.source = plan_for(store, resolved, sweep)
        self.opts = run_options(resolved, sweep, batch)
        self.on_workers = on_workers
        self.utility = utility_keys(self.plan)
        self.group = Group(sweep.target, sweep.prompts)
        self.todo = [k for k in self.plan.specs if k not in done_keys(store, list(self.plan.specs))]
        at_least = CHUNK_OUTPUTS if on_workers else GEN_BATCH
        self.chunks = prompt_chunks(self.plan, self.todo, self.opts.batch_size, at_least)
        self.calls = {_key(c): c for c in self.chunks}
        variants = {self.plan.specs[k].vector_id for k in self.todo} & set(self.plan.variants)
        # The bundles' arrays are read only when SafeDIG outputs are left to make.
        self.steering = load_steering(store, [self.plan.variants[v] for v in sorted(variants)])

    def groups(self) -> list[Group]:
        return [self.group]

    def work(self) -> list[Work]:
        return [
            Work(tuple(f"output:{k}" for call in c for k in call), self.group, sum(len(call) for call in c))
            for c in self.chunks
        ]

    def finished(self, keys: list[str]) -> list[str]:
        outputs = [k.removeprefix("output:") for k in keys]
        done = done_keys(self.store, outputs)
        return [f"output:{k}" for k in outputs if k in done]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        mine = {k.removeprefix("output:") for k in keys}
        specs = [[self.plan.specs[k] for k in call if k in mine] for call in self.calls[_key_of(work)]]
        specs = [c for c in specs if c]
        text_ids = list(dict.fromkeys(c[0].text_id for c in specs))
        chunk = Chunk(
            dict(zip(text_ids, self.store.texts(text_ids), strict=True)), specs, frozenset(mine & self.utility)
        )
        vectors = {
            s.vector_id: self.plan.vectors[s.vector_id] for c in specs for s in c if s.vector_id in self.plan.vectors
        }
        steering = {s.vector_id: self.steering[s.vector_id] for c in specs for s in c if s.vector_id in self.steering}
        last = not self.on_workers and _key_of(work) == _key(self.chunks[-1])
        args = (
            self.store.outputs,
            self.source,
            self.plan.target_key,
            self.settings,
            self.plan.settings,
            chunk,
            vectors,
            steering,
            self.opts.batch_size,
            self.offload,
            self.scoring,
            last,
        )
        return Call(generate_chunk, args, f"generate-{self.sweep.target}")

    def commit(self, work: Work, keys: list[str], result: ChunkResult, remote: bool) -> Done:
        mine = {k.removeprefix("output:") for k in keys}
        kept = [w for w in result.written if w.spec.key in mine]
        if remote:
            check_written(self.store, kept)
        record_outputs(self.store, kept)
        save_scores(self.store, [r for r in result.scores if r.output_key in mine])
        return Done(len(kept))

    def close(self, group: Group, computed: bool) -> None:
        pass


def _key(chunk: Sequence[Sequence[str]]) -> str:
    return chunk[0][0]  # a chunk's first output names it (every output is in one chunk)


def _key_of(work: Work) -> str:
    return work.keys[0].removeprefix("output:")


def generate_sweep(
    store: Store,
    resolved: Resolved,
    sweep: Sweep,
    executor: Executor,
    batch: int | None = None,
    scoring: ScoringOptions | None = None,
    offload: bool = False,
) -> GenerateResult:
    """Generate and commit every output of ``sweep`` not already done (resumable, shareable between writers)."""
    started = time.time()
    stage = GenerateStage(store, resolved, sweep, batch, scoring, offload, executor.remote)
    if stage.todo:
        desc = f"generate {sweep.target}" + (" (dask)" if executor.remote else "")
        (result,) = run_stage(store, stage, executor, desc=desc)
        generated = result.rows
    else:
        (result,) = run_stage(store, stage, executor)  # records the sweep as skipped, loads nothing
        generated = 0
        log.info("%s: all %d outputs already in the store", sweep.target, len(stage.plan.specs))
    if not executor.remote:
        release_generator()
    seconds = time.time() - started
    planned = len(stage.plan.specs)
    if generated:
        log.info(
            "%s: generated %d outputs (the other %d were there or made by another writer) in %.1fs",
            sweep.target,
            generated,
            planned - generated,
            seconds,
        )
    return GenerateResult(sweep.target, planned, generated, planned - generated, seconds)


# --- scoring ----------------------------------------------------------------------------------------


def _detector_rows(store: Store, name: str, scorers: Scorers, keys: list[str]) -> list[ScoreRow]:
    det = next(d for d in scorers.detectors if d.name == name)
    return detector_rows(det, [(key, load_images(store, key)) for key in keys])


def _clip_rows(store: Store, scorers: Scorers, keys: list[str], text_of: Mapping[str, str]) -> list[ScoreRow]:
    if scorers.clip is None:  # pragma: no cover - jobs only list CLIP when it loaded
        return []
    texts = store.texts([text_of[k] for k in keys])
    outputs = [(key, load_images(store, key)) for key in keys]
    return clip_rows(scorers.clip, outputs, dict(zip(keys, texts, strict=True)))


class ScoreStage:
    """Every committed output of the plans that lacks a score of an available metric (computed here)."""

    flow, task, unit, remote = "eval", "score", "output", False

    def __init__(self, store: Store, plans: Sequence[Plan], scorers: Scorers) -> None:
        self.store, self.scorers = store, scorers
        keys = list(dict.fromkeys(k for p in plans for k in p.specs))
        self.jobs: dict[str, tuple[list[str], Any]] = {
            d.name: (keys, partial(_detector_rows, store, d.name, scorers)) for d in scorers.detectors
        }
        if scorers.clip is not None:
            utility = list(dict.fromkeys(k for p in plans for k in utility_keys(p)))
            text_of = {i.key: i.text_id for p in plans for i in p.items}
            self.jobs[scorers.clip.name] = (utility, partial(_clip_rows, store, scorers, text_of=text_of))
        self.group = Group("", "", record=False)

    def groups(self) -> list[Group]:
        return []

    def work(self) -> list[Work]:
        out = []
        for metric, (wanted, _) in self.jobs.items():
            todo = unscored(self.store, wanted, metric)
            for i in range(0, len(todo), SCORE_BATCH):
                batch = todo[i : i + SCORE_BATCH]
                out.append(Work(tuple(f"score:{metric}:{k}" for k in batch), self.group, len(batch)))
        return out

    def finished(self, keys: list[str]) -> list[str]:
        by_metric: dict[str, list[str]] = {}
        for k in keys:
            metric, out = k.removeprefix("score:").rsplit(":", 1)
            by_metric.setdefault(metric, []).append(out)
        done = []
        for metric, outs in by_metric.items():
            left = set(unscored(self.store, outs, metric))
            done += [f"score:{metric}:{o}" for o in outs if o not in left]
        return done

    def prepare(self, work: Work, keys: list[str]) -> Call:
        metric = keys[0].removeprefix("score:").rsplit(":", 1)[0]
        outputs = [k.rsplit(":", 1)[1] for k in keys]
        return Call(self.jobs[metric][1], (outputs,), f"score-{metric}")

    def commit(self, work: Work, keys: list[str], result: list[ScoreRow], remote: bool) -> Done:
        mine = {k.rsplit(":", 1)[1] for k in keys}
        rows = [r for r in result if r.output_key in mine]
        save_scores(self.store, rows)
        return Done(len(rows))

    def close(self, group: Group, computed: bool) -> None:
        pass


def score_outputs(store: Store, plans: Sequence[Plan], scorers: Scorers) -> int:
    """Score every output of the plans that lacks a score, per metric; returns the number of scores written."""
    stage = ScoreStage(store, plans, scorers)
    if not stage.jobs:
        return 0
    return sum(r.rows for r in run_stage(store, stage, desc="score"))
