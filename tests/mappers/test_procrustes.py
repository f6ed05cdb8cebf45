"""Known-answer tests for the rectangular Procrustes map and the mapper registry."""

import numpy as np
import pytest

import safeport.mappers as mappers
from safeport.mappers.procrustes import ProcrustesMap, ProcrustesMapper, procrustes


def _centred(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, size=d)
    return X - X.mean(axis=0)


def _orthonormal_columns(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _fit(A: np.ndarray, B: np.ndarray) -> ProcrustesMap:
    return ProcrustesMapper().fit(A, B, A[:5], B[:5])


def test_recovers_planted_square_rotation() -> None:
    rng = np.random.default_rng(0)
    A = _centred(rng, 200, 12)
    Q = _orthonormal_columns(rng, 12, 12)
    fitted = _fit(A, A @ Q)
    assert np.max(np.abs(fitted.W - Q)) < 1e-6
    assert fitted.rho == pytest.approx(1.0, abs=1e-12)  # tr(Σ) = tr(AᵀA) = ‖A‖_F² for B = AQ


def test_recovers_planted_embedding_when_target_is_wider() -> None:
    rng = np.random.default_rng(1)
    A = _centred(rng, 150, 6)
    Q = _orthonormal_columns(rng, 10, 6).T  # 6×10, orthonormal rows: an isometric embedding
    fitted = _fit(A, A @ Q)
    assert fitted.W.shape == (6, 10)
    assert np.max(np.abs(fitted.W - Q)) < 1e-6
    assert np.max(np.abs(fitted.rows(A) - A @ Q)) < 1e-6


def test_recovers_planted_projection_when_target_is_narrower() -> None:
    # With d_s > d_t the Procrustes optimum is the planted Q when AᵀA keeps span(Q) invariant: whitened A.
    rng = np.random.default_rng(2)
    A = np.linalg.qr(_centred(rng, 120, 10))[0] * np.sqrt(120)
    Q = _orthonormal_columns(rng, 10, 4)  # 10×4, orthonormal columns
    fitted = _fit(A, A @ Q)
    assert fitted.W.shape == (10, 4)
    assert np.max(np.abs(fitted.W - Q)) < 1e-6


@pytest.mark.parametrize(("d_s", "d_t"), [(5, 9), (9, 5), (7, 7)])
def test_w_is_semi_orthogonal_polar_factor_of_cross_covariance(d_s: int, d_t: int) -> None:
    rng = np.random.default_rng(3)
    A, B = _centred(rng, 80, d_s), _centred(rng, 80, d_t)
    W, rho = procrustes(A, B)
    gram = W @ W.T if d_s <= d_t else W.T @ W
    np.testing.assert_allclose(gram, np.eye(min(d_s, d_t)), atol=1e-12)
    C = A.T @ B
    U, S, Vt = np.linalg.svd(C, full_matrices=False)
    np.testing.assert_allclose(W, U @ Vt, atol=1e-12)
    assert rho == pytest.approx(S.sum() / np.sum(A**2), rel=1e-12)
    # W maximises tr(WᵀC) among semi-orthogonal maps: any small rotation of it scores lower.
    R = _orthonormal_columns(rng, d_t, d_t)
    for t in (0.05, 0.3):
        rot = np.linalg.qr(np.eye(d_t) + t * (R - R.T))[0]
        assert np.trace((W @ rot).T @ C) <= np.trace(W.T @ C) + 1e-9


def test_direction_and_uncalibrated_direction() -> None:
    rng = np.random.default_rng(4)
    A, B = _centred(rng, 60, 4), _centred(rng, 60, 3)
    fitted = _fit(A, B)
    v = rng.standard_normal(4)
    np.testing.assert_allclose(fitted.direction(v), v @ fitted.W)
    np.testing.assert_allclose(fitted.uncalibrated_direction(v), fitted.rho * (v @ fitted.W))
    assert fitted.params["rho"] == fitted.rho


def test_state_round_trip_is_exact() -> None:
    rng = np.random.default_rng(5)
    A, B = _centred(rng, 50, 6), _centred(rng, 50, 4)
    fitted = _fit(A, B)
    again = mappers.from_state("procrustes", fitted.state(), fitted.params)
    assert isinstance(again, ProcrustesMap)
    assert np.array_equal(again.W, fitted.W)
    assert again.rho == fitted.rho
    assert again.params == fitted.params
    assert np.array_equal(again.rows(A), fitted.rows(A))


def test_input_errors_name_the_problem() -> None:
    rng = np.random.default_rng(6)
    A, B = _centred(rng, 20, 3), _centred(rng, 20, 2)
    with pytest.raises(ValueError, match="A_train has 20 rows but B_train has 19"):
        ProcrustesMapper().fit(A, B[:19], A, B)
    with pytest.raises(ValueError, match="not centred"):
        ProcrustesMapper().fit(A + 5.0, B, A, B)
    with pytest.raises(ValueError, match="validation dims"):
        ProcrustesMapper().fit(A, B, A[:, :2], B)
    fitted = _fit(A, B)
    with pytest.raises(ValueError, match="expected 3"):
        fitted.direction(np.ones(4))
    with pytest.raises(ValueError, match="1-D"):
        fitted.direction(np.ones((1, 3)))
    with pytest.raises(ValueError, match="lacks"):
        mappers.from_state("procrustes", {"W": fitted.W}, fitted.params)


def test_registry() -> None:
    assert set(mappers.MAPPERS) == {"procrustes", "ridge", "mlp"}
    assert mappers.make_mapper("procrustes").name == "procrustes"
    assert mappers.make_mapper("ridge", ks=(0, 1)).name == "ridge"
    assert mappers.make_mapper("mlp", hidden=8).name == "mlp"
    with pytest.raises(ValueError, match="unknown mapper 'svd'; choose one of mlp, procrustes, ridge"):
        mappers.make_mapper("svd")
    with pytest.raises(ValueError, match=r"no option\(s\) \['lr'\]"):
        mappers.make_mapper("ridge", lr=1e-3)
    with pytest.raises(ValueError, match="unknown mapper"):
        mappers.from_state("svd", {}, {})
