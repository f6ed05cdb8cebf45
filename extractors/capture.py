"""Hooks that capture (or edit) token activations at named positions (METHOD-SAFEDIG §2, §7).

Pure compute: arrays out, no file I/O; the store and the flows persist what comes back.

**The primitive** is :func:`position_hooks`, a context manager that registers forward hooks on the
resolved modules (:func:`safeport.extractors.positions.resolve`) and removes them in ``finally``
(also when the pipeline call raises). For every captured stream it calls
``fn(position, step, tensor) -> tensor | None``: ``None`` observes only (the forward is untouched,
so a seeded generation stays bit-identical); a tensor of the same shape replaces that stream, and
for a tuple output only that element is replaced. Blend/Repel steering (§7) is such an ``fn``.
``fn`` must not modify ``tensor`` in place.

**Denoising steps** (DiT positions): a forward pre-hook on the transformer reads the scheduler's
``step_index`` (``None`` before the first ``scheduler.step`` of a run, so step 0; the scheduler
resets it on every ``set_timesteps``, i.e. every pipeline call). Without a pipeline (a bare
transformer) every call is one step, counted from 0 in the context.

**Conditional branch only** (verified in diffusers 0.42.1):

- Flux.1-dev is guidance-distilled: one transformer call per step, the conditional one.
- Flux with ``true_cfg_scale > 1`` and a negative prompt calls the transformer twice per step,
  conditional first (``cache_context("cond")`` at pipeline_flux.py:900, then ``"uncond"`` at :917).
- SD3 with ``guidance_scale > 1`` batches ``[uncond, cond]`` in one call
  (``torch.cat([negative_prompt_embeds, prompt_embeds])``, pipeline_stable_diffusion_3.py:998, and
  ``noise_pred.chunk(2)`` -> uncond, text at :1085): the **second half** of the batch is conditional.
  Skip-layer guidance adds a third call at the same step with ``skip_layers=``: never captured.

So the rule is: the first transformer call of each step is the conditional one (a later call at the
same step is a negative or skip-layer branch and passes through untouched), and within it the second
half of the batch when the pipeline batches CFG (SD3's ``do_classifier_free_guidance``).
``te`` positions have no steps: every forward of the text-encoder layer inside the context is step 0,
so the caller decides which encodes happen under the hooks (:func:`capture_pipeline` encodes the
prompts alone, never the negative prompt).

**Real tokens** of a text stream (padding is never stored):

- Flux: the T5 ``prompt_embeds`` (and every double block's text stream) is ``max_sequence_length``
  long, padded; real = ``tokenizer_2``'s attention mask with the pipeline's own arguments
  (``padding="max_length"``, truncation), EOS included.
- SD3: the text stream is [CLIP (77) ; T5 (``max_sequence_length``)]; real = CLIP positions where
  both CLIP tokenizers' masks are 1 (CLIP-L and -G share the 77 positions, concatenated along
  channels), then T5 positions where ``tokenizer_3``'s mask is 1 (none when the pipeline has no T5:
  its T5 part is zeros).
- ``te`` positions: the mask of the encoder's own tokenizer (T5's inside a pipeline).

**Early stop**: once every requested (position, step) has been recorded, the hook raises a private
exception that :func:`capture_pipeline` catches. The rest of that transformer call, later steps,
the scheduler update and the VAE decode never run. Why an exception rather than
``callback_on_step_end`` + ``pipe._interrupt``: the callback runs only after the whole step (all
blocks, Flux's second CFG call, the scheduler), the flag relies on the pipeline checking it, and the
loop still iterates; the exception needs no cooperation from the pipeline, behaves the same on
every family, stops at the hook, and leaves nothing behind (hooks are removed in ``finally``; the
pipeline's model-offload hooks are released as its own ``__call__`` would). ``output_type="latent"``
is passed anyway so that no VAE decode can happen even if the stop were not reached (which is then
an error). Since the hooks only read, the rows equal those of a full generation with the same seed.

**Default steps** (§2, our choice): ``default_steps(T)`` = the distinct values of
``floor(0.6·(T−1)·k/3 + 0.5)`` for k = 0..3 (4 evenly spaced over the first 60 % of the steps,
rounded half up). T = 28 -> (0, 5, 11, 16); T = 50 -> (0, 10, 20, 29); T = 4 -> (0, 1, 2).

**Image-token sample** (§2): per (prompt, step) the sorted indices of ``image_tokens`` distinct
tokens drawn with ``numpy.random.default_rng([SAMPLE_SALT, seed, step])``, ``None`` = all tokens. Seeded
by the prompt's generation seed, not its text or batch slot: reproducible in any batching, the
same at every position of that (prompt, step), and the same for both sides of a SafeSteer pair
(generated from one seed), so token i is the same image location on both sides.

**Memory**: only the selected rows of the conditional half are copied to the CPU as float32 inside
the hook; nothing else is kept. One call handles the batch the caller gives, so peak memory is flat
in the number of prompts (:func:`iter_capture` walks a long list batch by batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from safeport.extractors.base import ExtractionError
from safeport.extractors.pipeline_encoder import quiet_pipeline_logs
from safeport.extractors.positions import Position, Site, family_of, resolve

# diffusers pipelines register components as dynamic attributes; see pipeline_encoder.py.
Pipeline = Any
HookFn = Callable[[Position, int, torch.Tensor], torch.Tensor | None]

DEFAULT_SEED = 42
SAMPLE_SALT = 0x5AFED16  # keeps the token sample independent of anything else seeded with the same seed
NO_SEED = -1  # the seed column of rows that no generation seed decides (a standalone text encoder)


class _StopDenoising(Exception):
    """Raised from a hook once every requested row is recorded; caught by the capture functions."""


# --- the hook primitive --------------------------------------------------------------------------


class _StepTracker:
    """Forward pre-hook on the transformer: the current step and whether this call is conditional."""

    def __init__(self, pipe: Pipeline | None) -> None:
        self.pipe = pipe
        self.step = -1
        self.active = False
        self.cond_start = 0  # the conditional part of the batch is [cond_start:]
        self._timesteps: Any = None  # the scheduler's timesteps tensor of the current run (identity = run)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("skip_layers") is not None:  # SD3 skip-layer guidance: a perturbed extra call
            self.active = False
            return
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "step_index") and hasattr(scheduler, "timesteps"):
            index = scheduler.step_index
            step = 0 if index is None else int(index)
            first = not (scheduler.timesteps is self._timesteps and step == self.step)
            self._timesteps = scheduler.timesteps
        else:
            step, first = self.step + 1, True
        self.step, self.active = step, first
        self.cond_start = 0
        if first and self.pipe is not None and bool(getattr(self.pipe, "do_classifier_free_guidance", False)):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            batch = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else 0
            if batch % 2:
                raise ExtractionError(
                    f"{type(self.pipe).__name__} batches classifier-free guidance but the transformer got an odd "
                    f"batch of {batch}; cannot tell the conditional half. Pin diffusers==0.42.1 or update "
                    "extractors/capture.py"
                )
            self.cond_start = batch // 2


def _replace(fn: HookFn, position: Position, step: int, tensor: torch.Tensor, start: int) -> torch.Tensor | None:
    """Call ``fn`` on the conditional part; the full tensor with that part replaced, or None."""
    part = tensor[start:] if start else tensor
    new = fn(position, step, part)
    if new is None:
        return None
    if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(part.shape):
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(
            f"hook for {position.name} returned {got}, expected a tensor of shape {tuple(part.shape)} "
            "(return None to leave the stream unchanged)"
        )
    new = new.to(device=tensor.device, dtype=tensor.dtype)
    return torch.cat([tensor[:start], new], dim=0) if start else new


def _module_hook(
    entries: list[tuple[Position, int | None]], fn: HookFn, tracker: _StepTracker | None
) -> Callable[[torch.nn.Module, Any, Any], Any]:
    """Forward hook for one module carrying one or more streams (e.g. double.N.txt and double.N.img)."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if tracker is not None and not tracker.active:
            return None
        step = tracker.step if tracker is not None else 0
        start = tracker.cond_start if tracker is not None else 0
        items: list[Any] = list(output) if isinstance(output, tuple) else [output]
        changed = False
        for position, element in entries:
            index = 0 if element is None else element
            tensor = items[index]
            if not isinstance(tensor, torch.Tensor):
                raise ExtractionError(
                    f"{position.name}: element {index} of {type(module).__name__}'s output is "
                    f"{type(tensor).__name__}, not a tensor; the block's stream order differs from "
                    "extractors/positions.py BLOCK_STREAMS (pin diffusers==0.42.1 or update the table)"
                )
            new = _replace(fn, position, step, tensor, start)
            if new is not None:
                items[index] = new
                changed = True
        if not changed:
            return None
        return tuple(items) if isinstance(output, tuple) else items[0]

    return hook


