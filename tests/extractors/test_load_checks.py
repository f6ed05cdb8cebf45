"""What a model load checks before any weight moves: the catalog's device exists on this machine,
and max_tokens fits the model's positions (both validated catalogs that used to crash mid-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from safeport.extractors import ModelSource, load_extractor
from safeport.extractors.base import ExtractionError
from tests.tiny_models import tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"text_encoder": tiny_bert(root / "bert"), "causal_lm": tiny_llama(root / "llama")}


def source(folder: Path, family: str, **kw: Any) -> ModelSource:
    return ModelSource(name="my-model", family=family, path=str(folder), dtype="float32", **kw)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, as far as torch can tell, has neither CUDA nor MPS (also on a GPU runner)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
@pytest.mark.parametrize("family", ["text_encoder", "causal_lm"])
def test_a_device_the_machine_lacks_is_refused_with_the_fix(
    models: dict[str, Path], no_gpu: None, family: str, device: str
) -> None:
    with pytest.raises(ExtractionError) as info:
        load_extractor(source(models[family], family, device=device))
    message = str(info.value)
    assert "model 'my-model'" in message and f"device {device!r}" in message and "not available" in message
    assert "device: auto" in message and "device: cpu" in message


def test_a_cuda_index_beyond_the_gpus_is_refused(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ExtractionError, match=r"'cuda:2' does not exist: this machine has 2 CUDA device\(s\)"):
        load_extractor(source(models["text_encoder"], "text_encoder", device="cuda:2"))


def test_auto_and_cpu_still_load_without_a_gpu(models: dict[str, Path], no_gpu: None) -> None:
    for device in ("auto", "cpu"):
        assert load_extractor(source(models["text_encoder"], "text_encoder", device=device)).dim == 24


@pytest.mark.parametrize("family", ["text_encoder", "causal_lm"])
def test_max_tokens_beyond_the_models_positions_is_refused_at_load(models: dict[str, Path], family: str) -> None:
    """The tiny models have 512 positions: max_tokens 1000 would crash (IndexError) on the first long text."""
    with pytest.raises(ExtractionError) as info:
        load_extractor(source(models[family], family, device="cpu", max_tokens=1000))
    message = str(info.value)
    assert "model 'my-model'" in message and "max_tokens 1000" in message and "512 positions" in message
    assert "max_tokens: 512 or less" in message
    assert load_extractor(source(models[family], family, device="cpu", max_tokens=512)).spec.max_tokens == 512


def test_generate_checks_the_device_before_loading_a_pipeline(tmp_path: Path, no_gpu: None) -> None:
    from safeport.eval.generate import load_pipeline
    from tests.tiny_pipelines import save_tiny

    flux = save_tiny("flux", tmp_path / "flux")
    with pytest.raises(ExtractionError, match=r"model 'my-model': device 'cuda' is not available"):
        load_pipeline(ModelSource(name="my-model", family="flux", path=str(flux), device="cuda"))
