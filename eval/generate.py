"""Generation for evaluation: a full diffusers pipeline, prompts encoded once, α·v added per call.

An α sweep over one prompt differs only in ``alpha * v``; re-running the text encoders for
every (method, α, seed) would dominate CPU time and keep a multi-GB T5/Qwen encoder on the
GPU for nothing. So :class:`PromptEmbeddings` calls the pipeline's **own** ``encode_prompt``
(through ``eval.steering``'s per-family encoders, the very code ``steer()`` uses) once per
prompt, keeps the unsteered ``pipe(...)`` keyword arguments on the CPU, and can then drop the
text encoders. :func:`steered_kwargs` adds ``alpha * v`` to every token exactly as
``steered_embeds`` does (same float32 arithmetic, same dtype round trip), so a cached α = 0
call reproduces ``pipe(prompt=...)`` bit for bit and a cached α > 0 call reproduces ``steer()``.

Generation settings (steps, guidance, size...) are part of every output's identity, so they
live in a frozen, hashable :class:`GenerationSettings`; ``max_sequence_length`` is pinned to the
value the target was extracted with, because for Flux and SD3 the padded length is part of the
representation the vector was computed in.

No store access here: vectors arrive as arrays and images leave as PIL images.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image

from safeport.eval.steering import RESERVED_KWARGS, add_to_prompt_embeds, check_vector, family_of, steer
from safeport.extractors.base import ModelSource, check_device, model_load_errors, resolve_device, resolve_dtype
from safeport.extractors.pipeline_encoder import FAMILIES, PipelineFamily, max_sequence_length_of, quiet_pipeline_logs

# diffusers pipelines register components as dynamic attributes; see extractors/pipeline_encoder.py.
Pipeline = Any
Scalar = str | int | float | bool | None

VIDEO_FRAMES = 4  # frames scored per video (METHOD §8)
DEFAULT_SEED = 42

# Call settings from each checkpoint's model card; a checkpoint not listed runs with its pipeline's
# own ``__call__`` defaults. Resolution is left to the pipeline (the model's native size) unless
# overridden (e.g. ``--set height=512 --set width=512`` for a cheaper sweep).
MODEL_CARD_SETTINGS: dict[str, dict[str, Scalar]] = {
    "black-forest-labs/FLUX.1-schnell": {"num_inference_steps": 4, "guidance_scale": 0.0},
    "black-forest-labs/FLUX.1-dev": {"num_inference_steps": 28, "guidance_scale": 3.5},
    "Qwen/Qwen-Image": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "negative_prompt": " "},
    "Tongyi-MAI/Z-Image-Turbo": {"num_inference_steps": 9, "guidance_scale": 0.0},
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": {
        "num_inference_steps": 40,
        "guidance_scale": 4.0,
        "guidance_scale_2": 3.0,
    },
}

# Set by generate() itself; as settings they would be ignored or break the one-output-per-call contract.
_NOT_SETTINGS = RESERVED_KWARGS | {"generator", "output_type", "return_dict", "latents", "callback_on_step_end"}


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

    def call_kwargs(self) -> dict[str, Any]:
        return {**dict(self.call), "max_sequence_length": self.max_sequence_length}

    def record(self) -> dict[str, Any]:
        """JSON-able description; the negative prompt appears only as a hash (texts stay out of tables)."""
        neg = None if self.negative_prompt is None else hashlib.sha256(self.negative_prompt.encode()).hexdigest()[:16]
        return {"call": dict(self.call), "max_sequence_length": self.max_sequence_length, "negative_prompt_id": neg}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


def resolve_settings(source: ModelSource, overrides: Mapping[str, Scalar] | None = None) -> GenerationSettings:
    """Model-card defaults for ``source`` updated by ``overrides``, checked against the pipeline's ``__call__``."""
    family = pipeline_family(source)
    merged: dict[str, Scalar] = dict(MODEL_CARD_SETTINGS.get(source.hub_id or "", {}))
    merged.update(overrides or {})
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
    return GenerationSettings(tuple(sorted(merged.items())), int(msl), negative)


def load_pipeline(source: ModelSource, *, offload: bool = False) -> Pipeline:
    """The full diffusers pipeline of a catalog target (denoiser, VAE, scheduler and text encoders).

    ``offload`` uses diffusers' model CPU offload (one component on the GPU at a time), for targets
    that do not fit the GPU whole (Wan 2.2 A14B on an 80 GB card).
    """
    family = pipeline_family(source)
    check_device(source.device, source.name)
    device = resolve_device(source.device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(source.dtype, device)}
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


