"""Known-answer tests for the steering API on tiny pipelines of all five families."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from safeport.eval.steering import combine, steer, steered_embeds
from safeport.extractors.base import RepresentationSpec
from safeport.extractors.pipeline_encoder import FAMILIES as ENCODER_FAMILIES
from safeport.extractors.pipeline_encoder import PipelineEncoder
from tests.tiny_pipelines import FAMILIES, TINY_CALL_KWARGS, build

PROMPT = "a cat on a red sofa"
NEGATIVE = "blurry, low quality"
DIMS = {"flux": 32, "sd3": 48, "z_image": 16, "qwen_image": 16, "wan": 32}
# Guidance settings under which each family runs its negative branch.
CFG = {
    "flux": {"true_cfg_scale": 2.0},
    "sd3": {"guidance_scale": 3.0},
    "z_image": {"guidance_scale": 3.0},
    "qwen_image": {"true_cfg_scale": 2.0},
    "wan": {"guidance_scale": 3.0},
}
# Guidance settings without any negative branch (so prompt-only runs compare like with like).
NO_CFG = {
    "flux": {},
    "sd3": {"guidance_scale": 1.0},
    "z_image": {"guidance_scale": 0.0},
    "qwen_image": {},
    "wan": {"guidance_scale": 1.0},
}


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    return {f: build(f) for f in FAMILIES}


def _vector(family: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIMS[family]).astype(np.float32)


def _kwargs(family: str, **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(TINY_CALL_KWARGS[family])
    kw.update(extra)
    kw["output_type"] = "np"
    return kw


def _media(family: str, out: Any) -> np.ndarray:
    return np.asarray(out.frames if family == "wan" else out.images)


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(42)


def _own_encoding(pipe: Any, family: str, prompts: list[str], negatives: list[str] | None, msl: int) -> dict[str, Any]:
    """What the pipeline itself computes for these prompts (independent of eval.steering)."""
    with torch.no_grad():
        if family == "flux":
            pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=msl)
            out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
            if negatives:
                ne, npooled, _ = pipe.encode_prompt(prompt=negatives, prompt_2=None, max_sequence_length=msl)
                out |= {"negative_prompt_embeds": ne, "negative_pooled_prompt_embeds": npooled}
            return out
        if family == "sd3":
            pe, ne, pooled, npooled = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negatives,
                max_sequence_length=msl,
            )
            return {
                "prompt_embeds": pe,
                "negative_prompt_embeds": ne,
                "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": npooled,
            }
        if family == "z_image":
            pe, ne = pipe.encode_prompt(
                prompt=list(prompts),
                negative_prompt=None if negatives is None else list(negatives),
                max_sequence_length=msl,
            )
            return {"prompt_embeds": pe, "negative_prompt_embeds": ne}
        if family == "qwen_image":
            pe, mask = pipe.encode_prompt(prompt=prompts, max_sequence_length=msl)
            out = {"prompt_embeds": pe, "prompt_embeds_mask": mask}
            if negatives:
                ne, nmask = pipe.encode_prompt(prompt=negatives, max_sequence_length=msl)
                out |= {"negative_prompt_embeds": ne, "negative_prompt_embeds_mask": nmask}
            return out
        pe, ne = pipe.encode_prompt(prompt=prompts, negative_prompt=negatives, max_sequence_length=msl)
        return {"prompt_embeds": pe, "negative_prompt_embeds": ne}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(torch.equal(a, b))


# --- combine ------------------------------------------------------------------------------------


def test_combine_is_the_weighted_mean() -> None:
    vectors = {"sexual": np.array([1.0, 0.0], np.float32), "violence": np.array([0.0, 4.0], np.float32)}
    out = combine(vectors, {"sexual": 3.0, "violence": 1.0})
    np.testing.assert_allclose(out, [0.75, 1.0])
    assert out.dtype == np.float32


def test_combine_ignores_categories_without_weight() -> None:
    vectors = {"a": np.array([2.0, 2.0]), "b": np.array([100.0, -100.0])}
    np.testing.assert_allclose(combine(vectors, {"a": 0.5}), [2.0, 2.0])
    np.testing.assert_allclose(combine(vectors, {"a": 1.0, "b": 0.0}), [2.0, 2.0])


@pytest.mark.parametrize(
    ("vectors", "weights", "match"),
    [
        ({}, {"a": 1.0}, "no vectors"),
        ({"a": np.ones(2)}, {}, "no weights"),
        ({"a": np.ones(2)}, {"b": 1.0}, r"\['b'\]"),
        ({"a": np.ones(2)}, {"a": -1.0}, "non-negative"),
        ({"a": np.ones(2)}, {"a": float("nan")}, "finite"),
        ({"a": np.ones(2)}, {"a": 0.0}, "positive weight"),
        ({"a": np.ones(2), "b": np.ones(3)}, {"a": 1.0, "b": 1.0}, "one length"),
    ],
)
def test_combine_validates(vectors: dict[str, np.ndarray], weights: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        combine(vectors, weights)


# --- steered embeddings -------------------------------------------------------------------------


def _pooled_by_hand(pipe: Any, family: str, prompts: list[str], own: dict[str, Any], msl: int) -> Any:
    """The positions each family's representation is pooled over, worked out without safeport's code."""
    embeds = own["prompt_embeds"]
    if family in ("flux", "sd3"):
        return torch.ones(embeds.shape[:2])  # every padded position: the denoiser attends to all of them
    if family == "z_image":
        return [torch.ones(e.shape[0]) for e in embeds]  # each prompt's variable-length real tokens
    if family == "qwen_image":
        mask = own["prompt_embeds_mask"]
        return torch.ones(embeds.shape[:2]) if mask is None else mask.float()
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=msl, truncation=True, return_tensors="pt")
    return ids.attention_mask.float()  # Wan: the real tokens; the pipeline zeroes the rest


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_touches_exactly_the_pooled_positions(pipes: dict[str, Any], family: str) -> None:
    pipe, v, alpha = pipes[family], _vector(family), 1.5
    msl = int(TINY_CALL_KWARGS[family]["max_sequence_length"])  # type: ignore[call-overload]
    prompts, negatives = [PROMPT, "a dog"], [NEGATIVE, NEGATIVE]
    kw = steered_embeds(pipe, prompts, v, alpha, NEGATIVE, max_sequence_length=msl)
    own = _own_encoding(pipe, family, prompts, negatives, msl)
    shift = torch.from_numpy(alpha * v)
    where = _pooled_by_hand(pipe, family, prompts, own, msl)
    steered = kw["prompt_embeds"] if family == "z_image" else list(kw["prompt_embeds"])
    orig = own["prompt_embeds"] if family == "z_image" else list(own["prompt_embeds"])
    assert len(steered) == len(orig) == 2
    for s_i, o_i, w_i in zip(steered, orig, where, strict=True):
        assert s_i.shape == o_i.shape
        torch.testing.assert_close(s_i, o_i + w_i[:, None] * shift, rtol=1e-6, atol=1e-6)
    if family in ("qwen_image", "wan"):
        assert any(bool((w_i == 0).any()) for w_i in where)  # there are unpooled positions, and they stay as they were
    # The extractor pools these very positions: its token counts and rows agree with them.
    spec = RepresentationSpec(model_id=family, family=family, max_tokens=msl)
    encoder = PipelineEncoder(pipe, ENCODER_FAMILIES[family], spec, torch.device("cpu"), msl)
    pooled = encoder.encode(prompts)
    assert pooled.n_tokens.tolist() == [int(w_i.sum()) for w_i in where]
    by_hand = np.stack(
        [((o_i * w_i[:, None]).sum(0) / w_i.sum()).numpy() for o_i, w_i in zip(orig, where, strict=True)]
    )
    np.testing.assert_allclose(pooled.values, by_hand, rtol=1e-5, atol=1e-6)
    # Negative embeds (and pooled CLIP embeds, masks) are exactly the pipeline's own, unsteered.
    for key, value in own.items():
        if key == "prompt_embeds":
            continue
        if key.endswith("_mask") and value is None:
            assert bool(kw[key].all())
            continue
        assert _same(kw[key], value), key


def test_flux_pooled_clip_is_untouched(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    kw0 = steered_embeds(pipe, PROMPT, _vector("flux"), 0.0)
    kw3 = steered_embeds(pipe, PROMPT, _vector("flux"), 3.0)
    assert torch.equal(kw0["pooled_prompt_embeds"], kw3["pooled_prompt_embeds"])
    assert not torch.equal(kw0["prompt_embeds"], kw3["prompt_embeds"])
    assert "negative_prompt_embeds" not in kw3  # no negative prompt: true CFG stays off


def test_qwen_image_mask_is_kept_for_uneven_batches(pipes: dict[str, Any]) -> None:
    pipe = pipes["qwen_image"]
    kw = steered_embeds(pipe, [PROMPT, "a much longer prompt about a dog in a park"], _vector("qwen_image"), 1.0)
    mask = kw["prompt_embeds_mask"]
    assert mask.shape == kw["prompt_embeds"].shape[:2]
    assert mask[0].sum() < mask[1].sum() and bool(mask[1].all())


@pytest.mark.parametrize("family", FAMILIES)
def test_dimension_mismatch_names_both_dims_and_pipeline(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    wrong = np.ones(DIMS[family] + 3, np.float32)
    with pytest.raises(ValueError, match=rf"dim {DIMS[family] + 3}.*{type(pipe).__name__}.*dim {DIMS[family]}"):
        steered_embeds(pipe, PROMPT, wrong, 1.0)


def test_bad_vector_and_alpha_are_rejected(pipes: dict[str, Any]) -> None:
    pipe = pipes["wan"]
    with pytest.raises(ValueError, match="1-D"):
        steered_embeds(pipe, PROMPT, np.ones((2, 32), np.float32), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        steered_embeds(pipe, PROMPT, np.full(32, np.nan, np.float32), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        steered_embeds(pipe, PROMPT, np.ones(32, np.float32), float("inf"))
    with pytest.raises(ValueError, match="negative prompts"):
        steered_embeds(pipe, [PROMPT, PROMPT], np.ones(32, np.float32), 1.0, [NEGATIVE] * 3)


def test_unsupported_pipeline_is_rejected() -> None:
    class NotAPipeline:
        pass

    with pytest.raises(ValueError, match="NotAPipeline"):
        steered_embeds(NotAPipeline(), PROMPT, np.ones(4, np.float32), 1.0)


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_reproduces_the_unsteered_output(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    kw = _kwargs(family, **NO_CFG[family])
    plain = _media(family, pipe(PROMPT, generator=_seed(), **kw))
    steered = _media(family, steer(pipe, PROMPT, _vector(family), 0.0, generator=_seed(), **kw))
    assert np.array_equal(plain, steered)


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_with_negative_prompt_reproduces_cfg_output(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    kw = _kwargs(family, **CFG[family])
    plain = _media(family, pipe(PROMPT, negative_prompt=NEGATIVE, generator=_seed(), **kw))
    steered = _media(family, steer(pipe, PROMPT, _vector(family), 0.0, NEGATIVE, generator=_seed(), **kw))
    assert np.array_equal(plain, steered)


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_is_deterministic_and_changes_the_output(pipes: dict[str, Any], family: str) -> None:
    pipe, v = pipes[family], _vector(family)
    kw = _kwargs(family, **NO_CFG[family])
    first = _media(family, steer(pipe, PROMPT, v, 3.0, generator=_seed(), **kw))
    again = _media(family, steer(pipe, PROMPT, v, 3.0, generator=_seed(), **kw))
    plain = _media(family, steer(pipe, PROMPT, v, 0.0, generator=_seed(), **kw))
    assert np.array_equal(first, again)
    assert np.isfinite(first).all()
    assert not np.array_equal(first, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_guidance_path_runs(pipes: dict[str, Any], family: str) -> None:
    pipe, v = pipes[family], _vector(family)
    with_neg = _media(
        family, steer(pipe, PROMPT, v, 2.0, NEGATIVE, generator=_seed(), **_kwargs(family, **CFG[family]))
    )
    without = _media(family, steer(pipe, PROMPT, v, 2.0, generator=_seed(), **_kwargs(family, **NO_CFG[family])))
    assert with_neg.shape == without.shape
    assert np.isfinite(with_neg).all()
    assert not np.array_equal(with_neg, without)


def test_batch_of_prompts_with_one_negative(pipes: dict[str, Any]) -> None:
    out = _media(
        "sd3",
        steer(
            pipes["sd3"],
            [PROMPT, "a dog"],
            _vector("sd3"),
            1.0,
            NEGATIVE,
            generator=_seed(),
            **_kwargs("sd3"),
        ),
    )
    assert out.shape[0] == 2


def test_steer_refuses_arguments_it_sets_itself(pipes: dict[str, Any]) -> None:
    pipe = pipes["flux"]
    with pytest.raises(ValueError, match="prompt_embeds"):
        steer(pipe, PROMPT, _vector("flux"), 1.0, prompt_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        steer(pipe, PROMPT, _vector("flux"), 1.0, num_images_per_prompt=2, **_kwargs("flux"))
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        steer(pipes["wan"], PROMPT, _vector("wan"), 1.0, num_videos_per_prompt=2, **_kwargs("wan"))
