"""Extraction: catalog datasets -> pooled rows in the store, one unit per (model, dataset).

A unit's key is a hash of (representation key, dataset, dataset content hash), so a rerun over
unchanged inputs finds the unit done and loads no model. Only texts without a committed row for
the model are computed, so a text shared by two datasets is extracted once, and a crashed unit
resumes at its first uncommitted shard with the same text order and batches (same values).

Two stages on the one runner (:mod:`safeport.flows.runner`), in this process or on Dask workers:

1. :class:`PlanUnits` creates each new unit: its texts (those without a row for the model, minus
   those of the model's units for earlier datasets of the profile), sorted by token length (so
   shards and the batches inside them hold texts of similar length), and its empty array;
2. :class:`ExtractShards` encodes and commits every uncommitted shard (also of units a repair
   invalidated), then marks each unit done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from safeport.catalog import ModelEntry, Resolved
from safeport.datasets import DatasetRows, TextRow, build_all
from safeport.extractors import Extractor, ModelSource
from safeport.extractors.base import check_finite, length_batches
from safeport.flows.common import (
    catalog,
    extractor_for,
    loaded_extractor,
    model_source,
    release_models,
    store_for,
    writing,
)
from safeport.flows.runner import Call, Done, Executor, Group, GroupResult, Work, executor_for_flow, run_stage
from safeport.flows.workers import prepare_worker
from safeport.keys import content_key
from safeport.mappers.vectors import SAFESTEER_CONCEPT_STRING
from safeport.store import positions
from safeport.store.store import ShardDescriptor, Store, UnitInfo, write_shard_array
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
    return content_key(f"{model_key}|{dataset}|{dataset_hash}")


def shard_key(unit_key: str, shard: int) -> str:
    """The claim key of one shard (see :mod:`safeport.store.claims`)."""
    return f"shard:{unit_key}/{shard}"


def _parse_shard_key(key: str) -> tuple[str, int]:
    unit, shard = key.removeprefix("shard:").rsplit("/", 1)
    return unit, int(shard)


def encode_shard(
    extractor: Extractor, texts: list[str], batch_size: int, max_batch_tokens: int, text_ids: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled rows of a shard's texts, batched by token length: (values, n_tokens, truncated)."""
    n = len(texts)
    values = np.empty((n, extractor.dim), dtype=np.float32)
    n_tokens = np.empty(n, dtype=np.int64)
    truncated = np.empty(n, dtype=bool)
    for idx in length_batches(extractor.token_lengths(texts), batch_size, max_batch_tokens):
        pooled = extractor.encode([texts[i] for i in idx])
        check_finite(pooled.values, extractor.spec.model_id, [text_ids[i] for i in idx])
        values[idx], n_tokens[idx], truncated[idx] = pooled.values, pooled.n_tokens, pooled.truncated
    return values, n_tokens, truncated


# --- what runs here or on a worker (module-level, so Dask can send it) -----------------------------


@dataclass(frozen=True)
class UnitPlan:
    """What a unit's model measured for its new texts: token lengths (to order them) and the row width."""

    lengths: np.ndarray | None
    dim: int | None


def measure_texts(source: ModelSource, model_key: str, texts: list[str]) -> UnitPlan:
    """Token lengths of a new unit's texts, measured where the model is loaded."""
    if not texts:
        return UnitPlan(None, None)
    prepare_worker(source, model_key)
    extractor = extractor_for(source)
    return UnitPlan(np.asarray(extractor.token_lengths(texts), dtype=np.int64), int(extractor.dim))


def encode_and_write(
    arrays: zarr.Group | str,
    unit: UnitInfo,
    shard: int,
    text_ids: list[str],
    texts: list[str],
    source: ModelSource,
    batch_size: int,
    max_batch_tokens: int,
) -> ShardDescriptor:
    """Encode one shard and write its rows (step 2 of the commit protocol); returns what the commit records."""
    prepare_worker(source, unit.model_key)
    values, n_tok, trunc = encode_shard(extractor_for(source), texts, batch_size, max_batch_tokens, text_ids)
    return write_shard_array(arrays, unit, shard, text_ids, values, n_tok, trunc)


# --- the two stages --------------------------------------------------------------------------------


