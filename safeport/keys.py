"""Content keys: the one way safeport turns "exactly these inputs" into a short stable name.

Every stored thing is named by a hash of what decides it (a text by its characters, a unit by
its model, dataset and rows, a map by its inputs, an output by its prompt, vector, α, seed and
settings), so the same inputs find the same record and different inputs never collide.
:func:`content_key` is that hash for every site; what differs between sites is only *which*
value they pass and how many hex digits they keep (the lengths are part of existing keys and
never change).

How a value is turned into bytes (the canonical form):

- ``str``: its UTF-8 bytes (a text id is the hash of the text itself);
- ``bytes``: as is; a NumPy array: its C-ordered bytes in its own dtype (the caller casts, e.g.
  to float32, so the key says which precision it covers);
- anything else: JSON (``json.dumps`` with its default separators) with sorted keys (tuples are
  lists; sets are sorted lists; other objects their ``str``), so dict order and tuple-vs-list never change a key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def canonical_bytes(value: object) -> bytes:
    """The bytes :func:`content_key` hashes for ``value`` (see the module docstring)."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes()
    return json.dumps(value, sort_keys=True, default=_json_default).encode("utf-8")


def content_key(value: object, length: int = 20) -> str:
    """The first ``length`` hex digits of the sha256 of ``value``'s canonical bytes."""
    if not 1 <= length <= 64:
        raise ValueError(f"a content key has 1 to 64 hex digits, not {length}")
    return hashlib.sha256(canonical_bytes(value)).hexdigest()[:length]
