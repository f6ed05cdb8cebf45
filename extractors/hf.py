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

from safeport.extractors.base import Pooled, RepresentationSpec, check_max_tokens, masked_mean


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
        drop_constant_prefix: bool = False,
    ) -> None:
        decoder = text_decoder(model)
        check_max_tokens(decoder.config, spec.max_tokens, spec.model_id)
        self.model = decoder.eval().to(device)
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        if layer is not None:
            _truncate_layers(self.model, layer)
        self.causal = causal
        if drop_constant_prefix and not causal:
            raise ValueError(
                f"option drop_constant_prefix is not available for {spec.model_id!r}: a bidirectional encoder has "
                "no position that is the same for every prompt; remove the option"
            )
        self.drop_constant_prefix = drop_constant_prefix

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def _raw_lengths(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        return np.minimum(self._raw_lengths(texts), self.spec.max_tokens)

    def _forward(self, texts: Sequence[str]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(tokenizer batch, final hidden states [n, L, d], attention mask [n, L]) of one padded batch."""
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
        if self.causal:
            kwargs["use_cache"] = False
        return batch, self.model(**kwargs).last_hidden_state, mask

    def constant_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per row, how many leading real tokens are the tokenizer's fixed prefix (BOS, ...).

        In a causal model the hidden states there depend on those tokens only, so they are the same
        for every prompt. A bidirectional encoder has none (0).
        """
        if not self.causal:
            return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        empty = self.tokenizer("", add_special_tokens=True)["input_ids"]
        probe = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        prefix = empty[: next((i for i, (a, b) in enumerate(zip(empty, probe, strict=False)) if a != b), len(empty))]
        counts = []
        for ids, m in zip(input_ids.tolist(), mask.bool().tolist(), strict=True):
            real = [t for t, keep in zip(ids, m, strict=True) if keep]
            n = 0
            while n < min(len(prefix), len(real)) and real[n] == prefix[n]:
                n += 1
            counts.append(n)
        return torch.tensor(counts, dtype=torch.long, device=mask.device)

    def encode(self, texts: Sequence[str]) -> Pooled:
        raw = self._raw_lengths(texts)
        with torch.inference_mode():
            batch, hidden, mask = self._forward(texts)
            if self.drop_constant_prefix:
                # Leave out the first k real tokens of each row (works under left and right padding).
                k = self.constant_prefix(batch["input_ids"].to(self.device), mask)
                mask = mask * (mask.cumsum(dim=-1) > k[:, None]).long()
            pooled = masked_mean(hidden, mask)
        n_tokens = mask.sum(dim=1).cpu().numpy().astype(np.int64)
        return Pooled(
            values=pooled.cpu().numpy().astype(np.float32, copy=False),
            n_tokens=n_tokens,
            truncated=raw > self.spec.max_tokens,
        )

    def position_norms(self, texts: Sequence[str], n_positions: int) -> tuple[np.ndarray, int]:
        """L2 norm of the final hidden state at the first ``n_positions`` real tokens (NaN past the end),
        and how many leading positions are identical for every prompt (BOS; 0 for a bidirectional encoder)."""
        texts = list(texts)
        with torch.inference_mode():
            batch, hidden, mask = self._forward(texts)
            k = self.constant_prefix(batch["input_ids"].to(self.device), mask)
            out = np.full((len(texts), n_positions), np.nan, dtype=np.float32)
            for i in range(len(texts)):
                norms = hidden[i][mask[i].bool()].float().norm(dim=-1)[:n_positions].cpu().numpy()
                out[i, : len(norms)] = norms
        return out, int(k.min()) if len(texts) else 0


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
