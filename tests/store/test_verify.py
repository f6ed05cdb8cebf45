"""Corrupt, truncate and delete real Zarr chunks: reads refuse them, `safeport verify` names exactly them,
and `--repair` recomputes only them (then `safeport fit` restores damaged vectors and maps)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import tests.flows.test_extract_flow as extract_tests
from safeport.cli import main
from safeport.flows.extract import extract_flow
from safeport.flows.fit import fit_flow
from safeport.flows.run import run_flow
from safeport.store import artifacts
from safeport.store.store import Store, StoreError
from safeport.store.verify import verify_path
from tests.flows.catalogs import tiny_catalog


# -- damage, done to the files on disk the way a bad disk or a bad copy would ------------------------
def flip(path: Path) -> None:
    """Invert 8 bytes in the middle of the file (a bit-rot burst)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def delete(path: Path) -> None:
    path.unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": flip, "truncate": truncate, "delete": delete}


def chunk(root: Path, array_path: str, *coords: int) -> Path:
    path = root / "arrays.zarr" / array_path / "c" / "/".join(str(c) for c in coords)
    assert path.is_file(), path
    return path


def unit_of(root: Path, model: str, dataset: str) -> dict[str, Any]:
    with Store(root, read_only=True) as store:
        row = store.sql(
            "SELECT u.unit_key, u.array_path, u.shard_rows, u.n_rows FROM units u JOIN models m USING (model_key) "
            "WHERE m.name = ? AND u.dataset = ? ORDER BY u.created_at DESC LIMIT 1",
            [model, dataset],
        ).to_pylist()
    return row[0]


def shard_table(root: Path) -> dict[tuple[str, int], tuple[str, Any]]:
    with Store(root, read_only=True) as store:
        rows = store.con.execute("SELECT unit_key, shard, checksum, committed_at FROM shards").fetchall()
    return {(u, s): (c, t) for u, s, c, t in rows}


def runs(root: Path) -> list[dict[str, Any]]:
    with Store(root, read_only=True) as store:
        return store.sql("SELECT * FROM runs ORDER BY finished_at").to_pylist()


def vectors(root: Path) -> dict[str, np.ndarray]:
    with Store(root, read_only=True) as store:
        names = [r[0] for r in store.con.execute("SELECT name FROM vectors ORDER BY name").fetchall()]
        return {n: artifacts.load_vector(store, n)[0] for n in names}


