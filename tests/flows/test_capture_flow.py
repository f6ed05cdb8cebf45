"""Flow-level tests of the token cache (METHOD-SAFEDIG §2, issue 22): ``capture_flow`` and ``safeport capture``.

One catalog over the shipped real data with three capture models: the real MiniLM text encoder
(``te``, six layers), the bundled tiny Flux (``flux``: te.{0,1}, one double and one single block)
and the bundled tiny SD3 (``sd3``: te.{0,1}, three joint blocks, guidance 2 so the pipeline
batches CFG), 16x16 images, 4 denoising steps (captured: the default 0, 1, 2), 4 image tokens per
(prompt, step), shards of 4 texts over 6 anchors and 10 pair texts. Expected row counts come from
the tokenizers (real tokens) and the settings, never from the code under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from safeport.cli import main
from safeport.flows.capture import capture_flow, capture_models, plan_capture
from safeport.flows.extract import extract_flow
from safeport.flows.scale import dask_task_runner
from safeport.store.maintenance import collect_garbage
from safeport.store.query import readonly_query
from safeport.store.store import Store
from safeport.store.verify import verify_path
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog
from tests.tiny_models import minilm_folder

TE, FLUX, SD3 = "te", "flux", "sd3"
MAX_TOKENS = {TE: 32, FLUX: 64, SD3: 64}  # MiniLM truncates most pair texts; the T5s keep the captions whole
GENERATION: dict[str, dict[str, Any]] = {
    FLUX: {"height": 16, "width": 16, "num_inference_steps": 4, "guidance_scale": 0.0},
    SD3: {"height": 16, "width": 16, "num_inference_steps": 4, "guidance_scale": 2.0},
}
STEPS = (0, 1, 2)  # default_steps(4): 4 evenly spaced over the first 60 % of 4 steps
IMAGE_TOKENS = 4
SHARD_TEXTS = 4
N_IMAGE = {FLUX: 64, SD3: 256}  # image tokens per step at 16x16: Flux packs 2x2 latents, SD3 patch 1 (VAE x1)
SD3_CLIP = 77  # SD3's text stream: [CLIP (77) ; T5 (max_sequence_length)]
# Every position of the bundled models (read from their module trees by hand: the known answer).
POSITIONS = {
    TE: tuple(f"te.{i}.txt" for i in range(6)),
    FLUX: ("te.0.txt", "te.1.txt", "double.0.txt", "double.0.img", "single.0.img"),
    SD3: ("te.0.txt", "te.1.txt", "double.0.txt", "double.0.img", "double.1.txt", "double.1.img", "double.2.img"),
}
DATASETS = ("anchors", "pairs")  # the profile's anchors and pairs: the default capture sets
N_TEXTS = {"anchors": 6, "pairs": 10}


# --- the catalog -----------------------------------------------------------------------------------


def _capture_models() -> dict[str, Any]:
    common = {"role": "target", "device": "cpu", "batch_size": 8}
    return {
        TE: {**common, "family": "text_encoder", "path": str(minilm_folder()), "max_tokens": MAX_TOKENS[TE]},
        FLUX: {
            **common,
            "family": "flux",
            "path": str(REPO / "models" / "tiny-flux"),
            "max_tokens": MAX_TOKENS[FLUX],
            "generation": GENERATION[FLUX],
        },
        SD3: {
            **common,
            "family": "sd3",
            "path": str(REPO / "models" / "tiny-sd3"),
            "max_tokens": MAX_TOKENS[SD3],
            "generation": GENERATION[SD3],
        },
    }


def _catalog(
    tmp: Path,
    name: str = "capture",
    store: Path | None = None,
    generation: Mapping[str, Mapping[str, Any]] | None = None,
    **safedig: Any,
) -> Path:
    """The tiny catalog (models built once in ``tmp``) with te/flux/sd3 and a ``safedig:`` block.

    Written as ``tmp/<name>.yaml``.

    ``safedig`` overrides keys of the block (``models``, ``positions``, ``image_tokens``...);
    ``generation`` overrides a pipeline's generation settings; ``store`` defaults to ``tmp/store``.
    """
    models = _capture_models()
    for model, settings in (generation or {}).items():
        models[model]["generation"] = {**models[model]["generation"], **settings}
    data = yaml.safe_load(tiny_catalog(tmp, anchors=N_TEXTS["anchors"], pairs=3, extra_models=models).read_text())
    profile = data["profiles"]["default"]
    profile.update(models=["src", TE, FLUX, SD3], prompts=[], store=str(store or tmp / "store"))
    profile["safedig"] = {
        "models": [TE, FLUX, SD3],
        "positions": {TE: "all", FLUX: "all", SD3: "all"},
        "image_tokens": IMAGE_TOKENS,
        "shard_texts": SHARD_TEXTS,
        **safedig,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def captured(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalog, store) of an uninterrupted single-process capture (one torch thread), after a pooled extraction.

    The pooled rows are there for ``--plan`` (it takes real-token counts from them); the store is
    read-only for the tests: one that writes copies it first.
    """
    tmp = tmp_path_factory.mktemp("captured")
    catalog = _catalog(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a Dask worker and a subprocess with OMP_NUM_THREADS=1 compute with
    try:
        extract_flow(str(catalog))
        results = capture_flow(str(catalog))
    finally:
        torch.set_num_threads(threads)
    assert {(r.model, r.dataset, r.status) for r in results} == {(m, d, "done") for m in POSITIONS for d in DATASETS}
    return catalog, tmp / "store"


def _copy(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


# --- helpers -----------------------------------------------------------------------------------------


def _refuse_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load (pipeline or text encoder) fails the test."""
    import safeport.eval.generate
    import safeport.extractors
    import safeport.flows.capture
    import safeport.flows.common

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(safeport.eval.generate, "load_pipeline", refuse)
    monkeypatch.setattr(safeport.flows.common, "extractor_for", refuse)
    monkeypatch.setattr(safeport.flows.capture, "extractor_for", refuse)  # bound at import
    monkeypatch.setattr(safeport.extractors, "load_extractor", refuse)
    monkeypatch.setattr(safeport.flows.common, "load_extractor", refuse)


def _texts(root: Path) -> dict[str, list[str]]:
    """The capture datasets' texts in dataset order (each text once)."""
    with Store(root, read_only=True) as store:
        out = {}
        for dataset in DATASETS:
            ids = [
                r[0]
                for r in store.fetchall("SELECT text_id FROM dataset_texts WHERE dataset = ? ORDER BY idx", [dataset])
            ]
            ids = list(dict.fromkeys(ids))
            out[dataset] = [store.texts([t])[0] for t in ids]
        return out


def _mask_sum(folder: Path, texts: list[str], length: int, padding: str = "max_length") -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(texts, padding=padding, max_length=length, truncation=True, return_tensors="np")
    return np.asarray(batch["attention_mask"]).astype(bool)


def _real_tokens(texts: list[str]) -> dict[tuple[str, str], list[set[int]]]:
    """(model, te|dit) -> per text, the token indices of its real tokens (known answer: the tokenizers)."""
    flux, sd3 = REPO / "models" / "tiny-flux", REPO / "models" / "tiny-sd3"
    bert = _mask_sum(minilm_folder(), texts, MAX_TOKENS[TE], padding="longest")
    t5_flux = _mask_sum(flux / "tokenizer_2", texts, MAX_TOKENS[FLUX])
    t5_sd3 = _mask_sum(sd3 / "tokenizer_3", texts, MAX_TOKENS[SD3])
    clip = _mask_sum(sd3 / "tokenizer", texts, SD3_CLIP) & _mask_sum(sd3 / "tokenizer_2", texts, SD3_CLIP)

    def idx(mask: np.ndarray, offset: int = 0) -> list[set[int]]:
        return [{int(i) + offset for i in np.flatnonzero(row)} for row in mask]

    return {
        (TE, "te"): idx(bert),
        (FLUX, "te"): idx(t5_flux),
        (FLUX, "dit"): idx(t5_flux),
        (SD3, "te"): idx(t5_sd3),
        (SD3, "dit"): [c | t for c, t in zip(idx(clip), idx(t5_sd3, SD3_CLIP), strict=True)],
    }


def _steps_of(model: str, position: str) -> tuple[int, ...]:
    return (0,) if model == TE or position.startswith("te.") else STEPS


def _expected_rows(texts: Mapping[str, list[str]], image_tokens: int = IMAGE_TOKENS) -> dict[tuple[str, ...], int]:
    """(model, dataset, position, step) -> rows: real tokens (txt) or image_tokens per text (img)."""
    out: dict[tuple[str, ...], int] = {}
    for dataset, items in texts.items():
        real = _real_tokens(items)
        for model, positions in POSITIONS.items():
            for position in positions:
                for step in _steps_of(model, position):
                    if position.endswith(".img"):
                        n = len(items) * image_tokens
                    else:
                        n = sum(len(s) for s in real[model, "te" if position.startswith("te.") else "dit"])
                    out[model, dataset, position, str(step)] = n
    return out


def _count(root: Path, sql: str) -> dict[tuple[str, ...], int]:
    table = readonly_query(root, sql).to_pylist()
    return {tuple(str(v) for v in list(r.values())[:-1]): int(list(r.values())[-1]) for r in table}


def _token_dump(root: Path) -> dict[str, Any]:
    """Every token unit's record, its shards' records, its row index and its shard arrays, read back."""
    out: dict[str, Any] = {}
    with Store(root, read_only=True) as store:
        out["units"] = store.fetchall(
            "SELECT unit_key, model_key, dataset, dataset_hash, array_path, n_rows, n_texts, dim, dtype, shard_texts, "
            "status, kind, layout, position, spec_json FROM units WHERE kind = 'tokens' ORDER BY unit_key"
        )
        out["unit_texts"] = store.fetchall(
            "SELECT * FROM unit_texts WHERE unit_key IN (SELECT unit_key FROM units WHERE kind = 'tokens') ORDER BY ALL"
        )
        out["shards"] = store.fetchall(
            "SELECT unit_key, shard, row_start, row_stop, checksum, tokens, array_path, dtype FROM shards "
            "WHERE unit_key IN (SELECT unit_key FROM units WHERE kind = 'tokens') ORDER BY ALL"
        )
        out["unit_rows"] = store.fetchall(
            "SELECT * FROM unit_rows WHERE unit_key IN (SELECT unit_key FROM units WHERE kind = 'tokens') ORDER BY ALL"
        )
        for (path,) in store.fetchall("SELECT array_path FROM shards WHERE array_path LIKE 'acts/%/%/%'"):
            out[path] = np.asarray(store.arrays[path][...])  # type: ignore[index]
    return out


def _assert_same_tokens(a: Path, b: Path) -> dict[str, Any]:
    left, right = _token_dump(a), _token_dump(b)
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], np.ndarray):
            assert left[key].dtype == right[key].dtype and np.array_equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key
    return left


