"""Turn catalog dataset entries into rows of texts (ids, splits, categories, pairs).

The reading goes through ``store.readers``; everything here is deterministic
(seeded sampling and splits), so the same files give the same rows and ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from safeport.catalog import DatasetEntry, Resolved, SourceEntry
from safeport.store.readers import (
    DataFileError,
    describe_columns,
    file_size,
    read_columns,
    read_header,
    read_hub_columns,
)
from safeport.texts import (
    normalise,
    rows_hash,
    seeded_sample,
    split_labels,
    stratified_sample,
    text_id,
    wikitext_sentences,
)

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
class SourceFile:
    """One file a source read (a glob or a folder reads several), for the dataset's report."""

    source: int  # index in the dataset's sources
    path: str
    bytes: int


@dataclass(frozen=True)
class Shortfall:
    """A ``max_count`` larger than what was there: the report says so instead of passing silently."""

    where: str  # "dataset" or "sources.N"
    requested: int
    available: int
    unit: str  # "texts" | "pairs"

    def describe(self, dataset: str) -> str:
        where = "" if self.where == "dataset" else f"{self.where}."
        return (
            f"datasets.{dataset}.{where}max_count = {self.requested}, but only {self.available} {self.unit} "
            f"are there; all {self.available} are used"
        )


@dataclass(frozen=True)
class DatasetRows:
    name: str
    kind: str
    rows: tuple[TextRow, ...]
    content_hash: str
    report: dict[str, int] = field(default_factory=dict)  # counts: rows dropped, duplicates, ...
    files: tuple[SourceFile, ...] = ()
    shortfalls: tuple[Shortfall, ...] = ()

    def report_json(self) -> dict[str, Any]:
        """What ``datasets.report_json`` records: the counts, the files read (with sizes), any max_count shortfall."""
        out: dict[str, Any] = dict(self.report)
        if self.files:
            out["files"] = [{"source": f.source, "path": f.path, "bytes": f.bytes} for f in self.files]
        if self.shortfalls:
            out["max_count_shortfalls"] = [
                {"where": s.where, "requested": s.requested, "available": s.available, "unit": s.unit}
                for s in self.shortfalls
            ]
        return out


def _columns_for(entry: DatasetEntry, src: SourceEntry) -> list[str]:
    """The columns a source must have: one text column (or safe+unsafe), plus the category column.

    A text file has one unnamed column, so it never supplies categories (its rows get none).
    """
    pairs = entry.kind == "pairs"
    cols = [str(entry.safe_column), str(entry.unsafe_column)] if pairs else [src.column or "text"]
    if entry.category_column and src.resolved_format() != "text":
        cols.append(entry.category_column)
    return cols


def check_columns(resolved: Resolved) -> None:
    """Fail early, reading only headers/schemas, if a local source lacks a column the catalog names.

    Every problem of the profile is reported at once, each with its catalog key, the
    file, the missing columns and what the file has (:func:`describe_columns`: a CSV
    header is counted, never quoted, as it may be a data row). CSV and Parquet are
    checked here; JSONL keys can vary per line and hub datasets need the network, so
    those are checked when they are read (:func:`safeport.store.readers.read_columns`).
    """
    problems: list[str] = []
    for name, entry in resolved.datasets.items():
        for i, src in enumerate(entry.sources):
            if src.hub is not None:
                continue
            for path in resolved.source_files(src):
                have = read_header(path, src.resolved_format(), src.encoding)
                if have is None:
                    continue
                missing = [c for c in _columns_for(entry, src) if c not in have]
                if missing:
                    problems.append(
                        f"  - datasets.{name}.sources.{i} ({path}): column(s) {missing} not found; "
                        + describe_columns(have, src.resolved_format()).replace("FILE", str(path))
                    )
    if problems:
        raise DataFileError(
            f"{resolved.path}: profile {resolved.name!r} names columns its files do not have:\n"
            + "\n".join(problems)
            + "\nFix column: (or safe_column/unsafe_column/category_column) in the catalog"
        )


