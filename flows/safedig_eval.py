"""The CPU headline of position-aware steering (METHOD-SAFEDIG §9): leave one risk category out, on a real encoder.

For every text-encoder model of the profile's ``safedig:`` block (the bundled MiniLM on the default
profile), with each held-out category's bundle: the model is run over the held-out category's test
pairs, the source categories' test pairs and benign captions, unsteered and with the SafeDIG hooks at
every strength of ``safedig.strengths`` for every method of §8 that needs no generation (SafeDIG,
Blend only, Repel only, no routing, no refit, the SAeUron-style ablation), plus the cross-model
calibrated vector added to the pooled output; METHOD's probe judges the pooled output
(:mod:`safeport.eval.loco`). One piece per model on the one runner, keyed by the bundles, the probe's
inputs, the texts, the strengths and the code: a rerun computes nothing and re-renders nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import safeport.eval.loco
import safeport.eval.safedig
import safeport.extractors.capture
from safeport.catalog import Resolved
from safeport.codehash import code_hash
from safeport.eval.loco import METHODS, Cell, cell, summary, table
from safeport.eval.probe import SafetyProbe, train_probe
from safeport.eval.safedig import SafeDigBundle, safedig_hooks
from safeport.extractors.capture import record_layer_inputs, start_at_layer
from safeport.extractors.positions import Position
from safeport.flows.capture import CaptureModel, capture_models
from safeport.flows.common import extractor_for
from safeport.flows.runner import Call, Done, Group, KeyedStage, Work, run_stage
from safeport.keys import content_key
from safeport.store import artifacts
from safeport.store import safedig as art
from safeport.store.store import Store, StoreError

log = logging.getLogger("safeport.safedig")
KIND = "safedig_loco"
BATCH = 128
# The headline's texts (our choice, to keep the default run in its budget): up to TARGET test prompts of the
# held-out category, up to SOURCE_PER_CATEGORY of each source category and BENIGN captions, each a stable
# sample (the smallest text ids: content hashes).
TARGET = 24
SOURCE_PER_CATEGORY = 6
BENIGN = 48
# Each method of the headline: (bundle variant, decoder refitted, edit mode).
VARIANTS: dict[str, tuple[str, bool, str]] = {
    "safedig": ("routed", True, "safedig"),
    "blend": ("routed", True, "blend"),
    "repel": ("routed", True, "repel"),
    "no routing": ("fixed", True, "safedig"),
    "no refit": ("routed", False, "safedig"),
    "ablate": ("routed", True, "ablate"),
}


@dataclass(frozen=True)
class LocoResult:
    model: str
    status: str  # done | skipped
    verdicts: Mapping[str, str]
    report: str


@dataclass(frozen=True)
class _Texts:
    target: dict[str, list[str]]  # held-out category -> test unsafe text ids
    source: dict[str, list[str]]  # held-out category -> the other categories' test unsafe text ids
    benign: list[str]


def _texts(store: Store, pairs: str, benign: str, holdouts: Sequence[str]) -> _Texts:
    rows = store.fetchall(
        "SELECT text_id, category FROM dataset_texts WHERE dataset = ? AND split = 'test' AND side = 'unsafe' "
        "ORDER BY idx",
        [pairs],
    )
    by_category: dict[str, list[str]] = {}
    for t, c in rows:
        by_category.setdefault(str(c), []).append(str(t))
    sample = {c: sorted(ids)[:SOURCE_PER_CATEGORY] for c, ids in by_category.items()}
    target = {h: sorted(by_category.get(h, []))[:TARGET] for h in holdouts}
    source = {h: [t for c, ids in sorted(sample.items()) if c != h for t in ids] for h in holdouts}
    ids = [r[0] for r in store.fetchall("SELECT text_id FROM dataset_texts WHERE dataset = ? ORDER BY idx", [benign])]
    return _Texts(target, source, sorted(dict.fromkeys(ids))[:BENIGN])


def _probe(store: Store, cm: CaptureModel, pairs: str) -> SafetyProbe:
    """METHOD's probe on the model's pooled final layer, trained on every category's train pairs."""
    meta, values = store.activations(cm.model_key, pairs, "split = 'train'")
    if meta.num_rows == 0:
        raise StoreError(
            f"model {cm.name} has no pooled rows of {pairs!r}: the headline's probe is trained on them; add the "
            "model to the profile's models and run `safeport extract`"
        )
    side = np.asarray(meta.column("side").to_pylist())
    return train_probe(values[side == "safe"], values[side == "unsafe"], seed=42)


def _vector(store: Store, cm: CaptureModel) -> tuple[str, np.ndarray] | None:
    """The cross-model calibrated vector into this model (ridge map; None when the profile has no fit into it)."""
    rows = store.fetchall(
        "SELECT name FROM vectors WHERE target = ? AND kind = 'calibrated' AND mapper = 'ridge' AND category IS NULL "
        "ORDER BY created_at DESC LIMIT 1",
        [cm.name],
    )
    if not rows:
        return None
    values, _ = artifacts.load_vector(store, str(rows[0][0]))
    return str(rows[0][0]), values


