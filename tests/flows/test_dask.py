"""Extraction on a local 2-worker Dask cluster gives the same store as the single-process run, bit for bit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safeport.flows.rebuild import rebuild
from safeport.flows.scale import dask_task_runner, extract_dask_flow, worker_gpu
from safeport.store.store import Store
from tests.flows.catalogs import assert_same_store, dump_store, tiny_catalog

SIZES: dict[str, Any] = {"anchors": 24, "pairs": 6, "prompts": 4, "shard_rows": 4}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The local cluster ``--dask-workers 2`` starts (two single-threaded processes on loopback); its address."""
    from distributed import LocalCluster

    with LocalCluster(**dask_task_runner(workers=2).cluster_kwargs) as c:
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
    for key in ("units", "unit_texts", "shards", "activation_rows", "unit_rows"):
        assert a[key] == b[key], key
    for key in (k for k in a if k.startswith("acts/")):
        assert np.array_equal(a[key], b[key]), key


def _runner(address: str) -> Any:
    return dask_task_runner(address)


def test_local_workers_take_one_gpu_each(cluster: str) -> None:
    """``--dask-workers 2`` on a 2-GPU machine: the local workers' names map to GPUs 0 and 1."""
    from distributed import Client

    with Client(cluster) as client:
        names = client.run(lambda dask_worker: dask_worker.name)
    assert {worker_gpu(name, 2) for name in names.values()} == {0, 1}
    assert [worker_gpu(name, 1) for name in names.values()] == [None, None]  # one GPU: left alone


@pytest.mark.parametrize(
    ("name", "n_gpus", "expected"), [(0, 4, 0), (5, 4, 1), ("3", 2, 1), (2, 1, None), (2, 0, None)]
)
def test_worker_gpu_round_robin(name: object, n_gpus: int, expected: int | None) -> None:
    assert worker_gpu(name, n_gpus) == expected


def test_worker_gpu_spreads_named_workers_stably() -> None:
    names = [f"tcp://10.0.0.{i}:4000" for i in range(64)]
    picks = [worker_gpu(n, 4) for n in names]
    assert picks == [worker_gpu(n, 4) for n in names]  # stable across calls (not Python's salted hash)
    assert set(picks) == {0, 1, 2, 3}


def test_pin_worker_gpu_sets_the_device_only_inside_a_multi_gpu_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import distributed
    import torch

    import safeport.flows.workers

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    safeport.flows.workers._pin_worker_gpu()  # not on a worker: nothing changes
    assert chosen == []

    class _Worker:
        name = 1

    monkeypatch.setattr(distributed, "get_worker", lambda: _Worker())
    safeport.flows.workers._pin_worker_gpu()
    assert chosen == [1]
