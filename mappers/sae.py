"""Top-k sparse autoencoder per position, trained through SAELens (METHOD-SAFEDIG §4).

Pure compute: batches of token rows in, a :class:`TrainedSae` (arrays) out; the caller
streams the rows from the store and persists checkpoints and the finished SAE there.

The model (rows as vectors, SAELens's layout: ``W_enc`` d × m, ``W_dec`` m × d)::

    x̃ = x / c                      c: mean‖x‖/√d on the first ``scale_rows`` training rows
    z = TopK_k(ReLU((x̃ − b_dec) W_enc + b_enc))
    x̂ = c · (z W_dec + b_dec)
    loss = FVU(x̃, x̃̂) + aux_coef · AuxK-FVU

with ``W_enc`` initialised to ``W_decᵀ`` (unit rows), ``b_dec`` to the mean of the first
``scale_rows`` scaled rows, the decoder gradient's component along each row removed
before every Adam step and the rows renormalised after it.

How SAELens (``sae-lens==6.54.12``) is used, and what is written here instead
-----------------------------------------------------------------------------
SAELens provides the model and the trainer. ``TopKTrainingSAE``: the parameters, their
initialisation (``decoder_init_norm=1``: kaiming-uniform rows scaled to unit norm, then
``W_enc = W_decᵀ``; ``saes/sae.py`` l. 421, 1059) and the inference semantics that
:func:`to_saelens` targets. ``SAETrainer``: Adam, its constant LR schedule, the
``step()`` seam that moves a batch to the device, counts samples and scales it with the
``ActivationScaler`` (x̃ = x · (1/c)), and the steps-since-fired counters behind its
``dead_neurons`` mask. Each §4 requirement that SAELens does not meet exactly is written
here (file:line in the installed package):

1. **Loss = FVU, not MSE.** ``TrainingSAE.training_forward_pass`` uses
   ``mse.sum(-1).mean()`` (``saes/sae.py:1082``); :func:`fvu_loss` divides the summed
   squared error by the batch's variance about its mean.
2. **AuxK.** ``TopKTrainingSAE.calculate_topk_aux_loss`` (``saes/topk_sae.py:482-533``)
   takes the top dead pre-activations without ReLU (l. 569), returns a squared error,
   not an FVU (l. 532), and scales it by ``min(n_dead / k_aux, 1)`` (l. 515). Here the
   dead latents' values are ReLU'd (as z is, and as OpenAI's reference ``train.py``
   does), the term is FVU(e, ê) of the detached residual e = x̃ − x̃̂ about its batch
   mean, unscaled; b_dec is counted once: ê = z_aux W_dec has no bias, since x̃̂ holds it.
3. **Decoder constraint, no clipping.** SAELens 6.x has no unit-norm decoder or gradient
   projection for TopK (it rescales by the decoder norm instead,
   ``rescale_acts_by_decoder_norm``, default True, ``saes/topk_sae.py:354``; off here),
   and ``SAETrainer._train_step`` clips the gradient norm to 1
   (``training/sae_trainer.py:412``), which §4 does not. ``_SafeDigTrainer._train_step`` is
   SAELens's step without the clipping, with :func:`remove_parallel_grad` before and
   :func:`normalise_rows` after ``optimizer.step()``.
4. **c and b_dec from the first training rows.** ``SAETrainer.fit`` estimates the scale
   from ``n_batches_for_norm_estimate`` extra batches it then discards
   (``training/sae_trainer.py:173``, ``training/activation_scaler.py:75``); b_dec starts
   at zero (``saes/sae.py:415``). Here the first ``scale_rows`` training rows give c and
   b_dec's start, and are then the first rows trained on.
5. **Dead window in tokens.** SAELens counts steps and calls a latent dead when
   ``n_forward_passes_since_fired > dead_feature_window`` (``training/sae_trainer.py:157``);
   "fired on none of the last W steps" is ``≥ W``, so it gets ``dead_feature_window =
   W − 1`` with W = min(10⁷, ⅕ · training tokens) // batch size.
6. **Resume.** ``save_trainer_state`` / ``load_trainer_state`` (``training/sae_trainer.py:339,
   362``) ``torch.save`` files and keep neither the RNG state, the data cursor nor the
   scale; :class:`SaeCheckpoint` is a dict of arrays plus JSON metadata handed to the
   caller, and ``resume=`` restores every counter. ``SAETrainer.fit`` is not used (extra
   scale batches, tqdm, checkpoints to disk, folding c at the end, l. 211); the loop drives
   ``SAETrainer.step`` as SAELens's ``MultiSAETrainer`` does
   (``training/multi_sae_trainer.py:126-141``).
7. **Speed (same math).** SAELens's training forward does five dense n × d × m products
   per step even with ``use_sparse_activations`` (its sparse decoder's backward forms
   grad·W_decᵀ densely, the encoder's backward is dense): ~0.9 s per 4096-row step at
   d=384, m=1536 on one CPU core here. :func:`sae_forward` computes the same codes with
   the same operations (``(x − b_dec) @ W_enc + b_enc``, ``topk``, ReLU) but only the
   encoder product is dense; the decoder is an embedding-bag of the k chosen rows and the
   encoder's backward a sparse product (AuxK is dense only within the dead columns):
   ~0.25 s per step. A test checks loss and gradients against the dense formulas.

On disk (:func:`to_saelens`) the SAE is SAELens's inference format with c folded into
the weights (``normalize_activations="none"``), what ``SAETrainer.fit`` itself does with
``fold_activation_norm_scaling_factor`` (``saes/sae.py:312``): ``SAE.load_from_disk``
applies no scaling for ``"expected_average_only_in"`` (``_setup_activation_normalization``
leaves the input alone, ``saes/sae.py:409``; only ``from_pretrained`` folds a registry
factor, l. 783), so an unfolded c would be silently ignored. :class:`TrainedSae` encodes
with the same folded weights and SAELens's operations, so both give identical codes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, overload

import numpy as np
import torch
import torch.nn.functional as F

from safeport.mappers.mlp import deterministic_torch, resolve_device

# The SAELens version whose on-disk format ``to_saelens`` writes (recorded in cfg.json's metadata:
# SAELens treats configs without a ≥ 6.0 version as legacy and rewrites them on load).
SAE_LENS_VERSION = "6.54.12"
CHECKPOINT_FORMAT = "safeport.sae.checkpoint"
CHECKPOINT_VERSION = 1

Rows = np.ndarray | torch.Tensor

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
_PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# Below this the variance of a batch (about its mean) counts as zero: its FVU is undefined.
_TINY = float(torch.finfo(torch.float32).tiny)


# --------------------------------------------------------------------------------------------
# configuration


def _int_option(name: str, value: object, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"SaeConfig.{name} must be an integer, got {value!r} ({type(value).__name__}); {fix}")
    if value < minimum:
        raise ValueError(f"SaeConfig.{name} must be >= {minimum}, got {value}; {fix}")


def _float_option(name: str, value: object, fix: str, *, low: float = 0.0, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"SaeConfig.{name} must be a number, got {value!r} ({type(value).__name__}); {fix}")
    v = float(value)
    if not math.isfinite(v) or v < low or (low_open and v == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"SaeConfig.{name} must be a finite number {bound}, got {value}; {fix}")


@dataclass(frozen=True)
class SaeConfig:
    """Hyper-parameters of one top-k SAE (METHOD-SAFEDIG §4); defaults are the tiny/CPU profile.

    ``m``, ``k_aux`` and ``lr`` at 0 mean "the §4 default" (4·d, d/2 and 2e-4/√(m/2¹⁴)) and are
    replaced by the concrete value on construction, so a stored config (and any key hashed
    from it) always shows the numbers that were used. The GPU profile is ``m=8*d, k=32``.
    ``n_tokens`` is rounded down to whole batches (``n_steps`` × ``batch_size`` tokens).
    """

    d: int
    n_tokens: int
    m: int = 0
    k: int = 8
    k_aux: int = 0
    aux_coef: float = 1 / 32
    lr: float = 0.0
    batch_size: int = 4096
    seed: int = 42
    dead_window_tokens: int = 10_000_000
    dead_window_fraction: float = 0.2
    scale_rows: int = 100_000
    curve_points: int = 100
    device: str = "auto"

    def __post_init__(self) -> None:
        _int_option("d", self.d, 1, "pass the width of the activation rows")
        _int_option("m", self.m, 0, "pass the number of latents (0 = 4·d, METHOD §4's CPU default)")
        m = int(self.m) or 4 * int(self.d)
        object.__setattr__(self, "m", m)
        _int_option("k", self.k, 1, "pass the number of active latents per row (8 on CPU, 32 on GPU)")
        if self.k > m:
            raise ValueError(f"SaeConfig.k = {self.k} exceeds m = {m}; pass k <= m (k latents fire per row)")
        _int_option("k_aux", self.k_aux, 0, "pass the number of dead latents in AuxK (0 = d/2)")
        object.__setattr__(self, "k_aux", int(self.k_aux) or min(m, max(1, int(self.d) // 2)))
        if self.k_aux > m:
            raise ValueError(f"SaeConfig.k_aux = {self.k_aux} exceeds m = {m}; pass k_aux <= m")
        _float_option("aux_coef", self.aux_coef, "use 1/32 (METHOD §4) or 0 to switch AuxK off", low_open=False)
        _float_option("lr", self.lr, "pass a learning rate > 0 (0 = 2e-4/√(m/2¹⁴))", low_open=False)
        object.__setattr__(self, "lr", float(self.lr) or 2e-4 / math.sqrt(m / 2**14))
        _int_option("batch_size", self.batch_size, 1, "METHOD §4 uses 4096 tokens per step")
        _int_option("n_tokens", self.n_tokens, 1, "pass the number of training tokens")
        if self.n_tokens < self.batch_size:
            raise ValueError(
                f"SaeConfig.n_tokens = {self.n_tokens} is less than one batch ({self.batch_size} tokens); "
                "pass n_tokens >= batch_size (training runs whole batches)"
            )
        _int_option("seed", self.seed, 0, "METHOD §4 uses 42")
        _int_option("dead_window_tokens", self.dead_window_tokens, 1, "METHOD §4 uses 10⁷ tokens")
        _float_option("dead_window_fraction", self.dead_window_fraction, "METHOD §4 uses 0.2 (the last fifth)")
        if self.dead_window_fraction > 1:
            raise ValueError(
                f"SaeConfig.dead_window_fraction = {self.dead_window_fraction} is more than all training tokens; "
                "pass a fraction in (0, 1] (METHOD §4: 0.2)"
            )
        _int_option("scale_rows", self.scale_rows, 1, "METHOD §4 estimates c on 10⁵ rows")
        _int_option("curve_points", self.curve_points, 1, "pass how many points the training curves keep")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"SaeConfig.device = {self.device!r} is not a device; use 'auto', 'cpu' or 'cuda[:N]'")
        for name in ("d", "n_tokens", "k", "batch_size", "seed", "dead_window_tokens", "scale_rows", "curve_points"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("aux_coef", "dead_window_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size

    @property
    def trained_tokens(self) -> int:
        """Tokens actually trained on: whole batches only."""
        return self.n_steps * self.batch_size

    @property
    def dead_window_steps(self) -> int:
        """W: a latent is dead when it fired on none of the last W steps' tokens (at least one step)."""
        window = min(self.dead_window_tokens, int(self.trained_tokens * self.dead_window_fraction))
        return max(1, window // self.batch_size)

    @property
    def scale_rows_used(self) -> int:
        """Rows that estimate c and b_dec's start: the first ``scale_rows``, or all when training is shorter."""
        return min(self.scale_rows, self.trained_tokens)

    @property
    def curve_every(self) -> int:
        return max(1, self.n_steps // self.curve_points)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SaeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SaeConfig has no option(s) {unknown}; its options are {sorted(known)}")
        return cls(**dict(values))


# --------------------------------------------------------------------------------------------
# metrics


def _as_float64(x: Rows, name: str) -> np.ndarray:
    arr = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [rows, dim], got shape {arr.shape}")
    return arr.astype(np.float64, copy=False)


@dataclass(frozen=True)
class FvuStats:
    """Sufficient statistics of FVU over some rows, mergeable across batches.

    ``m2`` is Σ‖x − mean‖² about these rows' own mean; two sets merge with Chan's
    update, so streaming never forms the cancellation-prone Σ‖x‖² − n‖mean‖².
    """

    n: int
    mean: np.ndarray  # float64 [d]
    m2: float
    sse: float

    @classmethod
    def of(cls, x: Rows, x_hat: Rows) -> FvuStats:
        a, b = _as_float64(x, "x"), _as_float64(x_hat, "x_hat")
        if a.shape != b.shape:
            raise ValueError(f"x has shape {a.shape} but x_hat has {b.shape}; pass a reconstruction of each row")
        mean = a.mean(axis=0)
        return cls(n=a.shape[0], mean=mean, m2=float(np.sum((a - mean) ** 2)), sse=float(np.sum((a - b) ** 2)))

    def merge(self, other: FvuStats) -> FvuStats:
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge FVU statistics of dim {self.mean.shape[0]} and {other.mean.shape[0]}")
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + float(delta @ delta) * self.n * other.n / n
        return FvuStats(n=n, mean=mean, m2=m2, sse=self.sse + other.sse)

    @property
    def fvu(self) -> float:
        """‖x − x̂‖² / ‖x − mean x‖², summed over rows and dims."""
        if not self.m2 > 0:
            raise ValueError(
                f"the {self.n} evaluated row(s) have zero variance about their mean, so FVU is undefined; "
                "evaluate on more than one distinct row"
            )
        return self.sse / self.m2


def fvu(x: Rows, x_hat: Rows) -> float:
    """Fraction of variance unexplained, the variance taken about the rows' mean (METHOD §4)."""
    return FvuStats.of(x, x_hat).fvu


@dataclass(frozen=True)
class SaeQuality:
    """Held-out quality (METHOD §4): FVU, mean active latents per row, latents that never fired."""

    fvu: float
    l0: float
    dead_fraction: float
    n_rows: int


def evaluate_sae(sae: TrainedSae, batches: Iterable[Rows]) -> SaeQuality:
    """Stream held-out rows through ``sae``; memory stays one batch (sums, not rows, are kept)."""
    stats: FvuStats | None = None
    active = 0
    fired = np.zeros(sae.m, dtype=bool)
    for batch in batches:
        z = sae.encode(batch)
        x_hat = sae.decode(z)
        part = FvuStats.of(batch, x_hat)
        stats = part if stats is None else stats.merge(part)
        on = (z > 0).detach().cpu().numpy() if isinstance(z, torch.Tensor) else z > 0
        active += int(on.sum())
        fired |= on.any(axis=0)
    if stats is None:
        raise ValueError("no held-out rows: the batch stream was empty; pass at least one batch")
    return SaeQuality(fvu=stats.fvu, l0=active / stats.n, dead_fraction=float(1.0 - fired.mean()), n_rows=stats.n)


# --------------------------------------------------------------------------------------------
# the two loss terms and the decoder constraint (pure torch, used by the SAELens subclasses)


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean x‖² over one batch (a zero-variance batch is clamped, not divided by 0)."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(_TINY)


class _SelectedPre(torch.autograd.Function):
    """Pre-activations at chosen (row, latent) pairs, with a backward that never forms an n × m matrix.

    Forward returns ``values`` = pre[r, indices[r, j]] (computed without autograd from the
    dense pre = (x − b_dec) W_enc + b_enc, which TopK needs anyway). Backward: with G the
    sparse n × m gradient, ∂W_enc = (x − b_dec)ᵀ G as one sparse × dense product,
    ∂b_enc = column sums of G, ∂b_dec = −W_enc ∂b_enc.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        x_c: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        indices: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x_c, W_enc, indices)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_c, W_enc, indices = ctx.saved_tensors
        n, j = indices.shape
        m = W_enc.shape[1]
        latents = indices.reshape(-1)
        g = grad.reshape(-1).contiguous()
        rows = torch.arange(n, device=grad.device).repeat_interleave(j)
        G_t = torch.sparse_coo_tensor(torch.stack([latents, rows]), g, (m, n), check_invariants=False)
        grad_W_enc = torch.sparse.mm(G_t, x_c).t().contiguous()
        grad_b_enc = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, latents, g)
        return None, None, grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc), None


class _DeadPre(torch.autograd.Function):
    """Pre-activations of the dead latents ``columns`` (values given), with a backward dense in those columns.

    AuxK picks k_aux = d/2 of the dead latents per row, so its gradient is dense within the
    dead columns: there one n × |dead| product beats any sparse form, and it costs nothing
    for the live latents.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        x_c: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        columns: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x_c, W_enc, columns)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_c, W_enc, columns = ctx.saved_tensors
        grad_W_enc = torch.zeros_like(W_enc)
        grad_W_enc[:, columns] = x_c.t() @ grad
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
        col_sums = grad.sum(dim=0)
        grad_b_enc[columns] = col_sums
        return None, None, grad_W_enc, grad_b_enc, -(W_enc[:, columns] @ col_sums), None


@dataclass(frozen=True, eq=False)
class SaeForward:
    """One training forward pass: the loss, its two terms, the top-k codes (sparse) and the reconstruction."""

    loss: torch.Tensor
    fvu: torch.Tensor
    auxk_fvu: torch.Tensor
    indices: torch.Tensor  # [n, k] latent of each code
    values: torch.Tensor  # [n, k] its (ReLU'd) value, differentiable
    pre: torch.Tensor  # [n, m] pre-activations, no autograd
    x_hat: torch.Tensor  # [n, d] reconstruction of x̃


def sae_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    k: int,
    k_aux: int,
    aux_coef: float,
    dead: torch.Tensor | None,
) -> SaeForward:
    """§4's loss on scaled rows x̃: FVU + aux_coef · AuxK-FVU, computed sparsely.

    z = TopK_k(ReLU((x̃ − b_dec) W_enc + b_enc)) — the same operations as SAELens's
    ``TopKTrainingSAE.encode_with_hidden_pre`` and ``TopK`` — and x̃̂ = z W_dec + b_dec as
    an embedding-bag of the k decoder rows. AuxK: the top ``k_aux`` latents among the
    ``dead`` ones (all of them when fewer; none: the term is 0), ReLU'd, reconstruct the
    detached residual e = x̃ − x̃̂ as ê = z_aux W_dec — no b_dec, which x̃̂ already holds —
    and the term is FVU(e, ê). Dense n × m work: the encoder product only (plus, for
    AuxK, products restricted to the dead columns).
    """
    x_c = (x - b_dec).detach()
    with torch.no_grad():
        pre = x_c @ W_enc + b_enc
        top, indices = torch.topk(pre, k=k, dim=-1, sorted=False)
    values = _SelectedPre.apply(top, x_c, W_enc, b_enc, b_dec, indices).relu()
    x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    main = fvu_loss(x, x_hat)
    aux = main.new_zeros(())
    n_dead = 0 if dead is None or aux_coef == 0 else int(dead.sum())
    if dead is not None and n_dead:
        columns = dead.nonzero()[:, 0]
        with torch.no_grad():
            dead_pre = pre[:, columns]
            aux_local = torch.topk(dead_pre, k=min(k_aux, n_dead), dim=-1, sorted=False).indices
            chosen = torch.zeros_like(dead_pre).scatter_(-1, aux_local, 1.0)
        z_aux = _DeadPre.apply(dead_pre, x_c, W_enc, b_enc, b_dec, columns).relu() * chosen
        e_hat = z_aux @ W_dec[columns]  # ê = z_aux W_dec: no b_dec
        aux = fvu_loss((x - x_hat).detach(), e_hat)
    return SaeForward(
        loss=main + aux_coef * aux,
        fvu=main,
        auxk_fvu=aux,
        indices=indices,
        values=values,
        pre=pre,
        x_hat=x_hat,
    )


