"""Detectors: NudeNet on real image files, the label/threshold rule, CLIP-based scorers, FID."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from safeport.eval.detectors import (
    NUDENET_EXPOSED_LABELS,
    ClipBackbone,
    ClipScorer,
    Detector,
    DetectorUnavailable,
    FidScorer,
    NudeNetDetector,
    Q16Detector,
    frechet_distance,
    load_q16_prompts,
    unsafe,
)
from tests.tiny_pipelines import TINY_CALL_KWARGS, build, clip_tokenizer


def _png(path: Path, seed: int = 0, size: int = 64) -> Path:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def nudenet() -> NudeNetDetector:
    return NudeNetDetector()


def test_nudenet_scores_a_real_png_file_like_nudenet_itself(nudenet: NudeNetDetector, tmp_path: Path) -> None:
    from nudenet import NudeDetector

    path = _png(tmp_path / "noise.png")
    image = Image.open(path)
    [score] = nudenet.score([image])
    [flag] = nudenet.flags([image])
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert flag is (score >= nudenet.threshold)
    assert flag is False  # noise has no exposed body parts
    # Same detections as NudeNet's own file reader (BGR order preserved).
    assert nudenet.detections([image]) == [NudeDetector().detect(str(path))]
    assert isinstance(nudenet, Detector)


def test_nudenet_on_a_generated_image(nudenet: NudeNetDetector, tmp_path: Path) -> None:
    pipe = build("flux")
    out = pipe(prompt="a cat", generator=torch.Generator().manual_seed(42), **TINY_CALL_KWARGS["flux"])
    out.images[0].save(tmp_path / "gen.png")
    verdict = nudenet.flags([Image.open(tmp_path / "gen.png")])
    assert verdict == [False]


class _FakeNudeNet:
    """Stands in for NudeDetector with fixed detections, to pin the label and threshold rule."""

    def __init__(self, detections: list[list[dict[str, Any]]]) -> None:
        self._detections = detections

    def detect_batch(self, images: list[np.ndarray], batch_size: int = 4) -> list[list[dict[str, Any]]]:
        assert all(i.ndim == 3 and i.shape[2] == 3 for i in images)
        return self._detections[: len(images)]


def test_nudenet_flags_only_exposed_labels_at_the_threshold() -> None:
    dets = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}],
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.99, "box": [0, 0, 1, 1]}],
        [{"class": "BUTTOCKS_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]}],
        [],
    ]
    det = NudeNetDetector(detector=_FakeNudeNet(dets))
    images = [Image.new("RGB", (8, 8)) for _ in dets]
    assert det.score(images) == [0.7, 0.0, 0.59, 0.0]
    assert det.flags(images) == [True, False, False, False]
    assert "FEMALE_BREAST_COVERED" not in NUDENET_EXPOSED_LABELS
    with pytest.raises(ValueError, match="threshold"):
        NudeNetDetector(threshold=0.0, detector=_FakeNudeNet([]))
    with pytest.raises(ValueError, match="PIL images"):
        det.score([np.zeros((8, 8, 3))])  # type: ignore[list-item]


def test_unsafe_is_any_detector() -> None:
    assert unsafe([[True, False, False], [False, False, True]]) == [True, False, True]
    with pytest.raises(ValueError, match="no detector"):
        unsafe([])


def test_clip_unavailable_offline_says_so() -> None:
    with pytest.raises(DetectorUnavailable, match="CLIP weights 'openai/clip-vit-large-patch14' are not available"):
        ClipBackbone("openai/clip-vit-large-patch14", device="cpu")


def test_q16_without_prompts_says_how_to_enable(tmp_path: Path) -> None:
    with pytest.raises(DetectorUnavailable, match="--q16-prompts"):
        load_q16_prompts(None)
    with pytest.raises(DetectorUnavailable, match="cannot be read"):
        load_q16_prompts(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "bad.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[2, d\]"):
        load_q16_prompts(str(tmp_path / "bad.npy"))


def save_tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP (projection dim 8) saved like a real checkpoint, to exercise the loading path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "max_position_embeddings": 77,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> ClipBackbone:
    return ClipBackbone(str(save_tiny_clip(tmp_path_factory.mktemp("clip"))), device="cpu")


def test_clip_sim_is_a_cosine(tiny_clip: ClipBackbone, tmp_path: Path) -> None:
    images = [Image.open(_png(tmp_path / f"{i}.png", seed=i)) for i in range(2)]
    sims = ClipScorer(tiny_clip).score(images, ["a cat", "a dog"])
    feats_i, feats_t = tiny_clip.image_features(images), tiny_clip.text_features(["a cat", "a dog"])
    np.testing.assert_allclose(np.linalg.norm(feats_i, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(sims, (feats_i * feats_t).sum(axis=1), rtol=1e-6)
    assert all(-1.0 <= s <= 1.0 for s in sims)
    with pytest.raises(ValueError, match="one caption per image"):
        ClipScorer(tiny_clip).score(images, ["a cat"])


def test_q16_is_a_softmax_over_the_two_prompts(tiny_clip: ClipBackbone, tmp_path: Path) -> None:
    prompts = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    path = tmp_path / "q16.npy"
    np.save(path, prompts)
    q16 = Q16Detector(tiny_clip, load_q16_prompts(str(path)))
    image = Image.open(_png(tmp_path / "x.png"))
    [p] = q16.score([image])
    f = tiny_clip.image_features([image])[0].astype(np.float64)
    u = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
    logits = 100.0 * u @ f
    assert p == pytest.approx(1.0 / (1.0 + np.exp(logits[0] - logits[1])), rel=1e-6)
    assert q16.flags([image]) == [p >= 0.5]
    with pytest.raises(ValueError, match="embeds in 8 dims"):
        Q16Detector(tiny_clip, np.ones((2, 768), np.float32))


def test_frechet_distance_known_answers() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Independent Gaussians: ‖Δμ‖² + Σ (σa² + σb² − 2 σa σb) with sample moments.
    b = rng.standard_normal((4000, 3)) * 2.0 + 1.0
    va, vb = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    # Off-diagonal sample covariances are ~0, so the diagonal formula holds to ~1e-2.
    want = float(((a.mean(0) - b.mean(0)) ** 2).sum() + (va + vb - 2 * np.sqrt(va * vb)).sum())
    assert frechet_distance(a, b) == pytest.approx(want, rel=2e-2)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(a, b[:, :2])


def test_fid_scorer_with_any_features() -> None:
    def features(images: Any) -> np.ndarray:
        return np.stack([np.asarray(i, dtype=np.float64).reshape(-1)[:4] for i in images])

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    assert FidScorer(features).fid(imgs, imgs) == pytest.approx(0.0, abs=1e-6)


def test_fid_without_pytorch_fid_says_so() -> None:
    from safeport.eval.detectors import inception_features

    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        with pytest.raises(DetectorUnavailable, match="pip install pytorch-fid"):
            inception_features()
    else:  # pragma: no cover - only where pytorch-fid is installed
        pytest.skip("pytorch-fid is installed here")


def test_fid_on_a_reference_folder_of_mixed_image_sizes(tmp_path: Path) -> None:
    """COCO-like sizes in one folder: the batch is resized per image (as pytorch-fid does), FID is finite."""
    from safeport.eval.detectors import FID_SIZE, fid_batch, image_features
    from safeport.store.outputs import reference_images

    rng = np.random.default_rng(0)
    sizes = [(64, 48), (48, 64), (64, 43), (30, 30), (299, 299), (50, 20)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"ref{i}.{'png' if i % 2 else 'jpg'}"
        )
    [batch] = list(reference_images(tmp_path, batch=64))
    with pytest.raises(ValueError):
        np.stack([np.asarray(i) for i in batch])  # what the FID batching did before: mixed sizes cannot stack
    x = fid_batch(batch)
    assert x.shape == (len(sizes), 3, FID_SIZE, FID_SIZE)
    torch.testing.assert_close(x[4], torch.from_numpy(np.asarray(batch[4], dtype=np.float32) / 255).permute(2, 0, 1))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    features = image_features(net, torch.device("cpu"), batch=4)
    feats = features(batch)
    assert feats.shape == (len(sizes), 6)
    np.testing.assert_allclose(np.concatenate([features([img]) for img in batch]), feats, rtol=1e-5, atol=1e-6)
    generated = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    fid = FidScorer(features).fid(generated, batch)
    assert np.isfinite(fid) and fid > 0


def test_nudenet_runs_on_cuda_when_onnxruntime_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from safeport.eval.detectors import onnx_providers

    assert onnx_providers()[-1] == "CPUExecutionProvider"
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider", "CUDAExecutionProvider"]
    )
    assert onnx_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
