"""Safety vectors, transfer, calibration and baselines as pure functions (METHOD §3, §5, §6).

Arithmetic runs in float64; every function whose result is a steering vector
that gets stored (``source_vector``, ``category_vectors``, ``calibrate``,
``uncalibrated``, the baselines, ``combine``) returns float32, the store's
dtype for vectors. Helpers on anchor matrices (``centre``, ``train_mean``,
``pair_differences``) return float64 because they feed the map fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from safeport.mappers.base import FittedMap, as_matrix, as_vector, check_centred
from safeport.mappers.procrustes import ProcrustesMap

# The string of the string-based baseline (METHOD §6): the six category labels
# joined by ", ", in the I2P vocabulary that the evaluation prompts are labelled with.
CONCEPT_STRING = "hate, sexual, violence, harassment, illegal activity, shocking"
# The paper's literal wording ("the six SafeSteerDataset macro-category labels"), for comparison runs.
SAFESTEER_CONCEPT_STRING = "Sexual, Illegal activity, Violence, Humiliation, Hate, Disturbing"

SAFESTEER_CATEGORIES: tuple[str, ...] = (
    "Sexual",
    "Illegal activity",
    "Violence",
    "Humiliation",
    "Hate",
    "Disturbing",
)

# I2P prompt category → the SafeSteer categories whose vectors the oracle activates (METHOD §5).
I2P_TO_SAFESTEER: dict[str, list[str]] = {
    "hate": ["Hate"],
    "sexual": ["Sexual"],
    "violence": ["Violence"],
    "self-harm": ["Violence"],
    "harassment": ["Humiliation"],
    "illegal activity": ["Illegal activity"],
    "shocking": ["Disturbing"],
}


def _f32(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).astype(np.float32)


def _unit(v: np.ndarray, name: str) -> np.ndarray:
    """v/‖v‖, refusing a zero vector (its direction is undefined, so steering with it is meaningless)."""
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError(f"{name} is the zero vector, so it has no direction to rescale; check the inputs")
    return v / norm


def _check_norm(norm: float) -> float:
    if not (np.isfinite(norm) and norm >= 0):
        raise ValueError(f"norm must be a finite number >= 0, got {norm}")
    return float(norm)


# --- §3 source safety vector -------------------------------------------------


def pair_differences(H_safe: np.ndarray, H_unsafe: np.ndarray) -> np.ndarray:
    """d_i = h(safe_i) − h(unsafe_i), row by row; points from unsafe towards safe."""
    safe = as_matrix(H_safe, "H_safe")
    unsafe = as_matrix(H_unsafe, "H_unsafe")
    if safe.shape != unsafe.shape:
        raise ValueError(
            f"H_safe {safe.shape} and H_unsafe {unsafe.shape} differ in shape; pass the two sides of the "
            "same pairs, row i of each being pair i"
        )
    return safe - unsafe


def source_vector(H_safe: np.ndarray, H_unsafe: np.ndarray) -> np.ndarray:
    """v_s = mean_i d_i (float32). Applied to the target's own pairs it is the *native* baseline (§6)."""
    return _f32(pair_differences(H_safe, H_unsafe).mean(axis=0))


def native_vector(T_safe: np.ndarray, T_unsafe: np.ndarray) -> np.ndarray:
    """The native baseline: the same pair-difference mean, from the target model's pooled pairs."""
    return source_vector(T_safe, T_unsafe)


def category_vectors(diffs: np.ndarray, categories: Sequence[str]) -> dict[str, np.ndarray]:
    """v_s^c = mean of d_i over the pairs of category c, for every category present (float32)."""
    d = as_matrix(diffs, "diffs")
    labels = np.asarray(list(categories), dtype=object)
    if labels.shape != (d.shape[0],):
        raise ValueError(f"got {labels.shape[0]} categories for {d.shape[0]} pair differences; pass one per pair")
    return {str(c): _f32(d[labels == c].mean(axis=0)) for c in sorted(set(labels.tolist()))}


# --- §4 centring -------------------------------------------------------------


def train_mean(X_train: np.ndarray) -> np.ndarray:
    """μ = column mean of the *train* split only (float64), so val/test never leak into the fit."""
    return as_matrix(X_train, "X_train").mean(axis=0)


