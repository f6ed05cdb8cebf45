"""The mapper contract: centred anchors in, a fitted source→target map out.

Mappers are pure compute. They receive anchors already centred with the
*train-split* means (METHOD §4), never read or write files, and hand back a
``FittedMap`` whose ``state()`` is a flat dict of arrays the store keeps (one
Zarr array per tensor, each with its checksum) and whose ``params`` are the chosen hyper-parameters kept for
lineage. Maps compute and return float64; the vectors that end up in the store
are cast to float32 in :mod:`safeport.mappers.vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Self

import numpy as np

Params = dict[str, float | int | str]
State = dict[str, np.ndarray]

# Relative size of a train mean (vs the median row norm) above which the rows are
# taken to be uncentred: centring in float32 leaves ~1e-7, forgetting it leaves ~1.
_CENTRED_RTOL = 1e-3


class FittedMap(Protocol):
    """A fitted source→target map; linear maps are ``x @ W``, the MLP is ``f(x)``."""

    @property
    def name(self) -> str:
        """Registry name of the mapper that produced this map (``procrustes``, ...)."""
        ...

    @property
    def params(self) -> Params:
        """Chosen hyper-parameters and fit diagnostics, for lineage."""
        ...

    @property
    def source_dim(self) -> int: ...

    @property
    def target_dim(self) -> int: ...

    def rows(self, X: np.ndarray) -> np.ndarray:
        """Map centred source rows ``[n, d_s]`` to centred target rows ``[n, d_t]`` (float64)."""
        ...

    def direction(self, v: np.ndarray) -> np.ndarray:
        """Map a direction ``[d_s]`` to ``[d_t]``: ``v @ W`` if linear, ``f(v) − f(0)`` for the MLP."""
        ...

    def state(self) -> State:
        """The arrays that fully determine the map, for the store to serialise."""
        ...

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], params: Mapping[str, float | int | str]) -> Self:
        """Rebuild the map from ``state()`` and ``params`` without any file I/O."""
        ...


class Mapper(Protocol):
    """Fits a map on centred train anchors; validation anchors tune what the method tunes."""

    @property
    def name(self) -> str: ...

    def fit(self, A_train: np.ndarray, B_train: np.ndarray, A_val: np.ndarray, B_val: np.ndarray) -> FittedMap:
        """Fit on centred ``A_train → B_train``; ``A_val``/``B_val`` are centred with the train means."""
        ...


def as_matrix(X: np.ndarray, name: str) -> np.ndarray:
    """``X`` as a finite float64 2-D array, or a ValueError naming ``name`` and its shape."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {arr.shape}; reshape it first")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one row of at least one dim")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    out = arr.astype(np.float64, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN/inf in {int((~np.isfinite(out)).any(axis=1).sum())} row(s)")
    return out


def as_vector(v: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """``v`` as a finite float64 1-D array of length ``dim`` (when given), else a ValueError."""
    arr = np.asarray(v)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {arr.shape}; use rows() for batches")
    if dim is not None and arr.shape[0] != dim:
        raise ValueError(f"{name} has dim {arr.shape[0]}, expected {dim} (the dim it is applied in)")
    out = arr.astype(np.float64, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN/inf")
    return out


def check_pairs(A: np.ndarray, B: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one split's paired anchors (same row count) and return them as float64."""
    a = as_matrix(A, f"A_{split}")
    b = as_matrix(B, f"B_{split}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"A_{split} has {a.shape[0]} rows but B_{split} has {b.shape[0]}; anchors must be paired row "
            "by row (same texts, same order) in both models"
        )
    return a, b


def check_anchor_splits(
    A_train: np.ndarray, B_train: np.ndarray, A_val: np.ndarray, B_val: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the four anchor arrays a mapper receives; train rows must be centred."""
    a_tr, b_tr = check_pairs(A_train, B_train, "train")
    a_va, b_va = check_pairs(A_val, B_val, "val")
    if a_va.shape[1] != a_tr.shape[1] or b_va.shape[1] != b_tr.shape[1]:
        raise ValueError(
            f"validation dims (A {a_va.shape[1]}, B {b_va.shape[1]}) differ from train dims "
            f"(A {a_tr.shape[1]}, B {b_tr.shape[1]}); both splits must come from the same two models"
        )
    check_centred(a_tr, "A_train")
    check_centred(b_tr, "B_train")
    return a_tr, b_tr, a_va, b_va


def check_centred(X: np.ndarray, name: str) -> None:
    """Refuse uncentred train rows: the maps have no intercept, so an offset would be fit as signal."""
    mean_norm = float(np.linalg.norm(X.mean(axis=0)))
    scale = float(np.median(np.linalg.norm(X, axis=1)))
    if mean_norm > _CENTRED_RTOL * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            f"{name} is not centred (‖mean‖ = {mean_norm:.3g} vs median row norm {scale:.3g}); "
            "pass centre(X_train, train_mean(X_train)) from mappers.vectors"
        )


def require_state(state: Mapping[str, np.ndarray], keys: tuple[str, ...], name: str) -> None:
    """A clear error when a stored state lacks arrays the map needs (e.g. written by another mapper)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(
            f"state for mapper {name!r} lacks {missing} (has {sorted(state)}); it was written by a "
            "different mapper or version — refit the map"
        )


class NamedMap:
    """``name`` and ``params`` of a fitted map, read from its ``map_name`` and ``fit_params``."""

    map_name: ClassVar[str]
    fit_params: Params

    @property
    def name(self) -> str:
        return self.map_name

    @property
    def params(self) -> Params:
        return dict(self.fit_params)


@dataclass(frozen=True, eq=False)
class LinearMap(NamedMap):
    """``M(x) = x @ W`` with no intercept (inputs are centred); subclasses only set ``map_name``."""

    W: np.ndarray  # float64 [d_s, d_t]
    fit_params: Params = field(default_factory=dict)
    map_name: ClassVar[str] = "linear"

    @property
    def source_dim(self) -> int:
        return int(self.W.shape[0])

    @property
    def target_dim(self) -> int:
        return int(self.W.shape[1])

    def rows(self, X: np.ndarray) -> np.ndarray:
        x = as_matrix(X, "X")
        if x.shape[1] != self.source_dim:
            raise ValueError(f"X has dim {x.shape[1]} but the {self.name} map expects {self.source_dim}")
        return x @ self.W

    def direction(self, v: np.ndarray) -> np.ndarray:
        """For a linear map a direction maps like a row: ``v @ W``."""
        return as_vector(v, "v", self.source_dim) @ self.W

    def state(self) -> State:
        return {"W": np.ascontiguousarray(self.W)}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], params: Mapping[str, float | int | str]) -> Self:
        require_state(state, ("W",), cls.map_name)
        return cls(W=as_matrix(state["W"], "state['W']").copy(), fit_params=dict(params))
