"""The CPU headline of SafeDIG (METHOD-SAFEDIG §9, README "Position-aware steering" item 9): ``loco_headline``.

On the store of tests/flows/test_safedig_flow.py's ``fitted`` fixture (the real MiniLM ``te`` at te.0-te.2,
three SafeSteer categories, 20 train + 4 test pairs each, the tiny catalog's anchors; one ``safeport safedig``
with Sexual held out), copied: ``safeport extract`` adds the pooled rows METHOD's probe is trained on and
``safeport fit`` the calibrated src -> te vectors, then the headline runs once for the module with the anchors
as benign captions and strengths 0, 1, 3. Known answers are computed here with a separately loaded MiniLM
(never the flow's cached one), the stored bundle and hooks, and the shipped SafeSteer file: the cells the
store holds, the texts each set has, the flag rates and benign cosines of the unsteered, every steered and the
vector cell at the largest strength, the report, and a rerun that computes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import safeport.eval.plots
import safeport.flows.safedig_eval as loco
from safeport.api import _bundle_from_store
from safeport.catalog import Resolved
from safeport.eval.probe import SafetyProbe, train_probe
from safeport.eval.safedig import Mode, SafeDigBundle, safedig_hooks
from safeport.extractors import load_extractor
from safeport.flows.common import catalog as load_catalog
from safeport.flows.common import model_source, writing
from safeport.store import artifacts
from safeport.store.store import Store
from safeport.texts import normalise, text_id
from tests.conftest import REPO
from tests.flows import test_safedig_flow as flow_tests
from tests.flows.test_safedig_flow import CATEGORIES, N_PAIRS, TE, _cli, _copy

# The flow tests' fixtures, by name (pytest finds a module's fixtures among its attributes).
fitted = flow_tests.fitted
refuse_work = flow_tests.refuse_work

HOLDOUT = "Sexual"
SOURCES = sorted(set(CATEGORIES) - {HOLDOUT})
STRENGTHS = [0.0, 1.0, 3.0]
NONZERO = [s for s in STRENGTHS if s]
TOP = max(STRENGTHS)
# METHOD-SAFEDIG §8 as the headline applies it: method -> (positions steered, decoder refitted, edit mode).
METHODS: dict[str, tuple[str, bool, Mode]] = {
    "safedig": ("routed", True, "safedig"),
    "blend": ("routed", True, "blend"),
    "repel": ("routed", True, "repel"),
    "no routing": ("fixed", True, "safedig"),
    "no refit": ("routed", False, "safedig"),
    "ablate": ("routed", True, "ablate"),
}
MEASURES = ("target", "source", "benign", "benign_cos")
# Rows here and in the flow are computed in other batches (other order, model and hooks): float noise. A row this
# close to the probe's boundary may go either way; the rates are exact for every other row.
BORDER = 1e-3
BUNDLE = f"safedig:{TE}:{HOLDOUT}"


@dataclass
class Headline:
    store: Path
    resolved: Resolved
    results: list[loco.LocoResult]
    calls: list[tuple[Any, ...]]  # compute_loco's arguments, one tuple per call
    returned: list[list[loco.Cell]]  # what each call returned


@pytest.fixture(scope="module")
def headline(fitted: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Headline:
    """The fitted store, copied, extracted and fitted; the headline computed once (read-only: copy to write)."""
    catalog, store, _ = fitted
    tmp = tmp_path_factory.mktemp("headline")
    copy = _copy(store, tmp / "store")
    data = yaml.safe_load(catalog.read_text(encoding="utf-8"))
    data["profiles"]["default"]["safedig"].update(eval_benign="anchors", strengths=STRENGTHS)
    data["profiles"]["default"]["shard_rows"] = 64  # fewer, larger pooled shards: a faster extract
    path = tmp / "headline.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    for command in ("extract", "fit"):
        code, _, err = _cli(command, "--catalog", str(path), "--store", str(copy))
        assert code == 0, err
    resolved = load_catalog(str(path), "default")
    calls: list[tuple[Any, ...]] = []
    returned: list[list[loco.Cell]] = []
    original = loco.compute_loco

    def spy(*args: Any) -> list[loco.Cell]:
        calls.append(args)
        returned.append(original(*args))
        return returned[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loco, "compute_loco", spy)
        with writing(copy) as st:
            results = loco.loco_headline(st, resolved)
    return Headline(copy, resolved, results, calls, returned)


def _stored(store: Path) -> dict[tuple[str, str, float], dict[str, tuple[float, int]]]:
    """(held-out category, method, s) -> measure -> (value, n), from the store's eval_results rows."""
    with Store(store, read_only=True) as s:
        rows = s.sql("SELECT * FROM eval_results WHERE kind = 'safedig_loco'").to_pylist()
    out: dict[tuple[str, str, float], dict[str, tuple[float, int]]] = {}
    for r in rows:
        holdout, method = str(r["category"]).split("|", 1)
        assert r["method"] == method and r["target"] == TE and r["source"] is None
        cell = out.setdefault((holdout, method, float(r["alpha"])), {})
        assert r["metric"] not in cell, f"{r['metric']} stored twice for {holdout}, {method}, s={r['alpha']}"
        cell[str(r["metric"])] = (float(r["value"]), int(r["n"]))
    return out


