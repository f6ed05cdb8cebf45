"""Position-aware steering artefacts: routes, SAEs (with training checkpoints), harmful latents, refits, steering
parameters and the bundles a generation job loads. Stored like maps: tensors as Zarr arrays (each with its
checksum), lineage in DuckDB, every write array-first and record-second.

Tables (schema version 6, :data:`safeport.store.schema.SAFEDIG_DDL`; ``safeport query`` sees them):
``routes`` (one row per candidate position of a routing: R_p, S_p, per-category AUC, rank, routed),
``saes`` (one per trained SAE: quality, config, training curves, lineage), ``sae_latents`` (one row per
latent and category: score, fire rates, in H), ``refits`` (the refitted decoder's λ grid and held-out
FVU), ``steer_params`` (τ_lo, τ_hi, ū for one SAE, H and decoder) and ``safedig_bundles`` (a model's
routed positions with their parameters for one held-out category: what ``safeport.load_safedig`` loads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
import zarr.codecs

from safeport.store.schema import SAFEDIG_DDL as DDL
from safeport.store.store import Store, StoreError, tensor_checksum

TABLES = ("routes", "saes", "sae_latents", "refits", "steer_params", "safedig_bundles")


def ensure_tables(store: Store) -> None:
    if not store.read_only:
        store.ensure_schema("safedig", DDL)


def has_tables(store: Store) -> bool:
    return "saes" in store.tables()


def _write(store: Store, prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write each array under ``prefix/`` (zstd); returns its checksum by name."""
    sums = {}
    for name, value in sorted(arrays.items()):
        value = np.ascontiguousarray(value)
        try:
            store.arrays.create_array(
                f"{prefix}/{name}", data=value, compressors=zarr.codecs.ZstdCodec(level=3), overwrite=True
            )
        except OSError as err:
            raise StoreError(f"cannot write array {prefix}/{name} in {store.location}: {err}") from None
        sums[name] = tensor_checksum(value)
    return sums


def _read(store: Store, prefix: str, sums: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The arrays under ``prefix/`` named in ``sums``, each checked against its checksum."""
    out = {}
    for name, want in sums.items():
        try:
            value = np.asarray(store.arrays[f"{prefix}/{name}"][...])  # type: ignore[index]
        except Exception as err:  # missing or undecodable
            raise StoreError(
                f"array {prefix}/{name} cannot be read ({type(err).__name__}); run `safeport verify --repair`"
            ) from None
        if tensor_checksum(value) != want:
            raise StoreError(f"array {prefix}/{name} fails its checksum: the data on disk is damaged")
        out[name] = value
    return out


def _done(store: Store, table: str, column: str, key: str) -> bool:
    if not has_tables(store):
        return False
    return bool(store.scalar(f"SELECT count(*) FROM {table} WHERE {column} = ?", [key]))


# --- routes ------------------------------------------------------------------------------------------


def route_done(store: Store, route_key: str) -> bool:
    return _done(store, "routes", "route_key", route_key)


def save_routes(store: Store, route_key: str, rows: Sequence[Mapping[str, Any]], inputs: Mapping[str, Any]) -> None:
    ensure_tables(store)
    with store.transaction() as con:
        con.execute("DELETE FROM routes WHERE route_key = ?", [route_key])
        con.executemany(
            "INSERT INTO routes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                (
                    route_key,
                    r["model"],
                    r["model_key"],
                    r["holdout"],
                    r["position"],
                    r["robustness"],
                    r["separability"],
                    json.dumps(r["auc"], sort_keys=True),
                    r["rank"],
                    r["routed"],
                    json.dumps(inputs, sort_keys=True, default=str),
                )
                for r in rows
            ],
        )


def routes(store: Store, route_key: str) -> list[dict[str, Any]]:
    rows = store.sql("SELECT * FROM routes WHERE route_key = ? ORDER BY rank", [route_key]).to_pylist()
    for r in rows:
        r["auc"] = json.loads(r.pop("auc_json"))
    return rows


# --- SAEs and their training checkpoints -------------------------------------------------------------------


def sae_done(store: Store, sae_key: str) -> bool:
    return _done(store, "saes", "sae_key", sae_key)


def save_sae(store: Store, sae_key: str, arrays: Mapping[str, np.ndarray], row: Mapping[str, Any]) -> None:
    """An SAE's weights (W_enc, b_enc, W_dec, b_dec) and its record, array-first."""
    ensure_tables(store)
    sums = _write(store, f"saes/{sae_key}", arrays)
    with store.transaction() as con:
        con.execute("DELETE FROM saes WHERE sae_key = ?", [sae_key])
        con.execute(
            "INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                sae_key,
                row["model"],
                row["model_key"],
                row["position"],
                row["holdout"],
                row["d"],
                row["m"],
                row["k"],
                row["c"],
                row["fvu"],
                row["l0"],
                row["dead"],
                row["n_train"],
                row["n_heldout"],
                json.dumps(row["config"], sort_keys=True),
                json.dumps(row["curves"], sort_keys=True),
                json.dumps(row["lineage"], sort_keys=True, default=str),
                json.dumps(sums, sort_keys=True),
            ],
        )


