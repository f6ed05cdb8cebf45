"""Models, datasets and texts: what a store knows about its inputs (the registry part of a store handle).

Texts are kept forever (rows refer to them by id); a dataset is its rows in order
(``dataset_texts``) and their content hash, so a dataset whose rows did not change is not
registered again; a model is its representation key, with the newest version of a name current.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from safeport.store.core import StoreCore
from safeport.store.db import StoreError


class RegistryStore(StoreCore):
    """Models, datasets and texts: the part of :class:`safeport.store.store.Store` that records inputs."""

    def register_model(self, model_key: str, name: str, role: str, spec: dict[str, Any], dim: int) -> None:
        with self.transaction() as con:
            con.execute("UPDATE models SET current = false WHERE name = ? AND model_key <> ?", [name, model_key])
            con.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now(), true)",
                [
                    model_key,
                    name,
                    role,
                    spec["family"],
                    spec["model_id"],
                    spec["revision"],
                    spec["weights"],
                    json.dumps(spec, sort_keys=True),
                    dim,
                ],
            )

    def model_dim(self, model_key: str) -> int | None:
        dim = self.scalar("SELECT dim FROM models WHERE model_key = ?", [model_key])
        return None if dim is None else int(dim)

    def dataset_hash(self, dataset: str) -> str | None:
        value = self.scalar("SELECT content_hash FROM datasets WHERE dataset = ?", [dataset])
        return None if value is None else str(value)

    def register_dataset(
        self, name: str, kind: str, content_hash: str, rows: pa.Table, report: Mapping[str, Any]
    ) -> bool:
        """Replace a dataset's rows if its content changed; returns False when its rows did not change.

        ``rows`` columns: idx, text_id, text, split, category, pair_id, side. Texts are
        kept forever (activations refer to them); only the dataset's membership changes.
        Same rows with a new report (the files moved, a format changed) update only the report.
        """
        report_json = json.dumps(report, sort_keys=True)
        if self.dataset_hash(name) == content_hash:
            if self.scalar("SELECT report_json FROM datasets WHERE dataset = ?", [name]) != report_json:
                with self.transaction() as con:
                    con.execute("UPDATE datasets SET report_json = ? WHERE dataset = ?", [report_json, name])
            return False
        with self.transaction() as con:
            have = con.execute("SELECT content_hash FROM datasets WHERE dataset = ?", [name]).fetchall()
            if have and have[0][0] == content_hash:  # another writer registered it meanwhile
                return False
            con.register("_incoming", rows)
            con.execute("INSERT OR IGNORE INTO texts SELECT DISTINCT text_id, text, length(text) FROM _incoming")
            con.execute("DELETE FROM dataset_texts WHERE dataset = ?", [name])
            con.execute(
                "INSERT INTO dataset_texts SELECT ?, idx, text_id, split, category, pair_id, side FROM _incoming",
                [name],
            )
            con.execute(
                "INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?, now())",
                [name, kind, content_hash, rows.num_rows, report_json],
            )
            con.unregister("_incoming")
        return True

    def missing_texts(self, model_key: str, dataset: str) -> list[str]:
        """Text ids of ``dataset`` with no committed row for ``model_key``, sorted (deterministic)."""
        rows = self.fetchall(
            """SELECT DISTINCT dt.text_id FROM dataset_texts dt
               WHERE dt.dataset = ? AND NOT EXISTS (
                   SELECT 1 FROM activation_rows a WHERE a.model_key = ? AND a.text_id = dt.text_id)
               ORDER BY dt.text_id""",
            [dataset, model_key],
        )
        return [r[0] for r in rows]

    def texts(self, text_ids: Sequence[str]) -> list[str]:
        """Texts for ids, in the given order."""
        tbl = pa.table({"text_id": list(text_ids), "pos": np.arange(len(text_ids))})
        with self.reading() as con:
            con.register("_ids", tbl)
            try:
                rows = con.execute("SELECT t.text FROM _ids i JOIN texts t USING (text_id) ORDER BY i.pos").fetchall()
            finally:
                con.unregister("_ids")
        if len(rows) != len(text_ids):
            raise StoreError(f"{len(text_ids) - len(rows)} text id(s) are not in the store's texts table")
        return [r[0] for r in rows]