@torch.no_grad()
def remove_parallel_grad(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """Remove, in place, each gradient row's component along its (unit) decoder row."""
    grad.sub_((grad * W_dec).sum(dim=-1, keepdim=True) * W_dec)


@torch.no_grad()
def normalise_rows(W_dec: torch.Tensor) -> None:
    """Rescale each decoder row to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(_TINY))


# --------------------------------------------------------------------------------------------
# the trained SAE


@dataclass(frozen=True, eq=False)
class SaeCurves:
    """Training curves: after ``tokens[i]`` tokens, that batch's FVU, its L0 and the dead fraction."""

    tokens: np.ndarray  # int64
    fvu: np.ndarray  # float64
    l0: np.ndarray
    dead_fraction: np.ndarray

    @classmethod
    def empty(cls) -> SaeCurves:
        return cls(*(np.zeros(0, dtype=t) for t in (np.int64, np.float64, np.float64, np.float64)))

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "tokens": [int(t) for t in self.tokens],
            "fvu": [float(v) for v in self.fvu],
            "l0": [float(v) for v in self.l0],
            "dead_fraction": [float(v) for v in self.dead_fraction],
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SaeCurves:
        try:
            arrays = [np.asarray(values[k], dtype=np.float64) for k in ("tokens", "fvu", "l0", "dead_fraction")]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"training curves are malformed ({err!r}); they need four equal-length lists") from None
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
            raise ValueError(f"training curves have unequal or non-1-D lists: {[a.shape for a in arrays]}")
        return cls(arrays[0].astype(np.int64), arrays[1], arrays[2], arrays[3])