def _transformer_of(target: Any) -> tuple[torch.nn.Module, Pipeline | None]:
    if hasattr(target, "components") and hasattr(target, "transformer"):
        return target.transformer, target
    return target, None


def _sites(target: Any, positions: Iterable[str | Position | Site]) -> tuple[Site, ...]:
    """Resolve names (Sites pass through), keeping the order; no positions -> no sites."""
    items = list(positions)
    names = [p for p in items if not isinstance(p, Site)]
    by_name = {s.name: s for s in resolve(target, names)} if names else {}
    out: dict[str, Site] = {}
    for p in items:
        site = p if isinstance(p, Site) else by_name[Position.parse(p).name]
        out.setdefault(site.name, site)
    return tuple(out.values())


@contextmanager
def position_hooks(target: Any, positions: Iterable[str | Position | Site], fn: HookFn) -> Iterator[tuple[Site, ...]]:
    """Hook ``positions`` of ``target`` (a pipeline, a Flux/SD3 transformer or a HF text model) with ``fn``.

    Yields the resolved sites. DiT positions see only the conditional branch, one call per step;
    ``te`` positions see every forward of their layer as step 0. All hooks are removed on exit.
    """
    sites = _sites(target, positions)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        tracker: _StepTracker | None = None
        if any(s.position.kind != "te" for s in sites):
            transformer, pipe = _transformer_of(target)
            tracker = _StepTracker(pipe)
            handles.append(transformer.register_forward_pre_hook(tracker, with_kwargs=True))
        groups: dict[int, tuple[torch.nn.Module, list[tuple[Position, int | None]], bool]] = {}
        for s in sites:
            is_te = s.position.kind == "te"
            groups.setdefault(id(s.module), (s.module, [], is_te))[1].append((s.position, s.element))
        for module, entries, is_te in groups.values():
            handles.append(module.register_forward_hook(_module_hook(entries, fn, None if is_te else tracker)))
        yield sites
    finally:
        for handle in reversed(handles):
            handle.remove()


