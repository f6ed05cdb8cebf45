"""Known-answer pooling for the causal-LM and text-encoder families (tiny config-built models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from safeport.extractors import load_extractor
from safeport.extractors.base import ExtractionError, ModelSource, check_finite, length_batches, masked_mean
from tests.tiny_models import tiny_bert, tiny_llama

TEXTS = [
    "a cat sits on a mat",
    "the quick brown fox jumps over the lazy dog near the old river bank",
    "hi",
    "two people ride bicycles down a quiet street at dawn",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def _hand_pool(folder: Path, text: str) -> np.ndarray:
    """Final hidden states of the base model on the unpadded text, averaged by hand."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    return hidden.sum(dim=0).numpy() / hidden.shape[0]


@pytest.mark.parametrize("family", ["causal_lm", "text_encoder"])
def test_pooling_equals_hand_computation(family: str, llama_dir: Path, bert_dir: Path) -> None:
    folder = llama_dir if family == "causal_lm" else bert_dir
    ex = load_extractor(ModelSource(name="m", family=family, path=str(folder), device="cpu", dtype="float32"))
    pooled = ex.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(pooled.values[i], _hand_pool(folder, text), rtol=1e-5, atol=1e-6)
    assert pooled.values.dtype == np.float32
    assert pooled.n_tokens.tolist() == [len(AutoTokenizer.from_pretrained(folder)(t)["input_ids"]) for t in TEXTS]


@pytest.mark.parametrize("family", ["causal_lm", "text_encoder"])
def test_left_and_right_padding_and_batch_mates_agree(family: str, llama_dir: Path, bert_dir: Path) -> None:
    folder = llama_dir if family == "causal_lm" else bert_dir
    ex = load_extractor(ModelSource(name="m", family=family, path=str(folder), device="cpu", dtype="float32"))
    alone = np.stack([ex.encode([t]).values[0] for t in TEXTS])
    right = ex.encode(TEXTS).values
    ex.tokenizer.padding_side = "left"  # type: ignore[attr-defined]
    left = ex.encode(TEXTS).values
    scale = np.abs(alone).max()
    assert np.abs(right - alone).max() / scale <= 1e-5
    assert np.abs(left - alone).max() / scale <= 1e-5


def test_truncation_is_flagged_and_counted(llama_dir: Path) -> None:
    ex = load_extractor(ModelSource(name="m", family="causal_lm", path=str(llama_dir), device="cpu", max_tokens=5))
    pooled = ex.encode(TEXTS)
    lengths = ex.token_lengths(TEXTS)
    assert pooled.n_tokens.max() == 5
    assert pooled.truncated.tolist() == [True, True, False, True]
    assert lengths.tolist() == pooled.n_tokens.tolist()


def test_intermediate_layer_stops_the_forward_pass(llama_dir: Path) -> None:
    ex = load_extractor(
        ModelSource(name="m", family="causal_lm", path=str(llama_dir), device="cpu", options=(("layer", "0"),))
    )
    assert len(ex.model.layers) == 1  # type: ignore[attr-defined]
    model = AutoModel.from_pretrained(llama_dir).eval()
    ids = AutoTokenizer.from_pretrained(llama_dir)(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        h1 = model(**ids, output_hidden_states=True).hidden_states[1][0]
    np.testing.assert_allclose(ex.encode([TEXTS[0]]).values[0], h1.mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)
    assert ex.spec.layer == "0"


def test_masked_mean_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [7.0, 9.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    np.testing.assert_allclose(masked_mean(hidden, mask).numpy(), [[2.0, 3.0], [4.0, 5.0]])
    assert torch.isnan(masked_mean(hidden, torch.zeros(2, 3))).all()


def test_non_finite_rows_are_refused_with_ids() -> None:
    values = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 1.0]], dtype=np.float32)
    with pytest.raises(ExtractionError, match=r"model 'm'.*2 text\(s\).*\['b', 'c'\]"):
        check_finite(values, "m", ["a", "b", "c"])


def test_length_batches_cover_everything_once_and_cap_tokens() -> None:
    lengths = np.array([5, 1, 9, 3, 7, 2, 8])
    batches = list(length_batches(lengths, batch_size=3, max_batch_tokens=16))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    for b in batches:
        assert len(b) == 1 or lengths[b].max() * len(b) <= 16
    assert lengths[batches[0]].tolist() == [1, 2, 3]


def test_spec_key_changes_with_every_field() -> None:
    base = ModelSource(name="m", family="causal_lm", path="/x", device="cpu")
    keys = {
        base.spec().key(),
        ModelSource(name="m", family="causal_lm", path="/x", device="cpu", max_tokens=7).spec().key(),
        ModelSource(name="m", family="causal_lm", path="/x", device="cpu", weights="abc").spec().key(),
        ModelSource(name="m", family="causal_lm", path="/x", device="cpu", dtype="bfloat16").spec().key(),
        base.spec(layer="3").key(),
    }
    assert len(keys) == 5
    assert base.spec().key() == ModelSource(name="m", family="causal_lm", path="/x", device="cpu").spec().key()
