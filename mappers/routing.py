"""Routing: rank candidate positions by how well their unsafe direction transfers across categories (SafeDIG §3).

Per position the input is one pooled vector per prompt (the mean of all of the prompt's
rows at that position), given as two aligned matrices ``safe[i]`` / ``unsafe[i]`` for
SafeSteer pair ``i``, plus each pair's category and split. Only the **source**
categories ever enter: the rows of every other category (the held-out target above
all) are dropped by index before a single value is read, so neither their values nor
their number can change a score — not even NaNs in them. The target is never named
here except to be refused if it appears among the sources.

Choices where the method page is silent (ours, documented for the README):

- Directions d_c come from the ``train`` split, AUCs from the ``test`` split; ``val``
  pairs (and any other split label) are not used by routing.
- Scores are raw projections ``x · d`` (no normalisation: AUC is invariant to a positive
  scale and to a shared offset). A zero direction scores every row 0, i.e. AUC 0.5.
- AUC is scikit-learn's ``roc_auc_score`` (exact, rank-based, ties count one half), unsafe
  rows being the positive class and the safe rows of the same pairs the negative one.
- R_p = mean_c AUC_c − std_c AUC_c with the **population** std (ddof = 0): the source
  categories are the whole set being summarised, not a sample of a larger one.
- The all-source direction of S_p is the mean of the per-category d_c (every category
  weighs the same, as in the leave-one-out directions), not the mean over pooled pairs.
- :func:`route` ranks by R_p, then S_p, then position name (ascending), all descending
  except the name, so equal inputs always give the same routes; it refuses K larger than
  the number of candidates rather than silently routing every position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from safeport.mappers.base import as_matrix

TRAIN = "train"
TEST = "test"
DEFAULT_K = 3


@dataclass(frozen=True, eq=False)
class PositionScore:
    """One position's routing statistics over the source categories (``sources`` order throughout)."""

    position: str
    sources: tuple[str, ...]  # sorted source categories
    directions: np.ndarray  # float64 [len(sources), d]: d_c = mean over c's train pairs of (unsafe − safe)
    auc: tuple[float, ...]  # leave-one-category-out transfer AUC_c, one per source
    robustness: float  # R_p = mean − population std of ``auc``
    separability: float  # S_p: AUC on the pooled source test pairs, all-source direction
    n_train: tuple[int, ...]  # train pairs per source category
    n_test: tuple[int, ...]  # test pairs per source category

    @property
    def auc_mean(self) -> float:
        return float(np.mean(self.auc))

    @property
    def auc_std(self) -> float:
        """Population std (ddof = 0) of the per-category AUCs."""
        return float(np.std(self.auc))

    def auc_by_category(self) -> dict[str, float]:
        return dict(zip(self.sources, self.auc, strict=True))


@dataclass(frozen=True)
class Routing:
    """Every candidate ranked best first, and the names of the ``k`` routed positions."""

    ranked: tuple[PositionScore, ...]
    routed: tuple[str, ...]
    k: int


