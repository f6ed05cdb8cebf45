"""Turn catalog dataset entries into rows of texts (ids, splits, categories, pairs).

The reading goes through ``store.readers``; everything here is deterministic
(seeded sampling and splits), so the same files give the same rows and ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from safeport.catalog import DatasetEntry, Resolved, SourceEntry
from safeport.texts import normalise, seeded_sample, split_labels, text_id, wikitext_sentences
from store.readers import read_columns, read_hub_columns

log = logging.getLogger("safeport.datasets")


@dataclass(frozen=True)
class TextRow:
    text_id: str
    text: str
    idx: int
    split: str | None = None
    category: str | None = None
    pair_id: int | None = None
    side: str | None = None


@dataclass(frozen=True)
class DatasetRows:
    name: str
    kind: str
    rows: tuple[TextRow, ...]
    content_hash: str
    report: dict[str, int] = field(default_factory=dict)


def _read(resolved: Resolved, src: SourceEntry, columns: list[str]) -> dict[str, list[object]]:
    fmt = src.resolved_format()
    if src.hub is not None:
        return read_hub_columns(src.hub, src.hub_config, src.hub_split, columns)
    return read_columns(resolved.source_path(src), fmt, columns, src.encoding)


def _clean(value: object) -> str:
    if value is None:
        return ""
    return normalise(value if isinstance(value, str) else str(value))


def _content_hash(entry: DatasetEntry, rows: list[TextRow]) -> str:
    h = hashlib.sha256(entry.model_dump_json().encode())
    for r in rows:
        h.update(json.dumps([r.text_id, r.split, r.category, r.pair_id, r.side]).encode())
    return h.hexdigest()[:20]


def _texts_and_categories(
    resolved: Resolved, name: str, entry: DatasetEntry, report: dict[str, int]
) -> list[tuple[str, str | None, str | None]]:
    """(text, category, split) triples of a single-text dataset, cleaned, per-source sampled."""
    out: list[tuple[str, str | None, str | None]] = []
    for i, src in enumerate(entry.sources):
        column = src.column or "text"
        cols = [column] + ([entry.category_column] if entry.category_column else [])
        data = _read(resolved, src, cols)
        texts: list[str] = (
            wikitext_sentences(str(x) for x in data[column] if x is not None)
            if src.clean == "wikitext"
            else [_clean(x) for x in data[column]]
        )
        cats: list[str | None] = (
            [_clean(c) or None for c in data[entry.category_column]]
            if entry.category_column and src.clean != "wikitext"
            else [None] * len(texts)
        )
        keep = [j for j, t in enumerate(texts) if t]
        report["empty_dropped"] = report.get("empty_dropped", 0) + len(texts) - len(keep)
        if src.max_count is not None:
            keep = [keep[j] for j in seeded_sample(len(keep), src.max_count, entry.seed + i)]
        out.extend((texts[j], cats[j], src.split) for j in keep)
    return out


def build_single(resolved: Resolved, name: str, exclude: frozenset[str] = frozenset()) -> DatasetRows:
    """Anchors or prompts: one text per row; ``exclude`` holds text ids to leave out (pair texts)."""
    entry = resolved.datasets[name]
    report: dict[str, int] = {}
    triples = _texts_and_categories(resolved, name, entry, report)
    seen: set[str] = set()
    picked: list[tuple[str, str, str | None, str | None]] = []
    for text, cat, split in triples:
        tid = text_id(text)
        if tid in exclude:
            report["overlap_dropped"] = report.get("overlap_dropped", 0) + 1
            continue
        if entry.dedup and tid in seen:
            report["duplicates_dropped"] = report.get("duplicates_dropped", 0) + 1
            continue
        seen.add(tid)
        picked.append((tid, text, cat, split))
    if entry.max_count is not None:
        picked = [picked[j] for j in seeded_sample(len(picked), entry.max_count, entry.seed)]
    if entry.kind == "anchors":
        splits = split_labels([p[0] for p in picked], entry.splits, entry.seed)
        picked = [(p[0], p[1], p[2], s) for p, s in zip(picked, splits, strict=True)]
    rows = [TextRow(tid, text, i, split, cat) for i, (tid, text, cat, split) in enumerate(picked)]
    if not rows:
        raise ValueError(
            f"dataset {name!r} has no usable texts after cleaning; check its sources and columns"
        )
    return DatasetRows(name, entry.kind, tuple(rows), _content_hash(entry, rows), report)


def build_pairs(resolved: Resolved, name: str) -> DatasetRows:
    """Safe/unsafe pairs: two rows per pair sharing ``pair_id``; a pair with an empty side is dropped."""
    entry = resolved.datasets[name]
    safe_c, unsafe_c = str(entry.safe_column), str(entry.unsafe_column)
    report: dict[str, int] = {}
    rows: list[TextRow] = []
    pair_id = 0
    for i, src in enumerate(entry.sources):
        cols = [safe_c, unsafe_c] + ([entry.category_column] if entry.category_column else [])
        data = _read(resolved, src, cols)
        keep = list(range(len(data[safe_c])))
        if src.max_count is not None:
            keep = [keep[j] for j in seeded_sample(len(keep), src.max_count, entry.seed + i)]
        for j in keep:
            safe, unsafe = _clean(data[safe_c][j]), _clean(data[unsafe_c][j])
            if not safe or not unsafe:
                report["empty_pairs_dropped"] = report.get("empty_pairs_dropped", 0) + 1
                continue
            cat = _clean(data[entry.category_column][j]) or None if entry.category_column else None
            for side, text in (("safe", safe), ("unsafe", unsafe)):
                rows.append(TextRow(text_id(text), text, len(rows), src.split, cat, pair_id, side))
            pair_id += 1
    if not rows:
        raise ValueError(f"dataset {name!r} has no usable pairs; check safe_column/unsafe_column")
    return DatasetRows(name, entry.kind, tuple(rows), _content_hash(entry, rows), report)


def build_all(resolved: Resolved) -> dict[str, DatasetRows]:
    """Every dataset of the profile; anchors are made disjoint from the pair texts (METHOD §2)."""
    prof = resolved.profile
    pairs = build_pairs(resolved, prof.pairs)
    out = {prof.pairs: pairs}
    out[prof.anchors] = build_single(resolved, prof.anchors, frozenset(r.text_id for r in pairs.rows))
    for p in prof.prompts:
        out[p] = build_single(resolved, p)
    for ds in out.values():
        if ds.report:
            log.info("dataset %s: %s", ds.name, ", ".join(f"{k}={v}" for k, v in sorted(ds.report.items())))
    return out
