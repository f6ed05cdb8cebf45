"""The token cache of position-aware steering (METHOD-SAFEDIG §2): token rows at named positions → token units.

For every model of the profile's ``safedig:`` block and every dataset it captures, each position
is one **token unit** (kind ``tokens``): several rows per text, each with its coordinates (text,
seed, step, token index, stream, position) in the row index (``token_rows`` in SQL), stored
float16 unless a value overflows. A unit's key covers the model, the dataset's rows, the position
and every capture setting (:class:`CaptureModel.spec`: size, steps, guidance, seed, token
sampling, dtype), so changing any of them is a new unit and nothing else is touched.

The units of one (model, dataset, settings) share their texts and shards: a **piece** of work is
one shard of texts for every position that still lacks it, computed by one pass of the model
(:func:`capture_shard`: a text-encoder forward, or the pipeline run to the last captured step with
hooks on every missing position at once), so adding a position re-runs the denoiser once for all
missing positions together, never one pass per position. Pieces run on the one runner
(:mod:`safeport.flows.runner`), in this process or on Dask workers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from safeport.catalog import Resolved
from safeport.extractors import ModelSource
from safeport.extractors.capture import Generation, TokenRows, capture_text_encoder, default_steps, iter_capture
from safeport.extractors.positions import CANDIDATE_SETS, GENERIC_SETS, Position, available, compact
from safeport.flows.common import catalog, extractor_for, model_source, store_for, writing
from safeport.flows.extract import register_datasets_task
from safeport.flows.runner import Call, Done, Executor, Group, Work, executor_for_flow, run_stage
from safeport.flows.workers import prepare_worker
from safeport.keys import content_key
from safeport.store.store import ShardDescriptor, Store, UnitInfo, write_shard_array
from safeport.store.units import TOKENS

log = logging.getLogger("safeport.capture")

TEXT_SAMPLE_SALT = 0x7E47  # seeds the text-token sample of each text (with its id), apart from image samples
# Widths of the paper's targets when no config is at hand (``--plan`` offline): DiT inner dim, T5-XXL d_model.
KNOWN_DIMS: dict[str, dict[str, int]] = {
    "black-forest-labs/FLUX.1-dev": {"dit": 3072, "te": 4096},
    "black-forest-labs/FLUX.1-schnell": {"dit": 3072, "te": 4096},
    "stabilityai/stable-diffusion-3.5-large": {"dit": 2432, "te": 4096},
}


@dataclass(frozen=True)
class CaptureModel:
    """One model of the ``safedig:`` block: its positions, their widths and the capture settings."""

    name: str
    source: ModelSource
    model_key: str
    family: str  # text_encoder | flux | sd3
    positions: tuple[str, ...]
    dims: Mapping[str, int]  # position -> row width
    spec: Mapping[str, Any]  # the capture settings: part of every unit key
    generation: Generation | None  # None for a text encoder
    steps: tuple[int, ...]  # captured steps ((0,) for a text encoder)
    image_tokens: int | None
    text_tokens: int | None
    batch_size: int  # texts per model call

    def unit_key(self, dataset: str, dataset_hash: str, position: str) -> str:
        return content_key(["tokens", self.model_key, dataset, dataset_hash, position, dict(self.spec)])

    def group_key(self, dataset: str, dataset_hash: str) -> str:
        return content_key(["capture", self.model_key, dataset, dataset_hash, dict(self.spec)])


# --- the model tree without weights: positions and widths before anything is loaded -----------------


def _skeleton(source: ModelSource) -> tuple[Any, Any | None]:
    """(text encoder, DiT transformer or None) built on the meta device from the model's configs."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    def encoder(config: Any) -> Any:
        arch = (getattr(config, "architectures", None) or [""])[0]
        cls = getattr(transformers, arch, None) if arch.endswith("EncoderModel") else None  # T5EncoderModel
        with init_empty_weights():
            return cls(config) if cls is not None else AutoModel.from_config(config)

    location = source.location
    if source.family == "text_encoder":
        return encoder(AutoConfig.from_pretrained(location, revision=source.revision, trust_remote_code=False)), None
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    te_folder = "text_encoder_2" if source.family == "flux" else "text_encoder_3"
    dit_class: Any = FluxTransformer2DModel if source.family == "flux" else SD3Transformer2DModel
    te = encoder(AutoConfig.from_pretrained(location, subfolder=te_folder, revision=source.revision))
    dit_config = dit_class.load_config(location, subfolder="transformer", revision=source.revision)
    with init_empty_weights():
        dit = dit_class.from_config(dit_config)
    return te, dit


