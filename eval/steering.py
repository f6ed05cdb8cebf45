"""Steering a diffusion pipeline (METHOD §7): add α·v to the ``prompt_embeds`` the denoiser consumes.

The prompt is encoded with the pipeline's **own** ``encode_prompt`` (so tokenisation, templates
and padding are exactly what generation would use), ``alpha * v`` is added, and the result goes
back to the pipeline as ``prompt_embeds=`` together with whatever else its ``__call__`` needs.

**One rule for every family: steer exactly the positions the representation was pooled over**
(:func:`safeport.extractors.pipeline_encoder.pooled_positions` decides both), so the vector is
added where it was measured:

- Flux.1: every position of the T5 ``prompt_embeds``, padding included (the denoiser attends to
  it and the target was pooled over it); the CLIP ``pooled_prompt_embeds`` pass through unchanged.
- SD3: every position of the concatenated CLIP+T5 ``prompt_embeds``; pooled embeds pass through.
- Z-Image: every row of each prompt's variable-length tensor (its real tokens).
- Qwen-Image: the positions of the returned mask (real tokens); the mask is passed on.
- Wan: the real tokens only; the zero padding after the real length stays zero, as the pipeline
  made it (it was never pooled).

With ``drop_constant_prefix=True`` (the target's catalog option of that name) the leading positions
identical for every prompt (Z-Image's ``<|im_start|>user`` line) are neither pooled nor steered.

Negative prompts are encoded by the same ``encode_prompt`` and passed as
``negative_prompt_embeds`` **unsteered**, so classifier-free guidance (SD3, Z-Image, Wan) and
true CFG (Flux ``true_cfg_scale``, Qwen-Image) behave as without steering. With ``alpha=0`` the
pipeline receives exactly the tensors it would have computed itself, so a seeded generation is
reproduced bit for bit.

No file I/O here: vectors arrive as arrays (loading them is the store's job).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from safeport.extractors.pipeline_encoder import Positions, pooled_positions, quiet_pipeline_logs
from safeport.mappers import vectors as _vectors

if TYPE_CHECKING:  # pragma: no cover
    from safeport.eval.safedig import SafeDigBundle

# diffusers pipelines register components as dynamic attributes; see extractors/pipeline_encoder.py.
Pipeline = Any
Prompt = str | Sequence[str]
# (pipe, prompts, negatives or None, max_sequence_length, extras) -> pipeline kwargs. Extras: ``clip_skip``
# (SD3) and ``negative`` (default True; False skips the negative branch of families that always encode one).
EncodeFn = Callable[[Pipeline, list[str], list[str] | None, int, Mapping[str, Any]], dict[str, Any]]

# Arguments steer() fills in itself; passing them too would silently bypass the steering.
RESERVED_KWARGS = frozenset(
    {
        "prompt",
        "prompt_2",
        "prompt_3",
        "negative_prompt",
        "negative_prompt_2",
        "negative_prompt_3",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "negative_prompt_embeds_mask",
    }
)


def combine(vectors: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Category-weighted direction Σ_c w_c v_c / Σ_c w_c over the categories in ``weights`` (METHOD §5).

    The public entry: it checks what a caller passes (each problem named with its fix), then the
    one implementation, :func:`safeport.mappers.vectors.combine`, computes it (the same function the
    fit and the eval sweep use). Categories present in ``vectors`` but absent from ``weights`` are
    inactive (weight 0).
    """
    if not vectors:
        raise ValueError("combine() got no vectors; pass one steering vector per category")
    if not weights:
        raise ValueError(f"combine() got no weights; give a weight for at least one of {sorted(vectors)}")
    unknown = sorted(set(weights) - set(vectors))
    if unknown:
        raise ValueError(f"weights name categories {unknown} with no vector; known categories: {sorted(vectors)}")
    bad = {c: w for c, w in weights.items() if not math.isfinite(float(w)) or float(w) < 0}
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {bad}; use 0 to switch a category off")
    if sum(float(w) for w in weights.values()) <= 0:
        raise ValueError("weights sum to 0; give at least one active category a positive weight")
    shapes = {c: np.shape(vectors[c]) for c in weights}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"vectors must be 1-D and of one length, got shapes {shapes}")
    return _vectors.combine(vectors, {c: float(w) for c, w in weights.items()})


