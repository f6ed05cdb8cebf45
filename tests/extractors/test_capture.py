"""Known-answer tests for the position hooks and the token cache capture (METHOD-SAFEDIG §2, §7).

Tiny random-weight Flux (2 double + 2 single blocks) and SD3 (3 joint blocks) pipelines from
tests/tiny_pipelines.py, 16×16 images, 4 steps: each generation takes a fraction of a second.
Expected values come from an independent path each time: a manual forward of the hooked block
on the inputs it received, a full (unstopped) generation, a guidance-1 run, HF's
``output_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import AutoModel, AutoTokenizer

from safeport.extractors.capture import (
    NO_SEED,
    Generation,
    TokenRows,
    capture_pipeline,
    capture_text_encoder,
    default_steps,
    iter_capture,
    position_hooks,
    sample_tokens,
)
from safeport.extractors.positions import Position, candidates
from tests.tiny_models import minilm_folder
from tests.tiny_pipelines import TINY_SD3_OPTIONS, build

REPO = Path(__file__).resolve().parents[2]
MSL = 24
PROMPTS = ["a cat", "a red sofa on a beach"]
SEEDS = [3, 11]
SETTINGS = {
    "flux": Generation(height=16, width=16, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=MSL),
    "sd3": Generation(height=16, width=16, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=MSL),
}
N_IMG = {"flux": 64, "sd3": 256}  # Flux packs 2×2 latents (16×16 -> 8×8); SD3 patch 1 over 16×16


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    return {"flux": build("flux", num_layers=2, num_single_layers=2), "sd3": build("sd3", num_layers=3)}


def _call_kwargs(settings: Generation, seeds: list[int]) -> dict[str, Any]:
    return {
        "height": settings.height,
        "width": settings.width,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "max_sequence_length": settings.max_sequence_length,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
    }


def _hook_count(pipe: Any) -> int:
    total = 0
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            for m in component.modules():
                total += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return total


@contextmanager
def _count_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def _recorder(store: dict[tuple[str, int], torch.Tensor]) -> Callable[[Position, int, torch.Tensor], None]:
    def fn(position: Position, step: int, tensor: torch.Tensor) -> None:
        store[(position.name, step)] = tensor.detach().clone()

    return fn


def _real_lengths(pipe: Any, family: str) -> list[int]:
    """Real tokens of each prompt's text stream, counted from the tokenizers without padding."""

    def n(tok: Any, limit: int) -> list[int]:
        return [min(len(ids), limit) for ids in tok(PROMPTS)["input_ids"]]

    if family == "flux":
        return n(pipe.tokenizer_2, MSL)
    return [a + b for a, b in zip(n(pipe.tokenizer, 77), n(pipe.tokenizer_3, MSL), strict=True)]


