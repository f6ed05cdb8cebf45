"""The two real pretrained models of the default catalog, loaded offline from their packages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safeport.extractors import load_extractor
from safeport.extractors.base import ModelSource
from tests.tiny_models import minilm_folder, smollm2_folder

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "A man riding a wave on top of a surfboard.",
    "The castle was rebuilt in the fourteenth century after a long siege that destroyed its walls.",
    "Two dogs.",
    "A bowl of fruit sits on a wooden kitchen table next to a window with the morning sun.",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_extractor(
        ModelSource(name="smollm2", family="causal_lm", path=str(smollm2_folder()), gguf_file=GGUF, device="cpu")
    )


def test_smollm2_final_layer_without_lm_head(smollm2) -> None:
    assert smollm2.dim == 576
    assert not hasattr(smollm2.model, "lm_head")
    # Hand computation through the full causal LM: last hidden state (post final norm), plain mean.
    tok = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF)
    full = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=GGUF).eval()
    ids = tok(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        want = full(**ids, output_hidden_states=True).hidden_states[-1][0].mean(dim=0).numpy()
    got = smollm2.encode([TEXTS[0]]).values[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_smollm2_padding_side_and_batch_mates(smollm2) -> None:
    alone = np.stack([smollm2.encode([t]).values[0] for t in TEXTS])
    right = smollm2.encode(TEXTS).values
    smollm2.tokenizer.padding_side = "left"
    try:
        left = smollm2.encode(TEXTS).values
    finally:
        smollm2.tokenizer.padding_side = "right"
    for batch in (right, left):
        rel = np.linalg.norm(batch - alone, axis=1) / np.linalg.norm(alone, axis=1)
        assert rel.max() <= 1e-5, rel


def test_minilm_masked_mean_matches_hand_computation() -> None:
    ex = load_extractor(ModelSource(name="minilm", family="text_encoder", path=str(minilm_folder()), device="cpu"))
    assert ex.dim == 384
    pooled = ex.encode(TEXTS)
    from transformers import AutoModel

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    model = AutoModel.from_pretrained(minilm_folder()).eval()
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        np.testing.assert_allclose(pooled.values[i], h.mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)
    # Semantics survive: two captions about the sea are closer than a caption and a castle sentence.
    sea = ex.encode(["A surfer rides a big wave in the ocean."]).values[0]

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(sea, pooled.values[0]) > cos(sea, pooled.values[1])