def _known(source: ModelSource, wanted: list[str] | str) -> tuple[tuple[str, ...], dict[str, int]] | None:
    """A paper target's positions and widths without its configs (``--plan`` offline): explicit names only."""
    dims = KNOWN_DIMS.get(source.hub_id or "")
    if dims is None or wanted in GENERIC_SETS:
        return None
    names = list(CANDIDATE_SETS[source.family][wanted]) if isinstance(wanted, str) else list(dict.fromkeys(wanted))
    return tuple(names), {n: dims["te" if n.startswith("te.") else "dit"] for n in names}


def _positions_and_dims(
    source: ModelSource, wanted: list[str] | str, offline_ok: bool = False
) -> tuple[tuple[str, ...], dict[str, int]]:
    """The model's positions, checked against its real module tree, and each one's row width.

    ``offline_ok`` (the plan): a paper target whose configs are not here gets its documented widths.
    """
    try:
        te, dit = _skeleton(source)
    except OSError:
        known = _known(source, wanted) if offline_ok else None
        if known is None:
            raise
        return known
    te_dim = int(getattr(te.config, "hidden_size", None) or te.config.d_model)
    dims = {s.name: te_dim for s in available(te)}
    if dit is not None:
        dims.update({s.name: int(dit.inner_dim) for s in available(dit)})
    every = list(dims)
    if wanted == "all":
        names = every
    elif wanted == "blocks":
        names = [n for n in every if not n.startswith("te.")]
    elif wanted == "text_encoder":
        names = [n for n in every if n.startswith("te.")]
    elif isinstance(wanted, str):
        names = list(CANDIDATE_SETS[source.family][wanted])
    else:
        names = list(dict.fromkeys(wanted))
    wrong = [n for n in names if n not in dims]
    if wrong:
        raise ValueError(
            f"model {source.name!r} has no position(s) {wrong}; its positions are {compact(every)} (read from its "
            "module tree); fix positions: in the catalog"
        )
    return tuple(names), {n: dims[n] for n in names}


def capture_models(resolved: Resolved, offline_ok: bool = False) -> list[CaptureModel]:
    """The models of the profile's ``safedig:`` block with their positions, widths and capture settings."""
    sd = resolved.profile.safedig
    if sd is None:
        return []
    out = []
    for name in sd.models:
        entry = resolved.models[name]
        source = model_source(resolved, name)
        wanted = sd.positions.get(name, entry.positions if entry.positions is not None else "all")
        sets = [*GENERIC_SETS, *CANDIDATE_SETS.get(entry.family, {})]
        if isinstance(wanted, str) and wanted not in sets:
            raise ValueError(
                f"model {name!r}: positions {wanted!r} is neither a list of names nor a candidate set; use a list "
                f"such as [te.0.txt, double.4.img] or one of {', '.join(sets)}"
            )
        if isinstance(wanted, list):
            for n in wanted:
                Position.parse(n)  # a malformed name is an error before any model is touched
        positions, dims = _positions_and_dims(source, wanted, offline_ok)
        generation: Generation | None = None
        steps: tuple[int, ...] = (0,)
        extra: dict[str, Any] = {}
        if entry.family != "text_encoder":
            from safeport.eval.generate import resolve_settings

            settings = resolve_settings(source, dict(entry.generation))
            call = {k: v for k, v in settings.call if v is not None}
            generation = Generation(
                height=int(call.get("height", 1024)),
                width=int(call.get("width", 1024)),
                num_inference_steps=int(call.get("num_inference_steps", 28)),
                guidance_scale=float(call.get("guidance_scale", 0.0)),
                max_sequence_length=settings.max_sequence_length,
                true_cfg_scale=float(call.get("true_cfg_scale", 1.0)),
                negative_prompt=settings.negative_prompt,
            )
            steps = tuple(sd.steps) if sd.steps is not None else default_steps(generation.num_inference_steps)
            bad = [s for s in steps if s >= generation.num_inference_steps]
            if bad:
                last = generation.num_inference_steps - 1
                raise ValueError(
                    f"safedig.steps {list(steps)}: step {bad[0]} is past the last of model {name!r}'s denoising "
                    f"steps; use indices 0..{last}"
                )
            extra = {"generation": settings.record(), "steps": list(steps), "image_tokens": sd.image_tokens}
        spec = {
            "family": entry.family,
            "max_tokens": entry.max_tokens,
            "text_tokens": sd.text_tokens,
            "dtype": sd.dtype,
            "seed": sd.seed,
            **extra,
        }
        out.append(
            CaptureModel(
                name,
                source,
                source.spec().key(),
                entry.family,
                positions,
                dims,
                spec,
                generation,
                steps,
                sd.image_tokens if entry.family != "text_encoder" else None,
                sd.text_tokens,
                _capture_batch(entry.generation.get("batch_size"), entry.batch_size, entry.family),
            )
        )
    return out


