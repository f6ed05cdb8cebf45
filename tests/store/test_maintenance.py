"""Store upkeep without models: gc of orphan arrays, vector export/import, staleness labels."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from safeport.store import artifacts
from safeport.store.maintenance import collect_garbage, export_vectors, import_vectors, mark_stale, status
from safeport.store.store import Store, StoreError

DIM = 3


def _build(root: Path, arrays: str | None = None) -> dict[str, np.ndarray]:
    """A small real store: one dataset, one model with a 2-shard unit, one map, three vectors.

    ``arrays``: where its Zarr arrays live (default: the store folder).
    """
    ids = [f"t{i}" for i in range(4)]
    rows = pa.table(
        {
            "idx": list(range(4)),
            "text_id": ids,
            "text": [f"text {i}" for i in range(4)],
            "split": pa.array(["train"] * 4, pa.string()),
            "category": pa.array([None] * 4, pa.string()),
            "pair_id": pa.array([None] * 4, pa.int32()),
            "side": pa.array([None] * 4, pa.string()),
        }
    )
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, DIM)).astype(np.float32)
    spec = {"family": "text_encoder", "model_id": "m", "revision": "main", "weights": "w"}
    vectors = {
        "calibrated:m->n:ridge": rng.normal(size=DIM).astype(np.float32),
        "native:n": rng.normal(size=DIM).astype(np.float32),
        "calibrated:m->n:ridge:violence": rng.normal(size=DIM).astype(np.float32),
    }
    with Store(root, arrays=arrays) as store:
        store.register_dataset("d", "anchors", "h1", rows, {})
        store.register_model("mk", "m", "source", spec, DIM)
        unit = store.create_unit("u1", "mk", "d", "h1", ids, DIM, 2)
        for shard in range(2):
            sl = slice(2 * shard, 2 * shard + 2)
            store.write_shard(unit, shard, ids[sl], values[sl], np.array([3, 4]), np.array([False, False]))
        store.finish_unit("u1")
        artifacts.save_map(
            store,
            "map1",
            {"w": np.eye(DIM, dtype=np.float32)},
            {
                "source": "m",
                "target": "n",
                "source_key": "mk",
                "target_key": "nk",
                "mapper": "ridge",
                "params": {"alpha": 1.0},
                "split_hash": "s",
                "anchors": "d",
                "anchors_hash": "h1",
                "input_units": ["u1"],
                "code_version": "test",
                "n_train": 4,
            },
        )
        lineage = {"fit_key": "fit1", "source_key": "mk", "target_key": "nk", "input_units": ["u1"], "scale": 1.5}
        records = [
            artifacts.VectorRecord(
                f"vk{i}",
                name,
                name.split(":")[0],
                None if name.startswith("native") else "m",
                "n",
                "ridge" if "ridge" in name else None,
                "violence" if name.endswith("violence") else None,
                v,
                {**lineage, "map_key": "map1" if "ridge" in name else None},
            )
            for i, (name, v) in enumerate(vectors.items())
        ]
        artifacts.save_vectors(store, "fit1", records)
    return vectors


ORPHANS = {"acts/mk/u-crashed", "acts/gone-model", "maps/map-orphan", "vectors/vk-orphan"}


def _add_orphans(root: Path) -> None:
    """Arrays a crash (array written, record not) or a replaced artefact would leave behind."""
    with Store(root) as store:
        for path in ("acts/mk/u-crashed", "acts/gone-model/u9", "maps/map-orphan/w", "vectors/vk-orphan"):
            store.arrays.create_array(path, data=np.ones((4, DIM), dtype=np.float32))


def _exists(root: Path, path: str) -> bool:
    """Whether anything is stored under ``path`` at the store's arrays location (folder or URL)."""
    with Store(root, read_only=True) as store:
        return store.location.size(path) > 0