# --- captured rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRows:
    """Captured rows of one position: float32 values [n, d] and the coordinates of each row.

    Rows come in capture order: by step, then prompt, then token index.
    """

    position: str
    values: np.ndarray  # float32 [n, d]
    prompt_index: np.ndarray  # int64 [n]: index of the prompt in the caller's list (batch offset added)
    seed: np.ndarray  # int64 [n]: the prompt's generation seed (NO_SEED for a standalone text encoder)
    step: np.ndarray  # int64 [n]: denoising step index (0 for te positions)
    token_index: np.ndarray  # int64 [n]: position in the stream's token sequence as the module saw it

    @property
    def stream(self) -> str:
        return Position.parse(self.position).stream

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def coordinates(self) -> dict[str, np.ndarray]:
        """One array per coordinate, one entry per row (stream and position repeated), for the store."""
        n = len(self)
        return {
            "prompt_index": self.prompt_index,
            "seed": self.seed,
            "step": self.step,
            "token_index": self.token_index,
            "stream": np.full(n, self.stream),
            "position": np.full(n, self.position),
        }


def default_steps(num_inference_steps: int, count: int = 4, fraction: float = 0.6) -> tuple[int, ...]:
    """§2's capture steps: ``count`` evenly spaced over the first ``fraction`` of the steps (see module doc)."""
    if num_inference_steps < 1 or count < 1 or not 0 <= fraction <= 1:
        raise ValueError(
            f"default_steps({num_inference_steps}, count={count}, fraction={fraction}) needs at least one step, "
            "count >= 1 and 0 <= fraction <= 1"
        )
    last = fraction * (num_inference_steps - 1)
    spaced = [last * k / (count - 1) if count > 1 else 0.0 for k in range(count)]
    return tuple(sorted({int(np.floor(x + 0.5)) for x in spaced}))


