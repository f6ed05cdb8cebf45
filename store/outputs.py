"""Content-addressed generated outputs: PNG files (``<store>/outputs``, or the profile's ``outputs:``
path or fsspec URL) plus DuckDB records.

An output's key hashes everything that decides its pixels (target model key, method and the
content hash of the steering vector, α, seed, prompt text id, generation settings key), so
the same request always maps to the same file and a rerun can skip it. The commit protocol
is the activation shards' one:

1. the PNG(s) are written to a temporary name, fsynced and renamed into place (atomic);
2. only then one DuckDB transaction records the output in ``generations`` (and clears any
   stale scores of that key).

An output is done only when its record is committed *and* its files exist, so a crash
between 1 and 2 leaves a file that the rerun simply overwrites, and nothing is generated
twice once committed. Scores go to ``scores`` (one row per output and metric), each batch in
one transaction. Prompt texts never enter these tables, only their ``text_id``.

Both tables are created here on first use (``CREATE TABLE IF NOT EXISTS``), so the store's
core schema does not depend on the evaluation stage.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from safeport.keys import content_key
from safeport.store.location import OutputLocation
from safeport.store.store import Store, StoreError

DDL = """
CREATE TABLE IF NOT EXISTS generations (
    output_key VARCHAR PRIMARY KEY, target VARCHAR, target_key VARCHAR, method VARCHAR, vector_id VARCHAR,
    alpha DOUBLE, seed INTEGER, text_id VARCHAR, settings_key VARCHAR, settings_json VARCHAR, n_images INTEGER,
    files VARCHAR, checksum VARCHAR, seconds DOUBLE, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS scores (
    output_key VARCHAR, metric VARCHAR, value DOUBLE, flagged BOOLEAN, detail_json VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (output_key, metric));
"""


@dataclass(frozen=True)
class OutputSpec:
    """What decides one output; :attr:`key` is its content address."""

    target: str
    target_key: str
    method: str
    vector_id: str  # content hash of the float32 vector ("" for the original model)
    alpha: float
    seed: int
    text_id: str
    settings_key: str

    @property
    def key(self) -> str:
        parts = [self.target_key, self.method, self.vector_id, float(self.alpha), int(self.seed)]
        parts += [self.text_id, self.settings_key]
        return content_key(parts, 24)


@dataclass(frozen=True)
class ScoreRow:
    output_key: str
    metric: str
    value: float
    flagged: bool | None = None
    detail: Mapping[str, Any] | None = None


def ensure_tables(store: Store) -> None:
    """Create ``generations`` and ``scores`` if missing (no-op on a read-only handle; once per handle)."""
    if not store.read_only:
        store.ensure_schema("outputs", DDL)


def _has_tables(store: Store) -> bool:
    n = store.scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('generations', 'scores')",
    )
    return int(n or 0) == 2


def file_names(key: str, n_images: int) -> list[str]:
    """``<key>.png`` for an image, ``<key>.f0.png`` ... for video frames."""
    if n_images < 1:
        raise ValueError(f"an output has at least one image, got {n_images}")
    return [f"{key}.png"] if n_images == 1 else [f"{key}.f{i}.png" for i in range(n_images)]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class WrittenOutput:
    """An output whose files are on disk (step 1), ready to be recorded (step 2)."""

    spec: OutputSpec
    files: tuple[str, ...]
    checksum: str
    settings_json: str
    seconds: float


def write_output_files(
    store: Store, spec: OutputSpec, images: Sequence[Image.Image], settings: Mapping[str, Any], seconds: float
) -> WrittenOutput:
    """Step 1: write the output's PNGs atomically; nothing is recorded (a rerun overwrites them)."""
    return write_output_files_to(store.outputs, spec, images, settings, seconds)


def write_output_files_to(
    where: OutputLocation,
    spec: OutputSpec,
    images: Sequence[Image.Image],
    settings: Mapping[str, Any],
    seconds: float,
) -> WrittenOutput:
    """Step 1 without a store handle: what a Dask worker runs (it never opens DuckDB)."""
    if not images:
        raise ValueError(f"output {spec.key} has no images; a generation returns at least one")
    names = file_names(spec.key, len(images))
    blobs = [_png_bytes(image) for image in images]
    digest = hashlib.sha256()
    for data in blobs:
        digest.update(data)
    try:
        where.write(names, blobs)
    except OSError as err:
        raise StoreError(
            f"writing output {spec.key} to {where} failed: {err}. Nothing was recorded for it; free disk space "
            "(or check the location and its credentials) and rerun (committed outputs are kept)"
        ) from None
    settings_json = json.dumps(dict(settings), sort_keys=True, default=str)
    return WrittenOutput(spec, tuple(names), digest.hexdigest()[:32], settings_json, float(seconds))


def _files_checksum(where: OutputLocation, files: Sequence[str]) -> str | None:
    digest = hashlib.sha256()
    for name in files:
        try:
            digest.update(where.read(name))
        except OSError:
            return None
    return digest.hexdigest()[:32]


def check_written(store: Store, written: Sequence[WrittenOutput]) -> None:
    """Refuse outputs whose files in this store do not match their checksum (written elsewhere, or damaged).

    The flow process runs this on what Dask workers return, before recording anything.
    """
    for w in written:
        got = _files_checksum(store.outputs, w.files)
        if got != w.checksum:
            where = "missing" if got is None else "different bytes"
            raise StoreError(
                f"output {w.spec.key}: a worker reported files {list(w.files)} that are {where} at "
                f"{store.outputs}; workers must reach the store's outputs location (a shared filesystem or an "
                "`outputs:` URL in the profile for a remote cluster)"
            )


def record_outputs(store: Store, written: Sequence[WrittenOutput]) -> None:
    """Step 2: record a batch of written outputs in one transaction (joins the caller's, if any)."""
    ensure_tables(store)
    if not written:
        return
    with store.transaction() as con:
        con.register("_gone", _keys_table([w.spec.key for w in written]))
        con.execute("DELETE FROM scores WHERE output_key IN (SELECT output_key FROM _gone)")
        con.unregister("_gone")
        con.executemany(
            "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                [
                    w.spec.key,
                    w.spec.target,
                    w.spec.target_key,
                    w.spec.method,
                    w.spec.vector_id,
                    float(w.spec.alpha),
                    int(w.spec.seed),
                    w.spec.text_id,
                    w.spec.settings_key,
                    w.settings_json,
                    len(w.files),
                    json.dumps(list(w.files)),
                    w.checksum,
                    w.seconds,
                ]
                for w in written
            ],
        )