def _read(
    resolved: Resolved, src: SourceEntry, columns: list[str], index: int, files: list[SourceFile]
) -> dict[str, list[object]]:
    """A source's columns; a glob or folder source is its files' rows concatenated in file order."""
    fmt = src.resolved_format()
    if src.hub is not None:
        return read_hub_columns(src.hub, src.hub_config, src.hub_split, columns)
    out: dict[str, list[object]] = {}
    for path in resolved.source_files(src):
        files.append(SourceFile(index, str(path), file_size(path)))
        data = read_columns(path, fmt, columns, src.encoding)
        for column, values in data.items():
            out.setdefault(column, []).extend(values)
    return out


def _clean(value: object) -> str:
    if value is None:
        return ""
    return normalise(value if isinstance(value, str) else str(value))


def content_hash(rows: list[TextRow] | tuple[TextRow, ...]) -> str:
    """The dataset's identity: its rows (text id, split, category, pair id, side), in order, and nothing else."""
    return rows_hash((r.text_id, r.split, r.category, r.pair_id, r.side) for r in rows)


def _texts_and_categories(
    resolved: Resolved,
    entry: DatasetEntry,
    report: dict[str, int],
    files: list[SourceFile],
    shortfalls: list[Shortfall],
) -> list[tuple[str, str | None, str | None]]:
    """(text, category, split) triples of a single-text dataset, cleaned, per-source sampled."""
    out: list[tuple[str, str | None, str | None]] = []
    for i, src in enumerate(entry.sources):
        cols = _columns_for(entry, src)
        column, cat_column = cols[0], (cols[1] if len(cols) > 1 else None)
        data = _read(resolved, src, cols, i, files)
        texts: list[str] = (
            wikitext_sentences(str(x) for x in data[column] if x is not None)
            if src.clean == "wikitext"
            else [_clean(x) for x in data[column]]
        )
        cats: list[str | None] = (
            [_clean(c) or None for c in data[cat_column]]
            if cat_column and src.clean != "wikitext"
            else [None] * len(texts)
        )
        keep = [j for j, t in enumerate(texts) if t]
        report["empty_dropped"] = report.get("empty_dropped", 0) + len(texts) - len(keep)
        if src.max_count is not None:
            if src.max_count > len(keep):
                shortfalls.append(Shortfall(f"sources.{i}", src.max_count, len(keep), "texts"))
            keep = [keep[j] for j in seeded_sample(len(keep), src.max_count, entry.seed + i)]
        out.extend((texts[j], cats[j], src.split) for j in keep)
    return out


def build_single(resolved: Resolved, name: str, exclude: frozenset[str] = frozenset()) -> DatasetRows:
    """Anchors or prompts: one text per row; ``exclude`` holds text ids to leave out (pair texts)."""
    entry = resolved.datasets[name]
    report: dict[str, int] = {}
    files: list[SourceFile] = []
    shortfalls: list[Shortfall] = []
    triples = _texts_and_categories(resolved, entry, report, files, shortfalls)
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
        if entry.max_count > len(picked):
            shortfalls.append(Shortfall("dataset", entry.max_count, len(picked), "texts"))
        picked = [picked[j] for j in seeded_sample(len(picked), entry.max_count, entry.seed)]
    if entry.kind == "anchors":
        splits = split_labels([p[0] for p in picked], entry.splits, entry.seed)
        picked = [(p[0], p[1], p[2], s) for p, s in zip(picked, splits, strict=True)]
    rows = [TextRow(tid, text, i, split, cat) for i, (tid, text, cat, split) in enumerate(picked)]
    if not rows:
        raise DataFileError(
            f"dataset {name!r} has no usable texts after cleaning ({_describe(report)}); "
            "check its sources, their column: and that the files are not empty"
        )
    return DatasetRows(name, entry.kind, tuple(rows), content_hash(rows), report, tuple(files), tuple(shortfalls))


def _describe(report: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(report.items())) or "no rows read"


