"""The fit side of position-aware sparse feature steering (METHOD-SAFEDIG §3-6), from the token cache.

For every model of the profile's ``safedig:`` block and every held-out risk category (``holdout``:
one SafeSteer category, or ``all`` to leave each out in turn), on the one runner:

1. **route** (§3): per candidate position, the pooled per-prompt vectors of the source categories'
   pairs (the held-out category never enters) give R_p and S_p; the top K are routed;
2. **train** (§4): a top-k SAE per routed position (and the fixed middle position of the "no
   routing" ablation), streamed from the cache: benign rows + the source categories' train pairs
   (both sides), a sixteenth of the texts held out for quality (FVU about the mean, L0, dead
   fraction); checkpoints in the arrays so a killed training resumes where it stopped; on Dask
   workers from a :class:`~safeport.store.stream.StreamPlan`;
3. **select** (§5-7): per SAE, the harmful latents H from the source pairs, the decoder refitted in
   closed form on the held-out category's train rows (labels unused; λ by held-out FVU), and the
   steering parameters (τ_lo, τ_hi, ū from safe-side source tokens) for the refitted decoder and for
   the source one (the "no refit" ablation, λ → ∞);
4. a **bundle** per (model, held-out category): its routed positions with their parameters,
   ``safedig:<model>:<category>``, what ``safeport.load_safedig`` loads and ``safeport export`` writes.

Every artefact is keyed by exactly its inputs (the cache units it reads, the held-out category,
the hyper-parameters and the code that computes it), so the cache is shared by every held-out
category and a rerun with nothing new trains nothing.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import safeport.eval.safedig
import safeport.mappers.latents
import safeport.mappers.refit
import safeport.mappers.routing
import safeport.mappers.sae
from safeport.catalog import Resolved
from safeport.codehash import code_hash
from safeport.eval.safedig import SafeLevelAccumulator
from safeport.flows.capture import CaptureModel, capture_models
from safeport.flows.common import catalog, store_for, writing
from safeport.flows.runner import Call, Done, Executor, Group, KeyedStage, Work, executor_for_flow, run_stage
from safeport.keys import content_key
from safeport.mappers.latents import LatentAccumulator, SaeParams
from safeport.mappers.refit import RefitStats, refit_decoder
from safeport.mappers.routing import route, score_positions
from safeport.store import safedig as art
from safeport.store.store import Store, StoreError, UnitInfo
from safeport.store.stream import ROWS, Cursor, StreamPlan

if TYPE_CHECKING:
    from safeport.eval.safedig_report import HoldoutView

log = logging.getLogger("safeport.safedig")

SAFESTEER = ("Sexual", "Illegal activity", "Violence", "Humiliation", "Hate", "Disturbing")
HELD_OUT_DIGIT = "0"  # texts whose id ends in this hex digit (1 in 16) are the SAE's held-out quality rows
CHECKPOINT_EVERY = 20  # SAE steps between checkpoints


@cache
def code_version(*modules: str) -> str:
    """The code an artefact is computed with (see :mod:`safeport.codehash`)."""
    table = {
        "routing": safeport.mappers.routing,
        "sae": safeport.mappers.sae,
        "latents": safeport.mappers.latents,
        "refit": safeport.mappers.refit,
        "steer": safeport.eval.safedig,
        "flow": inspect.getmodule(code_version),
    }
    return code_hash([table[m] for m in modules])


# --- what the cache holds for one model --------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A SafeSteer pair as the routing sees it."""

    pair_id: int
    category: str
    split: str
    safe: str  # text id
    unsafe: str


@dataclass(frozen=True)
class Cache:
    """One model's token units on the profile's benign and pairs datasets, by position."""

    cm: CaptureModel
    benign: tuple[str, ...]  # benign dataset names
    pairs_dataset: str
    units: Mapping[str, Mapping[str, UnitInfo]]  # dataset -> position -> unit

    def unit_keys(self, position: str) -> list[str]:
        return [self.units[d][position].unit_key for d in (*self.benign, self.pairs_dataset)]