def _capture_batch(generation_batch: object, batch_size: int, family: str) -> int:
    """Texts per model call: a pipeline's ``generation: batch_size`` if set, else the model's ``batch_size``."""
    if family != "text_encoder" and isinstance(generation_batch, int) and generation_batch >= 1:
        return generation_batch
    return batch_size


def capture_datasets(resolved: Resolved) -> list[str]:
    sd = resolved.profile.safedig
    if sd is None:
        return []
    return list(sd.datasets) if sd.datasets else [resolved.profile.anchors, resolved.profile.pairs]


# --- what runs here or on a worker ------------------------------------------------------------------

_MODELS: dict[str, Any] = {}  # per process: the loaded capture model (one at a time)


def _loaded(cm: CaptureModel) -> Any:
    if _MODELS.get("key") != cm.model_key:
        _MODELS.clear()
        if cm.family == "text_encoder":
            _MODELS["model"] = extractor_for(cm.source)  # HFPooler: .model, .tokenizer
        else:
            from safeport.eval.generate import load_pipeline

            pipe = load_pipeline(cm.source)
            pipe.set_progress_bar_config(disable=True)
            _MODELS["model"] = pipe
        _MODELS["key"] = cm.model_key
    return _MODELS["model"]


def release_capture_model() -> None:
    _MODELS.clear()


def _sample_text(rows: TokenRows, text_ids: Sequence[str], k: int | None) -> np.ndarray:
    """Row indices kept of a text stream: all, or ``k`` seeded real tokens per (text, step)."""
    if k is None:
        return np.arange(len(rows))
    keep: list[np.ndarray] = []
    for p in np.unique(rows.prompt_index):
        for step in np.unique(rows.step[rows.prompt_index == p]):
            idx = np.flatnonzero((rows.prompt_index == p) & (rows.step == step))
            if len(idx) > k:
                seed = int(content_key(text_ids[int(p)], 8), 16)
                idx = np.sort(np.random.default_rng([TEXT_SAMPLE_SALT, seed, int(step)]).choice(idx, k, replace=False))
            keep.append(idx)
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def capture_shard(
    arrays: zarr.Group | str,
    cm: CaptureModel,
    units: Sequence[UnitInfo],
    shard: int,
    text_ids: list[str],
    texts: list[str],
) -> list[ShardDescriptor]:
    """Token rows of one shard of texts at every position of ``units``, in one pass; each unit's rows written."""
    prepare_worker(cm.source, cm.model_key)
    model = _loaded(cm)
    positions = [u.position or "" for u in units]
    if cm.family == "text_encoder":
        parts = []
        for start in range(0, len(texts), cm.batch_size):
            batch = texts[start : start + cm.batch_size]
            parts.append(
                capture_text_encoder(
                    model.model,
                    model.tokenizer,
                    batch,
                    positions,
                    max_length=cm.spec["max_tokens"],
                    prompt_offset=start,
                )
            )
    else:
        if cm.generation is None:  # pragma: no cover - pipelines always have generation settings
            raise ValueError(f"model {cm.name!r} has no generation settings")
        parts = list(
            iter_capture(
                model,
                texts,
                cm.generation,
                positions,
                batch_size=max(1, cm.batch_size),
                seeds=int(cm.spec["seed"]),
                steps=cm.steps,
                image_tokens=cm.image_tokens,
            )
        )
    out = []
    for unit, position in zip(units, positions, strict=True):
        rows = _concat([p[position] for p in parts])
        keep = _sample_text(rows, text_ids, cm.text_tokens) if rows.stream == "txt" else np.arange(len(rows))
        ids = [text_ids[int(i)] for i in rows.prompt_index[keep]]
        coords = {
            "position": np.full(len(keep), position),
            "step": rows.step[keep],
            "token": rows.token_index[keep],
            "stream": np.full(len(keep), rows.stream),
            "seed": rows.seed[keep],
        }
        ones = np.ones(len(keep), dtype=np.int32)
        out.append(
            write_shard_array(arrays, unit, shard, ids, rows.values[keep], ones, np.zeros(len(keep), bool), coords)
        )
    return out


