"""Generation evaluation (METHOD §7–8): prompts × method × α × seed → images → ASR, CLIP-Sim, FID.

Reads only what earlier stages cached: prompt texts (``texts`` / ``dataset_texts``) and steering
vectors (``vectors``); it never extracts activations. Three tasks per run:

1. ``generate`` (one per target): plan every output of the sweep as a content-addressed key
   (:class:`safeport.store.outputs.OutputSpec`), skip the keys already committed, load the full pipeline
   only if something is left, encode each needed prompt **once** with the pipeline's own
   ``encode_prompt`` (a chunk of :data:`PROMPT_CHUNK` prompts at a time; the negative prompt once),
   free the text encoders after the last chunk, then generate and commit outputs one by one. A
   crash loses at most the output in flight; a rerun generates nothing that is already there.
   α = 0 is the original model whatever the method, so those outputs are shared.
2. ``score``: every available detector scores every output that lacks its score (NudeNet always;
   Q16 and CLIP-Sim only with CLIP weights), a batch per transaction.
3. ``report``: the paper's Table 1 layout (ASR, CLIP-Sim, FID per target × source × mapper and
   baselines), ASR / CLIP-Sim vs α tables and PNG plots, multi-category uniform vs oracle; the
   aggregates also go to ``eval_results`` (kind ``generation``). Unavailable metrics read
   "n/a (reason)".

Methods: every stored global vector for the target of kind native, calibrated (one per source ×
mapper), random and string, or the names given; for each with per-category siblings, a
``uniform:`` (all categories, equal weights) and an ``oracle:`` method (the prompt's I2P labels
mapped to SafeSteer categories, METHOD §5; a prompt whose labels map to no category is steered by
the global vector, the fit report's rule).

SafeDIG (METHOD-SAFEDIG §8), for a target with a bundle ``safedig:<target>:<held-out category>``
(``--holdout``, default the profile's ``safedig.holdout``, the first SafeSteer category with a
bundle if ``all``): SafeDIG (Blend+Repel), Blend only, Repel only, no routing (the bundle's fixed
middle position), no refit (the source decoder) and the SAeUron-style ablation, each swept over the
strength s (``--strengths``, default the profile's ``safedig.strengths``); an output's ``vector_id``
is the content key of (bundle key, refit, positions, mode) and its ``alpha`` is s, so s = 0 is the
shared original output. The report adds the unsafe rate per risk domain (target / source /
overall, :mod:`safeport.eval.domains`) and, for every target, a contact sheet
(:mod:`safeport.eval.contact`) with flagged outputs blurred unless ``show_flagged``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from safeport.catalog import MAX_ALPHA, Resolved, SafeDigEntry
from safeport.eval.contact import SheetCell, SheetRow, contact_sheet
from safeport.eval.detectors import (
    DEFAULT_CLIP_MODEL,
    ClipBackbone,
    ClipScorer,
    Detector,
    DetectorUnavailable,
    FidScorer,
    NudeNetDetector,
    Q16Detector,
    frechet_distance,
    inception_features,
    load_q16_prompts,
)
from safeport.eval.domains import OVERALL, DomainResult, domain_rates, render_domains, risk_domain
from safeport.eval.generate import (
    DEFAULT_SEED,
    GenerationSettings,
    RunOptions,
    SafeDigSteering,
    Scalar,
    pipeline_family,
    resolve_settings,
    split_run_options,
    vector_id,
)

# The fit report's oracle rule, used as it is: moving it out of eval/representation.py would change that
# module's code version, hence the key of every stored report row.
from safeport.eval.representation import _clean_i2p
from safeport.eval.representation import _oracle_matrix as oracle_vectors
from safeport.eval.sweep import (
    FID_NO_REFERENCE,
    FID_NO_UTILITY,
    ORIGINAL,
    SAFETY,
    UTILITY,
    Item,
    Method,
    SafeDigVariant,
    Sweep,
    TargetResult,
    aggregate,
    method_name,
    render,
    safedig_methods,
    unsafe_flags,
)
from safeport.extractors.base import ModelSource
from safeport.extractors.pipeline_encoder import FAMILIES as PIPELINE_FAMILIES
from safeport.flows.common import catalog, model_source, store_for, writing
from safeport.flows.runner import on_dask
from safeport.keys import content_key
from safeport.mappers.vectors import SAFESTEER_CATEGORIES, combine, uniform_weights
from safeport.store import artifacts
from safeport.store import safedig as safedig_art
from safeport.store.outputs import (
    OutputSpec,
    ScoreRow,
    done_keys,
    generations_for,
    load_images,
    reference_images,
    replace_results,
    scores_for,
)
from safeport.store.store import Store, StoreError

log = logging.getLogger("safeport.eval")
T = TypeVar("T")

TABLE_KINDS = ("native", "calibrated", "random", "string")  # the global vectors of Table 1
FID_BATCH = 64
CONTACT_PROMPTS = 3  # prompts on a contact sheet (seeded; target-domain prompts first)
CONTACT_SEED = 0


# --- the sweep ----------------------------------------------------------------------------------


@dataclass
class Plan:
    target_key: str
    settings: dict[str, Any]
    items: list[Item]
    specs: dict[str, OutputSpec]  # unique outputs, in sweep order
    vectors: dict[str, np.ndarray]  # vector_id -> values
    variants: dict[str, SafeDigVariant] = field(default_factory=dict)  # vector_id -> SafeDIG variant
    categories: dict[str, str | None] = field(default_factory=dict)  # safety prompt text id -> its I2P labels


@dataclass(frozen=True)
class GenerateResult:
    target: str
    planned: int
    generated: int
    skipped: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    report: str
    generated: tuple[GenerateResult, ...]
    notices: tuple[str, ...]


def _hash(*parts: object) -> str:
    return content_key(list(parts))


def _vector_rows(store: Store, target: str | None = None) -> list[dict[str, Any]]:
    """Newest row per vector name (a refit keeps its names), optionally for one target."""
    where = "WHERE target = ?" if target is not None else ""
    return store.sql(
        f"SELECT name, kind, source, target, mapper, category FROM vectors {where} "
        "QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC) = 1 ORDER BY name",
        [target] if target is not None else [],
    ).to_pylist()


def _kind_order(row: Mapping[str, Any]) -> tuple[int, str, str]:
    kind = str(row["kind"])
    rank = TABLE_KINDS.index(kind) if kind in TABLE_KINDS else len(TABLE_KINDS)
    return rank, str(row["source"] or ""), str(row["mapper"] or "")


def select_methods(
    store: Store, target: str, names: Sequence[str] | None, categories: bool = True, required: bool = True
) -> list[Method]:
    """The methods of the sweep: ``names`` (any stored vectors for ``target``) or every Table 1 vector.

    ``required=False`` (the target has SafeDIG methods): no stored vector is no error.
    """
    rows = _vector_rows(store, target)
    by_name = {r["name"]: r for r in rows}
    if names is None:
        chosen = sorted((r for r in rows if r["category"] is None and r["kind"] in TABLE_KINDS), key=_kind_order)
        if not chosen and required:
            raise StoreError(
                f"no steering vectors for target {target!r} in {store.root}; run `safeport fit` first "
                '(list vectors with: safeport query "select name, target from vectors")'
            )
    else:
        chosen = []
        for name in dict.fromkeys(names):
            if name not in by_name:
                other = [r for r in _vector_rows(store) if r["name"] == name]
                if other:
                    raise ValueError(
                        f"vector {name!r} was transferred to target {other[0]['target']!r}, not {target!r}; "
                        "pick a vector of this target or pass --target"
                    )
                raise StoreError(
                    f"no vector named {name!r} in {store.root}; vectors for {target!r} include "
                    f'{sorted(by_name)[:8]} (list all with: safeport query "select name from vectors")'
                )
            chosen.append(by_name[name])
    methods = [Method(r["name"], r["kind"], r["source"], r["mapper"], (r["name"],)) for r in chosen]
    if categories:
        for r in chosen:
            if r["category"] is not None:
                continue
            siblings = [
                s
                for s in rows
                if s["category"] is not None
                and (s["kind"], s["source"], s["mapper"]) == (r["kind"], r["source"], r["mapper"])
            ]
            if siblings:
                names_ = tuple(s["name"] for s in siblings)
                cats = tuple(str(s["category"]) for s in siblings)
                for weighting in ("uniform", "oracle"):
                    methods.append(
                        Method(f"{weighting}:{r['name']}", r["kind"], r["source"], r["mapper"], names_, cats, weighting)
                    )
    return methods


def _bundle_rows(store: Store, target: str) -> list[dict[str, Any]]:
    """The newest SafeDIG bundle per held-out category of ``target`` (none if the store has no SafeDIG tables)."""
    if not safedig_art.has_tables(store):
        return []
    return store.sql(
        "SELECT name, holdout, bundle_key, model_key FROM safedig_bundles WHERE model = ? "
        "QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC) = 1 ORDER BY name",
        [target],
    ).to_pylist()


def select_bundle(store: Store, resolved: Resolved, target: str, holdout: str | None) -> dict[str, Any] | None:
    """The bundle row (name, holdout, bundle_key, model_key) the SafeDIG methods of ``target`` steer with.

    ``holdout`` (``--holdout``) must have a bundle; without it the profile's ``safedig.holdout`` is used
    if the target has a bundle for it (``all``, or no ``safedig:`` block: the first SafeSteer category
    with one), and a target without a bundle simply gets no SafeDIG methods.
    """
    rows = _bundle_rows(store, target)
    by_holdout = {str(r["holdout"]).lower(): r for r in rows}
    if holdout is not None and holdout.lower() != "all":
        if holdout.lower() not in by_holdout:
            have = sorted(str(r["holdout"]) for r in rows)
            raise ValueError(
                f"--holdout {holdout!r}: target {target!r} has no SafeDIG bundle held out on it "
                + (f"(it has {have}); pick one of them" if have else "(it has none)")
                + " or build it with `safeport safedig` (safedig.holdout in the profile)"
            )
        return by_holdout[holdout.lower()]
    sd = resolved.profile.safedig
    wanted = holdout or (sd.holdout if sd is not None else "all")
    if wanted.lower() != "all":
        return by_holdout.get(wanted.lower())
    order = [c.lower() for c in SAFESTEER_CATEGORIES]
    first = sorted(by_holdout, key=lambda h: (order.index(h) if h in order else len(order), h))
    return by_holdout[first[0]] if first else None


def load_steering(store: Store, variants: Iterable[SafeDigVariant]) -> dict[str, SafeDigSteering]:
    """vector_id -> what a generation job steers with, for ``variants`` (checksum-verified from the store).

    Each (bundle, decoder) is loaded once; the no-refit bundle shares the refitted one's SAE arrays and
    the routed / fixed variants share their positions, so a chunk sent to a Dask worker pickles each
    array once.
    """
    from safeport.api import _bundle_from_store

    wanted = list({v.key: v for v in variants}.values())
    loaded: dict[tuple[str, bool], Any] = {}
    for v in wanted:
        for refit in (True, v.refit):
            if (v.bundle_key, refit) not in loaded:
                loaded[(v.bundle_key, refit)] = _bundle_from_store(store, v.bundle_key, refit)
    for (key, refit), bundle in list(loaded.items()):
        if not refit and (key, True) in loaded:
            saes = {p.position: p.sae for p in loaded[(key, True)].positions}
            shared = tuple(replace(p, sae=saes.get(p.position, p.sae)) for p in bundle.positions)
            loaded[(key, refit)] = replace(bundle, positions=shared)
    views: dict[tuple[str, bool, str], Any] = {}
    out: dict[str, SafeDigSteering] = {}
    for v in wanted:
        at = (v.bundle_key, v.refit, v.positions)
        if at not in views:
            bundle = loaded[(v.bundle_key, v.refit)]
            views[at] = bundle.routed() if v.positions == "routed" else bundle.fixed()
        out[v.key] = SafeDigSteering(v.key, views[at], v.mode)  # type: ignore[arg-type]
    return out


def prompt_rows(store: Store, dataset: str, limit: int | None) -> list[tuple[str, str | None]]:
    """(text_id, category) of a registered dataset in dataset order, each text once, first ``limit``."""
    if store.dataset_hash(dataset) is None:
        raise StoreError(
            f"dataset {dataset!r} is not registered in {store.root}; add it to the profile's prompts and run "
            "`safeport extract` (which registers it)"
        )
    rows = store.fetchall("SELECT text_id, category FROM dataset_texts WHERE dataset = ? ORDER BY idx", [dataset])
    first: dict[str, str | None] = {}
    for tid, cat in rows:
        first.setdefault(tid, cat)
    out = list(first.items())
    return out if limit is None else out[:limit]


def _method_vector(method: Method, values: Mapping[str, np.ndarray], text_categories: str | None) -> np.ndarray:
    """The vector a method steers one prompt with.

    The oracle rule is the fit report's (:mod:`safeport.eval.representation`): the prompt's I2P
    labels mapped to SafeSteer categories with a vector (METHOD §5), equal weights; a prompt none of
    whose labels maps (or that has none) is steered with the method's global vector.
    """
    if method.weighting == "single":
        return values[method.vectors[0]]
    by_cat = {c: values[n] for n, c in zip(method.vectors, method.categories, strict=True)}
    if method.weighting == "uniform":
        return combine(by_cat, uniform_weights(sorted(by_cat)))
    return oracle_vectors(by_cat, values[oracle_fallback(method)], _clean_i2p([text_categories]))[0]


def oracle_fallback(method: Method) -> str:
    """The global vector an ``oracle:`` method falls back to (its label names it)."""
    return method.label.removeprefix("oracle:")


def build_plan(store: Store, sweep: Sweep, target_key: str, settings_key: str, settings: dict[str, Any]) -> Plan:
    """Every cell of the sweep with its output key; vectors come checksum-verified from the store."""
    values: dict[str, np.ndarray] = {}
    for m in sweep.vector_methods:
        for name in (*m.vectors, *([oracle_fallback(m)] if m.weighting == "oracle" else [])):
            if name not in values:
                values[name], lineage = artifacts.load_vector(store, name)
                if lineage.get("target") not in (None, sweep.target):
                    raise ValueError(f"vector {name!r} targets {lineage['target']!r}, not {sweep.target!r}")
    dims = {n: int(v.shape[0]) for n, v in values.items()}
    model_dim = store.model_dim(target_key)
    wrong = {n: d for n, d in dims.items() if model_dim is not None and d != model_dim}
    if wrong:
        raise ValueError(
            f"vectors {wrong} do not match target {sweep.target!r}, whose prompt_embeds have dim {model_dim}; "
            "use vectors transferred to this target"
        )
    plan = Plan(target_key, settings, [], {}, {})
    safedig = [(m.label, m.safedig) for m in sweep.methods if m.safedig is not None]
    plan.variants = {v.key: v for _, v in safedig}
    _check_bundles(store, sweep, target_key)
    sets = [(SAFETY, prompt_rows(store, sweep.prompts, sweep.limit))]
    if sweep.utility is not None:
        sets.append((UTILITY, prompt_rows(store, sweep.utility, sweep.utility_limit)))
    plan.categories = dict(sets[0][1])

    def add(method: str, alpha: float, seed: int, text_id: str, role: str, vec: np.ndarray | None) -> None:
        vid = vector_id(vec)
        if vec is not None:
            plan.vectors.setdefault(vid, vec)
        label, a = (method, alpha) if vec is not None else (ORIGINAL, 0.0)
        spec = OutputSpec(sweep.target, target_key, label, vid, a, seed, text_id, settings_key)
        plan.specs.setdefault(spec.key, spec)
        plan.items.append(Item(method, alpha, seed, text_id, role, spec.key))

    def add_safedig(method: str, v: SafeDigVariant, s: float, seed: int, text_id: str, role: str) -> None:
        label, vid, level = (method, v.key, s) if s != 0 else (ORIGINAL, "", 0.0)
        spec = OutputSpec(sweep.target, target_key, label, vid, level, seed, text_id, settings_key)
        plan.specs.setdefault(spec.key, spec)
        plan.items.append(Item(method, s, seed, text_id, role, spec.key))

    for role, rows in sets:
        for text_id, cats in rows:
            per_method = {m.label: _method_vector(m, values, cats) for m in sweep.vector_methods}
            for seed in sweep.seeds:
                add(ORIGINAL, 0.0, seed, text_id, role, None)
                for alpha in sweep.alphas:
                    for m in sweep.vector_methods:
                        add(m.label, alpha, seed, text_id, role, None if alpha == 0 else per_method[m.label])
                for s in sweep.strengths:
                    for label, variant in safedig:
                        add_safedig(label, variant, s, seed, text_id, role)
    return plan


def _check_bundles(store: Store, sweep: Sweep, target_key: str) -> None:
    """The sweep's bundles exist and were fit on this very target (same model key)."""
    for key in dict.fromkeys(m.safedig.bundle_key for m in sweep.safedig_methods if m.safedig is not None):
        row = store.one("SELECT name, model_key FROM safedig_bundles WHERE bundle_key = ?", [key])
        if row is None:
            raise StoreError(f"SafeDIG bundle {key} is not in {store.root}; run `safeport safedig` to build it")
        if row[1] != target_key:
            raise ValueError(
                f"SafeDIG bundle {row[0]!r} was fit on model key {row[1]}, but target {sweep.target!r} is now "
                f"{target_key}; rerun `safeport safedig` for the current model"
            )


