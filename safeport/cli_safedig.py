"""``safeport capture`` and ``safeport safedig``: position-aware steering's token cache (METHOD-SAFEDIG §2) and
its fit (§3-6: route, train SAEs, select, bundle), each with a ``--plan`` that loads no model.

Registered by :func:`add_safedig_commands` from ``safeport.cli.build_parser``; a thin layer over
``flows/capture.py`` and ``flows/safedig.py``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safeport.cli_ops import _fmt_bytes, dask_options
from safeport.cli_verify import WAIT_HELP

if TYPE_CHECKING:
    from safeport.flows.safedig import BundleResult
    from safeport.flows.safedig_report import SafedigPlan

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]

# Assumed sustained rates of the plan's time estimates (stated in its output).
GPU_TFLOPS = 30.0  # float32 on one GPU: about half an H100 SXM's FP32 peak (67); an A100 peaks at 19.5
CPU_GFLOPS = 100.0  # numpy/LAPACK on the node that runs the flow (select stage and the refit)
REFIT_PEAK = 7  # peak memory of the refit in units of one m × m float64 matrix (measured at m = 3,072)


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
        print(f"{plan.model}: {plan.texts} texts; text tokens counted from {plan.tokens_from}")
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


# --- safeport safedig ---------------------------------------------------------------------------------


def _sae_flops_per_token(d: int, m: int, k: int) -> int:
    """Training FLOPs per token: the d × m encoder product forward + backward counted dense (×3), the sparse decoder."""
    return 6 * d * m + 6 * k * d


def _refit_flops(d: int, m: int) -> int:
    """The refit's float64 work: one eigendecomposition of the m × m ZᵀZ and the λ grid's m × m × d products."""
    return 9 * m**3 + 36 * m * m * d


def print_safedig_plan(args: argparse.Namespace, holdout: str | None) -> int:
    """SAE sizes, training tokens, memory and GPU/CPU time per model and position; no model is loaded."""
    from safeport.catalog import load_catalog
    from safeport.flows.safedig_report import plan_safedig

    tflops, gpus = args.tflops, args.dask_workers or 1
    if not tflops > 0:
        raise ValueError(f"--tflops {tflops}: give the sustained float32 TFLOP/s of one GPU, e.g. 30")
    sd = load_catalog(args.catalog, args.profile).profile.safedig
    plans = plan_safedig(args.catalog, args.profile, args.store, holdout)
    if sd is None or not plans:
        print("nothing to plan: the profile's safedig: block has no models")
        return 0
    print(
        f"SAE per position: m = {sd.sae.expansion}·d, k = {sd.sae.k}, {sd.sae.epochs} epoch(s), batch "
        f"{sd.sae.batch_size:,} tokens; float32 weights"
    )
    total_gpu = total_cpu = 0.0
    total_saes = 0
    for plan in plans:
        gpu_h, cpu_h, saes = _print_model_plan(plan, tflops, sd.sae.batch_size)
        total_gpu, total_cpu, total_saes = total_gpu + gpu_h, total_cpu + cpu_h, total_saes + saes
    wall = f" ({_duration(total_gpu * 3600 / gpus)} on {gpus} GPUs)" if gpus > 1 else ""
    print(
        f"total: at most {total_saes} SAEs, GPU time {_duration(total_gpu * 3600)}{wall}, "
        f"CPU time {_duration(total_cpu * 3600)}"
    )
    print(
        f"GPU time per SAE = training tokens × (6·d·m + 6·k·d) FLOPs / {tflops:g} TFLOP/s sustained (--tflops). "
        "6·d·m: the d × m encoder product, forward and backward counted dense (×3; the trainer's backward is in "
        "fact sparse, and that slack covers top-k, AuxK over dead latents and sparse kernels below peak); 6·k·d: "
        "the sparse decoder's k rows, forward and backward. The trainer runs float32 matmuls with TF32 off "
        "(torch's default): an H100 SXM peaks at 67 TFLOP/s FP32, an A100 at 19.5."
    )
    print(
        "weights = 4·(2·d·m + m + d) B; training memory ≈ 4 × weights (parameters, gradients, Adam's two moments) "
        "+ 2 × batch × m × 4 B (pre-activations). Refit (§6): ZᵀZ is m × m float64, 8·m² B per accumulator "
        f"(train and held-out: two); peak ≈ {REFIT_PEAK} × 8·m² (measured at m = 3,072)."
    )
    print(
        f"CPU time per SAE (the flow's process, at an assumed {CPU_GFLOPS:g} GFLOP/s): the select stage encodes the "
        "source pairs' train rows twice and the held-out category's once, 2·d·m FLOPs a row (numpy float32), "
        "and the refit takes 9·m³ (eigendecomposition) + 36·m²·d FLOPs (float64)."
    )
    return 0


def _print_model_plan(plan: SafedigPlan, tflops: float, batch: int) -> tuple[float, float, int]:
    """One model's table; returns (GPU hours, CPU hours, SAEs) at most, summed over its held-out categories."""
    from safeport.cli_ops import _fmt_bytes

    held = ", ".join(plan.holdouts)
    print(
        f"{plan.model}: held out {held}; rows from {plan.rows_from}; K = {plan.route_k} routed + the no-routing "
        f"position {plan.fixed}"
    )
    header = ["position", "d", "m", "train tokens", "weights", "train mem", "ZᵀZ f64", "refit peak", "GPU", "CPU"]
    width = max([len("position"), *(len(p.position) for p in plan.positions)])
    print(f"  {header[0]:<{width}} " + " ".join(f"{h:>{12 if i == 3 else 10}}" for i, h in enumerate(header[1:], 1)))
    cost: dict[str, dict[str, tuple[float, float]]] = {h: {} for h in plan.holdouts}
    for p in plan.positions:
        weights = 4 * (2 * p.d * p.m + p.m + p.d)
        train_mem = 4 * weights + 2 * batch * p.m * 4
        gram = 8 * p.m * p.m
        for h in plan.holdouts:
            gpu = p.tokens[h] * _sae_flops_per_token(p.d, p.m, p.k) / (tflops * 1e12) / 3600
            cpu = (p.select_rows[h] * 2 * p.d * p.m + _refit_flops(p.d, p.m)) / (CPU_GFLOPS * 1e9) / 3600
            cost[h][p.position] = (gpu, cpu)
        tokens = max(p.tokens.values())
        gpu_h = max(c[p.position][0] for c in cost.values())
        cpu_h = max(c[p.position][1] for c in cost.values())
        cells = [
            f"{p.d:>10,}",
            f"{p.m:>10,}",
            f"{tokens:>12,}",
            f"{_fmt_bytes(weights):>10}",
            f"{_fmt_bytes(train_mem):>10}",
            f"{_fmt_bytes(gram):>10}",
            f"{_fmt_bytes(REFIT_PEAK * gram):>10}",
            f"{_duration(gpu_h * 3600):>10}",
            f"{_duration(cpu_h * 3600):>10}",
        ]
        print(f"  {p.position:<{width}} " + " ".join(cells))
    gpu_total = cpu_total = 0.0
    saes = 0
    for h in plan.holdouts:
        fixed = cost[h][plan.fixed]
        others = sorted((c for pos, c in cost[h].items() if pos != plan.fixed), key=lambda c: c[0], reverse=True)
        chosen = [fixed, *others[: plan.route_k]]
        gpu_total += sum(c[0] for c in chosen)
        cpu_total += sum(c[1] for c in chosen)
        saes += len(chosen)
    per = "per held-out category" if len(plan.holdouts) == 1 else f"over {len(plan.holdouts)} held-out categories"
    print(
        f"  {per}, at most {saes} SAEs (the no-routing position + the {plan.route_k} costliest others): "
        f"GPU time {_duration(gpu_total * 3600)}, CPU time {_duration(cpu_total * 3600)}"
    )
    return gpu_total, cpu_total, saes


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if v == v else "–"  # NaN: no held-out rows


