"""SafeDIG steering through the hooks on tiny Flux and SD3 pipelines (METHOD-SAFEDIG §7, issue 24).

The math of the edit has its known answers in test_safedig_math.py; here the same claims are checked
where they matter, on the streams a real pipeline call produces: the raw output of a hooked block (a
forward hook registered before the steering hooks) against what the rest of the model receives (one
registered after them), and on the generated images.

Bundles are built in memory from the pipeline's own unsteered streams (tests/safedig_bundles.py: an SAE
with W_enc = W_decᵀ and unit decoder rows, c = mean‖x‖/√d, b_dec = the mean, H = four latents that together
fire on most tokens, a refitted decoder near W_dec, ū from a real :class:`SafeLevelAccumulator`), with
thresholds planted where each test needs them: above every token's h, at the 30th / 70th percentile of the
positive h (every region populated), or at 0 (as the flow's demo bundles have them). The export test writes
such a bundle into a store with the store's own writers, exports it, and steers from the export in a process
where the store no longer exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safeport.api import export_safedig, load_safedig
from safeport.eval.safedig import (
    MODES,
    Mode,
    SafeDigBundle,
    harm,
    harm_torch,
    safedig_hooks,
)
from safeport.eval.steering import steer
from safeport.extractors.positions import resolve
from tests.conftest import REPO
from tests.eval.test_generate import BATCH_TOLERANCE
from tests.safedig_bundles import Taus, planted_position, store_bundle, streams
from tests.tiny_pipelines import TINY_SD3_OPTIONS, build

MSL = 24
CALL: dict[str, Any] = {"height": 16, "width": 16, "num_inference_steps": 2, "max_sequence_length": MSL}
# SD3 at guidance 2 batches [uncond; cond]: only the conditional half may change. Flux.1-dev runs one call a step.
GUIDANCE: dict[str, dict[str, Any]] = {"flux": {}, "sd3": {"guidance_scale": 2.0}}
FAMILIES = ("flux", "sd3")
# Three positions per bundle, a text-encoder one among them (edited in the encode pass) and DiT ones (every step).
POSITIONS = {"flux": ("te.0.txt", "double.0.img", "single.0.img"), "sd3": ("te.0.txt", "double.0.txt", "double.1.img")}
PROMPTS = ["a cat on a red sofa", "two dogs running on a beach", "a city street at night"]
SEEDS = [3, 11, 42]


# --- pipelines, streams and in-memory bundles ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    return {"flux": build("flux"), "sd3": build("sd3", **TINY_SD3_OPTIONS)}


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _call(family: str, seeds: list[int], **extra: Any) -> dict[str, Any]:
    return {**CALL, **GUIDANCE[family], "generator": _gens(seeds), "output_type": "np", **extra}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _hook_count(pipe: Any) -> int:
    """Forward and forward-pre hooks on every module of the transformer (its blocks too) and the text encoders."""
    total = 0
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            total += sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in component.modules())
    return total


def _bundle(pipe: Any, family: str, taus: Taus, positions: tuple[str, ...] | None = None) -> SafeDigBundle:
    names = positions or POSITIONS[family]
    seen = streams(pipe, names, PROMPTS, **_call(family, SEEDS, output_type="latent"))
    built = tuple(planted_position(p, seen[p], taus, seed) for seed, p in enumerate(names))
    return SafeDigBundle(f"safedig:tiny-{family}:Sexual", f"tiny-{family}", "Sexual", built, {"test": taus})


@pytest.fixture(scope="module")
def bundles(pipes: dict[str, Any]) -> Callable[[str, Taus], SafeDigBundle]:
    cache: dict[tuple[str, str], SafeDigBundle] = {}

    def get(family: str, taus: Taus) -> SafeDigBundle:
        if (family, taus) not in cache:
            cache[(family, taus)] = _bundle(pipes[family], family, taus)
        return cache[(family, taus)]

    return get


# --- the raw and the edited stream of every hooked block -------------------------------------------------------


Edits = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def _element(output: Any, element: int | None) -> torch.Tensor:
    t = output[element or 0] if isinstance(output, tuple) else output
    assert isinstance(t, torch.Tensor)
    return t.detach().clone()


def _edits(
    pipe: Any,
    family: str,
    bundle: SafeDigBundle,
    strength: float | list[float] = 1.0,
    mode: Mode = "safedig",
    steps: tuple[int, int] | None = None,
) -> Edits:
    """Per position, (raw block output, what the model goes on with) at every call, from one steered generation.

    The raw stream comes from a forward hook registered before :func:`safedig_hooks`, the edited one
    from a hook registered after them (forward hooks run in registration order, each seeing the
    output its predecessors returned).
    """
    sites = resolve(pipe, bundle.names)
    raw: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    edited: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def grab(into: dict[str, list[torch.Tensor]], name: str, element: int | None) -> Any:
        return lambda module, args, output: into[name].append(_element(output, element))

    handles = [s.module.register_forward_hook(grab(raw, s.name, s.element)) for s in sites]
    try:
        with safedig_hooks(pipe, bundle, strength, mode, steps):
            handles += [s.module.register_forward_hook(grab(edited, s.name, s.element)) for s in sites]
            pipe(prompt=PROMPTS, **_call(family, SEEDS, output_type="latent"))
    finally:
        for handle in handles:
            handle.remove()
    return {name: list(zip(raw[name], edited[name], strict=True)) for name in raw}


def _conditional(family: str, name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional part of one call's (raw, edited) stream; SD3's unconditional half must keep its bits."""
    if family == "sd3" and not name.startswith("te."):
        half = x.shape[0] // 2
        assert torch.equal(_bits(y[:half]), _bits(x[:half])), f"{name}: the unconditional half changed"
        return x[half:], y[half:]
    return x, y


