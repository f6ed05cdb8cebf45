"""Extraction: catalog datasets -> pooled rows in the store, one task per (model, dataset).

A unit's key is a hash of (representation key, dataset, dataset content hash),
so a rerun over unchanged inputs finds the unit done and loads no model. Only
texts without a committed row for the model are computed, so a text shared by
two datasets is extracted once, and a crashed unit resumes at its first
uncommitted shard with the same text order and batches (same values).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
from safeport.mappers.vectors import SAFESTEER_CONCEPT_STRING
from safeport.store import positions
from safeport.store.store import Store, UnitInfo
from safeport.texts import text_id

log = logging.getLogger("safeport.extract")
CONCEPT_DATASET = "__concept__"


@dataclass(frozen=True)
class UnitResult:
    model: str
    dataset: str
    unit_key: str
    status: str  # done | skipped
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
    return hashlib.sha256(f"{model_key}|{dataset}|{dataset_hash}".encode()).hexdigest()[:20]


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


def commit_missing_shards(
    store: Store, unit: UnitInfo, extractor: Extractor, entry: ModelEntry, label: str
) -> tuple[int, int]:
    """Encode and commit every uncommitted shard of ``unit`` in its stored text order; (rows, tokens).

    The one shard loop, shared by extraction and by ``safeport verify --repair``: same texts,
    same rows, same batches, so a resumed or repaired shard gets the values an uninterrupted
    run would have given it.
    """
    todo = _uncommitted(store, unit)
    if todo:
        store.ensure_unit_array(unit)  # an interrupted repair can leave it missing or unreadable
    ids = store.unit_text_ids(unit.unit_key)
    rows = tokens = 0
    remaining = sum(unit.shard_range(s)[1] - unit.shard_range(s)[0] for s in todo)
    with tqdm(total=remaining, desc=label, unit="text", mininterval=2.0, dynamic_ncols=True) as bar:
        for shard in todo:
            start, stop = unit.shard_range(shard)
            shard_ids = ids[start:stop]
            texts = store.texts(shard_ids)
            lengths = extractor.token_lengths(texts)
            values, n_tok, trunc = encode_shard(
                extractor, texts, lengths, entry.batch_size, entry.max_batch_tokens, shard_ids, bar
            )
            store.write_shard(unit, shard, shard_ids, values, n_tok, trunc)
            rows += stop - start
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


def extract_unit(store: Store, resolved: Resolved, model: str, dataset: str, rid: str = "") -> UnitResult:
    """Compute and commit every missing row of ``model`` on ``dataset``; resumable."""
    started = time.time()
    rid = rid or run_id()
    entry = resolved.models[model]
    source = model_source(resolved, model)
    spec = source.spec()
    model_key = spec.key()
    ds_hash = store.dataset_hash(dataset)
    if ds_hash is None:
        raise ValueError(f"dataset {dataset!r} is not registered in the store; run the extract flow")
    done = store.done_unit(model_key, dataset, ds_hash)
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
    unit: UnitInfo | None = store.unit(key)
    extractor: Extractor | None = None
    if unit is None:
        missing = store.missing_texts(model_key, dataset)
        if missing:
            extractor = extractor_for(source)
            store.register_model(model_key, model, entry.role, asdict(spec), extractor.dim)
            texts = store.texts(missing)
            lengths = extractor.token_lengths(texts)
            # Length-sorted unit order: shards (and the batches inside them) hold texts of similar length.
            order = sorted(range(len(missing)), key=lambda i: (int(lengths[i]), missing[i]))
            missing = [missing[i] for i in order]
        dim = extractor.dim if extractor is not None else (store.model_dim(model_key) or 0)
        unit = store.create_unit(key, model_key, dataset, ds_hash, missing, dim, resolved.profile.shard_rows)

    rows = tokens = 0
    if _uncommitted(store, unit):
        extractor = extractor or extractor_for(source)
        store.register_model(model_key, model, entry.role, asdict(spec), extractor.dim)
        rows, tokens = commit_missing_shards(store, unit, extractor, entry, f"{model}/{dataset}")
    if extractor is not None and dataset == resolved.profile.anchors:
        record_position_norms(store, extractor, model_key, dataset)
    store.finish_unit(unit.unit_key)
    seconds = time.time() - started
    store.record_run(
        rid, "extract", "extract_unit", model, dataset, unit.unit_key, "done", rows, tokens, seconds, started
    )
    log.info("%s/%s: %d rows, %d tokens in %.1fs", model, dataset, rows, tokens, seconds)
    return UnitResult(model, dataset, unit.unit_key, "done", rows, tokens, seconds)


@task(name="register-datasets", cache_policy=NO_CACHE)
def register_datasets_task(store_root: str, catalog_path: str | None, profile: str) -> dict[str, str]:
    return register_datasets(store_for(store_root), catalog(catalog_path, profile))


@task(name="extract-unit", cache_policy=NO_CACHE, task_run_name="extract-{model}-{dataset}")
def extract_unit_task(store_root: str, catalog_path: str | None, profile: str, model: str, dataset: str) -> UnitResult:
    return extract_unit(store_for(store_root), catalog(catalog_path, profile), model, dataset)


def extract_all(store_root: str, catalog_path: str | None, profile: str) -> list[UnitResult]:
    """Body of the extract flow; callable from a parent flow that already holds the store."""
    resolved = catalog(catalog_path, profile)
    register_datasets_task(store_root, catalog_path, profile)
    datasets = [*resolved.datasets, CONCEPT_DATASET]
    results = [
        extract_unit_task(store_root, catalog_path, profile, model, dataset)
        for model in resolved.profile.models
        for dataset in datasets
    ]
    release_models()
    return results


@flow(name="safeport-extract", log_prints=False)
def extract_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[UnitResult]:
    """Extract every (model, dataset) unit of a catalog profile into its store."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url):
        return extract_all(str(root), catalog_path, profile)
