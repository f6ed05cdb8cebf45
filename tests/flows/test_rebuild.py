"""``safeport rebuild``: only new work runs (shown by the run records), removed models go stale, nothing is lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import safeport.flows.common
from safeport.catalog import load_catalog
from safeport.extractors import ModelSource
from safeport.flows.common import model_source, with_revisions
from safeport.flows.rebuild import RebuildResult, rebuild, resolve_revisions
from safeport.store import artifacts
from safeport.store.maintenance import status
from safeport.store.store import Store, StoreError
from safeport.store.verify import verify_path
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog
from tests.flows.conftest import REBUILT_SIZES
from tests.tiny_models import tiny_bert

SIZES: dict[str, Any] = REBUILT_SIZES


def _third_model(tmp: Path, seed: int = 1) -> dict[str, Any]:
    folder = tmp / "models" / "bert2"
    if not folder.exists():
        tiny_bert(folder, seed=seed)
    entry = {"role": "target", "family": "text_encoder", "path": str(folder), "device": "cpu", "batch_size": 8}
    return {"tgt2": {**entry, "max_tokens": 64}}


@pytest.fixture
def base(rebuilt_tiny: Path) -> Path:
    """A folder with tiny models and a store rebuilt once for src -> tgt (shared by the session)."""
    return rebuilt_tiny


@pytest.fixture
def work(base: Path, tmp_path: Path) -> Path:
    """A private copy of the base folder (models + store), so tests do not share state."""
    dst = tmp_path / "w"
    shutil.copytree(base, dst)
    return dst


def _runs(root: Path, run_id: str, flow: str) -> dict[tuple[str, str], str]:
    with Store(root, read_only=True) as store:
        rows = store.con.execute(
            "SELECT model, dataset, status FROM runs WHERE run_id = ? AND flow = ?", [run_id, flow]
        ).fetchall()
    return {(m, d): s for m, d, s in rows}


def _only_loads(monkeypatch: pytest.MonkeyPatch, allowed: set[str]) -> list[str]:
    """Let ``load_extractor`` load only the named models; returns the names it loaded."""
    loaded: list[str] = []
    real = safeport.flows.common.load_extractor

    def guarded(source: ModelSource) -> Any:
        if source.name not in allowed:
            raise AssertionError(f"model {source.name} was loaded but has no new work")
        loaded.append(source.name)
        return real(source)

    monkeypatch.setattr(safeport.flows.common, "load_extractor", guarded)
    return loaded


def test_adding_a_model_computes_only_its_work(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = tiny_catalog(work, **SIZES, extra_models=_third_model(work))
    loaded = _only_loads(monkeypatch, {"tgt2"})
    result = rebuild(str(catalog))
    root = work / "store"

    extract = _runs(root, result.run_id, "extract")
    assert {s for (m, _), s in extract.items() if m in ("src", "tgt")} == {"skipped"}
    assert {s for (m, _), s in extract.items() if m == "tgt2"} == {"done"}
    assert len(extract) == 3 * 4  # three models x (anchors, pairs, prompts, concept)
    assert _runs(root, result.run_id, "fit") == {("src->tgt", "anchors"): "skipped", ("src->tgt2", "anchors"): "done"}
    assert loaded == ["tgt2"]
    assert not any(result.stale.values())
    with Store(root, read_only=True) as store:
        assert store.scalar("SELECT count(*) FROM vectors WHERE target = 'tgt2'") > 0
        lineage = store.sql("SELECT DISTINCT input_units FROM lineage WHERE target = 'tgt2' AND map_key IS NOT NULL")
        assert lineage.num_rows >= 1  # every new vector's lineage is one SQL view away


def test_removing_a_model_marks_its_artefacts_stale_and_keeps_them(work: Path) -> None:
    catalog_3 = tiny_catalog(work, **SIZES, extra_models=_third_model(work))
    rebuild(str(catalog_3))
    root = work / "store"
    with Store(root, read_only=True) as store:
        before = {t: store.scalar(f"SELECT count(*) FROM {t}") for t in ("units", "activation_rows", "maps", "vectors")}
        tgt2_key = store.scalar("SELECT model_key FROM models WHERE name = 'tgt2'")

    result = rebuild(str(tiny_catalog(work, **SIZES)))  # tgt2 left the catalog
    assert {r.status for r in result.extracted} == {"skipped"}
    assert result.stale["model"] == 1 and result.stale["unit"] == 4 and result.stale["fit"] == 1
    assert result.stale["map"] == 2 and result.stale["vector"] > 0 and result.stale["report"] == 1
    st = status(root)
    stale = st.stale.to_pylist()
    assert {r["kind"] for r in stale} == {"model", "unit", "map", "fit", "vector", "report"}
    assert all("tgt2" in r["reason"] and "no longer in profile" in r["reason"] for r in stale)
    assert [r["name"] for r in st.models.to_pylist() if r["stale"]] == ["tgt2"]
    with Store(root, read_only=True) as store:  # nothing was deleted, and the rows still read
        after = {t: store.scalar(f"SELECT count(*) FROM {t}") for t in before}
        assert after == before
        assert store.activations(tgt2_key, "anchors")[1].shape[0] == SIZES["anchors"]
        name = store.scalar("SELECT name FROM vectors WHERE target = 'tgt2' LIMIT 1")
        assert np.isfinite(artifacts.load_vector(store, name)[0]).all()

    catalog_3 = tiny_catalog(work, **SIZES, extra_models=_third_model(work))  # the same file, rewritten
    back = rebuild(str(catalog_3))  # putting it back costs nothing and clears the label
    assert {r.status for r in back.extracted} == {"skipped"}
    assert {f.status for f in back.fitted} == {"skipped"}
    assert not any(back.stale.values())


def test_changed_local_weights_are_a_new_representation(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = tiny_catalog(work, **SIZES)
    old_key = model_source(load_catalog(catalog), "tgt").spec().key()
    shutil.rmtree(work / "models" / "bert")
    tiny_bert(work / "models" / "bert", seed=2)  # same config, new weights
    new_key = model_source(load_catalog(catalog), "tgt").spec().key()
    assert new_key != old_key

    loaded = _only_loads(monkeypatch, {"tgt"})
    result = rebuild(str(catalog))
    extract = _runs(work / "store", result.run_id, "extract")
    assert {s for (m, _), s in extract.items() if m == "src"} == {"skipped"}
    assert {s for (m, _), s in extract.items() if m == "tgt"} == {"done"}
    assert [f.status for f in result.fitted] == ["done"]
    assert loaded == ["tgt"]
    st = status(work / "store")
    current = {r["model_key"]: r for r in st.models.to_pylist() if r["name"] == "tgt"}
    assert current[new_key]["current"] and not current[new_key]["stale"]
    assert current[old_key]["stale"] and "superseded" in current[old_key]["reason"]
    assert result.stale["fit"] == 1 and result.stale["model"] == 1


class _FakeHub:
    """``HfApi`` stand-in: answers a sha per (repo, revision) or raises."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    def model_info(self, repo_id: str, revision: str | None = None, timeout: float | None = None) -> Any:
        self.asked.append((repo_id, str(revision)))
        answer = self.answers[repo_id]
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(sha=answer)


