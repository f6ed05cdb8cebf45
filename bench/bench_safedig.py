"""Benchmark (issue 23): SAE training streamed from the store vs from memory; the closed-form decoder refit vs an
iterative decoder fine-tune; the paper-size plans.

    .venv/bin/python bench/bench_safedig.py            # prints the section
    .venv/bin/python bench/bench_safedig.py --write    # ... and puts it at the end of BENCHMARKS.md
    .venv/bin/python bench/bench_safedig.py --quick    # small sizes, one round: a smoke check, not figures to keep

(a) **SAE training rows/s.** One token unit of ``--rows`` float16 rows (d = 384, shards of 64 texts x 32 rows,
random values: throughput does not depend on them), the training selection being every text whose id does not
end in ``0`` (the flow's rule: those are the SAE's held-out quality rows). Three paths train the same top-k SAE
(m = 1536, k = 8, batch 4,096, seed 42, the same number of steps, SAELens's trainer through
``mappers.sae.train_sae``, one torch thread):

- ``stream``: ``StreamPlan.batches`` (planned from DuckDB, read from the arrays, every shard checksum-verified)
  feeding ``train_sae``; timed from planning the stream to the trained SAE;
- ``memory``: the same rows read whole beforehand (not timed), a seeded permutation per epoch and one gather per
  batch feeding ``train_sae``: the trainer's own speed, the ceiling for the stream;
- ``flow``: the flow's own ``flows.safedig.train_position_sae``: the stream plus a checkpoint into the arrays every
  ``CHECKPOINT_EVERY`` steps and the held-out quality pass (FVU, L0, dead fraction) at the end.

Each run is its own process (its peak resident set is its own); the paths alternate for ``--rounds`` rounds and
the best time of each is kept (the machine is shared).

(b) **Decoder refit.** A planted sparse dictionary (no training needed, a known answer): a source SAE whose
encoder is the source dictionary Dᵀ (m = 1536 unit atoms in d = 384) and whose decoder is D; target rows
x = c·(z D′ + μ + noise) with k = 8 atoms a row, where a quarter of D′'s atoms are moved off D's (cosine ~0.8):
a new risk domain. ``refit``: the flow's path, codes of the target rows streamed through
``mappers.refit.RefitStats`` (4,096 rows at a time) and ``refit_decoder`` over λ = 10^k·tr(ZᵀZ)/m, k = −4…2,
picked by held-out FVU (10 % of the rows by a hash of their group key). ``adam``: the same codes computed once,
then Adam on the decoder only (W and b, from the source decoder, encoder frozen) on the same train rows,
batches of 4,096, loss FVU; held-out FVU every 20 steps (evaluation not timed), until it reaches the refit's
held-out FVU or a step / time cap; three learning rates. Each path in its own process.

(c) **Paper size.** ``safeport capture --profile paper --plan --gpus 8`` and ``safeport safedig --profile paper
--plan`` (offline: no model is loaded), quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import replace_section, reset_peak, status_bytes  # noqa: E402
from safeport.store.store import Store  # noqa: E402

TITLE = "SAEs and the decoder refit (issue 23)"
GOAL = 0.9  # streamed training rows/s at least this fraction of the in-memory path's
SPEC = {"family": "text_encoder", "model_id": "bench", "revision": "main", "weights": "random"}
POSITION = "te.3.txt"
ROWS_PER_TEXT = 32
SHARD_TEXTS = 64
TRAIN = "unit_key = 'tokens' AND right(text_id, 1) <> '0'"  # the flow's rule: ids ending in 0 are held out
HELDOUT = "unit_key = 'tokens' AND right(text_id, 1) = '0'"
KS = tuple(range(-4, 3))
LRS = (1e-3, 3e-3, 1e-2)
EVAL_EVERY = 20


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


# --- (a) SAE training ---------------------------------------------------------------------------------------


def build(root: Path, rows: int, dim: int) -> float:
    """A token unit of ``rows`` float16 rows: texts of 32 rows, shards of 64 texts; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    n_texts = -(-rows // ROWS_PER_TEXT)
    texts = [f"t{i:06d}" for i in range(n_texts)]
    with Store(root) as store:
        store.register_model("bench", "bench", "target", SPEC, dim)
        unit = store.create_unit(
            "tokens", "bench", "bench", "h", texts, dim, SHARD_TEXTS, kind="tokens", position=POSITION, dtype="float16"
        )
        with store.transaction():  # one commit for the set-up; what is measured is training
            for shard, lo in enumerate(range(0, n_texts, SHARD_TEXTS)):
                mine = texts[lo : lo + SHARD_TEXTS]
                n = len(mine) * ROWS_PER_TEXT
                values = rng.standard_normal((n, dim), dtype=np.float32)
                coords = {
                    "position": np.full(n, POSITION),
                    "step": np.zeros(n, dtype=np.int64),
                    "token": np.tile(np.arange(ROWS_PER_TEXT), len(mine)),
                    "stream": np.full(n, "txt"),
                    "seed": np.full(n, 42),
                }
                ids = np.repeat(mine, ROWS_PER_TEXT).tolist()
                store.write_shard(unit, shard, ids, values, np.full(n, ROWS_PER_TEXT), np.zeros(n, bool), coords)
        if not store.finish_unit("tokens"):
            raise RuntimeError("the benchmark unit did not finish")
    return time.perf_counter() - t0


def _memory_batches(values: np.ndarray, batch: int, seed: int) -> Iterator[np.ndarray]:
    """Epochs of a seeded permutation of ``values``, one gather per batch (the last batch of an epoch may be short)."""
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(values))
        for lo in range(0, len(values), batch):
            yield values[order[lo : lo + batch]]
        epoch += 1


