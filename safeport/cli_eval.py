"""``safeport generate`` and ``safeport eval``: thin CLI layers over eval.generate, the store and flows.eval.

Registered by ``safeport.cli.build_parser`` through :func:`add_eval_commands`; errors (ValueError,
StoreError...) are printed as one line by ``safeport.cli.main``. Prompts given on the command
line are never echoed: files and metadata name them by their text id.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safeport.cli_ops import dask_options
from safeport.cli_verify import WAIT_HELP

AddFn = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def parse_settings(pairs: Sequence[str], steps: int | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pipeline settings; values are read as JSON (numbers, true/false, null) or else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r} is not KEY=VALUE; e.g. --set height=512")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, (list, dict)):
            raise ValueError(f"--set {pair!r}: give a number, true/false or text, not {type(value).__name__}")
        out[key.strip()] = value
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        out["num_inference_steps"] = steps
    return out


def parse_weights(text: str) -> dict[str, float]:
    """``"Sexual=1,Violence=0.5"`` -> {"Sexual": 1.0, "Violence": 0.5}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        cat, sep, raw = part.partition("=")
        try:
            out[cat.strip()] = float(raw)
        except ValueError:
            sep = ""
        if not sep or not cat.strip():
            raise ValueError(
                f"--weights {text!r}: write CATEGORY=WEIGHT pairs separated by commas, e.g. Sexual=1,Hate=0.5"
            )
    return out


def _category_vectors(store: Any, lineage: dict[str, Any]) -> dict[str, np.ndarray]:
    """The per-category siblings of a stored global vector (same kind, source, target, mapper)."""
    from safeport.store.artifacts import load_vector

    rows = store.fetchall(
        "SELECT name, category FROM vectors WHERE kind = ? AND target = ? AND category IS NOT NULL "
        "AND source IS NOT DISTINCT FROM ? AND mapper IS NOT DISTINCT FROM ? "
        "QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC) = 1",
        [lineage.get("kind"), lineage.get("target"), lineage.get("source"), lineage.get("mapper")],
    )
    return {str(cat): load_vector(store, name)[0] for name, cat in rows}


def _resolve_vector(args: argparse.Namespace, store_root: Path) -> tuple[np.ndarray, dict[str, Any], str]:
    from safeport.eval.steering import combine
    from safeport.store.artifacts import load_vector, read_exported_vector
    from safeport.store.store import Store

    if args.vector_file:
        if args.weights:
            raise ValueError("--weights combines stored category vectors; use --vector NAME with it")
        values, lineage = read_exported_vector(Path(args.vector_file))
        return values, lineage, Path(args.vector_file).stem
    with Store(store_root, read_only=True) as store:
        values, lineage = load_vector(store, args.vector)
        if not args.weights:
            return values, lineage, args.vector
        by_cat = _category_vectors(store, lineage)
    if not by_cat:
        raise ValueError(f"vector {args.vector!r} has no per-category vectors; drop --weights or run `safeport fit`")
    lookup = {c.lower(): c for c in by_cat}
    weights = {}
    for cat, w in parse_weights(args.weights).items():
        if cat.lower() not in lookup:
            raise ValueError(f"--weights names category {cat!r}; {args.vector!r} has categories {sorted(by_cat)}")
        weights[lookup[cat.lower()]] = w
    return combine(by_cat, weights), {**lineage, "weights": weights}, f"{args.vector}[{args.weights}]"