# --- 1. the cache fills from the real flow; a rerun computes nothing ------------------------------------


def test_capture_fills_the_cache_with_real_tokens_and_image_tokens_times_steps(captured: tuple[Path, Path]) -> None:
    _, root = captured
    texts = _texts(root)
    assert {d: len(t) for d, t in texts.items()} == N_TEXTS
    by_step = _count(root, "select position, step, count(*) from token_rows group by all")
    expected = _expected_rows(texts)
    want_by_step: dict[tuple[str, ...], int] = {}
    for (_, _, position, step), n in expected.items():
        want_by_step[position, step] = want_by_step.get((position, step), 0) + n
    assert by_step == want_by_step
    assert _count(root, "select model, dataset, position, step, count(*) from token_rows group by all") == expected

    # Per text: the real-token indices of each text stream, the same image-token sample at every position.
    rows = readonly_query(
        root, "select model, dataset, position, step, token, stream, seed, text_id, shard, row from token_rows"
    ).to_pandas()
    ids = {d: _dataset_ids(root, d) for d in DATASETS}
    for dataset in DATASETS:
        real = _real_tokens(texts[dataset])
        for model, positions in POSITIONS.items():
            for position in positions:
                sel = rows[(rows.model == model) & (rows.dataset == dataset) & (rows.position == position)]
                assert set(sel.stream) == {position.rsplit(".", 1)[1]}
                assert set(sel.seed) == ({-1} if model == TE else {42})  # NO_SEED, or the profile's seed
                assert sorted(set(sel.step)) == list(_steps_of(model, position))
                for step, at_step in sel.groupby("step"):
                    tokens = at_step.groupby("text_id").token.apply(lambda t: sorted(t.tolist()))
                    for i, text_id in enumerate(ids[dataset]):
                        if position.endswith(".img"):
                            got = tokens[text_id]
                            assert len(set(got)) == IMAGE_TOKENS and min(got) >= 0 and max(got) < N_IMAGE[model]
                        else:
                            kind = "te" if position.startswith("te.") else "dit"
                            assert tokens[text_id] == sorted(real[model, kind][i]), (model, position, step)
        for model in (FLUX, SD3):  # one seed for every prompt: one image-token sample per step, at every position
            img = rows[(rows.model == model) & (rows.dataset == dataset) & rows.position.str.endswith(".img")]
            samples = img.groupby(["step", "position", "text_id"]).token.apply(tuple)
            for s in STEPS:
                assert samples[s].nunique() == 1, (model, s)
    # Row index: every (unit, shard) row number once, 0..n-1.
    dup = readonly_query(
        root, "select unit_key, shard, count(*) n, count(distinct row) d, max(row) m from token_rows group by all"
    ).to_pylist()
    assert all(r["n"] == r["d"] == r["m"] + 1 for r in dup)


