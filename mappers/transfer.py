"""One source→target transfer, end to end, as pure array code (METHOD §3–§6).

Inputs are pooled rows already read from the store; outputs are the fitted
maps and every named vector (source, transferred raw/calibrated/uncalibrated,
per category, baselines). The fit flow stores them with lineage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from safeport.mappers.base import FittedMap
from safeport.mappers.vectors import (
    anchor_scale,
    calibrate,
    category_vectors,
    centre,
    native_vector,
    pair_differences,
    random_baseline,
    source_vector,
    string_baseline,
    train_mean,
    uncalibrated,
)


@dataclass(frozen=True)
class Anchors:
    """Paired pooled anchors of both models with their split labels (rows aligned by text)."""

    source: np.ndarray
    target: np.ndarray
    splits: np.ndarray  # "train" | "val" | "test" per row

    def __post_init__(self) -> None:
        if self.source.shape[0] != self.target.shape[0] or self.source.shape[0] != len(self.splits):
            raise ValueError(
                f"anchor rows differ: source {self.source.shape[0]}, target {self.target.shape[0]}, "
                f"splits {len(self.splits)}; extract both models on the same anchors dataset"
            )
        for split in ("train", "val", "test"):
            if not (self.splits == split).any():
                raise ValueError(f"the anchors have no {split!r} rows; use more anchors or other splits")

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == split
        return self.source[mask], self.target[mask]


@dataclass(frozen=True)
class Pairs:
    """Pooled safe/unsafe rows of one model, aligned by pair, with categories."""

    safe: np.ndarray
    unsafe: np.ndarray
    categories: tuple[str, ...]


@dataclass(frozen=True)
class Centring:
    mu_s: np.ndarray
    mu_t: np.ndarray
    scale: float  # s = median‖B_i‖ / median‖A_i‖ on centred train anchors


@dataclass(frozen=True)
class TransferResult:
    centring: Centring
    maps: dict[str, FittedMap]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 vector
    kinds: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)  # name -> (kind, mapper, cat)


def slug(category: str) -> str:
    return category.strip().lower().replace(" ", "-")


def centring(anchors: Anchors) -> Centring:
    """Train-split means only (val/test never leak into the centring)."""
    a_tr, b_tr = anchors.part("train")
    mu_s, mu_t = train_mean(a_tr), train_mean(b_tr)
    return Centring(mu_s, mu_t, anchor_scale(centre(a_tr, mu_s), centre(b_tr, mu_t)))


def centred_splits(anchors: Anchors, c: Centring) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s: (centre(a, c.mu_s), centre(b, c.mu_t)) for s in ("train", "val", "test") for a, b in [anchors.part(s)]}


def fit_maps(
    anchors: Anchors,
    c: Centring,
    mappers: Sequence[str],
    make: Callable[[str], object],
    reuse: Mapping[str, FittedMap] | None = None,
) -> dict[str, FittedMap]:
    """Fit each mapper on centred train anchors (val for tuning); ``reuse`` skips maps already fitted."""
    parts = centred_splits(anchors, c)
    (a_tr, b_tr), (a_va, b_va) = parts["train"], parts["val"]
    out: dict[str, FittedMap] = {}
    for name in mappers:
        if reuse and name in reuse:
            out[name] = reuse[name]
            continue
        mapper = make(name)
        out[name] = mapper.fit(a_tr, b_tr, a_va, b_va)  # type: ignore[attr-defined]
    return out


def transfer_vectors(
    source: str,
    target: str,
    c: Centring,
    maps: Mapping[str, FittedMap],
    src_pairs: Pairs,
    tgt_pairs: Pairs,
    concept_row: np.ndarray | None,
    seed: int = 42,
) -> TransferResult:
    """Every named vector of METHOD §3, §5 and §6 for one source→target pair."""
    result = TransferResult(centring=c, maps=dict(maps))

    def put(name: str, v: np.ndarray, kind: str, mapper: str | None = None, cat: str | None = None) -> None:
        result.vectors[name] = np.asarray(v, dtype=np.float32)
        result.kinds[name] = (kind, mapper, cat)

    v_s = source_vector(src_pairs.safe, src_pairs.unsafe)
    put(f"source:{source}", v_s, "source")
    src_cats = category_vectors(pair_differences(src_pairs.safe, src_pairs.unsafe), src_pairs.categories)
    for cat, v in src_cats.items():
        put(f"source:{source}:{slug(cat)}", v, "source", cat=cat)

    put(f"native:{target}", native_vector(tgt_pairs.safe, tgt_pairs.unsafe), "native")
    tgt_cats = category_vectors(pair_differences(tgt_pairs.safe, tgt_pairs.unsafe), tgt_pairs.categories)
    for cat, v in tgt_cats.items():
        put(f"native:{target}:{slug(cat)}", v, "native", cat=cat)

    pair = f"{source}->{target}"
    calibrated_norm = c.scale * float(np.linalg.norm(v_s))
    for name, fitted in maps.items():
        raw = fitted.direction(v_s)
        put(f"raw:{pair}:{name}", raw, "raw", name)
        put(f"calibrated:{pair}:{name}", calibrate(raw, v_s, c.scale), "calibrated", name)
        put(f"uncalibrated:{pair}:{name}", uncalibrated(fitted, v_s), "uncalibrated", name)
        for cat, v_c in src_cats.items():
            put(
                f"calibrated:{pair}:{name}:{slug(cat)}",
                calibrate(fitted.direction(v_c), v_c, c.scale),
                "calibrated",
                name,
                cat,
            )
    put(f"random:{pair}", random_baseline(len(c.mu_t), calibrated_norm, seed=seed), "random")
    if concept_row is not None:
        put(f"string:{pair}", string_baseline(concept_row, c.mu_t, calibrated_norm), "string")
    return result
