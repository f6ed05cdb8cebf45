"""The real Prefect extract flow: incremental reruns, new texts only, and kill -9 at random points."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import safeport.flows.common
from safeport.flows.extract import extract_flow
from safeport.store.store import Store
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog


def _snapshot(root: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """Every visible (model, dataset, text_id) row of a store with its values."""
    out: dict[tuple[str, str, str], np.ndarray] = {}
    with Store(root, read_only=True) as store:
        pairs = store.con.execute("SELECT DISTINCT model, dataset FROM activations WHERE current").fetchall()
        for model, dataset in pairs:
            meta, values = store.activations(model, dataset)
            for tid, row in zip(meta.column("text_id").to_pylist(), values, strict=True):
                out[(model, dataset, tid)] = row
    return out


def _counts(root: Path) -> dict[str, int]:
    with Store(root, read_only=True) as store:
        return {
            "rows": store.scalar("SELECT count(*) FROM activation_rows"),
            "distinct": store.scalar("SELECT count(DISTINCT (model_key, text_id)) FROM activation_rows"),
            "texts": store.scalar("SELECT count(DISTINCT text_id) FROM dataset_texts"),
        }


def test_rerun_with_nothing_new_loads_no_model(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tiny_catalog(tmp_path)
    first = extract_flow(str(catalog))
    assert {r.status for r in first} == {"done"}
    counts = _counts(tmp_path / "store")
    assert counts["rows"] == counts["distinct"] == 2 * counts["texts"]
    snap = _snapshot(tmp_path / "store")

    def refuse(*_: object) -> None:
        raise AssertionError("a model was loaded on a rerun with nothing new")

    monkeypatch.setattr(safeport.flows.common, "load_extractor", refuse)
    second = extract_flow(str(catalog))
    assert {r.status for r in second} == {"skipped"}
    assert sum(r.rows for r in second) == 0
    after = _snapshot(tmp_path / "store")
    assert after.keys() == snap.keys()
    assert all(np.array_equal(after[k], snap[k]) for k in snap)
    with Store(tmp_path / "store", read_only=True) as store:
        statuses = store.con.execute("SELECT status, count(*) FROM runs GROUP BY 1 ORDER BY 1").fetchall()
    assert dict(statuses) == {"done": len(first), "skipped": len(second)}


def test_grown_dataset_extracts_only_new_texts(prefect_api: str, tmp_path: Path) -> None:
    extract_flow(str(tiny_catalog(tmp_path, anchors=20)))
    before = _snapshot(tmp_path / "store")
    results = extract_flow(str(tiny_catalog(tmp_path, anchors=40)))
    after = _snapshot(tmp_path / "store")
    new_anchor_rows = {k for k in after if k[1] == "anchors"} - {k for k in before if k[1] == "anchors"}
    by_model = {r.model: 0 for r in results}
    for r in results:
        by_model[r.model] += r.rows
    for model in by_model:
        assert by_model[model] == sum(1 for k in new_anchor_rows if k[0] == model) > 0
    # Rows computed before are untouched (same unit, same values), not recomputed.
    for k, v in before.items():
        if k in after:
            assert np.array_equal(after[k], v)


def _chunk_files(root: Path) -> int:
    base = root / "arrays.zarr" / "acts"
    return sum(1 for p in base.rglob("*") if p.is_file() and "/c/" in str(p)) if base.exists() else 0


def _extract_subprocess(catalog: Path, api: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "safeport.cli", "extract", "--catalog", str(catalog)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_after_chunks(catalog: Path, root: Path, api: str, threshold: int, timeout: float = 120) -> bool:
    """Start an extraction and kill -9 it once ``threshold`` chunk files exist; False if it finished first."""
    proc = _extract_subprocess(catalog, api)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _chunk_files(root) >= threshold:
            time.sleep(random.uniform(0.0, 0.05))  # land anywhere: mid-batch, mid-write, mid-commit
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait(timeout=timeout)
    return False


@pytest.mark.parametrize("kills", [4])
def test_kill9_then_resume_equals_uninterrupted_run(prefect_api: str, tmp_path: Path, kills: int) -> None:
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    ref_dir.mkdir()
    crash_dir.mkdir()
    extract_flow(str(tiny_catalog(ref_dir, shard_rows=4)))
    reference = _snapshot(ref_dir / "store")
    total_chunks = _chunk_files(ref_dir / "store")

    catalog = tiny_catalog(crash_dir, shard_rows=4)
    rng = random.Random(1234)
    thresholds = sorted(rng.sample(range(1, total_chunks), kills))
    killed = sum(_kill_after_chunks(catalog, crash_dir / "store", prefect_api, t) for t in thresholds)
    assert killed >= 1, "no run was killed mid-way; the test did not test anything"
    final = _extract_subprocess(catalog, prefect_api)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode(errors="replace")[-2000:]

    recovered = _snapshot(crash_dir / "store")
    assert recovered.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_allclose(recovered[key], value, rtol=1e-6, atol=1e-7)
    counts = _counts(crash_dir / "store")
    assert counts["rows"] == counts["distinct"] == _counts(ref_dir / "store")["rows"]


def test_catalog_fixture_is_valid_yaml(tmp_path: Path) -> None:
    data = yaml.safe_load(tiny_catalog(tmp_path).read_text())
    assert set(data["profiles"]["default"]["models"]) == {"src", "tgt"}


def test_nan_activations_are_refused_and_committed_rows_kept(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that emits NaN for one text fails the unit naming it; earlier shards stay committed."""
    from safeport.extractors.base import ExtractionError

    catalog = tiny_catalog(tmp_path, shard_rows=4)
    real_load = safeport.flows.common.load_extractor
    calls = {"n": 0}

    def poisoned(source: Any) -> Any:
        ex = real_load(source)
        encode = ex.encode

        def encode_with_nan(texts: Any) -> Any:
            pooled = encode(texts)
            calls["n"] += 1
            if calls["n"] == 5:  # the fifth batch of the first model
                pooled.values[0, 0] = np.nan
            return pooled

        monkeypatch.setattr(ex, "encode", encode_with_nan)
        return ex

    monkeypatch.setattr(safeport.flows.common, "load_extractor", poisoned)
    safeport.flows.common.release_models()
    with pytest.raises(
        ExtractionError, match=r"model .* produced NaN/inf activations for 1 text\(s\), e\.g\. text ids"
    ):
        extract_flow(str(catalog))
    with Store(tmp_path / "store", read_only=True) as store:
        committed = store.scalar("SELECT count(*) FROM shards")
        bad = store.scalar("SELECT count(*) FROM activation_rows")
    assert (committed, bad) == (4, 16)  # four one-batch shards of four rows came before the NaN batch
    monkeypatch.setattr(safeport.flows.common, "load_extractor", real_load)
    safeport.flows.common.release_models()
    results = extract_flow(str(catalog))  # resumes: the failed shard is redone, nothing is duplicated
    counts = _counts(tmp_path / "store")
    assert counts["rows"] == counts["distinct"] == 2 * counts["texts"]
    assert any(r.status == "done" for r in results)