def compute_loco(
    cm: CaptureModel,
    texts: Mapping[str, str],
    sets: _Texts,
    bundles: Mapping[tuple[str, bool], SafeDigBundle],
    probe: SafetyProbe,
    vector: np.ndarray | None,
    strengths: Sequence[float],
    holdouts: Sequence[str],
) -> list[Cell]:
    """Every cell of the headline (see the module docstring); the model is run here."""
    pooler: Any = extractor_for(cm.source)  # an HFPooler: .model is the HF encoder the hooks go on

    def encode(ids: Sequence[str]) -> np.ndarray:
        """Pooled rows of ``ids`` in their order, computed in batches of similar length (little padding)."""
        order = sorted(range(len(ids)), key=lambda i: (len(texts[ids[i]]), ids[i]))
        out = np.zeros((len(ids), pooler.dim), dtype=np.float32)
        for i in range(0, len(order), BATCH):
            chunk = order[i : i + BATCH]
            out[chunk] = pooler.encode([texts[ids[j]] for j in chunk]).values
        return out

    def first_layer(variant: SafeDigBundle) -> int:
        return min(Position.parse(p.position).index for p in variant.steered)

    cells: list[Cell] = []
    for h in holdouts:
        ids = [*sets.target[h], *sets.source[h], *sets.benign]
        split = (len(sets.target[h]), len(sets.target[h]) + len(sets.source[h]))
        variants = {
            method: ((bundles[(h, refit)].routed() if which == "routed" else bundles[(h, refit)].fixed()), mode)
            for method, (which, refit, mode) in VARIANTS.items()
        }
        # The unsteered pass records each variant's first steered layer's inputs: a steered pass then starts
        # there (the layers before it compute exactly the unsteered values, so they are not run again).
        with record_layer_inputs(pooler.model, {first_layer(v) for v, _ in variants.values()}) as inputs:
            plain = encode(ids)
        parts = np.split(plain, split)
        benign_plain = parts[2]
        cells.append(cell(probe, h, "original", 0.0, parts[0], parts[1], parts[2], benign_plain))
        for method, (variant, mode) in variants.items():
            for s in strengths:
                if s == 0:
                    continue
                with (
                    start_at_layer(pooler.model, first_layer(variant), inputs[first_layer(variant)]),
                    safedig_hooks(pooler.model, variant, s, mode),  # type: ignore[arg-type]
                ):
                    steered = np.split(encode(ids), split)
                cells.append(cell(probe, h, method, s, steered[0], steered[1], steered[2], benign_plain))
        if vector is not None:
            for s in strengths:
                if s:
                    moved = [x + float(s) * vector for x in parts]
                    cells.append(cell(probe, h, "vector", s, moved[0], moved[1], moved[2], benign_plain))
    return cells


def _cells_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[Cell]:
    by: dict[tuple[str, str, float], dict[str, Any]] = {}
    for r in rows:
        holdout, method = str(r["category"]).split("|", 1)
        by.setdefault((holdout, method, float(r["alpha"])), {})[str(r["metric"])] = (r["value"], r["n"])
    out = []
    for (h, m, s), v in by.items():
        out.append(
            Cell(h, m, s, v["target"][0], v["source"][0], v["benign"][0], v["benign_cos"][0],
                 int(v["target"][1]), int(v["source"][1]), int(v["benign"][1]))
        )  # fmt: skip
    return out


def _rows(cells: Sequence[Cell], model: str) -> list[dict[str, Any]]:
    out = []
    for c in cells:
        for metric, value, n in (
            ("target", c.target, c.n_target),
            ("source", c.source, c.n_source),
            ("benign", c.benign, c.n_benign),
            ("benign_cos", c.benign_cos, c.n_benign),
        ):
            out.append(
                {
                    "kind": KIND,
                    "source": None,
                    "target": model,
                    "method": c.method,
                    "category": f"{c.holdout}|{c.method}",
                    "metric": metric,
                    "alpha": c.strength,
                    "value": value,
                    "n": n,
                }
            )
    return out


class LocoStage(KeyedStage):
    flow, task, unit, remote = "safedig", "loco", "model", False
    prefix = "loco"

    def __init__(self, store: Store, pieces: Mapping[str, tuple[CaptureModel, Any]]) -> None:
        self.store, self.pieces = store, pieces
        self.cells: dict[str, list[Cell]] = {}

    def _done_key(self, key: str) -> bool:
        return bool(self.store.scalar("SELECT count(*) FROM eval_results WHERE fit_key = ? AND kind = ?", [key, KIND]))

    def groups(self) -> list[Group]:
        return [Group(cm.name, "loco", key) for key, (cm, _) in self.pieces.items()]

    def prepare(self, work: Work, keys: list[str]) -> Call:
        cm, args = self.pieces[work.group.key or ""]
        return Call(compute_loco, (cm, *args), f"loco-{cm.name}")

    def commit(self, work: Work, keys: list[str], result: list[Cell], remote: bool) -> Done:
        key = work.group.key or ""
        artifacts.save_results(self.store, key, _rows(result, work.group.model))
        self.cells[key] = result
        return Done(len(result))

    def done(self, key: str) -> bool:
        return self._done_key(key)


