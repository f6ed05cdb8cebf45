"""Dequantised GGUF checkpoints, cached as safetensors: a model loads in a second, not ~30 s.

transformers converts a GGUF file on every load: it parses the metadata twice, maps every
tensor name, dequantises the weights and rebuilds the tokenizer (~28 s for SmolLM2-135M on
2 CPU cores, as long as encoding the default run's prompt set). The conversion is
deterministic, so it is done once and saved as ``config.json`` + ``model.safetensors`` +
tokenizer files under a key made of the GGUF file's full sha256, the compute dtype and the
transformers and gguf versions. Rows from a cached load equal those of a direct load bit for
bit (``tests/extractors/test_gguf_cache.py``).

The cache is written to a temporary folder and renamed into place, so a crash leaves no
half-written entry that a later load could mistake for a complete one; an unreadable entry
is converted again. It lives in ``$SAFEPORT_CACHE_DIR/gguf`` (default
``~/.cache/safeport/gguf``; about 4 bytes per parameter in float32) and
``SAFEPORT_GGUF_CACHE=off`` turns it off. Only local GGUF files are cached.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("safeport.extract")

_OFF = {"0", "off", "false", "no"}


def cache_root() -> Path | None:
    """Where converted checkpoints go, or None when ``SAFEPORT_GGUF_CACHE`` turns the cache off."""
    if os.environ.get("SAFEPORT_GGUF_CACHE", "").strip().lower() in _OFF:
        return None
    base = os.environ.get("SAFEPORT_CACHE_DIR")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safeport")
    return Path(base) / "gguf"


def cache_key(gguf_path: Path, dtype: torch.dtype) -> str:
    """Full content hash of the GGUF file plus everything else that shapes the converted weights."""
    import transformers

    h = hashlib.sha256()
    with gguf_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    h.update(f"|{dtype}|transformers {transformers.__version__}|gguf {importlib.metadata.version('gguf')}".encode())
    return h.hexdigest()[:24]


def load_gguf(folder: str, gguf_file: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(base model, tokenizer)`` of a local GGUF checkpoint, from the cache when it holds it."""
    root = cache_root()
    if root is None:
        return _convert(folder, gguf_file, dtype)
    entry = root / cache_key(Path(folder) / gguf_file, dtype)
    if entry.is_dir():
        try:
            return _load_converted(entry, dtype)
        except Exception as err:  # any unreadable entry (truncated safetensors, bad JSON): rebuild it
            log.warning("converted GGUF cache %s is unreadable (%s); converting again", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
    model, tokenizer = _convert(folder, gguf_file, dtype)
    try:
        _save(model, tokenizer, entry)
    except OSError as err:  # a full or read-only disk costs only the speed-up
        log.warning(
            "could not cache the converted %s in %s (%s); it will be converted on every load", gguf_file, root, err
        )
    return model, tokenizer


def _convert(folder: str, gguf_file: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModel.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    return model, tokenizer


def _load_converted(entry: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(entry))
    model = AutoModel.from_pretrained(str(entry), dtype=dtype, use_safetensors=True, trust_remote_code=False)
    return model, tokenizer


def _save(model: Any, tokenizer: Any, entry: Path) -> None:
    """Write the entry beside its final name, then rename: readers see all of it or none."""
    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved weights are plain tensors, not GGUF blocks
        config.save_pretrained(str(tmp))
        tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():  # another process finished first otherwise: keep its entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
