"""Extraction: catalog datasets -> pooled rows in the store, one task per (model, dataset).

A unit's key is a hash of (representation key, dataset, dataset content hash),
so a rerun over unchanged inputs finds the unit done and loads no model. Only
texts without a committed row for the model are computed, so a text shared by
two datasets is extracted once, and a crashed unit resumes at its first
uncommitted shard with the same text order and batches (same values).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from safeport.catalog import ModelEntry, Resolved
from safeport.datasets import DatasetRows, TextRow, build_all
from safeport.extractors import Extractor
from safeport.extractors.base import check_finite, length_batches
from safeport.flows.common import catalog, extractor_for, model_source, release_models, run_id, store_for, writing
from safeport.keys import content_key
from safeport.mappers.vectors import SAFESTEER_CONCEPT_STRING
from safeport.store import positions
from safeport.store.claims import RunEntry
from safeport.store.store import ShardDescriptor, Store, UnitInfo, write_shard_array
from safeport.texts import text_id

log = logging.getLogger("safeport.extract")
CONCEPT_DATASET = "__concept__"
WAIT_POLL_S = 1.0  # how often a writer looks again at work another writer holds


@dataclass(frozen=True)
class UnitResult:
    model: str
    dataset: str
    unit_key: str
    status: str  # done | skipped (| waiting: shards left to another writer, see extract_unit)
    rows: int
    tokens: int
    seconds: float


def _rows_table(ds: DatasetRows) -> pa.Table:
    return pa.table(
        {
            "idx": [r.idx for r in ds.rows],
            "text_id": [r.text_id for r in ds.rows],
            "text": [r.text for r in ds.rows],
            "split": pa.array([r.split for r in ds.rows], pa.string()),
            "category": pa.array([r.category for r in ds.rows], pa.string()),
            "pair_id": pa.array([r.pair_id for r in ds.rows], pa.int32()),
            "side": pa.array([r.side for r in ds.rows], pa.string()),
        }
    )


def register_datasets(store: Store, resolved: Resolved) -> dict[str, str]:
    """Read every dataset of the profile and record any whose content changed."""
    hashes: dict[str, str] = {}
    datasets = build_all(resolved)
    datasets[CONCEPT_DATASET] = concept_dataset()
    for name, ds in datasets.items():
        if store.register_dataset(name, ds.kind, ds.content_hash, _rows_table(ds), ds.report_json()):
            log.info("dataset %s registered: %d rows (%s)", name, len(ds.rows), ds.content_hash)
        hashes[name] = ds.content_hash
    return hashes


def concept_dataset() -> DatasetRows:
    """The one string of the six SafeSteer category labels, for the string baseline (METHOD §6)."""
    row = TextRow(text_id(SAFESTEER_CONCEPT_STRING), SAFESTEER_CONCEPT_STRING, 0)
    return DatasetRows(CONCEPT_DATASET, "concept", (row,), text_id(f"concept|{SAFESTEER_CONCEPT_STRING}"))


def unit_key(model_key: str, dataset: str, dataset_hash: str) -> str:
    return content_key(f"{model_key}|{dataset}|{dataset_hash}")


def encode_shard(
    extractor: Extractor,
    texts: list[str],
    lengths: np.ndarray,
    batch_size: int,
    max_batch_tokens: int,
    text_ids: list[str],
    bar: tqdm,
) -> tuple[np.ndarray, ...]:
    n = len(texts)
    values = np.empty((n, extractor.dim), dtype=np.float32)
    n_tokens = np.empty(n, dtype=np.int64)
    truncated = np.empty(n, dtype=bool)
    for idx in length_batches(lengths, batch_size, max_batch_tokens):
        pooled = extractor.encode([texts[i] for i in idx])
        check_finite(pooled.values, extractor.spec.model_id, [text_ids[i] for i in idx])
        values[idx], n_tokens[idx], truncated[idx] = pooled.values, pooled.n_tokens, pooled.truncated
        bar.update(len(idx))
    return values, n_tokens, truncated


def _uncommitted(store: Store, unit: UnitInfo) -> list[int]:
    committed = store.committed_shards(unit.unit_key)
    return [s for s in range(unit.n_shards) if s not in committed]


def rows_left(store: Store, unit: UnitInfo) -> int:
    """Rows of the shards not committed yet: what an extraction run sets out to compute (its ETA in status)."""
    return sum(len(range(*unit.shard_range(s))) for s in _uncommitted(store, unit))


def shard_key(unit_key: str, shard: int) -> str:
    """The claim key of one shard (see :mod:`safeport.store.claims`)."""
    return f"shard:{unit_key}/{shard}"


def _claimable(store: Store, unit: UnitInfo) -> list[int]:
    """Uncommitted shards of ``unit`` that no live writer but this one holds."""
    with store.reading():
        todo = _uncommitted(store, unit)
        held = store.session.holders([shard_key(unit.unit_key, s) for s in todo]) if todo else {}
    now = time.time()
    return [s for s in todo if (h := held.get(shard_key(unit.unit_key, s))) is None or h.dead_because(now)]


def claim_shard(store: Store, unit: UnitInfo, shard: int) -> bool:
    """Claim an uncommitted shard for this writer; False when another writer has it (or committed it).

    No shard is claimed while someone holds the whole unit (``unit:<key>``, e.g. a repair).
    """

    def committed(keys: list[str]) -> list[str]:
        return keys if shard in store.committed_shards(unit.unit_key) else []

    key = shard_key(unit.unit_key, shard)
    return bool(store.session.claim_unfinished([key], committed, unless=[f"unit:{unit.unit_key}"]))


def commit_claimed_shard(
    store: Store, unit: UnitInfo, desc: ShardDescriptor, run: RunEntry | None = None, verify: bool = False
) -> bool:
    """Record a shard this writer claimed and release the claim, in one transaction; False if the claim was lost.

    A claim is lost only when this process stalled past its lease and another writer took the
    shard over; that writer's record is the one kept.
    """
    key = shard_key(unit.unit_key, desc.shard)
    with store.transaction():
        if not store.session.still_mine([key]):
            log.warning(
                "shard %d of %s was taken over by another writer; its result here is dropped",
                desc.shard,
                unit.array_path,
            )
            return False
        store.commit_shard(unit, desc, verify=verify)
        store.session.release([key])
        if run is not None:
            store.session.progress(run, desc.row_stop - desc.row_start, desc.tokens)
    return True


def commit_missing_shards(
    store: Store,
    unit: UnitInfo,
    extractor: Extractor,
    entry: ModelEntry,
    label: str,
    run: RunEntry | None = None,
) -> tuple[int, int]:
    """Encode and commit every uncommitted shard of ``unit`` nobody else is computing; (rows, tokens).

    The one shard loop, shared by extraction and by ``safeport verify --repair``: same texts,
    same rows, same batches, so a resumed or repaired shard gets the values an uninterrupted
    run would have given it. Each shard is claimed first, and a shard's commit, the release of
    its claim and the claim of the next shard (with its texts) are one transaction. Shards other
    writers hold are left to them (the caller waits for them, see :func:`extract_unit`).
    """
    with store.reading():
        todo = _uncommitted(store, unit)
        ids = store.unit_text_ids(unit.unit_key)
    if todo:
        store.ensure_unit_array(unit)  # an interrupted repair can leave it missing or unreadable
    rows = tokens = 0
    remaining = sum(unit.shard_range(s)[1] - unit.shard_range(s)[0] for s in todo)
    queue = iter(todo)
    with tqdm(total=remaining, desc=label, unit="text", mininterval=2.0, dynamic_ncols=True) as bar:

        def take() -> tuple[int, list[str], list[str]] | None:
            """Claim the next free shard (inside the caller's transaction): (shard, its text ids, texts)."""
            for shard in queue:
                start, stop = unit.shard_range(shard)
                if claim_shard(store, unit, shard):
                    return shard, ids[start:stop], store.texts(ids[start:stop])
                bar.update(stop - start)  # another writer's
            return None

        with store.transaction():
            held = take()
        while held is not None:
            shard, shard_ids, texts = held
            lengths = extractor.token_lengths(texts)
            values, n_tok, trunc = encode_shard(
                extractor, texts, lengths, entry.batch_size, entry.max_batch_tokens, shard_ids, bar
            )
            committed = False
            if store.session.valid(shard_key(unit.unit_key, shard)):
                desc = write_shard_array(store.arrays, unit, shard, shard_ids, values, n_tok, trunc)
                with store.transaction():
                    committed = commit_claimed_shard(store, unit, desc, run)
                    held = take()
            else:
                log.warning(
                    "%s: the claim on shard %d expired while it was computed; left to its new owner", label, shard
                )
                with store.transaction():
                    held = take()
            if not committed:
                continue
            rows += len(shard_ids)
            tokens += int(n_tok.sum())
            bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)
            if trunc.any():
                log.warning(
                    "%s: %d text(s) truncated to %d tokens (recorded in activation_rows)",
                    label,
                    int(trunc.sum()),
                    entry.max_tokens,
                )
    return rows, tokens


