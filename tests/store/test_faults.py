"""Storage faults injected under the real flows: a full disk while writing Zarr chunks or array
metadata, and a failing DuckDB commit. Each run fails with a clear message, the committed store
stays intact and readable, and a rerun completes equal to an uninterrupted run."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import zarr.storage._local as zarr_local

import tests.flows.test_extract_flow as extract_tests
from safeport.flows.extract import extract_flow
from safeport.flows.run import run_flow
from safeport.store import artifacts
from safeport.store.store import Store, StoreError
from safeport.store.verify import verify_path
from tests.flows.catalogs import tiny_catalog

_REAL_PUT = zarr_local._put


@pytest.fixture(scope="module")
def reference(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted extract + fit of the tiny catalog (shards of 4 rows)."""
    tmp = tmp_path_factory.mktemp("faults-ref")
    run_flow(str(tiny_catalog(tmp, shard_rows=4)))
    return tmp / "store"


def _equal_to_reference(root: Path, reference: Path) -> None:
    want, got = extract_tests._snapshot(reference), extract_tests._snapshot(root)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))
    counts = extract_tests._counts(root)
    assert counts["rows"] == counts["distinct"] == extract_tests._counts(reference)["rows"]
    assert verify_path(root).ok


def _committed_prefix_is_intact(root: Path, reference: Path) -> int:
    """Whatever the failed run committed is readable, verified and equal to the reference; returns shards."""
    report = verify_path(root)
    assert report.ok, [d.describe() for d in report.damage]
    want, got = extract_tests._snapshot(reference), extract_tests._snapshot(root)
    assert set(got) <= set(want)
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=str(key))
    assert not list((root / "arrays.zarr").rglob("*.partial")), "a half-written temp file was left behind"
    return report.shards


