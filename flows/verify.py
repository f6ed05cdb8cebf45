"""Repair flow: verify the store, invalidate what is damaged, re-extract only those shards.

Why a flow: re-extraction loads models and writes shards, so it runs like the extract flow
(a Prefect task per unit, ``runs`` rows); the checking and invalidation live in
``store/verify.py``. Units are resumed by extraction's own shard stage
(:func:`safeport.flows.extract.resume_units` on the one runner), which recomputes exactly the
shards whose commit records were removed, with the same texts in the same rows and the same
batches, hence the same values, also for a unit of an older version of its dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from safeport.catalog import CatalogError, Resolved
from safeport.flows.common import catalog, model_source, release_models, store_for, writing
from safeport.flows.extract import resume_units
from safeport.store.store import Store, StoreError, UnitInfo
from safeport.store.units import TOKENS
from safeport.store.verify import REPAIR_STATUS, Invalidation, Report, invalidate, units_to_resume, verify_store

log = logging.getLogger("safeport.verify")


@dataclass(frozen=True)
class Resumed:
    """One unit re-extracted by the repair (``model`` empty when it could not be)."""

    unit_key: str
    model: str
    dataset: str
    rows: int
    note: str = ""


@dataclass(frozen=True)
class RepairResult:
    before: Report
    invalidation: Invalidation
    resumed: tuple[Resumed, ...]
    after: Report

    @property
    def pending(self) -> list[str]:
        """What the repair left for the user to do, one line each."""
        lines = [r.note for r in self.resumed if r.note]
        lines += [
            f"fit {src}->{tgt} ({key}) was reset: run `safeport fit` with the profile that produced it to recompute "
            "its maps and vectors"
            for key, src, tgt in self.invalidation.fits_reset
        ]
        lines += [f"{d.path} ({d.owner}): {why}" for d, why in self.invalidation.kept]
        return lines


def _model_names(resolved: Resolved) -> dict[str, str]:
    """Representation key -> catalog model name, for the models this catalog can load as they are now."""
    names: dict[str, str] = {}
    for name in resolved.models:
        try:
            names[model_source(resolved, name).spec().key()] = name
        except (CatalogError, OSError, ValueError) as err:  # an unreadable folder: it cannot re-extract anything
            log.warning("model %s cannot be resolved (%s); its units are not re-extracted", name, err)
    return names


def resume(store: Store, resolved: Resolved, unit: UnitInfo) -> Resumed:
    """Re-extract the uncommitted shards of ``unit`` if this catalog still describes its model."""
    model = _model_names(resolved).get(unit.model_key)
    if model is None:
        return Resumed(
            unit.unit_key,
            "",
            unit.dataset,
            0,
            f"unit {unit.unit_key} (model key {unit.model_key}, dataset {unit.dataset}) was not re-extracted: no "
            f"model of profile {resolved.name!r} has that key now (changed weights, revision or options). Run "
            "`safeport extract` with the catalog and profile that produced it to recompute its missing shards",
        )
    (result,) = resume_units(store, resolved, [(unit, model)])
    return Resumed(unit.unit_key, model, unit.dataset, result.rows)


@task(name="repair-unit", cache_policy=NO_CACHE, task_run_name="repair-{unit_key}")
def resume_task(store_root: str, catalog_path: str | None, profile: str, unit_key: str) -> Resumed:
    store = store_for(store_root)
    unit = store.unit(unit_key)
    if unit is None:
        return Resumed(unit_key, "", "", 0, f"unit {unit_key} vanished from the store during the repair")
    return resume(store, catalog(catalog_path, profile), unit)


def repair_all(store_root: str, catalog_path: str | None, profile: str) -> RepairResult:
    """Body of the repair flow, for a caller that already holds the store's writer lock."""
    store = store_for(store_root)
    before = verify_store(store)
    plan = invalidate(store, before)
    for d in before.damage:
        log.warning("damaged: %s", d.describe())
    units = units_to_resume(store)
    resumed = [resume_task(store_root, catalog_path, profile, u.unit_key) for u in units if u.kind != TOKENS]
    tokens = [u for u in units if u.kind == TOKENS]
    if tokens:
        resumed += recapture(store, catalog(catalog_path, profile), tokens)
    return RepairResult(before, plan, tuple(resumed), verify_store(store))


def recapture(store: Store, resolved: Resolved, units: list[UnitInfo]) -> list[Resumed]:
    """Recompute the invalidated shards of token units with the capture stage (all their positions at once)."""
    from safeport.flows.capture import capture_tokens

    def rows(key: str) -> int:
        return int(store.scalar("SELECT count(*) FROM unit_rows WHERE unit_key = ?", [key]) or 0)

    before = {u.unit_key: rows(u.unit_key) for u in units}
    capture_tokens(store, resolved, only=set(before))
    out = []
    for u in units:
        now = store.unit(u.unit_key)
        if now is not None and now.status == REPAIR_STATUS:
            out.append(
                Resumed(
                    u.unit_key,
                    "",
                    u.dataset,
                    0,
                    f"token unit {u.unit_key} ({u.position}, dataset {u.dataset}) was not re-captured: profile "
                    f"{resolved.name!r} does not capture it with these settings. Run `safeport capture` with the "
                    "catalog and profile that produced it to recompute its missing shards",
                )
            )
        else:
            name = store.scalar("SELECT name FROM models WHERE model_key = ?", [u.model_key]) or u.model_key
            out.append(Resumed(u.unit_key, str(name), u.dataset, rows(u.unit_key) - before[u.unit_key]))
    return out


@flow(name="safeport-repair", log_prints=False)
def repair_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> RepairResult:
    """Verify a store and recompute what is damaged: shards now, fits reset for `safeport fit`."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    if not (root / "meta.duckdb").is_file():
        raise StoreError(f"no store at {root}; check --store (or the profile's store:)")
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        try:
            return repair_all(str(root), catalog_path, profile)
        finally:
            release_models()
