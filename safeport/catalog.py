"""catalog.yaml: the validated description of models, datasets and run profiles.

Validation happens here, once, at the edge: every error names the field, the
offending value and the fix, and is raised as :class:`CatalogError` (never a
traceback from deep inside the pipeline).
"""

from __future__ import annotations

import codecs
import importlib.util
import math
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from safeport.extractors import FAMILIES
from safeport.extractors.base import ModelSource
from safeport.store import location, readers

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalog.yaml"
FORMATS = ("csv", "parquet", "jsonl", "text")
PAIR_SPLITS = ("train", "test")  # what fit reads of a pairs dataset: vectors from train, the probe tested on test
_SUFFIX_FORMAT = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
}


class CatalogError(ValueError):
    """A catalog problem the user can fix; the message says what and how."""


_DEVICE = re.compile(r"(auto|cpu|cuda|mps|cuda:[0-9]+)", re.ASCII)
# Model and dataset names become parts of file and array names (reports, outputs): one safe path
# component. A leading "_" is reserved for internal datasets (the concept string's ``__concept__``).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
MAX_SHARD_ROWS = 65536  # rows per shard chunk: 65,536 x 4,096 dims x 4 bytes = 1 GiB of memory per write
MAX_ALPHA = 100.0  # steering strengths are small multiples of the vector (the paper sweeps 0-3)
_MAX_COUNT = 2**31 - 1  # row counts and row numbers are INTEGER (int32) columns of the store
_MAX_SEED = 2**32 - 1  # numpy and torch seeds
_MAX_SETTING_INT = 2**53  # an option or generation setting is a size or count, never larger
# Codecs that decode bytes to text but are no file encodings (domain names), refused like rot13.
_NOT_FILE_ENCODINGS = ("idna", "punycode")


def _name(kind: str, v: str) -> str:
    if v.startswith("_"):
        raise ValueError(
            f"{kind} name {_shown(v)} is reserved: names starting with '_' are internal datasets "
            "(such as __concept__); rename it"
        )
    if not _NAME.fullmatch(v) or v in (".", ".."):
        raise ValueError(
            f"{kind} name {_shown(v)} is not allowed: names become parts of file names; use 1-64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (e.g. org-model-7b)"
        )
    return v


def _model_name(v: str) -> str:
    return _name("model", v)


def _dataset_name(v: str) -> str:
    return _name("dataset", v)


def _settings(values: dict[str, str | int | float | bool], what: str) -> dict[str, str | int | float | bool]:
    for key, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_SETTING_INT:
            raise ValueError(f"{what} {key!r}: an integer of {value.bit_length()} bits is not a setting; fix it")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what} {key!r} = {value}; use a finite number")
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only, no tags that build objects) that refuses repeated keys.

    Plain YAML keeps the last of two equal keys, so a second ``default:`` profile would
    silently replace the first; here it is an error with its line.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice; keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        """An int, or for one beyond Python's int-string limit (4300 digits) a stand-in that names its line.

        Validation then refuses the stand-in naming its key (no field takes it), instead of the
        bare ``ValueError: Exceeds the limit`` that ``int()`` raises with no field or line.
        """
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(ch.isdigit() for ch in str(node.value))
            return _HugeInt(f"<an integer of {digits} digits at line {node.start_mark.line + 1}>")


