"""Per-position norms of a model's pooled tensor, recorded at extraction for the representation report.

Why: a pre-norm causal encoder often gives its first positions (BOS, a chat-template prefix)
activations far larger than the rest; those positions are the same for every prompt, and when
paired prompts differ in length that constant leaks into the pair-difference direction. The
``position_norms`` table keeps, per model and dataset, the mean L2 norm at each of the first few
pooled positions over a fixed sample of texts, and which leading positions are identical for
every prompt (what ``drop_constant_prefix`` leaves out), so the report can show the effect.

The table is created on first use (``CREATE TABLE IF NOT EXISTS``), so older stores need no
migration; a store without rows for a model simply reports "n/a".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from safeport.store.store import Store

DDL = """
CREATE TABLE IF NOT EXISTS position_norms (
    model_key VARCHAR, dataset VARCHAR, position INTEGER, mean_norm DOUBLE, n INTEGER, constant BOOLEAN,
    PRIMARY KEY (model_key, dataset, position)
);
"""


def _exists(store: Store) -> bool:
    n = store.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'position_norms'")
    return int(n or 0) == 1


def has_position_norms(store: Store, model_key: str, dataset: str) -> bool:
    if not _exists(store):
        return False
    n = store.scalar("SELECT count(*) FROM position_norms WHERE model_key = ? AND dataset = ?", [model_key, dataset])
    return int(n or 0) > 0


def save_position_norms(store: Store, model_key: str, dataset: str, norms: np.ndarray, constant: int) -> None:
    """Record the mean of ``norms`` [texts, positions] per position (NaN = past a text's end) in one transaction."""
    values = np.asarray(norms, dtype=np.float64)
    rows = []
    for p in range(values.shape[1]):
        col = values[:, p][np.isfinite(values[:, p])]
        if col.size:
            rows.append([model_key, dataset, p, float(col.mean()), int(col.size), p < constant])
    with store.transaction() as con:
        con.execute(DDL)
        con.execute("DELETE FROM position_norms WHERE model_key = ? AND dataset = ?", [model_key, dataset])
        if rows:
            con.executemany("INSERT INTO position_norms VALUES (?, ?, ?, ?, ?, ?)", rows)


def first_texts(store: Store, dataset: str, n: int) -> list[str]:
    """The first ``n`` texts of a registered dataset, in dataset order (the fixed sample the norms are taken on)."""
    rows = store.sql("SELECT text_id FROM dataset_texts WHERE dataset = ? ORDER BY idx LIMIT ?", [dataset, n])
    ids = rows.column("text_id").to_pylist()
    return store.texts(ids)


def position_norms(store: Store, model_key: str, dataset: str) -> list[dict[str, Any]]:
    """The recorded rows (position, mean_norm, n, constant) in position order; empty if none were recorded."""
    if not _exists(store):
        return []
    return store.sql(
        "SELECT position, mean_norm, n, constant FROM position_norms WHERE model_key = ? AND dataset = ? "
        "ORDER BY position",
        [model_key, dataset],
    ).to_pylist()
