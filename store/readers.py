"""Reading prompt/anchor/pair files: CSV, Parquet, JSONL, plain text, or a hub dataset.

One function, :func:`read_columns`, for every format, so no data set needs
code of its own. Errors name the file, the column or line, and the fix, but
never quote a row: the rows are unsafe prompts, and error messages end up in
logs and terminals. That includes a CSV header, which may be a headerless file's
first row (see :func:`describe_columns`).
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import re
from pathlib import Path
from typing import Any

csv.field_size_limit(1 << 30)

# Rows end at \r\n, \r or \n only. str.splitlines() would also split at \x0b, \x0c, \x1c-\x1e,
# \x85, U+2028 and U+2029, which JSON allows raw inside strings and which may sit inside a prompt.
_NEWLINE = re.compile(r"\r\n|\r|\n")
_NEWLINE_BYTES = re.compile(rb"\r\n|\r|\n")
# Scalar JSON values that make sense as a text or category cell.
_SCALARS = (str, int, float, bool, type(None))
# A catalog path with one of these characters is a glob pattern (``prompts/*.txt``).
_GLOB_MAGIC = re.compile(r"[*?[]")
_DIGITS = re.compile(r"(\d+)")
# The files a folder source reads, per format: those with the format's suffixes.
FORMAT_SUFFIXES = {
    "csv": (".csv",),
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson"),
    "text": (".txt",),
}


class DataFileError(ValueError):
    """A prompt/anchor file cannot be read as the catalog describes it."""


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` split at ``\\r\\n``, ``\\r`` and ``\\n`` only (a final newline adds no line)."""
    lines = _NEWLINE.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _codec(encoding: str) -> str:
    """The codec to decode with: UTF-8 reads (and drops) a byte-order mark."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise DataFileError(f"encoding {encoding!r} is unknown; use e.g. utf-8 or latin-1") from None
    if not getattr(info, "_is_text_encoding", True) or info.name in ("idna", "punycode"):
        raise DataFileError(
            f"encoding {encoding!r} is not a text encoding (it transforms bytes or names); use e.g. utf-8 or latin-1"
        )
    return "utf-8-sig" if info.name == "utf-8" else info.name


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataFileError(f"{path}: file not found; fix the path in the catalog")


def _read_bytes(path: Path) -> bytes:
    _require_file(path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataFileError(f"{path}: cannot be read ({err.strerror}); check its permissions") from None


def _decode(path: Path, encoding: str) -> str:
    raw = _read_bytes(path)
    enc = _codec(encoding)
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as err:
        line = len(_NEWLINE_BYTES.split(raw[: err.start]))
        hint = (
            "it starts with a UTF-16 byte-order mark: set encoding: utf-16"
            if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
            else "re-encode the file as UTF-8 or set encoding: (e.g. latin-1) on this source in the catalog"
        )
        raise DataFileError(f"{path}: byte {err.start} (line {line}) is not valid {encoding}; {hint}") from None


# A column name that is listed in an error: short, one word. Anything else may be a row of data.
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")


def _looks_like_data(cells: list[str]) -> bool:
    """Whether a header row reads like a row of texts (a long or multi-word cell)."""
    return any(len(c) > 40 or len(c.split()) > 3 for c in cells)


def describe_columns(have: list[str], fmt: str) -> str:
    """What to say about the columns a file has, without ever quoting a row of data.

    A CSV header cannot be told from a data row (a headerless file's first row is read as
    the header), so its cells are only counted. Parquet schemas, JSONL keys and hub
    columns are names, listed (30 at most) when every one looks like a name; otherwise
    they are counted too (a Parquet file converted from a headerless CSV has a prompt as
    a column name).
    """
    n = len(have)
    if n and fmt != "csv" and all(_NAME_LIKE.fullmatch(c) for c in have):
        return f"available columns: {have[:30] + (['...'] if n > 30 else [])}"
    if n and _looks_like_data(have):
        return (
            f"the file has {n} column(s) and its first row looks like data, not a header (not shown: it may be "
            "a prompt); if the file has no header line, add a header line naming the columns"
        )
    if fmt == "csv":
        return (
            f"its header row has {n} column(s) (not shown: in a file without a header it would be a prompt); "
            "see them with `head -n 1 FILE`"
        )
    return f"it has {n} column(s) (not shown: some do not look like names)"


def _missing(path: Path | str, wanted: list[str], have: list[str], fmt: str) -> DataFileError:
    miss = [c for c in wanted if c not in have]
    return DataFileError(
        f"{path}: column(s) {miss} not found; {describe_columns(have, fmt).replace('FILE', str(path))}. Fix column: "
        "(or safe_column/unsafe_column/category_column) in the catalog"
    )


def is_pattern(path: str | Path) -> bool:
    """Whether a catalog path is a glob pattern (it holds ``*``, ``?`` or ``[``)."""
    return bool(_GLOB_MAGIC.search(str(path)))


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key: names in order, numbers compared as numbers (``2.txt`` before ``10.txt``)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(str(path)) if part]


def glob_files(root: Path, pattern: str) -> list[Path]:
    """The files a glob ``pattern`` matches (relative to ``root`` unless absolute), in reading order.

    ``**`` recurses; hidden files match only a pattern that names them. Only the pattern
    is a pattern: a ``[`` in ``root`` (the catalog's folder) is taken literally. No match
    is an error naming the pattern.
    """
    p = Path(pattern).expanduser()
    base = Path(p.anchor) if p.is_absolute() else root
    rel = str(p.relative_to(p.anchor)) if p.is_absolute() else pattern
    files = [base / m for m in glob.glob(rel, root_dir=base, recursive=True) if (base / m).is_file()]
    if not files:
        raise DataFileError(
            f"path pattern {pattern!r} matches no file (looked in {str(base)!r}); fix the pattern or put the "
            "files there (relative patterns are read from the catalog's folder)"
        )
    return sorted(files, key=_natural)


def source_files(path: Path, fmt: str) -> list[Path]:
    """The files one local source reads: ``path`` itself, or a folder's files of format ``fmt``.

    A folder is read non-recursively: its files with the format's suffixes (``.txt`` for
    text, ``.csv``, ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``), hidden files skipped,
    sorted by name with numbers compared as numbers (``2.txt`` before ``10.txt``).
    """
    if path.is_dir():
        suffixes = FORMAT_SUFFIXES.get(fmt, ())
        files = [
            p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
        ]
        if not files:
            raise DataFileError(
                f"folder {str(path)!r} holds no {' / '.join(suffixes) or fmt} files (format {fmt}); put the files "
                "there, set format: to the files' format, or name them with a pattern such as folder/*.ext"
            )
        return sorted(files, key=_natural)
    _require_file(path)
    return [path]


def file_size(path: Path) -> int:
    """Bytes of a file (for a dataset's report of what it read); -1 if it vanished meanwhile."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def read_header(path: Path, fmt: str, encoding: str = "utf-8") -> list[str] | None:
    """Column names of a local file, reading only its header or schema.

    ``None`` where the columns cannot be known cheaply: a text file has a
    single, unnamed column, and a JSONL file's keys can differ per line.
    """
    if fmt == "parquet":
        import pyarrow.parquet as pq

        _require_file(path)
        try:
            return list(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises several types for a broken file
            raise DataFileError(f"{path}: not a readable Parquet file ({err}); check the file or its format:") from None
    if fmt == "csv":
        _require_file(path)
        try:
            with path.open(encoding=_codec(encoding), newline="") as f:
                return list(next(csv.reader(f), []))
        except UnicodeDecodeError:
            _decode(path, encoding)  # raises with the byte offset and line
            raise  # pragma: no cover - _decode always raises here
        except (OSError, csv.Error) as err:
            raise DataFileError(f"{path}: cannot read the CSV header ({err}); fix the file") from None
    return None


def _read_parquet(path: Path, columns: list[str]) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataFileError(f"{path}: not a readable Parquet file ({err}); check the file or its format:") from None
    if any(c not in schema.names for c in columns):
        raise _missing(path, columns, list(schema.names), "parquet")
    for c in columns:
        kind = schema.field(c).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)
            or pa.types.is_null(kind)
            or str(kind) == "string_view"
        ):
            raise DataFileError(f"{path}: column {c!r} has type {kind}, not text; point the catalog at a string column")
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as err:  # a valid footer can still hide a broken data page
        raise DataFileError(f"{path}: Parquet data cannot be read ({err}); check or rewrite the file") from None
    return {c: table.column(c).to_pylist() for c in columns}


def _read_csv(path: Path, text: str, columns: list[str]) -> dict[str, list[Any]]:
    if not text.strip():
        raise DataFileError(f"{path}: the file is empty (no header row); add a header line with the columns")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        have = list(reader.fieldnames or [])
    except csv.Error as err:
        raise DataFileError(f"{path}: malformed CSV header ({err}); fix the file") from None
    if any(c not in have for c in columns):
        raise _missing(path, columns, have, "csv")
    out: dict[str, list[Any]] = {c: [] for c in columns}
    try:
        for row in reader:
            for c in columns:
                out[c].append(row.get(c))
    except csv.Error as err:
        raise DataFileError(f"{path}: malformed CSV at line {reader.line_num} ({err}); fix the file") from None
    return out


def _read_jsonl(path: Path, text: str, columns: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in columns}
    seen: set[str] = set()
    n_objects = 0
    for lineno, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:  # ValueError: also an int beyond Python's 4300-digit limit
            why = (
                err.msg
                if isinstance(err, json.JSONDecodeError)
                else "nested too deeply"
                if isinstance(err, RecursionError)
                else "an integer of more than 4300 digits"
            )
            raise DataFileError(
                f"{path}: line {lineno} is not valid JSON ({why}); fix the line (one JSON object per line)"
            ) from None
        if not isinstance(obj, dict):
            raise DataFileError(
                f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an object; each line must be {{...}}"
            )
        n_objects += 1
        seen.update(obj)
        for c in columns:
            value = obj.get(c)
            if not isinstance(value, _SCALARS):
                raise DataFileError(
                    f"{path}: line {lineno}: {c!r} is a JSON {type(value).__name__}, not text; "
                    "make it a string or point the catalog at another key"
                )
            out[c].append(value)
    if n_objects == 0:
        raise DataFileError(f"{path}: no JSON objects in the file; add one object per line")
    if any(c not in seen for c in columns):
        raise _missing(path, columns, sorted(seen), "jsonl")
    return out


def read_columns(path: Path, fmt: str, columns: list[str], encoding: str = "utf-8") -> dict[str, list[Any]]:
    """Return ``{column: values}`` for a local file; ``fmt == "text"`` yields one line per row."""
    if fmt not in ("csv", "parquet", "jsonl", "text"):
        raise DataFileError(f"{path}: format {fmt!r} is not supported; use csv, parquet, jsonl or text")
    if fmt == "parquet":
        _require_file(path)
        return _read_parquet(path, columns)
    if fmt == "text" and len(columns) > 1:
        raise DataFileError(
            f"{path}: a text file has one column (one text per line), not {columns}; use csv or jsonl for extra columns"
        )
    text = _decode(path, encoding)
    if fmt == "text":
        return {columns[0] if columns else "text": split_lines(text)}
    if fmt == "csv":
        return _read_csv(path, text, columns)
    return _read_jsonl(path, text, columns)


def read_hub_columns(dataset_id: str, config: str | None, split: str, columns: list[str]) -> dict[str, list[Any]]:
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
        raise _missing(f"hub dataset {dataset_id!r}", columns, have, "hub")
    return {c: list(ds[c]) for c in columns}
