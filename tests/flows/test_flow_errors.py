"""User errors raised inside a flow reach the terminal once, as safeport's line: no Prefect or transformers
traceback (unless SAFEPORT_DEBUG=1), and the Prefect run is still marked failed with the message.

The CLI runs in one subprocess (what a terminal sees: Prefect's console handler, transformers'
loggers and safeport's own line on one stderr) for every case, each a real flow against the
session's Prefect server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from safeport.store.db import WAIT_ENV
from safeport.store.store import Store
from tests.conftest import REPO
from tests.test_catalog import base_catalog, write_catalog

MISSING_HUB_ID = "safeport-tests/not-a-cached-model"
BUSY_WAIT_S = 2  # how long a writer waits for the held store here (the default is a minute)

HOLDER = "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); sys.stdin.read()"
DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safeport.cli import main
    import safeport.flows.common as common

    def out_of_memory(source):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cases = json.loads(sys.argv[1])
    for name, argv in cases:
        print(f"=== begin {name}", file=sys.stderr, flush=True)
        if name == "oom":
            common.load_extractor = out_of_memory
        try:
            code = main(argv)
        except BaseException as err:  # a bug: shown as such
            import traceback
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        print(f"=== end {name} rc={code}", file=sys.stderr, flush=True)
    """
)


def _catalog_variant(root: Path, name: str, model: str, entry: dict[str, Any]) -> Path:
    data = base_catalog(root)
    data["models"][model] = entry
    return write_catalog(root, data, f"{name}.yaml")


def _run_cases(cases: list[tuple[str, list[str]]], api: str) -> dict[str, tuple[int, str]]:
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env[WAIT_ENV] = str(BUSY_WAIT_S)
    env.pop("SAFEPORT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    found = {
        m.group(1): (int(m.group(3)), m.group(2))
        for m in re.finditer(r"=== begin (\S+)\n(.*?)=== end \1 rc=(-?\d+)", proc.stderr, re.DOTALL)
    }
    assert set(found) == {name for name, _ in cases}, proc.stderr[-3000:]
    return found


@pytest.fixture(scope="module")
def flow_errors(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Every case's (exit code, stderr); the busy store is held open for writing by another process meanwhile.

    The small catalog of tests/test_catalog.py: its source is a local folder with a GGUF file that is
    not a model (the incomplete-folder case) and its target a hub id that is not cached.
    """
    tmp = tmp_path_factory.mktemp("flow-errors")
    base = write_catalog(tmp, base_catalog(tmp))
    hub = _catalog_variant(tmp, "hub", "src", {"role": "source", "family": "causal_lm", "hub_id": MISSING_HUB_ID})
    missing = _catalog_variant(tmp, "missing", "src", {"role": "source", "family": "causal_lm", "path": "gone"})
    busy = tmp / "busy-store"
    Store(busy).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(busy / "meta.duckdb")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        cases = [
            ("busy-extract", ["extract", "--catalog", str(base), "--store", str(busy)]),
            ("busy-fit", ["fit", "--catalog", str(base), "--store", str(busy)]),
            ("offline-hub", ["extract", "--catalog", str(hub)]),
            ("missing-folder", ["extract", "--catalog", str(missing)]),
            ("incomplete-folder", ["extract", "--catalog", str(base)]),
            ("oom", ["extract", "--catalog", str(base)]),
        ]
        return _run_cases(cases, prefect_api)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


CASES = {
    # case: what the one line must name
    "busy-extract": ["busy-store", "held open by process", f"all {BUSY_WAIT_S:.1f}s", "--wait SECONDS"],
    "busy-fit": ["busy-store", "held open by process", f"all {BUSY_WAIT_S:.1f}s", "--wait SECONDS"],
    "offline-hub": ["'src'", MISSING_HUB_ID, "offline", "HF_HUB_OFFLINE", "path:", "hf download"],
    "missing-folder": ["models.src.path", "gone"],
    "incomplete-folder": ["'src'", "could not be loaded", "path:"],
    "oom": ["out of memory", "batch_size"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_inside_a_flow_is_one_clean_line(flow_errors: dict[str, Any], case: str) -> None:
    code, err = flow_errors[case]
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("safeport: error: ")]
    assert len(lines) == 1, err
    for needle in CASES[case]:
        assert needle in lines[0], lines[0]
    # Prefect's own report of the failure (the flow engine's and task engine's) stays off the terminal.
    for noise in ("Encountered exception", "Task run failed", "Finished in state Failed", "raise "):
        assert noise not in err, err


def test_the_prefect_run_is_still_failed_with_the_message(flow_errors: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        messages = [run.state.message or "" for run in client.read_flow_runs(limit=200) if run.state is not None]
    for case in CASES:
        line = next(x for x in flow_errors[case][1].splitlines() if x.startswith("safeport: error: "))
        wanted = line.removeprefix("safeport: error: ")[:60]
        if case == "oom":  # safeport's line adds the fix; the run keeps torch's message
            wanted = "OutOfMemoryError: CUDA out of memory"
        assert any(wanted in m for m in messages), (case, wanted)
