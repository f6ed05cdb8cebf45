"""Generation helpers on tiny pipelines: exact α = 0, seeded determinism, one encode per prompt."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from safeport.eval.generate import (
    Batcher,
    GenerationSettings,
    Job,
    PromptEmbeddings,
    evenly_spaced,
    generate,
    generate_batch,
    generate_once,
    load_pipeline,
    resolve_settings,
    split_run_options,
    steered_kwargs,
    vector_id,
)
from safeport.extractors.base import ModelSource
from tests.tiny_pipelines import FAMILIES, TINY_CALL_KWARGS, build, save_tiny

PROMPT = "a cat on a red sofa"
DIMS = {"flux": 32, "sd3": 48, "z_image": 16, "qwen_image": 16, "wan": 32}


def _settings(family: str) -> GenerationSettings:
    kw: dict[str, Any] = dict(TINY_CALL_KWARGS[family])
    msl = int(kw.pop("max_sequence_length"))
    return GenerationSettings(tuple(sorted(kw.items())), msl)


def _vector(family: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIMS[family]).astype(np.float32)


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images])


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    return {f: build(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_reproduces_the_unsteered_output_exactly(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    settings = _settings(family)
    cached = generate(PromptEmbeddings(pipe, settings), PROMPT, _vector(family), 0.0, seed=42)
    direct = pipe(
        prompt=PROMPT, generator=torch.Generator().manual_seed(42), output_type="np", **TINY_CALL_KWARGS[family]
    )
    if family == "wan":
        frames = np.asarray(direct.frames[0])
        want = (frames[evenly_spaced(frames.shape[0])] * 255).round().astype(np.uint8)
    else:
        want = (np.asarray(direct.images[:1]) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(_pixels(cached), want)


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_cached_embeddings_steer_exactly_like_steer(pipes: dict[str, Any], family: str) -> None:
    pipe, settings, v = pipes[family], _settings(family), _vector(family)
    cached = generate(PromptEmbeddings(pipe, settings), PROMPT, v, 1.5, seed=7)
    direct = generate_once(pipe, PROMPT, v, 1.5, settings, seed=7)
    np.testing.assert_array_equal(_pixels(cached), _pixels(direct))
    unsteered = generate(PromptEmbeddings(pipe, settings), PROMPT, None, 0.0, seed=7)
    assert not np.array_equal(_pixels(cached), _pixels(unsteered))


def test_outputs_are_deterministic_for_a_seed(pipes: dict[str, Any]) -> None:
    emb = PromptEmbeddings(pipes["flux"], _settings("flux"))
    v = _vector("flux")
    a = _pixels(generate(emb, PROMPT, v, 1.0, seed=42))
    b = _pixels(generate(emb, PROMPT, v, 1.0, seed=42))
    c = _pixels(generate(emb, PROMPT, v, 1.0, seed=43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_an_alpha_sweep_encodes_each_prompt_once() -> None:
    # FluxPipeline.__call__ calls encode_prompt itself even with prompt_embeds given (to build text
    # ids), so what is counted is the text encoders actually running.
    pipe = build("flux")
    calls = {"clip": 0, "t5": 0}

    def counter(name: str) -> Any:
        def hook(*_: Any) -> None:
            calls[name] += 1

        return hook

    pipe.text_encoder.register_forward_hook(counter("clip"))
    pipe.text_encoder_2.register_forward_hook(counter("t5"))
    emb = PromptEmbeddings(pipe, _settings("flux"))
    prompts = [PROMPT, "a dog in the snow"]
    emb.encode_all(prompts)
    emb.release_text_encoders()
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    v = _vector("flux")
    outputs = {
        (p, a, s): _pixels(generate(emb, p, v, a, seed=s)) for p in prompts for a in (0.0, 1.0, 2.0) for s in (1, 2)
    }
    assert calls == {"clip": len(prompts), "t5": len(prompts)}
    assert len(outputs) == 12
    with pytest.raises(ValueError, match="after the text encoders were released"):
        emb.get("a prompt that was not encoded")


def test_video_output_is_four_evenly_spaced_frames(pipes: dict[str, Any]) -> None:
    frames = generate(PromptEmbeddings(pipes["wan"], _settings("wan")), PROMPT, None, 0.0)
    assert len(frames) == 4
    assert evenly_spaced(5) == [0, 1, 3, 4]
    assert evenly_spaced(81) == [0, 27, 53, 80]
    assert evenly_spaced(2) == [0, 1]
    with pytest.raises(ValueError, match="at least one frame"):
        evenly_spaced(0)


def test_dimension_mismatch_names_both_dims(pipes: dict[str, Any]) -> None:
    emb = PromptEmbeddings(pipes["flux"], _settings("flux"))
    with pytest.raises(ValueError, match=r"dim 7 but the pipeline's prompt_embeds have dim 32"):
        generate(emb, PROMPT, np.ones(7, np.float32), 1.0)
    with pytest.raises(ValueError, match="without a vector"):
        steered_kwargs(emb.get(PROMPT), None, 1.0, "cpu")


def test_steered_kwargs_add_alpha_v_to_every_token(pipes: dict[str, Any]) -> None:
    emb = PromptEmbeddings(pipes["flux"], _settings("flux"))
    v = _vector("flux")
    base = emb.get(PROMPT)
    out = steered_kwargs(base, v, 2.0, "cpu")
    torch.testing.assert_close(out["prompt_embeds"], base.kwargs["prompt_embeds"] + 2.0 * torch.from_numpy(v))
    assert torch.equal(out["pooled_prompt_embeds"], base.kwargs["pooled_prompt_embeds"])  # CLIP pooled untouched


def _source(folder: Path, **kw: Any) -> ModelSource:
    args: dict[str, Any] = {"device": "cpu", "dtype": "float32", "max_tokens": 24}
    args.update(kw)
    return ModelSource(name="tiny-flux", family="flux", path=str(folder), **args)


def test_load_pipeline_loads_the_full_pipeline(tmp_path: Path) -> None:
    pipe = load_pipeline(_source(save_tiny("flux", tmp_path / "flux")))
    for name in ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2"):
        assert getattr(pipe, name) is not None
    with pytest.raises(ValueError, match="not a diffusion pipeline"):
        load_pipeline(ModelSource(name="bert", family="text_encoder", path=str(tmp_path)))


def test_resolve_settings_merges_model_card_and_validates(tmp_path: Path) -> None:
    schnell = _source(tmp_path, hub_id=None, max_tokens=256)
    settings = resolve_settings(schnell, {"height": 64, "width": 64})
    assert settings.max_sequence_length == 256
    assert dict(settings.call) == {"height": 64, "width": 64}
    card = resolve_settings(
        ModelSource(name="s", family="flux", hub_id="black-forest-labs/FLUX.1-schnell", max_tokens=256)
    )
    assert dict(card.call) == {"num_inference_steps": 4, "guidance_scale": 0.0, "height": 1024, "width": 1024}
    assert card.key != settings.key
    with pytest.raises(ValueError, match="has no argument 'stepz'"):
        resolve_settings(schnell, {"stepz": 3})
    with pytest.raises(ValueError, match="extracted with"):
        resolve_settings(schnell, {"max_sequence_length": 512})
    with pytest.raises(ValueError, match="set by the generator"):
        resolve_settings(schnell, {"generator": 1})
    neg = resolve_settings(schnell, {"negative_prompt": "blurry"})
    assert "blurry" not in str(neg.record())


def test_vector_id_is_a_content_hash() -> None:
    v = np.arange(4, dtype=np.float32)
    assert vector_id(v) == vector_id(v.astype(np.float64))
    assert vector_id(v) != vector_id(v + 1)
    assert vector_id(None) == ""


# --- `safeport generate` ------------------------------------------------------------------------


def _parser() -> Any:
    """The real CLI parser (its ``add`` gives every command --catalog/--profile/--store)."""
    from safeport.cli import build_parser

    return build_parser()


def test_generate_command_writes_images_and_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    from safeport.store.artifacts import export_vector

    flux = save_tiny("flux", tmp_path / "flux")
    (tmp_path / "src").mkdir()
    data = Path(__file__).resolve().parents[2] / "data"
    catalog = {
        "version": 1,
        "models": {
            "src": {"role": "source", "family": "causal_lm", "path": str(tmp_path / "src")},
            "tflux": {"role": "target", "family": "flux", "path": str(flux), "device": "cpu", "max_tokens": 24},
        },
        "datasets": {
            "a": {"kind": "anchors", "sources": [{"path": str(data / "coco_30k.csv"), "column": "prompt"}]},
            "p": {
                "kind": "pairs",
                "safe_column": "safe_prompt",
                "unsafe_column": "unsafe_prompt",
                "sources": [
                    {"path": str(data / "SafeSteer_train.parquet"), "split": "train"},
                    {"path": str(data / "SafeSteer_test.parquet"), "split": "test"},
                ],
            },
        },
        "profiles": {"default": {"models": ["src", "tflux"], "anchors": "a", "pairs": "p"}},
    }
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog), encoding="utf-8")
    export_vector(_vector("flux"), {"target": "tflux", "kind": "calibrated"}, tmp_path / "v")
    out = tmp_path / "out"
    argv = ["generate", "--catalog", str(tmp_path / "catalog.yaml"), "--vector-file", str(tmp_path / "v.safetensors")]
    argv += ["--alpha", "1.5", "--steps", "2", "--set", "height=32", "--set", "width=32", "--out", str(out), PROMPT]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    assert PROMPT not in capsys.readouterr().out
    [meta_path] = out.glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["target"] == "tflux" and meta["alpha"] == 1.5 and meta["seed"] == 42
    assert meta["settings"]["call"] == {"height": 32, "width": 32, "num_inference_steps": 2}
    assert PROMPT not in meta_path.read_text()
    [png] = [out / f for f in meta["files"]]
    first = png.read_bytes()
    assert args.func(args) == 0  # same request, same key, same bytes
    assert png.read_bytes() == first
    bad = _parser().parse_args([*argv[:-1], "--set", "max_sequence_length=99", PROMPT])
    with pytest.raises(ValueError, match="extracted with"):
        bad.func(bad)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("checksum", ("damaged or edited",)),
        ("nan", ("NaN/inf",)),
        ("2-D", ("shape (2, 32)", "1-D")),
        ("json list", ("JSON list", "object")),
        ("garbage", ("not a readable safetensors",)),
    ],
)
def test_generate_checks_the_vector_file_before_loading_any_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, words: tuple[str, ...]
) -> None:
    """The catalog's target is a hub id that is never fetched: the vector file is refused first."""
    import json

    from safetensors.numpy import save_file

    from safeport.cli import main
    from safeport.store.artifacts import export_vector
    from safeport.store.store import checksum
    from tests.test_catalog import base_catalog, write_catalog

    catalog = write_catalog(tmp_path, base_catalog(tmp_path))
    values = _vector("flux")
    st, js = export_vector(
        values, {"target": "tgt", "kind": "calibrated", "checksum": checksum(values[None])}, tmp_path / "v"
    )
    if case == "checksum":
        save_file({"vector": values * 2}, str(st))
    elif case in ("nan", "2-D"):
        bad = np.full((2, 32), 1.0, np.float32) if case == "2-D" else np.where(values > 0, np.nan, values)
        save_file({"vector": bad.astype(np.float32)}, str(st))
        js.write_text(json.dumps({"target": "tgt", "kind": "calibrated", "checksum": checksum(bad.reshape(1, -1))}))
    elif case == "json list":
        js.write_text("[]")
    else:
        st.write_bytes(b"\x00" * 7)
    argv = ["generate", "--catalog", str(catalog), "--vector-file", str(st), "--alpha", "1"]
    assert main([*argv, "--out", str(tmp_path / "out"), PROMPT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safeport: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(w in err for w in words), err
    assert PROMPT not in err and not (tmp_path / "out").exists()


def test_an_uncached_hub_pipeline_is_one_error_naming_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from safeport.eval.generate import load_pipeline
    from safeport.extractors.base import ExtractionError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ModelSource(name="flux-x", family="flux", hub_id="safeport-tests/not-cached", device="cpu")
    with pytest.raises(ExtractionError, match=r"model 'flux-x': hub id 'safeport-tests/not-cached'.*offline"):
        load_pipeline(source)


# --- memory at paper scale (issue 16 item 6) ----------------------------------------------------


def test_negative_prompt_is_encoded_once_and_matches_steer(pipes: dict[str, Any]) -> None:
    pipe, v = pipes["wan"], _vector("wan")
    settings = dataclasses.replace(_settings("wan"), negative_prompt="blurry, static")
    settings = dataclasses.replace(settings, call=tuple(sorted({**dict(settings.call), "guidance_scale": 3.0}.items())))
    emb = PromptEmbeddings(pipe, settings)
    prompts = [PROMPT, "a dog in the snow", "a red bicycle"]
    runs = {"n": 0}
    handle = pipe.text_encoder.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))
    emb.encode_all(prompts)
    handle.remove()
    assert runs["n"] == len(prompts) + 1  # each prompt once, the negative once
    # One negative copy for the sweep; no prompt's cache holds one.
    assert all(not any(k.startswith("negative_") for k in emb.get(p).kwargs) for p in prompts)
    negative = emb.negative_kwargs("cpu")["negative_prompt_embeds"]
    assert negative.shape[0] == 1
    for p in prompts[1:]:
        cached = _pixels(generate(emb, p, v, 1.5, seed=3))
        direct = _pixels(generate_once(pipe, p, v, 1.5, settings, seed=3))
        np.testing.assert_array_equal(cached, direct)
    emb.forget(prompts[:2])
    assert len(emb) == 1