def _concat(parts: Sequence[TokenRows]) -> TokenRows:
    if len(parts) == 1:
        return parts[0]
    return TokenRows(
        parts[0].position,
        np.concatenate([p.values for p in parts]),
        np.concatenate([p.prompt_index for p in parts]),
        np.concatenate([p.seed for p in parts]),
        np.concatenate([p.step for p in parts]),
        np.concatenate([p.token_index for p in parts]),
    )


# --- the stages ----------------------------------------------------------------------------------


@dataclass
class _CaptureGroup:
    """The units of one (model, dataset, settings): they share texts and shards."""

    cm: CaptureModel
    dataset: str
    dataset_hash: str
    key: str
    text_ids: list[str]
    units: dict[str, UnitInfo] = field(default_factory=dict)  # position -> unit

    @property
    def group(self) -> Group:
        return Group(self.cm.name, self.dataset, self.key)


def _dataset_texts(store: Store, dataset: str) -> list[str]:
    """The dataset's text ids in dataset order, each once."""
    rows = store.fetchall("SELECT text_id FROM dataset_texts WHERE dataset = ? ORDER BY idx", [dataset])
    return list(dict.fromkeys(r[0] for r in rows))


def capture_groups(
    store: Store, resolved: Resolved, models: Sequence[CaptureModel], only: Collection[str] | None = None
) -> list[_CaptureGroup]:
    """Every (model, dataset) group of the profile, its units created if new (texts in dataset order).

    ``only``: unit keys; just the groups holding one of them (a repair touches nothing else).
    """
    shard_texts = resolved.profile.safedig.shard_texts if resolved.profile.safedig else 64
    out = []
    for cm in models:
        for dataset in capture_datasets(resolved):
            ds_hash = store.dataset_hash(dataset)
            if ds_hash is None:
                raise ValueError(f"dataset {dataset!r} is not registered in the store; run `safeport extract` first")
            if only is not None and not any(cm.unit_key(dataset, ds_hash, p) in only for p in cm.positions):
                continue
            g = _CaptureGroup(cm, dataset, ds_hash, cm.group_key(dataset, ds_hash), _dataset_texts(store, dataset))
            for position in cm.positions:
                key = cm.unit_key(dataset, ds_hash, position)
                g.units[position] = store.create_unit(
                    key,
                    cm.model_key,
                    dataset,
                    ds_hash,
                    g.text_ids,
                    cm.dims[position],
                    shard_texts,
                    kind=TOKENS,
                    position=position,
                    spec={**cm.spec, "position": position},
                    dtype=str(cm.spec["dtype"]),
                )
            out.append(g)
    return out


