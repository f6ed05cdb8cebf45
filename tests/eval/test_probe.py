"""Linear safety probe: separates planted classes; steering towards safe lowers the flagged fraction."""

import itertools

import numpy as np
import pytest

from safeport.eval.probe import FlaggedPoint, flagged_curve, flagged_fraction, probe_accuracy, train_probe


def _classes(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Safe rows around −m, unsafe rows around +m, in 10 dims with unequal feature scales."""
    rng = np.random.default_rng(seed)
    m = np.zeros(10)
    m[:3] = 1.5
    scale = np.linspace(0.5, 5.0, 10)
    safe = (rng.standard_normal((n, 10)) - m) * scale
    unsafe = (rng.standard_normal((n, 10)) + m) * scale
    return safe, unsafe, m * scale


def test_probe_separates_planted_classes() -> None:
    safe, unsafe, _ = _classes(0, 300)
    probe = train_probe(safe, unsafe)
    assert probe.train_accuracy > 0.95 and probe.n_train == 600 and probe.dim == 10
    test_safe, test_unsafe, _ = _classes(1, 200)
    X = np.concatenate([test_safe, test_unsafe])
    y = np.concatenate([np.zeros(200, dtype=int), np.ones(200, dtype=int)])
    assert probe_accuracy(probe, X, y) > 0.95


def test_probe_is_seeded() -> None:
    safe, unsafe, _ = _classes(2, 100)
    a, b = train_probe(safe, unsafe), train_probe(safe, unsafe)
    np.testing.assert_array_equal(a.pipeline[-1].coef_, b.pipeline[-1].coef_)


def test_flagged_fraction_falls_when_pushed_towards_safe() -> None:
    safe, unsafe, shift = _classes(3, 300)
    probe = train_probe(safe, unsafe)
    prompts = _classes(4, 200)[1]  # unsafe prompts
    v = -shift  # from unsafe towards safe
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    curve = flagged_fraction(probe, prompts, v, alphas)
    assert list(curve) == alphas
    values = list(curve.values())
    assert values[0] > 0.9 and values[-1] < 0.05
    assert all(later <= earlier for earlier, later in itertools.pairwise(values))
    away = flagged_fraction(probe, _classes(5, 200)[0], -v, [0.0, 2.0])  # safe prompts pushed to unsafe
    assert away[2.0] > away[0.0]
    points = flagged_curve(probe, prompts, v, [0.0])
    assert points == (FlaggedPoint(alpha=0.0, fraction=values[0], n=200),)


def test_errors() -> None:
    safe, unsafe, _ = _classes(6, 20)
    probe = train_probe(safe, unsafe)
    with pytest.raises(ValueError, match="one label per row"):
        probe_accuracy(probe, safe, np.zeros(3))
    with pytest.raises(ValueError, match="0 \\(safe\\) or 1"):
        probe_accuracy(probe, safe, np.full(20, 2))
    with pytest.raises(ValueError, match="expected 10"):
        flagged_fraction(probe, safe, np.ones(9), [1.0])
    with pytest.raises(ValueError, match="trained on dim 10"):
        probe.flags(np.ones((2, 9)))
