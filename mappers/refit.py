"""Transfer to a target domain: refit the SAE decoder on target rows, encoder frozen, in closed form (SafeDIG §6).

W′ = argmin ‖Z W + 1 b′ − X̃‖² + λ‖W − W_dec‖², solved on centred codes and rows:
(ZcᵀZc + λI) W′ = ZcᵀX̃c + λ W_dec and b′ = x̄ − z̄ W′, with Z the frozen encoder's codes
of the target's **train-split** rows (both sides; no label is ever an input) and
X̃ = x / c the rows in the SAE's scaled units.

Streaming pattern: one :class:`RefitStats` per (position, target); call
``add(Z, X_scaled, row_keys)`` per batch, in any order and batch size; each row goes to
the train or the held-out sums by a seeded hash of its key (never by arrival order), so
shuffling the rows or re-batching them changes nothing but float rounding of the sums.
Then :func:`refit_decoder` solves the whole λ grid from one eigendecomposition
ZcᵀZc = V diag(e) Vᵀ: W′_λ = V diag(1/(e+λ)) (VᵀZcᵀX̃c + λ VᵀW_dec). The held-out FVU
of each λ is exact, from the held-out sums alone (no second pass over rows):
Σ‖x − W′ᵀz − b′‖² = tr(S_xx) − 2⟨W′, S_zx⟩ + ⟨W′, S_zz W′⟩ + n_h‖x̄_h − W′ᵀz̄_h − b′‖²,
with S the held-out moments centred on the held-out means, and FVU = that / tr(S_xx)
(variance about the held-out mean, as §4 defines FVU).

Choices where the method page is silent (ours):

- λ grid: 10^k · tr(ZcᵀZc)/m, k = −4…2 (the mean eigenvalue makes k comparable across
  SAEs); the smallest held-out FVU wins, exact ties go to the larger λ (closer to the
  source decoder).
- Held-out: 10 % by a seeded 64-bit hash of each row's key (``heldout_mask``). Pass a key
  that groups correlated rows: we recommend the **pair id** (both sides of a pair share
  the seed and, early in denoising, the layout), else the text id; per-token keys would
  let one prompt's tokens sit on both sides of the split and favour small λ.
- λ → ∞ (the "no refit" ablation) returns the source decoder **and the source bias**
  (W_dec, b_dec) unchanged. The limit of the centred solution would be b′ = x̄ − z̄ W_dec;
  we do not use it because the ablation means "the source SAE as is", and b′ never enters
  the steering edit (only W′ rows do), just the reported FVU. The result also reports the
  held-out FVU of (W_dec, b_dec).
- FVUs are clipped at 0: the sum expansion can round a perfect fit to −1e-16.
- Cost: ZᵀZ is m×m float64 (m = 24,576 at Flux scale: 4.8 GB per accumulator, train and
  held-out both), the eigendecomposition O(m³), each λ two m×m×d products. Sparse codes
  (top-k) are accumulated through scipy.sparse, O(n·k²) per batch instead of O(n·m²).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from safeport.mappers.latents import codes

DEFAULT_KS: tuple[int, ...] = (-4, -3, -2, -1, 0, 1, 2)
HELDOUT_FRACTION = 0.1
DEFAULT_SEED = 42
# Codes at most this dense go through scipy.sparse products (top-k codes are k/m dense).
_SPARSE_DENSITY = 0.25
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (Steele et al.'s SplitMix64 finaliser): every input bit moves every output bit."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _unit_hash(row_keys: Sequence[int] | Sequence[str] | np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform number in [0, 1) per key: a pure function of (key, seed)."""
    keys = np.asarray(row_keys)
    if keys.ndim != 1:
        raise ValueError(f"row_keys must be one key per row (1-D), got shape {keys.shape}")
    if np.issubdtype(keys.dtype, np.integer):
        with np.errstate(over="ignore"):
            h = _splitmix64(keys.astype(np.int64).view(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64)))
    elif keys.dtype.kind in "UO" and all(isinstance(k, str) for k in keys.tolist()):
        h = np.array(
            [
                int.from_bytes(hashlib.blake2b(f"{seed}\x00{k}".encode(), digest_size=8).digest(), "little")
                for k in keys.tolist()
            ],
            dtype=np.uint64,
        )
    else:
        raise ValueError(f"row_keys must be integers or strings (a row's stable id), got dtype {keys.dtype}")
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def heldout_mask(
    row_keys: Sequence[int] | Sequence[str] | np.ndarray,
    fraction: float = HELDOUT_FRACTION,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """True for the rows whose key hashes into the held-out ``fraction``; depends on nothing but (key, seed)."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return _unit_hash(row_keys, seed) < fraction


class GramAccumulator:
    """ZᵀZ, ZᵀX̃, Σz, Σx̃, Σ‖x̃‖² and n in float64, added batch by batch: all a least-squares fit needs."""

    def __init__(self, n_latents: int, dim: int) -> None:
        if n_latents < 1 or dim < 1:
            raise ValueError(f"n_latents and dim must be >= 1, got {n_latents} and {dim}")
        self.n_latents, self.dim = n_latents, dim
        self.ZtZ = np.zeros((n_latents, n_latents))
        self.ZtX = np.zeros((n_latents, dim))
        self.z_sum = np.zeros(n_latents)
        self.x_sum = np.zeros(dim)
        self.x_sq = 0.0
        self.n = 0

    def add(self, Z: np.ndarray, X_scaled: np.ndarray) -> None:
        """Add codes ``Z`` [n, m] and their rows ``X_scaled`` = x / c [n, d]."""
        z = codes(Z, self.n_latents)
        x = np.asarray(X_scaled, dtype=np.float64)
        if x.ndim != 2 or x.shape != (z.shape[0], self.dim):
            raise ValueError(f"X_scaled must be [{z.shape[0]}, {self.dim}] (one row per code row), got {x.shape}")
        if z.shape[0] == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("X_scaled contains NaN/inf; check the rows (float16 overflow?) before the refit")
        z_sum = z.sum(axis=0, dtype=np.float64)
        if not np.isfinite(z_sum).all():
            raise ValueError("Z contains NaN/inf codes; check the SAE and the rows it encoded")
        if np.count_nonzero(z) <= _SPARSE_DENSITY * z.size:
            zs = sp.csr_matrix(z, dtype=np.float64)
            gram = (zs.T @ zs).tocoo()
            gram.sum_duplicates()
            self.ZtZ[gram.row, gram.col] += gram.data
            self.ZtX += np.asarray(zs.T @ x)
        else:
            z64 = z.astype(np.float64, copy=False)
            self.ZtZ += z64.T @ z64
            self.ZtX += z64.T @ x
        self.z_sum += z_sum
        self.x_sum += x.sum(axis=0)
        self.x_sq += float(np.sum(x * x))
        self.n += z.shape[0]

    def merge(self, other: GramAccumulator) -> None:
        """Add another accumulator's sums (same m and d), e.g. from another worker."""
        if (other.n_latents, other.dim) != (self.n_latents, self.dim):
            raise ValueError(
                f"cannot merge sums of m, d = {other.n_latents}, {other.dim} into {self.n_latents}, {self.dim}"
            )
        self.ZtZ += other.ZtZ
        self.ZtX += other.ZtX
        self.z_sum += other.z_sum
        self.x_sum += other.x_sum
        self.x_sq += other.x_sq
        self.n += other.n

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """(ZcᵀZc, ZcᵀX̃c, z̄, x̄, tr X̃cᵀX̃c): the moments about the means of the rows added."""
        if self.n == 0:
            raise ValueError("no rows were added; the refit needs target rows in both the train and held-out parts")
        z_bar, x_bar = self.z_sum / self.n, self.x_sum / self.n
        gram = self.ZtZ - self.n * np.outer(z_bar, z_bar)
        cross = self.ZtX - self.n * np.outer(z_bar, x_bar)
        return (gram + gram.T) / 2, cross, z_bar, x_bar, self.x_sq - self.n * float(x_bar @ x_bar)


class RefitStats:
    """Train and held-out :class:`GramAccumulator` s; a row's part is a seeded hash of its key, not its order."""

    def __init__(
        self, n_latents: int, dim: int, heldout_fraction: float = HELDOUT_FRACTION, seed: int = DEFAULT_SEED
    ) -> None:
        heldout_mask(np.zeros(1, dtype=np.int64), heldout_fraction, seed)  # validates the fraction
        self.heldout_fraction, self.seed = heldout_fraction, seed
        self.train = GramAccumulator(n_latents, dim)
        self.heldout = GramAccumulator(n_latents, dim)

    def add(self, Z: np.ndarray, X_scaled: np.ndarray, row_keys: Sequence[int] | Sequence[str] | np.ndarray) -> None:
        """Add a batch: codes [n, m], rows x / c [n, d], one stable key per row (see the module doc)."""
        mask = heldout_mask(row_keys, self.heldout_fraction, self.seed)
        z, x = np.asarray(Z), np.asarray(X_scaled)
        if mask.shape[0] != z.shape[0] or z.ndim != 2 or x.ndim != 2 or x.shape[0] != z.shape[0]:
            raise ValueError(
                f"Z {z.shape}, X_scaled {x.shape} and row_keys ({mask.shape[0]}) must have one row per key"
            )
        self.train.add(z[~mask], x[~mask])
        self.heldout.add(z[mask], x[mask])

    def merge(self, other: RefitStats) -> None:
        if (other.heldout_fraction, other.seed) != (self.heldout_fraction, self.seed):
            raise ValueError("cannot merge stats split with a different held-out fraction or seed")
        self.train.merge(other.train)
        self.heldout.merge(other.heldout)


@dataclass(frozen=True, eq=False)
class DecoderRefit:
    """The refitted decoder at the chosen λ, and the grid it was chosen from."""

    W: np.ndarray  # float64 [m, d]: W′
    b: np.ndarray  # float64 [d]: b′ (scaled units, like b_dec)
    lam: float
    k: int
    ks: tuple[int, ...]
    lambdas: np.ndarray  # [len(ks)]
    fvus: np.ndarray  # held-out FVU per λ
    fvu_source: float  # held-out FVU of the unchanged source decoder (λ → ∞)
    lambda_scale: float  # tr(ZcᵀZc)/m
    n_train: int
    n_heldout: int

    def params(self) -> dict[str, float | int]:
        """Flat hyper-parameters and diagnostics, for lineage."""
        out: dict[str, float | int] = {
            "lambda": self.lam,
            "k": self.k,
            "lambda_scale": self.lambda_scale,
            "fvu_heldout": float(self.fvus[self.ks.index(self.k)]),
            "fvu_source": self.fvu_source,
            "n_train": self.n_train,
            "n_heldout": self.n_heldout,
        }
        out.update({f"fvu_k{k:+d}": float(f) for k, f in zip(self.ks, self.fvus, strict=True)})
        return out


def _check_decoder(W: np.ndarray, b: np.ndarray, acc: GramAccumulator) -> tuple[np.ndarray, np.ndarray]:
    w, bias = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if w.shape != (acc.n_latents, acc.dim) or bias.shape != (acc.dim,):
        raise ValueError(
            f"decoder {w.shape} and bias {bias.shape} must be [{acc.n_latents}, {acc.dim}] and [{acc.dim}]: "
            "those of the SAE whose codes were accumulated"
        )
    if not (np.isfinite(w).all() and np.isfinite(bias).all()):
        raise ValueError("decoder or bias contains NaN/inf; check the SAE weights")
    return w, bias


def lambda_scale(train: GramAccumulator) -> float:
    """tr(ZcᵀZc)/m, the mean eigenvalue: the unit of the λ grid."""
    scale = float(np.trace(train.centred()[0])) / train.n_latents
    if not scale > 0:
        raise ValueError("the target codes do not vary (tr(ZcᵀZc) = 0); the refit has nothing to fit")
    return scale


def solve_decoder(
    train: GramAccumulator, W_dec: np.ndarray, b_dec: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """(W′, b′) at one λ by a direct solve (the reference for the grid); λ = inf gives (W_dec, b_dec)."""
    w_dec, b_src = _check_decoder(W_dec, b_dec, train)
    if lam == np.inf:
        return w_dec.copy(), b_src.copy()
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be > 0 (or inf for the source decoder), got {lam}")
    gram, cross, z_bar, x_bar, _ = train.centred()
    W = np.linalg.solve(gram + lam * np.eye(train.n_latents), cross + lam * w_dec)
    return W, x_bar - z_bar @ W


def heldout_fvu(heldout: GramAccumulator, W: np.ndarray, b: np.ndarray) -> float:
    """Σ‖x̃ − zW − b‖² / Σ‖x̃ − x̄‖² over the held-out rows, exactly from their sums (clipped at 0)."""
    w, bias = _check_decoder(W, b, heldout)
    gram, cross, z_bar, x_bar, sxx = heldout.centred()
    if not sxx > 0:
        raise ValueError("the held-out rows do not vary (Σ‖x̃ − x̄‖² = 0); FVU is undefined — add more target rows")
    offset = x_bar - z_bar @ w - bias
    sse = sxx - 2.0 * float(np.sum(w * cross)) + float(np.sum(w * (gram @ w))) + heldout.n * float(offset @ offset)
    return max(sse, 0.0) / sxx


def pick_lambda(lambdas: np.ndarray, fvus: np.ndarray) -> int:
    """Index of the smallest FVU; exact ties go to the larger λ (closer to the source decoder)."""
    lam, f = np.asarray(lambdas, dtype=np.float64), np.asarray(fvus, dtype=np.float64)
    if lam.shape != f.shape or lam.ndim != 1 or lam.size == 0 or not np.isfinite(f).all():
        raise ValueError(f"need one finite FVU per λ, got λ {lam.shape} and FVUs {f}")
    return int(np.lexsort((-lam, f))[0])


def refit_decoder(
    stats: RefitStats, W_dec: np.ndarray, b_dec: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS
) -> DecoderRefit:
    """W′, b′ at the λ of the grid with the lowest held-out FVU (ties: larger λ), from one eigendecomposition."""
    if not ks:
        raise ValueError("ks is empty; pass at least one exponent, e.g. (-4, ..., 2)")
    w_dec, b_src = _check_decoder(W_dec, b_dec, stats.train)
    gram, cross, z_bar, x_bar, _ = stats.train.centred()
    stats.heldout.centred()  # a clear error now if the held-out part is empty
    scale = lambda_scale(stats.train)
    evals, V = np.linalg.eigh(gram)
    evals = np.clip(evals, 0.0, None)  # ZcᵀZc is PSD; eigh can return −1e-13
    A, B = V.T @ cross, V.T @ w_dec
    lambdas = np.array([10.0**k for k in ks]) * scale
    fvus = np.empty(len(ks))
    for i, lam in enumerate(lambdas):
        W = V @ ((A + lam * B) / (evals + lam)[:, None])
        fvus[i] = heldout_fvu(stats.heldout, W, x_bar - z_bar @ W)
    i = pick_lambda(lambdas, fvus)
    lam = float(lambdas[i])
    W = V @ ((A + lam * B) / (evals + lam)[:, None])
    b = x_bar - z_bar @ W
    return DecoderRefit(
        W=W,
        b=b,
        lam=lam,
        k=int(ks[i]),
        ks=tuple(ks),
        lambdas=lambdas,
        fvus=fvus,
        fvu_source=heldout_fvu(stats.heldout, w_dec, b_src),
        lambda_scale=scale,
        n_train=stats.train.n,
        n_heldout=stats.heldout.n,
    )