def sample_tokens(seed: int, step: int, n_tokens: int, k: int | None) -> np.ndarray:
    """Sorted indices of the image tokens kept for one (prompt seed, step): all when ``k`` is None or ≥ n."""
    if k is None or k >= n_tokens:
        return np.arange(n_tokens, dtype=np.int64)
    rng = np.random.default_rng([SAMPLE_SALT, seed, step])
    return np.sort(rng.choice(n_tokens, size=k, replace=False)).astype(np.int64)


class _Collector:
    """The capture ``fn``: keeps the conditional rows of the requested steps, stops when all are in."""

    def __init__(
        self,
        positions: Sequence[Position],
        steps: Sequence[int],
        text_mask: np.ndarray,
        seeds: np.ndarray,
        image_tokens: int | None,
        prompt_offset: int,
        stop: bool,
    ) -> None:
        self.steps = frozenset(steps)
        self.text_mask = text_mask
        self.seeds = seeds
        self.image_tokens = image_tokens
        self.prompt_offset = prompt_offset
        self.stop = stop
        self.pending = {(p.name, s) for p in positions for s in self.steps}
        self.parts: dict[str, list[tuple[np.ndarray, ...]]] = {p.name: [] for p in positions}

    def __call__(self, position: Position, step: int, tensor: torch.Tensor) -> None:
        if step not in self.steps:
            return None
        key = (position.name, step)
        if key not in self.pending:
            raise ExtractionError(
                f"{position.name} fired twice at step {step} on the conditional branch; the pipeline's call "
                "pattern differs from diffusers 0.42.1 (see extractors/capture.py)"
            )
        n = len(self.seeds)
        if tensor.ndim != 3 or tensor.shape[0] != n:
            raise ExtractionError(
                f"{position.name}: expected a conditional stream of shape [{n}, tokens, d], got {tuple(tensor.shape)}"
            )
        if position.stream == "txt":
            if tensor.shape[1] != self.text_mask.shape[1]:
                raise ExtractionError(
                    f"{position.name}: the text stream has {tensor.shape[1]} tokens but the real-token mask "
                    f"{self.text_mask.shape[1]}; the pipeline's tokenisation differs from extractors/capture.py's "
                    "rule (pin diffusers==0.42.1 or update the family's mask)"
                )
            prompt, token = np.nonzero(self.text_mask)
        else:
            picks = [sample_tokens(int(s), step, int(tensor.shape[1]), self.image_tokens) for s in self.seeds]
            prompt = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(picks)])
            token = np.concatenate(picks)
        index = (torch.from_numpy(prompt).to(tensor.device), torch.from_numpy(token).to(tensor.device))
        values = tensor.detach()[index].to(device="cpu", dtype=torch.float32).numpy()
        rows = len(prompt)
        self.parts[position.name].append(
            (
                values,
                prompt.astype(np.int64) + self.prompt_offset,
                self.seeds[prompt].astype(np.int64),
                np.full(rows, step, dtype=np.int64),
                token.astype(np.int64),
            )
        )
        self.pending.discard(key)
        if self.stop and not self.pending:
            raise _StopDenoising
        return None

    def rows(self) -> dict[str, TokenRows]:
        if self.pending:
            missing = ", ".join(f"{name}@{step}" for name, step in sorted(self.pending))
            raise ExtractionError(
                f"capture ended without rows for {missing}: the forward never reached them on the conditional "
                "branch (check the steps against num_inference_steps)"
            )
        out: dict[str, TokenRows] = {}
        for name, parts in self.parts.items():
            cols = list(zip(*parts, strict=True))
            out[name] = TokenRows(name, *(np.concatenate(c) for c in cols))
        return out


# --- pipelines (Flux, SD3) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """The generation settings the cache is captured under (§2: the ones used later)."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float  # SD3: CFG scale; Flux: the distilled guidance (used when the model embeds it)
    max_sequence_length: int
    true_cfg_scale: float = 1.0  # Flux only: > 1 with a negative prompt runs a second (negative) call per step
    negative_prompt: str | None = None


