"""Reading prompt/anchor/pair files: CSV, Parquet, JSONL, plain text, or a hub dataset.

One function, :func:`read_columns`, for every format, so no data set needs
code of its own. Errors name the file, the column or line, and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

csv.field_size_limit(1 << 30)


class DataFileError(ValueError):
    """A prompt/anchor file cannot be read as the catalog describes it."""


def _decode(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFileError(
            f"{path}: byte {err.start} (line {line}) is not valid {encoding}; re-encode the file as UTF-8 "
            f"or set encoding: (e.g. latin-1) on this source in the catalog"
        ) from None
    except LookupError:
        raise DataFileError(f"{path}: encoding {encoding!r} is unknown; use e.g. utf-8 or latin-1") from None


def _missing(path: Path, wanted: list[str], have: list[str]) -> DataFileError:
    miss = [c for c in wanted if c not in have]
    return DataFileError(
        f"{path}: column(s) {miss} not found; available columns: {have[:30]}. Fix column: in the catalog"
    )


def read_columns(path: Path, fmt: str, columns: list[str], encoding: str = "utf-8") -> dict[str, list[Any]]:
    """Return ``{column: values}`` for a local file; ``fmt == "text"`` yields one line per row."""
    if not path.is_file():
        raise DataFileError(f"{path}: file not found; fix the path in the catalog")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as err:  # pyarrow raises several types for a broken file
            raise DataFileError(
                f"{path}: not a readable Parquet file ({err}); check the file or its format:"
            ) from None
        if any(c not in names for c in columns):
            raise _missing(path, columns, names)
        table = pq.read_table(path, columns=columns)
        return {c: table.column(c).to_pylist() for c in columns}
    text = _decode(path, encoding)
    if fmt == "text":
        return {columns[0] if columns else "text": text.splitlines()}
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        have = list(reader.fieldnames or [])
        if any(c not in have for c in columns):
            raise _missing(path, columns, have)
        out: dict[str, list[Any]] = {c: [] for c in columns}
        try:
            for row in reader:
                for c in columns:
                    out[c].append(row.get(c))
        except csv.Error as err:
            raise DataFileError(
                f"{path}: malformed CSV at line {reader.line_num} ({err}); fix the file"
            ) from None
        return out
    if fmt == "jsonl":
        out = {c: [] for c in columns}
        seen: set[str] = set()
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(
                    f"{path}: line {lineno} is not valid JSON ({err.msg}); fix the line"
                ) from None
            if not isinstance(obj, dict):
                raise DataFileError(f"{path}: line {lineno} is not a JSON object; each line must be {{...}}")
            seen.update(obj)
            for c in columns:
                out[c].append(obj.get(c))
        if any(c not in seen for c in columns):
            raise _missing(path, columns, sorted(seen))
        return out
    raise DataFileError(f"{path}: format {fmt!r} is not supported; use csv, parquet, jsonl or text")


def read_hub_columns(
    dataset_id: str, config: str | None, split: str, columns: list[str]
) -> dict[str, list[Any]]:
    """Columns of a hub dataset (needs network or a warm HF cache)."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as err:  # network, auth and not-found all surface differently
        raise DataFileError(
            f"hub dataset {dataset_id!r} (config {config!r}, split {split!r}) could not be loaded: {err}. "
            "Check the id and your network, or download it and point path: at a local file"
        ) from None
    have = list(ds.column_names)
    if any(c not in have for c in columns):
        raise DataFileError(f"hub dataset {dataset_id!r}: column(s) {columns} not all in {have}")
    return {c: list(ds[c]) for c in columns}
