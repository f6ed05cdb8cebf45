"""The read side of a store for a generation job: vectors by name, exported vectors, metadata queries.

Re-exported by :mod:`safeport` (``from safeport import Store, load_vector, read_exported_vector``).
Each call opens the store read-only for its own duration and closes it again, so a job that keeps
a :class:`Store` around never holds the metadata file while a safeport writer needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from safeport.store import artifacts
from safeport.store import safedig as safedig_art
from safeport.store.query import readonly_query
from safeport.store.store import Store as _StoreHandle
from safeport.store.store import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from safeport.eval.safedig import SafeDigBundle

Vector = tuple[np.ndarray, dict[str, Any]]
"""A steering vector (float32, 1-D, the target's text-embedding dim) and its lineage (name, kind, source,
target, mapper, category, norm, vector_key, fit inputs, code version)."""


class Store:
    """Read-only access to a safeport store folder (``meta.duckdb`` + its Zarr arrays).

    >>> store = Store("safeport-store")                       # doctest: +SKIP
    >>> store.vectors()[:2]                                   # doctest: +SKIP
    ['calibrated:smollm2-135m->minilm-l6:mlp', ...]
    >>> v, lineage = store.load_vector("calibrated:smollm2-135m->minilm-l6:ridge")  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not (self.root / "meta.duckdb").is_file():
            raise StoreError(f"no store at {self.root}: it has no meta.duckdb; run `safeport run` to build one")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _open(self) -> _StoreHandle:
        return _StoreHandle(self.root, read_only=True)

    def vectors(self, target: str | None = None) -> list[str]:
        """Names of the stored vectors (``KIND:SOURCE->TARGET:MAPPER[:CATEGORY]``), optionally for one target."""
        with self._open() as store:
            rows = store.fetchall(
                "SELECT DISTINCT name FROM vectors WHERE ? IS NULL OR target = ? ORDER BY name", [target, target]
            )
        return [str(r[0]) for r in rows]

    def load_vector(self, name: str) -> Vector:
        """The vector named ``name`` (the newest if refitted) and its lineage, checksum-verified."""
        with self._open() as store:
            return artifacts.load_vector(store, name)

    def query(self, sql: str) -> pa.Table:
        """One read-only SQL statement over the metadata (tables and views, see the README); files are refused."""
        return readonly_query(self.root, sql)

    def safedig(self, name: str, refit: bool = True) -> SafeDigBundle:
        """A SafeDIG bundle (``safedig:MODEL:CATEGORY``) for :func:`safeport.steer` (see :func:`load_safedig`)."""
        with self._open() as store:
            return _bundle_from_store(store, name, refit)

    def batches(self, select: str | None = None, **options: Any) -> Any:
        """Seeded, shuffled, checksum-verified batches of rows (``safeport.store.store.Store.batches``).

        The store stays open while the stream is read; close it by exhausting the stream.
        """
        store = self._open()
        try:
            yield from store.batches(select, **options)
        finally:
            store.close()

    def activations(self, model: str, dataset: str, where: str = "") -> tuple[pa.Table, np.ndarray]:
        """(metadata rows, float32 pooled activations) of ``model`` on ``dataset``, checksum-verified.

        ``where`` filters the ``activations`` view, e.g. ``"split = 'train' AND side = 'safe'"``.
        """
        with self._open() as store:
            return store.activations(model, dataset, where)


def load_vector(store: Store | str | os.PathLike[str], name: str) -> Vector:
    """A stored vector by name from a store (a :class:`Store` or its folder) and its lineage, checksum-verified."""
    return (store if isinstance(store, Store) else Store(store)).load_vector(name)


def read_exported_vector(path: str | os.PathLike[str]) -> Vector:
    """A vector written by ``safeport export`` (``<key>.safetensors``; lineage from the sibling ``.json``)."""
    return artifacts.read_exported_vector(Path(path))


def load_safedig(store: Store | str | os.PathLike[str], name: str, refit: bool = True) -> SafeDigBundle:
    """A stored SafeDIG bundle by name (``safedig:MODEL:CATEGORY``), checksum-verified.

    ``refit=False`` gives the "no refit" ablation: the source decoder and its own thresholds.
    """
    return (store if isinstance(store, Store) else Store(store)).safedig(name, refit)