class _HugeInt:
    """What the catalog loader puts where YAML holds an integer Python will not parse."""

    def __init__(self, shown: str) -> None:
        self.shown = shown

    def __repr__(self) -> str:
        return self.shown


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _finite(values: tuple[float, ...] | list[float], what: str) -> None:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} {list(values)} contains {bad[0]}; use finite numbers")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    role: Literal["source", "target"]
    family: str
    hub_id: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    revision: str = "main"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    batch_size: int = Field(32, ge=1, le=65536)
    max_tokens: int = Field(256, ge=1, le=1_000_000)
    max_batch_tokens: int = Field(0, ge=0, le=_MAX_COUNT)
    allow_pickle: bool = False
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Default diffusers __call__ arguments for generation (height, num_inference_steps, ...). Not part of
    # the representation key: changing them never re-extracts. CLI --set / --steps override them.
    generation: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Positions whose token activations position-aware steering caches (METHOD-SAFEDIG §1): names such as
    # te.3.txt, double.9.img, single.19.img, or a candidate set: paper | all | blocks | text_encoder.
    positions: list[str] | str | None = None
    description: str = ""

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"unknown family {_shown(v)}; use one of {', '.join(sorted(FAMILIES))}")
        return v

    @field_validator("options", "generation")
    @classmethod
    def _bounded_settings(
        cls, v: dict[str, str | int | float | bool], info: ValidationInfo
    ) -> dict[str, str | int | float | bool]:
        return _settings(v, str(info.field_name))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"device {_shown(v)} is not understood; use auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _one_location(self) -> ModelEntry:
        if (self.hub_id is None) == (self.path is None):
            raise ValueError("give exactly one of hub_id (e.g. meta-llama/Llama-3.1-8B) or path (a local folder)")
        return self


class SourceEntry(_Strict):
    path: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    format: Literal["csv", "parquet", "jsonl", "text"] | None = None
    column: str | None = None
    clean: Literal["none", "wikitext"] = "none"
    max_count: int | None = Field(None, ge=1, le=_MAX_COUNT)
    split: str | None = None
    encoding: str = "utf-8"

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            info = codecs.lookup(v)
        except LookupError:
            raise ValueError(f"encoding {_shown(v)} is unknown; use e.g. utf-8, latin-1 or cp1252") from None
        if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_FILE_ENCODINGS:
            raise ValueError(
                f"encoding {_shown(v)} is not a text encoding (it transforms bytes or names, it does not decode "
                "a file); use e.g. utf-8, latin-1 or cp1252"
            )
        return v

    @model_validator(mode="after")
    def _one_origin(self) -> SourceEntry:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local file) or hub (a hub dataset id)")
        self.resolved_format()  # an unknown suffix is reported here, with this source's key path
        return self

    def resolved_format(self) -> str:
        if self.format is not None:
            return self.format
        if self.hub is not None:
            return "hub"
        suffix = Path(str(self.path)).suffix.lower()
        if suffix not in _SUFFIX_FORMAT:
            raise CatalogError(
                f"cannot tell the format of {self.path!r} from its suffix; add format: one of {', '.join(FORMATS)}"
            )
        return _SUFFIX_FORMAT[suffix]


class DatasetEntry(_Strict):
    kind: Literal["anchors", "pairs", "prompts"]
    sources: list[SourceEntry] = Field(min_length=1)
    max_count: int | None = Field(None, ge=1, le=_MAX_COUNT)
    seed: int = Field(42, ge=0, le=_MAX_SEED)
    dedup: bool = True
    safe_column: str | None = None
    unsafe_column: str | None = None
    category_column: str | None = None
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    description: str = ""

    @model_validator(mode="after")
    def _kind_columns(self) -> DatasetEntry:
        if self.kind == "pairs" and (self.safe_column is None or self.unsafe_column is None):
            raise ValueError(
                "a pairs dataset needs safe_column and unsafe_column (the columns of the two texts); add both"
            )
        if self.kind == "pairs":
            if self.safe_column == self.unsafe_column:
                raise ValueError(
                    f"safe_column and unsafe_column are both {_shown(self.safe_column)}; a pair needs two "
                    "different columns (the safe text and the unsafe text)"
                )
            if self.category_column in (self.safe_column, self.unsafe_column):
                raise ValueError(
                    f"category_column {_shown(self.category_column)} is also a text column; name the column "
                    "of the category labels, or remove category_column"
                )
            for i, src in enumerate(self.sources):
                if src.resolved_format() == "text":
                    raise ValueError(
                        f"source {src.path or src.hub!r} is a text file (one column), but a pairs dataset "
                        "needs two; use a csv, parquet or jsonl file with safe_column and unsafe_column"
                    )
                if src.split not in PAIR_SPLITS:
                    got = "has no split" if src.split is None else f"has split: {_shown(src.split)}"
                    raise ValueError(
                        f"sources.{i} ({src.path or src.hub!r}) {got}; every pairs source needs split: train or "
                        "split: test (fit trains the vectors on train pairs and tests the probe on test pairs)"
                    )
            for split in PAIR_SPLITS:
                if not any(src.split == split for src in self.sources):
                    raise ValueError(
                        f"no source with split: {split}; fit needs train and test pairs: add one "
                        f"(a source with split: {split})"
                    )
        else:
            for src in self.sources:
                if src.column is None and src.resolved_format() != "text":
                    raise ValueError(f"source {src.path or src.hub!r} needs column: (the text column)")
        _finite(self.splits, "splits")
        if abs(sum(self.splits) - 1.0) > 1e-9 or min(self.splits) < 0:
            raise ValueError(f"splits {list(self.splits)} must be three non-negative fractions summing to 1")
        return self


