"""Content addressing end to end on a rebuilt tiny store (issue 14).

Moving the data, converting CSV to Parquet, editing descriptions and reordering the
catalog re-key nothing; adding a prompt set computes only its units and report rows;
equivalent catalogs give the same lineage rows; a store with old dataset hashes is
migrated without extracting anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from safeport.catalog import load_catalog
from safeport.cli import main
from safeport.datasets import build_all
from safeport.flows.rebuild import rebuild
from safeport.store.artifacts import read_exported_vector
from safeport.store.maintenance import export_vectors
from safeport.store.readers import read_columns
from safeport.store.store import Store
from tests.flows.catalogs import tiny_catalog
from tests.flows.conftest import REBUILT_SIZES as SIZES
from tests.flows.test_rebuild import _only_loads, _runs

ARTEFACTS = {
    "units": "SELECT unit_key, dataset_hash, status FROM units",
    "maps": "SELECT map_key FROM maps",
    "fits": "SELECT fit_key, status FROM fits",
    "vectors": "SELECT vector_key, name, checksum FROM vectors",
    "reports": "SELECT report_key, prompt_set FROM report_sets",
}


@pytest.fixture
def work(rebuilt_tiny: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "w"
    shutil.copytree(rebuilt_tiny, dst)
    return dst


def _artefacts(root: Path) -> dict[str, list[tuple[Any, ...]]]:
    with Store(root, read_only=True) as store:
        return {k: sorted(store.con.execute(q).fetchall()) for k, q in ARTEFACTS.items()}


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


def equivalent_catalog(folder: Path, store: Path) -> Path:
    """The tiny catalog as another user would write it: the same data moved to another folder, I2P
    converted from CSV to Parquet, descriptions everywhere, every mapping's keys reversed, comments."""
    data = yaml.safe_load(tiny_catalog(folder, **SIZES).read_text(encoding="utf-8"))
    moved = folder / "moved-data"
    moved.mkdir(exist_ok=True)
    for entry in data["datasets"].values():
        entry["description"] = "written by someone else"
        for src in entry["sources"]:
            old = Path(src["path"])
            if old.name == "i2p.csv":
                cols = read_columns(old, "csv", ["prompt", "categories"])
                pq.write_table(pa.table(cols), moved / "i2p.parquet")
                src["path"] = str(moved / "i2p.parquet")
            else:
                shutil.copyfile(old, moved / old.name)
                src["path"] = str(moved / old.name)
    for entry in data["models"].values():
        entry["description"] = "a tiny test model"
    data["profiles"]["default"]["description"] = "the same profile"
    data["profiles"]["default"]["store"] = str(store)
    path = folder / "equivalent.yaml"
    text = yaml.safe_dump(_reverse_keys(data), sort_keys=False)
    path.write_text("# the same catalog, rewritten\n" + text.replace("\nprofiles:", "\n# profiles\nprofiles:"), "utf-8")
    return path


