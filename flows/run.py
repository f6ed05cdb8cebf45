"""The main job as one Prefect flow: extract, then fit, on one store shared with any other writer (claims)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from safeport.flows.common import catalog, writing
from safeport.flows.extract import UnitResult, extract_all
from safeport.flows.fit import FitResult, fit_all


@flow(name="safeport-run", log_prints=False)
def run_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> tuple[list[UnitResult], list[FitResult]]:
    """Extract every (model, dataset) unit, then fit every source→target pair; both incremental."""
    resolved = catalog(catalog_path, profile)
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        extracted = extract_all(str(root), catalog_path, profile)
        fitted = fit_all(str(root), catalog_path, profile)
    return extracted, fitted