def _keys_table(keys: Sequence[str]) -> pa.Table:
    return pa.table({"output_key": pa.array(list(dict.fromkeys(keys)), pa.string())})


def done_keys(store: Store, keys: Sequence[str]) -> set[str]:
    """Keys among ``keys`` whose record is committed and whose files are all on disk."""
    ensure_tables(store)
    if not keys or not _has_tables(store):
        return set()
    with store.reading() as con:
        con.register("_want", _keys_table(keys))
        try:
            rows = con.execute(
                "SELECT g.output_key, g.files FROM generations g JOIN _want USING (output_key)"
            ).fetchall()
        finally:
            con.unregister("_want")
    listed = {key: json.loads(files) for key, files in rows}
    present = store.outputs.present(name for names in listed.values() for name in names)
    return {key for key, names in listed.items() if all(n in present for n in names)}


def load_images(store: Store, key: str, verify: bool = True) -> list[Image.Image]:
    """The committed images of one output (checksum-verified), in frame order."""
    row = None
    if _has_tables(store):
        row = store.one("SELECT files, checksum FROM generations WHERE output_key = ?", [key])
    if row is None:
        raise StoreError(f"output {key} is not recorded in {store.root}; run `safeport eval` to generate it")
    digest = hashlib.sha256()
    images: list[Image.Image] = []
    for name in json.loads(row[0]):
        try:
            data = store.outputs.read(name)
        except OSError as err:
            raise StoreError(
                f"output file {store.outputs.where(name)} cannot be read ({err.strerror or err}); rerun "
                "`safeport eval`, which regenerates it"
            ) from None
        digest.update(data)
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(image)
    if verify and digest.hexdigest()[:32] != row[1]:
        raise StoreError(f"output {key} fails its checksum: its PNGs were changed on disk; delete them and rerun")
    return images


