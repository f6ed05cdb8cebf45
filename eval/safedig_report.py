"""Markdown + matplotlib rendering of a SafeDIG fit (METHOD-SAFEDIG §3-6) for one model (no file I/O here).

What the fit stored, per held-out category: the routing of every candidate position (a table and a
heat map of positions × source categories), each SAE's quality and training curves, its harmful
latents and its decoder refit. Rows in (:class:`HoldoutView`, built by ``flows/safedig.py`` from the
store), Markdown and figures out. Latent ids and numbers only: no text of any prompt is an input here,
so none can reach the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from safeport.eval.plots import Rendered, legend_outside, method_styles


@dataclass(frozen=True)
class RouteRow:
    """One candidate position of a routing (§3)."""

    position: str
    robustness: float  # R_p
    separability: float  # S_p
    auc: Mapping[str, float]  # source category -> leave-one-category-out AUC_c
    rank: int
    routed: bool


@dataclass(frozen=True)
class LatentRow:
    """A latent of the pooled H (§5)."""

    latent: int
    h_rank: int
    score: float  # s_j = p⁺_j − p⁻_j
    fire_unsafe: float
    fire_safe: float
    categories: tuple[str, ...]  # the source categories whose H_c holds it


@dataclass(frozen=True)
class RefitView:
    """A decoder refit (§6): the λ grid with its held-out FVU, and the source decoder's."""

    ks: tuple[int, ...]
    lambdas: tuple[float, ...]
    fvus: tuple[float, ...]
    k: int  # chosen exponent
    lam: float
    fvu_source: float  # λ → ∞: the source decoder as is
    n_train: int
    n_heldout: int


@dataclass(frozen=True)
class SaeView:
    """One SAE of a bundle: its position's role, quality, training curves, H and refit."""

    position: str
    routed: bool
    fixed: bool  # the "no routing" ablation's position
    d: int
    m: int
    k: int
    fvu: float  # held-out, about the mean
    l0: float
    dead: float
    n_train: int  # training tokens (rows × epochs)
    n_heldout: int
    curves: Mapping[str, Sequence[float]]  # tokens, fvu, l0, dead_fraction
    harmful: tuple[LatentRow, ...]
    refit: RefitView | None

    @property
    def role(self) -> str:
        return " + ".join(r for r, on in (("routed", self.routed), ("no routing", self.fixed)) if on)


@dataclass(frozen=True)
class HoldoutView:
    """Everything the report shows for one held-out category of one model."""

    holdout: str
    sources: tuple[str, ...]
    bundle: str  # name
    bundle_key: str
    routes: tuple[RouteRow, ...]  # best first
    saes: tuple[SaeView, ...]