POSITION_SAMPLE = 64  # anchor texts (the first, in dataset order) whose per-position norms are recorded
POSITIONS = 8  # leading pooled positions shown in the representation report


def record_position_norms(store: Store, extractor: Extractor, model_key: str, dataset: str) -> None:
    """Per-position norms of the first anchors, once per model (only while its model is loaded anyway)."""
    norms_of = getattr(extractor, "position_norms", None)
    if norms_of is None or positions.has_position_norms(store, model_key, dataset):
        return
    norms, constant = norms_of(positions.first_texts(store, dataset, POSITION_SAMPLE), POSITIONS)
    positions.save_position_norms(store, model_key, dataset, norms, constant)


def _plan_texts(store: Store, resolved: Resolved, model_key: str, dataset: str) -> list[str]:
    """Texts a new unit of ``model_key`` on ``dataset`` computes: those without a row, sorted by id.

    The sequential run leaves a text shared by two datasets to the first one's unit; so do
    units created while that earlier unit is still being computed (by another writer): texts
    of this model's units for the datasets before ``dataset`` in this profile are left out.
    Every writer then plans the same units the sequential run does.
    """
    order = [*resolved.datasets, CONCEPT_DATASET]
    earlier = order[: order.index(dataset)] if dataset in order else []
    elsewhere: set[str] = set()
    with store.reading():
        for d in earlier:
            h = store.dataset_hash(d)
            if h is not None:
                elsewhere.update(store.unit_text_ids(unit_key(model_key, d, h)))
        return [t for t in store.missing_texts(model_key, dataset) if t not in elsewhere]