def print_bundles(bundles: Sequence[BundleResult]) -> None:
    """Per (model, held-out category): routed positions, each SAE's quality, its refit and |H|; each report once."""
    for i, b in enumerate(bundles):
        view = b.view
        sources = f" (sources: {', '.join(view.sources)})" if view is not None else ""
        print(f"{b.model}, held out {b.holdout}{sources}")
        print(f"  routed {', '.join(b.routed) or 'none'}; no-routing position {b.fixed}; bundle {b.name}")
        if view is not None:
            width = max([len("position"), *(len(s.position) for s in view.saes)])
            print(
                f"    {'position':<{width}} {'role':<19} {'FVU':>6} {'L0':>6} {'dead':>6} {'|H|':>4} "
                f"{'refit λ (k)':>16} {'FVU refit':>10} {'FVU source':>10}"
            )
            for s in view.saes:
                r = s.refit
                lam = f"{r.lam:.4g} ({r.k:+d})" if r is not None else "–"
                fvu_refit = _fmt(r.fvus[r.ks.index(r.k)]) if r is not None else "–"
                fvu_source = _fmt(r.fvu_source) if r is not None else "–"
                print(
                    f"    {s.position:<{width}} {s.role:<19} {_fmt(s.fvu):>6} {_fmt(s.l0, 2):>6} {_fmt(s.dead):>6} "
                    f"{len(s.harmful):>4} {lam:>16} {fvu_refit:>10} {fvu_source:>10}"
                )
        if b.report and (i + 1 == len(bundles) or bundles[i + 1].model != b.model):
            print(f"  report {b.report}")