class SaeEntry(_Strict):
    """Sparse autoencoder sizes and training (METHOD-SAFEDIG §4); 0 means the method's default."""

    expansion: int = Field(4, ge=1, le=64)  # m = expansion · d (§4: 8 on GPU, 4 on tiny/CPU)
    k: int = Field(8, ge=1, le=1024)  # active latents per token (§4: 32 on GPU, 8 on tiny/CPU)
    epochs: int = Field(1, ge=1, le=1000)  # passes over the training rows
    batch_size: int = Field(4096, ge=1, le=1_048_576)  # tokens per step
    max_rows: int | None = Field(None, ge=1, le=_MAX_COUNT)  # at most this many training rows (seeded sample)


class SafeDigEntry(_Strict):
    """Position-aware sparse feature steering (METHOD-SAFEDIG): the token cache, routing, SAEs and steering.

    The capture settings (everything down to ``shard_texts``, with each model's generation settings)
    are part of every token unit's key: changing one is a new unit and nothing else is touched.
    """

    models: list[str] = Field(min_length=1)  # targets whose positions are cached: text encoders, Flux or SD3
    positions: dict[str, list[str] | str] = Field(default_factory=dict)  # per model; default: its positions:, else all
    datasets: list[str] | None = None  # default: the profile's anchors and pairs
    steps: list[int] | None = None  # captured denoising steps; default: 4 evenly over the first 60 % (§2)
    image_tokens: int | None = Field(64, ge=1, le=_MAX_COUNT)  # per (prompt, step), seeded; null: all
    text_tokens: int | None = Field(None, ge=1, le=_MAX_COUNT)  # per text and position, seeded; null: all real tokens
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = Field(42, ge=0, le=_MAX_SEED)  # the generation seed of every prompt (both sides of a pair)
    shard_texts: int = Field(64, ge=1, le=MAX_SHARD_ROWS)  # texts per shard: the unit of work, commit and resume
    holdout: str = "Sexual"  # the held-out risk category, or "all" (leave each SafeSteer category out in turn)
    route_k: int = Field(3, ge=1, le=64)  # positions routed (§3)
    harmful_latents: int = Field(16, ge=1, le=4096)  # |H| (§5: 16 on GPU, 4 on tiny)
    sae: SaeEntry = Field(default_factory=lambda: SaeEntry.model_validate({}))
    strengths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0], min_length=1)
    # Benign captions the leave-one-category-out headline measures damage on (METHOD-SAFEDIG §9); none: skip it.
    eval_benign: str | None = None

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(f"steps {v} must be distinct step indices >= 0 (or omit it for the default)")
        return v

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: list[float]) -> list[float]:
        _finite(v, "strengths")
        bad = [s for s in v if s < 0 or s > MAX_ALPHA]
        if bad:
            raise ValueError(f"strength {bad[0]:g} is not between 0 and {MAX_ALPHA:g}; SafeDIG strengths s are >= 0")
        return v


