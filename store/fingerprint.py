"""Content fingerprints of local model folders (part of the representation key)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_SAMPLE = 4 << 20  # bytes hashed at each end of a large file
_WEIGHT_SUFFIXES = {
    ".safetensors",
    ".gguf",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".json",
    ".model",
    ".txt",
    ".tiktoken",
}


def folder_fingerprint(folder: Path, gguf_file: str | None = None) -> str:
    """Hash of names, sizes and head/tail bytes of a model folder's weight and config files.

    Cheap on multi-GB checkpoints (reads 8 MiB per file) yet changes whenever a
    checkpoint is replaced; mtimes are ignored so a re-install keeps the key.
    """
    h = hashlib.sha256()
    files = (
        [folder / gguf_file]
        if gguf_file
        else sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    )
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder)}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                f.seek(size - _SAMPLE)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]