def cmd_safedig(args: argparse.Namespace) -> int:
    """Capture what is missing, route, train SAEs, select and bundle; ``--plan`` sizes it without loading a model."""
    from safeport.flows.safedig import check_holdout

    holdout = check_holdout(args.holdout) if args.holdout is not None else None
    if args.plan:
        return print_safedig_plan(args, holdout)
    from safeport.flows.safedig import safedig_flow
    from safeport.flows.scale import dask_task_runner

    t0 = time.time()
    run = safedig_flow
    if args.dask_address or args.dask_workers:
        run = safedig_flow.with_options(task_runner=dask_task_runner(args.dask_address, args.dask_workers or 2))
    bundles = run(args.catalog, args.profile, args.store, args.wait, holdout)
    print_bundles(bundles)
    print(f"safedig finished in {time.time() - t0:.1f}s")
    return 0


def add_safedig_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], add: AddCommand) -> None:
    c = add("capture", cmd_capture, "cache token activations at the profile's positions (position-aware steering)")
    c.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    c.add_argument("--plan", action="store_true", help="print rows, bytes and GPU time per position; load nothing")
    c.add_argument(
        "--gpus", type=int, default=None, help="GPUs for --plan's time estimate (default: --dask-workers, or 1)"
    )
    dask_options(c, "capture")
    f = add("safedig", cmd_safedig, "fit position-aware steering: route, train SAEs, select latents, refit, bundle")
    f.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    f.add_argument(
        "--holdout",
        default=None,
        metavar="CATEGORY",
        help="the held-out risk category (a SafeSteer category, or all); default: the profile's safedig.holdout",
    )
    f.add_argument(
        "--plan", action="store_true", help="print SAE sizes, training tokens, memory and GPU-hours; load nothing"
    )
    f.add_argument(
        "--tflops",
        type=float,
        default=GPU_TFLOPS,
        help=f"sustained float32 TFLOP/s of one GPU for --plan's GPU-hours (default {GPU_TFLOPS:g})",
    )
    dask_options(f, "train SAEs")