def _disk_full_at(monkeypatch: pytest.MonkeyPatch, root: Path, k: int, what: Callable[[str], bool]) -> dict[str, int]:
    """Zarr's local ``_put`` fills the disk on the k-th matching write, after half its bytes reached the file."""
    seen = {"n": 0, "failed": 0}

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        rel = Path(path).relative_to(root / "arrays.zarr").as_posix() if Path(path).is_relative_to(root) else ""
        if rel and what(rel):
            seen["n"] += 1
            if seen["n"] == k:
                seen["failed"] += 1
                data = bytes(value.as_buffer_like())
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with zarr_local._atomic_write(Path(path), "wb") as f:
                    f.write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return _REAL_PUT(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    return seen


def _is_chunk(rel: str) -> bool:
    return rel.startswith("acts/") and "/c/" in rel


def _is_unit_metadata(rel: str) -> bool:
    return rel.startswith("acts/") and rel.count("/") == 3 and rel.endswith("/zarr.json")


@pytest.mark.parametrize(
    ("k", "what", "message"),
    [
        (9, _is_chunk, r"writing shard .* failed: \[Errno 28\] No space left on device.*the disk is full"),
        (3, _is_unit_metadata, r"cannot create array acts/.*No space left on device"),
    ],
    ids=["ninth-chunk", "third-unit-array"],
)
def test_disk_full_while_writing_fails_clearly_and_keeps_the_committed_store(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, what: Callable[[str], bool], message: str
) -> None:
    catalog = tiny_catalog(tmp_path, shard_rows=4)
    root = tmp_path / "store"
    seen = _disk_full_at(monkeypatch, root, k, what)
    with pytest.raises(StoreError, match=message):
        extract_flow(str(catalog))
    assert seen["failed"] == 1
    shards = _committed_prefix_is_intact(root, reference)
    if what is _is_chunk:
        assert shards == k - 1  # every shard before the failed write is committed, none after
    monkeypatch.setattr(zarr_local, "_put", _REAL_PUT)
    extract_flow(str(catalog))
    _equal_to_reference(root, reference)


class FlakyCommit:
    """A DuckDB connection whose k-th COMMIT of a shard record (counted over every connection of the
    test, since each write transaction opens its own) fails like a full disk (WAL write error)."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, k: int, count: dict[str, int], error: BaseException | None = None
    ) -> None:
        self._con, self._k, self._count, self._shard_pending = con, k, count, False
        self._error = error or duckdb.IOException("Could not write to the WAL file: No space left on device")
        self.failed = 0

    def execute(self, query: str, params: Any = None) -> Any:
        if query.startswith("INSERT INTO shards"):
            self._shard_pending = True
        if query == "COMMIT" and self._shard_pending:
            self._shard_pending = False
            self._count["commits"] += 1
            if self._count["commits"] == self._k:
                self.failed += 1
                raise self._error
        if query == "ROLLBACK":
            self._shard_pending = False
        return self._con.execute(query, params or [])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _flaky_connect(
    monkeypatch: pytest.MonkeyPatch, db: Path, k: int, error: BaseException | None = None
) -> list[FlakyCommit]:
    real = duckdb.connect
    made: list[FlakyCommit] = []
    count = {"commits": 0}

    def connect(database: str = ":memory:", read_only: bool = False, **kw: Any) -> Any:
        con = real(database, read_only=read_only, **kw)
        if not read_only and Path(database) == db:
            made.append(FlakyCommit(con, k, count, error))
            return made[-1]
        return con

    monkeypatch.setattr(duckdb, "connect", connect)
    return made


def test_failed_duckdb_commit_rolls_back_and_a_rerun_completes(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tiny_catalog(tmp_path, shard_rows=4)
    root = tmp_path / "store"
    made = _flaky_connect(monkeypatch, root / "meta.duckdb", k=6)
    with pytest.raises(StoreError, match=r"committing to .*meta\.duckdb failed: .*No space left on device.*intact"):
        extract_flow(str(catalog))
    assert sum(c.failed for c in made) == 1
    monkeypatch.undo()
    # The failed shard's chunk is on disk but has no record: invisible, and rewritten by the rerun.
    assert _committed_prefix_is_intact(root, reference) == 5
    assert extract_tests._chunk_files(root) == 6
    extract_flow(str(catalog))
    _equal_to_reference(root, reference)


SHARD_ROW = (
    "INSERT INTO shards (unit_key, shard, row_start, row_stop, checksum, tokens, committed_at) "
    "VALUES ('u', 0, 0, 1, 'x', 1, now())"
)


def test_a_failed_commit_leaves_no_open_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed COMMIT the handle is usable and nothing of the failed step is visible."""
    made = _flaky_connect(monkeypatch, tmp_path / "meta.duckdb", k=1)
    with Store(tmp_path) as store:
        with pytest.raises(StoreError, match="Nothing of this step was recorded"), store.transaction() as con:
            con.execute(SHARD_ROW)
        assert sum(c.failed for c in made) == 1
        assert store.scalar("SELECT count(*) FROM shards") == 0
        with store.transaction() as con:  # a new transaction starts cleanly
            con.execute(SHARD_ROW)
        assert store.scalar("SELECT count(*) FROM shards") == 1


def test_ctrl_c_during_commit_is_a_keyboard_interrupt_and_leaves_no_open_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB reports a Ctrl-C inside COMMIT as RuntimeError("Query interrupted") (CI, the second-Ctrl-C
    test: Prefect printed that traceback); it is the KeyboardInterrupt it was, and nothing half-done stays."""
    made = _flaky_connect(monkeypatch, tmp_path / "meta.duckdb", k=1, error=RuntimeError("Query interrupted"))
    with Store(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt), store.transaction() as con:
            con.execute(SHARD_ROW)
        assert sum(c.failed for c in made) == 1
        assert store.scalar("SELECT count(*) FROM shards") == 0
        with store.transaction() as con:
            con.execute(SHARD_ROW)
        assert store.scalar("SELECT count(*) FROM shards") == 1


def test_disk_full_while_writing_vectors_fails_the_fit_and_a_rerun_restores_them(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tiny_catalog(tmp_path, shard_rows=4)
    root = tmp_path / "store"
    seen = _disk_full_at(monkeypatch, root, 5, lambda rel: rel.startswith("vectors/") and "/c/" in rel)
    with pytest.raises(StoreError, match=r"cannot write array vectors/.*No space left on device"):
        run_flow(str(catalog))
    assert seen["failed"] == 1
    assert verify_path(root).ok
    with Store(root, read_only=True) as store:
        assert store.scalar("SELECT count(*) FROM fits WHERE status = 'done'") == 0
    monkeypatch.setattr(zarr_local, "_put", _REAL_PUT)
    [fit] = run_flow(str(catalog))[1]
    assert fit.status == "done"
    with Store(reference, read_only=True) as ref, Store(root, read_only=True) as got:
        names = [r[0] for r in ref.con.execute("SELECT name FROM vectors ORDER BY 1").fetchall()]
        assert [r[0] for r in got.con.execute("SELECT name FROM vectors ORDER BY 1").fetchall()] == names
        for name in names:
            np.testing.assert_array_equal(artifacts.load_vector(got, name)[0], artifacts.load_vector(ref, name)[0])
    assert verify_path(root).ok
