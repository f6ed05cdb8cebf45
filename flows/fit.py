"""Fit stage: maps, vectors, baselines and the representation-level report per source→target.

A fit's key hashes every input (both representation keys, the content hashes
of anchors, pairs and prompt sets, mappers, α sweep, seed, and a hash of the
fitting code), so a rerun with unchanged inputs refits nothing. Maps have keys
of their own and are reused when only, say, the prompt sets changed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import safeport
import safeport.eval.metrics
import safeport.eval.probe
import safeport.eval.representation
import safeport.mappers.transfer
import safeport.mappers.vectors
from safeport.catalog import Resolved
from safeport.eval.report import headline, render
from safeport.eval.representation import PromptSet, cosine_rows, map_rows, probe_rows
from safeport.flows.common import catalog, model_source, run_id, store_for, writing
from safeport.flows.extract import CONCEPT_DATASET, WAIT_POLL_S
from safeport.mappers import MAPPERS, from_state, make_mapper
from safeport.mappers.base import FittedMap
from safeport.mappers.transfer import Anchors, Pairs, centring, fit_maps, transfer_vectors
from safeport.store import artifacts
from safeport.store.claims import RunEntry
from safeport.store.store import Store, StoreError

log = logging.getLogger("safeport.fit")


def _source_hash(modules: list[Any]) -> str:
    h = hashlib.sha256()
    for m in sorted({m for m in modules if m is not None}, key=lambda m: m.__name__):
        h.update(inspect.getsource(m).encode())
    return h.hexdigest()[:10]


@cache
def mapper_code_version() -> str:
    """Hash of the mapper code alone: maps are refitted only when it changes."""
    mods = [safeport.mappers.transfer, safeport.mappers.vectors, *(inspect.getmodule(f) for f in MAPPERS.values())]
    return f"{safeport.__version__}+{_source_hash(mods)}"


@cache
def code_version() -> str:
    """Hash of the fitting and evaluation code: a change to a mapper or a metric invalidates old fits."""
    mods = [
        safeport.mappers.transfer,
        safeport.mappers.vectors,
        safeport.eval.metrics,
        safeport.eval.probe,
        safeport.eval.representation,
        *(inspect.getmodule(f) for f in MAPPERS.values()),
    ]
    return f"{safeport.__version__}+{_source_hash(mods)}"


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class FitResult:
    source: str
    target: str
    fit_key: str
    status: str  # done | skipped (| waiting: another writer fits it, see fit_pair)
    seconds: float
    headline: list[str]
    report: str


def _read(store: Store, model_key: str, dataset: str, where: str = "") -> tuple[pa.Table, np.ndarray]:
    meta, values = store.activations(model_key, dataset, where)
    want = store.scalar(
        f"SELECT count(*) FROM dataset_texts WHERE dataset = ? {'AND (' + where + ')' if where else ''}", [dataset]
    )
    if meta.num_rows != want:
        raise StoreError(
            f"model {model_key} has {meta.num_rows} of {want} rows of dataset {dataset!r}; run `safeport extract` first"
        )
    return meta, values


def _pairs(store: Store, model_key: str, dataset: str, split: str) -> Pairs:
    meta, values = _read(store, model_key, dataset, f"split = '{split}'")
    side = np.asarray(meta.column("side").to_pylist())
    pid = np.asarray(meta.column("pair_id").to_pylist())
    safe, unsafe = np.flatnonzero(side == "safe"), np.flatnonzero(side == "unsafe")
    safe, unsafe = safe[np.argsort(pid[safe], kind="stable")], unsafe[np.argsort(pid[unsafe], kind="stable")]
    if not np.array_equal(pid[safe], pid[unsafe]):
        raise StoreError(f"dataset {dataset!r} split {split!r} has unmatched pairs; re-register it")
    cats = meta.column("category").to_pylist()
    return Pairs(values[safe], values[unsafe], tuple(str(cats[i] or "uncategorised") for i in safe))


def _unit_keys(*metas: pa.Table) -> list[str]:
    return sorted({k for m in metas for k in m.column("unit_key").to_pylist()})


def fit_pair(store: Store, resolved: Resolved, source: str, target: str, rid: str = "", wait: bool = True) -> FitResult:
    """Fit every mapper for one source→target pair and store maps, vectors, results and the report.

    The fit is claimed (``fit:<fit key>``) first: while another writer computes it this returns
    status ``waiting`` (``wait=False``) or waits for it and reports it skipped, taking it over if
    that writer dies.
    """
    started = time.time()
    rid = rid or run_id()
    prof = resolved.profile
    src_key = model_source(resolved, source).spec().key()
    tgt_key = model_source(resolved, target).spec().key()
    hashes = {d: store.dataset_hash(d) for d in [prof.anchors, prof.pairs, *prof.prompts, CONCEPT_DATASET]}
    inputs = {
        "source_key": src_key,
        "target_key": tgt_key,
        "datasets": hashes,
        "mappers": list(prof.mappers),
        "alphas": list(prof.alphas),
        "seed": prof.seed,
        "code_version": code_version(),
    }
    fit_key = _hash(inputs)
    report_name = f"fit-{source}--{target}"
    claim = f"fit:{fit_key}"
    claimed = False
    while not artifacts.fit_done(store, fit_key):
        if store.session.claim_unfinished([claim], lambda keys: keys if artifacts.fit_done(store, fit_key) else []):
            claimed = True
            break
        if not wait:
            return FitResult(source, target, fit_key, "waiting", time.time() - started, [], "")
        time.sleep(WAIT_POLL_S)  # another writer fits this pair now
    if not claimed:
        store.record_run(
            rid,
            "fit",
            "fit_pair",
            f"{source}->{target}",
            prof.anchors,
            fit_key,
            "skipped",
            0,
            0,
            time.time() - started,
            started,
        )
        done_rows = store.sql("SELECT * FROM eval_results WHERE fit_key = ?", [fit_key]).to_pylist()
        head = headline(done_rows, source, target, prof.mappers, prof.alphas, prof.prompts[0]) if prof.prompts else None
        return FitResult(
            source,
            target,
            fit_key,
            "skipped",
            time.time() - started,
            head.lines() if head else [],
            str(store.root / "reports" / f"{report_name}.md"),
        )
    run = store.session.start_run("fit", "fit_pair", f"{source}->{target}", prof.anchors, fit_key)
    try:
        return _fit_claimed(store, resolved, source, target, inputs, fit_key, run, started)
    finally:
        store.session.release([claim])


def _fit_claimed(
    store: Store,
    resolved: Resolved,
    source: str,
    target: str,
    inputs: dict[str, Any],
    fit_key: str,
    run: RunEntry,
    started: float,
) -> FitResult:
    """The body of :func:`fit_pair` for a fit this writer has claimed."""
    prof = resolved.profile
    src_key, tgt_key = inputs["source_key"], inputs["target_key"]
    hashes = inputs["datasets"]
    report_name = f"fit-{source}--{target}"
    artifacts.start_fit(store, fit_key, source, target, inputs)

    a_meta, a_src = _read(store, src_key, prof.anchors)
    b_meta, a_tgt = _read(store, tgt_key, prof.anchors)
    if a_meta.column("text_id").to_pylist() != b_meta.column("text_id").to_pylist():
        raise StoreError(f"anchor rows of {source} and {target} are not aligned; re-run `safeport extract`")
    splits = np.asarray(a_meta.column("split").to_pylist())
    split_hash = _hash(a_meta.column("text_id").to_pylist(), splits.tolist())
    anchors = Anchors(a_src, a_tgt, splits)
    c = centring(anchors)

    map_keys: dict[str, str] = {
        m: _hash(src_key, tgt_key, m, hashes[prof.anchors], split_hash, mapper_code_version(), prof.seed)
        for m in prof.mappers
    }
    reuse: dict[str, FittedMap] = {}
    for m, key in map_keys.items():
        if store.scalar("SELECT 1 FROM maps WHERE map_key = ?", [key]):
            state, params = artifacts.load_map(store, key, artifacts.map_state_names(store, key))
            reuse[m] = from_state(m, state, params)
    maps = fit_maps(anchors, c, prof.mappers, lambda m: make_mapper(m), reuse)
    anchor_units = _unit_keys(a_meta, b_meta)
    for mname, fitted in maps.items():
        if mname not in reuse:
            artifacts.save_map(
                store,
                map_keys[mname],
                fitted.state(),
                {
                    "source": source,
                    "target": target,
                    "source_key": src_key,
                    "target_key": tgt_key,
                    "mapper": mname,
                    "params": fitted.params,
                    "split_hash": split_hash,
                    "anchors": prof.anchors,
                    "anchors_hash": hashes[prof.anchors],
                    "input_units": anchor_units,
                    "code_version": mapper_code_version(),
                    "n_train": int((splits == "train").sum()),
                },
            )

    src_train, tgt_train = (_pairs(store, k, prof.pairs, "train") for k in (src_key, tgt_key))
    tgt_test = _pairs(store, tgt_key, prof.pairs, "test")
    concept = store.activations(tgt_key, CONCEPT_DATASET)[1] if hashes[CONCEPT_DATASET] else None
    result = transfer_vectors(
        source,
        target,
        c,
        maps,
        src_train,
        tgt_train,
        None if concept is None or len(concept) == 0 else concept[0],
        seed=prof.seed,
    )

    pair_units = _unit_keys(*(store.activations(k, prof.pairs)[0] for k in (src_key, tgt_key)))
    base_lineage = {
        "fit_key": fit_key,
        "source_key": src_key,
        "target_key": tgt_key,
        "split_hash": split_hash,
        "anchors_hash": hashes[prof.anchors],
        "pairs_hash": hashes[prof.pairs],
        "scale": c.scale,
        "input_units": sorted(set(anchor_units) | set(pair_units)),
        "code_version": code_version(),
    }
    records = []
    for name, values in result.vectors.items():
        kind, mapper, cat = result.kinds[name]
        lineage = {**base_lineage, "map_key": map_keys.get(mapper or "")}
        records.append(
            artifacts.VectorRecord(
                _hash(fit_key, name),
                name,
                kind,
                None if kind == "native" else source,
                target,
                mapper,
                cat,
                values,
                lineage,
            )
        )
    artifacts.save_vectors(store, fit_key, records)

    prompt_sets = []
    for p in prof.prompts:
        meta, values = _read(store, tgt_key, p)
        prompt_sets.append(PromptSet(p, values, tuple(meta.column("category").to_pylist())))
    rows: list[dict[str, Any]] = [
        *map_rows(result, anchors),
        *cosine_rows(result, target),
        *probe_rows(result, target, tgt_train, tgt_test, prompt_sets, prof.alphas, prof.mappers, prof.seed),
    ]
    for r in rows:
        r.update({"source": source, "target": target})
    artifacts.save_results(store, fit_key, rows)

    info = {
        "fit key": fit_key,
        "anchors": f"{prof.anchors} ({len(splits)} rows, split hash {split_hash})",
        "pairs": f"{prof.pairs} ({len(src_train.safe)} train pairs, {len(tgt_test.safe)} test pairs)",
        "calibration scale s": f"{c.scale:.6g}",
        "code version": code_version(),
    }
    markdown, figures = render(
        rows,
        source,
        target,
        prof.mappers,
        prof.alphas,
        prof.prompts,
        {m: f.params for m, f in maps.items()},
        info,
        report_name,
    )
    path = artifacts.write_report(store, report_name, markdown, figures)
    seconds = time.time() - started
    with store.transaction():
        artifacts.finish_fit(store, fit_key, str(path))
        store.session.progress(run, len(rows))
        store.session.finish_run(run, "done")
    head = headline(rows, source, target, prof.mappers, prof.alphas, prof.prompts[0]) if prof.prompts else None
    return FitResult(source, target, fit_key, "done", seconds, head.lines() if head else [], str(path))


@task(name="fit-pair", cache_policy=NO_CACHE, task_run_name="fit-{source}-{target}")
def fit_pair_task(
    store_root: str, catalog_path: str | None, profile: str, source: str, target: str, wait: bool = True
) -> FitResult:
    return fit_pair(store_for(store_root), catalog(catalog_path, profile), source, target, wait=wait)


def fit_all(store_root: str, catalog_path: str | None, profile: str) -> list[FitResult]:
    """Fit every pair; pairs another writer is fitting are waited for after the others."""
    resolved = catalog(catalog_path, profile)
    results = [
        fit_pair_task(store_root, catalog_path, profile, s, t, wait=False)
        for s in resolved.sources_of("source")
        for t in resolved.sources_of("target")
    ]
    return [
        fit_pair_task(store_root, catalog_path, profile, r.source, r.target) if r.status == "waiting" else r
        for r in results
    ]


@flow(name="safeport-fit", log_prints=False)
def fit_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[FitResult]:
    """Fit maps and vectors for every source→target pair of a profile from the cached store."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url):
        return fit_all(str(root), catalog_path, profile)
