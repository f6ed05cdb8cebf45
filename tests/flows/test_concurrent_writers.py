"""Several writers and readers on one store through the real CLI (issue 13).

- readers (`safeport query`, `safeport status`) loop while `extract`, `fit` and `eval` run: every
  call succeeds and sees only committed rows;
- writers started together on overlapping work, some killed with SIGKILL at random points: no
  duplicate rows, nothing computed twice (the ``runs`` rows of all writers add up to each unit's
  rows exactly), and after a resume the store equals the one a single writer builds;
- a claim held by a machine that is gone is taken over once its lease ends;
- a killed `safeport extract` leaves no Prefect server behind.

The default run uses a few writers and one kill; ``-m slow`` runs the long loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tests.flows.test_crash_loop as crash
import tests.flows.test_eval_flow as eval_setup
from safeport.cli import main
from safeport.flows.common import catalog as load_profile
from safeport.flows.common import model_source, writing
from safeport.flows.extract import extract_flow, register_datasets, unit_key
from safeport.store.location import OUTPUTS as OUTPUTS_DIR
from safeport.store.query import readonly_query
from safeport.store.store import Store
from safeport.store.verify import verify_path
from tests.conftest import REPO
from tests.flows.catalogs import TABLES, tiny_catalog

SEED = int(os.environ.get("SAFEPORT_CRASH_SEED", "20240607"))
EXTRACTION_TABLES = (
    "models",
    "datasets",
    "texts",
    "dataset_texts",
    "units",
    "unit_texts",
    "shards",
    "activation_rows",
)
# Only committed rows are ever visible: every activation row belongs to a committed shard.
COMMITTED = (
    "SELECT (SELECT count(*) FROM activation_rows) = (SELECT coalesce(sum(row_stop - row_start), 0) FROM shards)"
)


def _reads(root: Path, proc: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]) -> int:
    """`safeport query` and `safeport status` in a loop while ``proc`` runs; each must succeed. Returns the count."""
    while proc.poll() is None and not (root / "meta.duckdb").is_file():
        time.sleep(0.05)
    calls = 0
    while proc.poll() is None:
        assert main(["query", "--store", str(root), "SELECT count(*) FROM activation_rows"]) == 0
        assert main(["status", "--store", str(root)]) == 0
        assert readonly_query(root, COMMITTED).column(0)[0].as_py() is True
        gens = root / OUTPUTS_DIR
        if gens.is_dir():  # a committed output has all its files
            rows = readonly_query(root, "SELECT files FROM generations").column(0).to_pylist()
            assert all((gens / f).is_file() for files in rows for f in json.loads(files))
        calls += 1
        time.sleep(0.2)  # a user or a dashboard polling, not a busy loop competing for the cores
    out = capsys.readouterr()
    assert "error" not in out.err, out.err[-2000:]
    crash._finish(proc)
    return calls


def _tables(root: Path, names: tuple[str, ...] = EXTRACTION_TABLES) -> dict[str, Any]:
    with Store(root, read_only=True) as store:
        out: dict[str, Any] = {n: sorted(map(repr, store.fetchall(TABLES[n]))) for n in names}
        for (path,) in store.fetchall("SELECT array_path FROM units"):
            out[path] = np.asarray(store.arrays[path][...])  # type: ignore[index]
    return out


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)  # bit for bit: same kernels, same batches
        else:
            assert got[key] == value, key


def _computed_once(root: Path) -> None:
    """Every unit's rows were computed by exactly one writer: the runs rows of all writers add up to it."""
    with Store(root, read_only=True) as store:
        per_unit = store.fetchall(
            "SELECT u.unit_key, u.n_rows, coalesce(sum(r.rows), 0) FROM units u "
            "LEFT JOIN runs r ON r.unit_key = u.unit_key AND r.task = 'extract_unit' GROUP BY ALL"
        )
        dups = store.scalar("SELECT count(*) - count(DISTINCT (model_key, text_id)) FROM activation_rows")
    assert dups == 0
    assert [(k, n) for k, n, got in per_unit if got != n] == []


@pytest.fixture(scope="module")
def one_writer(
    prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.Popen[bytes], Path]:
    """The tiny catalog (shards of 4 rows) and a `safeport extract` just started on an empty store."""
    tmp = tmp_path_factory.mktemp("one-writer")
    catalog = tiny_catalog(tmp, shard_rows=4)
    return catalog, crash._cli(prefect_api, "extract", "--catalog", str(catalog)), tmp / "store"


@pytest.fixture(scope="module")
def reference(one_writer: tuple[Path, subprocess.Popen[bytes], Path]) -> dict[str, Any]:
    """The extraction tables and arrays one writer builds (the store all concurrent runs must equal)."""
    _, proc, root = one_writer
    if proc.returncode is None:  # not finished by the readers test
        crash._finish(proc)
    return _tables(root)


