"""safeport's public read side (safeport/api.py): vectors by name, read-only, never holding the store open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from safeport import Store, load_vector, read_exported_vector
from safeport.store.artifacts import VectorRecord, export_vector, save_vectors
from safeport.store.store import Store as Handle
from safeport.store.store import StoreError

KEY = "0123456789abcdef0123"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api") / "store"
    values = np.arange(4, dtype=np.float32)
    with Handle(root) as store:
        save_vectors(
            store,
            "fit-1",
            [
                VectorRecord(KEY, "calibrated:a->b:ridge", "calibrated", "a", "b", "ridge", None, values, {"x": 1}),
                VectorRecord(KEY[::-1], "native:c", "native", None, "c", None, None, values + 1, {}),
            ],
        )
    return root


def test_store_lists_and_loads_vectors(root: Path) -> None:
    store = Store(root)
    assert store.vectors() == ["calibrated:a->b:ridge", "native:c"]
    assert store.vectors(target="c") == ["native:c"]
    v, lineage = store.load_vector("calibrated:a->b:ridge")
    assert v.tolist() == [0, 1, 2, 3] and lineage["vector_key"] == KEY and lineage["x"] == 1
    assert load_vector(str(root), "native:c")[0].tolist() == [1, 2, 3, 4]  # a folder works too
    assert store.query("SELECT count(*) AS n FROM vectors").column("n").to_pylist() == [2]
    with Handle(root) as writer:  # nothing of the Store stays open: a writer gets in between calls
        assert writer.scalar("SELECT count(*) FROM vectors") == 2


def test_store_errors_name_the_store_and_the_vector(root: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no store at .*nowhere.*safeport run"):
        Store(tmp_path / "nowhere")
    with pytest.raises(StoreError, match=r"no vector named 'nope'.*calibrated:a->b:ridge"):
        load_vector(Store(root), "nope")


def test_read_exported_vector_takes_a_string(root: Path, tmp_path: Path) -> None:
    v, lineage = load_vector(root, "native:c")
    export_vector(v, lineage, tmp_path / lineage["vector_key"])
    again, meta = read_exported_vector(str(tmp_path / f"{lineage['vector_key']}.safetensors"))
    assert np.array_equal(again, v) and meta["name"] == "native:c"