class CaptureShards:
    """The capture stage: one piece per (group, shard) that some position of the group still lacks."""

    flow, task, unit, remote = "capture", "capture_tokens", "text", True

    def __init__(self, store: Store, groups: Sequence[_CaptureGroup], on_workers: bool) -> None:
        self.store = store
        self.groups_by_key = {g.key: g for g in groups}
        self.arrays: zarr.Group | str = store.location.url if on_workers else store.arrays
        self.registered: set[str] = set()

    def groups(self) -> list[Group]:
        return [g.group for g in self.groups_by_key.values()]

    def _missing(self, g: _CaptureGroup) -> dict[int, list[UnitInfo]]:
        """Shard -> the units (positions) of the group without it."""
        out: dict[int, list[UnitInfo]] = {}
        for unit in g.units.values():
            have = self.store.committed_shards(unit.unit_key)
            for shard in range(unit.n_shards):
                if shard not in have:
                    out.setdefault(shard, []).append(unit)
        return out

    def work(self) -> list[Work]:
        out = []
        for g in self.groups_by_key.values():
            unless = tuple(f"unit:{u.unit_key}" for u in g.units.values())
            for shard in sorted(self._missing(g)):
                start, stop = next(iter(g.units.values())).shard_range(shard)
                out.append(Work((f"capture:{g.key}/{shard}",), g.group, stop - start, unless))
        return out

    def finished(self, keys: list[str]) -> list[str]:
        done = []
        for k in keys:
            gkey, shard = k.removeprefix("capture:").rsplit("/", 1)
            g = self.groups_by_key[gkey]
            table = pa.table({"unit_key": [u.unit_key for u in g.units.values()]})
            with self.store.reading() as con:
                con.register("_units", table)
                try:
                    n = con.execute(
                        "SELECT count(*) FROM shards JOIN _units USING (unit_key) WHERE shard = ?", [int(shard)]
                    ).fetchall()[0][0]
                finally:
                    con.unregister("_units")
            if n == len(g.units):
                done.append(k)
        return done

    def prepare(self, work: Work, keys: list[str]) -> Call | None:
        gkey, shard_s = keys[0].removeprefix("capture:").rsplit("/", 1)
        g, shard = self.groups_by_key[gkey], int(shard_s)
        have = {u.unit_key for u in g.units.values() if shard in self.store.committed_shards(u.unit_key)}
        units = [u for u in g.units.values() if u.unit_key not in have]
        if not units:
            return None
        start, stop = units[0].shard_range(shard)
        ids = g.text_ids[start:stop]
        label = f"capture-{g.cm.name}-{g.dataset}-{shard}"
        return Call(capture_shard, (self.arrays, g.cm, units, shard, ids, self.store.texts(ids)), label)

    def commit(self, work: Work, keys: list[str], result: list[ShardDescriptor], remote: bool) -> Done:
        if not keys:
            return Done()
        g = self.groups_by_key[work.group.key or ""]
        if g.cm.model_key not in self.registered:
            self._register(g.cm)
        units = {u.unit_key: u for u in g.units.values()}
        rows = 0
        for desc in result:
            self.store.commit_shard(units[desc.unit_key], desc, verify=remote)
            rows += desc.rows
        return Done(rows, rows)

    def _register(self, cm: CaptureModel) -> None:
        from dataclasses import asdict

        if not self.store.scalar("SELECT 1 FROM models WHERE model_key = ?", [cm.model_key]):
            dim = max(cm.dims.values()) if cm.dims else 0
            self.store.register_model(cm.model_key, cm.name, "target", asdict(cm.source.spec()), dim)
        self.registered.add(cm.model_key)

    def close(self, group: Group, computed: bool) -> None:
        for unit in self.groups_by_key[group.key or ""].units.values():
            self.store.finish_unit(unit.unit_key)


@dataclass(frozen=True)
class CaptureResult:
    model: str
    dataset: str
    status: str  # done | skipped
    rows: int
    positions: tuple[str, ...]