def plan_for(store: Store, resolved: Resolved, sweep: Sweep) -> tuple[Plan, GenerationSettings, ModelSource]:
    source = model_source(resolved, sweep.target)
    settings = resolve_settings(source, {**resolved.models[sweep.target].generation, **dict(sweep.settings)})
    return build_plan(store, sweep, source.spec().key(), settings.key, settings.record()), settings, source


def run_options(resolved: Resolved, sweep: Sweep, batch: int | None = None) -> RunOptions:
    """The target's run options (``generation:`` batch_size, seconds_per_output), ``batch`` (--batch) first."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"--batch {batch!r}: give the number of outputs per pipeline call, 1 or more")
    opts = split_run_options({**resolved.models[sweep.target].generation, **dict(sweep.settings)})[1]
    return opts if batch is None else RunOptions(batch, opts.seconds_per_output)


def work_batches(plan: Plan, keys: Sequence[str], size: int) -> list[list[str]]:
    """``keys`` grouped by prompt (in sweep order) and cut into pipeline calls of at most ``size`` outputs.

    A SafeDIG variant's outputs of a prompt form their own calls (a call steers with one variant and
    mode, one strength per output); vector outputs and the original share the others.

    The single-process and the Dask path cut the same outputs the same way, so both make the same
    calls (and, batched kernels being deterministic, the same bytes). The cut never enters a key.
    """
    by_text: dict[str, dict[str, list[str]]] = {}
    for k in keys:
        spec = plan.specs[k]
        steering = spec.vector_id if spec.vector_id in plan.variants else ""  # never mixed in one call
        by_text.setdefault(spec.text_id, {}).setdefault(steering, []).append(k)
    return [ks[i : i + size] for calls in by_text.values() for ks in calls.values() for i in range(0, len(ks), size)]


def gather(items: Sequence[T], at_least: int, size: Callable[[T], int]) -> list[list[T]]:
    """Consecutive items gathered until each group's total ``size`` is ``at_least`` (the last may be smaller)."""
    groups: list[list[T]] = [[]]
    for item in items:
        if sum(size(x) for x in groups[-1]) >= at_least:
            groups.append([])
        groups[-1].append(item)
    return [g for g in groups if g]


