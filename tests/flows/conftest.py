"""Flow-test fixtures shared across modules: one tiny store rebuilt once per session."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from safeport.flows.rebuild import rebuild
from tests.flows.catalogs import tiny_catalog

# Sizes of the shared rebuilt store (small: every test copies it).
REBUILT_SIZES: dict[str, Any] = {"anchors": 24, "pairs": 6, "prompts": 4}


@pytest.fixture(scope="session")
def rebuilt_tiny(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny models and a store rebuilt once for src -> tgt (read-only: copy it to change it)."""
    tmp = tmp_path_factory.mktemp("rebuild-base")
    result = rebuild(str(tiny_catalog(tmp, **REBUILT_SIZES)))
    assert {r.status for r in result.extracted} == {"done"}
    return tmp


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A real S3 API on loopback (moto server) with one bucket; fsspec in every process finds it via the env."""
    import s3fs  # noqa: F401  (installed by the [s3] extra; a missing package fails here, it is not skipped)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        # Workers are new processes: they read these when fsspec loads. This process already
        # loaded fsspec's config, so it gets the endpoint directly.
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
        }.items():
            mp.setenv(key, value)
        mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        with contextlib.suppress(FileExistsError):  # moto keeps buckets per process, across servers
            fsspec.filesystem("s3").mkdir("safeport-test")
        try:
            yield "s3://safeport-test"
        finally:
            server.stop()
