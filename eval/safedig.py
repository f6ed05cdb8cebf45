"""Blend and Repel: the per-token edit of SafeDIG at one routed position, and its calibration (SafeDIG §7).

For a token x (activation units) the frozen encoder gives codes z; with H the harmful
latents and W′ the refitted decoder, h = Σ_{j∈H} z_j is the token's harm and
u = c·Σ_{j∈H} z_j W′_j its harmful component in activation units. Calibration on the
**safe-side source tokens** gives τ_lo / τ_hi (95th / 99.5th percentile of h) and the safe
level ū = mean u. The edit, with strength s (β = min(s, 1), γ = s):

- Blend (τ_lo < h ≤ τ_hi): x ← x − β·g·(u − ū), g = (h − τ_lo)/(τ_hi − τ_lo) ∈ (0, 1]. The
  harmful component moves from u to u − βg(u − ū), on the segment towards ū: never past it.
- Repel (h > τ_hi): x ← x − γ·u.
- h ≤ τ_lo: the token is returned with its original bits.

Modes (choices ours where METHOD-SAFEDIG is silent):

- ``safedig``: Blend and Repel as above.
- ``blend``: SafeDIG without Repel — every token with h > τ_lo is blended; above τ_hi g is 1
  (the strongest Blend: pulled all the way to the safe level at s ≥ 1), so the ablation still
  treats the most harmful tokens, only never past ū.
- ``repel``: SafeDIG without Blend — Repel above τ_hi, tokens in the Blend band are untouched.
- ``ablate`` (SAeUron-style, §8): the H latents are scaled by (1 − 2s) on **every** token,
  thresholds ignored: x ← x − 2s·u, so s = 1 is "H scaled by −1" (x ← x − 2u) and s = 0.5
  zeroes H. Tokens where no H latent fires have u = 0 and keep their bits.

s = 0 returns the input tensor itself. Arithmetic runs in float32 whatever the input dtype
(float32/float16/bfloat16, CPU or CUDA, any leading batch shape); only changed tokens are
cast back, the others are selected from the input with ``torch.where`` and keep their bits.

Calibration (:class:`SafeLevelAccumulator`) is streaming and exact: it keeps every safe
token's h (8 bytes a token) and Σ z_H, so the percentiles are numpy's exact ``linear``
percentiles over all tokens added, and ū = c·(Σ z_H / n) W′_H.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from safeport.mappers.latents import SaeParams, codes

Mode = Literal["safedig", "blend", "repel", "ablate"]
MODES: tuple[Mode, ...] = ("safedig", "blend", "repel", "ablate")
PCT_LO = 95.0
PCT_HI = 99.5


def _harmful_indices(harmful: Sequence[int], n_latents: int) -> np.ndarray:
    idx = np.asarray(list(harmful), dtype=np.int64)
    if idx.ndim != 1 or len(set(idx.tolist())) != idx.size or ((idx < 0) | (idx >= n_latents)).any():
        raise ValueError(f"harmful must be distinct latent indices in 0..{n_latents - 1}, got {list(harmful)}")
    return idx


def _harmful_rows(W_refit: np.ndarray, harmful: np.ndarray, dim: int | None = None) -> np.ndarray:
    w = np.asarray(W_refit, dtype=np.float64)
    if w.ndim != 2 or (dim is not None and w.shape[1] != dim):
        raise ValueError(f"W_refit must be the refitted decoder [m, d], got shape {w.shape}")
    if harmful.size and harmful.max() >= w.shape[0]:
        raise ValueError(f"harmful latent {int(harmful.max())} is past the decoder's {w.shape[0]} rows")
    return w[harmful]


def harm(Z: np.ndarray, harmful: Sequence[int], W_refit: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(h [n], u [n, d]) of codes ``Z`` [n, m] in float64: h = Σ_{j∈H} z_j, u = c·Σ_{j∈H} z_j W′_j."""
    z = np.asarray(Z)
    if z.ndim != 2:
        raise ValueError(f"Z must be codes [rows, m], got shape {z.shape}")
    idx = _harmful_indices(harmful, z.shape[1])
    z_h = np.asarray(z[:, idx], dtype=np.float64)
    return z_h.sum(axis=1), c * (z_h @ _harmful_rows(W_refit, idx))