def _as_list(prompt: Prompt, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    out = list(prompt)
    if not out or not all(isinstance(p, str) for p in out):
        raise ValueError(f"{what} must be a string or a non-empty sequence of strings")
    return out


# --- per-family encoding: unsteered kwargs for pipe(...) ----------------------------------------


def _flux(
    pipe: Pipeline, prompts: list[str], negatives: list[str] | None, msl: int, kw: Mapping[str, Any]
) -> dict[str, Any]:
    device = pipe._execution_device
    embeds, pooled, _ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=msl
    )
    out: dict[str, Any] = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if negatives is not None:
        neg, neg_pooled, _ids = pipe.encode_prompt(
            prompt=negatives, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=msl
        )
        out |= {"negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}
    return out


def _sd3(
    pipe: Pipeline, prompts: list[str], negatives: list[str] | None, msl: int, kw: Mapping[str, Any]
) -> dict[str, Any]:
    # Always computes the negative branch ("" by default), exactly as __call__ does under CFG;
    # unused when guidance_scale <= 1.
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=kw.get("negative", True),
        negative_prompt=negatives,
        clip_skip=kw.get("clip_skip"),
        max_sequence_length=msl,
    )
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": neg,
        "negative_pooled_prompt_embeds": neg_pooled,
    }


def _z_image(
    pipe: Pipeline, prompts: list[str], negatives: list[str] | None, msl: int, kw: Mapping[str, Any]
) -> dict[str, Any]:
    # encode_prompt rewrites its prompt lists in place (chat template): pass copies.
    embeds, neg = pipe.encode_prompt(
        prompt=list(prompts),
        device=pipe._execution_device,
        do_classifier_free_guidance=kw.get("negative", True),
        negative_prompt=None if negatives is None else list(negatives),
        max_sequence_length=msl,
    )
    return {"prompt_embeds": embeds, "negative_prompt_embeds": neg}


def _qwen_image(
    pipe: Pipeline, prompts: list[str], negatives: list[str] | None, msl: int, kw: Mapping[str, Any]
) -> dict[str, Any]:
    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(
            prompt=texts, device=pipe._execution_device, num_images_per_prompt=1, max_sequence_length=msl
        )
        # None means "all real"; an explicit all-ones mask is turned back into None by __call__.
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    embeds, mask = encode(prompts)
    out: dict[str, Any] = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
    if negatives is not None:
        neg, neg_mask = encode(negatives)
        out |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
    return out


def _wan(
    pipe: Pipeline, prompts: list[str], negatives: list[str] | None, msl: int, kw: Mapping[str, Any]
) -> dict[str, Any]:
    embeds, neg = pipe.encode_prompt(
        prompt=prompts,
        negative_prompt=negatives,
        do_classifier_free_guidance=kw.get("negative", True),
        num_videos_per_prompt=1,
        max_sequence_length=msl,
        device=pipe._execution_device,
    )
    return {"prompt_embeds": embeds, "negative_prompt_embeds": neg}


@dataclass(frozen=True)
class PipelineSteering:
    """How one pipeline family is steered: its prompt encoder and its outputs-per-prompt argument."""

    encode: EncodeFn
    per_prompt_arg: str  # images/videos per prompt: only 1 works with precomputed embeds


_FAMILIES: dict[str, PipelineSteering] = {
    "FluxPipeline": PipelineSteering(_flux, "num_images_per_prompt"),
    "StableDiffusion3Pipeline": PipelineSteering(_sd3, "num_images_per_prompt"),
    "ZImagePipeline": PipelineSteering(_z_image, "num_images_per_prompt"),
    "QwenImagePipeline": PipelineSteering(_qwen_image, "num_images_per_prompt"),
    "WanPipeline": PipelineSteering(_wan, "num_videos_per_prompt"),
}


def family_of(pipe: Pipeline) -> PipelineSteering:
    """The steering entry for ``pipe``'s class (or a subclass of a supported pipeline)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    raise ValueError(
        f"steering supports {', '.join(_FAMILIES)}; got {type(pipe).__name__}. "
        "Add an encode function for it in eval/steering.py."
    )


def _default_max_sequence_length(pipe: Pipeline) -> int:
    """The ``max_sequence_length`` default of the pipeline's own ``__call__`` (e.g. SD3 256, Flux 512)."""
    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if param is None or not isinstance(param.default, int):
        raise ValueError(f"{type(pipe).__name__}.__call__ has no integer max_sequence_length default")
    return param.default


