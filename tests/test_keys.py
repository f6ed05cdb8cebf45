"""One content-key helper: every site keeps the exact key it had when it hashed by hand."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from safeport.keys import canonical_bytes, content_key


def test_a_text_is_hashed_as_its_utf8_bytes() -> None:
    text = "a red bicycle — ünïcode"
    assert content_key(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def test_json_parts_match_the_hand_written_forms() -> None:
    parts = ["k" * 16, "calibrated:a->b:ridge", "abcd", 1.5, 42, "t1", "s1"]
    assert content_key(parts, 24) == hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
    inputs = {"b": [1, 2], "a": {"y": None, "x": 0.5}}
    want = hashlib.sha256(json.dumps([inputs], sort_keys=True, default=str).encode()).hexdigest()[:20]
    assert content_key([inputs]) == want
    assert content_key(("x", 1)) == content_key(["x", 1])  # a tuple is a list
    assert content_key({"a": 1, "b": 2}) == content_key({"b": 2, "a": 1})  # key order never matters


def test_arrays_hash_their_bytes_in_their_own_dtype() -> None:
    v = np.arange(5, dtype=np.float64)
    f32 = np.ascontiguousarray(v, dtype=np.float32)
    assert content_key(f32, 32) == hashlib.sha256(f32.tobytes()).hexdigest()[:32]
    assert content_key(f32) != content_key(v)  # the precision is part of what is hashed
    assert canonical_bytes(np.asfortranarray(np.ones((2, 3)))) == np.ones((2, 3)).tobytes()


def test_sets_are_sorted_and_objects_are_their_str() -> None:
    assert content_key({"s": {"b", "a"}}) == content_key({"s": ["a", "b"]})
    assert content_key([object.__new__(type("P", (), {"__str__": lambda self: "p"}))]) == content_key(["p"])


@pytest.mark.parametrize("length", [0, 65])
def test_a_length_outside_the_digest_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="1 to 64"):
        content_key("x", length)