def test_equivalent_catalog_computes_nothing_and_marks_nothing_stale(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = work / "store"
    before = _artefacts(root)
    catalog = equivalent_catalog(work, root)
    original = build_all(load_catalog(work / "catalog.yaml"))
    assert {k: v.content_hash for k, v in build_all(load_catalog(catalog)).items()} == {
        k: v.content_hash for k, v in original.items()
    }
    loaded = _only_loads(monkeypatch, set())  # no model has any work

    assert main(["rebuild", "--catalog", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "nothing was computed" in out and "stale (kept; see `safeport status`): nothing" in out
    assert loaded == []
    assert _artefacts(root) == before  # zero new units, maps, fits, vectors, report rows
    with Store(root, read_only=True) as store:
        assert store.scalar("SELECT count(*) FROM stale") == 0
        run = store.scalar("SELECT run_id FROM runs ORDER BY finished_at DESC LIMIT 1")
        report = json.loads(store.scalar("SELECT report_json FROM datasets WHERE dataset = 'prompts'"))
    assert {s for flow in ("extract", "fit", "report") for s in _runs(root, run, flow).values()} == {"skipped"}
    assert report["files"] == [
        {
            "source": 0,
            "path": str(work / "moved-data" / "i2p.parquet"),
            "bytes": (work / "moved-data" / "i2p.parquet").stat().st_size,
        }
    ]  # the report says where the rows were read from now


def _with_prompt_set(work: Path) -> Path:
    """The tiny catalog plus a T2VSafetyBench-like prompt set: a folder of 3 numbered .txt files, 5 prompts each."""
    folder = work / "t2v"
    folder.mkdir(exist_ok=True)
    for n in (1, 2, 10):
        (folder / f"{n}.txt").write_text("".join(f"a short video of scene {i} number {n}\n" for i in range(5)), "utf-8")
    data = yaml.safe_load(tiny_catalog(work, **SIZES).read_text(encoding="utf-8"))
    data["datasets"]["t2v"] = {"kind": "prompts", "sources": [{"path": "t2v/*.txt"}]}
    data["profiles"]["default"]["prompts"].append("t2v")
    path = work / "with-t2v.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_adding_then_removing_a_prompt_set_touches_only_its_units_and_report(work: Path, tmp_path: Path) -> None:
    root = work / "store"
    before = _artefacts(root)
    first = export_vectors(root, tmp_path / "x1", ["calibrated:src->tgt:ridge", "native:tgt"])

    added = rebuild(str(_with_prompt_set(work)))
    done = {(r.model, r.dataset): (r.status, r.rows) for r in added.extracted if r.status == "done"}
    assert done == {("src", "t2v"): ("done", 15), ("tgt", "t2v"): ("done", 15)}  # the glob: 3 files x 5 lines
    assert [(f.status, f.reports_done) for f in added.fitted] == [("skipped", 1)]
    assert not any(added.stale.values())
    after = _artefacts(root)
    for kind in ("maps", "fits", "vectors"):
        assert after[kind] == before[kind], kind  # every map, fit and vector keeps its key
    assert {p for _, p in after["reports"]} == {"prompts", "t2v"}
    assert before["reports"][0] in after["reports"]
    again = export_vectors(root, tmp_path / "x2", ["calibrated:src->tgt:ridge", "native:tgt"])
    assert [p.name for p in again] == [p.name for p in first]  # exported file names are stable
    for a, b in zip(first, again, strict=True):  # same values and lineage (only the export time differs)
        (va, la), (vb, lb) = read_exported_vector(a), read_exported_vector(b)
        assert np.array_equal(va, vb) and la["inputs"] == lb["inputs"] and la["checksum"] == lb["checksum"]
    report = Path(added.fitted[0].report).read_text(encoding="utf-8")
    assert "### t2v" in report and "### prompts" in report

    removed = rebuild(str(tiny_catalog(work, **SIZES)))
    assert {r.status for r in removed.extracted} == {"skipped"}
    assert [(f.status, f.reports_done) for f in removed.fitted] == [("skipped", 0)]
    assert {k: removed.stale[k] for k in ("model", "unit", "map", "fit", "vector")} == dict.fromkeys(
        ("model", "unit", "map", "fit", "vector"), 0
    )
    assert removed.stale["report"] == 1  # only the t2v report rows are out of the profile now
    assert "### t2v" not in Path(removed.fitted[0].report).read_text(encoding="utf-8")

    back = rebuild(str(_with_prompt_set(work)))  # putting it back costs nothing
    assert {r.status for r in back.extracted} == {"skipped"}
    assert [(f.status, f.reports_done) for f in back.fitted] == [("skipped", 0)]
    assert not any(back.stale.values())


LINEAGE = "SELECT * FROM lineage ORDER BY vector_key"


def test_equivalent_catalogs_give_the_same_lineage_rows(rebuilt_tiny: Path, tmp_path: Path) -> None:
    shutil.copytree(rebuilt_tiny / "models", tmp_path / "models")
    result = rebuild(str(equivalent_catalog(tmp_path, tmp_path / "other-store")))
    assert {r.status for r in result.extracted} == {"done"}
    with Store(rebuilt_tiny / "store", read_only=True) as a, Store(tmp_path / "other-store", read_only=True) as b:
        rows = a.sql(LINEAGE).to_pylist()
        assert rows == b.sql(LINEAGE).to_pylist()
        maps = {r[0] for r in a.con.execute("SELECT map_key FROM maps").fetchall()}
        models = {r[0] for r in a.con.execute("SELECT model_key FROM models").fetchall()}
        hashes = {r[0] for r in a.con.execute("SELECT content_hash FROM datasets").fetchall()}
        units = {r[0] for r in a.con.execute("SELECT unit_key FROM units").fetchall()}
    for r in rows:  # every vector names the exact keys it was computed from, and they exist
        inputs = json.loads(r["inputs"])
        assert r["pairs_hash"] == inputs["pairs_hash"] and inputs["pairs_hash"] in hashes
        assert set(json.loads(r["input_units"])) <= units
        if r["kind"] in ("raw", "calibrated", "uncalibrated"):
            assert inputs["map_key"] == r["map_key"] and r["map_key"] in maps
        if r["kind"] in ("source", "random", "string"):
            assert r["source_key"] in models
        if r["kind"] in ("native", "random", "string"):
            assert r["target_key"] in models


def _legacy_hash(entry_json: str, rows: list[tuple[Any, ...]]) -> str:
    """How an older safeport hashed a dataset: its catalog entry's JSON, then the rows."""
    h = hashlib.sha256(entry_json.encode())
    for r in rows:
        h.update(json.dumps(list(r)).encode())
    return h.hexdigest()[:20]


def test_store_with_old_dataset_hashes_is_migrated_and_extracts_nothing(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = work / "store"
    resolved = load_catalog(tiny_catalog(work, **SIZES))
    with Store(root) as store:
        report_rows = sorted(
            store.con.execute("SELECT method, category, alpha, value FROM eval_results WHERE kind = 'proxy'").fetchall()
        )
        for name, entry in resolved.datasets.items():  # back to the old hashes, as an older safeport wrote them
            rows = store.con.execute(
                "SELECT text_id, split, category, pair_id, side FROM dataset_texts WHERE dataset = ? ORDER BY idx",
                [name],
            ).fetchall()
            new, old = store.dataset_hash(name), _legacy_hash(entry.model_dump_json(), rows)
            store.con.execute("UPDATE datasets SET content_hash = ? WHERE dataset = ?", [old, name])
            store.con.execute("UPDATE units SET dataset_hash = ? WHERE dataset_hash = ?", [old, new])
        store.con.execute("DELETE FROM meta WHERE key = 'dataset_hash'")
        store.con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")  # before content keys
        for table in ("fit_outputs", "report_sets"):
            store.con.execute(f"DROP TABLE {table}")
        store.con.execute("DELETE FROM eval_results WHERE kind = 'proxy'")
        for column in ("report_key", "summary_json"):
            store.con.execute(f"ALTER TABLE fits DROP COLUMN {column}")
    loaded = _only_loads(monkeypatch, set())

    result = rebuild(str(resolved.path))
    assert loaded == [] and {r.status for r in result.extracted} == {"skipped"}  # no row recomputed
    assert [(f.status, f.reports_done) for f in result.fitted] == [("skipped", 1)]  # report rows from stored vectors
    assert not any(result.stale.values())
    with Store(root, read_only=True) as store:
        again = sorted(
            store.con.execute("SELECT method, category, alpha, value FROM eval_results WHERE kind = 'proxy'").fetchall()
        )
        assert store.scalar("SELECT count(*) FROM units WHERE status = 'done'") == 8  # 2 models x 4 datasets
    assert again == report_rows  # the same numbers as when the vectors were computed in the fit
