"""The read side of a store for a generation job: vectors by name, exported vectors, metadata queries.

Re-exported by :mod:`safeport` (``from safeport import Store, load_vector, read_exported_vector``).
Each call opens the store read-only for its own duration and closes it again, so a job that keeps
a :class:`Store` around never holds the metadata file while a safeport writer needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from safeport.store import artifacts
from safeport.store.query import readonly_query
from safeport.store.store import Store as _StoreHandle
from safeport.store.store import StoreError

Vector = tuple[np.ndarray, dict[str, Any]]
"""A steering vector (float32, 1-D, the target's text-embedding dim) and its lineage (name, kind, source,
target, mapper, category, norm, vector_key, fit inputs, code version)."""


class Store:
    """Read-only access to a safeport store folder (``meta.duckdb`` + its Zarr arrays).

    >>> store = Store("safeport-store")                       # doctest: +SKIP
    >>> store.vectors()[:2]                                   # doctest: +SKIP
    ['calibrated:smollm2-135m->minilm-l6:mlp', ...]
    >>> v, lineage = store.load_vector("calibrated:smollm2-135m->minilm-l6:ridge")  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not (self.root / "meta.duckdb").is_file():
            raise StoreError(f"no store at {self.root}: it has no meta.duckdb; run `safeport run` to build one")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _open(self) -> _StoreHandle:
        return _StoreHandle(self.root, read_only=True)

    def vectors(self, target: str | None = None) -> list[str]:
        """Names of the stored vectors (``KIND:SOURCE->TARGET:MAPPER[:CATEGORY]``), optionally for one target."""
        with self._open() as store:
            rows = store.fetchall(
                "SELECT DISTINCT name FROM vectors WHERE ? IS NULL OR target = ? ORDER BY name", [target, target]
            )
        return [str(r[0]) for r in rows]

    def load_vector(self, name: str) -> Vector:
        """The vector named ``name`` (the newest if refitted) and its lineage, checksum-verified."""
        with self._open() as store:
            return artifacts.load_vector(store, name)

    def query(self, sql: str) -> pa.Table:
        """One read-only SQL statement over the metadata (tables and views, see the README); files are refused."""
        return readonly_query(self.root, sql)

    def activations(self, model: str, dataset: str, where: str = "") -> tuple[pa.Table, np.ndarray]:
        """(metadata rows, float32 pooled activations) of ``model`` on ``dataset``, checksum-verified.

        ``where`` filters the ``activations`` view, e.g. ``"split = 'train' AND side = 'safe'"``.
        """
        with self._open() as store:
            return store.activations(model, dataset, where)


def load_vector(store: Store | str | os.PathLike[str], name: str) -> Vector:
    """A stored vector by name from a store (a :class:`Store` or its folder) and its lineage, checksum-verified."""
    return (store if isinstance(store, Store) else Store(store)).load_vector(name)


def read_exported_vector(path: str | os.PathLike[str]) -> Vector:
    """A vector written by ``safeport export`` (``<key>.safetensors``; lineage from the sibling ``.json``)."""
    return artifacts.read_exported_vector(Path(path))