def _vector_name(store: Path) -> str:
    with Store(store, read_only=True) as s:
        names = s.fetchall(
            "SELECT DISTINCT name FROM vectors WHERE target = ? AND kind = 'calibrated' AND mapper = 'ridge' "
            "AND category IS NULL",
            [TE],
        )
    assert len(names) == 1, names  # src -> te, from `safeport fit`
    return str(names[0][0])


def _shipped_unsafe(category: str) -> set[str]:
    """Text ids of the unsafe side of the category's test pairs the fixture took from the shipped file."""
    rows = pq.read_table(REPO / "data" / "SafeSteer_test.parquet").to_pylist()
    kept = [r for r in rows if r["category"] == category][: N_PAIRS["test"]]
    return {text_id(normalise(r["unsafe_prompt"])) for r in kept}


# --- what is computed, and on which texts ---------------------------------------------------------------------


def test_cells_cover_every_method_at_every_nonzero_strength_once(headline: Headline) -> None:
    (result,) = headline.results
    assert (result.model, result.status) == (TE, "done")
    assert len(headline.calls) == 1  # one piece per model
    _vector_name(headline.store)  # a calibrated ridge vector into te exists: the vector rows are expected
    stored = _stored(headline.store)
    expected = {(HOLDOUT, "original", 0.0)} | {
        (HOLDOUT, m, s) for m in [*METHODS, "vector"] for s in NONZERO
    }  # strength 0 is the original, once
    assert set(stored) == expected
    assert all(set(v) == set(MEASURES) for v in stored.values())
    (cells,) = headline.returned
    assert len(cells) == len(expected)
    for c in cells:  # what the stage returned is what it stored
        v = stored[(c.holdout, c.method, c.strength)]
        assert [v[m][0] for m in MEASURES] == [c.target, c.source, c.benign, c.benign_cos]
        assert (v["target"][1], v["source"][1], v["benign"][1]) == (c.n_target, c.n_source, c.n_benign)


def test_texts_are_the_held_out_test_prompts_a_source_sample_and_the_benign_captions(headline: Headline) -> None:
    ((cm, texts, sets, bundles, probe, vector, strengths, held),) = headline.calls
    assert cm.name == TE and list(held) == [HOLDOUT] and list(strengths) == STRENGTHS
    assert set(sets.target) == set(sets.source) == {HOLDOUT}
    target, source = sets.target[HOLDOUT], sets.source[HOLDOUT]
    assert len(target) == N_PAIRS["test"] and set(target) == _shipped_unsafe(HOLDOUT)
    # Every source category's test prompts (4 each, under SOURCE_PER_CATEGORY), none of the held-out one.
    assert len(source) == len(set(source)) == len(SOURCES) * N_PAIRS["test"] <= loco.SOURCE_PER_CATEGORY * 2
    assert set(source) == set().union(*(_shipped_unsafe(c) for c in SOURCES)) and not set(source) & set(target)
    with Store(headline.store, read_only=True) as s:
        anchors = {str(t) for (t,) in s.fetchall("SELECT text_id FROM dataset_texts WHERE dataset = 'anchors'")}
        side = dict(s.fetchall("SELECT text_id, side FROM dataset_texts WHERE dataset = 'pairs'"))
    assert sets.benign == sorted(anchors)[: loco.BENIGN] and len(anchors) <= loco.BENIGN  # all of them, by id
    assert {side[t] for t in [*target, *source]} == {"unsafe"}
    assert set(texts) == {*target, *source, *sets.benign}
    assert all(text_id(texts[t]) == t for t in texts)  # each id's own text
    assert set(bundles) == {(HOLDOUT, True), (HOLDOUT, False)}
    assert [b.lineage["refit"] for b in (bundles[(HOLDOUT, True)], bundles[(HOLDOUT, False)])] == [True, False]
    assert vector is not None and probe.n_train == 2 * len(CATEGORIES) * N_PAIRS["train"]


