"""The SafeDIG fit's report and plan, read from the store (the rendering itself is :mod:`safeport.eval.safedig_report`).

- :func:`safedig_reports`: ``reports/safedig-<model>.md`` (+ PNGs) per model after the fit, rendered again
  only when the bundles it shows (their keys cover every input of every artefact shown) or the code that
  renders them change; what was rendered is kept in ``meta`` under ``rendered:<report name>``.
- :func:`plan_safedig`: per model and candidate position, the SAE's size and the rows the training and
  select stages read, before anything is captured or trained (``safeport safedig --plan``).

Kept apart from ``flows/safedig.py`` on purpose: the select stage's keys hash that module's code, so a
change here (a new report column) must not re-key latents, refits and bundles.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import safeport.eval.safedig_report
from safeport.catalog import Resolved
from safeport.codehash import code_hash
from safeport.eval.safedig_report import HoldoutView, LatentRow, RefitView, RouteRow, SaeView, render
from safeport.flows.capture import CaptureModel, ModelPlan, capture_models, plan_rows
from safeport.flows.common import catalog
from safeport.flows.safedig import (
    HELD_OUT_DIGIT,
    BundleResult,
    Cache,
    _caches,
    _pairs,
    fixed_position,
    holdouts,
    sae_piece,
)
from safeport.keys import content_key
from safeport.store import artifacts
from safeport.store import safedig as art
from safeport.store.store import Store, StoreError
from safeport.store.stream import ROWS

if TYPE_CHECKING:
    from safeport.datasets import DatasetRows

# --- the fit report: reports/safedig-<model>.md, re-rendered only when the bundles it shows change ----------


def _holdout_view(store: Store, bundle_key: str) -> HoldoutView:
    """What the report shows of one bundle, read from its records (no weights are loaded)."""
    row = art.bundle_row(store, bundle_key)
    routes = tuple(
        RouteRow(r["position"], r["robustness"], r["separability"], r["auc"], r["rank"], r["routed"])
        for r in art.routes(store, row["route_key"])
    )
    saes = []
    for e in row["positions"]:
        s = store.sql("SELECT * FROM saes WHERE sae_key = ?", [e["sae_key"]]).to_pylist()[0]
        found = store.fetchall(
            "SELECT latent, category, h_rank, score, fire_unsafe, fire_safe FROM sae_latents "
            "WHERE latents_key = ? AND in_h ORDER BY h_rank",
            [e["latents_key"]],
        )
        member: dict[int, list[str]] = {}
        for latent, category, *_ in found:
            if category is not None:
                member.setdefault(int(latent), []).append(str(category))
        harmful = tuple(
            LatentRow(int(j), int(rank), float(sc), float(fu), float(fs), tuple(sorted(member.get(int(j), []))))
            for j, category, rank, sc, fu, fs in found
            if category is None
        )
        refit = None
        r = store.sql("SELECT * FROM refits WHERE refit_key = ?", [e["refit_key"]]).to_pylist()
        if r:
            grid = json.loads(r[0]["grid_json"])
            ks = tuple(sorted(int(k.removeprefix("fvu_k")) for k in grid if k.startswith("fvu_k")))
            scale = float(grid["lambda_scale"])
            refit = RefitView(
                ks,
                tuple(10.0**k * scale for k in ks),
                tuple(float(grid[f"fvu_k{k:+d}"]) for k in ks),
                int(r[0]["k"]),
                float(r[0]["lam"]),
                float(r[0]["fvu_source"]),
                int(r[0]["n_train"]),
                int(r[0]["n_heldout"]),
            )
        saes.append(
            SaeView(
                e["position"],
                bool(e["routed"]),
                bool(e["fixed"]),
                int(s["d"]),
                int(s["m"]),
                int(s["k"]),
                float(s["fvu"]) if s["fvu"] is not None else math.nan,
                float(s["l0"]) if s["l0"] is not None else math.nan,
                float(s["dead"]) if s["dead"] is not None else math.nan,
                int(s["n_train"]),
                int(s["n_heldout"]),
                json.loads(s["curves_json"]),
                harmful,
                refit,
            )
        )
    sources = tuple(row["lineage"].get("sources", []))
    return HoldoutView(row["holdout"], sources, row["name"], row["bundle_key"], routes, tuple(saes))


def safedig_reports(store: Store, resolved: Resolved, bundles: Sequence[BundleResult]) -> list[BundleResult]:
    """``reports/safedig-<model>.md`` (+ PNGs) per model, showing this run's bundles; the bundles with it.

    Rendered again only when what it shows changed: the render key (the bundles' keys, which cover
    every input of every artefact shown, and the rendering code) is kept in ``meta`` under
    ``rendered:<report name>``.
    """
    sd = resolved.profile.safedig
    out = []
    for model in dict.fromkeys(b.model for b in bundles):
        mine = [b for b in bundles if b.model == model]
        views = [_holdout_view(store, b.bundle_key) for b in mine]
        name = f"safedig-{model}"
        path = artifacts.report_path(store, name)
        report_code = code_hash([safeport.eval.safedig_report, inspect.getmodule(safedig_reports)])
        render_key = content_key(["safedig-report", [b.bundle_key for b in mine], report_code])
        meta_key = f"rendered:{name}"
        if store.scalar("SELECT value FROM meta WHERE key = ?", [meta_key]) != render_key or not path.is_file():
            info = {"profile": resolved.name, "held-out categories": ", ".join(b.holdout for b in mine)}
            if sd is not None:
                info["SAE"] = (
                    f"m = {sd.sae.expansion}·d, k = {sd.sae.k}, {sd.sae.epochs} epoch(s), batch {sd.sae.batch_size} "
                    f"tokens{'' if sd.sae.max_rows is None else f', at most {sd.sae.max_rows:,} rows'}"
                )
                info["routed positions per held-out category"] = f"K = {sd.route_k} (+ the no-routing position)"
                info["harmful latents"] = f"|H| at most {sd.harmful_latents} per SAE"
            markdown, figures = render(model, views, info, name, HELD_OUT_DIGIT)
            path = artifacts.write_report(store, name, markdown, figures)
            with store.transaction() as con:
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [meta_key, render_key])
        by_key = {v.bundle_key: v for v in views}
        out += [replace(b, view=by_key[b.bundle_key], report=str(path)) for b in mine]
    return out


# --- the plan: SAE sizes and rows before anything is trained -------------------------------------------------


@dataclass(frozen=True)
class SaeSizePlan:
    """One candidate position's SAE per held-out category: its size and the rows each stage reads."""

    position: str
    d: int
    m: int
    k: int
    tokens: Mapping[str, int]  # held-out category -> SAE training tokens (rows × epochs)
    select_rows: Mapping[str, int]  # held-out category -> rows the select stage encodes (§5-7)


