"""Known answers for the SafeDIG token edit and its calibration (§7): Blend, Repel, thresholds, dtypes, bits."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from safeport.eval.safedig import (
    MODES,
    Calibration,
    Mode,
    SafeLevelAccumulator,
    SteeringParams,
    edit_tokens,
    harm,
    harm_torch,
)
from safeport.mappers.latents import SaeParams

D, M, K = 8, 16, 6
HARMFUL = (0, 3, 5)


def _sae(seed: int = 0) -> SaeParams:
    rng = np.random.default_rng(seed)
    return SaeParams(
        W_enc=rng.standard_normal((D, M)).astype(np.float32),
        b_enc=(rng.standard_normal(M) * 0.1).astype(np.float32),
        W_dec=rng.standard_normal((M, D)).astype(np.float32),
        b_dec=(rng.standard_normal(D) * 0.1).astype(np.float32),
        c=1.7,
        k=K,
    )


def _setup(seed: int = 0, n: int = 400) -> tuple[SaeParams, np.ndarray, SteeringParams, torch.Tensor]:
    """An SAE, a refitted decoder, and thresholds at the 40th / 80th percentile of the test tokens' h.

    ū comes from a real calibration on other ("safe") tokens; the thresholds are then moved so
    that every region (untouched, Blend, Repel) holds many of the test tokens.
    """
    rng = np.random.default_rng(seed + 100)
    sae = _sae(seed)
    W_refit = sae.W_dec.astype(np.float64) + 0.1 * rng.standard_normal((M, D))
    acc = SafeLevelAccumulator(HARMFUL, W_refit, sae.c)
    acc.add(sae.encode(rng.standard_normal((300, D)).astype(np.float32)))
    x = (rng.standard_normal((n, D)) * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32)
    x[::7, 2] = -0.0  # x + 0·δ would turn these into +0.0: only a true select keeps the bits
    h, _ = harm(sae.encode(x), HARMFUL, W_refit, sae.c)
    cal = replace(acc.finish(), tau_lo=float(np.percentile(h, 40)), tau_hi=float(np.percentile(h, 80)))
    return sae, W_refit, SteeringParams.build(sae, HARMFUL, W_refit, cal), torch.from_numpy(x)


def _regions(x: torch.Tensor, p: SteeringParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, _ = harm_torch(x.float(), p)
    return h <= p.tau_lo, (h > p.tau_lo) & (h <= p.tau_hi), h > p.tau_hi


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def test_torch_harm_matches_the_numpy_encoder_and_the_formula() -> None:
    sae, W_refit, p, x = _setup()
    h_t, u_t = harm_torch(x, p)
    h, u = harm(sae.encode(x.numpy()), HARMFUL, W_refit, sae.c)
    np.testing.assert_allclose(h_t.numpy(), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u_t.numpy(), u, rtol=1e-4, atol=1e-4)
    low, blend, repel = _regions(x, p)
    assert low.sum() > 50 and blend.sum() > 50 and repel.sum() > 50


def test_calibration_percentiles_and_safe_level_streaming() -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal((M, D))
    Z = (rng.random((1000, M)) < 0.3) * rng.uniform(0, 2, (1000, M))
    acc = SafeLevelAccumulator(HARMFUL, W, c=2.0)
    for i in range(0, 1000, 130):
        acc.add(Z[i : i + 130])
    cal = acc.finish()
    h = Z[:, list(HARMFUL)].sum(axis=1)
    lo, hi = np.percentile(h, [95.0, 99.5])
    assert (cal.tau_lo, cal.tau_hi, cal.n_tokens) == (pytest.approx(lo), pytest.approx(hi), 1000)
    np.testing.assert_allclose(cal.u_bar, (2.0 * Z[:, list(HARMFUL)] @ W[list(HARMFUL)]).mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="no safe-side tokens"):
        SafeLevelAccumulator(HARMFUL, W, c=2.0).finish()
    with pytest.raises(ValueError, match="distinct latent indices"):
        SafeLevelAccumulator((0, 0), W, c=2.0)


@pytest.mark.parametrize("strength", [0.3, 1.0, 5.0])
def test_blend_never_moves_a_token_past_the_safe_level(strength: float) -> None:
    _, _, p, x = _setup()
    out = edit_tokens(x, p, strength, mode="blend")
    h, u = harm_torch(x, p)
    low, blend, repel = _regions(x, p)
    assert torch.equal(_bits(out[low]), _bits(x[low]))  # below τ_lo: untouched
    moved = blend | repel  # blend only: Repel's tokens are blended too, with g = 1
    delta = (out - x).double()[moved]
    v = (u - p.u_bar).double()[moved]  # from the token's harmful component to the safe level
    t = -(delta * v).sum(-1) / (v * v).sum(-1)  # how far along that segment the token moved
    g = ((h[moved] - p.tau_lo) / (p.tau_hi - p.tau_lo)).double().clamp(max=1.0)
    torch.testing.assert_close(t, min(strength, 1.0) * g, rtol=1e-4, atol=1e-5)
    assert t.min() >= 0 and t.max() <= 1 + 1e-5, "a blended token moved past ū"
    residual = delta + t[:, None] * v  # the change has no component off the segment
    assert residual.norm(dim=-1).max() < 1e-4 * (1 + v.norm(dim=-1).max())


@pytest.mark.parametrize("strength", [1.0, 2.5])
def test_repel_removes_gamma_times_u(strength: float) -> None:
    sae, W_refit, p, x = _setup(seed=2)
    out = edit_tokens(x, p, strength, mode="repel")
    low, blend, repel = _regions(x, p)
    _, u = harm(sae.encode(x.numpy()), HARMFUL, W_refit, sae.c)  # u computed independently, float64
    np.testing.assert_allclose((out - x)[repel].double().numpy(), -strength * u[repel.numpy()], rtol=1e-4, atol=1e-4)
    assert torch.equal(_bits(out[low | blend]), _bits(x[low | blend]))


def test_safedig_combines_blend_and_repel_and_leaves_low_tokens_bit_identical() -> None:
    _, _, p, x = _setup(seed=3)
    out = edit_tokens(x, p, 1.5)
    low, blend, repel = _regions(x, p)
    assert torch.equal(_bits(out[low]), _bits(x[low]))
    assert torch.equal(out[blend], edit_tokens(x, p, 1.5, mode="blend")[blend])
    assert torch.equal(out[repel], edit_tokens(x, p, 1.5, mode="repel")[repel])
    assert not torch.equal(out[blend], x[blend]) and not torch.equal(out[repel], x[repel])


@pytest.mark.parametrize("mode", MODES)
def test_zero_strength_is_the_identity(mode: Mode) -> None:
    _, _, p, x = _setup()
    assert edit_tokens(x, p, 0.0, mode=mode) is x
    assert torch.equal(_bits(edit_tokens(x.half(), p, 0, mode=mode)), _bits(x.half()))


def test_ablate_negates_h_on_every_token_ignoring_thresholds() -> None:
    sae, W_refit, p, x = _setup(seed=4)
    out = edit_tokens(x, p, 1.0, mode="ablate")
    Z = sae.encode(x.numpy()).astype(np.float64)
    h, u = harm(Z, HARMFUL, W_refit, sae.c)
    # "H scaled by −1": the reconstruction with z_H → −z_H minus the original one is −2u.
    Z_neg = Z.copy()
    Z_neg[:, list(HARMFUL)] *= -1
    recon_change = sae.c * (Z_neg - Z) @ W_refit
    np.testing.assert_allclose(recon_change, -2 * u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose((out - x).double().numpy(), recon_change, rtol=1e-4, atol=1e-4)
    low, _, _ = _regions(x, p)
    fired = torch.from_numpy(h > 0)
    assert (low & fired).any(), "ablate must act below τ_lo too"
    assert not torch.equal(out[low & fired], x[low & fired])
    assert torch.equal(_bits(out[~fired]), _bits(x[~fired]))
    half = edit_tokens(x, p, 0.5, mode="ablate")  # s = 0.5 zeroes the H latents: x − u
    np.testing.assert_allclose((half - x).double().numpy(), -u, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32_and_cast_back_only_where_changed(dtype: torch.dtype) -> None:
    _, _, p, x32 = _setup(seed=5)
    x = x32.to(dtype).reshape(4, -1, D)  # batched [..., d]
    out = edit_tokens(x, p, 1.2)
    assert out.dtype == dtype and out.shape == x.shape
    ref = edit_tokens(x.float().reshape(-1, D), p, 1.2)
    low, _, _ = _regions(x.reshape(-1, D), p)
    flat = out.reshape(-1, D)
    assert torch.equal(_bits(flat[low]), _bits(x.reshape(-1, D)[low]))
    torch.testing.assert_close(flat[~low], ref[~low].to(dtype), rtol=0, atol=0)
    assert not torch.equal(flat[~low], x.reshape(-1, D)[~low])


def test_empty_harmful_set_is_the_identity() -> None:
    sae, W_refit, _, x = _setup()
    p = SteeringParams.build(sae, (), W_refit, Calibration(0.0, 0.0, np.zeros(D), 1))
    for mode in MODES:
        assert torch.equal(_bits(edit_tokens(x, p, 3.0, mode=mode)), _bits(x))


def test_errors() -> None:
    _, _, p, x = _setup()
    with pytest.raises(ValueError, match="unknown mode 'erase'"):
        edit_tokens(x, p, 1.0, mode="erase")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strength must be"):
        edit_tokens(x, p, -1.0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        edit_tokens(x[:, :5], p, 1.0)
    with pytest.raises(ValueError, match=r"call params\.to"):
        edit_tokens(x.to("meta"), p, 1.0)
    with pytest.raises(ValueError, match="tau_lo"):
        SteeringParams.build(_sae(), HARMFUL, _sae().W_dec, Calibration(2.0, 1.0, np.zeros(D), 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    _, _, p, x = _setup(seed=6)
    pc = p.to("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xc = x.to(dtype).cuda()
        out = edit_tokens(xc, pc, 1.5)
        low, _, _ = _regions(xc, pc)
        assert torch.equal(_bits(out[low]), _bits(xc[low]))
        torch.testing.assert_close(out.cpu().float(), edit_tokens(x.to(dtype), p, 1.5).float(), rtol=1e-2, atol=1e-2)
