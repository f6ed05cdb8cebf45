"""Tiny random-weight diffusers pipelines for the five target families, built offline from configs.

Why: the extractor and the steering API must be tested against each pipeline's *own*
``encode_prompt`` and ``__call__`` (diffusers 0.42.1), but no hub is reachable. Every model is
built from a config with a fixed seed and every tokenizer from an in-memory vocabulary, so a
builder runs in well under a second and ``save_tiny`` writes a folder that ``from_pretrained``
loads exactly like a real checkpoint. Shapes follow diffusers' own fast tests
(``tests/pipelines/<family>/``), shrunk further; the vocabularies are ours.

Tokenizers:
- CLIP and T5/UMT5: character-level (CLIP BPE without merges, T5 Unigram over characters), so
  any lowercase text tokenizes and truncation is easy to trigger with a long text.
- Qwen (Z-Image, Qwen-Image): a byte-level BPE trained here on the Qwen-Image system prompt plus
  a few captions, so the template's leading part is exactly
  ``QwenImagePipeline.prompt_template_encode_start_idx`` (34) tokens, as with the real tokenizer;
  the pipeline's token drop is therefore tested on the real boundary.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

FAMILIES = ("flux", "sd3", "z_image", "qwen_image", "wan")
# models/tiny-sd3 = save_tiny("sd3", folder, **TINY_SD3_OPTIONS): two text-carrying joint blocks and the text-less last.
TINY_SD3_OPTIONS: dict[str, int | None] = {"num_layers": 3, "pos_embed_max_size": 32}

CLIP_MAX_LENGTH = 77
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-:;"

# Call arguments that make one generation take well under a second on CPU.
TINY_CALL_KWARGS: dict[str, dict[str, object]] = {
    "flux": {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 24},
    "sd3": {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 24},
    "z_image": {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 96},
    "qwen_image": {
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
        "max_sequence_length": 64,
        "true_cfg_scale": 1.0,
    },
    "wan": {"height": 16, "width": 16, "num_frames": 5, "num_inference_steps": 2, "max_sequence_length": 24},
}

_QWEN_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a watercolor painting of mountains at dawn",
    "two dogs running on a beach, golden light",
    "a portrait of an old man with a hat",
    "a city street at night in the rain",
]
# Qwen3-style chat template: Z-Image calls it with ``enable_thinking=True``.
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE (no merges): each character is a token, word ends carry ``</w>``."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS.lower():
        for piece in (c, c + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """Character-level Unigram T5 tokenizer (pad 0, eos 1, unk 2), as T5/UMT5 lay out their ids."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("▁" + c, -3.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE trained on the Qwen-Image system prompt, with Qwen's chat special tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    bpe.train_from_iterator([_QWEN_SYSTEM] * 20 + ["system user assistant"] * 20 + _CORPUS * 2, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,  # type: ignore[arg-type]  # the BPE backend wants (left, right) pairs
        additional_special_tokens=specials[1:],
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def _clip_config(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        projection_dim=hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
    )


def _t5_kwargs(tokenizer: T5Tokenizer, d_model: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_flux(num_layers: int = 1, num_single_layers: int = 1) -> FluxPipeline:
    """Flux.1: CLIP-L (pooled only) + T5 (``prompt_embeds``, dim 32).

    ``num_layers`` double and ``num_single_layers`` single blocks (defaults: the bundled tiny-flux).
    """
    tok, tok_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config(tok, 32)).eval()
    torch.manual_seed(1)
    text_encoder_2 = T5EncoderModel(T5Config(**_t5_kwargs(tok_2, 32))).eval()
    torch.manual_seed(2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )


def build_sd3(num_layers: int = 1, pos_embed_max_size: int | None = None) -> StableDiffusion3Pipeline:
    """SD3: CLIP-L (16) + CLIP-G (24) hidden states, zero-padded to T5's 48, then T5 tokens appended.

    ``num_layers`` joint blocks; the last has ``context_pre_only`` (no text stream), so ``num_layers >= 2``
    gives a text-carrying block too (models/tiny-sd3 has 3). ``pos_embed_max_size``: the side of the
    positional-embedding table (None: diffusers' 96, a 1.2 MB buffer; models/tiny-sd3 uses 32, the
    largest latent side at the tiny 32×32 size, to stay under 1 MB).
    """
    tok, tok_2, tok_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tok, 16)).eval()
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tok_2, 24)).eval()
    torch.manual_seed(2)
    text_encoder_3 = T5EncoderModel(T5Config(**_t5_kwargs(tok_3, 48))).eval()
    torch.manual_seed(3)
    extra: dict[str, Any] = {} if pos_embed_max_size is None else {"pos_embed_max_size": pos_embed_max_size}
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=48,
        pooled_projection_dim=16 + 24,
        out_channels=4,
        **extra,
    )
    torch.manual_seed(4)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_3,
    )


def build_z_image() -> ZImagePipeline:
    """Z-Image: Qwen3 (hidden 16), ``hidden_states[-2]`` of the chat-templated prompt."""
    tok = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tok),
            max_position_embeddings=512,
        )
    ).eval()
    torch.manual_seed(1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    # Initialised with torch.empty upstream; fixed so runs are deterministic (as diffusers' test does).
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            token = getattr(transformer, name)
            token.copy_(torch.ones_like(token))
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def build_qwen_image() -> QwenImagePipeline:
    """Qwen-Image: Qwen2.5-VL (text hidden 16), last hidden state, template prefix dropped."""
    tok = qwen_tokenizer()
    vocab_size = 512
    if len(tok) > vocab_size - 5:
        raise ValueError(f"tiny Qwen vocabulary has {len(tok)} tokens; raise vocab_size above {len(tok) + 5}")
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "bos_token_id": tok.eos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        # Vision ids inside the tiny vocabulary but never produced by the tokenizer.
        image_token_id=vocab_size - 5,
        video_token_id=vocab_size - 4,
        vision_start_token_id=vocab_size - 3,
        vision_end_token_id=vocab_size - 2,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(2)
    vae = AutoencoderKLQwenImage(
        base_dim=4 * 6,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def build_wan() -> WanPipeline:
    """Wan 2.x (video): UMT5 (d_model 32), masked, zero-padded after the real length."""
    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(**_t5_kwargs(tok, 32))).eval()
    torch.manual_seed(1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(2)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )


# Values are diffusers pipelines; typed Any because their components are dynamic attributes.
# Builders take optional keyword options (block counts); called without, they build the bundled defaults.
BUILDERS: dict[str, Callable[..., Any]] = {
    "flux": build_flux,
    "sd3": build_sd3,
    "z_image": build_z_image,
    "qwen_image": build_qwen_image,
    "wan": build_wan,
}


def build(family: str, **options: int | None) -> Any:
    """A fresh tiny pipeline for ``family`` (all weights seeded, eval mode, CPU, float32).

    ``options`` go to the builder (e.g. ``build("sd3", num_layers=3)``); none gives the defaults.
    ``build("sd3", **TINY_SD3_OPTIONS)`` is the bundled models/tiny-sd3.
    """
    if family not in BUILDERS:
        raise ValueError(f"no tiny pipeline for family {family!r}; use one of {', '.join(BUILDERS)}")
    pipe = BUILDERS[family](**options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(family: str, folder: Path, **options: int | None) -> Path:
    """Build ``family`` and ``save_pretrained`` it to ``folder`` (a model folder like a real checkpoint)."""
    build(family, **options).save_pretrained(str(folder))
    return folder
