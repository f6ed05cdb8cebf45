"""Session-wide test setup: an isolated, offline Prefect and small shared fixtures."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Parallel runs (pytest-xdist, `-n 2` in pyproject): each worker process gets its own Prefect
# home and server, and splits the cores with the others instead of oversubscribing them
# (torch and its subprocesses read OMP_NUM_THREADS when they start).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="safeport-prefect-")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

# Before anything imports Prefect: its home, database and settings live in a temp dir.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="safeport-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Converted GGUF checkpoints (extractors/gguf_cache.py): one conversion per test run (xdist workers
# share the controller's folder; the cache's atomic rename makes that safe), never in ~/.cache.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["SAFEPORT_CACHE_DIR"] = tempfile.mkdtemp(prefix="safeport-cache-")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server for the whole session; yields its API URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


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


@pytest.fixture
def memory_url(tmp_path: Path) -> Iterator[str]:
    """A ``memory://`` arrays location unique to this test, removed afterwards."""
    import fsspec

    yield f"memory://{tmp_path.name}/arrays.zarr"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{tmp_path.name}"):
        fs.rm(f"/{tmp_path.name}", recursive=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Free DuckDB objects held by reference cycles of caught tracebacks before interpreter shutdown
    (otherwise nanobind prints "leaked instance" noise after pytest's summary line)."""
    import gc
    import shutil

    gc.collect()
    shutil.rmtree(os.environ["SAFEPORT_CACHE_DIR"], ignore_errors=True)  # ~0.5 GB of converted SmolLM2