def _changed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (_bits(x) != _bits(y)).any(dim=-1)


# --- 1. untouched tokens keep their bits -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_at_or_below_tau_lo_keep_their_bits_through_the_hooks(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str
) -> None:
    bundle = bundles(family, "mixed")
    params = {p.position: p.params() for p in bundle.positions}
    edits = _edits(pipes[family], family, bundle)
    edited_tokens = 0
    for name, calls in edits.items():
        assert calls, f"{name} was never called"
        p = params[name]
        for x, y in calls:
            xc, yc = _conditional(family, name, x, y)
            h, _ = harm_torch(xc.float(), p)
            low = h <= p.tau_lo
            changed = _changed(xc, yc)
            assert not (changed & low).any(), f"{name}: a token with h <= tau_lo lost its bits"
            assert torch.equal(changed, ~low), f"{name}: a token with h > tau_lo was not edited"
            edited_tokens += int((~low).sum())
    assert edited_tokens > 100  # the planted thresholds put many tokens above τ_lo: the test can fail


@pytest.mark.parametrize("family", FAMILIES)
def test_no_token_past_tau_lo_gives_the_unsteered_image_bit_for_bit(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str
) -> None:
    pipe = pipes[family]
    plain = pipe(prompt=PROMPTS[0], **_call(family, SEEDS[:1])).images
    above = steer(pipe, PROMPTS[0], safedig=bundles(family, "above"), strength=3.0, **_call(family, SEEDS[:1])).images
    assert np.array_equal(above.view(np.int32), plain.view(np.int32))
    # The same path with thresholds that some tokens pass does change the image: the hooks are live.
    mixed = steer(pipe, PROMPTS[0], safedig=bundles(family, "mixed"), strength=1.0, **_call(family, SEEDS[:1])).images
    assert not np.array_equal(mixed, plain)


