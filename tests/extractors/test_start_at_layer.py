"""Re-running the real MiniLM from one layer on (the CPU headline's steered passes) computes the same bits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from safeport.extractors import load_extractor
from safeport.extractors.base import ModelSource
from safeport.extractors.capture import position_hooks, record_layer_inputs, start_at_layer
from tests.tiny_models import minilm_folder

TEXTS = ["a cat on a red sofa", "two dogs running along a wide sandy beach at dusk", "mountains", "a bowl of fruit"]


@pytest.fixture(scope="module")
def pooler() -> Any:
    return load_extractor(ModelSource(name="minilm", family="text_encoder", path=str(minilm_folder()), device="cpu"))


def _encode(pooler: Any) -> list[np.ndarray]:
    return [pooler.encode(TEXTS[:2]).values, pooler.encode(TEXTS[2:]).values]  # two batches, other lengths


@pytest.mark.parametrize("first", [1, 3, 5])
def test_starting_at_a_layer_gives_the_full_forward_bit_for_bit(pooler: Any, first: int) -> None:
    with record_layer_inputs(pooler.model, [first]) as inputs:
        full = _encode(pooler)
    assert len(inputs[first]) == 2
    calls: list[int] = []
    before = [h.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, h in enumerate(_layers(pooler))]
    try:
        with start_at_layer(pooler.model, first, inputs[first]):
            resumed = _encode(pooler)
    finally:
        for h in before:
            h.remove()
    for a, b in zip(full, resumed, strict=True):
        assert np.array_equal(a.view(np.int32), b.view(np.int32))
    assert sorted(set(calls)) == list(range(6))  # the layers are still called (skipped ones pass through) ...
    again = _encode(pooler)  # ... and restored on exit
    assert all(np.array_equal(a, b) for a, b in zip(full, again, strict=True))


def test_an_edit_from_the_first_layer_on_acts_as_in_a_full_forward(pooler: Any) -> None:
    """A hook that changes te.3's output: the resumed pass (from layer 2) equals the full hooked pass."""

    def edit(position: Any, step: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 1.5

    with record_layer_inputs(pooler.model, [2]) as inputs:
        plain = _encode(pooler)
    with position_hooks(pooler.model, ["te.3.txt"], edit):
        full = _encode(pooler)
    with start_at_layer(pooler.model, 2, inputs[2]), position_hooks(pooler.model, ["te.3.txt"], edit):
        resumed = _encode(pooler)
    assert not np.allclose(full[0], plain[0])
    for a, b in zip(full, resumed, strict=True):
        assert np.array_equal(a.view(np.int32), b.view(np.int32))


def test_more_forwards_than_recorded_is_an_error(pooler: Any) -> None:
    with record_layer_inputs(pooler.model, [1]) as inputs:
        pooler.encode(TEXTS[:1])
    with start_at_layer(pooler.model, 1, inputs[1]), pytest.raises(RuntimeError, match="more forwards than recorded"):
        pooler.encode(TEXTS[:1])
        pooler.encode(TEXTS[:1])


def _layers(pooler: Any) -> list[torch.nn.Module]:
    from safeport.extractors.positions import resolve

    return [s.module for s in resolve(pooler.model, [f"te.{n}.txt" for n in range(6)])]