# --- each hook sees exactly what the block returns ------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_hooks_capture_exactly_the_block_output(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    t = pipe.transformer
    blocks = [*t.transformer_blocks, *getattr(t, "single_transformer_blocks", [])]
    inputs: dict[int, tuple[Any, Any]] = {}

    def keep_inputs(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        inputs.setdefault(id(module), (args, dict(kwargs)))

    names = candidates(pipe, "blocks")
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(keep_inputs, with_kwargs=True) for b in blocks]
    try:
        with position_hooks(pipe, names, _recorder(seen)) as sites:
            pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS[family], SEEDS), output_type="latent")
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        args, kwargs = inputs[id(site.module)]
        with torch.no_grad():
            out = site.module(*args, **kwargs)
        assert torch.equal(seen[(site.name, 0)], out[site.element]), site.name
        # The stream order, independently: the text stream is as long as the prompt_embeds sequence.
        length = MSL if family == "flux" else 77 + MSL
        assert seen[(site.name, 0)].shape[1] == (length if site.position.stream == "txt" else N_IMG[family])
    if family == "sd3":  # the last joint block returns no text stream at all
        args, kwargs = inputs[id(t.transformer_blocks[-1])]
        with torch.no_grad():
            assert t.transformer_blocks[-1](*args, **kwargs)[0] is None
    assert {step for _name, step in seen} == {0, 1, 2, 3}  # one conditional call per step, 4 steps


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_text_rows_are_real_tokens_only(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    names = [n for n in candidates(pipe, "all") if n.endswith(".txt")]
    rows = capture_pipeline(pipe, PROMPTS, SETTINGS[family], names, seeds=SEEDS, steps=[0])
    lengths = _real_lengths(pipe, family)
    t5 = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    t5_lengths = [min(len(ids), MSL) for ids in t5(PROMPTS)["input_ids"]]
    assert lengths[0] < lengths[1]
    for name, r in rows.items():
        # te rows: the T5 tokens; a DiT text stream: its real tokens (SD3: CLIP + T5).
        expect = t5_lengths if name.startswith("te.") else lengths
        assert np.bincount(r.prompt_index, minlength=2).tolist() == expect, name
    # The stored tokens are the unpadded positions of the stream: CLIP from 0, T5 from 77 on SD3.
    r = rows["double.0.txt"]
    first = r.token_index[r.prompt_index == 0]
    if family == "flux":
        assert first.tolist() == list(range(lengths[0]))
    else:
        n_clip = min(len(pipe.tokenizer(PROMPTS[0])["input_ids"]), 77)
        assert first.tolist() == list(range(n_clip)) + list(range(77, 77 + lengths[0] - n_clip))


def test_text_rows_equal_the_stream_at_real_tokens(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    seen: dict[tuple[str, int], torch.Tensor] = {}
    with position_hooks(pipe, ["double.1.txt"], _recorder(seen)):
        pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS["flux"], SEEDS), output_type="latent")
    rows = capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], ["double.1.txt"], seeds=SEEDS, steps=[1])
    r = rows["double.1.txt"]
    full = seen[("double.1.txt", 1)].numpy()
    np.testing.assert_array_equal(r.values, full[r.prompt_index, r.token_index])


# --- early stop, seeds, sampling ----------------------------------------------------------------


