"""Small catalogs over the shipped real data and tiny config-built models, for flow tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO
from tests.tiny_models import tiny_bert, tiny_llama


def tiny_catalog(
    tmp: Path,
    anchors: int = 40,
    pairs: int = 12,
    prompts: int = 10,
    shard_rows: int = 8,
    extra_models: dict[str, Any] | None = None,
) -> Path:
    """A catalog with a tiny Llama source and a tiny BERT target; returns its path."""
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
            }
        },
    }
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog), encoding="utf-8")
    return path