class PromptEmbeddings:
    """Unsteered ``pipe(...)`` keyword arguments per prompt, encoded once and kept on the CPU.

    Prompts are encoded one at a time, exactly as ``pipe(prompt=p)`` would encode them (a batch
    would pad Qwen-Image/Z-Image prompts to the batch's longest and change the call). Texts are
    held in memory only, never logged.
    """

    def __init__(self, pipe: Pipeline, settings: GenerationSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        self._encode = family_of(pipe).encode
        self._cache: dict[str, dict[str, Any]] = {}
        self._released = False

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, prompt: str) -> dict[str, Any]:
        """The cached kwargs of ``prompt`` (on the CPU), encoding it on first use."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt not in self._cache:
            if self._released:
                raise ValueError(
                    "a prompt arrived after the text encoders were released; call encode_all() with every "
                    "prompt of the sweep before release_text_encoders()"
                )
            negatives = None if self.settings.negative_prompt is None else [self.settings.negative_prompt]
            extra = {"clip_skip": dict(self.settings.call).get("clip_skip")}
            with torch.no_grad(), quiet_pipeline_logs(self.pipe):
                kwargs = self._encode(self.pipe, [prompt], negatives, self.settings.max_sequence_length, extra)
            self._cache[prompt] = {k: _to(v, "cpu") for k, v in kwargs.items()}
        return self._cache[prompt]

    def encode_all(self, prompts: Iterable[str]) -> None:
        for p in prompts:
            self.get(p)

    @property
    def dim(self) -> int | None:
        """Width of the steered ``prompt_embeds`` (None before the first prompt is encoded)."""
        for kwargs in self._cache.values():
            embeds = kwargs["prompt_embeds"]
            return int(embeds[0].shape[-1]) if isinstance(embeds, list) else int(embeds.shape[-1])
        return None

    def release_text_encoders(self) -> None:
        """Drop the text encoders (every prompt must be encoded by now) and return their memory.

        Every family's ``__call__`` runs without them once ``prompt_embeds`` are given.
        """
        names = [c for c in _components_of(self.pipe) if c.startswith("text_encoder")]
        for name in names:
            setattr(self.pipe, name, None)
        self._released = True
        free_memory()


def _components_of(pipe: Pipeline) -> tuple[str, ...]:
    for cls in type(pipe).__mro__:
        for fam in FAMILIES.values():
            if cls.__name__ == fam.pipeline:
                return fam.components
    raise ValueError(f"{type(pipe).__name__} is not one of {[f.pipeline for f in FAMILIES.values()]}")


def steered_kwargs(
    cached: Mapping[str, Any], vector: np.ndarray | None, alpha: float, device: torch.device | str
) -> dict[str, Any]:
    """Cached unsteered kwargs on ``device`` with ``alpha * vector`` added to every ``prompt_embeds`` token.

    ``vector=None`` means the original model and requires ``alpha == 0``.
    """
    kwargs = {k: _to(v, device) for k, v in cached.items()}
    if vector is None:
        if alpha != 0:
            raise ValueError(f"alpha={alpha} without a vector; pass the steering vector or alpha=0")
        return kwargs
    return add_to_prompt_embeds(kwargs, check_vector(vector, alpha), alpha, "the pipeline's")


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


def output_images(out: Any) -> list[Image.Image]:
    """One PIL image for an image pipeline, or :data:`VIDEO_FRAMES` evenly spaced frames for a video one."""
    frames = getattr(out, "frames", None)
    if frames is not None:
        video = np.asarray(frames[0])
        return [_to_pil(video[i]) for i in evenly_spaced(video.shape[0])]
    images = out.images
    first = images[0]
    return [first if isinstance(first, Image.Image) else _to_pil(np.asarray(first))]


def generate(
    embeddings: PromptEmbeddings, prompt: str, vector: np.ndarray | None, alpha: float, seed: int = DEFAULT_SEED
) -> list[Image.Image]:
    """One output (image, or 4 video frames) of ``prompt`` steered by ``alpha * vector``, from cached embeds."""
    pipe = embeddings.pipe
    kwargs = steered_kwargs(embeddings.get(prompt), vector, alpha, pipe._execution_device)
    with torch.no_grad():
        out = pipe(**kwargs, **embeddings.settings.call_kwargs(), generator=seeded(seed), output_type="np")
    return output_images(out)


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
        **settings.call_kwargs(),
        generator=seeded(seed),
        output_type="np",
    )
    return output_images(out)


def vector_id(vector: np.ndarray | None) -> str:
    """Content hash of a steering vector's float32 values ("" for none): part of every output key."""
    if vector is None:
        return ""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()[:16]


def free_memory() -> None:
    """Return freed tensors' memory to the device (after the last reference to a model is dropped)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
