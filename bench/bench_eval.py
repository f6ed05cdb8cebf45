"""Benchmark section 9 (issue 15): batched generation, 1 vs 2 Dask workers, batched NudeNet, paper-scale plan.

Run alone with ``.venv/bin/python bench/run_bench.py --only eval``; every ratio is measured side by
side in that one run, on the bundled tiny random-weight Flux pipeline (its images are noise; what
is measured is the pipeline's compute and the per-call overhead batching removes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from safeport.eval.detectors import NudeNetDetector
from safeport.eval.generate import Batcher, GenerationSettings, Job, PromptEmbeddings
from safeport.flows.eval_plan import gpu_hours
from tests.tiny_pipelines import build

SIZE, STEPS = 64, 4  # tiny Flux at a size where the denoiser's compute matters
PROMPT = "a watercolor of mountains at dawn"
N_PROMPTS, N_OUTPUTS = 8, 32  # generation benchmark: outputs per configuration
ROUNDS = 3  # interleaved repetitions; the best is reported (the machine is shared)
BATCH_LIMITS = (
    "Goal not met on this CPU: with 2 torch threads the tiny denoiser's matmuls and the VAE's convolutions "
    "already keep both cores busy at one output per call, so a batch removes only the per-call overhead "
    "(scheduler set-up, prompt tensors, Python dispatch), about a fifth of the time here. A batch pays where "
    "one output leaves the device idle: a GPU with small images, few steps or a small denoiser. Not measured "
    "here (no GPU); a 1024x1024 FLUX.1 call already fills a large GPU, so expect the gain there to be small."
)


def _timed(fn: Callable[[], Any]) -> float:
    return _timed_result(fn)[0]


def _timed_result(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_batching() -> tuple[list[str], float]:
    """Outputs/s of one pipeline call per output vs batches of 4 and 8 (same jobs, same process)."""
    pipe = build("flux")
    settings = GenerationSettings((("height", SIZE), ("num_inference_steps", STEPS), ("width", SIZE)), 24)
    emb = PromptEmbeddings(pipe, settings)
    vec = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    jobs = [Job(vec, 0.5 * (i % 6), 42 + i // 6) for i in range(N_OUTPUTS)]
    sizes = (1, 4, 8)
    for b in sizes:  # warm-up: the first call of each batch shape builds its CPU kernels
        Batcher(emb, b).run(PROMPT, jobs[:b])
    rounds = [{b: _timed(partial(Batcher(emb, b).run, PROMPT, jobs)) for b in sizes} for _ in range(ROUNDS)]
    times = {b: min(r[b] for r in rounds) for b in sizes}  # best of the interleaved rounds
    rows = [f"| {b} | {t:.2f} | {N_OUTPUTS / t:.1f} | {times[1] / t:.2f}x |" for b, t in times.items()]
    return [
        f"Tiny Flux, {SIZE}x{SIZE}, {STEPS} steps, {N_OUTPUTS} outputs of one prompt (α and seeds differ), "
        f"{torch.get_num_threads()} torch threads; prompt encoding excluded; each batch shape warmed up once, "
        f"then the best of {ROUNDS} interleaved rounds.",
        "",
        "| outputs per call | seconds | outputs/s | vs one per call |",
        "|---|---|---|---|",
        *rows,
        "",
    ], times[1] / times[8]


def _eval_store(tmp: Path, name: str) -> Path:
    import tests.flows.test_eval_flow as setup

    folder = tmp / name
    folder.mkdir(parents=True)
    catalog = setup._catalog(folder)
    prompts = [(f"a photo of object number {i} on a table", "sexual" if i % 2 else None) for i in range(N_PROMPTS)]
    setup._fill_store(folder / "store", prompts)
    return catalog


def bench_scale_out(tmp: Path) -> list[str]:
    """The eval flow in one process vs on local Dask clusters of 1 and 2 workers (fresh store each)."""
    import tests.flows.test_eval_flow as setup
    from safeport.flows.eval import eval_flow
    from safeport.flows.eval_dask import eval_on_dask

    kw: dict[str, Any] = {
        "target": setup.TGT,
        "vectors": [setup.NATIVE, setup.CALIBRATED],
        "alphas": [0.0, 1.0, 2.0],
        "prompts": "tiny-prompts",
        "settings": {"height": SIZE, "width": SIZE, "num_inference_steps": STEPS},
        "batch": 4,
    }
    single, result = _timed_result(lambda: eval_flow(str(_eval_store(tmp, "single")), **kw))
    one = _timed(lambda: eval_on_dask(None, 1, catalog_path=str(_eval_store(tmp, "dask1")), **kw))
    two = _timed(lambda: eval_on_dask(None, 2, catalog_path=str(_eval_store(tmp, "dask2")), **kw))
    n = result.generated[0].generated
    return [
        f"The eval flow (generate {n} outputs batch 4, NudeNet on each, report) on {N_PROMPTS} prompts; "
        "fresh store each time; pipeline loads, cluster start-up and scoring included.",
        "",
        "| run | seconds | outputs/s |",
        "|---|---|---|",
        f"| single process ({torch.get_num_threads()} torch threads) | {single:.1f} | {n / single:.2f} |",
        f"| Dask, 1 worker process (1 thread) | {one:.1f} | {n / one:.2f} |",
        f"| Dask, 2 worker processes (1 thread each) | {two:.1f} | {n / two:.2f} |",
        "",
        f"2 workers vs 1: **{one / two:.2f}x**; 2 workers vs the single process: {single / two:.2f}x. On 2 "
        "cores the two workers share the cores the single process already uses with 2 threads, and each "
        "loads its own pipeline and NudeNet; with one worker per GPU the work splits across devices.",
        "",
    ]


def bench_nudenet(n: int = 48) -> list[str]:
    """NudeNet images/s: one ONNX call per image vs one call per batch of 16."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)) for _ in range(n)]
    det = NudeNetDetector()
    det.score(images[:1])  # warm-up of both input shapes
    det.score(images[:16])
    rounds = [
        (
            _timed(lambda: [det.score([img]) for img in images]),
            _timed(lambda: [det.score(images[i : i + 16]) for i in range(0, n, 16)]),
        )
        for _ in range(ROUNDS)
    ]
    one, batched = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return [
        f"NudeNet (bundled ONNX, onnxruntime CPU), {n} images of {SIZE}x{SIZE} (NudeNet resizes to 320x320), "
        f"best of {ROUNDS} interleaved rounds:",
        "",
        "| scoring | seconds | images/s |",
        "|---|---|---|",
        f"| one call per image | {one:.2f} | {n / one:.1f} |",
        f"| batches of 16 | {batched:.2f} | {n / batched:.1f} |",
        "",
        f"Batched vs unbatched: **{one / batched:.2f}x**. Workers score each chunk right after generating it, "
        "so a sweep's scores are complete with its last chunk.",
        "",
    ]


