"""Extraction scale-out on Dask: workers encode and write shards, the flow process commits them.

Workers never open DuckDB. The flow process does all bookkeeping, each write a short
transaction, and claims every shard it sends out (so other writers of the store leave
those shards alone, and it leaves theirs): it plans every unit exactly as the
single-process path does (same unit keys, same text order, same shards), creates
the unit arrays and records, and sends each worker one shard's texts plus the
model source. A worker loads the model once (cached per worker process), encodes
the shard with the same batches as :func:`safeport.flows.extract.extract_unit`, writes
the rows into its own Zarr chunk and returns a small :class:`ShardDescriptor`
(checksum, token counts). The flow process re-reads the chunk, checks the
checksum and records it in one DuckDB transaction: the commit protocol of
``store/store.py`` with steps 2 and 3 in different processes.

Workers must reach the store's arrays: the store folder (a local cluster always
does; a remote one needs it on a shared filesystem) or the profile's ``arrays:``
URL (``s3://…``, ``gs://…``; workers read credentials from their environment, as
fsspec does). Only the flow process opens DuckDB, and the checksum check refuses
a shard a worker wrote anywhere else (its private disk, its own ``memory://``).

Multiple GPUs: on one machine, ``--dask-workers N`` puts local worker ``i`` on
GPU ``i mod (GPUs it sees)`` (:func:`worker_gpu`). On a cluster, start one
single-threaded worker per device, each seeing one GPU, e.g.
``CUDA_VISIBLE_DEVICES=$i dask worker ADDRESS --nthreads 1 --nworkers 1``
per device (or dask-cuda's ``LocalCUDACluster``), and set ``dtype:`` explicitly
in the catalog when the flow process has no GPU, so both sides derive the same
representation key (a mismatch is refused by name).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from tqdm import tqdm

from safeport.catalog import Resolved
from safeport.extractors import ModelSource
from safeport.extractors.base import ExtractionError
from safeport.flows.common import catalog, extractor_for, model_source, run_id, store_for, writing
from safeport.flows.extract import (
    CONCEPT_DATASET,
    WAIT_POLL_S,
    UnitResult,
    claim_shard,
    commit_claimed_shard,
    encode_shard,
    ensure_unit,
    register_datasets_task,
    rows_left,
    unit_key,
)
from safeport.store.claims import RunEntry
from safeport.store.store import ShardDescriptor, Store, UnitInfo, write_shard_array

log = logging.getLogger("safeport.scale")


def dask_task_runner(address: str | None = None, workers: int = 2) -> Any:
    """A ``DaskTaskRunner``: an existing cluster by address, else a local one of ``workers`` processes.

    Local workers are single-threaded processes bound to loopback: one model per
    process, no GIL contention, and nothing listens beyond this machine.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"dask workers = {workers}; use 1 or more (or pass --dask-address to use a cluster)")
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


def worker_gpu(worker_name: object, n_gpus: int) -> int | None:
    """The GPU a Dask worker should use when it sees ``n_gpus`` of them; None leaves the default.

    A local cluster names its workers 0, 1, ...: worker ``i`` takes GPU ``i mod n_gpus``,
    so ``--dask-workers N`` on an N-GPU machine is one worker per device. Other names
    (a remote worker that sees several GPUs) are spread by a stable hash of the name.
    A worker that sees one GPU or none (``CUDA_VISIBLE_DEVICES`` set per worker) is left alone.
    """
    if n_gpus <= 1:
        return None
    name = str(worker_name)
    if name.isdigit():
        return int(name) % n_gpus
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n_gpus