def load_sae(store: Store, sae_key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(weights, record) of a stored SAE, checksum-verified."""
    rows = store.sql("SELECT * FROM saes WHERE sae_key = ?", [sae_key]).to_pylist() if has_tables(store) else []
    if not rows:
        raise StoreError(f"SAE {sae_key} is not in the store; run `safeport safedig`")
    row = rows[0]
    for name in ("config_json", "curves_json", "lineage_json", "checksums_json"):
        row[name.removesuffix("_json")] = json.loads(row.pop(name))
    return _read(store, f"saes/{sae_key}", row["checksums"]), row


def checkpoint_prefix(sae_key: str) -> str:
    return f"sae_checkpoints/{sae_key}"


def write_checkpoint(arrays_group: zarr.Group, sae_key: str, arrays: Mapping[str, np.ndarray], meta: Any) -> None:
    """A training checkpoint, written so that a kill mid-write never spoils the last complete one.

    Two slots alternate; the group's ``latest`` attribute names the slot last written whole (set
    after its arrays and its own ``meta``), so a reader always finds a complete checkpoint. Works
    on any arrays location (a Dask worker writes its own SAE's checkpoints; no DuckDB involved).
    """
    group = arrays_group.require_group(checkpoint_prefix(sae_key))
    slot = "b" if group.attrs.get("latest") == "a" else "a"
    target = group.require_group(slot)
    for name, value in arrays.items():
        target.create_array(name, data=np.ascontiguousarray(value), overwrite=True)
    target.attrs["meta"] = json.loads(json.dumps(meta, default=str))
    target.attrs["arrays"] = sorted(arrays)
    group.attrs["latest"] = slot


def read_checkpoint(arrays_group: zarr.Group, sae_key: str) -> tuple[dict[str, np.ndarray], Any] | None:
    """The last complete checkpoint of ``sae_key`` (arrays, meta), or None."""
    try:
        group: Any = arrays_group[checkpoint_prefix(sae_key)]
        slot: Any = group[str(group.attrs["latest"])]
        names = list(slot.attrs["arrays"])
        arrays = {n: np.asarray(slot[n][...]) for n in names}
        return arrays, slot.attrs["meta"]
    except Exception:  # none yet, or one a kill left incomplete before its first ``latest``
        return None


def drop_checkpoint(store: Store, sae_key: str) -> None:
    """Remove a finished SAE's checkpoints (its weights are stored)."""
    path = checkpoint_prefix(sae_key)
    if store.location.exists(f"{path}/zarr.json"):
        store.location.remove(path)


# --- harmful latents, refits, steering parameters ------------------------------------------------------------


def latents_done(store: Store, latents_key: str) -> bool:
    return _done(store, "sae_latents", "latents_key", latents_key)


def save_latents(store: Store, latents_key: str, sae_key: str, table: pa.Table) -> None:
    ensure_tables(store)
    with store.transaction() as con:
        con.execute("DELETE FROM sae_latents WHERE latents_key = ?", [latents_key])
        con.register("_latents", table)
        try:
            con.execute(
                "INSERT INTO sae_latents SELECT ?, ?, position, category, latent, score, mu_unsafe, mu_safe, "
                "fire_unsafe, fire_safe, in_h, h_rank FROM _latents",
                [latents_key, sae_key],
            )
        finally:
            con.unregister("_latents")


def harmful(store: Store, latents_key: str, category: str | None = None) -> list[int]:
    """H (``category`` None: the pooled one) in rank order."""
    where = "category IS NULL" if category is None else "category = ?"
    rows = store.fetchall(
        f"SELECT latent FROM sae_latents WHERE latents_key = ? AND in_h AND {where} ORDER BY h_rank",
        [latents_key] + ([] if category is None else [category]),
    )
    return [int(r[0]) for r in rows]


def refit_done(store: Store, refit_key: str) -> bool:
    return _done(store, "refits", "refit_key", refit_key)


def save_refit(store: Store, refit_key: str, arrays: Mapping[str, np.ndarray], row: Mapping[str, Any]) -> None:
    ensure_tables(store)
    sums = _write(store, f"refits/{refit_key}", arrays)
    with store.transaction() as con:
        con.execute("DELETE FROM refits WHERE refit_key = ?", [refit_key])
        con.execute(
            "INSERT INTO refits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                refit_key,
                row["sae_key"],
                row["holdout"],
                row["lam"],
                row["k"],
                row["fvu"],
                row["fvu_source"],
                json.dumps(row["grid"], sort_keys=True),
                row["n_train"],
                row["n_heldout"],
                json.dumps(sums, sort_keys=True),
                json.dumps(row["lineage"], sort_keys=True, default=str),
            ],
        )