@dataclass(frozen=True, eq=False)
class SaeWeights:
    """Activation-unit weights, c folded in (SAELens's layout and on-disk tensors).

    ``W_enc = W̃_enc / c``, ``b_enc``, ``W_dec = c·W̃_dec``, ``b_dec = c·b̃_dec``:
    (x − b_dec) W_enc + b_enc = (x̃ − b̃_dec) W̃_enc + b_enc and z W_dec + b_dec = c·(z W̃_dec + b̃_dec).
    """

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _fold(W_enc: np.ndarray, b_enc: np.ndarray, W_dec: np.ndarray, b_dec: np.ndarray, c: float) -> SaeWeights:
    """Fold c into the weights in float64, then round once to float32."""
    return SaeWeights(
        W_enc=_f32(W_enc.astype(np.float64) / c),
        b_enc=_f32(b_enc),
        W_dec=_f32(W_dec.astype(np.float64) * c),
        b_dec=_f32(b_dec.astype(np.float64) * c),
    )


@dataclass(frozen=True, eq=False)
class TrainedSae:
    """A trained top-k SAE: §4's weights (on x̃ = x / c), c, the config and the training curves.

    ``W_dec`` rows are unit-norm in x̃ units; a row's direction in activation units is the
    same, its length c. ``encode``/``decode``/``reconstruct`` take raw activations (numpy or
    torch, any device) and compute with ``raw`` — the folded weights SAELens stores — by
    SAELens's own operations, so codes match ``sae_lens.SAE.load_from_disk`` exactly.
    ``raw`` is derived from the others when not given (it is given when read from disk, so a
    round trip through SAELens's files is exact).
    """

    W_enc: np.ndarray  # float32 [d, m]
    b_enc: np.ndarray  # float32 [m]
    W_dec: np.ndarray  # float32 [m, d]
    b_dec: np.ndarray  # float32 [d]
    c: float
    config: SaeConfig
    curves: SaeCurves = field(default_factory=SaeCurves.empty)
    raw: SaeWeights | None = None
    _on_device: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        d, m = self.config.d, self.config.m
        expected = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if np.shape(value) != shape:
                raise ValueError(f"{name} has shape {np.shape(value)}, expected {shape} for d={d}, m={m}")
            if self.raw is not None and np.shape(getattr(self.raw, name)) != shape:
                raise ValueError(f"raw {name} has shape {np.shape(getattr(self.raw, name))}, expected {shape}")
        if not (math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"c = {self.c} is not a positive finite scale; it is mean‖x‖/√d of the training rows")
        if self.raw is None:
            object.__setattr__(self, "raw", _fold(self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.c))

    @property
    def d(self) -> int:
        return self.config.d

    @property
    def m(self) -> int:
        return self.config.m

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def folded(self) -> SaeWeights:
        """The activation-unit weights (never None after construction)."""
        if self.raw is None:  # pragma: no cover - set in __post_init__
            raise RuntimeError("TrainedSae.raw was not set")
        return self.raw

    def _weights(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._on_device:
            w = self.folded
            self._on_device[key] = tuple(
                torch.from_numpy(_f32(a)).to(device) for a in (w.W_enc, w.b_enc, w.W_dec, w.b_dec)
            )
        return self._on_device[key]

    def _rows(self, x: Rows, width: int, name: str) -> torch.Tensor:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
        if t.ndim != 2 or t.shape[1] != width:
            raise ValueError(f"{name} must have shape [rows, {width}], got {tuple(t.shape)}")
        return t.to(torch.float32)

    @overload
    def encode(self, x: np.ndarray) -> np.ndarray: ...
    @overload
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...
    def encode(self, x: Rows) -> Rows:
        """Dense top-k codes ``[n, m]`` (float32) of raw activations; numpy in, numpy out, torch stays on its device."""
        t = self._rows(x, self.d, "x")
        W_enc, b_enc, _, b_dec = self._weights(t.device)
        with torch.no_grad():
            pre = (t - b_dec) @ W_enc + b_enc
            values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        return _like(z, x)

    @overload
    def decode(self, z: np.ndarray) -> np.ndarray: ...
    @overload
    def decode(self, z: torch.Tensor) -> torch.Tensor: ...
    def decode(self, z: Rows) -> Rows:
        """Raw-activation reconstruction ``c·(z W̃_dec + b̃_dec)`` of codes ``[n, m]``."""
        t = self._rows(z, self.m, "z")
        _, _, W_dec, b_dec = self._weights(t.device)
        with torch.no_grad():
            out = t @ W_dec + b_dec
        return _like(out, z)

    @overload
    def reconstruct(self, x: np.ndarray) -> np.ndarray: ...
    @overload
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor: ...
    def reconstruct(self, x: Rows) -> Rows:
        return self.decode(self.encode(x))


def _like(t: torch.Tensor, template: Rows) -> Rows:
    return t if isinstance(template, torch.Tensor) else t.cpu().numpy()


# --------------------------------------------------------------------------------------------
# checkpoints


@dataclass(frozen=True, eq=False)
class SaeCheckpoint:
    """Everything a killed training needs to resume bit-identically: arrays plus JSON-able metadata.

    ``arrays``: weights, Adam moments and step counts, steps-since-fired counters, RNG
    state(s), curves. ``meta``: format, config, step, tokens seen, c, scheduler and
    optimiser scalars, and the data cursor — resume with a batch stream that starts at
    provider batch ``data_batch`` (0-based; training skips its first ``data_row`` rows).
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def tokens_seen(self) -> int:
        return int(self.meta["tokens_seen"])

    @property
    def data_batch(self) -> int:
        return int(self.meta["data_batch"])

    @property
    def data_row(self) -> int:
        return int(self.meta["data_row"])


def _check_checkpoint(state: SaeCheckpoint, config: SaeConfig) -> None:
    meta = state.meta
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"resume state has format {meta.get('format')!r} v{meta.get('version')!r}, expected "
            f"{CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}; it was not written by this trainer — start afresh"
        )
    if meta.get("config") != config.to_dict():
        raise ValueError(
            "resume state was written for another config "
            f"({json.dumps(meta.get('config'), sort_keys=True)}); pass that config or start afresh"
        )
    needed = [f"param.{n}" for n in _PARAM_NAMES] + ["n_since_fired", "rng_cpu"]
    missing = [k for k in needed if k not in state.arrays]
    if missing:
        raise ValueError(f"resume state lacks arrays {missing}; it is incomplete — start afresh")


# --------------------------------------------------------------------------------------------
# batches: the provider's rows, re-cut into training batches, with a resumable cursor


class _Batches:
    """Any iterator of ``[n, d]`` batches (any n) → training batches of exactly ``size`` rows.

    After each training batch the cursor is (provider batch, row) of the next unread row;
    a resumed stream starts at that provider batch and its first ``skip`` rows are dropped.
    """

    def __init__(self, source: Iterable[Rows], d: int, size: int, start: int = 0, skip: int = 0) -> None:
        self._source = iter(source)
        self._d = d
        self._size = size
        self._next_index = start  # index of the next provider batch to pull
        self._skip = skip
        self._pieces: deque[tuple[torch.Tensor, int, int]] = deque()  # (rows, provider index, first row)
        self._held = 0
        self._rows_read = 0

    def _pull(self) -> bool:
        try:
            batch = next(self._source)
        except StopIteration:
            return False
        index = self._next_index
        self._next_index += 1
        t = _batch_tensor(batch, self._d, index)
        first = 0
        if self._skip:
            if self._skip > t.shape[0]:
                raise ValueError(
                    f"resume cursor says to skip {self._skip} rows of batch {index}, which has {t.shape[0]}; "
                    "the stream does not match the one the checkpoint came from"
                )
            first, self._skip = self._skip, 0
            t = t[first:]
        if t.shape[0]:
            self._pieces.append((t, index, first))
            self._held += t.shape[0]
        return True

    def next(self) -> tuple[torch.Tensor, tuple[int, int]]:
        while self._held < self._size:
            if not self._pull():
                raise ValueError(
                    f"the batch stream ended after {self._rows_read + self._held} rows of this run, short of a "
                    f"{self._size}-row batch; pass a longer (or repeating) stream, or lower n_tokens"
                )
        parts: list[torch.Tensor] = []
        need = self._size
        while need:
            rows, index, first = self._pieces.popleft()
            if rows.shape[0] > need:
                parts.append(rows[:need])
                self._pieces.appendleft((rows[need:], index, first + need))
                need = 0
            else:
                parts.append(rows)
                need -= rows.shape[0]
        self._held -= self._size
        self._rows_read += self._size
        cursor = (self._pieces[0][1], self._pieces[0][2]) if self._pieces else (self._next_index, 0)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), cursor


def _batch_tensor(batch: Rows, d: int, index: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        t = batch.detach()
    else:
        arr = np.asarray(batch)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"batch {index} has dtype {arr.dtype}; pass float activation rows")
        if arr.dtype != np.float32 or not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = torch.from_numpy(arr)
    if t.ndim != 2 or t.shape[1] != d:
        raise ValueError(f"batch {index} has shape {tuple(t.shape)}, expected [rows, {d}] (SaeConfig.d = {d})")
    if not t.is_floating_point():
        raise ValueError(f"batch {index} has dtype {t.dtype}; pass float activation rows")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"batch {index} holds NaN/inf values; fix the activation rows before training")
    return t


# --------------------------------------------------------------------------------------------
# SAELens: the subclasses that hold the §4 parts SAELens does not do (see the module docstring)


class _Trainer(Protocol):
    """The slice of ``sae_lens``'s ``SAETrainer`` (plus our subclass) that the loop uses."""

    sae: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    activation_scaler: Any
    n_training_steps: int
    n_training_samples: int
    n_forward_passes_since_fired: torch.Tensor
    n_frac_active_samples: int

    @property
    def dead_neurons(self) -> torch.Tensor: ...

    def step(self, batch: torch.Tensor) -> Any: ...


@dataclass(frozen=True)
class _SaeLens:
    build_sae: Callable[[SaeConfig], Any]
    build_trainer: Callable[[SaeConfig, Any, torch.device], _Trainer]


@functools.cache
def _saelens() -> _SaeLens:
    """Import SAELens (≈ 9 s, it pulls in transformer_lens) only when an SAE is trained."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    class _SafeDigTopKSAE(TopKTrainingSAE):
        """SAELens's TopK training SAE with §4's loss (:func:`sae_forward`): FVU + aux_coef · AuxK-FVU."""

        safedig_k_aux: int = 0

        def training_forward_pass(self, step_input: Any) -> Any:
            x = step_input.sae_in.to(self.dtype)
            f = sae_forward(
                x,
                self.W_enc,
                self.b_enc,
                self.W_dec,
                self.b_dec,
                k=self.cfg.k,
                k_aux=self.safedig_k_aux,
                aux_coef=self.cfg.aux_loss_coefficient,
                dead=step_input.dead_neuron_mask,
            )
            return TrainStepOutput(
                sae_in=x,
                sae_out=f.x_hat,
                feature_acts=_sparse_codes(f.indices, f.values.detach(), self.cfg.d_sae),
                hidden_pre=f.pre,
                loss=f.loss,
                losses={"fvu": f.fvu, "auxk_fvu": f.auxk_fvu},
            )

    class _SafeDigTrainer(SAETrainer):
        """``SAETrainer._train_step`` without gradient clipping, with §4's decoder constraint."""

        def _train_step(self, sae: Any, sae_in: torch.Tensor) -> Any:
            sae.train()
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=sae_in,
                    coefficients={},
                    dead_neuron_mask=self.dead_neurons,
                    n_training_steps=self.n_training_steps,
                    is_logging_step=False,
                )
            )
            with torch.no_grad():
                fired = _fired(out.feature_acts, sae.cfg.d_sae)
                self.n_forward_passes_since_fired += 1
                self.n_forward_passes_since_fired[fired] = 0
                self.n_frac_active_samples += sae_in.shape[0]
            out.loss.backward()
            remove_parallel_grad(sae.W_dec.data, sae.W_dec.grad)
            self.optimizer.step()
            self.optimizer.zero_grad()
            normalise_rows(sae.W_dec.data)
            self.lr_scheduler.step()
            return out

    def build_sae(config: SaeConfig) -> Any:
        cfg = TopKTrainingSAEConfig(
            d_in=config.d,
            d_sae=config.m,
            k=config.k,
            dtype="float32",
            device="cpu",
            apply_b_dec_to_input=True,
            normalize_activations="none",
            decoder_init_norm=1.0,
            rescale_acts_by_decoder_norm=False,
            use_sparse_activations=False,  # its TopK/decode are not used in training: sae_forward is
            aux_loss_coefficient=config.aux_coef,
        )
        sae = _SafeDigTopKSAE(cfg)
        sae.safedig_k_aux = config.k_aux
        return sae

    def build_trainer(config: SaeConfig, sae: Any, device: torch.device) -> _Trainer:
        cfg = SAETrainerConfig(
            total_training_samples=config.trained_tokens,
            train_batch_size_samples=config.batch_size,
            lr=config.lr,
            lr_end=config.lr,  # SAETrainer asserts it is set (the runner config's __post_init__ does that)
            lr_scheduler_name="constant",
            device=str(device),
            dead_feature_window=config.dead_window_steps - 1,
            feature_sampling_window=max(1, config.n_steps),
            logger=LoggingConfig(log_to_wandb=False),
        )
        trainer: _Trainer = _SafeDigTrainer(cfg=cfg, sae=sae, data_provider=iter(()))
        return trainer

    return _SaeLens(build_sae=build_sae, build_trainer=build_trainer)


