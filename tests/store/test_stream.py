"""The streaming reader (``Store.batches``): each row once per epoch, seeded order, exact resumes, refusals, memory.

Rows are identified by (unit_key, shard, row); every value's column 0 is a number unique to its row
across the store, so a value paired with another row's index entry is caught, not only a lost row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from safeport.store.store import Store, StoreError
from safeport.store.stream import Cursor, RowBatch

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"t{i}" for i in range(8)]
SPLITS = ["train"] * 6 + ["val"] * 2
SIDES = ["safe", "unsafe"] * 4
SPEC = {"family": "dit", "model_id": "m", "revision": "main", "weights": "w"}
IMG, TXT, WIDE = "double.0.img", "single.3.txt", "wide.0"
Key = tuple[str, int, int]  # (unit_key, shard, row)


@dataclass(frozen=True)
class Planted:
    """One row written to the store, with what a select can filter on."""

    key: Key
    uid: int  # column 0 of its values
    text: int
    step: int | None
    token: int
    position: str
    model: str
    model_key: str
    split: str
    side: str


def _write(
    store: Store,
    unit_key: str,
    model_key: str,
    position: str,
    texts: Sequence[int],
    shard_texts: int,
    steps: Sequence[int | None],
    tokens: int,
    planted: list[Planted],
    dim: int = 4,
) -> None:
    """A token unit: for each text, a row per (step, token); values [uid, text, step or -1, token, 0...]."""
    model = {"mk": "m", "mk2": "m2"}[model_key]
    ids = [TEXTS[t] for t in texts]
    unit = store.create_unit(unit_key, model_key, "d", "h", ids, dim, shard_texts, kind="tokens", position=position)
    for shard in range(unit.n_shards):
        cells = [
            (t, s, k)
            for t in texts[shard * shard_texts : (shard + 1) * shard_texts]
            for s in steps
            for k in range(tokens)
        ]
        values = np.zeros((len(cells), dim), dtype=np.float32)
        for row, (t, s, k) in enumerate(cells):
            uid = len(planted)
            values[row, :4] = (uid, t, -1 if s is None else s, k)
            planted.append(
                Planted((unit_key, shard, row), uid, t, s, k, position, model, model_key, SPLITS[t], SIDES[t])
            )
        coords = {
            "position": np.asarray([position] * len(cells)),
            "step": np.asarray([s for _, s, _ in cells]),
            "token": np.asarray([k for _, _, k in cells]),
            "stream": np.asarray(["img"] * len(cells)),
            "seed": np.full(len(cells), 42),
        }
        n = len(cells)
        store.write_shard(unit, shard, [TEXTS[t] for t, _, _ in cells], values, np.ones(n), np.zeros(n, bool), coords)
    assert store.finish_unit(unit_key)


def _build(root: Path) -> list[Planted]:
    """Four token units: ``img`` (8 shards of 12 rows), ``txt`` (no steps), ``img2`` (other model), ``wide`` (dim 6)."""
    planted: list[Planted] = []
    rows = pa.table(
        {
            "idx": list(range(len(TEXTS))),
            "text_id": TEXTS,
            "text": [f"text {i}" for i in range(len(TEXTS))],
            "split": SPLITS,
            "category": pa.array([None] * len(TEXTS), pa.string()),
            "pair_id": pa.array([i // 2 for i in range(len(TEXTS))], pa.int32()),
            "side": SIDES,
        }
    )
    with Store(root) as store:
        store.register_dataset("d", "pairs", "h", rows, {})
        store.register_model("mk", "m", "target", SPEC, 4)
        store.register_model("mk2", "m2", "target", SPEC, 4)
        _write(store, "img", "mk", IMG, range(8), 1, (0, 1, 2), 4, planted)  # 8 shards x 12 rows
        _write(store, "txt", "mk", TXT, range(4), 2, (None,), 4, planted)  # 2 shards x 8 rows
        _write(store, "img2", "mk2", IMG, (0, 1), 2, (0, 1, 2), 1, planted)  # 1 shard x 6 rows
        _write(store, "wide", "mk", WIDE, (0,), 1, (0,), 2, planted, dim=6)  # 1 shard x 2 rows, other width
    return planted


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Planted]]:
    root = tmp_path_factory.mktemp("stream")
    return root, _build(root)


@pytest.fixture
def store(built: tuple[Path, list[Planted]]) -> Iterator[Store]:
    with Store(built[0], read_only=True) as handle:
        yield handle


@pytest.fixture
def planted(built: tuple[Path, list[Planted]]) -> dict[Key, Planted]:
    return {p.key: p for p in built[1]}


def _keys(batches: Sequence[RowBatch], planted: dict[Key, Planted]) -> list[Key]:
    """Row identities in stream order, after checking each value belongs to its own index entry."""
    out: list[Key] = []
    for batch in batches:
        assert batch.values.dtype == np.float32 and len(batch.values) == batch.rows.num_rows
        for values, row in zip(batch.values, batch.rows.to_pylist(), strict=True):
            key = (row["unit_key"], row["shard"], row["row"])
            p = planted[key]
            assert tuple(values[:4]) == (p.uid, p.text, -1 if p.step is None else p.step, p.token), key
            assert (row["text_id"], row["position"], row["step"], row["token"]) == (
                TEXTS[p.text],
                p.position,
                p.step,
                p.token,
            )
            out.append(key)
    return out


ONLY_IMG = "unit_key = 'img'"


def test_each_epoch_yields_every_selected_row_once_in_a_seeded_order(store: Store, planted: dict[Key, Planted]) -> None:
    wanted = sorted(k for k in planted if k[0] == "img")
    run = list(store.batches(ONLY_IMG, batch_size=10, buffer_rows=24, epochs=2, seed=42))
    assert [len(b.values) for b in run] == [10] * 9 + [6] + [10] * 9 + [6]
    assert [b.cursor for b in run] == [Cursor(42, 0, i) for i in range(1, 10)] + [Cursor(42, 1, 0)] + [
        Cursor(42, 1, i) for i in range(1, 10)
    ] + [Cursor(42, 2, 0)]
    first, second = _keys(run[:10], planted), _keys(run[10:], planted)
    assert sorted(first) == wanted and sorted(second) == wanted  # each row exactly once per epoch
    assert first != second  # the next epoch is another order

    again = _keys(list(store.batches(ONLY_IMG, batch_size=10, buffer_rows=24, epochs=2, seed=42)), planted)
    assert again == first + second  # same seed, same order
    other = _keys(list(store.batches(ONLY_IMG, batch_size=10, buffer_rows=24, seed=7)), planted)
    assert sorted(other) == wanted and other != first
    assert first != wanted  # shuffled, not index order
    # A buffer of two shards mixes them: some batch holds rows of two shards.
    assert any(len({k[1] for k in _keys([b], planted)}) > 1 for b in run)


# img: 8 shards of 12 rows; buffer_rows=24 makes every buffer exactly two shards (rows 24b .. 24b + 23).
# With batch_size 8, cut 3 ends at row 24 (a buffer boundary), cuts 1 and 5 inside a buffer, cut 12 is
# the end of epoch 0 and 13, 20 are inside epoch 1; with batch_size 10 batches span buffers (batch 3 is
# rows 20-29) and cut 10 is the end of epoch 0 (short batch of 6).
@pytest.mark.parametrize(("batch_size", "cuts"), [(8, (0, 1, 3, 5, 12, 13, 20, 23)), (10, (2, 3, 9, 10, 11, 19))])
def test_a_cursor_resumes_exactly_the_rest_of_the_same_order(
    store: Store, planted: dict[Key, Planted], batch_size: int, cuts: tuple[int, ...]
) -> None:
    options: dict[str, Any] = {"batch_size": batch_size, "buffer_rows": 24, "epochs": 2, "seed": 5}
    full = list(store.batches(ONLY_IMG, **options))
    whole = _keys(full, planted)
    for cut in cuts:
        cursor = full[cut - 1].cursor if cut else Cursor(5)
        rest = list(store.batches(ONLY_IMG, cursor=cursor, **options))
        assert [len(b.values) for b in rest] == [len(b.values) for b in full[cut:]], cut
        assert _keys(rest, planted) == whole[sum(len(b.values) for b in full[:cut]) :], cut
        assert [b.cursor for b in rest] == [b.cursor for b in full[cut:]], cut
    # The cursor after the last batch of the last epoch resumes to nothing.
    assert list(store.batches(ONLY_IMG, cursor=full[-1].cursor, **options)) == []


def test_a_cursor_resumes_a_filtered_stream(store: Store, planted: dict[Key, Planted]) -> None:
    """With a select, shards hold fewer selected rows (4 of 12 here): buffers and cursors count selected rows."""
    options: dict[str, Any] = {"batch_size": 3, "buffer_rows": 8, "epochs": 2, "seed": 11}
    select = "unit_key = 'img' AND step = 1"
    full = list(store.batches(select, **options))
    whole = _keys(full, planted)
    assert sorted(whole[:32]) == sorted(k for k, p in planted.items() if k[0] == "img" and p.step == 1)
    for cut in (1, 2, 4, 7, 10, 11, 12, 17):
        rest = list(store.batches(select, cursor=full[cut - 1].cursor, **options))
        assert _keys(rest, planted) == whole[sum(len(b.values) for b in full[:cut]) :], cut


Predicate = Callable[[Planted], bool]


@pytest.mark.parametrize(
    ("select", "params", "expect"),
    [
        (f"position = '{TXT}'", (), lambda p: p.position == TXT),
        ("position = ? AND step = ?", (IMG, 2), lambda p: p.position == IMG and p.step == 2),
        ("model = 'm2'", (), lambda p: p.model == "m2"),
        (
            f"model_key = 'mk' AND dataset = 'd' AND position = '{IMG}' AND token = 3",
            (),
            lambda p: p.model_key == "mk" and p.position == IMG and p.token == 3,
        ),
        (f"split = 'val' AND position <> '{WIDE}'", (), lambda p: p.split == "val" and p.position != WIDE),
        (
            f"side = 'unsafe' AND position = '{IMG}' AND model = 'm'",
            (),
            lambda p: p.side == "unsafe" and p.position == IMG and p.model == "m",
        ),
        ("step IS NULL", (), lambda p: p.step is None),
        ("step = 99", (), lambda p: False),
    ],
)
def test_select_filters_by_sql_over_the_row_index(
    store: Store, planted: dict[Key, Planted], select: str, params: tuple[Any, ...], expect: Predicate
) -> None:
    got = _keys(list(store.batches(select, params=params, batch_size=7, buffer_rows=16)), planted)
    assert sorted(got) == sorted(k for k, p in planted.items() if expect(p))
    assert len(got) == len(set(got))


def test_drop_last_drops_only_the_short_final_batch(store: Store, planted: dict[Key, Planted]) -> None:
    options: dict[str, Any] = {"batch_size": 10, "buffer_rows": 24, "epochs": 2, "seed": 3}
    kept = list(store.batches(ONLY_IMG, **options))
    dropped = list(store.batches(ONLY_IMG, drop_last=True, **options))
    assert [len(b.values) for b in dropped] == [10] * 18
    assert _keys(dropped, planted) == _keys(kept[:9] + kept[10:19], planted)  # same order, short batches gone
    rest = list(store.batches(ONLY_IMG, drop_last=True, cursor=dropped[8].cursor, **options))
    assert _keys(rest, planted) == _keys(dropped[9:], planted)  # resumed after the last full batch of epoch 0


def test_statements_other_seeds_and_mixed_widths_are_refused(store: Store, built: tuple[Path, list[Planted]]) -> None:
    with pytest.raises(ValueError, match="not a statement"):
        next(store.batches("1=1); DROP TABLE units; SELECT (1"))
    with pytest.raises(ValueError, match="not a statement"):  # a stacked statement never runs
        next(store.batches("1=1; DROP TABLE units"))
    with Store(built[0], read_only=True) as again:
        assert again.fetchall("SELECT count(*) FROM units") == [(4,)]
    with pytest.raises(ValueError, match="seed 7"):
        next(store.batches(ONLY_IMG, seed=42, cursor=Cursor(7, 0, 1)))
    with pytest.raises(StoreError, match=r"different widths \[4, 6\]"):
        next(store.batches(f"position IN ('{IMG}', '{WIDE}')"))
    for bad in ({"batch_size": 0}, {"buffer_rows": -1}, {"epochs": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            next(store.batches(ONLY_IMG, **bad))


def test_a_stacked_statement_is_refused_by_name(store: Store) -> None:
    with pytest.raises(ValueError, match="not a statement"):
        next(store.batches("1=1; DROP TABLE units"))


def test_a_damaged_shard_is_named_when_the_stream_reaches_it(tmp_path: Path) -> None:
    planted: list[Planted] = []
    rows = pa.table(
        {
            "idx": [0],
            "text_id": ["t0"],
            "text": ["text 0"],
            "split": ["train"],
            "category": pa.array([None], pa.string()),
            "pair_id": pa.array([0], pa.int32()),
            "side": ["safe"],
        }
    )
    with Store(tmp_path) as writer:
        writer.register_dataset("d", "pairs", "h", rows, {})
        writer.register_model("mk", "m", "target", SPEC, 4)
        _write(writer, "img", "mk", IMG, range(6), 1, (0, 1), 3, planted)  # 6 shards x 6 rows
    by_key = {p.key: p for p in planted}
    options: dict[str, Any] = {"batch_size": 6, "buffer_rows": 6, "seed": 1}  # one shard per buffer and batch
    with Store(tmp_path, read_only=True) as store:
        order = [b.rows.column("shard")[0].as_py() for b in store.batches(**options)]
        victim = order[3]
        chunk = tmp_path / "arrays.zarr" / "acts" / "mk" / "img" / str(victim) / "c" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
        chunk.write_bytes(bytes(data))

        got: list[RowBatch] = []
        with pytest.raises(StoreError, match=rf"array acts/mk/img/{victim} shard {victim} .*damaged"):
            for batch in store.batches(**options):
                got.append(batch)
        assert [b.rows.column("shard")[0].as_py() for b in got] == order[:3]  # what came before it was served
        _keys(got, by_key)
        # A stream that does not select the damaged shard never reads it.
        assert len(list(store.batches(f"shard <> {victim}", **options))) == 5


# Peak memory of a stream over an array ten times its buffer, measured in a fresh process (other tests'
# allocations and the pytest process's high-water mark stay out). tracemalloc sees numpy's allocations
# (numpy reports them to it); the resident set (Linux: VmHWM, reset through /proc/self/clear_refs before
# each phase) sees everything, DuckDB and Arrow included.
MEM_ROWS, MEM_DIM, MEM_SHARD, MEM_BUFFER, MEM_BATCH = 60_000, 256, 600, 6_000, 600  # 61 MB; buffers of 10 batches
MEM_PROBE = """
import json, re, sys, tracemalloc
from safeport.store.store import Store