def ensure_unit(store: Store, key: str, create: Callable[[], UnitInfo]) -> UnitInfo:
    """The unit ``key``: created here under its ``unit:`` claim, or by the writer that holds that claim."""
    claim = f"unit:{key}"
    while True:
        with store.transaction():
            unit = store.unit(key)
            if unit is not None:
                return unit
            mine = bool(store.session.claim([claim]))
        if mine:
            try:
                return create()
            finally:
                store.session.release([claim])
        time.sleep(WAIT_POLL_S)  # another writer is planning it: a tokenizer pass, seconds


def _wait_note(store: Store, unit: UnitInfo, label: str, last: float) -> float:
    """Log who holds a unit's remaining shards, at most every 30 s; returns when it last logged."""
    if time.monotonic() - last < 30:
        return last
    holders = store.session.holders([], prefix=f"shard:{unit.unit_key}/")
    who = sorted({h.describe() for h in holders.values()})
    log.info("%s: waiting for %d shard(s) computed by %s", label, len(holders), "; ".join(who) or "another writer")
    return time.monotonic()


def _register(store: Store, model_key: str, model: str, entry: ModelEntry, spec: dict[str, Any], dim: int) -> None:
    """Record the model (and make it the current one of its name) unless it already is."""
    if not store.scalar("SELECT current FROM models WHERE model_key = ?", [model_key]):
        store.register_model(model_key, model, entry.role, spec, dim)


