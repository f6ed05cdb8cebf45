"""Flow-level tests of the SafeDIG fit (METHOD-SAFEDIG §3-6, issue 23): ``safedig_flow`` on a real token cache.

One catalog over the shipped real data: the real MiniLM text encoder (``te``, positions te.0-5.txt, 4 seeded
real tokens per text), 16 COCO/WikiText anchors and SafeSteer pairs of four categories (Sexual, Violence, Hate,
Illegal activity), shards of 8 texts, small SAEs (m = 2·d, k = 4, batch 256). The pairs are laid out by hand
so that the decoder refit's held-out 10 % (a seeded hash of the pair id, ``mappers/refit.heldout_mask``) holds
a train pair of Sexual and one of Violence: the two held-out categories the tests use. Known answers come from
that layout, the store's own tables and a second, independent path (SAELens, a perturbed copy of the cache, an
uninterrupted run), never from the code under test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

import safeport.flows.safedig as flow_mod
import safeport.mappers.sae
from safeport.api import export_safedig, load_safedig, read_exported_safedig
from safeport.cli import main
from safeport.eval.safedig import SafeDigBundle
from safeport.flows.capture import capture_flow
from safeport.flows.safedig import BundleResult, safedig_flow
from safeport.mappers.refit import heldout_mask
from safeport.store import safedig as art
from safeport.store.query import readonly_query
from safeport.store.store import Store
from safeport.store.units import checksum
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog
from tests.tiny_models import minilm_folder

TE = "te"
CATEGORIES = ("Sexual", "Violence", "Hate", "Illegal activity")
N_TRAIN, N_TEST = 36, 2  # train pairs in all; test pairs per category
HOLDOUT, OTHER_HOLDOUT = "Sexual", "Violence"
POSITIONS = tuple(f"te.{i}.txt" for i in range(6))
ROUTE_K = 2
SAE = {"expansion": 2, "k": 4, "epochs": 2, "batch_size": 256}
CHECKPOINT_EVERY = 3  # steps between checkpoints in the kill test (the flow's default is 20)
LONG_EPOCHS = 40  # the kill test's SAE: ~40 steps (one per epoch), so a kill at the first checkpoint lands mid-way
# Every column of the SafeDIG tables but the wall clock.
FIT_TABLES = {t: f"SELECT * {'' if t == 'sae_latents' else 'EXCLUDE (created_at) '}FROM {t}" for t in art.TABLES}
TOKEN_TABLES = {
    "units": "SELECT unit_key, status, n_rows FROM units",
    "shards": "SELECT unit_key, shard, row_start, row_stop, checksum FROM shards",
    "unit_rows": "SELECT count(*) FROM unit_rows",
}


# --- the catalog and the cache -------------------------------------------------------------------------------


def _pair_layout() -> dict[str, list[str]]:
    """Category per pair, in dataset order: train pairs first (pair ids 0..N_TRAIN-1), then the test pairs.

    The refit's held-out pairs (by the seeded hash of the pair id) get Sexual and Violence first, so both
    held-out categories have train pairs on each side of the refit's split; the rest cycle through the four.
    """
    held = [int(i) for i in np.flatnonzero(heldout_mask(np.arange(N_TRAIN)))]
    assert len(held) >= 2, held  # a property of the hash: 5 of the first 60 ids
    train: list[str | None] = [None] * N_TRAIN
    train[held[0]], train[held[1]] = HOLDOUT, OTHER_HOLDOUT
    rest = [i for i in range(N_TRAIN) if train[i] is None]
    for j, i in enumerate(rest):
        train[i] = CATEGORIES[j % len(CATEGORIES)]
    return {"train": [str(c) for c in train], "test": [c for c in CATEGORIES for _ in range(N_TEST)]}


def _write_pairs(tmp: Path) -> dict[str, Path]:
    """SafeSteer pairs (real texts, distinct per row) in the layout of :func:`_pair_layout`."""
    out: dict[str, Path] = {}
    used: set[str] = set()
    for split, wanted in _pair_layout().items():
        source = pd.read_parquet(REPO / "data" / f"SafeSteer_{split}.parquet")
        rows = []
        for category in wanted:  # the first unused pair of the category: no text is in two pairs
            pool = source[source.category == category]
            fresh = pool[~pool.safe_prompt.isin(used) & ~pool.unsafe_prompt.isin(used)].iloc[0]
            used.update((fresh.safe_prompt, fresh.unsafe_prompt))
            rows.append(fresh)
        path = tmp / f"pairs_{split}.parquet"
        pd.DataFrame(rows)[["safe_prompt", "unsafe_prompt", "category"]].to_parquet(path)
        out[split] = path
    return out


def _catalog(tmp: Path, name: str = "safedig", **safedig: Any) -> Path:
    """The tiny catalog with MiniLM as ``te`` and a ``safedig:`` block (``safedig`` overrides its keys)."""
    te = {
        "role": "target",
        "family": "text_encoder",
        "path": str(minilm_folder()),
        "device": "cpu",
        "batch_size": 8,
        "max_tokens": 32,
    }
    data = yaml.safe_load(tiny_catalog(tmp, anchors=16, extra_models={TE: te}).read_text())
    pairs = {s: tmp / f"pairs_{s}.parquet" for s in ("train", "test")}
    if not all(p.is_file() for p in pairs.values()):
        pairs = _write_pairs(tmp)
    data["datasets"]["pairs"]["sources"] = [{"path": str(p), "split": s} for s, p in pairs.items()]
    profile = data["profiles"]["default"]
    profile.update(models=["src", TE], prompts=[], store=str(tmp / "store"))
    profile["safedig"] = {
        "models": [TE],
        "positions": {TE: "all"},
        "text_tokens": 4,
        "shard_texts": 8,
        "holdout": HOLDOUT,
        "route_k": ROUTE_K,
        "harmful_latents": 4,
        "sae": dict(SAE),
        **safedig,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def captured(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalog, store) holding the token cache only (read-only for the tests: copy it to write)."""
    tmp = tmp_path_factory.mktemp("safedig-cache")
    catalog = _catalog(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = capture_flow(str(catalog))
    finally:
        torch.set_num_threads(threads)
    assert {(r.model, r.dataset, r.status) for r in results} == {(TE, "anchors", "done"), (TE, "pairs", "done")}
    root = tmp / "store"
    layout = _pair_layout()
    with Store(root, read_only=True) as store:  # the layout reached the store as designed
        got = store.fetchall(
            "SELECT pair_id, any_value(category), any_value(split) FROM dataset_texts WHERE dataset = 'pairs' "
            "GROUP BY 1 ORDER BY 1"
        )
    assert [(c, s) for _, c, s in got] == [(c, s) for s in ("train", "test") for c in layout[s]]
    return catalog, root


@pytest.fixture(scope="module")
def fitted(captured: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BundleResult]]:
    """(store, bundles) of one uninterrupted fit on a copy of the cache (one torch thread; read-only)."""
    catalog, cache = captured
    root = _copy(cache, tmp_path_factory.mktemp("safedig-fit") / "store")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = safedig_flow(str(catalog), store=str(root))
    finally:
        torch.set_num_threads(threads)
    assert [(r.name, r.holdout) for r in results] == [(f"safedig:{TE}:{HOLDOUT}", HOLDOUT)]
    return root, results


