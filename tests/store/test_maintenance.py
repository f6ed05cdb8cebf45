"""Store upkeep without models: gc of orphan arrays, vector export/import, staleness labels."""

from __future__ import annotations

import argparse
import hashlib
import json
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


def vkey(name: str) -> str:
    """A vector key in the store's format (20 hex digits), as fits make them."""
    return hashlib.sha256(name.encode()).hexdigest()[:20]


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
                vkey(name),
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
            ("model", "unit", "map", "fit", "vector", "report"), 0
        )
        artifacts.start_fit(store, "fit1", "m", "n", {"source_key": "mk", "target_key": "nk"})
        counts = mark_stale(store, "p", {"m": "mk2"}, [])  # m got new weights; fit1 not produced
    assert counts == {"model": 1, "unit": 1, "map": 1, "fit": 1, "vector": 0, "report": 0}  # start_fit cleared fit1's
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


# -- hostile exports: every file of an import is checked before anything is written ----------------
def _exported(tmp_path: Path) -> tuple[Path, Path]:
    """(``.safetensors``, ``.json``) of one vector exported from a small store."""
    _build(tmp_path / "a")
    export_vectors(tmp_path / "a", tmp_path / "out", ["native:n"])
    (st,) = (tmp_path / "out").glob("*.safetensors")
    return st, st.with_suffix(".json")


def _edit_json(js: Path, **changes: Any) -> None:
    lineage = json.loads(js.read_text(encoding="utf-8"))
    lineage.update(changes)
    js.write_text(json.dumps(lineage), encoding="utf-8")


