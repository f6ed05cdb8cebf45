"""A seeded, shuffled, resumable stream of verified rows with bounded memory: what trainers read.

Why not "read everything, then shuffle": a position's token cache is tens of GB on the paper
profile. The stream never holds more than one **buffer** of rows (plus one batch): each epoch
permutes the selected shards (seeded), groups consecutive shards of that order into buffers of at
least ``buffer_rows`` rows, permutes the rows inside each buffer (seeded) and cuts the result into
batches; a batch may span two buffers. That is the shard-then-buffer shuffle of webdataset and
SAELens's mixing buffer; rows of one shard (one prompt batch) meet rows of other shards whenever
``buffer_rows`` spans several shards, so keep it a few times the shard size.

Everything is a function of ``(seed, epoch)`` and the row index, so the order is the same on
every run, and a :class:`Cursor` (seed, epoch, batches consumed) resumes mid-epoch exactly: the
buffers before the cursor are skipped from the index alone (no array is read), the buffer that
holds the cursor is read and entered at the right row. Every shard is checked against its
recorded checksum as it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from safeport.store.db import StoreError
from safeport.store.units import ShardRecord, UnitInfo

if TYPE_CHECKING:  # pragma: no cover
    from safeport.store.store import Store

# The relation a selection filters: every row of the index with its unit, model and dataset row.
ROWS = """(
    SELECT r.unit_key, r.shard, r.row, r.text_id, r.position, r.step, r.token, r.stream, r.seed, r.n_tokens,
           r.truncated, u.model_key, m.name AS model, u.dataset, u.kind, t.split, t.category, t.pair_id, t.side
    FROM unit_rows r JOIN units u USING (unit_key) LEFT JOIN models m USING (model_key)
    LEFT JOIN (SELECT dataset, text_id, any_value(split) AS split, any_value(category) AS category,
                      any_value(pair_id) AS pair_id, any_value(side) AS side
               FROM dataset_texts GROUP BY ALL) t ON t.dataset = u.dataset AND t.text_id = r.text_id
) AS rows"""
INDEX_COLUMNS = ("unit_key", "shard", "row", "text_id", "position", "step", "token", "stream", "seed")


@dataclass(frozen=True)
class Cursor:
    """Where a stream is: ``batch`` batches of epoch ``epoch`` consumed (with this seed)."""

    seed: int
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class RowBatch:
    """One batch: float32 values [n, d], each row's index entry, and the cursor after it.

    ``paired``: with ``paired_with=MODEL_KEY``, that model's pooled row of the same text for each row
    (aligned: row i of ``paired`` is the same text as row i of ``values``), else None.
    """

    values: np.ndarray
    rows: pa.Table
    cursor: Cursor
    paired: np.ndarray | None = None


@dataclass(frozen=True)
class _Shard:
    unit_key: str
    shard: int
    n: int  # selected rows


def _one_select(query: str) -> bool:
    """Whether ``query`` parses as exactly one SELECT (a filter that would smuggle in a statement does not)."""
    try:
        statements = duckdb.connect(":memory:").extract_statements(query)
    except duckdb.Error:
        return False
    return len(statements) == 1 and statements[0].type.name == "SELECT"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _buffers(shards: Sequence[_Shard], seed: int, epoch: int, buffer_rows: int) -> list[list[_Shard]]:
    order = _rng(seed, epoch).permutation(len(shards))
    out: list[list[_Shard]] = [[]]
    size = 0
    for i in order:
        if size >= buffer_rows:
            out.append([])
            size = 0
        out[-1].append(shards[int(i)])
        size += shards[int(i)].n
    return [b for b in out if b]


class _Reader:
    """Reads one buffer: its shards (verified) and the selected rows' index, in a fixed order."""

    def __init__(
        self, store: Store, where: str, params: Sequence[Any], verify: bool, paired_with: str | None = None
    ) -> None:
        self.store, self.where, self.params, self.verify = store, where, list(params), verify
        self.paired_with = paired_with
        self.units: dict[str, UnitInfo] = {}
        self.records: dict[str, dict[int, ShardRecord]] = {}
        self.dim = 0
        self.pair_dim = 0

    def meta(self, keys: Sequence[str]) -> None:
        with self.store.reading():
            for key in keys:
                unit = self.store.unit(key)
                if unit is None:
                    raise StoreError(f"unit {key} is selected but not recorded; run `safeport verify`")
                self.units[key] = unit
                self.records[key] = self.store.shard_records(key)

    def read(self, buffer: Sequence[_Shard]) -> tuple[np.ndarray, pa.Table]:
        wanted = pa.table(
            {"unit_key": [s.unit_key for s in buffer], "shard": pa.array([s.shard for s in buffer], pa.int32())}
        )
        with self.store.reading() as con:
            con.register("_buffer", wanted)
            try:
                index: pa.Table = con.sql(
                    f"SELECT {', '.join(INDEX_COLUMNS)} FROM {ROWS} JOIN _buffer USING (unit_key, shard) "
                    f"WHERE {self.where} ORDER BY unit_key, shard, row",
                    params=self.params,
                ).to_arrow_table()
            finally:
                con.unregister("_buffer")
        out = np.empty((index.num_rows, self.dim + self.pair_dim), dtype=np.float32)  # filled in place
        self._fill(out[:, : self.dim], index)
        if self.paired_with is not None:
            self._fill(out[:, self.dim :], self._pair_index(index))
        return out, index

    def _fill(self, out: np.ndarray, index: pa.Table) -> None:
        """Rows of ``index`` (unit_key, shard, row) into ``out``, one verified shard at a time."""
        keys = np.array(index.column("unit_key").to_pylist())
        shard_of = index.column("shard").to_numpy()
        row_of = index.column("row").to_numpy().astype(np.int64)
        for key, shard in sorted({(str(k), int(s)) for k, s in zip(keys, shard_of, strict=True)}):
            if key not in self.units:
                self.meta([key])
            unit, record = self.units[key], self.records[key].get(shard)
            if record is None:
                raise StoreError(f"shard {shard} of unit {key} is selected but not committed")
            block = self.store.verified_shard(unit, record) if self.verify else self._plain(unit, shard, record)
            mine = np.flatnonzero((keys == key) & (shard_of == shard))
            out[mine] = block[row_of[mine] - record.row_start]
            del block

    def _pair_index(self, index: pa.Table) -> pa.Table:
        """Where the paired model's pooled row of each selected row's text is, in the same order."""
        ids = pa.table({"text_id": index.column("text_id"), "pos": np.arange(index.num_rows)})
        with self.store.reading() as con:
            con.register("_ids", ids)
            try:
                found: pa.Table = con.sql(
                    "SELECT a.unit_key, a.row // u.shard_texts AS shard, a.row FROM _ids i "
                    "JOIN activation_rows a ON a.text_id = i.text_id AND a.model_key = ? "
                    "JOIN units u ON u.unit_key = a.unit_key ORDER BY i.pos",
                    params=[self.paired_with],
                ).to_arrow_table()
            finally:
                con.unregister("_ids")
        if found.num_rows != index.num_rows:
            raise StoreError(
                f"{index.num_rows - found.num_rows} selected row(s) have no pooled row of model {self.paired_with}; "
                "extract that model on the same texts first"
            )
        return found

    def _plain(self, unit: UnitInfo, shard: int, record: ShardRecord) -> np.ndarray:
        return self.store.read_shard(unit, shard, record)


