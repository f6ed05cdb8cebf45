"""``safeport verify [--repair]``: check every stored array against its checksum; recompute what is damaged.

Registered by :func:`add_verify_commands` from ``safeport.cli.build_parser``. Exit status:
0 when the store is intact (or was repaired), 1 when damage was found and is left as it is,
2 for user errors (printed by ``safeport.cli.main``). Only keys, paths and names are printed,
never texts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]
WAIT_HELP = (
    "seconds each write waits for the store while another process holds it (default: SAFEPORT_STORE_WAIT or 60); "
    "writers share a store, work another writer holds is waited for while that writer lives"
)


def _root(args: argparse.Namespace) -> Path:
    if getattr(args, "store", None):
        return Path(args.store)
    from safeport.catalog import load_catalog

    return load_catalog(args.catalog, args.profile).store_path


def _print_report(report: Any, title: str) -> None:
    print(
        f"{title}: {report.shards} shard(s), {report.vectors} vector(s), {report.maps} map(s) read; "
        f"{len(report.damage)} problem(s) in {len(report.paths)} array(s)"
    )
    for d in report.damage:
        print(f"  {d.describe()}")


def cmd_verify(args: argparse.Namespace) -> int:
    t0 = time.time()
    if not args.repair:
        from safeport.store.verify import verify_path

        report = verify_path(_root(args))
        _print_report(report, f"verify {report.root}")
        if not report.ok:
            print("damage found; `safeport verify --repair` re-extracts the damaged shards and resets damaged fits")
            return 1
        print(f"store is intact ({time.time() - t0:.1f}s)")
        return 0

    from safeport.flows.verify import repair_flow
    from safeport.store.recovery import probe

    if (_root(args) / "meta.duckdb").is_file():
        probe(_root(args))  # a damaged meta.duckdb is one clean error before any flow starts
    result = repair_flow(args.catalog, args.profile, args.store, args.wait)
    _print_report(result.before, f"verify {result.before.root}")
    inv = result.invalidation
    if result.before.damage:
        shards = sum(len(s) for _, s in inv.shards)
        print(
            f"repair: {shards} shard(s) of {len(inv.shards)} unit(s) uncommitted ({inv.rows_removed} row(s)), "
            f"{len(inv.vectors_removed)} vector(s) and {len(inv.maps_removed)} map(s) removed, "
            f"{len(inv.fits_reset)} fit(s) reset"
        )
    for r in result.resumed:
        if r.model:
            print(f"  re-extracted {r.model}/{r.dataset} ({r.unit_key}): {r.rows} row(s)")
    for line in result.pending:
        print(f"  to do: {line}")
    _print_report(result.after, "after repair")
    print(f"verify --repair finished in {time.time() - t0:.1f}s")
    return 0 if result.after.ok else 1


def cmd_recover(args: argparse.Namespace) -> int:
    from safeport.store.recovery import recover

    r = recover(_root(args))
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.snapshot_taken))
    print(f"recover: the damaged metadata was kept as {r.damaged_kept_as}")
    print(
        f"recover: restored the snapshot of {when}: {r.units} unit(s), {r.shards} shard(s), {r.vectors} vector(s), "
        f"{r.outputs} output(s)"
    )
    print(
        "next: `safeport verify` checks the arrays against the restored checksums; rerun the jobs run after the "
        "snapshot (e.g. `safeport run`, `safeport eval ...`) to recompute what came after it"
    )
    return 0


def add_verify_commands(sub: Any, add: AddCommand) -> None:
    """Register ``verify`` on the CLI's subparsers via its ``add`` helper (adds --catalog/--profile/--store)."""
    del sub  # ``add`` gives the command the shared options
    v = add("verify", cmd_verify, "read every stored array, check it against its checksum and name what is damaged")
    v.add_argument(
        "--repair",
        action="store_true",
        help="re-extract damaged shards (only those) and reset fits with damaged vectors/maps for `safeport fit`",
    )
    v.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP + " (with --repair)")
    add(
        "recover",
        cmd_recover,
        "replace a damaged meta.duckdb by the snapshot of the last successful run (the damaged file is kept)",
    )
