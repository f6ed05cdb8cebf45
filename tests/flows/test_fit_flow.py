"""The real Prefect run/fit flows on a tiny store: vectors, lineage, report, bit-for-bit reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from safeport.flows.fit import fit_flow
from safeport.flows.run import run_flow
from safeport.mappers.vectors import anchor_scale, centre, train_mean
from safeport.store import artifacts
from safeport.store.store import Store
from tests.flows.catalogs import tiny_catalog


@pytest.fixture(scope="module")
def fitted(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    catalog = tiny_catalog(tmp, anchors=60, pairs=24, prompts=12)
    extracted, fits, *_ = run_flow(str(catalog))
    assert {r.status for r in extracted} == {"done"}
    assert [(f.source, f.target, f.status) for f in fits] == [("src", "tgt", "done")]
    return catalog


def _vectors(root: Path) -> dict[str, np.ndarray]:
    with Store(root, read_only=True) as store:
        names = [r[0] for r in store.con.execute("SELECT name FROM vectors ORDER BY name").fetchall()]
        return {n: artifacts.load_vector(store, n)[0] for n in names}


def test_vectors_baselines_and_report_exist(fitted: Path) -> None:
    root = fitted.parent / "store"
    vectors = _vectors(root)
    for name in (
        "source:src",
        "native:tgt",
        "calibrated:src->tgt:procrustes",
        "calibrated:src->tgt:ridge",
        "uncalibrated:src->tgt:ridge",
        "raw:src->tgt:ridge",
        "random:src->tgt",
        "string:src->tgt",
    ):
        assert name in vectors, name
    assert any(n.startswith("calibrated:src->tgt:ridge:") for n in vectors)  # per-category vectors
    report = root / "reports" / "fit-src--tgt.md"
    text = report.read_text()
    assert "Alignment maps (test anchors)" in text and "Verdict" in text
    assert (root / "reports" / "fit-src--tgt-prompts-proxy.png").stat().st_size > 1000


def test_calibration_and_source_vector_match_hand_computation(fitted: Path) -> None:
    root = fitted.parent / "store"
    vectors = _vectors(root)
    with Store(root, read_only=True) as store:
        src_a = store.activations("src", "anchors", "split = 'train'")[1]
        tgt_a = store.activations("tgt", "anchors", "split = 'train'")[1]
        meta, pairs = store.activations("src", "pairs", "split = 'train'")
    side = np.asarray(meta.column("side").to_pylist())
    pid = np.asarray(meta.column("pair_id").to_pylist())
    safe = pairs[side == "safe"][np.argsort(pid[side == "safe"])]
    unsafe = pairs[side == "unsafe"][np.argsort(pid[side == "unsafe"])]
    v_s = (safe.astype(np.float64) - unsafe).mean(axis=0)
    np.testing.assert_allclose(vectors["source:src"], v_s, rtol=1e-5, atol=1e-6)
    a, b = centre(src_a, train_mean(src_a)), centre(tgt_a, train_mean(tgt_a))
    s = np.median(np.linalg.norm(b, axis=1)) / np.median(np.linalg.norm(a, axis=1))
    assert anchor_scale(a, b) == pytest.approx(s)
    for mapper in ("procrustes", "ridge"):
        cal = vectors[f"calibrated:src->tgt:{mapper}"]
        raw = vectors[f"raw:src->tgt:{mapper}"]
        np.testing.assert_allclose(np.linalg.norm(cal), s * np.linalg.norm(v_s), rtol=1e-5)
        np.testing.assert_allclose(cal / np.linalg.norm(cal), raw / np.linalg.norm(raw), atol=1e-5)
    rnd = vectors["random:src->tgt"]
    np.testing.assert_allclose(np.linalg.norm(rnd), s * np.linalg.norm(v_s), rtol=1e-5)


def test_lineage_points_at_the_exact_arrays_used(fitted: Path) -> None:
    root = fitted.parent / "store"
    with Store(root, read_only=True) as store:
        rows = store.sql("SELECT * FROM lineage WHERE kind = 'calibrated' AND category IS NULL").to_pylist()
        units = {
            r[0]
            for r in store.con.execute(
                "SELECT DISTINCT unit_key FROM activations WHERE dataset IN ('anchors', 'pairs')"
            ).fetchall()
        }
        split_hash = store.scalar("SELECT DISTINCT split_hash FROM maps")
    assert {r["mapper"] for r in rows} == {"procrustes", "ridge"}
    for r in rows:
        assert set(json.loads(r["input_units"])) <= units
        assert r["split_hash"] == split_hash
        assert json.loads(r["map_params"])  # chosen hyper-parameters recorded
    ridge = next(r for r in rows if r["mapper"] == "ridge")
    assert "lambda" in json.loads(ridge["map_params"])


def test_rerun_refits_nothing_and_is_bit_for_bit(fitted: Path) -> None:
    root = fitted.parent / "store"
    before = _vectors(root)
    with Store(root, read_only=True) as store:
        maps_before = store.sql("SELECT map_key, created_at FROM maps ORDER BY 1").to_pylist()
    again = fit_flow(str(fitted))
    assert [r.status for r in again] == ["skipped"]
    after = _vectors(root)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with Store(root, read_only=True) as store:
        assert store.sql("SELECT map_key, created_at FROM maps ORDER BY 1").to_pylist() == maps_before


def test_fit_from_scratch_reproduces_the_same_vectors(fitted: Path, tmp_path: Path) -> None:
    """A second store built from the same inputs gives identical vectors (seed 42 everywhere)."""
    first = _vectors(fitted.parent / "store")
    catalog = tiny_catalog(tmp_path, anchors=60, pairs=24, prompts=12)
    run_flow(str(catalog))
    second = _vectors(tmp_path / "store")
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_every_vector_a_fit_makes_exports_and_imports_unchanged(fitted: Path, tmp_path: Path) -> None:
    """Every kind and key a real fit writes passes the checks import and export make on hostile files."""
    from safeport.store.maintenance import export_vectors, import_vectors

    root = fitted.parent / "store"
    vectors = _vectors(root)
    files = export_vectors(root, tmp_path / "out")
    assert len(files) == len(vectors)
    done = import_vectors(tmp_path / "other", tmp_path / "out")
    assert {v.status for v in done} == {"imported"} and len(done) == len(vectors)
    imported = _vectors(tmp_path / "other")
    assert imported.keys() == vectors.keys()
    for name, values in vectors.items():
        np.testing.assert_array_equal(imported[name], values, err_msg=name)


def test_the_mlp_trains_from_the_store_stream_of_paired_anchor_rows(fitted: Path) -> None:
    """Each epoch of the MLP's stream is every train anchor once, source and target rows of the same text."""
    from safeport.flows.common import catalog, model_source
    from safeport.flows.fit import _Keys, _mlp_from_store
    from safeport.mappers.mlp import MLPMapper
    from safeport.mappers.transfer import Anchors, centred_splits, centring

    resolved = catalog(str(fitted), "default")
    src, tgt = (model_source(resolved, m).spec().key() for m in ("src", "tgt"))
    root = fitted.parent / "store"
    with Store(root, read_only=True) as store:
        a_meta, a_src = store.activations("src", "anchors")
        _, a_tgt = store.activations("tgt", "anchors")
        splits = np.asarray(a_meta.column("split").to_pylist())
        c = centring(Anchors(a_src, a_tgt, splits))
        ids = [t for i, t in enumerate(a_meta.column("text_id").to_pylist()) if splits[i] == "train"]
        train = dict(zip(ids, zip(a_src[splits == "train"], a_tgt[splits == "train"], strict=True), strict=True))
        src_rows = np.stack([train[t][0] for t in ids])
        seen: list[list[str]] = []
        real = MLPMapper.fit_stream

        def spy(self: MLPMapper, batches, a_val, b_val, n_train):
            for epoch in (1, 2):
                order = []
                for a, b in batches(epoch):
                    for row_a, row_b in zip(a + c.mu_s.astype(np.float32), b + c.mu_t.astype(np.float32), strict=True):
                        text = ids[int(np.abs(src_rows - row_a).sum(axis=1).argmin())]
                        np.testing.assert_allclose(row_a, train[text][0], atol=1e-5)
                        np.testing.assert_allclose(row_b, train[text][1], atol=1e-5)  # paired: the same text
                        order.append(text)
                seen.append(order)
            assert n_train == len(train)
            return real(self, batches, a_val, b_val, n_train)

        keys = _Keys(src, tgt, "", "", None)
        mp = pytest.MonkeyPatch()
        mp.setattr(MLPMapper, "fit_stream", spy)
        try:
            fitted_map = _mlp_from_store(
                store, keys, "anchors", c, centred_splits(Anchors(a_src, a_tgt, splits), c)["val"], 42
            )
        finally:
            mp.undo()
        again = _mlp_from_store(store, keys, "anchors", c, centred_splits(Anchors(a_src, a_tgt, splits), c)["val"], 42)
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(train)  # every train anchor exactly once per epoch
    assert seen[0] != seen[1]  # reshuffled each epoch
    for name, value in fitted_map.state().items():  # seeded stream, deterministic training: the same map
        np.testing.assert_array_equal(value, again.state()[name])