@dataclass(frozen=True)
class PlannedShard:
    """One committed shard a plan reads: where its rows are, what they hash to, which rows are selected."""

    unit_key: str
    shard: int
    array_path: str
    row_start: int
    row_stop: int
    dtype: str
    checksum: str
    rows: np.ndarray  # selected rows, in the array's numbering, ascending


@dataclass(frozen=True)
class StreamPlan:
    """What a stream reads, decided where DuckDB is (the flow process); read wherever the arrays are.

    Why: Dask workers never open DuckDB, yet a trainer on a worker must stream its rows. The plan
    holds each selected shard's record and selected rows (a few bytes a row), so a worker with the
    arrays location streams exactly what :meth:`safeport.store.store.Store.batches` would give (same
    order for the same seed, verified, bounded memory), with an index of (unit_key, shard, row) only.
    """

    arrays: str  # the arrays location (path or fsspec URL)
    shards: tuple[PlannedShard, ...]
    dim: int

    @property
    def n_rows(self) -> int:
        return sum(len(s.rows) for s in self.shards)

    def batches(
        self,
        *,
        batch_size: int = 4096,
        seed: int = 42,
        epochs: int = 1,
        buffer_rows: int = 65536,
        cursor: Cursor | None = None,
        drop_last: bool = False,
        verify: bool = True,
    ) -> Iterator[RowBatch]:
        _check_sizes(batch_size, epochs, buffer_rows)
        if cursor is not None and cursor.seed != seed:
            raise ValueError(f"cursor was taken with seed {cursor.seed}, this stream has seed {seed}; pass seed=")
        shards = [_Shard(s.unit_key, s.shard, len(s.rows)) for s in self.shards]
        reader = _PlanReader(self, verify)
        start = cursor or Cursor(seed)
        return _epochs(reader, shards, seed, epochs, batch_size, buffer_rows, start, self.n_rows, drop_last)