def test_source_sample_and_benign_captions_are_capped_by_text_id(
    headline: Headline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loco, "SOURCE_PER_CATEGORY", 2)
    monkeypatch.setattr(loco, "BENIGN", 5)
    with Store(headline.store, read_only=True) as s:
        sets = loco._texts(s, "pairs", "anchors", ["Sexual", "Violence"])
        anchors = sorted({str(t) for (t,) in s.fetchall("SELECT text_id FROM dataset_texts WHERE dataset = 'anchors'")})
    for h in ("Sexual", "Violence"):
        assert set(sets.target[h]) == _shipped_unsafe(h)  # the held-out category: never sampled
        others = sorted(set(CATEGORIES) - {h})
        assert sets.source[h] == [t for c in others for t in sorted(_shipped_unsafe(c))[:2]]
    assert sets.benign == anchors[:5]


# --- known answers: flags on rows computed here ---------------------------------------------------------------


def _encode(pooler: Any, texts: Mapping[str, str], ids: Sequence[str]) -> np.ndarray:
    """Pooled rows in ``ids`` order, in one batch in that order (not the flow's length-sorted batches)."""
    return np.asarray(pooler.encode([texts[t] for t in ids]).values)


def _check_rate(probe: SafetyProbe, rows: np.ndarray, got: float, what: str) -> None:
    margin = probe.pipeline.decision_function(rows)
    lo, hi = float(np.mean(margin > BORDER)), float(np.mean(margin > -BORDER))
    assert lo <= got <= hi, f"{what}: stored {got}, rows computed here give {lo} (to {hi} near the boundary)"


def _check_cell(
    probe: SafetyProbe, cell: Mapping[str, tuple[float, int]], parts: Sequence[np.ndarray], plain: np.ndarray, what: str
) -> None:
    for name, rows in zip(("target", "source", "benign"), parts, strict=True):
        assert cell[name][1] == len(rows), (what, name)
        _check_rate(probe, rows, cell[name][0], f"{what} {name}")
    b = parts[2].astype(np.float64)
    cos = np.sum(b * plain, axis=1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(plain, axis=1))
    assert cell["benign_cos"][0] == pytest.approx(float(np.mean(cos)), abs=1e-5), what


def test_each_cell_is_the_probe_on_rows_encoded_here(headline: Headline) -> None:
    ((_, texts, sets, *_),) = headline.calls
    target, source, benign = sets.target[HOLDOUT], sets.source[HOLDOUT], sets.benign
    ids = [*target, *source, *benign]
    split = [len(target), len(target) + len(source)]
    stored = _stored(headline.store)
    pooler: Any = load_extractor(model_source(headline.resolved, TE))  # a model of our own, not the flow's
    with Store(headline.store, read_only=True) as s:
        meta, values = s.activations(TE, "pairs", "split = 'train'")
        side = np.asarray(meta.column("side").to_pylist())
        probe = train_probe(values[side == "safe"], values[side == "unsafe"], seed=42)
        meta, test_rows = s.activations(TE, "pairs", "split = 'test' AND side = 'unsafe'")
        extracted = dict(zip(meta.column("text_id").to_pylist(), test_rows, strict=True))
        bundles = {refit: _bundle_from_store(s, BUNDLE, refit) for refit in (True, False)}
        vector, _ = artifacts.load_vector(s, _vector_name(headline.store))

    plain = _encode(pooler, texts, ids)
    # The rows here are MiniLM's pooled rows: those `safeport extract` stored for the same texts.
    np.testing.assert_allclose(plain[: split[1]], np.stack([extracted[t] for t in [*target, *source]]), atol=1e-4)
    parts = np.split(plain, split)
    original = stored[(HOLDOUT, "original", 0.0)]
    _check_cell(probe, original, parts, parts[2].astype(np.float64), "original")
    assert original["benign_cos"][0] == pytest.approx(1.0, abs=1e-6)

    for method, (which, refit, mode) in METHODS.items():
        bundle: SafeDigBundle = bundles[refit].routed() if which == "routed" else bundles[refit].fixed()
        assert len(bundle.positions) == (1 if which == "fixed" else 2)
        with safedig_hooks(pooler.model, bundle, TOP, mode):
            steered = _encode(pooler, texts, ids)
        assert np.abs(steered - plain).max() > 1e-3, f"{method}: the hooks changed nothing"
        _check_cell(probe, stored[(HOLDOUT, method, TOP)], np.split(steered, split), parts[2], f"{method} s={TOP}")

    moved = [x + TOP * vector for x in parts]
    _check_cell(probe, stored[(HOLDOUT, "vector", TOP)], moved, parts[2], f"vector s={TOP}")