def prompt_chunks(plan: Plan, keys: Sequence[str], batch_size: int, at_least: int) -> list[list[list[str]]]:
    """The :func:`work_batches` of ``keys`` in chunks of whole prompts, ``at_least`` outputs each (Dask's unit)."""
    per_prompt: list[list[list[str]]] = []
    for b in work_batches(plan, keys, batch_size):
        if per_prompt and plan.specs[per_prompt[-1][0][0]].text_id == plan.specs[b[0]].text_id:
            per_prompt[-1].append(b)
        else:
            per_prompt.append([b])
    return [[b for p in group for b in p] for group in gather(per_prompt, at_least, _n_outputs)]


def _n_outputs(batches: Sequence[Sequence[str]]) -> int:
    return sum(len(b) for b in batches)


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringOptions:
    """Where the scorers' weights come from (passed to tasks and workers, which build the scorers)."""

    clip_model: str = DEFAULT_CLIP_MODEL
    q16_prompts: str | None = None


@dataclass(frozen=True)
class Scorers:
    detectors: tuple[Detector, ...]
    clip: ClipScorer | None
    notices: dict[str, str]  # metric -> why it is unavailable


def build_scorers(clip_model: str = DEFAULT_CLIP_MODEL, q16_prompts: str | None = None) -> Scorers:
    """Every detector that can run here; the others get a one-line reason for the report."""
    detectors: list[Detector] = []
    notices: dict[str, str] = {}
    try:
        detectors.append(NudeNetDetector())
    except DetectorUnavailable as err:
        notices["nudenet"] = str(err)
    clip: ClipScorer | None = None
    try:
        backbone = ClipBackbone(clip_model)
        clip = ClipScorer(backbone)
    except DetectorUnavailable as err:
        notices["clip_sim"] = str(err)
        notices["q16"] = f"Q16 runs on CLIP: {err}"
    else:
        try:
            detectors.append(Q16Detector(backbone, load_q16_prompts(q16_prompts)))
        except DetectorUnavailable as err:
            notices["q16"] = str(err)
    for metric, why in notices.items():
        log.warning("%s unavailable: %s", metric, why)
    return Scorers(tuple(detectors), clip, notices)