class _PlanReader:
    """Reads a buffer of a :class:`StreamPlan` from the arrays alone (no DuckDB)."""

    def __init__(self, plan: StreamPlan, verify: bool) -> None:
        from safeport.store.location import ArrayLocation

        self.plan, self.verify, self.dim, self.pair_dim = plan, verify, plan.dim, 0
        self.location = ArrayLocation(plan.arrays)
        self.by_key = {(s.unit_key, s.shard): s for s in plan.shards}

    def read(self, buffer: Sequence[_Shard]) -> tuple[np.ndarray, pa.Table]:
        from safeport.store.units import checksum

        planned = [self.by_key[(b.unit_key, b.shard)] for b in sorted(buffer, key=lambda b: (b.unit_key, b.shard))]
        out = np.empty((sum(len(p.rows) for p in planned), self.dim), dtype=np.float32)
        at = 0
        for p in planned:
            try:
                block = np.asarray(self.location.open_array(p.array_path)[p.row_start : p.row_stop, :])
            except Exception as err:  # any decoding failure means damaged data
                raise StoreError(
                    f"array {p.array_path} shard {p.shard} of unit {p.unit_key} cannot be read ({type(err).__name__}: "
                    f"{err}): the data is damaged. Run `safeport verify --repair`"
                ) from None
            if self.verify and checksum(block, p.dtype) != p.checksum:
                raise StoreError(
                    f"array {p.array_path} shard {p.shard} of unit {p.unit_key} fails its checksum: the data is "
                    "damaged. Run `safeport verify --repair`"
                )
            out[at : at + len(p.rows)] = block[p.rows - p.row_start]
            at += len(p.rows)
        index = pa.table(
            {
                "unit_key": pa.array([p.unit_key for p in planned for _ in p.rows], pa.string()),
                "shard": pa.array(np.concatenate([np.full(len(p.rows), p.shard) for p in planned]), pa.int32()),
                "row": pa.array(np.concatenate([p.rows for p in planned]), pa.int32()),
            }
        )
        return out, index


def plan_stream(store: Store, select: str | None = None, params: Sequence[Any] = ()) -> StreamPlan:
    """The :class:`StreamPlan` of the rows ``select`` picks (see :func:`stream_batches`)."""
    where = _where(select)
    rows = store.sql(
        f"SELECT unit_key, shard, row FROM {ROWS} WHERE {where} ORDER BY unit_key, shard, row", list(params)
    )
    keys = rows.column("unit_key").to_pylist()
    shard_of = rows.column("shard").to_numpy()
    row_of = rows.column("row").to_numpy().astype(np.int64)
    units, records = {}, {}
    for key in dict.fromkeys(keys):
        unit = store.unit(key)
        if unit is None:
            raise StoreError(f"unit {key} is selected but not recorded; run `safeport verify`")
        units[key], records[key] = unit, store.shard_records(key)
    dims = {u.dim for u in units.values()}
    if len(dims) > 1:
        raise StoreError(f"the selected rows have different widths {sorted(dims)}; select rows of one position")
    planned = []
    bounds = np.flatnonzero(np.r_[True, (np.array(keys[1:]) != np.array(keys[:-1])) | (shard_of[1:] != shard_of[:-1])])
    for i, start in enumerate(bounds):
        stop = bounds[i + 1] if i + 1 < len(bounds) else len(keys)
        key, shard = keys[start], int(shard_of[start])
        record = records[key].get(shard)
        if record is None:
            raise StoreError(f"shard {shard} of unit {key} is selected but not committed")
        planned.append(
            PlannedShard(key, shard, record.array_path, record.row_start, record.row_stop, record.dtype,
                         record.checksum, row_of[start:stop])
        )  # fmt: skip
    return StreamPlan(store.location.url, tuple(planned), dims.pop() if dims else 0)