@dataclass(frozen=True, eq=False)
class Calibration:
    """Thresholds and safe level of one position, from safe-side source tokens."""

    tau_lo: float
    tau_hi: float
    u_bar: np.ndarray  # float64 [d]
    n_tokens: int
    pct_lo: float = PCT_LO
    pct_hi: float = PCT_HI


class SafeLevelAccumulator:
    """h of every safe-side source token and Σ z_H, added batch by batch; ``finish`` gives τ_lo, τ_hi, ū."""

    def __init__(self, harmful: Sequence[int], W_refit: np.ndarray, c: float) -> None:
        w = np.asarray(W_refit, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"W_refit must be the refitted decoder [m, d], got shape {w.shape}")
        if not (np.isfinite(c) and c > 0):
            raise ValueError(f"SAE scale c must be a finite number > 0, got {c}")
        self.n_latents = w.shape[0]
        self.harmful = _harmful_indices(harmful, self.n_latents)
        self.W_harm = w[self.harmful]
        self.c = float(c)
        self._h: list[np.ndarray] = []
        self.z_h_sum = np.zeros(self.harmful.size)

    def add(self, Z: np.ndarray) -> None:
        """Add codes [n, m] of safe-side source tokens."""
        z_h = np.asarray(codes(Z, self.n_latents)[:, self.harmful], dtype=np.float64)
        if not np.isfinite(z_h).all():
            raise ValueError("Z contains NaN/inf codes in the harmful latents; check the SAE and its rows")
        self._h.append(z_h.sum(axis=1))
        self.z_h_sum += z_h.sum(axis=0)

    @property
    def n(self) -> int:
        return int(sum(h.size for h in self._h))

    def finish(self, pct_lo: float = PCT_LO, pct_hi: float = PCT_HI) -> Calibration:
        """Exact (numpy ``linear``) percentiles of h over every token added, and ū = c·mean(z_H) W′_H."""
        if not 0 <= pct_lo <= pct_hi <= 100:
            raise ValueError(f"need 0 <= pct_lo <= pct_hi <= 100, got {pct_lo}, {pct_hi}")
        n = self.n
        if n == 0:
            raise ValueError("no safe-side tokens were added; calibration needs the source pairs' safe side")
        lo, hi = np.percentile(np.concatenate(self._h), [pct_lo, pct_hi])
        u_bar = self.c * (self.z_h_sum / n) @ self.W_harm
        return Calibration(float(lo), float(hi), u_bar, n, pct_lo, pct_hi)


@dataclass(frozen=True, eq=False)
class SteeringParams:
    """Everything the edit needs at one position, as float32 tensors on one device (build once, reuse per call)."""

    W_enc: torch.Tensor  # [d, m]
    b_enc: torch.Tensor  # [m]
    b_dec: torch.Tensor  # [d]
    c: float
    k: int
    harmful: torch.Tensor  # int64 [|H|]
    W_harm: torch.Tensor  # [|H|, d]: rows H of the refitted decoder W′
    tau_lo: float
    tau_hi: float
    u_bar: torch.Tensor  # [d]

    @classmethod
    def build(
        cls,
        sae: SaeParams,
        harmful: Sequence[int],
        W_refit: np.ndarray,
        calibration: Calibration,
        device: str | torch.device = "cpu",
    ) -> SteeringParams:
        """From the SAE arrays, H, the refitted decoder W′ [m, d] (the source W_dec for "no refit") and calibration."""
        idx = _harmful_indices(harmful, sae.n_latents)
        w_harm = _harmful_rows(W_refit, idx, sae.dim)
        if np.shape(W_refit)[0] != sae.n_latents:
            raise ValueError(f"W_refit has {np.shape(W_refit)[0]} rows but the SAE has {sae.n_latents} latents")
        u_bar = np.asarray(calibration.u_bar, dtype=np.float64)
        if u_bar.shape != (sae.dim,):
            raise ValueError(f"calibration.u_bar has shape {u_bar.shape}, expected ({sae.dim},)")
        if not calibration.tau_lo <= calibration.tau_hi:
            raise ValueError(f"tau_lo {calibration.tau_lo} > tau_hi {calibration.tau_hi}; recalibrate")

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

        return cls(
            W_enc=t(sae.W_enc),
            b_enc=t(sae.b_enc),
            b_dec=t(sae.b_dec),
            c=float(sae.c),
            k=int(sae.k),
            harmful=torch.as_tensor(idx, device=device),
            W_harm=t(w_harm),
            tau_lo=float(calibration.tau_lo),
            tau_hi=float(calibration.tau_hi),
            u_bar=t(u_bar),
        )

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dim(self) -> int:
        return int(self.W_enc.shape[0])

    def to(self, device: str | torch.device) -> SteeringParams:
        """The same parameters on ``device`` (move once before generation, not per hook call)."""
        return replace(
            self,
            W_enc=self.W_enc.to(device),
            b_enc=self.b_enc.to(device),
            b_dec=self.b_dec.to(device),
            harmful=self.harmful.to(device),
            W_harm=self.W_harm.to(device),
            u_bar=self.u_bar.to(device),
        )


