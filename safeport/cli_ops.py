"""Operations commands: ``rebuild``, ``serve``, ``gc``, ``export``, ``import`` (and staleness for ``status``).

Registered by :func:`add_ops_commands` from ``safeport.cli.build_parser``; like
the rest of the CLI a thin layer over ``flows/`` and ``store/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeport.cli_verify import WAIT_HELP

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _root(args: argparse.Namespace) -> Path:
    if getattr(args, "store", None):
        return Path(args.store)
    from safeport.catalog import load_catalog

    return load_catalog(args.catalog, args.profile).store_path


def _online(args: argparse.Namespace) -> bool | None:
    return False if args.offline else (True if args.online else None)


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Extract, fit and evaluate only what changed; print what ran, what was reused, what is stale."""
    from safeport.flows.rebuild import rebuild

    t0 = time.time()
    result = rebuild(
        args.catalog, args.profile, args.store, args.wait, _online(args), args.dask_address, args.dask_workers
    )
    for c in result.revisions:
        print(f"  revision {c.model:<16} {c.hub_id}@{c.catalog_revision} -> {c.revision} ({c.status})")
    for r in result.extracted:
        print(f"  extract {r.model:<16} {r.dataset:<14} {r.status:<8} {r.rows:>6} rows {r.seconds:7.1f}s")
    for f in result.fitted:
        print(f"  fit {f.source} -> {f.target}: {f.status} in {f.seconds:.1f}s; report {f.report}")
    stale = ", ".join(f"{n} {k}(s)" for k, n in result.stale.items() if n)
    print(f"  stale (kept; see `safeport status`): {stale or 'nothing'}")
    units = sum(r.status == "done" for r in result.extracted)
    fits = sum(f.status == "done" for f in result.fitted)
    reports = sum(f.reports_done for f in result.fitted)
    took = f"rebuild finished in {time.time() - t0:.1f}s"
    if units + fits + reports == 0:
        print(f"{took}: nothing was computed (every unit, fit and report reused)")
    else:
        print(f"{took}: computed {units} unit(s), {fits} fit(s), {reports} prompt-set report(s); the rest reused")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from safeport.flows.serve import ServeError, serve_rebuild

    try:
        serve_rebuild(
            args.catalog,
            args.profile,
            args.store,
            cron=args.cron,
            interval=args.interval,
            name=args.name,
            wait_s=args.wait,
            online=_online(args),
            dask_address=args.dask_address,
            dask_workers=args.dask_workers,
        )
    except ServeError as err:
        print(f"safeport: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from safeport.store.maintenance import collect_garbage

    report = collect_garbage(_root(args), apply=args.apply, wait_s=args.wait)
    verb = "removed" if report.applied else "would remove"
    for g in report.garbage:
        print(f"  {verb} {g.path} ({_fmt_bytes(g.bytes)})")
    partial = sum(g.kind == "partial" for g in report.garbage)
    print(
        f"gc: {verb} {len(report.garbage) - partial} unreferenced array(s) and {partial} half-written file(s), "
        f"{_fmt_bytes(report.bytes)}"
    )
    if report.in_flight:
        print(
            f"gc: kept {len(report.in_flight)} unreferenced item(s) written since a running writer started "
            "(they may be its next records); a later gc removes them if they stay unreferenced"
        )
    if report.garbage and not report.applied:
        print("dry run: nothing was deleted; pass --apply to delete")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from safeport.store.maintenance import export_vectors

    if args.safedig:
        from safeport.api import export_safedig

        for name in args.safedig:
            folder = export_safedig(_root(args), name, Path(args.output))
            print(f"exported SafeDIG bundle {name} to {folder} (SAELens SAEs + steer.safetensors + bundle.json)")
        if not args.names:
            return 0
    written = export_vectors(_root(args), Path(args.output), args.names)
    print(f"exported {len(written)} vector(s) to {args.output} (safetensors + lineage JSON + manifest.json)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from safeport.store.maintenance import import_vectors

    done = import_vectors(_root(args), Path(args.path), args.wait)
    for v in done:
        print(f"  {v.status:<8} {v.name} ({v.vector_key})")
    n = sum(v.status == "imported" for v in done)
    print(f"import: {n} vector(s) imported, {len(done) - n} already present; lineage in the vectors table")
    return 0


ELAPSED = "(epoch(heartbeat_at) - epoch(started_at))"  # seconds up to the last progress a writer wrote


def print_running(root: Path) -> None:
    """The part of ``safeport status`` that shows work in progress: what, by whom, how far, last heartbeat."""
    from safeport.store.query import format_table, readonly_query

    views = readonly_query(
        root, "SELECT table_name FROM information_schema.columns WHERE table_name = 'running' AND column_name = 'total'"
    )
    print("\nrunning now:")
    if views.num_rows == 0:
        print("  (a store of an older schema: its first write adds progress tracking)")
        return
    table = readonly_query(
        root,
        "SELECT flow, task, model, dataset, rows, tokens, 'pid ' || pid || ' on ' || host AS writer, "
        "CAST(round(epoch(now()) - epoch(started_at)) AS BIGINT) AS running_s, "
        f"round(rows / greatest({ELAPSED}, 1e-3), 2) AS rows_per_s, "
        "total, "  # what the work set out to compute, where known: the ETA at the rate so far
        f"CASE WHEN total IS NOT NULL AND rows > 0 THEN CAST(round(greatest(total - rows, 0) * {ELAPSED} / rows) "
        "AS BIGINT) END AS eta_s, "
        "CAST(round(epoch(now()) - epoch(heartbeat_at)) AS BIGINT) AS heartbeat_s_ago, "
        "CASE WHEN lease_alive THEN 'alive' ELSE 'stalled: writer gone or not renewing' END AS state "
        "FROM running ORDER BY started_at",
    )
    print(format_table(table) if table.num_rows else "  nothing is running")


def print_staleness(root: Path) -> None:
    """The part of ``safeport status`` this module adds: rows cached, fits, and what is stale and why."""
    from safeport.store.maintenance import status
    from safeport.store.query import format_table

    st = status(root)
    print("\nrows cached (model key, dataset):")
    print(format_table(st.rows))
    print("\nfits:")
    print(format_table(st.fits))
    print("\nstale (kept; `safeport gc` never deletes these):")
    if st.stale.num_rows == 0:
        print("  nothing is stale")
        return
    summary: dict[tuple[str, str], int] = {}
    for kind, reason in zip(st.stale.column("kind").to_pylist(), st.stale.column("reason").to_pylist(), strict=True):
        summary[(kind, reason)] = summary.get((kind, reason), 0) + 1
    for (kind, reason), n in sorted(summary.items()):
        print(f"  {n:>4} {kind}(s): {reason}")


def dask_options(p: argparse.ArgumentParser, verb: str = "extract", default: int | None = 0) -> None:
    """``--dask-address`` / ``--dask-workers`` for a command whose work ``verb`` runs on Dask."""
    p.add_argument(
        "--dask-address", default=None, help=f"{verb} on an existing Dask cluster (e.g. tcp://10.0.0.5:8786)"
    )
    none = " (0: no Dask)" if default == 0 else ""
    p.add_argument(
        "--dask-workers",
        type=int,
        default=default,
        help=f"{verb} on a local Dask cluster of N single-threaded worker processes, one per GPU{none}",
    )


def _online_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--online", action="store_true", help="check hub ids for new revisions (default unless HF_HUB_OFFLINE)"
    )
    g.add_argument("--offline", action="store_true", help="do not ask the hub; keep the catalog revisions")


def add_ops_commands(sub: Any, add: AddCommand) -> None:
    """Register the operations commands on the CLI's subparsers via its ``add`` helper."""
    del sub  # every command goes through ``add`` so it gets --catalog/--profile/--store
    r = add("rebuild", cmd_rebuild, "extract, fit and evaluate only what changed; mark removed models' artefacts stale")
    r.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    _online_options(r)
    dask_options(r)

    s = add("serve", cmd_serve, "serve scheduled rebuilds as a Prefect deployment (needs `prefect server start`)")
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", default=None, help="cron schedule, e.g. '0 3 * * *' (03:00 daily)")
    when.add_argument("--interval", type=float, default=None, help="run every SECONDS")
    s.add_argument("--name", default="safeport-rebuild", help="deployment name (default: safeport-rebuild)")
    s.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    _online_options(s)
    dask_options(s)

    g = add("gc", cmd_gc, "list arrays no record refers to (dry run); --apply deletes them")
    g.add_argument("--apply", action="store_true", help="delete them (default: only list them and their size)")
    g.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)

    e = add("export", cmd_export, "export vectors (safetensors + lineage JSON) or SafeDIG bundles to a folder")
    e.add_argument("names", nargs="*", help="vector names (default: all, unless --safedig is given)")
    e.add_argument(
        "--safedig",
        nargs="+",
        default=None,
        metavar="BUNDLE",
        help="SafeDIG bundles by name (safedig:MODEL:CATEGORY; list them: safeport query "
        '"select name from safedig_bundles")',
    )
    e.add_argument("--output", "-o", required=True, help="folder to write")

    i = add("import", cmd_import, "import exported vectors into the store, checksum-verified, with lineage")
    i.add_argument("path", help="a folder written by `safeport export`, or one .safetensors file")
    i.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