def test_release_under_cpu_offload_frees_the_text_encoders() -> None:
    """Offload hooks (accelerate's, chained as enable_model_cpu_offload chains them) no longer hold the encoders."""
    import gc
    import weakref

    from accelerate import cpu_offload_with_hook

    pipe = build("flux")
    hook = None
    hooks = []
    for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):  # FluxPipeline.model_cpu_offload_seq
        _, hook = cpu_offload_with_hook(getattr(pipe, name), "cpu", prev_module_hook=hook)
        hooks.append(hook)
    pipe._all_hooks = hooks
    del hooks, hook  # only the pipeline holds the hooks now, as after enable_model_cpu_offload
    emb = PromptEmbeddings(pipe, _settings("flux"))
    emb.encode_all([PROMPT])
    refs = [weakref.ref(pipe.text_encoder), weakref.ref(pipe.text_encoder_2)]
    emb.release_text_encoders()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert [type(h.model).__name__ for h in pipe._all_hooks] == ["FluxTransformer2DModel", "AutoencoderKL"]
    assert pipe._all_hooks[0].hook.prev_module_hook is None
    assert generate(emb, PROMPT, _vector("flux"), 1.0, seed=1)  # the pipeline still generates


def test_card_component_dtypes_load_from_their_own_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wan 2.2's card loads the VAE in float32 while the rest runs in bfloat16.
    from safeport.eval import generate as gen

    folder = save_tiny("wan", tmp_path / "wan")
    card = gen.CardSettings({"num_inference_steps": 2}, negative_prompt="blurry", dtypes={"vae": "float32"})
    monkeypatch.setitem(gen.CARD_SETTINGS, "org/tiny-wan", card)
    source = ModelSource(
        name="w", family="wan", hub_id="org/tiny-wan", path=str(folder), device="cpu", dtype="bfloat16", max_tokens=24
    )
    pipe = load_pipeline(source)
    assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    settings = resolve_settings(source)
    assert settings.negative_prompt == "blurry" and dict(settings.dtypes) == {"vae": "float32"}
    assert settings.record()["dtypes"] == {"vae": "float32"} and "blurry" not in json.dumps(settings.record())


