"""Known answers for SafeDIG routing (§3): LOCO transfer AUC, R_p, S_p, ranking, and the target never entering."""

import numpy as np
import pytest

from safeport.mappers.routing import PositionScore, auc, rank, route, score_position, score_positions

SOURCES = ("A", "B", "C", "D")
TARGET = "T"


def _hand_case() -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """1-D pairs: train differences d_A = 2, d_B = 1, d_C = −1; test pairs chosen for hand-countable AUCs."""
    rows = [
        # (category, split, safe, unsafe)
        ("A", "train", 0.0, 2.0),
        ("B", "train", 0.0, 1.0),
        ("C", "train", 0.0, -1.0),
        ("A", "test", 0.0, 2.0),
        ("A", "test", 1.0, 0.5),
        ("B", "test", 0.0, 3.0),
        ("B", "test", 1.0, 0.5),
        ("C", "test", 0.0, -1.0),
        ("B", "val", 5.0, -9.0),  # val pairs are not used by routing
    ]
    cats = [r[0] for r in rows]
    splits = [r[1] for r in rows]
    safe = np.array([[r[2]] for r in rows])
    unsafe = np.array([[r[3]] for r in rows])
    return safe, unsafe, cats, splits


def test_hand_computed_loco_aucs_robustness_and_separability() -> None:
    safe, unsafe, cats, splits = _hand_case()
    sc = score_position("p", safe, unsafe, cats, splits, ["C", "A", "B"])
    assert sc.sources == ("A", "B", "C")
    np.testing.assert_array_equal(sc.directions, [[2.0], [1.0], [-1.0]])
    # A: direction mean(d_B, d_C) = 0 → every score ties → 0.5.
    # B: direction mean(2, −1) > 0 → unsafe {3, .5} vs safe {0, 1}: 3 of 4 comparisons won → 0.75.
    # C: direction mean(2, 1) > 0 → unsafe −1 < safe 0 → 0.
    assert sc.auc == pytest.approx((0.5, 0.75, 0.0))
    mean = (0.5 + 0.75 + 0.0) / 3
    pop_std = np.sqrt(((0.5 - mean) ** 2 + (0.75 - mean) ** 2 + mean**2) / 3)
    assert sc.robustness == pytest.approx(mean - pop_std, abs=1e-12)
    assert sc.auc_std == pytest.approx(pop_std) and sc.auc_mean == pytest.approx(mean)
    # S_p: direction mean(2, 1, −1) > 0; unsafe {2, .5, 3, .5, −1} vs safe {0, 1, 0, 1, 0}: 5+3+5+3+0 = 16 of 25.
    assert sc.separability == pytest.approx(16 / 25)
    assert sc.n_train == (1, 1, 1) and sc.n_test == (2, 2, 1)
    assert sc.auc_by_category() == pytest.approx({"A": 0.5, "B": 0.75, "C": 0.0})