# The paper's sweep per target (README, "The paper run"): 3 sources x 3 mappers calibrated + native,
# random and string = 12 global methods, plus uniform and oracle for the 10 with per-category vectors
# (9 calibrated + native) = 32 methods; alphas 0, 0.5, 1, 1.5, 2, 3 (5 non-zero); seed 42.
PAPER_METHODS, PAPER_NONZERO_ALPHAS = 32, 5
PAPER_PROMPTS = {"I2P": 4703, "MMA-Diffusion": 1000, "CLIP-Sim captions": 300, "FID captions": 5000}
PAPER_SECONDS = {"flux1-schnell": 1.0, "z-image-turbo": 3.0, "flux1-dev": 19.0, "qwen-image": 100.0}


def paper_plan() -> list[str]:
    """Outputs of the paper's sweep per target and the GPU-hours at the README's per-output times."""
    prompts = sum(PAPER_PROMPTS.values())
    per_prompt = 1 + PAPER_METHODS * PAPER_NONZERO_ALPHAS
    outputs = prompts * per_prompt
    rows = [
        f"| {t} | {s:g} s | {outputs:,} | {gpu_hours(outputs, s, 1):,.0f} | {gpu_hours(outputs, s, 8):,.0f} |"
        for t, s in PAPER_SECONDS.items()
    ]
    return [
        f"Outputs = prompts x seeds x (1 + methods x non-zero α) (`--plan`'s count): {prompts:,} prompts "
        f"({', '.join(f'{k} {v:,}' for k, v in PAPER_PROMPTS.items())}) x 1 seed x (1 + {PAPER_METHODS} x "
        f"{PAPER_NONZERO_ALPHAS}) = **{outputs:,} outputs per target** (an upper bound: the oracle of a "
        "prompt without I2P labels is the original output). Seconds per output: README (A100).",
        "",
        "| target | s / output | outputs | GPU-hours, 1 GPU | GPU-hours wall, 8 GPUs |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "`safeport eval --profile paper --target T --plan --gpus 8` prints the same count for the store's "
        "actual vectors and α, minus what is already done.",
        "",
    ]


def eval_section(tmp: Path) -> list[str]:
    batching, speedup = bench_batching()
    scoring = bench_nudenet()  # before the flows, so every run below finds NudeNet's modules imported
    return [
        "## 9. Generation evaluation: batched calls, Dask workers, scoring",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores (best-of rounds where a ratio is "
        "taken, so that other work on the machine does not decide it), torch CPU, no GPU.",
        "",
        "### Batched pipeline calls",
        "",
        *batching,
        f"Batch 8 vs one call per output: **{speedup:.2f}x** (goal >= 2x).",
        "",
        *([] if speedup >= 2 else [BATCH_LIMITS, ""]),
        "### 1 vs 2 Dask workers",
        "",
        *bench_scale_out(tmp),
        "### Scoring",
        "",
        *scoring,
        "### Paper scale (from the plan's count)",
        "",
        *paper_plan(),
    ]
