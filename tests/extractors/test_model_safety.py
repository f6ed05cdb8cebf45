"""Model folders that could run code or silently load nothing: no weights, pickle-only weights,
custom code in ``auto_map``; and no source file ever enables ``trust_remote_code``."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from safeport.catalog import load_catalog
from safeport.extractors import ModelSource, load_extractor
from safeport.extractors.base import ExtractionError, check_weights
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog
from tests.tiny_models import tiny_bert, tiny_llama
from tests.tiny_pipelines import save_tiny


class _Boom:
    """Unpickling this runs code: it creates ``marker`` (what a hostile checkpoint could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def hostile_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Boom(marker)}))


def source(folder: Path, family: str = "text_encoder", **kw: Any) -> ModelSource:
    return ModelSource(name="m", family=family, path=str(folder), device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def as_pickle_only(src: Path, dst: Path) -> Path:
    """The same model with its weights as a torch pickle (``pytorch_model.bin``) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


# -- folders without weights ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["text_encoder", "causal_lm"])
def test_folder_without_weights_is_refused_naming_folder_and_fix(bert: Path, tmp_path: Path, family: str) -> None:
    empty = tmp_path / "no-weights"
    shutil.copytree(bert, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(ExtractionError, match=rf"{re.escape(str(empty))} holds no weight files .*point `path:`"):
        load_extractor(source(empty, family))
    with pytest.raises(ExtractionError, match=rf"model folder {re.escape(str(tmp_path / 'nope'))} does not exist"):
        load_extractor(source(tmp_path / "nope", family))


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ExtractionError, match=r"gguf_file 'other.gguf' is not in .*\['m\.Q4\.gguf'\]"):
        check_weights(tmp_path, gguf_file="other.gguf")
    check_weights(tmp_path, gguf_file="m.Q4.gguf")


def test_pipeline_text_encoder_without_weights_is_refused(tmp_path: Path) -> None:
    flux = save_tiny("flux", tmp_path / "flux")
    (flux / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(ExtractionError, match=r"text_encoder_2 holds no weight files"):
        load_extractor(source(flux, "flux", max_tokens=16))


# -- pickle-only weights ---------------------------------------------------------------------------
def test_pickle_only_folder_is_refused_before_anything_is_unpickled(bert: Path, tmp_path: Path) -> None:
    folder = as_pickle_only(bert, tmp_path / "pickled")
    marker = tmp_path / "pwned"
    hostile_pickle(folder / "pytorch_model.bin", marker)
    for family in ("text_encoder", "causal_lm"):
        with pytest.raises(
            ExtractionError, match=r"holds only pickle weights \(pytorch_model\.bin\).*allow_pickle: true"
        ):
            load_extractor(source(folder, family))
    assert not marker.exists()


def test_pickle_only_folder_loads_when_the_catalog_allows_it(bert: Path, tmp_path: Path) -> None:
    folder = as_pickle_only(bert, tmp_path / "pickled")
    safe = load_extractor(source(bert))
    allowed = load_extractor(source(folder, allow_pickle=True))
    texts = ["a cat on a red sofa", "two dogs"]
    np.testing.assert_allclose(allowed.encode(texts).values, safe.encode(texts).values, rtol=1e-6)
    # allow_pickle is a loading permission, not part of the representation: same key, no re-extraction.
    assert source(folder, allow_pickle=True).spec().key() == source(folder).spec().key()


def test_catalog_allow_pickle_reaches_the_model_source(tmp_path: Path) -> None:
    catalog = tiny_catalog(tmp_path)
    data = yaml.safe_load(catalog.read_text())
    data["models"]["tgt"]["allow_pickle"] = True
    catalog.write_text(yaml.safe_dump(data), encoding="utf-8")
    resolved = load_catalog(str(catalog))
    assert resolved.model_source("tgt").allow_pickle is True
    assert resolved.model_source("src").allow_pickle is False


def test_safetensors_are_read_and_a_pickle_beside_them_never_is(bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "both"
    shutil.copytree(bert, folder)
    marker = tmp_path / "pwned"
    hostile_pickle(folder / "pytorch_model.bin", marker)
    for family in ("text_encoder", "causal_lm"):
        load_extractor(source(folder, family)).encode(["a watercolor of mountains"])
    assert not marker.exists()


def test_pipeline_pickle_only_text_encoder_is_refused(tmp_path: Path) -> None:
    flux = save_tiny("flux", tmp_path / "flux")
    enc = flux / "text_encoder"
    (enc / "model.safetensors").unlink()
    hostile_pickle(enc / "pytorch_model.bin", tmp_path / "pwned")
    with pytest.raises(ExtractionError, match=r"text_encoder holds only pickle weights"):
        load_extractor(source(flux, "flux", max_tokens=16))
    assert not (tmp_path / "pwned").exists()


# -- custom code -------------------------------------------------------------------------------------
def test_config_asking_for_custom_code_never_runs_it(bert: Path, tmp_path: Path) -> None:
    """A folder whose config and tokenizer config point ``auto_map`` at a module beside them."""
    marker = tmp_path / "pwned"
    for family, make in (("text_encoder", lambda p: shutil.copytree(bert, p)), ("causal_lm", tiny_llama)):
        folder = tmp_path / family
        make(folder)
        (folder / "evil.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
            "from transformers import PreTrainedModel, PretrainedConfig, PreTrainedTokenizerFast\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
            "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n",
            encoding="utf-8",
        )
        custom = {
            "config.json": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
            "tokenizer_config.json": {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
        }
        for name, auto_map in custom.items():
            cfg = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**cfg, "auto_map": auto_map}), encoding="utf-8")
        try:
            ex: Any = load_extractor(source(folder, family))
        except (ValueError, OSError) as err:  # refused: acceptable, as long as nothing ran
            assert "trust_remote_code" in str(err) or "custom code" in str(err), err
        else:
            assert type(ex.model).__module__.startswith("transformers.")  # the built-in class, not evil.py's
            assert ex.encode(["a cat"]).values.shape[0] == 1
        assert not marker.exists(), f"{family}: the folder's custom code was executed"


_SOURCE_DIRS = ("safeport", "store", "flows", "extractors", "mappers", "eval", "bench", "scripts")
_UNSAFE = {
    "trust_remote_code enabled": re.compile(r"""trust_remote_code["']?\s*[=:]\s*(True|1|["']?true)"""),
    "unsafe YAML loader": re.compile(
        r"yaml\.(unsafe_load|full_load|load_all)\s*\(|Loader\s*=\s*yaml\.(Full|Unsafe)?Loader\b"
    ),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
}


def test_no_source_file_enables_remote_code_or_unsafe_loading() -> None:
    files = [p for d in _SOURCE_DIRS for p in (REPO / d).rglob("*") if p.suffix in {".py", ".sh", ".yaml", ".cfg"}]
    files += [REPO / "catalog.yaml", REPO / "pyproject.toml"]
    assert len(files) > 20
    found = [
        f"{p.relative_to(REPO)}:{n}: {what}"
        for p in files
        if p.is_file()
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        for what, pattern in _UNSAFE.items()
        if pattern.search(line)
    ]
    assert not found, found
    # Every loader says so explicitly, so a transformers default change cannot turn it on.
    for module in ("causal_lm", "text_encoder", "pipeline_encoder"):
        text = (REPO / "extractors" / f"{module}.py").read_text(encoding="utf-8")
        assert "trust_remote_code" in text and "use_safetensors" in text, module