# --- 2. Blend stops at the safe level, Repel at γ = 1 removes u, s = 0 is the identity ------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strength", [0.5, 3.0])
def test_blend_never_moves_a_real_token_past_the_safe_level(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str, strength: float
) -> None:
    bundle = bundles(family, "mixed")
    params = {p.position: p.params() for p in bundle.positions}
    checked = 0
    for name, calls in _edits(pipes[family], family, bundle, strength, mode="blend").items():
        p = params[name]
        for x, y in calls:
            xc, yc = _conditional(family, name, x, y)
            h, u = harm_torch(xc.float(), p)
            moved = h > p.tau_lo  # "blend" mode blends every token above τ_lo, with g = 1 above τ_hi
            v = (u - p.u_bar).double()[moved]  # from the token's harmful component to the safe level
            ok = v.norm(dim=-1) > 1e-3  # a token already at ū has no direction to move along
            if not ok.any():
                continue
            delta = (yc - xc).double()[moved][ok]
            v = v[ok]
            t = -(delta * v).sum(-1) / (v * v).sum(-1)  # how far along that segment the block's token moved
            g = ((h[moved][ok] - p.tau_lo) / (p.tau_hi - p.tau_lo)).double().clamp(max=1.0)
            torch.testing.assert_close(t, min(strength, 1.0) * g, rtol=1e-3, atol=1e-4)
            assert t.min() >= -1e-4 and t.max() <= 1 + 1e-4, f"{name}: a blended token moved past the safe level"
            off = delta + t[:, None] * v  # no component off the segment
            assert off.norm(dim=-1).max() <= 1e-4 * (1 + float(xc.abs().max()))
            checked += int(ok.sum())
    assert checked > 100


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["repel", "safedig"])
def test_repel_at_gamma_one_removes_exactly_u_from_the_block_output(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str, mode: Mode
) -> None:
    bundle = bundles(family, "mixed")
    by_name = {p.position: p for p in bundle.positions}
    repelled = 0
    for name, calls in _edits(pipes[family], family, bundle, 1.0, mode=mode).items():
        pos, p = by_name[name], by_name[name].params()
        for x, y in calls:
            xc, yc = _conditional(family, name, x, y)
            flat_x, flat_y = xc.reshape(-1, xc.shape[-1]), yc.reshape(-1, yc.shape[-1])
            h_t, _ = harm_torch(flat_x.float(), p)
            repel = h_t > p.tau_hi
            # u from the numpy encoder in float64, independent of the torch path the hooks run
            _, u = harm(pos.sae.encode(flat_x[repel].float().numpy()), pos.harmful, pos.decoder, pos.sae.c)
            got = (flat_y[repel] - flat_x[repel]).double().numpy()
            np.testing.assert_allclose(got, -u, rtol=1e-4, atol=1e-4 * (1 + float(flat_x.abs().max())))
            if mode == "repel":  # the Blend band and the low tokens are untouched
                assert torch.equal(_bits(flat_y[~repel]), _bits(flat_x[~repel]))
            repelled += int(repel.sum())
    assert repelled > 100


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_is_the_identity_on_the_image(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str
) -> None:
    pipe, bundle = pipes[family], bundles(family, "mixed")
    plain = pipe(prompt=PROMPTS[:2], **_call(family, SEEDS[:2])).images
    for mode in MODES:
        zero = steer(pipe, PROMPTS[:2], safedig=bundle, strength=0.0, mode=mode, **_call(family, SEEDS[:2])).images
        assert np.array_equal(zero.view(np.int32), plain.view(np.int32)), mode
        one = steer(pipe, PROMPTS[:2], safedig=bundle, strength=1.0, mode=mode, **_call(family, SEEDS[:2])).images
        assert not np.array_equal(one, plain), mode


@pytest.mark.parametrize("family", FAMILIES)
def test_a_step_range_edits_only_its_steps(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str
) -> None:
    edits = _edits(pipes[family], family, bundles(family, "mixed"), 1.0, steps=(1, 1))
    for name, calls in edits.items():
        if name.startswith("te."):  # the encode pass: no steps, always edited
            assert any(_changed(*_conditional(family, name, x, y)).any() for x, y in calls), name
            continue
        assert len(calls) == CALL["num_inference_steps"]
        (x0, y0), (x1, y1) = calls
        assert torch.equal(_bits(y0), _bits(x0)), f"{name}: step 0 is outside the range but was edited"
        assert _changed(*_conditional(family, name, x1, y1)).any(), f"{name}: step 1 was not edited"


# --- 3. hooks after an exception; composition with vector steering --------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_are_gone_after_an_exception_inside_the_denoiser(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, bundle = pipes[family], bundles(family, "mixed")
    plain = pipe(prompt=PROMPTS[0], **_call(family, SEEDS[:1])).images
    before = _hook_count(pipe)
    during: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        during.append(_hook_count(pipe))  # every block before norm_out has run under the hooks
        raise RuntimeError("inside the denoiser")

    with monkeypatch.context() as patch:
        patch.setattr(pipe.transformer.norm_out, "forward", broken)
        with pytest.raises(RuntimeError, match="inside the denoiser"):
            steer(pipe, PROMPTS[0], safedig=bundle, strength=1.0, **_call(family, SEEDS[:1]))
    assert during and during[0] > before  # the steering hooks were in place when it raised
    assert _hook_count(pipe) == before
    again = pipe(prompt=PROMPTS[0], **_call(family, SEEDS[:1])).images  # and the pipeline is unsteered again
    assert np.array_equal(again.view(np.int32), plain.view(np.int32))


