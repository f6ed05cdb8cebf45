"""The paper profile's architectures end to end (issue 16): load -> extract -> fit -> steer -> generate.

Tiny config-built Llama-3.1, Mistral (v0.3-style tokenizer) and Qwen3.5 (hybrid attention,
multimodal layout) sources and the paper's pipeline families as targets run through the real
Prefect flows on CPU, once in float32 and once in bfloat16 (Z-Image there with
``drop_constant_prefix``). Checked on the way: stored rows equal pooling by hand over each
pipeline's own ``encode_prompt`` (and each source's unpadded forward), every source x target
pair gets finite calibrated vectors and a report with per-position norms, steering with a
stored vector touches exactly the pooled positions, and every target generates finite,
steered outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoTokenizer

from safeport.eval.generate import load_pipeline
from safeport.eval.steering import steered_embeds
from safeport.flows.eval import eval_flow
from safeport.flows.extract import extract_flow
from safeport.flows.fit import fit_flow
from safeport.store import artifacts
from safeport.store.outputs import load_images
from safeport.store.store import Store
from tests.conftest import REPO
from tests.eval.test_steering import _own_encoding, _pooled_by_hand
from tests.tiny_models import tiny_llama31, tiny_mistral, tiny_qwen35
from tests.tiny_pipelines import TINY_CALL_KWARGS, save_tiny

SOURCES = {"llama31": tiny_llama31, "mistral": tiny_mistral, "qwen35": tiny_qwen35}
# The paper profile's pipeline families (Flux.1-Schnell and -Dev share one); SD3, not in the paper, is covered
# by the per-family extractor, steering and generation tests.
FAMILIES = ("flux", "z_image", "qwen_image", "wan")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # bf16 rows vs a by-hand pool of the same bf16 tensors


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paper-models")
    out = {name: build(root / name) for name, build in SOURCES.items()}
    out |= {family: save_tiny(family, root / family) for family in FAMILIES}
    return out


def _msl(family: str) -> int:
    """Long enough that no safe/unsafe pair collapses to one truncated text (a zero pair difference)."""
    return max(int(TINY_CALL_KWARGS[family]["max_sequence_length"]), 64)  # type: ignore[call-overload]


def _catalog(tmp: Path, folders: dict[str, Path], dtype: str) -> Path:
    data = REPO / "data"
    models: dict[str, Any] = {
        name: {"role": "source", "family": "causal_lm", "path": str(folders[name]), "max_tokens": 64}
        for name in SOURCES
    }
    for family in FAMILIES:
        call = {k: v for k, v in TINY_CALL_KWARGS[family].items() if k != "max_sequence_length"}
        models[family] = {
            "role": "target",
            "family": family,
            "path": str(folders[family]),
            "max_tokens": _msl(family),
            "generation": call,
        }
        if family == "z_image" and dtype == "bfloat16":
            models[family]["options"] = {"drop_constant_prefix": True}
    for entry in models.values():
        entry |= {"device": "cpu", "dtype": dtype, "batch_size": 8}
    catalog = {
        "version": 1,
        "models": models,
        "datasets": {
            "anchors": {
                "kind": "anchors",
                "sources": [
                    {"path": str(data / "coco_30k.csv"), "column": "prompt", "max_count": 24},
                    {"path": str(data / "wikitext2_valid.txt"), "format": "text", "clean": "wikitext", "max_count": 8},
                ],
            },
            "pairs": {
                "kind": "pairs",
                "safe_column": "safe_prompt",
                "unsafe_column": "unsafe_prompt",
                "category_column": "category",
                "sources": [
                    {"path": str(data / "SafeSteer_train.parquet"), "split": "train", "max_count": 8},
                    {"path": str(data / "SafeSteer_test.parquet"), "split": "test", "max_count": 4},
                ],
            },
            "prompts": {
                "kind": "prompts",
                "category_column": "categories",
                "max_count": 2,
                "sources": [{"path": str(data / "i2p.csv"), "column": "prompt"}],
            },
        },
        "profiles": {
            "default": {
                "models": list(models),
                "anchors": "anchors",
                "pairs": "pairs",
                "prompts": ["prompts"],
                "store": str(tmp / "store"),
                "mappers": ["ridge"],
                "alphas": [0, 1],
            }
        },
    }
    path = tmp / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog), encoding="utf-8")
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paper_architectures_end_to_end(
    prefect_api: str, tmp_path: Path, model_folders: dict[str, Path], dtype: str
) -> None:
    catalog = _catalog(tmp_path, model_folders, dtype)
    root = tmp_path / "store"
    torch_dtype = getattr(torch, dtype)
    extract_flow(str(catalog))
    fits = fit_flow(str(catalog))
    assert {(f.source, f.target) for f in fits} == {(s, t) for s in SOURCES for t in FAMILIES}

    with Store(root, read_only=True) as store:
        # Sources: stored rows equal the unpadded forward of the checkpoint (AutoModel, as the hub's would load).
        for name in SOURCES:
            meta, values = store.activations(name, "prompts")
            texts = store.texts(meta.column("text_id").to_pylist())
            tok = AutoTokenizer.from_pretrained(model_folders[name])
            model = AutoModel.from_pretrained(model_folders[name], dtype=torch_dtype).eval()
            with torch.no_grad():
                want = np.stack(
                    [
                        model(**tok(t, truncation=True, max_length=64, return_tensors="pt"))
                        .last_hidden_state[0]
                        .float()
                        .mean(0)
                        .numpy()
                        for t in texts
                    ]
                )
            assert np.abs(values - want).max() <= TOL[dtype] * np.abs(want).max() + 1e-6, name
        # Targets: stored rows equal a by-hand pool of each pipeline's own encode_prompt over its rule's positions.
        pipes = {f: load_pipeline(_source(catalog, f)) for f in FAMILIES}
        for family, pipe in pipes.items():
            meta, values = store.activations(family, "prompts")
            texts = store.texts(meta.column("text_id").to_pylist())
            own = _own_encoding(pipe, family, texts, None, _msl(family))
            where = _pooled_by_hand(pipe, family, texts, own, _msl(family))
            orig = own["prompt_embeds"]
            if family == "z_image" and dtype == "bfloat16":  # drop_constant_prefix: <|im_start|>user\n
                where = [torch.cat([torch.zeros(3), w[3:]]) for w in where]
            want = np.stack(
                [((o.float() * w[:, None]).sum(0) / w.sum()).numpy() for o, w in zip(orig, where, strict=True)]
            )
            assert np.abs(values - want).max() <= TOL[dtype] * np.abs(want).max() + 1e-6, family
            # Steering with the stored calibrated vector touches exactly those positions.
            v, _ = artifacts.load_vector(store, f"calibrated:llama31->{family}:ridge")
            assert v.shape == (values.shape[1],) and np.isfinite(v).all()
            kw = steered_embeds(
                pipe,
                texts,
                v,
                1.0,
                max_sequence_length=_msl(family),
                drop_constant_prefix=family == "z_image" and dtype == "bfloat16",
            )
            for s_i, o_i, w_i in zip(kw["prompt_embeds"], orig, where, strict=True):
                delta = (s_i.float() - o_i.float()).abs().sum(-1)
                assert bool((delta[w_i == 0] == 0).all()) and bool((delta[w_i == 1] > 0).all()), family
        # Every fit report shows per-position norms for both models.
        for f in fits:
            text = Path(f.report).read_text(encoding="utf-8")
            section = text.split("## Per-position norms")[1]
            assert f"| {f.source} (source) | " in section and f"| {f.target} (target) | " in section
            assert "n/a" not in section
        assert "*" in Path(next(f.report for f in fits if f.source == "llama31")).read_text().split("## Per-pos")[1]
        del pipes

    # Generation: every target, every source's calibrated vector, through the real eval flow.
    for family in FAMILIES:
        result = eval_flow(
            catalog_path=str(catalog),
            target=family,
            vectors=[f"calibrated:{s}->{family}:ridge" for s in SOURCES],
            alphas=[1.0],
            limit=1,
            categories=False,
        )
        assert [(g.planned, g.generated) for g in result.generated] == [(4, 4)]
    with Store(root, read_only=True) as store:
        gens = store.sql("SELECT output_key, target, method FROM generations").to_pylist()
        assert len(gens) == 4 * len(FAMILIES)
        for family in FAMILIES:
            outputs = {g["method"]: load_images(store, g["output_key"]) for g in gens if g["target"] == family}
            pixels = {m: np.stack([np.asarray(i) for i in imgs]) for m, imgs in outputs.items()}
            assert all(np.isfinite(p).all() for p in pixels.values())
            steered = [m for m in pixels if m != "original"]
            assert len(steered) == 3
            assert any(not np.array_equal(pixels[m], pixels["original"]) for m in steered), family


def _source(catalog: Path, name: str) -> Any:
    from safeport.catalog import load_catalog

    return load_catalog(str(catalog), "default").model_source(name)
