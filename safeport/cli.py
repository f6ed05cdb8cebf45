"""``safeport`` command line: a thin layer over flows/ and store/.

User errors (bad catalog, bad query, busy store) print one clear message and
exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safeport.cli_verify import WAIT_HELP


def _quiet_env() -> None:
    """Offline-friendly defaults, set before Prefect or transformers are imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # The CPU install has no torchvision on purpose; transformers says so at every diffusers
    # import (its PIL image processors are used instead, which is all safeport needs).
    # One filter object: adding it again (main() runs many times in tests) is a no-op.
    logging.getLogger("transformers.utils.import_utils").addFilter(_NO_TORCHVISION_NOTICE)


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_NO_TORCHVISION_NOTICE = _NoTorchvisionNotice()


def _store_root(args: argparse.Namespace) -> Path:
    if getattr(args, "store", None):
        return Path(args.store)
    from safeport.catalog import load_catalog

    return load_catalog(args.catalog, args.profile).store_path


def cmd_catalog(args: argparse.Namespace) -> int:
    from safeport.catalog import load_catalog
    from safeport.datasets import build_all

    resolved = load_catalog(args.catalog, args.profile)
    datasets = build_all(resolved)
    print(f"catalog {resolved.path} profile {resolved.name!r}: OK")
    for name, m in resolved.models.items():
        print(f"  model   {name:<16} {m.role:<6} {m.family:<12} {m.hub_id or m.path}")
    for name, ds in datasets.items():
        extra = ", ".join(f"{k}={v}" for k, v in sorted(ds.report.items()))
        print(f"  dataset {name:<16} {ds.kind:<8} {len(ds.rows):>6} rows {extra}")
    print(f"  store   {resolved.store_path}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from safeport.flows.extract import extract_flow

    t0 = time.time()
    results = extract_flow(args.catalog, args.profile, args.store, args.wait)
    for r in results:
        print(f"  {r.model:<16} {r.dataset:<14} {r.status:<8} {r.rows:>6} rows {r.tokens:>8} tokens {r.seconds:7.1f}s")
    print(f"extract finished in {time.time() - t0:.1f}s")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from safeport.flows.fit import fit_flow

    t0 = time.time()
    results = fit_flow(args.catalog, args.profile, args.store, args.wait)
    for r in results:
        print(f"  fit {r.source} -> {r.target}: {r.status} in {r.seconds:.1f}s; report {r.report}")
    print(f"fit finished in {time.time() - t0:.1f}s")
    _print_headlines(results)
    return 0


def _print_headlines(results: Sequence[Any]) -> None:
    print("\nheadline (representation level):")
    for r in results:
        for line in r.headline:
            print(f"  {line}")


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: extract, fit, report; prints a summary and the report's headline."""
    from safeport.flows.run import run_flow

    t0 = time.time()
    extracted, fitted = run_flow(args.catalog, args.profile, args.store, args.wait)
    root = _store_root(args)
    for r in extracted:
        print(f"  extract {r.model:<16} {r.dataset:<14} {r.status:<8} {r.rows:>6} rows {r.seconds:7.1f}s")
    _print_summary(root)
    for f in fitted:
        print(f"  fit {f.source} -> {f.target}: {f.status} in {f.seconds:.1f}s; report {f.report}")
    _print_headlines(fitted)
    print(f"\nsafeport run finished in {time.time() - t0:.1f}s; store at {root}")
    return 0


def _print_summary(root: Path) -> None:
    from safeport.store.query import format_table, readonly_query

    table = readonly_query(
        root,
        "SELECT model, dataset, count(*) AS rows, sum(n_tokens) AS tokens, "
        "sum(truncated::INT) AS truncated FROM activations WHERE current AND dataset <> '__concept__' "
        "GROUP BY ALL ORDER BY ALL",
    )
    print(format_table(table))


def cmd_query(args: argparse.Namespace) -> int:
    from safeport.store.query import format_table, hide_implicit_text, readonly_query, write_table

    table = hide_implicit_text(readonly_query(_store_root(args), args.sql), args.sql)
    if args.output:
        fmt = write_table(table, Path(args.output), args.format)
        print(f"wrote {table.num_rows} row(s) as {fmt} to {args.output}")
    else:
        print(format_table(table, max_rows=args.max_rows))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from safeport.store import location
    from safeport.store.query import format_table, readonly_query

    root = _store_root(args)
    print(f"store  {root}")
    recorded = readonly_query(root, "SELECT value FROM meta WHERE key = 'arrays'").column(0).to_pylist()
    print(f"arrays {location.resolve(recorded[0] if recorded else location.DEFAULT, root)}")
    for title, sql in (
        ("models", "SELECT name, role, family, model_key, dim, current FROM models ORDER BY name"),
        ("datasets", "SELECT dataset, kind, n_rows, content_hash, registered_at FROM datasets ORDER BY 1"),
        ("units", "SELECT model, dataset, n_rows, shards_committed, status FROM arrays ORDER BY 1, 2"),
    ):
        print(f"\n{title}:")
        print(format_table(readonly_query(root, sql)))
    from safeport.cli_ops import print_running, print_staleness

    print_staleness(root)
    print_running(root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeport", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--catalog", default=None, help="catalog.yaml (default: the embedded one)")
        p.add_argument("--profile", default="default", help="catalog profile (default: default)")
        p.add_argument("--store", default=None, help="store folder (default: the profile's store)")
        p.set_defaults(func=func)
        return p

    for name, func, help_ in (
        ("run", cmd_run, "the main job: extract, fit and report for the profile (incremental)"),
        ("extract", cmd_extract, "extract pooled activations into the store (incremental, resumable)"),
        ("fit", cmd_fit, "fit maps, vectors and baselines from the cached store; write the report"),
    ):
        p = add(name, func, help_)
        p.add_argument("--wait", type=float, default=0.0, help=WAIT_HELP)
    add("catalog", cmd_catalog, "validate the catalog and show what the profile would read")
    add("status", cmd_status, "models, datasets, rows cached, and what is stale and why")
    q = add("query", cmd_query, "read-only SQL over the store's metadata (tables and views)")
    q.add_argument("sql", help='e.g. "select model, dataset, count(*) from activations group by all"')
    q.add_argument("--output", "-o", default=None, help="write all rows to FILE (.csv, .json, .parquet)")
    q.add_argument("--format", choices=["csv", "json", "parquet"], default=None)
    q.add_argument("--max-rows", type=int, default=50)
    from safeport.cli_eval import add_eval_commands

    add_eval_commands(sub, add)
    from safeport.cli_ops import add_ops_commands

    add_ops_commands(sub, add)
    from safeport.cli_verify import add_verify_commands

    add_verify_commands(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_env()
    args = build_parser().parse_args(argv)
    from safeport.errors import USER_ERRORS

    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`safeport status | head`): stop quietly, like other Unix tools.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except USER_ERRORS as err:
        print(f"safeport: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # Anything else a user can cause (a bad option value, an unreadable path) is
        # still one line; SAFEPORT_DEBUG=1 shows the traceback for bug reports.
        if os.environ.get("SAFEPORT_DEBUG"):
            raise
        print(f"safeport: error: {type(err).__name__}: {err} (SAFEPORT_DEBUG=1 shows details)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safeport: interrupted; committed work is kept, rerun to resume", file=sys.stderr)
        return 130
    finally:
        # Drop reference cycles from caught tracebacks while DuckDB is still loaded (quiet exit).
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