def _register(store: Store, model_key: str, model: str, entry: ModelEntry, spec: dict[str, Any], dim: int) -> None:
    """Record the model (and make it the current one of its name) unless it already is."""
    if not store.scalar("SELECT current FROM models WHERE model_key = ?", [model_key]):
        store.register_model(model_key, model, entry.role, spec, dim)


def _datasets(resolved: Resolved) -> list[str]:
    """The datasets pooled rows are extracted for, in profile order (safedig's capture-only sets are not)."""
    prof = resolved.profile
    return list(dict.fromkeys([prof.anchors, prof.pairs, *prof.prompts, CONCEPT_DATASET]))


@dataclass(frozen=True)
class _Unit:
    model: str
    dataset: str
    source: ModelSource
    model_key: str
    dataset_hash: str

    @property
    def key(self) -> str:
        return unit_key(self.model_key, self.dataset, self.dataset_hash)


def _units(store: Store, resolved: Resolved) -> list[_Unit]:
    """Every (model, dataset) unit of the profile, models and datasets in profile order."""
    out = []
    for model in resolved.profile.models:
        source = model_source(resolved, model)
        for dataset in _datasets(resolved):
            ds_hash = store.dataset_hash(dataset)
            if ds_hash is None:
                raise ValueError(f"dataset {dataset!r} is not registered in the store; run the extract flow")
            out.append(_Unit(model, dataset, source, source.spec().key(), ds_hash))
    return out


class PlanUnits:
    """Stage 1: create each unit that is not recorded yet (texts ordered by token length, empty array).

    A unit's texts leave out those of the model's units for earlier datasets of the profile (a
    text shared by two datasets is extracted once): so the plan of (model, dataset k) is not
    claimed while another writer plans one of the model's earlier units (``unless``), and texts
    this writer planned earlier in this run count too.
    """

    flow, task, unit, remote = "extract", "plan_unit", "unit", True

    def __init__(self, store: Store, resolved: Resolved, units: Sequence[_Unit]) -> None:
        self.store, self.resolved, self.units = store, resolved, list(units)
        self.by_key = {u.key: u for u in self.units}
        self.planned: dict[str, set[str]] = {}  # model key -> texts of units this run planned
        self.texts: dict[str, list[str]] = {}  # unit key -> the text ids it was prepared with
        self.created: set[str] = set()

    def groups(self) -> list[Group]:
        return []

    def work(self) -> list[Work]:
        with self.store.reading():
            have = {r[0] for r in self.store.fetchall("SELECT unit_key FROM units")}
        out: list[Work] = []
        earlier: dict[str, list[str]] = {}
        for u in self.units:
            before = earlier.setdefault(u.model_key, [])
            if u.key not in have:
                group = Group(u.model, u.dataset, u.key, record=False)
                out.append(Work((f"unit:{u.key}",), group, unless=tuple(f"unit:{k}" for k in before)))
            before.append(u.key)
        return out

    def finished(self, keys: list[str]) -> Iterable[str]:
        wanted = [k.removeprefix("unit:") for k in keys]
        rows = self.store.sql("SELECT unit_key FROM units WHERE list_contains(?::VARCHAR[], unit_key)", [wanted])
        return [f"unit:{k}" for k in rows.column("unit_key").to_pylist()]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        u = self.by_key[work.group.key or ""]
        order = _datasets(self.resolved)
        elsewhere = set(self.planned.get(u.model_key, set()))
        with self.store.reading():
            for d in order[: order.index(u.dataset)]:
                h = self.store.dataset_hash(d)
                if h is not None:
                    elsewhere.update(self.store.unit_text_ids(unit_key(u.model_key, d, h)))
            missing = [t for t in self.store.missing_texts(u.model_key, u.dataset) if t not in elsewhere]
            texts = self.store.texts(missing)
        self.texts[u.key] = missing
        self.planned.setdefault(u.model_key, set()).update(missing)
        return Call(measure_texts, (u.source, u.model_key, texts), f"plan-{u.model}-{u.dataset}")

    def commit(self, work: Work, keys: list[str], result: UnitPlan, remote: bool) -> Done:
        if not keys:
            return Done()
        u = self.by_key[work.group.key or ""]
        missing = self.texts[u.key]
        if result.lengths is not None and result.dim is not None:
            entry = self.resolved.models[u.model]
            _register(self.store, u.model_key, u.model, entry, asdict(u.source.spec()), result.dim)
            lengths = result.lengths
            # Length-sorted unit order: shards (and the batches inside them) hold texts of similar length.
            missing = [missing[i] for i in sorted(range(len(missing)), key=lambda i: (int(lengths[i]), missing[i]))]
        dim = result.dim or self.store.model_dim(u.model_key) or 0
        self.store.create_unit(
            u.key, u.model_key, u.dataset, u.dataset_hash, missing, dim, self.resolved.profile.shard_rows
        )
        self.created.add(u.key)
        return Done(len(missing))

    def close(self, group: Group, computed: bool) -> None:
        pass