def load_refit(store: Store, refit_key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    rows = store.sql("SELECT * FROM refits WHERE refit_key = ?", [refit_key]).to_pylist()
    if not rows:
        raise StoreError(f"refit {refit_key} is not in the store; run `safeport safedig`")
    row = rows[0]
    sums = json.loads(row.pop("checksums_json"))
    row["grid"] = json.loads(row.pop("grid_json"))
    return _read(store, f"refits/{refit_key}", sums), row


def params_done(store: Store, params_key: str) -> bool:
    return _done(store, "steer_params", "params_key", params_key)


def save_params(store: Store, params_key: str, arrays: Mapping[str, np.ndarray], row: Mapping[str, Any]) -> None:
    ensure_tables(store)
    sums = _write(store, f"steer_params/{params_key}", arrays)
    with store.transaction() as con:
        con.execute("DELETE FROM steer_params WHERE params_key = ?", [params_key])
        con.execute(
            "INSERT INTO steer_params VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                params_key,
                row["sae_key"],
                row["latents_key"],
                row["refit_key"],
                json.dumps(row["harmful"]),
                row["tau_lo"],
                row["tau_hi"],
                row["n_safe"],
                json.dumps(sums, sort_keys=True),
            ],
        )


def load_params(store: Store, params_key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    rows = store.sql("SELECT * FROM steer_params WHERE params_key = ?", [params_key]).to_pylist()
    if not rows:
        raise StoreError(f"steering parameters {params_key} are not in the store; run `safeport safedig`")
    row = rows[0]
    sums = json.loads(row.pop("checksums_json"))
    row["harmful"] = json.loads(row.pop("harmful_json"))
    return _read(store, f"steer_params/{params_key}", sums), row


# --- bundles ---------------------------------------------------------------------------------------------------


def save_bundle(store: Store, row: Mapping[str, Any]) -> None:
    ensure_tables(store)
    with store.transaction() as con:
        con.execute("DELETE FROM safedig_bundles WHERE bundle_key = ?", [row["bundle_key"]])
        con.execute(
            "INSERT INTO safedig_bundles VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                row["bundle_key"],
                row["name"],
                row["model"],
                row["model_key"],
                row["holdout"],
                row["route_key"],
                json.dumps(row["positions"], sort_keys=True),
                json.dumps(row["lineage"], sort_keys=True, default=str),
            ],
        )


