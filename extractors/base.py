"""The extractor contract: texts in, pooled float32 rows and token counts out.

Extractors are pure compute: they load a model from a spec, never touch the
store, and never log the texts they encode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from safeport.keys import content_key


class ExtractionError(ValueError):
    """Raised when an extractor cannot produce valid rows (names model and text ids)."""


@dataclass(frozen=True)
class RepresentationSpec:
    """Everything that determines a pooled row; hashed into the cache key.

    ``weights`` is a content fingerprint of a local folder (or the hub revision),
    so a changed checkpoint gets a new key and is re-extracted.
    """

    model_id: str
    family: str
    revision: str = "main"
    weights: str = ""
    layer: str = "final"
    pooling: str = "masked_mean"
    compute_dtype: str = "float32"
    max_tokens: int = 512
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def key(self) -> str:
        """Stable content hash (16 hex chars) of the spec."""
        return content_key(asdict(self), 16)


@dataclass(frozen=True)
class Pooled:
    """Pooled representations of a batch of texts, in input order."""

    values: np.ndarray  # float32 [n, d]
    n_tokens: np.ndarray  # int64 [n], tokens pooled per text
    truncated: np.ndarray  # bool [n], text exceeded max_tokens and was cut


class Extractor(Protocol):
    """A loaded model that pools texts; one implementation per model family."""

    spec: RepresentationSpec

    @property
    def dim(self) -> int: ...

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token count per text after truncation (cheap; used to bucket batches)."""
        ...

    def encode(self, texts: Sequence[str]) -> Pooled:
        """Pool one batch; the result must not depend on the batch's other texts."""
        ...


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1, in float32.

    Works for left or right padding; a row with an all-zero mask yields NaN so
    it is caught downstream instead of silently becoming a zero vector.
    """
    m = mask.to(dtype=torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    return summed / m.sum(dim=1)


def check_finite(values: np.ndarray, model_id: str, text_ids: Sequence[str]) -> None:
    """Refuse NaN/inf rows, naming the model and the offending text ids."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        ids = [text_ids[i] for i in np.flatnonzero(bad)[:10]]
        raise ExtractionError(
            f"model {model_id!r} produced NaN/inf activations for {int(bad.sum())} "
            f"text(s), e.g. text ids {ids}; nothing was stored for this batch. "
            "Try dtype: float32 for this model, or remove those texts."
        )


