"""Pure text handling: ids, cleaning, WikiText sentence splitting, seeded sampling."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

_WIKI_HEADING = re.compile(r"^\s*=+\s.*\s=+\s*$")
_WIKI_FIXES = (
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" ,", ","),
    (" .", "."),
    (" ;", ";"),
    (" :", ":"),
    (" 's", "'s"),
    ("( ", "("),
    (" )", ")"),
    (" n't", "n't"),
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
# C0 and C1 control characters (category Cc), NUL included: never part of a prompt, and some
# (ANSI escapes) would act on a terminal that prints the text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Lone surrogates only arrive through JSON "\ud800" escapes; they cannot be encoded as UTF-8,
# so they would break text_id and every writer downstream.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def text_id(text: str) -> str:
    """Content-hash id of a (cleaned) text: the same text has the same id everywhere."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def normalise(text: str) -> str:
    """NFC, control characters (incl. NUL) removed, newlines and runs of spaces folded to one space.

    Idempotent (``normalise(normalise(t)) == normalise(t)``), so ids of cleaned texts are stable.
    Lone surrogates become U+FFFD so every result can be encoded as UTF-8.
    """
    text = _SURROGATE.sub("\ufffd", text.replace("\ufeff", ""))
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    return " ".join(text.split())


def wikitext_sentences(lines: Iterable[str], min_words: int = 5, max_words: int = 60) -> list[str]:
    """WikiText raw lines -> clean sentences (headings, blanks and ``<unk>`` sentences dropped)."""
    out: list[str] = []
    for line in lines:
        if not line.strip() or _WIKI_HEADING.match(line):
            continue
        para = " " + line.strip() + " "
        for bad, good in _WIKI_FIXES:
            para = para.replace(bad, good)
        for sentence in _SENTENCE_END.split(para.strip()):
            words = sentence.split()
            if "<unk>" in sentence or not min_words <= len(words) <= max_words:
                continue
            out.append(" ".join(words))
    return out


def seeded_sample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``k`` out of ``n`` (all if k >= n)."""
    if n < 0 or k < 0:
        raise ValueError(f"seeded_sample(n={n}, k={k}): n and k must be >= 0")
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False))


def split_labels(ids: Sequence[str], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Seeded train/val/test labels for ``ids`` (permutation of positions, 80/10/10 by default)."""
    n = len(ids)
    order = np.random.default_rng(seed).permutation(n)
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    labels = ["test"] * n
    for rank, pos in enumerate(order):
        labels[pos] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return labels