def _full_generation_rows(pipe: Any, family: str, names: list[str], seeds: list[int]) -> dict[tuple[str, int], Any]:
    seen: dict[tuple[str, int], torch.Tensor] = {}
    with position_hooks(pipe, names, _recorder(seen)):
        pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS[family], seeds), output_type="np")  # VAE decode included
    return {k: v.numpy() for k, v in seen.items()}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_early_stop_gives_the_rows_of_a_full_generation(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    names = list(candidates(pipe, "blocks"))
    steps = default_steps(4)
    assert steps == (0, 1, 2)
    with _count_calls(pipe.transformer) as calls, _count_calls(pipe.vae.decoder) as decodes:
        rows = capture_pipeline(pipe, PROMPTS, SETTINGS[family], names, seeds=SEEDS)
    assert len(calls) == 3 and not decodes  # step 3 never ran, nor the VAE
    full = _full_generation_rows(pipe, family, names, SEEDS)
    for name, r in rows.items():
        assert sorted(set(r.step.tolist())) == [0, 1, 2]
        for step in steps:
            sel = r.step == step
            expect = full[(name, step)][r.prompt_index[sel], r.token_index[sel]]
            np.testing.assert_array_equal(r.values[sel], expect, err_msg=f"{name} step {step}")
        assert set(r.seed.tolist()) == set(SEEDS)
        np.testing.assert_array_equal(r.seed, np.array(SEEDS)[r.prompt_index])


def test_same_seed_same_rows_other_seed_other_image_rows(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd3"]
    names = ["double.0.img", "double.1.txt"]
    a = capture_pipeline(pipe, PROMPTS, SETTINGS["sd3"], names, seeds=SEEDS, image_tokens=16)
    b = capture_pipeline(pipe, PROMPTS, SETTINGS["sd3"], names, seeds=SEEDS, image_tokens=16)
    c = capture_pipeline(pipe, PROMPTS, SETTINGS["sd3"], names, seeds=[5, 6], image_tokens=16)
    for name in names:
        np.testing.assert_array_equal(a[name].values, b[name].values)
        np.testing.assert_array_equal(a[name].token_index, b[name].token_index)
    assert not np.allclose(a["double.0.img"].values, c["double.0.img"].values)
    # The image-token sample follows the seed: other seeds, other token indices.
    assert not np.array_equal(a["double.0.img"].token_index, c["double.0.img"].token_index)


def test_image_token_sample_is_per_seed_and_step_and_shared_by_positions(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    names = ["double.0.img", "single.1.img"]
    # Both prompts share a seed, like the two sides of a SafeSteer pair: same image locations.
    rows = capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], names, seeds=7, image_tokens=8, steps=[0, 2])
    for name in names:
        r = rows[name]
        assert len(r) == 2 * 2 * 8
        for step in (0, 2):
            for p in (0, 1):
                sel = (r.step == step) & (r.prompt_index == p)
                assert r.token_index[sel].tolist() == sample_tokens(7, step, N_IMG["flux"], 8).tolist()
    np.testing.assert_array_equal(rows["double.0.img"].token_index, rows["single.1.img"].token_index)
    assert sample_tokens(7, 0, 64, 8).tolist() != sample_tokens(7, 2, 64, 8).tolist()
    assert sample_tokens(7, 0, 64, None).tolist() == list(range(64))


def test_default_steps() -> None:
    assert default_steps(28) == (0, 5, 11, 16)
    assert default_steps(50) == (0, 10, 20, 29)
    assert default_steps(4) == (0, 1, 2)
    assert default_steps(2) == (0, 1)
    assert default_steps(1) == (0,)
    with pytest.raises(ValueError, match="at least one step"):
        default_steps(0)


def test_steps_out_of_range_fail_before_running(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    with _count_calls(pipe.transformer) as calls:
        with pytest.raises(ValueError, match=r"within 0\.\.3"):
            capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], ["double.0.img"], steps=[4])
        with pytest.raises(ValueError, match="Valid names for this model"):
            capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], ["double.2.img"])
    assert not calls


# --- conditional branch only --------------------------------------------------------------------


