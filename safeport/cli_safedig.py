"""``safeport capture``: the token cache of position-aware steering (METHOD-SAFEDIG §2), and its plan.

Registered by :func:`add_safedig_commands` from ``safeport.cli.build_parser``; a thin layer over
``flows/capture.py``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from safeport.cli_ops import _fmt_bytes, dask_options
from safeport.cli_verify import WAIT_HELP

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def print_capture_plan(args: argparse.Namespace) -> int:
    """Rows, bytes on disk and GPU time per model and position, and in total; no model is loaded."""
    from safeport.flows.capture import plan_capture

    gpus = args.gpus or args.dask_workers or 1
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: give the number of GPUs, 1 or more")
    total_rows = total_bytes = 0
    total_seconds: float | None = 0.0
    for plan in plan_capture(args.catalog, args.profile, args.store):
        width = max([len("position"), *(len(p.position) for p in plan.positions)])
        print(f"{plan.model}: {plan.texts} texts")
        print(f"  {'position':<{width}} {'rows':>14} {'on disk':>10} {'done':>14}")
        for p in plan.positions:
            print(f"  {p.position:<{width}} {p.rows:>14,} {_fmt_bytes(p.bytes):>10} {p.done_rows:>14,}")
        print(f"  {'all':<{width}} {plan.rows:>14,} {_fmt_bytes(plan.bytes):>10}")
        total_rows += plan.rows
        total_bytes += plan.bytes
        if plan.seconds_per_text is None:
            print("  GPU time: unknown (set generation: seconds_per_output for this model)")
        else:
            seconds = plan.texts * plan.seconds_per_text
            print(
                f"  GPU time: {_duration(seconds)} on 1 GPU, {_duration(seconds / gpus)} on {gpus} GPU(s) "
                f"({plan.seconds_from})"
            )
            if total_seconds is not None:
                total_seconds += seconds
    print(f"total: {total_rows:,} rows, {_fmt_bytes(total_bytes)} on disk", end="")
    if total_seconds:
        print(f", GPU time {_duration(total_seconds)} on 1 GPU, {_duration(total_seconds / gpus)} on {gpus} GPU(s)")
    else:
        print()
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    """Fill the token cache (incremental, resumable); ``--plan`` counts it without loading a model."""
    if args.plan:
        return print_capture_plan(args)
    from safeport.flows.capture import capture_flow
    from safeport.flows.scale import dask_task_runner
    from safeport.store.query import format_table, readonly_query

    t0 = time.time()
    run = capture_flow
    if args.dask_address or args.dask_workers:
        run = capture_flow.with_options(task_runner=dask_task_runner(args.dask_address, args.dask_workers or 2))
    results = run(args.catalog, args.profile, args.store, args.wait)
    for r in results:
        print(f"  capture {r.model:<16} {r.dataset:<14} {r.status:<8} {r.rows:>9} rows  {len(r.positions)} positions")
    from safeport.catalog import load_catalog

    root = Path(args.store) if args.store else load_catalog(args.catalog, args.profile).store_path
    sql = (
        "SELECT model, position, count(DISTINCT step) AS steps, count(*) AS rows FROM token_rows "
        "GROUP BY ALL ORDER BY ALL"
    )
    print(format_table(readonly_query(root, sql)))
    print(f"capture finished in {time.time() - t0:.1f}s")
    return 0


def add_safedig_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], add: AddCommand) -> None:
    c = add("capture", cmd_capture, "cache token activations at the profile's positions (position-aware steering)")
    c.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    c.add_argument("--plan", action="store_true", help="print rows, bytes and GPU time per position; load nothing")
    c.add_argument(
        "--gpus", type=int, default=None, help="GPUs for --plan's time estimate (default: --dask-workers, or 1)"
    )
    dask_options(c, "capture")