def _add(embeds: torch.Tensor, vector: torch.Tensor, alpha: float, positions: torch.Tensor) -> torch.Tensor:
    """``embeds + alpha * vector`` at ``positions`` (0/1, ``embeds``'s shape minus the last dim), in float32."""
    shift = alpha * vector.to(device=embeds.device, dtype=torch.float32)
    where = positions.to(device=embeds.device, dtype=torch.float32).unsqueeze(-1)
    return (embeds.to(torch.float32) + where * shift).to(embeds.dtype)


def check_vector(vector: np.ndarray, alpha: float) -> torch.Tensor:
    """A 1-D, finite steering vector as a float32 tensor (with a finite ``alpha``), or a clear ValueError."""
    v = np.asarray(vector)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"steering vector must be 1-D and non-empty, got shape {v.shape}; combine() categories first")
    if not np.isfinite(v).all():
        raise ValueError("steering vector contains NaN/inf; recompute or reload it")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return torch.from_numpy(v.astype(np.float32, copy=True))


def steered_embeds(
    pipe: Pipeline,
    prompt: Prompt,
    vector: np.ndarray,
    alpha: float,
    negative_prompt: Prompt | None = None,
    *,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    drop_constant_prefix: bool = False,
    unsteered: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)``: steered ``prompt_embeds`` plus the unsteered rest.

    ``unsteered``: the pipeline's own encoding only (``vector`` is ignored): what a SafeDIG-only
    call passes on, encoded while its text-encoder hooks are in place.

    ``max_sequence_length`` defaults to the pipeline's ``__call__`` default and must equal the
    value given to ``pipe(...)``. ``clip_skip`` is used by SD3 only. ``drop_constant_prefix`` must
    match the target's catalog option of that name (the positions the vector was pooled over).
    """
    family = family_of(pipe)
    prompts = _as_list(prompt, "prompt")
    negatives: list[str] | None = None
    if negative_prompt is not None:
        negatives = _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one per prompt"
            )
    v = None if unsteered else check_vector(vector, alpha)
    msl = _default_max_sequence_length(pipe) if max_sequence_length is None else max_sequence_length
    extra = {"clip_skip": clip_skip}
    # no_grad rather than inference_mode: these tensors go on into __call__, outside inference mode.
    with torch.no_grad(), quiet_pipeline_logs(pipe):
        kwargs = family.encode(pipe, prompts, negatives, msl, extra)
        if v is None:
            return kwargs
        positions = steering_positions(pipe, prompts, kwargs, msl, drop_constant_prefix)
    return add_to_prompt_embeds(kwargs, v, alpha, type(pipe).__name__, positions)


def steering_positions(
    pipe: Pipeline, prompts: list[str], kwargs: Mapping[str, Any], msl: int, drop_constant_prefix: bool = False
) -> Positions:
    """The positions of ``kwargs["prompt_embeds"]`` to steer: exactly those the target was pooled over."""
    return pooled_positions(
        pipe, prompts, kwargs["prompt_embeds"], kwargs.get("prompt_embeds_mask"), msl, drop_constant_prefix
    )


def add_to_prompt_embeds(
    kwargs: dict[str, Any], v: torch.Tensor, alpha: float, owner: str, positions: Positions
) -> dict[str, Any]:
    """Add ``alpha * v`` to ``kwargs["prompt_embeds"]`` (a tensor or a per-prompt list) at ``positions``.

    The one place the steering edit happens, shared by :func:`steered_embeds` and the cached
    α-sweep path of :mod:`safeport.eval.generate`; ``positions`` come from :func:`steering_positions`;
    ``owner`` names the pipeline in the dimension error.
    """
    embeds = kwargs["prompt_embeds"]
    dim = int(embeds[0].shape[-1]) if isinstance(embeds, list) else int(embeds.shape[-1])
    if v.shape[0] != dim:
        raise ValueError(
            f"steering vector has dim {v.shape[0]} but {owner} prompt_embeds have dim {dim}; "
            "use the vector transferred to this pipeline's text encoder"
        )
    if isinstance(embeds, list):
        kwargs["prompt_embeds"] = [_add(e, v, alpha, p) for e, p in zip(embeds, positions, strict=True)]
    elif isinstance(positions, torch.Tensor):
        kwargs["prompt_embeds"] = _add(embeds, v, alpha, positions)
    else:
        raise TypeError("a prompt_embeds tensor needs a positions tensor")
    return kwargs


def steer(
    pipe: Pipeline,
    prompt: Prompt,
    vector: np.ndarray | None = None,
    alpha: float = 0.0,
    negative_prompt: Prompt | None = None,
    *,
    safedig: SafeDigBundle | None = None,
    strength: float | Sequence[float] = 1.0,
    mode: str = "safedig",
    steps: tuple[int, int] | None = None,
    drop_constant_prefix: bool = False,
    **generate_kwargs: Any,
) -> Any:
    """Generate steered by a vector (cross-model, METHOD §7), a SafeDIG bundle (METHOD-SAFEDIG §7), or both.

    ``vector``: ``alpha * vector`` is added to the prompt's ``prompt_embeds`` at its pooled positions.
    ``safedig``: Blend and Repel (or one ablation ``mode``: blend, repel, ablate) at the bundle's
    positions with strength ``strength`` (one s, or one per prompt of the call), on the conditional
    branch, every denoising step or ``steps=(first, last)``; text-encoder positions are edited in the
    pipeline's own encode path. Both together compose: the bundle's text-encoder edits happen inside
    the encoding the vector is then added to. ``generate_kwargs`` go to ``pipe(...)`` unchanged
    (height, steps, guidance, generator...). One output per prompt: for more, repeat the prompt in a
    list or loop over seeds, because Flux, SD3 and Wan do not replicate precomputed embeds per
    ``num_images_per_prompt``.
    """
    if vector is None and safedig is None:
        raise ValueError("steer() needs a vector (with alpha) or a safedig bundle (with strength), or both")
    clash = sorted(RESERVED_KWARGS & set(generate_kwargs))
    if clash:
        raise ValueError(f"steer() sets {clash} itself; pass the text as prompt/negative_prompt instead")
    family = family_of(pipe)
    per_prompt = generate_kwargs.get(family.per_prompt_arg, 1)
    if per_prompt not in (1, None):
        raise ValueError(
            f"{family.per_prompt_arg}={per_prompt} is not supported with steering; "
            "repeat the prompt in a list (with a list of generators) instead"
        )
    msl = generate_kwargs.get("max_sequence_length")
    hooks: Any = contextlib.nullcontext()
    negatives: dict[str, Any] = {}
    if safedig is not None:
        from safeport.eval.safedig import MODES, check_strengths, safedig_hooks

        if mode not in MODES:
            raise ValueError(f"unknown SafeDIG mode {mode!r}; choose one of {', '.join(MODES)}")
        check_strengths(strength)  # before any model runs
        hooks = safedig_hooks(pipe, safedig, strength, mode, steps)
        if any(p.position.startswith("te.") for p in safedig.steered):
            # Conditional branch only (§7): the negative branch ("" under CFG, or the negative prompt) is
            # encoded without the text-encoder hooks, and replaces what the hooked encoding computed for it.
            plain = steered_embeds(
                pipe,
                prompt,
                np.zeros(1, dtype=np.float32),
                0.0,
                negative_prompt,
                max_sequence_length=msl,
                clip_skip=generate_kwargs.get("clip_skip"),
                unsteered=True,
            )
            negatives = {k: v for k, v in plain.items() if k.startswith("negative_")}
    with hooks:
        kwargs = steered_embeds(
            pipe,
            prompt,
            np.zeros(1, dtype=np.float32) if vector is None else vector,
            0.0 if vector is None else alpha,
            negative_prompt,
            max_sequence_length=msl,
            clip_skip=generate_kwargs.get("clip_skip"),
            drop_constant_prefix=drop_constant_prefix,
            unsteered=vector is None,
        )
        kwargs |= negatives
        return pipe(**kwargs, **generate_kwargs)
