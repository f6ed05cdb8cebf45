"""The paper's source LLMs as tiny config-built models: Llama-3.1, Mistral v0.3 and Qwen3.5 (hybrid, multimodal layout).

Each goes through ``load_extractor`` exactly like the hub checkpoint would (a folder with config,
safetensors and tokenizer), in float32 and bfloat16; rows are checked against an independent
unpadded forward of ``AutoModel`` (for Qwen3.5: the multimodal ``Qwen3_5Model`` with its own
position ids), under right and left padding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from safeport.extractors import ModelSource, load_extractor
from safeport.extractors.hf import HFPooler
from tests.tiny_models import tiny_llama31, tiny_mistral, tiny_qwen35

TEXTS = ["a cat sat on the sofa", "two dogs running on a beach, golden light at dawn", "hi"]
BUILDERS = {"llama31": tiny_llama31, "mistral": tiny_mistral, "qwen35": tiny_qwen35}
# bfloat16 keeps ~3 significant digits; rows are compared against the float32 forward.
TOL = {"float32": 1e-5, "bfloat16": 4e-2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


def _source(folder: Path, dtype: str, **kw: object) -> ModelSource:
    return ModelSource(name="m", family="causal_lm", path=str(folder), device="cpu", dtype=dtype, **kw)  # type: ignore[arg-type]


def _by_hand(folder: Path, texts: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    rows = []
    for text in texts:
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        rows.append(hidden.mean(dim=0).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_paper_source_loads_and_pools_like_an_unpadded_forward(folders: dict[str, Path], name: str, dtype: str) -> None:
    ex = load_extractor(_source(folders[name], dtype))
    assert isinstance(ex, HFPooler)
    assert ex.dim == 32
    assert not hasattr(ex.model, "visual")  # Qwen3.5: only the text stack is kept, the vision tower is dropped
    want = _by_hand(folders[name], TEXTS)
    scale = np.abs(want).max()
    right = ex.encode(TEXTS)
    assert right.values.dtype == np.float32 and np.isfinite(right.values).all()
    assert np.abs(right.values - want).max() / scale <= TOL[dtype]
    ex.tokenizer.padding_side = "left"
    left = ex.encode(TEXTS)
    assert np.abs(left.values - want).max() / scale <= TOL[dtype]
    tok = AutoTokenizer.from_pretrained(folders[name])
    assert right.n_tokens.tolist() == [len(tok(t).input_ids) for t in TEXTS]


def test_bos_is_added_by_the_llama_and_mistral_tokenizers(folders: dict[str, Path]) -> None:
    # Both real tokenizers prepend a BOS (<|begin_of_text|>, <s>); Qwen's adds none.
    for name, bos in (("llama31", "<|begin_of_text|>"), ("mistral", "<s>")):
        tok = AutoTokenizer.from_pretrained(folders[name])
        assert tok.convert_ids_to_tokens(tok("a cat").input_ids)[0] == bos
    qwen = AutoTokenizer.from_pretrained(folders["qwen35"])
    assert qwen("a cat").input_ids == qwen("a cat", add_special_tokens=False).input_ids


def test_qwen35_intermediate_layer_truncates_the_text_stack(folders: dict[str, Path]) -> None:
    ex = load_extractor(_source(folders["qwen35"], "float32", options=(("layer", "1"),)))
    assert isinstance(ex, HFPooler)
    assert len(ex.model.layers) == 2
    model = AutoModel.from_pretrained(folders["qwen35"]).eval()
    ids = AutoTokenizer.from_pretrained(folders["qwen35"])(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        h2 = model(**ids, output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(ex.encode([TEXTS[0]]).values[0], h2.mean(dim=0).numpy(), rtol=1e-5, atol=1e-6)
