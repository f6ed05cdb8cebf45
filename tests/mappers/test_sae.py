"""Known-answer tests for the top-k SAE (METHOD-SAFEDIG §4): recovery, FVU, the loss, resume, SAELens's format."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safeport.mappers.sae import (
    SAE_LENS_VERSION,
    FvuStats,
    SaeCheckpoint,
    SaeConfig,
    TrainedSae,
    _saelens,
    evaluate_sae,
    from_saelens,
    fvu,
    normalise_rows,
    remove_parallel_grad,
    repeat_batches,
    sae_forward,
    to_saelens,
    train_sae,
)
from safeport.store.sae_files import read_saelens_folder, write_saelens_folder


@pytest.fixture(scope="module", autouse=True)
def saelens_imported() -> None:
    """SAELens takes ~9 s to import (transformer_lens); pay it once, outside any one test's time."""
    _saelens()


def _batches(X: np.ndarray, size: int, start: int = 0) -> Iterator[np.ndarray]:
    """X cut into ``size``-row batches, repeated forever; the stream begins at batch ``start``."""
    per_epoch = -(-len(X) // size)
    index = start
    while True:
        i = (index % per_epoch) * size
        yield X[i : i + size]
        index += 1


def _planted(rng: np.random.Generator, n: int, atoms: np.ndarray, k: int, noise: float) -> np.ndarray:
    """Rows = k-sparse non-negative codes over unit ``atoms`` + Gaussian noise."""
    chosen = np.argsort(rng.random((n, atoms.shape[0])), axis=1)[:, :k]
    codes = np.zeros((n, atoms.shape[0]))
    np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, (n, k)), axis=1)
    return (codes @ atoms + noise * rng.standard_normal((n, atoms.shape[1]))).astype(np.float32)


def _tiny(X: np.ndarray, **overrides: object) -> TrainedSae:
    options: dict = {"d": X.shape[1], "m": 24, "k": 3, "batch_size": 100, "n_tokens": 2000, **overrides}
    return train_sae(_batches(X, 100), SaeConfig(**options))


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.standard_normal((2000, 8)) * rng.uniform(0.5, 2.0, 8) + 3.0).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_sae(rows: np.ndarray) -> TrainedSae:
    return _tiny(rows)


# ---------------------------------------------------------------------------------------------- recovery


def test_planted_sparse_dictionary_is_recovered(one_thread: None) -> None:
    rng = np.random.default_rng(0)
    d, n_atoms, k, noise = 32, 32, 4, 0.02
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    X = _planted(rng, 256 * 400, atoms, k, noise)
    held_out = _planted(rng, 4000, atoms, k, noise)
    sae = train_sae(_batches(X, 256), SaeConfig(d=d, m=64, k=k, batch_size=256, n_tokens=len(X)))

    cosines = sae.W_dec @ atoms.T  # unit rows × unit atoms
    matched = float((cosines.max(axis=0) > 0.9).mean())
    assert matched >= 0.9, f"only {matched:.0%} of the planted atoms have a latent with cosine > 0.9"
    quality = evaluate_sae(sae, [held_out[:1500], held_out[1500:]])
    noise_floor = noise**2 * held_out.size / float(((held_out - held_out.mean(0)) ** 2).sum())
    assert quality.fvu < noise_floor + 0.05, (quality.fvu, noise_floor)
    assert 0 < quality.l0 <= k
    assert quality.n_rows == 4000
    # curves: tokens seen go up to the end, FVU falls
    assert sae.curves.tokens[-1] == len(X)
    assert sae.curves.fvu[-1] < 0.5 * sae.curves.fvu[0]


# ---------------------------------------------------------------------------------------------- FVU


def test_fvu_is_about_the_mean_not_about_zero() -> None:
    rng = np.random.default_rng(1)
    X = (1000.0 + rng.standard_normal((500, 4))).astype(np.float32).astype(np.float64)  # a large mean offset
    mean_predictor = np.broadcast_to(X.mean(axis=0), X.shape)
    assert fvu(X, mean_predictor) == pytest.approx(1.0, abs=1e-9)  # about zero it would be ~1e-6
    noisy = X + 0.1 * rng.standard_normal(X.shape)
    by_hand = ((X - noisy) ** 2).sum() / ((X - X.mean(axis=0)) ** 2).sum()
    assert fvu(X, noisy) == pytest.approx(by_hand, rel=1e-9)
    assert fvu(torch.from_numpy(X), torch.from_numpy(noisy)) == pytest.approx(by_hand, rel=1e-9)


