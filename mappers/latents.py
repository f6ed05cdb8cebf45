"""Harmful latents of a position's SAE from source pair tokens (SafeDIG §5), and the SAE parameters as arrays.

Streaming: feed :class:`LatentAccumulator` batches of SAE codes ``Z`` [n, m] of source
pair tokens, one batch at a time, each tagged with its side (``"safe"``/``"unsafe"``)
and category; it keeps per (category, side) the code sums, fire counts and token
counts in float64/int64, so the result does not depend on how rows are batched (up to
float rounding of the sums) and partial accumulators from several workers ``merge``.
``finish`` then gives, over all source tokens pooled and per category:
μ⁺_j, μ⁻_j (mean code of latent j over unsafe / safe tokens), p± = μ±/Σμ± (SAeUron's
normalisation), s_j = p⁺_j − p⁻_j, the fire rates r±_j = fraction of tokens with z_j > 0,
and H = the top ``top_m`` latents by s_j among those with s_j > 0 and r⁺_j ≥ 2·r⁻_j.

Choices where the method page is silent (ours):

- The accumulator is built with the list of source categories and refuses rows of any
  other category, so the held-out target cannot enter by mistake.
- The pooled μ± are token means over all source tokens (a category weighs by its token
  count); per-category H_c use that category's tokens only.
- A side whose latents never fire (Σμ = 0) has p = 0 (no mass to distribute) instead of
  an error; a side with no tokens at all is an error (μ is undefined).
- H is in rank order (highest s_j first, ties to the lower latent index) and may hold
  fewer than ``top_m`` latents when fewer pass both rules.
- "Fires" means z_j > 0 (codes are non-negative: ReLU then top-k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_TOP_M = 16  # GPU scale (our choice)
TINY_TOP_M = 4  # tiny / CPU pipelines (our choice)
DEFAULT_FIRE_RATIO = 2.0
SIDES = ("safe", "unsafe")


@dataclass(frozen=True, eq=False)
class SaeParams:
    """A top-k SAE as plain arrays (SAELens layout), so steering math never imports the trainer.

    encode(x) = TopK_k(ReLU((x/c − b_dec) W_enc + b_enc)); x̂ = c·(z W_dec + b_dec).
    """

    W_enc: np.ndarray  # [d, m]
    b_enc: np.ndarray  # [m]
    W_dec: np.ndarray  # [m, d]
    b_dec: np.ndarray  # [d]
    c: float  # input scale: x̃ = x / c
    k: int  # latents kept per token

    def __post_init__(self) -> None:
        d, m = np.shape(self.W_enc) if np.ndim(self.W_enc) == 2 else (-1, -1)
        shapes = {
            "W_enc": (np.shape(self.W_enc), (d, m)),
            "b_enc": (np.shape(self.b_enc), (m,)),
            "W_dec": (np.shape(self.W_dec), (m, d)),
            "b_dec": (np.shape(self.b_dec), (d,)),
        }
        bad = {name: got for name, (got, want) in shapes.items() if got != want or d < 1 or m < 1}
        if bad:
            raise ValueError(f"SAE arrays do not fit W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d]: got {bad}")
        if not (np.isfinite(self.c) and self.c > 0):
            raise ValueError(f"SAE scale c must be a finite number > 0, got {self.c}")
        if not 1 <= int(self.k) <= m:
            raise ValueError(f"SAE top-k k = {self.k} must be in 1..m = {m}")

    @property
    def dim(self) -> int:
        return int(np.shape(self.W_enc)[0])

    @property
    def n_latents(self) -> int:
        return int(np.shape(self.W_enc)[1])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes [n, m] of rows ``x`` [n, d], in the encoder's float dtype (at least float32).

        Ties at the k-th value are broken arbitrarily (numpy's argpartition); with continuous
        activations they only happen among zeros, which encode to 0 either way.
        """
        dtype = np.result_type(np.asarray(self.W_enc).dtype, np.float32)
        xs = np.asarray(x, dtype=dtype)
        if xs.ndim != 2 or xs.shape[1] != self.dim:
            raise ValueError(f"x must be [rows, {self.dim}], got shape {xs.shape}")
        pre = (xs / dtype.type(self.c) - self.b_dec.astype(dtype)) @ self.W_enc.astype(dtype) + self.b_enc.astype(dtype)
        pre = np.maximum(pre, 0)
        if self.k == self.n_latents:
            return pre
        z = np.zeros_like(pre)
        top = np.argpartition(-pre, self.k - 1, axis=1)[:, : self.k]
        np.put_along_axis(z, top, np.take_along_axis(pre, top, axis=1), axis=1)
        return z


