"""Per-process handles shared by tasks: the writable store handle and the loaded model.

Tasks receive store roots and model names (keys), never arrays; they look the
open handles up here so a flow opens its store and each model exactly once.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from safeport.catalog import Resolved, load_catalog
from safeport.extractors import Extractor, ModelSource, load_extractor
from safeport.store.fingerprint import folder_fingerprint
from safeport.store.store import Store

_STORES: dict[str, Store] = {}
_EXTRACTOR: dict[str, Extractor] = {}
_PINNED: dict[tuple[str | None, str], dict[str, str]] = {}


@contextlib.contextmanager
def writing(root: Path, wait_s: float = 0.0, arrays: str | None = None, outputs: str | None = None) -> Iterator[Store]:
    """Open the store for writing and register it for this process's tasks.

    Nothing is locked for the run: each write is a short transaction, and work is split with
    other writers of the store through claims (``store.session``). ``wait_s`` (0: the default)
    bounds each wait for the store file while another process holds it. ``arrays`` and
    ``outputs`` are the profile's locations (None: wherever the store keeps them). After a run that ends
    without error, a snapshot of the metadata is kept for recovery (``safeport recover``).
    """
    key = str(root.resolve())
    if key in _STORES:  # nested flow in the same process: reuse the open writer
        yield _STORES[key]
        return
    store = Store(root, arrays=arrays, wait_s=wait_s or None, outputs=outputs)
    ok = False
    try:
        store.run_id = run_id()
        store.session  # noqa: B018 - registers this writer (visible in `safeport status`, respected by gc)
        _STORES[key] = store
        yield store
        ok = True
    finally:
        _STORES.pop(key, None)
        store.close()
    if ok:
        store.snapshot()


def store_for(root: str) -> Store:
    key = str(Path(root).resolve())
    if key not in _STORES:
        raise RuntimeError(f"no open writer for store {root}; run tasks inside their flow")
    return _STORES[key]


def catalog(catalog_path: str | None, profile: str) -> Resolved:
    """The resolved profile, with any hub revisions pinned by the running rebuild applied."""
    resolved = load_catalog(catalog_path, profile)
    pins = _PINNED.get((catalog_path, profile))
    return with_revisions(resolved, pins) if pins else resolved


def with_revisions(resolved: Resolved, revisions: Mapping[str, str]) -> Resolved:
    """``resolved`` with the named models' ``revision`` replaced (e.g. by a resolved hub commit sha)."""
    unknown = sorted(set(revisions) - set(resolved.models))
    if unknown:
        raise ValueError(f"revisions name model(s) {unknown} that are not in profile {resolved.name!r}")
    models = {
        name: entry.model_copy(update={"revision": revisions[name]}) if name in revisions else entry
        for name, entry in resolved.models.items()
    }
    return resolved.model_copy(update={"models": models})


@contextlib.contextmanager
def pinned_revisions(catalog_path: str | None, profile: str, revisions: Mapping[str, str]) -> Iterator[None]:
    """Make every task of this process that loads (catalog_path, profile) see ``revisions``.

    Tasks reload the catalog from its path (they receive keys, not objects), so a
    rebuild that resolved ``main`` to a commit sha pins it here for its duration.
    """
    key = (catalog_path, profile)
    previous = _PINNED.get(key)
    _PINNED[key] = dict(revisions)
    try:
        yield
    finally:
        if previous is None:
            del _PINNED[key]
        else:
            _PINNED[key] = previous


def model_source(resolved: Resolved, name: str) -> ModelSource:
    """The catalog entry with its weight fingerprint filled in (local folders only)."""
    entry = resolved.models[name]
    base = resolved.model_source(name)
    if base.path is not None:
        return resolved.model_source(name, weights=folder_fingerprint(Path(base.path), entry.gguf_file))
    return resolved.model_source(name, weights=f"rev:{entry.revision}")


def extractor_for(source: ModelSource) -> Extractor:
    """Load a model once per process; the previous one is dropped to free memory."""
    key = source.spec().key()
    if key not in _EXTRACTOR:
        _EXTRACTOR.clear()
        _EXTRACTOR[key] = load_extractor(source)
    return _EXTRACTOR[key]


def loaded_extractor(source: ModelSource) -> Extractor | None:
    """The model of ``source`` if this process has it loaded (never loads it)."""
    return _EXTRACTOR.get(source.spec().key())


def release_models() -> None:
    _EXTRACTOR.clear()


def run_id() -> str:
    try:
        from prefect.runtime import flow_run

        rid = flow_run.get_id()
        if rid:
            return str(rid)
    except Exception:  # outside a flow run the runtime has no id
        pass
    return uuid.uuid4().hex