def test_sd3_guidance_captures_the_conditional_half(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd3"]
    names = ["double.0.txt", "double.1.img", "double.2.img"]
    cfg = Generation(16, 16, 4, 5.0, MSL)
    with _count_calls(pipe.transformer) as calls:
        guided = capture_pipeline(pipe, PROMPTS, cfg, names, seeds=SEEDS, steps=[0])
    assert len(calls) == 1
    plain = capture_pipeline(pipe, PROMPTS, SETTINGS["sd3"], names, seeds=SEEDS, steps=[0])
    # The unconditional branch is the empty prompt: what a guidance-1 run of "" gives.
    empty = capture_pipeline(pipe, ["", ""], SETTINGS["sd3"], ["double.1.img"], seeds=SEEDS, steps=[0])
    for name in names:
        g, p = guided[name], plain[name]
        assert len(g) == len(p)  # rows of the prompts only, not of the doubled batch
        np.testing.assert_array_equal(g.token_index, p.token_index)
        # At step 0 the conditional half of [uncond, cond] is the guidance-1 forward (batching may round).
        np.testing.assert_allclose(g.values, p.values, rtol=1e-5, atol=1e-5)
    assert not np.allclose(guided["double.1.img"].values, empty["double.1.img"].values, atol=1e-3)


def test_sd3_guidance_manual_split(pipes: dict[str, Any]) -> None:
    """The hook's tensor is exactly the second half of the block's batched output."""
    pipe = pipes["sd3"]
    block = pipe.transformer.transformer_blocks[1]
    outputs: list[Any] = []
    handle = block.register_forward_hook(lambda m, a, out: outputs.append(out))
    seen: dict[tuple[str, int], torch.Tensor] = {}
    try:
        with position_hooks(pipe, ["double.1.txt", "double.1.img"], _recorder(seen)):
            pipe(
                prompt=PROMPTS, **{**_call_kwargs(SETTINGS["sd3"], SEEDS), "guidance_scale": 5.0}, output_type="latent"
            )
    finally:
        handle.remove()
    txt, img = outputs[0]
    assert txt.shape[0] == img.shape[0] == 4  # [uncond ×2, cond ×2]
    assert torch.equal(seen[("double.1.txt", 0)], txt[2:])
    assert torch.equal(seen[("double.1.img", 0)], img[2:])


def test_sd3_skip_layer_guidance_call_is_not_a_step(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd3"]
    fired: list[tuple[str, int, int]] = []
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0}
    with (
        _count_calls(pipe.transformer) as calls,
        position_hooks(pipe, ["double.0.img"], lambda p, s, t: fired.append((p.name, s, t.shape[0]))),
    ):
        pipe(
            prompt=PROMPTS,
            **{**_call_kwargs(SETTINGS["sd3"], SEEDS), "guidance_scale": 5.0},
            **slg,
            output_type="latent",
        )
    assert len(calls) == 4 + 3  # one batched CFG call per step, plus a skip-layer call at steps 1..3
    assert fired == [("double.0.img", step, 2) for step in range(4)]  # the conditional half, once per step


def test_flux_true_cfg_captures_only_the_conditional_call(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    names = ["double.0.txt", "single.1.img"]
    cfg = Generation(16, 16, 4, 1.0, MSL, true_cfg_scale=4.0, negative_prompt="blurry")
    with _count_calls(pipe.transformer) as calls:
        guided = capture_pipeline(pipe, PROMPTS, cfg, names, seeds=SEEDS, steps=[0, 1])
    # cond@0, uncond@0, cond@1 -> stop: the negative call of step 0 was neither captured nor counted as a step.
    assert len(calls) == 3
    plain = capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], names, seeds=SEEDS, steps=[0, 1])
    for name in names:
        g, p = guided[name], plain[name]
        assert len(g) == len(p)
        at0 = g.step == 0
        np.testing.assert_array_equal(g.values[at0], p.values[p.step == 0])  # step 0: same call, cond first
        assert not np.allclose(g.values[~at0], p.values[p.step == 1])  # true CFG changed the step-1 latents


# --- hooks are removed; the edit primitive --------------------------------------------------------


def test_hooks_are_removed_after_an_exception(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    before = _hook_count(pipe)

    def boom(position: Position, step: int, tensor: torch.Tensor) -> None:
        raise RuntimeError("inside the pipeline call")

    with (
        pytest.raises(RuntimeError, match="inside the pipeline call"),
        position_hooks(pipe, candidates(pipe, "all"), boom),
    ):
        assert _hook_count(pipe) > before
        pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS["flux"], SEEDS), output_type="latent")
    assert _hook_count(pipe) == before
    # The early stop is an exception too: nothing left behind, and the pipeline still generates.
    capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], candidates(pipe, "all"), steps=[0])
    assert _hook_count(pipe) == before
    pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS["flux"], SEEDS), output_type="latent")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_observing_hooks_leave_generation_bit_identical(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    kwargs = {**_call_kwargs(SETTINGS[family], SEEDS), "guidance_scale": 5.0 if family == "sd3" else 1.0}
    plain = pipe(prompt=PROMPTS, **kwargs, output_type="latent").images
    kwargs["generator"] = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    with position_hooks(pipe, candidates(pipe, "all"), lambda p, s, t: None):
        hooked = pipe(prompt=PROMPTS, **kwargs, output_type="latent").images
    assert torch.equal(plain, hooked)


def test_editing_one_stream_replaces_only_that_element(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    nxt = pipe.transformer.transformer_blocks[1]
    seen: dict[tuple[str, int], torch.Tensor] = {}
    inputs: list[dict[str, Any]] = []
    handle = nxt.register_forward_pre_hook(lambda m, a, kw: inputs.append(dict(kw)), with_kwargs=True)

    def double_image(position: Position, step: int, tensor: torch.Tensor) -> torch.Tensor | None:
        seen[(position.name, step)] = tensor.clone()
        return tensor * 2 if position.stream == "img" else None

    try:
        plain = pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS["flux"], SEEDS), output_type="latent").images
        inputs.clear()
        with position_hooks(pipe, ["double.0.txt", "double.0.img"], double_image):
            edited = pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS["flux"], SEEDS), output_type="latent").images
    finally:
        handle.remove()
    assert not torch.allclose(plain, edited)
    # The next block received the edited image stream and the untouched text stream.
    assert torch.equal(inputs[0]["hidden_states"], seen[("double.0.img", 0)] * 2)
    assert torch.equal(inputs[0]["encoder_hidden_states"], seen[("double.0.txt", 0)])