def loco_headline(store: Store, resolved: Resolved) -> list[LocoResult]:
    """The §9 table and verdicts for every text-encoder model of the ``safedig:`` block (written as a report)."""
    from safeport.api import _bundle_from_store
    from safeport.flows.safedig import _pairs, holdouts

    sd = resolved.profile.safedig
    if sd is None or sd.eval_benign is None:
        return []
    models = [cm for cm in capture_models(resolved) if cm.family == "text_encoder"]
    pairs_ds = next((d for d in (sd.datasets or [resolved.profile.pairs]) if d == resolved.profile.pairs), None)
    pairs_ds = pairs_ds or resolved.profile.pairs
    categories = sorted({p.category for p in _pairs(store, pairs_ds)})
    held = holdouts(resolved, categories)
    strengths = [float(s) for s in sd.strengths]
    pieces: dict[str, tuple[CaptureModel, Any]] = {}
    for cm in models:
        bundles = {}
        for h in held:
            for refit in (True, False):
                bundles[(h, refit)] = _bundle_from_store(store, f"safedig:{cm.name}:{h}", refit)
        sets = _texts(store, pairs_ds, sd.eval_benign, held)
        everything = sorted({t for v in sets.target.values() for t in v} | {t for v in sets.source.values() for t in v})
        ids = [*everything, *sets.benign]
        texts = dict(zip(ids, store.texts(ids), strict=True))
        vec = _vector(store, cm)
        key = content_key(
            [
                KIND,
                sorted(str(b.lineage["bundle_key"]) + str(r) for (_, r), b in bundles.items()),
                cm.model_key,
                store.dataset_hash(pairs_ds),
                store.dataset_hash(sd.eval_benign),
                None if vec is None else vec[0],
                strengths,
                list(METHODS),
                code_hash([safeport.eval.loco, safeport.eval.safedig, safeport.extractors.capture]),
                [TARGET, SOURCE_PER_CATEGORY, BENIGN],
            ]
        )
        probe = _probe(store, cm, pairs_ds)
        pieces[key] = (cm, (texts, sets, bundles, probe, None if vec is None else vec[1], strengths, held))
    stage = LocoStage(store, pieces)
    results = run_stage(store, stage, desc="headline")
    out = []
    for r in results:
        key = r.group.key or ""
        cm = pieces[key][0]
        cells = stage.cells.get(key) or _cells_from_rows(
            store.sql("SELECT * FROM eval_results WHERE fit_key = ? AND kind = ?", [key, KIND]).to_pylist()
        )
        verdicts = summary(cells, held)
        report = _write_report(store, cm, cells, held, strengths, r.status == "done")
        out.append(LocoResult(cm.name, r.status, verdicts, str(report)))
    return out


def _write_report(store: Store, cm: CaptureModel, cells: Sequence[Cell], held: Sequence[str],
                  strengths: Sequence[float], fresh: bool) -> Any:  # fmt: skip
    """``reports/safedig-loco-<model>.md``: verdicts, held-out flagged vs s, a table per held-out category."""
    from safeport.eval.plots import loco_figure

    name = f"safedig-loco-{cm.name}"
    path = artifacts.report_path(store, name)
    if not fresh and path.is_file():
        return path
    methods = [m for m in METHODS if any(c.method == m for c in cells)]
    lines = [
        f"# Position-aware steering, leave one category out: {cm.name}",
        "",
        "METHOD-SAFEDIG §9 on real activations. For each held-out risk category the SafeDIG bundle was routed, "
        "trained, selected and refitted without that category's labels; METHOD's linear probe (trained on every "
        "category's train pairs on the model's pooled final layer) judges the steered pooled output. "
        "`held-out flagged`: the held-out category's test prompts (unsafe side) the probe still flags; "
        "`source flagged`: the other categories' test prompts; `benign flagged` / `benign cos`: benign captions "
        "flagged, and their mean cosine to the unsteered representation (the damage). `vector` adds the "
        "cross-model calibrated vector (ridge) to the pooled output, as the fit report does.",
        "",
        f"Equal damage (our choice): a method is read at its strongest s with benign cos >= "
        f"{safeport.eval.loco.DAMAGE_COS} and a benign flag rate at most {safeport.eval.loco.DAMAGE_FLAGS} above "
        "the unsteered one.",
        "",
        "## Verdicts",
        "",
        *[f"- {line}" for line in summary(cells, held).values()],
        "",
        f"![held-out flagged fraction vs s]({name}-heldout.png)",
        "",
        "## Tables",
        "",
        *table(cells, held, methods),
    ]
    figures = {f"{name}-heldout.png": loco_figure(cells, held, methods, strengths)}
    return artifacts.write_report(store, name, "\n".join(lines), figures)


def has_bundles(store: Store) -> bool:
    return art.has_tables(store)