@pytest.fixture(scope="module")
def built(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One extracted and fitted tiny store (shards of 4 rows); tests damage copies of it."""
    tmp = tmp_path_factory.mktemp("verify")
    catalog = tiny_catalog(tmp, shard_rows=4)
    extracted, fitted, *_ = run_flow(str(catalog))
    assert {r.status for r in extracted} == {"done"} and [f.status for f in fitted] == ["done"]
    return catalog


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(catalog, store copy) for one test."""
    root = tmp_path / "store"
    shutil.copytree(built.parent / "store", root)
    return built, root


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_reading_a_damaged_shard_raises_naming_the_array(copy: tuple[Path, Path], how: str) -> None:
    _, root = copy
    unit = unit_of(root, "tgt", "anchors")
    DAMAGE[how](chunk(root, unit["array_path"], 2, 0))
    with Store(root, read_only=True) as store:
        with pytest.raises(StoreError, match=rf"array {unit['array_path']} shard 2 \(rows 8-12\)") as err:
            store.activations("tgt", "anchors")
        assert "safeport verify --repair" in str(err.value)
        # Other units, and the same unit's other shards, stay readable.
        assert store.activations("src", "anchors")[1].shape[0] == unit["n_rows"]
        meta = store.sql("SELECT unit_key, row FROM activation_rows WHERE unit_key = ? AND row < 8", [unit["unit_key"]])
        assert store.read_rows(meta).shape == (8, 24)


def test_verify_names_exactly_the_damaged_shards_and_repair_recomputes_only_them(
    copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, root = copy
    before = extract_tests._snapshot(root)
    shards_before = shard_table(root)
    runs_before = len(runs(root))
    tgt, src = unit_of(root, "tgt", "anchors"), unit_of(root, "src", "pairs")
    damaged = {(tgt["array_path"], 1), (tgt["array_path"], 3), (src["array_path"], 0)}
    flip(chunk(root, tgt["array_path"], 1, 0))
    truncate(chunk(root, tgt["array_path"], 3, 0))
    delete(chunk(root, src["array_path"], 0, 0))

    report = verify_path(root)
    assert {(d.path, d.shard) for d in report.damage} == damaged
    assert {d.kind for d in report.damage} == {"shard"}
    problems = {(d.path, d.shard): d.problem for d in report.damage}
    assert problems[(src["array_path"], 0)] == "chunk file missing"
    assert problems[(tgt["array_path"], 3)].startswith("chunk cannot be decoded")
    assert report.shards == len(shards_before) and report.vectors > 0 and report.maps == 2

    args = ["--catalog", str(catalog), "--store", str(root)]
    assert main(["verify", *args]) == 1
    out = capsys.readouterr().out
    for path, shard in damaged:
        assert f"{path} shard {shard} rows" in out
    assert "model tgt" in out and "dataset anchors" in out and "3 problem(s) in 2 array(s)" in out

    assert main(["verify", "--repair", *args]) == 0
    out = capsys.readouterr().out
    assert "3 shard(s) of 2 unit(s) uncommitted (12 row(s))" in out
    assert "after repair: " in out and "0 problem(s)" in out

    # Only the damaged shards were recomputed: one extract run per damaged unit, 4 rows per shard.
    new_runs = runs(root)[runs_before:]
    assert sorted((r["unit_key"], r["rows"], r["status"]) for r in new_runs) == sorted(
        [(tgt["unit_key"], 8, "done"), (src["unit_key"], 4, "done")]
    )
    after_shards = shard_table(root)
    assert after_shards.keys() == shards_before.keys()
    for key, (sum_before, at_before) in shards_before.items():
        sum_after, at_after = after_shards[key]
        assert sum_after == sum_before  # same values, bit for bit
        if (key[0], key[1]) not in {(tgt["unit_key"], 1), (tgt["unit_key"], 3), (src["unit_key"], 0)}:
            assert at_after == at_before, key  # untouched shards were not rewritten
        else:
            assert at_after > at_before, key
    after = extract_tests._snapshot(root)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    counts = extract_tests._counts(root)
    assert counts["rows"] == counts["distinct"]
    assert verify_path(root).ok
    assert main(["verify", *args]) == 0
    assert "store is intact" in capsys.readouterr().out


def test_damaged_vector_and_map_are_named_and_repair_plus_fit_restore_them(
    copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, root = copy
    originals = vectors(root)
    with Store(root, read_only=True) as store:
        key = store.scalar("SELECT vector_key FROM vectors WHERE name = 'calibrated:src->tgt:ridge'")
        map_key = store.scalar("SELECT map_key FROM maps WHERE mapper = 'procrustes'")
        n_maps = store.scalar("SELECT count(*) FROM maps")
        map_state = {
            n: np.asarray(store.arrays[f"maps/{map_key}/{n}"][...])  # type: ignore[index]
            for n in artifacts.map_state_names(store, map_key)
        }
        fit_key = store.scalar("SELECT fit_key FROM fits")
    flip(chunk(root, f"vectors/{key}", 0))
    map_tensor = sorted(map_state, key=lambda n: -map_state[n].size)[0]
    truncate(next(p for p in (root / "arrays.zarr" / "maps" / map_key / map_tensor / "c").rglob("*") if p.is_file()))

    with Store(root, read_only=True) as store, pytest.raises(StoreError, match="fails its checksum"):
        artifacts.load_vector(store, "calibrated:src->tgt:ridge")
    report = verify_path(root)
    assert {(d.kind, d.path) for d in report.damage} == {
        ("vector", f"vectors/{key}"),
        ("map", f"maps/{map_key}/{map_tensor}"),
    }
    assert {d.owner for d in report.damage} == {"vector 'calibrated:src->tgt:ridge'", "map src->tgt procrustes"}

    args = ["--catalog", str(catalog), "--store", str(root)]
    assert main(["verify", "--repair", *args]) == 0
    out = capsys.readouterr().out
    assert f"fit src->tgt ({fit_key}) was reset: run `safeport fit`" in out
    with Store(root, read_only=True) as store:
        assert not artifacts.fit_done(store, fit_key)
        assert store.scalar("SELECT count(*) FROM maps") == n_maps - 1
    assert verify_path(root).ok

    [result] = fit_flow(str(catalog), store=str(root))
    assert (result.fit_key, result.status) == (fit_key, "done")
    restored = vectors(root)
    assert restored.keys() == originals.keys()
    for name, values in originals.items():
        np.testing.assert_array_equal(restored[name], values, err_msg=name)
    with Store(root, read_only=True) as store:
        for n, values in map_state.items():
            tensor = np.asarray(store.arrays[f"maps/{map_key}/{n}"][...])  # type: ignore[index]
            np.testing.assert_array_equal(tensor, values, err_msg=n)
        assert store.scalar("SELECT count(*) - count(DISTINCT name) FROM vectors") == 0
    assert verify_path(root).ok


def test_a_map_tensor_that_decodes_but_changed_fails_its_checksum_and_a_missing_one_is_named(
    copy: tuple[Path, Path],
) -> None:
    """Silent corruption (finite, decodable, wrong) is caught by the recorded per-tensor checksum."""
    _, root = copy
    with Store(root, read_only=True) as store:
        map_key = str(store.scalar("SELECT map_key FROM maps WHERE mapper = 'ridge'"))
        names = artifacts.map_state_names(store, map_key)
        assert set(artifacts.map_checksums(store, map_key)) == set(names)  # every tensor recorded
    changed, *rest = names
    with Store(root) as store:
        values = np.asarray(store.arrays[f"maps/{map_key}/{changed}"][...])  # type: ignore[index]
        store.arrays[f"maps/{map_key}/{changed}"][...] = values + np.asarray(1e-3, values.dtype)  # type: ignore[index]
        if rest:
            del store.arrays[f"maps/{map_key}/{rest[0]}"]
    with Store(root, read_only=True) as store, pytest.raises(StoreError, match=rf"maps/{map_key}/{changed} fails its"):
        artifacts.load_map(store, map_key, [changed])
    problems = {d.path: d.problem for d in verify_path(root).damage}
    expected = {f"maps/{map_key}/{changed}": "checksum mismatch"}
    if rest:
        expected[f"maps/{map_key}/{rest[0]}"] = "tensor missing"
    assert problems == expected


def test_unreadable_array_metadata_marks_every_shard_and_repair_rebuilds_the_unit(copy: tuple[Path, Path]) -> None:
    catalog, root = copy
    before = extract_tests._snapshot(root)
    unit = unit_of(root, "src", "prompts")
    meta = root / "arrays.zarr" / unit["array_path"] / "zarr.json"
    meta.write_text(meta.read_text()[:40], encoding="utf-8")
    report = verify_path(root)
    n_shards = -(-unit["n_rows"] // unit["shard_rows"])
    assert [(d.path, d.shard) for d in report.damage] == [(unit["array_path"], s) for s in range(n_shards)]
    assert all(d.problem.startswith("array cannot be opened") for d in report.damage)
    assert main(["verify", "--repair", "--catalog", str(catalog), "--store", str(root)]) == 0
    after = extract_tests._snapshot(root)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert json.loads(meta.read_text())["shape"] == [unit["n_rows"], 32]


def test_repair_resumes_a_unit_of_an_older_dataset_version(prefect_api: str, tmp_path: Path) -> None:
    """After a dataset grew, its older rows live in a unit `extract` no longer picks; repair still refills it."""
    catalog = tiny_catalog(tmp_path, anchors=20, shard_rows=4)
    extract_flow(str(catalog))
    old = unit_of(tmp_path / "store", "tgt", "anchors")
    extract_flow(str(tiny_catalog(tmp_path, anchors=40, shard_rows=4)))
    root = tmp_path / "store"
    assert unit_of(root, "tgt", "anchors")["unit_key"] != old["unit_key"]
    before = extract_tests._snapshot(root)
    flip(chunk(root, old["array_path"], 1, 0))
    assert [(d.path, d.shard) for d in verify_path(root).damage] == [(old["array_path"], 1)]
    assert main(["verify", "--repair", "--catalog", str(catalog)]) == 0
    after = extract_tests._snapshot(root)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    last = runs(root)[-1]
    assert (last["flow"], last["task"], last["unit_key"], last["rows"]) == ("repair", "resume_unit", old["unit_key"], 4)
    assert verify_path(root).ok


def test_repair_with_a_catalog_that_changed_the_model_says_what_to_run(
    copy: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, root = copy
    unit = unit_of(root, "tgt", "anchors")
    delete(chunk(root, unit["array_path"], 0, 0))
    changed = yaml.safe_load(catalog.read_text())
    changed["models"]["tgt"]["max_tokens"] = 32  # a different representation: a different model key
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed), encoding="utf-8")
    assert main(["verify", "--repair", "--catalog", str(other), "--store", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"unit {unit['unit_key']}" in out and "was not re-extracted" in out and "Run `safeport extract`" in out
    # The damaged rows are no longer visible (uncommitted), and `verify` keeps saying so until they are back.
    assert main(["verify", "--store", str(root)]) == 1
    assert "await re-extraction" in capsys.readouterr().out
    assert main(["verify", "--repair", "--catalog", str(catalog), "--store", str(root)]) == 0
    assert verify_path(root).ok


def test_verify_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--store", str(tmp_path / "nothing")]) == 2
    assert "no store at" in capsys.readouterr().err


# -- repair interrupted at every point it can stop at, then rerun ----------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL at an exact point: the step after it never runs (what is committed stays)."""


def _kill_at(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, after: bool = False) -> None:
    """``owner.name`` dies before it starts (or, with ``after``, right after it returned)."""
    real = getattr(owner, name)

    def dying(*args: Any, **kwargs: Any) -> Any:
        if after:
            real(*args, **kwargs)
        raise Killed(name)

    monkeypatch.setattr(owner, name, dying)


def _is_meta_of(array_path: str) -> Callable[[str], bool]:
    return lambda rel: rel == f"{array_path}/zarr.json"


def _is_chunk_of(array_path: str) -> Callable[[str], bool]:
    return lambda rel: rel.startswith(f"{array_path}/c/")


FAULTS = [
    "disk full recreating the unit array",
    "killed between the invalidation and the array reset",
    "killed right after the array reset",
    "disk full writing the first re-extracted shard",
    "killed after the first re-extracted shard",
]


# Default suite: the two faults that used to dead-end, finished both ways, and two more steps; the last
# fault is an extraction killed mid-unit (the crash-loop tests kill that often). -m slow: every pair.
DEFAULT_RUNS = {
    (FAULTS[0], "verify --repair"),
    (FAULTS[0], "extract"),
    (FAULTS[1], "verify --repair"),
    (FAULTS[1], "extract"),
    (FAULTS[2], "verify --repair"),
    (FAULTS[3], "extract"),
}


@pytest.mark.parametrize(
    ("fault", "then"),
    [
        pytest.param(f, t, marks=() if (f, t) in DEFAULT_RUNS else pytest.mark.slow)
        for f in FAULTS
        for t in ("verify --repair", "extract")
    ],
)
def test_an_interrupted_repair_is_finished_by_the_next_repair_or_extract(
    copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fault: str, then: str
) -> None:
    """Unreadable unit metadata: repair invalidates every shard, recreates the array, re-extracts. Stopped at
    any of those steps, the store stays one that a second `verify --repair` (or `extract`) completes."""
    from safeport.store.store import Store as StoreClass
    from tests.store.test_faults import _disk_full_at

    catalog, root = copy
    before = extract_tests._snapshot(root)
    unit = unit_of(root, "src", "prompts")
    meta = root / "arrays.zarr" / unit["array_path"] / "zarr.json"
    meta.write_text(meta.read_text()[:40], encoding="utf-8")
    args = ["--catalog", str(catalog), "--store", str(root)]

    with monkeypatch.context() as m:
        if fault.startswith("disk full recreating"):
            _disk_full_at(m, root, 1, _is_meta_of(unit["array_path"]))
        elif fault.startswith("disk full writing"):
            _disk_full_at(m, root, 1, _is_chunk_of(unit["array_path"]))
        elif fault.startswith("killed between"):
            _kill_at(m, StoreClass, "reset_unit_array")
        elif fault.startswith("killed right after"):
            _kill_at(m, StoreClass, "reset_unit_array", after=True)
        else:
            _kill_at(m, StoreClass, "write_shard", after=True)
        if fault.startswith("disk full"):
            assert main(["verify", "--repair", *args]) == 2
            err = capsys.readouterr().err
            assert "No space left on device" in err and "Traceback" not in err
        else:
            with pytest.raises(Killed):
                main(["verify", "--repair", *args])
    capsys.readouterr()

    assert main(["verify", "--store", str(root)]) == 1  # still damaged (or awaiting re-extraction), and says so
    assert "safeport verify --repair" in capsys.readouterr().out
    if then == "extract":
        assert main(["extract", *args]) == 0
    else:
        assert main(["verify", "--repair", *args]) == 0
        assert "after repair: " in capsys.readouterr().out
    report = verify_path(root)
    assert report.ok, [d.describe() for d in report.damage]
    after = extract_tests._snapshot(root)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert json.loads(meta.read_text())["shape"] == [unit["n_rows"], 32]
    counts = extract_tests._counts(root)
    assert counts["rows"] == counts["distinct"]