@dataclass(frozen=True, eq=False)
class LatentScores:
    """Per-latent statistics and the selected set for one scope (all sources pooled, or one category)."""

    category: str | None  # None: all source categories pooled
    mu_unsafe: np.ndarray  # [m] μ⁺
    mu_safe: np.ndarray  # [m] μ⁻
    p_unsafe: np.ndarray  # [m] μ⁺/Σμ⁺
    p_safe: np.ndarray  # [m] μ⁻/Σμ⁻
    score: np.ndarray  # [m] s = p⁺ − p⁻
    fire_unsafe: np.ndarray  # [m] fraction of unsafe tokens with z_j > 0
    fire_safe: np.ndarray  # [m]
    n_unsafe: int
    n_safe: int
    harmful: tuple[int, ...]  # H, rank order

    @property
    def in_harmful(self) -> np.ndarray:
        mask = np.zeros(self.score.shape[0], dtype=bool)
        mask[list(self.harmful)] = True
        return mask


@dataclass(frozen=True, eq=False)
class HarmfulLatents:
    """H over all source tokens and H_c per source category, with the rules that chose them."""

    pooled: LatentScores
    per_category: tuple[LatentScores, ...]  # sorted by category
    top_m: int
    fire_ratio: float

    @property
    def harmful(self) -> tuple[int, ...]:
        return self.pooled.harmful

    def category(self, name: str) -> LatentScores:
        for sc in self.per_category:
            if sc.category == name:
                return sc
        raise ValueError(f"no category {name!r}; known: {[sc.category for sc in self.per_category]}")

    def table(self, position: str) -> dict[str, np.ndarray]:
        """Columns of a ``sae_latents`` table: one row per (scope, latent); category None = pooled."""
        cols: dict[str, list[np.ndarray]] = {}
        for sc in (self.pooled, *self.per_category):
            m = sc.score.shape[0]
            rank = np.full(m, -1, dtype=np.int64)
            rank[list(sc.harmful)] = np.arange(len(sc.harmful))
            parts = {
                "position": np.full(m, position, dtype=object),
                "category": np.full(m, sc.category, dtype=object),
                "latent": np.arange(m, dtype=np.int64),
                "score": sc.score,
                "mu_unsafe": sc.mu_unsafe,
                "mu_safe": sc.mu_safe,
                "fire_unsafe": sc.fire_unsafe,
                "fire_safe": sc.fire_safe,
                "in_h": sc.in_harmful,
                "h_rank": rank,
            }
            for key, val in parts.items():
                cols.setdefault(key, []).append(val)
        return {key: np.concatenate(vals) for key, vals in cols.items()}


def codes(Z: np.ndarray, n_latents: int) -> np.ndarray:
    """``Z`` as a 2-D numeric [n, n_latents] array of non-negative codes, without a float64 copy."""
    z = np.asarray(Z)
    if z.ndim != 2 or z.shape[1] != n_latents or not np.issubdtype(z.dtype, np.number):
        raise ValueError(f"Z must be numeric SAE codes [rows, {n_latents}], got {z.dtype} {z.shape}")
    if (z < 0).any():
        raise ValueError("Z has negative codes; pass top-k SAE codes (ReLU then top-k, so z >= 0)")
    return z


def select_harmful(
    score: np.ndarray,
    fire_unsafe: np.ndarray,
    fire_safe: np.ndarray,
    top_m: int = DEFAULT_TOP_M,
    fire_ratio: float = DEFAULT_FIRE_RATIO,
) -> tuple[int, ...]:
    """The top ``top_m`` latents by score among s_j > 0 and r⁺_j ≥ ratio·r⁻_j; ties go to the lower index."""
    if top_m < 1:
        raise ValueError(f"top_m must be >= 1, got {top_m}")
    if not (np.isfinite(fire_ratio) and fire_ratio >= 0):
        raise ValueError(f"fire_ratio must be a finite number >= 0, got {fire_ratio}")
    s = np.asarray(score, dtype=np.float64)
    eligible = np.flatnonzero((s > 0) & (np.asarray(fire_unsafe) >= fire_ratio * np.asarray(fire_safe)))
    order = eligible[np.lexsort((eligible, -s[eligible]))]
    return tuple(int(j) for j in order[:top_m])


