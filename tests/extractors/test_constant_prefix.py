"""``drop_constant_prefix`` (issue 16 item 8): leading positions identical for every prompt leave pooling and steering.

Known answers: the pooled row equals the mean of the pipeline's (or model's) own hidden states
from the first prompt-dependent position on, and those left-out positions really are the same
for every prompt. Off by default; bidirectional encoders refuse it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from safeport.eval.steering import steered_embeds
from safeport.extractors import ModelSource, load_extractor
from safeport.extractors.hf import HFPooler
from safeport.extractors.pipeline_encoder import PipelineEncoder
from tests.tiny_models import tiny_bert, tiny_llama31, tiny_qwen35
from tests.tiny_pipelines import save_tiny

TEXTS = ["a cat sat on the sofa", "two dogs running on a beach at dawn", "hi"]
MSL = 64
DROP = (("drop_constant_prefix", "True"),)  # as the catalog's `drop_constant_prefix: true` arrives


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix")
    return {
        "llama31": tiny_llama31(root / "llama31"),
        "qwen35": tiny_qwen35(root / "qwen35"),
        "bert": tiny_bert(root / "bert"),
        "z_image": save_tiny("z_image", root / "z_image"),
        "qwen_image": save_tiny("qwen_image", root / "qwen_image"),
        "flux": save_tiny("flux", root / "flux"),
    }


def _source(folder: Path, family: str, options: tuple[tuple[str, str], ...] = ()) -> ModelSource:
    return ModelSource(
        name="m", family=family, path=str(folder), device="cpu", dtype="float32", max_tokens=MSL, options=options
    )


def test_causal_lm_leaves_out_bos(folders: dict[str, Path]) -> None:
    folder = folders["llama31"]
    on = load_extractor(_source(folder, "causal_lm", DROP))
    off = load_extractor(_source(folder, "causal_lm"))
    assert isinstance(on, HFPooler)
    assert on.spec.key() != off.spec.key()  # a different representation, cached apart
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    hidden = []
    for text in TEXTS:
        with torch.no_grad():
            hidden.append(model(**tok(text, return_tensors="pt")).last_hidden_state[0])
    # The premise: the BOS position is the same for every prompt (causal attention sees only BOS).
    for h in hidden[1:]:
        torch.testing.assert_close(h[0], hidden[0][0])
    want = np.stack([h[1:].mean(dim=0).numpy() for h in hidden])
    for side in ("right", "left"):
        on.tokenizer.padding_side = side
        pooled = on.encode(TEXTS)
        np.testing.assert_allclose(pooled.values, want, rtol=1e-5, atol=1e-6)
        assert pooled.n_tokens.tolist() == [len(h) - 1 for h in hidden]
    assert not np.allclose(off.encode(TEXTS).values, want, atol=1e-4)


def test_causal_lm_without_bos_drops_nothing(folders: dict[str, Path]) -> None:
    on = load_extractor(_source(folders["qwen35"], "causal_lm", DROP))
    off = load_extractor(_source(folders["qwen35"], "causal_lm"))
    np.testing.assert_array_equal(on.encode(TEXTS).values, off.encode(TEXTS).values)
    norms, constant = on.position_norms(TEXTS, 4)  # type: ignore[attr-defined]
    assert constant == 0 and norms.shape == (3, 4)
    n_hi = len(AutoTokenizer.from_pretrained(folders["qwen35"])("hi").input_ids)
    assert np.isnan(norms[2, n_hi:]).all() and np.isfinite(norms[2, :n_hi]).all()  # NaN past a text's end


def test_z_image_leaves_out_the_chat_template_prefix(folders: dict[str, Path]) -> None:
    on = load_extractor(_source(folders["z_image"], "z_image", DROP))
    assert isinstance(on, PipelineEncoder)
    pipe = on.pipe
    with torch.no_grad():
        rows, _ = pipe.encode_prompt(prompt=list(TEXTS), do_classifier_free_guidance=False, max_sequence_length=MSL)
    k = len(pipe.tokenizer("<|im_start|>user\n").input_ids)
    assert k == 3
    for r in rows[1:]:
        torch.testing.assert_close(r[:k], rows[0][:k])  # identical for every prompt
        assert not torch.allclose(r[k], rows[0][k])  # the first prompt token is not
    pooled = on.encode(TEXTS)
    np.testing.assert_allclose(pooled.values, np.stack([r[k:].mean(dim=0).numpy() for r in rows]), rtol=1e-5, atol=1e-6)
    assert pooled.n_tokens.tolist() == [len(r) - k for r in rows]
    norms, constant = on.position_norms(TEXTS, 5)
    assert constant == k
    np.testing.assert_allclose(norms[:, 0], [float(r[0].norm()) for r in rows], rtol=1e-5)
    # Steering with the option adds alpha*v from the first prompt token on, never to the prefix.
    v = np.random.default_rng(0).standard_normal(on.dim).astype(np.float32)
    kw = steered_embeds(pipe, list(TEXTS), v, 2.0, max_sequence_length=MSL, drop_constant_prefix=True)
    for steered, r in zip(kw["prompt_embeds"], rows, strict=True):
        torch.testing.assert_close(steered[:k], r[:k])
        torch.testing.assert_close(steered[k:], r[k:] + 2.0 * torch.from_numpy(v), rtol=1e-6, atol=1e-6)


def test_qwen_image_prefix_is_already_dropped_by_its_pipeline(folders: dict[str, Path]) -> None:
    on = load_extractor(_source(folders["qwen_image"], "qwen_image", DROP))
    off = load_extractor(_source(folders["qwen_image"], "qwen_image"))
    np.testing.assert_array_equal(on.encode(TEXTS).values, off.encode(TEXTS).values)


@pytest.mark.parametrize(("name", "family"), [("bert", "text_encoder"), ("flux", "flux")])
def test_bidirectional_encoders_refuse_the_option(folders: dict[str, Path], name: str, family: str) -> None:
    with pytest.raises(ValueError, match=r"drop_constant_prefix.*bidirectional"):
        load_extractor(_source(folders[name], family, DROP))


def test_option_values_are_checked(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"options.drop_constant_prefix is 'maybe'; set it to true or false"):
        load_extractor(_source(folders["z_image"], "z_image", (("drop_constant_prefix", "maybe"),)))