def slug(text: str) -> str:
    """A file-name-safe lower-case form (``Illegal activity`` -> ``illegal-activity``)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


def _num(v: float, digits: int = 3) -> str:
    if not math.isfinite(v):
        return "–" if math.isnan(v) else ("∞" if v > 0 else "−∞")
    return f"{v:.{digits}f}"


def _g(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else _num(v)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _position_order(name: str) -> tuple[int, int, str]:
    """Pipeline order: text encoder, double-stream (joint) blocks, single-stream blocks; then layer."""
    kind, _, rest = name.partition(".")
    layer = rest.split(".", 1)[0]
    return ({"te": 0, "double": 1, "single": 2}.get(kind, 3), int(layer) if layer.isdigit() else 0, name)


# --- figures -----------------------------------------------------------------------------------------


def heat_map(routes: Sequence[RouteRow], sources: Sequence[str], title: str) -> Any:
    """Positions (pipeline order) × source categories, AUC_c in each cell; routed positions marked ▶."""
    rows = sorted(routes, key=lambda r: _position_order(r.position))
    values = np.array([[r.auc.get(c, math.nan) for c in sources] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, len(sources)), 1.2 + 0.38 * max(1, len(rows))))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(sources)), list(sources), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"▶ {r.position}" if r.routed else r.position for r in rows], fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if math.isfinite(values[i, j]):
                colour = "black" if values[i, j] > 0.6 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="AUC_c (leave-one-category-out)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(sae: SaeView, title: str) -> Any:
    """FVU, L0 and dead fraction of the training batches over the tokens seen."""
    tokens = np.asarray(sae.curves.get("tokens", []), dtype=np.float64)
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, key, label in zip(
        axes,
        ("fvu", "l0", "dead_fraction"),
        ("FVU (training batch)", f"L0 (k = {sae.k})", "dead fraction (window)"),
        strict=True,
    ):
        values = np.asarray(sae.curves.get(key, []), dtype=np.float64)
        if len(tokens) and len(values) == len(tokens):
            ax.plot(tokens, values, marker="o" if len(tokens) < 20 else None, markersize=3, linewidth=1.4)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(sae.k, color="#8a8a8a", linestyle=":", linewidth=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def refit_figure(saes: Sequence[SaeView], title: str) -> Any:
    """Held-out FVU against λ per position (chosen λ circled), the source decoder's FVU dashed."""
    with_refit = [s for s in saes if s.refit is not None]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    styles = method_styles([s.position for s in with_refit])
    for s in with_refit:
        r = s.refit
        if r is None:  # pragma: no cover - filtered above
            continue
        style = styles[s.position]
        ax.plot(r.lambdas, r.fvus, label=s.position, **style)
        ax.axhline(r.fvu_source, color=style["color"], linestyle="--", linewidth=0.9, alpha=0.7)
        ax.scatter([r.lam], [r.fvus[r.ks.index(r.k)]], s=90, facecolors="none", edgecolors=style["color"])
    ax.set_xscale("log")
    ax.set_xlabel("λ (log scale)")
    ax.set_ylabel("held-out FVU (refit rows)")
    ax.set_title(f"{title}\ncircle: chosen λ; dashed: source decoder (no refit, λ → ∞)", fontsize=9)
    ax.grid(alpha=0.3)
    if with_refit:
        legend_outside(ax, len(with_refit))
    fig.tight_layout()
    return fig


# --- the report --------------------------------------------------------------------------------------


def _routing_section(view: HoldoutView, figure: str) -> list[str]:
    header = ["rank", "position", "routed", "R_p", "S_p", *[f"AUC {c}" for c in view.sources]]
    body = [
        [
            str(r.rank),
            f"`{r.position}`",
            "yes" if r.routed else "",
            _num(r.robustness),
            _num(r.separability),
            *[_num(r.auc.get(c, math.nan)) for c in view.sources],
        ]
        for r in view.routes
    ]
    return [
        "### Routing (§3)",
        "",
        "Per candidate position, from the pooled per-prompt vectors of the source categories' pairs only: "
        "AUC_c scores category c's test pairs on the mean direction of the other source categories; "
        "R_p = mean_c AUC_c − std_c AUC_c; S_p = AUC on every source test pair with the all-source direction. "
        "The top positions by R_p (ties by S_p) are routed.",
        "",
        *_table(header, body),
        "",
        f"![AUC_c per position and source category]({figure})",
        "",
    ]


def _sae_section(view: HoldoutView, figures: Mapping[str, str], heldout_digit: str) -> list[str]:
    body = [
        [
            f"`{s.position}`",
            s.role,
            str(s.d),
            f"{s.m:,}",
            str(s.k),
            _num(s.fvu),
            _num(s.l0, 2),
            _num(s.dead),
            f"{s.n_train:,}",
            f"{s.n_heldout:,}",
        ]
        for s in view.saes
    ]
    out = [
        "### Sparse autoencoders (§4)",
        "",
        f"Quality on held-out rows (the texts whose id ends in {heldout_digit}, never trained on): FVU about the mean, "
        "L0 (latents active per row) and the dead fraction (latents active on none of those rows). "
        "Training tokens: training rows × epochs.",
        "",
        *_table(["position", "role", "d", "m", "k", "FVU", "L0", "dead", "training tokens", "held-out rows"], body),
        "",
    ]
    for s in view.saes:
        out += [f"![training curves of {s.position}]({figures[s.position]})", ""]
    return out


