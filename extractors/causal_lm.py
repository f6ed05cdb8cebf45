"""Causal LMs (Llama, Mistral, Qwen, SmolLM2 GGUF...): final layer, masked mean.

The base model is loaded with ``AutoModel`` so the LM head is never built.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModel, AutoTokenizer

from safeport.extractors.base import ModelSource, check_weights, resolve_device, resolve_dtype
from safeport.extractors.gguf_cache import load_gguf
from safeport.extractors.hf import HFPooler


def load(source: ModelSource) -> HFPooler:
    if source.path is not None:
        check_weights(source.path, source.allow_pickle, source.name, source.gguf_file)
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.dtype, device)
    if source.gguf_file and source.path is not None:
        model, tokenizer = load_gguf(source.path, source.gguf_file, dtype)  # converted once, then cached
    else:
        kwargs: dict[str, Any] = {"revision": source.revision, "trust_remote_code": False}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        if not source.gguf_file and not source.allow_pickle:
            kwargs["use_safetensors"] = True  # never unpickle weights unless the catalog entry allows it
        model = AutoModel.from_pretrained(source.location, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        # Padding is masked out of the mean, so any token id serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    layer_opt = source.option("layer", "final")
    layer = None if layer_opt == "final" else int(layer_opt)
    return HFPooler(
        model,
        tokenizer,
        source.spec(layer=layer_opt),
        device,
        layer=layer,
        causal=True,
        drop_constant_prefix=source.flag("drop_constant_prefix"),
    )