def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

def reset():
    \"\"\"Start a phase: the resident high-water mark back to the current size (None where Linux cannot).\"\"\"
    tracemalloc.reset_peak()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    except OSError:
        return None

def peaks(start):
    return tracemalloc.get_traced_memory()[1], None if start is None else status("VmHWM") - start

root, buffer, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
with Store(root, read_only=True) as store:
    next(store.batches("shard = 0", batch_size=16))  # imports, codecs, DuckDB: not what is measured
    tracemalloc.start()
    start = reset()
    whole = store.read_rows(store.sql("SELECT unit_key, shard, row FROM unit_rows"))
    out["whole_rows"], (out["whole_traced"], out["whole_rss"]) = len(whole), peaks(start)
    del whole
    start, n = reset(), 0
    for b in store.batches(batch_size=batch, buffer_rows=buffer):
        n += len(b.values)
    out["stream_rows"], (out["stream_traced"], out["stream_rss"]) = n, peaks(start)
    start = reset()
    kept = [b for i, b in enumerate(store.batches(batch_size=batch, buffer_rows=buffer)) if i % 10 == 0]
    out["kept_batches"], out["kept_rows"] = len(kept), sum(len(b.values) for b in kept)
    out["kept_traced"], out["kept_rss"] = peaks(start)
    del kept
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def memory(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Peaks (bytes) of ``read_rows`` of everything, of streaming, and of streaming while keeping every 10th batch."""
    root = tmp_path_factory.mktemp("memory")
    rng = np.random.default_rng(0)
    with Store(root) as store:
        store.register_model("mk", "m", "target", SPEC, MEM_DIM)
        ids = [f"t{i}" for i in range(MEM_ROWS // MEM_SHARD)]
        unit = store.create_unit("big", "mk", "d", "h", ids, MEM_DIM, 1, kind="tokens", position=IMG)
        n = MEM_SHARD
        coords = {
            "position": np.asarray([IMG] * n),
            "step": np.zeros(n, int),
            "token": np.arange(n),
            "stream": np.asarray(["img"] * n),
            "seed": np.zeros(n, int),
        }
        with store.transaction():  # one commit for all shards: the set-up is not what is tested
            for shard, text in enumerate(ids):
                values = rng.standard_normal((n, MEM_DIM), dtype=np.float32)
                store.write_shard(unit, shard, [text] * n, values, np.ones(n), np.zeros(n, bool), coords)
        assert store.finish_unit("big")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", MEM_PROBE, str(root), str(MEM_BUFFER), str(MEM_BATCH)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


ARRAY_BYTES = MEM_ROWS * MEM_DIM * 4  # float32 rows as every reader returns them
BUFFER_BYTES = MEM_BUFFER * MEM_DIM * 4


def test_stream_memory_stays_far_below_an_array_ten_times_its_buffer(memory: dict[str, Any]) -> None:
    assert memory["stream_rows"] == memory["whole_rows"] == MEM_ROWS
    assert memory["whole_traced"] >= ARRAY_BYTES  # read_rows holds all of it
    assert memory["stream_traced"] < 0.45 * ARRAY_BYTES, memory
    if memory["stream_rss"] is not None:
        assert memory["whole_rss"] >= 0.9 * ARRAY_BYTES, memory
        assert memory["stream_rss"] < 0.6 * ARRAY_BYTES, memory


def test_stream_memory_is_about_one_buffer(memory: dict[str, Any]) -> None:
    # One buffer plus one batch, plus a few shards in flight (reading and checksumming one shard): < 2 buffers.
    assert memory["stream_traced"] < 2 * BUFFER_BYTES, memory["stream_traced"] / BUFFER_BYTES
    if memory["stream_rss"] is not None:
        assert memory["stream_rss"] < 0.4 * ARRAY_BYTES, memory["stream_rss"] / ARRAY_BYTES


def test_kept_batches_hold_only_their_own_rows(memory: dict[str, Any]) -> None:
    kept_bytes = memory["kept_rows"] * MEM_DIM * 4
    assert memory["kept_batches"] == 10
    assert memory["kept_traced"] < kept_bytes + 2 * BUFFER_BYTES, memory["kept_traced"] / ARRAY_BYTES


def test_a_stream_plan_streams_the_same_batches_without_duckdb(store: Store) -> None:
    """What a Dask worker reads from a plan (arrays only) is what the store's own stream gives."""
    plan = store.stream_plan(ONLY_IMG)
    direct = list(store.batches(ONLY_IMG, batch_size=10, seed=3, epochs=2, buffer_rows=20))
    planned = list(plan.batches(batch_size=10, seed=3, epochs=2, buffer_rows=20))
    assert len(direct) == len(planned) and plan.n_rows == sum(len(b.values) for b in direct) // 2
    for a, b in zip(direct, planned, strict=True):
        np.testing.assert_array_equal(a.values, b.values)
        assert a.cursor == b.cursor
        assert a.rows.select(["unit_key", "shard", "row"]).to_pylist() == b.rows.to_pylist()
    resumed = list(plan.batches(batch_size=10, seed=3, epochs=2, buffer_rows=20, cursor=planned[4].cursor))
    assert [r.cursor for r in resumed] == [r.cursor for r in planned[5:]]