@dataclass(frozen=True)
class SafedigPlan:
    model: str
    holdouts: tuple[str, ...]
    route_k: int
    fixed: str  # the "no routing" position (always trained)
    positions: tuple[SaeSizePlan, ...]
    rows_from: str  # where the row counts come from


def plan_safedig(
    catalog_path: str | None, profile: str, store: str | None = None, holdout: str | None = None
) -> list[SafedigPlan]:
    """Per model and candidate position: SAE size and the rows it trains on; no model is loaded, nothing trained.

    Counted exactly from the store's committed rows where a model's cache is complete, else estimated
    from the capture plan (:func:`~safeport.flows.capture.plan_capture`): a position's planned rows
    times the share the stage reads, texts weighted by their planned rows. Training: benign texts and
    the source categories' train pairs, less the SAE's held-out texts, times the epochs. Select (§5-7,
    in this process): the source categories' train pairs twice (H, then τ and ū) and the held-out
    category's train pairs once (the refit).
    """
    from safeport.datasets import build_all
    from safeport.flows.capture import plan_capture

    resolved = catalog(catalog_path, profile)
    sd = resolved.profile.safedig
    if sd is None:
        raise ValueError(
            f"profile {resolved.name!r} has no safedig: block; add one (README, 'Position-aware steering')"
        )
    root = Path(store) if store else resolved.store_path
    models = capture_models(resolved, offline_ok=True)
    counted: dict[str, tuple[list[str], dict[tuple[str, str], tuple[int, int]]]] = {}
    if (root / "meta.duckdb").is_file():
        with Store(root, read_only=True) as have:
            for cm in models:
                try:
                    cache = _caches(have, resolved, [cm])[0]
                except (StoreError, ValueError):
                    continue  # not captured (completely) yet: estimated below
                counted[cm.name] = _count_rows(have, resolved, cache, holdout)
    planned = {p.model: p for p in plan_capture(catalog_path, profile, store)} if len(counted) < len(models) else {}
    datasets = build_all(resolved) if planned else {}
    out = []
    for cm in models:
        if cm.name in counted:
            (held, counts), source = counted[cm.name], "the store's committed rows"
        else:
            held, counts = _estimate_rows(cm, resolved, datasets, planned[cm.name], holdout)
            source = "the capture plan (estimated)"
        positions = tuple(
            SaeSizePlan(p, cm.dims[p], sd.sae.expansion * cm.dims[p], sd.sae.k, *_by_holdout(counts, p, held))
            for p in cm.positions
        )
        out.append(SafedigPlan(cm.name, tuple(held), sd.route_k, fixed_position(cm), positions, source))
    return out