def test_auc_counts_ties_as_half() -> None:
    assert auc(np.array([1.0, 2.0]), np.array([1.0, 0.0])) == pytest.approx(0.875)
    assert auc(np.zeros(3), np.zeros(2)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        auc(np.zeros(0), np.zeros(2))


def _planted(seed: int = 0, d: int = 12, per_split: int = 40) -> tuple[dict, list[str], list[str]]:
    """Three positions over the same pairs: a shared unsafe direction, per-category directions, pure noise."""
    rng = np.random.default_rng(seed)
    cats, splits = [], []
    for c in (*SOURCES, TARGET):
        for split in ("train", "test"):
            cats += [c] * per_split
            splits += [split] * per_split
    n = len(cats)
    shared_dir = np.zeros(d)
    shared_dir[-1] = 1.0
    own = {c: np.eye(d)[i] for i, c in enumerate((*SOURCES, TARGET))}
    pooled = {}
    for name in ("shared", "specific", "noise"):
        safe = rng.standard_normal((n, d))
        unsafe = rng.standard_normal((n, d))
        if name == "shared":
            unsafe = unsafe + 1.0 * shared_dir
        elif name == "specific":
            unsafe = unsafe + 4.0 * np.array([own[c] for c in cats])
        pooled[name] = (safe, unsafe)
    return pooled, cats, splits


def test_shared_direction_outranks_category_specific_ones_with_higher_in_domain_auc() -> None:
    pooled, cats, splits = _planted()
    scores = {sc.position: sc for sc in score_positions(pooled, cats, splits, SOURCES, target=TARGET)}
    shared, specific, noise = scores["shared"], scores["specific"], scores["noise"]
    # The specific position separates better in domain (all-source direction, pooled source test pairs) ...
    assert specific.separability > shared.separability + 0.05
    # ... but its directions do not transfer to a left-out category, the shared one's do.
    assert max(specific.auc) < 0.7 < min(shared.auc)
    assert shared.robustness > specific.robustness
    routing = route(list(scores.values()), k=1)
    assert routing.routed == ("shared",)
    assert routing.ranked[0] is shared
    assert noise.robustness < shared.robustness


def test_held_out_category_never_changes_the_routes() -> None:
    pooled, cats, splits = _planted(seed=1)
    target_rows = np.array([c == TARGET for c in cats])
    before = score_positions(pooled, cats, splits, SOURCES, target=TARGET)
    rng = np.random.default_rng(99)
    perturbed = {}
    for name, (safe, unsafe) in pooled.items():
        s, u = safe.copy(), unsafe.copy()
        s[target_rows] = rng.standard_normal(s[target_rows].shape) * 1e6
        u[target_rows] = np.nan  # not even NaNs in the target's rows are read
        perturbed[name] = (s, u)
    # Relabel the target's pairs' splits too: nothing about them may matter.
    splits2 = ["train" if t else s for s, t in zip(splits, target_rows, strict=True)]
    after = score_positions(perturbed, cats, splits2, SOURCES, target=TARGET)
    for b, a in zip(before, after, strict=True):
        assert (a.position, a.auc, a.robustness, a.separability) == (b.position, b.auc, b.robustness, b.separability)
        np.testing.assert_array_equal(a.directions, b.directions)
    r_before, r_after = route(before, k=2), route(after, k=2)
    assert r_before.routed == r_after.routed
    assert [sc.position for sc in r_before.ranked] == [sc.position for sc in r_after.ranked]


def test_a_source_category_does_change_the_scores() -> None:
    """The control for the test above: perturbing a *source* category's rows is seen."""
    pooled, cats, splits = _planted(seed=1)
    rows = np.array([c == "A" for c in cats])
    safe, unsafe = pooled["shared"]
    u = unsafe.copy()
    u[rows] += 5.0
    before = score_position("shared", safe, unsafe, cats, splits, SOURCES)
    after = score_position("shared", safe, u, cats, splits, SOURCES)
    assert after.robustness != before.robustness


def test_target_among_sources_and_missing_data_are_refused() -> None:
    pooled, cats, splits = _planted()
    safe, unsafe = pooled["shared"]
    with pytest.raises(ValueError, match="held-out target 'T' is listed among the sources"):
        score_position("p", safe, unsafe, cats, splits, [*SOURCES, TARGET], target=TARGET)
    with pytest.raises(ValueError, match="at least 2 source categories"):
        score_position("p", safe, unsafe, cats, splits, ["A"])
    with pytest.raises(ValueError, match=r"source categories \['Z'\] have no pairs"):
        score_position("p", safe, unsafe, cats, splits, ["A", "Z"])
    no_test = ["train" if c == "B" else s for c, s in zip(cats, splits, strict=True)]
    with pytest.raises(ValueError, match="'B' has 80 train and 0 test pairs"):
        score_position("p", safe, unsafe, cats, no_test, SOURCES)
    with pytest.raises(ValueError, match="got 3 categories"):
        score_position("p", safe, unsafe, cats[:3], splits, SOURCES)
    with pytest.raises(ValueError, match="one shape"):
        score_position("p", safe, unsafe[:-1], cats, splits, SOURCES)


def _score(name: str, r: float, s: float) -> PositionScore:
    return PositionScore(name, ("A", "B"), np.zeros((2, 1)), (r, r), r, s, (1, 1), (1, 1))


def test_ties_break_by_separability_then_name() -> None:
    scores = [_score("b", 0.8, 0.9), _score("a", 0.8, 0.9), _score("c", 0.8, 0.95), _score("d", 0.9, 0.1)]
    assert [sc.position for sc in rank(scores)] == ["d", "c", "a", "b"]
    routing = route(scores)
    assert routing.routed == ("d", "c", "a") and routing.k == 3
    assert route(list(reversed(scores))).routed == routing.routed
    with pytest.raises(ValueError, match="k = 5 but there are 4"):
        route(scores, k=5)
    with pytest.raises(ValueError, match="more than once"):
        route([*scores, _score("a", 0.1, 0.1)])
    with pytest.raises(ValueError, match="different source categories"):
        route([*scores, PositionScore("e", ("A", "C"), np.zeros((2, 1)), (1.0, 1.0), 1.0, 1.0, (1, 1), (1, 1))])