def _sparse_codes(indices: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    """The codes as SAELens's sparse TopK returns them: an [n, m] COO tensor (n·k entries)."""
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    coords = torch.stack([rows, indices.reshape(-1)])
    return torch.sparse_coo_tensor(coords, values.reshape(-1), (n, m), check_invariants=False)


def _fired(codes: torch.Tensor, m: int) -> torch.Tensor:
    """Latents with a positive code on some row of the batch (``codes``: the sparse COO of a step)."""
    on = codes._values() > 0
    fired = torch.zeros(m, dtype=torch.bool, device=codes.device)
    fired[codes._indices()[-1][on]] = True
    return fired


def _active_per_row(codes: torch.Tensor) -> float:
    return float((codes._values() > 0).sum()) / codes.shape[0]


# --------------------------------------------------------------------------------------------
# training


def _estimate_scale(first: list[torch.Tensor], n_rows: int) -> tuple[float, np.ndarray]:
    """c = mean‖x‖/√d and the mean of x̃ = x / c over the first ``n_rows`` rows (float64, batch by batch)."""
    total_norm, total, seen, distinct = 0.0, None, 0, False
    for batch in first:
        x = batch[: n_rows - seen].to("cpu", torch.float64)
        total_norm += float(x.norm(dim=-1).sum())
        total = x.sum(dim=0) if total is None else total + x.sum(dim=0)
        distinct = distinct or bool((x != first[0][:1].to("cpu", torch.float64)).any())
        seen += x.shape[0]
        if seen == n_rows:
            break
    if total is None or not total_norm > 0:
        raise ValueError("the first training rows are all zero (mean norm 0); c = mean‖x‖/√d is undefined")
    if not distinct:
        raise ValueError(
            f"the first {seen} training rows are all identical (zero variance); FVU is undefined — "
            "check that the stream yields real activations"
        )
    c = total_norm / seen / math.sqrt(total.shape[0])
    return c, (total / seen / c).numpy()


def _export(
    trainer: _Trainer, config: SaeConfig, c: float, cursor: tuple[int, int], curves: list[list[float]]
) -> SaeCheckpoint:
    """Copy the whole training state to CPU numpy (training continues to mutate the tensors)."""
    sae = trainer.sae
    arrays: dict[str, np.ndarray] = {}
    for name, p in sae.named_parameters():
        arrays[f"param.{name}"] = p.detach().cpu().numpy().copy()
        st = trainer.optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                arrays[f"adam.{key}.{name}"] = torch.as_tensor(st[key]).detach().cpu().numpy().copy().reshape(-1)
    arrays["n_since_fired"] = trainer.n_forward_passes_since_fired.detach().cpu().numpy().copy()
    arrays["rng_cpu"] = torch.get_rng_state().numpy().copy()
    if sae.device.type == "cuda":
        arrays["rng_cuda"] = torch.cuda.get_rng_state(sae.device).numpy().copy()
    for i, key in enumerate(("tokens", "fvu", "l0", "dead_fraction")):
        arrays[f"curve.{key}"] = np.array([row[i] for row in curves], dtype=np.int64 if i == 0 else np.float64)
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "sae_lens_version": SAE_LENS_VERSION,
        "config": config.to_dict(),
        "step": int(trainer.n_training_steps),
        "tokens_seen": int(trainer.n_training_samples),
        "n_frac_active_samples": int(trainer.n_frac_active_samples),
        "c": c,
        "lr": [float(g["lr"]) for g in trainer.optimizer.param_groups],
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "data_batch": int(cursor[0]),
        "data_row": int(cursor[1]),
    }
    return SaeCheckpoint(arrays=arrays, meta=json.loads(json.dumps(meta)))