def _bundle_from_store(store: _StoreHandle, name: str, refit: bool) -> SafeDigBundle:
    from safeport.eval.safedig import Calibration, SafeDigBundle, SafeDigPosition
    from safeport.mappers.latents import SaeParams

    row = safedig_art.bundle_row(store, name)
    positions = []
    for e in row["positions"]:
        arrays, sae_row = safedig_art.load_sae(store, e["sae_key"])
        sae = SaeParams(
            arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], float(sae_row["c"]), int(sae_row["k"])
        )
        values, params = safedig_art.load_params(store, e["params_key"] if refit else e["params_key_source"])
        decoder = safedig_art.load_refit(store, e["refit_key"])[0]["W"] if refit else arrays["W_dec"]
        cal = Calibration(float(params["tau_lo"]), float(params["tau_hi"]), values["u_bar"], int(params["n_safe"]))
        positions.append(
            SafeDigPosition(
                e["position"], sae, tuple(params["harmful"]), decoder, cal, bool(e["routed"]), bool(e["fixed"])
            )
        )
    lineage = {**row["lineage"], "bundle_key": row["bundle_key"], "refit": refit, "positions": row["positions"]}
    return SafeDigBundle(row["name"], row["model"], row["holdout"], tuple(positions), lineage)


def export_safedig(store: Store | str | os.PathLike[str], name: str, out: str | os.PathLike[str]) -> Path:
    """Write a SafeDIG bundle for a job without the store: ``OUT/<bundle key>/`` (see :func:`read_exported_safedig`).

    Per position its SAE in SAELens's own format (``sae/cfg.json`` + ``sae/sae_weights.safetensors``, loadable
    with ``sae_lens.SAE.load_from_disk``), ``steer.safetensors`` (the refitted decoder, the safe levels for it
    and for the source decoder) and ``bundle.json`` (positions, H, τ_lo/τ_hi for both decoders, lineage).
    """
    from safeport.mappers.sae import SaeConfig, TrainedSae, to_saelens

    handle = store if isinstance(store, Store) else Store(store)
    with handle._open() as st:
        row = safedig_art.bundle_row(st, name)
        saes, steer, entries = {}, {}, []
        for e in row["positions"]:
            arrays, sae_row = safedig_art.load_sae(st, e["sae_key"])
            trained = TrainedSae(
                arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], float(sae_row["c"]),
                SaeConfig.from_dict(sae_row["config"]),
            )  # fmt: skip
            saes[e["position"]] = to_saelens(trained, {"model_name": row["model"], "hook_name": e["position"]})
            refit_values, params = safedig_art.load_params(st, e["params_key"])
            source_values, source = safedig_art.load_params(st, e["params_key_source"])
            steer[e["position"]] = {
                **arrays,  # §4's own weights (x̃ = x / c): steering reads these, bit for bit as from the store
                "c": np.asarray([float(sae_row["c"])]),
                "k": np.asarray([int(sae_row["k"])]),
                "W_refit": safedig_art.load_refit(st, e["refit_key"])[0]["W"],
                "u_bar": refit_values["u_bar"],
                "u_bar_source": source_values["u_bar"],
            }
            entries.append(
                {
                    **e,
                    "harmful": params["harmful"],
                    "tau_lo": params["tau_lo"],
                    "tau_hi": params["tau_hi"],
                    "tau_lo_source": source["tau_lo"],
                    "tau_hi_source": source["tau_hi"],
                    "n_safe": params["n_safe"],
                }
            )
    manifest = {**{k: row[k] for k in ("bundle_key", "name", "model", "holdout")}, "positions": entries}
    manifest["lineage"] = row["lineage"]
    return safedig_art.write_bundle_folder(Path(out) / row["bundle_key"], manifest, saes, steer)


def read_exported_safedig(path: str | os.PathLike[str], refit: bool = True) -> SafeDigBundle:
    """A bundle written by ``safeport export --safedig`` (its folder), for a job without the store."""
    from safeport.eval.safedig import Calibration, SafeDigBundle, SafeDigPosition
    from safeport.mappers.latents import SaeParams
    from safeport.mappers.sae import from_saelens

    manifest, saes, steer = safedig_art.read_bundle_folder(Path(path))
    positions = []
    for e in manifest["positions"]:
        tensors = steer[e["position"]]
        if "W_enc" in tensors:  # safeport's own export: §4's weights as trained
            weights = (tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"])
            sae = SaeParams(*weights, float(tensors["c"][0]), int(tensors["k"][0]))
        else:  # an SAE that only came as a SAELens folder
            trained = from_saelens(*saes[e["position"]])
            sae = SaeParams(
                trained.W_enc, trained.b_enc, trained.W_dec, trained.b_dec, float(trained.c), trained.config.k
            )
        suffix = "" if refit else "_source"
        cal = Calibration(
            float(e[f"tau_lo{suffix}"]), float(e[f"tau_hi{suffix}"]), tensors[f"u_bar{suffix}"], int(e["n_safe"])
        )
        decoder = tensors["W_refit"] if refit else sae.W_dec
        positions.append(
            SafeDigPosition(e["position"], sae, tuple(e["harmful"]), decoder, cal, bool(e["routed"]), bool(e["fixed"]))
        )
    lineage = {**manifest.get("lineage", {}), "bundle_key": manifest["bundle_key"], "refit": refit}
    return SafeDigBundle(manifest["name"], manifest["model"], manifest["holdout"], tuple(positions), lineage)