def _by_holdout(
    counts: Mapping[tuple[str, str], tuple[int, int]], position: str, held: Sequence[str]
) -> tuple[dict[str, int], dict[str, int]]:
    return {h: counts[(position, h)][0] for h in held}, {h: counts[(position, h)][1] for h in held}


def _count_rows(
    store: Store, resolved: Resolved, cache: Cache, holdout: str | None
) -> tuple[list[str], dict[tuple[str, str], tuple[int, int]]]:
    """(training tokens, select rows) per (position, held-out category), from a complete cache."""
    categories = sorted({p.category for p in _pairs(store, cache.pairs_dataset)})
    held = holdouts(resolved, categories, holdout)
    counts = {}
    for position in cache.cm.positions:
        unit = cache.units[cache.pairs_dataset][position].unit_key
        per = dict(
            store.fetchall(
                f"SELECT coalesce(category, 'uncategorised'), count(*) FROM {ROWS} "
                "WHERE unit_key = ? AND split = 'train' GROUP BY 1",
                [unit],
            )
        )
        for h in held:
            sources = [c for c in categories if c != h]
            tokens = int(sae_piece(store, cache, position, h, sources, resolved).config["n_tokens"])
            counts[(position, h)] = (tokens, 2 * sum(int(per.get(c, 0)) for c in sources) + int(per.get(h, 0)))
    return held, counts


def _estimate_rows(
    cm: CaptureModel, resolved: Resolved, datasets: Mapping[str, DatasetRows], planned: ModelPlan, holdout: str | None
) -> tuple[list[str], dict[tuple[str, str], tuple[int, int]]]:
    """(training tokens, select rows) per (position, held-out category) from the capture plan's rows."""
    sd = resolved.profile.safedig
    if sd is None:  # pragma: no cover - plan_safedig checks
        raise ValueError("no safedig: block")
    names = list(sd.datasets) if sd.datasets else [resolved.profile.anchors, resolved.profile.pairs]
    pairs = [d for d in names if datasets[d].kind == "pairs"]
    if len(pairs) != 1:
        raise ValueError(f"safedig.datasets {names} must hold exactly one pairs dataset; found {pairs or 'none'}")
    cap = int(cm.spec["max_tokens"])
    # text id -> (estimated real tokens, as plan_capture estimates them; category or None if benign; split)
    texts: dict[str, tuple[int, str | None, str | None]] = {}
    for d in names:
        for r in datasets[d].rows:
            category = (r.category or "uncategorised") if d == pairs[0] else None
            texts.setdefault(r.text_id, (min(cap, max(1, math.ceil(len(r.text) / 4)) + 2), category, r.split))
    categories = sorted({c for _, c, _ in texts.values() if c is not None})
    held = holdouts(resolved, categories, holdout)
    planned_rows = {p.position: p.rows for p in planned.positions}
    counts = {}
    for position in cm.positions:
        weight = {t: plan_rows(cm, position, [n]) for t, (n, _, _) in texts.items()}
        scale = planned_rows[position] / (sum(weight.values()) or 1)
        benign = 0.0  # the SAE's training share of the benign texts (its held-out texts never train)
        pair_train: dict[str, float] = {}  # category -> its train pairs' rows
        pair_sae: dict[str, float] = {}  # the same less the SAE's held-out texts
        for t, (_, category, split) in texts.items():
            kept = 0.0 if t.endswith(HELD_OUT_DIGIT) else weight[t]
            if category is None:
                benign += kept
            elif split == "train":
                pair_train[category] = pair_train.get(category, 0.0) + weight[t]
                pair_sae[category] = pair_sae.get(category, 0.0) + kept
        for h in held:
            n = round((benign + sum(v for c, v in pair_sae.items() if c != h)) * scale)
            if sd.sae.max_rows is not None:
                n = min(n, sd.sae.max_rows)
            select = 2 * sum(v for c, v in pair_train.items() if c != h) + pair_train.get(h, 0)
            counts[(position, h)] = (max(sd.sae.batch_size, n * sd.sae.epochs), round(select * scale))
    return held, counts
