"""Benchmark (issue 24): the per-step overhead of SafeDIG steering hooks vs an unsteered pipeline call.

    .venv/bin/python bench/bench_steering.py            # prints the section
    .venv/bin/python bench/bench_steering.py --write    # ... and puts it at the end of BENCHMARKS.md
    .venv/bin/python bench/bench_steering.py --quick    # 2 rounds, 4 steps: a smoke check, not figures to keep

What is timed: the denoising loop of one pipeline call (``output_type="latent"``: no VAE decode;
the prompt is encoded once beforehand, so no text encoder either), unsteered vs under
``safedig_hooks`` with a bundle of 3 routed DiT positions (every step, conditional branch, s = 1),
side by side in one process, alternating in every round, best of the rounds kept (the machine is
shared). Per step = call time / steps. ``edit_tokens`` alone (the same streams, the same 3 positions,
no hooks) is timed too, to split the overhead into the encoder math and the hook machinery.

Bundles are built in memory at the tiny profile's relative size (m = 4·d, k = 8, |H| = 4; W_enc =
W_decᵀ with unit rows, c and b_dec from the pipeline's own streams) and calibrated by
:class:`SafeLevelAccumulator` on the unsteered streams of other prompts (τ_lo / τ_hi = the 95th / 99.5th
percentile, as §7), so a realistic few percent of the tokens are edited. The pipelines are the
random-weight tiny ones of tests/tiny_pipelines.py with enough blocks for 3 DiT positions.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import replace_section  # noqa: E402
from safeport.eval.safedig import (  # noqa: E402
    SafeDigBundle,
    SafeDigPosition,
    SafeLevelAccumulator,
    edit_tokens,
    harm,
    safedig_hooks,
)
from safeport.eval.steering import steered_embeds  # noqa: E402
from safeport.extractors.capture import position_hooks  # noqa: E402
from safeport.extractors.positions import Position  # noqa: E402
from safeport.mappers.latents import SaeParams  # noqa: E402
from tests.tiny_pipelines import build_flux, build_sd3  # noqa: E402

SECTION = "## 13. SafeDIG steering hooks (issue 24)"
GOAL = 0.15  # hooks may add at most this fraction to a denoising step
EXPANSION, K, N_HARMFUL = 4, 8, 4
PROMPT = "a watercolor of mountains at dawn"
CALIBRATION_PROMPTS = ["a cat on a red sofa", "two dogs running on a beach", "a city street at night in the rain"]
MSL = 24


@dataclass(frozen=True)
class Setup:
    """One tiny pipeline, its 3 routed positions and its call settings."""

    family: str
    build: Callable[[], Any]
    blocks: str
    positions: tuple[str, str, str]
    size: int
    image_tokens: int  # per position, per step, conditional branch
    call: dict[str, Any]


SETUPS = (
    Setup(
        "flux",
        lambda: build_flux(num_layers=2, num_single_layers=2),
        "2 double + 2 single blocks",
        ("double.1.img", "single.0.img", "single.1.img"),
        64,
        (64 // 2) ** 2,  # Flux packs 2x2 latents; the tiny VAE does not downsample
        {},  # Flux.1-dev: guidance-distilled, one transformer call per step
    ),
    Setup(
        "sd3",
        lambda: build_sd3(num_layers=3),
        "3 joint blocks",
        ("double.0.img", "double.1.img", "double.2.img"),
        32,
        32**2,  # patch 1
        {"guidance_scale": 4.5},  # CFG batches [uncond; cond]: the hooks edit the conditional half
    ),
)

# Flux.1-Dev at 1024², the paper's generation setting (the estimate, not measured here).
FLUX_D, FLUX_M, FLUX_K = 3072, 8 * 3072, 32
FLUX_PARAMS = 12e9
FLUX_IMG, FLUX_TXT, FLUX_STEPS, FLUX_BLOCKS = 4096, 512, 28, 19 + 38
ROUTED = 3
# Assumed achieved H100 rates (not measured): bfloat16 transformer ~45 % of 989 dense TFLOP/s; float32 matmul
# without TF32 (PyTorch's default) ~50 of 67; TF32 tensor cores ~350 of 495.
BF16_RATE, FP32_RATE, TF32_RATE = 450e12, 50e12, 350e12


def _streams(pipe: Any, positions: tuple[str, ...], prompts: list[str], call: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every token of ``positions`` in an unsteered generation of ``prompts`` (conditional branch, all steps)."""
    seen: dict[str, list[np.ndarray]] = {p: [] for p in positions}

    def record(position: Position, step: int, tensor: torch.Tensor) -> None:
        seen[position.name].append(tensor.detach().reshape(-1, tensor.shape[-1]).float().numpy().copy())

    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    with position_hooks(pipe, positions, record):
        pipe(prompt=prompts, generator=gens, output_type="latent", **call)
    return {p: np.concatenate(v) for p, v in seen.items()}


