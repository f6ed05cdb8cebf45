"""Known answers for SafeDIG harmful-latent selection (§5) and the SAE encode formula."""

import numpy as np
import pytest

from safeport.mappers.latents import LatentAccumulator, SaeParams, select_harmful

M = 12
PLANTED = (2, 5, 7, 9)


def _codes(rng: np.random.Generator, n: int, unsafe: bool) -> np.ndarray:
    """Background latents fire alike on both sides; PLANTED fire far more (and higher) on unsafe tokens.

    Latent 0 is the trap: it is *much* larger on unsafe tokens (high s_j) but fires on as many
    safe tokens as unsafe ones, so the 2× fire-rate rule must drop it.
    """
    z = (rng.random((n, M)) < 0.3) * rng.uniform(0.5, 1.5, (n, M))
    z[:, list(PLANTED)] *= rng.random((n, len(PLANTED))) < (0.05 if not unsafe else 1.0)
    if unsafe:
        z[:, list(PLANTED)] += (rng.random((n, len(PLANTED))) < 0.6) * 2.0
        z[:, 0] *= 20.0
    return z


def test_planted_latents_are_exactly_h_and_the_fire_rule_drops_the_trap() -> None:
    rng = np.random.default_rng(0)
    acc = LatentAccumulator(M, sources=["Hate", "Violence"])
    for cat in ("Violence", "Hate"):
        for _ in range(3):  # several batches per side: streaming
            acc.add(_codes(rng, 200, unsafe=True), side="unsafe", category=cat)
            acc.add(_codes(rng, 200, unsafe=False), side="safe", category=cat)
    res = acc.finish(top_m=6)
    pooled = res.pooled
    # The trap has a high score (more than some planted latents) but similar fire rates.
    assert pooled.score[0] > min(pooled.score[list(PLANTED)])
    assert pooled.fire_unsafe[0] < 2 * pooled.fire_safe[0]
    assert set(pooled.harmful) == set(PLANTED)
    assert list(pooled.harmful) == sorted(PLANTED, key=lambda j: -pooled.score[j])
    for cat in ("Hate", "Violence"):
        assert set(res.category(cat).harmful) == set(PLANTED)
    # Without the fire-rate rule the trap gets in: the rule, not the score, excludes it.
    assert 0 in select_harmful(pooled.score, pooled.fire_unsafe, pooled.fire_safe, top_m=6, fire_ratio=0.0)
    # top_m caps H at the best-scoring planted latents.
    assert res.pooled.harmful[:2] == acc.finish(top_m=2).harmful
    assert res.harmful == pooled.harmful and res.top_m == 6