def auc(scores_unsafe: np.ndarray, scores_safe: np.ndarray) -> float:
    """P(score of an unsafe row > score of a safe row), ties counting one half (exact, rank-based)."""
    pos = np.asarray(scores_unsafe, dtype=np.float64).reshape(-1)
    neg = np.asarray(scores_safe, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs rows of both classes, got {pos.size} unsafe and {neg.size} safe scores")
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def _labels(values: Sequence[str], n: int, name: str) -> np.ndarray:
    out = np.asarray([str(v) for v in values], dtype=object)
    if out.shape != (n,):
        raise ValueError(f"got {out.shape[0]} {name} for {n} pairs; pass one per pair (row i of safe/unsafe)")
    return out


def _source_rows(
    safe: np.ndarray,
    unsafe: np.ndarray,
    categories: Sequence[str],
    splits: Sequence[str],
    sources: Sequence[str],
    target: str | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """The source pairs only: rows of other categories are dropped by index before any value is read."""
    src = tuple(sorted({str(s) for s in sources}))
    if len(src) < 2:
        raise ValueError(
            f"routing needs at least 2 source categories (leave-one-category-out), got {list(sources)}; "
            "pass every known category except the held-out target"
        )
    if target is not None and target in src:
        raise ValueError(f"the held-out target {target!r} is listed among the sources {list(src)}; remove it")
    s_arr, u_arr = np.asarray(safe), np.asarray(unsafe)
    if s_arr.ndim != 2 or s_arr.shape != u_arr.shape:
        raise ValueError(
            f"safe {s_arr.shape} and unsafe {u_arr.shape} must be 2-D [pairs, dim] of one shape; "
            "row i of each is the pooled vector of pair i"
        )
    cats = _labels(categories, s_arr.shape[0], "categories")
    spl = _labels(splits, s_arr.shape[0], "splits")
    keep = np.isin(cats, np.asarray(src, dtype=object))
    missing = sorted(set(src) - set(cats[keep].tolist()))
    if missing:
        raise ValueError(f"source categories {missing} have no pairs; known categories: {sorted(set(cats.tolist()))}")
    idx = np.flatnonzero(keep)
    return (
        as_matrix(s_arr[idx], "safe (source rows)"),
        as_matrix(u_arr[idx], "unsafe (source rows)"),
        cats[idx],
        spl[idx],
        src,
    )


def score_position(
    position: str,
    safe: np.ndarray,
    unsafe: np.ndarray,
    categories: Sequence[str],
    splits: Sequence[str],
    sources: Sequence[str],
    *,
    target: str | None = None,
) -> PositionScore:
    """R_p, S_p, per-category transfer AUC and d_c at one position, from the source pairs alone.

    ``safe``/``unsafe``: [pairs, d] pooled vectors, row i = pair i; ``categories``/``splits``:
    one label per pair. Rows whose category is not in ``sources`` are ignored; ``target``
    (optional) is refused if listed among the sources.
    """
    s, u, cats, spl, src = _source_rows(safe, unsafe, categories, splits, sources, target)
    diffs = u - s
    dirs = np.empty((len(src), s.shape[1]))
    n_train, n_test = [], []
    for i, c in enumerate(src):
        tr = (cats == c) & (spl == TRAIN)
        te = (cats == c) & (spl == TEST)
        if not tr.any() or not te.any():
            raise ValueError(
                f"source category {c!r} has {int(tr.sum())} train and {int(te.sum())} test pairs at {position!r}; "
                f"routing needs at least one of each (splits are {TRAIN!r}/{TEST!r})"
            )
        dirs[i] = diffs[tr].mean(axis=0)
        n_train.append(int(tr.sum()))
        n_test.append(int(te.sum()))
    aucs = []
    for i, c in enumerate(src):
        te = (cats == c) & (spl == TEST)
        w = np.delete(dirs, i, axis=0).mean(axis=0)
        aucs.append(auc(u[te] @ w, s[te] @ w))
    test = spl == TEST
    w_all = dirs.mean(axis=0)
    auc_arr = np.asarray(aucs)
    return PositionScore(
        position=position,
        sources=src,
        directions=dirs,
        auc=tuple(float(a) for a in aucs),
        robustness=float(auc_arr.mean() - auc_arr.std()),
        separability=auc(u[test] @ w_all, s[test] @ w_all),
        n_train=tuple(n_train),
        n_test=tuple(n_test),
    )


def score_positions(
    pooled: Mapping[str, tuple[np.ndarray, np.ndarray]],
    categories: Sequence[str],
    splits: Sequence[str],
    sources: Sequence[str],
    *,
    target: str | None = None,
) -> tuple[PositionScore, ...]:
    """:func:`score_position` for every ``position → (safe, unsafe)``; the pairs are the same at every position."""
    if not pooled:
        raise ValueError("no candidate positions; pass position → (safe, unsafe) for at least one position")
    return tuple(
        score_position(p, s, u, categories, splits, sources, target=target) for p, (s, u) in sorted(pooled.items())
    )


def rank(scores: Sequence[PositionScore]) -> tuple[PositionScore, ...]:
    """Best first: highest R_p, then highest S_p, then position name ascending (deterministic)."""
    return tuple(sorted(scores, key=lambda sc: (-sc.robustness, -sc.separability, sc.position)))


def route(scores: Sequence[PositionScore], k: int = DEFAULT_K) -> Routing:
    """Route the top ``k`` positions of :func:`rank`; every candidate must be scored on the same sources."""
    if not scores:
        raise ValueError("no position scores to route; score at least one candidate position first")
    names = [sc.position for sc in scores]
    if len(set(names)) != len(names):
        raise ValueError(f"positions appear more than once: {sorted({n for n in names if names.count(n) > 1})}")
    source_sets = {sc.sources for sc in scores}
    if len(source_sets) != 1:
        raise ValueError(f"positions were scored on different source categories {sorted(source_sets)}; rescore")
    if not 1 <= k <= len(scores):
        raise ValueError(
            f"k = {k} but there are {len(scores)} candidate positions; pass 1 <= k <= {len(scores)} "
            "or add candidates to the catalog"
        )
    ranked = rank(scores)
    return Routing(ranked=ranked, routed=tuple(sc.position for sc in ranked[:k]), k=k)
