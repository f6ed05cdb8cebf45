"""An SAE folder in SAELens's on-disk format: ``cfg.json`` + ``sae_weights.safetensors``.

``sae_lens.SAE.load_from_disk(folder)`` (and every tool that reads SAELens SAEs) loads
what :func:`write_saelens_folder` writes. The folder appears whole or not at all: both
files are written into a temporary sibling folder, fsynced, and the folder is renamed
into place (a rewrite of an existing folder swaps the old one aside first, then removes
it). This module takes and returns plain dicts and arrays; building them from a trained
SAE is ``safeport.mappers.sae.to_saelens`` / ``from_saelens``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from safeport.store.db import StoreError

CFG_NAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
WEIGHTS_NAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
_MAX_CFG_BYTES = 16 << 20  # a cfg.json with curves is KBs; anything this large is not one


def _fsync_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> tuple[bytes, bytes]:
    """Both files' bytes, or a ValueError naming what cannot be stored (before anything touches disk)."""
    from safetensors.numpy import save

    if not isinstance(cfg, Mapping):
        raise ValueError(f"cfg must be a dict (SAELens's cfg.json object), got {type(cfg).__name__}")
    try:
        cfg_bytes = json.dumps(dict(cfg), indent=2, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"cfg cannot be written as JSON ({err}); pass plain str/int/float/bool/list/dict values"
        ) from None
    if not tensors:
        raise ValueError("no tensors to write; a SAELens SAE has at least W_enc, b_enc, W_dec, b_dec")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        if not isinstance(name, str) or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}; SAE weights are float arrays keyed by name")
        arrays[name] = np.ascontiguousarray(arr)
    return cfg_bytes, save(arrays)


def write_saelens_folder(folder: str | Path, cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` into ``folder`` atomically; returns the folder."""
    dest = Path(folder)
    cfg_bytes, weight_bytes = _encode(cfg, tensors)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create {parent} for the SAE folder ({err.strerror}); check the path") from None
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{dest.name}.{tag}.tmp"
    old = parent / f".{dest.name}.{tag}.old"
    try:
        tmp.mkdir()
        _fsync_file(tmp / WEIGHTS_NAME, weight_bytes)
        _fsync_file(tmp / CFG_NAME, cfg_bytes)
        _fsync_dir(tmp)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        _fsync_dir(parent)
    except OSError as err:
        if old.exists() and not dest.exists():
            with contextlib.suppress(OSError):
                os.replace(old, dest)
        raise StoreError(
            f"cannot write the SAE folder {dest} ({err.strerror or err}); check space and permissions"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; the SAE folder is incomplete — write it again") from None
    except OSError as err:
        raise StoreError(f"{path} cannot be read ({err.strerror}); check its permissions") from None
    if len(raw) > _MAX_CFG_BYTES:
        raise StoreError(f"{path}: {len(raw)} bytes, far more than an SAE config holds; write the folder again")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise StoreError(f"{path}: byte {err.start} is not valid UTF-8; write the folder again") from None
    except RecursionError:
        raise StoreError(f"{path}: the JSON is nested too deeply; write the folder again") from None
    except ValueError as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0]
        raise StoreError(f"{path}: not valid JSON ({why}); write the folder again") from None
    if not isinstance(cfg, dict):
        raise StoreError(f"{path}: a JSON {type(cfg).__name__}, not an object of SAE settings; write the folder again")
    return cfg


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; the SAE folder is incomplete — write it again") from None
    except OSError as err:
        raise StoreError(f"{path} cannot be read ({err.strerror}); check its permissions") from None
    try:
        tensors = load(data)
    except Exception as err:  # SafetensorError, a dtype numpy lacks (bfloat16), a truncated header
        raise StoreError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); write it again"
        ) from None
    if not tensors:
        raise StoreError(f"{path} holds no tensors; write the folder again")
    for name, arr in tensors.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise StoreError(f"{path}: tensor {name!r} has dtype {arr.dtype}, not a float type; write it again")
        if not np.isfinite(arr).all():
            raise StoreError(f"{path}: tensor {name!r} holds NaN/inf values; the SAE is damaged — retrain or rewrite")
    return tensors


def _check_shapes(folder: Path, cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """The four SAELens weights, when cfg names d_in/d_sae, must have the shapes SAELens expects."""
    d, m = cfg.get("d_in"), cfg.get("d_sae")
    if not (isinstance(d, int) and isinstance(m, int)):
        raise StoreError(f"{folder / CFG_NAME}: d_in / d_sae missing or not integers ({d!r}, {m!r}); write it again")
    expected = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise StoreError(f"{folder / WEIGHTS_NAME} has no tensor {name!r} (has {sorted(tensors)}); write it again")
        if tensors[name].shape != shape:
            raise StoreError(
                f"{folder / WEIGHTS_NAME}: {name} has shape {tensors[name].shape} but cfg.json says {shape} "
                f"(d_in={d}, d_sae={m}); the files do not belong together — write the folder again"
            )


def read_saelens_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(cfg, tensors)`` of an SAE folder, checked: both files present, parseable, float, shapes agreeing."""
    path = Path(folder)
    if not path.is_dir():
        raise StoreError(f"no SAE folder at {path}; train the SAE (or check the path)")
    cfg = _read_cfg(path / CFG_NAME)
    tensors = _read_tensors(path / WEIGHTS_NAME)
    _check_shapes(path, cfg, tensors)
    return cfg, tensors


__all__ = ["CFG_NAME", "WEIGHTS_NAME", "read_saelens_folder", "write_saelens_folder"]
