"""Target models: a diffusion pipeline's text encoder, pooled at the tensor its denoiser consumes.

One module serves Flux.1, SD3, Z-Image, Qwen-Image and Wan 2.x (diffusers 0.42.1). For each,
only the text encoder(s) and tokenizer(s) are loaded (denoiser, VAE and scheduler are passed as
``None`` to ``from_pretrained``, so a hub download skips their folders too), and ``encode``
calls the pipeline's **own** ``encode_prompt``: tokenisation, chat templates, template-token
drops, truncation and zero padding are exactly the pipeline's, never re-implemented here.
What differs per family is only how to call ``encode_prompt`` and which positions of the
returned ``prompt_embeds`` the denoiser really uses (METHOD §1):

========== =============================================== ==================================
family     ``prompt_embeds``                               pooled over
========== =============================================== ==================================
flux       T5 last hidden state, padded to max length      all positions (no mask; the
           (CLIP pooled output is *not* used)              denoiser attends to the padding)
sd3        [CLIP-L ‖ CLIP-G (77 tokens, zero-padded to T5  all 77 + max_length positions
           width) ; T5 (max_length tokens)]                (the pipeline uses no mask)
z_image    Qwen3 ``hidden_states[-2]`` of the chat-        the real tokens (encode_prompt
           templated prompt, one tensor per prompt         already drops the padding)
qwen_image Qwen2.5-VL last hidden state, chat template,    the returned mask (real tokens)
           leading template tokens dropped
wan        UMT5 last hidden state, zeroed after the real   the real length (tokenizer
           length                                          attention mask)
========== =============================================== ==================================

One rule for pooling and steering: the positions pooled here are exactly the positions
``eval.steering`` adds α·v to (:func:`pooled_positions` serves both). With the catalog option
``drop_constant_prefix: true`` the leading positions that are identical for every prompt (a causal
encoder's chat-template prefix; Z-Image: ``<|im_start|>user`` and its newline) are left out of both; bidirectional
encoders (T5, UMT5, CLIP) have no such positions and refuse the option.

Sequence limit: ``max_sequence_length`` is the catalog option of that name if given, else
``source.max_tokens``; set it to what generation uses (Flux.1-dev 512, Flux.1-schnell 256,
SD3 256, Z-Image / Qwen-Image / Wan 512), because for Flux and SD3 the padded length *is* part
of the representation. The effective value is what goes into ``spec.max_tokens`` (cache key).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from safeport.extractors.base import (
    ExtractionError,
    ModelSource,
    Pooled,
    RepresentationSpec,
    check_weights,
    masked_mean,
    resolve_device,
    resolve_dtype,
)

# diffusers pipelines register their components as dynamic attributes, which no static type
# describes; family adapters therefore take the pipeline as ``Any``.
Pipeline = Any
# The positions of ``prompt_embeds`` that are pooled (and steered): a 0/1 tensor [n, L] for a padded
# tensor, or one [L_i] tensor per prompt for a per-prompt list (Z-Image).
Positions = torch.Tensor | list[torch.Tensor]
# (pipeline, texts, max_sequence_length, device) -> (prompt_embeds as the pipeline returns them, its mask or None)
EmbedFn = Callable[[Pipeline, list[str], int, torch.device], tuple[Any, torch.Tensor | None]]
# (pipeline, texts, prompt_embeds, the pipeline's mask or None, max_sequence_length) -> positions the denoiser uses
PositionsFn = Callable[[Pipeline, list[str], Any, torch.Tensor | None, int], Positions]
# (pipeline, texts, max_sequence_length) -> leading positions identical for every prompt, per text
PrefixFn = Callable[[Pipeline, list[str], int], np.ndarray]
# (pipeline, texts, max_sequence_length) -> (kept token count [n], truncated [n]); tokenizer only
CountFn = Callable[[Pipeline, list[str], int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PipelineFamily:
    """How one pipeline family is loaded, encoded and pooled."""

    name: str
    pipeline: str  # diffusers class name
    components: tuple[str, ...]  # the only components loaded (text encoders + tokenizers)
    embed_component: str  # the encoder whose hidden size is the row dimension
    pooling: str  # goes into the representation spec
    embed: EmbedFn
    positions: PositionsFn
    count: CountFn
    # True where ``count`` must agree with the pooled positions (masked families): a mismatch
    # means the pipeline's tokenisation changed and the truncation flags would be wrong.
    count_is_mask: bool
    # None for a bidirectional encoder: every position depends on the whole prompt.
    constant_prefix: PrefixFn | None = None


@contextmanager
def quiet_pipeline_logs(pipe: Pipeline) -> Iterator[None]:
    """Silence the pipeline modules' loggers below ERROR while encoding.

    Flux, SD3 and others log the truncated part of a prompt verbatim; prompt texts (unsafe
    prompts included) must never reach logs. Levels are restored on exit.
    """
    names = {c.__module__ for c in type(pipe).__mro__ if c.__module__.startswith("diffusers.pipelines")}
    loggers = [logging.getLogger(n) for n in sorted(names)]
    saved = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _raw_lengths(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Token count per text with the tokenizer's special tokens, before any truncation."""
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))