def build_pairs(resolved: Resolved, name: str) -> DatasetRows:
    """Safe/unsafe pairs: two rows per pair sharing ``pair_id``.

    A pair with an empty side is dropped; with ``dedup`` a pair whose two texts
    both repeat an earlier pair is dropped too. Both are counted in the report.
    ``max_count`` counts pairs at both levels: a source's samples that source's usable
    pairs (seeded); the dataset's samples the pairs of all sources after cleaning and
    dedup, seeded and stratified by category (each category keeps its share, to within
    one pair, and within a category each split keeps its share), both sides together.
    """
    entry = resolved.datasets[name]
    safe_c, unsafe_c = str(entry.safe_column), str(entry.unsafe_column)
    report: dict[str, int] = {}
    files: list[SourceFile] = []
    shortfalls: list[Shortfall] = []
    pairs: list[tuple[str, str, str | None, str | None]] = []  # safe, unsafe, category, split
    seen: set[tuple[str, str]] = set()
    for i, src in enumerate(entry.sources):
        data = _read(resolved, src, _columns_for(entry, src), i, files)
        sides = [(_clean(s), _clean(u)) for s, u in zip(data[safe_c], data[unsafe_c], strict=True)]
        keep = [j for j, (safe, unsafe) in enumerate(sides) if safe and unsafe]
        if len(keep) < len(sides):
            report["empty_pairs_dropped"] = report.get("empty_pairs_dropped", 0) + len(sides) - len(keep)
        if src.max_count is not None:
            if src.max_count > len(keep):
                shortfalls.append(Shortfall(f"sources.{i}", src.max_count, len(keep), "pairs"))
            keep = [keep[j] for j in seeded_sample(len(keep), src.max_count, entry.seed + i)]
        for j in keep:
            safe, unsafe = sides[j]
            key = (text_id(safe), text_id(unsafe))
            if entry.dedup and key in seen:
                report["duplicate_pairs_dropped"] = report.get("duplicate_pairs_dropped", 0) + 1
                continue
            seen.add(key)
            cat = _clean(data[entry.category_column][j]) or None if entry.category_column else None
            pairs.append((safe, unsafe, cat, src.split))
    if entry.max_count is not None:
        if entry.max_count > len(pairs):
            shortfalls.append(Shortfall("dataset", entry.max_count, len(pairs), "pairs"))
        picked = stratified_sample([(cat, split) for _, _, cat, split in pairs], entry.max_count, entry.seed)
        pairs = [pairs[j] for j in picked]
    rows: list[TextRow] = []
    for pair_id, (safe, unsafe, cat, split) in enumerate(pairs):
        for side, text in (("safe", safe), ("unsafe", unsafe)):
            rows.append(TextRow(text_id(text), text, len(rows), split, cat, pair_id, side))
    if not rows:
        raise DataFileError(
            f"dataset {name!r} has no usable pairs ({_describe(report)}); check safe_column/unsafe_column "
            "and that the files are not empty"
        )
    return DatasetRows(name, entry.kind, tuple(rows), content_hash(rows), report, tuple(files), tuple(shortfalls))


def build_all(resolved: Resolved) -> dict[str, DatasetRows]:
    """Every dataset of the profile; anchors are made disjoint from the pair texts (METHOD §2).

    Columns are checked first (:func:`check_columns`), so a misspelt column fails
    in a second with every problem listed, before any file is read in full.
    """
    check_columns(resolved)
    prof = resolved.profile
    pairs = build_pairs(resolved, prof.pairs)
    out = {prof.pairs: pairs}
    out[prof.anchors] = build_single(resolved, prof.anchors, frozenset(r.text_id for r in pairs.rows))
    for p in prof.prompts:
        out[p] = build_single(resolved, p)
    for name, entry in resolved.datasets.items():  # the token cache's own sets (safedig: datasets)
        if name not in out:
            out[name] = build_pairs(resolved, name) if entry.kind == "pairs" else build_single(resolved, name)
    for ds in out.values():
        if ds.report:
            log.info("dataset %s: %s", ds.name, ", ".join(f"{k}={v}" for k, v in sorted(ds.report.items())))
        for short in ds.shortfalls:
            log.warning("dataset %s: %s", ds.name, short.describe(ds.name))
    return out