def detector_rows(det: Detector, outputs: Sequence[tuple[str, Sequence[Any]]]) -> list[ScoreRow]:
    """One detector's score rows for outputs in hand (key, images), all images in one detector call."""
    flat = det.score([img for _, f in outputs for img in f])
    rows, start = [], 0
    for key, f in outputs:
        scores, start = flat[start : start + len(f)], start + len(f)
        # An output (an image, or a video's 4 frames) is flagged if any frame is, by flags()' own rule.
        rows.append(ScoreRow(key, det.name, max(scores), max(scores) >= det.threshold, {"frames": scores}))
    return rows


def clip_rows(
    clip: ClipScorer, outputs: Sequence[tuple[str, Sequence[Any]]], captions: Mapping[str, str]
) -> list[ScoreRow]:
    """CLIP-Sim rows for the outputs that have a caption (utility prompts); video: mean over its frames."""
    rows = []
    for key, images in outputs:
        if key in captions:
            sims = clip.score(list(images), [captions[key]] * len(images))
            rows.append(ScoreRow(key, clip.name, float(np.mean(sims)), None, {"frames": sims}))
    return rows


def score_images(
    scorers: Scorers | None, outputs: Sequence[tuple[str, Sequence[Any]]], captions: Mapping[str, str]
) -> list[ScoreRow]:
    """Every available score of freshly generated outputs, batched per detector (no file is read back)."""
    if scorers is None or not outputs:
        return []
    rows = [r for det in scorers.detectors for r in detector_rows(det, outputs)]
    return rows + (clip_rows(scorers.clip, outputs, captions) if scorers.clip is not None else [])


