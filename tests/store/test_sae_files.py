"""store.sae_files: SAELens's two-file SAE folder, written atomically and read back with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from safeport.store.db import StoreError
from safeport.store.sae_files import CFG_NAME, WEIGHTS_NAME, read_saelens_folder, write_saelens_folder

D, M = 6, 10


def _sae(seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cfg = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": M,
        "k": 2,
        "dtype": "float32",
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "te.3.txt", "safeport": {"c": 1.25}},
    }
    tensors = {
        "W_enc": rng.standard_normal((D, M)).astype(np.float32),
        "b_enc": rng.standard_normal(M).astype(np.float32),
        "W_dec": rng.standard_normal((M, D)).astype(np.float32),
        "b_dec": rng.standard_normal(D).astype(np.float32),
    }
    return cfg, tensors


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_is_exact_and_loadable_by_the_safetensors_torch_reader(tmp_path: Path) -> None:
    cfg, tensors = _sae()
    folder = write_saelens_folder(tmp_path / "saes" / "abc", cfg, tensors)
    assert sorted(p.name for p in folder.iterdir()) == [CFG_NAME, WEIGHTS_NAME]
    got_cfg, got = read_saelens_folder(folder)
    assert got_cfg == cfg
    assert set(got) == set(tensors)
    for name, arr in tensors.items():
        assert got[name].dtype == np.float32
        assert np.array_equal(got[name], arr)
    # SAELens's loader reads the weights with safe_open(framework="pt") and the cfg with json.load.
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert np.array_equal(f.get_tensor("W_dec").numpy(), tensors["W_dec"])
    assert json.loads((folder / CFG_NAME).read_text())["metadata"]["hook_name"] == "te.3.txt"
    assert _leftovers(folder.parent) == []


def test_rewrite_replaces_the_folder_whole(tmp_path: Path) -> None:
    cfg, tensors = _sae(0)
    folder = write_saelens_folder(tmp_path / "sae", cfg, tensors)
    (folder / "stale.txt").write_text("from the old folder")
    cfg2, tensors2 = _sae(1)
    write_saelens_folder(folder, cfg2, tensors2)
    assert sorted(p.name for p in folder.iterdir()) == [CFG_NAME, WEIGHTS_NAME]
    _, got = read_saelens_folder(folder)
    assert np.array_equal(got["W_enc"], tensors2["W_enc"])
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("cfg_change", "tensor_change", "message"),
    [
        ({"bad": {1, 2}}, {}, "cfg cannot be written as JSON"),
        ({"nan": float("nan")}, {}, "cfg cannot be written as JSON"),
        ({}, {"W_enc": np.zeros((D, M), dtype=np.int32)}, "tensor 'W_enc' has dtype int32"),
    ],
)
def test_unwritable_input_is_a_value_error_and_writes_nothing(
    tmp_path: Path, cfg_change: dict, tensor_change: dict, message: str
) -> None:
    cfg, tensors = _sae()
    with pytest.raises(ValueError, match=message):
        write_saelens_folder(tmp_path / "sae", {**cfg, **cfg_change}, {**tensors, **tensor_change})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, tensors = _sae(0)
    folder = write_saelens_folder(tmp_path / "sae", cfg, tensors)
    import safeport.store.sae_files as sae_files

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sae_files, "_fsync_file", no_space)
    with pytest.raises(StoreError, match=r"cannot write the SAE folder .*No space left on device"):
        write_saelens_folder(folder, *_sae(1))
    _, got = read_saelens_folder(folder)
    assert np.array_equal(got["W_enc"], tensors["W_enc"])
    assert _leftovers(tmp_path) == []


def _garble(folder: Path, name: str, data: bytes | None) -> None:
    if data is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(data)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (CFG_NAME, None, r"cfg\.json is missing"),
        (WEIGHTS_NAME, None, r"sae_weights\.safetensors is missing"),
        (CFG_NAME, b'{"d_in": 6,', r"not valid JSON"),
        (CFG_NAME, b"[1, 2]", r"a JSON list, not an object"),
        (CFG_NAME, b'{"d_sae": 10}', r"d_in / d_sae missing"),
        (CFG_NAME, b"\xff\xfe", r"not valid UTF-8"),
        (WEIGHTS_NAME, b"\x08\x00\x00\x00\x00\x00\x00\x00{}", r"not a readable safetensors file"),
    ],
)
def test_missing_or_garbled_files_are_store_errors(tmp_path: Path, name: str, data: bytes | None, message: str) -> None:
    folder = write_saelens_folder(tmp_path / "sae", *_sae())
    _garble(folder, name, data)
    with pytest.raises(StoreError, match=message):
        read_saelens_folder(folder)


def test_truncated_weights_are_a_store_error(tmp_path: Path) -> None:
    folder = write_saelens_folder(tmp_path / "sae", *_sae())
    raw = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreError, match="not a readable safetensors file"):
        read_saelens_folder(folder)


@pytest.mark.parametrize(
    ("tensors_change", "message"),
    [
        ({"W_dec": np.zeros((M, D + 1), dtype=np.float32)}, r"W_dec has shape \(10, 7\) but cfg\.json says \(10, 6\)"),
        ({"b_enc": None}, r"has no tensor 'b_enc'"),
        ({"b_dec": np.full(D, np.nan, dtype=np.float32)}, r"tensor 'b_dec' holds NaN/inf"),
    ],
)
def test_weights_that_do_not_fit_the_cfg_are_store_errors(tmp_path: Path, tensors_change: dict, message: str) -> None:
    cfg, tensors = _sae()
    tensors = {**tensors, **tensors_change}
    folder = write_saelens_folder(tmp_path / "sae", cfg, {k: v for k, v in tensors.items() if v is not None})
    with pytest.raises(StoreError, match=message):
        read_saelens_folder(folder)


def test_a_missing_folder_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no SAE folder at"):
        read_saelens_folder(tmp_path / "nowhere")