def child_train(mode: str, root: str, steps: int, batch: int, m: int, k: int) -> dict[str, Any]:
    """One measured SAE training in this (fresh) process."""
    _one_thread()
    import safeport.flows.safedig as flow
    from safeport.mappers.sae import SaeConfig, _saelens, train_sae

    _saelens()  # imports SAELens (seconds): not measured
    store = Store(root, read_only=True)
    dim = int(store.scalar("SELECT dim FROM units WHERE unit_key = 'tokens'") or 0)
    config = {"d": dim, "m": m, "k": k, "batch_size": batch, "n_tokens": steps * batch, "seed": 42}
    cfg = SaeConfig(**config, device="cpu")
    load = 0.0
    if mode == "memory":
        t = time.perf_counter()
        selection = store.sql(f"SELECT unit_key, shard, row FROM unit_rows WHERE {TRAIN}")
        values = store.read_rows(selection)
        load = time.perf_counter() - t
    base = reset_peak()
    t0 = time.perf_counter()
    if mode == "memory":
        trained = train_sae(_memory_batches(values, batch, 42), cfg)
        fvu = float(trained.curves.fvu[-1])
    elif mode == "stream":
        plan = store.stream_plan(TRAIN)
        trained = train_sae((b.values for b in plan.batches(batch_size=batch, seed=42, epochs=10**6)), cfg)
        fvu = float(trained.curves.fvu[-1])
    else:  # the flow's path: stream + checkpoints + held-out quality
        plans = store.stream_plan(TRAIN), store.stream_plan(HELDOUT)
        result = flow.train_position_sae(store.location.url, "bench", config, plans[0], plans[1], 1)
        fvu = float(result.curves["fvu"][-1])
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    store.close()
    return {
        "mode": mode,
        "seconds": seconds,
        "rows": steps * batch,
        "load": load,
        "fvu_last_batch": fvu,
        "growth": peak - base,
        "checkpoint_every": flow.CHECKPOINT_EVERY,
    }


# --- (b) the decoder refit -------------------------------------------------------------------------------------