def extract_unit(
    store: Store, resolved: Resolved, model: str, dataset: str, rid: str = "", wait: bool = True
) -> UnitResult:
    """Compute and commit every missing row of ``model`` on ``dataset``; resumable and shareable.

    Shards another writer is computing are left to it; with ``wait`` this returns only once
    they are committed (taking over those of a writer that died), else it returns status
    ``waiting`` so the caller can do other work first.
    """
    started = time.time()
    rid = rid or run_id()
    entry = resolved.models[model]
    source = model_source(resolved, model)
    spec = source.spec()
    model_key = spec.key()
    with store.reading():
        ds_hash = store.dataset_hash(dataset)
        done = None if ds_hash is None else store.done_unit(model_key, dataset, ds_hash)
    if ds_hash is None:
        raise ValueError(f"dataset {dataset!r} is not registered in the store; run the extract flow")
    if done is not None:
        store.record_run(
            rid,
            "extract",
            "extract_unit",
            model,
            dataset,
            done,
            "skipped",
            0,
            0,
            time.time() - started,
            started,
        )
        return UnitResult(model, dataset, done, "skipped", 0, 0, time.time() - started)

    key = unit_key(model_key, dataset, ds_hash)
    label = f"{model}/{dataset}"
    extractor: Extractor | None = None

    def create() -> UnitInfo:
        nonlocal extractor
        missing = _plan_texts(store, resolved, model_key, dataset)
        if missing:
            extractor = extractor_for(source)
            _register(store, model_key, model, entry, asdict(spec), extractor.dim)
            texts = store.texts(missing)
            lengths = extractor.token_lengths(texts)
            # Length-sorted unit order: shards (and the batches inside them) hold texts of similar length.
            order = sorted(range(len(missing)), key=lambda i: (int(lengths[i]), missing[i]))
            missing = [missing[i] for i in order]
        dim = extractor.dim if extractor is not None else (store.model_dim(model_key) or 0)
        return store.create_unit(key, model_key, dataset, ds_hash, missing, dim, resolved.profile.shard_rows)

    unit = ensure_unit(store, key, create)
    rows = tokens = 0
    run: RunEntry | None = None
    last_note = time.monotonic()
    while True:
        if _claimable(store, unit):  # no model is loaded while every missing shard is another writer's
            extractor = extractor or extractor_for(source)
            _register(store, model_key, model, entry, asdict(spec), extractor.dim)
            run = run or store.session.start_run(
                "extract", "extract_unit", model, dataset, unit.unit_key, total=rows_left(store, unit)
            )
            r, t = commit_missing_shards(store, unit, extractor, entry, label, run)
            rows, tokens = rows + r, tokens + t
        if not _uncommitted(store, unit):
            break
        if not wait:
            if run is not None:
                store.session.finish_run(run, "done" if rows else "skipped")
            return UnitResult(model, dataset, unit.unit_key, "waiting", rows, tokens, time.time() - started)
        last_note = _wait_note(store, unit, label, last_note)
        time.sleep(WAIT_POLL_S)
    if extractor is not None and dataset == resolved.profile.anchors:
        record_position_norms(store, extractor, model_key, dataset)
    seconds = time.time() - started
    status = "done" if rows or not unit.n_rows else "skipped"
    with store.transaction():
        store.finish_unit(unit.unit_key)
        if run is not None:
            store.session.finish_run(run, status)
        else:
            store.record_run(
                rid, "extract", "extract_unit", model, dataset, unit.unit_key, status, 0, 0, seconds, started
            )
    log.info("%s: %d rows, %d tokens in %.1fs", label, rows, tokens, seconds)
    return UnitResult(model, dataset, unit.unit_key, status, rows, tokens, seconds)


@task(name="register-datasets", cache_policy=NO_CACHE)
def register_datasets_task(store_root: str, catalog_path: str | None, profile: str) -> dict[str, str]:
    return register_datasets(store_for(store_root), catalog(catalog_path, profile))


@task(name="extract-unit", cache_policy=NO_CACHE, task_run_name="extract-{model}-{dataset}")
def extract_unit_task(
    store_root: str, catalog_path: str | None, profile: str, model: str, dataset: str, wait: bool = True
) -> UnitResult:
    return extract_unit(store_for(store_root), catalog(catalog_path, profile), model, dataset, wait=wait)


def _merge(first: UnitResult, last: UnitResult) -> UnitResult:
    rows, tokens = first.rows + last.rows, first.tokens + last.tokens
    status = "done" if rows else last.status
    return UnitResult(first.model, first.dataset, last.unit_key, status, rows, tokens, first.seconds + last.seconds)


def extract_all(store_root: str, catalog_path: str | None, profile: str) -> list[UnitResult]:
    """Body of the extract flow; callable from a parent flow that already holds the store.

    Units whose shards another writer is computing are revisited after every other unit,
    and waited for then, so two writers on one profile split the work instead of queueing.
    """
    resolved = catalog(catalog_path, profile)
    register_datasets_task(store_root, catalog_path, profile)
    datasets = [*resolved.datasets, CONCEPT_DATASET]
    results = [
        extract_unit_task(store_root, catalog_path, profile, model, dataset, wait=False)
        for model in resolved.profile.models
        for dataset in datasets
    ]
    for i, r in enumerate(results):
        if r.status == "waiting":
            results[i] = _merge(r, extract_unit_task(store_root, catalog_path, profile, r.model, r.dataset))
    release_models()
    return results


@flow(name="safeport-extract", log_prints=False)
def extract_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[UnitResult]:
    """Extract every (model, dataset) unit of a catalog profile into its store."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        return extract_all(str(root), catalog_path, profile)