def _restore(trainer: _Trainer, state: SaeCheckpoint, device: torch.device) -> list[list[float]]:
    sae = trainer.sae
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.from_numpy(np.array(state.arrays[f"param.{name}"], dtype=np.float32)).to(device))
    for name, p in sae.named_parameters():
        if f"adam.step.{name}" not in state.arrays:
            continue
        trainer.optimizer.state[p] = {
            "step": torch.tensor(float(state.arrays[f"adam.step.{name}"][0]), dtype=torch.float32),
            "exp_avg": torch.from_numpy(np.array(state.arrays[f"adam.exp_avg.{name}"], dtype=np.float32))
            .reshape(p.shape)
            .to(device),
            "exp_avg_sq": torch.from_numpy(np.array(state.arrays[f"adam.exp_avg_sq.{name}"], dtype=np.float32))
            .reshape(p.shape)
            .to(device),
        }
    trainer.lr_scheduler.load_state_dict(state.meta["lr_scheduler"])
    for group, lr in zip(trainer.optimizer.param_groups, state.meta["lr"], strict=True):
        group["lr"] = lr
    trainer.n_training_steps = int(state.meta["step"])
    trainer.n_training_samples = int(state.meta["tokens_seen"])
    trainer.n_frac_active_samples = int(state.meta["n_frac_active_samples"])
    trainer.n_forward_passes_since_fired = torch.from_numpy(
        np.array(state.arrays["n_since_fired"], dtype=np.float32)
    ).to(device)
    torch.set_rng_state(torch.from_numpy(np.array(state.arrays["rng_cpu"], dtype=np.uint8)))
    if device.type == "cuda" and "rng_cuda" in state.arrays:
        torch.cuda.set_rng_state(torch.from_numpy(np.array(state.arrays["rng_cuda"], dtype=np.uint8)), device)
    columns = [state.arrays.get(f"curve.{k}", np.zeros(0)) for k in ("tokens", "fvu", "l0", "dead_fraction")]
    return [[float(col[i]) for col in columns] for i in range(len(columns[0]))]