def _hub_catalog(tmp: Path) -> Path:
    hub = {"role": "target", "family": "text_encoder", "device": "cpu"}
    return tiny_catalog(
        tmp,
        **SIZES,
        extra_models={
            "hub-a": {**hub, "hub_id": "org/a"},
            "hub-pinned": {**hub, "hub_id": "org/p", "revision": "f" * 40},
            "hub-down": {**hub, "hub_id": "org/down"},
        },
    )


def test_new_hub_revision_changes_only_that_models_key(tmp_path: Path) -> None:
    resolved = load_catalog(_hub_catalog(tmp_path))
    api = _FakeHub({"org/a": "a" * 40, "org/down": ConnectionError("no route to host")})
    checks = {c.model: c for c in resolve_revisions(resolved, online=True, api=api)}
    assert checks["hub-a"].status == "resolved" and checks["hub-a"].revision == "a" * 40
    assert checks["hub-pinned"].status == "pinned"  # a sha is never looked up
    assert checks["hub-down"].status == "offline" and checks["hub-down"].revision == "main"
    assert ("org/p", "f" * 40) not in api.asked

    before = {m: model_source(resolved, m).spec().key() for m in resolved.models}
    first = with_revisions(resolved, {"hub-a": "a" * 40})
    second = with_revisions(resolved, {"hub-a": "b" * 40})  # the hub moved on
    k1 = {m: model_source(first, m).spec().key() for m in resolved.models}
    k2 = {m: model_source(second, m).spec().key() for m in resolved.models}
    assert {m for m in k1 if k1[m] != k2[m]} == {"hub-a"}
    assert {m for m in k1 if k1[m] != before[m]} == {"hub-a"}


def test_offline_keeps_catalog_revisions_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolved = load_catalog(_hub_catalog(tmp_path))
    api = _FakeHub({})
    with caplog.at_level("WARNING", logger="safeport.rebuild"):
        checks = resolve_revisions(resolved, online=False, api=api)
    assert api.asked == []
    assert {c.model: c.status for c in checks} == {"hub-a": "offline", "hub-pinned": "pinned", "hub-down": "offline"}
    assert all(c.revision == c.catalog_revision for c in checks)
    assert "offline" in caplog.text and "keeping the catalog revisions" in caplog.text


def _fake_hub_cache(cache: Path, repo: str, snapshots: dict[str, int]) -> None:
    """A Hugging Face cache holding ``repo`` at several commits (sha -> tiny BERT seed), as downloads leave it."""
    base = cache / f"models--{repo.replace('/', '--')}"
    for sha, seed in snapshots.items():
        tiny_bert(base / "snapshots" / sha, seed=seed)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(next(iter(snapshots)))


