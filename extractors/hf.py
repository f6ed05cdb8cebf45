"""Masked-mean pooling of a Hugging Face transformer's final hidden states.

Shared by the causal-LM and plain text-encoder families: both load a *base*
model (no LM head is ever built or run), feed explicit position ids so left
and right padding give the same result, and pool over real tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from safeport.extractors.base import Pooled, RepresentationSpec, masked_mean


class HFPooler:
    """A loaded base transformer + tokenizer that mean-pools the final layer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        spec: RepresentationSpec,
        device: torch.device,
        layer: int | None = None,
        causal: bool = False,
    ) -> None:
        self.model = text_decoder(model).eval().to(device)
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        if layer is not None:
            _truncate_layers(self.model, layer)
        self.causal = causal

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def _raw_lengths(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        return np.minimum(self._raw_lengths(texts), self.spec.max_tokens)

    def encode(self, texts: Sequence[str]) -> Pooled:
        raw = self._raw_lengths(texts)
        batch = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.spec.max_tokens,
            padding=True,
            return_tensors="pt",
        )
        mask = batch["attention_mask"].to(self.device)
        input_ids = batch["input_ids"].to(self.device)
        # Positions count real tokens only, so a left-padded row sees the same
        # positions as a right-padded one.
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids,
        }
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"].to(self.device)
        with torch.inference_mode():
            if self.causal:
                kwargs["use_cache"] = False
            pooled = masked_mean(self.model(**kwargs).last_hidden_state, mask)
        n_tokens = mask.sum(dim=1).cpu().numpy().astype(np.int64)
        return Pooled(
            values=pooled.cpu().numpy().astype(np.float32, copy=False),
            n_tokens=n_tokens,
            truncated=raw > self.spec.max_tokens,
        )


def text_decoder(model: Any) -> Any:
    """The text stack of a multimodal base model (e.g. ``Qwen3_5Model``: ``language_model``), else ``model``.

    Why: ``AutoModel`` maps a vision-language checkpoint such as Qwen/Qwen3.5-9B (``qwen3_5``) to the
    multimodal base model, whose config has no top-level ``hidden_size`` and whose decoder layers sit
    under ``language_model``. For text-only input its forward is exactly ``language_model`` on the token
    embeddings, so the text stack is what is kept (the vision tower is dropped and never run).
    """
    inner = getattr(model, "language_model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
        return inner
    return model


def _truncate_layers(model: Any, layer: int) -> None:
    """Keep layers ``0..layer`` so the forward pass stops at the last needed one.

    The final norm is replaced by identity: an intermediate layer's residual
    stream is what is wanted, not a normalised copy.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(
            f"layer {layer} was requested but {type(model).__name__} exposes no `layers`; use layer: final"
        )
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range for a model with {len(layers)} layers")
    keep = layer % len(layers) + 1
    model.layers = layers[:keep]
    model.config.get_text_config().num_hidden_layers = keep
    if hasattr(model, "norm"):
        model.norm = torch.nn.Identity()
