"""The real Prefect eval flow on a tiny Flux pipeline: outputs, scores, report, exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import safeport.eval.generate
import safeport.flows.eval
import safeport.flows.eval_generate
from safeport.flows.eval import eval_flow
from safeport.store.artifacts import VectorRecord, save_vectors
from safeport.store.location import OUTPUTS as OUTPUTS_DIR
from safeport.store.store import Store
from safeport.texts import text_id
from tests.flows.eval_fixtures import CALIBRATED, NATIVE, SETTINGS, SRC, TGT, eval_catalog, fill_store

# Harmless stand-ins for I2P prompts; the categories drive the oracle weights.
PROMPTS = [
    ("a cat on a red sofa", "sexual"),
    ("two dogs running on a beach", "violence, hate"),
    ("a watercolor of mountains", None),
]


# This module's setup, as other eval tests and bench/bench_eval.py use it.
def _catalog(tmp: Path) -> Path:
    return eval_catalog(tmp)


def _fill_store(root: Path, prompts: list[tuple[str, str | None]] = PROMPTS) -> None:
    fill_store(root, prompts)


def _generations(root: Path) -> dict[str, dict[str, Any]]:
    with Store(root, read_only=True) as store:
        rows = store.sql("SELECT * FROM generations").to_pylist()
    return {r["output_key"]: r for r in rows}


def _mtimes(root: Path, gens: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {f: (root / OUTPUTS_DIR / f).stat().st_mtime_ns for g in gens.values() for f in json.loads(g["files"])}


def _run(catalog: Path, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "catalog_path": str(catalog),
        "target": TGT,
        "vectors": [NATIVE, CALIBRATED],
        "alphas": [0.0, 1.5],
        "prompts": "tiny-prompts",
        "settings": SETTINGS,
    }
    args.update(kw)
    return eval_flow(**args)


def test_eval_flow_outputs_scores_report_and_exact_resume(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = _catalog(tmp_path)
    root = tmp_path / "store"
    _fill_store(root)

    # 1. Part of the sweep: the first two prompts. Per prompt: original, native, calibrated, uniform
    #    and oracle (both prompts have a category with a vector) = 5 outputs.
    first = _run(catalog, limit=2)
    assert [(g.planned, g.generated, g.skipped) for g in first.generated] == [(10, 10, 0)]
    gens1 = _generations(root)
    assert len(gens1) == 10
    mtimes1 = _mtimes(root, gens1)
    assert len(mtimes1) == 10

    # 2. The full sweep crashes after one new output: what was committed stays committed. Outputs are
    #    committed in batches (safeport.flows.eval_generate.GEN_BATCH), so the finished output of the batch in
    #    flight is lost with it (its file is on disk, unrecorded: the rerun overwrites it).
    real_generate = safeport.eval.generate.generate_batch  # one pipeline call (here: one output per call)
    calls = {"n": 0}

    def crash_on_second(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash mid-sweep")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(safeport.eval.generate, "generate_batch", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(catalog)
    monkeypatch.setattr(safeport.eval.generate, "generate_batch", real_generate)
    assert len(_generations(root)) == 10

    # 3. Rerun: only the rest is generated; the third prompt has no category, so its oracle output
    #    is steered by the global vector (the fit report's rule; 5 outputs for it in all).
    third = _run(catalog)
    assert [(g.planned, g.generated, g.skipped) for g in third.generated] == [(15, 5, 10)]
    gens = _generations(root)
    assert len(gens) == 15
    with Store(root, read_only=True) as store:
        assert store.scalar("SELECT count(DISTINCT output_key) FROM generations") == 15
        by_method = dict(store.con.execute("SELECT method, count(*) FROM generations GROUP BY 1").fetchall())
        assert by_method == {
            "original": 3,
            NATIVE: 3,
            CALIBRATED: 3,
            f"uniform:{CALIBRATED}": 3,
            f"oracle:{CALIBRATED}": 3,
        }
        # NudeNet scored every output once (on the PNG written to disk) and stored its verdict.
        scores = store.sql("SELECT output_key, metric, flagged, detail_json FROM scores").to_pylist()
        assert sorted(s["output_key"] for s in scores if s["metric"] == "nudenet") == sorted(gens)
        assert {s["metric"] for s in scores} == {"nudenet"}  # no CLIP weights here: no Q16, no CLIP-Sim
        assert all(s["flagged"] is False and len(json.loads(s["detail_json"])["frames"]) == 1 for s in scores)
        # Aggregates in eval_results, with the prompt set's ASR at each α.
        asr = store.sql(
            "SELECT method, alpha, value, n FROM eval_results WHERE kind = 'generation' AND metric = 'asr'"
        ).to_pylist()
        assert {(r["method"], r["alpha"], r["n"]) for r in asr} >= {("original", 0.0, 3), (CALIBRATED, 1.5, 3)}
        texts = [t for t, _ in PROMPTS]
        rows = store.sql("SELECT * FROM generations").to_pylist() + store.sql("SELECT * FROM scores").to_pylist()
        assert not any(t in json.dumps(r, default=str) for r in rows for t in texts)
    # Earlier outputs were not regenerated: same files, same bytes on disk, same records.
    mtimes = _mtimes(root, gens)
    assert {f: mtimes[f] for f in mtimes1} == mtimes1
    assert {k: gens[k]["created_at"] for k in gens1} == {k: g["created_at"] for k, g in gens1.items()}

    # Report: Table 1 layout, honest n/a for missing weights, the ASR plot.
    report = Path(third.report)
    text = report.read_text(encoding="utf-8")
    assert "## Table 1 (α = 1.5)" in text
    assert "Native (Target)" in text and "Alignment Mapping (Source: src)" in text and "| SVD |" in text
    assert "n/a (no CLIP weights)" in text and "Multi-category" in text
    assert (report.parent / "eval-tflux-asr.png").is_file()
    assert not any(t in text for t, _ in PROMPTS)
    assert any("q16" in n for n in third.notices)

    # 4. A rerun with nothing new loads no pipeline at all.
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a pipeline was loaded although every output exists")

    monkeypatch.setattr(safeport.flows.eval_generate, "load_pipeline", refuse)
    again = _run(catalog)
    assert [(g.generated, g.skipped) for g in again.generated] == [(0, 15)]
    assert _mtimes(root, _generations(root)) == mtimes


def test_eval_flow_refuses_unknown_vectors_and_wrong_dims(prefect_api: str, tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    root = tmp_path / "store"
    _fill_store(root)
    from safeport.store.store import StoreError

    with pytest.raises(StoreError, match="no vector named 'nope'"):
        _run(catalog, vectors=["nope"])
    with Store(root) as store:
        bad = VectorRecord("k-bad", "bad", "calibrated", SRC, TGT, "ridge", None, np.ones(7, np.float32), {})
        save_vectors(store, "fit-2", [bad])
    with pytest.raises(ValueError, match=r"dim 7 but the pipeline's prompt_embeds have dim 32"):
        _run(catalog, vectors=["bad"], limit=1, categories=False)
    with pytest.raises(ValueError, match="not in the α sweep"):
        _run(catalog, table_alpha=9.0)
    with pytest.raises(ValueError, match=r"--alphas 1e\+308 is not between -100 and 100"):
        _run(catalog, alphas=[0.0, 1e308])  # the catalog's bound on α holds for the CLI's --alphas too


def test_eval_flow_scores_q16_clip_sim_and_fid_when_weights_exist(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a (tiny, local) CLIP, Q16 prompts and reference images every metric is computed and reported."""
    from PIL import Image

    from tests.eval.test_detectors import save_tiny_clip

    catalog = _catalog(tmp_path)
    root = tmp_path / "store"
    _fill_store(root)
    captions = ["a red apple on a table", "a boat on a lake"]
    rows = pa.table(
        {
            "idx": [0, 1],
            "text_id": [text_id(t) for t in captions],
            "text": captions,
            **{c: pa.array([None, None], pa.string()) for c in ("split", "category", "side")},
            "pair_id": pa.array([None, None], pa.int32()),
        }
    )
    with Store(root) as store:
        store.register_dataset("tiny-captions", "prompts", "hash-c", rows, {})
    clip = save_tiny_clip(tmp_path / "clip")
    np.save(tmp_path / "q16.npy", np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32))
    (tmp_path / "ref").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref" / f"{i}.png")

    def colour_features(*_: Any, **__: Any) -> Any:
        def features(images: Any) -> np.ndarray:
            return np.stack([np.asarray(i.convert("RGB"), np.float64).reshape(-1, 3).mean(0) for i in images])

        return features

    monkeypatch.setattr(safeport.flows.eval, "inception_features", colour_features)
    result = _run(
        catalog,
        vectors=[CALIBRATED],
        categories=False,
        limit=1,
        alphas=[0.0, 1.0],
        utility="tiny-captions",
        clip_model=str(clip),
        q16_prompts=str(tmp_path / "q16.npy"),
        fid_reference=str(tmp_path / "ref"),
    )
    assert result.notices == ()
    with Store(root, read_only=True) as store:
        counts = dict(store.con.execute("SELECT metric, count(*) FROM scores GROUP BY 1").fetchall())
        # 1 prompt + 2 captions, each original + steered = 6 outputs; CLIP-Sim on the 4 caption outputs.
        assert counts == {"nudenet": 6, "q16": 6, "clip_sim": 4}
        metrics = store.sql("SELECT DISTINCT metric FROM eval_results WHERE kind = 'generation'").to_pylist()
        assert {r["metric"] for r in metrics} == {"asr", "clip_sim", "fid"}
    text = Path(result.report).read_text(encoding="utf-8")
    table = text.split("## Table 1")[1].split("##")[0]
    assert "n/a" not in table
    assert (Path(result.report).parent / "eval-tflux-clip_sim.png").is_file()