def length_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int = 0) -> Iterator[np.ndarray]:
    """Yield index arrays grouping texts of similar token length.

    Sorting by length keeps padding small; ``max_batch_tokens`` (if > 0) caps
    the padded size of a batch so long texts run in smaller batches.
    """
    order = np.argsort(lengths, kind="stable")
    start = 0
    n = len(order)
    while start < n:
        stop = min(start + batch_size, n)
        if max_batch_tokens > 0:
            while stop - start > 1 and int(lengths[order[stop - 1]]) * (stop - start) > max_batch_tokens:
                stop -= 1
        yield order[start:stop]
        start = stop


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, model: str) -> None:
    """Refuse a catalog device this machine lacks, before a model is loaded onto it.

    Why: torch fails deep inside ``.to()`` (``AssertionError: Torch not compiled with CUDA``,
    ``RuntimeError`` for MPS) after the weights were read; the catalog is valid on other machines.
    """
    kind, _, index = device.partition(":")
    fix = "set device: auto (a GPU when there is one, else the CPU) or device: cpu on this model in the catalog"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionError(
                f"model {model!r}: device {device!r} is not available: torch sees no CUDA GPU on this machine "
                f"(or this torch build has no CUDA); {fix}"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ExtractionError(
                f"model {model!r}: device {device!r} does not exist: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of them, or {fix}"
            )
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ExtractionError(
            f"model {model!r}: device {device!r} is not available: MPS needs an Apple-silicon Mac and a torch "
            f"build with MPS; {fix}"
        )


def check_max_tokens(config: object, max_tokens: int, model: str) -> None:
    """Refuse ``max_tokens`` beyond the positions the model has (position embeddings index out of range)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < max_tokens:
        raise ExtractionError(
            f"model {model!r}: max_tokens {max_tokens} is more than the {limit} positions the model has "
            f"(max_position_embeddings in its config); set max_tokens: {limit} or less in the catalog"
        )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` computes in bfloat16 on GPU and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(table)}")
    return table[dtype]


@dataclass(frozen=True)
class ModelSource:
    """Where and how to load a model; built from a validated catalog entry.

    Exactly one of ``hub_id`` / ``path`` is set. ``options`` carries
    family-specific settings (e.g. the diffusers pipeline class).
    """

    name: str
    family: str
    hub_id: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    revision: str = "main"
    device: str = "auto"
    dtype: str = "auto"
    max_tokens: int = 512
    weights: str = ""
    options: tuple[tuple[str, str], ...] = ()
    # Not part of the representation key: pickle or safetensors files of one checkpoint hold the same weights.
    allow_pickle: bool = False

    @property
    def location(self) -> str:
        """The folder or hub id ``from_pretrained`` receives."""
        return self.path if self.path is not None else str(self.hub_id)

    def option(self, key: str, default: str = "") -> str:
        return dict(self.options).get(key, default)

    def flag(self, key: str) -> bool:
        """A true/false option (absent: false), or a ValueError naming the model, the option and the value."""
        raw = self.option(key, "false").strip().lower()
        if raw in ("true", "1", "yes", "on"):
            return True
        if raw in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"model {self.name!r}: options.{key} is {raw!r}; set it to true or false")

    def spec(self, layer: str = "final", pooling: str = "masked_mean") -> RepresentationSpec:
        device = resolve_device(self.device)
        dtype = str(resolve_dtype(self.dtype, device)).removeprefix("torch.")
        return RepresentationSpec(
            model_id=self.hub_id or self.name,
            family=self.family,
            revision=self.revision,
            weights=self.weights,
            layer=layer,
            pooling=pooling,
            compute_dtype=dtype,
            max_tokens=self.max_tokens,
            extra=self.options,
        )


# Weight formats that cannot run code when loaded, and torch pickle formats that can.
SAFE_WEIGHTS = (".safetensors", ".gguf")
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_weights(folder: str | Path, allow_pickle: bool = False, name: str = "", gguf_file: str | None = None) -> None:
    """Refuse a local model folder without weights, or with only pickle weights unless ``allow_pickle``.

    Why: a torch pickle (``*.bin``, ``*.pt``...) can execute code while it is unpickled, so a
    downloaded or shared folder must bring safetensors or GGUF weights; loaders are then told
    to read only those (``use_safetensors``). A folder without weights would otherwise fail
    deep inside ``from_pretrained`` (or, worse, silently build random weights).
    """
    root = Path(folder)
    who = f"model {name!r}: " if name else ""
    if not root.is_dir():
        raise ExtractionError(f"{who}model folder {root} does not exist; fix `path:` in the catalog entry")
    if gguf_file is not None:
        if not (root / gguf_file).is_file():
            raise ExtractionError(
                f"{who}gguf_file {gguf_file!r} is not in {root}; set gguf_file to one of "
                f"{sorted(p.name for p in root.glob('*.gguf'))} or fix `path:`"
            )
        return
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SAFE_WEIGHTS + PICKLE_WEIGHTS]
    if any(p.suffix.lower() in SAFE_WEIGHTS for p in files):
        return
    if not files:
        raise ExtractionError(
            f"{who}model folder {root} holds no weight files (*.safetensors, *.gguf); point `path:` at the folder "
            "that holds the model's config.json and weights, or use `hub_id:`"
        )
    if not allow_pickle:
        shown = ", ".join(str(p.relative_to(root)) for p in sorted(files)[:3])
        raise ExtractionError(
            f"{who}model folder {root} holds only pickle weights ({shown}), which can run code when loaded; "
            "convert them to safetensors (e.g. `model.save_pretrained(folder, safe_serialization=True)`), or, "
            "if you trust these files, set `allow_pickle: true` on the catalog entry"
        )


def hub_offline() -> bool:
    """Whether this process may not reach the Hugging Face hub (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def load_failure(source: ModelSource, err: BaseException) -> str:
    """One line for a model that could not be loaded: the catalog model, where it was looked for, why, and the fix."""
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    if source.path is not None:
        return (
            f"model {source.name!r}: the folder {source.path} could not be loaded ({reason}); point `path:` at a "
            "complete model folder (config.json, tokenizer files and *.safetensors weights, as written by "
            "save_pretrained or `hf download HUB_ID --local-dir DIR`), or use `hub_id:`"
        )
    where = f"hub id {source.hub_id!r} (revision {source.revision!r})"
    download = f"`hf download {source.hub_id} --revision {source.revision}`"
    if hub_offline():
        return (
            f"model {source.name!r}: {where} is not in the local Hugging Face cache and this process is offline "
            f"(HF_HUB_OFFLINE=1), so it cannot be downloaded ({reason}). Fix: pre-download it where the hub is "
            f"reachable ({download}, same HF_HOME), unset HF_HUB_OFFLINE to let safeport download it, or set "
            "`path:` to a local copy of the model"
        )
    return (
        f"model {source.name!r}: {where} could not be downloaded from the Hugging Face hub; the process is online "
        f"(HF_HUB_OFFLINE is not set) ({reason}). Fix: check the network (and HF_ENDPOINT), the hub id and revision, "
        f"log in (`hf auth login` or HF_TOKEN) for a gated model, or pre-download it ({download}) and run with "
        "HF_HUB_OFFLINE=1, or set `path:` to a local copy of the model"
    )


# The installed package's folder (safeport/, which holds this stage as safeport/extractors/).
_PACKAGE_DIR = str(Path(__file__).parent.parent) + os.sep


def _raised_by_safeport(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is safeport's own code (its message is already ours)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def model_load_errors(source: ModelSource) -> Iterator[None]:
    """Turn a failed ``from_pretrained`` (hub unreachable, files missing or damaged) into one :class:`ExtractionError`.

    transformers, diffusers and the weight readers report these as OSError, ValueError,
    ``struct.error``... with a long traceback and no word of the catalog entry; the user needs the
    model's name, where it was looked for and the fix (``SAFEPORT_DEBUG=1`` still shows the cause).
    Errors safeport raised itself, and running out of memory, pass through unchanged.
    """
    try:
        yield
    except ExtractionError:
        raise
    except Exception as err:
        if _raised_by_safeport(err) or type(err).__name__ == "OutOfMemoryError":
            raise
        raise ExtractionError(load_failure(source, err)) from err
