"""The eval flow's inputs without extraction, shared by tests/flows/test_eval_flow.py and test_eval_safedig.py.

:func:`eval_catalog` writes a catalog with a (bare) source and the bundled tiny Flux target; :func:`fill_store`
registers a prompt dataset and saves steering vectors for that target as the fit stage would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from safeport.store.artifacts import VectorRecord, save_vectors
from safeport.store.store import Store
from safeport.texts import text_id
from tests.conftest import REPO
from tests.tiny_pipelines import TINY_CALL_KWARGS, save_tiny

SETTINGS = {k: v for k, v in TINY_CALL_KWARGS["flux"].items() if k != "max_sequence_length"}
DIM = 32  # the tiny Flux T5 width
SRC, TGT = "src", "tflux"
CALIBRATED = f"calibrated:{SRC}->{TGT}:procrustes"
NATIVE = f"native:{TGT}"
PROMPT_SET = "tiny-prompts"


def eval_catalog(tmp: Path) -> Path:
    """``tmp/catalog.yaml``: source SRC (an empty folder, never loaded), target TGT (tiny Flux), store ``tmp/store``."""
    flux = save_tiny("flux", tmp / "flux")
    (tmp / "src").mkdir()
    data = REPO / "data"
    cat = {
        "version": 1,
        "models": {
            SRC: {"role": "source", "family": "causal_lm", "path": str(tmp / "src"), "device": "cpu"},
            TGT: {
                "role": "target",
                "family": "flux",
                "path": str(flux),
                "device": "cpu",
                "dtype": "float32",
                "max_tokens": int(TINY_CALL_KWARGS["flux"]["max_sequence_length"]),  # type: ignore[call-overload]
            },
        },
        "datasets": {
            "anchors": {"kind": "anchors", "sources": [{"path": str(data / "coco_30k.csv"), "column": "prompt"}]},
            "pairs": {
                "kind": "pairs",
                "safe_column": "safe_prompt",
                "unsafe_column": "unsafe_prompt",
                "sources": [
                    {"path": str(data / "SafeSteer_train.parquet"), "split": "train"},
                    {"path": str(data / "SafeSteer_test.parquet"), "split": "test"},
                ],
            },
        },
        "profiles": {
            "default": {"models": [SRC, TGT], "anchors": "anchors", "pairs": "pairs", "store": str(tmp / "store")}
        },
    }
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump(cat), encoding="utf-8")
    return path


def fill_store(root: Path, prompts: list[tuple[str, str | None]]) -> None:
    """``prompts`` (text, I2P labels) registered as dataset PROMPT_SET and vectors saved as the fit stage would."""
    rows = pa.table(
        {
            "idx": list(range(len(prompts))),
            "text_id": [text_id(t) for t, _ in prompts],
            "text": [t for t, _ in prompts],
            "split": pa.array([None] * len(prompts), pa.string()),
            "category": pa.array([c for _, c in prompts], pa.string()),
            "pair_id": pa.array([None] * len(prompts), pa.int32()),
            "side": pa.array([None] * len(prompts), pa.string()),
        }
    )
    rng = np.random.default_rng(0)

    def vec() -> np.ndarray:
        return rng.standard_normal(DIM).astype(np.float32)

    records = [
        VectorRecord("k-native", NATIVE, "native", None, TGT, None, None, vec(), {}),
        VectorRecord("k-cal", CALIBRATED, "calibrated", SRC, TGT, "procrustes", None, vec(), {}),
        VectorRecord("k-cal-s", f"{CALIBRATED}:sexual", "calibrated", SRC, TGT, "procrustes", "Sexual", vec(), {}),
        VectorRecord("k-cal-v", f"{CALIBRATED}:violence", "calibrated", SRC, TGT, "procrustes", "Violence", vec(), {}),
        VectorRecord("k-random", f"random:{SRC}->{TGT}", "random", SRC, TGT, None, None, vec(), {}),
    ]
    with Store(root) as store:
        store.register_dataset(PROMPT_SET, "prompts", "hash-1", rows, {})
        save_vectors(store, "fit-1", records)