def test_query_and_status_succeed_throughout_extract_fit_and_eval(
    one_writer: tuple[Path, subprocess.Popen[bytes], Path],
    prefect_api: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalog, proc, root = one_writer
    extract_reads = _reads(root, proc, capsys)
    fit_reads = _reads(root, crash._cli(prefect_api, "fit", "--catalog", str(catalog)), capsys)
    eval_catalog = crash._eval_store(tmp_path / "eval")
    eval_reads = _reads(eval_catalog.parent / "store", crash._cli(prefect_api, *crash._eval_args(eval_catalog)), capsys)
    print(f"reads while running: extract {extract_reads}, fit {fit_reads}, eval {eval_reads}")
    assert min(extract_reads, fit_reads, eval_reads) >= 1


def _writers_round(
    catalog: Path, root: Path, api: str, rng: random.Random, writers: int, kills: int
) -> tuple[int, list[str]]:
    """Start ``writers`` extractions together, SIGKILL ``kills`` of them at random points; the rest must finish."""
    procs = [crash._cli(api, "extract", "--catalog", str(catalog)) for _ in range(writers)]
    killed: set[int] = set()
    for i in rng.sample(range(writers), kills):
        target = rng.randint(1, 12)
        if crash._wait_for(procs[i], partial(_chunks_at_least, root, target)) and crash._kill9(
            procs[i], rng.uniform(0.0, 0.5)
        ):
            killed.add(i)
    errors = []
    for i, proc in enumerate(procs):
        if i in killed:
            continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        errors.append(err.decode(errors="replace"))
    return len(killed), errors


def _chunks_at_least(root: Path, n: int) -> bool:
    return crash._chunks(root)[0] >= n


def _writers_loop(
    catalog: Path, reference: dict[str, Any], tmp: Path, api: str, rounds: int, writers: int, seed: int
) -> int:
    rng = random.Random(seed)
    killed = 0
    for r in range(rounds):
        root = tmp / f"store-{r}"
        cat = tmp / f"catalog-{r}.yaml"
        cat.write_text(catalog.read_text().replace(str(catalog.parent / "store"), str(root)), encoding="utf-8")
        n, errors = _writers_round(cat, root, api, rng, writers, kills=rng.randint(1, writers - 1))
        killed += n
        assert not any("dropped" in e for e in errors)  # nobody computed a shard another writer committed
        assert verify_path(root).ok
        _computed_once(root)  # also right after the kills: what is committed was computed once
        crash._finish(crash._cli(api, "extract", "--catalog", str(cat)))  # resume what the killed ones held
        assert verify_path(root).ok
        _computed_once(root)
        _assert_same(_tables(root), reference)
    return killed


def test_writers_on_overlapping_work_killed_at_random_end_with_the_one_writer_store(
    one_writer: tuple[Path, subprocess.Popen[bytes], Path], reference: dict[str, Any], tmp_path: Path, prefect_api: str
) -> None:
    catalog = one_writer[0]
    killed = _writers_loop(catalog, reference, tmp_path, prefect_api, rounds=1, writers=3, seed=SEED)
    print(f"writers killed: {killed}")  # 0 when the victim finished first; the store must match all the same


@pytest.mark.slow
def test_writers_killed_at_random_long(
    one_writer: tuple[Path, subprocess.Popen[bytes], Path], reference: dict[str, Any], tmp_path: Path, prefect_api: str
) -> None:
    catalog = one_writer[0]
    killed = _writers_loop(catalog, reference, tmp_path, prefect_api, rounds=6, writers=3, seed=SEED + 5)
    assert killed >= 4


def test_two_evals_of_one_sweep_at_once_generate_each_output_once(prefect_api: str, tmp_path: Path) -> None:
    """Output batches and score batches are claimed: two evaluations of the same sweep split it."""
    reference = crash._eval_store(tmp_path / "one")
    eval_setup._run(reference, seeds=[int(s) for s in crash.SEEDS])
    catalog = crash._eval_store(tmp_path / "two")
    procs = [crash._cli(prefect_api, *crash._eval_args(catalog)) for _ in range(2)]
    for proc in procs:
        crash._finish(proc)
    root = catalog.parent / "store"
    got = crash._eval_state(root)
    assert got == crash._eval_state(reference.parent / "store")  # outputs, scores and results, bit for bit
    with Store(root, read_only=True) as store:  # every output generated by exactly one of the two
        assert store.scalar("SELECT sum(rows) FROM runs WHERE task = 'generate'") == len(got["generations"])


def test_a_claim_of_a_lost_machine_is_taken_over_after_its_lease(
    prefect_api: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another machine claimed a unit and vanished: extraction does everything else, then takes the unit over."""
    catalog = tiny_catalog(tmp_path, anchors=8, pairs=4, prompts=2, shard_rows=4)
    resolved = load_profile(str(catalog), "default")
    root = tmp_path / "store"
    with writing(root) as store:
        hashes = register_datasets(store, resolved)
        key = unit_key(model_source(resolved, "tgt").spec().key(), "anchors", hashes["anchors"])
        now = time.time()
        with store.transaction() as con:
            con.execute(
                "INSERT INTO claims VALUES (?, 'unit', 'gone', 'lost-machine', 7, '', 'r-lost', ?, ?, ?)",
                [f"unit:{key}", now, now, now + 4.0],
            )
    with caplog.at_level(logging.WARNING, logger="safeport.store"):
        results = extract_flow(str(catalog))
    assert {r.status for r in results} == {"done"}
    assert "taking over unit:" + key + " from pid 7 on lost-machine" in caplog.text
    assert "host lost-machine stopped renewing it" in caplog.text
    _computed_once(root)
    assert verify_path(root).ok


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def _until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_kill9_of_an_extract_leaves_no_prefect_server_behind(tmp_path: Path) -> None:
    """Without PREFECT_API_URL each run starts its own temporary Prefect server; SIGKILL must not orphan it."""
    catalog = tiny_catalog(tmp_path, anchors=8, pairs=4, prompts=2)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO)})
    code = "import sys; from safeport.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "extract", "--catalog", str(catalog)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _until(lambda: (tmp_path / "store" / "meta.duckdb").is_file() or proc.poll() is not None, 240)
        servers = [
            c for c in _children(proc.pid) if "prefect.server" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")
        ]
        assert servers, "the run started no Prefect server of its own (is PREFECT_API_URL still set?)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _until(lambda: all(_gone(s) for s in servers), 30), f"orphaned Prefect server(s): {servers}"
    shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)