def _check_sizes(batch_size: int, epochs: int, buffer_rows: int) -> None:
    for name, value in (("batch_size", batch_size), ("epochs", epochs), ("buffer_rows", buffer_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}; give a whole number of 1 or more")


def _where(select: str | None) -> str:
    where = f"({select})" if select else "true"
    if not _one_select(f"SELECT 1 FROM {ROWS} WHERE {where}"):
        raise ValueError(
            "select must be one SQL filter over the row index, e.g. \"position = 'te.3.txt' AND split = 'train'\", "
            "not a statement"
        )
    return where


def stream_batches(
    store: Store,
    select: str | None = None,
    *,
    params: Sequence[Any] = (),
    batch_size: int = 4096,
    seed: int = 42,
    epochs: int = 1,
    buffer_rows: int = 65536,
    cursor: Cursor | None = None,
    drop_last: bool = False,
    verify: bool = True,
    paired_with: str | None = None,
) -> Iterator[RowBatch]:
    """Batches of the rows ``select`` picks (a SQL filter over :data:`ROWS`; None: every row), shuffled.

    Each epoch yields every selected row exactly once, in an order fixed by ``(seed, epoch)``;
    ``cursor`` (a batch's :attr:`RowBatch.cursor`) resumes right after that batch (with the same
    ``select``, ``batch_size`` and ``buffer_rows``: the cursor records the seed only). Memory: one
    buffer of at least ``buffer_rows`` rows (a buffer holds whole shards) plus one batch. The
    arguments and the selection are checked when this is called; rows are read as batches are taken.
    ``paired_with`` (a model key) adds that model's pooled row of each row's text (a mapper's target side).
    """
    _check_sizes(batch_size, epochs, buffer_rows)
    where = _where(select)
    if cursor is not None and cursor.seed != seed:
        raise ValueError(f"cursor was taken with seed {cursor.seed}, this stream has seed {seed}; pass seed=")
    shards = [
        _Shard(str(k), int(s), int(n))
        for k, s, n in store.fetchall(
            f"SELECT unit_key, shard, count(*) FROM {ROWS} WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2", list(params)
        )
    ]
    reader = _Reader(store, where, params, verify, paired_with)
    reader.meta(sorted({s.unit_key for s in shards}))
    dims = {u.dim for u in reader.units.values()}
    if len(dims) > 1:
        raise StoreError(f"the selected rows have different widths {sorted(dims)}; select rows of one position")
    reader.dim = dims.pop() if dims else 0
    if paired_with is not None:
        pair_dim = store.model_dim(paired_with)
        if pair_dim is None:
            raise StoreError(f"paired_with={paired_with!r} is not a model of this store; pass a model key")
        reader.pair_dim = pair_dim
    total = sum(s.n for s in shards)
    return _epochs(reader, shards, seed, epochs, batch_size, buffer_rows, cursor or Cursor(seed), total, drop_last)


def _epochs(
    reader: _Reader | _PlanReader,
    shards: Sequence[_Shard],
    seed: int,
    epochs: int,
    batch_size: int,
    buffer_rows: int,
    start: Cursor,
    total: int,
    drop_last: bool,
) -> Iterator[RowBatch]:
    for epoch in range(start.epoch, epochs):
        first = start.batch * batch_size if epoch == start.epoch else 0
        if first >= total:
            continue
        yield from _epoch(reader, shards, seed, epoch, batch_size, buffer_rows, first, total, drop_last)


def _epoch(
    reader: _Reader | _PlanReader,
    shards: Sequence[_Shard],
    seed: int,
    epoch: int,
    batch_size: int,
    buffer_rows: int,
    first: int,
    total: int,
    drop_last: bool,
) -> Iterator[RowBatch]:
    """One epoch from stream row ``first``: batches gathered by index from the shuffled buffer.

    Memory: the buffer being read (one array, filled in place) plus the batch being cut and the few
    rows carried into the next buffer; every yielded batch owns its rows (no view keeps a buffer alive).
    """
    batch = first // batch_size
    carry: tuple[np.ndarray, pa.Table] | None = None
    at = 0  # stream row where the next buffer starts
    for b, buffer in enumerate(_buffers(shards, seed, epoch, buffer_rows)):
        n = sum(s.n for s in buffer)
        if at + n <= first:  # entirely before the cursor: skipped without reading
            at += n
            continue
        values, index = reader.read(buffer)
        order = _rng(seed, epoch, b + 1).permutation(len(values))[max(first - at, 0) :]
        at += n
        lo = 0
        if carry is not None:  # the batch that spans the previous buffer and this one
            take = order[: batch_size - len(carry[0])]
            lo = len(take)
            carry = np.concatenate([carry[0], values[take]]), pa.concat_tables([carry[1], index.take(pa.array(take))])
            if len(carry[0]) < batch_size:
                continue
            batch += 1
            yield _batch(*carry, seed, epoch, batch, total, batch_size, reader.dim)
            carry = None
        while len(order) - lo >= batch_size:
            take = order[lo : lo + batch_size]
            lo += batch_size
            batch += 1
            yield _batch(values[take], index.take(pa.array(take)), seed, epoch, batch, total, batch_size, reader.dim)
        rest = order[lo:]
        carry = values[rest], index.take(pa.array(rest))
        del values, index
    if carry is not None and len(carry[0]) and not drop_last:
        batch += 1
        yield _batch(*carry, seed, epoch, batch, total, batch_size, reader.dim)


def _batch(
    values: np.ndarray, index: pa.Table, seed: int, epoch: int, batch: int, total: int, size: int, dim: int
) -> RowBatch:
    cursor = Cursor(seed, epoch + 1, 0) if batch * size >= total else Cursor(seed, epoch, batch)
    paired = values[:, dim:] if values.shape[1] > dim else None
    return RowBatch(values[:, :dim] if paired is not None else values, index.combine_chunks(), cursor, paired)
