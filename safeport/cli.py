"""``safeport`` command line: a thin layer over flows/ and store/.

User errors (bad catalog, bad query, busy store) print one clear message and
exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
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
        files = f"{len(ds.files)} file(s), {sum(f.bytes for f in ds.files)} bytes" if ds.files else "hub"
        print(f"  dataset {name:<16} {ds.kind:<8} {len(ds.rows):>6} rows from {files} {extra}")
        for short in ds.shortfalls:
            print(f"          note: {short.describe(name)}")
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
    extracted, fitted, bundles, headline = run_flow(args.catalog, args.profile, args.store, args.wait)
    root = _store_root(args)
    for r in extracted:
        print(f"  extract {r.model:<16} {r.dataset:<14} {r.status:<8} {r.rows:>6} rows {r.seconds:7.1f}s")
    _print_summary(root)
    for f in fitted:
        print(f"  fit {f.source} -> {f.target}: {f.status} in {f.seconds:.1f}s; report {f.report}")
    _print_headlines(fitted)
    if bundles:
        print("\nposition-aware steering (SafeDIG):")
        for b in bundles:
            print(f"  {b.name}: routed {', '.join(b.routed)}; no-routing ablation at {b.fixed}")
    for h in headline:
        print(f"\nheadline (SafeDIG, leave one category out on {h.model}; report {h.report}):")
        for line in h.verdicts.values():
            print(f"  {line}")
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
    from safeport.store.query import format_table, readonly_query, write_table

    table = readonly_query(_store_root(args), args.sql, hide_text=True)
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
    meta = readonly_query(root, "SELECT key, value FROM meta WHERE key IN ('arrays', 'outputs')").to_pylist()
    recorded = {r["key"]: r["value"] for r in meta}
    print(f"arrays {location.resolve(recorded.get('arrays', location.DEFAULT), root)}")
    print(f"outputs {location.resolve(recorded.get('outputs', location.OUTPUTS), root)}")
    for title, sql in (
        ("models", "SELECT name, role, family, model_key, dim, current FROM models ORDER BY name"),
        ("datasets", "SELECT dataset, kind, n_rows, content_hash, registered_at FROM datasets ORDER BY 1"),
        (
            "units",
            "SELECT model, dataset, n_rows, shards_committed, status FROM arrays WHERE kind = 'pooled' ORDER BY 1, 2",
        ),
        (
            "token cache (position-aware steering)",
            "SELECT coalesce(m.name, u.model_key) AS model, u.dataset, count(*) AS positions, "
            "sum(u.shards_committed) AS shards_committed, sum((u.n_texts + u.shard_texts - 1) // u.shard_texts) AS "
            "shards, sum(coalesce(u.n_rows, 0)) AS rows, min(u.status) AS status FROM (SELECT u.*, "
            "(SELECT count(*) FROM shards s WHERE s.unit_key = u.unit_key) AS shards_committed FROM units u "
            "WHERE u.kind = 'tokens') u LEFT JOIN models m USING (model_key) GROUP BY ALL ORDER BY 1, 2",
        ),
    ):
        table = readonly_query(root, sql)
        if title.startswith("token cache") and not table.num_rows:
            continue
        print(f"\n{title}:")
        print(format_table(table))
    from safeport.cli_ops import print_running, print_staleness

    print_staleness(root)
    print_running(root)
    return 0


DESCRIPTION = """\
safeport learns a safety direction in a source LLM from safe/unsafe prompt pairs, carries it into
an image or video generator's text-encoder space with a map fitted on benign anchor texts, and
steers (and evaluates) generation with it. It caches every model's activations in a store (Zarr
arrays + DuckDB metadata) described by a catalog (catalog.yaml); every stage is incremental and
resumable, and user errors are one line (SAFEPORT_DEBUG=1 shows tracebacks)."""

EPILOG = """\
start here:
  safeport run                                  the main job on the embedded default catalog (CPU)
  safeport status                               what the store holds, and what is stale
  safeport query "select name, norm from vectors"

`safeport COMMAND --help` shows each command's options and an example; README.md has the rest."""

