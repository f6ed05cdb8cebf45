"""General units: token rows with coordinates and pooled rows, from write through SQL, ``read_rows`` and the stream.

Every value encodes its own identity (columns 0-2: text, step, token), so a row that lands under
another row's index entry is visible; the other columns are random, so float16 rounding is too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import zarr

from safeport.store.query import readonly_query
from safeport.store.store import Store, StoreError, UnitInfo
from safeport.store.verify import verify_path

DIM = 6
TEXTS = [f"t{i}" for i in range(4)]
SPLITS = ["train", "train", "val", "test"]
SIDES = ["safe", "unsafe", "safe", "unsafe"]
STEPS = (0, 1, 2)
POSITION = "double.0.img"
SPEC = {"family": "dit", "model_id": "m", "revision": "main", "weights": "w"}
# Coordinates of one planted token row, in the order of the row index's columns.
Row = tuple[str, int, int, str, str, int, int, str, int, int, bool]


def _register(store: Store) -> None:
    rows = pa.table(
        {
            "idx": list(range(len(TEXTS))),
            "text_id": TEXTS,
            "text": [f"text {i}" for i in range(len(TEXTS))],
            "split": SPLITS,
            "category": pa.array(["a", None, "b", None], pa.string()),
            "pair_id": pa.array([0, 0, 1, 1], pa.int32()),
            "side": SIDES,
        }
    )
    store.register_dataset("d", "pairs", "h", rows, {})
    store.register_model("mk", "m", "target", SPEC, DIM)


def _token_rows(text: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """Three rows of ``text`` (steps 0/1/2, token 10 * text + step), each value naming its (text, step, token)."""
    values = rng.standard_normal((len(STEPS), DIM)).astype(np.float32)
    coords: dict[str, list[Any]] = {"position": [], "step": [], "token": [], "stream": [], "seed": []}
    for i, step in enumerate(STEPS):
        values[i, :3] = (text, step, 10 * text + step)
        for name, value in (("position", POSITION), ("step", step), ("token", 10 * text + step)):
            coords[name].append(value)
        coords["stream"].append("img")
        coords["seed"].append(42)
    return values, coords


def _write_token_unit(store: Store, peak: float | None = None) -> tuple[UnitInfo, dict[tuple[int, int], np.ndarray]]:
    """Unit ``tok``: 4 texts in 2 shards of 2 texts, 3 rows per text; ``peak`` replaces one value of shard 1.

    Returns the unit and the float32 values written, by (shard, row).
    """
    rng = np.random.default_rng(0)
    unit = store.create_unit("tok", "mk", "d", "h", TEXTS, DIM, 2, kind="tokens", position=POSITION, dtype="float16")
    written: dict[tuple[int, int], np.ndarray] = {}
    for shard in range(2):
        parts = [_token_rows(text, rng) for text in (2 * shard, 2 * shard + 1)]
        values = np.concatenate([p[0] for p in parts])
        coords = {name: np.asarray([v for p in parts for v in p[1][name]]) for name in parts[0][1]}
        if shard == 1 and peak is not None:
            values[4, 5] = peak
        ids = [TEXTS[2 * shard + i // 3] for i in range(len(values))]
        n_tokens = np.array([7 + TEXTS.index(t) for t in ids])
        truncated = np.array([t == "t3" for t in ids])
        store.write_shard(unit, shard, ids, values, n_tokens, truncated, coords=coords)
        written.update({(shard, row): values[row].copy() for row in range(len(values))})
    assert store.finish_unit("tok")
    return unit, written


def _planted() -> list[Row]:
    """The row index ``_write_token_unit`` must leave: (unit, shard, row, text, coordinates..., n_tokens, truncated)."""
    out: list[Row] = []
    for text in range(4):
        shard, first = divmod(text, 2)
        for i, step in enumerate(STEPS):
            row = 3 * first + i
            out.append(
                ("tok", shard, row, TEXTS[text], POSITION, step, 10 * text + step, "img", 42, 7 + text, text == 3)
            )
    return out


def _coords(**columns: Sequence[Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(values) for name, values in columns.items()}


def _stored_dtype(store: Store, path: str) -> str:
    """The dtype of the Zarr array at ``path``: what is on disk, whatever the records say."""
    array = store.arrays[path]
    assert isinstance(array, zarr.Array), path
    return str(array.dtype)


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def test_token_rows_round_trip_through_sql_read_rows_and_the_stream(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        _register(store)
        unit, written = _write_token_unit(store)
        assert (unit.kind, unit.layout, unit.position, unit.dtype) == ("tokens", "shards", POSITION, "float16")
        assert store.fetchall("SELECT n_rows, n_texts, status FROM units WHERE unit_key = 'tok'") == [(12, 4, "done")]

        # SQL: the row index and the view over it.
        index = store.fetchall(
            "SELECT unit_key, shard, row, text_id, position, step, token, stream, seed, n_tokens, truncated "
            "FROM unit_rows ORDER BY shard, row"
        )
        assert index == _planted()
        by_step = "SELECT position, step, count(*) AS n FROM token_rows GROUP BY ALL ORDER BY ALL"
        assert store.fetchall(by_step) == [(POSITION, step, 4) for step in STEPS]
        assert store.fetchall("SELECT count(*) FROM activation_rows") == [(0,)]  # token rows are not pooled rows

        # On disk: float16 arrays, one per shard, as the records say.
        records = store.fetchall("SELECT shard, array_path, dtype FROM shards WHERE unit_key = 'tok' ORDER BY shard")
        assert records == [(0, "acts/mk/tok/0", "float16"), (1, "acts/mk/tok/1", "float16")]
        assert [_stored_dtype(store, path) for _, path, _ in records] == ["float16", "float16"]

        # read_rows: a scrambled selection comes back in its own order, float16-rounded.
        order = [7, 0, 11, 3, 5, 1, 10, 2, 9, 4, 8, 6]
        planted = _planted()
        selection = pa.table(
            {
                "unit_key": [planted[i][0] for i in order],
                "shard": [planted[i][1] for i in order],
                "row": [planted[i][2] for i in order],
            }
        )
        got = store.read_rows(selection)
        want = np.stack([written[(planted[i][1], planted[i][2])] for i in order])
        np.testing.assert_array_equal(got, _f16(want))
        assert not np.array_equal(got, want)  # the random columns really were rounded
        identity = [(TEXTS.index(planted[i][3]), planted[i][5], planted[i][6]) for i in order]
        np.testing.assert_array_equal(got[:, :3], identity)

        # The stream: every row once, each value under its own index entry.
        seen: dict[tuple[int, int], np.ndarray] = {}
        for batch in store.batches(batch_size=5, buffer_rows=4, seed=3):
            for values, row in zip(batch.values, batch.rows.to_pylist(), strict=True):
                key = (row["shard"], row["row"])
                assert key not in seen
                seen[key] = values
                text = TEXTS.index(row["text_id"])
                assert (row["position"], row["stream"], row["seed"]) == (POSITION, "img", 42)
                assert tuple(values[:3]) == (text, row["step"], row["token"])
        assert sorted(seen) == sorted(written)
        for key, values in seen.items():
            np.testing.assert_array_equal(values, _f16(written[key]))

    # What `safeport query` sees: the same counts, and each row with its text's split and side.
    assert readonly_query(tmp_path, by_step).to_pylist() == [{"position": POSITION, "step": s, "n": 4} for s in STEPS]
    joined = readonly_query(
        tmp_path, "SELECT text_id, split, side, count(*) AS n FROM token_rows GROUP BY ALL ORDER BY 1"
    )
    assert joined.to_pylist() == [
        {"text_id": t, "split": sp, "side": si, "n": 3} for t, sp, si in zip(TEXTS, SPLITS, SIDES, strict=True)
    ]
    assert verify_path(tmp_path).ok


@pytest.mark.parametrize(
    ("peak", "dtype"),
    [(1e5, "float32"), (-7e4, "float32"), (65504.0, "float16")],  # 65504 is float16's largest finite value
)
def test_float16_overflow_stores_that_shard_float32(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, peak: float, dtype: str
) -> None:
    with Store(tmp_path) as store:
        _register(store)
        with caplog.at_level(logging.WARNING, logger="safeport.store"):
            unit, written = _write_token_unit(store, peak=peak)
        warned = [r.getMessage() for r in caplog.records if "float16" in r.getMessage()]
        if dtype == "float32":
            assert len(warned) == 1 and "shard 1 of acts/mk/tok" in warned[0], warned
        else:
            assert warned == []
        records = store.fetchall("SELECT shard, array_path, dtype FROM shards WHERE unit_key = 'tok' ORDER BY shard")
        assert [(shard, kind) for shard, _, kind in records] == [(0, "float16"), (1, dtype)]
        assert [_stored_dtype(store, path) for _, path, _ in records] == ["float16", dtype]

        selection = pa.table({"unit_key": ["tok"] * 12, "shard": [s for s in (0, 1) for _ in range(6)]})
        selection = selection.append_column("row", pa.array(list(range(6)) * 2, pa.int32()))
        got = store.read_rows(selection)
        exact = np.stack([written[(0, r)] for r in range(6)] + [written[(1, r)] for r in range(6)])
        np.testing.assert_array_equal(got[:6], _f16(exact[:6]))
        np.testing.assert_array_equal(got[6:], exact[6:] if dtype == "float32" else _f16(exact[6:]))
        assert got[6 + 4, 5] == peak  # never inf
        if dtype == "float32":
            assert not np.array_equal(_f16(exact[6:10]), exact[6:10])  # so exactness above proves float32 storage

        streamed = {
            (row["shard"], row["row"]): values
            for batch in store.batches("shard = 1", batch_size=4)
            for values, row in zip(batch.values, batch.rows.to_pylist(), strict=True)
        }
        assert sorted(streamed) == [(1, r) for r in range(6)]
        for (shard, row), values in streamed.items():
            np.testing.assert_array_equal(values, got[6 * shard + row])
        del unit
    report = verify_path(tmp_path)
    assert report.ok and report.shards == 2, report.damage


def _write_pooled_unit(store: Store, dtype: str = "float32") -> tuple[UnitInfo, np.ndarray]:
    values = (np.arange(len(TEXTS) * DIM, dtype=np.float32).reshape(len(TEXTS), DIM) + 0.1).astype(np.float32)
    unit = store.create_unit("pool", "mk", "d", "h", TEXTS, DIM, 2, dtype=dtype)
    for shard in range(2):
        sl = slice(2 * shard, 2 * shard + 2)
        store.write_shard(
            unit, shard, TEXTS[sl], values[sl], np.array([5, 6]) + 2 * shard, np.array([False, shard == 1])
        )
    assert store.finish_unit("pool")
    return unit, values


def test_pooled_units_keep_one_row_per_text_and_the_old_views(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        _register(store)
        unit, values = _write_pooled_unit(store)
        _write_token_unit(store)  # beside it: its rows must not leak into the pooled views
        assert (unit.kind, unit.layout, unit.position, unit.n_rows) == ("pooled", "array", None, 4)
        assert store.done_unit("mk", "d", "h") == "pool"  # the token unit is never a pooled unit

        rows = store.sql("SELECT * FROM activation_rows ORDER BY row")
        assert rows.column_names == ["model_key", "text_id", "unit_key", "row", "n_tokens", "truncated"]
        assert [tuple(r.values()) for r in rows.to_pylist()] == [
            ("mk", "t0", "pool", 0, 5, False),
            ("mk", "t1", "pool", 1, 6, False),
            ("mk", "t2", "pool", 2, 7, False),
            ("mk", "t3", "pool", 3, 8, True),
        ]
        assert store.fetchall(
            "SELECT shard, row, position, step, token, stream, seed FROM unit_rows WHERE unit_key = 'pool' ORDER BY row"
        ) == [(r // 2, r, None, None, None, None, None) for r in range(4)]
        assert store.fetchall("SELECT count(*) FROM token_rows") == [(12,)]

        meta, got = store.activations("m", "d")
        assert meta.column_names[:5] == ["model", "role", "dataset", "idx", "text_id"]
        assert meta.column("text_id").to_pylist() == TEXTS
        np.testing.assert_array_equal(got, values)  # float32 unit: exact
        meta, got = store.activations("mk", "d", where="split = 'train' AND side = ?", params=["unsafe"])
        assert meta.column("text_id").to_pylist() == ["t1"]
        np.testing.assert_array_equal(got, values[1:2])

        # Pooled rows are addressed by row alone; token rows need their shard.
        np.testing.assert_array_equal(
            store.read_rows(pa.table({"unit_key": ["pool"] * 2, "row": [3, 0]})), values[[3, 0]]
        )
        with pytest.raises(StoreError, match="add shard"):
            store.read_rows(pa.table({"unit_key": ["tok"], "row": [0]}))

        streamed = [b for b in store.batches("kind = 'pooled'", batch_size=3)]
        assert [len(b.values) for b in streamed] == [3, 1]
        rows_seen = [r for b in streamed for r in b.rows.column("row").to_pylist()]
        assert sorted(rows_seen) == [0, 1, 2, 3]
        np.testing.assert_array_equal(np.concatenate([b.values for b in streamed]), values[rows_seen])
    assert readonly_query(tmp_path, "SELECT count(*) AS n FROM activations WHERE model = 'm'").to_pylist() == [{"n": 4}]


def test_a_pooled_float16_unit_is_stored_as_its_records_say(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        _register(store)
        unit, _ = _write_pooled_unit(store, dtype="float16")
        recorded = {str(d) for (d,) in store.fetchall("SELECT dtype FROM shards WHERE unit_key = 'pool'")}
        assert {_stored_dtype(store, unit.array_path)} == recorded


def test_malformed_units_and_shards_are_refused(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        _register(store)
        with pytest.raises(StoreError, match="kind 'frames' is unknown"):
            store.create_unit("x", "mk", "d", "h", TEXTS, DIM, 2, kind="frames")
        unit = store.create_unit("tok", "mk", "d", "h", TEXTS, DIM, 2, kind="tokens", position=POSITION)
        values = np.zeros((2, DIM), dtype=np.float32)
        with pytest.raises(StoreError, match="one value per row"):
            store.write_shard(unit, 0, ["t0", "t0"], values, np.ones(2), np.zeros(2, bool), coords=_coords(step=[0, 1]))
        bad = _coords(position=["p"] * 2, step=[0, 1], token=[0, 1], stream=["img"] * 2, seed=[1])
        with pytest.raises(StoreError, match="one value per row"):
            store.write_shard(unit, 0, ["t0", "t0"], values, np.ones(2), np.zeros(2, bool), coords=bad)
        with pytest.raises(StoreError, match="dtype 'int8' is not stored"):
            other = store.create_unit("i8", "mk", "d", "h", TEXTS, DIM, 2, kind="tokens", position="p", dtype="int8")
            good = _coords(position=["p"] * 2, step=[0, 1], token=[0, 1], stream=["img"] * 2, seed=[1, 1])
            store.write_shard(other, 0, ["t0", "t0"], values, np.ones(2), np.zeros(2, bool), coords=good)
        assert store.fetchall("SELECT count(*) FROM shards") == [(0,)]  # nothing of a refused shard was recorded
        assert not store.finish_unit("tok")