def test_paper_targets_take_their_settings_from_the_cards_and_the_paper() -> None:
    from safeport.eval.generate import CARD_SETTINGS, WAN_NEGATIVE_PROMPT

    steps = {hub: dict(c.call)["num_inference_steps"] for hub, c in CARD_SETTINGS.items()}
    assert steps == {
        "black-forest-labs/FLUX.1-schnell": 4,  # card and paper
        "black-forest-labs/FLUX.1-dev": 28,  # paper (card: 50)
        "Qwen/Qwen-Image": 50,  # card (the paper's 4 need the Lightning LoRA)
        "Tongyi-MAI/Z-Image-Turbo": 4,  # paper (card: 9)
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers": 40,  # card (the paper's 4 need the Lightning LoRA)
    }
    wan = CARD_SETTINGS["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]
    assert (dict(wan.call)["height"], dict(wan.call)["width"], dict(wan.dtypes)) == (720, 1280, {"vae": "float32"})
    assert wan.negative_prompt == WAN_NEGATIVE_PROMPT


# Batched generation equals one-at-a-time generation within this many uint8 levels per pixel: measured on
# the tiny pipelines (one torch thread and two alike), Flux, SD3, Qwen-Image (true CFG) and Wan are
# identical, Z-Image differs by 1 level in a few pixels (batched kernels round differently). README states it.
BATCH_TOLERANCE = 1


def _batch_settings(family: str) -> GenerationSettings:
    if family != "qwen_image":
        return _settings(family)
    # Qwen-Image with true CFG and its negative prompt: the negative embeds are stacked too.
    base = _settings(family)
    call = tuple(sorted({**dict(base.call), "true_cfg_scale": 2.0}.items()))
    return dataclasses.replace(base, call=call, negative_prompt=" ")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batched_call_equals_one_call_per_output(pipes: dict[str, Any], family: str) -> None:
    emb = PromptEmbeddings(pipes[family], _batch_settings(family))
    v = _vector(family)
    jobs = [Job(None, 0.0, 42), Job(v, 1.0, 42), Job(v, 2.0, 7), Job(0.5 * v, 1.5, 3)]
    one = [generate_batch(emb, PROMPT, [j])[0] for j in jobs]
    many = generate_batch(emb, PROMPT, jobs)
    assert len(many) == len(jobs) and all(len(m) == len(o) for m, o in zip(many, one, strict=True))
    for o, m in zip(one, many, strict=True):
        diff = np.abs(_pixels(o).astype(np.int16) - _pixels(m).astype(np.int16))
        assert diff.max() <= BATCH_TOLERANCE
    # The batch really holds different outputs (seeds and α differ), each in its job's place.
    assert not np.array_equal(_pixels(many[0]), _pixels(many[2]))


def test_out_of_memory_halves_the_batch_and_loses_or_repeats_nothing(
    pipes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safeport.eval.generate as gen

    emb = PromptEmbeddings(pipes["flux"], _settings("flux"))
    v = _vector("flux")
    jobs = [Job(v, float(a), 42 + a) for a in range(5)]
    calls: list[int] = []
    real = gen.generate_batch

    def raises_once(e: PromptEmbeddings, prompt: str, part: list[Job]) -> Any:
        """The real call, except that the first one with more than 2 outputs runs out of memory."""
        calls.append(len(part))
        if len(part) > 2 and len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(e, prompt, part)

    monkeypatch.setattr(gen, "generate_batch", raises_once)
    batcher = Batcher(emb, batch_size=4)
    out = batcher.run(PROMPT, jobs)
    assert calls == [4, 2, 2, 1] and batcher.batch_size == 2
    alone = [real(emb, PROMPT, [j])[0] for j in jobs]
    assert len(out) == len(jobs)
    for got, want in zip(out, alone, strict=True):  # each output in its place, once
        assert np.abs(_pixels(got.images).astype(np.int16) - _pixels(want).astype(np.int16)).max() <= BATCH_TOLERANCE

    def always(e: PromptEmbeddings, prompt: str, part: list[Job]) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(gen, "generate_batch", always)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a batch of one that runs out of memory is an error
        Batcher(emb, batch_size=2).run(PROMPT, jobs)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"batch_size": 0}, "batch_size=0"), ({"batch_size": 1.5}, "batch_size=1.5"), ({"seconds_per_output": -1}, "-1")],
)
def test_run_options_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_run_options(options)


def test_run_options_never_reach_the_pipeline_or_the_output_key(tmp_path: Path) -> None:
    folder = save_tiny("flux", tmp_path / "flux")
    source = _source(folder)
    plain = resolve_settings(source, {"num_inference_steps": 2})
    with_options = resolve_settings(source, {"num_inference_steps": 2, "batch_size": 8, "seconds_per_output": 1.0})
    assert with_options == plain and with_options.key == plain.key
    assert split_run_options({"batch_size": 8, "height": 64})[1].batch_size == 8
