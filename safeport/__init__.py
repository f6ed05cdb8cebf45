"""safeport: an activation-cache pipeline for cross-model safety steering of image and video generators.

The public API is what a generation job needs; everything else (``safeport.flows``,
``safeport.store``, ...) is the pipeline's inside and may change between versions::

    from safeport import load_vector, steer

    v, lineage = load_vector("safeport-store", "calibrated:smollm2-135m->flux1-schnell:ridge")
    image = steer(pipe, "a prompt", v, alpha=1.5).images[0]

- :func:`load_vector` (store folder or :class:`Store`, name) -> (vector, lineage), checksum-verified
- :func:`read_exported_vector` (path of a ``safeport export`` file) -> (vector, lineage)
- :func:`steer` (pipe, prompt, vector=None, alpha=0, negative_prompt=None, *, safedig=None, strength=1,
  mode="safedig", steps=None, **pipe_kwargs): a generation steered by a vector, a SafeDIG bundle, or both
- :func:`load_safedig` (store, name, refit=True) / :func:`read_exported_safedig` (folder): a SafeDIG bundle
- :func:`combine` (vectors by category, weights by category) -> one vector
- :class:`Store` (folder): read-only access — ``vectors()``, ``load_vector(name)``, ``query(sql)``,
  ``activations(model, dataset)``
- :func:`load_catalog` (path=None, profile="default") -> the validated, resolved profile
- ``__version__``

The names load on first use, so ``import safeport`` stays cheap (no torch, DuckDB or diffusers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Store",
    "__version__",
    "combine",
    "load_catalog",
    "load_safedig",
    "load_vector",
    "read_exported_safedig",
    "read_exported_vector",
    "steer",
]

if TYPE_CHECKING:
    from safeport.api import Store, load_safedig, load_vector, read_exported_safedig, read_exported_vector
    from safeport.catalog import load_catalog
    from safeport.eval.steering import combine, steer

_LAZY = {
    "Store": "safeport.api",
    "load_vector": "safeport.api",
    "read_exported_vector": "safeport.api",
    "load_safedig": "safeport.api",
    "read_exported_safedig": "safeport.api",
    "load_catalog": "safeport.catalog",
    "steer": "safeport.eval.steering",
    "combine": "safeport.eval.steering",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeport' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