def _mask(tokenizer: Any, prompts: list[str], length: int) -> np.ndarray:
    """Real-token mask [n, length] with the pipelines' own tokenizer arguments (max-length padding)."""
    batch = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return np.asarray(batch["attention_mask"]).astype(bool)


def _flux_encode(pipe: Pipeline, prompts: list[str], msl: int) -> dict[str, Any]:
    embeds, pooled, _ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1, max_sequence_length=msl
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _flux_text_mask(pipe: Pipeline, prompts: list[str], msl: int) -> np.ndarray:
    return _mask(pipe.tokenizer_2, prompts, msl)


def _sd3_encode(pipe: Pipeline, prompts: list[str], msl: int) -> dict[str, Any]:
    embeds, _neg, pooled, _neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=msl,
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _sd3_text_mask(pipe: Pipeline, prompts: list[str], msl: int) -> np.ndarray:
    clip_len = int(pipe.tokenizer_max_length)
    clip = _mask(pipe.tokenizer, prompts, clip_len) & _mask(pipe.tokenizer_2, prompts, clip_len)
    if pipe.text_encoder_3 is None:  # the pipeline fills the T5 part with zeros
        t5 = np.zeros((len(prompts), msl), dtype=bool)
    else:
        t5 = _mask(pipe.tokenizer_3, prompts, msl)
    return np.concatenate([clip, t5], axis=1)


@dataclass(frozen=True)
class _Family:
    encode: Callable[[Pipeline, list[str], int], dict[str, Any]]
    text_mask: Callable[[Pipeline, list[str], int], np.ndarray]
    te_tokenizer: str


_FAMILIES: dict[str, _Family] = {
    "flux": _Family(_flux_encode, _flux_text_mask, "tokenizer_2"),
    "sd3": _Family(_sd3_encode, _sd3_text_mask, "tokenizer_3"),
}


# --- re-running a text encoder from one layer on (the steered forwards of the CPU headline) ---------------------


