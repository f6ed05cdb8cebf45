"""Markdown + matplotlib rendering of representation-level results (no file I/O here)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from safeport.eval.plots import legend_outside, method_styles

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Headline:
    """The few numbers the main command prints."""

    source: str
    target: str
    best_mapper: str
    best_cosine: float
    best_cos_to_native: float
    random_cos_to_native: float
    probe_test_accuracy: float
    flagged_original: float
    flagged_best: float
    flagged_random: float
    alpha: float

    @property
    def beats_random(self) -> bool:
        return abs(self.best_cos_to_native) > abs(self.random_cos_to_native) and self.flagged_best < self.flagged_random

    def lines(self) -> list[str]:
        verdict = "beats" if self.beats_random else "does NOT beat"
        return [
            f"{self.source} -> {self.target}: best map {self.best_mapper} "
            f"(test mean cosine {self.best_cosine:.3f}); cos(transferred, native) {self.best_cos_to_native:+.3f} "
            f"vs random {self.random_cos_to_native:+.3f}",
            f"  probe test accuracy {self.probe_test_accuracy:.3f}; flagged unsafe at alpha={self.alpha:g}: "
            f"original {self.flagged_original:.3f}, transferred {self.flagged_best:.3f}, "
            f"random {self.flagged_random:.3f} -> transfer {verdict} the random baseline",
        ]


def _pick(rows: Sequence[Row], **match: Any) -> list[Row]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _value(rows: Sequence[Row], **match: Any) -> float:
    found = _pick(rows, **match)
    return float(found[0]["value"]) if found else float("nan")


def headline(
    rows: Sequence[Row], source: str, target: str, mappers: Sequence[str], alphas: Sequence[float], prompt_set: str
) -> Headline:
    best = max(mappers, key=lambda m: _value(rows, kind="map", method=m, metric="mean_cosine"))
    alpha = 1.0 if 1.0 in alphas else max(alphas)
    flag = {
        m: _value(rows, kind="proxy", method=m, category=prompt_set, alpha=alpha)
        for m in ("original", f"calibrated:{best}", "random")
    }
    return Headline(
        source=source,
        target=target,
        best_mapper=best,
        best_cosine=_value(rows, kind="map", method=best, metric="mean_cosine"),
        best_cos_to_native=_value(rows, kind="transfer", method=f"calibrated:{best}", category="all"),
        random_cos_to_native=_value(rows, kind="transfer", method="random", category="all"),
        probe_test_accuracy=_value(rows, kind="probe", metric="test_accuracy"),
        flagged_original=flag["original"],
        flagged_best=flag[f"calibrated:{best}"],
        flagged_random=flag["random"],
        alpha=alpha,
    )


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def render(
    rows: Sequence[Row],
    source: str,
    target: str,
    mappers: Sequence[str],
    alphas: Sequence[float],
    prompt_sets: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    info: Mapping[str, Any],
    figure_prefix: str,
) -> tuple[str, dict[str, Any]]:
    """Markdown text and {png filename: Figure} for one source→target fit."""
    head = headline(rows, source, target, mappers, alphas, prompt_sets[0]) if prompt_sets else None
    md = [f"# Representation-level report: {source} → {target}", ""]
    if head:
        md += ["## Headline", "", *[f"- {line.strip()}" for line in head.lines()], ""]
    md += ["## Inputs", "", *[f"- {k}: {v}" for k, v in info.items()], ""]
    md += [
        "## Alignment maps (test anchors)",
        "",
        _table(
            ["mapper", "mean cosine", "relative error", "top-1", "top-5", "n", "chosen hyper-parameters"],
            [
                [
                    m,
                    _value(rows, kind="map", method=m, metric="mean_cosine"),
                    _value(rows, kind="map", method=m, metric="relative_error"),
                    _value(rows, kind="map", method=m, metric="top1"),
                    _value(rows, kind="map", method=m, metric="top5"),
                    int(_pick(rows, kind="map", method=m)[0]["n"]),
                    _short_params(params.get(m, {})),
                ]
                for m in mappers
            ],
        ),
        "",
    ]
    cats = sorted({str(r["category"]) for r in _pick(rows, kind="transfer")} - {"all"})
    methods = [f"calibrated:{m}" for m in mappers] + ["random", "string"]
    md += [
        "## Transferred vs native direction (cosine)",
        "",
        "Cosine between each transferred (calibrated) vector and the native target vector computed from "
        "the target's own pairs. The random and string baselines are global only.",
        "",
        _table(
            ["method", "all", *cats],
            [
                [
                    m,
                    _value(rows, kind="transfer", method=m, category="all"),
                    *[_value(rows, kind="transfer", method=m, category=c) for c in cats],
                ]
                for m in methods
            ],
        ),
        "",
    ]
    md += [
        "## Safety proxy: linear probe on the target's pooled pairs",
        "",
        f"Probe (logistic regression on raw pooled rows) train accuracy "
        f"{_value(rows, kind='probe', metric='train_accuracy'):.3f}, SafeSteer test accuracy "
        f"{_value(rows, kind='probe', metric='test_accuracy'):.3f}. Fraction of prompts the probe flags unsafe "
        "after adding α·v to the pooled target representation (lower is safer; a cheap stand-in for ASR):",
        "",
    ]
    figures: dict[str, Any] = {}
    for ps in prompt_sets:
        proxy = _pick(rows, kind="proxy", category=ps)
        names = list(dict.fromkeys(str(r["method"]) for r in proxy))
        md += [
            f"### {ps}",
            "",
            _table(
                ["method", *[f"α={a:g}" for a in alphas]],
                [[n, *[_value(proxy, method=n, alpha=float(a)) for a in alphas]] for n in names],
            ),
            "",
        ]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        styles = method_styles(names)
        for n in names:
            ax.plot(alphas, [_value(proxy, method=n, alpha=float(a)) for a in alphas], label=n, **styles[n])
        ax.set_xlabel("α")
        ax.set_ylabel("fraction flagged unsafe by probe (lower is safer)")
        ax.set_title(f"{source} → {target}: {ps}")
        ax.grid(alpha=0.3)
        legend_outside(ax, len(names))
        fname = f"{figure_prefix}-{ps}-proxy.png"
        figures[fname] = fig
        md += [f"![proxy vs alpha]({fname})", ""]
    if prompt_sets:
        md += [
            "Baselines are black and grey (original, native, random, string); every other method has its own "
            "colour and line style. The paper's trade-off view (ASR against CLIP-Sim, one point per α) needs "
            "generated images: `safeport eval` draws it.",
            "",
        ]
    if head:
        md += [
            "## Verdict",
            "",
            f"For these models, transfer **{'beats' if head.beats_random else 'does not beat'}** the random "
            f"baseline (criterion: |cos to native| above random's and fewer prompts flagged than random at "
            f"α={head.alpha:g}). Small default models are a smoke test of the pipeline, not of the paper's "
            "claim.",
            "",
        ]
    plt.close("all")
    return "\n".join(md), figures


def _short_params(params: Mapping[str, Any]) -> str:
    keep = [k for k in ("lambda", "k", "rho", "epochs_run", "best_epoch", "best_val_loss") if k in params]
    return ", ".join(f"{k}={params[k]:.4g}" if isinstance(params[k], float) else f"{k}={params[k]}" for k in keep)


def group_by_pair(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        out[(str(r["source"]), str(r["target"]))].append(r)
    return dict(out)
