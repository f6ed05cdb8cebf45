"""MLP map: early stopping, fit quality on a planted nonlinear map, determinism, round trip."""

import numpy as np
import pytest
import torch

import safeport.mappers as mappers
from safeport.mappers.mlp import MLPMap, MLPMapper

SMALL = {"hidden": 64, "batch_size": 64}


@pytest.fixture(scope="module")
def planted() -> dict[str, np.ndarray]:
    """B = tanh(A W1) W2 + noise; train/val/test centred with the train means."""
    rng = np.random.default_rng(0)
    W1, W2 = rng.standard_normal((8, 16)), rng.standard_normal((16, 6)) / 4

    def make(n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
        A = rng.standard_normal((n, 8))
        return A, np.tanh(A @ W1) @ W2 + noise * rng.standard_normal((n, 6))

    (A, B), (Av, Bv), (At, Bt) = make(256, 0.3), make(128, 0.3), make(256, 0.0)
    mu_a, mu_b = A.mean(axis=0), B.mean(axis=0)
    return {
        "A": A - mu_a,
        "B": B - mu_b,
        "A_val": Av - mu_a,
        "B_val": Bv - mu_b,
        "A_test": At - mu_a,
        "B_test": Bt - mu_b,
    }


@pytest.fixture(scope="module")
def fitted(planted: dict[str, np.ndarray]) -> MLPMap:
    return MLPMapper(**SMALL, device="cpu").fit(planted["A"], planted["B"], planted["A_val"], planted["B_val"])


def test_early_stops_and_keeps_best_weights(fitted: MLPMap, planted: dict[str, np.ndarray]) -> None:
    p = fitted.params
    assert int(p["epochs_run"]) < 300
    assert int(p["best_epoch"]) % 5 == 0
    assert int(p["epochs_run"]) - int(p["best_epoch"]) >= 12  # stopped for lack of improvement
    assert int(p["epochs_run"]) - int(p["best_epoch"]) < 12 + 5  # ...at the first validation point allowed
    val_mse = np.mean((fitted.rows(planted["A_val"]) - planted["B_val"]) ** 2)
    assert float(p["best_val_loss"]) == pytest.approx(val_mse, rel=1e-5)  # the kept weights are the best ones
    assert p["lr"] == 1e-3 and p["weight_decay"] == 1e-2 and p["seed"] == 42 and p["device"] == "cpu"


def test_beats_the_mean_predictor_on_planted_nonlinear_map(fitted: MLPMap, planted: dict[str, np.ndarray]) -> None:
    mse = np.mean((fitted.rows(planted["A_test"]) - planted["B_test"]) ** 2)
    mean_predictor = np.mean(planted["B_test"] ** 2)  # targets are centred: the mean predictor outputs 0
    assert mse < 0.5 * mean_predictor


def test_bit_for_bit_deterministic_on_cpu(fitted: MLPMap, planted: dict[str, np.ndarray]) -> None:
    rng_before = torch.get_rng_state()
    again = MLPMapper(**SMALL, device="cpu").fit(planted["A"], planted["B"], planted["A_val"], planted["B_val"])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is restored
    for key, value in fitted.state().items():
        assert np.array_equal(value, again.state()[key]), key
    assert again.params == fitted.params


def test_direction_is_f_of_v_minus_f_of_zero(fitted: MLPMap) -> None:
    v = np.linspace(-1.0, 1.0, 8)
    expected = fitted.rows(v[None, :])[0] - fitted.rows(np.zeros((1, 8)))[0]
    np.testing.assert_allclose(fitted.direction(v), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fitted.direction(np.zeros(8)), np.zeros(6), atol=0)


def test_state_round_trip_is_exact(fitted: MLPMap, planted: dict[str, np.ndarray]) -> None:
    state = fitted.state()
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert state["fc1.weight"].shape == (64, 8)
    again = mappers.from_state("mlp", state, fitted.params)
    assert isinstance(again, MLPMap)
    assert again.params == fitted.params
    assert np.array_equal(again.rows(planted["A_test"]), fitted.rows(planted["A_test"]))
    assert np.array_equal(again.direction(np.ones(8)), fitted.direction(np.ones(8)))


def test_default_architecture_and_options() -> None:
    mapper = MLPMapper()
    assert (mapper.hidden, mapper.batch_size, mapper.max_epochs, mapper.val_every, mapper.patience) == (
        1024,
        512,
        300,
        5,
        12,
    )
    assert (mapper.seed, mapper.device) == (42, "auto")
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        MLPMapper(hidden=0)


def test_errors(fitted: MLPMap) -> None:
    with pytest.raises(ValueError, match="expects 8"):
        fitted.rows(np.ones((2, 7)))
    with pytest.raises(ValueError, match="lacks"):
        mappers.from_state("mlp", {"fc1.weight": np.ones((2, 2))}, {})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            MLPMapper(device="cuda").fit(np.ones((2, 2)) - 1, np.ones((2, 2)) - 1, np.ones((1, 2)), np.ones((1, 2)))
