"""``safeport serve`` against a real Prefect server on loopback: a scheduled rebuild runs, and picks up new weights.

The ephemeral test server has no scheduler, so this test starts ``prefect server
start`` on a free loopback port with its own PREFECT_HOME, serves the rebuild
deployment on a short interval, and watches the server's flow runs. Every wait
is bounded and both processes (and their children) are stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from safeport.catalog import load_catalog
from safeport.flows.common import model_source
from safeport.store.maintenance import status
from safeport.store.store import Store
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog
from tests.tiny_models import tiny_bert

INTERVAL_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in its own process group; stop the group (SIGINT, then SIGKILL) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)


def _wait(what: str, check: Callable[[], Any], timeout: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def _runs(api: str) -> list[dict[str, Any]]:
    resp = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC"}, timeout=10)
    resp.raise_for_status()
    return list(resp.json())


def _completed_after(api: str, since: datetime) -> list[dict[str, Any]]:
    """Scheduled runs of the deployment that started after ``since`` and completed; fails fast on a crash."""
    runs = _runs(api)
    bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
    if bad:
        raise AssertionError(f"a scheduled rebuild failed: {bad[0]['state']}")
    return [
        r
        for r in runs
        if r["state_type"] == "COMPLETED"
        and r["auto_scheduled"]
        and r["deployment_id"]
        and datetime.fromisoformat(r["start_time"]) > since
    ]


def test_scheduled_rebuild_runs_and_picks_up_changed_weights(tmp_path: Path) -> None:
    catalog = tiny_catalog(tmp_path, anchors=24, pairs=6, prompts=4)
    old_tgt = model_source(load_catalog(catalog), "tgt").spec().key()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    logs = [server_log, serve_log]
    serve_code = (
        "from safeport.flows.serve import serve_rebuild; "
        f"serve_rebuild({str(catalog)!r}, interval={INTERVAL_S}, online=False, wait_s=120)"
    )
    with _process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, server_log):

        def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            return False

        _wait("the Prefect server", healthy, 90, logs)
        started = datetime.now(UTC)
        with _process([sys.executable, "-c", serve_code], env, serve_log):
            first = _wait("a scheduled rebuild to complete", lambda: _completed_after(api, started), 120, logs)
            assert first[0]["parameters"]["catalog_path"] == str(catalog.resolve())

            # New weights for the target model's local folder, swapped in atomically.
            tiny_bert(tmp_path / "bert-new", seed=3)
            os.replace(tmp_path / "bert-new" / "model.safetensors", tmp_path / "models" / "bert" / "model.safetensors")
            shutil.rmtree(tmp_path / "bert-new")
            swapped = datetime.now(UTC)
            _wait("a scheduled rebuild after the weights changed", lambda: _completed_after(api, swapped), 120, logs)

    new_tgt = model_source(load_catalog(catalog), "tgt").spec().key()
    assert new_tgt != old_tgt
    st = status(tmp_path / "store")
    models = {r["model_key"]: r for r in st.models.to_pylist()}
    assert models[new_tgt]["current"] and not models[new_tgt]["stale"]
    assert models[old_tgt]["stale"] and "superseded" in models[old_tgt]["reason"]
    with Store(tmp_path / "store", read_only=True) as store:
        done = store.con.execute(
            "SELECT count(*) FROM units WHERE model_key = ? AND status = 'done'", [new_tgt]
        ).fetchone()
        assert done is not None and done[0] == 4  # anchors, pairs, prompts, concept
        assert store.scalar("SELECT count(*) FROM fits WHERE status = 'done' AND inputs_json LIKE ?", [f"%{new_tgt}%"])
        assert store.scalar("SELECT count(DISTINCT run_id) FROM runs WHERE flow = 'extract'") >= 2


def test_serve_refuses_without_a_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safeport.flows.serve import ServeError, serve_rebuild

    port = _free_port()  # nothing listens here
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        with pytest.raises(ServeError, match="does not answer"):
            serve_rebuild(str(tiny_catalog(tmp_path)), interval=60)
        with pytest.raises(ServeError, match="exactly one schedule"):
            serve_rebuild(None, cron="0 3 * * *", interval=60)
        with pytest.raises(ServeError, match="not a valid cron"):
            serve_rebuild(None, cron="every day")