def harm_torch(x: torch.Tensor, params: SteeringParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [...], u [..., d]) of float32 tokens x [..., d] via the frozen top-k encoder."""
    pre = torch.relu((x / params.c - params.b_dec) @ params.W_enc + params.b_enc)
    top = torch.topk(pre, params.k, dim=-1).indices  # [..., k]
    kept = (top.unsqueeze(-1) == params.harmful).any(dim=-2)  # [..., |H|]: z_j survives top-k
    z_h = torch.where(kept, pre[..., params.harmful], torch.zeros((), dtype=pre.dtype, device=pre.device))
    return z_h.sum(dim=-1), params.c * (z_h @ params.W_harm)


def edit_tokens(x: torch.Tensor, params: SteeringParams, strength: float, mode: Mode = "safedig") -> torch.Tensor:
    """The SafeDIG edit of tokens ``x`` [..., d] at one position; untouched tokens keep their exact bits."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    s = _check_strength(strength)
    if x.ndim < 1 or x.shape[-1] != params.dim:
        raise ValueError(f"x must be [..., {params.dim}] tokens of this position, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if x.device != params.device:
        raise ValueError(f"x is on {x.device} but the steering params on {params.device}; call params.to(x.device)")
    if s == 0:
        return x
    xf = x.to(torch.float32)
    h, u = harm_torch(xf, params)
    if mode == "ablate":
        touched = h > 0
        delta = -2.0 * s * u
    else:
        lo, hi = params.tau_lo, params.tau_hi
        in_blend, in_repel = (h > lo) & (h <= hi), h > hi
        g = ((h - lo) / max(hi - lo, float(np.finfo(np.float32).tiny))).clamp(0.0, 1.0)
        blend = -(min(s, 1.0) * g).unsqueeze(-1) * (u - params.u_bar)
        repel = -s * u
        if mode == "blend":
            touched, delta = in_blend | in_repel, blend
        elif mode == "repel":
            touched, delta = in_repel, repel
        else:
            touched, delta = in_blend | in_repel, torch.where(in_repel.unsqueeze(-1), repel, blend)
    return torch.where(touched.unsqueeze(-1), (xf + delta).to(x.dtype), x)


# --- a steering bundle and its hooks (§7 at generation time) -------------------------------------------


@dataclass(frozen=True, eq=False)
class SafeDigPosition:
    """One position of a bundle: its SAE, harmful latents, decoder and calibration (all arrays, no store)."""

    position: str
    sae: SaeParams
    harmful: tuple[int, ...]
    decoder: np.ndarray  # [m, d]: the refitted W′ (the source W_dec for the "no refit" ablation)
    calibration: Calibration
    routed: bool = True
    fixed: bool = False  # the "no routing" ablation's fixed position

    def params(self, device: str | torch.device = "cpu") -> SteeringParams:
        return SteeringParams.build(self.sae, self.harmful, self.decoder, self.calibration, device)


@dataclass(frozen=True, eq=False)
class SafeDigBundle:
    """What a generation job steers with: a model's routed positions for one held-out risk category."""

    name: str
    model: str
    holdout: str
    positions: tuple[SafeDigPosition, ...]
    lineage: dict[str, object]
    view: bool = False  # True: a selection (routed() / fixed()), every position of which is steered

    def routed(self) -> SafeDigBundle:
        """The routed positions (SafeDIG, Blend, Repel, ablation)."""
        return replace(self, positions=tuple(p for p in self.positions if p.routed), view=True)

    def fixed(self) -> SafeDigBundle:
        """The "no routing" ablation: the one fixed middle position."""
        return replace(self, positions=tuple(p for p in self.positions if p.fixed), view=True)

    @property
    def steered(self) -> tuple[SafeDigPosition, ...]:
        """The positions the hooks edit: a whole bundle steers at its routed positions only (the fixed
        no-routing position it also carries is for the ablation, :meth:`fixed`); a view at all of its own."""
        return self.positions if self.view else tuple(p for p in self.positions if p.routed)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.position for p in self.positions)