def test_vector_and_safedig_compose_as_the_vector_added_to_the_hooked_encoding(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle]
) -> None:
    pipe, bundle = pipes["flux"], bundles("flux", "mixed")
    v = np.random.default_rng(5).standard_normal(32).astype(np.float32)
    alpha, s = 1.5, 1.0
    both = steer(pipe, PROMPTS[0], v, alpha, safedig=bundle, strength=s, **_call("flux", SEEDS[:1])).images
    # Independently: the pipeline's own encode_prompt under the hooks, α·v added to every T5 position
    # (Flux steers all of them, padding included), and the denoiser run under the same hooks.
    with safedig_hooks(pipe, bundle, s), torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=[PROMPTS[0]], prompt_2=None, max_sequence_length=MSL)
        hooked = pipe(
            prompt_embeds=embeds + alpha * torch.from_numpy(v), pooled_prompt_embeds=pooled, **_call("flux", SEEDS[:1])
        ).images
    assert np.array_equal(both.view(np.int32), hooked.view(np.int32))
    vector_only = steer(pipe, PROMPTS[0], v, alpha, **_call("flux", SEEDS[:1])).images
    safedig_only = steer(pipe, PROMPTS[0], safedig=bundle, strength=s, **_call("flux", SEEDS[:1])).images
    assert not np.array_equal(both, vector_only) and not np.array_equal(both, safedig_only)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_edits_leave_the_negative_prompt_alone(pipes: dict[str, Any], family: str) -> None:
    """§7: only the conditional branch is edited, so the negative prompt's embeddings keep their bits."""
    pipe = pipes[family]
    bundle = _bundle(pipe, family, "zero", positions=("te.0.txt",))
    extra: dict[str, Any] = {"negative_prompt": "a blurry photo"}
    if family == "flux":
        extra["true_cfg_scale"] = 2.0  # Flux calls the transformer for the negative prompt after the prompt
    seen: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    try:
        pipe(prompt=PROMPTS[0], **extra, **_call(family, SEEDS[:1]))
        plain = seen.copy()
        seen.clear()
        steer(pipe, PROMPTS[0], safedig=bundle, strength=3.0, **extra, **_call(family, SEEDS[:1]))
    finally:
        handle.remove()
    if family == "flux":  # step 0: the conditional call, then the negative one
        cond, neg, cond_plain, neg_plain = seen[0], seen[1], plain[0], plain[1]
    else:  # one call, [negative; prompt]
        neg, cond, neg_plain, cond_plain = seen[0][:1], seen[0][1:], plain[0][:1], plain[0][1:]
    assert not torch.equal(cond, cond_plain)  # the prompt's encoding is edited ...
    assert torch.equal(_bits(neg), _bits(neg_plain))  # ... the negative prompt's is not


# --- 4. batched = one at a time, with one strength per output -------------------------------------------------


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)  # diffusers' numpy_to_pil rounding, signed for differences


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_per_output_strengths_equal_one_call_each(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], family: str
) -> None:
    pipe, bundle = pipes[family], bundles(family, "mixed")
    strengths = [0.0, 1.0, 3.0]
    batched = steer(pipe, PROMPTS, safedig=bundle, strength=strengths, **_call(family, SEEDS)).images
    for i, s in enumerate(strengths):
        one = steer(pipe, PROMPTS[i], safedig=bundle, strength=s, **_call(family, SEEDS[i : i + 1])).images
        assert np.abs(_uint8(batched[i : i + 1]) - _uint8(one)).max() <= BATCH_TOLERANCE, f"output {i} (s = {s})"
    # Each strength went to its own output: s = 0 is the unsteered image of its prompt, s = 3 is not.
    plain = pipe(prompt=PROMPTS, **_call(family, SEEDS)).images
    assert np.abs(_uint8(batched[0]) - _uint8(plain[0])).max() <= BATCH_TOLERANCE
    assert np.abs(_uint8(batched[2]) - _uint8(plain[2])).max() > BATCH_TOLERANCE


# --- 5. the exported bundle steers without the store -----------------------------------------------------------