def bundle(pipe: Any, setup: Setup, call: dict[str, Any]) -> SafeDigBundle:
    """3 positions at the tiny profile's sizes, calibrated at §7's percentiles on other prompts' streams."""
    streams = _streams(pipe, setup.positions, CALIBRATION_PROMPTS, call)
    positions = []
    for seed, (name, x) in enumerate(streams.items()):
        rng = np.random.default_rng(seed)
        d = x.shape[1]
        m = EXPANSION * d
        c = float(np.linalg.norm(x, axis=1).mean() / math.sqrt(d))
        w_dec = rng.standard_normal((m, d))
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        sae = SaeParams(
            W_enc=w_dec.T.astype(np.float32),
            b_enc=np.zeros(m, np.float32),
            W_dec=w_dec.astype(np.float32),
            b_dec=(x / c).mean(axis=0).astype(np.float32),
            c=c,
            k=K,
        )
        z = sae.encode(x)
        harmful = tuple(int(j) for j in np.argsort(-(z > 0).mean(axis=0), kind="stable")[:N_HARMFUL])
        acc = SafeLevelAccumulator(harmful, sae.W_dec, c)
        acc.add(z)
        positions.append(SafeDigPosition(name, sae, harmful, sae.W_dec, acc.finish()))  # §7's 95th / 99.5th
    return SafeDigBundle(f"bench:{setup.family}", setup.family, "none", tuple(positions), {})


def _edited_fraction(pipe: Any, b: SafeDigBundle, kwargs: dict[str, Any], call: dict[str, Any]) -> float:
    """Share of the routed positions' conditional tokens that the hooks change, over one steered call."""
    counts = [0, 0]
    by_name = {p.position: p for p in b.positions}

    def count(position: Position, step: int, tensor: torch.Tensor) -> None:
        p = by_name[position.name]
        h, _ = harm(p.sae.encode(tensor.detach().reshape(-1, tensor.shape[-1]).float().numpy()), p.harmful,
                    p.decoder, p.sae.c)  # fmt: skip
        counts[0] += int((h > p.calibration.tau_lo).sum())
        counts[1] += int(h.size)

    with position_hooks(pipe, b.names, count):
        pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **call)
    return counts[0] / max(counts[1], 1)


