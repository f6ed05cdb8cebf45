"""Known-answer tests for the ridge map: sklearn agreement, the one-SVD grid, λ selection."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

import safeport.mappers as mappers
from safeport.mappers.ridge import (
    DEFAULT_KS,
    RidgeMap,
    RidgeMapper,
    lambda_grid,
    lambda_scale,
    mean_row_cosine,
    ridge_path,
    ridge_solve,
)


def _problem(seed: int, n: int, d_s: int, d_t: int, noise: float) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((d_s, d_t))
    A = rng.standard_normal((n + 40, d_s)) * rng.uniform(0.2, 3.0, size=d_s)
    B = A @ W0 + noise * rng.standard_normal((n + 40, d_t))
    mu_a, mu_b = A[:n].mean(axis=0), B[:n].mean(axis=0)
    return A[:n] - mu_a, B[:n] - mu_b, A[n:] - mu_a, B[n:] - mu_b


def test_grid_is_powers_of_ten_times_mean_eigenvalue() -> None:
    A = np.array([[1.0, 2.0], [-1.0, -2.0]])
    assert lambda_scale(A) == pytest.approx((1 + 4 + 1 + 4) / 2)
    np.testing.assert_allclose(lambda_grid(A), [10.0**k * 5.0 for k in range(-4, 5)])
    assert tuple(range(-4, 5)) == DEFAULT_KS


@pytest.mark.parametrize(("n", "d_s", "d_t"), [(60, 10, 7), (15, 20, 4)])
def test_matches_sklearn_ridge_at_every_grid_lambda(n: int, d_s: int, d_t: int) -> None:
    A, B, _, _ = _problem(0, n, d_s, d_t, noise=0.5)
    path = ridge_path(A, B)
    for lam in lambda_grid(A):
        reference = Ridge(alpha=lam, fit_intercept=False).fit(A, B).coef_.T
        np.testing.assert_allclose(path.weights(lam), reference, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(("n", "d_s", "d_t"), [(60, 10, 7), (15, 20, 4)])
def test_one_svd_path_equals_per_lambda_direct_solves(n: int, d_s: int, d_t: int) -> None:
    A, B, A_val, _ = _problem(1, n, d_s, d_t, noise=0.5)
    path = ridge_path(A, B)
    for lam in lambda_grid(A):
        direct = ridge_solve(A, B, lam)
        np.testing.assert_allclose(path.weights(lam), direct, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(path.predict(A_val, lam), A_val @ direct, rtol=1e-8, atol=1e-9)


def test_chosen_lambda_is_argmax_of_validation_cosine() -> None:
    # Few noisy training pairs: too little shrinkage overfits, too much shrinks away signal.
    A, B, A_val, B_val = _problem(2, 30, 20, 5, noise=6.0)
    fitted = RidgeMapper().fit(A, B, A_val, B_val)
    lams = lambda_grid(A)
    by_hand = [mean_row_cosine(A_val @ ridge_solve(A, B, lam), B_val) for lam in lams]
    best = int(np.argmax(by_hand))
    assert 0 < best < len(lams) - 1, "the planted problem should have an interior optimum"
    assert fitted.params["k"] == DEFAULT_KS[best]
    assert fitted.params["lambda"] == pytest.approx(lams[best], rel=1e-12)
    assert fitted.params["val_cosine"] == pytest.approx(max(by_hand), rel=1e-9)
    for k, cos in zip(DEFAULT_KS, by_hand, strict=True):
        assert fitted.params[f"val_cosine_k{k:+d}"] == pytest.approx(cos, rel=1e-9)
    np.testing.assert_allclose(fitted.W, ridge_solve(A, B, lams[best]), rtol=1e-8, atol=1e-10)


def test_custom_grid_and_direction_is_linear() -> None:
    A, B, A_val, B_val = _problem(3, 50, 6, 3, noise=0.1)
    fitted = RidgeMapper(ks=(-2, 0)).fit(A, B, A_val, B_val)
    assert fitted.params["k"] in (-2, 0)
    assert set(fitted.params) >= {"val_cosine_k-2", "val_cosine_k+0"}
    v = np.arange(6.0)
    np.testing.assert_allclose(fitted.direction(v), v @ fitted.W)
    np.testing.assert_allclose(fitted.rows(A_val), A_val @ fitted.W)


def test_state_round_trip_is_exact() -> None:
    A, B, A_val, B_val = _problem(4, 40, 5, 3, noise=0.3)
    fitted = RidgeMapper().fit(A, B, A_val, B_val)
    again = mappers.from_state("ridge", fitted.state(), fitted.params)
    assert isinstance(again, RidgeMap)
    assert again.name == "ridge"
    assert np.array_equal(again.W, fitted.W)
    assert again.params == fitted.params
    assert np.array_equal(again.rows(A_val), fitted.rows(A_val))


def test_errors() -> None:
    A, B, _, _ = _problem(5, 20, 3, 2, noise=0.1)
    with pytest.raises(ValueError, match="lam must be > 0"):
        ridge_solve(A, B, 0.0)
    with pytest.raises(ValueError, match="ks is empty"):
        lambda_grid(A, ())
    with pytest.raises(ValueError, match="all zeros"):
        lambda_scale(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="A_val has 20 rows but B_val has 19"):
        RidgeMapper().fit(A, B, A, B[:19])


@pytest.mark.parametrize("n, d_s", [(200, 12), (8, 12)])
def test_gram_and_svd_paths_match_direct_solves(n: int, d_s: int) -> None:
    """Tall A uses the Gram eigendecomposition, wide A the thin SVD; both equal the normal equations."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((n, d_s))
    B = rng.standard_normal((n, 5))
    path = ridge_path(A, B)
    for lam in lambda_grid(A):
        np.testing.assert_allclose(path.weights(float(lam)), ridge_solve(A, B, float(lam)), rtol=1e-8, atol=1e-10)
