"""Model families: one module per family, each exposing ``load(source) -> Extractor``."""

from __future__ import annotations

import importlib

from safeport.extractors.base import Extractor, ModelSource, Pooled, RepresentationSpec, check_device, model_load_errors

# family name -> module defining ``load(source: ModelSource) -> Extractor``
FAMILIES: dict[str, str] = {
    "causal_lm": "safeport.extractors.causal_lm",
    "text_encoder": "safeport.extractors.text_encoder",
    "flux": "safeport.extractors.pipeline_encoder",
    "sd3": "safeport.extractors.pipeline_encoder",
    "z_image": "safeport.extractors.pipeline_encoder",
    "qwen_image": "safeport.extractors.pipeline_encoder",
    "wan": "safeport.extractors.pipeline_encoder",
}


def load_extractor(source: ModelSource) -> Extractor:
    """Load the extractor for ``source.family`` (imports the family lazily)."""
    if source.family not in FAMILIES:
        raise ValueError(
            f"model {source.name!r}: family {source.family!r} is unknown; use one of {', '.join(sorted(FAMILIES))}"
        )
    check_device(source.device, source.name)  # before any weight is read
    module = importlib.import_module(FAMILIES[source.family])
    with model_load_errors(source):  # hub unreachable, files missing: one line naming the catalog model
        extractor: Extractor = module.load(source)
    return extractor


__all__ = ["FAMILIES", "Extractor", "ModelSource", "Pooled", "RepresentationSpec", "load_extractor"]