def test_new_hub_revision_re_extracts_only_that_model(
    work: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``main`` moves on the hub: the rebuild resolves the new sha and recomputes that model's work only."""
    import huggingface_hub
    from huggingface_hub import constants

    sha1, sha2 = "1" * 40, "2" * 40
    _fake_hub_cache(tmp_path / "hf", "org/tiny-bert", {sha1: 1, sha2: 2})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # offline loads read this cache
    hub = _FakeHub({"org/tiny-bert": sha1})
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    extra = {"hubm": {"role": "target", "family": "text_encoder", "hub_id": "org/tiny-bert", "device": "cpu"}}
    catalog = str(tiny_catalog(work, **SIZES, extra_models=extra))
    root = work / "store"

    first = rebuild(catalog, online=True)
    assert [(c.model, c.revision, c.status) for c in first.revisions] == [("hubm", sha1, "resolved")]
    assert {s for (m, _), s in _runs(root, first.run_id, "extract").items() if m == "hubm"} == {"done"}

    hub.answers["org/tiny-bert"] = sha2  # a new commit on main
    loaded = _only_loads(monkeypatch, {"hubm"})
    second = rebuild(catalog, online=True)
    extract = _runs(root, second.run_id, "extract")
    assert {s for (m, _), s in extract.items() if m in ("src", "tgt")} == {"skipped"}
    assert {s for (m, _), s in extract.items() if m == "hubm"} == {"done"}
    assert _runs(root, second.run_id, "fit") == {("src->tgt", "anchors"): "skipped", ("src->hubm", "anchors"): "done"}
    assert loaded == ["hubm"]
    with Store(root, read_only=True) as store:
        revisions = store.con.execute("SELECT revision, current FROM models WHERE name = 'hubm' ORDER BY 1").fetchall()
        assert revisions == [(sha1, False), (sha2, True)]
        resolved = store.con.execute(
            "SELECT status, message FROM runs WHERE run_id = ? AND task = 'resolve_revision'", [second.run_id]
        ).fetchall()
        assert resolved == [("resolved", f"main -> {sha2}")]
    assert second.stale["model"] == 1 and second.stale["fit"] == 1


_REBUILD_SCRIPT = """
import sys
from safeport.flows.rebuild import rebuild
r = rebuild(sys.argv[1])
print("RUN", r.run_id, sorted({u.status for u in r.extracted}))
"""


def _writing(root: Path) -> bool:
    """Whether a writer has started on the store (its presence claim is visible)."""
    try:
        with Store(root, read_only=True, wait_s=5) as store:
            return bool(store.scalar("SELECT count(*) FROM claims WHERE kind = 'writer'"))
    except StoreError:
        return False


def test_two_rebuilds_at_once_both_finish_and_each_piece_of_work_is_done_once(
    base: Path, tmp_path: Path, prefect_api: str
) -> None:
    """A second rebuild started while the first runs shares the store: both finish, nothing is computed twice."""
    shutil.copytree(base / "models", tmp_path / "models")
    catalog = tiny_catalog(tmp_path, **SIZES, extra_models=_third_model(tmp_path))
    root = tmp_path / "store"
    shutil.copytree(base / "store", root)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-c", _REBUILD_SCRIPT, str(catalog)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not _writing(root):
            assert first.poll() is None, first.communicate()[1].decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the first rebuild never started writing"
            time.sleep(0.05)
        second: RebuildResult = rebuild(str(catalog))  # runs beside the first, not behind it
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err.decode(errors="replace")[-2000:]
    assert "RUN" in out.decode()
    with Store(root, read_only=True) as store:  # consistent and readable, no duplicates, nothing done twice
        rows = store.scalar("SELECT count(*) FROM activation_rows")
        assert rows == store.scalar("SELECT count(DISTINCT (model_key, text_id)) FROM activation_rows")
        per_unit = store.fetchall(
            "SELECT u.unit_key, u.n_rows, coalesce(sum(r.rows), 0) FROM units u "
            "LEFT JOIN runs r ON r.unit_key = u.unit_key AND r.task = 'extract_unit' GROUP BY ALL"
        )
        assert [(k, n, got) for k, n, got in per_unit if n != got] == []
        fits = store.fetchall(
            "SELECT unit_key, count(*) FROM runs WHERE task = 'fit_pair' AND status = 'done' GROUP BY 1"
        )
        assert fits and all(n == 1 for _, n in fits)  # each fit (src->tgt2 is the new one) was fitted once
        assert {f.status for f in second.fitted} <= {"done", "skipped"}
        for model in ("src", "tgt", "tgt2"):
            for dataset in ("anchors", "pairs", "prompts"):
                meta, values = store.activations(model, dataset)
                assert meta.num_rows == values.shape[0] > 0 and np.isfinite(values).all()
        assert store.scalar("SELECT count(*) FROM units WHERE status <> 'done'") == 0
        assert store.scalar("SELECT count(*) FROM claims") == 0  # both released everything
    assert verify_path(root).ok