class ProfileEntry(_Strict):
    models: list[str] = Field(min_length=2)
    anchors: str
    pairs: str
    prompts: list[str] = Field(default_factory=list)
    store: str = "safeport-store"
    # Where the store's Zarr arrays live: omitted = inside the store folder; or a path or any
    # fsspec URL (s3://bucket/prefix, gs://…, memory://…). DuckDB stays in the store folder.
    arrays: str | None = None
    # Where generated PNGs go (eval): omitted = `outputs/` in the store folder; or a path or fsspec
    # URL that Dask workers on other machines reach (a shared mount, s3://bucket/prefix/outputs).
    outputs: str | None = None
    mappers: tuple[Literal["procrustes", "ridge", "mlp"], ...] = Field(("procrustes", "ridge", "mlp"), min_length=1)
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0, 3.0], min_length=1)
    shard_rows: int = Field(256, ge=1, le=MAX_SHARD_ROWS)
    seed: int = Field(42, ge=0, le=_MAX_SEED)
    safedig: SafeDigEntry | None = None  # position-aware sparse feature steering (second method), if any
    description: str = ""

    @field_validator("arrays", "outputs")
    @classmethod
    def _location(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        what = info.field_name
        if not v.strip():
            raise ValueError(f"{what} is empty; remove it ({what} then live in the store folder) or give a path or URL")
        proto = location.protocol(v)
        if proto is not None and proto not in fsspec.available_protocols():
            example = "arrays.zarr" if what == "arrays" else "outputs"
            raise ValueError(
                f"{what} {v!r}: protocol {proto!r} is not known to fsspec; use a path or a URL such as "
                f"s3://bucket/prefix/{example}, gs://…, memory://…"
            )
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        _finite(v, "alphas")
        big = [a for a in v if abs(a) > MAX_ALPHA]
        if big:
            raise ValueError(
                f"alpha {big[0]:g} is not between -{MAX_ALPHA:g} and {MAX_ALPHA:g}; steering strengths are small "
                "multiples of the vector (the default sweep is 0 to 3)"
            )
        return v


ModelName = Annotated[str, AfterValidator(_model_name)]
DatasetName = Annotated[str, AfterValidator(_dataset_name)]


class Catalog(_Strict):
    version: Literal[1] = 1
    models: dict[ModelName, ModelEntry]
    datasets: dict[DatasetName, DatasetEntry]
    profiles: dict[str, ProfileEntry]


class Resolved(BaseModel):
    """One profile of a catalog, cross-checked, with paths made absolute."""

    model_config = ConfigDict(frozen=True)

    path: Path
    name: str
    profile: ProfileEntry
    models: dict[str, ModelEntry]
    datasets: dict[str, DatasetEntry]

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def store_path(self) -> Path:
        return resolve_path(self.profile.store, self.root)

    @property
    def arrays_url(self) -> str | None:
        """The profile's arrays location made absolute (None: wherever the store keeps them)."""
        return None if self.profile.arrays is None else location.resolve(self.profile.arrays, self.root)

    @property
    def outputs_url(self) -> str | None:
        """The profile's outputs location made absolute (None: wherever the store keeps them)."""
        return None if self.profile.outputs is None else location.resolve(self.profile.outputs, self.root)

    def sources_of(self, role: str) -> list[str]:
        return [m for m in self.profile.models if self.models[m].role == role]

    def model_source(self, name: str, weights: str = "") -> ModelSource:
        m = self.models[name]
        return ModelSource(
            name=name,
            family=m.family,
            hub_id=m.hub_id,
            path=str(resolve_path(m.path, self.root)) if m.path is not None else None,
            gguf_file=m.gguf_file,
            revision=m.revision,
            device=m.device,
            dtype=m.dtype,
            max_tokens=m.max_tokens,
            weights=weights,
            options=tuple(sorted((k, str(v)) for k, v in m.options.items())),
            allow_pickle=m.allow_pickle,
        )

    def source_path(self, src: SourceEntry) -> Path:
        """The source's path made absolute (for a glob pattern: the pattern, made absolute)."""
        return resolve_path(str(src.path), self.root)

    def source_files(self, src: SourceEntry) -> list[Path]:
        """The files a local source reads, in order: its file, its pattern's matches or its folder's files.

        Raises :class:`~safeport.store.readers.DataFileError` when nothing matches.
        """
        value = str(src.path)
        if readers.is_pattern(value) and not value.startswith("pkg://"):
            return readers.glob_files(self.root, value)
        return readers.source_files(self.source_path(src), src.resolved_format())


def resolve_path(value: str, root: Path) -> Path:
    """``pkg://module/sub`` -> folder inside an installed package; relative -> catalog folder."""
    if "\x00" in value:
        raise CatalogError(f"path {value!r} contains a NUL character; fix the path")
    if value.startswith("pkg://"):
        module, _, sub = value[len("pkg://") :].partition("/")
        try:
            spec = importlib.util.find_spec(module) if module else None
        except (ImportError, ValueError):  # "a..b", ".rel", a parent that is not a package
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise CatalogError(
                f"path {value!r}: package {module!r} is not installed; install it (README, 'Install') "
                "or point path: at a local model folder"
            )
        return Path(next(iter(spec.submodule_search_locations))) / sub
    try:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (root / p).resolve()
    except (RuntimeError, OSError) as err:  # "~user" with no such user, a symlink loop
        raise CatalogError(f"path {value!r} cannot be resolved ({err}); use a plain absolute path") from None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = e["loc"][:-1] if e["loc"] and e["loc"][-1] == "[key]" else e["loc"]  # a bad name: its own key path
        where = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  - {where} = {_shown(e.get('input'))}: unknown key; remove it or check its spelling "
                "(see README, 'Catalog')"
            )
        elif e["type"] == "missing" and e["loc"] and isinstance(e["loc"][-1], int):
            parent = ".".join(str(x) for x in e["loc"][:-1])
            lines.append(
                f"  - {parent} = {_shown(e.get('input'))}: item {e['loc'][-1]} is missing; give every item "
                "(see README, 'Catalog')"
            )
        elif e["type"] == "missing":
            lines.append(f"  - {where}: required key is missing; add it")
        else:
            lines.append(f"  - {where} = {_shown(e.get('input'))}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1000:  # beyond Python's int-string limit, and too long to show anyway
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _ShortRepr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 4, 6, 200, 200


def _shown(value: Any) -> str:
    """A short repr of an offending value; bounded work even for a YAML alias bomb (9**9 items)."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def parse_catalog(data: Any, source: str = "catalog") -> Catalog:
    """Validate already-parsed YAML; raises :class:`CatalogError` listing every problem."""
    if not isinstance(data, dict):
        raise CatalogError(
            f"{source}: the catalog is a {type(data).__name__} ({_shown(data)}), not a mapping; "
            "write it as keys version:, models:, datasets:, profiles: (see README, 'Catalog')"
        )
    try:
        return Catalog.model_validate(data)
    except ValidationError as err:
        raise CatalogError(_format_errors(err, source)) from None


def load_catalog(path: Path | str | None = None, profile: str = "default") -> Resolved:
    """Read, validate and resolve one profile; raises :class:`CatalogError` on any problem."""
    path = Path(path) if path is not None else DEFAULT_CATALOG
    if not path.is_file():
        raise CatalogError(
            f"catalog {str(path)!r} does not exist or is not a file; pass --catalog PATH or omit it for the default"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CatalogError(f"catalog {str(path)!r} cannot be read ({err.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CatalogError(
            f"{path}: byte {err.start} (line {line}) is not valid UTF-8; save the catalog as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as err:
        raise CatalogError(f"{path}: not valid YAML; fix the syntax:\n{err}") from None
    except RecursionError:
        raise CatalogError(f"{path}: the YAML is nested too deeply; flatten it") from None
    cat = parse_catalog(data, str(path))
    return resolve_profile(cat, path.resolve(), profile)


def resolve_profile(cat: Catalog, path: Path, profile: str) -> Resolved:
    """Cross-check one profile (names, roles, kinds) and that its local files exist."""
    if profile not in cat.profiles:
        raise CatalogError(
            f"profile {profile!r} is not in {path}; use one of {', '.join(cat.profiles) or '(none)'} "
            "with --profile, or add it under profiles:"
        )
    prof = cat.profiles[profile]
    where = f"{path}: profiles.{profile}"
    for m in prof.models:
        if m not in cat.models:
            raise CatalogError(f"{where}.models: {m!r} is not a model of the catalog; add it under models:")
    roles = {cat.models[m].role for m in prof.models}
    if roles != {"source", "target"}:
        have = {m: cat.models[m].role for m in prof.models}
        raise CatalogError(
            f"{where}.models = {prof.models}: roles {have}; add at least one role: source and one role: target model"
        )
    wanted = {"anchors": [prof.anchors], "pairs": [prof.pairs], "prompts": prof.prompts}
    for kind, names in wanted.items():
        for d in names:
            if d not in cat.datasets:
                raise CatalogError(f"{where}.{kind}: dataset {d!r} is not in the catalog; add it under datasets:")
            if cat.datasets[d].kind != kind:
                raise CatalogError(
                    f"{where}.{kind}: dataset {d!r} has kind {cat.datasets[d].kind!r}; name a dataset of kind {kind!r}"
                )
    names = [prof.anchors, prof.pairs, *prof.prompts]
    if prof.safedig is not None:
        for m in prof.safedig.models:
            if m not in prof.models:
                raise CatalogError(
                    f"{where}.safedig.models: {m!r} is not a model of the profile; add it to the profile's models:"
                )
            family = cat.models[m].family
            if family not in ("text_encoder", "flux", "sd3"):
                raise CatalogError(
                    f"{where}.safedig.models: {m!r} has family {family!r}; token positions are cached for "
                    "text_encoder, flux and sd3 models"
                )
        for m in prof.safedig.positions:
            if m not in prof.safedig.models:
                raise CatalogError(f"{where}.safedig.positions: {m!r} is not one of safedig.models; add it there")
        for d in [*(prof.safedig.datasets or []), *([prof.safedig.eval_benign] if prof.safedig.eval_benign else [])]:
            if d not in cat.datasets:
                raise CatalogError(f"{where}.safedig.datasets: dataset {d!r} is not in the catalog; add it")
            if d not in names:
                names.append(d)
    resolved = Resolved(
        path=path,
        name=profile,
        profile=prof,
        models={m: cat.models[m] for m in prof.models},
        datasets={d: cat.datasets[d] for d in names},
    )
    for model_name, mentry in resolved.models.items():
        if mentry.path is not None:
            folder = resolve_path(mentry.path, resolved.root)
            if not folder.exists():
                raise CatalogError(
                    f"{path}: models.{model_name}.path = {mentry.path!r}: folder {str(folder)!r} "
                    "does not exist; fix the path or use hub_id:"
                )
            if mentry.gguf_file and not (folder / mentry.gguf_file).is_file():
                raise CatalogError(
                    f"{path}: models.{model_name}.gguf_file = {mentry.gguf_file!r}: not found in {folder}; "
                    "fix the file name or put the file there"
                )
    for ds_name, dentry in resolved.datasets.items():
        for i, src in enumerate(dentry.sources):
            if src.path is None:
                continue
            if not readers.is_pattern(src.path) and not resolved.source_path(src).exists():
                raise CatalogError(
                    f"{path}: datasets.{ds_name}.sources.{i}.path = {src.path!r}: file "
                    f"{str(resolved.source_path(src))!r} does not exist; fix the path (relative paths "
                    "are read from the catalog's folder)"
                )
            try:
                resolved.source_files(src)
            except readers.DataFileError as err:  # a pattern with no match, a folder without such files
                raise CatalogError(f"{path}: datasets.{ds_name}.sources.{i}.path = {src.path!r}: {err}") from None
    return resolved


def packaged_catalog_text() -> str:
    """The embedded default catalog (for ``safeport catalog --show``)."""
    if DEFAULT_CATALOG.is_file():
        return DEFAULT_CATALOG.read_text(encoding="utf-8")
    return resources.files("safeport").joinpath("catalog.yaml").read_text(encoding="utf-8")
