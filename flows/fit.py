"""Fit stage: maps, vectors, baselines and the representation-level report per source→target.

Each artefact is keyed by exactly its inputs, so a change re-keys only what it feeds:

- a **map**: both representation keys, the anchor rows (dataset hash) and their split,
  the mapper and its hyper-parameters, and the mapper's code;
- a **vector**: its map (or its model), the pair rows, the calibration inputs (anchor
  rows and split) it uses, and the vector code;
- a **fit** (one source→target pair: its maps, vectors and the map/transfer/probe
  rows): the union of those inputs;
- the **report rows** of a prompt set: the fit (its vectors), the prompt set's rows and
  name, the α sweep and the evaluation code.

Adding, removing or changing an evaluation prompt set therefore computes only that set's
report rows; every map, vector and fit keeps its key. Code versions hash what the code
does, not its comments, docstrings or import lines (:mod:`safeport.codehash`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import safeport.eval.metrics
import safeport.eval.probe
import safeport.eval.representation
import safeport.mappers.base
import safeport.mappers.transfer
import safeport.mappers.vectors
from safeport.catalog import Resolved
from safeport.codehash import code_hash
from safeport.eval.probe import SafetyProbe, train_probe
from safeport.eval.report import headline, render
from safeport.eval.representation import PromptSet, cosine_rows, map_rows, position_section, probe_rows, proxy_rows
from safeport.flows.common import catalog, model_source, store_for, writing
from safeport.flows.extract import CONCEPT_DATASET
from safeport.flows.runner import Call, Done, Group, KeyedStage, Work, run_stage
from safeport.keys import content_key
from safeport.mappers import MAPPERS, from_state, make_mapper
from safeport.mappers.base import FittedMap
from safeport.mappers.mlp import MLPMapper
from safeport.mappers.transfer import (
    Anchors,
    Centring,
    Pairs,
    TransferResult,
    centred_splits,
    centring,
    fit_maps,
    transfer_vectors,
)
from safeport.store import artifacts, positions
from safeport.store.store import Store, StoreError
from safeport.store.stream import ROWS, Cursor

log = logging.getLogger("safeport.fit")

_VECTOR_MODULES = (safeport.mappers.transfer, safeport.mappers.vectors, safeport.mappers.base)
_EVAL_MODULES = (safeport.eval.metrics, safeport.eval.probe, safeport.eval.representation, safeport.mappers.vectors)


@cache
def mapper_code_version(mapper: str) -> str:
    """The code one mapper's maps depend on: its module, the mapper contract, centring."""
    return code_hash([*_VECTOR_MODULES, inspect.getmodule(MAPPERS[mapper])])


@cache
def vector_code_version() -> str:
    """The code that turns maps and pooled pairs into vectors (METHOD §3, §5, §6)."""
    return code_hash(_VECTOR_MODULES)


@cache
def report_code_version() -> str:
    """The code of the representation-level metrics and the probe proxy."""
    return code_hash(_EVAL_MODULES)


def fit_code_version(mappers: Sequence[str]) -> str:
    """Everything a fit computes with: its mappers, the vector code and the metrics."""
    return code_hash([*_VECTOR_MODULES, *_EVAL_MODULES, *(inspect.getmodule(MAPPERS[m]) for m in mappers)])


def mapper_config(mapper: str) -> dict[str, Any]:
    """The mapper's hyper-parameters (its dataclass fields, without where it runs)."""
    made = make_mapper(mapper)
    if not dataclasses.is_dataclass(made):
        return {}
    return {k: v for k, v in sorted(dataclasses.asdict(made).items()) if k != "device"}


def _hash(*parts: object) -> str:
    return content_key(list(parts))


@dataclass(frozen=True)
class FitResult:
    source: str
    target: str
    fit_key: str
    status: str  # done | skipped (| waiting: another writer fits it, see fit_pair)
    seconds: float
    headline: list[str]
    report: str
    reports_done: int = 0  # prompt sets whose report rows this run computed
    report_keys: tuple[str, ...] = ()  # the current report row sets of this pair, one per prompt set


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


