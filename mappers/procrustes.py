"""Rectangular orthogonal Procrustes (the paper's "SVD" map), METHOD §4.

C = AᵀB (d_s×d_t), thin SVD C = UΣVᵀ, W = UVᵀ, M(x) = xW. W maximises
tr(WᵀC) over semi-orthogonal W, so it rotates without rescaling: a rigid test of
whether the two spaces are already close to isometric. When d_s ≤ d_t W has
orthonormal rows (an isometric embedding); when d_s > d_t it has orthonormal
columns (a projection), and it equals a planted projection Q exactly only when
span(Q) is invariant under AᵀA (e.g. whitened sources). The trace scale
ρ = tr(Σ)/‖A‖_F² is kept for the uncalibrated ablation only (METHOD §5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np

from safeport.mappers.base import LinearMap, State, as_matrix, check_anchor_splits, require_state


@dataclass(frozen=True, eq=False)
class ProcrustesMap(LinearMap):
    """``M(x) = x @ W`` with semi-orthogonal W, plus the trace scale ρ for the uncalibrated ablation."""

    rho: float = 1.0
    map_name: ClassVar[str] = "procrustes"

    def uncalibrated_direction(self, v: np.ndarray) -> np.ndarray:
        """ρ·vW: the magnitude the rigid map alone would give a direction (ablation, METHOD §5)."""
        return self.rho * self.direction(v)

    def state(self) -> State:
        return {"W": np.ascontiguousarray(self.W), "rho": np.array([self.rho], dtype=np.float64)}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], params: Mapping[str, float | int | str]) -> Self:
        require_state(state, ("W", "rho"), cls.map_name)
        rho = np.asarray(state["rho"], dtype=np.float64).reshape(-1)
        if rho.shape != (1,):
            raise ValueError(f"state['rho'] must hold one value, got shape {np.shape(state['rho'])}")
        return cls(W=as_matrix(state["W"], "state['W']").copy(), fit_params=dict(params), rho=float(rho[0]))


def procrustes(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, float]:
    """Return (W = UVᵀ, ρ = tr(Σ)/‖A‖_F²) for centred, row-paired A [n, d_s] and B [n, d_t]."""
    C = A.T @ B
    U, sigma, Vt = np.linalg.svd(C, full_matrices=False)
    frob2 = float(np.sum(A * A))
    if frob2 == 0.0:
        raise ValueError("A_train is all zeros (‖A‖_F = 0); the source anchors carry no signal to align")
    return U @ Vt, float(sigma.sum()) / frob2


@dataclass(frozen=True)
class ProcrustesMapper:
    """Fits the rigid map; it has no hyper-parameters, so the validation split is only shape-checked."""

    @property
    def name(self) -> str:
        return ProcrustesMap.map_name

    def fit(self, A_train: np.ndarray, B_train: np.ndarray, A_val: np.ndarray, B_val: np.ndarray) -> ProcrustesMap:
        a, b, _, _ = check_anchor_splits(A_train, B_train, A_val, B_val)
        W, rho = procrustes(a, b)
        params: dict[str, float | int | str] = {"rho": rho, "n_train": int(a.shape[0])}
        return ProcrustesMap(W=W, fit_params=params, rho=rho)