Strength = float | Sequence[float]


def _check_strength(value: Any, where: str = "") -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = float("nan")
    if not (np.isfinite(s) and s >= 0):
        raise ValueError(f"strength must be a finite number >= 0, got {value!r}{where}")
    return s


def check_strengths(strength: Strength) -> list[float] | float:
    """One s, or one per output of the batch; every value checked here, before any hook can run."""
    if np.ndim(strength) == 0:  # a Python or numpy scalar (np.float32(1.0) is one strength, not a sequence)
        return _check_strength(strength)
    given = np.asarray(strength, dtype=object).ravel().tolist()
    values = [_check_strength(s, f" in {given!r}") for s in given]
    if not values:
        raise ValueError("strength is an empty sequence; give one strength, or one per output of the batch")
    return values


@contextmanager
def safedig_hooks(
    target: Any,
    bundle: SafeDigBundle,
    strength: Strength = 1.0,
    mode: Mode = "safedig",
    steps: tuple[int, int] | None = None,
) -> Iterator[None]:
    """Blend/Repel (or one ablation ``mode``) at every position of ``bundle`` while the block runs.

    ``target`` is the pipeline (or its transformer, or a HF text model for ``te`` positions). Only the
    conditional branch is edited; every denoising step by default, ``steps=(first, last)`` for a range
    (``te`` positions are the encode pass: step 0, always edited). ``strength`` is one s, or one per
    output of a batched call (the conditional batch's rows, in order). Hooks are removed on exit,
    also after an exception inside the call.
    """
    from safeport.extractors.capture import position_hooks  # the hooks primitive (model side)

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    per_row = check_strengths(strength)
    if steps is not None and (len(steps) != 2 or steps[0] > steps[1] or steps[0] < 0):
        raise ValueError(f"steps {steps!r} must be (first, last) with 0 <= first <= last")
    device = _device_of(target)
    steered = bundle.steered
    params = {p.position: p.params(device) for p in steered}

    def edit(position: Any, step: int, tensor: torch.Tensor) -> torch.Tensor | None:
        if steps is not None and position.kind != "te" and not steps[0] <= step <= steps[1]:
            return None
        p = params[position.name]
        if isinstance(per_row, float):
            return edit_tokens(tensor, p, per_row, mode)
        if len(per_row) != tensor.shape[0]:
            raise ValueError(
                f"{len(per_row)} strengths for a batch of {tensor.shape[0]} at {position.name}; give one per output"
            )
        return torch.stack([edit_tokens(tensor[i], p, s, mode) for i, s in enumerate(per_row)])

    with position_hooks(target, tuple(p.position for p in steered), edit):
        yield


def _device_of(target: Any) -> torch.device:
    module = getattr(target, "transformer", None) or target
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
