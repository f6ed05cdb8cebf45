"""Small catalogs over the shipped real data and tiny config-built models, for flow tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from safeport.store import artifacts
from safeport.store.store import Store
from tests.conftest import REPO
from tests.tiny_models import tiny_bert, tiny_llama


def tiny_catalog(
    tmp: Path,
    anchors: int = 40,
    pairs: int = 12,
    prompts: int = 10,
    shard_rows: int = 8,
    extra_models: dict[str, Any] | None = None,
    arrays: str | None = None,
) -> Path:
    """A catalog with a tiny Llama source and a tiny BERT target; returns its path.

    ``arrays`` sets the profile's arrays location (a path or fsspec URL).
    """
    models_dir = tmp / "models"
    if not (models_dir / "llama").exists():
        tiny_llama(models_dir / "llama")
        tiny_bert(models_dir / "bert")
    data = REPO / "data"
    catalog: dict[str, Any] = {
        "version": 1,
        "models": {
            "src": {
                "role": "source",
                "family": "causal_lm",
                "path": str(models_dir / "llama"),
                "device": "cpu",
                "batch_size": 4,
                "max_tokens": 64,
            },
            "tgt": {
                "role": "target",
                "family": "text_encoder",
                "path": str(models_dir / "bert"),
                "device": "cpu",
                "batch_size": 8,
                "max_tokens": 64,
            },
            **(extra_models or {}),
        },
        "datasets": {
            "anchors": {
                "kind": "anchors",
                "max_count": anchors,
                "sources": [
                    {"path": str(data / "coco_30k.csv"), "column": "prompt", "max_count": anchors},
                    {
                        "path": str(data / "wikitext2_valid.txt"),
                        "format": "text",
                        "clean": "wikitext",
                        "max_count": anchors // 2,
                    },
                ],
            },
            "pairs": {
                "kind": "pairs",
                "safe_column": "safe_prompt",
                "unsafe_column": "unsafe_prompt",
                "category_column": "category",
                "sources": [
                    {"path": str(data / "SafeSteer_train.parquet"), "split": "train", "max_count": pairs},
                    {
                        "path": str(data / "SafeSteer_test.parquet"),
                        "split": "test",
                        "max_count": max(pairs // 3, 2),
                    },
                ],
            },
            "prompts": {
                "kind": "prompts",
                "category_column": "categories",
                "max_count": prompts,
                "sources": [{"path": str(data / "i2p.csv"), "column": "prompt"}],
            },
        },
        "profiles": {
            "default": {
                "models": ["src", "tgt", *(extra_models or {})],
                "anchors": "anchors",
                "pairs": "pairs",
                "prompts": ["prompts"],
                "store": str(tmp / "store"),
                "shard_rows": shard_rows,
                "mappers": ["procrustes", "ridge"],
                **({"arrays": arrays} if arrays else {}),
            }
        },
    }
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog), encoding="utf-8")
    return path


# Everything a run writes except wall-clock columns (timestamps, run ids, seconds).
TABLES = {
    "models": "SELECT model_key, name, role, family, model_id, revision, weights, spec_json, dim, current FROM models",
    "datasets": "SELECT dataset, kind, content_hash, n_rows, report_json FROM datasets",
    "texts": "SELECT * FROM texts",
    "dataset_texts": "SELECT * FROM dataset_texts",
    "units": "SELECT unit_key, model_key, dataset, dataset_hash, array_path, n_rows, dim, dtype, shard_rows, status "
    "FROM units",
    "unit_texts": "SELECT * FROM unit_texts",
    "shards": "SELECT unit_key, shard, row_start, row_stop, checksum, tokens FROM shards",
    "activation_rows": "SELECT * FROM activation_rows",
    "unit_rows": "SELECT * FROM unit_rows",  # the row index, coordinates included
    "fits": "SELECT fit_key, source, target, status, inputs_json FROM fits",
    "maps": "SELECT map_key, source_key, target_key, mapper, params_json, split_hash, input_units FROM maps",
    "map_tensors": "SELECT * FROM map_tensors",
    "vectors": "SELECT vector_key, name, kind, fit_key, dim, norm, checksum, lineage_json FROM vectors",
    "eval_results": "SELECT fit_key, kind, source, target, method, category, metric, alpha, value, n FROM eval_results",
}


def dump_store(root: Path) -> dict[str, Any]:
    """Every table (sorted rows), every activation array and every vector, read back through the store."""
    out: dict[str, Any] = {}
    with Store(root, read_only=True) as store:
        for name, sql in TABLES.items():
            out[name] = sorted(map(repr, store.con.execute(sql).fetchall()))
        for (path,) in store.con.execute("SELECT array_path FROM units").fetchall():
            out[path] = np.asarray(store.arrays[path][...])  # type: ignore[index]
        for (name,) in store.con.execute("SELECT DISTINCT name FROM vectors").fetchall():
            out[f"vector:{name}"] = artifacts.load_vector(store, name)[0]
    return out


def assert_same_store(a: Path, b: Path) -> dict[str, Any]:
    """Two stores hold the same tables, activation arrays and vectors, bit for bit; returns ``a``'s dump."""
    left, right = dump_store(a), dump_store(b)
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], np.ndarray):
            assert left[key].dtype == right[key].dtype and np.array_equal(left[key], right[key]), key  # NaN-free
        else:
            assert left[key] == right[key], key
    return left
