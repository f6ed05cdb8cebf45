"""safeport: mappers — fit a source→target map on benign anchors and transfer vectors through it.

A new mapper is one module plus one line in ``MAPPERS`` and ``FITTED``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import numpy as np

from safeport.mappers.base import FittedMap, Mapper
from safeport.mappers.mlp import MLPMap, MLPMapper
from safeport.mappers.procrustes import ProcrustesMap, ProcrustesMapper
from safeport.mappers.ridge import RidgeMap, RidgeMapper

MAPPERS: dict[str, Callable[..., Mapper]] = {
    "procrustes": ProcrustesMapper,
    "ridge": RidgeMapper,
    "mlp": MLPMapper,
}

FITTED: dict[str, type[ProcrustesMap] | type[RidgeMap] | type[MLPMap]] = {
    "procrustes": ProcrustesMap,
    "ridge": RidgeMap,
    "mlp": MLPMap,
}


def _known(name: str, table: Mapping[str, object]) -> None:
    if name not in table:
        raise ValueError(f"unknown mapper {name!r}; choose one of {', '.join(sorted(table))}")


def make_mapper(name: str, **options: Any) -> Mapper:
    """Build the mapper ``name`` with catalog ``options``; unknown names or options are a ValueError."""
    _known(name, MAPPERS)
    factory = MAPPERS[name]
    allowed = {f.name for f in fields(factory)} if isinstance(factory, type) else None
    unknown = sorted(set(options) - allowed) if allowed is not None else []
    if unknown:
        raise ValueError(
            f"mapper {name!r} has no option(s) {unknown}; its options are {sorted(allowed or []) or 'none'}"
        )
    return factory(**options)


def from_state(name: str, state: Mapping[str, np.ndarray], params: Mapping[str, float | int | str]) -> FittedMap:
    """Rebuild a fitted map of kind ``name`` from what ``FittedMap.state()`` / ``.params`` returned."""
    _known(name, FITTED)
    return FITTED[name].from_state(state, params)


__all__ = ["FITTED", "MAPPERS", "FittedMap", "Mapper", "from_state", "make_mapper"]