def train_sae(
    batches: Iterable[Rows],
    config: SaeConfig,
    *,
    checkpoint: Callable[[SaeCheckpoint], None] | None = None,
    checkpoint_every: int = 0,
    resume: SaeCheckpoint | None = None,
) -> TrainedSae:
    """Train one top-k SAE on a stream of token-row batches (METHOD-SAFEDIG §4).

    ``batches`` yields float ``[n, d]`` rows (numpy or torch, any n; float16 is widened),
    already shuffled; it must hold at least ``config.trained_tokens`` rows (a repeating
    stream for several epochs). Every ``checkpoint_every`` steps (0: never, and never after
    the last step) ``checkpoint(state)`` receives a :class:`SaeCheckpoint` to persist;
    ``resume=state`` continues from it, and then ``batches`` must start at provider batch
    ``state.data_batch`` of the same stream. On CPU the resumed run ends bit-identical to an
    uninterrupted one (same torch thread count); deterministic algorithms are switched on for
    the duration of a CPU fit.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an integer >= 0 (0 = never), got {checkpoint_every!r}")
    if checkpoint_every and checkpoint is None:
        raise ValueError(f"checkpoint_every = {checkpoint_every} but no checkpoint callback was given; pass one")
    if resume is not None:
        _check_checkpoint(resume, config)
    device = resolve_device(config.device)
    lens = _saelens()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), deterministic_torch(device.type == "cpu"):
        torch.manual_seed(config.seed)
        sae = lens.build_sae(config)  # seeded init on CPU: same weights whatever the device
        if resume is None:
            rows = _Batches(batches, config.d, config.batch_size)
            first = [rows.next() for _ in range(-(-config.scale_rows_used // config.batch_size))]
            c, mean = _estimate_scale([b for b, _ in first], config.scale_rows_used)
            with torch.no_grad():
                sae.b_dec.copy_(torch.from_numpy(mean.astype(np.float32)))
            sae.to(device)
            trainer = lens.build_trainer(config, sae, device)
            curves: list[list[float]] = []
            pending: deque[tuple[torch.Tensor, tuple[int, int]]] = deque(first)
        else:
            c = float(resume.meta["c"])
            sae.to(device)
            trainer = lens.build_trainer(config, sae, device)
            curves = _restore(trainer, resume, device)
            rows = _Batches(batches, config.d, config.batch_size, start=resume.data_batch, skip=resume.data_row)
            pending = deque()
        trainer.activation_scaler.scaling_factor = 1.0 / c
        for step in range(trainer.n_training_steps, config.n_steps):
            batch, cursor = pending.popleft() if pending else rows.next()
            out = trainer.step(batch)
            trainer.n_training_steps += 1
            done = step + 1
            if done % config.curve_every == 0 or done == config.n_steps:
                curves.append(
                    [
                        float(trainer.n_training_samples),
                        float(out.losses["fvu"].detach()),
                        _active_per_row(out.feature_acts),
                        float(trainer.dead_neurons.float().mean()),
                    ]
                )
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.n_steps:
                checkpoint(_export(trainer, config, c, cursor, curves))
    params = {name: p.detach().cpu().numpy().copy() for name, p in sae.named_parameters()}
    table = np.array(curves, dtype=np.float64).reshape(-1, 4)
    return TrainedSae(
        W_enc=params["W_enc"],
        b_enc=params["b_enc"],
        W_dec=params["W_dec"],
        b_dec=params["b_dec"],
        c=c,
        config=config,
        curves=SaeCurves(table[:, 0].astype(np.int64), table[:, 1], table[:, 2], table[:, 3]),
    )


def repeat_batches(make: Callable[[int], Iterable[Rows]]) -> Iterator[Rows]:
    """Epochs back to back: ``make(epoch)`` for epoch 0, 1, … (e.g. the store's stream seeded per epoch)."""
    epoch = 0
    while True:
        empty = True
        for batch in make(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"epoch {epoch} of the batch stream was empty; there are no rows to train on")
        epoch += 1


# --------------------------------------------------------------------------------------------
# SAELens's on-disk format (cfg.json + sae_weights.safetensors), as plain dicts


def to_saelens(
    trained: TrainedSae, metadata: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(cfg, tensors)`` as SAELens 6.54.12 writes a TopK SAE (``save_inference_model``), c folded in.

    ``metadata`` (e.g. ``model_name``, ``hook_name``: the position) goes into cfg.json's
    ``metadata`` next to SAELens's version fields; safeport's own record (c, config, curves)
    sits under ``metadata["safeport"]`` so :func:`from_saelens` can rebuild the exact object.
    """
    extra = dict(metadata or {})
    if "safeport" in extra:
        raise ValueError("metadata key 'safeport' is reserved for the SAE's own record; rename it")
    cfg: dict[str, Any] = {
        "architecture": "topk",
        "d_in": trained.d,
        "d_sae": trained.m,
        "k": trained.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            "training_architecture": "topk",
            "training_architecture_details": {
                "decoder_init_norm": 1.0,
                "use_sparse_activations": False,
                "aux_loss_coefficient": trained.config.aux_coef,
            },
            **extra,
            "safeport": {
                "c": trained.c,
                "config": trained.config.to_dict(),
                "curves": trained.curves.to_dict(),
                "method": "METHOD-SAFEDIG §4; weights in activation units (c folded in)",
            },
        },
    }
    tensors = {name: _f32(a) for name, a in trained.folded.as_dict().items()}
    return json.loads(json.dumps(cfg, allow_nan=False)), tensors


def from_saelens(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> TrainedSae:
    """Rebuild a :class:`TrainedSae` from SAELens's cfg and tensors (the inverse of :func:`to_saelens`).

    A TopK SAE written by other tools loads too, as c = 1 with a config that records only
    d, m and k; anything SAELens would encode differently (a runtime normalisation, decoder
    norm rescaling, no b_dec subtraction) is refused rather than silently mis-encoded.
    """
    if cfg.get("architecture") != "topk":
        raise ValueError(f"cfg architecture is {cfg.get('architecture')!r}; only SAELens 'topk' SAEs load here")
    for key, want in (
        ("apply_b_dec_to_input", True),
        ("normalize_activations", "none"),
        ("reshape_activations", "none"),
        ("rescale_acts_by_decoder_norm", False),
    ):
        if cfg.get(key, want) != want:
            raise ValueError(
                f"cfg {key} = {cfg.get(key)!r}; safeport encodes with {key} = {want!r} — fold it into the "
                "weights with SAELens first (e.g. fold_activation_norm_scaling_factor / fold_W_dec_norm)"
            )
    missing = [n for n in _PARAM_NAMES if n not in tensors]
    if missing:
        raise ValueError(f"tensors lack {missing} (have {sorted(tensors)}); a TopK SAE has {list(_PARAM_NAMES)}")
    try:
        d, m, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"cfg lacks a valid d_in / d_sae / k ({err!r}); it is not a TopK SAE config") from None
    raw = SaeWeights(**{n: _f32(np.asarray(tensors[n])) for n in _PARAM_NAMES})
    mine = (cfg.get("metadata") or {}).get("safeport")
    if mine is None:
        config = SaeConfig(d=d, m=m, k=k, n_tokens=4096, batch_size=4096)
        c, curves = 1.0, SaeCurves.empty()
    else:
        config = SaeConfig.from_dict(mine["config"])
        c, curves = float(mine["c"]), SaeCurves.from_dict(mine["curves"])
        if (config.d, config.m, config.k) != (d, m, k):
            raise ValueError(
                f"cfg says d_in={d}, d_sae={m}, k={k} but its safeport config says d={config.d}, m={config.m}, "
                f"k={config.k}; the file was edited — write it again"
            )
    unfolded = _fold(raw.W_enc, raw.b_enc, raw.W_dec, raw.b_dec, 1.0 / c)
    return TrainedSae(
        W_enc=unfolded.W_enc,
        b_enc=unfolded.b_enc,
        W_dec=unfolded.W_dec,
        b_dec=unfolded.b_dec,
        c=c,
        config=config,
        curves=curves,
        raw=raw,
    )


__all__ = [
    "SAE_LENS_VERSION",
    "FvuStats",
    "SaeCheckpoint",
    "SaeConfig",
    "SaeCurves",
    "SaeForward",
    "SaeQuality",
    "SaeWeights",
    "TrainedSae",
    "evaluate_sae",
    "from_saelens",
    "fvu",
    "fvu_loss",
    "normalise_rows",
    "remove_parallel_grad",
    "repeat_batches",
    "sae_forward",
    "to_saelens",
    "train_sae",
]
