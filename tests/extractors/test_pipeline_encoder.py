"""Known-answer tests for the diffusers pipeline text-encoder extractors (all five families).

Each tiny pipeline is saved to a folder and loaded through ``load_extractor`` exactly like a real
checkpoint; the expected pooled rows are computed by hand from the pipeline's own
``encode_prompt`` and, independently, from a direct forward of the text encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from safeport.extractors import ModelSource, load_extractor
from safeport.extractors.base import masked_mean
from safeport.extractors.pipeline_encoder import FAMILIES as ENCODER_FAMILIES
from safeport.extractors.pipeline_encoder import PipelineEncoder, load
from tests.tiny_pipelines import FAMILIES, save_tiny

MAX_LEN = 48
SHORT = "a cat"
MEDIUM = "a photo of a cat sitting on a red sofa"
LONG = " ".join(["a watercolor painting of mountains at dawn with birds"] * 8)
TEXTS = [SHORT, MEDIUM, LONG]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {f: save_tiny(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def _source(family: str, folder: Path, **kw: object) -> ModelSource:
    args: dict[str, object] = {"device": "cpu", "dtype": "float32", "max_tokens": MAX_LEN}
    args.update(kw)
    return ModelSource(name=f"tiny-{family}", family=family, path=str(folder), **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def extractors(folders: dict[str, Path]) -> dict[str, PipelineEncoder]:
    out = {}
    for f, folder in folders.items():
        ex = load_extractor(_source(f, folder))
        assert isinstance(ex, PipelineEncoder)
        out[f] = ex
    return out


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_only_text_components(extractors: dict[str, PipelineEncoder], family: str) -> None:
    ex = extractors[family]
    pipe = ex.pipe
    assert type(pipe).__name__ == ENCODER_FAMILIES[family].pipeline
    for name in ("transformer", "vae", "scheduler"):
        assert getattr(pipe, name, None) is None
    for name in ENCODER_FAMILIES[family].components:
        assert getattr(pipe, name) is not None
    assert not any(p.requires_grad for p in getattr(pipe, ENCODER_FAMILIES[family].embed_component).parameters())
    assert ex.spec.family == family
    assert ex.spec.layer == "prompt_embeds"
    assert ex.spec.pooling == ("mean_all_positions" if family in ("flux", "sd3") else "masked_mean")
    assert ex.spec.max_tokens == MAX_LEN


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_dtype_and_dim(extractors: dict[str, PipelineEncoder], family: str) -> None:
    ex = extractors[family]
    pooled = ex.encode(TEXTS)
    assert pooled.values.shape == (3, ex.dim)
    assert pooled.values.dtype == np.float32
    assert pooled.n_tokens.dtype == np.int64
    assert np.isfinite(pooled.values).all()
    empty = ex.encode([])
    assert empty.values.shape == (0, ex.dim)


def test_dims_follow_the_denoiser_input(extractors: dict[str, PipelineEncoder]) -> None:
    # T5 width for Flux/SD3/Wan, Qwen hidden size for Z-Image/Qwen-Image (tiny configs).
    assert {f: ex.dim for f, ex in extractors.items()} == {
        "flux": 32,
        "sd3": 48,
        "z_image": 16,
        "qwen_image": 16,
        "wan": 32,
    }


# --- known answers, per family ------------------------------------------------------------------


def test_flux_pools_t5_over_all_positions_including_padding(extractors: dict[str, PipelineEncoder]) -> None:
    ex = extractors["flux"]
    pipe = ex.pipe
    pooled = ex.encode(TEXTS)
    with torch.no_grad():
        embeds, clip_pooled, _ = pipe.encode_prompt(prompt=list(TEXTS), prompt_2=None, max_sequence_length=MAX_LEN)
    assert embeds.shape[1] == MAX_LEN
    np.testing.assert_allclose(pooled.values, _np(embeds.mean(dim=1)), rtol=1e-6, atol=1e-7)
    assert pooled.n_tokens.tolist() == [MAX_LEN] * 3
    # Independently: the T5 encoder alone on max-length-padded ids, no attention mask.
    tok = pipe.tokenizer_2(list(TEXTS), padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        t5 = pipe.text_encoder_2(tok.input_ids).last_hidden_state
    np.testing.assert_allclose(pooled.values, _np(t5.mean(dim=1)), rtol=1e-5, atol=1e-6)
    # Padding counts: the real-token mean differs; and CLIP's pooled vector is not what is pooled.
    real_only = _np(masked_mean(t5, tok.attention_mask))
    assert not np.allclose(pooled.values[0], real_only[0], atol=1e-4)
    assert clip_pooled.shape[-1] == 32 and not np.allclose(pooled.values, _np(clip_pooled), atol=1e-3)


def test_sd3_pools_clip_and_t5_concatenation_over_all_positions(
    extractors: dict[str, PipelineEncoder],
) -> None:
    ex = extractors["sd3"]
    pipe = ex.pipe
    pooled = ex.encode(TEXTS)
    with torch.no_grad():
        embeds, _, _, _ = pipe.encode_prompt(
            prompt=list(TEXTS),
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_LEN,
        )
    assert embeds.shape[1] == 77 + MAX_LEN
    np.testing.assert_allclose(pooled.values, _np(embeds.mean(dim=1)), rtol=1e-6, atol=1e-7)
    assert pooled.n_tokens.tolist() == [77 + MAX_LEN] * 3
    # Independently: CLIP-L/G penultimate states (zero-padded to T5 width) stacked on T5 states.
    with torch.no_grad():
        parts = []
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(list(TEXTS), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            parts.append(enc(ids.input_ids, output_hidden_states=True).hidden_states[-2])
        clip = torch.nn.functional.pad(torch.cat(parts, dim=-1), (0, 48 - 40))
        ids = pipe.tokenizer_3(
            list(TEXTS), padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
        )
        t5 = pipe.text_encoder_3(ids.input_ids).last_hidden_state
    by_hand = torch.cat([clip, t5], dim=1).mean(dim=1)
    np.testing.assert_allclose(pooled.values, _np(by_hand), rtol=1e-5, atol=1e-6)


def test_z_image_pools_second_to_last_layer_over_real_tokens(extractors: dict[str, PipelineEncoder]) -> None:
    ex = extractors["z_image"]
    pipe = ex.pipe
    pooled = ex.encode(TEXTS)
    with torch.no_grad():
        rows, _ = pipe.encode_prompt(prompt=list(TEXTS), do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
    expected = np.stack([_np(r.mean(dim=0)) for r in rows])
    np.testing.assert_allclose(pooled.values, expected, rtol=1e-6, atol=1e-7)
    assert pooled.n_tokens.tolist() == [len(r) for r in rows]
    # Independently: Qwen3 hidden_states[-2] of the chat-templated text, masked mean.
    templated = [
        pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for t in TEXTS
    ]
    tok = pipe.tokenizer(templated, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask, output_hidden_states=True
        ).hidden_states
    np.testing.assert_allclose(pooled.values, _np(masked_mean(hidden[-2], tok.attention_mask)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pooled.values, _np(masked_mean(hidden[-1], tok.attention_mask)), atol=1e-4)


def test_qwen_image_pools_with_the_pipeline_mask_after_the_template_drop(
    extractors: dict[str, PipelineEncoder],
) -> None:
    ex = extractors["qwen_image"]
    pipe = ex.pipe
    pooled = ex.encode(TEXTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=list(TEXTS), max_sequence_length=MAX_LEN)
    assert mask is not None  # different lengths: the pipeline keeps a mask
    np.testing.assert_allclose(pooled.values, _np(masked_mean(embeds, mask)), rtol=1e-6, atol=1e-7)
    assert pooled.n_tokens.tolist() == mask.sum(dim=1).tolist()
    # Independently: the tiny tokenizer puts the template prefix at exactly the pipeline's drop
    # index, so the pooled tokens are "user text + template suffix" of the last hidden state.
    drop = pipe.prompt_template_encode_start_idx
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == drop == 34
    by_hand = []
    for text in TEXTS:
        ids = pipe.tokenizer([pipe.prompt_template_encode.format(text)], return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        by_hand.append(_np(hidden[0, drop : drop + MAX_LEN].mean(dim=0)))
    np.testing.assert_allclose(pooled.values, np.stack(by_hand), rtol=1e-5, atol=1e-6)


def test_qwen_image_single_prompt_without_mask(extractors: dict[str, PipelineEncoder]) -> None:
    # One prompt: encode_prompt returns mask=None (all real); pooled over every returned position.
    ex = extractors["qwen_image"]
    with torch.no_grad():
        embeds, mask = ex.pipe.encode_prompt(prompt=[MEDIUM], max_sequence_length=MAX_LEN)
    assert mask is None
    pooled = ex.encode([MEDIUM])
    np.testing.assert_allclose(pooled.values[0], _np(embeds[0].mean(dim=0)), rtol=1e-6, atol=1e-7)
    assert pooled.n_tokens.tolist() == [embeds.shape[1]]


def test_wan_pools_the_real_length_only(extractors: dict[str, PipelineEncoder]) -> None:
    ex = extractors["wan"]
    pipe = ex.pipe
    pooled = ex.encode(TEXTS)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt=list(TEXTS), do_classifier_free_guidance=False, max_sequence_length=MAX_LEN
        )
    tok = pipe.tokenizer(
        [prompt_clean(t) for t in TEXTS],
        padding="max_length",
        max_length=MAX_LEN,
        truncation=True,
        return_tensors="pt",
    )
    lengths = tok.attention_mask.sum(dim=1)
    assert embeds.shape[1] == MAX_LEN
    for i, n in enumerate(lengths.tolist()):
        assert torch.all(embeds[i, n:] == 0)  # the pipeline zeroes after the real length
        np.testing.assert_allclose(pooled.values[i], _np(embeds[i, :n].mean(dim=0)), rtol=1e-6, atol=1e-7)
    assert pooled.n_tokens.tolist() == lengths.tolist()
    # Excluding the zero padding matters: the all-position mean of a short text is much smaller.
    assert not np.allclose(pooled.values[0], _np(embeds[0].mean(dim=0)), atol=1e-4)


# --- contract properties ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_independence(extractors: dict[str, PipelineEncoder], family: str) -> None:
    ex = extractors[family]
    together = ex.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        alone = ex.encode([text])
        assert _rel_err(alone.values[0], together.values[i]) <= 1e-5
        assert alone.n_tokens[0] == together.n_tokens[i]
        assert alone.truncated[0] == together.truncated[i]
    reordered = ex.encode([LONG, SHORT])
    assert _rel_err(reordered.values[1], together.values[0]) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_flagged(extractors: dict[str, PipelineEncoder], family: str) -> None:
    ex = extractors[family]
    pooled = ex.encode(TEXTS)
    assert pooled.truncated.tolist() == [False, False, True]
    lengths = ex.token_lengths(TEXTS)
    assert lengths.dtype == np.int64
    assert lengths[2] == MAX_LEN and (lengths[:2] < MAX_LEN).all()
    if ENCODER_FAMILIES[family].count_is_mask:
        assert lengths.tolist() == pooled.n_tokens.tolist()


def test_sd3_clip_truncation_is_flagged(folders: dict[str, Path]) -> None:
    # 82 CLIP tokens (cut at 77) but 81 T5 tokens (within 256): CLIP cut the text, so it is flagged.
    wide = load(_source("sd3", folders["sd3"], max_tokens=256))
    text = "b" * 80
    assert len(wide.pipe.tokenizer(text).input_ids) == 82
    assert wide.token_lengths([text]).tolist() == [81]
    assert wide.encode([text]).truncated.tolist() == [True]
    assert wide.encode(["b" * 60]).truncated.tolist() == [False]


def test_max_sequence_length_option_wins(folders: dict[str, Path]) -> None:
    ex = load(_source("flux", folders["flux"], options=(("max_sequence_length", "16"),)))
    assert ex.max_sequence_length == 16 and ex.spec.max_tokens == 16
    pooled = ex.encode([SHORT, MEDIUM])
    assert pooled.n_tokens.tolist() == [16, 16]
    assert pooled.truncated.tolist() == [False, True]
    default = load(_source("flux", folders["flux"]))
    assert ex.spec.key() != default.spec.key()


@pytest.mark.parametrize("bad", ["0", "-3", "many"])
def test_bad_max_sequence_length_is_rejected(folders: dict[str, Path], bad: str) -> None:
    with pytest.raises(ValueError, match="max_sequence_length"):
        load(_source("wan", folders["wan"], options=(("max_sequence_length", bad),)))


def test_wrong_pipeline_option_is_rejected(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="FluxPipeline"):
        load(_source("flux", folders["flux"], options=(("pipeline", "FluxImg2ImgPipeline"),)))


def test_unknown_family_is_rejected(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="not a diffusers pipeline family"):
        load(_source("causal_lm", folders["flux"]))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_logs() -> Iterator[_Collect]:
    handler = _Collect()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def test_prompt_text_never_reaches_the_logs(extractors: dict[str, PipelineEncoder], diffusers_logs: _Collect) -> None:
    ex = extractors["flux"]
    secret = "zq" * 40  # long enough to be truncated; FluxPipeline logs the removed part
    with torch.no_grad():
        ex.pipe.encode_prompt(prompt=[secret], prompt_2=None, max_sequence_length=MAX_LEN)
    assert any("z q" in m or "zq" in m.replace(" ", "") for m in diffusers_logs.messages)  # the hazard is real
    diffusers_logs.messages.clear()
    assert ex.encode([secret]).truncated.tolist() == [True]
    assert not any("zq" in m.replace(" ", "") for m in diffusers_logs.messages)
    assert logging.getLogger("diffusers.pipelines.flux.pipeline_flux").level == logging.NOTSET  # restored
