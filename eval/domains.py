"""Unsafe rate per risk domain (METHOD-SAFEDIG §8) and its report section: pure, no store, no models.

For a held-out risk category c (a SafeSteer category) the evaluation prompts split by their I2P
labels, mapped to SafeSteer categories as METHOD §5 says
(:data:`safeport.mappers.vectors.I2P_TO_SAFESTEER`):

- ``target``: prompts with at least one label that maps to c (the new risk domain);
- ``source``: prompts whose labels map only to other categories (the domains the bundle was fit on);
- ``overall``: every evaluation prompt, including those with no label that maps (they are in neither
  of the other two).

Unsafe = flagged by any safety detector (NudeNet ∪ Q16), as the ASR (:func:`safeport.eval.sweep.unsafe_flags`).
The section shows every method of the sweep (original, the vectors over α, the SafeDIG variants over
s) in one table per target and held-out category, the unsafe rate vs s per domain, and the
trade-off of the target-domain unsafe rate against CLIP-Sim.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from safeport.eval.plots import legend_outside, method_styles, trade_off
from safeport.eval.sweep import ORIGINAL, SAFETY, Cell, Item, Method, Sweep, method_name, unsafe_flags
from safeport.mappers.vectors import I2P_TO_SAFESTEER

TARGET, SOURCE, OVERALL = "target", "source", "overall"
DOMAINS = (TARGET, SOURCE, OVERALL)
DOMAIN_TITLES = {TARGET: "target-domain", SOURCE: "source-domain", OVERALL: "overall"}


def mapped_categories(categories: str | None) -> set[str]:
    """The SafeSteer categories a prompt's comma-separated I2P labels map to (METHOD §5), lower case."""
    labels = (c.strip().lower() for c in (categories or "").split(","))
    return {cat.lower() for label in labels for cat in I2P_TO_SAFESTEER.get(label, [])}


def risk_domain(categories: str | None, holdout: str) -> str | None:
    """``target`` if a label maps to ``holdout``, ``source`` if labels map only to others, else None."""
    mapped = mapped_categories(categories)
    if not mapped:
        return None
    return TARGET if holdout.strip().lower() in mapped else SOURCE


def domain_rates(
    items: Sequence[Item], scores: Sequence[Mapping[str, Any]], domains: Mapping[str, str | None]
) -> dict[tuple[str, float, str], Cell]:
    """(method, α or s, domain) -> unsafe rate over the scored safety cells; ``domains`` maps text id -> domain.

    Every scored safety cell counts towards ``overall``; those of a target- or source-domain prompt also
    towards that domain. Unscored outputs are left out (not counted as safe).
    """
    flagged = unsafe_flags(scores)
    acc: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for it in items:
        if it.role != SAFETY or it.key not in flagged:
            continue
        value = float(flagged[it.key])
        acc[(it.method, it.alpha, OVERALL)].append(value)
        domain = domains.get(it.text_id)
        if domain is not None:
            acc[(it.method, it.alpha, domain)].append(value)
    return {k: Cell(float(np.mean(v)), len(v)) for k, v in acc.items()}


@dataclass(frozen=True)
class DomainResult:
    """What the per-domain section shows for one target."""

    target: str
    sweep: Sweep
    rates: dict[tuple[str, float, str], Cell]  # domain_rates()
    clip: dict[tuple[str, float], Cell]  # (method, α or s) -> CLIP-Sim on the utility prompts
    fid: dict[str, float]  # method -> FID at its table level (α for vectors, s for SafeDIG)
    table_alpha: float
    table_strength: float
    prompts: dict[str, int]  # domain -> prompts in it


def _fmt(cell: Cell | None) -> str:
    return "–" if cell is None or math.isnan(cell.value) else f"{cell.value:.3f} (n={cell.n})"


def _rows(r: DomainResult, na_clip: str, na_fid: str) -> list[list[str]]:
    n_sources = len({m.source for m in r.sweep.vector_methods if m.source})

    def row(name: str, label: str, level: str, value: float, fid_at: float | None) -> list[str]:
        clip = r.clip.get((label, value))
        fid = f"{r.fid[label]:.1f}" if label in r.fid and fid_at == value else ("–" if r.fid else na_fid)
        return [
            name,
            level,
            *(_fmt(r.rates.get((label, value, d))) for d in DOMAINS),
            na_clip if clip is None and not r.clip else _fmt(clip),
            fid,
        ]

    rows = [row("Original", ORIGINAL, "0", 0.0, 0.0)]
    for m in r.sweep.vector_methods:
        rows += [
            row(method_name(m, n_sources), m.label, f"α = {a:g}", a, r.table_alpha) for a in r.sweep.alphas if a != 0
        ]
    for m in r.sweep.safedig_methods:
        rows += [
            row(method_name(m, n_sources), m.label, f"s = {s:g}", s, r.table_strength)
            for s in r.sweep.strengths
            if s != 0
        ]
    return rows


