"""Plain text encoders (BERT, MiniLM, T5 encoder...): last hidden state, masked mean."""

from __future__ import annotations

from transformers import AutoModel, AutoTokenizer

from safeport.extractors.base import ModelSource, check_weights, resolve_device, resolve_dtype
from safeport.extractors.hf import HFPooler


def load(source: ModelSource) -> HFPooler:
    if source.path is not None:
        check_weights(source.path, source.allow_pickle, source.name)
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(source.location, revision=source.revision, trust_remote_code=False)
    tokenizer.padding_side = "right"
    model = AutoModel.from_pretrained(
        source.location,
        revision=source.revision,
        dtype=dtype,
        trust_remote_code=False,
        # Never unpickle weights unless the catalog entry allows it (None: transformers' default order).
        use_safetensors=None if source.allow_pickle else True,
    )
    return HFPooler(model, tokenizer, source.spec(), device, drop_constant_prefix=source.flag("drop_constant_prefix"))
