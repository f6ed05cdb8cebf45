"""Arrays on an fsspec URL end to end: the real flows with ``memory://`` and with ``s3://``.

S3 is a real S3 API on loopback (moto's server) reached through s3fs, so Dask
worker processes write shards over HTTP exactly as they would to a bucket; only
the flow process opens DuckDB. Each store is compared with a store built the
ordinary way (arrays in the store folder), bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from safeport.cli import main
from safeport.flows.rebuild import rebuild
from safeport.flows.run import run_flow
from safeport.flows.scale import dask_task_runner, extract_dask_flow
from safeport.flows.verify import repair_flow
from safeport.store.store import Store, StoreError
from safeport.store.verify import verify_path
from tests.flows.catalogs import assert_same_store, tiny_catalog

SIZES: dict[str, Any] = {"anchors": 24, "pairs": 6, "prompts": 4, "shard_rows": 4}


def _files(url: str) -> list[str]:
    fs, base = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(fs.find(base))


def test_memory_arrays_build_verify_and_repair_like_a_folder_store(
    prefect_api: str, tmp_path: Path, memory_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_catalog(tmp_path / "folder", **SIZES)
    remote = tiny_catalog(tmp_path / "remote", **SIZES, arrays=memory_url)
    run_flow(str(folder))
    extracted, fitted, *_ = run_flow(str(remote))
    assert {r.status for r in extracted} == {"done"} and [f.status for f in fitted] == ["done"]
    root = tmp_path / "remote" / "store"
    assert not (root / "arrays.zarr").exists() and any("/acts/" in f for f in _files(memory_url))
    assert_same_store(tmp_path / "folder" / "store", root)
    capsys.readouterr()
    assert main(["status", "--store", str(root)]) == 0
    assert f"arrays {memory_url}\n" in capsys.readouterr().out

    again, refit, *_ = run_flow(str(remote))  # nothing new: nothing recomputed
    assert {r.status for r in again} == {"skipped"} and {f.status for f in refit} == {"skipped"}

    # Damage two chunks at the URL: verify names exactly them, repair recomputes them.
    with Store(root, read_only=True) as store:
        path = store.scalar("SELECT array_path FROM units WHERE dataset = 'anchors' ORDER BY array_path LIMIT 1")
    fs, base = fsspec.core.url_to_fs(memory_url)
    fs.rm(f"{base}/{path}/c/1/0")
    garbled = f"{base}/{path}/c/2/0"
    fs.pipe(garbled, fs.cat(garbled)[:-7])
    report = verify_path(root)
    assert {(d.path, d.shard, d.problem.split(" (")[0]) for d in report.damage} == {
        (path, 1, "chunk file missing"),
        (path, 2, "chunk cannot be decoded"),
    }
    repaired = repair_flow(str(remote))
    assert repaired.after.ok and sum(r.rows for r in repaired.resumed) == 8  # two shards of 4 rows
    assert_same_store(tmp_path / "folder" / "store", root)


def test_dask_worker_processes_cannot_commit_into_a_memory_url(
    prefect_api: str, tmp_path: Path, memory_url: str
) -> None:
    """memory:// lives in one process: worker-written shards are refused by the checksum re-read, not recorded."""
    catalog = tiny_catalog(tmp_path, **SIZES, arrays=memory_url)
    with pytest.raises(StoreError, match="workers must write where this process reads") as err:
        extract_dask_flow.with_options(task_runner=dask_task_runner(workers=1))(str(catalog))
    assert "nothing of this shard was committed" in str(err.value)
    with Store(tmp_path / "store", read_only=True) as store:
        assert store.scalar("SELECT count(*) FROM shards") == 0
        assert store.scalar("SELECT count(*) FROM activation_rows") == 0


@pytest.fixture(scope="module")
def s3_cluster(s3: str) -> Iterator[str]:
    """Two single-threaded worker processes started after the S3 settings are in the environment."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c:
        yield str(c.scheduler_address)


def test_two_dask_workers_writing_to_s3_equal_the_single_process_folder_store(
    prefect_api: str, tmp_path: Path, s3: str, s3_cluster: str, one_thread: None
) -> None:
    url = f"{s3}/{tmp_path.name}/arrays.zarr"
    folder = tiny_catalog(tmp_path / "folder", **SIZES)
    remote = tiny_catalog(tmp_path / "remote", **SIZES, arrays=url)
    single = rebuild(str(folder))
    dask = rebuild(str(remote), dask_address=s3_cluster)
    assert [(r.unit_key, r.status, r.rows) for r in dask.extracted] == [
        (r.unit_key, r.status, r.rows) for r in single.extracted
    ]
    root = tmp_path / "remote" / "store"
    assert sorted(p.name for p in root.iterdir()) == [
        "meta.duckdb",
        "meta.snapshot.duckdb",
        "reports",
        "waiting.lock",
        "writer.lock",
    ]
    chunks = [f for f in _files(url) if "/acts/" in f and "/c/" in f]
    assert len(chunks) > 8  # the workers' shards are objects in the bucket
    assert_same_store(tmp_path / "folder" / "store", root)
    assert verify_path(root).ok  # every shard re-read through s3 matches its checksum

    again = rebuild(str(remote), dask_address=s3_cluster)  # nothing new: nothing sent to the workers
    assert {r.status for r in again.extracted} == {"skipped"}