def capture_tokens(
    store: Store, resolved: Resolved, executor: Executor | None = None, only: Collection[str] | None = None
) -> list[CaptureResult]:
    """Fill the token cache of the profile's ``safedig:`` block; only missing (position, shard) rows run.

    ``only``: unit keys to complete (the repair's invalidated token units), nothing else.
    """
    executor = executor or executor_for_flow()
    models = capture_models(resolved)
    if not models:
        return []
    groups = capture_groups(store, resolved, models, only)
    try:
        results = run_stage(store, CaptureShards(store, groups, executor.remote), executor, desc="capture")
    finally:
        release_capture_model()
    by_key = {g.key: g for g in groups}
    return [
        CaptureResult(r.group.model, r.group.dataset, r.status, r.rows, by_key[r.group.key or ""].cm.positions)
        for r in results
    ]


# --- the plan: rows, bytes and GPU time before anything runs ---------------------------------------------


@dataclass(frozen=True)
class PositionPlan:
    model: str
    position: str
    rows: int
    bytes: int
    done_rows: int


def _image_tokens_per_step(cm: CaptureModel, divisor: int = 16) -> int:
    """Image tokens sampled per (prompt, step); ``divisor``: pixels per token along a side (16: VAE /8, 2x2)."""
    if cm.generation is None:
        return 0
    total = (cm.generation.height // divisor) * (cm.generation.width // divisor)
    return total if cm.image_tokens is None else min(cm.image_tokens, total)


def plan_rows(cm: CaptureModel, position: str, text_lengths: Iterable[int], divisor: int = 16) -> int:
    """Rows one position captures for texts of these real-token lengths (steps x tokens, sampled)."""
    stream = Position.parse(position).stream
    if stream == "img":
        n_texts = sum(1 for _ in text_lengths)
        return n_texts * len(cm.steps) * _image_tokens_per_step(cm, divisor)
    steps = 1 if position.startswith("te.") else len(cm.steps)
    k = cm.text_tokens
    return steps * sum(n if k is None else min(n, k) for n in text_lengths)


def _pipeline_counts(cm: CaptureModel, texts: list[str]) -> tuple[dict[str, list[int]], int] | None:
    """(real tokens per text at "te" and "dit" text positions, pixels per image token) from the pipeline's
    tokenizers and configs (no weights); None when they are not here (a hub id that is not downloaded)."""
    from safeport.extractors.capture import image_grid_divisor, real_token_counts

    if cm.generation is None:
        return None
    location, revision = cm.source.location, cm.source.revision
    try:
        counts = real_token_counts(location, cm.family, texts, cm.generation.max_sequence_length, revision)
        divisor = image_grid_divisor(location, cm.family, revision)
    except (OSError, ValueError):
        return None
    return {k: [int(n) for n in v] for k, v in counts.items()}, divisor


def pooled_lengths(store: Store, cm: CaptureModel, dataset: str) -> dict[str, int]:
    """Real tokens per text of ``dataset`` where the model's pooled extraction counted them."""
    rows = store.fetchall(
        "SELECT a.text_id, a.n_tokens FROM activation_rows a WHERE a.model_key = ? AND a.text_id IN "
        "(SELECT text_id FROM dataset_texts WHERE dataset = ?)",
        [cm.model_key, dataset],
    )
    return {str(t): int(n) for t, n in rows}


@dataclass(frozen=True)
class ModelPlan:
    model: str
    positions: tuple[PositionPlan, ...]
    texts: int
    seconds_per_text: float | None  # GPU time of one text's capture (run to the last captured step)
    seconds_from: str
    tokens_from: str = ""  # where the real-token counts come from

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.positions)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.positions)