def _names(methods: Sequence[Method], n_sources: int) -> list[str]:
    return [method_name(m, n_sources) for m in methods]


def _styles(methods: Sequence[Method], n_sources: int) -> dict[str, Any]:
    names = _names(methods, n_sources)
    kinds = {n: m.kind for n, m in zip(names, methods, strict=True) if m.safedig is None}
    return method_styles(["original", *names], {"original": "original", **kinds})


def render_domains(
    results: Sequence[DomainResult], notices: Mapping[str, str], name: str
) -> tuple[str, dict[str, Any]]:
    """Markdown + matplotlib figures of the per-domain section (one table and two figures per target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    na_clip = "n/a (no CLIP weights)" if "clip_sim" in notices else "n/a (no utility prompts)"
    na_fid = "n/a" if "fid" not in notices else f"n/a ({notices['fid'].split(';')[0]})"
    md: list[str] = []
    figures: dict[str, Any] = {}
    for r in results:
        holdout = r.sweep.holdout
        md += [
            f"## Unsafe rate per risk domain: {r.target}, held out {holdout}",
            "",
            f"Target domain: I2P prompts with a label that maps to {holdout} (METHOD §5), "
            f"{r.prompts.get(TARGET, 0)} prompts; source domain: prompts whose labels map only to other "
            f"categories, {r.prompts.get(SOURCE, 0)}; overall: all {r.prompts.get(OVERALL, 0)} evaluation "
            f"prompts; each × {len(r.sweep.seeds)} seed(s). Unsafe = NudeNet ∪ Q16 (n = scored outputs). "
            f"Vectors are swept over α, SafeDIG variants over the strength s; FID at α = {r.table_alpha:g} "
            f"and s = {r.table_strength:g}.",
            "",
        ]
        header = ["Method", "α or s", *(f"unsafe {DOMAIN_TITLES[d]}" for d in DOMAINS), "CLIP-Sim", "FID"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in _rows(r, na_clip, na_fid)]
        md += [*lines, ""]

        safedig = list(r.sweep.safedig_methods)
        n_sources = len({m.source for m in r.sweep.vector_methods if m.source})
        styles = _styles(list(r.sweep.methods), n_sources)
        if safedig:
            strengths = sorted({0.0, *r.sweep.strengths})
            fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5.2 * len(DOMAINS), 4), squeeze=False)
            for ax, d in zip(axes[0], DOMAINS, strict=True):
                for m in safedig:
                    label = method_name(m, n_sources)
                    ys = [_value(r.rates.get((ORIGINAL if s == 0 else m.label, s, d))) for s in strengths]
                    ax.plot(strengths, ys, label=label, **styles[label])
                ax.set_title(f"{DOMAIN_TITLES[d]} ({r.target})")
                ax.set_xlabel("strength s")
                ax.set_ylabel("unsafe rate (lower is safer)")
                ax.set_ylim(-0.02, 1.02)
                ax.grid(alpha=0.3)
            legend_outside(axes[0][-1], len(safedig))
            fname = f"{name}-{r.target}-domains.png"
            figures[fname] = fig
            md += [f"![unsafe rate vs s per domain]({fname})", ""]

        points: dict[str, list[tuple[float, float, float]]] = {}
        for m in r.sweep.methods:
            levels = sorted({0.0, *r.sweep.levels(m)})
            points[method_name(m, n_sources)] = [
                (
                    lv,
                    _value(r.clip.get((ORIGINAL if lv == 0 else m.label, lv))),
                    _value(r.rates.get((ORIGINAL if lv == 0 else m.label, lv, TARGET))),
                )
                for lv in levels
            ]
        fig, ax = plt.subplots(figsize=(9, 5))
        x_label = "CLIP-Sim (higher keeps more of the prompt)"
        drawn = trade_off(ax, points, styles, x_label, f"unsafe rate, target domain ({holdout})")
        if drawn:
            ax.set_title(f"{r.target}: α (vectors) and s (SafeDIG) labelled at each point")
            legend_outside(ax, len(points))
            fname = f"{name}-{r.target}-domain-tradeoff.png"
            figures[fname] = fig
            md += [f"![target-domain unsafe rate vs CLIP-Sim]({fname})", ""]
        else:
            plt.close(fig)
            md += [
                f"No trade-off view: it needs unsafe rates and CLIP-Sim at the same level (CLIP-Sim: {na_clip}).",
                "",
            ]
    plt.close("all")
    return "\n".join(md), figures


def _value(cell: Cell | None) -> float:
    return float("nan") if cell is None else cell.value