def cmd_generate(args: argparse.Namespace) -> int:
    from safeport.catalog import load_catalog
    from safeport.eval.generate import generate_once, load_pipeline, resolve_settings, vector_id
    from safeport.flows.common import model_source
    from safeport.store.outputs import OutputSpec, file_names
    from safeport.texts import text_id

    resolved = load_catalog(args.catalog, args.profile)
    store_root = Path(args.store) if args.store else resolved.store_path
    values, lineage, label = _resolve_vector(args, store_root)
    target = args.target or lineage.get("target")
    if not target:
        raise ValueError("the vector does not say its target; pass --target MODEL (a diffusion target of the catalog)")
    if target not in resolved.models:
        raise ValueError(
            f"target {target!r} is not a model of profile {resolved.name!r} ({sorted(resolved.models)}); "
            "pass --profile (e.g. paper) or --target"
        )
    source = model_source(resolved, target)
    settings = resolve_settings(source, {**resolved.models[target].generation, **parse_settings(args.set, args.steps)})
    started = time.time()
    pipe = load_pipeline(source, offload=args.offload)
    images = generate_once(pipe, args.prompt, values, args.alpha, settings, seed=args.seed)
    seconds = time.time() - started
    tid = text_id(args.prompt)
    spec = OutputSpec(target, source.spec().key(), label, vector_id(values), args.alpha, args.seed, tid, settings.key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = file_names(spec.key, len(images))
    for name, image in zip(names, images, strict=True):
        image.save(out / name)
    meta = {
        "output_key": spec.key,
        "target": target,
        "target_key": spec.target_key,
        "vector": label,
        "vector_id": spec.vector_id,
        "vector_lineage": {k: v for k, v in lineage.items() if isinstance(v, (str, int, float, dict)) or v is None},
        "alpha": args.alpha,
        "seed": args.seed,
        "text_id": tid,
        "settings": settings.record(),
        "files": names,
        "seconds": round(seconds, 3),
    }
    (out / f"{spec.key}.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
    kind = "frames" if len(images) > 1 else "image"
    print(
        f"wrote {len(images)} {kind} + {spec.key}.json to {out} ({seconds:.1f}s, target {target}, alpha {args.alpha:g})"
    )
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse counts below 1 by name before anything is opened or loaded."""
    for flag, value in (("--batch", args.batch), ("--dask-workers", args.dask_workers), ("--gpus", args.gpus)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: give 1 or more (omit it for the default)")
    if args.dask_workers is not None and args.dask_address:
        raise ValueError("--dask-workers starts a local cluster and --dask-address uses one; give only one of them")


def _sweep_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "catalog_path": args.catalog,
        "profile": args.profile,
        "store": args.store,
        "target": args.target,
        "vectors": args.vectors,
        "alphas": args.alphas,
        "prompts": args.prompts,
        "limit": args.limit,
        "seeds": args.seeds,
        "utility": args.utility,
        "utility_limit": args.utility_limit,
        "categories": not args.no_categories,
        "settings": parse_settings(args.set, args.steps) or None,
        "strengths": args.strengths,
        "holdout": args.holdout,
    }


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def print_plan(args: argparse.Namespace) -> int:
    """``--plan``: outputs per target × method × α (total, done, to do) and GPU time; no model is loaded."""
    from safeport.flows.eval_plan import gpu_hours, plan_eval

    gpus = args.gpus or args.dask_workers or 1
    for plan in plan_eval(**_sweep_args(args)):
        width = max([len("method"), *(len(r.method) for r in plan.rows)])
        print(f"{plan.target}:")
        print(f"  {'method':<{width}} {'alpha':>6} {'total':>8} {'done':>8} {'to do':>8}")
        for r in plan.rows:
            print(f"  {r.method:<{width}} {r.alpha:>6g} {r.total:>8} {r.done:>8} {r.todo:>8}")
        todo = plan.total - plan.done
        print(f"  {'all':<{width}} {'':>6} {plan.total:>8} {plan.done:>8} {todo:>8}")
        if plan.seconds_per_output is None:
            print(
                "  GPU time: unknown: set the target's generation: seconds_per_output, "
                "or generate a few outputs (e.g. --limit 1) and plan again"
            )
            continue
        one, many = (_duration(gpu_hours(todo, plan.seconds_per_output, n)) for n in (1, gpus))
        print(f"  per output: {plan.seconds_per_output:.3g} s ({plan.seconds_from})")
        print(f"  GPU time for the {todo} to do: {one} on 1 GPU, {many} on {gpus} GPU(s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _check_counts(args)
    if args.plan:
        return print_plan(args)
    from safeport.flows.eval import eval_flow

    t0 = time.time()
    kwargs = {
        **_sweep_args(args),
        "table_alpha": args.table_alpha,
        "clip_model": args.clip_model,
        "q16_prompts": args.q16_prompts,
        "fid_reference": args.fid_reference,
        "offload": args.offload,
        "wait_s": args.wait,
        "batch": args.batch,
        "show_flagged": args.show_flagged,
    }
    if args.dask_workers is not None or args.dask_address:
        from safeport.flows.eval_dask import eval_on_dask

        result = eval_on_dask(args.dask_address, args.dask_workers or 2, **kwargs)
    else:
        result = eval_flow(**kwargs)
    for g in result.generated:
        print(
            f"  {g.target:<16} {g.planned:>7} outputs planned, {g.generated:>7} generated, "
            f"{g.skipped:>7} already there ({g.seconds:.1f}s)"
        )
    for notice in result.notices:
        print(f"  note: {notice}")
    print(f"eval finished in {time.time() - t0:.1f}s; report {result.report}")
    return 0


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="catalog target model (a diffusers pipeline)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model card's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline setting, e.g. height=512 (repeat)"
    )
    p.add_argument("--offload", action="store_true", help="model CPU offload (targets larger than the GPU)")


def add_eval_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], add: AddFn) -> None:
    """Register ``generate`` and ``eval`` with the CLI's ``add`` helper (which adds --catalog/--profile/--store)."""
    g = add("generate", cmd_generate, "generate images (or video frames) steered by a stored or exported vector")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--vector", help="vector name in the store (see: safeport query 'select name from vectors')")
    which.add_argument("--vector-file", help="an exported vector (.safetensors from safeport export)")
    g.add_argument("--alpha", type=float, required=True, help="steering strength α")
    g.add_argument("--weights", default=None, metavar="CAT=W,...", help="combine the vector's category vectors")
    g.add_argument("--seed", type=int, default=42, help="generation seed (default 42)")
    g.add_argument("--out", default="safeport-generated", help="output folder (default: ./safeport-generated)")
    _shared(g)
    g.add_argument("prompt", help="the prompt (never printed; files are named by content key)")

    e = add(
        "eval",
        cmd_eval,
        "generate, score and report the steering sweep (vectors over α, SafeDIG over s; ASR, unsafe rate per "
        "risk domain, CLIP-Sim, FID, contact sheets); resumable",
    )
    e.add_argument("--vectors", nargs="+", default=None, help="vector names (default: every Table 1 vector)")
    e.add_argument("--alphas", type=float, nargs="+", default=None, help="α sweep (default: the profile's)")
    e.add_argument("--prompts", default=None, help="prompt dataset (default: the profile's first prompt set)")
    e.add_argument("--limit", type=int, default=None, help="first N prompts only")
    e.add_argument("--seeds", type=int, nargs="+", default=None, help="generation seeds (default 42)")
    e.add_argument("--utility", default=None, help="safe caption dataset for CLIP-Sim and FID")
    e.add_argument("--utility-limit", type=int, default=300, help="first N utility captions (default 300)")
    e.add_argument("--no-categories", action="store_true", help="skip the multi-category uniform/oracle methods")
    e.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=None,
        help="SafeDIG strength s sweep (default: the profile's safedig.strengths)",
    )
    e.add_argument(
        "--holdout",
        default=None,
        metavar="CATEGORY",
        help="held-out risk category: the SafeDIG bundle safedig:<target>:<CATEGORY> (default: the profile's "
        "safedig.holdout, the first with a bundle if all)",
    )
    e.add_argument(
        "--show-flagged",
        action="store_true",
        help="show flagged outputs unblurred on the report's contact sheets (default: blurred)",
    )
    e.add_argument("--table-alpha", type=float, default=None, help="α of Table 1 (default: the largest)")
    e.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="CLIP for Q16 and CLIP-Sim")
    e.add_argument("--q16-prompts", default=None, help="Q16 prompt embeddings (.npy [2, 768])")
    e.add_argument("--fid-reference", default=None, help="folder of reference images for FID")
    e.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    e.add_argument(
        "--batch",
        type=int,
        default=None,
        help="outputs per pipeline call (default: the target's generation: batch_size, or 1)",
    )
    e.add_argument(
        "--plan", action="store_true", help="print outputs per method × α (total/done/to do) and GPU time; load nothing"
    )
    e.add_argument(
        "--gpus", type=int, default=None, help="GPUs for --plan's time estimate (default: --dask-workers, or 1)"
    )
    dask_options(e, "generate and score", default=None)
    _shared(e)