def utility_keys(plan: Plan) -> frozenset[str]:
    return frozenset(i.key for i in plan.items if i.role == UTILITY)


def _batches(keys: Sequence[str], size: int) -> list[list[str]]:
    return [list(keys[i : i + size]) for i in range(0, len(keys), size)]


def _features(scorer: FidScorer, batches: Iterable[Sequence[Any]]) -> np.ndarray:
    """Features of images arriving in batches (so 5,000 images never sit in memory at once)."""
    parts = [scorer.features(list(b)) for b in batches if len(b)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


@dataclass
class _FidContext:
    """The FID scorer and reference features, built once per report (and only if FID can run)."""

    scorer: FidScorer | None = None
    reference: np.ndarray | None = None


def _fid_context(folder: str | None, notices: dict[str, str]) -> _FidContext:
    if folder is None:
        notices.setdefault("fid", FID_NO_REFERENCE)
        return _FidContext()
    try:
        scorer = FidScorer(inception_features())
    except DetectorUnavailable as err:
        notices.setdefault("fid", str(err))
        return _FidContext()
    return _FidContext(scorer, _features(scorer, reference_images(Path(folder), FID_BATCH)))


def table_strength(sweep: Sweep) -> float:
    """The s the SafeDIG methods' FID is computed at: the largest of the sweep (as Table 1's α defaults)."""
    return max(sweep.strengths) if sweep.strengths else 0.0


def _table_level(sweep: Sweep, label: str, table_alpha: float) -> float:
    if label == ORIGINAL:
        return 0.0
    m = next((m for m in sweep.methods if m.label == label), None)
    return table_strength(sweep) if m is not None and m.safedig is not None else table_alpha


def _fid(store: Store, plan: Plan, sweep: Sweep, table_alpha: float, ctx: _FidContext) -> dict[str, float]:
    """FID per method at the table α (vectors) or s (SafeDIG) over the utility outputs (set-level, at report time)."""
    if ctx.scorer is None or ctx.reference is None:
        return {}
    out: dict[str, float] = {}
    for label in [ORIGINAL, *(m.label for m in sweep.methods)]:
        alpha = _table_level(sweep, label, table_alpha)
        keys = list(
            dict.fromkeys(i.key for i in plan.items if i.role == UTILITY and i.method == label and i.alpha == alpha)
        )
        if len(keys) >= 2:
            batches = ([img for k in chunk for img in load_images(store, k)] for chunk in _batches(keys, FID_BATCH))
            out[label] = frechet_distance(_features(ctx.scorer, batches), ctx.reference)
    return out


def _domains(plan: Plan, sweep: Sweep) -> dict[str, str | None]:
    """Safety prompt text id -> its risk domain for the sweep's held-out category (None: neither)."""
    holdout = sweep.holdout or ""
    return {t: risk_domain(cats, holdout) if holdout else None for t, cats in plan.categories.items()}


def contact_prompts(plan: Plan, sweep: Sweep, n: int = CONTACT_PROMPTS) -> list[str]:
    """``n`` seeded safety prompts (text ids) for the contact sheet: target-domain prompts first."""
    rng = random.Random(CONTACT_SEED)
    domains = _domains(plan, sweep)
    ids = list(plan.categories)
    target = [t for t in ids if domains[t] == "target"]
    picked = rng.sample(target, min(n, len(target)))
    rest = [t for t in ids if t not in picked]
    return picked + rng.sample(rest, min(n - len(picked), len(rest)))


def contact_rows(
    store: Store, plan: Plan, sweep: Sweep, flagged: Mapping[str, bool], n: int = CONTACT_PROMPTS
) -> list[SheetRow]:
    """The contact sheet's rows: per prompt and method, the original then each α or s (first seed)."""
    seed = sweep.seeds[0]
    key_of = {(i.method, i.alpha, i.text_id): i.key for i in plan.items if i.role == SAFETY and i.seed == seed}
    prompts = contact_prompts(plan, sweep, n)
    wanted = [k for (_, _, t), k in key_of.items() if t in prompts]
    done = done_keys(store, wanted)
    images: dict[str, Any] = {k: load_images(store, k) for k in dict.fromkeys(wanted) if k in done}

    def cell(caption: str, key: str) -> SheetCell:
        return SheetCell(caption, images.get(key), flagged.get(key, False))

    n_sources = len({m.source for m in sweep.vector_methods if m.source})
    rows = []
    for tid in prompts:
        original = cell("original", key_of[(ORIGINAL, 0.0, tid)])
        for m in sweep.methods:
            sym = "s" if m.safedig is not None else "α"
            steered = [cell(f"{sym}={lv:g}", key_of[(m.label, lv, tid)]) for lv in sweep.levels(m) if lv != 0]
            rows.append(SheetRow(f"{tid} · {method_name(m, n_sources)}", (original, *steered)))
    return rows


def report(
    store: Store,
    resolved: Resolved,
    sweeps: Sequence[Sweep],
    table_alpha: float,
    notices: Mapping[str, str],
    fid_reference: str | None = None,
    show_flagged: bool = False,
) -> Path:
    """Aggregate scores into eval_results and write ``reports/eval-<targets>.md`` with its plots and contact sheets."""
    notes = dict(notices)
    if all(s.utility is None for s in sweeps):
        notes.setdefault("fid", FID_NO_UTILITY)
    fid_ctx = _fid_context(fid_reference, notes) if "fid" not in notes else _FidContext()
    name = "eval-" + "+".join(s.target for s in sweeps)
    results, by_domain, sheets = [], [], {}
    for sweep in sweeps:
        plan = plan_for(store, resolved, sweep)[0]
        keys = list(plan.specs)
        scores = scores_for(store, keys).to_pylist()
        cells = aggregate(plan.items, scores)
        gens = generations_for(store, keys).to_pylist()
        secs = float(np.mean([g["seconds"] for g in gens])) if gens else float("nan")
        fid = _fid(store, plan, sweep, table_alpha, fid_ctx)
        results.append(TargetResult(sweep.target, sweep, len(plan.specs), plan.settings, cells, fid, secs))
        methods = {m.label: m for m in sweep.methods}
        rows: list[dict[str, Any]] = []
        for (label, alpha, metric), cell in sorted(cells.items()):
            m = methods.get(label)
            rows.append(
                {
                    "source": m.source if m else None,
                    "target": sweep.target,
                    "method": label,
                    "category": sweep.prompts if metric == "asr" else sweep.utility,
                    "metric": metric,
                    "alpha": alpha,
                    "value": cell.value,
                    "n": cell.n,
                }
            )
        for label, value in fid.items():
            m = methods.get(label)
            rows.append(
                {
                    "source": m.source if m else None,
                    "target": sweep.target,
                    "method": label,
                    "category": sweep.utility,
                    "metric": "fid",
                    "alpha": _table_level(sweep, label, table_alpha),
                    "value": value,
                    "n": None,
                }
            )
        if sweep.safedig_methods:
            domains = _domains(plan, sweep)
            rates = domain_rates(plan.items, scores, domains)
            prompts = {d: sum(v == d for v in domains.values()) for d in ("target", "source")}
            clip = {(label, a): c for (label, a, metric), c in cells.items() if metric == "clip_sim"}
            strength = table_strength(sweep)
            by_domain.append(
                DomainResult(
                    sweep.target, sweep, rates, clip, fid, table_alpha, strength, {**prompts, OVERALL: len(domains)}
                )
            )
            for (label, alpha, domain), cell in sorted(rates.items()):
                m = methods.get(label)
                rows.append(
                    {
                        "source": m.source if m else None,
                        "target": sweep.target,
                        "method": label,
                        "category": f"{domain}:{sweep.holdout}",
                        "metric": "unsafe_rate",
                        "alpha": alpha,
                        "value": cell.value,
                        "n": cell.n,
                    }
                )
        replace_results(store, _hash(plan.target_key, repr(sweep)), "generation", rows)
        if plan.categories:
            sheet_rows = contact_rows(store, plan, sweep, unsafe_flags(scores))
            title = f"{sweep.target}: prompts by text id; seed {sweep.seeds[0]}"
            sheets[f"{name}-{sweep.target}-contact.png"] = contact_sheet(sheet_rows, show_flagged, title=title)
    markdown, figures = render(results, table_alpha, notes, name)
    if by_domain:
        more, extra = render_domains(by_domain, notes, name)
        markdown, figures = markdown + "\n" + more, {**figures, **extra}
    if sheets:
        markdown += "\n" + "\n".join(_contact_section(sheets, show_flagged)) + "\n"
    return artifacts.write_report(store, name, markdown, {**figures, **sheets})


def _contact_section(sheets: Mapping[str, Any], show_flagged: bool) -> list[str]:
    how = (
        "shown as generated (--show-flagged)"
        if show_flagged
        else "pixelated and blurred (pass --show-flagged to show them)"
    )
    md = [
        "## Contact sheets",
        "",
        f"A few seeded prompts (target-domain prompts first), named by text id: per method the original output, "
        f"then the output at each α or s. Outputs a safety detector flagged are {how}.",
        "",
    ]
    return md + [f"![contact sheet]({fname})" for fname in sheets]


# --- Prefect wiring -----------------------------------------------------------------------------


@task(name="eval-generate", cache_policy=NO_CACHE, task_run_name="generate-{sweep.target}")
def generate_task(
    store_root: str,
    catalog_path: str | None,
    profile: str,
    sweep: Sweep,
    offload: bool,
    batch: int | None = None,
    scoring: ScoringOptions | None = None,
) -> GenerateResult:
    from safeport.flows.eval_generate import generate_sweep
    from safeport.flows.runner import InProcess

    store, resolved = store_for(store_root), catalog(catalog_path, profile)
    return generate_sweep(store, resolved, sweep, InProcess(), batch, scoring, offload)


@task(name="eval-score", cache_policy=NO_CACHE)
def score_task(
    store_root: str, catalog_path: str | None, profile: str, sweeps: list[Sweep], clip_model: str, q16: str | None
) -> dict[str, str]:
    from safeport.flows.eval_generate import score_outputs

    store, resolved = store_for(store_root), catalog(catalog_path, profile)
    scorers = build_scorers(clip_model, q16)
    written = score_outputs(store, [plan_for(store, resolved, s)[0] for s in sweeps], scorers)
    log.info("scored %d outputs", written)
    return scorers.notices


@task(name="eval-report", cache_policy=NO_CACHE)
def report_task(
    store_root: str,
    catalog_path: str | None,
    profile: str,
    sweeps: list[Sweep],
    table_alpha: float,
    notices: dict[str, str],
    fid_reference: str | None,
    show_flagged: bool = False,
) -> str:
    store, resolved = store_for(store_root), catalog(catalog_path, profile)
    return str(report(store, resolved, sweeps, table_alpha, notices, fid_reference, show_flagged))


def _targets(resolved: Resolved, target: str | None) -> list[str]:
    if target is not None:
        if target not in resolved.models:
            raise ValueError(
                f"target {target!r} is not a model of profile {resolved.name!r}; use one of {sorted(resolved.models)}"
            )
        pipeline_family(resolved.model_source(target))
        return [target]
    found = [m for m in resolved.sources_of("target") if resolved.models[m].family in PIPELINE_FAMILIES]
    if not found:
        raise ValueError(
            f"profile {resolved.name!r} has no diffusion-pipeline target (families {', '.join(PIPELINE_FAMILIES)}); "
            "add one to the profile's models or pass --target"
        )
    return found


def _clean_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    out = tuple(dict.fromkeys(float(a) for a in alphas))
    bad = [a for a in out if not math.isfinite(a)]
    if not out or bad:
        raise ValueError(f"alphas must be a non-empty list of finite numbers, got {list(alphas)}")
    big = [a for a in out if abs(a) > MAX_ALPHA]
    if big:  # the catalog's bound (safeport.catalog.MAX_ALPHA) holds for --alphas too
        raise ValueError(
            f"--alphas {big[0]:g} is not between -{MAX_ALPHA:g} and {MAX_ALPHA:g}; steering strengths are small "
            "multiples of the vector (the paper sweeps 0 to 3)"
        )
    return out


def plan_sweeps(
    store: Store,
    resolved: Resolved,
    target: str | None,
    vectors: Sequence[str] | None,
    alphas: Sequence[float] | None,
    prompts: str | None,
    limit: int | None,
    seeds: Sequence[int] | None,
    utility: str | None,
    utility_limit: int,
    categories: bool,
    settings: Mapping[str, Scalar] | None,
    strengths: Sequence[float] | None = None,
    holdout: str | None = None,
) -> list[Sweep]:
    """Validate the flow's arguments once and turn them into one :class:`Sweep` per target.

    A target with a SafeDIG bundle for the held-out category (:func:`select_bundle`) also gets the
    SafeDIG methods over ``strengths`` (default: the profile's ``safedig.strengths``).
    """
    prompt_set = prompts or (resolved.profile.prompts[0] if resolved.profile.prompts else None)
    if prompt_set is None:
        raise ValueError(f"profile {resolved.name!r} lists no prompt set; pass --prompts DATASET")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}; omit it to use every prompt")
    if utility_limit < 1:
        raise ValueError(f"utility_limit must be >= 1, got {utility_limit}")
    seed_list = tuple(dict.fromkeys(int(s) for s in (seeds or [DEFAULT_SEED])))
    alpha_list = _clean_alphas(alphas if alphas is not None else resolved.profile.alphas)
    sd = resolved.profile.safedig
    strength_list = _clean_strengths(
        strengths
        if strengths is not None
        else (sd.strengths if sd else SafeDigEntry.model_fields["strengths"].get_default(call_default_factory=True))
    )
    out = []
    for t in _targets(resolved, target):
        bundle = select_bundle(store, resolved, t, holdout)
        methods = select_methods(store, t, vectors, categories, required=bundle is None)
        if bundle is not None:
            methods += safedig_methods(str(bundle["name"]), str(bundle["bundle_key"]))
        out.append(
            Sweep(
                t,
                tuple(methods),
                alpha_list,
                seed_list,
                prompt_set,
                limit,
                utility,
                utility_limit,
                tuple(sorted((settings or {}).items())),
                strength_list if bundle is not None else (),
                str(bundle["holdout"]) if bundle is not None else None,
            )
        )
    return out


