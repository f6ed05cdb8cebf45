"""Scale-out on Dask: the same stages, with the compute of each piece on Dask workers.

Nothing here is a second implementation of a stage: a flow whose task runner is Prefect's
``DaskTaskRunner`` runs the one runner (:mod:`safeport.flows.runner`) with its Dask executor, so
the flow process plans and claims exactly as it does alone (same unit keys, same text order,
same shards), sends each claimed piece to a worker, and commits what comes back: workers compute
and write arrays or files, re-read and checksum-checked here before the record (workers never
open DuckDB). A dying worker loses at most its piece in flight.

Workers must reach the store's arrays: the store folder (a local cluster always does; a remote
one needs it on a shared filesystem) or the profile's ``arrays:`` URL (``s3://…``, ``gs://…``;
workers read credentials from their environment, as fsspec does). A shard a worker wrote
anywhere else fails its checksum check here and is not committed. GPUs: one worker per device
(:mod:`safeport.flows.workers`).
"""

from __future__ import annotations

from typing import Any

from safeport.flows.extract import UnitResult, extract_flow
from safeport.flows.runner import on_dask as on_dask
from safeport.flows.workers import prepare_worker as prepare_worker
from safeport.flows.workers import worker_gpu as worker_gpu


def dask_task_runner(address: str | None = None, workers: int = 2) -> Any:
    """A ``DaskTaskRunner``: an existing cluster by address, else a local one of ``workers`` processes.

    Local workers are single-threaded processes bound to loopback: one model per
    process, no GIL contention, and nothing listens beyond this machine.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"dask workers = {workers}; use 1 or more (or pass --dask-address to use a cluster)")
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


# The extract flow with shards computed on Dask workers: run it through :func:`extract_on_dask`.
extract_dask_flow = extract_flow.with_options(name="safeport-extract-dask")


def extract_on_dask(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    wait_s: float = 0.0,
    address: str | None = None,
    workers: int = 2,
) -> list[UnitResult]:
    """Extract a profile on a Dask cluster (``address``) or a local one of ``workers`` processes."""
    runner = dask_task_runner(address, workers)
    result: list[UnitResult] = extract_dask_flow.with_options(task_runner=runner)(catalog_path, profile, store, wait_s)
    return result