# --- helpers ---------------------------------------------------------------------------------------------


def _copy(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    return to


def _rows(root: Path, sql: str) -> list[tuple[Any, ...]]:
    with Store(root, read_only=True) as store:
        return sorted(store.fetchall(sql), key=repr)


def _dump(root: Path, tables: dict[str, str]) -> dict[str, list[tuple[Any, ...]]]:
    return {name: _rows(root, sql) for name, sql in tables.items()}


def _saes(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every stored SAE's weights by key, checksum-verified."""
    with Store(root, read_only=True) as store:
        keys = [r[0] for r in store.fetchall("SELECT sae_key FROM saes")]
        return {k: art.load_sae(store, k)[0] for k in keys}


def _refuse_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: no token may be captured again."""
    import safeport.extractors
    import safeport.flows.capture
    import safeport.flows.common

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(safeport.flows.common, "extractor_for", refuse)
    monkeypatch.setattr(safeport.flows.capture, "extractor_for", refuse)
    monkeypatch.setattr(safeport.extractors, "load_extractor", refuse)
    monkeypatch.setattr(safeport.flows.common, "load_extractor", refuse)


def _spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, record: Callable[..., Any], seen: list[Any]) -> None:
    """Wrap ``owner.name``: each call appends ``record(*args, **kwargs)`` to ``seen``, then runs the original."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _core(bundles: list[BundleResult]) -> list[tuple[Any, ...]]:
    """What a bundle is (its name, routed and fixed positions, content key), not how its report renders."""
    return [(b.name, b.model, b.holdout, b.routed, b.fixed, b.bundle_key) for b in bundles]


def _one_thread_flow(catalog: Path, root: Path) -> list[BundleResult]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return safedig_flow(str(catalog), store=str(root))
    finally:
        torch.set_num_threads(threads)


# --- 1. reruns compute nothing; the cache is shared by every held-out category -----------------------------


def test_a_rerun_computes_nothing_and_a_new_holdout_adds_only_its_own_artefacts(
    captured: tuple[Path, Path], fitted: tuple[Path, list[BundleResult]], tmp_path: Path
) -> None:
    catalog, _ = captured
    root = _copy(fitted[0], tmp_path / "store")
    before = _dump(root, FIT_TABLES)
    tokens = _dump(root, TOKEN_TABLES)
    weights = _saes(root)
    run_ids = {r[0] for r in _rows(root, "SELECT DISTINCT run_id FROM runs")}

    # The same profile again: nothing is routed, trained, selected or captured.
    with pytest.MonkeyPatch.context() as mp:
        _refuse_models(mp)

        def refuse(*args: object, **kwargs: object) -> Any:
            raise AssertionError("a finished artefact was computed again")

        mp.setattr(safeport.mappers.sae, "train_sae", refuse)  # what train_position_sae imports when it runs
        for name in ("compute_route", "train_position_sae", "compute_select"):
            mp.setattr(flow_mod, name, refuse)
        again = _one_thread_flow(catalog, root)
    assert _core(again) == _core(fitted[1])
    assert _dump(root, FIT_TABLES) == before and _dump(root, TOKEN_TABLES) == tokens
    runs = [r for r in _rows(root, "SELECT run_id, flow, task, dataset, status FROM runs") if r[0] not in run_ids]
    fit_runs = [r for r in runs if r[1] == "safedig"]
    assert {r[2] for r in fit_runs} == {"route", "train_sae", "select"}
    assert {r[4] for r in runs} == {"skipped"}, runs  # the capture's and the fit's rows alike

    # Another held-out category on the same cache: its own routing, SAEs and refits, nothing else.
    other = _catalog(catalog.parent, "other-holdout", holdout=OTHER_HOLDOUT)
    routed: list[str] = []
    trained: list[Any] = []
    selected: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        _refuse_models(mp)
        _spy(mp, flow_mod, "compute_route", lambda store, piece, *a: piece.holdout, routed)
        _spy(mp, flow_mod, "compute_select", lambda store, piece, *a: piece.sae.holdout, selected)
        _spy(mp, safeport.mappers.sae, "train_sae", lambda batches, config, **kw: kw.get("resume"), trained)
        [result] = _one_thread_flow(other, root)
    assert (result.name, result.holdout) == (f"safedig:{TE}:{OTHER_HOLDOUT}", OTHER_HOLDOUT)
    wanted = set(result.routed) | {result.fixed}
    assert routed == [OTHER_HOLDOUT]
    assert trained == [None] * len(wanted)  # one SAE per routed or fixed position, each from scratch
    assert selected == [OTHER_HOLDOUT] * len(wanted)
    after = _dump(root, FIT_TABLES)
    for table, rows in before.items():  # every earlier artefact is kept, row for row
        assert set(rows) <= set(after[table]), table
    new_saes = [(h, p) for k, h, p in _rows(root, "SELECT sae_key, holdout, position FROM saes") if k not in weights]
    assert sorted(new_saes) == sorted((OTHER_HOLDOUT, p) for p in wanted)
    for table in ("routes", "refits", "safedig_bundles"):
        holdouts = {r[0] for r in _rows(root, f"SELECT holdout FROM {table}")}
        assert holdouts == {HOLDOUT, OTHER_HOLDOUT}, table
    stored = _saes(root)
    for key, arrays in weights.items():  # the earlier SAEs' arrays are untouched (and still verify)
        assert all(np.array_equal(arrays[n], stored[key][n]) for n in arrays), key
    assert _dump(root, TOKEN_TABLES) == tokens  # no token captured again
    assert load_safedig(root, f"safedig:{TE}:{HOLDOUT}").lineage["bundle_key"] == fitted[1][0].bundle_key


# --- 2. the held-out category never enters routing or SAE training -----------------------------------------


def _perturb(root: Path, category: str, seed: int) -> int:
    """Overwrite every token row of ``category``'s pair texts (both sides, every split and position) with noise.

    The shard checksums are recomputed, so the store stays consistent and readers see the new values; returns
    the number of rows changed.
    """
    rng = np.random.default_rng(seed)
    changed = 0
    with Store(root) as store:
        picked: dict[tuple[str, int], list[int]] = {}
        for key, shard, row in store.fetchall(
            "SELECT r.unit_key, r.shard, r.row FROM unit_rows r JOIN units u USING (unit_key) "
            "JOIN dataset_texts d ON d.dataset = u.dataset AND d.text_id = r.text_id "
            "WHERE u.kind = 'tokens' AND d.category = ?",
            [category],
        ):
            picked.setdefault((str(key), int(shard)), []).append(int(row))
        for (key, shard), rows in sorted(picked.items()):
            record = store.shard_records(key)[shard]
            array: Any = store.arrays[record.array_path]
            block = np.asarray(array[record.row_start : record.row_stop, :])
            local = np.unique(rows) - record.row_start
            block[local] = (4 * rng.standard_normal((len(local), block.shape[1]))).astype(block.dtype)
            array[record.row_start : record.row_stop, :] = block
            with store.transaction() as con:
                con.execute(
                    "UPDATE shards SET checksum = ? WHERE unit_key = ? AND shard = ?",
                    [checksum(block, record.dtype), key, shard],
                )
            changed += len(local)
    return changed


def _route_rows(catalog: Path, root: Path) -> list[dict[str, Any]]:
    """The flow's routing (§3) for HOLDOUT computed directly on ``root`` (no store write)."""
    from safeport.catalog import load_catalog
    from safeport.flows.capture import capture_models

    resolved = load_catalog(str(catalog), "default")
    with Store(root, read_only=True) as store:
        [cache] = flow_mod._caches(store, resolved, capture_models(resolved))
        pairs = flow_mod._pairs(store, "pairs")
        piece = flow_mod.route_piece(cache, HOLDOUT, sorted({p.category for p in pairs}), ROUTE_K)
        return flow_mod.compute_route(store, piece, pairs, ROUTE_K)


def _params(root: Path) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
    with Store(root, read_only=True) as store:
        keys = [r[0] for r in store.fetchall("SELECT params_key FROM steer_params")]
        return {k: art.load_params(store, k) for k in keys}


def test_the_held_out_category_never_enters_routing_or_sae_training(
    captured: tuple[Path, Path], fitted: tuple[Path, list[BundleResult]], tmp_path: Path
) -> None:
    """Two caches that differ only in the held-out category's rows route and train the same, bit for bit."""
    catalog, cache = captured
    reference, [bundle] = fitted
    root = _copy(cache, tmp_path / "held-out-noise")
    n_pairs = sum(c == HOLDOUT for split in _pair_layout().values() for c in split)
    assert _perturb(root, HOLDOUT, seed=1) == n_pairs * 2 * 4 * len(POSITIONS)  # both sides, 4 tokens a text
    [result] = _one_thread_flow(catalog, root)
    assert _core([result]) == _core([bundle])  # same keys: the same cache units, the same routed positions
    ours, theirs = _dump(root, FIT_TABLES), _dump(reference, FIT_TABLES)
    for table in ("routes", "saes", "sae_latents"):  # R_p, S_p, AUCs; SAE quality, c; H
        assert ours[table] == theirs[table], table
    ref_saes = _saes(reference)
    for key, arrays in _saes(root).items():
        assert all(np.array_equal(arrays[n], ref_saes[key][n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")), key
    # Positive control: the refit reads the held-out category's train rows, so it did see the noise ...
    with Store(root, read_only=True) as a, Store(reference, read_only=True) as b:
        for (key,) in a.fetchall("SELECT refit_key FROM refits"):
            assert not np.allclose(art.load_refit(a, key)[0]["W"], art.load_refit(b, key)[0]["W"]), key
    # ... while H, the thresholds (h = Σ z_H needs no decoder) and the source decoder's safe level did not.
    ref_params = _params(reference)
    for key, (arrays, row) in _params(root).items():
        ref_arrays, ref_row = ref_params[key]
        assert {k: row[k] for k in ("harmful", "tau_lo", "tau_hi", "n_safe")} == {
            k: ref_row[k] for k in ("harmful", "tau_lo", "tau_hi", "n_safe")
        }, key
        if row["refit_key"] == "source-decoder":
            assert np.array_equal(arrays["u_bar"], ref_arrays["u_bar"]), key
    # Negative control: noise on a source category's rows does move the routing.
    control = _copy(cache, tmp_path / "source-noise")
    _perturb(control, "Hate", seed=1)
    stored = readonly_query(reference, "SELECT position, robustness, separability FROM routes").to_pylist()
    moved = {r["position"]: (r["robustness"], r["separability"]) for r in _route_rows(catalog, control)}
    assert moved != {r["position"]: (r["robustness"], r["separability"]) for r in stored}
    same = {r["position"]: (r["robustness"], r["separability"]) for r in _route_rows(catalog, root)}
    assert same == {r["position"]: (r["robustness"], r["separability"]) for r in stored}


# --- 3. kill -9 mid SAE training, then a rerun resumes from the checkpoint -----------------------------------

KILLED_RUN = """
import sys
import torch
torch.set_num_threads(1)
import safeport.flows.safedig as flow
flow.CHECKPOINT_EVERY = int(sys.argv[3])
flow.safedig_flow(sys.argv[1], store=sys.argv[2])
"""


def _checkpoints(root: Path) -> dict[str, int]:
    """sae key -> step of its last complete checkpoint (what a resume reads), for every SAE that has one."""
    base = root / "arrays.zarr" / "sae_checkpoints"
    if not base.is_dir():
        return {}
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    out = {}
    for folder in sorted(base.iterdir()):
        found = art.read_checkpoint(group, folder.name) if folder.is_dir() else None
        if found is not None:
            out[folder.name] = int(found[1]["step"])
    return out


def _wait_for(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float = 240) -> bool:
    """Poll ``condition`` while ``proc`` runs (a state, not a delay); False when the process ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def long_training(captured: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profile whose SAE trains for ~40 steps with a checkpoint every 3 (here and in the killed process)."""
    catalog, _ = captured
    monkeypatch.setattr(flow_mod, "CHECKPOINT_EVERY", CHECKPOINT_EVERY)
    return _catalog(
        catalog.parent, "long", positions={TE: ["te.3.txt", "te.5.txt"]}, route_k=1, sae={**SAE, "epochs": LONG_EPOCHS}
    )


def test_kill9_mid_sae_training_then_a_rerun_resumes_and_equals_an_uninterrupted_run(
    captured: tuple[Path, Path],
    long_training: Path,
    tmp_path: Path,
    prefect_api: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, cache = captured
    root = _copy(cache, tmp_path / "killed")
    log = tmp_path / "killed.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", KILLED_RUN, str(long_training), str(root), str(CHECKPOINT_EVERY)]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        if _wait_for(proc, lambda: bool(_checkpoints(root))):
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=300)
    assert code == -signal.SIGKILL, log.read_text(errors="replace")[-3000:]
    left = _checkpoints(root)  # the state the kill left: a checkpoint of an SAE that is not stored
    assert left, "killed with no complete checkpoint"
    with Store(root, read_only=True) as store:
        stored = {r[0] for r in store.fetchall("SELECT sae_key FROM saes")} if art.has_tables(store) else set()
    assert not set(left) & stored

    resumed: list[int | None] = []
    _spy(
        monkeypatch,
        safeport.mappers.sae,
        "train_sae",
        lambda batches, config, **kw: None if kw.get("resume") is None else kw["resume"].step,
        resumed,
    )
    caplog.set_level(logging.INFO, logger="safeport.safedig")
    _one_thread_flow(long_training, root)  # the rerun
    assert sorted(s for s in resumed if s is not None) == sorted(left.values())  # from the last checkpoint
    for key, step in left.items():
        assert f"SAE {key}: resuming at step {step}" in caplog.text
    assert _checkpoints(root) == {}  # dropped once the SAE is stored

    reference = _copy(cache, tmp_path / "uninterrupted")
    _one_thread_flow(long_training, reference)
    ours, theirs = _saes(root), _saes(reference)
    assert ours.keys() == theirs.keys() and set(left) <= ours.keys()
    for key in ours:  # bit-identical to the uninterrupted run
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert np.array_equal(ours[key][name], theirs[key][name]), (key, name)
    assert _dump(root, FIT_TABLES)["saes"] == _dump(reference, FIT_TABLES)["saes"]  # c, FVU, curves too


# --- 4. the exported bundle: SAELens loads its SAEs; a job without the store gets the same arrays -------------


def _assert_same_bundle(a: SafeDigBundle, b: SafeDigBundle) -> None:
    assert (a.name, a.model, a.holdout) == (b.name, b.model, b.holdout)
    assert [p.position for p in a.positions] == [p.position for p in b.positions]
    for p, q in zip(a.positions, b.positions, strict=True):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            x, y = getattr(p.sae, name), getattr(q.sae, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), (p.position, name)
        assert (p.sae.c, p.sae.k, p.harmful, p.routed, p.fixed) == (q.sae.c, q.sae.k, q.harmful, q.routed, q.fixed)
        assert np.array_equal(p.decoder, q.decoder), p.position
        ca, cb = p.calibration, q.calibration
        assert (ca.tau_lo, ca.tau_hi, ca.n_tokens) == (cb.tau_lo, cb.tau_hi, cb.n_tokens), p.position
        assert np.array_equal(ca.u_bar, cb.u_bar), p.position


def test_the_exported_saes_load_in_saelens_and_encode_the_cache_like_safeport(
    fitted: tuple[Path, list[BundleResult]], tmp_path: Path
) -> None:
    from sae_lens import SAE as SaeLens

    root, [bundle] = fitted
    out = tmp_path / "export"
    assert main(["export", "--store", str(root), "--safedig", bundle.name, "-o", str(out)]) == 0
    folder = out / bundle.bundle_key
    stored = load_safedig(root, bundle.name)
    assert {p.position for p in stored.positions} == {*bundle.routed, bundle.fixed}
    with Store(root, read_only=True) as store:
        for position in stored.positions:
            sae = SaeLens.load_from_disk(str(folder / position.position / "sae"), device="cpu")
            assert (sae.cfg.d_in, sae.cfg.d_sae) == position.sae.W_enc.shape
            batch = next(store.batches("model = ? AND position = ?", params=[TE, position.position], seed=0))
            x = batch.values  # every cached row of the position (anchors and both sides of the pairs)
            assert len(x) > 100
            with torch.no_grad():
                theirs = sae.encode(torch.from_numpy(x)).numpy()
            mine = position.sae.encode(x)  # mappers.latents.SaeParams of the stored SAE
            assert np.array_equal(theirs > 0, mine > 0), position.position  # the same latents fire on every row
            np.testing.assert_allclose(theirs, mine, rtol=1e-5, atol=1e-5, err_msg=position.position)
    for refit in (True, False):  # the refitted decoder, and the "no refit" ablation
        _assert_same_bundle(read_exported_safedig(folder, refit=refit), load_safedig(root, bundle.name, refit=refit))
    assert export_safedig(root, bundle.name, tmp_path / "again") == tmp_path / "again" / bundle.bundle_key


# --- 5. every fit row is queryable in SQL, and none holds prompt text -------------------------------------------


def test_fit_rows_are_queryable_in_sql_and_hold_no_prompt_text(
    captured: tuple[Path, Path], fitted: tuple[Path, list[BundleResult]]
) -> None:
    root, [bundle] = fitted

    def q(sql: str) -> list[dict[str, Any]]:
        return readonly_query(root, sql).to_pylist()

    sources = sorted(set(CATEGORIES) - {HOLDOUT})
    routes = q("SELECT * FROM routes ORDER BY rank")
    assert [r["rank"] for r in routes] == list(range(1, len(POSITIONS) + 1))
    assert sorted(r["position"] for r in routes) == sorted(POSITIONS)
    assert [r["position"] for r in routes if r["routed"]] == list(bundle.routed) == [r["position"] for r in routes][:2]
    for r in routes:  # R_p = mean − population std of the per-category AUCs (§3), over the sources only
        auc = json.loads(r["auc_json"])
        assert sorted(auc) == sources and r["holdout"] == HOLDOUT
        assert r["robustness"] == pytest.approx(np.mean(list(auc.values())) - np.std(list(auc.values())), abs=1e-12)
    keys = [(r["robustness"], r["separability"]) for r in routes]
    assert keys == sorted(keys, reverse=True)  # ranked by R_p, ties by S_p

    saes = q("SELECT * FROM saes ORDER BY position")
    d = 384  # MiniLM's width
    assert [s["position"] for s in saes] == sorted({*bundle.routed, bundle.fixed})
    for s in saes:
        assert (s["d"], s["m"], s["k"], s["holdout"]) == (d, SAE["expansion"] * d, SAE["k"], HOLDOUT)
        assert 0 < s["l0"] <= SAE["k"] and 0 <= s["dead"] <= 1 and s["fvu"] > 0 and s["n_heldout"] > 0
    latents = q(
        "SELECT latents_key, count(*) AS n, count(DISTINCT category) AS scopes, "
        "count(*) FILTER (WHERE in_h AND category IS NULL) AS h FROM sae_latents GROUP BY 1"
    )
    assert len(latents) == len(saes)
    for row in latents:  # one row per latent and scope (pooled + each source category); |H| <= 4
        assert row["n"] == (1 + len(sources)) * SAE["expansion"] * d and row["scopes"] == len(sources)
        assert row["h"] <= 4
    refits = q("SELECT * FROM refits")
    assert len(refits) == len(saes) and {r["holdout"] for r in refits} == {HOLDOUT}
    for r in refits:
        assert r["k"] in range(-4, 3) and r["n_train"] > 0 and r["n_heldout"] > 0
        grid = json.loads(r["grid_json"])
        assert r["fvu"] == min(grid[f"fvu_k{k:+d}"] for k in range(-4, 3))
    params = q("SELECT * FROM steer_params")
    assert len(params) == 2 * len(saes) and sum(p["refit_key"] == "source-decoder" for p in params) == len(saes)
    assert all(p["tau_lo"] <= p["tau_hi"] for p in params)
    [b] = q("SELECT * FROM safedig_bundles")
    assert (b["name"], b["bundle_key"], b["holdout"]) == (bundle.name, bundle.bundle_key, HOLDOUT)
    for entry in json.loads(b["positions_json"]):  # every key a bundle names is a row of its table
        for table, column, key in (
            ("saes", "sae_key", entry["sae_key"]),
            ("refits", "refit_key", entry["refit_key"]),
            ("steer_params", "params_key", entry["params_key"]),
            ("steer_params", "params_key", entry["params_key_source"]),
        ):
            assert q(f"SELECT count(*) AS n FROM {table} WHERE {column} = '{key}'") == [{"n": 1}], (table, key)
        assert q(f"SELECT count(*) > 0 AS ok FROM sae_latents WHERE latents_key = '{entry['latents_key']}'") == [
            {"ok": True}
        ]

    with Store(root, read_only=True) as store:  # every text the cache was built from, both sides of the pairs
        texts = [r[0] for r in store.fetchall("SELECT text FROM texts")]
    needles = sorted({t[:24] for t in texts if len(t[:24].strip()) >= 12})
    assert len(needles) > 80
    for table in art.TABLES:
        cells = [str(v) for row in q(f"SELECT * FROM {table}") for v in row.values() if isinstance(v, str)]
        assert cells, table
        blob = "\n".join(cells)
        assert [n for n in needles if n in blob] == [], table