def plan_capture(catalog_path: str | None, profile: str, store: str | None = None) -> list[ModelPlan]:
    """Rows, bytes and GPU time of the profile's token cache per model and position; no model is loaded.

    Text counts come from the catalog's datasets; real-token counts from the pipeline's own tokenizers
    (a text encoder: its pooled rows in the store), else characters / 4 (a hub id not downloaded); image
    tokens from the VAE and DiT configs (else 16 pixels a token); committed rows from the store, if any.
    GPU time: the model's ``generation: seconds_per_output`` scaled by the fraction of steps run.
    """
    from safeport.datasets import build_all

    resolved = catalog(catalog_path, profile)
    datasets = build_all(resolved)
    root = Path(store) if store else resolved.store_path
    have = Store(root, read_only=True) if (root / "meta.duckdb").is_file() else None
    out = []
    try:
        for cm in capture_models(resolved, offline_ok=True):
            texts: list[tuple[str, str]] = []  # (id, text) of every unit's texts: a dataset's unit holds its own
            found: dict[str, int] = {}
            for name in capture_datasets(resolved):
                texts += {r.text_id: r.text for r in datasets[name].rows}.items()
                if have is not None and cm.generation is None:  # a text encoder's pooled rows count real tokens
                    found.update(pooled_lengths(have, cm, name))
            cap = int(cm.spec["max_tokens"] or 512)
            estimate = [found.get(t) or min(cap, max(1, math.ceil(len(x) / 4)) + 2) for t, x in texts]
            lengths = {"te": estimate, "dit": estimate}
            divisor = 16
            tokens_from = "its pooled rows in the store" if found else "characters / 4 (no tokenizer here)"
            counted = _pipeline_counts(cm, [x for _, x in texts])
            if counted is not None:
                (lengths, divisor), tokens_from = counted, "the pipeline's own tokenizers"
            done = _done_rows(have, cm) if have is not None else {}
            positions = []
            for position in cm.positions:
                n = plan_rows(cm, position, lengths["te" if position.startswith("te.") else "dit"], divisor)
                width = 2 if cm.spec["dtype"] == "float16" else 4
                positions.append(
                    PositionPlan(cm.name, position, n, n * cm.dims[position] * width, done.get(position, 0))
                )
            per, source = None, "unknown"
            sec = resolved.models[cm.name].generation.get("seconds_per_output")
            if isinstance(sec, int | float) and cm.generation is not None:
                per = float(sec) * (max(cm.steps) + 1) / cm.generation.num_inference_steps
                source = f"{float(sec):g} s per output x {max(cm.steps) + 1}/{cm.generation.num_inference_steps} steps"
            out.append(ModelPlan(cm.name, tuple(positions), len(texts), per, source, tokens_from))
    finally:
        if have is not None:
            have.close()
    return out


def _done_rows(store: Store, cm: CaptureModel) -> dict[str, int]:
    """Rows already committed per position, over every registered version of the datasets."""
    keys = {
        cm.unit_key(dataset, ds_hash, position): position
        for dataset, ds_hash in store.fetchall("SELECT dataset, content_hash FROM datasets")
        for position in cm.positions
    }
    rows = store.fetchall(
        "SELECT unit_key, count(*) FROM unit_rows WHERE list_contains(?::VARCHAR[], unit_key) GROUP BY 1", [list(keys)]
    )
    out: dict[str, int] = {}
    for key, n in rows:
        out[keys[key]] = out.get(keys[key], 0) + int(n)
    return out


@task(name="capture-tokens", cache_policy=NO_CACHE)
def capture_task(store_root: str, catalog_path: str | None, profile: str) -> list[CaptureResult]:
    return capture_tokens(store_for(store_root), catalog(catalog_path, profile))


def capture_all(store_root: str, catalog_path: str | None, profile: str) -> list[CaptureResult]:
    """Body of the capture flow (datasets registered first); callable from a flow that holds the store."""
    register_datasets_task(store_root, catalog_path, profile)
    result: list[CaptureResult] = capture_task(store_root, catalog_path, profile)
    return result


@flow(name="safeport-capture", log_prints=False)
def capture_flow(
    catalog_path: str | None = None, profile: str = "default", store: str | None = None, wait_s: float = 0.0
) -> list[CaptureResult]:
    """Fill the token cache of a profile's ``safedig:`` block (on Dask with a Dask task runner)."""
    resolved = catalog(catalog_path, profile)
    if resolved.profile.safedig is None:
        raise ValueError(
            f"profile {resolved.name!r} has no safedig: block; add one (README, 'Position-aware steering') or "
            "pick a profile that has one"
        )
    root = Path(store) if store else resolved.store_path
    with writing(root, wait_s, resolved.arrays_url, resolved.outputs_url):
        return capture_all(str(root), catalog_path, profile)