@dataclass(frozen=True)
class _Keys:
    """The inputs of one source→target fit, by content."""

    source_key: str
    target_key: str
    anchors_hash: str
    pairs_hash: str
    concept_hash: str | None

    def fit_inputs(self, mappers: Sequence[str], seed: int) -> dict[str, Any]:
        return {
            "source_key": self.source_key,
            "target_key": self.target_key,
            "anchors_hash": self.anchors_hash,
            "pairs_hash": self.pairs_hash,
            "concept_hash": self.concept_hash,
            "mappers": {m: mapper_config(m) for m in mappers},
            "seed": seed,
            "code_version": fit_code_version(mappers),
        }


def map_inputs(keys: _Keys, mapper: str, split_hash: str) -> dict[str, Any]:
    """What a map is computed from, and nothing else (its key is the hash of this)."""
    return {
        "source_key": keys.source_key,
        "target_key": keys.target_key,
        "mapper": mapper,
        "config": mapper_config(mapper),
        "anchors_hash": keys.anchors_hash,
        "split_hash": split_hash,
        "code_version": mapper_code_version(mapper),
    }


def vector_inputs(keys: _Keys, name: str, kind: str, map_key: str | None, split_hash: str, seed: int) -> dict[str, Any]:
    """What one vector is computed from, per kind (its key is the hash of this).

    source / native: one model's pooled pairs. raw / uncalibrated: the map and the source
    direction. calibrated: those plus the anchor rows the scale s comes from. random: the
    calibrated norm (models, anchors, pairs) and the seed. string: the calibrated norm, the
    target's train-anchor mean and the concept string's row.
    """
    base: dict[str, Any] = {"name": name, "pairs_hash": keys.pairs_hash, "code_version": vector_code_version()}
    calibration = {"anchors_hash": keys.anchors_hash, "split_hash": split_hash}
    models = {"source_key": keys.source_key, "target_key": keys.target_key}
    if kind == "source":
        return {**base, "source_key": keys.source_key}
    if kind == "native":
        return {**base, "target_key": keys.target_key}
    if kind in ("raw", "uncalibrated"):
        return {**base, "map_key": map_key}
    if kind == "calibrated":
        return {**base, "map_key": map_key, **calibration}
    if kind == "random":
        return {**base, **models, **calibration, "seed": seed}
    if kind == "string":
        return {**base, **models, **calibration, "concept_hash": keys.concept_hash}
    raise ValueError(f"unknown vector kind {kind!r} for {name!r}")  # pragma: no cover - transfer_vectors' kinds


@dataclass(frozen=True)
class _Computed:
    """What a fit computed (its report rows reuse the vectors and probe without re-reading them)."""

    result: TransferResult
    tgt_train: Pairs
    tgt_test: Pairs
    probe: SafetyProbe
    n_rows: int
    maps: list[tuple[str, dict[str, np.ndarray], dict[str, Any]]]  # new maps: (key, tensors, lineage row)
    records: list[artifacts.VectorRecord]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    outputs: list[tuple[str, str, str]]


