"""Extraction on a local 2-worker Dask cluster gives the same store as the single-process run, bit for bit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.rebuild import rebuild
from flows.scale import extract_dask_flow
from store import artifacts
from store.store import Store
from tests.flows.catalogs import tiny_catalog

SIZES: dict[str, Any] = {"anchors": 24, "pairs": 6, "prompts": 4, "shard_rows": 4}

# Everything a run writes except wall-clock columns (timestamps, run ids, seconds).
TABLES = {
    "models": "SELECT model_key, name, role, family, model_id, revision, weights, spec_json, dim, current FROM models",
    "datasets": "SELECT dataset, kind, content_hash, n_rows, report_json FROM datasets",
    "texts": "SELECT * FROM texts",
    "dataset_texts": "SELECT * FROM dataset_texts",
    "units": "SELECT unit_key, model_key, dataset, dataset_hash, array_path, n_rows, dim, dtype, shard_rows, status "
    "FROM units",
    "unit_texts": "SELECT * FROM unit_texts",
    "shards": "SELECT unit_key, shard, row_start, row_stop, checksum, tokens FROM shards",
    "activation_rows": "SELECT * FROM activation_rows",
    "fits": "SELECT fit_key, source, target, status, inputs_json FROM fits",
    "maps": "SELECT map_key, source_key, target_key, mapper, params_json, split_hash, input_units FROM maps",
    "vectors": "SELECT vector_key, name, kind, fit_key, dim, norm, checksum, lineage_json FROM vectors",
    "eval_results": "SELECT fit_key, kind, source, target, method, category, metric, alpha, value, n FROM eval_results",
}


def _dump(root: Path) -> dict[str, Any]:
    """Every table (sorted rows), every activation array and every vector, read back through the store."""
    out: dict[str, Any] = {}
    with Store(root, read_only=True) as store:
        for name, sql in TABLES.items():
            out[name] = sorted(map(repr, store.con.execute(sql).fetchall()))
        for (path,) in store.con.execute("SELECT array_path FROM units").fetchall():
            out[path] = np.asarray(store.arrays[path][...])  # type: ignore[index]
        for (name,) in store.con.execute("SELECT DISTINCT name FROM vectors").fetchall():
            out[f"vector:{name}"] = artifacts.load_vector(store, name)[0]
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch in this process computes like a Dask worker (one intra-op thread each).

    Bit-for-bit equality needs the same kernels on both sides: torch's CPU matmuls
    round differently with 1 and 2 threads (~6e-8 on the tiny Llama).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local cluster of two single-threaded worker processes on loopback; yields its address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c:
        yield str(c.scheduler_address)


def test_two_dask_workers_equal_the_single_process_store(
    prefect_api: str, tmp_path: Path, cluster: str, one_thread: None
) -> None:
    catalog = str(tiny_catalog(tmp_path, **SIZES))
    t0 = time.perf_counter()
    single = rebuild(catalog, store=str(tmp_path / "single"))
    t1 = time.perf_counter()
    dask = rebuild(catalog, store=str(tmp_path / "dask"), dask_address=cluster)
    t2 = time.perf_counter()
    print(f"\nrebuild on the tiny catalog: single process {t1 - t0:.1f}s, 2 Dask workers {t2 - t1:.1f}s")

    assert [(r.model, r.dataset, r.unit_key, r.status, r.rows, r.tokens) for r in dask.extracted] == [
        (r.model, r.dataset, r.unit_key, r.status, r.rows, r.tokens) for r in single.extracted
    ]
    a, b = _dump(tmp_path / "single"), _dump(tmp_path / "dask")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key  # exact, NaN-free
        else:
            assert a[key] == b[key], key
    assert len(a["shards"]) > 8  # several shards per unit: the work really was split

    with Store(tmp_path / "dask", read_only=True) as store:
        flows_seen = {r[0] for r in store.con.execute("SELECT DISTINCT flow FROM runs").fetchall()}
    assert flows_seen >= {"extract", "fit"}


def test_dask_resumes_a_grown_dataset_like_the_single_process_path(
    prefect_api: str, tmp_path: Path, cluster: str, one_thread: None
) -> None:
    """Half the rows exist (committed by the single-process path): Dask adds exactly the rest."""
    small = str(tiny_catalog(tmp_path, **{**SIZES, "anchors": 12}))
    for name in ("single", "dask"):
        rebuild(small, store=str(tmp_path / name))
    grown = str(tiny_catalog(tmp_path, **SIZES))
    rebuild(grown, store=str(tmp_path / "single"))
    again = extract_dask_flow.with_options(task_runner=_runner(cluster))(grown, "default", str(tmp_path / "dask"))
    assert sum(r.rows for r in again) > 0
    a, b = _dump(tmp_path / "single"), _dump(tmp_path / "dask")
    for key in ("units", "unit_texts", "shards", "activation_rows"):
        assert a[key] == b[key], key
    for key in (k for k in a if k.startswith("acts/")):
        assert np.array_equal(a[key], b[key]), key


def _runner(address: str) -> Any:
    from flows.scale import dask_task_runner

    return dask_task_runner(address)
