"""Embedding-level safety proxy: a linear probe on target-space pooled pairs.

Image detectors (NudeNet, Q16) need a generator; this proxy does not. A
logistic-regression probe learns safe (label 0) vs unsafe (label 1) from the
target model's pooled pair representations; steering is then scored by how
many prompts the probe still flags after adding α·v to each pooled row. Adding
α·v to every token shifts the masked mean by exactly α·v, so pooled rows are the
right place to apply it. Inputs are *not* standardised: standardising divides by
each dimension's spread, which hands the largest weights to the lowest-variance
dimensions, and any steering vector of the calibrated norm (a random one
included) then moves prompts mostly along those dimensions, off the data, where
the probe's verdict is arbitrary (measured on the default models: a random
vector "removed" every unsafe prompt at α = 0.5). On raw pooled rows the weights
follow the directions the data actually varies along. Fits are seeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from safeport.mappers.base import as_matrix, as_vector

SAFE, UNSAFE = 0, 1


@dataclass(frozen=True, eq=False)
class SafetyProbe:
    """A fitted logistic-regression pipeline and how well it fits its own training pairs."""

    pipeline: Pipeline
    dim: int
    n_train: int
    train_accuracy: float
    seed: int

    def flags(self, X: np.ndarray) -> np.ndarray:
        """Boolean per row: the probe calls it unsafe."""
        x = as_matrix(X, "X")
        if x.shape[1] != self.dim:
            raise ValueError(f"X has dim {x.shape[1]} but the probe was trained on dim {self.dim}")
        return np.asarray(self.pipeline.predict(x)) == UNSAFE


@dataclass(frozen=True)
class FlaggedPoint:
    """Fraction of prompts the probe flags as unsafe at one steering strength α."""

    alpha: float
    fraction: float
    n: int


def train_probe(
    X_safe: np.ndarray, X_unsafe: np.ndarray, *, seed: int = 42, C: float = 1.0, max_iter: int = 2000
) -> SafetyProbe:
    """Fit the probe on target pooled rows: safe → 0, unsafe → 1."""
    safe = as_matrix(X_safe, "X_safe")
    unsafe = as_matrix(X_unsafe, "X_unsafe")
    if safe.shape[1] != unsafe.shape[1]:
        raise ValueError(f"X_safe dim {safe.shape[1]} != X_unsafe dim {unsafe.shape[1]}; use one target model")
    X = np.concatenate([safe, unsafe])
    y = np.concatenate([np.full(len(safe), SAFE), np.full(len(unsafe), UNSAFE)])
    pipeline = make_pipeline(LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    pipeline.fit(X, y)
    accuracy = float(np.mean(pipeline.predict(X) == y))
    return SafetyProbe(pipeline=pipeline, dim=X.shape[1], n_train=len(y), train_accuracy=accuracy, seed=seed)


def probe_accuracy(probe: SafetyProbe, X: np.ndarray, y: np.ndarray) -> float:
    """Accuracy on held-out rows with labels 0 (safe) / 1 (unsafe)."""
    labels = np.asarray(y)
    if labels.shape != (np.shape(X)[0],):
        raise ValueError(f"y has shape {labels.shape} but X has {np.shape(X)[0]} rows; pass one label per row")
    if not np.isin(labels, (SAFE, UNSAFE)).all():
        raise ValueError(f"labels must be 0 (safe) or 1 (unsafe), got values {sorted(set(labels.tolist()))}")
    return float(np.mean(probe.flags(X) == (labels == UNSAFE)))


def flagged_curve(
    probe: SafetyProbe, X_prompts: np.ndarray, v: np.ndarray, alphas: Sequence[float]
) -> tuple[FlaggedPoint, ...]:
    """For each α, the fraction of prompts flagged unsafe after adding α·v to every pooled row."""
    x = as_matrix(X_prompts, "X_prompts")
    direction = as_vector(v, "v", probe.dim)
    return tuple(
        FlaggedPoint(alpha=float(a), fraction=float(np.mean(probe.flags(x + float(a) * direction))), n=len(x))
        for a in alphas
    )


def flagged_fraction(
    probe: SafetyProbe, X_prompts: np.ndarray, v: np.ndarray, alphas: Sequence[float]
) -> dict[float, float]:
    """{α: fraction flagged unsafe} — the probe-level analogue of ASR along the α sweep."""
    return {p.alpha: p.fraction for p in flagged_curve(probe, X_prompts, v, alphas)}
