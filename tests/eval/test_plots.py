"""Report plots people read: every method its own colour and line style, baselines distinct, the trade-off view."""

from __future__ import annotations

from typing import Any

import pytest

from safeport.eval import report
from safeport.eval.plots import BASELINES, baseline_kind, method_styles
from safeport.eval.sweep import ORIGINAL, Cell, Method, Sweep, TargetResult, render

MAPPERS = ["procrustes", "ridge", "mlp"]
# The representation report's 16 proxy methods (eval/representation.py).
PROXY = [
    "original",
    "native",
    *[f"{kind}:{m}" for m in MAPPERS for kind in ("calibrated", "uncalibrated")],
    "random",
    "string",
    *[f"calibrated:{m}+{w}" for m in MAPPERS for w in ("uniform", "oracle")],
]
GREYS = {s["color"] for s in BASELINES.values()}


def _key(style: dict[str, Any]) -> tuple[str, str]:
    return style["color"], repr(style["linestyle"])


def test_sixteen_methods_get_sixteen_colours_and_styles_and_baselines_stay_grey() -> None:
    styles = method_styles(PROXY)
    assert len({_key(s) for s in styles.values()}) == len(PROXY) == 16
    methods = [lab for lab in PROXY if baseline_kind(lab) is None]
    assert len({styles[lab]["color"] for lab in methods}) == len(methods)  # own colour too, not only style
    assert not {styles[lab]["color"] for lab in methods} & GREYS
    assert {lab for lab in PROXY if baseline_kind(lab)} == {"original", "native", "random", "string"}
    assert all(styles[lab]["linewidth"] > styles[methods[0]]["linewidth"] for lab in BASELINES)
    # two random baselines (two sources) still differ from each other
    two = method_styles(["random:a->g", "random:b->g", "x"], {})
    assert _key(two["random:a->g"]) != _key(two["random:b->g"]) and two["random:b->g"]["color"] in GREYS
    assert method_styles(["Random Vector"], {"Random Vector": "random"})["Random Vector"]["color"] in GREYS


def _lines(fig: Any) -> dict[str, Any]:
    (ax,) = fig.axes
    return {line.get_label(): line for line in ax.get_lines()}


def test_representation_plot_draws_every_method_in_its_own_style() -> None:
    alphas = [0.0, 1.0, 2.0]
    rows = [{"kind": "map", "method": m, "metric": "mean_cosine", "value": 0.5, "n": 3} for m in MAPPERS]
    rows += [
        {"kind": "proxy", "method": n, "category": "i2p", "metric": "flagged_fraction", "alpha": a, "value": i / 20}
        for i, n in enumerate(PROXY)
        for a in alphas
    ]
    _md, figures = report.render(rows, "llm", "enc", MAPPERS, alphas, ["i2p"], {}, {}, "rep")
    lines = _lines(figures["rep-i2p-proxy.png"])
    assert list(lines) == PROXY
    assert len({(line.get_color(), repr(line.get_linestyle()), line.get_marker()) for line in lines.values()}) == 16
    assert list(lines["uncalibrated:ridge"].get_ydata()) == [PROXY.index("uncalibrated:ridge") / 20] * 3


CAL = Method("calibrated:llm->gen:ridge", "calibrated", "llm", "ridge", ("calibrated:llm->gen:ridge",))
RND = Method("random:llm->gen", "random", "llm", None, ("random:llm->gen",))


def _result(with_clip: bool) -> TargetResult:
    cells = {}
    for m, drop in ((CAL, 0.2), (RND, 0.0)):
        for a in (0.0, 1.0, 2.0):
            cells[(m.label, a, "asr")] = Cell(0.6 - drop * a, 10)
            if with_clip:
                cells[(m.label, a, "clip_sim")] = Cell(0.30 - 0.01 * a, 10)
    cells[(ORIGINAL, 0.0, "asr")] = Cell(0.6, 10)
    sweep = Sweep("gen", (CAL, RND), (0.0, 1.0, 2.0), (0,), "i2p", None, "coco" if with_clip else None, 5, ())
    return TargetResult("gen", sweep, 10, {"call": {}, "max_sequence_length": 64}, cells, {}, 0.1)


def test_trade_off_view_one_point_per_alpha() -> None:
    md, figures = render([_result(with_clip=True)], 1.0, {}, "eval-gen")
    assert set(figures) == {"eval-gen-asr.png", "eval-gen-clip_sim.png", "eval-gen-tradeoff.png"}
    assert "![ASR vs CLIP-Sim](eval-gen-tradeoff.png)" in md
    fig = figures["eval-gen-tradeoff.png"]
    lines = _lines(fig)
    assert set(lines) == {"Ridge", "Random Vector"}
    assert list(lines["Ridge"].get_xdata()) == pytest.approx([0.30, 0.29, 0.28])  # CLIP-Sim at α = 0, 1, 2
    assert list(lines["Ridge"].get_ydata()) == pytest.approx([0.6, 0.4, 0.2])  # ASR at the same α
    assert lines["Random Vector"].get_color() in GREYS and lines["Ridge"].get_color() not in GREYS
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("α=0 (original)") == 1 and texts.count("2") == 2
    assert "ASR" in fig.axes[0].get_ylabel() and "CLIP-Sim" in fig.axes[0].get_xlabel()


def test_no_trade_off_view_without_clip_sim() -> None:
    md, figures = render([_result(with_clip=False)], 1.0, {}, "eval-gen")
    assert "eval-gen-tradeoff.png" not in figures
    assert "No trade-off view: it needs ASR and CLIP-Sim at the same α" in md