@pytest.fixture(params=["folder", "memory", "elsewhere"])
def arrays(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """The arrays location of the store under test: its folder, a memory:// URL, a path outside the folder."""
    import fsspec

    url = {"folder": None, "memory": f"memory://{tmp_path.name}/arrays.zarr", "elsewhere": str(tmp_path / "shared")}
    yield url[request.param]
    if request.param == "memory":
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


def test_gc_dry_run_lists_only_unreferenced_arrays_and_deletes_nothing(tmp_path: Path, arrays: str | None) -> None:
    _build(tmp_path, arrays)
    assert collect_garbage(tmp_path).garbage == []  # a clean store has no garbage
    _add_orphans(tmp_path)
    report = collect_garbage(tmp_path)
    assert not report.applied
    assert {g.path for g in report.garbage} == ORPHANS
    assert all(g.bytes > 0 for g in report.garbage) and report.bytes == sum(g.bytes for g in report.garbage)
    assert all(_exists(tmp_path, p) for p in ORPHANS)


def test_gc_apply_deletes_them_and_the_store_still_reads(tmp_path: Path, arrays: str | None) -> None:
    vectors = _build(tmp_path, arrays)
    _add_orphans(tmp_path)
    report = collect_garbage(tmp_path, apply=True)
    assert {g.path for g in report.garbage} == ORPHANS and report.applied
    assert not any(_exists(tmp_path, p) for p in ORPHANS)
    assert collect_garbage(tmp_path).garbage == []
    with Store(tmp_path, read_only=True) as store:
        meta, values = store.activations("mk", "d")
        assert meta.num_rows == 4 and np.isfinite(values).all()  # checksum-verified read
        for name, v in vectors.items():
            np.testing.assert_array_equal(artifacts.load_vector(store, name)[0], v)
        state, _ = artifacts.load_map(store, "map1", artifacts.map_state_names(store, "map1"))
        np.testing.assert_array_equal(state["w"], np.eye(DIM))


def test_gc_beside_a_running_writer_keeps_what_it_may_be_writing(tmp_path: Path) -> None:
    """An unreferenced array written since a live writer started may be its next record: kept, not deleted."""
    _build(tmp_path)
    _add_orphans(tmp_path)
    old = time.time() - 3600
    for path in (tmp_path / "arrays.zarr").rglob("*"):
        os.utime(path, (old, old))  # a crash an hour ago left these
    writer = Store(tmp_path)
    try:
        writer.session  # noqa: B018 - a running writer (e.g. an extraction), visible through its presence claim
        with Store(tmp_path) as other:
            other.arrays.create_array("acts/mk/u-in-flight", data=np.ones((4, DIM), dtype=np.float32))
        report = collect_garbage(tmp_path, apply=True)
        assert {g.path for g in report.garbage} == ORPHANS  # old leftovers go
        assert [g.path for g in report.in_flight] == ["acts/mk/u-in-flight"]  # the writer's new array stays
        assert _exists(tmp_path, "acts/mk/u-in-flight") and not any(_exists(tmp_path, p) for p in ORPHANS)
    finally:
        writer.close()
    report = collect_garbage(tmp_path)  # no writer running: nothing is in flight any more
    assert [g.path for g in report.garbage] == ["acts/mk/u-in-flight"] and report.in_flight == []


def test_export_import_round_trip_keeps_values_and_lineage(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    vectors = _build(a)
    Store(b).close()  # an empty store
    files = export_vectors(a, out)
    assert len(files) == 3 and (out / "manifest.json").is_file()

    done = import_vectors(b, out)
    assert sorted(v.status for v in done) == ["imported"] * 3
    with Store(a, read_only=True) as sa, Store(b, read_only=True) as sb:
        for name, v in vectors.items():
            _, la = artifacts.load_vector(sa, name)
            vb, lb = artifacts.load_vector(sb, name)
            np.testing.assert_array_equal(vb, v)
            assert vb.dtype == np.float32
            for key in ("vector_key", "kind", "source", "target", "mapper", "category", "fit_key", "map_key"):
                assert lb[key] == la[key], key
            assert lb["input_units"] == ["u1"] and lb["scale"] == 1.5
            assert lb["imported_from"]["store"] == str(a.resolve())
        cols = "vector_key, name, kind, source, target, mapper, category, map_key, fit_key, dim, norm, checksum"
        assert sorted(sa.con.execute(f"SELECT {cols} FROM vectors").fetchall()) == sorted(
            sb.con.execute(f"SELECT {cols} FROM vectors").fetchall()
        )
        assert sb.scalar("SELECT count(*) FROM lineage") == 3  # queryable like any other vector
        assert sb.scalar("SELECT count(*) FROM runs WHERE flow = 'import' AND status = 'done'") == 3

    again = import_vectors(b, out)  # same keys, same checksums: nothing to do
    assert {v.status for v in again} == {"present"}


def test_import_refuses_a_damaged_export(tmp_path: Path) -> None:
    _build(tmp_path / "a")
    out = tmp_path / "out"
    export_vectors(tmp_path / "a", out, ["native:n"])
    (st,) = out.glob("*.safetensors")
    values, _ = artifacts.read_exported_vector(st)
    from safetensors.numpy import save_file

    save_file({"vector": values + np.float32(1e-3)}, str(st))  # values changed on the way
    with pytest.raises(StoreError, match="damaged or edited"):
        import_vectors(tmp_path / "b", out)
    assert not (tmp_path / "b" / "meta.duckdb").exists()  # refused before touching the target


def test_stale_labels_follow_the_model_and_clear_when_it_returns(tmp_path: Path) -> None:
    _build(tmp_path)
    with Store(tmp_path) as store:
        assert mark_stale(store, "p", {"m": "mk"}, ["fit1"]) == dict.fromkeys(
            ("model", "unit", "map", "fit", "vector"), 0
        )
        artifacts.start_fit(store, "fit1", "m", "n", {"source_key": "mk", "target_key": "nk"})
        counts = mark_stale(store, "p", {"m": "mk2"}, [])  # m got new weights; fit1 not produced
    assert counts == {"model": 1, "unit": 1, "map": 1, "fit": 1, "vector": 0}  # start_fit cleared fit1's vectors
    st = status(tmp_path)
    assert {r["kind"] for r in st.stale.to_pylist()} == {"model", "unit", "map", "fit"}
    assert all("superseded by mk2" in r["reason"] for r in st.stale.to_pylist())
    assert st.rows.to_pylist()[0]["rows"] == 4
    with Store(tmp_path) as store:
        assert not any(mark_stale(store, "p", {"m": "mk"}, ["fit1"]).values())


def _parser() -> argparse.ArgumentParser:
    """The real CLI parser (its ``add`` gives every command --catalog/--profile/--store)."""
    from safeport.cli import build_parser

    return build_parser()


def _cli(*argv: str) -> Any:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_gc_export_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _build(a)
    _add_orphans(a)
    assert _cli("gc", "--store", str(a)) == 0
    out = capsys.readouterr().out
    assert "would remove 4 unreferenced array(s)" in out and "pass --apply" in out
    assert all(_exists(a, p) for p in ORPHANS)
    assert _cli("gc", "--store", str(a), "--apply") == 0
    assert "removed 4" in capsys.readouterr().out
    assert _cli("export", "--store", str(a), "-o", str(tmp_path / "x"), "native:n") == 0
    assert _cli("import", "--store", str(b), str(tmp_path / "x")) == 0
    assert "1 vector(s) imported" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _cli("serve", "--store", str(a))  # a schedule is required


KILLED_REWRITE = """
import os, pathlib, sys
import numpy as np
from safeport.store.store import Store

def die(self, target):  # SIGKILL between writing a chunk's temporary file and renaming it
    os.kill(os.getpid(), 9)

pathlib.Path.replace = die
with Store(sys.argv[1]) as store:
    array = store.arrays["acts/mk/u1"]
    array[0:2, :] = array[0:2, :]  # a resumed shard rewriting its own rows
"""


def test_gc_removes_the_temporary_file_of_a_write_killed_before_its_rename(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    _build(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_REWRITE, str(tmp_path)], cwd=REPO, check=False)
    assert killed.returncode == -9
    partial = list((tmp_path / "arrays.zarr").rglob("*.partial"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0

    report = collect_garbage(tmp_path)
    assert [(g.kind, g.path) for g in report.garbage] == [
        ("partial", str(partial[0].relative_to(tmp_path / "arrays.zarr")))
    ]
    assert partial[0].exists()  # a dry run deletes nothing
    assert collect_garbage(tmp_path, apply=True).applied and not partial[0].exists()
    assert collect_garbage(tmp_path).garbage == []
    with Store(tmp_path, read_only=True) as store:
        assert store.activations("mk", "d")[0].num_rows == 4  # the committed chunk was never touched