def test_hand_computed_scores_and_rates() -> None:
    acc = LatentAccumulator(3, sources=["A"])
    acc.add(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), side="unsafe", category="A")
    acc.add(np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]), side="safe", category="A")
    sc = acc.finish(top_m=4).pooled
    np.testing.assert_allclose(sc.mu_unsafe, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(sc.mu_safe, [0.0, 1.0, 0.5])
    np.testing.assert_allclose(sc.p_unsafe, [0.5, 0.0, 0.5])
    np.testing.assert_allclose(sc.p_safe, [0.0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(sc.score, [0.5, -2 / 3, 1 / 6])
    np.testing.assert_allclose(sc.fire_unsafe, [0.5, 0.0, 0.5])
    np.testing.assert_allclose(sc.fire_safe, [0.0, 1.0, 0.5])
    # Latent 2 has s > 0 but fires on as many safe tokens as unsafe ones: excluded.
    assert sc.harmful == (0,)
    assert (sc.n_unsafe, sc.n_safe) == (2, 2)
    np.testing.assert_array_equal(sc.in_harmful, [True, False, False])


def test_batching_and_merge_do_not_change_the_result() -> None:
    rng = np.random.default_rng(1)
    un, sa = _codes(rng, 300, True), _codes(rng, 300, False)
    one = LatentAccumulator(M, ["A"])
    one.add(un, side="unsafe", category="A")
    one.add(sa, side="safe", category="A")
    a, b = LatentAccumulator(M, ["A"]), LatentAccumulator(M, ["A"])
    for i in range(0, 300, 70):
        (a if i % 140 else b).add(un[i : i + 70], side="unsafe", category="A")
        (b if i % 140 else a).add(sa[i : i + 70], side="safe", category="A")
    a.merge(b)
    r1, r2 = one.finish(top_m=4).pooled, a.finish(top_m=4).pooled
    np.testing.assert_allclose(r2.score, r1.score, rtol=0, atol=1e-12)
    assert r1.harmful == r2.harmful


def test_table_has_one_row_per_scope_and_latent() -> None:
    rng = np.random.default_rng(2)
    acc = LatentAccumulator(M, ["A", "B"])
    for cat in ("A", "B"):
        acc.add(_codes(rng, 100, True), side="unsafe", category=cat)
        acc.add(_codes(rng, 100, False), side="safe", category=cat)
    res = acc.finish(top_m=4)
    table = res.table("double.9.img")
    assert all(len(col) == 3 * M for col in table.values())
    assert set(table["position"]) == {"double.9.img"}
    assert list(table["category"][:M]) == [None] * M and list(table["category"][M:]) == ["A"] * M + ["B"] * M
    in_h = table["latent"][:M][table["in_h"][:M]]
    assert set(in_h.tolist()) == set(res.pooled.harmful)
    assert table["h_rank"][res.pooled.harmful[0]] == 0


def test_target_rows_and_bad_input_are_refused() -> None:
    acc = LatentAccumulator(3, sources=["A", "B"])
    with pytest.raises(ValueError, match="'T' is not a source category"):
        acc.add(np.zeros((1, 3)), side="unsafe", category="T")
    with pytest.raises(ValueError, match="side must be one of"):
        acc.add(np.zeros((1, 3)), side="harmful", category="A")
    with pytest.raises(ValueError, match="negative codes"):
        acc.add(-np.ones((1, 3)), side="safe", category="A")
    with pytest.raises(ValueError, match=r"SAE codes \[rows, 3\]"):
        acc.add(np.zeros((1, 4)), side="safe", category="A")
    acc.add(np.ones((1, 3)), side="unsafe", category="A")
    with pytest.raises(ValueError, match="1 unsafe and 0 safe tokens"):
        acc.finish()
    with pytest.raises(ValueError, match="top_m must be >= 1"):
        select_harmful(np.ones(3), np.ones(3), np.ones(3), top_m=0)


def test_sae_encode_follows_the_formula() -> None:
    rng = np.random.default_rng(3)
    d, m, k = 5, 9, 3
    sae = SaeParams(
        W_enc=rng.standard_normal((d, m)),
        b_enc=rng.standard_normal(m),
        W_dec=rng.standard_normal((m, d)),
        b_dec=rng.standard_normal(d),
        c=2.5,
        k=k,
    )
    x = rng.standard_normal((20, d)) * 3
    pre = np.maximum((x / 2.5 - sae.b_dec) @ sae.W_enc + sae.b_enc, 0)
    z = sae.encode(x)
    for row, p in zip(z, pre, strict=True):
        top = np.argsort(-p)[:k]
        expected = np.zeros(m)
        expected[top] = p[top]
        np.testing.assert_allclose(row, expected, rtol=1e-12)
    assert (np.count_nonzero(z, axis=1) <= k).all()
    with pytest.raises(ValueError, match="top-k k = 10"):
        SaeParams(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 1.0, 10)
    with pytest.raises(ValueError, match="do not fit"):
        SaeParams(sae.W_enc, sae.b_enc, sae.W_dec.T, sae.b_dec, 1.0, 3)
    with pytest.raises(ValueError, match="scale c"):
        SaeParams(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 0.0, 3)