def _latent_section(view: HoldoutView) -> list[str]:
    out = [
        "### Harmful latents (§5)",
        "",
        "H per SAE from the source categories' train pairs: score s_j = p⁺_j − p⁻_j (mean activations "
        "normalised per side), s_j > 0 and a fire rate on unsafe tokens at least twice that on safe tokens. "
        "`in H_c of`: the source categories whose own H_c holds the latent.",
        "",
    ]
    for s in view.saes:
        out += [f"`{s.position}`: |H| = {len(s.harmful)}", ""]
        if not s.harmful:
            out += ["No latent passes the test: this position steers nothing.", ""]
            continue
        body = [
            [
                str(h.h_rank + 1),
                str(h.latent),
                _g(h.score),
                _num(h.fire_unsafe, 4),
                _num(h.fire_safe, 4),
                _num(h.fire_unsafe / h.fire_safe, 1) if h.fire_safe > 0 else "∞",
                ", ".join(h.categories) or "none",
            ]
            for h in s.harmful
        ]
        out += [
            *_table(["rank", "latent", "score", "fire unsafe", "fire safe", "ratio", "in H_c of"], body),
            "",
        ]
    return out


def _refit_section(view: HoldoutView, figure: str | None) -> list[str]:
    out = [
        "### Decoder refit (§6)",
        "",
        f"Encoder frozen; the decoder refitted in closed form on the train-split rows of {view.holdout} "
        "(both sides, labels unused), pulled toward the source decoder; λ = 10^k · tr(ZᵀZ)/m, chosen by FVU "
        "on a held-out tenth of those rows (by pair). The last row is the source decoder as is (λ → ∞, the "
        "no-refit ablation).",
        "",
    ]
    for s in view.saes:
        r = s.refit
        if r is None:
            out += [f"`{s.position}`: no refit stored.", ""]
            continue
        body = [
            [f"{k:+d}", _g(lam), _num(f, 4), "◀ chosen" if k == r.k else ""]
            for k, lam, f in zip(r.ks, r.lambdas, r.fvus, strict=True)
        ]
        body.append(["∞", "∞", _num(r.fvu_source, 4), "no refit (source decoder)"])
        out += [
            f"`{s.position}`: {r.n_train:,} refit rows, {r.n_heldout:,} held out",
            "",
            *_table(["k", "λ", "held-out FVU", ""], body),
            "",
        ]
    if figure:
        out += [f"![held-out FVU against λ]({figure})", ""]
    return out


def render(
    model: str, views: Sequence[HoldoutView], info: Mapping[str, Any], figure_prefix: str, heldout_digit: str = "0"
) -> tuple[str, dict[str, Any]]:
    """Markdown text and {png filename: Figure} of one model's SafeDIG fit, one section per held-out category.

    ``heldout_digit``: the SAEs' quality rows are the texts whose id ends in it (what the report says).
    """
    md = [
        f"# Position-aware steering (SafeDIG) fit: {model}",
        "",
        "METHOD-SAFEDIG §3-6, one section per held-out risk category: routing, SAEs and harmful latents use "
        "the source categories' labels only; the held-out category's train rows enter the decoder refit "
        "without labels. Latent ids and numbers only.",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
    ]
    figures: dict[str, Any] = {}
    for view in views:
        base = f"{figure_prefix}-{slug(view.holdout)}"
        routed = [r.position for r in view.routes if r.routed]
        fixed = [s.position for s in view.saes if s.fixed]
        md += [
            f"## Held out: {view.holdout}",
            "",
            f"Sources: {', '.join(view.sources)}. Bundle `{view.bundle}` (key `{view.bundle_key}`). "
            f"Routed: {', '.join(f'`{p}`' for p in routed) or 'none'}; no-routing position: "
            f"{', '.join(f'`{p}`' for p in fixed) or 'none'}.",
            "",
        ]
        heat = f"{base}-auc.png"
        figures[heat] = Rendered(heat_map(view.routes, view.sources, f"{model}, held out {view.holdout}: AUC_c"))
        md += _routing_section(view, heat)
        curves = {}
        for s in view.saes:
            name = f"{base}-{slug(s.position)}-curves.png"
            figures[name] = Rendered(
                curves_figure(s, f"{model} {s.position} (held out {view.holdout}): training curves")
            )
            curves[s.position] = name
        md += _sae_section(view, curves, heldout_digit)
        md += _latent_section(view)
        refit_png = None
        if any(s.refit is not None for s in view.saes):
            refit_png = f"{base}-refit.png"
            figures[refit_png] = Rendered(refit_figure(view.saes, f"{model}, held out {view.holdout}: decoder refit"))
        md += _refit_section(view, refit_png)
    plt.close("all")
    return "\n".join(md), figures
