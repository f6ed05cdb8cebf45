"""Stores written before rows-only dataset hashes are migrated in place: no row recomputed, units re-pointed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from safeport.store import artifacts
from safeport.store.migrate import migrate
from safeport.store.store import Store
from safeport.texts import rows_hash

DIM = 3
IDS = [f"t{i}" for i in range(4)]


def _old_store(root: Path) -> None:
    """A store as an older safeport left it: catalog-entry dataset hashes, no fit_outputs, old ``fits`` columns."""
    rows = pa.table(
        {
            "idx": list(range(4)),
            "text_id": IDS,
            "text": [f"text {i}" for i in range(4)],
            "split": pa.array(["train", "train", "val", "test"], pa.string()),
            "category": pa.array(["a", None, "b", None], pa.string()),
            "pair_id": pa.array([0, 0, 1, 1], pa.int32()),
            "side": pa.array(["safe", "unsafe", "safe", "unsafe"], pa.string()),
        }
    )
    spec = {"family": "text_encoder", "model_id": "m", "revision": "main", "weights": "w"}
    values = np.arange(4 * DIM, dtype=np.float32).reshape(4, DIM)
    with Store(root) as store:
        store.register_dataset("d", "pairs", "old-entry-hash", rows, {})
        store.register_model("mk", "m", "source", spec, DIM)
        unit = store.create_unit("u1", "mk", "d", "old-entry-hash", IDS, DIM, 2)
        for shard in range(2):
            sl = slice(2 * shard, 2 * shard + 2)
            store.write_shard(unit, shard, IDS[sl], values[sl], np.array([3, 4]), np.array([False, False]))
        store.finish_unit("u1")
        store.create_unit("u0", "mk", "d", "an-earlier-version", [], DIM, 2)  # rows that changed since
        artifacts.start_fit(store, "fit1", "m", "n", {"source_key": "mk", "target_key": "nk"})
        record = artifacts.VectorRecord(
            "vk1", "native:n", "native", None, "n", None, None, values[0], {"fit_key": "fit1"}
        )
        artifacts.save_vectors(store, "fit1", [record])
        artifacts.finish_fit(store, "fit1", "")
        con = store.con
        con.execute("DELETE FROM meta WHERE key = 'dataset_hash'")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")  # before content keys
        con.execute("DROP TABLE fit_outputs")
        con.execute("ALTER TABLE fits DROP COLUMN report_key")
        con.execute("ALTER TABLE fits DROP COLUMN summary_json")


def test_old_store_is_migrated_in_place_without_recomputing_rows(tmp_path: Path) -> None:
    _old_store(tmp_path)
    with Store(tmp_path, read_only=True) as store:
        rows_before = store.sql("SELECT * FROM activation_rows ORDER BY text_id").to_pylist()
        shards_before = store.sql("SELECT unit_key, shard, checksum FROM shards ORDER BY 1, 2").to_pylist()
        stored = store.con.execute(
            "SELECT text_id, split, category, pair_id, side FROM dataset_texts WHERE dataset = 'd' ORDER BY idx"
        ).fetchall()
    want = rows_hash(stored)
    assert want != "old-entry-hash"

    with Store(tmp_path) as store:  # a writer open migrates
        assert store.dataset_hash("d") == want
        assert store.done_unit("mk", "d", want) == "u1"  # the unit is found under the new hash: nothing to extract
        assert store.scalar("SELECT dataset_hash FROM units WHERE unit_key = 'u0'") == "an-earlier-version"
        assert store.sql("SELECT * FROM activation_rows ORDER BY text_id").to_pylist() == rows_before
        assert store.sql("SELECT unit_key, shard, checksum FROM shards ORDER BY 1, 2").to_pylist() == shards_before
        assert store.con.execute("SELECT fit_key, kind, key, name FROM fit_outputs").fetchall() == [
            ("fit1", "vector", "vk1", "native:n")
        ]
        assert store.scalar("SELECT count(*) FROM fits WHERE report_key IS NULL AND summary_json IS NULL") == 1
        with store.transaction() as con:
            assert migrate(con) == []  # idempotent: a current store has nothing to do
        assert np.array_equal(store.activations("mk", "d")[1], np.arange(4 * DIM).reshape(4, DIM))
    with Store(tmp_path, read_only=True) as store:
        assert store.sql("SELECT vector, kind, fit_key FROM lineage").to_pylist() == [
            {"vector": "native:n", "kind": "native", "fit_key": "fit1"}
        ]


def test_new_store_records_the_scheme_and_has_nothing_to_migrate(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        assert store.scalar("SELECT value FROM meta WHERE key = 'dataset_hash'") == "rows-v1"
        with store.transaction() as con:
            assert migrate(con) == []
