"""Generation for evaluation: a full diffusers pipeline, prompts encoded once, α·v added per call.

An α sweep over one prompt differs only in ``alpha * v``; re-running the text encoders for
every (method, α, seed) would dominate CPU time and keep a multi-GB T5/Qwen encoder on the
GPU for nothing. So :class:`PromptEmbeddings` calls the pipeline's **own** ``encode_prompt``
(through ``eval.steering``'s per-family encoders, the very code ``steer()`` uses) once per
prompt, keeps the unsteered ``pipe(...)`` keyword arguments on the CPU together with the
positions to steer, encodes the negative prompt **once** for all prompts, and is used a chunk of
prompts at a time (:meth:`PromptEmbeddings.forget` drops a finished chunk), so memory does not
grow with the prompt set (Wan: ~4 MiB of embeddings per prompt). :func:`steered_kwargs` adds
``alpha * v`` at the pooled positions exactly as ``steered_embeds`` does (same float32
arithmetic, same dtype round trip), so a cached α = 0 call reproduces ``pipe(prompt=...)`` bit
for bit and a cached α > 0 call reproduces ``steer()``.

Generation settings (steps, guidance, size...) are part of every output's identity, so they
live in a frozen, hashable :class:`GenerationSettings`; ``max_sequence_length`` is pinned to the
value the target was extracted with, because for Flux and SD3 the padded length is part of the
representation the vector was computed in.

**SafeDIG jobs** (METHOD-SAFEDIG §7) steer with forward hooks instead: a pipeline call's outputs share
one prompt, one bundle variant and one edit mode, and each output gets its own strength s (the
conditional batch's rows, in job order, through :func:`safeport.eval.safedig.safedig_hooks`). A bundle
with text-encoder (``te.*``) positions needs the prompt encoded under those hooks, once per distinct
strength of the call (never cached: :class:`PromptEmbeddings` holds unsteered encodings only); a bundle
without them reuses the cached encoding and hooks the denoiser only. Vector jobs and SafeDIG jobs are
never mixed in one call.

No store access here: vectors and bundles arrive as arrays and images leave as PIL images.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image

from safeport.errors import is_out_of_memory
from safeport.eval.safedig import MODES, Mode, SafeDigBundle, safedig_hooks
from safeport.eval.steering import (
    RESERVED_KWARGS,
    add_to_prompt_embeds,
    check_vector,
    family_of,
    steer,
    steering_positions,
)
from safeport.extractors.base import ModelSource, check_device, model_load_errors, resolve_device, resolve_dtype
from safeport.extractors.pipeline_encoder import (
    FAMILIES,
    PipelineFamily,
    Positions,
    drop_constant_prefix_of,
    family_of_pipeline,
    max_sequence_length_of,
    quiet_pipeline_logs,
)
from safeport.keys import content_key

log = logging.getLogger("safeport.eval")

# diffusers pipelines register components as dynamic attributes; see extractors/pipeline_encoder.py.
Pipeline = Any
Scalar = str | int | float | bool | None

VIDEO_FRAMES = 4  # frames scored per video (METHOD §8)
DEFAULT_SEED = 42


@dataclass(frozen=True)
class CardSettings:
    """Generation defaults of one checkpoint: ``pipe(...)`` arguments, negative prompt, component dtypes."""

    call: Mapping[str, Scalar]
    negative_prompt: str | None = None
    dtypes: Mapping[str, str] = field(default_factory=dict)  # component -> dtype it is loaded in


# Wan 2.x's default negative prompt, verbatim from the Wan2.2-T2V-A14B-Diffusers model card (a list of
# artefacts to avoid: garish colours, overexposure, static frames, blur, subtitles, deformed hands...).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Per-checkpoint generation defaults (the hub id names the checkpoint; a checkpoint not listed runs with
# its pipeline's own ``__call__`` defaults). Each value is from the checkpoint's model card unless the
# paper's Appendix B states it: then the paper wins, and the comment says so. The catalog's
# ``generation:`` and ``--set`` override any of them (e.g. ``--set height=512 --set width=512``).
# ``max_sequence_length`` is not here: it is the extracted ``max_tokens`` (Schnell 256, the others 512).
CARD_SETTINGS: dict[str, CardSettings] = {
    # FLUX.1-schnell card: guidance_scale=0.0, num_inference_steps=4, max_sequence_length=256, 1024x1024.
    # Paper (App. B): 4 steps, the same.
    "black-forest-labs/FLUX.1-schnell": CardSettings(
        {"num_inference_steps": 4, "guidance_scale": 0.0, "height": 1024, "width": 1024}
    ),
    # FLUX.1-dev card: guidance_scale=3.5, num_inference_steps=50, max_sequence_length=512, 1024x1024.
    # Paper (App. B): 28 steps -> the paper wins over the card's 50.
    "black-forest-labs/FLUX.1-dev": CardSettings(
        {"num_inference_steps": 28, "guidance_scale": 3.5, "height": 1024, "width": 1024}
    ),
    # Qwen-Image card: num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" ", 1:1 = 1328x1328.
    # Paper (App. B): 4 steps *with the Lightning LoRA*; safeport does not load LoRAs, so the card's
    # settings stand (4 steps without the LoRA would not be the paper's setting either).
    "Qwen/Qwen-Image": CardSettings(
        {"num_inference_steps": 50, "true_cfg_scale": 4.0, "height": 1328, "width": 1328}, negative_prompt=" "
    ),
    # Z-Image-Turbo card: num_inference_steps=9 ("8 DiT forwards"), guidance_scale=0.0, 1024x1024.
    # Paper (App. B): 4 steps -> the paper wins over the card's 9.
    "Tongyi-MAI/Z-Image-Turbo": CardSettings(
        {"num_inference_steps": 4, "guidance_scale": 0.0, "height": 1024, "width": 1024}
    ),
    # Wan2.2-T2V-A14B-Diffusers card: VAE in float32, height=720, width=1280, num_frames=81,
    # guidance_scale=4.0, guidance_scale_2=3.0, num_inference_steps=40, its Chinese negative prompt.
    # Paper (App. B): 4 steps per expert *with the Lightning LoRA*; not loaded here, so the card stands.
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": CardSettings(
        {
            "num_inference_steps": 40,
            "guidance_scale": 4.0,
            "guidance_scale_2": 3.0,
            "height": 720,
            "width": 1280,
            "num_frames": 81,
        },
        negative_prompt=WAN_NEGATIVE_PROMPT,
        dtypes={"vae": "float32"},
    ),
}

# Set by generate() itself; as settings they would be ignored or break the one-output-per-call contract.
_NOT_SETTINGS = RESERVED_KWARGS | {"generator", "output_type", "return_dict", "latents", "callback_on_step_end"}


# ``generation:`` keys that say how to run, not what to generate: never pipeline arguments, never in a key.
RUN_OPTIONS = ("batch_size", "seconds_per_output")


@dataclass(frozen=True)
class RunOptions:
    """How a sweep runs (not what it makes): outputs per pipeline call, and a GPU-time estimate per output."""

    batch_size: int = 1
    seconds_per_output: float | None = None


def split_run_options(settings: Mapping[str, Scalar]) -> tuple[dict[str, Scalar], RunOptions]:
    """``settings`` without :data:`RUN_OPTIONS`, and those options validated."""
    rest = {k: v for k, v in settings.items() if k not in RUN_OPTIONS}
    batch = settings.get("batch_size", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"generation setting batch_size={batch!r} must be an integer >= 1 (outputs per pipeline call)")
    per = settings.get("seconds_per_output")
    if per is not None and (isinstance(per, (bool, str)) or not math.isfinite(float(per)) or float(per) <= 0):
        raise ValueError(f"generation setting seconds_per_output={per!r} must be a positive number of seconds")
    return rest, RunOptions(batch, None if per is None else float(per))


def pipeline_family(source: ModelSource) -> PipelineFamily:
    """The diffusers family of a catalog model, or a ValueError saying which families generate."""
    if source.family not in FAMILIES:
        raise ValueError(
            f"model {source.name!r} has family {source.family!r}, which is not a diffusion pipeline; "
            f"generation needs a target of family {', '.join(FAMILIES)}"
        )
    return FAMILIES[source.family]


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides prompt, vector, α and seed that decides an output; hashed into its key.

    ``call`` holds the extra ``pipe(...)`` keyword arguments (sorted, JSON scalars);
    ``negative_prompt`` is encoded once with the prompt and passed unsteered.
    """

    call: tuple[tuple[str, Scalar], ...]
    max_sequence_length: int
    negative_prompt: str | None = None
    dtypes: tuple[tuple[str, str], ...] = ()  # components loaded in another dtype than the model's (Wan: vae)
    drop_constant_prefix: bool = False  # the target's option: constant leading positions are not steered

    def call_kwargs(self) -> dict[str, Any]:
        return {**dict(self.call), "max_sequence_length": self.max_sequence_length}

    def record(self) -> dict[str, Any]:
        """JSON-able description; the negative prompt appears only as a hash (texts stay out of tables).

        Fields at their defaults are left out, so settings that existed before them keep their keys.
        """
        neg = None if self.negative_prompt is None else content_key(self.negative_prompt, 16)
        out: dict[str, Any] = {
            "call": dict(self.call),
            "max_sequence_length": self.max_sequence_length,
            "negative_prompt_id": neg,
        }
        if self.dtypes:
            out["dtypes"] = dict(self.dtypes)
        if self.drop_constant_prefix:
            out["drop_constant_prefix"] = True
        return out

    @property
    def key(self) -> str:
        return content_key(self.record(), 16)


