"""The converted-GGUF cache: a cached load equals a direct conversion bit for bit, and is not a conversion."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import safeport.extractors.gguf_cache as gguf_cache
from safeport.extractors import load_extractor
from safeport.extractors.base import ModelSource
from tests.tiny_models import smollm2_folder

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["A man riding a wave on top of a surfboard.", "Two dogs.", "The castle was rebuilt after a long siege."]


def _source() -> ModelSource:
    return ModelSource(name="smollm2", family="causal_lm", path=str(smollm2_folder()), gguf_file=GGUF, device="cpu")


def _entries(root: Path) -> list[Path]:
    return sorted((root / "gguf").iterdir()) if (root / "gguf").is_dir() else []


@pytest.fixture(scope="module")
def direct() -> np.ndarray:
    """Rows from transformers' own GGUF conversion, no cache involved."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEPORT_GGUF_CACHE", "off")
        return load_extractor(_source()).encode(TEXTS).values


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A cache folder holding one entry, written by a first (converting) load; and that extractor."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEPORT_CACHE_DIR", str(root))
        return root, load_extractor(_source())


def test_cached_load_equals_direct_conversion_and_skips_it(
    direct: np.ndarray, converted: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, first = converted
    (entry,) = _entries(root)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    assert "quantization_config" not in (entry / "config.json").read_text()

    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached entry should have been loaded, not converted again")

    monkeypatch.setenv("SAFEPORT_CACHE_DIR", str(root))
    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    second: Any = load_extractor(_source())
    assert np.array_equal(first.encode(TEXTS).values, direct)
    assert np.array_equal(second.encode(TEXTS).values, direct)
    assert second.tokenizer(TEXTS)["input_ids"] == first.tokenizer(TEXTS)["input_ids"]
    assert second.tokenizer.pad_token == first.tokenizer.pad_token
    assert _entries(root) == [entry]  # no temporary folder left behind


def _known_conversion(monkeypatch: pytest.MonkeyPatch, extractor: Any) -> list[str]:
    """Stand in for the (30 s) conversion with the model it produced before; returns a call log."""
    calls: list[str] = []

    def convert(folder: str, gguf_file: str, dtype: torch.dtype) -> tuple[Any, Any]:
        calls.append(gguf_file)
        return extractor.model, extractor.tokenizer

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    return calls


def test_an_unreadable_entry_is_converted_again(
    direct: np.ndarray,
    converted: tuple[Path, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, first = converted
    shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setenv("SAFEPORT_CACHE_DIR", str(tmp_path / "cache"))
    (entry,) = _entries(tmp_path / "cache")
    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated file, as a full disk would leave
    calls = _known_conversion(monkeypatch, first)
    with caplog.at_level(logging.WARNING, logger="safeport.extract"):
        again = load_extractor(_source())
    assert calls == [GGUF]
    assert "unreadable" in caplog.text and "converting again" in caplog.text
    assert weights.stat().st_size == size  # rewritten whole
    assert np.array_equal(again.encode(TEXTS).values, direct)


def test_an_unwritable_cache_only_costs_speed(
    converted: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SAFEPORT_CACHE_DIR", str(blocker))
    calls = _known_conversion(monkeypatch, converted[1])
    with caplog.at_level(logging.WARNING, logger="safeport.extract"):
        load_extractor(_source())
    assert calls == [GGUF]
    assert "could not cache" in caplog.text


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPORT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SAFEPORT_GGUF_CACHE", "off")
    assert gguf_cache.cache_root() is None
    monkeypatch.setenv("SAFEPORT_GGUF_CACHE", "on")
    assert gguf_cache.cache_root() == tmp_path / "gguf"


def test_key_follows_file_content_and_dtype(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(5000))
    k = gguf_cache.cache_key(f, torch.float32)
    assert gguf_cache.cache_key(f, torch.float32) == k
    assert gguf_cache.cache_key(f, torch.bfloat16) != k
    f.write_bytes(b"GGUF" + bytes(4999) + b"\x01")  # same size, one byte changed at the end
    assert gguf_cache.cache_key(f, torch.float32) != k
