"""Bring a store written by an older safeport up to date in place: additive, idempotent, no rows recomputed.

Called by the writer's open path (:class:`safeport.store.store.Store`) inside one
transaction, after the schema's ``CREATE ... IF NOT EXISTS``. Each step checks
whether it is needed, so running it on a current store changes nothing.

Dataset hashes (issue 14): a store written before ``rows-v1`` hashed each dataset's
catalog entry (paths, formats, description) together with its rows. The rows
themselves are in ``dataset_texts``, so the new hash is recomputed from them here and
the datasets and their units are re-pointed to it: the next run finds every unit
done and extracts nothing. Map, vector and fit keys now cover different inputs (and
code versions no longer hash comments, docstrings or import lines), so an old store's
maps and vectors are refitted once under their new keys, from the cached rows; the old
ones are then marked stale (superseded) and kept.
"""

from __future__ import annotations

import duckdb

from safeport.texts import ROWS_HASH_SCHEME, rows_hash

_SCHEME_KEY = "dataset_hash"


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Run every pending step on ``con`` (the caller holds the transaction); returns what was done."""
    done: list[str] = []
    for column in ("report_key", "summary_json"):
        con.execute(f"ALTER TABLE fits ADD COLUMN IF NOT EXISTS {column} VARCHAR")
    scheme = con.execute("SELECT value FROM meta WHERE key = ?", [_SCHEME_KEY]).fetchall()
    if not scheme or scheme[0][0] != ROWS_HASH_SCHEME:
        done += rehash_datasets(con)
        done += backfill_fit_outputs(con)
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [_SCHEME_KEY, ROWS_HASH_SCHEME])
    return done


def rehash_datasets(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Recompute each dataset's hash from its stored rows; its units follow (same rows, new key)."""
    done: list[str] = []
    datasets = con.execute("SELECT dataset, content_hash FROM datasets WHERE kind <> 'concept' ORDER BY 1").fetchall()
    for dataset, old in datasets:
        rows = con.execute(
            "SELECT text_id, split, category, pair_id, side FROM dataset_texts WHERE dataset = ? ORDER BY idx",
            [dataset],
        ).fetchall()
        new = rows_hash(rows)
        if new == old:
            continue
        con.execute("UPDATE datasets SET content_hash = ? WHERE dataset = ?", [new, dataset])
        n = con.execute(
            "UPDATE units SET dataset_hash = ? WHERE dataset = ? AND dataset_hash = ?", [new, dataset, old]
        ).fetchall()[0][0]
        done.append(f"dataset {dataset}: hash {old} -> {new} (rows unchanged; {n} unit(s) re-pointed)")
    return done


def backfill_fit_outputs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Record what each existing fit produced (from its vectors and their maps), for staleness by key."""
    before = con.execute("SELECT count(*) FROM fit_outputs").fetchall()[0][0]
    con.execute(
        """INSERT OR IGNORE INTO fit_outputs
           SELECT v.fit_key, 'vector', v.vector_key, v.name FROM vectors v JOIN fits f USING (fit_key)"""
    )
    con.execute(
        """INSERT OR IGNORE INTO fit_outputs
           SELECT DISTINCT v.fit_key, 'map', v.map_key, m.source || '->' || m.target || ':' || m.mapper
           FROM vectors v JOIN fits f USING (fit_key) JOIN maps m USING (map_key)"""
    )
    added = con.execute("SELECT count(*) FROM fit_outputs").fetchall()[0][0] - before
    return [f"fit outputs: {added} recorded from existing vectors and maps"] if added else []