def resolve_settings(source: ModelSource, overrides: Mapping[str, Scalar] | None = None) -> GenerationSettings:
    """Model-card defaults for ``source`` updated by ``overrides``, checked against the pipeline's ``__call__``."""
    family = pipeline_family(source)
    card = CARD_SETTINGS.get(source.hub_id or "", CardSettings({}))
    merged: dict[str, Scalar] = dict(card.call)
    if card.negative_prompt is not None:
        merged["negative_prompt"] = card.negative_prompt
    merged.update(split_run_options(overrides or {})[0])
    extracted = max_sequence_length_of(source)
    msl = merged.pop("max_sequence_length", extracted)
    if msl != extracted:
        raise ValueError(
            f"max_sequence_length={msl!r} differs from the {extracted} that model {source.name!r} was extracted "
            "with; the vectors live in that representation. Drop the setting, or change the catalog's "
            "max_tokens (or options.max_sequence_length) and re-extract"
        )
    negative = merged.pop("negative_prompt", None)
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string, got {negative!r}")
    params = inspect.signature(getattr(diffusers, family.pipeline).__call__).parameters
    for name, value in merged.items():
        if name in _NOT_SETTINGS:
            raise ValueError(f"setting {name!r} is set by the generator itself; remove it from the settings")
        if name not in params:
            known = sorted(p for p in params if p not in _NOT_SETTINGS and p != "self")
            raise ValueError(f"{family.pipeline} has no argument {name!r}; settings can be any of {known}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"setting {name}={value!r} must be a number, string or boolean")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"setting {name}={value!r} must be finite")
    per_prompt = merged.get("num_images_per_prompt", merged.get("num_videos_per_prompt", 1))
    if per_prompt not in (1, None):
        raise ValueError(f"one output per call: drop num_images/videos_per_prompt={per_prompt}; sweep seeds instead")
    return GenerationSettings(
        tuple(sorted(merged.items())),
        int(msl),
        negative,
        tuple(sorted(card.dtypes.items())),
        drop_constant_prefix_of(source),
    )


def load_pipeline(source: ModelSource, *, offload: bool = False) -> Pipeline:
    """The full diffusers pipeline of a catalog target (denoiser, VAE, scheduler and text encoders).

    ``offload`` uses diffusers' model CPU offload (one component on the GPU at a time), for targets
    that do not fit the GPU whole (Wan 2.2 A14B on an 80 GB card). Components the model card loads in
    another dtype (:data:`CARD_SETTINGS`: Wan's VAE in float32) are loaded so from their own weights.
    """
    family = pipeline_family(source)
    check_device(source.device, source.name)
    device = resolve_device(source.device)
    dtype: Any = resolve_dtype(source.dtype, device)
    card = CARD_SETTINGS.get(source.hub_id or "", CardSettings({}))
    if card.dtypes:
        dtype = {"default": dtype, **{name: resolve_dtype(d, device) for name, d in card.dtypes.items()}}
    kwargs: dict[str, Any] = {"dtype": dtype}
    if source.hub_id is not None:
        kwargs["revision"] = source.revision
    with model_load_errors(source):
        pipe = getattr(diffusers, family.pipeline).from_pretrained(source.location, **kwargs)
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


@dataclass(frozen=True)
class Encoded:
    """One prompt's unsteered ``pipe(...)`` keyword arguments and the positions to steer (on the CPU).

    ``kwargs`` hold no ``negative_*`` entries: the negative prompt is encoded once per sweep
    (:meth:`PromptEmbeddings.negative_kwargs`).
    """

    kwargs: Mapping[str, Any]
    positions: Positions


class PromptEmbeddings:
    """Unsteered ``pipe(...)`` keyword arguments per prompt, encoded once and kept on the CPU.

    Prompts are encoded one at a time, exactly as ``pipe(prompt=p)`` would encode them (a batch
    would pad Qwen-Image/Z-Image prompts to the batch's longest and change the call). The negative
    prompt's embeddings are the same for every prompt, so one copy is kept. Texts are held in
    memory only, never logged.
    """

    def __init__(self, pipe: Pipeline, settings: GenerationSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        self._encode = family_of(pipe).encode
        self._cache: dict[str, Encoded] = {}
        self._negative: dict[str, Any] | None = None
        self._released = False

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, prompt: str) -> Encoded:
        """The cached encoding of ``prompt`` (on the CPU), encoding it on first use."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt not in self._cache:
            if self._released:
                raise ValueError(
                    "a prompt arrived after the text encoders were released; call encode_all() with every "
                    "prompt of the sweep (or chunk) before release_text_encoders()"
                )
            # The negative branch is encoded with the first prompt only: it is the same for every prompt.
            first = self._negative is None
            negatives = [self.settings.negative_prompt] if first and self.settings.negative_prompt is not None else None
            extra = {"clip_skip": dict(self.settings.call).get("clip_skip"), "negative": first}
            msl = self.settings.max_sequence_length
            with torch.no_grad(), quiet_pipeline_logs(self.pipe):
                kwargs = self._encode(self.pipe, [prompt], negatives, msl, extra)
                positions = steering_positions(self.pipe, [prompt], kwargs, msl, self.settings.drop_constant_prefix)
            negative = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("negative_")}
            if first:
                self._negative = {k: _to(v, "cpu") for k, v in negative.items()}
            self._cache[prompt] = Encoded({k: _to(v, "cpu") for k, v in kwargs.items()}, _to(positions, "cpu"))
        return self._cache[prompt]

    def encode_under(self, prompt: str, hooks: AbstractContextManager[Any]) -> dict[str, Any]:
        """``prompt``'s ``pipe(...)`` kwargs encoded while ``hooks`` are in place (not cached, no negative branch).

        What a SafeDIG bundle with text-encoder positions needs: the edit happens inside the encoder,
        so the encoding depends on the strength. The negative prompt stays the cached unsteered one.
        """
        if self._released:
            raise ValueError(
                "a SafeDIG bundle with text-encoder positions needs the text encoders, but they were released; "
                "encode under the hooks before release_text_encoders()"
            )
        extra = {"clip_skip": dict(self.settings.call).get("clip_skip"), "negative": False}
        with torch.no_grad(), quiet_pipeline_logs(self.pipe), hooks:
            kwargs = self._encode(self.pipe, [prompt], None, self.settings.max_sequence_length, extra)
        return {k: v for k, v in kwargs.items() if not k.startswith("negative_")}

    def negative_kwargs(self, device: torch.device | str) -> dict[str, Any]:
        """The ``negative_*`` keyword arguments (unsteered) on ``device``; empty before the first prompt."""
        return {k: _to(v, device) for k, v in (self._negative or {}).items()}

    def encode_all(self, prompts: Iterable[str]) -> None:
        for p in prompts:
            self.get(p)

    @property
    def released(self) -> bool:
        """True once the text encoders are gone: no new prompt can be encoded."""
        return self._released

    def forget(self, prompts: Iterable[str]) -> None:
        """Drop the cached embeddings of ``prompts`` (a finished chunk of the sweep)."""
        for p in prompts:
            self._cache.pop(p, None)

    @property
    def dim(self) -> int | None:
        """Width of the steered ``prompt_embeds`` (None before the first prompt is encoded)."""
        for enc in self._cache.values():
            embeds = enc.kwargs["prompt_embeds"]
            return int(embeds[0].shape[-1]) if isinstance(embeds, list) else int(embeds.shape[-1])
        return None

    def release_text_encoders(self) -> None:
        """Drop the text encoders (every prompt must be encoded by now) and return their memory.

        Every family's ``__call__`` runs without them once ``prompt_embeds`` are given. Under
        ``enable_model_cpu_offload`` the pipeline's offload hooks also hold each text encoder (its
        own hook, and the next model's hook that offloads it), so those references are removed too;
        otherwise the encoders would stay in memory until the first ``pipe()`` call re-registers them.
        """
        release_components(self.pipe, [c for c in family_of_pipeline(self.pipe).components if c.startswith("text_")])
        self._released = True


def release_components(pipe: Pipeline, names: Iterable[str]) -> None:
    """Set ``pipe.<name>`` to None for each name and drop every offload-hook reference to those modules."""
    from accelerate.hooks import remove_hook_from_module

    released = []
    for name in names:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if isinstance(module, torch.nn.Module) and hasattr(module, "_hf_hook"):
            remove_hook_from_module(module, recurse=True)
        released.append(module)
        setattr(pipe, name, None)
    hooks = getattr(pipe, "_all_hooks", None)
    if hooks:
        gone = [h for h in hooks if any(h.model is m for m in released)]
        pipe._all_hooks = [h for h in hooks if all(h is not g for g in gone)]
        for h in pipe._all_hooks:  # the next model's hook offloads the previous one: unlink released ones
            prev = getattr(h.hook, "prev_module_hook", None)
            if any(prev is g for g in gone):
                h.hook.prev_module_hook = None
    del released
    free_memory()


def steered_kwargs(
    cached: Encoded, vector: np.ndarray | None, alpha: float, device: torch.device | str
) -> dict[str, Any]:
    """Cached unsteered kwargs on ``device`` with ``alpha * vector`` added at the cached steering positions.

    ``vector=None`` means the original model and requires ``alpha == 0``.
    """
    kwargs = {k: _to(v, device) for k, v in cached.kwargs.items()}
    if vector is None:
        if alpha != 0:
            raise ValueError(f"alpha={alpha} without a vector; pass the steering vector or alpha=0")
        return kwargs
    return add_to_prompt_embeds(
        kwargs, check_vector(vector, alpha), alpha, "the pipeline's", _to(cached.positions, device)
    )


def seeded(seed: int) -> torch.Generator:
    """A CPU generator: diffusers draws the initial noise on it, so a seed gives the same image on any device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def evenly_spaced(n_frames: int, k: int = VIDEO_FRAMES) -> list[int]:
    """``k`` frame indices spread over ``n_frames`` from first to last (all frames if there are fewer)."""
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {n_frames}")
    return sorted({int(x) for x in np.rint(np.linspace(0, n_frames - 1, num=min(k, n_frames)))})


def _to_pil(array: np.ndarray) -> Image.Image:
    # diffusers' own numpy_to_pil conversion, so "np" output equals "pil" output pixel for pixel.
    return Image.fromarray((np.asarray(array) * 255).round().astype("uint8"))


def output_images(out: Any, index: int = 0) -> list[Image.Image]:
    """Output ``index`` of a pipeline call: one PIL image, or :data:`VIDEO_FRAMES` evenly spaced video frames."""
    frames = getattr(out, "frames", None)
    if frames is not None:
        video = np.asarray(frames[index])
        return [_to_pil(video[i]) for i in evenly_spaced(video.shape[0])]
    image = out.images[index]
    return [image if isinstance(image, Image.Image) else _to_pil(np.asarray(image))]


@dataclass(frozen=True, eq=False)
class SafeDigSteering:
    """The edit of a SafeDIG job: a bundle variant (its positions and decoder) and the edit mode.

    ``key`` names the variant (the outputs' ``vector_id``); jobs of one pipeline call share it.
    """

    key: str
    bundle: SafeDigBundle
    mode: Mode = "safedig"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown SafeDIG mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.bundle.steered:
            raise ValueError(
                f"SafeDIG bundle {self.bundle.name!r} has no positions in this variant; "
                "rebuild it with `safeport safedig`"
            )

    def split(self) -> tuple[SafeDigBundle, SafeDigBundle]:
        """(text-encoder positions, denoiser positions) of the variant: edited at encode time and in the call."""
        te = tuple(p for p in self.bundle.steered if p.position.startswith("te."))
        rest = tuple(p for p in self.bundle.steered if not p.position.startswith("te."))
        return replace(self.bundle, positions=te, view=True), replace(self.bundle, positions=rest, view=True)


@dataclass(frozen=True)
class Job:
    """One output of a prompt: the steering (``vector=None``: the original model) and its seed.

    A SafeDIG job has ``safedig`` set, no vector, and its strength s in ``alpha``.
    """

    vector: np.ndarray | None
    alpha: float
    seed: int = DEFAULT_SEED
    safedig: SafeDigSteering | None = None


def _stack(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-output ``pipe(...)`` kwargs of batch size 1 stacked into one batch (Z-Image's lists concatenated)."""
    out: dict[str, Any] = {}
    for name, first in parts[0].items():
        values = [p[name] for p in parts]
        out[name] = [t for v in values for t in v] if isinstance(first, list) else torch.cat(values)
    return out


def generate_batch(embeddings: PromptEmbeddings, prompt: str, jobs: Sequence[Job]) -> list[list[Image.Image]]:
    """The outputs of ``jobs`` for one prompt from **one** pipeline call, in ``jobs`` order.

    The steered ``prompt_embeds`` (and pooled / mask / negative embeds) of each job are stacked
    along the batch and each job gets its own seeded generator, so output ``i`` starts from the
    noise its seed defines; it equals the one-at-a-time output up to the batched kernels' rounding
    (README, "Batched generation"). A single job is exactly the one-at-a-time call.
    """
    if not jobs:
        return []
    pipe = embeddings.pipe
    device = pipe._execution_device
    cached = embeddings.get(prompt)
    steering = _call_steering(jobs)
    hooks: AbstractContextManager[Any] = nullcontext()
    if steering is None:
        kwargs = _stack([steered_kwargs(cached, j.vector, j.alpha, device) for j in jobs])
    else:
        te, denoiser = steering.split()
        encoded: dict[float, dict[str, Any]] = {}
        for s in dict.fromkeys(float(j.alpha) for j in jobs):
            if te.positions and s != 0:  # s = 0 edits nothing: the cached encoding is that call's encoding
                hooked = embeddings.encode_under(prompt, safedig_hooks(pipe, te, s, steering.mode))
                encoded[s] = {k: _to(v, device) for k, v in hooked.items()}
            else:
                encoded[s] = steered_kwargs(cached, None, 0.0, device)
        kwargs = _stack([encoded[float(j.alpha)] for j in jobs])
        if denoiser.positions:
            hooks = safedig_hooks(pipe, denoiser, [float(j.alpha) for j in jobs], steering.mode)
    negative = embeddings.negative_kwargs(device)
    if negative:
        kwargs |= _stack([negative] * len(jobs))
    generator: torch.Generator | list[torch.Generator] = (
        seeded(jobs[0].seed) if len(jobs) == 1 else [seeded(j.seed) for j in jobs]
    )
    with torch.no_grad(), hooks:
        out = pipe(**kwargs, **embeddings.settings.call_kwargs(), generator=generator, output_type="np")
    return [output_images(out, i) for i in range(len(jobs))]


def _call_steering(jobs: Sequence[Job]) -> SafeDigSteering | None:
    """The SafeDIG variant all ``jobs`` share (None: vector jobs), or a ValueError for a mixed call."""
    ids = {None if j.safedig is None else (j.safedig.key, j.safedig.mode) for j in jobs}
    if len(ids) > 1:
        raise ValueError(
            "one pipeline call mixes vector jobs and SafeDIG jobs (or two SafeDIG variants or modes); "
            "group a call's jobs by their steering (safeport.flows.eval.work_batches does)"
        )
    steering = jobs[0].safedig
    if steering is not None:
        if any(j.vector is not None for j in jobs):
            raise ValueError("a SafeDIG job steers with its bundle and strength (alpha); pass vector=None")
        bad = [j.alpha for j in jobs if not (math.isfinite(j.alpha) and j.alpha >= 0)]
        if bad:
            raise ValueError(f"SafeDIG strength {bad[0]!r} must be a finite number >= 0")
    return steering


def generate(
    embeddings: PromptEmbeddings, prompt: str, vector: np.ndarray | None, alpha: float, seed: int = DEFAULT_SEED
) -> list[Image.Image]:
    """One output (image, or 4 video frames) of ``prompt`` steered by ``alpha * vector``, from cached embeds."""
    return generate_batch(embeddings, prompt, [Job(vector, alpha, seed)])[0]


@dataclass(frozen=True)
class Generated:
    """One output's images and its share of the pipeline call's seconds."""

    images: list[Image.Image]
    seconds: float


class Batcher:
    """Generates a prompt's jobs ``batch_size`` per pipeline call, halving the batch on out-of-memory.

    Once halved, the smaller size is kept for later prompts. A call that ran out of memory
    produced nothing, so the retry makes exactly that call's outputs again in smaller calls: none is
    lost or made twice. A batch of one that still runs out of memory raises.
    """

    def __init__(self, embeddings: PromptEmbeddings, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.embeddings = embeddings
        self.batch_size = batch_size

    def run(self, prompt: str, jobs: Sequence[Job]) -> list[Generated]:
        """The outputs of ``jobs`` in order (one entry per job)."""
        out: list[Generated] = []
        while len(out) < len(jobs):
            part = jobs[len(out) : len(out) + self.batch_size]
            t0 = time.perf_counter()
            try:
                images = generate_batch(self.embeddings, prompt, part)
            except Exception as err:
                if not is_out_of_memory(err) or len(part) == 1:
                    raise
                self.batch_size = max(1, len(part) // 2)
                log.warning(
                    "out of GPU memory at %d outputs per call; retrying %d per call", len(part), self.batch_size
                )
                del err
                free_memory()
                continue
            seconds = (time.perf_counter() - t0) / len(part)
            out.extend(Generated(imgs, seconds) for imgs in images)
        return out


def generate_once(
    pipe: Pipeline,
    prompt: str,
    vector: np.ndarray,
    alpha: float,
    settings: GenerationSettings,
    seed: int = DEFAULT_SEED,
) -> list[Image.Image]:
    """A single steered output through :func:`safeport.eval.steering.steer` (no caching; for one-off generation)."""
    out = steer(
        pipe,
        prompt,
        vector,
        alpha,
        settings.negative_prompt,
        drop_constant_prefix=settings.drop_constant_prefix,
        **settings.call_kwargs(),
        generator=seeded(seed),
        output_type="np",
    )
    return output_images(out)


def vector_id(vector: np.ndarray | None) -> str:
    """Content hash of a steering vector's float32 values ("" for none): part of every output key."""
    if vector is None:
        return ""
    return content_key(np.ascontiguousarray(vector, dtype=np.float32), 16)


def free_memory() -> None:
    """Return freed tensors' memory to the device (after the last reference to a model is dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