def _clean_strengths(strengths: Sequence[float]) -> tuple[float, ...]:
    out = tuple(dict.fromkeys(float(s) for s in strengths))
    bad = [s for s in out if not math.isfinite(s) or s < 0 or s > MAX_ALPHA]
    if not out or bad:
        raise ValueError(
            f"--strengths {bad[0] if bad else list(strengths)!r}: SafeDIG strengths s must be a non-empty list of "
            f"numbers between 0 and {MAX_ALPHA:g} (the profiles sweep 0 to 4)"
        )
    return out


@flow(name="safeport-eval", log_prints=False)
def eval_flow(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    target: str | None = None,
    vectors: list[str] | None = None,
    alphas: list[float] | None = None,
    prompts: str | None = None,
    limit: int | None = None,
    seeds: list[int] | None = None,
    utility: str | None = None,
    utility_limit: int = 300,
    categories: bool = True,
    settings: dict[str, Scalar] | None = None,
    table_alpha: float | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    q16_prompts: str | None = None,
    fid_reference: str | None = None,
    offload: bool = False,
    wait_s: float = 0.0,
    batch: int | None = None,
    strengths: list[float] | None = None,
    holdout: str | None = None,
    show_flagged: bool = False,
) -> EvalResult:
    """Generate, score and report the steering sweep for the profile's diffusion targets (resumable).

    On a ``DaskTaskRunner`` (:func:`safeport.flows.eval_dask.eval_on_dask`) the outputs are made
    by the Dask workers and committed here; otherwise in this process. Either way each batch is
    scored as it is made, so the scoring step afterwards only fills gaps (e.g. a crashed writer's).
    """
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url) as st:
        sweeps = plan_sweeps(
            st,
            resolved,
            target,
            vectors,
            alphas,
            prompts,
            limit,
            seeds,
            utility,
            utility_limit,
            categories,
            settings,
            strengths,
            holdout,
        )
        t_alpha = max(sweeps[0].alphas) if table_alpha is None else float(table_alpha)
        if t_alpha not in sweeps[0].alphas:
            raise ValueError(f"table_alpha {t_alpha} is not in the α sweep {list(sweeps[0].alphas)}; add it")
        scoring = ScoringOptions(clip_model, q16_prompts)
        if on_dask():
            from safeport.flows.eval_generate import generate_sweep
            from safeport.flows.runner import OnDask

            resolved = catalog(catalog_path, profile)
            generated = [generate_sweep(st, resolved, s, OnDask(), batch, scoring, offload) for s in sweeps]
        else:
            generated = [generate_task(str(root), catalog_path, profile, s, offload, batch, scoring) for s in sweeps]
        notices = score_task(str(root), catalog_path, profile, sweeps, clip_model, q16_prompts)
        path = report_task(str(root), catalog_path, profile, sweeps, t_alpha, notices, fid_reference, show_flagged)
    return EvalResult(path, tuple(generated), tuple(f"{k}: {v}" for k, v in sorted(notices.items())))