# --- the report and the rerun -----------------------------------------------------------------------------------


def test_report_has_a_verdict_per_held_out_category_the_table_and_no_prompt_text(headline: Headline) -> None:
    (result,) = headline.results
    report = headline.store / "reports" / f"safedig-loco-{TE}.md"
    assert Path(result.report) == report
    assert set(result.verdicts) == {HOLDOUT} and result.verdicts[HOLDOUT].startswith(f"{HOLDOUT}: SafeDIG ")
    md = report.read_text(encoding="utf-8")
    assert f"- {result.verdicts[HOLDOUT]}\n" in md and f"Verdict: {result.verdicts[HOLDOUT]}\n" in md
    n = len(_shipped_unsafe(HOLDOUT))
    with Store(headline.store, read_only=True) as s:
        n_benign = s.scalar("SELECT count(DISTINCT text_id) FROM dataset_texts WHERE dataset = 'anchors'")
    assert (
        f"### Held out: {HOLDOUT} ({n} test unsafe prompts; {len(SOURCES) * n} source-category test unsafe "
        f"prompts; {n_benign} benign captions)" in md
    )
    for (_, method, strength), v in _stored(headline.store).items():  # one table row per stored cell
        cells = [method, f"{strength:g}", *(f"{v[m][0]:.3f}" for m in MEASURES[:3]), f"{v['benign_cos'][0]:.4f}"]
        assert md.count("| " + " | ".join(cells) + " |") == 1, cells
    figure = report.parent / f"safedig-loco-{TE}-heldout.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Numbers only: no text of any dataset, nor its start, is in the report (counts only: a failure must not
    # print the texts either).
    with Store(headline.store, read_only=True) as s:
        texts = [t for (t,) in s.fetchall("SELECT text FROM texts")]
    assert len(texts) > len(CATEGORIES) * 2 * sum(N_PAIRS.values())
    assert sum(1 for t in texts if t in md or (len(t) >= 24 and t[:24] in md)) == 0


def test_a_second_call_computes_nothing_and_leaves_the_report(
    headline: Headline, tmp_path: Path, refuse_work: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = _copy(headline.store, tmp_path / "store")
    report = copy / "reports" / f"safedig-loco-{TE}.md"
    before = (report.read_bytes(), report.stat().st_mtime_ns)
    n_rows = len(_stored(copy))

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the headline was computed or rendered again")

    monkeypatch.setattr(loco, "extractor_for", refuse)  # bound at import
    monkeypatch.setattr(loco, "compute_loco", refuse)
    monkeypatch.setattr(safeport.eval.plots, "loco_figure", refuse)
    monkeypatch.setattr(artifacts, "write_report", refuse)
    with writing(copy) as st:
        (again,) = loco.loco_headline(st, headline.resolved)
    (first,) = headline.results
    assert (again.model, again.status, again.report) == (TE, "skipped", str(report))
    assert again.verdicts == first.verdicts  # the same verdicts, from the stored rows
    assert (report.read_bytes(), report.stat().st_mtime_ns) == before
    assert len(_stored(copy)) == n_rows
    with Store(copy, read_only=True) as s:
        (status,) = s.fetchall(
            "SELECT status FROM runs WHERE flow = 'safedig' AND task = 'loco' ORDER BY started_at DESC LIMIT 1"
        )
    assert status == ("skipped",)