def test_sd3_edit_touches_only_the_conditional_half(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd3"]
    nxt = pipe.transformer.transformer_blocks[2]
    inputs: list[dict[str, Any]] = []
    outputs: list[Any] = []
    h1 = nxt.register_forward_pre_hook(lambda m, a, kw: inputs.append(dict(kw)), with_kwargs=True)
    h2 = pipe.transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with position_hooks(pipe, ["double.1.txt"], lambda p, s, t: torch.zeros_like(t)):
            pipe(
                prompt=PROMPTS, **{**_call_kwargs(SETTINGS["sd3"], SEEDS), "guidance_scale": 5.0}, output_type="latent"
            )
    finally:
        h1.remove()
        h2.remove()
    txt_in = inputs[0]["encoder_hidden_states"]
    # The hook's own output replaced the block's; the raw block output is outputs[0] before replacement.
    raw_txt = outputs[0][0]
    assert torch.equal(txt_in[:2], raw_txt[:2])  # unconditional half untouched
    assert torch.equal(txt_in[2:], torch.zeros_like(raw_txt[2:]))  # conditional half replaced
    assert torch.equal(inputs[0]["hidden_states"], outputs[0][1])  # the image stream untouched


def test_edit_with_a_wrong_shape_is_refused(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    before = _hook_count(pipe)
    with (
        pytest.raises(ValueError, match=r"double\.0\.img returned \(1, 2\)"),
        position_hooks(pipe, ["double.0.img"], lambda p, s, t: torch.zeros(1, 2)),
    ):
        pipe(prompt=PROMPTS, **_call_kwargs(SETTINGS["flux"], SEEDS), output_type="latent")
    assert _hook_count(pipe) == before


# --- text-encoder positions ---------------------------------------------------------------------


def test_te_rows_on_minilm_are_layer_outputs_at_real_tokens() -> None:
    model = AutoModel.from_pretrained(minilm_folder()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    texts = ["a cat", "a photo of a cat sitting on a red sofa"]
    names = [f"te.{i}.txt" for i in range(6)]
    rows = capture_text_encoder(model, tokenizer, texts, names)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool().numpy()
    assert len(hidden) == 7  # embeddings + 6 layers
    for n, name in enumerate(names):
        r = rows[name]
        assert np.bincount(r.prompt_index).tolist() == mask.sum(axis=1).tolist()
        assert (r.step == 0).all() and (r.seed == NO_SEED).all()
        # te.N = output of encoder layer N = hidden_states[N + 1] (not the embedding output).
        expect = hidden[n + 1].numpy()[mask]
        np.testing.assert_allclose(r.values, expect, rtol=1e-5, atol=1e-6)
        assert not np.allclose(r.values, hidden[n].numpy()[mask], atol=1e-3)


def test_te_capture_stops_after_the_deepest_layer() -> None:
    model = AutoModel.from_pretrained(minilm_folder()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    with _count_calls(model.encoder.layer[3]) as deeper, _count_calls(model.encoder.layer[2]) as needed:
        rows = capture_text_encoder(model, tokenizer, ["a cat"], ["te.2.txt", "te.0.txt"], prompt_offset=5)
    assert len(needed) == 1 and not deeper
    assert list(rows) == ["te.2.txt", "te.0.txt"]
    assert (rows["te.0.txt"].prompt_index == 5).all()


def test_te_in_a_flux_pipeline_is_the_t5_behind_prompt_embeds(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    rows = capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], ["te.0.txt", "te.1.txt"], seeds=SEEDS)
    # The pipeline feeds T5 max-length-padded ids without an attention mask; real tokens are the tokenizer's.
    tok = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=MSL, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder_2(tok.input_ids, output_hidden_states=True)
        embeds, _pooled, _ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=MSL)
    mask = tok.attention_mask.bool().numpy()
    np.testing.assert_array_equal(rows["te.0.txt"].values, out.hidden_states[1].numpy()[mask])
    # The last layer's te row is the block output before T5's final norm; the norm of it is prompt_embeds.
    last = torch.from_numpy(rows["te.1.txt"].values)
    with torch.no_grad():
        normed = pipe.text_encoder_2.encoder.final_layer_norm(last)
    np.testing.assert_allclose(normed.numpy(), embeds.numpy()[mask], rtol=1e-5, atol=1e-6)
    assert rows["te.1.txt"].token_index[rows["te.1.txt"].prompt_index == 0].tolist() == list(range(mask[0].sum()))


def test_te_and_blocks_in_one_capture_ignore_the_negative_prompt(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd3"]
    cfg = Generation(16, 16, 4, 5.0, MSL, negative_prompt="blurry picture")
    both = capture_pipeline(pipe, PROMPTS, cfg, ["te.1.txt", "double.0.img"], seeds=SEEDS, steps=[0])
    alone = capture_pipeline(pipe, PROMPTS, SETTINGS["sd3"], ["te.1.txt"], seeds=SEEDS)
    np.testing.assert_array_equal(both["te.1.txt"].values, alone["te.1.txt"].values)
    assert (both["te.1.txt"].step == 0).all()


# --- batching, the bundled tiny SD3, the row record -------------------------------------------------


def test_batches_give_global_prompt_indices_and_the_same_rows(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    names = ["double.1.txt", "single.0.img"]
    whole = capture_pipeline(pipe, PROMPTS, SETTINGS["flux"], names, seeds=SEEDS, image_tokens=8)
    parts = list(iter_capture(pipe, PROMPTS, SETTINGS["flux"], names, batch_size=1, seeds=SEEDS, image_tokens=8))
    assert len(parts) == 2
    for name in names:
        a = whole[name]
        b = [p[name] for p in parts]
        assert b[1].prompt_index.tolist() == [1] * len(b[1])
        for p in (0, 1):
            np.testing.assert_allclose(
                a.values[a.prompt_index == p], b[p].values, rtol=1e-5, atol=1e-6
            )  # batched matmuls may round differently
            np.testing.assert_array_equal(a.token_index[a.prompt_index == p], b[p].token_index)


def test_token_rows_coordinates() -> None:
    r = TokenRows(
        "double.9.img",
        np.zeros((2, 3), np.float32),
        np.array([0, 1]),
        np.array([42, 42]),
        np.array([0, 5]),
        np.array([7, 9]),
    )
    assert r.stream == "img" and len(r) == 2
    coords = r.coordinates()
    assert coords["stream"].tolist() == ["img", "img"]
    assert coords["position"].tolist() == ["double.9.img"] * 2
    assert coords["token_index"].tolist() == [7, 9]


def test_bundled_tiny_sd3() -> None:
    folder = REPO / "models" / "tiny-sd3"
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 1_000_000
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    fresh = build("sd3", **TINY_SD3_OPTIONS)
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        saved, built = getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert saved.keys() == built.keys()
        assert all(torch.equal(saved[k], built[k]) for k in saved), name
    assert candidates(pipe, "blocks") == (
        "double.0.txt",
        "double.0.img",
        "double.1.txt",
        "double.1.img",
        "double.2.img",
    )
    settings = Generation(32, 32, 2, 5.0, MSL)
    rows = capture_pipeline(pipe, PROMPTS, settings, candidates(pipe, "all"), image_tokens=16)
    assert rows["double.2.img"].values.shape == (2 * 2 * 16, 32)