def _pairs(store: Store, dataset: str) -> list[Pair]:
    rows = store.fetchall(
        "SELECT pair_id, any_value(category), any_value(split), "
        "max(CASE WHEN side = 'safe' THEN text_id END), max(CASE WHEN side = 'unsafe' THEN text_id END) "
        "FROM dataset_texts WHERE dataset = ? AND pair_id IS NOT NULL GROUP BY pair_id ORDER BY pair_id",
        [dataset],
    )
    return [Pair(int(p), str(c or "uncategorised"), str(s), str(a), str(b)) for p, c, s, a, b in rows if a and b]


def _caches(store: Store, resolved: Resolved, models: Sequence[CaptureModel]) -> list[Cache]:
    sd = resolved.profile.safedig
    datasets = (
        list(sd.datasets) if sd is not None and sd.datasets else [resolved.profile.anchors, resolved.profile.pairs]
    )
    kinds = dict(store.fetchall("SELECT dataset, kind FROM datasets"))
    pairs = [d for d in datasets if kinds.get(d) == "pairs"]
    if len(pairs) != 1:
        raise ValueError(
            f"safedig.datasets {datasets} must hold exactly one pairs dataset (the safe/unsafe pairs routing, "
            f"harmful latents and the refit read); found {pairs or 'none'}"
        )
    benign = tuple(d for d in datasets if d not in pairs)
    out = []
    for cm in models:
        units: dict[str, dict[str, UnitInfo]] = {}
        for d in datasets:
            ds_hash = store.dataset_hash(d)
            for position in cm.positions:
                unit = store.unit(cm.unit_key(d, ds_hash or "", position))
                if unit is None or unit.status != "done":
                    raise StoreError(
                        f"the token cache of {cm.name} on {d} at {position} is not complete; run `safeport capture`"
                    )
                units.setdefault(d, {})[position] = unit
        out.append(Cache(cm, benign, pairs[0], units))
    return out


def text_means(store: Store, unit: UnitInfo) -> dict[str, np.ndarray]:
    """Each text's rows at a unit averaged (every captured step and token): one vector per text (§3).

    Read shard by shard (verified), so memory is one shard plus the sums.
    """
    records = store.shard_records(unit.unit_key)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for shard, record in sorted(records.items()):
        block = store.verified_shard(unit, record)
        rows = store.sql(
            "SELECT row, text_id FROM unit_rows WHERE unit_key = ? AND shard = ? ORDER BY row", [unit.unit_key, shard]
        )
        ids = np.asarray(rows.column("text_id").to_pylist())
        local = rows.column("row").to_numpy().astype(np.int64) - record.row_start
        for tid in np.unique(ids):
            sel = local[ids == tid]
            sums[str(tid)] = sums.get(str(tid), 0) + block[sel].astype(np.float64).sum(axis=0)
            counts[str(tid)] = counts.get(str(tid), 0) + len(sel)
    return {t: sums[t] / counts[t] for t in sums}


