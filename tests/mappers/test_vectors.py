"""Hand-computed answers for METHOD §3 (pair vectors), §5 (centring, scale, calibration, combine), §6."""

import numpy as np
import pytest

from safeport.mappers.procrustes import ProcrustesMapper
from safeport.mappers.ridge import RidgeMapper
from safeport.mappers.vectors import (
    CONCEPT_STRING,
    I2P_TO_SAFESTEER,
    SAFESTEER_CATEGORIES,
    anchor_scale,
    calibrate,
    category_vectors,
    centre,
    combine,
    native_vector,
    oracle_weights,
    pair_differences,
    random_baseline,
    source_vector,
    string_baseline,
    train_mean,
    transfer,
    uncalibrated,
    uniform_weights,
)

H_SAFE = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
H_UNSAFE = np.array([[0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])


def test_pair_differences_and_source_vector() -> None:
    d = pair_differences(H_SAFE, H_UNSAFE)
    np.testing.assert_array_equal(d, [[1.0, 1.0], [2.0, 4.0], [-3.0, 0.0]])
    v = source_vector(H_SAFE, H_UNSAFE)
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, [0.0, 5.0 / 3.0], rtol=1e-7)
    np.testing.assert_array_equal(native_vector(H_SAFE, H_UNSAFE), v)
    with pytest.raises(ValueError, match="differ in shape"):
        pair_differences(H_SAFE, H_UNSAFE[:2])


def test_category_vectors_average_within_category() -> None:
    d = pair_differences(H_SAFE, H_UNSAFE)
    vecs = category_vectors(d, ["Hate", "Sexual", "Hate"])
    assert list(vecs) == ["Hate", "Sexual"]
    np.testing.assert_allclose(vecs["Hate"], [-1.0, 0.5])
    np.testing.assert_allclose(vecs["Sexual"], [2.0, 4.0])
    assert all(v.dtype == np.float32 for v in vecs.values())
    with pytest.raises(ValueError, match="2 categories for 3"):
        category_vectors(d, ["Hate", "Sexual"])


def test_centring_uses_the_train_mean_only() -> None:
    X_train = np.array([[1.0, 2.0], [3.0, 6.0]])
    X_val = np.array([[10.0, 10.0]])
    mu = train_mean(X_train)
    np.testing.assert_array_equal(mu, [2.0, 4.0])
    np.testing.assert_array_equal(centre(X_train, mu), [[-1.0, -2.0], [1.0, 2.0]])
    np.testing.assert_array_equal(centre(X_val, mu), [[8.0, 6.0]])  # not re-centred on its own mean
    with pytest.raises(ValueError, match="mu has dim 3"):
        centre(X_val, np.zeros(3))


def test_anchor_scale_is_ratio_of_median_row_norms() -> None:
    A = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # norms 3 3 1 1: median 2
    B = np.array([[0.0, 2.0, 0.0], [0.0, -2.0, 0.0], [4.0, 0.0, 0.0], [-4.0, 0.0, 0.0]])  # 2 2 4 4: median 3
    assert anchor_scale(A, B) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="not centred"):
        anchor_scale(A + 1.0, B)
    with pytest.raises(ValueError, match="4 rows but B_train has 3"):
        anchor_scale(A, B[:3])


def test_calibrate_sets_direction_from_map_and_norm_from_anchors() -> None:
    v_t = calibrate(np.array([3.0, 4.0]), np.array([0.0, 2.0, 0.0]), 1.5)
    assert v_t.dtype == np.float32
    np.testing.assert_allclose(v_t, 1.5 * 2.0 * np.array([0.6, 0.8]), rtol=1e-7)
    with pytest.raises(ValueError, match="zero vector"):
        calibrate(np.zeros(2), np.ones(3), 1.0)
    with pytest.raises(ValueError, match="s must be"):
        calibrate(np.ones(2), np.ones(3), 0.0)


