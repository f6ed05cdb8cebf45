"""Position names, the per-block stream order of the installed diffusers, and resolution against module trees.

The stream order is pinned by a direct forward of each block class with a text sequence and an
image sequence of different lengths: the element that comes back with the text length is the text
stream. The paper's candidate sets are resolved on Flux.1-Dev- and SD3.5-Large-shaped transformers
built on the meta device (the real block counts, tiny widths, no memory).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from transformers import AutoModel

from safeport.extractors.positions import (
    BLOCK_STREAMS,
    CANDIDATE_SETS,
    Position,
    available,
    candidates,
    compact,
    family_of,
    resolve,
    text_encoder_component,
)
from tests.tiny_models import minilm_folder
from tests.tiny_pipelines import build

N_TXT, N_IMG = 5, 7  # different lengths, so each output element's length says which stream it is


@pytest.fixture(scope="module")
def flux() -> Any:
    return build("flux", num_layers=2, num_single_layers=2)


@pytest.fixture(scope="module")
def sd3() -> Any:
    return build("sd3", num_layers=3)


# --- names -------------------------------------------------------------------------------------


def test_parse_round_trip() -> None:
    for name in ("te.0.txt", "double.9.img", "double.14.txt", "single.37.img"):
        assert Position.parse(name).name == name
    assert Position.parse("double.9.img") == Position("double", 9, "img")
    assert Position.parse(Position("te", 3, "txt")) == Position("te", 3, "txt")


@pytest.mark.parametrize("name", ["te.0.img", "single.0.txt", "double.x.img", "double.-1.img", "mid.3.img", ""])
def test_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"te\.N\.txt|single\.N\.img"):
        Position.parse(name)


def test_compact_listing() -> None:
    names = ["double.0.txt", "double.1.txt", "double.2.txt", "double.5.txt", "single.3.img"]
    assert compact(names) == "double.{0..2}.txt, double.5.txt, single.3.img"


# --- stream order of each block class on the installed diffusers ---------------------------------


def _streams_by_length(output: tuple[torch.Tensor | None, ...]) -> dict[str, int]:
    """Which output element has the text length and which the image length."""
    found: dict[str, int] = {}
    for i, t in enumerate(output):
        if t is None:
            continue
        found[{N_TXT: "txt", N_IMG: "img"}[int(t.shape[1])]] = i
    return found


def test_flux_block_stream_order(flux: Any) -> None:
    t = flux.transformer
    dim = t.inner_dim
    gen = torch.Generator().manual_seed(0)
    img, txt, temb = (torch.randn(1, n, dim, generator=gen) for n in (N_IMG, N_TXT, 1))
    ids = torch.zeros(N_TXT + N_IMG, 3)
    rope = t.pos_embed(ids)
    with torch.no_grad():
        double = t.transformer_blocks[0](
            hidden_states=img, encoder_hidden_states=txt, temb=temb[:, 0], image_rotary_emb=rope
        )
        single = t.single_transformer_blocks[0](
            hidden_states=img, encoder_hidden_states=txt, temb=temb[:, 0], image_rotary_emb=rope
        )
    # diffusers 0.42.1: both return (text, image) as two tensors (the single block splits its joint sequence).
    assert isinstance(double, tuple) and len(double) == 2
    assert isinstance(single, tuple) and len(single) == 2
    assert _streams_by_length(double) == BLOCK_STREAMS["FluxTransformerBlock"] == {"txt": 0, "img": 1}
    assert _streams_by_length(single) == BLOCK_STREAMS["FluxSingleTransformerBlock"] == {"txt": 0, "img": 1}


def test_sd3_block_stream_order(sd3: Any) -> None:
    t = sd3.transformer
    dim = t.inner_dim
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, N_IMG, dim, generator=gen), torch.randn(1, N_TXT, dim, generator=gen)
    temb = torch.randn(1, dim, generator=gen)
    with torch.no_grad():
        first = t.transformer_blocks[0](hidden_states=img, encoder_hidden_states=txt, temb=temb)
        last = t.transformer_blocks[-1](hidden_states=img, encoder_hidden_states=txt, temb=temb)
    assert _streams_by_length(first) == BLOCK_STREAMS["JointTransformerBlock"] == {"txt": 0, "img": 1}
    # The last joint block has context_pre_only: (None, image).
    assert t.transformer_blocks[-1].context_pre_only and not t.transformer_blocks[0].context_pre_only
    assert last[0] is None and _streams_by_length(last) == {"img": 1}


def test_text_encoder_layer_outputs(flux: Any) -> None:
    """T5Block returns a tuple (element 0 = hidden states), BertLayer and CLIPEncoderLayer the tensor."""
    ids = torch.tensor([[3, 4, 5, 1]])
    seen: dict[str, Any] = {}

    def keep(module: torch.nn.Module, args: Any, out: Any) -> None:
        seen[type(module).__name__] = out

    t5 = flux.text_encoder_2
    clip = flux.text_encoder
    bert = AutoModel.from_pretrained(minilm_folder()).eval()
    handles = [t5.encoder.block[0].register_forward_hook(keep), clip.encoder.layers[0].register_forward_hook(keep)]
    handles.append(bert.encoder.layer[0].register_forward_hook(keep))
    try:
        with torch.no_grad():
            t5(ids)
            clip(ids)
            bert(input_ids=torch.tensor([[101, 2023, 102]]))
    finally:
        for h in handles:
            h.remove()
    assert isinstance(seen["T5Block"], tuple) and isinstance(seen["T5Block"][0], torch.Tensor)
    assert isinstance(seen["CLIPEncoderLayer"], torch.Tensor)
    assert isinstance(seen["BertLayer"], torch.Tensor)


# --- resolution against the real module tree ---------------------------------------------------


def test_all_positions_of_the_tiny_pipelines(flux: Any, sd3: Any) -> None:
    assert candidates(flux, "all") == (
        "te.0.txt",
        "te.1.txt",
        "double.0.txt",
        "double.0.img",
        "double.1.txt",
        "double.1.img",
        "single.0.img",
        "single.1.img",
    )
    # SD3: no single blocks, and the last joint block has no text stream.
    assert candidates(sd3, "blocks") == (
        "double.0.txt",
        "double.0.img",
        "double.1.txt",
        "double.1.img",
        "double.2.img",
    )
    assert candidates(sd3, "text_encoder") == ("te.0.txt", "te.1.txt")


def test_sites_point_at_the_right_modules(flux: Any, sd3: Any) -> None:
    f = {s.name: s for s in available(flux)}
    assert f["double.1.txt"].module is flux.transformer.transformer_blocks[1]
    assert f["single.1.img"].module is flux.transformer.single_transformer_blocks[1]
    assert (f["double.1.txt"].element, f["double.1.img"].element, f["single.1.img"].element) == (0, 1, 1)
    assert f["te.1.txt"].module is flux.text_encoder_2.encoder.block[1]
    assert (f["te.1.txt"].component, f["te.1.txt"].path) == ("text_encoder_2", "encoder.block.1")
    s = {x.name: x for x in available(sd3)}
    assert s["te.0.txt"].module is sd3.text_encoder_3.encoder.block[0]
    assert s["double.2.img"].block_class == "JointTransformerBlock"


def test_te_means_the_encoder_behind_prompt_embeds(flux: Any, sd3: Any) -> None:
    assert text_encoder_component(flux) == "text_encoder_2"  # T5, not CLIP
    assert text_encoder_component(sd3) == "text_encoder_3"  # T5 (our choice for SD3)
    assert family_of(flux) == "flux" and family_of(sd3) == "sd3"


def test_sd3_without_t5_has_no_te_positions() -> None:
    pipe = build("sd3", num_layers=2)
    pipe.text_encoder_3 = None
    assert not [n for n in candidates(pipe, "all") if n.startswith("te.")]
    with pytest.raises(ValueError, match="no te encoder loaded"):
        resolve(pipe, ["te.0.txt"])


def test_minilm_te_positions() -> None:
    model = AutoModel.from_pretrained(minilm_folder()).eval()
    assert family_of(model) == "text_encoder"
    assert candidates(model, "all") == tuple(f"te.{i}.txt" for i in range(6))
    (site,) = resolve(model, ["te.5.txt"])
    assert site.path == "encoder.layer.5" and site.module is model.encoder.layer[5]
    with pytest.raises(ValueError, match=r"Valid names for this model: te\.\{0\.\.5\}\.txt"):
        resolve(model, ["te.6.txt"])
    with pytest.raises(ValueError, match=r"double\.0\.img"):
        resolve(model, ["double.0.img"])


def test_wrong_names_one_error_listing_valid_names(sd3: Any) -> None:
    with pytest.raises(ValueError) as err:
        resolve(sd3, ["double.0.img", "double.2.txt", "single.0.img", "double.3.img", "te.2.txt", "dbl.0.img"])
    msg = str(err.value)
    for reason in (
        "'double.2.txt': transformer_blocks.2 has context_pre_only",
        "'single.0.img': no such layer",
        "'double.3.img': no such layer",
        "'te.2.txt': no such layer",
        "'dbl.0.img'",
    ):
        assert reason in msg
    assert "Valid names for this model: te.{0..1}.txt, double.{0..1}.txt, double.{0..2}.img" in msg
    assert "'double.0.img'" not in msg  # the valid one is not reported as bad


def test_resolve_keeps_order_and_drops_duplicates(flux: Any) -> None:
    sites = resolve(flux, ["single.1.img", "te.0.txt", "single.1.img", Position("double", 0, "txt")])
    assert [s.name for s in sites] == ["single.1.img", "te.0.txt", "double.0.txt"]
    with pytest.raises(ValueError, match="no positions given"):
        resolve(flux, [])


# --- the paper's candidate sets on the paper's block counts --------------------------------------


@pytest.fixture(scope="module")
def paper_shaped() -> dict[str, Any]:
    """Flux.1-Dev (19 double, 38 single) and SD3.5-Large (38 joint) module trees, tiny widths, meta device."""
    with torch.device("meta"):
        flux_dev = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=16,
            num_attention_heads=1,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            axes_dims_rope=[4, 4, 8],
        )
        sd35_large = SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=38,
            attention_head_dim=8,
            num_attention_heads=1,
            caption_projection_dim=8,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=8,
        )
    return {"flux": flux_dev, "sd3": sd35_large}


def test_paper_sets_resolve_on_the_paper_shapes(paper_shaped: dict[str, Any]) -> None:
    for family, model in paper_shaped.items():
        assert family_of(model) == family
        assert candidates(model, "paper") == CANDIDATE_SETS[family]["paper"]
    assert len(CANDIDATE_SETS["flux"]["paper"]) == 11  # §2's volume estimate counts 11 positions
    assert len(CANDIDATE_SETS["sd3"]["paper"]) == 10


def test_sd35_large_last_block_has_no_text_stream(paper_shaped: dict[str, Any]) -> None:
    with pytest.raises(
        ValueError, match=r"double.37.txt.*context_pre_only.*double\.\{0\.\.36\}\.txt, double\.\{0\.\.37\}\.img"
    ):
        resolve(paper_shaped["sd3"], ["double.37.txt"])
    with pytest.raises(ValueError, match=r"'single\.0\.img': no such layer"):
        resolve(paper_shaped["sd3"], ["single.0.img"])
    with pytest.raises(ValueError, match=r"'single\.38\.img': no such layer"):
        resolve(paper_shaped["flux"], ["single.38.img"])


def test_paper_set_on_a_tiny_model_fails_with_the_fix(flux: Any) -> None:
    with pytest.raises(ValueError, match=r"'double.4.txt': no such layer.*Valid names"):
        candidates(flux, "paper")
    with pytest.raises(ValueError, match="use one of paper, all, blocks, text_encoder"):
        candidates(flux, "middle")


def test_unsupported_target_is_refused() -> None:
    with pytest.raises(ValueError, match="pass the pipeline, its transformer, or an AutoModel"):
        resolve(torch.nn.Linear(2, 2), ["te.0.txt"])
