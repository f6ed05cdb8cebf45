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
from store.store import Store
from tests.flows.catalogs import assert_same_store, dump_store, tiny_catalog

SIZES: dict[str, Any] = {"anchors": 24, "pairs": 6, "prompts": 4, "shard_rows": 4}


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
    a = assert_same_store(tmp_path / "single", tmp_path / "dask")
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
    a, b = dump_store(tmp_path / "single"), dump_store(tmp_path / "dask")
    for key in ("units", "unit_texts", "shards", "activation_rows"):
        assert a[key] == b[key], key
    for key in (k for k in a if k.startswith("acts/")):
        assert np.array_equal(a[key], b[key]), key


def _runner(address: str) -> Any:
    from flows.scale import dask_task_runner

    return dask_task_runner(address)