class LatentAccumulator:
    """Code sums and fire counts per (source category, side), added batch by batch."""

    def __init__(self, n_latents: int, sources: Sequence[str]) -> None:
        if n_latents < 1:
            raise ValueError(f"n_latents must be >= 1, got {n_latents}")
        self.sources = tuple(sorted({str(s) for s in sources}))
        if not self.sources:
            raise ValueError("sources is empty; pass the source categories whose pairs are accumulated")
        self.n_latents = n_latents
        shape = (len(self.sources), len(SIDES), n_latents)
        self.sums = np.zeros(shape, dtype=np.float64)
        self.fires = np.zeros(shape, dtype=np.int64)
        self.counts = np.zeros(shape[:2], dtype=np.int64)

    def add(self, Z: np.ndarray, *, side: str, category: str) -> None:
        """Add codes [n, m] of ``side`` tokens of one source ``category``."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if category not in self.sources:
            raise ValueError(
                f"category {category!r} is not a source category {list(self.sources)}; the held-out target's rows "
                "must not be used to pick harmful latents"
            )
        z = codes(Z, self.n_latents)
        total = z.sum(axis=0, dtype=np.float64)
        if not np.isfinite(total).all():
            raise ValueError("Z contains NaN/inf codes; check the SAE and the rows it encoded")
        c, s = self.sources.index(category), SIDES.index(side)
        self.sums[c, s] += total
        self.fires[c, s] += np.count_nonzero(z > 0, axis=0)
        self.counts[c, s] += z.shape[0]

    def merge(self, other: LatentAccumulator) -> None:
        """Add another accumulator's totals (same sources and latents), e.g. from another worker."""
        if other.sources != self.sources or other.n_latents != self.n_latents:
            raise ValueError(
                f"cannot merge accumulators over {other.sources} × {other.n_latents} latents into "
                f"{self.sources} × {self.n_latents}"
            )
        self.sums += other.sums
        self.fires += other.fires
        self.counts += other.counts

    def finish(self, top_m: int = DEFAULT_TOP_M, fire_ratio: float = DEFAULT_FIRE_RATIO) -> HarmfulLatents:
        """H pooled over all sources and H_c per source category."""
        pooled = _scores(
            None, self.sums.sum(axis=0), self.fires.sum(axis=0), self.counts.sum(axis=0), top_m, fire_ratio
        )
        per = tuple(
            _scores(c, self.sums[i], self.fires[i], self.counts[i], top_m, fire_ratio)
            for i, c in enumerate(self.sources)
        )
        return HarmfulLatents(pooled=pooled, per_category=per, top_m=top_m, fire_ratio=fire_ratio)


def _normalise(mu: np.ndarray) -> np.ndarray:
    total = float(mu.sum())
    return mu / total if total > 0 else np.zeros_like(mu)


def _scores(
    category: str | None, sums: np.ndarray, fires: np.ndarray, counts: np.ndarray, top_m: int, fire_ratio: float
) -> LatentScores:
    n_safe, n_unsafe = int(counts[0]), int(counts[1])
    if n_safe == 0 or n_unsafe == 0:
        scope = "all sources" if category is None else f"category {category!r}"
        raise ValueError(
            f"{scope} has {n_unsafe} unsafe and {n_safe} safe tokens; both sides are needed to score latents"
        )
    mu_safe, mu_unsafe = sums[0] / n_safe, sums[1] / n_unsafe
    p_safe, p_unsafe = _normalise(mu_safe), _normalise(mu_unsafe)
    score = p_unsafe - p_safe
    fire_safe, fire_unsafe = fires[0] / n_safe, fires[1] / n_unsafe
    return LatentScores(
        category=category,
        mu_unsafe=mu_unsafe,
        mu_safe=mu_safe,
        p_unsafe=p_unsafe,
        p_safe=p_safe,
        score=score,
        fire_unsafe=fire_unsafe,
        fire_safe=fire_safe,
        n_unsafe=n_unsafe,
        n_safe=n_safe,
        harmful=select_harmful(score, fire_unsafe, fire_safe, top_m, fire_ratio),
    )
