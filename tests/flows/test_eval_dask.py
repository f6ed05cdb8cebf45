"""Generation on 2 local Dask workers equals the single-process run; a worker killed mid-chunk loses nothing;
``--plan`` counts what the sweep then makes."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeport.flows.eval_generate
import tests.flows.test_eval_flow as setup
from safeport.flows.eval_dask import eval_on_dask
from safeport.flows.eval_plan import gpu_hours, plan_eval
from safeport.flows.scale import dask_task_runner
from safeport.store.location import OUTPUTS as OUTPUTS_DIR
from safeport.store.store import Store
from tests.flows import test_crash_loop as crash

SEEDS = [1, 2]
BATCH = 2  # two outputs per pipeline call on both sides


@pytest.fixture(scope="module")
def cluster(s3: str) -> Iterator[str]:
    """The local cluster ``--dask-workers 2`` starts (two single-threaded processes on loopback); its address.

    Started after the loopback S3's settings are in the environment, so its workers reach it too.
    """
    from distributed import LocalCluster

    with LocalCluster(**dask_task_runner(workers=2).cluster_kwargs) as c:
        yield str(c.scheduler_address)


_state = crash._eval_state  # generations (key, PNG checksum, files), distinct keys, scores, aggregates
_new_store = crash._eval_store  # the tiny Flux catalog and a store with prompts and vectors


def _timeless(report: str) -> str:
    """The report without its measured seconds per output (wall time is the one thing that may differ)."""
    return re.sub(r"[0-9.]+ s per output", "- s per output", report)


@pytest.fixture(scope="module")
def single(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single-process run (one torch thread, as a Dask worker computes) and its store's state."""
    import torch

    catalog = _new_store(tmp_path_factory.mktemp("single") / "s")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = setup._run(catalog, seeds=SEEDS, batch=BATCH)
    finally:
        torch.set_num_threads(before)
    state = _state(catalog.parent / "store")
    assert (
        len(state["generations"]) == state["distinct"] == 15 * len(SEEDS)
    )  # 15 outputs per seed (issue 21 oracle rule)
    with Store(catalog.parent / "store", read_only=True) as store:
        cells = store.con.execute("SELECT method, alpha FROM generations").fetchall()
    report = Path(result.report).read_text(encoding="utf-8")
    return {"state": state, "report": report, "cells": cells, "catalog": str(catalog)}