def test_streamed_fvu_equals_one_shot_even_when_batches_have_different_means() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((900, 5)) + 1e4
    X[300:600] += 50.0  # batches with different means: the merge must add the between-batch variance
    X_hat = X + rng.standard_normal(X.shape)
    parts = [FvuStats.of(X[i : i + 300], X_hat[i : i + 300]) for i in range(0, 900, 300)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.n == 900
    assert merged.fvu == pytest.approx(fvu(X, X_hat), rel=1e-10)
    assert merged.m2 == pytest.approx(float(((X - X.mean(0)) ** 2).sum()), rel=1e-10)


def test_fvu_refuses_what_it_cannot_measure() -> None:
    with pytest.raises(ValueError, match=r"x has shape \(3, 2\) but x_hat has \(3, 3\)"):
        fvu(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="zero variance about their mean"):
        fvu(np.ones((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-empty 2-D"):
        fvu(np.ones(3), np.ones(3))


def test_evaluate_counts_l0_and_latents_that_never_fire(tiny_sae: TrainedSae, rows: np.ndarray) -> None:
    X = rows[:600]
    z = tiny_sae.encode(X)
    quality = evaluate_sae(tiny_sae, [X[:250], X[250:]])
    assert quality.l0 == pytest.approx((z > 0).sum() / 600)
    assert quality.dead_fraction == pytest.approx(1 - (z > 0).any(axis=0).mean())
    assert quality.fvu == pytest.approx(fvu(X, tiny_sae.decode(z)), rel=1e-9)
    with pytest.raises(ValueError, match="batch stream was empty"):
        evaluate_sae(tiny_sae, [])


# ---------------------------------------------------------------------------------------------- the loss


def _dense_reference(
    x: torch.Tensor, params: list[torch.Tensor], k: int, k_aux: int, aux_coef: float, dead: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """§4 written naively with dense n × m tensors and plain autograd."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc + b_enc
    relu = pre.relu()
    top = torch.topk(relu, k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    x_hat = z @ W_dec + b_dec
    fvu_main = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    e = (x - x_hat).detach()
    fvu_aux = torch.zeros((), dtype=x.dtype)
    if int(dead.sum()):
        masked = torch.where(dead[None, :], relu, torch.full_like(relu, -1.0))
        top_aux = torch.topk(masked, min(k_aux, int(dead.sum())), dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, top_aux.indices, top_aux.values)
        e_hat = z_aux @ W_dec  # no b_dec: the residual already holds it
        fvu_aux = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return fvu_main + aux_coef * fvu_aux, fvu_main, fvu_aux, z


@pytest.mark.parametrize("n_dead", [0, 3, 9])
def test_sparse_forward_and_backward_equal_the_dense_formulas(n_dead: int) -> None:
    g = torch.Generator().manual_seed(3)
    n, d, m, k, k_aux = 40, 6, 16, 3, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0
    params = [
        torch.randn(d, m, generator=g, dtype=torch.float64),
        0.1 * torch.randn(m, generator=g, dtype=torch.float64),
        torch.randn(m, d, generator=g, dtype=torch.float64),
        torch.randn(d, generator=g, dtype=torch.float64),
    ]
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=g)[:n_dead]] = True  # 9 dead > k_aux: only the top 5 of them reconstruct
    ours = [p.clone().requires_grad_(True) for p in params]
    ref = [p.clone().requires_grad_(True) for p in params]

    f = sae_forward(x, *ours, k=k, k_aux=k_aux, aux_coef=1 / 32, dead=dead)
    f.loss.backward()
    loss, main, aux, z = _dense_reference(x, ref, k, k_aux, 1 / 32, dead)
    loss.backward()

    z_ours = torch.zeros(n, m, dtype=x.dtype).scatter(-1, f.indices, f.values.detach())
    assert torch.allclose(z_ours, z.detach(), atol=1e-12)
    assert f.fvu.item() == pytest.approx(main.item(), rel=1e-12)
    assert f.auxk_fvu.item() == pytest.approx(aux.item() if n_dead else 0.0, rel=1e-12, abs=1e-15)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, ref, strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name
    if n_dead:  # AuxK's decoder gradient lands on dead latents' rows only (the residual is detached)
        no_aux = [p.clone().requires_grad_(True) for p in params]
        sae_forward(x, *no_aux, k=k, k_aux=k_aux, aux_coef=0.0, dead=dead).loss.backward()
        assert ours[2].grad is not None and no_aux[2].grad is not None
        moved = (ours[2].grad - no_aux[2].grad).abs().sum(dim=1)
        assert bool((moved[~dead] == 0).all()) and bool((moved[dead] > 0).any())


def test_auxk_uses_relu_and_reconstructs_the_residual_without_b_dec() -> None:
    # Two rows, identity encoder/decoder over d = m = 3; latent 2 is the only dead one.
    x = torch.tensor([[3.0, 0.0, 2.0], [0.0, 1.0, -5.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    dead = torch.tensor([False, False, True])
    f = sae_forward(x, eye, zero, eye, zero, k=1, k_aux=2, aux_coef=1.0, dead=dead)
    # main: row 0 keeps 3 (latent 0), row 1 keeps 1 (latent 1) → residual e = [[0,0,2],[0,0,-5]]
    assert torch.equal(f.x_hat, torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    # AuxK: latent 2 gives ReLU(2) = 2 on row 0 and ReLU(−5) = 0 on row 1 → ê = [[0,0,2],[0,0,0]]
    e = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -5.0]], dtype=torch.float64)
    expected = 25.0 / float(((e - e.mean(0)) ** 2).sum())  # ‖e − ê‖² / ‖e − ē‖² = 25 / 24.5
    assert f.auxk_fvu.item() == pytest.approx(expected, rel=1e-12)
    # with b_dec ≠ 0 the residual is unchanged (x̂ holds b_dec) and ê must not add it again
    b = torch.tensor([0.5, -0.5, 0.25], dtype=torch.float64)
    f_b = sae_forward(x + b, eye, zero, eye, b, k=1, k_aux=2, aux_coef=1.0, dead=dead)
    assert f_b.auxk_fvu.item() == pytest.approx(expected, rel=1e-12)


def test_decoder_gradient_projection_and_renormalisation() -> None:
    g = torch.Generator().manual_seed(4)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64)
    normalise_rows(W)
    assert torch.allclose(W.norm(dim=1), torch.ones(7, dtype=torch.float64))
    grad = torch.randn(7, 5, generator=g, dtype=torch.float64)
    before = grad.clone()
    remove_parallel_grad(W, grad)
    assert torch.allclose((grad * W).sum(dim=1), torch.zeros(7, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(before - grad, (before * W).sum(1, keepdim=True) * W)  # only the parallel part went


# ---------------------------------------------------------------------------------------------- training mechanics


def test_each_step_projects_then_renormalises_and_never_clips(
    rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safeport.mappers.sae as sae_module

    calls: list[str] = []
    project, renormalise = sae_module.remove_parallel_grad, sae_module.normalise_rows

    def spy_project(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
        calls.append("project")
        project(W_dec, grad)

    def spy_renormalise(W_dec: torch.Tensor) -> None:
        calls.append("renormalise")
        renormalise(W_dec)

    def no_clipping(*args: object, **kwargs: object) -> None:
        raise AssertionError("§4 trains with plain Adam: no gradient clipping")

    monkeypatch.setattr(sae_module, "remove_parallel_grad", spy_project)
    monkeypatch.setattr(sae_module, "normalise_rows", spy_renormalise)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping)
    _tiny(rows, n_tokens=500)
    assert calls == ["project", "renormalise"] * 5


def test_scale_init_and_unit_decoder(one_thread: None) -> None:
    """c and b_dec's start come from exactly the first scale_rows rows; W_enc starts as W_decᵀ."""
    rng = np.random.default_rng(5)
    X = (rng.standard_normal((400, 6)) + 4.0).astype(np.float32)
    X[200:] *= 10.0  # rows after the estimation window: a c estimated on them would be ~10× larger
    cfg = SaeConfig(d=6, m=12, k=2, batch_size=100, n_tokens=400, scale_rows=200, lr=1e-15)
    sae = train_sae(_batches(X, 50), cfg)  # lr ≈ 0: the weights stay at their initial values
    first = X[:200].astype(np.float64)
    c = float(np.linalg.norm(first, axis=1).mean() / math.sqrt(6))
    assert sae.c == pytest.approx(c, rel=1e-12)
    assert np.linalg.norm(first / sae.c, axis=1).mean() == pytest.approx(math.sqrt(6), rel=1e-12)
    np.testing.assert_allclose(sae.b_dec, (first / c).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(sae.W_enc, sae.W_dec.T, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, atol=1e-6)


def test_decoder_rows_stay_unit_norm_and_codes_are_k_sparse(tiny_sae: TrainedSae, rows: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(tiny_sae.W_dec, axis=1), 1.0, atol=1e-5)
    z = tiny_sae.encode(rows[:300])
    assert z.dtype == np.float32 and z.shape == (300, 24)
    assert ((z > 0).sum(axis=1) <= 3).all() and (z >= 0).all()
    # §4's formula on x̃ = x / c with the unfolded weights gives the same codes
    x_t = rows[:300].astype(np.float64) / tiny_sae.c
    pre = (x_t - tiny_sae.b_dec) @ tiny_sae.W_enc + tiny_sae.b_enc
    np.testing.assert_allclose(z, np.where(z > 0, np.maximum(pre, 0), 0.0), rtol=1e-4, atol=1e-5)
    x_hat = tiny_sae.c * (z.astype(np.float64) @ tiny_sae.W_dec + tiny_sae.b_dec)
    np.testing.assert_allclose(tiny_sae.decode(z), x_hat, rtol=1e-4, atol=1e-4)


def test_numpy_and_torch_inputs_give_the_same_codes(tiny_sae: TrainedSae, rows: np.ndarray) -> None:
    z_np = tiny_sae.encode(rows[:50])
    z_t = tiny_sae.encode(torch.from_numpy(rows[:50]))
    assert isinstance(z_t, torch.Tensor)
    assert np.array_equal(z_t.numpy(), z_np)
    assert np.array_equal(tiny_sae.reconstruct(rows[:50]), tiny_sae.decode(z_np))
    half = rows[:50].astype(np.float16)
    assert np.array_equal(tiny_sae.encode(half), tiny_sae.encode(half.astype(np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[rows, 8\], got \(2, 3\)"):
        tiny_sae.encode(np.zeros((2, 3), dtype=np.float32))


def test_config_defaults_are_method_section_4() -> None:
    cfg = SaeConfig(d=384, n_tokens=10**6)
    assert (cfg.m, cfg.k, cfg.k_aux, cfg.batch_size, cfg.seed, cfg.scale_rows) == (1536, 8, 192, 4096, 42, 100_000)
    assert cfg.aux_coef == 1 / 32
    assert cfg.lr == pytest.approx(2e-4 / math.sqrt(1536 / 2**14))
    assert SaeConfig(d=2048, m=2**14, k=32, n_tokens=4096).lr == pytest.approx(2e-4)
    assert cfg.n_steps == 244 and cfg.trained_tokens == 244 * 4096
    assert cfg.dead_window_steps == int(0.2 * 244 * 4096) // 4096  # a fifth of training < 10⁷ tokens
    assert SaeConfig(d=384, n_tokens=10**9).dead_window_steps == 10**7 // 4096  # 10⁷ tokens < a fifth
    assert SaeConfig(d=384, n_tokens=4096).dead_window_steps == 1
    assert SaeConfig.from_dict(cfg.to_dict()) == cfg  # resolved values survive a round trip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"d": 0}, r"SaeConfig\.d must be >= 1, got 0"),
        ({"d": 8.0}, r"SaeConfig\.d must be an integer, got 8\.0"),
        ({"k": 40}, r"SaeConfig\.k = 40 exceeds m = 32"),
        ({"k": True}, r"SaeConfig\.k must be an integer"),
        ({"m": -1}, r"SaeConfig\.m must be >= 0"),
        ({"k_aux": 33}, r"SaeConfig\.k_aux = 33 exceeds m = 32"),
        ({"lr": -1e-3}, r"SaeConfig\.lr must be a finite number >= 0"),
        ({"lr": float("nan")}, r"SaeConfig\.lr must be a finite number"),
        ({"aux_coef": -0.1}, r"SaeConfig\.aux_coef must be a finite number >= 0"),
        ({"n_tokens": 100}, r"n_tokens = 100 is less than one batch \(4096 tokens\)"),
        ({"dead_window_fraction": 0.0}, r"dead_window_fraction must be a finite number > 0"),
        ({"dead_window_fraction": 1.5}, r"dead_window_fraction = 1\.5 is more than all training tokens"),
        ({"scale_rows": 0}, r"SaeConfig\.scale_rows must be >= 1"),
        ({"device": "gpu"}, r"SaeConfig\.device = 'gpu' is not a device"),
    ],
)
def test_bad_config_values_are_clear_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SaeConfig(**{"d": 8, "n_tokens": 4096, **options})


def test_unknown_config_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"SaeConfig has no option\(s\) \['width'\]"):
        SaeConfig.from_dict({"d": 8, "n_tokens": 4096, "width": 3})


def test_bad_streams_are_clear_errors(rows: np.ndarray) -> None:
    cfg = SaeConfig(d=8, m=16, k=2, batch_size=100, n_tokens=1000)
    with pytest.raises(ValueError, match="the batch stream ended after 700 rows"):
        train_sae([rows[:300], rows[300:700]], cfg)
    with pytest.raises(ValueError, match=r"batch 1 has shape \(10, 7\), expected \[rows, 8\]"):
        train_sae([rows[:50], rows[:10, :7]], cfg)
    bad = rows[:200].copy()
    bad[150, 3] = np.nan
    with pytest.raises(ValueError, match="batch 0 holds NaN/inf"):
        train_sae([bad], cfg)
    with pytest.raises(ValueError, match="checkpoint_every = 5 but no checkpoint callback"):
        train_sae([rows], cfg, checkpoint_every=5)
    with pytest.raises(ValueError, match="first training rows are all zero"):
        train_sae([np.zeros((1000, 8), dtype=np.float32)], cfg)
    with pytest.raises(ValueError, match="first 1000 training rows are all identical"):
        train_sae([np.ones((1000, 8), dtype=np.float32)], cfg)


def test_repeat_batches_runs_epochs_back_to_back() -> None:
    stream = repeat_batches(lambda epoch: [np.full((2, 1), epoch), np.full((1, 1), epoch)])
    assert [int(next(stream)[0, 0]) for _ in range(6)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="epoch 0 of the batch stream was empty"):
        next(repeat_batches(lambda epoch: []))


# ---------------------------------------------------------------------------------------------- resume


def _resume_case() -> tuple[np.ndarray, SaeConfig]:
    rng = np.random.default_rng(8)
    X = (rng.standard_normal((1000, 12)) * rng.uniform(0.1, 3.0, 12) + 2.0).astype(np.float32)
    # 40 steps of 64 rows from 50-row provider batches (cursors fall mid-batch); c from the first 10 steps,
    # so the step-7 checkpoint lies in the replay of the estimation rows; a 3-step dead window keeps AuxK busy.
    cfg = SaeConfig(d=12, m=40, k=2, batch_size=64, n_tokens=64 * 40, scale_rows=640, dead_window_tokens=192)
    return X, cfg


def _same(a: TrainedSae, b: TrainedSae) -> bool:
    weights = all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    curves = all(
        np.array_equal(getattr(a.curves, n), getattr(b.curves, n)) for n in ("tokens", "fvu", "l0", "dead_fraction")
    )
    return weights and curves and a.c == b.c


def test_resumed_training_ends_bit_identical(one_thread: None) -> None:
    X, cfg = _resume_case()
    states: list[SaeCheckpoint] = []
    full = train_sae(_batches(X, 50), cfg, checkpoint=states.append, checkpoint_every=7)
    assert [s.step for s in states] == [7, 14, 21, 28, 35]
    assert (states[0].data_batch, states[0].data_row) == (8, 48)  # 7 × 64 = 448 rows = 8 batches of 50 + 48
    assert full.curves.dead_fraction.max() > 0, "the case must exercise AuxK (some latents dead)"
    for state in (states[0], states[3]):
        resumed = train_sae(_batches(X, 50, start=state.data_batch), cfg, resume=state)
        assert _same(resumed, full), f"resumed from step {state.step} differs"


def test_a_killed_training_resumes_from_its_last_checkpoint(one_thread: None) -> None:
    X, cfg = _resume_case()
    full = train_sae(_batches(X, 50), cfg)
    saved: list[SaeCheckpoint] = []

    def persist_then_die(state: SaeCheckpoint) -> None:
        saved.append(SaeCheckpoint(arrays={k: v.copy() for k, v in state.arrays.items()}, meta=dict(state.meta)))
        if state.step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(_batches(X, 50), cfg, checkpoint=persist_then_die, checkpoint_every=10)
    last = saved[-1]
    assert last.step == 20 and last.tokens_seen == 20 * 64
    assert all(isinstance(v, np.ndarray) for v in last.arrays.values())
    resumed = train_sae(_batches(X, 50, start=last.data_batch), cfg, resume=last)
    assert _same(resumed, full)


def test_resume_refuses_another_config(one_thread: None) -> None:
    X, cfg = _resume_case()
    states: list[SaeCheckpoint] = []
    train_sae(_batches(X, 50), replace(cfg, n_tokens=64 * 12), checkpoint=states.append, checkpoint_every=10)
    with pytest.raises(ValueError, match="resume state was written for another config"):
        train_sae(_batches(X, 50), cfg, resume=states[0])
    broken = SaeCheckpoint(arrays={}, meta={**states[0].meta, "format": "other"})
    with pytest.raises(ValueError, match="not written by this trainer"):
        train_sae(_batches(X, 50), replace(cfg, n_tokens=64 * 12), resume=broken)


# ---------------------------------------------------------------------------------------------- SAELens's format


def test_saelens_loads_the_export_and_encodes_identically(
    tiny_sae: TrainedSae, rows: np.ndarray, tmp_path: Path
) -> None:
    import sae_lens

    cfg, tensors = to_saelens(tiny_sae, {"hook_name": "te.3.txt", "model_name": "minilm"})
    folder = write_saelens_folder(tmp_path / "sae", cfg, tensors)
    loaded = sae_lens.SAE.load_from_disk(folder)
    assert type(loaded).__name__ == "TopKSAE"
    assert loaded.cfg.k == 3 and loaded.cfg.normalize_activations == "none"
    assert loaded.cfg.metadata.hook_name == "te.3.txt"
    x = torch.from_numpy(rows[:400])  # raw activations: c is folded into the weights
    with torch.no_grad():
        z_lens = loaded.encode(x)
        assert torch.equal(z_lens, tiny_sae.encode(x))
        assert torch.allclose(loaded.decode(z_lens), tiny_sae.decode(z_lens), rtol=1e-6, atol=1e-6)

    back = from_saelens(*read_saelens_folder(folder))
    assert back.c == tiny_sae.c and back.config == tiny_sae.config
    assert np.array_equal(back.encode(rows[:400]), tiny_sae.encode(rows[:400]))
    assert np.array_equal(back.curves.fvu, tiny_sae.curves.fvu)
    np.testing.assert_allclose(back.W_dec, tiny_sae.W_dec, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(back.W_enc, tiny_sae.W_enc, rtol=1e-6, atol=1e-7)


def test_export_writes_the_fields_saelens_writes_for_a_topk_sae(tiny_sae: TrainedSae, tmp_path: Path) -> None:
    import sae_lens
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    assert sae_lens.__version__ == SAE_LENS_VERSION
    reference = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=24, k=3, rescale_acts_by_decoder_norm=False))
    reference.save_inference_model(tmp_path / "ref")
    ref_cfg, ref_tensors = read_saelens_folder(tmp_path / "ref")
    cfg, tensors = to_saelens(tiny_sae)
    assert set(cfg) == set(ref_cfg)
    assert set(cfg["metadata"]) - {"safeport"} == set(ref_cfg["metadata"])
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in ref_tensors.items()}
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input")} == {
        "architecture": "topk",
        "d_in": 8,
        "d_sae": 24,
        "k": 3,
        "apply_b_dec_to_input": True,
    }


def test_from_saelens_refuses_what_it_would_encode_differently(tiny_sae: TrainedSae) -> None:
    cfg, tensors = to_saelens(tiny_sae)
    with pytest.raises(ValueError, match="normalize_activations = 'expected_average_only_in'"):
        from_saelens({**cfg, "normalize_activations": "expected_average_only_in"}, tensors)
    with pytest.raises(ValueError, match="architecture is 'standard'"):
        from_saelens({**cfg, "architecture": "standard"}, tensors)
    with pytest.raises(ValueError, match=r"tensors lack \['b_dec'\]"):
        from_saelens(cfg, {k: v for k, v in tensors.items() if k != "b_dec"})
    with pytest.raises(ValueError, match="metadata key 'safeport' is reserved"):
        to_saelens(tiny_sae, {"safeport": 1})
    # a TopK SAE written by another tool: raw weights, c = 1
    foreign = {k: v for k, v in cfg.items() if k != "metadata"}
    other = from_saelens(foreign, tensors)
    assert other.c == 1.0 and (other.d, other.m, other.k) == (8, 24, 3)
    assert np.array_equal(other.W_dec, tensors["W_dec"])
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    assert np.array_equal(other.encode(x), tiny_sae.encode(x))


def test_sparse_helper_matches_embedding_bag_decoder_rows() -> None:
    """Sanity of the primitive the decoder uses: the per-row weighted sum of chosen decoder rows."""
    W = torch.arange(12.0).reshape(4, 3)
    idx = torch.tensor([[0, 2], [3, 1]])
    w = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    out = F.embedding_bag(idx, W, per_sample_weights=w, mode="sum")
    assert torch.equal(out, torch.stack([W[0] + 2 * W[2], 0.5 * W[3]]))
