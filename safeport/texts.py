"""Pure text handling: ids, cleaning, WikiText sentence splitting, seeded sampling."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Hashable, Iterable, Sequence
from typing import SupportsInt

import numpy as np

from safeport.keys import content_key

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
    return content_key(text)


# Version tag of the dataset identity below: a new row layout gets a new tag, so no old hash collides.
ROWS_HASH_SCHEME = "rows-v1"


def rows_hash(rows: Iterable[tuple[str, str | None, str | None, SupportsInt | None, str | None]]) -> str:
    """A dataset's identity: the hash of its rows, in order, and of nothing else.

    Each row is ``(text_id, split, category, pair_id, side)``. Paths, file formats,
    descriptions and the catalog's key order never reach it, so moving the data,
    converting CSV to Parquet or editing a description keeps the hash. Row order is
    part of it (our choice): rows feed order-sensitive computations (MLP batches,
    float sums), and the same files always give the same order.
    """
    h = hashlib.sha256(ROWS_HASH_SCHEME.encode())
    for text, split, category, pair_id, side in rows:
        pid = None if pair_id is None else int(pair_id)
        h.update(json.dumps([text, split, category, pid, side]).encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


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


def _allocate(sizes: dict[Hashable, int], k: int) -> dict[Hashable, int]:
    """Largest-remainder shares of ``k`` over groups of ``sizes`` (each within one of its exact share).

    Ties in the remainder go to the larger group, then to the group whose label sorts
    first, so the allocation is deterministic.
    """
    total = sum(sizes.values())
    if k >= total:
        return dict(sizes)
    alloc = {g: k * n // total for g, n in sizes.items()}
    rest = k - sum(alloc.values())
    order = sorted(sizes, key=lambda g: (-(k * sizes[g] % total), -sizes[g], json.dumps(g, default=str)))
    for g in order[:rest]:
        alloc[g] += 1
    return alloc


def stratified_sample(labels: Sequence[tuple[Hashable, Hashable]], k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``k`` items, stratified by the first label, then the second.

    Each first-level group (e.g. a category) gets its share of ``k`` by largest
    remainder, so its count is within one of ``k * n_group / n``; inside a group the
    second label (e.g. the split) is shared out the same way; each leaf is then a
    :func:`seeded_sample` with a seed derived from ``seed`` and the leaf's labels (all
    items when ``k >= len(labels)``).
    """
    n = len(labels)
    if k < 0:
        raise ValueError(f"stratified_sample(k={k}): k must be >= 0")
    if k >= n:
        return np.arange(n)
    members: dict[Hashable, dict[Hashable, list[int]]] = {}
    for i, (first, second) in enumerate(labels):
        members.setdefault(first, {}).setdefault(second, []).append(i)
    picked: list[int] = []
    outer = _allocate({g: sum(map(len, inner.values())) for g, inner in members.items()}, k)
    for g, inner in members.items():
        for leaf, quota in _allocate({s: len(ix) for s, ix in inner.items()}, outer[g]).items():
            ix = inner[leaf]
            digest = hashlib.sha256(json.dumps([seed, g, leaf], default=str).encode()).digest()
            picked.extend(ix[j] for j in seeded_sample(len(ix), quota, int.from_bytes(digest[:8], "big")))
    return np.asarray(sorted(picked), dtype=np.int64)


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
