"""SafeDIG bundles for tests: planted from a tiny pipeline's own streams, and written into a store.

Shared by tests/eval/test_safedig_steering.py and tests/test_packaging.py (the README's SafeDIG snippet).
:func:`streams` records what the hooked positions carry in an unsteered generation; :func:`planted_position`
builds one position from them (an SAE with W_enc = W_decᵀ and unit decoder rows, c = mean‖x‖/√d,
b_dec = the mean, H = latents that together fire on most tokens, a refitted decoder near W_dec, ū from a
real :class:`SafeLevelAccumulator`) with thresholds planted where a test needs them; :func:`store_bundle`
writes a bundle with the store's own writers, as the SafeDIG flow lays it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from safeport.eval.safedig import Calibration, SafeDigBundle, SafeDigPosition, SafeLevelAccumulator, harm
from safeport.extractors.capture import position_hooks
from safeport.extractors.positions import Position
from safeport.mappers.latents import SaeParams
from safeport.mappers.sae import SaeConfig, SaeCurves
from safeport.store import safedig as art
from safeport.store.store import Store

EXPANSION, K, N_HARMFUL = 4, 8, 4  # the tiny/CPU profile: m = 4·d, k = 8, |H| = 4
# "above": τ_lo = τ_hi above every token's h; "mixed": the 30th / 70th percentile of the positive h; "zero":
# τ_lo = τ_hi = 0 (as in the demo store's bundles: every token where an H latent fires is repelled).
Taus = str


def streams(pipe: Any, positions: Sequence[str], prompts: list[str], **call: Any) -> dict[str, np.ndarray]:
    """Every token each position carries in ``pipe(prompt=prompts, **call)``, unsteered (all steps), float32 [n, d]."""
    seen: dict[str, list[np.ndarray]] = {p: [] for p in positions}

    def record(position: Position, step: int, tensor: torch.Tensor) -> None:
        seen[position.name].append(tensor.detach().reshape(-1, tensor.shape[-1]).float().numpy().copy())

    with position_hooks(pipe, tuple(positions), record):
        pipe(prompt=prompts, **call)
    return {p: np.concatenate(v) for p, v in seen.items()}


def planted_position(name: str, x: np.ndarray, taus: Taus, seed: int) -> SafeDigPosition:
    """An SAE fitted to nothing but shaped like §4's (see the module doc), H, W′, ū and planted thresholds."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    m = EXPANSION * d
    c = float(np.linalg.norm(x, axis=1).mean() / math.sqrt(d))
    W_dec = rng.standard_normal((m, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    sae = SaeParams(
        W_enc=W_dec.T.astype(np.float32),
        b_enc=(0.01 * rng.standard_normal(m)).astype(np.float32),
        W_dec=W_dec.astype(np.float32),
        b_dec=(x / c).mean(axis=0).astype(np.float32),
        c=c,
        k=K,
    )
    Z = sae.encode(x)
    fires, covered = Z > 0, np.zeros(len(Z), dtype=bool)
    chosen: list[int] = []
    for _ in range(N_HARMFUL):  # greedy cover: many tokens of every prompt carry some harm
        gain = (fires & ~covered[:, None]).sum(axis=0) + (fires.sum(axis=0) / (len(Z) + 1))  # ties: most firing
        gain[chosen] = -1
        chosen.append(int(np.argmax(gain)))
        covered |= fires[:, chosen[-1]]
    harmful = tuple(chosen)
    W_refit = (W_dec + 0.05 * rng.standard_normal((m, d))).astype(np.float32)
    h, _ = harm(Z, harmful, W_refit, c)
    acc = SafeLevelAccumulator(harmful, W_refit, c)
    acc.add(Z[h <= np.median(h)])  # the "safe side": the less harmful half
    safe = acc.finish()
    if taus == "above":
        lo = hi = 2.0 * float(h.max()) + 1.0
    elif taus == "zero":
        lo = hi = 0.0
    else:
        lo, hi = (float(v) for v in np.percentile(h[h > 0], [30.0, 70.0]))
    calibration = Calibration(lo, hi, safe.u_bar.astype(np.float32), safe.n_tokens)
    return SafeDigPosition(name, sae, harmful, W_refit, calibration, routed=True, fixed=name.endswith(".img"))


def store_bundle(root: Path, bundle: SafeDigBundle, bundle_key: str = "bundle0", model_key: str = "test") -> None:
    """Write ``bundle`` with the store's own writers, as the SafeDIG flow lays it out (SAE, H, refit, two params).

    ``model_key``: the key of the model it was fit on (the eval flow steers a target only with a bundle fit on
    the target's current key).
    """
    entries = []
    with Store(root) as store:
        for i, pos in enumerate(bundle.positions):
            sae, keys = pos.sae, {k: f"{k}{i:02d}" for k in ("sae", "latents", "refit", "params", "source")}
            d, m = sae.dim, sae.n_latents
            weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
            config = SaeConfig(d=d, n_tokens=4096, m=m, k=sae.k).to_dict()
            art.save_sae(
                store,
                keys["sae"],
                {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()},
                {
                    "model": bundle.model, "model_key": model_key, "position": pos.position, "holdout": bundle.holdout,
                    "d": d, "m": m, "k": sae.k, "c": sae.c, "fvu": 0.1, "l0": float(sae.k), "dead": 0.0,
                    "n_train": 4096, "n_heldout": 0, "config": config, "curves": SaeCurves.empty().to_dict(),
                    "lineage": {},
                },
            )  # fmt: skip
            n = len(pos.harmful)  # H, pooled over the categories (category NULL), in rank order
            art.save_latents(
                store,
                keys["latents"],
                keys["sae"],
                pa.table(
                    {
                        "position": [pos.position] * n, "category": pa.nulls(n, pa.string()),
                        "latent": list(pos.harmful), "score": [1.0] * n, "mu_unsafe": [1.0] * n,
                        "mu_safe": [0.0] * n, "fire_unsafe": [1.0] * n, "fire_safe": [0.0] * n,
                        "in_h": [True] * n, "h_rank": list(range(n)),
                    }
                ),
            )  # fmt: skip
            art.save_refit(
                store,
                keys["refit"],
                {"W": np.asarray(pos.decoder, dtype=np.float32), "b": np.zeros(d, np.float32)},
                {
                    "sae_key": keys["sae"], "holdout": bundle.holdout, "lam": 1.0, "k": 0.0, "fvu": 0.1,
                    "fvu_source": 0.2, "grid": {}, "n_train": 1, "n_heldout": 1, "lineage": {},
                },
            )  # fmt: skip
            cal = pos.calibration
            # The source decoder's safe level and thresholds differ, so the "no refit" ablation is told apart.
            for key, u_bar, shift in ((keys["params"], cal.u_bar, 0.0), (keys["source"], -cal.u_bar, 0.25)):
                art.save_params(
                    store,
                    key,
                    {"u_bar": np.asarray(u_bar, dtype=np.float32)},
                    {
                        "sae_key": keys["sae"], "latents_key": keys["latents"], "refit_key": keys["refit"],
                        "harmful": list(pos.harmful), "tau_lo": cal.tau_lo + shift, "tau_hi": cal.tau_hi + shift,
                        "n_safe": cal.n_tokens,
                    },
                )  # fmt: skip
            entries.append(
                {
                    "position": pos.position, "routed": pos.routed, "fixed": pos.fixed, "sae_key": keys["sae"],
                    "latents_key": keys["latents"], "refit_key": keys["refit"], "params_key": keys["params"],
                    "params_key_source": keys["source"],
                }
            )  # fmt: skip
        art.save_bundle(
            store,
            {
                "bundle_key": bundle_key, "name": bundle.name, "model": bundle.model, "model_key": model_key,
                "holdout": bundle.holdout, "route_key": "route0", "positions": entries, "lineage": {},
            },
        )  # fmt: skip