@dataclass(frozen=True)
class _Target:
    """A unit the shard stage completes, and the model that computes it."""

    unit: UnitInfo
    model: str
    source: ModelSource


class ExtractShards:
    """Stage 2: encode and commit every uncommitted shard of the given units; each unit done once complete.

    The one shard loop of extraction and of ``safeport verify --repair``: same texts, same rows,
    same batches, so a resumed or repaired shard gets the values an uninterrupted run gives it.
    """

    flow, task, unit, remote = "extract", "extract_unit", "text", True

    def __init__(
        self, store: Store, resolved: Resolved, targets: Sequence[_Target], on_workers: bool, anchors: str | None
    ) -> None:
        self.store, self.resolved, self.anchors = store, resolved, anchors
        self.targets = {t.unit.unit_key: t for t in targets}
        self.arrays: zarr.Group | str = store.location.url if on_workers else store.arrays
        self.ids: dict[str, list[str]] = {}
        self.ready: set[str] = set()
        self.truncated: dict[str, int] = {}

    def groups(self) -> list[Group]:
        return [Group(t.model, t.unit.dataset, k) for k, t in self.targets.items()]

    def work(self) -> list[Work]:
        out = []
        for key, t in self.targets.items():
            if t.unit.status == "done":
                continue
            committed = self.store.committed_shards(key)
            group = Group(t.model, t.unit.dataset, key)
            for shard in range(t.unit.n_shards):
                if shard not in committed:
                    start, stop = t.unit.shard_range(shard)
                    out.append(Work((shard_key(key, shard),), group, stop - start, unless=(f"unit:{key}",)))
        return out

    def finished(self, keys: list[str]) -> Iterable[str]:
        parsed = [_parse_shard_key(k) for k in keys]
        table = pa.table({"unit_key": [u for u, _ in parsed], "shard": pa.array([s for _, s in parsed], pa.int32())})
        with self.store.reading() as con:
            con.register("_want", table)
            try:
                rows = con.execute("SELECT unit_key, shard FROM shards JOIN _want USING (unit_key, shard)").fetchall()
            finally:
                con.unregister("_want")
        return [shard_key(u, int(s)) for u, s in rows]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        t = self.targets[work.group.key or ""]
        unit = t.unit
        if unit.unit_key not in self.ready:  # once per unit and run: its model is recorded, its array usable
            self.ids[unit.unit_key] = self.store.unit_text_ids(unit.unit_key)
            self.store.ensure_unit_array(unit)  # an interrupted repair can leave it missing or unreadable
            self.ready.add(unit.unit_key)
        _, shard = _parse_shard_key(keys[0])
        start, stop = unit.shard_range(shard)
        ids = self.ids[unit.unit_key][start:stop]
        entry = self.resolved.models[t.model]
        texts = self.store.texts(ids)
        args = (self.arrays, unit, shard, ids, texts, t.source, entry.batch_size, entry.max_batch_tokens)
        return Call(encode_and_write, args, f"encode-{t.model}-{unit.dataset}-{shard}")

    def commit(self, work: Work, keys: list[str], result: ShardDescriptor, remote: bool) -> Done:
        if not keys:
            return Done()
        t = self.targets[work.group.key or ""]
        if not self.store.scalar("SELECT 1 FROM models WHERE model_key = ?", [t.unit.model_key]):
            spec = t.source.spec()
            self.store.register_model(spec.key(), t.model, self.resolved.models[t.model].role, asdict(spec), t.unit.dim)
        self.store.commit_shard(t.unit, result, verify=remote)
        cut = int(np.asarray(result.truncated).sum())
        if cut:
            self.truncated[t.unit.unit_key] = self.truncated.get(t.unit.unit_key, 0) + cut
        return Done(result.rows, result.tokens)

    def close(self, group: Group, computed: bool) -> None:
        t = self.targets[group.key or ""]
        self.store.finish_unit(t.unit.unit_key)
        cut = self.truncated.pop(t.unit.unit_key, 0)
        if cut:
            max_tokens = self.resolved.models[t.model].max_tokens
            what = "%s/%s: %d text(s) truncated to %d tokens (recorded in unit_rows)"
            log.warning(what, t.model, group.dataset, cut, max_tokens)
        extractor = loaded_extractor(t.source)
        if computed and extractor is not None and group.dataset == self.anchors:
            record_position_norms(self.store, extractor, t.unit.model_key, group.dataset)