def planted(rows: int, d: int, m: int, k: int, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    """(source SAE as SaeParams, target rows [rows, d] float32, a group key per row): see the module doc."""
    from safeport.mappers.latents import SaeParams

    rng = np.random.default_rng(seed)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    D = unit(rng.standard_normal((m, d)))
    moved = rng.random(m) < 0.25
    target = D.copy()
    target[moved] = unit(D[moved] + 0.75 * unit(rng.standard_normal((int(moved.sum()), d))))
    mu = 0.5 * rng.standard_normal(d)
    c = 3.0
    x = np.empty((rows, d), dtype=np.float32)
    for lo in range(0, rows, 4096):
        n = min(4096, rows - lo)
        idx = rng.integers(0, m, (n, k))
        vals = rng.exponential(1.0, (n, k)) + 0.5
        x[lo : lo + n] = c * (np.einsum("nk,nkd->nd", vals, target[idx]) + mu + 0.05 * rng.standard_normal((n, d)))
    sae = SaeParams(
        np.ascontiguousarray(D.T, dtype=np.float32), np.zeros(m, np.float32), D.astype(np.float32),
        mu.astype(np.float32), c, k,
    )  # fmt: skip
    return sae, x, np.arange(rows) // 256  # groups of 256 rows: a pair's tokens


def child_refit(rows: int, d: int, m: int, k: int) -> dict[str, Any]:
    _one_thread()
    from safeport.mappers.refit import RefitStats, refit_decoder

    sae, x, keys = planted(rows, d, m, k)
    t0 = time.perf_counter()
    stats = RefitStats(m, d)
    for lo in range(0, rows, 4096):
        z = sae.encode(x[lo : lo + 4096])
        stats.add(z, x[lo : lo + 4096] / sae.c, keys[lo : lo + 4096])
    t1 = time.perf_counter()
    refit = refit_decoder(stats, sae.W_dec, sae.b_dec, KS)
    t2 = time.perf_counter()
    return {
        "mode": "refit",
        "seconds": t2 - t0,
        "accumulate": t1 - t0,
        "solve": t2 - t1,
        "fvu": float(min(refit.fvus)),
        "fvu_source": float(refit.fvu_source),
        "k": int(refit.k),
        "fvus": [float(f) for f in refit.fvus],
        "n_train": int(refit.n_train),
        "n_heldout": int(refit.n_heldout),
    }


def child_adam(
    rows: int, d: int, m: int, k: int, lr: float, target: float, max_steps: int, max_s: float
) -> dict[str, Any]:
    """Adam on the decoder only until the held-out FVU reaches ``target`` (or a cap); evaluation is not timed."""
    _one_thread()
    import torch
    import torch.nn.functional as F

    from safeport.mappers.refit import heldout_mask

    sae, x, keys = planted(rows, d, m, k)
    t0 = time.perf_counter()
    idx = np.empty((rows, k), dtype=np.int64)
    val = np.empty((rows, k), dtype=np.float32)
    for lo in range(0, rows, 4096):  # the frozen encoder's codes, once (top-k: k indices and values a row)
        z = sae.encode(x[lo : lo + 4096])
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        idx[lo : lo + 4096], val[lo : lo + 4096] = top, np.take_along_axis(z, top, axis=1)
    encode = time.perf_counter() - t0
    held = heldout_mask(keys)
    scaled = x / np.float32(sae.c)
    it, vt, xt = (torch.from_numpy(np.ascontiguousarray(a[~held])) for a in (idx, val, scaled))
    ih, vh, xh = (torch.from_numpy(np.ascontiguousarray(a[held])) for a in (idx, val, scaled))
    spread = float(((xh - xh.mean(0)) ** 2).sum())
    W = torch.tensor(sae.W_dec, requires_grad=True)
    b = torch.tensor(sae.b_dec, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    gen = torch.Generator().manual_seed(0)

    def heldout_fvu() -> float:
        with torch.no_grad():
            out = F.embedding_bag(ih, W, per_sample_weights=vh, mode="sum") + b
            return float(((out - xh) ** 2).sum()) / spread

    trained, step, reached, near = 0.0, 0, None, None
    curve = [(0, 0.0, heldout_fvu())]
    while step < max_steps and trained < max_s and reached is None:
        order = torch.randperm(len(xt), generator=gen)
        for lo in range(0, len(xt) - 4095, 4096):
            t = time.perf_counter()
            sel = order[lo : lo + 4096]
            rows_x = xt[sel]
            out = F.embedding_bag(it[sel], W, per_sample_weights=vt[sel], mode="sum") + b
            loss = ((out - rows_x) ** 2).sum() / ((rows_x - rows_x.mean(0)) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            trained += time.perf_counter() - t
            step += 1
            if step % EVAL_EVERY == 0:
                f = heldout_fvu()
                curve.append((step, trained, f))
                if near is None and f <= target * 1.01:
                    near = (step, trained)
                if f <= target:
                    reached = (step, trained)
                    break
            if step >= max_steps or trained >= max_s:
                break
    return {
        "mode": "adam",
        "lr": lr,
        "encode": encode,
        "steps": step,
        "trained": trained,
        "best": min(f for _, _, f in curve),
        "last": curve[-1][2],
        "reached": reached,
        "near": near,
        "target": target,
    }


# --- the parent ---------------------------------------------------------------------------------------------


def run_child(*argv: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{argv[:2]} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)
    return result


def plans() -> list[tuple[str, str]]:
    """(command, its output) of the paper-size plans; offline, nothing is loaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "ERROR"}
    out = []
    for argv in (
        ["capture", "--profile", "paper", "--plan", "--gpus", "8"],
        ["safedig", "--profile", "paper", "--plan"],
    ):
        cmd = [str(REPO / ".venv" / "bin" / "safeport"), *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=REPO)
        text = done.stdout.strip() if done.returncode == 0 else f"(exit {done.returncode}) {done.stderr.strip()[-800:]}"
        out.append(("safeport " + " ".join(argv), text))
    return out


def section(args: argparse.Namespace) -> list[str]:
    load_before = os.getloadavg()[0]
    train_runs: dict[str, list[dict[str, Any]]] = {"stream": [], "memory": [], "flow": []}
    with tempfile.TemporaryDirectory(prefix="safeport-bench-safedig-") as d:
        root = Path(d)
        built = build(root, args.rows, args.dim)
        with Store(root, read_only=True) as store:
            n_train = int(store.scalar(f"SELECT count(*) FROM unit_rows WHERE {TRAIN}") or 0)
        for _ in range(args.rounds):  # alternate, so a busy spell on the shared machine hits every path
            for mode in train_runs:
                argv = ["--child", mode, "--root", str(root), "--steps", str(args.steps), "--m", str(args.m)]
                train_runs[mode].append(run_child(*argv, "--batch", str(args.batch), "--k", str(args.k)))
                shutil.rmtree(root / "arrays.zarr" / "sae_checkpoints", ignore_errors=True)  # next flow run: afresh
        disk = sum(f.stat().st_size for f in (root / "arrays.zarr").rglob("*") if f.is_file())
    load_mid = os.getloadavg()[0]
    sizes = ["--rows", str(args.refit_rows), "--dim", str(args.dim), "--m", str(args.m), "--k", str(args.k)]
    refits: list[dict[str, Any]] = []
    adams: dict[float, list[dict[str, Any]]] = {lr: [] for lr in LRS}
    for _ in range(args.rounds):
        refits.append(run_child("--child", "refit", *sizes))
    target = refits[0]["fvu"]
    for _ in range(args.adam_rounds):
        for lr in LRS:
            caps = ["--lr", str(lr), "--target", repr(target), "--max-steps", str(args.max_steps)]
            adams[lr].append(run_child("--child", "adam", *sizes, *caps, "--max-s", str(args.max_s)))
    load_after = os.getloadavg()[0]
    quoted = plans() if not args.quick else []

    best = {mode: min(r, key=lambda x: x["seconds"]) for mode, r in train_runs.items()}
    rate = {mode: r["rows"] / r["seconds"] for mode, r in best.items()}
    ratio = rate["stream"] / rate["memory"]
    ratio_flow = rate["flow"] / rate["memory"]
    met = "met" if ratio >= GOAL else "not met"
    mib = 2**20
    every = best["flow"]["checkpoint_every"]
    labels = {
        "stream": "stream (`StreamPlan.batches` → `train_sae`)",
        "memory": "in-memory (one array, permute, gather per batch → `train_sae`)",
        "flow": f"flow (`train_position_sae`: stream + checkpoint every {every} steps + held-out quality)",
    }
    table = [
        f"| path | seconds (best of {args.rounds}) | rows/s | vs in-memory | peak RSS growth | last-batch FVU |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("stream", "memory", "flow"):
        r = best[mode]
        table.append(
            f"| {labels[mode]} | {r['seconds']:.1f} | {rate[mode]:,.0f} | {rate[mode] / rate['memory']:.2f}x | "
            f"{r['growth'] / mib:,.0f} MiB | {r['fvu_last_batch']:.3f} |"
        )
    all_times = "; ".join(f"{m} " + ", ".join(f"{x['seconds']:.1f}" for x in r) for m, r in train_runs.items())

    refit = min(refits, key=lambda x: x["seconds"])
    refit_table = [
        "| path | seconds | held-out FVU reached | steps | note |",
        "|---|---|---|---|---|",
        f"| closed-form refit (accumulate {refit['accumulate']:.1f} s incl. encoding + solve {refit['solve']:.1f} s, "
        f"best of {args.rounds}) | {refit['seconds']:.1f} | {refit['fvu']:.4f} (λ at k = {refit['k']:+d}) | – | "
        f"source decoder: {refit['fvu_source']:.4f} |",
    ]
    fastest: float | None = None
    for lr in LRS:
        r = min(adams[lr], key=lambda x: x["trained"])
        reached = r["reached"]
        near = r["near"]
        if reached is not None:
            total = r["encode"] + reached[1]
            fastest = total if fastest is None else min(fastest, total)
            what = f"reached {r['target']:.4f} at step {reached[0]}"
            secs = f"{total:.1f}"
        else:
            what = f"not reached ({r['steps']} steps, {r['trained']:.0f} s of training: the cap)"
            secs = f"> {r['encode'] + r['trained']:.1f}"
        near_txt = f"within 1 % after {r['encode'] + near[1]:.1f} s" if near is not None else "never within 1 %"
        refit_table.append(
            f"| Adam on the decoder, lr {lr:g} (encode {r['encode']:.1f} s + training) | {secs} | "
            f"best {r['best']:.4f} | {r['steps']} | {what}; {near_txt} |"
        )
    if fastest is not None:
        refit_verdict = f"the closed form is **{fastest / refit['seconds']:.1f}x** faster than the fastest Adam run"
    else:
        best_adam = min(min(x["best"] for x in v) for v in adams.values())
        refit_verdict = (
            f"no Adam run reached the closed form's held-out FVU within its cap (best {best_adam:.4f} vs "
            f"{refit['fvu']:.4f}), each after more time than the closed form's {refit['seconds']:.1f} s"
        )

    lines = [
        f"## 12. {TITLE}",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores shared with other "
        f"engineers' work (load average {load_before:.1f} before, {load_mid:.1f} after (a), {load_after:.1f} after "
        f"(b)), Python {platform.python_version()}, one torch thread per run, local disk, CPU only.",
        "",
        "### (a) SAE training: streamed from the store vs from memory",
        "",
        f"One token unit of {args.rows:,} rows x {args.dim} stored float16 ({disk / mib:,.0f} MiB of Zarr chunks), "
        f"shards of {SHARD_TEXTS} texts x {ROWS_PER_TEXT} rows; the training selection (text ids not ending in 0) "
        f"is {n_train:,} rows. SAE m = {args.m}, k = {args.k}, batch {args.batch:,}, {args.steps} steps "
        f"({args.steps * args.batch:,} training rows, {args.steps * args.batch / n_train:.1f} epochs; c and b_dec "
        f"from the first 10⁵ rows). Each run in its own process; {args.rounds} alternating rounds, best kept (all: "
        f"{all_times} s). Store build, not timed: {built:.0f} s; the in-memory path's read of the rows, not timed: "
        f"{best['memory']['load']:.1f} s.",
        "",
        *table,
        "",
        f"Streamed vs in-memory training rows/s: **{ratio:.2f}x** (goal >= {GOAL}x: {met}). The flow's own path "
        f"(checkpoints and the held-out pass included): {ratio_flow:.2f}x.",
        "",
        "### (b) Decoder refit: closed form vs an iterative fine-tune",
        "",
        f"Planted dictionary (module docstring of the script): {args.refit_rows:,} target rows, d = {args.dim}, "
        f"m = {args.m}, k = {args.k}; {refit['n_train']:,} train and {refit['n_heldout']:,} held-out rows (by a "
        f"hash of groups of 256 rows). Held-out FVU per λ: "
        + ", ".join(f"k={k:+d}: {f:.4f}" for k, f in zip(KS, refit["fvus"], strict=True))
        + f". Adam: batches of 4,096, held-out FVU every {EVAL_EVERY} steps (not timed), capped at "
        f"{args.max_steps} steps or {args.max_s:.0f} s of training, best of {args.adam_rounds} round(s) per rate.",
        "",
        *refit_table,
        "",
        f"Result: {refit_verdict}. The closed form also gives the whole λ grid and the exact λ → ∞ baseline from one "
        "eigendecomposition, and no learning rate to tune.",
        "",
    ]
    if quoted:
        lines += ["### (c) Paper size (plans; no model loaded)", ""]
        for cmd, text in quoted:
            lines += [f"`{cmd}`:", "", "```", text, "```", ""]
    lines += [
        "Command: `.venv/bin/python bench/bench_safedig.py --write` (`--quick` for a smoke check).",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--m", type=int, default=1536)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refit-rows", type=int, default=65_536)
    parser.add_argument("--adam-rounds", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--max-s", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke check")
    parser.add_argument("--write", action="store_true", help="put the section at the end of BENCHMARKS.md")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--child", choices=("stream", "memory", "flow", "refit", "adam"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("stream", "memory", "flow"):
        print(json.dumps(child_train(args.child, args.root, args.steps, args.batch, args.m, args.k)))
        return
    if args.child == "refit":
        print(json.dumps(child_refit(args.rows, args.dim, args.m, args.k)))
        return
    if args.child == "adam":
        result = child_adam(args.rows, args.dim, args.m, args.k, args.lr, args.target, args.max_steps, args.max_s)
        print(json.dumps(result))
        return
    if args.quick:
        args.rows, args.steps, args.rounds, args.refit_rows, args.max_steps, args.max_s = 20_000, 6, 1, 8192, 60, 10
    lines = section(args)
    print("\n".join(lines))
    if args.write:
        replace_section(Path(args.out), f"## 12. {TITLE}", lines)


if __name__ == "__main__":
    main()