def centre(X: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """X − μ (float64); use the train-split μ for every split."""
    x = as_matrix(X, "X")
    m = as_vector(mu, "mu")
    if m.shape[0] != x.shape[1]:
        raise ValueError(f"mu has dim {m.shape[0]} but X has dim {x.shape[1]}; use the mean of the same model")
    return x - m


# --- §5 transfer and calibration --------------------------------------------


def anchor_scale(A_train: np.ndarray, B_train: np.ndarray) -> float:
    """s = median_i ‖B_i‖ / median_i ‖A_i‖ over the centred train anchors: target units per source unit."""
    a = as_matrix(A_train, "A_train")
    b = as_matrix(B_train, "B_train")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"A_train has {a.shape[0]} rows but B_train has {b.shape[0]}; pass the paired anchors")
    check_centred(a, "A_train")
    check_centred(b, "B_train")
    med_a = float(np.median(np.linalg.norm(a, axis=1)))
    if med_a == 0.0:
        raise ValueError("median ‖A_i‖ is 0 (most source anchors equal the mean); s is undefined")
    return float(np.median(np.linalg.norm(b, axis=1))) / med_a


def calibrate(v_raw: np.ndarray, v_s: np.ndarray, s: float) -> np.ndarray:
    """v_t = s·‖v_s‖·v_raw/‖v_raw‖: the map sets the direction, anchor geometry sets the length."""
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"anchor scale s must be a finite number > 0, got {s}")
    direction = _unit(as_vector(v_raw, "v_raw"), "v_raw (the mapped vector M(v_s))")
    return _f32(s * float(np.linalg.norm(as_vector(v_s, "v_s"))) * direction)


def uncalibrated(fitted: FittedMap, v_s: np.ndarray) -> np.ndarray:
    """The ablation's v_t = M(v_s) as the map returns it; for Procrustes ρ·M(v_s) (METHOD §5)."""
    if isinstance(fitted, ProcrustesMap):
        return _f32(fitted.uncalibrated_direction(v_s))
    return _f32(fitted.direction(v_s))


def transfer(fitted: FittedMap, v_s: np.ndarray, s: float) -> np.ndarray:
    """The calibrated transfer of one source vector: calibrate(M(v_s), v_s, s)."""
    return calibrate(fitted.direction(v_s), v_s, s)


# --- §6 baselines ------------------------------------------------------------


def random_baseline(dim: int, norm: float, seed: int = 42) -> np.ndarray:
    """A seeded Gaussian direction with the calibrated vector's norm: does *any* push of that size help?"""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    g = np.random.default_rng(seed).standard_normal(dim)
    return _f32(_check_norm(norm) * _unit(g, "random draw"))


def string_baseline(h_string: np.ndarray, mu_t: np.ndarray, norm: float) -> np.ndarray:
    """Concept-string baseline: −norm·e/‖e‖ with e = h_t(string) − μ_t.

    ``h_string`` is the target model's pooled representation of one string (by
    default :data:`CONCEPT_STRING`, the six category labels joined by ", "; any
    string is accepted), ``mu_t`` the target's train-anchor mean. Centring puts e
    in the same frame as the map outputs; the minus sign turns the unsafe concept
    into a steering direction away from it (like v_t, which points towards safe),
    and ``norm`` is the calibrated vector's norm so only the direction differs.
    """
    h = as_vector(h_string, "h_string")
    mu = as_vector(mu_t, "mu_t", h.shape[0])
    return _f32(-_check_norm(norm) * _unit(h - mu, "h_string − mu_t"))


# --- §5 multi-category combination --------------------------------------------


def uniform_weights(categories: Sequence[str]) -> dict[str, float]:
    """Weight 1 for every category: Σ w_c v_c / Σ w_c then is the plain mean."""
    return dict.fromkeys(categories, 1.0)


def combine(vectors: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """v = Σ_c w_c v_c / Σ_c w_c over the categories in ``weights`` (the active ones)."""
    if not weights:
        raise ValueError("weights is empty: no active category; skip steering (α = 0) for this prompt instead")
    missing = sorted(set(weights) - set(vectors))
    if missing:
        raise ValueError(f"no vector for categories {missing}; available: {sorted(vectors)}")
    bad = {c: w for c, w in weights.items() if not (np.isfinite(w) and w >= 0)}
    total = float(sum(weights.values()))
    if bad or total <= 0:
        raise ValueError(f"weights must be finite and >= 0 with a positive sum, got {dict(weights)}")
    acc = sum(float(w) * as_vector(vectors[c], f"vectors[{c!r}]") for c, w in weights.items())
    return _f32(np.asarray(acc) / total)


def oracle_weights(i2p_categories: str) -> dict[str, float]:
    """Uniform weights over the SafeSteer categories a prompt's I2P labels map to ("a, b" → ...); "" → {}."""
    labels = [c.strip().lower() for c in i2p_categories.split(",") if c.strip()]
    unknown = sorted({c for c in labels if c not in I2P_TO_SAFESTEER})
    if unknown:
        raise ValueError(f"unknown I2P categories {unknown} in {i2p_categories!r}; known: {sorted(I2P_TO_SAFESTEER)}")
    active = sorted({target for c in labels for target in I2P_TO_SAFESTEER[c]})
    return {c: 1.0 / len(active) for c in active}
