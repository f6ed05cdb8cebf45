"""Pure text handling: normalise, text ids, WikiText sentences, seeded sampling and splits."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeport.texts import (
    normalise,
    rows_hash,
    seeded_sample,
    split_labels,
    stratified_sample,
    text_id,
    wikitext_sentences,
)

PROPS = settings(max_examples=200, deadline=None)
# Every code point, lone surrogates included (they arrive through JSON "\ud800" escapes).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=80)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  hello   world  ", "hello world"),
        ("a\r\nb\nc\rd", "a b c d"),
        ("\ufeffstarts with a BOM", "starts with a BOM"),
        ("nul\x00byte", "nul byte"),
        ("tab\there\x0bvt\x0cff", "tab here vt ff"),
        ("esc \x1b[31mred\x1b[0m", "esc [31mred [0m"),
        ("c1 \x85nel \x9bcsi \x80", "c1 nel csi"),
        ("bell\x07 del\x7f", "bell del"),
        ("line\u2028sep\u2029para", "line sep para"),
        ("e\u0301", "\u00e9"),  # NFC
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("   \t\n  ", ""),
        ("", ""),
    ],
)
def test_normalise_examples(raw: str, clean: str) -> None:
    assert normalise(raw) == clean


def test_normalise_keeps_a_long_row() -> None:
    row = "word " * 20_000
    assert len(normalise(row)) == 20_000 * 5 - 1


@PROPS
@given(ANY_TEXT)
def test_normalise_properties(raw: str) -> None:
    out = normalise(raw)
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in out)
    assert "\x00" not in out and "\ufeff" not in out
    assert out == out.strip()
    assert "  " not in out
    assert normalise(out) == out  # idempotent
    assert unicodedata.normalize("NFC", out) == out
    out.encode("utf-8")  # always encodable, so text_id and every writer work


@PROPS
@given(ANY_TEXT)
def test_text_id_is_stable(raw: str) -> None:
    clean = normalise(raw)
    tid = text_id(clean)
    assert len(tid) == 20 and all(c in "0123456789abcdef" for c in tid)
    assert text_id(normalise(clean)) == tid
    assert text_id(str(clean)) == tid


def test_text_id_known_answer() -> None:
    # sha256("a cat on a mat")[:20]; a change here re-keys every store.
    assert text_id("a cat on a mat") == "b2281618d7e4848ffa45"
    assert text_id("a cat on a mat") != text_id("a cat on a mat.")


def test_wikitext_sentences() -> None:
    lines = [
        " = Heading = \n",
        "",
        " The tower is 324 @-@ metre tall , and it 's old . It was built in 1889 by Eiffel 's firm .",
        " A <unk> sentence is dropped here . Short one .",
        " " + " ".join(["word"] * 70) + " .",
    ]
    out = wikitext_sentences(lines)
    assert out == ["The tower is 324-metre tall, and it's old.", "It was built in 1889 by Eiffel's firm."]


@given(st.lists(st.text(max_size=40), max_size=10))
@settings(max_examples=50, deadline=None)
def test_wikitext_sentences_never_fails(lines: list[str]) -> None:
    for sentence in wikitext_sentences(lines):
        assert sentence == sentence.strip() and 5 <= len(sentence.split()) <= 60


def test_seeded_sample() -> None:
    a = seeded_sample(100, 10, seed=3)
    assert list(a) == list(seeded_sample(100, 10, seed=3))
    assert list(a) != list(seeded_sample(100, 10, seed=4))
    assert len(set(a.tolist())) == 10 and list(a) == sorted(a) and a.max() < 100
    assert list(seeded_sample(5, 10, seed=0)) == [0, 1, 2, 3, 4]
    assert list(seeded_sample(0, 3, seed=0)) == []


def test_seeded_sample_refuses_negative_sizes() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        seeded_sample(5, -1, seed=0)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 300),
    train=st.floats(0, 1),
    val_share=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_labels_properties(n: int, train: float, val_share: float, seed: int) -> None:
    val = (1 - train) * val_share
    fractions = (train, val, 1 - train - val)
    ids = [str(i) for i in range(n)]
    labels = split_labels(ids, fractions, seed)
    assert labels == split_labels(ids, fractions, seed)
    assert len(labels) == n and set(labels) <= {"train", "val", "test"}
    assert labels.count("train") == min(round(train * n), n)
    for name, frac in zip(("train", "val", "test"), fractions, strict=True):
        assert abs(labels.count(name) - frac * n) <= 1.5


def test_split_labels_default_fractions() -> None:
    labels = split_labels([str(i) for i in range(1000)], (0.8, 0.1, 0.1), seed=42)
    assert (labels.count("train"), labels.count("val"), labels.count("test")) == (800, 100, 100)
    assert np.mean([x == "train" for x in labels[:100]]) < 1.0  # shuffled, not in file order


# --- dataset identity and stratified sampling ------------------------------------------------


def test_rows_hash_is_the_rows_in_order_and_nothing_else() -> None:
    rows = [("a", "train", "x", None, None), ("b", "test", None, 0, "safe")]
    assert rows_hash(rows) == rows_hash(list(rows))  # pure function of the rows
    assert rows_hash(rows) != rows_hash(rows[::-1])  # order is identity (our choice, README)
    assert rows_hash(rows) != rows_hash([rows[0], ("b", "test", None, 0, "unsafe")])  # each field counts
    assert rows_hash(rows) != rows_hash([rows[0], ("b", "test", None, 1, "safe")])
    assert rows_hash([("a", None, None, np.int32(3), None)]) == rows_hash([("a", None, None, 3, None)])


def test_stratified_sample_keeps_every_category_share() -> None:
    # 3 categories of 50, 30 and 20 items; 10 picked: exact shares 5, 3, 2.
    labels = [("x", "train")] * 50 + [("y", "train")] * 30 + [("z", "train")] * 20
    picked = stratified_sample(labels, 10, seed=42)
    counts = {c: sum(labels[i][0] == c for i in picked) for c in "xyz"}
    assert counts == {"x": 5, "y": 3, "z": 2}
    assert list(picked) == sorted(set(picked.tolist()))  # sorted, no repeats
    assert np.array_equal(picked, stratified_sample(labels, 10, seed=42))  # seeded
    assert not np.array_equal(picked, stratified_sample(labels, 10, seed=7))


def test_stratified_sample_largest_remainder_and_second_level() -> None:
    # 7 of (4, 4, 2): exact 2.8, 2.8, 1.4 -> floors 2, 2, 1; the two left go to the largest remainders.
    labels = [("a", "train")] * 3 + [("a", "test")] + [("b", "train")] * 4 + [("c", "train")] * 2
    picked = stratified_sample(labels, 7, seed=1)
    counts = {c: sum(labels[i][0] == c for i in picked) for c in "abc"}
    assert counts == {"a": 3, "b": 3, "c": 1}
    # inside "a", 3 of (3 train, 1 test): exact 2.25 / 0.75 -> 2 train + the remainder to test.
    assert sorted(labels[i][1] for i in picked if labels[i][0] == "a") == ["test", "train", "train"]
    assert len(stratified_sample(labels, 100, seed=1)) == len(labels)  # k >= n: everything
    # a tie (3 of 3 + 3: 1.5 each): same remainder, same size -> the label that sorts first
    tie = [("q", None)] * 3 + [("p", None)] * 3
    assert sorted(tie[i][0] for i in stratified_sample(tie, 3, seed=0)) == ["p", "p", "q"]
