"""``safeport rebuild``: extract → fit → representation eval as one flow, touching only what changed.

Everything is content-addressed already (unit keys, fit keys, map keys), so a
rebuild is the main job plus two things: hub ids are resolved to the commit sha
they point at *now* (so ``revision: main`` moving on the hub re-extracts that
model, and only that one), and artefacts of models no longer in the profile, or
of superseded model versions, are marked stale (never deleted; ``safeport gc``
only removes arrays nothing refers to).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from safeport.catalog import Resolved
from safeport.flows.common import catalog, model_source, pinned_revisions, run_id, store_for, with_revisions, writing
from safeport.flows.extract import UnitResult, extract_all
from safeport.flows.fit import FitResult, fit_all
from safeport.flows.runner import on_dask
from safeport.store import maintenance

log = logging.getLogger("safeport.rebuild")
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RevisionCheck:
    """What a rebuild used for one hub model, and why."""

    model: str
    hub_id: str
    catalog_revision: str
    revision: str  # what this rebuild extracts with
    status: str  # pinned | resolved | offline | failed
    message: str = ""


@dataclass(frozen=True)
class RebuildResult:
    run_id: str
    revisions: list[RevisionCheck]
    extracted: list[UnitResult]
    fitted: list[FitResult]
    stale: dict[str, int]


def _offline_env() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return True


_NETWORK_ERRORS = {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "ConnectError", "Timeout"}


def _is_network_error(err: BaseException) -> bool:
    """True for "cannot reach the hub" (then the catalog revision is kept), not for "no such repo".

    Matched by class name along the MRO: the hub client's HTTP library varies
    between versions (requests, httpx, a vendored httpx), the names do not.
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, (OfflineModeIsEnabled, OSError, TimeoutError)):
        return True
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(err).__mro__)


def resolve_revisions(resolved: Resolved, online: bool | None = None, api: Any = None) -> list[RevisionCheck]:
    """The commit sha each hub model's catalog revision points at now; offline, the catalog revision.

    ``online=None`` asks the hub unless ``HF_HUB_OFFLINE`` is set. A revision that
    is already a 40-hex sha is pinned and never looked up. Local folders need no
    lookup: their weights are fingerprinted into the key.
    """
    checks: list[RevisionCheck] = []
    hub_models = [(n, e) for n, e in resolved.models.items() if e.hub_id is not None]
    if not hub_models:
        return checks
    offline = (not online) if online is not None else _offline_env()
    if offline:
        log.warning(
            "offline: not checking the hub for new revisions; keeping the catalog revisions of %s",
            ", ".join(n for n, _ in hub_models),
        )
    for name, entry in hub_models:
        hub_id, rev = str(entry.hub_id), entry.revision
        if _SHA.fullmatch(rev):
            checks.append(RevisionCheck(name, hub_id, rev, rev, "pinned"))
            continue
        if offline:
            checks.append(RevisionCheck(name, hub_id, rev, rev, "offline", "offline: kept the catalog revision"))
            continue
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        try:
            sha = str(api.model_info(hub_id, revision=rev, timeout=30).sha or "")
        except Exception as err:  # a lookup must never stop a rebuild; the reason is recorded
            status = "offline" if _is_network_error(err) else "failed"
            why = f"{status}: {type(err).__name__}: {str(err)[:200]}; kept the catalog revision"
            log.warning("model %s (%s@%s): %s", name, hub_id, rev, why)
            checks.append(RevisionCheck(name, hub_id, rev, rev, status, why))
            continue
        if not _SHA.fullmatch(sha):
            why = f"failed: the hub answered sha {sha!r} for {hub_id}@{rev}; kept the catalog revision"
            checks.append(RevisionCheck(name, hub_id, rev, rev, "failed", why))
            continue
        log.info("model %s: %s@%s is commit %s", name, hub_id, rev, sha)
        checks.append(RevisionCheck(name, hub_id, rev, sha, "resolved", f"{rev} -> {sha}"))
    return checks


def rebuild_all(
    store_root: str, catalog_path: str | None, profile: str, online: bool | None = None, dask: bool = False
) -> RebuildResult:
    """Body of the rebuild flow; the caller holds the store's writer lock."""
    if dask and not on_dask():
        raise ValueError("a Dask rebuild needs the flow to run on a DaskTaskRunner; call flows.rebuild.rebuild(...)")
    rid = run_id()
    store = store_for(store_root)
    started = time.time()
    checks = resolve_revisions(catalog(catalog_path, profile), online)
    for c in checks:
        store.record_run(rid, "rebuild", "resolve_revision", c.model, "", None, c.status, 0, 0, 0.0, started, c.message)
    pins = {c.model: c.revision for c in checks if c.revision != c.catalog_revision}
    with pinned_revisions(catalog_path, profile, pins):
        extracted = extract_all(store_root, catalog_path, profile)  # on Dask workers when the flow runs on Dask
        fitted = fit_all(store_root, catalog_path, profile)
    resolved = with_revisions(catalog(catalog_path, profile), pins)
    current = {m: model_source(resolved, m).spec().key() for m in resolved.profile.models}
    reports = [k for f in fitted for k in f.report_keys]
    stale = maintenance.mark_stale(store, resolved.name, current, [f.fit_key for f in fitted], reports)
    if any(stale.values()):
        log.info("stale artefacts (kept, see `safeport status`): %s", stale)
    return RebuildResult(rid, checks, extracted, fitted, stale)


@flow(name="safeport-rebuild", log_prints=False)
def rebuild_flow(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    wait_s: float = 0.0,
    online: bool | None = None,
    dask: bool = False,
) -> RebuildResult:
    """Extract, fit and evaluate what changed since the last rebuild; mark what left the catalog stale.

    ``dask=True`` needs the flow to run on a ``DaskTaskRunner``; use :func:`rebuild`.
    """
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        return rebuild_all(str(root), catalog_path, profile, online, dask)


def rebuild_runner(dask_address: str | None = None, dask_workers: int = 0) -> Any:
    """The flow to call: plain, or with a Dask task runner when a cluster or workers are asked for."""
    if not dask_address and dask_workers <= 0:
        return rebuild_flow
    from safeport.flows.scale import dask_task_runner

    return rebuild_flow.with_options(task_runner=dask_task_runner(dask_address, dask_workers))


def rebuild(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    wait_s: float = 0.0,
    online: bool | None = None,
    dask_address: str | None = None,
    dask_workers: int = 0,
) -> RebuildResult:
    """Run the rebuild flow, on Dask when ``dask_address`` or ``dask_workers > 0`` is given."""
    use_dask = bool(dask_address) or dask_workers > 0
    result: RebuildResult = rebuild_runner(dask_address, dask_workers)(
        catalog_path, profile, store, wait_s, online, use_dask
    )
    return result