def _mlp_from_store(
    store: Store, keys: _Keys, anchors: str, c: Centring, val: tuple[np.ndarray, np.ndarray], seed: int
) -> FittedMap:
    """The MLP map trained from ``Store.batches``: seeded, shuffled train anchor rows of the source, each
    with the target's row of the same text (``paired_with``), centred with the train means."""
    mapper = make_mapper("mlp")
    if not isinstance(mapper, MLPMapper):  # pragma: no cover - the registry's mlp is MLPMapper
        raise TypeError(f"mapper 'mlp' is {type(mapper).__name__}, not MLPMapper")
    select = (
        "model_key = ? AND kind = 'pooled' AND text_id IN "
        "(SELECT text_id FROM dataset_texts WHERE dataset = ? AND split = 'train')"
    )
    params = [keys.source_key, anchors]
    n_train = int(store.scalar(f"SELECT count(*) FROM {ROWS} WHERE {select}", params) or 0)
    mu_s, mu_t = c.mu_s.astype(np.float32), c.mu_t.astype(np.float32)

    def batches(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        stream = store.batches(
            select,
            params=params,
            batch_size=mapper.batch_size,
            seed=seed,
            epochs=epoch,
            cursor=Cursor(seed, epoch - 1, 0),
            paired_with=keys.target_key,
        )
        for b in stream:
            if b.paired is None:  # pragma: no cover - paired_with always pairs
                raise StoreError("the anchor stream returned no target rows")
            yield b.values - mu_s, b.paired - mu_t

    return mapper.fit_stream(batches, val[0], val[1], n_train)


def _save_fit(store: Store, fit_key: str, source: str, target: str, inputs: dict[str, Any], c: _Computed) -> None:
    """A computed fit's maps, vectors and rows, and its record as done: one transaction (the runner's)."""
    with store.transaction():
        artifacts.start_fit(store, fit_key, source, target, inputs)
        for map_key, state, row in c.maps:
            artifacts.save_map(store, map_key, state, row)
        artifacts.save_vectors(store, fit_key, c.records)
        artifacts.save_results(store, fit_key, c.rows)
        artifacts.finish_fit(store, fit_key, "", c.outputs, c.summary)


def _fit(
    store: Store, resolved: Resolved, source: str, target: str, keys: _Keys, fit_key: str, inputs: dict[str, Any]
) -> _Computed:
    """Maps (reused by key where stored), vectors and the fit's own rows, computed from the cached rows."""
    prof = resolved.profile
    a_meta, a_src = _read(store, keys.source_key, prof.anchors)
    b_meta, a_tgt = _read(store, keys.target_key, prof.anchors)
    if a_meta.column("text_id").to_pylist() != b_meta.column("text_id").to_pylist():
        raise StoreError(f"anchor rows of {source} and {target} are not aligned; re-run `safeport extract`")
    splits = np.asarray(a_meta.column("split").to_pylist())
    split_hash = _hash(a_meta.column("text_id").to_pylist(), splits.tolist())
    anchors = Anchors(a_src, a_tgt, splits)
    c = centring(anchors)

    map_keys: dict[str, str] = {m: _hash(map_inputs(keys, m, split_hash)) for m in prof.mappers}
    reuse: dict[str, FittedMap] = {}
    for m, key in map_keys.items():
        if store.scalar("SELECT 1 FROM maps WHERE map_key = ?", [key]):
            state, params = artifacts.load_map(store, key, artifacts.map_state_names(store, key))
            reuse[m] = from_state(m, state, params)
    stored = set(reuse)
    if "mlp" in prof.mappers and "mlp" not in reuse:  # trained from the store's stream of anchor rows
        reuse["mlp"] = _mlp_from_store(store, keys, prof.anchors, c, centred_splits(anchors, c)["val"], prof.seed)
    maps = fit_maps(anchors, c, prof.mappers, lambda m: make_mapper(m), reuse)
    anchor_units = _unit_keys(a_meta, b_meta)
    new_maps: list[tuple[str, dict[str, np.ndarray], dict[str, Any]]] = []
    for mname, fitted in maps.items():
        if mname not in stored:
            new_maps.append(
                (
                    map_keys[mname],
                    fitted.state(),
                    {
                        "source": source,
                        "target": target,
                        "source_key": keys.source_key,
                        "target_key": keys.target_key,
                        "mapper": mname,
                        "params": fitted.params,
                        "split_hash": split_hash,
                        "anchors": prof.anchors,
                        "anchors_hash": keys.anchors_hash,
                        "input_units": anchor_units,
                        "code_version": mapper_code_version(mname),
                        "n_train": int((splits == "train").sum()),
                    },
                )
            )

    src_train, tgt_train = (_pairs(store, k, prof.pairs, "train") for k in (keys.source_key, keys.target_key))
    tgt_test = _pairs(store, keys.target_key, prof.pairs, "test")
    concept_meta, concept = store.activations(keys.target_key, CONCEPT_DATASET) if keys.concept_hash else (None, None)
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

    src_pair_units = _unit_keys(store.activations(keys.source_key, prof.pairs)[0])
    tgt_pair_units = _unit_keys(store.activations(keys.target_key, prof.pairs)[0])
    concept_units = _unit_keys(concept_meta) if concept_meta is not None else []
    units_by_kind = {
        "source": src_pair_units,
        "native": tgt_pair_units,
        "raw": sorted({*anchor_units, *src_pair_units}),
        "uncalibrated": sorted({*anchor_units, *src_pair_units}),
        "calibrated": sorted({*anchor_units, *src_pair_units}),
        "random": sorted({*anchor_units, *src_pair_units}),
        "string": sorted({*anchor_units, *src_pair_units, *concept_units}),
    }
    records = []
    for name, values in result.vectors.items():
        kind, mapper, cat = result.kinds[name]
        map_key = map_keys[mapper] if mapper else None
        vin = vector_inputs(keys, name, kind, map_key, split_hash, prof.seed)
        lineage: dict[str, Any] = {
            "fit_key": fit_key,
            "source_key": keys.source_key if kind != "native" else None,
            "target_key": keys.target_key if kind != "source" else None,
            "map_key": map_key,
            "pairs_hash": keys.pairs_hash,
            "input_units": units_by_kind[kind],
            "code_version": vector_code_version(),
            "inputs": vin,
        }
        if kind not in ("source", "native"):
            lineage.update({"anchors_hash": keys.anchors_hash, "split_hash": split_hash})
        if kind in ("calibrated", "random", "string"):
            lineage["scale"] = c.scale
        records.append(
            artifacts.VectorRecord(
                _hash(vin),
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
    probe = train_probe(tgt_train.safe, tgt_train.unsafe, seed=prof.seed)
    rows: list[dict[str, Any]] = [
        *map_rows(result, anchors),
        *cosine_rows(result, target),
        *probe_rows(probe, tgt_test),
    ]
    for r in rows:
        r.update({"source": source, "target": target})
    summary = {
        "params": {m: f.params for m, f in maps.items()},
        "info": {
            "fit key": fit_key,
            "anchors": f"{prof.anchors} ({len(splits)} rows, split hash {split_hash})",
            "pairs": f"{prof.pairs} ({len(src_train.safe)} train pairs, {len(tgt_test.safe)} test pairs)",
            "calibration scale s": f"{c.scale:.6g}",
            "code version": inputs["code_version"],
        },
    }
    outputs = [("map", key, f"{source}->{target}:{m}") for m, key in map_keys.items()]
    outputs += [("vector", r.vector_key, r.name) for r in records]
    return _Computed(result, tgt_train, tgt_test, probe, len(rows), new_maps, records, rows, summary, outputs)


def _stored_vectors(
    store: Store, fit_key: str
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str | None, str | None]]]:
    """A done fit's vectors, read back by key (checksum-verified), with their kinds."""
    vectors: dict[str, np.ndarray] = {}
    kinds: dict[str, tuple[str, str | None, str | None]] = {}
    for name, key in artifacts.fit_outputs(store, fit_key, "vector").items():
        values, lineage = artifacts.load_vector_key(store, key)
        vectors[name] = values
        kinds[name] = (str(lineage["kind"]), lineage.get("mapper"), lineage.get("category"))
    return vectors, kinds


@dataclass(frozen=True)
class _Pair:
    """One source→target fit of the profile, by content: its inputs and its key."""

    source: str
    target: str
    keys: _Keys
    inputs: dict[str, Any]
    fit_key: str

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"


def _pairs_of(store: Store, resolved: Resolved) -> list[_Pair]:
    prof = resolved.profile
    hashes = {d: store.dataset_hash(d) for d in [prof.anchors, prof.pairs]}
    missing = [d for d, h in hashes.items() if h is None]
    if missing:
        raise StoreError(f"dataset(s) {missing} are not registered in {store.root}; run `safeport extract` first")
    concept = store.dataset_hash(CONCEPT_DATASET)
    out = []
    for source in resolved.sources_of("source"):
        for target in resolved.sources_of("target"):
            keys = _Keys(
                model_source(resolved, source).spec().key(),
                model_source(resolved, target).spec().key(),
                str(hashes[prof.anchors]),
                str(hashes[prof.pairs]),
                concept,
            )
            inputs = keys.fit_inputs(prof.mappers, prof.seed)
            out.append(_Pair(source, target, keys, inputs, _hash(inputs)))
    return out


class FitPairs(KeyedStage):
    """The fit stage: one piece per source→target pair whose fit (by key) is not done; computed here."""

    flow, task, unit, remote = "fit", "fit_pair", "fit", False
    prefix = "fit"

    def __init__(self, store: Store, resolved: Resolved, pairs: Sequence[_Pair]) -> None:
        self.store, self.resolved = store, resolved
        self.pairs = {p.fit_key: p for p in pairs}
        self.computed: dict[str, _Computed] = {}

    def groups(self) -> list[Group]:
        return [Group(p.name, self.resolved.profile.anchors, p.fit_key) for p in self.pairs.values()]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        p = self.pairs[work.group.key or ""]
        return Call(_fit, (self.store, self.resolved, p.source, p.target, p.keys, p.fit_key, p.inputs), p.name)

    def commit(self, work: Work, keys: list[str], result: _Computed, remote: bool) -> Done:
        if not keys:
            return Done()
        p = self.pairs[work.group.key or ""]
        _save_fit(self.store, p.fit_key, p.source, p.target, p.inputs, result)
        self.computed[p.fit_key] = result
        return Done(result.n_rows)

    def done(self, key: str) -> bool:
        return artifacts.fit_done(self.store, key)


@dataclass(frozen=True)
class _ReportSet:
    pair: _Pair
    prompt_set: str
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return _hash(self.inputs)


class ReportSets(KeyedStage):
    """The representation-report stage: one piece per (pair, prompt set) whose rows (by key) are not stored."""

    flow, task, unit, remote = "report", "report_rows", "prompt set", False
    prefix = "report"

    def __init__(self, store: Store, resolved: Resolved, sets: Sequence[_ReportSet], fits: FitPairs) -> None:
        self.store, self.resolved, self.fits = store, resolved, fits
        self.sets = {r.key: r for r in sets}
        self._vectors: dict[str, Any] = {}

    def groups(self) -> list[Group]:
        return [Group(r.pair.name, r.prompt_set, k) for k, r in self.sets.items()]

    def _inputs(self, pair: _Pair) -> Any:
        """A fit's vectors, kinds and probe: from this run's fit, or read back once per pair."""
        if pair.fit_key not in self._vectors:
            done = self.fits.computed.get(pair.fit_key)
            if done is not None:
                self._vectors[pair.fit_key] = (done.result.vectors, done.result.kinds, done.probe)
            else:
                vectors, kinds = _stored_vectors(self.store, pair.fit_key)
                tgt_train = _pairs(self.store, pair.keys.target_key, self.resolved.profile.pairs, "train")
                probe = train_probe(tgt_train.safe, tgt_train.unsafe, seed=self.resolved.profile.seed)
                self._vectors[pair.fit_key] = (vectors, kinds, probe)
        return self._vectors[pair.fit_key]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        r = self.sets[work.group.key or ""]
        vectors, kinds, probe = self._inputs(r.pair)
        meta, values = _read(self.store, r.pair.keys.target_key, r.prompt_set)
        ps = PromptSet(r.prompt_set, values, tuple(meta.column("category").to_pylist()))
        prof = self.resolved.profile
        args = (vectors, kinds, r.pair.target, probe, ps, prof.alphas, prof.mappers)
        return Call(proxy_rows, args, f"{r.pair.name}/{r.prompt_set}")

    def commit(self, work: Work, keys: list[str], result: list[dict[str, Any]], remote: bool) -> Done:
        if not keys:
            return Done()
        r = self.sets[work.group.key or ""]
        p = r.pair
        rows = [{**row, "source": p.source, "target": p.target} for row in result]
        artifacts.save_report_rows(self.store, r.key, p.fit_key, p.source, p.target, r.prompt_set, r.inputs, rows)
        return Done(len(rows))

    def done(self, key: str) -> bool:
        return artifacts.report_done(self.store, key)


def _report_sets_of(store: Store, resolved: Resolved, pairs: Sequence[_Pair]) -> list[_ReportSet]:
    prof = resolved.profile
    out = []
    for p in pairs:
        for prompt_set in prof.prompts:
            p_hash = store.dataset_hash(prompt_set)
            if p_hash is None:
                raise StoreError(
                    f"prompt set {prompt_set!r} is not registered in {store.root}; run `safeport extract` first"
                )
            inputs = {
                "fit_key": p.fit_key,
                "prompt_set": prompt_set,
                "prompt_hash": p_hash,
                "alphas": [float(a) for a in prof.alphas],
                "code_version": report_code_version(),
            }
            out.append(_ReportSet(p, prompt_set, inputs))
    return out


def _render_report(store: Store, resolved: Resolved, p: _Pair, report_keys: dict[str, str], fresh: bool) -> FitResult:
    """Write the pair's Markdown report when what it shows changed; its headline either way."""
    prof = resolved.profile
    report_name = f"fit-{p.source}--{p.target}"
    rows = store.sql(
        "SELECT * FROM eval_results WHERE fit_key = ? OR list_contains(?::VARCHAR[], fit_key)",
        [p.fit_key, list(report_keys.values())],
    ).to_pylist()
    path = artifacts.report_path(store, report_name)
    render_key = _hash(p.fit_key, sorted(report_keys.items()))
    rendered = store.scalar("SELECT report_key FROM fits WHERE fit_key = ?", [p.fit_key])
    if fresh or rendered != render_key or not path.is_file():
        summary = json.loads(store.scalar("SELECT summary_json FROM fits WHERE fit_key = ?", [p.fit_key]) or "{}")
        markdown, figures = render(
            rows,
            p.source,
            p.target,
            prof.mappers,
            prof.alphas,
            list(report_keys),
            summary.get("params", {}),
            summary.get("info", {"fit key": p.fit_key}),
            report_name,
        )
        markdown += "\n" + position_section(
            {
                f"{p.source} (source)": positions.position_norms(store, p.keys.source_key, prof.anchors),
                f"{p.target} (target)": positions.position_norms(store, p.keys.target_key, prof.anchors),
            }
        )
        path = artifacts.write_report(store, report_name, markdown, figures)
        artifacts.set_rendered(store, p.fit_key, render_key, str(path))
    head = headline(rows, p.source, p.target, prof.mappers, prof.alphas, prof.prompts[0]) if prof.prompts else None
    return FitResult(p.source, p.target, p.fit_key, "skipped", 0.0, head.lines() if head else [], str(path))


def fit_pairs(store: Store, resolved: Resolved) -> list[FitResult]:
    """Fit every source→target pair, compute the report rows of every prompt set, render each pair's report.

    Each fit and each prompt set's rows are a piece of the one runner: claimed, computed, committed
    in one transaction; what another writer is computing is waited for, then reported skipped.
    """
    started = time.time()
    pairs = _pairs_of(store, resolved)
    fits = FitPairs(store, resolved, pairs)
    fitted = {r.group.key: r for r in run_stage(store, fits, desc="fit")}
    sets = _report_sets_of(store, resolved, pairs)
    reported = {r.group.key: r for r in run_stage(store, ReportSets(store, resolved, sets, fits), desc="report")}
    out = []
    for p in pairs:
        mine = {r.prompt_set: r.key for r in sets if r.pair is p}
        done_now = sum(1 for k in mine.values() if reported[k].status == "done")
        status = fitted[p.fit_key].status
        result = _render_report(store, resolved, p, mine, status == "done" or done_now > 0)
        out.append(
            FitResult(
                p.source,
                p.target,
                p.fit_key,
                status,
                time.time() - started,
                result.headline,
                result.report,
                done_now,
                tuple(mine.values()),
            )
        )
    return out


@task(name="fit-pairs", cache_policy=NO_CACHE)
def fit_pairs_task(store_root: str, catalog_path: str | None, profile: str) -> list[FitResult]:
    return fit_pairs(store_for(store_root), catalog(catalog_path, profile))


def fit_all(store_root: str, catalog_path: str | None, profile: str) -> list[FitResult]:
    """Body of the fit flow; callable from a parent flow that already holds the store."""
    result: list[FitResult] = fit_pairs_task(store_root, catalog_path, profile)
    return result


@flow(name="safeport-fit", log_prints=False)
def fit_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[FitResult]:
    """Fit maps and vectors for every source→target pair of a profile from the cached store."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        return fit_all(str(root), catalog_path, profile)