def save_scores(store: Store, rows: Sequence[ScoreRow]) -> None:
    """Record one batch of scores in one transaction (a rescore replaces the old value)."""
    ensure_tables(store)
    if not rows:
        return
    tbl = pa.table(
        {
            "output_key": pa.array([r.output_key for r in rows], pa.string()),
            "metric": pa.array([r.metric for r in rows], pa.string()),
            "value": pa.array([float(r.value) for r in rows], pa.float64()),
            "flagged": pa.array([r.flagged for r in rows], pa.bool_()),
            "detail_json": pa.array(
                [None if r.detail is None else json.dumps(dict(r.detail), sort_keys=True, default=str) for r in rows],
                pa.string(),
            ),
        }
    )
    with store.transaction() as con:
        con.register("_scores", tbl)
        con.execute(
            "INSERT OR REPLACE INTO scores SELECT output_key, metric, value, flagged, detail_json, now() FROM _scores"
        )
        con.unregister("_scores")


def unscored(store: Store, keys: Sequence[str], metric: str) -> list[str]:
    """Committed outputs among ``keys`` without a ``metric`` score, in the given order."""
    ensure_tables(store)
    if not keys or not _has_tables(store):
        return []
    with store.reading() as con:
        con.register("_want", _keys_table(keys))
        try:
            rows = con.execute(
                "SELECT w.output_key FROM _want w JOIN generations g USING (output_key) "
                "WHERE NOT EXISTS (SELECT 1 FROM scores s WHERE s.output_key = w.output_key AND s.metric = ?)",
                [metric],
            ).fetchall()
        finally:
            con.unregister("_want")
    have = {r[0] for r in rows}
    return [k for k in dict.fromkeys(keys) if k in have]


def scores_for(store: Store, keys: Sequence[str]) -> pa.Table:
    """Columns output_key, metric, value, flagged for the given outputs."""
    if not keys or not _has_tables(store):
        return pa.table({"output_key": [], "metric": [], "value": [], "flagged": []})
    with store.reading() as con:
        con.register("_want", _keys_table(keys))
        try:
            return con.sql(
                "SELECT s.output_key, s.metric, s.value, s.flagged FROM scores s JOIN _want USING (output_key)"
            ).to_arrow_table()
        finally:
            con.unregister("_want")


def generations_for(store: Store, keys: Sequence[str]) -> pa.Table:
    """The ``generations`` rows of the given outputs."""
    if not keys or not _has_tables(store):
        return pa.table({"output_key": [], "seconds": []})
    with store.reading() as con:
        con.register("_want", _keys_table(keys))
        try:
            return con.sql("SELECT g.* FROM generations g JOIN _want USING (output_key)").to_arrow_table()
        finally:
            con.unregister("_want")


def replace_results(store: Store, run_key: str, kind: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Replace this run's aggregate rows in ``eval_results`` in one transaction (a rerun does not append)."""
    cols = ["source", "target", "method", "category", "metric", "alpha", "value", "n"]
    types = [pa.string()] * 5 + [pa.float64(), pa.float64(), pa.int32()]
    tbl = pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in zip(cols, types, strict=True)})
    with store.transaction() as con:
        con.execute("DELETE FROM eval_results WHERE fit_key = ? AND kind = ?", [run_key, kind])
        if rows:
            con.register("_res", tbl)
            con.execute(f"INSERT INTO eval_results SELECT ?, ?, {', '.join(cols)}, now() FROM _res", [run_key, kind])
            con.unregister("_res")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def reference_images(folder: Path, batch: int = 64) -> Iterator[list[Image.Image]]:
    """The images of a reference folder (e.g. FID's real images), sorted by name, ``batch`` at a time."""
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as err:
        raise StoreError(
            f"reference folder {folder} cannot be listed ({err.strerror}); pass a folder of images"
        ) from None
    if len(paths) < 2:
        raise StoreError(f"reference folder {folder} has {len(paths)} images ({', '.join(IMAGE_SUFFIXES)}); give >= 2")
    for start in range(0, len(paths), batch):
        out = []
        for p in paths[start : start + batch]:
            with Image.open(p) as img:
                out.append(img.convert("RGB"))
        yield out


def measured_seconds(store: Store, target_key: str, settings_key: str) -> tuple[float | None, int]:
    """Median seconds per committed output of one target and settings, and how many outputs it is from."""
    if not _has_tables(store):
        return None, 0
    row = store.one(
        "SELECT median(seconds), count(*) FROM generations WHERE target_key = ? AND settings_key = ?",
        [target_key, settings_key],
    )
    if row is None or not row[1]:
        return None, 0
    return float(row[0]), int(row[1])
