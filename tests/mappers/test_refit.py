"""Known answers for the frozen-encoder decoder refit (SafeDIG §6): planted rotation, λ grid, streaming, FVU."""

import inspect

import numpy as np
import pytest

from safeport.mappers.refit import (
    DEFAULT_KS,
    GramAccumulator,
    RefitStats,
    heldout_fvu,
    heldout_mask,
    lambda_scale,
    pick_lambda,
    refit_decoder,
    solve_decoder,
)

M, D, K = 12, 8, 4


def _sparse_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Top-k-like codes: K active latents per row, positive values."""
    z = np.zeros((n, M))
    for i in range(n):
        z[i, rng.choice(M, K, replace=False)] = rng.uniform(0.5, 2.0, K)
    return z


def _source(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    W = rng.standard_normal((M, D))
    return W / np.linalg.norm(W, axis=1, keepdims=True), rng.standard_normal(D) * 0.1


def _planted(seed: int = 0, n: int = 3000, noise: float = 0.0) -> tuple[np.ndarray, ...]:
    """Target rows made by a planted rotation of the source decoder: X̃ = Z W_dec R + b (+ noise)."""
    rng = np.random.default_rng(seed)
    W_dec, b_dec = _source(rng)
    R, _ = np.linalg.qr(rng.standard_normal((D, D)))
    b = rng.standard_normal(D)
    Z = _sparse_codes(rng, n)
    X = Z @ W_dec @ R + b + noise * rng.standard_normal((n, D))
    return Z, X, np.arange(n), W_dec, b_dec, W_dec @ R, b


def _stats(Z: np.ndarray, X: np.ndarray, keys: np.ndarray, batch: int) -> RefitStats:
    stats = RefitStats(M, D)
    for i in range(0, len(Z), batch):
        stats.add(Z[i : i + batch], X[i : i + batch], keys[i : i + batch])
    return stats


def test_planted_rotation_is_recovered_and_the_smallest_lambda_wins() -> None:
    Z, X, keys, W_dec, b_dec, W_true, b_true = _planted()
    stats = _stats(Z, X, keys, batch=500)
    fit = refit_decoder(stats, W_dec, b_dec)
    assert fit.k == min(DEFAULT_KS) == -4 and fit.ks == DEFAULT_KS
    assert list(np.argsort(fit.fvus)) == list(range(len(DEFAULT_KS)))  # FVU grows with λ on noise-free rows
    assert np.abs(fit.W - W_true).max() <= 1e-3
    # b′ = x̄ − z̄W′ carries W′'s error times Σ z̄ (≈ 5 here).
    assert np.abs(fit.b - b_true).max() <= 1e-3 * Z.mean(axis=0).sum()
    assert fit.fvus[0] < 1e-6 < fit.fvu_source
    # λ → 0 (a direct solve at a tiny λ) recovers the rotation to 1e-6.
    W_tiny, b_tiny = solve_decoder(stats.train, W_dec, b_dec, 1e-10 * lambda_scale(stats.train))
    assert np.abs(W_tiny - W_true).max() <= 1e-6
    assert np.abs(b_tiny - b_true).max() <= 1e-6


def test_infinite_lambda_returns_the_source_decoder() -> None:
    Z, X, keys, W_dec, b_dec, *_ = _planted(seed=1, n=800)
    stats = _stats(Z, X, keys, batch=800)
    W_inf, b_inf = solve_decoder(stats.train, W_dec, b_dec, np.inf)
    np.testing.assert_array_equal(W_inf, W_dec)
    np.testing.assert_array_equal(b_inf, b_dec)
    # Continuity: a huge finite λ on the grid's formula approaches W_dec.
    W_big, _ = solve_decoder(stats.train, W_dec, b_dec, 1e12 * lambda_scale(stats.train))
    assert np.abs(W_big - W_dec).max() < 1e-8
    fit = refit_decoder(stats, W_dec, b_dec)
    assert fit.fvu_source == pytest.approx(heldout_fvu(stats.heldout, W_dec, b_dec), rel=1e-12)


def test_grid_from_one_eigendecomposition_equals_direct_solves() -> None:
    Z, X, keys, W_dec, b_dec, *_ = _planted(seed=2, n=1500, noise=0.5)
    stats = _stats(Z, X, keys, batch=300)
    fit = refit_decoder(stats, W_dec, b_dec)
    direct = [heldout_fvu(stats.heldout, *solve_decoder(stats.train, W_dec, b_dec, lam)) for lam in fit.lambdas]
    np.testing.assert_allclose(fit.fvus, direct, rtol=1e-9)
    W_chosen, b_chosen = solve_decoder(stats.train, W_dec, b_dec, fit.lam)
    np.testing.assert_allclose(fit.W, W_chosen, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.b, b_chosen, rtol=1e-8, atol=1e-10)
    assert fit.lam == pytest.approx(10.0**fit.k * fit.lambda_scale)
    assert fit.fvus[DEFAULT_KS.index(fit.k)] == min(fit.fvus)
    assert fit.params()["fvu_heldout"] == min(fit.fvus) and "fvu_k-4" in fit.params()


def test_exact_fvu_ties_go_to_the_larger_lambda() -> None:
    lams = np.array([1e-3, 1e-2, 1e-1, 1.0])
    assert pick_lambda(lams, np.array([0.3, 0.1, 0.1, 0.2])) == 2
    assert pick_lambda(lams[::-1], np.array([0.2, 0.1, 0.1, 0.3])) == 1  # the grid's order does not matter
    assert pick_lambda(lams, np.array([0.0, 0.0, 0.0, 0.0])) == 3
    assert pick_lambda(lams, np.array([0.05, 0.1, 0.1, 0.2])) == 0
    with pytest.raises(ValueError, match="one finite FVU per"):
        pick_lambda(lams, np.array([0.1, np.nan, 0.1, 0.1]))


def test_heldout_fvu_from_sums_equals_a_direct_computation() -> None:
    Z, X, keys, W_dec, b_dec, *_ = _planted(seed=4, n=1200, noise=0.3)
    stats = _stats(Z, X, keys, batch=250)
    mask = heldout_mask(keys)
    assert stats.heldout.n == int(mask.sum()) and stats.train.n == int((~mask).sum())
    rng = np.random.default_rng(5)
    for W, b in [(W_dec, b_dec), (rng.standard_normal((M, D)), rng.standard_normal(D))]:
        resid = X[mask] - Z[mask] @ W - b
        centred = X[mask] - X[mask].mean(axis=0)
        expected = np.sum(resid**2) / np.sum(centred**2)
        assert heldout_fvu(stats.heldout, W, b) == pytest.approx(expected, rel=1e-10)


def test_row_order_and_batching_change_nothing_and_no_labels_are_taken() -> None:
    Z, X, keys, W_dec, b_dec, *_ = _planted(seed=6, n=1000, noise=0.2)
    one = refit_decoder(_stats(Z, X, keys, batch=1000), W_dec, b_dec)
    perm = np.random.default_rng(7).permutation(len(Z))
    many = refit_decoder(_stats(Z[perm], X[perm], keys[perm], batch=37), W_dec, b_dec)
    assert (one.n_train, one.n_heldout) == (many.n_train, many.n_heldout)
    assert one.k == many.k
    np.testing.assert_allclose(many.W, one.W, rtol=0, atol=1e-10)
    np.testing.assert_allclose(many.b, one.b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(many.fvus, one.fvus, rtol=0, atol=1e-10)
    # The whole input of a refit: codes, scaled rows and a row key. No side, category or label anywhere.
    assert list(inspect.signature(RefitStats.add).parameters) == ["self", "Z", "X_scaled", "row_keys"]
    assert list(inspect.signature(refit_decoder).parameters) == ["stats", "W_dec", "b_dec", "ks"]


def test_dense_and_sparse_accumulation_agree_and_merge_adds() -> None:
    rng = np.random.default_rng(8)
    Z = rng.uniform(0.1, 1.0, (200, M))  # dense: the dense product path
    Zs = _sparse_codes(rng, 200)  # sparse: the scipy path
    X = rng.standard_normal((200, D))
    for z in (Z, Zs):
        acc = GramAccumulator(M, D)
        acc.add(z[:120], X[:120])
        rest = GramAccumulator(M, D)
        rest.add(z[120:], X[120:])
        acc.merge(rest)
        np.testing.assert_allclose(acc.ZtZ, z.T @ z, rtol=1e-12)
        np.testing.assert_allclose(acc.ZtX, z.T @ X, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(acc.z_sum, z.sum(axis=0), rtol=1e-12)
        assert acc.x_sq == pytest.approx(float(np.sum(X * X)), rel=1e-12) and acc.n == 200


def test_heldout_split_is_a_seeded_function_of_the_key() -> None:
    keys = np.arange(20_000)
    mask = heldout_mask(keys)
    assert 0.09 < mask.mean() < 0.11
    perm = np.random.default_rng(9).permutation(keys.size)
    np.testing.assert_array_equal(heldout_mask(keys[perm]), mask[perm])
    assert not np.array_equal(heldout_mask(keys, seed=43), mask)
    str_keys = [f"pair-{i}" for i in range(5000)]
    smask = heldout_mask(str_keys)
    assert 0.08 < smask.mean() < 0.12
    np.testing.assert_array_equal(heldout_mask(str_keys[::-1]), smask[::-1])


def test_errors() -> None:
    Z, X, keys, W_dec, b_dec, *_ = _planted(seed=10, n=200)
    stats = _stats(Z, X, keys, batch=200)
    with pytest.raises(ValueError, match="lam must be > 0"):
        solve_decoder(stats.train, W_dec, b_dec, 0.0)
    with pytest.raises(ValueError, match=r"decoder \(8, 12\) and bias \(8,\)"):
        refit_decoder(stats, W_dec.T, b_dec)
    with pytest.raises(ValueError, match="ks is empty"):
        refit_decoder(stats, W_dec, b_dec, ks=())
    with pytest.raises(ValueError, match="one row per key"):
        stats.add(Z[:3], X[:3], keys[:2])
    with pytest.raises(ValueError, match="integers or strings"):
        heldout_mask(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="fraction must be in"):
        RefitStats(M, D, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="no rows were added"):
        refit_decoder(RefitStats(M, D), W_dec, b_dec)
    with pytest.raises(ValueError, match="NaN/inf"):
        GramAccumulator(M, D).add(Z[:2], np.full((2, D), np.nan))
