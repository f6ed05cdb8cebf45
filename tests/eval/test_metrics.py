"""Map diagnostics: hand-computed cosine / relative error, retrieval on perfect and random maps."""

import numpy as np
import pytest

from safeport.eval.metrics import MapDiagnostics, cosine, diagnose, map_diagnostics, retrieval_ranks
from safeport.mappers.procrustes import ProcrustesMapper


def test_cosine() -> None:
    assert cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / np.sqrt(2))
    assert cosine(np.array([1.0, 2.0]), np.array([-2.0, -4.0])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="zero vector"):
        cosine(np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="dim 3, expected 2"):
        cosine(np.ones(2), np.ones(3))


def test_hand_computed_diagnostics() -> None:
    pred = np.array([[1.0, 0.0], [0.0, 2.0]])
    target = np.array([[2.0, 0.0], [0.0, 1.0]])
    d = map_diagnostics(pred, target)
    assert d == MapDiagnostics(mean_cosine=1.0, relative_error=0.75, top1=1.0, top5=1.0, n=2)  # (1/2 + 1/1)/2


def test_retrieval_ranks_by_hand() -> None:
    target = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pred = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])  # row 0 is nearest to target 1, then target 2
    np.testing.assert_array_equal(retrieval_ranks(pred, target), [2, 0, 0])
    # ties count in the true target's favour
    np.testing.assert_array_equal(retrieval_ranks(np.ones((2, 2)), np.ones((2, 2))), [0, 0])


def test_perfect_planted_map_retrieves_everything() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 16))
    Q = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    A = X - X[:400].mean(axis=0)
    B = A @ Q
    fitted = ProcrustesMapper().fit(A[:400], B[:400], A[400:500], B[400:500])
    d = diagnose(fitted, A[500:], B[500:])
    assert d.top1 == 1.0 and d.top5 == 1.0 and d.n == 100
    assert d.mean_cosine == pytest.approx(1.0, abs=1e-9)
    assert d.relative_error == pytest.approx(0.0, abs=1e-9)


def test_random_map_retrieves_at_chance() -> None:
    rng = np.random.default_rng(1)
    n = 2000  # chance: top-1 = 1/n = 0.0005, top-5 = 5/n = 0.0025
    d = map_diagnostics(rng.standard_normal((n, 32)), rng.standard_normal((n, 32)))
    assert d.top1 <= 0.003
    assert d.top5 <= 0.008
    assert abs(d.mean_cosine) < 0.02
    assert d.relative_error > 1.0  # independent vectors of equal size: ‖p − t‖ ≈ √2‖t‖


def test_errors() -> None:
    with pytest.raises(ValueError, match="differ"):
        map_diagnostics(np.ones((3, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="zero row"):
        map_diagnostics(np.array([[0.0, 0.0], [1.0, 0.0]]), np.ones((2, 2)))