def measure(setup: Setup, steps: int, rounds: int, calls: int) -> dict[str, Any]:
    """Best-of-rounds seconds per step, unsteered and hooked, and of the edit math alone."""
    pipe = setup.build()
    pipe.set_progress_bar_config(disable=True)
    call = {"height": setup.size, "width": setup.size, "num_inference_steps": steps, "max_sequence_length": MSL,
            **setup.call}  # fmt: skip
    b = bundle(pipe, setup, call).routed()
    with torch.no_grad():
        kwargs = steered_embeds(pipe, PROMPT, np.zeros(1, np.float32), 0.0, max_sequence_length=MSL, unsteered=True)
    recorded = {name: x[: setup.image_tokens] for name, x in _streams(pipe, setup.positions, [PROMPT], call).items()}
    params = {p.position: p.params() for p in b.positions}
    streams = {name: torch.from_numpy(x).unsqueeze(0) for name, x in recorded.items()}  # one step's [1, T, d]

    def plain() -> None:
        for _ in range(calls):
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **call)

    def hooked() -> None:
        with safedig_hooks(pipe, b, 1.0):
            plain()

    def math_only() -> None:
        for _ in range(calls * steps):
            for name, x in streams.items():
                edit_tokens(x, params[name], 1.0)

    runs: dict[str, list[float]] = {"plain": [], "hooked": [], "math": []}
    fns = {"plain": plain, "hooked": hooked, "math": math_only}
    with torch.no_grad():
        for fn in fns.values():  # warm-up: kernels, allocator, the scheduler's first set-up
            fn()
        for r in range(rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate, so a busy spell hits all
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                runs[name].append((time.perf_counter() - t0) / (calls * steps))
        edited = _edited_fraction(pipe, b, kwargs, call)
    best = {name: min(r) for name, r in runs.items()}
    return {"setup": setup, "best": best, "runs": runs, "edited": edited, "d": b.positions[0].sae.dim}


def gpu_estimate() -> dict[str, float]:
    """FLOPs of the SAE encoder at 3 routed positions vs the transformer's own, Flux.1-Dev at 1024², 28 steps."""
    tokens = FLUX_IMG + FLUX_TXT
    encoder = 2 * FLUX_D * FLUX_M  # per token per position
    hooks_step = encoder * tokens * ROUTED
    linear_step = 2 * FLUX_PARAMS * tokens
    attention_step = FLUX_BLOCKS * 4 * tokens**2 * FLUX_D  # QKᵀ and AV, 2·L²·d each, per block
    return {
        "encoder": encoder,
        "hooks_step": hooks_step,
        "hooks_run": hooks_step * FLUX_STEPS,
        "linear_step": linear_step,
        "linear_run": linear_step * FLUX_STEPS,
        "ratio": hooks_step / linear_step,
        "ratio_attention": hooks_step / (linear_step + attention_step),
        "ratio_img": encoder * FLUX_IMG * ROUTED / linear_step,
        "step_ms": (linear_step + attention_step) / BF16_RATE * 1e3,
        "fp32_ms": hooks_step / FP32_RATE * 1e3,
        "tf32_ms": hooks_step / TF32_RATE * 1e3,
    }


def section(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = [measure(s, args.steps, args.rounds, args.calls) for s in SETUPS]
    load_after = os.getloadavg()[0]
    table = [
        "| pipeline | tokens edited per position and step | unsteered ms/step | hooked ms/step | overhead | "
        "of which `edit_tokens` | tokens past τ_lo |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for r in results:
        s, best = r["setup"], r["best"]
        overhead = best["hooked"] / best["plain"] - 1
        verdicts.append(overhead <= GOAL)
        cfg = f", CFG {s.call['guidance_scale']}" if "guidance_scale" in s.call else ""
        table.append(
            f"| tiny {s.family} ({s.blocks}, d = {r['d']}, {s.size}x{s.size}{cfg}; {', '.join(s.positions)}) | "
            f"{s.image_tokens:,} | {best['plain'] * 1e3:.2f} | {best['hooked'] * 1e3:.2f} | **{overhead:+.1%}** | "
            f"{best['math'] * 1e3:.2f} ms ({best['math'] / best['plain']:.1%}) | {r['edited']:.1%} |"
        )
    g = gpu_estimate()
    all_runs = "; ".join(
        f"{r['setup'].family}: unsteered {', '.join(f'{t * 1e3:.2f}' for t in r['runs']['plain'])}, hooked "
        f"{', '.join(f'{t * 1e3:.2f}' for t in r['runs']['hooked'])} ms/step"
        for r in results
    )
    met = "met" if all(verdicts) else "not met"
    return [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
        f"engineers' work (load average {load_before:.1f} before, {load_after:.1f} after), Python "
        f"{platform.python_version()}, torch {torch.__version__} CPU, {args.threads} torch thread(s), no GPU.",
        "",
        f"One prompt, {args.steps} denoising steps, prompt encoded once beforehand, no VAE decode "
        f'(`output_type="latent"`); unsteered vs under `safedig_hooks` with 3 routed DiT positions, s = 1, '
        f"every step. {args.calls} calls per timing, {args.rounds} alternating rounds, best kept (all: {all_runs}). "
        f"In-memory bundles at the tiny profile's relative size (m = {EXPANSION}·d, k = {K}, |H| = {N_HARMFUL}), "
        "calibrated on other prompts' unsteered streams at the 95th / 99.5th percentile (§7). `edit_tokens` = the "
        "same edit on the same streams without hooks or a pipeline (the encoder matmul, top-k, the select).",
        "",
        *table,
        "",
        f"Goal (hooks add <= {GOAL:.0%} to a denoising step on the tiny pipelines at 3 routed positions): **{met}**. "
        "On these pipelines an m = 4·d encoder at 3 positions is no small part of the model: 2·d·4d = 8d² FLOPs a "
        "token per position against about 24d² for a whole block (attention projections 8d², MLP 16d²), and the "
        "tiny matmuls are dominated by per-op overhead, which the hooks' own handful of ops per position adds to.",
        "",
        "**Flux.1-Dev estimate (GPU, not measured: no GPU in this session).** d = 3,072, m = 8·d = 24,576, k = 32, "
        f"1024x1024: {FLUX_IMG:,} image + {FLUX_TXT} text tokens a step, every token of every step edited, "
        f"{ROUTED} routed positions, {FLUX_STEPS} steps, one transformer call a step (guidance-distilled).",
        "",
        f"- SAE encoder per token per position: 2·d·m = 2 x 3,072 x 24,576 = {g['encoder'] / 1e6:,.0f} MFLOP.",
        f"- Hooks per step: 2·d·m x {FLUX_IMG + FLUX_TXT:,} tokens x {ROUTED} = {g['hooks_step'] / 1e12:.2f} TFLOP; "
        f"per image ({FLUX_STEPS} steps): {g['hooks_run'] / 1e12:.1f} TFLOP.",
        f"- Transformer per step: 2 x 12·10⁹ parameters x {FLUX_IMG + FLUX_TXT:,} tokens = "
        f"{g['linear_step'] / 1e12:.0f} TFLOP; per image: {g['linear_run'] / 1e15:.2f} PFLOP.",
        f"- Ratio = (2·d·m · tokens · 3 · 28) / (2 · 12·10⁹ · tokens · 28) = 3·2·d·m / (2·12·10⁹) = "
        f"**{g['ratio']:.2%}** ({g['ratio_attention']:.2%} counting attention's 4·L²·d per block, "
        f"{g['ratio_img']:.2%} if all 3 positions are image streams, 4,096 tokens). The decoder side "
        "(u = c·z_H W′_H, |H| = 16 rows) and the select are O(|H|·d) a token: negligible.",
        f"- Caveat: `edit_tokens` runs the encoder in float32 while the transformer runs in bfloat16. Assuming "
        f"~{BF16_RATE / 1e12:.0f} TFLOP/s achieved for the transformer (a ~{g['step_ms'] / 1e3:.2f} s step), the "
        f"encoder matmul at ~{FP32_RATE / 1e12:.0f} TFLOP/s (H100 float32 without TF32, PyTorch's default) takes "
        f"~{g['fp32_ms']:.0f} ms a step = **{g['fp32_ms'] / g['step_ms']:.0%}** of it, not "
        f"{g['ratio']:.0%}; with TF32 allowed (`torch.backends.cuda.matmul.allow_tf32 = True`, ~"
        f"{TF32_RATE / 1e12:.0f} TFLOP/s) ~{g['tf32_ms']:.0f} ms = {g['tf32_ms'] / g['step_ms']:.1%}. The "
        "pre-activations are 4,608 x 24,576 float32 = 453 MB per position (transient) and `topk` over them is "
        "memory-bound (a few ms). So the 15 % goal holds on a GPU by FLOPs, and in time only with TF32 (or a "
        "bfloat16 encoder); to be measured on a GPU before a paper-scale run.",
        "",
        "Command: `.venv/bin/python bench/bench_steering.py --write`.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="pipeline calls per timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 steps: a smoke check, not figures to keep")
    parser.add_argument("--write", action="store_true", help="put the section at the end of BENCHMARKS.md")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.calls = 2, 4, 1
    lines = section(args)
    print("\n".join(lines))
    if args.write:
        replace_section(Path(args.out), SECTION, lines)


if __name__ == "__main__":
    main()
