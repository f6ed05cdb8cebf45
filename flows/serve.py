"""``safeport serve``: a scheduled deployment of the rebuild flow, served from this process.

Schedules need a real Prefect server (``prefect server start``): the ephemeral
in-process API that Prefect falls back to has no scheduler, so serving against it
would wait forever. Scheduled runs go one at a time; each is an ordinary incremental
rebuild (nothing new, nothing recomputed) that shares the store with any other writer,
leaving work another writer has claimed to it (``wait_s`` bounds each wait for the store file).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safeport.flows.rebuild import rebuild_runner

log = logging.getLogger("safeport.serve")


class ServeError(ValueError):
    """``safeport serve`` cannot start; the message says what to change."""


def check_server(api_url: str | None = None, timeout_s: float = 5.0) -> str:
    """The configured Prefect API URL, after checking a server answers there."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = (api_url or PREFECT_API_URL.value() or "").rstrip("/")
    if not url:
        raise ServeError(
            "no Prefect server is configured, and schedules never fire without one; start one with "
            "`prefect server start --host 127.0.0.1 --port 4200` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        httpx.get(f"{url}/health", timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as err:
        raise ServeError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(err).__name__}); start it with "
            "`prefect server start --host 127.0.0.1` or fix PREFECT_API_URL"
        ) from None
    return url


def deployment_parameters(
    catalog_path: str | None, profile: str, store: str | None, wait_s: float, online: bool | None, dask: bool
) -> dict[str, Any]:
    """Flow parameters with paths made absolute: scheduled runs start in another process."""
    return {
        "catalog_path": str(Path(catalog_path).resolve()) if catalog_path else None,
        "profile": profile,
        "store": str(Path(store).resolve()) if store else None,
        "wait_s": wait_s,
        "online": online,
        "dask": dask,
    }


def serve_rebuild(
    catalog_path: str | None = None,
    profile: str = "default",
    store: str | None = None,
    *,
    cron: str | None = None,
    interval: float | None = None,
    name: str = "safeport-rebuild",
    wait_s: float = 0.0,
    online: bool | None = None,
    dask_address: str | None = None,
    dask_workers: int = 0,
) -> None:
    """Register the rebuild deployment with a cron or interval schedule and serve it until interrupted."""
    if (cron is None) == (interval is None):
        raise ServeError("give exactly one schedule: --cron '0 3 * * *' or --interval SECONDS")
    if interval is not None and not interval > 0:
        raise ServeError(f"--interval {interval}: use a positive number of seconds, e.g. 3600")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:  # pydantic's ValidationError: its text repeats the value and a URL
            raise ServeError(
                f"--cron {cron!r} is not a valid cron expression; use five fields, e.g. '0 3 * * *' (03:00 daily)"
            ) from None
    url = check_server()
    flow = rebuild_runner(dask_address, dask_workers)
    params = deployment_parameters(catalog_path, profile, store, wait_s, online, bool(dask_address) or dask_workers > 0)
    log.info("serving deployment %s against %s", name, url)
    flow.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters=params,
        limit=1,
        print_starting_message=True,
    )