def _dataset_ids(root: Path, dataset: str) -> list[str]:
    with Store(root, read_only=True) as store:
        rows = store.fetchall("SELECT text_id FROM dataset_texts WHERE dataset = ? ORDER BY idx", [dataset])
    return list(dict.fromkeys(r[0] for r in rows))


def test_a_rerun_computes_nothing_and_loads_no_model(
    captured: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog, ref = captured
    root = _copy(ref, tmp_path / "store")
    before = _token_dump(root)
    _refuse_models(monkeypatch)
    results = capture_flow(str(catalog), store=str(root))
    assert sorted((r.model, r.dataset, r.status, r.rows) for r in results) == sorted(
        (m, d, "skipped", 0) for m in POSITIONS for d in DATASETS
    )
    assert {r.model: r.positions for r in results} == POSITIONS
    runs = _count(root, "select model, dataset, status, count(*) from runs where flow = 'capture' group by all")
    assert runs == {(m, d, s): 1 for m in POSITIONS for d in DATASETS for s in ("done", "skipped")}
    _assert_same_tokens(root, ref)
    after = _token_dump(root)
    assert after["shards"] == before["shards"]


# --- 2. capture settings are part of the unit key ----------------------------------------------------------


def _units(root: Path) -> dict[str, tuple[str, str]]:
    """unit_key -> (model, position) of every token unit."""
    with Store(root, read_only=True) as store:
        rows = store.fetchall(
            "SELECT u.unit_key, m.name, u.position FROM units u JOIN models m USING (model_key) WHERE u.kind = 'tokens'"
        )
    return {str(k): (str(m), str(p)) for k, m, p in rows}


def _records(root: Path, keys: set[str]) -> dict[str, Any]:
    """The shard records (committed_at included) and row index of the units ``keys``."""
    with Store(root, read_only=True) as store:
        shards = store.fetchall(
            "SELECT unit_key, shard, row_start, row_stop, checksum, committed_at, array_path FROM shards ORDER BY ALL"
        )
        rows = store.fetchall("SELECT * FROM unit_rows ORDER BY ALL")
        units = store.fetchall("SELECT unit_key, status, n_rows, finished_at FROM units ORDER BY ALL")
    return {
        "shards": [s for s in shards if s[0] in keys],
        "rows": [r for r in rows if r[0] in keys],
        "units": [u for u in units if u[0] in keys],
    }


def _keys_of(catalog: Path) -> dict[str, tuple[str, str]]:
    """unit_key -> (model, position) as the catalog's settings key them (no store, no model)."""
    from safeport.catalog import load_catalog

    resolved = load_catalog(str(catalog), "default")
    with Store(catalog.parent / "store", read_only=True) as store:  # the fixture's dataset hashes
        hashes = {d: store.dataset_hash(d) for d in DATASETS}
    out = {}
    for cm in capture_models(resolved):
        for dataset in DATASETS:
            for position in cm.positions:
                out[cm.unit_key(dataset, str(hashes[dataset]), position)] = (cm.name, position)
    return out


def test_capture_settings_are_part_of_the_unit_key(
    captured: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog, ref = captured
    root = _copy(ref, tmp_path / "store")
    original = _units(root)
    assert _keys_of(catalog) == original  # the same settings give the same keys
    kept = _records(root, set(original))
    texts = _texts(root)

    def capture(name: str, expect_new: set[str], **kwargs: Any) -> dict[str, tuple[str, str]]:
        before = _units(root)
        variant = _catalog(catalog.parent, name, store=root, **kwargs)
        capture_flow(str(variant), store=str(root))
        after = _units(root)
        new = {k: v for k, v in after.items() if k not in before}
        assert {m for m, _ in new.values()} == expect_new, name
        assert sorted(new.values()) == sorted((m, p) for m in expect_new for p in POSITIONS[m] for _ in DATASETS)
        assert set(new) <= set(_keys_of(variant))
        assert _records(root, set(original)) == kept  # the old units, their shards and rows untouched
        return new

    # image_tokens is in every pipeline unit's key (text positions too); the text encoder's units stay.
    new = capture("two-image-tokens", {FLUX, SD3}, image_tokens=2)
    got = _count(root, "select unit_key, count(*) from unit_rows group by all")
    want = _expected_rows(texts, image_tokens=2)
    for key, (model, position) in new.items():
        dataset = _unit_dataset(root, key)
        assert got[(key,)] == sum(n for (m, d, p, _), n in want.items() if (m, d, p) == (model, dataset, position))
    # the model's generation steps: only that model's units are new.
    capture("five-steps", {FLUX}, generation={FLUX: {"num_inference_steps": 5}})
    # The same settings again (the original catalog): nothing new, nothing computed, no model loaded.
    units = _units(root)
    _refuse_models(monkeypatch)
    results = capture_flow(str(catalog), store=str(root))
    assert {r.status for r in results} == {"skipped"}
    assert _units(root) == units


def _unit_dataset(root: Path, key: str) -> str:
    with Store(root, read_only=True) as store:
        return str(store.scalar("SELECT dataset FROM units WHERE unit_key = ?", [key]))


# --- 3. adding positions: one denoiser pass per shard for all of them ----------------------------------


class _Passes:
    """Counts the tiny Flux's transformer forwards and pipeline passes (a forward before the first scheduler step)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.passes = 0

    def wrap(self, load: Callable[..., Any]) -> Callable[..., Any]:
        def counting(*args: Any, **kwargs: Any) -> Any:
            pipe = load(*args, **kwargs)

            def count(module: torch.nn.Module, inputs: Any) -> None:
                self.forwards += 1
                self.passes += pipe.scheduler.step_index is None

            pipe.transformer.register_forward_pre_hook(count)
            return pipe

        return counting


def test_added_positions_run_the_denoiser_once_per_shard_for_all_of_them(
    captured: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    import safeport.eval.generate

    catalog, ref = captured
    root = tmp_path / "store"
    passes = _Passes()
    monkeypatch.setattr(safeport.eval.generate, "load_pipeline", passes.wrap(safeport.eval.generate.load_pipeline))
    shards = sum(-(-n // SHARD_TEXTS) for n in N_TEXTS.values())  # 2 + 3
    first = _catalog(catalog.parent, "flux-one-position", store=root, models=[FLUX], positions={FLUX: ["double.0.img"]})
    capture_flow(str(first), store=str(root))
    assert (passes.passes, passes.forwards) == (shards, shards * (max(STEPS) + 1))
    kept_keys = set(_units(root))
    kept = _records(root, kept_keys)

    passes.passes = passes.forwards = 0
    three = ["double.0.img", "double.0.txt", "single.0.img"]
    grown = _catalog(catalog.parent, "flux-three-positions", store=root, models=[FLUX], positions={FLUX: three})
    results = capture_flow(str(grown), store=str(root))
    assert passes.passes == shards  # one pipeline pass per shard for both new positions, not one per position
    assert passes.forwards == shards * (max(STEPS) + 1)  # each stopped after the last captured step
    assert {r.status for r in results} == {"done"}
    assert _records(root, kept_keys) == kept  # the old unit untouched (records, commit times, rows)
    units = _units(root)
    assert sorted(units.values()) == sorted((FLUX, p) for p in three for _ in DATASETS)
    # Known answer: the same keys and the same rows, bit for bit, as the capture of every position at once.
    reference = _token_dump(ref)
    mine = _token_dump(root)
    assert set(units) <= {u[0] for u in reference["units"]}  # the same keys as the fixture
    for key in units:
        assert [s for s in mine["shards"] if s[0] == key] == [s for s in reference["shards"] if s[0] == key]
        assert [r for r in mine["unit_rows"] if r[0] == key] == [r for r in reference["unit_rows"] if r[0] == key]
    for path, values in mine.items():
        if path.startswith("acts/"):
            assert np.array_equal(values, reference[path]), path


# --- 4. kill -9 mid-capture, then a rerun ----------------------------------------------------------------


def _cli(api: str, log: Path, *argv: str) -> subprocess.Popen[bytes]:
    """``safeport ARGV`` in a subprocess computing with one torch thread; its stderr goes to ``log``."""
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = "import sys; from safeport.cli import main; sys.exit(main(sys.argv[1:]))"
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL, stderr=err)


def _committed_token_shards(root: Path) -> int:
    """Token shards committed in the store, read read-only (0 while the store or its tables do not exist yet)."""
    if not (root / "meta.duckdb").is_file():
        return 0
    try:
        table = readonly_query(root, "select count(*) n from shards join units using (unit_key) where kind = 'tokens'")
    except Exception:  # the writer is creating the file or its tables
        return 0
    return int(table.to_pylist()[0]["n"])


def _wait_for(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float = 240) -> bool:
    """Poll ``condition`` while ``proc`` runs; False when the process ended first (or the deadline passed)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_kill9_mid_capture_then_a_rerun_equals_an_uninterrupted_run(
    captured: tuple[Path, Path], tmp_path: Path, prefect_api: str, one_thread: None
) -> None:
    catalog, ref = captured
    total = len(_token_dump(ref)["shards"])
    root = tmp_path / "store"
    for attempt in range(3):
        shutil.rmtree(root, ignore_errors=True)
        log = tmp_path / f"capture-{attempt}.log"
        proc = _cli(prefect_api, log, "capture", "--catalog", str(catalog), "--store", str(root))
        if _wait_for(proc, lambda: _committed_token_shards(root) >= 1):
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) in (0, -signal.SIGKILL), log.read_text(errors="replace")[-3000:]
        if 1 <= _committed_token_shards(root) < total:
            break
    else:
        pytest.fail("the capture finished (or committed nothing) before each of 3 kills")
    interrupted = verify_path(root)  # what the kill left: committed shards all verify
    assert interrupted.ok and 1 <= interrupted.shards < total, [d.describe() for d in interrupted.damage]

    capture_flow(str(catalog), store=str(root))  # the rerun
    report = verify_path(root)
    assert report.ok, [d.describe() for d in report.damage]
    per_shard = "select unit_key, shard, count(*), count(distinct row) from unit_rows group by all"
    with Store(ref, read_only=True) as store:
        tokens = {r[0] for r in store.fetchall("SELECT unit_key FROM units WHERE kind = 'tokens'")}
    want = {k: v for k, v in _count(ref, per_shard).items() if k[0] in tokens}
    got = _count(root, per_shard)
    assert got == want  # no duplicate, no missing row, per unit and shard
    _assert_same_tokens(root, ref)  # and the rows equal the uninterrupted run's, bit for bit


# --- 5. a wrong position name ----------------------------------------------------------------------------


@pytest.mark.parametrize("plan", [False, True], ids=["capture", "plan"])
def test_a_wrong_position_name_is_one_error_line_listing_the_valid_names(
    captured: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    plan: bool,
) -> None:
    catalog, _ = captured
    wrong = _catalog(
        catalog.parent, "wrong-position", store=tmp_path / "store", models=[FLUX], positions={FLUX: ["double.7.img"]}
    )
    _refuse_models(monkeypatch)
    capsys.readouterr()
    code = main(["capture", "--catalog", str(wrong), *(["--plan"] if plan else [])])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("safeport: error: "), lines
    assert "'flux'" in lines[0] and "double.7.img" in lines[0]
    for valid in ("te.{0..1}.txt", "double.0.txt", "double.0.img", "single.0.img"):  # the tiny Flux's tree
        assert valid in lines[0], lines[0]
    assert not _committed_token_shards(tmp_path / "store")


# --- 6. two Dask workers give the single-process cache, bit for bit ----------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The local cluster ``--dask-workers 2`` starts (two single-threaded processes on loopback); its address."""
    from distributed import LocalCluster

    with LocalCluster(**dask_task_runner(workers=2).cluster_kwargs) as c:
        yield str(c.scheduler_address)


def test_two_dask_workers_equal_the_single_process_cache(
    captured: tuple[Path, Path], tmp_path: Path, cluster: str, one_thread: None
) -> None:
    catalog, ref = captured
    root = tmp_path / "dask"
    run = capture_flow.with_options(task_runner=dask_task_runner(cluster))
    results = run(str(catalog), "default", str(root))
    assert {(r.model, r.dataset, r.status) for r in results} == {(m, d, "done") for m in POSITIONS for d in DATASETS}
    dump = _assert_same_tokens(root, ref)  # arrays, checksums, row index
    assert len(dump["shards"]) == sum(len(p) for p in POSITIONS.values()) * 5  # 2 + 3 shards per unit
    with Store(root, read_only=True) as store:
        workers = store.fetchall("SELECT DISTINCT task FROM runs WHERE flow = 'capture' AND task LIKE '%@%'")
    assert len(workers) == 2, workers  # both workers computed pieces


# --- 7. --plan: no model loaded, the rows the capture commits -----------------------------------------------


def _committed_per_position(root: Path) -> dict[tuple[str, str], int]:
    return {
        (m, p): n for (m, p), n in _count(root, "select model, position, count(*) from token_rows group by all").items()
    }


def test_plan_loads_no_model_and_counts_what_the_capture_commits(
    captured: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, root = captured
    _refuse_models(monkeypatch)
    committed = _committed_per_position(root)
    plans = {p.model: p for p in plan_capture(str(catalog), "default")}
    assert list(plans) == list(POSITIONS)
    for model, plan in plans.items():
        assert plan.texts == sum(N_TEXTS.values())
        assert [p.position for p in plan.positions] == list(POSITIONS[model])
        for p in plan.positions:
            assert p.done_rows == committed[model, p.position]  # what the store holds, exactly
            assert p.bytes == p.rows * (384 if model == TE else _dim(root, model, p.position)) * 2  # float16
    # The text encoder's positions: real-token counts from its pooled rows, exact.
    assert {p.position: p.rows for p in plans[TE].positions} == {p: committed[TE, p] for p in POSITIONS[TE]}

    capsys.readouterr()
    assert main(["capture", "--plan", "--catalog", str(catalog), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for model, plan in plans.items():
        assert f"{model}: {plan.texts} texts" in out
        for p in plan.positions:
            assert f"{p.rows:,}" in out and p.position in out
    assert f"total: {sum(p.rows for p in plans.values()):,} rows" in out


def _dim(root: Path, model: str, position: str) -> int:
    with Store(root, read_only=True) as store:
        return int(
            store.scalar(
                "SELECT any_value(u.dim) FROM units u JOIN models m USING (model_key) "
                "WHERE m.name = ? AND u.position = ?",
                [model, position],
            )
        )


def test_plan_image_rows_equal_the_committed_rows(captured: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    catalog, root = captured
    _refuse_models(monkeypatch)
    committed = _committed_per_position(root)
    planned = {(p.model, p.position): p.rows for plan in plan_capture(str(catalog), "default") for p in plan.positions}
    img = [k for k in committed if k[1].endswith(".img")]
    assert {k: planned[k] for k in img} == {k: committed[k] for k in img}


def test_plan_pipeline_text_rows_equal_the_committed_rows(
    captured: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog, root = captured
    _refuse_models(monkeypatch)
    committed = _committed_per_position(root)
    planned = {(p.model, p.position): p.rows for plan in plan_capture(str(catalog), "default") for p in plan.positions}
    txt = [k for k in committed if k[0] != TE and k[1].endswith(".txt")]
    assert {k: planned[k] for k in txt} == {k: committed[k] for k in txt}


# --- 8. verify checks token units; gc keeps committed token shards -----------------------------------------


def _shard_chunk(root: Path, model: str, position: str, dataset: str, shard: int) -> tuple[str, Path]:
    """(unit key, the chunk file of one committed shard array) of a token unit."""
    with Store(root, read_only=True) as store:
        key, path = store.fetchall(
            "SELECT u.unit_key, s.array_path FROM units u JOIN models m USING (model_key) "
            "JOIN shards s USING (unit_key) "
            "WHERE m.name = ? AND u.position = ? AND u.dataset = ? AND s.shard = ?",
            [model, position, dataset, shard],
        )[0]
    chunks = [p for p in (root / "arrays.zarr" / path).rglob("*") if p.is_file() and "/c/" in p.as_posix()]
    assert len(chunks) == 1, chunks  # one chunk: the shard's rows fit CHUNK_ROWS
    return str(key), chunks[0]


def test_verify_names_a_damaged_token_shard_with_its_position_and_gc_keeps_committed_shards(
    captured: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, ref = captured
    root = _copy(ref, tmp_path / "store")
    capsys.readouterr()
    assert main(["gc", "--store", str(root)]) == 0
    assert "gc: would remove 0 unreferenced array(s) and 0 half-written file(s)" in capsys.readouterr().out
    with Store(root) as store:  # an array no record refers to, beside the token units: gc must see it
        mk = store.scalar("SELECT model_key FROM models WHERE name = ?", [FLUX])
        store.arrays.create_array(f"acts/{mk}/orphan", shape=(2, 2), dtype="float32")
    assert [g.path for g in collect_garbage(root).garbage] == [f"acts/{mk}/orphan"]

    assert main(["verify", "--store", str(root)]) == 0
    key = _damage(root)
    capsys.readouterr()
    assert main(["verify", "--store", str(root)]) == 1
    damaged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  shard ")]
    assert len(damaged) == 1, damaged
    assert f"acts/{mk}/{key} shard 1 rows 0-" in damaged[0]
    assert "position double.0.img" in damaged[0] and "dataset pairs" in damaged[0] and "model flux" in damaged[0]


def _damage(root: Path, model: str = FLUX, position: str = "double.0.img", dataset: str = "pairs") -> str:
    """Flip a byte in the middle of shard 1's chunk of a token unit; returns the unit key."""
    key, chunk = _shard_chunk(root, model, position, dataset, 1)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return key


def test_capture_recomputes_exactly_an_invalidated_token_shard(captured: tuple[Path, Path], tmp_path: Path) -> None:
    from safeport.store.verify import invalidate, verify_store

    catalog, ref = captured
    root = _copy(ref, tmp_path / "store")
    key = _damage(root)
    with Store(root) as store:
        plan = invalidate(store, verify_store(store))
    assert [(k, list(s)) for k, s in plan.shards] == [(key, [1])]
    results = capture_flow(str(catalog), store=str(root))
    assert sorted((r.model, r.dataset, r.rows) for r in results if r.status == "done") == [
        (FLUX, "pairs", 4 * IMAGE_TOKENS * len(STEPS))  # the 4 texts of shard 1 at double.0.img, nothing else
    ]
    assert verify_path(root).ok
    _assert_same_tokens(root, ref)


def test_verify_repair_recomputes_a_damaged_token_shard(
    captured: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, ref = captured
    root = _copy(ref, tmp_path / "store")
    _damage(root)
    assert main(["verify", "--repair", "--catalog", str(catalog), "--store", str(root)]) == 0, capsys.readouterr().err
    _assert_same_tokens(root, ref)
