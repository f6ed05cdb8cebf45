"""Named positions inside text encoders and diffusion transformers (METHOD-SAFEDIG §1).

A position is a hook point plus a token stream, written ``<kind>.<index>.<stream>``:

- ``te.N.txt``: the output of text-encoder layer N (before any final norm), real tokens only
  (family text_encoder, and the T5 inside a Flux or SD3 pipeline).
- ``double.N.txt`` / ``double.N.img``: ``transformer.transformer_blocks.N`` (Flux double-stream,
  SD3 joint blocks), the text / image stream of the block output (not ``txt`` on SD3's last block).
- ``single.N.img``: ``transformer.single_transformer_blocks.N`` (Flux), the image tokens of the
  block output. The method names no ``single.N.txt``, so none is offered.

**Which element of a block's output is which stream** is read from diffusers 0.42.1's source and
encoded per block class in :data:`BLOCK_STREAMS` (tests/extractors/test_positions.py pins it by a
manual forward of each block):

- ``FluxTransformerBlock.forward`` ends ``return encoder_hidden_states, hidden_states``
  (diffusers/models/transformers/transformer_flux.py:497): (text, image).
- ``FluxSingleTransformerBlock.forward`` concatenates [text; image] along the sequence, runs, and
  splits again: ``return encoder_hidden_states, hidden_states`` (transformer_flux.py:411-412), so
  in 0.42.1 it returns both streams separately, (text, image); earlier releases took and returned
  the concatenated [text; image] sequence as one tensor, which is why the table is per class and
  pinned by a test.
- ``JointTransformerBlock.forward`` (SD3; diffusers/models/attention.py:748) returns
  ``encoder_hidden_states, hidden_states`` = (text, image); with ``context_pre_only`` (the last
  block of ``SD3Transformer2DModel``, transformer_sd3.py:161) the text element is ``None``
  (attention.py:731-732), so ``double.<last>.txt`` does not exist on SD3.

**Text-encoder layer N** is the output of the N-th element of the encoder's layer list
(:data:`LAYER_LISTS`), i.e. Hugging Face ``output_hidden_states[N + 1]``, except that HF replaces
the *last* entry by the final-norm output for T5 and CLIP, while ``te.<last>.txt`` stays the raw
block output. A layer returning a tuple (``T5Block``: hidden states, position bias, ...) gives its
element 0; ``BertLayer`` and ``CLIPEncoderLayer`` return the tensor itself (transformers 5.23.0).

**Which text encoder ``te`` means inside a pipeline** (:data:`PIPELINE_TEXT_ENCODERS`): the one whose
states become ``prompt_embeds``' token stream. Flux.1: T5 (``text_encoder_2``; CLIP only gives the
pooled vector). SD3: T5 (``text_encoder_3``) — our choice: ``prompt_embeds`` is [CLIP-L ‖ CLIP-G
(77 tokens) ; T5 (max_sequence_length tokens)] and T5 carries the long prompt and is the encoder the
pooled extractor (extractors/pipeline_encoder.py) already measures; an SD3 loaded without T5
has no ``te`` positions.

Candidate sets (§1, our choice, catalog-editable) live in :data:`CANDIDATE_SETS`; ``"all"`` is
every position the loaded model has (used for the tiny pipelines), ``"blocks"`` every DiT
position. :func:`resolve` checks names against the **real module tree** and raises one
``ValueError`` listing every valid name when any name is unknown or impossible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# diffusers pipelines register their components as dynamic attributes; see pipeline_encoder.py.
Target = Any

KINDS = ("te", "double", "single")
STREAMS = ("txt", "img")
_NAME = re.compile(r"^(te|double|single)\.(\d+)\.(txt|img)$")


@dataclass(frozen=True, order=True)
class Position:
    """One named position: ``kind`` in te/double/single, block or layer ``index``, ``stream`` txt/img."""

    kind: str
    index: int
    stream: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.stream not in STREAMS or self.index < 0:
            raise ValueError(
                f"position ({self.kind!r}, {self.index!r}, {self.stream!r}) is malformed; use kind in {KINDS}, "
                f"a non-negative index and stream in {STREAMS}, e.g. Position('double', 9, 'img')"
            )
        if (self.kind, self.stream) in (("te", "img"), ("single", "txt")):
            raise ValueError(
                f"position {self.name!r} does not exist: text-encoder positions have only a txt stream and "
                "single-stream positions only an img stream (METHOD-SAFEDIG §1); use te.N.txt or single.N.img"
            )

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.index}.{self.stream}"

    @classmethod
    def parse(cls, name: str | Position) -> Position:
        """``"double.9.img"`` -> Position('double', 9, 'img'); a Position is returned as is."""
        if isinstance(name, Position):
            return name
        m = _NAME.match(name.strip()) if isinstance(name, str) else None
        if m is None:
            raise ValueError(
                f"position name {name!r} is not of the form te.N.txt, double.N.txt, double.N.img or single.N.img "
                "(N a layer or block index from 0)"
            )
        return cls(m.group(1), int(m.group(2)), m.group(3))

    def __str__(self) -> str:
        return self.name


# Block class -> stream -> index of that stream in the block's output tuple (diffusers 0.42.1).
# Pinned by tests/extractors/test_positions.py; a new block class gets a line here after reading its forward.
BLOCK_STREAMS: dict[str, dict[str, int]] = {
    "FluxTransformerBlock": {"txt": 0, "img": 1},  # transformer_flux.py:497
    "FluxSingleTransformerBlock": {"txt": 0, "img": 1},  # transformer_flux.py:411-412 (split, not concatenated)
    "JointTransformerBlock": {"txt": 0, "img": 1},  # attention.py:748; txt is None with context_pre_only
}
# Position kind -> the transformer's block list it indexes, and the streams the method names there.
KIND_CONTAINERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "double": ("transformer_blocks", ("txt", "img")),
    "single": ("single_transformer_blocks", ("img",)),
}
# Where a Hugging Face text model keeps its layer list (first match wins): T5, BERT/MiniLM, CLIP (transformers < 5
# nested it under text_model; 5.x has encoder.layers), Qwen/Llama-style decoders.
LAYER_LISTS = (
    "encoder.block",
    "encoder.layer",
    "text_model.encoder.layers",
    "encoder.layers",
    "layers",
    "model.layers",
    "language_model.layers",
)
# Pipeline class -> the component ``te`` positions mean (the encoder whose states are prompt_embeds' tokens).
PIPELINE_TEXT_ENCODERS: dict[str, str] = {
    "FluxPipeline": "text_encoder_2",
    "StableDiffusion3Pipeline": "text_encoder_3",
}
# Pipeline class -> family name used by the candidate sets and the capture rules.
PIPELINE_FAMILIES: dict[str, str] = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
TRANSFORMER_FAMILIES: dict[str, str] = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def _expand(pattern: str, indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(pattern.format(i) for i in indices)


# METHOD-SAFEDIG §1 (our choice, catalog-editable): "paper" is the set for the paper's model of each family.
CANDIDATE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "flux": {
        # Flux.1-Dev: 19 double blocks, 38 single blocks, d = 3072.
        "paper": _expand("double.{}.txt", (4, 9, 14))
        + _expand("double.{}.img", (4, 9, 14, 18))
        + _expand("single.{}.img", (9, 19, 29, 37)),
    },
    "sd3": {
        # SD3.5-Large: 38 joint blocks (the last has no text stream), d = 2432.
        "paper": _expand("double.{}.txt", (6, 12, 18, 24)) + _expand("double.{}.img", (6, 12, 18, 24, 30, 36)),
    },
}
GENERIC_SETS = ("all", "blocks", "text_encoder")


@dataclass(frozen=True)
class Site:
    """A resolved position: the module to hook and which element of its output is the stream.

    ``element`` is the index into the module's output tuple; ``None`` means the output is the
    tensor itself or, for a text-encoder layer returning a tuple, its element 0.
    """

    position: Position
    component: str  # pipeline component holding the module ("transformer", "text_encoder_2"); "" for a bare model
    path: str  # module path inside the component, e.g. "transformer_blocks.9"
    block_class: str
    element: int | None
    module: torch.nn.Module = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.position.name


def _is_pipeline(target: Target) -> bool:
    return hasattr(target, "components") and hasattr(target, "transformer")


def _pipeline_class(target: Target) -> str | None:
    for cls in type(target).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return cls.__name__
    return None


def family_of(target: Target) -> str:
    """``flux`` / ``sd3`` for a supported pipeline or transformer, ``text_encoder`` for a HF text model."""
    if _is_pipeline(target):
        cls = _pipeline_class(target)
        if cls is None:
            raise ValueError(
                f"positions support {', '.join(PIPELINE_FAMILIES)}; got {type(target).__name__}. Add its text "
                "encoder to PIPELINE_TEXT_ENCODERS and its block classes to BLOCK_STREAMS in extractors/positions.py"
            )
        return PIPELINE_FAMILIES[cls]
    name = type(target).__name__
    if name in TRANSFORMER_FAMILIES:
        return TRANSFORMER_FAMILIES[name]
    if _layer_list(target) is not None:
        return "text_encoder"
    raise ValueError(
        f"{name} is neither a Flux/SD3 pipeline or transformer nor a text model with a layer list "
        f"({', '.join(LAYER_LISTS)}); pass the pipeline, its transformer, or an AutoModel text encoder"
    )


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layer_list(model: Any) -> tuple[str, torch.nn.ModuleList] | None:
    """(path, layers) of a HF text model's layer stack, or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    for path in LAYER_LISTS:
        layers = _get(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return path, layers
    return None


def text_encoder_component(target: Target) -> str | None:
    """The pipeline component ``te`` positions mean (None for a bare model, or when the pipeline lacks it)."""
    cls = _pipeline_class(target) if _is_pipeline(target) else None
    if cls is None:
        return None
    name = PIPELINE_TEXT_ENCODERS[cls]
    return name if getattr(target, name, None) is not None else None


def _text_sites(target: Target) -> list[Site]:
    if _is_pipeline(target):
        component = text_encoder_component(target)
        if component is None:
            return []
        model = getattr(target, component)
    elif type(target).__name__ in TRANSFORMER_FAMILIES:
        return []
    else:
        component, model = "", target
    found = _layer_list(model)
    if found is None:
        return []
    path, layers = found
    return [
        Site(Position("te", i, "txt"), component, f"{path}.{i}", type(layer).__name__, None, layer)
        for i, layer in enumerate(layers)
    ]


def _block_sites(transformer: Any, component: str) -> tuple[list[Site], dict[str, str]]:
    """Every DiT site of ``transformer``, and why some names that look plausible are impossible."""
    sites: list[Site] = []
    impossible: dict[str, str] = {}
    for kind, (attr, streams) in KIND_CONTAINERS.items():
        blocks = getattr(transformer, attr, None)
        if not isinstance(blocks, torch.nn.ModuleList):
            continue
        for i, block in enumerate(blocks):
            cls = type(block).__name__
            layout = BLOCK_STREAMS.get(cls)
            for stream in streams:
                name = f"{kind}.{i}.{stream}"
                if layout is None:
                    impossible[name] = f"block class {cls} has no stream table (add it to BLOCK_STREAMS)"
                elif cls == "JointTransformerBlock" and stream == "txt" and getattr(block, "context_pre_only", False):
                    impossible[name] = f"{attr}.{i} has context_pre_only and returns no text stream"
                else:
                    sites.append(Site(Position(kind, i, stream), component, f"{attr}.{i}", cls, layout[stream], block))
    return sites, impossible


def available(target: Target) -> tuple[Site, ...]:
    """Every position the loaded ``target`` (pipeline, Flux/SD3 transformer or HF text model) really has."""
    family_of(target)  # a clear error for an unsupported target
    sites = _text_sites(target)
    if _is_pipeline(target):
        sites += _block_sites(target.transformer, "transformer")[0]
    elif type(target).__name__ in TRANSFORMER_FAMILIES:
        sites += _block_sites(target, "")[0]
    return tuple(sites)


def _impossible(target: Target) -> dict[str, str]:
    if _is_pipeline(target):
        return _block_sites(target.transformer, "transformer")[1]
    if type(target).__name__ in TRANSFORMER_FAMILIES:
        return _block_sites(target, "")[1]
    return {}


def compact(names: Iterable[str]) -> str:
    """``double.0.txt, double.1.txt, double.2.txt`` -> ``double.{0..2}.txt`` (runs of consecutive indices)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for name in names:
        p = Position.parse(name)
        groups.setdefault((p.kind, p.stream), []).append(p.index)
    parts: list[str] = []
    for (kind, stream), indices in groups.items():
        idx = sorted(set(indices))
        start = prev = idx[0]
        for i in [*idx[1:], None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(f"{kind}.{start}.{stream}" if start == prev else f"{kind}.{{{start}..{prev}}}.{stream}")
            if i is not None:
                start = prev = i
    return ", ".join(parts)


def _describe(target: Target) -> str:
    if _is_pipeline(target):
        t = target.transformer
        te = text_encoder_component(target)
        te_part = f", te = {te} ({type(getattr(target, te)).__name__})" if te else ", no te encoder loaded"
        return (
            f"{type(target).__name__} ({len(getattr(t, 'transformer_blocks', []))} double/joint blocks, "
            f"{len(getattr(t, 'single_transformer_blocks', []) or [])} single blocks{te_part})"
        )
    return type(target).__name__


def resolve(target: Target, names: Iterable[str | Position]) -> tuple[Site, ...]:
    """The sites of ``names`` on the loaded ``target``, in the given order (duplicates dropped).

    Raises one ``ValueError`` naming every bad name with its reason and listing the valid names of
    this model, so a catalog typo or a set meant for another model fails before any weights run.
    """
    names = list(names)
    if not names:
        raise ValueError("no positions given; name at least one, e.g. double.0.img (see extractors/positions.py)")
    valid = {s.name: s for s in available(target)}
    impossible = _impossible(target)
    bad: list[str] = []
    out: list[Site] = []
    seen: set[str] = set()
    for raw in names:
        try:
            pos = Position.parse(raw)
        except ValueError as err:
            bad.append(f"{raw!r}: {err}")
            continue
        if pos.name in seen:
            continue
        seen.add(pos.name)
        if pos.name in valid:
            out.append(valid[pos.name])
        elif pos.name in impossible:
            bad.append(f"{pos.name!r}: {impossible[pos.name]}")
        else:
            bad.append(f"{pos.name!r}: no such layer or block on this model")
    if bad:
        listing = compact(valid) if valid else "(none)"
        raise ValueError(
            f"unknown or impossible positions for {_describe(target)}: {'; '.join(bad)}. "
            f"Valid names for this model: {listing}"
        )
    return tuple(out)


def candidates(target: Target, set_name: str = "paper") -> tuple[str, ...]:
    """The candidate position names of ``set_name`` for ``target``, checked against its module tree.

    ``paper``: the §1 set of the family's paper model (Flux.1-Dev, SD3.5-Large); ``all``: every position
    the model has; ``blocks``: every DiT position; ``text_encoder``: every ``te`` position.
    """
    family = family_of(target)
    sets = CANDIDATE_SETS.get(family, {})
    if set_name == "all":
        return tuple(s.name for s in available(target))
    if set_name == "blocks":
        return tuple(s.name for s in available(target) if s.position.kind != "te")
    if set_name == "text_encoder":
        return tuple(s.name for s in available(target) if s.position.kind == "te")
    if set_name not in sets:
        raise ValueError(
            f"candidate set {set_name!r} is not defined for family {family!r}; "
            f"use one of {', '.join([*sets, *GENERIC_SETS])}"
        )
    return tuple(s.name for s in resolve(target, sets[set_name]))
