"""``safeport recover``: bring back a store whose ``meta.duckdb`` is damaged.

What is recoverable: the Zarr arrays (rows, maps, vectors) and the output files live outside
``meta.duckdb`` and are intact. Every writer run that ends without error leaves a copy of the
committed metadata, ``meta.snapshot.duckdb`` (see :meth:`safeport.store.store.Store.snapshot`).
Recovery moves the damaged file aside (it is kept, renamed), puts the snapshot in its place
and reports what the restored metadata holds. Everything committed up to that snapshot is
back, checksums included (``safeport verify`` checks the arrays against them); work committed
after it has its arrays or files on disk but no records, so rerunning the same jobs recomputes
exactly that (shards are rewritten in place, unreferenced leftovers go with ``safeport gc``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from safeport.store.db import DB_NAME, SNAPSHOT_NAME, StoreDamagedError, StoreError, classify, database, default_wait


@dataclass(frozen=True)
class Recovery:
    damaged_kept_as: Path
    snapshot_taken: float  # epoch seconds (the snapshot file's modification time)
    units: int
    shards: int
    vectors: int
    outputs: int


def probe(root: Path | str) -> None:
    """Raise :class:`StoreDamagedError` if a store's ``meta.duckdb`` cannot be read (no other check)."""
    root = Path(root)
    db = database(root)
    db.close_idle()  # a kept connection would answer from before the file changed
    with db.reading(default_wait(False), linger=False) as con:
        con.execute("SELECT count(*) FROM meta").fetchall()


def _counts(path: Path) -> tuple[int, int, int, int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        units, shards, vectors = (
            int(con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]) for t in ("units", "shards", "vectors")
        )
        outputs = (
            int(con.execute("SELECT count(*) FROM generations").fetchall()[0][0]) if "generations" in tables else 0
        )
        return units, shards, vectors, outputs
    finally:
        con.close()


def recover(root: Path | str) -> Recovery:
    """Replace a damaged ``meta.duckdb`` by the last snapshot; the damaged file is kept beside it."""
    root = Path(root)
    db = database(root)
    path, snapshot = root / DB_NAME, root / SNAPSHOT_NAME
    if not path.exists() and not snapshot.exists():
        raise StoreError(f"no store at {root}; check --store")
    if path.exists():
        try:
            probe(root)
        except StoreDamagedError:
            pass
        else:
            raise StoreError(f"store metadata {path} is readable, not damaged; nothing to recover (`safeport verify`)")
    if not snapshot.is_file():
        raise StoreError(
            f"store {root} has no metadata snapshot ({SNAPSHOT_NAME}; one is kept after each successful writer run). "
            f"Move {path} aside and rerun `safeport run` with the profile that built the store: it rebuilds the "
            "metadata and recomputes the rows"
        )
    try:
        counts = _counts(snapshot)
    except duckdb.Error as err:
        raise StoreError(
            f"the snapshot {snapshot} cannot be read either ({classify(snapshot, err) or err}); move both files "
            "aside and rerun `safeport run` to rebuild the store"
        ) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = path.with_name(f"{DB_NAME}.damaged-{stamp}")
    with db.write_lock(default_wait(True)):
        if path.exists():
            os.replace(path, kept)
        wal = path.with_name(f"{DB_NAME}.wal")
        if wal.exists():
            os.replace(wal, kept.with_name(f"{kept.name}.wal"))
        tmp = path.with_name(f".{DB_NAME}.recover.tmp")
        try:
            shutil.copyfile(snapshot, tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return Recovery(kept, snapshot.stat().st_mtime, *counts)
