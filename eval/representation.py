"""Representation-level evaluation: cheap diagnostics that rank methods before any image exists.

Produces flat result rows (dicts with kind, method, category, metric, alpha,
value, n) that the store records and the report renders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from safeport.eval.metrics import cosine, diagnose
from safeport.eval.probe import SafetyProbe, probe_accuracy
from safeport.mappers.transfer import Anchors, Pairs, TransferResult, centred_splits, slug
from safeport.mappers.vectors import I2P_TO_SAFESTEER, combine, oracle_weights, uniform_weights

Row = dict[str, object]


@dataclass(frozen=True)
class PromptSet:
    name: str
    values: np.ndarray  # target pooled rows
    categories: tuple[str | None, ...]  # I2P comma lists (or None)


def map_rows(result: TransferResult, anchors: Anchors) -> list[Row]:
    """Mean cosine, relative error and retrieval top-1/top-5 of every map on the **test** anchors."""
    a_te, b_te = centred_splits(anchors, result.centring)["test"]
    rows: list[Row] = []
    for name, fitted in result.maps.items():
        d = diagnose(fitted, a_te, b_te)
        for metric in ("mean_cosine", "relative_error", "top1", "top5"):
            rows.append({"kind": "map", "method": name, "metric": metric, "value": float(getattr(d, metric)), "n": d.n})
    return rows


def cosine_rows(result: TransferResult, target: str) -> list[Row]:
    """cos(transferred, native) per mapper, globally and per category, next to the random and string baselines."""
    rows: list[Row] = []
    for name, v in result.vectors.items():
        kind, mapper, cat = result.kinds[name]
        if kind not in ("calibrated", "random", "string"):
            continue
        ref = result.vectors.get(f"native:{target}" + (f":{slug(cat)}" if cat else ""))
        if ref is None:
            continue
        method = f"{kind}:{mapper}" if mapper else kind
        rows.append(
            {
                "kind": "transfer",
                "method": method,
                "category": cat or "all",
                "metric": "cos_to_native",
                "value": cosine(v, ref),
                "n": 1,
            }
        )
    return rows


def _oracle_matrix(
    cat_vectors: Mapping[str, np.ndarray], fallback: np.ndarray, categories: Sequence[str | None]
) -> np.ndarray:
    """One vector per prompt: its I2P categories mapped to SafeSteer ones; the global vector if none map."""
    out = np.empty((len(categories), fallback.shape[0]), dtype=np.float32)
    for i, cats in enumerate(categories):
        weights = {c: w for c, w in (oracle_weights(cats or "") if cats else {}).items() if c in cat_vectors}
        out[i] = combine(cat_vectors, weights) if weights else fallback
    return out


def _clean_i2p(categories: Sequence[str | None]) -> tuple[str | None, ...]:
    known = set(I2P_TO_SAFESTEER)
    return tuple(
        ", ".join(c.strip() for c in cats.split(",") if c.strip() in known) or None if cats else None
        for cats in categories
    )


def probe_rows(probe: SafetyProbe, tgt_test: Pairs) -> list[Row]:
    """How well the linear safe/unsafe probe (trained on the target's own train pairs) separates them."""
    x_test = np.vstack([tgt_test.safe, tgt_test.unsafe])
    y_test = np.r_[np.zeros(len(tgt_test.safe)), np.ones(len(tgt_test.unsafe))]
    return [
        {
            "kind": "probe",
            "method": "probe",
            "metric": "train_accuracy",
            "value": probe.train_accuracy,
            "n": probe.n_train,
        },
        {
            "kind": "probe",
            "method": "probe",
            "metric": "test_accuracy",
            "value": probe_accuracy(probe, x_test, y_test),
            "n": len(y_test),
        },
    ]


def proxy_rows(
    vectors: Mapping[str, np.ndarray],
    kinds: Mapping[str, tuple[str, str | None, str | None]],
    target: str,
    probe: SafetyProbe,
    ps: PromptSet,
    alphas: Sequence[float],
    mappers: Sequence[str],
) -> list[Row]:
    """Fractions of one prompt set the probe flags unsafe along the α sweep, per steering method.

    Depends only on the vectors, the probe and the prompt set: adding a prompt set
    computes its rows alone, with every vector unchanged.
    """
    pair = next(iter(n for n in vectors if n.startswith("random:"))).split(":", 1)[1]
    methods: dict[str, np.ndarray] = {"original": np.zeros_like(vectors[f"native:{target}"])}
    methods["native"] = vectors[f"native:{target}"]
    for m in mappers:
        methods[f"calibrated:{m}"] = vectors[f"calibrated:{pair}:{m}"]
        methods[f"uncalibrated:{m}"] = vectors[f"uncalibrated:{pair}:{m}"]
    methods["random"] = vectors[f"random:{pair}"]
    if f"string:{pair}" in vectors:
        methods["string"] = vectors[f"string:{pair}"]
    cats = _clean_i2p(ps.categories)
    per_prompt: dict[str, np.ndarray] = {}
    for m in mappers:
        cat_vecs = _category_map(vectors, kinds, f"calibrated:{pair}:{m}")
        if cat_vecs:
            per_prompt[f"calibrated:{m}+uniform"] = np.broadcast_to(
                combine(cat_vecs, uniform_weights(sorted(cat_vecs))), ps.values.shape
            )
            per_prompt[f"calibrated:{m}+oracle"] = _oracle_matrix(cat_vecs, methods[f"calibrated:{m}"], cats)
    rows: list[Row] = []
    for name, v in [*methods.items(), *per_prompt.items()]:
        for a in alphas:
            flagged = probe.flags(ps.values + float(a) * v)
            rows.append(
                {
                    "kind": "proxy",
                    "method": name,
                    "category": ps.name,
                    "metric": "flagged_fraction",
                    "alpha": float(a),
                    "value": float(np.mean(flagged)),
                    "n": len(ps.values),
                }
            )
    return rows


def _category_map(
    vectors: Mapping[str, np.ndarray], kinds: Mapping[str, tuple[str, str | None, str | None]], prefix: str
) -> dict[str, np.ndarray]:
    """{SafeSteer category: vector} for the per-category vectors stored under ``prefix``."""
    out: dict[str, np.ndarray] = {}
    for name, v in vectors.items():
        _, _, cat = kinds[name]
        if cat is not None and name.startswith(prefix + ":"):
            out[cat] = v
    return out


POSITIONS_NA = "n/a (recorded when a model's anchors are extracted; these were extracted before safeport recorded them)"


def position_section(models: Mapping[str, Sequence[Mapping[str, object]]]) -> str:
    """Markdown: mean L2 norm of each leading pooled position per model, constant positions starred.

    A first position far larger than the rest that is the same for every prompt (BOS, a template
    prefix) shifts every pooled row by a length-dependent amount; ``drop_constant_prefix`` leaves
    such positions out of pooling and steering.
    """
    lines = [
        "## Per-position norms",
        "",
        "Mean L2 norm of the pooled tensor at its first positions over the first anchors; `*` marks positions "
        "identical for every prompt (left out with the model option `drop_constant_prefix: true`). "
        "`pos 0 / median` compares the first position with the median of the shown ones.",
        "",
    ]
    shown = {name: list(rows) for name, rows in models.items() if rows}
    if not shown:
        return "\n".join([*lines, POSITIONS_NA, ""])
    width = max(int(r["position"]) for rows in shown.values() for r in rows) + 1  # type: ignore[call-overload]
    lines.append("| model | " + " | ".join(f"pos {p}" for p in range(width)) + " | pos 0 / median |")
    lines.append("|---" * (width + 2) + "|")
    for name, rows in models.items():
        if not rows:
            lines.append(f"| {name} | " + " | ".join(["n/a"] * width) + " | n/a |")
            continue
        by_pos = {int(r["position"]): r for r in rows}  # type: ignore[call-overload]
        cells = []
        for p in range(width):
            r = by_pos.get(p)
            cells.append("" if r is None else f"{float(r['mean_norm']):.3g}{'*' if r['constant'] else ''}")  # type: ignore[arg-type]
        norms = [float(r["mean_norm"]) for r in rows]  # type: ignore[arg-type]
        ratio = norms[0] / float(np.median(norms)) if norms and float(np.median(norms)) > 0 else float("nan")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join([*lines, ""])