def fixed_position(cm: CaptureModel) -> str:
    """The "no routing" ablation's one fixed position: the middle image position (a middle layer for a text encoder)."""
    img = [p for p in cm.positions if p.endswith(".img") and p.startswith("double.")] or [
        p for p in cm.positions if p.endswith(".img")
    ]
    pool = img or list(cm.positions)
    ordered = sorted(pool, key=lambda p: (p.split(".")[0], int(p.split(".")[1])))
    return ordered[len(ordered) // 2]


def check_holdout(value: str) -> str:
    """A ``--holdout`` value as the method names it (a SafeSteer category, any case, or ``all``)."""
    known = {c.lower(): c for c in (*SAFESTEER, "all")}
    found = known.get(value.strip().lower())
    if found is None:
        raise ValueError(f"--holdout {value!r} is not a SafeSteer category; use one of {', '.join(known.values())}")
    return found


def holdouts(resolved: Resolved, categories: Sequence[str], holdout: str | None = None) -> list[str]:
    """The held-out categories to fit: ``holdout`` (the ``--holdout`` override) or the profile's ``safedig.holdout``."""
    sd = resolved.profile.safedig
    wanted = holdout if holdout is not None else sd.holdout if sd is not None else "Sexual"
    if wanted == "all":
        return [c for c in SAFESTEER if c in categories] or sorted(categories)
    if wanted not in categories:
        where = "--holdout" if holdout is not None else "safedig.holdout"
        raise ValueError(
            f"{where} {wanted!r} is not a category of the pairs (categories: {sorted(categories)}); "
            "name one of them or all"
        )
    return [wanted]


# --- 1. routing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutePiece:
    cache: Cache
    holdout: str
    sources: tuple[str, ...]
    key: str
    inputs: Mapping[str, Any]


def route_piece(cache: Cache, holdout: str, categories: Sequence[str], k: int) -> RoutePiece:
    sources = tuple(sorted(c for c in categories if c != holdout))
    units = {p: u.unit_key for p, u in cache.units[cache.pairs_dataset].items()}
    inputs = {"units": units, "holdout": holdout, "sources": sources, "k": k, "code": code_version("routing")}
    return RoutePiece(cache, holdout, sources, content_key(["route", inputs]), inputs)


def compute_route(store: Store, piece: RoutePiece, pairs: Sequence[Pair], k: int) -> list[dict[str, Any]]:
    """§3 over the source categories: R_p, S_p, per-category AUC, rank and routed flag per position."""
    cm = piece.cache.cm
    used = [p for p in pairs if p.category in piece.sources]  # the held-out category's rows are never read
    pooled = {}
    for position, unit in piece.cache.units[piece.cache.pairs_dataset].items():
        means = text_means(store, unit)
        pooled[position] = (np.stack([means[p.safe] for p in used]), np.stack([means[p.unsafe] for p in used]))
    scores = score_positions(pooled, [p.category for p in used], [p.split for p in used], piece.sources)
    routing = route(scores, min(k, len(scores)))
    return [
        {
            "model": cm.name,
            "model_key": cm.model_key,
            "holdout": piece.holdout,
            "position": sc.position,
            "robustness": float(sc.robustness),
            "separability": float(sc.separability),
            "auc": dict(zip(sc.sources, (float(a) for a in sc.auc), strict=True)),
            "rank": rank,
            "routed": sc.position in routing.routed,
        }
        for rank, sc in enumerate(routing.ranked, start=1)
    ]


class RouteStage(KeyedStage):
    flow, task, unit, remote = "safedig", "route", "routing", False
    prefix = "route"

    def __init__(self, store: Store, pieces: Sequence[RoutePiece], pairs: Mapping[str, list[Pair]], k: int) -> None:
        self.store, self.pairs, self.k = store, pairs, k
        self.pieces = {p.key: p for p in pieces}

    def groups(self) -> list[Group]:
        return [Group(p.cache.cm.name, f"route:{p.holdout}", k) for k, p in self.pieces.items()]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        p = self.pieces[work.group.key or ""]
        return Call(compute_route, (self.store, p, self.pairs[p.cache.pairs_dataset], self.k), f"route-{p.holdout}")

    def commit(self, work: Work, keys: list[str], result: list[dict[str, Any]], remote: bool) -> Done:
        p = self.pieces[work.group.key or ""]
        art.save_routes(self.store, p.key, result, p.inputs)
        return Done(len(result))

    def done(self, key: str) -> bool:
        return art.route_done(self.store, key)


# --- 2. SAEs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaePiece:
    """One SAE to train: a position of a model, for one held-out category."""

    cache: Cache
    position: str
    holdout: str
    sources: tuple[str, ...]
    config: Mapping[str, Any]  # SaeConfig fields (n_tokens included)
    epochs: int
    key: str
    inputs: Mapping[str, Any]


def _train_select(cache: Cache, position: str, held: bool) -> tuple[str, list[Any]]:
    """SQL over the stream's row relation: benign rows and the source pairs' train rows, a text's rows together."""
    units = cache.unit_keys(position)
    marks = ", ".join("?" for _ in units)
    parts = [f"unit_key IN ({marks})"]
    parts.append("(dataset <> ? OR (split = 'train' AND category IN (SELECT unnest(?::VARCHAR[]))))")
    parts.append(f"right(text_id, 1) {'=' if held else '<>'} '{HELD_OUT_DIGIT}'")
    return " AND ".join(parts), [*units, cache.pairs_dataset]


def sae_piece(
    store: Store, cache: Cache, position: str, holdout: str, sources: Sequence[str], resolved: Resolved
) -> SaePiece:
    sd = resolved.profile.safedig
    if sd is None:  # pragma: no cover - only called for profiles with a safedig block
        raise ValueError("no safedig: block")
    select, params = _train_select(cache, position, held=False)
    n_rows = int(store.scalar(f"SELECT count(*) FROM {ROWS} WHERE {select}", [*params, list(sources)]) or 0)
    if sd.sae.max_rows is not None:
        n_rows = min(n_rows, sd.sae.max_rows)
    d = cache.cm.dims[position]
    config = {
        "d": d,
        "m": sd.sae.expansion * d,
        "k": sd.sae.k,
        "batch_size": sd.sae.batch_size,
        "n_tokens": max(sd.sae.batch_size, n_rows * sd.sae.epochs),
        "seed": 42,
    }
    inputs = {
        "units": cache.unit_keys(position),
        "position": position,
        "holdout": holdout,
        "sources": sorted(sources),
        "held_out_digit": HELD_OUT_DIGIT,
        "config": config,
        "epochs": sd.sae.epochs,
        "code": code_version("sae"),
    }
    key = content_key(["sae", inputs])
    return SaePiece(cache, position, holdout, tuple(sorted(sources)), config, sd.sae.epochs, key, inputs)


@dataclass(frozen=True)
class SaeResult:
    arrays: dict[str, np.ndarray]
    c: float
    fvu: float
    l0: float
    dead: float
    n_train: int
    n_heldout: int
    config: dict[str, Any]
    curves: dict[str, Any]


def train_position_sae(arrays_url: str, piece_key: str, config: Mapping[str, Any], train: StreamPlan,
                       heldout: StreamPlan, epochs: int) -> SaeResult:  # fmt: skip
    """Train one SAE from its stream plan (here or on a worker), resuming from the last checkpoint if any."""
    from safeport.mappers.sae import SaeCheckpoint, SaeConfig, evaluate_sae, train_sae
    from safeport.store.location import ArrayLocation

    if train.n_rows == 0:
        raise ValueError(f"SAE {piece_key}: no training rows selected; capture the benign and pairs datasets first")
    cfg = SaeConfig(**{**config, "device": "auto"})
    group = ArrayLocation(arrays_url).open_group("a")
    found = art.read_checkpoint(group, piece_key)
    resume = SaeCheckpoint(found[0], found[1]) if found is not None else None
    per_epoch = max(1, math.ceil(train.n_rows / cfg.batch_size))
    start = resume.data_batch if resume is not None else 0
    if resume is not None:
        log.info("SAE %s: resuming at step %d (%d tokens seen)", piece_key, resume.step, resume.tokens_seen)
    seed = int(config["seed"])
    cursor = Cursor(seed, start // per_epoch, start % per_epoch)
    stream = (
        b.values for b in train.batches(batch_size=cfg.batch_size, seed=seed, epochs=10**6, cursor=cursor)
    )  # as many epochs as n_tokens needs: training stops there

    def save(ck: SaeCheckpoint) -> None:
        art.write_checkpoint(group, piece_key, ck.arrays, ck.meta)

    trained = train_sae(stream, cfg, checkpoint=save, checkpoint_every=CHECKPOINT_EVERY, resume=resume)
    fvu = l0 = dead = math.nan
    n_heldout = heldout.n_rows
    if n_heldout:
        quality = evaluate_sae(trained, (b.values for b in heldout.batches(batch_size=cfg.batch_size, seed=seed)))
        fvu, l0, dead = float(quality.fvu), float(quality.l0), float(quality.dead_fraction)
    arrays = {"W_enc": trained.W_enc, "b_enc": trained.b_enc, "W_dec": trained.W_dec, "b_dec": trained.b_dec}
    return SaeResult(
        arrays,
        float(trained.c),
        fvu,
        l0,
        dead,
        int(trained.config.n_tokens),
        int(n_heldout),
        trained.config.to_dict(),
        trained.curves.to_dict(),
    )


class SaeStage(KeyedStage):
    flow, task, unit, remote = "safedig", "train_sae", "SAE", True
    prefix = "sae"

    def __init__(self, store: Store, pieces: Sequence[SaePiece]) -> None:
        self.store = store
        self.pieces = {p.key: p for p in pieces}

    def groups(self) -> list[Group]:
        return [Group(p.cache.cm.name, f"{p.position}|{p.holdout}", k) for k, p in self.pieces.items()]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        p = self.pieces[work.group.key or ""]
        plans = []
        for held in (False, True):
            select, params = _train_select(p.cache, p.position, held)
            plans.append(self.store.stream_plan(select, [*params, list(p.sources)]))
        args = (self.store.location.url, p.key, p.config, plans[0], plans[1], p.epochs)
        return Call(train_position_sae, args, f"sae-{p.cache.cm.name}-{p.position}-{p.holdout}")

    def commit(self, work: Work, keys: list[str], result: SaeResult, remote: bool) -> Done:
        p = self.pieces[work.group.key or ""]
        cm = p.cache.cm
        row = {
            "model": cm.name,
            "model_key": cm.model_key,
            "position": p.position,
            "holdout": p.holdout,
            "d": int(result.config["d"]),
            "m": int(result.config["m"]),
            "k": int(result.config["k"]),
            "c": result.c,
            "fvu": result.fvu,
            "l0": result.l0,
            "dead": result.dead,
            "n_train": result.n_train,
            "n_heldout": result.n_heldout,
            "config": result.config,
            "curves": result.curves,
            "lineage": dict(p.inputs),
        }
        art.save_sae(self.store, p.key, result.arrays, row)
        art.drop_checkpoint(self.store, p.key)
        return Done(result.n_train)

    def done(self, key: str) -> bool:
        return art.sae_done(self.store, key)


# --- 3. harmful latents, the refit, the steering parameters -------------------------------------------------


@dataclass(frozen=True)
class SelectPiece:
    sae: SaePiece
    top_m: int
    latents_key: str
    refit_key: str
    params_key: str  # with the refitted decoder
    params_key_source: str  # with the source decoder ("no refit", λ → ∞)


KS = tuple(range(-4, 3))  # λ = 10^k · tr(ZᵀZ)/m (§6)


def select_piece(sae: SaePiece, top_m: int) -> SelectPiece:
    pairs_unit = sae.cache.units[sae.cache.pairs_dataset][sae.position].unit_key
    latents_key = content_key(
        ["latents", sae.key, pairs_unit, list(sae.sources), top_m, 2.0, code_version("latents", "flow")]
    )
    refit_key = content_key(["refit", sae.key, pairs_unit, sae.holdout, list(KS), code_version("refit", "flow")])
    steer = code_version("steer", "flow")
    return SelectPiece(
        sae,
        top_m,
        latents_key,
        refit_key,
        content_key(["params", latents_key, refit_key, steer]),
        content_key(["params", latents_key, "source-decoder", steer]),
    )


def _sae_params(store: Store, sae_key: str) -> SaeParams:
    arrays, row = art.load_sae(store, sae_key)
    return SaeParams(arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], float(row["c"]), int(row["k"]))


def _pair_rows(store: Store, piece: SaePiece, categories: Sequence[str], split: str) -> Iterator[Any]:
    """Batches of the pairs unit's rows at the piece's position for ``categories`` and ``split`` (with index)."""
    unit = piece.cache.units[piece.cache.pairs_dataset][piece.position].unit_key
    select = "unit_key = ? AND split = ? AND category IN (SELECT unnest(?::VARCHAR[]))"
    yield from store.batches(select, params=[unit, split, list(categories)], batch_size=8192, seed=0)


def compute_select(store: Store, piece: SelectPiece, sides: Mapping[str, tuple[str, str, int]]) -> dict[str, Any]:
    """H from the source pairs (§5), the decoder refit on the held-out category's rows (§6), τ and ū (§7)."""
    sae = _sae_params(store, piece.sae.key)
    out: dict[str, Any] = {}
    # §5: codes of the source categories' train pairs, by side and category.
    acc = LatentAccumulator(sae.n_latents, piece.sae.sources)
    for batch in _pair_rows(store, piece.sae, piece.sae.sources, "train"):
        z = sae.encode(batch.values)
        ids = batch.rows.column("text_id").to_pylist()
        for (side, category), idx in _groups([sides[t][:2] for t in ids]).items():
            acc.add(z[idx], side=side, category=category)
    found = acc.finish(top_m=piece.top_m)
    out["latents"] = pa.table(found.table(piece.sae.position))
    harmful = [int(j) for j in found.pooled.harmful]
    # §6: the held-out category's train rows, both sides, labels unused (rows keyed by pair for the split).
    stats = RefitStats(sae.n_latents, sae.dim)
    for batch in _pair_rows(store, piece.sae, [piece.sae.holdout], "train"):
        ids = batch.rows.column("text_id").to_pylist()
        stats.add(sae.encode(batch.values), batch.values / sae.c, [sides[t][2] for t in ids])
    refit = refit_decoder(stats, sae.W_dec, sae.b_dec, KS)
    out["refit"] = refit
    # §7: thresholds and the safe level from the source categories' safe-side train tokens.
    decoders = {"refit": refit.W, "source": sae.W_dec}
    cal = {name: SafeLevelAccumulator(harmful, w, sae.c) for name, w in decoders.items()} if harmful else {}
    for batch in _pair_rows(store, piece.sae, piece.sae.sources, "train"):
        ids = batch.rows.column("text_id").to_pylist()
        safe = np.flatnonzero([sides[t][0] == "safe" for t in ids])
        if len(safe) and cal:
            z = sae.encode(batch.values[safe])
            for a in cal.values():
                a.add(z)
    out["calibration"] = {name: a.finish() for name, a in cal.items()}
    out["harmful"] = harmful
    return out


def _groups(labels: Sequence[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    out: dict[tuple[str, str], list[int]] = {}
    for i, label in enumerate(labels):
        out.setdefault(label, []).append(i)
    return {k: np.asarray(v) for k, v in out.items()}


class SelectStage(KeyedStage):
    flow, task, unit, remote = "safedig", "select", "SAE", False
    prefix = "select"

    def __init__(self, store: Store, pieces: Sequence[SelectPiece], sides: Mapping[str, Mapping[str, Any]]) -> None:
        self.store, self.sides = store, sides
        self.pieces = {p.params_key: p for p in pieces}

    def _done(self, p: SelectPiece) -> bool:
        return all(
            (
                art.latents_done(self.store, p.latents_key),
                art.refit_done(self.store, p.refit_key),
                art.params_done(self.store, p.params_key),
                art.params_done(self.store, p.params_key_source),
            )
        )

    def groups(self) -> list[Group]:
        return [Group(p.sae.cache.cm.name, f"{p.sae.position}|{p.sae.holdout}", k) for k, p in self.pieces.items()]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        p = self.pieces[work.group.key or ""]
        sides = self.sides[p.sae.cache.pairs_dataset]
        return Call(compute_select, (self.store, p, sides), f"select-{p.sae.position}-{p.sae.holdout}")

    def commit(self, work: Work, keys: list[str], result: dict[str, Any], remote: bool) -> Done:
        p = self.pieces[work.group.key or ""]
        art.save_latents(self.store, p.latents_key, p.sae.key, result["latents"])
        refit = result["refit"]
        art.save_refit(
            self.store,
            p.refit_key,
            {"W": refit.W.astype(np.float32), "b": refit.b.astype(np.float32)},
            {
                "sae_key": p.sae.key,
                "holdout": p.sae.holdout,
                "lam": float(refit.lam),
                "k": float(refit.k),
                "fvu": float(min(refit.fvus)),
                "fvu_source": float(refit.fvu_source),
                "grid": refit.params(),
                "n_train": int(refit.n_train),
                "n_heldout": int(refit.n_heldout),
                "lineage": {"sae_key": p.sae.key, "holdout": p.sae.holdout, "ks": list(KS)},
            },
        )
        for key, name, refit_key in (
            (p.params_key, "refit", p.refit_key),
            (p.params_key_source, "source", "source-decoder"),
        ):
            cal = result["calibration"].get(name)
            art.save_params(
                self.store,
                key,
                {
                    "u_bar": np.asarray(
                        cal.u_bar if cal is not None else np.zeros(p.sae.cache.cm.dims[p.sae.position]),
                        dtype=np.float32,
                    )
                },
                {
                    "sae_key": p.sae.key,
                    "latents_key": p.latents_key,
                    "refit_key": refit_key,
                    "harmful": result["harmful"],
                    "tau_lo": float(cal.tau_lo) if cal is not None else math.inf,
                    "tau_hi": float(cal.tau_hi) if cal is not None else math.inf,
                    "n_safe": int(cal.n_tokens) if cal is not None else 0,
                },
            )
        return Done(1)

    def done(self, key: str) -> bool:
        return self._done(self.pieces[key])


# --- the whole fit -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleResult:
    name: str
    model: str
    holdout: str
    routed: tuple[str, ...]
    fixed: str
    bundle_key: str
    view: HoldoutView | None = None  # what the fit report shows of it (set by :func:`safedig_reports`)
    report: str = ""  # reports/safedig-<model>.md


def safedig_fit(
    store: Store, resolved: Resolved, executor: Executor | None = None, holdout: str | None = None
) -> list[BundleResult]:
    """Route, train, select and bundle for every model and held-out category of the profile (see module doc).

    ``holdout`` overrides the profile's ``safedig.holdout`` (a category of the pairs, or ``all``).
    """
    sd = resolved.profile.safedig
    if sd is None:
        return []
    executor = executor or executor_for_flow()
    caches = _caches(store, resolved, capture_models(resolved))
    pairs = {c.pairs_dataset: _pairs(store, c.pairs_dataset) for c in caches}
    out: list[BundleResult] = []
    for pairs_dataset, plist in pairs.items():
        categories = sorted({p.category for p in plist})
        held = holdouts(resolved, categories, holdout)
        mine = [c for c in caches if c.pairs_dataset == pairs_dataset]
        route_pieces = [route_piece(c, h, categories, sd.route_k) for c in mine for h in held]
        run_stage(store, RouteStage(store, route_pieces, pairs, sd.route_k), desc="route")
        sae_pieces: dict[str, SaePiece] = {}
        chosen: dict[str, tuple[list[str], str]] = {}
        for rp in route_pieces:
            routed = [r["position"] for r in art.routes(store, rp.key) if r["routed"]]
            fixed = fixed_position(rp.cache.cm)
            chosen[rp.key] = (routed, fixed)
            for position in dict.fromkeys([*routed, fixed]):
                piece = sae_piece(store, rp.cache, position, rp.holdout, rp.sources, resolved)
                sae_pieces[piece.key] = piece
        run_stage(store, SaeStage(store, list(sae_pieces.values())), executor, desc="train SAEs")
        sides = {pairs_dataset: _sides(store, pairs_dataset)}
        selects = {p.key: select_piece(p, sd.harmful_latents) for p in sae_pieces.values()}
        run_stage(store, SelectStage(store, list(selects.values()), sides), desc="select")
        for rp in route_pieces:
            routed, fixed = chosen[rp.key]
            out.append(_bundle(store, rp, routed, fixed, sae_pieces, selects))
    return out


def _sides(store: Store, dataset: str) -> dict[str, tuple[str, str, int]]:
    """text id -> (side, category, pair id) of a pairs dataset."""
    rows = store.fetchall(
        "SELECT text_id, any_value(side), any_value(category), any_value(pair_id) FROM dataset_texts "
        "WHERE dataset = ? GROUP BY 1",
        [dataset],
    )
    return {str(t): (str(s), str(c or "uncategorised"), int(p)) for t, s, c, p in rows}


def _bundle(
    store: Store,
    rp: RoutePiece,
    routed: Sequence[str],
    fixed: str,
    saes: Mapping[str, SaePiece],
    selects: Mapping[str, SelectPiece],
) -> BundleResult:
    cm = rp.cache.cm
    entries = []
    for position in dict.fromkeys([*routed, fixed]):
        sae = next(
            s for s in saes.values() if s.cache is rp.cache and s.position == position and s.holdout == rp.holdout
        )
        sel = selects[sae.key]
        entries.append(
            {
                "position": position,
                "routed": position in routed,
                "fixed": position == fixed,
                "sae_key": sae.key,
                "latents_key": sel.latents_key,
                "refit_key": sel.refit_key,
                "params_key": sel.params_key,
                "params_key_source": sel.params_key_source,
            }
        )
    name = f"safedig:{cm.name}:{rp.holdout}"
    key = content_key(["bundle", name, rp.key, entries])
    art.save_bundle(
        store,
        {
            "bundle_key": key,
            "name": name,
            "model": cm.name,
            "model_key": cm.model_key,
            "holdout": rp.holdout,
            "route_key": rp.key,
            "positions": entries,
            "lineage": {"route": dict(rp.inputs), "capture": dict(cm.spec), "sources": list(rp.sources)},
        },
    )
    return BundleResult(name, cm.name, rp.holdout, tuple(routed), fixed, key)


@task(name="safedig-fit", cache_policy=NO_CACHE)
def safedig_task(
    store_root: str, catalog_path: str | None, profile: str, holdout: str | None = None
) -> list[BundleResult]:
    from safeport.flows.safedig_report import safedig_reports

    store, resolved = store_for(store_root), catalog(catalog_path, profile)
    return safedig_reports(store, resolved, safedig_fit(store, resolved, holdout=holdout))


@flow(name="safeport-safedig", log_prints=False)
def safedig_flow(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    wait_s: float = 0.0,
    holdout: str | None = None,
) -> list[BundleResult]:
    """Capture what is missing, then route, train, select and bundle (METHOD-SAFEDIG §2-7); render the fit report.

    ``holdout`` (``--holdout``) overrides the profile's ``safedig.holdout``: a SafeSteer category or ``all``.
    """
    from safeport.flows.capture import capture_all

    holdout = check_holdout(holdout) if holdout is not None else None
    resolved = catalog(catalog_path, profile)
    if resolved.profile.safedig is None:
        raise ValueError(
            f"profile {resolved.name!r} has no safedig: block; add one (README, 'Position-aware steering')"
        )
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        capture_all(str(root), catalog_path, profile)
        result: list[BundleResult] = safedig_task(str(root), catalog_path, profile, holdout)
        return result
