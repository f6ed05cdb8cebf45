"""The main job as one Prefect flow: extract and fit; with a ``safedig:`` block, the token cache, the SafeDIG fit
and its leave-one-category-out headline too. One store, shared with any other writer (claims)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from prefect import flow

from safeport.flows.common import catalog, writing
from safeport.flows.extract import UnitResult, extract_all
from safeport.flows.fit import FitResult, fit_all


class RunResult(NamedTuple):
    extracted: list[UnitResult]
    fitted: list[FitResult]
    bundles: list[Any]  # flows.safedig.BundleResult (imported only when a profile has a safedig: block)
    headline: list[Any]  # flows.safedig_eval.LocoResult


@flow(name="safeport-run", log_prints=False)
def run_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> RunResult:
    """Extract every (model, dataset) unit, then fit every source→target pair; all incremental.

    A profile with a ``safedig:`` block then fills the token cache, routes, trains, selects and
    bundles (METHOD-SAFEDIG §2-7) and measures the §9 headline on its text-encoder models.
    """
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url) as st:
        extracted = extract_all(str(root), catalog_path, profile)
        fitted = fit_all(str(root), catalog_path, profile)
        bundles: list[Any] = []
        headline: list[Any] = []
        if resolved.profile.safedig is not None:
            from safeport.flows.capture import capture_task
            from safeport.flows.safedig import safedig_task
            from safeport.flows.safedig_eval import loco_headline

            capture_task(str(root), catalog_path, profile)
            bundles = safedig_task(str(root), catalog_path, profile)
            headline = loco_headline(st, catalog(catalog_path, profile))
    return RunResult(extracted, fitted, bundles, headline)