def _import_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Import the export into a fresh store through the CLI: one clean line, exit 2, nothing written."""
    from safeport.cli import main

    assert main(["import", "--store", str(tmp_path / "b"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safeport: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "b" / "meta.duckdb").exists()  # refused before touching the target store
    return err


BAD_KEYS: list[Any] = [
    "/some/other/store/arrays.zarr/zarr",
    "../../escape",
    "a/b",
    "0" * 19,
    "0" * 21,
    "g" * 20,
    "ABCDEF0123ABCDEF0123",
    " " + "0" * 19,
    12345,
    ["0" * 20],
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_import_refuses_a_vector_key_that_is_not_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: Any
) -> None:
    _, js = _exported(tmp_path)
    _edit_json(js, vector_key=key)
    err = _import_error(tmp_path, capsys)
    assert "vector_key" in err and "20 lowercase hex digits" in err and str(js) in err


def test_export_refuses_a_stored_key_that_is_not_a_key_and_writes_nothing(tmp_path: Path) -> None:
    """A store that took a path-like key from an older safeport must not let `export` write outside -o."""
    _build(tmp_path / "a")
    victim = tmp_path / "victim" / "zarr"
    victim.parent.mkdir()
    with Store(tmp_path / "a") as store:
        record = artifacts.VectorRecord(
            str(victim), "evil", "native", None, "n", None, None, np.ones(DIM, np.float32), {}
        )
        artifacts.save_vectors(store, "fit-evil", [record])
    out = tmp_path / "out"
    with pytest.raises(StoreError) as info:
        export_vectors(tmp_path / "a", out)
    assert "'evil'" in str(info.value) and "20 lowercase hex digits" in str(info.value)
    assert not victim.with_suffix(".json").exists() and not victim.with_suffix(".safetensors").exists()
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even the good vectors
    assert len(export_vectors(tmp_path / "a", out, ["native:n"])) == 1  # the others still export by name


def _save_values(st: Path, js: Path, values: np.ndarray, name: str = "vector") -> None:
    """Replace the exported tensor, recording a matching checksum: only the shape/value checks can catch it."""
    from safetensors.numpy import save_file

    from safeport.store.store import checksum

    save_file({name: values}, str(st))
    _edit_json(js, checksum=checksum(np.asarray(values, np.float32).reshape(1, -1)))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# (how to spoil the export, words the error must contain)
SPOILED: dict[str, tuple[Any, tuple[str, ...]]] = {
    "garbage safetensors": (
        lambda st, js: st.write_bytes(b"not a tensor file at all"),
        ("not a readable safetensors",),
    ),
    "truncated safetensors": (
        lambda st, js: st.write_bytes(st.read_bytes()[: len(st.read_bytes()) // 2]),
        ("not a readable safetensors",),
    ),
    "empty safetensors": (lambda st, js: st.write_bytes(b""), ("not a readable safetensors",)),
    "no tensor named vector": (
        lambda st, js: _save_values(st, js, np.ones(DIM, np.float32), name="other"),
        ("no tensor named 'vector'",),
    ),
    "2-D": (lambda st, js: _save_values(st, js, np.ones((2, DIM), np.float32)), ("shape (2, 3)", "1-D")),
    "empty vector": (lambda st, js: _save_values(st, js, np.ones(0, np.float32)), ("shape (0,)", "non-empty")),
    "scalar": (lambda st, js: _save_values(st, js, np.array(1.0, np.float32)), ("shape ()", "1-D")),
    "NaN": (lambda st, js: _save_values(st, js, np.array([1.0, np.nan, 0.0], np.float32)), ("NaN/inf",)),
    "inf": (lambda st, js: _save_values(st, js, np.array([1.0, np.inf, 0.0], np.float32)), ("NaN/inf",)),
    "integer tensor": (lambda st, js: _save_values(st, js, np.arange(DIM, dtype=np.int32)), ("int32", "float")),
    "JSON list": (lambda st, js: js.write_text("[]"), ("JSON list", "object")),
    "JSON null": (lambda st, js: js.write_text("null"), ("JSON NoneType", "object")),
    "JSON 10,000 levels deep": (lambda st, js: js.write_text(_deep(10_000)), ("nested",)),
    "JSON 100 levels deep in an object": (
        lambda st, js: _edit_json(js, input_units=json.loads(_deep(100))),
        ("nested",),
    ),
    "JSON syntax": (lambda st, js: js.write_text('{"name": '), ("not valid JSON",)),
    "JSON 5,000-digit integer": (lambda st, js: js.write_text('{"n": ' + "9" * 5000 + "}"), ("not valid JSON",)),
    "JSON not UTF-8": (lambda st, js: js.write_bytes(b'{"name": "\xff"}'), ("UTF-8",)),
    "name not a string": (lambda st, js: _edit_json(js, name=["x"]), ("name", "string")),
    "kind that is not a kind": (
        lambda st, js: _edit_json(js, kind="../Evil kind"),
        ("kind", "'../Evil kind'", "native"),
    ),
    "checksum not a checksum": (lambda st, js: _edit_json(js, checksum="../x"), ("checksum",)),
    "values changed": (
        lambda st, js: _edit_json(js, checksum="0" * 32),
        ("damaged or edited",),
    ),
}


@pytest.mark.parametrize("case", list(SPOILED))
def test_import_refuses_a_spoiled_export_with_one_clean_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    st, js = _exported(tmp_path)
    spoil, words = SPOILED[case]
    spoil(st, js)
    err = _import_error(tmp_path, capsys)
    for word in words:
        assert word in err, f"{case}: {word!r} not in {err!r}"
    assert st.name in err or js.name in err


def test_import_refuses_a_vector_whose_length_is_not_its_targets_dim(tmp_path: Path) -> None:
    """The target store knows model ``m`` (dim 3): a 4-value vector for it is refused before anything is written."""
    st, js = _exported(tmp_path)
    _build(tmp_path / "b")
    _save_values(st, js, np.ones(DIM + 1, np.float32))
    _edit_json(js, name="wide", vector_key=vkey("wide"), target="m", target_key="mk")
    with Store(tmp_path / "b", read_only=True) as store:
        before = store.scalar("SELECT count(*) FROM vectors")
    with pytest.raises(StoreError, match=r"4 values but model 'm' \(mk\) in .* has dim 3"):
        import_vectors(tmp_path / "b", tmp_path / "out")
    with Store(tmp_path / "b", read_only=True) as store:
        assert store.scalar("SELECT count(*) FROM vectors") == before
        assert store.scalar("SELECT count(*) FROM runs WHERE flow = 'import'") == 0


def test_a_re_keyed_vector_is_stale_with_a_note_that_its_values_did_not_change(tmp_path: Path) -> None:
    """A refit that stores the same values under a new key (e.g. after a store migration) says so in the reason."""
    v, w = np.ones(DIM, dtype=np.float32), np.arange(DIM, dtype=np.float32)
    with Store(tmp_path) as store:
        for fit, records in (
            ("fitA", [("oldk", "native:n", v), ("olds", "source:m", v)]),
            ("fitB", [("newk", "native:n", v), ("news", "source:m", w)]),
        ):
            artifacts.start_fit(store, fit, "m", "n", {})
            recs = [artifacts.VectorRecord(k, n, n.split(":")[0], "m", "n", None, None, x, {}) for k, n, x in records]
            artifacts.save_vectors(store, fit, recs)
            artifacts.finish_fit(store, fit, "", [("vector", k, n) for k, n, _ in records])
        counts = mark_stale(store, "p", {}, ["fitB"])
        reasons = dict(store.con.execute("SELECT key, reason FROM stale WHERE kind = 'vector'").fetchall())
    assert counts["fit"] == 1 and counts["vector"] == 2
    assert reasons["oldk"].endswith("re-keyed: the same values are current as vector newk")
    assert "superseded by a newer fit" in reasons["olds"] and "re-keyed" not in reasons["olds"]  # new values