_NO_STORE_JOB = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from diffusers import FluxPipeline

    from safeport import read_exported_safedig, steer

    folder, model, out, store, prompt, seed = sys.argv[1:7]
    assert not Path(store).exists(), "the store must be gone"
    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    call = {call}
    for refit in (True, False):
        bundle = read_exported_safedig(folder, refit=refit)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        image = steer(pipe, prompt, safedig=bundle, strength=1.5, generator=generator, output_type="np", **call)
        np.save(f"{{out}}-{{int(refit)}}.npy", image.images)
    """
)


def test_the_exported_bundle_steers_to_the_same_bits_without_the_store(tmp_path: Path, one_thread: None) -> None:
    from diffusers import FluxPipeline

    model = REPO / "models" / "tiny-flux"
    pipe = FluxPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    memory = _bundle(pipe, "flux", "mixed")
    root = tmp_path / "store"
    store_bundle(root, memory)

    def generate(bundle: SafeDigBundle) -> np.ndarray:
        images: np.ndarray = steer(pipe, PROMPTS[0], safedig=bundle, strength=1.5, **_call("flux", [SEEDS[0]])).images
        return images

    from_store = {refit: generate(load_safedig(root, memory.name, refit=refit)) for refit in (True, False)}
    assert np.array_equal(from_store[True].view(np.int32), generate(memory).view(np.int32))
    assert not np.array_equal(from_store[True], from_store[False])  # the ablation is another bundle
    assert not np.array_equal(from_store[True], pipe(prompt=PROMPTS[0], **_call("flux", [SEEDS[0]])).images)

    folder = export_safedig(root, memory.name, tmp_path / "export")
    gone = root.rename(tmp_path / "moved-away")  # the job's machine has no store
    call = {k: v for k, v in CALL.items()}
    script = tmp_path / "job.py"
    script.write_text(_NO_STORE_JOB.format(call=repr(call)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "job"
    args = [str(folder), str(model), str(out), str(root), PROMPTS[0], str(SEEDS[0])]
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert gone.exists() and not root.exists()
    for refit in (True, False):
        job = np.load(f"{out}-{int(refit)}.npy")
        assert np.array_equal(job.view(np.int32), from_store[refit].view(np.int32)), f"refit={refit}"


# --- 6. bad arguments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"strength": -1.0}, r"strength must be a finite number >= 0, got -1\.0"),
        ({"strength": float("nan")}, r"strength must be a finite number >= 0, got nan"),
        ({"strength": [0.0, -2.0, 1.0]}, r"got -2\.0"),
        ({"strength": [1.0, 2.0]}, r"2 strengths for a batch of 3"),
        ({"mode": "erase"}, r"unknown SafeDIG mode 'erase'"),
        ({"steps": (3, 1)}, r"steps \(3, 1\) must be \(first, last\) with 0 <= first <= last"),
    ],
)
def test_bad_arguments_give_one_clear_value_error(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], options: dict[str, Any], match: str
) -> None:
    pipe = pipes["flux"]
    before = _hook_count(pipe)
    with pytest.raises(ValueError, match=match) as caught:
        steer(pipe, PROMPTS, safedig=bundles("flux", "mixed"), **options, **_call("flux", SEEDS))
    assert type(caught.value) is ValueError and caught.value.__cause__ is None
    assert _hook_count(pipe) == before


@contextmanager
def _forward_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("strength", [-1.0, float("nan"), [1.0, -1.0, 0.0]])
def test_a_bad_strength_is_refused_before_the_pipeline_runs(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], strength: float | list[float]
) -> None:
    pipe = pipes["flux"]
    bundle = bundles("flux", "mixed")
    dit_only = SafeDigBundle(
        bundle.name, bundle.model, bundle.holdout, tuple(p for p in bundle.positions if p.position[:2] != "te"), {}
    )
    with (
        _forward_calls(pipe.text_encoder_2) as encoder,
        _forward_calls(pipe.transformer) as denoiser,
        pytest.raises(ValueError, match="strength must be a finite number >= 0"),
    ):
        steer(pipe, PROMPTS, safedig=dit_only, strength=strength, steps=(5, 9), **_call("flux", SEEDS))
    assert not encoder and not denoiser


@pytest.mark.parametrize("strength", [np.float32(1.0), np.int64(1)])
def test_a_numpy_scalar_strength_is_one_strength(
    pipes: dict[str, Any], bundles: Callable[[str, Taus], SafeDigBundle], strength: Any
) -> None:
    pipe, bundle = pipes["flux"], bundles("flux", "mixed")
    want = steer(pipe, PROMPTS[0], safedig=bundle, strength=1.0, **_call("flux", SEEDS[:1])).images
    got = steer(pipe, PROMPTS[0], safedig=bundle, strength=strength, **_call("flux", SEEDS[:1])).images
    assert np.array_equal(got, want)
