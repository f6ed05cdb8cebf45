"""Randomised kill -9 loops against the real CLI: extraction, fit and eval.

Each kill lands at a random point: after a random number of new chunk files (plus a few ms),
or a random time after the run started writing, so kills fall mid-batch, mid-write (a chunk's
temp file), between a chunk write and its DuckDB commit, and inside commits; half the extraction
runs widen those last windows (see ``STRETCH``) so they are hit often. After every kill
the store must be consistent (only committed rows visible, all of them checksum-verified and
equal to an uninterrupted run, no duplicates); after every resume it must equal the
uninterrupted run. The default run kills a few times; ``-m slow`` runs the long loop.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tests.flows.test_eval_flow as eval_setup
import tests.flows.test_extract_flow as extract_tests
from safeport.flows.extract import extract_flow
from safeport.flows.fit import fit_flow
from safeport.store import artifacts
from safeport.store.location import OUTPUTS as OUTPUTS_DIR
from safeport.store.store import Store
from safeport.store.verify import verify_path
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog

DEFAULT_KILLS = 3  # extraction kills in the default run (plus one fit and one eval kill)
SLOW_KILLS = 24  # extraction kills behind the slow marker (plus four fit and four eval kills)
SLOW_FIT_EVAL_KILLS = 4
SEED = int(os.environ.get("SAFEPORT_CRASH_SEED", "20240607"))


# Loaded (from a temp folder) into some extraction runs: the code under test is unchanged, but each
# chunk write pauses halfway through its temp file and each DuckDB transaction pauses before its
# COMMIT, so random kills land inside those microsecond-wide windows too.
STRETCH = """
import contextlib, os, time
import zarr.storage._local as local
import safeport.store.store as st

PAUSE = float(os.environ["SAFEPORT_TEST_STRETCH_S"])
_put, _transaction = local._put, st.Store.transaction


