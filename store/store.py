"""The activation store: Zarr v3 arrays for rows, DuckDB for everything else.

:class:`Store` is one handle on one store. It is assembled from parts a reader can take one at a
time:

- :mod:`safeport.store.core`: opening (schema version, arrays and outputs locations, identity),
  short transactions and reads, queries, ``runs`` rows;
- :mod:`safeport.store.schema`: the tables and every migration step;
- :mod:`safeport.store.units`: units, shards, the row index and the commit protocol;
- :mod:`safeport.store.registry`: models, datasets and texts;
- :mod:`safeport.store.stream`: seeded, shuffled, resumable batches of rows (what trainers read).

Everything that reads or writes a store goes through here or through the modules beside it
(artefacts, outputs, maintenance, verify); no other part of safeport touches disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from safeport.store.core import StoreCore
from safeport.store.db import StoreBusyError as StoreBusyError
from safeport.store.db import StoreDamagedError as StoreDamagedError
from safeport.store.db import StoreError as StoreError
from safeport.store.registry import RegistryStore
from safeport.store.schema import SCHEMA_VERSION as SCHEMA_VERSION
from safeport.store.stream import RowBatch, StreamPlan, plan_stream, stream_batches
from safeport.store.units import ShardDescriptor as ShardDescriptor
from safeport.store.units import UnitInfo as UnitInfo
from safeport.store.units import UnitStore
from safeport.store.units import checksum as checksum
from safeport.store.units import tensor_checksum as tensor_checksum
from safeport.store.units import write_shard_array as write_shard_array


class Store(UnitStore, RegistryStore, StoreCore):
    """Handle on one store: ``meta.duckdb`` in its folder + its Zarr arrays (``arrays.zarr`` there, or a URL).

    ``arrays`` is where the arrays should be (an absolute path or fsspec URL, see
    :mod:`safeport.store.location`); None means wherever the store recorded them, the store folder
    for a new store. A store keeps one arrays location for life: the location is recorded in
    ``meta`` and the arrays group carries the store's id, so a catalog pointing elsewhere, or two
    stores sharing one location, is refused by name instead of mixing data.

    No DuckDB connection is kept: every method opens a short one (see :mod:`safeport.store.core`).
    ``wait_s`` bounds each wait for the file while another process holds it (default
    ``SAFEPORT_STORE_WAIT``, else 10 s to read and 60 s to write).
    """

    def batches(self, select: str | None = None, **options: Any) -> Iterator[RowBatch]:
        """Seeded, shuffled batches of verified rows, bounded memory: :func:`safeport.store.stream.stream_batches`.

        ``select`` is a SQL filter over the row index (the ``rows`` relation: every column of
        ``unit_rows`` plus ``model``, ``model_key``, ``dataset``, ``kind``, ``split``, ``category``,
        ``side``, ``pair_id``), e.g. ``"model = 'minilm-l6' AND position = 'te.3.txt'"``.
        """
        return stream_batches(self, select, **options)

    def stream_plan(self, select: str | None = None, params: Sequence[Any] = ()) -> StreamPlan:
        """The same selection as a :class:`StreamPlan`: streamed later, anywhere the arrays are (a Dask worker)."""
        return plan_stream(self, select, params)