POSITION_SAMPLE = 64  # anchor texts (the first, in dataset order) whose per-position norms are recorded
POSITIONS = 8  # leading pooled positions shown in the representation report


def record_position_norms(store: Store, extractor: Extractor, model_key: str, dataset: str) -> None:
    """Per-position norms of the first anchors, once per model (only while its model is loaded anyway)."""
    norms_of = getattr(extractor, "position_norms", None)
    if norms_of is None or positions.has_position_norms(store, model_key, dataset):
        return
    norms, constant = norms_of(positions.first_texts(store, dataset, POSITION_SAMPLE), POSITIONS)
    positions.save_position_norms(store, model_key, dataset, norms, constant)


def extract_units(
    store: Store, resolved: Resolved, executor: Executor | None = None, only: Sequence[tuple[str, str]] = ()
) -> list[UnitResult]:
    """Plan, then extract, every (model, dataset) unit of the profile (``only`` those); only missing rows run."""
    executor = executor or executor_for_flow()
    units = [u for u in _units(store, resolved) if not only or (u.model, u.dataset) in only]
    planner = PlanUnits(store, resolved, units)
    run_stage(store, planner, executor, desc="plan units")
    targets = []
    for u in units:
        info = store.unit(u.key)
        if info is None:  # pragma: no cover - the planning stage creates or waits for every unit
            raise RuntimeError(f"unit {u.key} of {u.model}/{u.dataset} was not planned")
        targets.append(_Target(info, u.model, u.source))
    stage = ExtractShards(store, resolved, targets, executor.remote, resolved.profile.anchors)
    results = run_stage(store, stage, executor, desc="extract")
    return [_unit_result(r, planner.created) for r in results]


def _unit_result(r: GroupResult, created: set[str]) -> UnitResult:
    key = r.group.key or ""
    status = "done" if r.status == "done" or key in created else "skipped"  # a new empty unit is done too
    return UnitResult(r.group.model, r.group.dataset, key, status, r.rows, r.tokens, r.seconds)


def resume_units(store: Store, resolved: Resolved, units: Sequence[tuple[UnitInfo, str]]) -> list[UnitResult]:
    """Commit the uncommitted shards of ``units`` (unit, model name) exactly as extraction would (repair)."""
    targets = [_Target(u, model, model_source(resolved, model)) for u, model in units]
    stage = ExtractShards(store, resolved, targets, on_workers=False, anchors=None)
    stage.flow, stage.task = "repair", "resume_unit"  # its runs rows say it was a repair
    return [_unit_result(r, set()) for r in run_stage(store, stage, desc="repair")]


@task(name="register-datasets", cache_policy=NO_CACHE)
def register_datasets_task(store_root: str, catalog_path: str | None, profile: str) -> dict[str, str]:
    return register_datasets(store_for(store_root), catalog(catalog_path, profile))


def extract_all(store_root: str, catalog_path: str | None, profile: str) -> list[UnitResult]:
    """Body of the extract flow; callable from a parent flow that already holds the store.

    Pieces other writers are computing are left to them and waited for at the end of each stage,
    so two writers on one profile split the work instead of queueing.
    """
    register_datasets_task(store_root, catalog_path, profile)
    try:
        return extract_units(store_for(store_root), catalog(catalog_path, profile))
    finally:
        release_models()


@flow(name="safeport-extract", log_prints=False)
def extract_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[UnitResult]:
    """Extract every (model, dataset) unit of a catalog profile into its store (on Dask with a Dask task runner)."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        return extract_all(str(root), catalog_path, profile)