def _anchors(seed: int, d_s: int, d_t: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((40, d_s))
    B = A @ rng.standard_normal((d_s, d_t)) + 0.1 * rng.standard_normal((40, d_t))
    return A - A.mean(axis=0), B - B.mean(axis=0)


def test_uncalibrated_and_transfer() -> None:
    A, B = _anchors(0, 4, 3)
    v_s = np.array([1.0, -1.0, 0.5, 0.0])
    svd = ProcrustesMapper().fit(A, B, A, B)
    np.testing.assert_allclose(uncalibrated(svd, v_s), svd.rho * (v_s @ svd.W), rtol=1e-6)
    ridge = RidgeMapper().fit(A, B, A, B)
    np.testing.assert_allclose(uncalibrated(ridge, v_s), v_s @ ridge.W, rtol=1e-6)
    s = anchor_scale(A, B)
    v_t = transfer(ridge, v_s, s)
    assert np.linalg.norm(v_t) == pytest.approx(s * np.linalg.norm(v_s), rel=1e-6)
    cos = v_t @ (v_s @ ridge.W) / (np.linalg.norm(v_t) * np.linalg.norm(v_s @ ridge.W))
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_random_baseline_is_seeded_with_the_given_norm() -> None:
    r = random_baseline(64, 2.5)
    assert r.dtype == np.float32 and r.shape == (64,)
    assert np.linalg.norm(r) == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_array_equal(r, random_baseline(64, 2.5, seed=42))
    assert not np.allclose(r, random_baseline(64, 2.5, seed=7))
    g = np.random.default_rng(42).standard_normal(64)
    np.testing.assert_allclose(r, 2.5 * g / np.linalg.norm(g), rtol=1e-6)


def test_string_baseline_is_negative_centred_concept_with_given_norm() -> None:
    mu_t = np.array([1.0, 1.0, 1.0])
    h = mu_t + np.array([1.0, 2.0, 2.0])  # e = (1, 2, 2), ‖e‖ = 3
    out = string_baseline(h, mu_t, 6.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-2.0, -4.0, -4.0], rtol=1e-7)
    with pytest.raises(ValueError, match="zero vector"):
        string_baseline(mu_t, mu_t, 1.0)
    assert CONCEPT_STRING == "hate, sexual, violence, harassment, illegal activity, shocking"


VECS = {"Hate": np.array([1.0, 0.0]), "Sexual": np.array([0.0, 2.0]), "Violence": np.array([3.0, 3.0])}


def test_combine_uniform_user_and_oracle_weights() -> None:
    np.testing.assert_allclose(combine(VECS, uniform_weights(list(VECS))), [4.0 / 3.0, 5.0 / 3.0])
    np.testing.assert_allclose(combine(VECS, {"Hate": 3.0, "Sexual": 1.0}), [0.75, 0.5])
    np.testing.assert_allclose(combine(VECS, oracle_weights("hate, sexual")), [0.5, 1.0])
    np.testing.assert_allclose(combine(VECS, oracle_weights("violence, self-harm")), [3.0, 3.0])
    assert combine(VECS, {"Hate": 1.0}).dtype == np.float32
    with pytest.raises(ValueError, match="no active category"):
        combine(VECS, {})
    with pytest.raises(ValueError, match=r"no vector for categories \['Disturbing'\]"):
        combine(VECS, {"Disturbing": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        combine(VECS, {"Hate": -1.0, "Sexual": 2.0})


def test_oracle_map_and_weights() -> None:
    assert I2P_TO_SAFESTEER == {
        "hate": ["Hate"],
        "sexual": ["Sexual"],
        "violence": ["Violence"],
        "self-harm": ["Violence"],
        "harassment": ["Humiliation"],
        "illegal activity": ["Illegal activity"],
        "shocking": ["Disturbing"],
    }
    assert {c for cs in I2P_TO_SAFESTEER.values() for c in cs} == set(SAFESTEER_CATEGORIES)
    assert oracle_weights("violence, self-harm") == {"Violence": 1.0}
    assert oracle_weights("sexual, harassment") == {"Humiliation": 0.5, "Sexual": 0.5}
    assert oracle_weights("Illegal Activity") == {"Illegal activity": 1.0}
    assert oracle_weights("") == {}
    with pytest.raises(ValueError, match="unknown I2P categories"):
        oracle_weights("sexual, gore")