def _pin_worker_gpu() -> None:
    """Inside a Dask worker on a multi-GPU machine, make ``cuda`` mean this worker's own GPU.

    Also keeps the worker's Prefect traceback of a user error off the terminal a local cluster
    shares with the flow process, which reports the error once (``SAFEPORT_DEBUG=1`` keeps it).
    """
    import torch

    if not os.environ.get("SAFEPORT_DEBUG"):
        from safeport.errors import quiet_user_errors_in_flows

        quiet_user_errors_in_flows()

    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not running on a Dask worker: keep the default device
        return
    gpu = worker_gpu(name, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if gpu is not None and torch.cuda.current_device() != gpu:
        torch.cuda.set_device(gpu)
        log.info("dask worker %s computes on cuda:%d", name, gpu)


@dataclass(frozen=True)
class UnitPlan:
    """What a worker measured for a new unit: token lengths (to order texts) and the row width."""

    lengths: np.ndarray
    dim: int


def _check_key(source: ModelSource, model_key: str) -> None:
    got = source.spec().key()
    if got != model_key:
        raise ExtractionError(
            f"model {source.name!r}: this worker derives representation key {got} but the flow expects "
            f"{model_key} (device {source.device!r} / dtype {source.dtype!r} resolve differently here); "
            "set dtype: explicitly in the catalog (e.g. float32 or bfloat16) so every machine agrees"
        )


def prepare_worker(source: ModelSource, model_key: str) -> None:
    """First step of every task that runs a model on a worker: its own GPU, and the flow's model.

    Pins this worker's GPU (``cuda`` means GPU *i mod n* on worker *i*) and checks that the
    worker derives the representation key the flow planned with.
    """
    _pin_worker_gpu()
    _check_key(source, model_key)


@task(name="plan-unit", cache_policy=NO_CACHE, task_run_name="plan-{source.name}")
def plan_unit_task(source: ModelSource, model_key: str, texts: list[str]) -> UnitPlan:
    """Token lengths of a new unit's texts, measured where the model lives."""
    prepare_worker(source, model_key)
    extractor = extractor_for(source)
    return UnitPlan(np.asarray(extractor.token_lengths(texts), dtype=np.int64), int(extractor.dim))


@task(name="encode-shard", cache_policy=NO_CACHE, task_run_name="encode-{source.name}-{unit.dataset}-{shard}")
def encode_shard_task(
    arrays: str,
    unit: UnitInfo,
    shard: int,
    text_ids: list[str],
    texts: list[str],
    source: ModelSource,
    batch_size: int,
    max_batch_tokens: int,
) -> ShardDescriptor:
    """Encode one shard and write its chunk; returns only the descriptor the flow commits."""
    prepare_worker(source, unit.model_key)
    extractor = extractor_for(source)
    lengths = extractor.token_lengths(texts)
    with tqdm(total=len(texts), disable=True) as bar:
        values, n_tok, trunc = encode_shard(extractor, texts, lengths, batch_size, max_batch_tokens, text_ids, bar)
    return write_shard_array(arrays, unit, shard, text_ids, values, n_tok, trunc)


@dataclass
class _Pending:
    """A unit of this run that needs work, with everything the commit step accumulates."""

    model: str
    dataset: str
    source: ModelSource
    started: float
    unit: UnitInfo | None = None
    missing: list[str] = field(default_factory=list)
    plan: PrefectFuture[UnitPlan] | None = None
    shards: list[tuple[int, PrefectFuture[ShardDescriptor]]] = field(default_factory=list)
    remaining: int = 0  # rows sent to workers
    run: RunEntry | None = None  # this writer's running ``runs`` row for the unit


def _runner_name() -> str:
    ctx = FlowRunContext.get()
    return type(ctx.task_runner).__name__ if ctx is not None else "none"


def on_dask() -> bool:
    """Whether the running flow's tasks go to Dask workers (its task runner is a ``DaskTaskRunner``)."""
    return _runner_name() == "DaskTaskRunner"


def _require_dask() -> None:
    runner = _runner_name()
    if runner != "DaskTaskRunner":
        raise ValueError(
            f"Dask extraction needs a flow running on a DaskTaskRunner (this one runs on {runner}); "
            "call flows.scale.extract_on_dask(...) or safeport rebuild --dask"
        )


def _plan(store: Store, resolved: Resolved, datasets: Sequence[str], rid: str) -> list[_Pending | UnitResult]:
    """Mirror of the bookkeeping half of ``extract_unit``, for every unit, without loading a model here.

    Texts claimed by an earlier unit of the same model in this run are left to
    that unit, exactly as the sequential path (which would find them committed).
    """
    out: list[_Pending | UnitResult] = []
    for model in resolved.profile.models:
        source = model_source(resolved, model)
        model_key = source.spec().key()
        claimed: set[str] = set()
        for dataset in datasets:
            started = time.time()
            ds_hash = store.dataset_hash(dataset)
            if ds_hash is None:
                raise ValueError(f"dataset {dataset!r} is not registered in the store; run the extract flow")
            done = store.done_unit(model_key, dataset, ds_hash)
            if done is not None:
                seconds = time.time() - started
                store.record_run(
                    rid, "extract", "extract_unit", model, dataset, done, "skipped", 0, 0, seconds, started
                )
                out.append(UnitResult(model, dataset, done, "skipped", 0, 0, seconds))
                continue
            pending = _Pending(model, dataset, source, started, unit=store.unit(unit_key(model_key, dataset, ds_hash)))
            if pending.unit is None:
                pending.missing = [t for t in store.missing_texts(model_key, dataset) if t not in claimed]
                if pending.missing:
                    pending.plan = plan_unit_task.submit(source, model_key, store.texts(pending.missing))
                claimed.update(pending.missing)
            else:
                claimed.update(store.unit_text_ids(pending.unit.unit_key))
            out.append(pending)
    return out


def _create_unit(store: Store, resolved: Resolved, p: _Pending, ds_hash: str) -> UnitInfo:
    """Create a planned unit: register the model, order texts by length, make array + record."""
    model_key = p.source.spec().key()
    missing = p.missing
    if p.plan is not None:
        plan = p.plan.result()
        store.register_model(model_key, p.model, resolved.models[p.model].role, asdict(p.source.spec()), plan.dim)
        order = sorted(range(len(missing)), key=lambda i: (int(plan.lengths[i]), missing[i]))
        missing = [missing[i] for i in order]
        dim = plan.dim
    else:
        dim = store.model_dim(model_key) or 0
    key = unit_key(model_key, p.dataset, ds_hash)
    return store.create_unit(key, model_key, p.dataset, ds_hash, missing, dim, resolved.profile.shard_rows)


def _submit_shards(store: Store, resolved: Resolved, p: _Pending, arrays: str) -> UnitInfo:
    """Create the unit if it is new (under its claim), then send every shard this writer claims to a worker."""
    ds_hash = store.dataset_hash(p.dataset) or ""
    unit = p.unit or ensure_unit(
        store, unit_key(p.source.spec().key(), p.dataset, ds_hash), lambda: _create_unit(store, resolved, p, ds_hash)
    )
    _send(
        store,
        resolved,
        p,
        unit,
        arrays,
        [s for s in range(unit.n_shards) if s not in store.committed_shards(unit.unit_key)],
    )
    return unit


def _send(store: Store, resolved: Resolved, p: _Pending, unit: UnitInfo, arrays: str, shards: list[int]) -> None:
    """Claim each of ``shards`` and send those this writer got to a worker (others' are left to them)."""
    entry = resolved.models[p.model]
    ids: list[str] | None = None
    for shard in shards:
        if not claim_shard(store, unit, shard):
            continue
        if ids is None:
            spec = p.source.spec()
            store.register_model(spec.key(), p.model, entry.role, asdict(spec), unit.dim)
            ids = store.unit_text_ids(unit.unit_key)
            p.run = p.run or store.session.start_run(
                "extract", "extract_unit", p.model, p.dataset, unit.unit_key, total=rows_left(store, unit)
            )
        start, stop = unit.shard_range(shard)
        shard_ids = ids[start:stop]
        fut = encode_shard_task.submit(
            arrays,
            unit,
            shard,
            shard_ids,
            store.texts(shard_ids),
            p.source,
            entry.batch_size,
            entry.max_batch_tokens,
        )
        p.shards.append((shard, fut))
        p.remaining += stop - start


def _commit(
    store: Store, resolved: Resolved, p: _Pending, unit: UnitInfo, rid: str, bar: tqdm, arrays: str
) -> UnitResult:
    """The single commit step: verify and record each returned shard in order, then finish the unit.

    Shards another writer holds are waited for (and sent to a worker if that writer dies).
    """
    rows = tokens = truncated = 0
    while True:
        sent, p.shards = p.shards, []
        for _, fut in sent:
            desc = fut.result()
            if commit_claimed_shard(store, unit, desc, p.run, verify=True):
                rows += desc.row_stop - desc.row_start
                tokens += desc.tokens
                truncated += int(np.asarray(desc.truncated).sum())
            bar.update(desc.row_stop - desc.row_start)
        left = [s for s in range(unit.n_shards) if s not in store.committed_shards(unit.unit_key)]
        if not left:
            break
        _send(store, resolved, p, unit, arrays, left)
        if not p.shards:
            time.sleep(WAIT_POLL_S)  # another writer computes them
    if truncated:
        log.warning(
            "%s/%s: %d text(s) truncated to %d tokens (recorded in activation_rows)",
            p.model,
            p.dataset,
            truncated,
            resolved.models[p.model].max_tokens,
        )
    seconds = time.time() - p.started
    status = "done" if rows or not unit.n_rows else "skipped"
    with store.transaction():
        store.finish_unit(unit.unit_key)
        if p.run is not None:
            store.session.finish_run(p.run, status)
        else:
            store.record_run(
                rid, "extract", "extract_unit", p.model, p.dataset, unit.unit_key, status, 0, 0, seconds, p.started
            )
    log.info("%s/%s: %d rows, %d tokens in %.1fs (dask)", p.model, p.dataset, rows, tokens, seconds)
    return UnitResult(p.model, p.dataset, unit.unit_key, status, rows, tokens, seconds)


def extract_all_dask(store_root: str, catalog_path: str | None, profile: str) -> list[UnitResult]:
    """Body of a Dask extraction inside a flow that holds the store (same results as ``extract_all``)."""
    _require_dask()
    resolved = catalog(catalog_path, profile)
    register_datasets_task(store_root, catalog_path, profile)
    store = store_for(store_root)
    arrays = store.location.url
    rid = run_id()
    planned = _plan(store, resolved, [*resolved.datasets, CONCEPT_DATASET], rid)
    units = {id(p): _submit_shards(store, resolved, p, arrays) for p in planned if isinstance(p, _Pending)}
    total = sum(p.remaining for p in planned if isinstance(p, _Pending))
    with tqdm(total=total, desc="extract (dask)", unit="text", mininterval=2.0, dynamic_ncols=True) as bar:
        return [
            p if isinstance(p, UnitResult) else _commit(store, resolved, p, units[id(p)], rid, bar, arrays)
            for p in planned
        ]


@flow(name="safeport-extract-dask", log_prints=False)
def extract_dask_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[UnitResult]:
    """The extract flow with shards computed on Dask workers; run it through :func:`extract_on_dask`."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        return extract_all_dask(str(root), catalog_path, profile)


def extract_on_dask(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    wait_s: float = 0.0,
    address: str | None = None,
    workers: int = 2,
) -> list[UnitResult]:
    """Extract a profile on a Dask cluster (``address``) or a local one of ``workers`` processes."""
    runner = dask_task_runner(address, workers)
    return extract_dask_flow.with_options(task_runner=runner)(catalog_path, profile, store, wait_s)
