"""A store written by the release before general units (schema 4, committed fixture) opens, migrates, computes nothing.

The fixture (``tests/fixtures/store-v4.tar.gz``, see its README) was built by safeport at commit
d0d4dc7: pooled rows in an ``activation_rows`` table, maps, vectors, report rows and 24 tiny-Flux
generations. This release must read every row of it without recomputing one: the migration moves
the row index into ``unit_rows`` (coordinates NULL), keeps ``activation_rows`` as a view, and a
rebuild with the profile that built it finds every unit, map, vector, fit and report done.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pytest

from safeport.cli import main
from safeport.flows.rebuild import rebuild
from safeport.store.fingerprint import folder_fingerprint
from safeport.store.query import readonly_query
from safeport.store.schema import SCHEMA_VERSION
from safeport.store.store import Store
from safeport.store.verify import verify_path
from tests.conftest import REPO
from tests.tiny_models import tiny_bert, tiny_llama

FIXTURE = REPO / "tests" / "fixtures" / "store-v4.tar.gz"
FINGERPRINTS = {"llama": "208561f85d71be78", "bert": "dc352d4ff3477836"}
DATA = ["coco_30k.csv", "wikitext2_valid.txt", "SafeSteer_train.parquet", "SafeSteer_test.parquet", "i2p.csv"]


def readme_queries() -> list[str]:
    """Every SQL query the README shows users (``safeport query "..."`` and ``con.sql("...")``)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.findall(r'safeport query "([^"]+)"', text) + re.findall(r'con\.sql\("([^"]+)"\)', text)
    queries = [" ".join(q.split()) for q in found]
    return [q for q in queries if q.split()[0].lower() in ("select", "with", "from")]  # not the `"SQL"` placeholder


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """The fixture unpacked with its tiny models rebuilt and the repository's data beside its catalog."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the saved tokenizer config records it (part of the fingerprint)
    tiny_llama(tmp_path / "models" / "llama")
    tiny_bert(tmp_path / "models" / "bert")
    for name, want in FINGERPRINTS.items():
        got = folder_fingerprint(tmp_path / "models" / name)
        assert got == want, f"tiny {name} rebuilt with other bytes ({got}): the fixture's keys no longer apply"
    (tmp_path / "models" / "tiny-flux").symlink_to(REPO / "models" / "tiny-flux")
    (tmp_path / "data").mkdir()
    for name in DATA:
        (tmp_path / "data" / name).symlink_to(REPO / "data" / name)
    return tmp_path


def _raw(root: Path, sql: str) -> list[tuple[object, ...]]:
    con = duckdb.connect(str(root / "meta.duckdb"), read_only=True)
    try:
        return [tuple(r) for r in con.execute(sql).fetchall()]
    finally:
        con.close()


def test_the_fixture_is_a_schema_4_store() -> None:
    assert FIXTURE.is_file() and FIXTURE.stat().st_size < 1_000_000


def test_a_v4_store_migrates_in_place_and_reads_every_row_unchanged(old: Path) -> None:
    root = old / "store"
    assert _raw(root, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    rows_before = sorted(
        _raw(root, "SELECT model_key, text_id, unit_key, row, n_tokens, truncated FROM activation_rows")
    )
    shards_before = sorted(_raw(root, "SELECT unit_key, shard, checksum FROM shards"))
    vectors_before = sorted(_raw(root, "SELECT vector_key, name, checksum FROM vectors"))
    with Store(root) as store:  # a writer migrates
        assert store.schema_version == SCHEMA_VERSION == 6
        assert {"routes", "saes", "sae_latents", "refits", "steer_params", "safedig_bundles"} <= store.tables()
        rows = store.fetchall("SELECT model_key, text_id, unit_key, row, n_tokens, truncated FROM activation_rows")
        assert sorted(rows) == rows_before and len(rows) == 333
        assert sorted(store.fetchall("SELECT unit_key, shard, checksum FROM shards")) == shards_before
        assert sorted(store.fetchall("SELECT vector_key, name, checksum FROM vectors")) == vectors_before
        assert store.scalar("SELECT count(*) FROM unit_rows WHERE position IS NOT NULL") == 0
        assert store.fetchall("SELECT DISTINCT kind, layout, dtype FROM units") == [("pooled", "array", "float32")]
        meta, values = store.activations("tgt", "pairs")  # checksum-verified reads of the old arrays
        assert meta.num_rows == 80 and values.shape == (80, 24) and np.isfinite(values).all()
        # The stream reads the same rows (each once), shuffled.
        streamed = np.concatenate([b.values for b in store.batches("model = 'tgt' AND dataset = 'pairs'", seed=1)])
        assert sorted(map(tuple, streamed)) == sorted(map(tuple, values))
    assert verify_path(root).ok


def test_every_readme_query_answers_on_the_migrated_store(old: Path) -> None:
    root = old / "store"
    with Store(root):
        pass  # migrate
    queries = readme_queries()
    assert len(queries) >= 8, queries  # the README shows users at least these
    for sql in queries:
        table = readonly_query(root, sql)
        assert table.num_columns >= 1, sql
    answer = readonly_query(root, "select position, step, count(*) from token_rows group by all")
    assert answer.num_rows == 0  # no token units in a v4 store; the view is there


def test_rebuild_on_the_migrated_store_computes_nothing(old: Path, prefect_api: str) -> None:
    result = rebuild(str(old / "catalog.yaml"), online=False)
    assert {u.status for u in result.extracted} == {"skipped"}, [
        (u.model, u.dataset, u.status) for u in result.extracted
    ]
    assert {f.status for f in result.fitted} == {"skipped"}
    assert all(f.reports_done == 0 for f in result.fitted)
    assert not any(result.stale.values())
    with Store(old / "store", read_only=True) as store:
        done = store.fetchall(
            "SELECT flow, task, status FROM runs WHERE run_id = ? AND status <> 'skipped'", [result.run_id]
        )
    assert [r for r in done if r[0] != "rebuild"] == []


def test_eval_on_the_migrated_store_generates_nothing(
    old: Path, prefect_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    code = main(["eval", "--catalog", str(old / "catalog.yaml"), "--target", "flux", "--limit", "2"])
    assert code == 0
    assert re.search(r"24 outputs planned,\s+0 generated,\s+24 already there", capsys.readouterr().out)
