"""Ridge map W_λ = (AᵀA + λI)⁻¹AᵀB with λ chosen on validation cosine, METHOD §4.

The grid is λ = 10^k · tr(AᵀA)/d_s, k = −4…4 (our choice; the paper's values
were lost in extraction): scaling by the mean eigenvalue of AᵀA makes k mean the
same thing for every model pair. One decomposition serves the whole grid,
because with A = USVᵀ, W_λ = V diag(s/(s²+λ)) UᵀB — nothing is solved per λ.
For the usual tall A (n anchors ≫ d_s) the decomposition is the eigendecomposition
of the d_s×d_s Gram matrix AᵀA = V S² Vᵀ (UᵀB = S⁻¹VᵀAᵀB), which costs one
pass over A instead of a thin SVD of the n×d_s matrix; λ ≥ 10⁻⁴·tr(AᵀA)/d_s keeps
the squared conditioning harmless. No intercept: the inputs are centred with
train means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from safeport.mappers.base import LinearMap, as_matrix, check_anchor_splits, check_pairs

DEFAULT_KS: tuple[int, ...] = (-4, -3, -2, -1, 0, 1, 2, 3, 4)

# Rows whose norm is below this count as zero when taking cosines (cosine := 0).
_NORM_EPS = 1e-300


class RidgeMap(LinearMap):
    """``M(x) = x @ W_λ`` at the validation-chosen λ (see ``params``)."""

    map_name: ClassVar[str] = "ridge"


def lambda_scale(A: np.ndarray) -> float:
    """tr(AᵀA)/d_s = ‖A‖_F²/d_s, the mean eigenvalue of AᵀA: the unit of the λ grid."""
    a = as_matrix(A, "A_train")
    scale = float(np.sum(a * a)) / a.shape[1]
    if scale == 0.0:
        raise ValueError("A_train is all zeros (tr(AᵀA) = 0); the λ grid has no scale")
    return scale


def lambda_grid(A: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> np.ndarray:
    """The λ values 10^k · tr(AᵀA)/d_s for each k in ``ks``, in order."""
    if not ks:
        raise ValueError("ks is empty; pass at least one exponent, e.g. (-4, ..., 4)")
    return np.array([10.0**k for k in ks]) * lambda_scale(A)


def ridge_solve(A: np.ndarray, B: np.ndarray, lam: float) -> np.ndarray:
    """W_λ by the normal equations (one λ); the reference the SVD path is tested against."""
    a, b = check_pairs(A, B, "train")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    gram = a.T @ a + lam * np.eye(a.shape[1])
    return np.linalg.solve(gram, a.T @ b)


@dataclass(frozen=True, eq=False)
class RidgePath:
    """One thin SVD of A with UᵀB precomputed; ``weights(λ)`` is then a diagonal rescale."""

    Vt: np.ndarray  # [r, d_s]
    s: np.ndarray  # [r] singular values of A
    UtB: np.ndarray  # [r, d_t]

    def shrink(self, lam: float) -> np.ndarray:
        """The spectral filter s/(s²+λ); zero singular values map to 0 for λ > 0."""
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        return self.s / (self.s**2 + lam)

    def weights(self, lam: float) -> np.ndarray:
        """W_λ = V diag(s/(s²+λ)) UᵀB, shape [d_s, d_t]."""
        return self.Vt.T @ (self.shrink(lam)[:, None] * self.UtB)

    def predict(self, X: np.ndarray, lam: float) -> np.ndarray:
        """X @ W_λ computed as (XV) diag(f) UᵀB, cheaper than forming W_λ when X has few rows."""
        return ((X @ self.Vt.T) * self.shrink(lam)) @ self.UtB


def ridge_path(A: np.ndarray, B: np.ndarray) -> RidgePath:
    """Factor A once (float64) so every λ of the grid costs one diagonal rescale."""
    a, b = check_pairs(A, B, "train")
    if a.shape[0] <= a.shape[1]:
        U, s, Vt = np.linalg.svd(a, full_matrices=False)
        return RidgePath(Vt=Vt, s=s, UtB=U.T @ b)
    evals, V = np.linalg.eigh(a.T @ a)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    V = V[:, order]
    VtAtB = V.T @ (a.T @ b)
    # Directions with s ≈ 0 have VᵀAᵀB ≈ 0 too and get weight s/(s²+λ) ≈ 0: drop them exactly.
    keep = s > (s[0] * 1e-12 if s.size and s[0] > 0 else np.inf)
    UtB = np.zeros_like(VtAtB)
    UtB[keep] = VtAtB[keep] / s[keep, None]
    return RidgePath(Vt=V.T, s=s, UtB=UtB)


def mean_row_cosine(P: np.ndarray, Q: np.ndarray) -> float:
    """Mean over rows of cos(P_i, Q_i); a zero row counts as cosine 0 rather than NaN."""
    num = np.sum(P * Q, axis=1)
    den = np.linalg.norm(P, axis=1) * np.linalg.norm(Q, axis=1)
    return float(np.mean(np.where(den > _NORM_EPS, num / np.maximum(den, _NORM_EPS), 0.0)))


def validation_cosines(path: RidgePath, A_val: np.ndarray, B_val: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """Mean cosine between mapped validation sources and their targets, one per λ."""
    proj = A_val @ path.Vt.T  # shared by every λ
    return np.array([mean_row_cosine((proj * path.shrink(float(lam))) @ path.UtB, B_val) for lam in lams])


@dataclass(frozen=True)
class RidgeMapper:
    """Ridge with λ = argmax of validation cosine over the grid (first maximum on ties)."""

    ks: tuple[int, ...] = DEFAULT_KS

    @property
    def name(self) -> str:
        return RidgeMap.map_name

    def fit(self, A_train: np.ndarray, B_train: np.ndarray, A_val: np.ndarray, B_val: np.ndarray) -> RidgeMap:
        a, b, a_val, b_val = check_anchor_splits(A_train, B_train, A_val, B_val)
        lams = lambda_grid(a, self.ks)
        path = ridge_path(a, b)
        cosines = validation_cosines(path, a_val, b_val, lams)
        best = int(np.argmax(cosines))
        params: dict[str, float | int | str] = {
            "lambda": float(lams[best]),
            "k": int(self.ks[best]),
            "lambda_scale": lambda_scale(a),
            "val_cosine": float(cosines[best]),
            "n_train": int(a.shape[0]),
            "n_val": int(a_val.shape[0]),
        }
        params.update({f"val_cosine_k{k:+d}": float(c) for k, c in zip(self.ks, cosines, strict=True)})
        return RidgeMap(W=path.weights(float(lams[best])), fit_params=params)