def _all_positions(embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


def _every_position(
    pipe: Pipeline, texts: list[str], embeds: Any, mask: torch.Tensor | None, max_len: int
) -> Positions:
    """Flux, SD3: the denoiser attends to every position (padding included); Z-Image: every row it returns."""
    if isinstance(embeds, list):
        return [torch.ones(e.shape[0], dtype=torch.long, device=e.device) for e in embeds]
    return _all_positions(embeds)


def _common_prefix(ids: Sequence[int], prefix: Sequence[int]) -> int:
    n = 0
    for a, b in zip(ids, prefix, strict=False):
        if a != b:
            break
        n += 1
    return n


# --- Flux.1 -------------------------------------------------------------------------------------


def _flux_embed(pipe: Pipeline, texts: list[str], max_len: int, device: torch.device) -> tuple[Any, None]:
    embeds, _clip_pooled, _text_ids = pipe.encode_prompt(
        prompt=texts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=max_len
    )
    return embeds, None


def _flux_count(pipe: Pipeline, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    n = _raw_lengths(pipe.tokenizer_2, texts)
    return np.minimum(n, max_len), n > max_len


# --- Stable Diffusion 3 -------------------------------------------------------------------------


def _sd3_embed(pipe: Pipeline, texts: list[str], max_len: int, device: torch.device) -> tuple[Any, None]:
    embeds, _neg, _pooled, _neg_pooled = pipe.encode_prompt(
        prompt=texts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=max_len,
    )
    return embeds, None


def _sd3_count(pipe: Pipeline, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept T5 tokens (for bucketing); truncated if T5 *or* either CLIP cut the text."""
    n_t5 = _raw_lengths(pipe.tokenizer_3, texts)
    clip_max = int(pipe.tokenizer_max_length)
    cut = (n_t5 > max_len) | (_raw_lengths(pipe.tokenizer, texts) > clip_max)
    cut |= _raw_lengths(pipe.tokenizer_2, texts) > clip_max
    return np.minimum(n_t5, max_len), cut


# --- Z-Image ------------------------------------------------------------------------------------


def _z_image_embed(pipe: Pipeline, texts: list[str], max_len: int, device: torch.device) -> tuple[Any, None]:
    # encode_prompt rewrites its ``prompt`` list in place (chat template): give it a copy.
    per_text, _neg = pipe.encode_prompt(
        prompt=list(texts), device=device, do_classifier_free_guidance=False, max_sequence_length=max_len
    )
    return list(per_text), None


def _z_image_templated(pipe: Pipeline, texts: Sequence[str]) -> list[str]:
    # Same chat-template call as ZImagePipeline._encode_prompt.
    return [
        pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for t in texts
    ]


def _z_image_count(pipe: Pipeline, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    n = _raw_lengths(pipe.tokenizer, _z_image_templated(pipe, texts))
    return np.minimum(n, max_len), n > max_len


_SENTINEL = "\u2063safeport\u2063"  # stands for the prompt when the template is split into prefix and suffix


def _z_image_prefix(pipe: Pipeline, texts: list[str], max_len: int) -> np.ndarray:
    """Tokens of the chat template before the prompt (``<|im_start|>user\\n``) that every prompt starts with."""
    prefix_text = _z_image_templated(pipe, [_SENTINEL])[0].split(_SENTINEL)[0]
    prefix = pipe.tokenizer(prefix_text)["input_ids"]
    ids = pipe.tokenizer(_z_image_templated(pipe, texts), truncation=True, max_length=max_len)["input_ids"]
    return np.array([_common_prefix(row, prefix) for row in ids], dtype=np.int64)


# --- Qwen-Image ---------------------------------------------------------------------------------


def _qwen_image_embed(
    pipe: Pipeline, texts: list[str], max_len: int, device: torch.device
) -> tuple[Any, torch.Tensor | None]:
    embeds, mask = pipe.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1, max_sequence_length=max_len)
    return embeds, mask


def _qwen_image_positions(
    pipe: Pipeline, texts: list[str], embeds: Any, mask: torch.Tensor | None, max_len: int
) -> Positions:
    # encode_prompt returns mask=None when every position is a real token.
    return _all_positions(embeds) if mask is None else mask.long()


def _qwen_image_count(pipe: Pipeline, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens left after the tokenizer cap, the template drop and the max_sequence_length cut."""
    drop = int(pipe.prompt_template_encode_start_idx)
    cap = int(pipe.tokenizer_max_length) + drop
    n = _raw_lengths(pipe.tokenizer, [pipe.prompt_template_encode.format(t) for t in texts])
    after_drop = np.minimum(n, cap) - drop
    return np.clip(after_drop, 0, max_len), (n > cap) | (after_drop > max_len)


def _qwen_image_prefix(pipe: Pipeline, texts: list[str], max_len: int) -> np.ndarray:
    """Template tokens left before the prompt after the pipeline's own drop (none with Qwen's tokenizer)."""
    drop = int(pipe.prompt_template_encode_start_idx)
    prefix = pipe.tokenizer(pipe.prompt_template_encode.split("{}")[0])["input_ids"][drop:]
    ids = pipe.tokenizer([pipe.prompt_template_encode.format(t) for t in texts])["input_ids"]
    return np.array([_common_prefix(row[drop:], prefix) for row in ids], dtype=np.int64)


# --- Wan 2.x ------------------------------------------------------------------------------------


def _wan_clean(texts: Sequence[str]) -> list[str]:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return [prompt_clean(t) for t in texts]


def _wan_embed(pipe: Pipeline, texts: list[str], max_len: int, device: torch.device) -> tuple[Any, None]:
    embeds, _neg = pipe.encode_prompt(
        prompt=texts,
        do_classifier_free_guidance=False,
        num_videos_per_prompt=1,
        max_sequence_length=max_len,
        device=device,
    )
    return embeds, None


def _wan_positions(pipe: Pipeline, texts: list[str], embeds: Any, mask: torch.Tensor | None, max_len: int) -> Positions:
    """The real tokens: the pipeline zeroes everything after the tokenizer's real length."""
    kept, _cut = _wan_count(pipe, texts, max_len)
    lengths = torch.as_tensor(kept, device=embeds.device)
    real = (torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths[:, None]).long()
    if bool((embeds.abs().sum(dim=-1) * (1 - real)).any()):
        raise ExtractionError(
            "WanPipeline.encode_prompt returned non-zero embeddings after the tokenizer's real length; "
            "the pipeline's padding behaviour differs from diffusers 0.42.1, so the pooling mask would "
            "be wrong. Pin diffusers==0.42.1 or update extractors/pipeline_encoder.py."
        )
    return real


def _wan_count(pipe: Pipeline, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    n = _raw_lengths(pipe.tokenizer, _wan_clean(texts))
    return np.minimum(n, max_len), n > max_len


FAMILIES: dict[str, PipelineFamily] = {
    f.name: f
    for f in (
        PipelineFamily(
            name="flux",
            pipeline="FluxPipeline",
            components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
            embed_component="text_encoder_2",
            pooling="mean_all_positions",
            embed=_flux_embed,
            positions=_every_position,
            count=_flux_count,
            count_is_mask=False,
        ),
        PipelineFamily(
            name="sd3",
            pipeline="StableDiffusion3Pipeline",
            components=(
                "text_encoder",
                "tokenizer",
                "text_encoder_2",
                "tokenizer_2",
                "text_encoder_3",
                "tokenizer_3",
            ),
            embed_component="text_encoder_3",
            pooling="mean_all_positions",
            embed=_sd3_embed,
            positions=_every_position,
            count=_sd3_count,
            count_is_mask=False,
        ),
        PipelineFamily(
            name="z_image",
            pipeline="ZImagePipeline",
            components=("text_encoder", "tokenizer"),
            embed_component="text_encoder",
            pooling="masked_mean",
            embed=_z_image_embed,
            positions=_every_position,
            count=_z_image_count,
            count_is_mask=True,
            constant_prefix=_z_image_prefix,
        ),
        PipelineFamily(
            name="qwen_image",
            pipeline="QwenImagePipeline",
            components=("text_encoder", "tokenizer"),
            embed_component="text_encoder",
            pooling="masked_mean",
            embed=_qwen_image_embed,
            positions=_qwen_image_positions,
            count=_qwen_image_count,
            count_is_mask=True,
            constant_prefix=_qwen_image_prefix,
        ),
        PipelineFamily(
            name="wan",
            pipeline="WanPipeline",
            components=("text_encoder", "tokenizer"),
            embed_component="text_encoder",
            pooling="masked_mean",
            embed=_wan_embed,
            positions=_wan_positions,
            count=_wan_count,
            count_is_mask=True,
        ),
    )
}


def family_of_pipeline(pipe: Pipeline) -> PipelineFamily:
    """The family of a loaded pipeline (its class or a supported base class)."""
    for cls in type(pipe).__mro__:
        for fam in FAMILIES.values():
            if cls.__name__ == fam.pipeline:
                return fam
    raise ValueError(f"{type(pipe).__name__} is not one of {[f.pipeline for f in FAMILIES.values()]}")


def drop_leading(positions: Positions, counts: np.ndarray) -> Positions:
    """Zero the first ``counts[i]`` pooled positions of row ``i`` (real tokens start at position 0)."""
    if isinstance(positions, list):
        out = [p.clone() for p in positions]
        for p, k in zip(out, counts.tolist(), strict=True):
            p[:k] = 0
        return out
    index = torch.arange(positions.shape[1], device=positions.device)[None, :]
    keep = index >= torch.as_tensor(counts, device=positions.device)[:, None]
    return positions * keep.long()


def pooled_positions(
    pipe: Pipeline,
    texts: list[str],
    embeds: Any,
    mask: torch.Tensor | None,
    max_len: int,
    drop_constant_prefix: bool = False,
) -> Positions:
    """The one rule for every family: the positions of ``prompt_embeds`` that are pooled **and** steered.

    Flux/SD3: every padded position (the denoiser attends to them all); Z-Image: every row of its
    variable-length tensors; Qwen-Image: the returned mask; Wan: the real tokens (the pipeline zeroes
    the rest). ``drop_constant_prefix`` leaves out the leading positions identical for every prompt.
    """
    family = family_of_pipeline(pipe)
    positions = family.positions(pipe, texts, embeds, mask, max_len)
    if not drop_constant_prefix:
        return positions
    if family.constant_prefix is None:
        raise ValueError(constant_prefix_refusal(family.name))
    return drop_leading(positions, family.constant_prefix(pipe, texts, max_len))


def constant_prefix_refusal(family: str) -> str:
    return (
        f"option drop_constant_prefix is not available for family {family!r}: its text encoder is bidirectional, "
        "so no position is the same for every prompt; remove the option"
    )


def pool(embeds: Any, positions: Positions) -> torch.Tensor:
    """Mean of ``embeds`` over ``positions`` per prompt, in float32 ([n, d])."""
    if isinstance(embeds, list):
        return torch.cat([masked_mean(e[None], p[None]) for e, p in zip(embeds, positions, strict=True)])
    if not isinstance(positions, torch.Tensor):
        raise TypeError("a padded prompt_embeds tensor needs a positions tensor")
    return masked_mean(embeds, positions)


def position_count(positions: Positions) -> np.ndarray:
    """Pooled positions per prompt."""
    if isinstance(positions, list):
        return np.array([int(p.sum()) for p in positions], dtype=np.int64)
    return positions.sum(dim=1).cpu().numpy().astype(np.int64)


class PipelineEncoder:
    """A diffusion pipeline holding only its text encoder(s); pools ``encode_prompt`` output."""

    def __init__(
        self,
        pipe: Pipeline,
        family: PipelineFamily,
        spec: RepresentationSpec,
        device: torch.device,
        max_sequence_length: int,
        drop_constant_prefix: bool = False,
    ) -> None:
        self.pipe = pipe
        self.family = family
        self.spec = spec
        self.device = device
        self.max_sequence_length = max_sequence_length
        self.drop_constant_prefix = drop_constant_prefix

    @property
    def dim(self) -> int:
        config = getattr(self.pipe, self.family.embed_component).config
        return int(config.get_text_config().hidden_size)

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Real tokens kept per text (tokenizer only; Flux/SD3 still pool the padded length)."""
        kept, _cut = self.family.count(self.pipe, list(texts), self.max_sequence_length)
        return kept

    def encode(self, texts: Sequence[str]) -> Pooled:
        texts = list(texts)
        if not texts:
            return Pooled(
                values=np.zeros((0, self.dim), dtype=np.float32),
                n_tokens=np.zeros(0, dtype=np.int64),
                truncated=np.zeros(0, dtype=bool),
            )
        kept, truncated = self.family.count(self.pipe, texts, self.max_sequence_length)
        with torch.inference_mode(), quiet_pipeline_logs(self.pipe):
            embeds, mask = self.family.embed(self.pipe, texts, self.max_sequence_length, self.device)
            used = self.family.positions(self.pipe, texts, embeds, mask, self.max_sequence_length)
            if self.family.count_is_mask and not np.array_equal(position_count(used), kept):
                raise ExtractionError(
                    f"model {self.spec.model_id!r}: {self.family.pipeline}.encode_prompt kept "
                    f"{position_count(used).tolist()} tokens but the tokenizer count gives {kept.tolist()}, so "
                    "the truncation flags would be wrong. Pin diffusers==0.42.1 or update the family's count "
                    "function in extractors/pipeline_encoder.py."
                )
            positions = pooled_positions(
                self.pipe, texts, embeds, mask, self.max_sequence_length, self.drop_constant_prefix
            )
            pooled = pool(embeds, positions)
        return Pooled(
            values=pooled.float().cpu().numpy().astype(np.float32, copy=False),
            n_tokens=position_count(positions),
            truncated=truncated.astype(bool),
        )

    def position_norms(self, texts: Sequence[str], n_positions: int) -> tuple[np.ndarray, int]:
        """L2 norm of ``prompt_embeds`` at its first ``n_positions`` positions per text (NaN past a text's end),
        and how many leading positions are identical for every prompt (0 where the encoder is bidirectional).

        Shown in the representation report: a large constant first position leaks into the
        pair-difference direction when paired prompts differ in length (``drop_constant_prefix``).
        """
        texts = list(texts)
        with torch.inference_mode(), quiet_pipeline_logs(self.pipe):
            embeds, mask = self.family.embed(self.pipe, texts, self.max_sequence_length, self.device)
            used = self.family.positions(self.pipe, texts, embeds, mask, self.max_sequence_length)
            rows = embeds if isinstance(embeds, list) else list(embeds)
            marks = used if isinstance(used, list) else list(used)
            out = np.full((len(texts), n_positions), np.nan, dtype=np.float32)
            for i, (e, m) in enumerate(zip(rows, marks, strict=True)):
                norms = e[m.bool()].float().norm(dim=-1)[:n_positions].cpu().numpy()
                out[i, : len(norms)] = norms
        prefix = self.family.constant_prefix
        constant = int(prefix(self.pipe, texts, self.max_sequence_length).min()) if prefix and texts else 0
        return out, constant


def max_sequence_length_of(source: ModelSource) -> int:
    """The text length a pipeline source encodes to (``options.max_sequence_length``, else ``max_tokens``)."""
    raw = source.option("max_sequence_length", str(source.max_tokens))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(
            f"model {source.name!r}: max_sequence_length {raw!r} is not a positive integer; "
            "set options.max_sequence_length (or max_tokens) to e.g. 256 or 512"
        )
    return value


def load(source: ModelSource) -> PipelineEncoder:
    """Load only the text encoder(s) and tokenizer(s) of ``source``'s diffusers pipeline."""
    if source.family not in FAMILIES:
        raise ValueError(
            f"model {source.name!r}: family {source.family!r} is not a diffusers pipeline family; "
            f"use one of {', '.join(FAMILIES)}"
        )
    family = FAMILIES[source.family]
    drop_constant_prefix_of(source)  # a refused option fails before any weights load
    requested = source.option("pipeline", family.pipeline)
    if requested != family.pipeline:
        raise ValueError(
            f"model {source.name!r}: options.pipeline {requested!r} is not supported for family "
            f"{family.name!r}, which pools {family.pipeline}.encode_prompt; remove the option or set it "
            f"to {family.pipeline}"
        )
    if source.path is not None:
        # Only the text encoders are loaded, so only their folders must bring safe weights.
        for name in family.components:
            if not name.startswith("tokenizer"):
                check_weights(Path(source.path) / name, source.allow_pickle, source.name)
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.dtype, device)
    max_len = max_sequence_length_of(source)

    cls = getattr(diffusers, family.pipeline)
    expected, _optional = cls._get_signature_keys(cls)
    kwargs: dict[str, Any] = {name: None for name in expected if name not in family.components}
    kwargs["dtype"] = dtype
    kwargs["trust_remote_code"] = False
    if not source.allow_pickle:
        kwargs["use_safetensors"] = True  # never unpickle weights unless the catalog entry allows it
    if source.hub_id is not None:
        kwargs["revision"] = source.revision
    pipe = cls.from_pretrained(source.location, **kwargs)
    missing = [name for name in family.components if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(
            f"model {source.name!r}: {source.location!r} has no {', '.join(missing)}; "
            f"{family.pipeline}.encode_prompt needs {', '.join(family.components)}. "
            "Point path/hub_id at the full pipeline folder (with model_index.json)."
        )
    pipe.to(device)
    for name in family.components:
        module = getattr(pipe, name)
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)

    spec = source.spec(layer="prompt_embeds", pooling=family.pooling)
    spec = dataclasses.replace(spec, max_tokens=max_len)
    return PipelineEncoder(pipe, family, spec, device, max_len, drop_constant_prefix_of(source))


def drop_constant_prefix_of(source: ModelSource) -> bool:
    """The ``drop_constant_prefix`` option of a pipeline source, refused where the encoder is bidirectional."""
    drop = source.flag("drop_constant_prefix")
    family = FAMILIES.get(source.family)
    if drop and family is not None and family.constant_prefix is None:
        raise ValueError(f"model {source.name!r}: " + constant_prefix_refusal(family.name))
    return drop