def test_two_dask_workers_make_exactly_the_single_process_outputs(
    single: dict[str, Any], cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = _new_store(tmp_path / "d")
    monkeypatch.setattr(safeport.flows.eval_generate, "CHUNK_OUTPUTS", 4)  # several chunks: both workers get some
    result = eval_on_dask(cluster, **_args(catalog))
    state = _state(catalog.parent / "store")
    assert state == single["state"]  # same keys, PNG checksums, scores and aggregates
    assert _timeless(Path(result.report).read_text(encoding="utf-8")) == _timeless(single["report"])
    with Store(catalog.parent / "store", read_only=True) as store:
        tasks = {r[0] for r in store.con.execute("SELECT task FROM runs WHERE flow = 'eval'").fetchall()}
    assert len({t for t in tasks if t.startswith("generate@")}) == 2  # progress rows of both workers


def test_workers_write_outputs_to_an_s3_url_and_the_flow_process_verifies_them_there(
    single: dict[str, Any], cluster: str, s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``outputs: s3://…``: workers PUT the PNGs over HTTP (loopback S3), the flow process checksums them
    there before committing; same keys, bytes and scores as the single-process folder store."""
    import fsspec
    import yaml

    catalog = _new_store(tmp_path / "s")
    url = f"{s3}/{tmp_path.name}/outputs"
    cat = yaml.safe_load(catalog.read_text(encoding="utf-8"))
    cat["profiles"]["default"]["outputs"] = url
    catalog.write_text(yaml.safe_dump(cat), encoding="utf-8")
    monkeypatch.setattr(safeport.flows.eval_generate, "CHUNK_OUTPUTS", 4)
    eval_on_dask(cluster, **_args(catalog))
    root = catalog.parent / "store"
    assert _state(root) == single["state"]
    assert not (root / OUTPUTS_DIR).exists()  # nothing went to the store folder
    fs, base = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.find(base)}
    assert names == {f for _, _, files in single["state"]["generations"] for f in json.loads(files)}
    again = eval_on_dask(cluster, **_args(catalog))  # everything is at the URL: nothing is generated again
    assert [g.generated for g in again.generated] == [0]
    with Store(root, read_only=True) as store:
        workers = store.con.execute(
            "SELECT sum(rows), sum(total), count(*) FROM runs WHERE task LIKE 'generate@%' AND status = 'done'"
        ).fetchall()[0]
    assert workers == (30, 30, 2)  # each worker's projected share ends at what it made


def test_each_worker_gets_the_share_of_the_rest_its_rate_predicts() -> None:
    """Known answer: 1 and 3 outputs/s over 10 s with 40 left -> 10 and 30 more; both end in 10 s."""
    from safeport.flows.eval_dask import share_workers
    from safeport.store.claims import RunEntry

    slow, fast = RunEntry("a", 100.0, rows=10), RunEntry("b", 100.0, rows=30)
    share_workers({"slow": slow, "fast": fast}, left=40, now=110.0)
    assert (slow.total, fast.total) == (20, 60)
    eta = [(e.total - e.rows) / (e.rows / 10.0) for e in (slow, fast)]  # type: ignore[operator]
    assert eta == [10.0, 10.0]
    idle = {"x": RunEntry("x", 0.0), "y": RunEntry("y", 0.0)}
    share_workers(idle, left=6, now=0.0)  # no rate yet: an even split
    assert [e.total for e in idle.values()] == [3, 3]


def _args(catalog: Path) -> dict[str, Any]:
    return {
        "catalog_path": str(catalog),
        "target": setup.TGT,
        "vectors": [setup.NATIVE, setup.CALIBRATED],
        "alphas": [0.0, 1.5],
        "prompts": "tiny-prompts",
        "settings": setup.SETTINGS,
        "seeds": SEEDS,
        "batch": BATCH,
    }


def test_a_worker_killed_mid_chunk_loses_and_repeats_nothing(
    single: dict[str, Any], cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client

    catalog = _new_store(tmp_path / "k")
    outputs = catalog.parent / "store" / OUTPUTS_DIR
    monkeypatch.setattr(safeport.flows.eval_generate, "CHUNK_OUTPUTS", 4)
    with Client(cluster) as client:
        pids = sorted(client.run(os.getpid).values())
    killed: list[int] = []

    def kill_when_writing() -> None:
        """kill -9 one worker as soon as the first PNG is on disk: both workers are inside a chunk then."""
        while not killed:
            if outputs.is_dir() and any(p.suffix == ".png" for p in outputs.iterdir()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            threading.Event().wait(0.005)

    watcher = threading.Thread(target=kill_when_writing, daemon=True)
    watcher.start()
    eval_on_dask(cluster, **_args(catalog))
    watcher.join(timeout=5)
    assert killed
    state = _state(catalog.parent / "store")
    assert state["distinct"] == len(state["generations"])  # no duplicate
    assert state == single["state"]  # nothing missing, nothing different


def test_plan_counts_what_the_sweep_then_makes(
    single: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan of a fresh store (no model loaded) counts, per method and α, what the single run made."""
    kw = {k: v for k, v in _args(_new_store(tmp_path / "p")).items() if k != "batch"}
    before = plan_eval(**kw)[0]
    assert (before.done, before.seconds_per_output, before.seconds_from) == (0, None, "unknown")
    made: dict[tuple[str, float], int] = {}
    for method, alpha in single["cells"]:
        made[(method, alpha)] = made.get((method, alpha), 0) + 1
    assert {(r.method, r.alpha): r.total for r in before.rows} == made
    assert before.total == 15 * len(SEEDS)
    after = plan_eval(**{**kw, "catalog_path": single["catalog"]})[0]  # the store the sweep filled
    assert (after.total, after.done) == (before.total, before.total)
    assert after.seconds_per_output is not None and after.seconds_from == f"measured on {after.total} outputs"
    from safeport.cli import main

    sets = [f"--set={k}={v}" for k, v in setup.SETTINGS.items()]
    argv = ["eval", "--catalog", single["catalog"], "--target", setup.TGT, "--prompts", "tiny-prompts"]
    argv += ["--vectors", setup.NATIVE, setup.CALIBRATED, "--alphas", "0", "1.5", "--seeds", "1", "2", *sets]
    assert main([*argv, "--plan", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  all +30 +30 +0\n", out) and " on 1 GPU, " in out and " on 2 GPU(s)" in out
    assert not any(text in out for text, _ in setup.PROMPTS)  # prompts are data: never printed
    assert gpu_hours(3600, 2.0, 8) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="--gpus 0"):
        gpu_hours(1, 1.0, 0)


def test_the_flow_process_killed_mid_commit_then_a_rerun_completes(
    single: dict[str, Any], cluster: str, tmp_path: Path, prefect_api: str
) -> None:
    """kill -9 of `safeport eval --dask-address` (its commits widened so the kill lands in one), then rerun."""
    catalog = _new_store(tmp_path / "f")
    (tmp_path / "stretch.py").write_text(crash.STRETCH, encoding="utf-8")
    argv = [*crash._eval_args(catalog), "--batch", str(BATCH), "--dask-address", cluster]
    assert [str(s) for s in SEEDS] == crash.SEEDS
    proc = crash._cli(prefect_api, *argv, stretch=tmp_path)
    reached = crash._wait_for(proc, crash._outputs_at_least(catalog.parent / "store" / OUTPUTS_DIR, 4))
    assert reached and crash._kill9(proc, 0.01), "the eval finished before the kill"
    eval_on_dask(cluster, **_args(catalog))
    state = _state(catalog.parent / "store")
    assert state["distinct"] == len(state["generations"])
    assert state == single["state"]


def test_status_shows_the_rate_and_eta_of_a_running_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safeport.cli_ops import print_running

    with Store(tmp_path / "st") as store:
        run = store.session.start_run("eval", "generate", "tflux", "tiny-prompts", None, total=10)
        with store.transaction() as con:
            store.session.progress(run, 4)
            con.execute("UPDATE runs SET started_at = heartbeat_at - INTERVAL 8 SECOND")  # 4 outputs in 8 s
        print_running(tmp_path / "st")
        store.session.finish_run(run, "done")
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "rows_per_s" in line)
    cells = {h.strip(): v.strip() for h, v in zip(lines[at].split("|"), lines[at + 2].split("|"), strict=True)}
    assert cells["rows_per_s"] == "0.5" and cells["eta_s"] == "12"  # 6 left at 0.5/s