def bundle_row(store: Store, name: str) -> dict[str, Any]:
    """The newest bundle called ``name`` (e.g. ``safedig:minilm-l6:Sexual``), or its key."""
    if not has_tables(store):
        raise StoreError(f"no SafeDIG bundles in {store.root}; run `safeport safedig` first")
    rows = store.sql(
        "SELECT * FROM safedig_bundles WHERE name = ? OR bundle_key = ? ORDER BY created_at DESC LIMIT 1", [name, name]
    ).to_pylist()
    if not rows:
        names = [r[0] for r in store.fetchall("SELECT DISTINCT name FROM safedig_bundles ORDER BY 1")]
        raise StoreError(f"no SafeDIG bundle named {name!r} in {store.root}; bundles: {names[:8]}")
    row = rows[0]
    row["positions"] = json.loads(row.pop("positions_json"))
    row["lineage"] = json.loads(row.pop("lineage_json"))
    return row


# --- an exported bundle: a folder a generation job loads without the store -------------------------------------

BUNDLE_JSON = "bundle.json"
STEER_FILE = "steer.safetensors"


def write_bundle_folder(
    folder: Path,
    manifest: Mapping[str, Any],
    saes: Mapping[str, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]],
    steer: Mapping[str, Mapping[str, np.ndarray]],
) -> Path:
    """Per position ``sae/`` (SAELens's cfg.json + sae_weights.safetensors) and ``steer.safetensors`` (refitted
    decoder, safe levels), then ``bundle.json`` (positions, H, thresholds, lineage) last: a folder without it is
    incomplete and refused by :func:`read_bundle_folder`."""
    from safetensors.numpy import save_file

    from safeport.store.sae_files import write_saelens_folder

    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUNDLE_JSON).unlink(missing_ok=True)
    for position, (cfg, tensors) in saes.items():
        write_saelens_folder(folder / position / "sae", cfg, tensors)
        save_file({k: np.ascontiguousarray(v) for k, v in steer[position].items()}, str(folder / position / STEER_FILE))
    tmp = folder / f".{BUNDLE_JSON}.tmp"
    tmp.write_text(json.dumps(manifest, sort_keys=True, indent=1, default=str), encoding="utf-8")
    tmp.replace(folder / BUNDLE_JSON)
    return folder


def read_bundle_folder(
    folder: Path,
) -> tuple[dict[str, Any], dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]], dict[str, dict[str, np.ndarray]]]:
    """(manifest, SAELens (cfg, tensors) per position, steering tensors per position) of an exported bundle."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from safeport.store.sae_files import read_saelens_folder

    manifest_path = folder / BUNDLE_JSON
    if not manifest_path.is_file():
        raise StoreError(
            f"{folder} is not a complete SafeDIG bundle (no {BUNDLE_JSON}); export it again with "
            "`safeport export --safedig NAME -o DIR`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        positions = [str(p["position"]) for p in manifest["positions"]]
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{manifest_path} is not a SafeDIG bundle manifest ({err}); export the bundle again") from None
    saes, steer = {}, {}
    for position in positions:
        if "/" in position or position.startswith("."):
            raise StoreError(f"{manifest_path} names position {position!r}, which is not a position name")
        saes[position] = read_saelens_folder(folder / position / "sae")
        try:
            steer[position] = load_file(str(folder / position / STEER_FILE))
        except (OSError, SafetensorError) as err:
            raise StoreError(
                f"{folder / position / STEER_FILE} cannot be read ({err}); export the bundle again"
            ) from None
    return manifest, saes, steer