# One example per command, shown at the end of `safeport COMMAND --help`.
EXAMPLES: dict[str, str] = {
    "run": "safeport run --catalog my-catalog.yaml --profile default",
    "extract": "safeport extract --profile demo-eval --wait 60",
    "fit": "safeport fit --store safeport-store",
    "catalog": "safeport catalog --catalog my-catalog.yaml --profile paper",
    "status": "safeport status --store safeport-store",
    "query": 'safeport query "select model, dataset, count(*) from activations group by all" -o counts.csv',
    "generate": 'safeport generate --profile demo-eval --vector "calibrated:smollm2-135m->tiny-flux:ridge" '
    '--alpha 1 "a red bicycle"',
    "eval": "HF_HUB_OFFLINE=1 safeport eval --profile demo-eval --target tiny-flux --limit 4 "
    "--batch 4 --dask-workers 2",
    "rebuild": "safeport rebuild --profile demo-eval --dask-workers 2",
    "serve": 'PREFECT_API_URL=http://127.0.0.1:4200/api safeport serve --cron "0 3 * * *"',
    "gc": "safeport gc --apply",
    "export": 'safeport export -o vectors/ "calibrated:smollm2-135m->minilm-l6:ridge"',
    "import": "safeport import vectors/ --store other-store",
    "verify": "safeport verify --repair",
    "recover": "safeport recover --store safeport-store",
    "capture": "safeport capture --profile paper --plan --gpus 8",
    "safedig": "safeport safedig --holdout all --plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safeport",
        usage="%(prog)s COMMAND [options]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        example = EXAMPLES.get(name)
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}" if example else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
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
    from safeport.cli_safedig import add_safedig_commands

    add_safedig_commands(sub, add)
    return parser


def _exit_now(signum: int, frame: object) -> None:
    """A Ctrl-C while safeport is already stopping: leave at once, quietly.

    Why: a second SIGINT would otherwise raise KeyboardInterrupt inside cleanup (the
    garbage collection below, weakref callbacks, interpreter shutdown), which Python
    prints as a trace. Committed work is safe without that cleanup: every commit is a
    DuckDB transaction, and the writer lock is released with the process.
    """
    del signum, frame
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        os.write(sys.stderr.fileno(), b"safeport: interrupted again; stopped now (committed work is kept)\n")
    os._exit(130)


def _first_interrupt(signum: int, frame: object) -> None:
    """The first Ctrl-C stops safeport the usual way (KeyboardInterrupt); the next one exits at once."""
    signal.signal(signal.SIGINT, _exit_now)
    raise KeyboardInterrupt


def _handles_interrupts() -> bool:
    """Whether main() may manage SIGINT: the main thread, and Ctrl-C not ignored (a background job)."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) in (
        signal.default_int_handler,
        _first_interrupt,
    )


def _quiet_second_interrupt() -> None:
    """From the first KeyboardInterrupt on, the next Ctrl-C ends the process without a trace."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, _exit_now)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_env()
    args = build_parser().parse_args(argv)
    from safeport.errors import USER_ERRORS, quiet_user_errors_in_flows, user_message

    debug = bool(os.environ.get("SAFEPORT_DEBUG"))
    if not debug:
        quiet_user_errors_in_flows()  # the line below is the report; Prefect's traceback would repeat it
    managed = _handles_interrupts()
    if managed:  # a second Ctrl-C while the first one unwinds (Prefect's crash reports) is quiet too
        signal.signal(signal.SIGINT, _first_interrupt)
    try:
        try:
            code = int(args.func(args))
            if managed and signal.getsignal(signal.SIGINT) is _exit_now:
                # The first Ctrl-C was taken, but its KeyboardInterrupt never came back: Prefect's flow
                # engine drops one that lands once the flow run is final (its completion hooks, its
                # "Finished in state" report). Ctrl-C still means stop (`safeport run && ...` must not go on).
                raise KeyboardInterrupt
            return code
        except Exception as err:
            # A Ctrl-C whose KeyboardInterrupt a cleanup step then buried under its own error
            # (DuckDB's "unfinished result", a Prefect crash report) is still an interrupt.
            from safeport.store.db import interrupted

            if interrupted(err):
                raise KeyboardInterrupt from None
            raise
    except BrokenPipeError:
        # The reader went away (`safeport status | head`): stop quietly, like other Unix tools.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except USER_ERRORS as err:
        print(f"safeport: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as err:
        # Anything else a user can cause (a bad option value, an unreadable path, CUDA out of
        # memory) is still one line; SAFEPORT_DEBUG=1 shows the traceback for bug reports.
        message = user_message(err)
        if debug or message is None:
            raise
        print(f"safeport: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _quiet_second_interrupt()  # stays for the rest of this process: it is shutting down
        print("safeport: interrupted; committed work is kept, rerun to resume", file=sys.stderr)
        return 130
    finally:
        # Drop reference cycles from caught tracebacks while DuckDB is still loaded (quiet exit).
        gc.collect()
        if managed and signal.getsignal(signal.SIGINT) is _first_interrupt:  # not interrupted: as before
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
