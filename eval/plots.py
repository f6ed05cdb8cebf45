"""Styles and plot helpers shared by the reports (pure: matplotlib objects in, nothing written).

Every method gets its own colour *and* its own line style, so 16 methods stay apart in print and
for colour-blind readers (18 colours, 4 dash patterns, 10 markers: a (colour, dash) pair repeats
only after 36 methods). Baselines (original, native, random, string) are drawn in black and greys,
thicker, with their own dash and marker, so they never look like a method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Style = dict[str, Any]  # keyword arguments for Axes.plot

BASELINES: dict[str, Style] = {
    "original": {"color": "#000000", "linestyle": "-", "marker": "s", "linewidth": 2.4, "markersize": 6},
    "native": {"color": "#4a4a4a", "linestyle": (0, (7, 2)), "marker": "*", "linewidth": 2.2, "markersize": 9},
    "random": {"color": "#8a8a8a", "linestyle": ":", "marker": "X", "linewidth": 2.4, "markersize": 7},
    "string": {"color": "#626262", "linestyle": (0, (5, 1.5, 1, 1.5)), "marker": "d", "linewidth": 2.2},
}
# matplotlib's tab20 without its greys: the dark shade of each hue first, then the light ones.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
]  # fmt: skip
_DASHES: list[Any] = ["-", (0, (4, 1.5)), (0, (6, 1.5, 1.5, 1.5)), (0, (1.5, 1.2))]
_MARKERS = ["o", "^", "v", "s", "P", "D", "<", ">", "h", "p"]


def baseline_kind(label: str) -> str | None:
    """``original``/``native``/``random``/``string`` for a baseline's label (``random:a->b`` too), else None."""
    head = label.split(":", 1)[0].split("+", 1)[0].strip().lower()
    return head if head in BASELINES else None


def method_styles(labels: Sequence[str], kinds: Mapping[str, str] | None = None) -> dict[str, Style]:
    """A distinct plot style per label, in order; baselines get theirs (a repeated kind a thinner variant).

    A label is a baseline if ``kinds`` maps it to one of :data:`BASELINES`, or if it names one itself
    (``random``, ``native:tgt``, ...).
    """
    out: dict[str, Style] = {}
    method = 0
    seen: dict[str, int] = {}
    for label in dict.fromkeys(labels):
        given = (kinds or {}).get(label)
        kind = given if given in BASELINES else baseline_kind(label)
        if kind is not None:
            n = seen.get(kind, 0)
            seen[kind] = n + 1
            style = dict(BASELINES[kind])
            if n:  # a second random/string baseline (another source): same grey family, other dash
                style.update(linestyle=(0, (2 + n, 1 + n)), linewidth=max(1.2, style["linewidth"] - 0.5 * n))
            out[label] = style
            continue
        out[label] = {
            "color": _PALETTE[method % len(_PALETTE)],
            "linestyle": _DASHES[method % len(_DASHES)],
            "marker": _MARKERS[method % len(_MARKERS)],
            "linewidth": 1.6,
            "markersize": 5,
        }
        method += 1
    return out


def legend_outside(ax: Any, n: int) -> None:
    """The legend right of the axes (it never hides a curve); two columns for many methods."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, ncol=2 if n > 14 else 1)


def trade_off(
    ax: Any,
    points: Mapping[str, Sequence[tuple[float, float, float]]],
    styles: Mapping[str, Style],
    x_label: str,
    y_label: str,
) -> int:
    """The paper's trade-off view: per method a line through its (x, y) at each α, each point labelled with α.

    ``points`` maps a method to ``(alpha, x, y)`` triples; points with a missing value are skipped.
    Returns how many points were drawn (0: no data, the caller drops the figure).
    """
    drawn = 0
    labelled: set[tuple[float, float, float]] = set()  # the shared α = 0 point is labelled once
    for label, triples in points.items():
        usable = sorted((a, x, y) for a, x, y in triples if math.isfinite(x) and math.isfinite(y))
        if not usable:
            continue
        style = dict(styles.get(label, {}))
        ax.plot([x for _, x, _ in usable], [y for _, _, y in usable], label=label, **style)
        for a, x, y in usable:
            if (a, x, y) in labelled:
                continue
            labelled.add((a, x, y))
            if a == 0:  # the original: its label left of the point, away from the legend
                ax.annotate(
                    "α=0 (original)", (x, y), textcoords="offset points", xytext=(-6, 4), ha="right", fontsize=7
                )
            else:
                ax.annotate(
                    f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=style["color"]
                )
        drawn += len(usable)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    return drawn


class Rendered:
    """A figure already rendered to PNG bytes (its pyplot figure closed at once, so a report of many
    figures keeps one open at a time); the report writer saves it like a matplotlib Figure."""

    def __init__(self, fig: Any, dpi: int = 110) -> None:
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        self.data = buf.getvalue()

    def savefig(self, path: Any, **_: Any) -> None:
        from pathlib import Path

        Path(path).write_bytes(self.data)


def loco_figure(
    cells: Sequence[Any], holdouts: Sequence[str], methods: Sequence[str], strengths: Sequence[float]
) -> Any:
    """Held-out flagged fraction vs strength s, one panel per held-out category, one line per method.

    ``cells`` are :class:`safeport.eval.loco.Cell` (typed loosely: plots never import the evaluators).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(holdouts))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    styles = method_styles(["original", *methods])
    for i, h in enumerate(holdouts):
        ax = axes[i // cols][i % cols]
        original = next((c for c in cells if c.holdout == h and c.method == "original"), None)
        for m in methods:
            mine = sorted((c for c in cells if c.holdout == h and c.method == m), key=lambda c: c.strength)
            xs = [0.0, *(c.strength for c in mine)]
            ys = [original.target if original else float("nan"), *(c.target for c in mine)]
            ax.plot(xs, ys, label=m, **styles[m])
        ax.set_title(f"held out: {h}")
        ax.set_xlabel("strength s")
        ax.set_ylabel("held-out flagged")
        ax.set_ylim(-0.02, 1.02)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