def put(path, value, exclusive=False):
    if "/c/" not in path.as_posix():
        return _put(path, value, exclusive=exclusive)
    data = bytes(value.as_buffer_like())
    path.parent.mkdir(parents=True, exist_ok=True)
    with local._atomic_write(path, "wb", exclusive=exclusive) as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(PAUSE)
        f.write(data[len(data) // 2 :])
    return len(data)


@contextlib.contextmanager
def transaction(self):
    with _transaction(self) as con:
        yield con
        time.sleep(PAUSE)


local._put, st.Store.transaction = put, transaction
"""


def _cli(api: str, *argv: str, stretch: Path | None = None) -> subprocess.Popen[bytes]:
    """``safeport ARGV`` in a subprocess; with ``stretch`` (a folder holding stretch.py) its I/O windows widen."""
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO)}
    code = "import sys; from safeport.cli import main; sys.exit(main(sys.argv[1:]))"
    if stretch is not None:
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{stretch}"
        env["SAFEPORT_TEST_STRETCH_S"] = "0.03"
        code = "import stretch; " + code
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_for(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float = 180) -> bool:
    """Poll ``condition`` every 5 ms while ``proc`` runs; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def _kill9(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """SIGKILL ``proc`` after ``delay`` seconds; False if it had already finished."""
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _finish(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def _chunks(root: Path) -> tuple[int, int]:
    """(complete chunk files, temp files of interrupted chunk writes) under the activation arrays."""
    base = root / "arrays.zarr" / "acts"
    files = [p.name for p in base.rglob("*") if p.is_file() and "/c/" in p.as_posix()] if base.exists() else []
    partial = sum(n.endswith(".partial") for n in files)
    return len(files) - partial, partial


# -- extraction ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extracted(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalog, store) of an uninterrupted extraction of the tiny catalog, shards of 4 rows."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    catalog = tiny_catalog(tmp, shard_rows=4)
    extract_flow(str(catalog))
    return catalog, tmp / "store"


def _assert_matches(root: Path, reference: dict[Any, np.ndarray], complete: bool) -> int:
    """Visible rows are verified, unique and equal to the reference (all of them when ``complete``)."""
    if not (root / "meta.duckdb").is_file():  # killed before the store existed
        assert not complete
        return 0
    report = verify_path(root)
    assert report.ok, [d.describe() for d in report.damage]
    snap = extract_tests._snapshot(root)
    assert (snap.keys() == reference.keys()) if complete else (snap.keys() <= reference.keys())
    for key, value in snap.items():
        np.testing.assert_allclose(value, reference[key], rtol=1e-6, atol=1e-7, err_msg=str(key))
    counts = extract_tests._counts(root)
    assert counts["rows"] == counts["distinct"] == len(snap)
    return report.shards


def _one_extract_kill(catalog: Path, root: Path, api: str, rng: random.Random, stretch: Path) -> str | None:
    """Start `safeport extract` and kill -9 it at a random point; where it landed, or None if it finished."""
    before, partial_before = _chunks(root)
    proc = _cli(api, "extract", "--catalog", str(catalog), stretch=stretch if rng.random() < 0.5 else None)
    if rng.random() < 0.5:
        target = before + rng.randint(1, 8)
        started = _wait_for(proc, lambda: _chunks(root)[0] >= target)
        delay = rng.uniform(0.0, 0.03)
    else:
        started = _wait_for(proc, lambda: _chunks(root)[0] > before)  # this run is writing
        delay = rng.uniform(0.0, 1.5)
    if not started or not _kill9(proc, delay):
        _finish(proc)
        return None
    complete, partial = _chunks(root)
    committed = verify_path(root).shards if (root / "meta.duckdb").is_file() else 0
    if partial > partial_before:
        return "mid-write"
    if complete > committed:
        return "after a chunk write, before its commit"
    return "mid-batch or elsewhere"


def _extract_loop(extracted: tuple[Path, Path], tmp: Path, api: str, kills: int, seed: int) -> dict[str, Any]:
    _, ref_root = extracted
    reference = extract_tests._snapshot(ref_root)
    catalog = tiny_catalog(tmp, shard_rows=4)
    root = tmp / "store"
    (tmp / "stretch.py").write_text(STRETCH, encoding="utf-8")
    rng = random.Random(seed)
    landed: Counter[str] = Counter()
    rounds = finished_early = 0
    while sum(landed.values()) < kills:
        assert rounds < kills + 10, f"too few kills landed: {landed}, {finished_early} run(s) finished first"
        rounds += 1
        shutil.rmtree(root, ignore_errors=True)
        for _ in range(min(rng.randint(1, 4), kills - sum(landed.values()))):
            where = _one_extract_kill(catalog, root, api, rng, tmp)
            if where is None:
                finished_early += 1
                break
            landed[where] += 1
            _assert_matches(root, reference, complete=False)
        _finish(_cli(api, "extract", "--catalog", str(catalog)))  # resume
        _assert_matches(root, reference, complete=True)
    stats = {"kills": sum(landed.values()), "rounds": rounds, "finished_first": finished_early, **landed}
    print(f"extract kill loop: {stats}; temp files left on disk: {_chunks(root)[1]}")
    return stats


def test_kill9_loop_during_extraction(extracted: tuple[Path, Path], tmp_path: Path, prefect_api: str) -> None:
    stats = _extract_loop(extracted, tmp_path, prefect_api, DEFAULT_KILLS, SEED)
    assert stats["kills"] >= DEFAULT_KILLS


@pytest.mark.slow
def test_kill9_loop_during_extraction_long(extracted: tuple[Path, Path], tmp_path: Path, prefect_api: str) -> None:
    stats = _extract_loop(extracted, tmp_path, prefect_api, SLOW_KILLS, SEED + 1)
    assert stats["kills"] >= SLOW_KILLS


# -- fit ---------------------------------------------------------------------------------------------
def _fit_state(root: Path) -> dict[str, Any]:
    with Store(root, read_only=True) as store:
        names = [r[0] for r in store.con.execute("SELECT name FROM vectors ORDER BY name").fetchall()]
        return {
            "vectors": {n: artifacts.load_vector(store, n)[0] for n in names},
            "vector_rows": store.scalar("SELECT count(*) FROM vectors"),
            "maps": store.con.execute("SELECT map_key, params_json FROM maps ORDER BY 1").fetchall(),
            "results": store.con.execute(
                "SELECT kind, method, category, metric, alpha, value FROM eval_results ORDER BY ALL"
            ).fetchall(),
            "fits": store.con.execute("SELECT fit_key, status FROM fits").fetchall(),
        }


@pytest.fixture(scope="module")
def fit_reference(extracted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    catalog, root = extracted
    copy = tmp_path_factory.mktemp("fit-ref") / "store"
    shutil.copytree(root, copy)
    [result] = fit_flow(str(catalog), store=str(copy))
    assert result.status == "done"
    return _fit_state(copy)


def _fit_kills(
    extracted: tuple[Path, Path], reference: dict[str, Any], tmp: Path, api: str, kills: int, seed: int
) -> int:
    catalog, root = extracted
    rng = random.Random(seed)
    done = attempts = 0
    while done < kills:
        attempts += 1
        assert attempts <= kills + 6, "the fit kept finishing before the kill"
        crash = tmp / f"fit-{attempts}"
        shutil.copytree(root, crash)
        marker = rng.choice(["arrays.zarr/maps", "arrays.zarr/vectors", "reports"])
        proc = _cli(api, "fit", "--catalog", str(catalog), "--store", str(crash))
        if not (_wait_for(proc, (crash / marker).exists) and _kill9(proc, rng.uniform(0.0, 0.3))):
            _finish(proc)
            continue
        assert verify_path(crash).ok
        with Store(crash, read_only=True) as store:
            finished = store.scalar("SELECT count(*) FROM fits WHERE status = 'done'")
        if finished:  # the kill landed after the fit committed (process shutdown): it tested nothing
            continue
        done += 1
        [result] = fit_flow(str(catalog), store=str(crash))  # the rerun
        assert result.status == "done"
        got = _fit_state(crash)
        assert got["vectors"].keys() == reference["vectors"].keys()
        for name, values in reference["vectors"].items():
            np.testing.assert_array_equal(got["vectors"][name], values, err_msg=name)
        assert got["vector_rows"] == len(got["vectors"])  # no duplicates
        for key in ("vector_rows", "maps", "fits"):
            assert got[key] == reference[key], (key, marker)
        assert len(got["results"]) == len(reference["results"]), marker
        for have, want in zip(got["results"], reference["results"], strict=True):
            assert have == want, (marker, have, want)
        assert verify_path(crash).ok
    return done


def test_kill9_during_fit_then_rerun_gives_identical_vectors(
    extracted: tuple[Path, Path], fit_reference: dict[str, Any], tmp_path: Path, prefect_api: str
) -> None:
    assert _fit_kills(extracted, fit_reference, tmp_path, prefect_api, 1, SEED) == 1


@pytest.mark.slow
def test_kill9_during_fit_long(
    extracted: tuple[Path, Path], fit_reference: dict[str, Any], tmp_path: Path, prefect_api: str
) -> None:
    n = SLOW_FIT_EVAL_KILLS
    assert _fit_kills(extracted, fit_reference, tmp_path, prefect_api, n, SEED + 2) == n


# -- eval ----------------------------------------------------------------------------------------------
SEEDS = ["1", "2"]


def _eval_args(catalog: Path) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in eval_setup.SETTINGS.items()]
    return [
        *("eval", "--catalog", str(catalog), "--target", eval_setup.TGT),
        *("--vectors", eval_setup.NATIVE, eval_setup.CALIBRATED, "--alphas", "0", "1.5"),
        *("--prompts", "tiny-prompts", "--seeds", *SEEDS, *sets),
    ]


def _outputs_at_least(folder: Path, n: int) -> Callable[[], bool]:
    return lambda: folder.is_dir() and sum(1 for _ in folder.iterdir()) >= n


def _eval_state(root: Path) -> dict[str, Any]:
    with Store(root, read_only=True) as store:
        gens = store.con.execute("SELECT output_key, checksum, files FROM generations ORDER BY 1").fetchall()
        return {
            "generations": gens,
            "distinct": store.scalar("SELECT count(DISTINCT output_key) FROM generations"),
            "scores": store.con.execute(
                "SELECT output_key, metric, value, flagged FROM scores ORDER BY 1, 2"
            ).fetchall(),
            "results": store.con.execute(
                "SELECT kind, method, category, metric, alpha, value, n FROM eval_results ORDER BY ALL"
            ).fetchall(),
        }


def _eval_store(tmp: Path) -> Path:
    tmp.mkdir(parents=True)
    catalog = eval_setup._catalog(tmp)
    eval_setup._fill_store(tmp / "store")
    return catalog


@pytest.fixture(scope="module")
def eval_reference(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    catalog = _eval_store(tmp_path_factory.mktemp("eval-ref") / "e")
    eval_setup._run(catalog, seeds=[int(s) for s in SEEDS])
    state = _eval_state(catalog.parent / "store")
    assert (
        len(state["generations"]) == state["distinct"] == 15 * len(SEEDS)
    )  # 15 outputs per seed (issue 21 oracle rule)
    return state


def _eval_kills(reference: dict[str, Any], tmp: Path, api: str, kills: int, seed: int) -> int:
    rng = random.Random(seed)
    done = attempts = 0
    while done < kills:
        attempts += 1
        assert attempts <= kills + 6, "the eval kept finishing before the kill"
        catalog = _eval_store(tmp / f"eval-{attempts}")
        outputs = catalog.parent / "store" / OUTPUTS_DIR
        n = rng.randint(1, len(reference["generations"]))
        proc = _cli(api, *_eval_args(catalog))
        reached = _wait_for(proc, _outputs_at_least(outputs, n))
        if not (reached and _kill9(proc, rng.uniform(0.0, 0.05))):
            _finish(proc)
            continue
        done += 1
        eval_setup._run(catalog, seeds=[int(s) for s in SEEDS])  # the rerun
        got = _eval_state(catalog.parent / "store")
        assert got["distinct"] == len(got["generations"])  # no duplicate outputs
        assert got == reference
        for _, _, files in got["generations"]:
            for f in json.loads(files):
                assert (outputs / f).is_file()
    return done


def test_kill9_during_eval_then_rerun_has_no_duplicate_outputs(
    eval_reference: dict[str, Any], tmp_path: Path, prefect_api: str
) -> None:
    assert _eval_kills(eval_reference, tmp_path, prefect_api, 1, SEED) == 1


@pytest.mark.slow
def test_kill9_during_eval_long(eval_reference: dict[str, Any], tmp_path: Path, prefect_api: str) -> None:
    n = SLOW_FIT_EVAL_KILLS
    assert _eval_kills(eval_reference, tmp_path, prefect_api, n, SEED + 3) == n