@contextmanager
def record_layer_inputs(model: Any, layers: Iterable[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """The input hidden states of each text-encoder layer in ``layers`` (``te.N``), one per forward, in call order."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    try:
        for n in sorted(set(layers)):
            (site,) = resolve(model, [f"te.{n}.txt"])
            seen[n] = []

            def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: int = n) -> None:
                seen[n].append((args[0] if args else kwargs["hidden_states"]).detach())

            handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def start_at_layer(model: Any, first: int, inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Forwards of a HF text encoder that start at layer ``first``: the layers before it pass their input
    through (not computed) and layer ``first`` takes the next of ``inputs`` instead of what reaches it.

    ``inputs`` are what :func:`record_layer_inputs` saw for the same batches in the same order, so every
    later layer computes exactly what a full forward computes (same tensors, same bits); hooks at layers
    from ``first`` on (steering) act as in a full forward. Restored on exit.
    """
    sites = resolve(model, [f"te.{n}.txt" for n in range(first + 1)])
    queue = iter(inputs)
    skipped = [s.module for s in sites[:-1]]

    def take(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        hidden = next(queue, None)
        if hidden is None:
            raise RuntimeError("start_at_layer: more forwards than recorded layer inputs; record the same batches")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    handle = sites[-1].module.register_forward_pre_hook(take, with_kwargs=True)
    try:
        for m in skipped:
            m.forward = passthrough
        yield
    finally:
        handle.remove()
        for m in skipped:
            with suppress(AttributeError):
                del m.forward  # the class's forward again


_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "flux": ("tokenizer", "tokenizer_2"),
    "sd3": ("tokenizer", "tokenizer_2", "tokenizer_3"),
}


def real_token_counts(
    location: str, family: str, texts: list[str], msl: int, revision: str | None = None
) -> dict[str, np.ndarray]:
    """Real tokens per text at ``te`` positions ("te") and in the DiT text stream ("dit").

    Counted with the pipeline's own tokenizers and the same rules as the capture (no weights are
    loaded): what ``safeport capture --plan`` sizes a pipeline's text rows with. Raises ``OSError``
    when the tokenizers are not at ``location`` (a hub id that is not downloaded).
    """
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    if family not in _FAMILIES:
        raise ValueError(f"real_token_counts takes a flux or sd3 pipeline, got family {family!r}")
    loaded: dict[str, Any] = {}
    for name in _TOKENIZERS[family]:
        try:
            loaded[name] = AutoTokenizer.from_pretrained(location, subfolder=name, revision=revision)
        except OSError:
            if name != "tokenizer_3":
                raise
            loaded[name] = None  # SD3 without T5: the pipeline fills that part with zeros
    toks = SimpleNamespace(**loaded, text_encoder_3=loaded.get("tokenizer_3"))
    if family == "sd3":
        toks.tokenizer_max_length = int(toks.tokenizer.model_max_length)
    rules = _FAMILIES[family]
    te_tokenizer = getattr(toks, rules.te_tokenizer)
    te = _mask(te_tokenizer, texts, msl).sum(axis=1) if te_tokenizer is not None else np.zeros(len(texts), int)
    return {"te": te, "dit": rules.text_mask(toks, texts, msl).sum(axis=1)}


def image_grid_divisor(location: str, family: str, revision: str | None = None) -> int:
    """Pixels per image token along a side: the VAE's downsampling times the DiT's patch size.

    Flux packs 2x2 latents into one token; SD3 patches ``patch_size`` latents. 16 for both paper
    targets (VAE /8, 2x2); the tiny pipelines' VAEs do not downsample. Read from the configs alone.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.load_config(location, subfolder="vae", revision=revision)
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if family == "flux":
        return vae_factor * 2
    from diffusers import SD3Transformer2DModel

    dit = SD3Transformer2DModel.load_config(location, subfolder="transformer", revision=revision)
    return vae_factor * int(dit.get("patch_size", 2))


def _seeds(seeds: int | Sequence[int], n: int) -> np.ndarray:
    out = np.full(n, seeds, dtype=np.int64) if isinstance(seeds, int) else np.asarray(list(seeds), dtype=np.int64)
    if out.shape != (n,) or (out < 0).any():
        raise ValueError(f"seeds must be one non-negative int or one per prompt ({n}), got {seeds!r}")
    return out


def _steps(steps: Iterable[int] | None, total: int) -> tuple[int, ...]:
    if steps is None:
        return default_steps(total)
    out = tuple(sorted({int(s) for s in steps}))
    if not out or out[0] < 0 or out[-1] >= total:
        raise ValueError(f"steps {list(steps)} must be non-empty and within 0..{total - 1} (num_inference_steps)")
    return out


def _prompts(prompts: Sequence[str]) -> list[str]:
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if not out or not all(isinstance(p, str) for p in out):
        raise ValueError("prompts must be a non-empty list of strings (one batch)")
    return out


def _release(pipe: Pipeline) -> None:
    """What ``__call__`` would have done at its end: release model-offload hooks (no-op without offload)."""
    free = getattr(pipe, "maybe_free_model_hooks", None)
    if callable(free):
        free()


def capture_pipeline(
    pipe: Pipeline,
    prompts: Sequence[str],
    settings: Generation,
    positions: Iterable[str | Position],
    *,
    seeds: int | Sequence[int] = DEFAULT_SEED,
    steps: Iterable[int] | None = None,
    image_tokens: int | None = None,
    prompt_offset: int = 0,
) -> dict[str, TokenRows]:
    """Token rows of one batch of ``prompts`` at ``positions`` of a Flux or SD3 pipeline.

    One ``torch.Generator`` (CPU, so CPU and CUDA start from the same noise) per prompt, seeded with
    its seed. ``te`` positions: one forward of the text encoder (the pipeline's own
    ``encode_prompt``), step 0. DiT positions: the conditional branch at ``steps`` (default
    :func:`default_steps`), denoising stopped after the last one. ``image_tokens``: the per-(prompt,
    step) sample size (None = all). Returns ``{position name: TokenRows}`` in the given order.
    """
    texts = _prompts(prompts)
    family = family_of(pipe)
    if family not in _FAMILIES:
        raise ValueError(f"capture_pipeline takes a Flux or SD3 pipeline, got {type(pipe).__name__}")
    rules = _FAMILIES[family]
    if image_tokens is not None and image_tokens < 1:
        raise ValueError(f"image_tokens must be a positive int or None (all), got {image_tokens}")
    sites = resolve(pipe, positions)
    seed_arr = _seeds(seeds, len(texts))
    step_list = _steps(steps, settings.num_inference_steps)
    msl = settings.max_sequence_length
    te_sites = [s for s in sites if s.position.kind == "te"]
    dit_sites = [s for s in sites if s.position.kind != "te"]
    results: dict[str, TokenRows] = {}
    with torch.no_grad(), quiet_pipeline_logs(pipe):
        te_mask = np.zeros((len(texts), msl), dtype=bool)
        if te_sites:
            te_mask = _mask(getattr(pipe, rules.te_tokenizer), texts, msl)
        te = _Collector([s.position for s in te_sites], (0,), te_mask, seed_arr, None, prompt_offset, stop=False)
        with position_hooks(pipe, te_sites, te):
            embeds = rules.encode(pipe, texts, msl)
        results.update(te.rows())
        if dit_sites:
            mask = rules.text_mask(pipe, texts, msl)
            dit = _Collector(
                [s.position for s in dit_sites], step_list, mask, seed_arr, image_tokens, prompt_offset, stop=True
            )
            kwargs: dict[str, Any] = {
                **embeds,
                "height": settings.height,
                "width": settings.width,
                "num_inference_steps": settings.num_inference_steps,
                "guidance_scale": settings.guidance_scale,
                "max_sequence_length": msl,
                "num_images_per_prompt": 1,
                "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seed_arr],
                "output_type": "latent",
            }
            if settings.negative_prompt is not None:
                kwargs["negative_prompt"] = [settings.negative_prompt] * len(texts)
            if family == "flux":
                kwargs["true_cfg_scale"] = settings.true_cfg_scale
            with position_hooks(pipe, dit_sites, dit):
                try:
                    pipe(**kwargs)
                except _StopDenoising:
                    _release(pipe)
            results.update(dit.rows())
    return {s.name: results[s.name] for s in sites}


def iter_capture(
    pipe: Pipeline,
    prompts: Sequence[str],
    settings: Generation,
    positions: Iterable[str | Position],
    *,
    batch_size: int,
    seeds: int | Sequence[int] = DEFAULT_SEED,
    steps: Iterable[int] | None = None,
    image_tokens: int | None = None,
) -> Iterator[dict[str, TokenRows]]:
    """:func:`capture_pipeline` over ``prompts`` in batches of ``batch_size`` (prompt indices are global)."""
    texts = _prompts(prompts)
    seed_arr = _seeds(seeds, len(texts))
    names = list(positions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(texts), batch_size):
        stop = start + batch_size
        yield capture_pipeline(
            pipe,
            texts[start:stop],
            settings,
            names,
            seeds=seed_arr[start:stop].tolist(),
            steps=steps,
            image_tokens=image_tokens,
            prompt_offset=start,
        )


# --- a standalone text encoder (family text_encoder) ---------------------------------------------


def capture_text_encoder(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    positions: Iterable[str | Position],
    *,
    max_length: int = 512,
    prompt_offset: int = 0,
) -> dict[str, TokenRows]:
    """``te.N.txt`` rows of a HF text model (BERT, MiniLM, ...): one forward, real tokens, step 0.

    Padding and truncation as the pooled extractor (``extractors/hf.py``): right or left padding both
    work (position ids count real tokens where the model takes them). The forward stops after the
    deepest requested layer. Seeds are ``NO_SEED``: no generation is involved.
    """
    items = _prompts(texts)
    sites = resolve(model, positions)
    batch = tokenizer(items, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = batch["attention_mask"]
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask.to(device)}
    accepted = inspect.signature(model.forward).parameters
    if "token_type_ids" in batch and "token_type_ids" in accepted:
        kwargs["token_type_ids"] = batch["token_type_ids"].to(device)
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.cumsum(dim=-1) - 1).clamp(min=0).to(device)
    seeds = np.full(len(items), NO_SEED, dtype=np.int64)
    collector = _Collector(
        [s.position for s in sites], (0,), mask.numpy().astype(bool), seeds, None, prompt_offset, stop=True
    )
    with torch.no_grad(), position_hooks(model, sites, collector), suppress(_StopDenoising):
        model(**kwargs)
    rows = collector.rows()
    return {s.name: rows[s.name] for s in sites}
