"""Map diagnostics on the held-out test anchors (METHOD §4): how well M(a_i) lands on b_i.

All four numbers compare mapped test sources ``P = M(A_test)`` with their paired
targets ``B_test`` (both centred with train means):

- mean cosine: mean_i cos(P_i, B_i) — direction agreement, what the steering uses;
- relative error: mean_i ‖P_i − B_i‖ / ‖B_i‖ — per-row, so every anchor counts
  equally regardless of its norm (the Frobenius ratio ‖P − B‖_F/‖B‖_F would let a
  few long rows dominate);
- retrieval top-k: the fraction of rows i for which B_i is among the k targets
  most cosine-similar to P_i, over all test targets. A target only outranks B_i
  if its cosine is strictly higher, so ties count in B_i's favour. Chance is k/n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safeport.mappers.base import FittedMap, as_matrix, as_vector

_CHUNK = 1024  # query rows per similarity block, bounds memory at CHUNK × n floats


@dataclass(frozen=True)
class MapDiagnostics:
    """Test-split quality of one fitted map; ``n`` is the number of test pairs (chance top-k = k/n)."""

    mean_cosine: float
    relative_error: float
    top1: float
    top5: float
    n: int


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """cos(u, v) in float64; a zero vector has no direction, so it is an error rather than 0 or NaN."""
    a = as_vector(u, "u")
    b = as_vector(v, "v", a.shape[0])
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    if den == 0.0:
        raise ValueError("cosine of a zero vector is undefined; check that neither u nor v is all zeros")
    return float(a @ b) / den


def _unit_rows(X: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0.0)
    if zero.size:
        raise ValueError(f"{name} has {zero.size} zero row(s) (e.g. row {int(zero[0])}); cosine is undefined there")
    return X / norms


def retrieval_ranks(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rank of the true target for each query (0 = best): #targets with a strictly higher cosine."""
    p = _unit_rows(pred, "mapped sources")
    t = _unit_rows(target, "targets")
    ranks = np.empty(p.shape[0], dtype=np.int64)
    for start in range(0, p.shape[0], _CHUNK):
        sims = p[start : start + _CHUNK] @ t.T
        rows = np.arange(sims.shape[0])
        own = sims[rows, start + rows]
        ranks[start : start + sims.shape[0]] = np.sum(sims > own[:, None], axis=1)
    return ranks


def map_diagnostics(pred: np.ndarray, target: np.ndarray) -> MapDiagnostics:
    """Diagnostics from mapped test sources ``pred = M(A_test)`` and paired ``target = B_test``."""
    p = as_matrix(pred, "pred")
    t = as_matrix(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ; map A_test and pair it with B_test")
    cos = np.sum(_unit_rows(p, "mapped sources") * _unit_rows(t, "targets"), axis=1)
    rel = np.linalg.norm(p - t, axis=1) / np.linalg.norm(t, axis=1)
    ranks = retrieval_ranks(p, t)
    return MapDiagnostics(
        mean_cosine=float(cos.mean()),
        relative_error=float(rel.mean()),
        top1=float(np.mean(ranks < 1)),
        top5=float(np.mean(ranks < 5)),
        n=int(p.shape[0]),
    )


def diagnose(fitted: FittedMap, A_test: np.ndarray, B_test: np.ndarray) -> MapDiagnostics:
    """Map the centred test sources with ``fitted`` and score them against the centred test targets."""
    return map_diagnostics(fitted.rows(A_test), B_test)
