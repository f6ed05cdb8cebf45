"""Unsafe prompts are data: the real extract and fit flows, the CLI and the reports never show them.

Everything a run emits is captured (every logger at DEBUG incl. Prefect's, the Prefect API's
stored logs, stdout/stderr at the file-descriptor level incl. progress bars, every report file
and every metadata table but ``texts``) and searched for each unsafe pair text and prompt-set
text, in full and by its first characters (tables truncate long cells).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from safeport.cli import main
from safeport.store.store import Store
from tests.flows.catalogs import tiny_catalog

PREFIX = 24  # characters: long enough to be distinctive, short enough to survive a truncated cell


def _unsafe_texts(root: Path) -> list[str]:
    with Store(root, read_only=True) as store:
        rows = store.con.execute(
            "SELECT DISTINCT t.text FROM texts t JOIN dataset_texts dt USING (text_id) "
            "JOIN datasets d USING (dataset) "
            "WHERE (d.kind = 'pairs' AND dt.side = 'unsafe') OR d.kind = 'prompts'"
        ).fetchall()
    return [r[0] for r in rows]


def _needles(texts: list[str]) -> list[str]:
    out = {t[:PREFIX] if len(t) > PREFIX else t for t in texts}
    return sorted(n for n in out if len(n.strip()) >= 12)  # a 5-character prompt would match anything


def _leaks(haystack: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n in haystack]


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG for the duration of the test (Prefect, transformers, diffusers, safeport)."""
    loggers = ["", "prefect", "safeport", "flows", "transformers", "diffusers", "httpx", "urllib3"]
    for name in loggers:
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def _prefect_api_logs() -> tuple[int, str]:
    """(flow runs, log text) the Prefect API stored (logs are shipped in the background: flush first)."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(limit=200, offset=len(messages)):
            messages += [log.message for log in batch]
        runs = len(client.read_flow_runs(limit=200))
    return runs, "\n".join(messages)


def test_flows_cli_logs_and_reports_never_contain_unsafe_prompts(
    prefect_api: str,
    tmp_path: Path,
    everything_logged: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    catalog = tiny_catalog(tmp_path)
    root = tmp_path / "store"
    cat = ["--catalog", str(catalog)]
    assert main(["catalog", *cat]) == 0
    assert main(["run", *cat]) == 0  # the main job: the extract and fit flows, summary and headline
    assert main(["extract", *cat]) == 0  # and each stage's own command (nothing left to do)
    assert main(["status", *cat]) == 0
    assert main(["verify", *cat]) == 0
    out, err = capfd.readouterr()

    texts = _unsafe_texts(root)
    needles = _needles(texts)
    assert len(texts) >= 20 and len(needles) >= 20  # the check has something to find

    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in everything_logged.records)
    assert everything_logged.records, "nothing was logged: the capture is not working"
    assert not _leaks(out, needles), "stdout"
    assert not _leaks(err, needles), "stderr"
    assert not _leaks(logged, needles), "log records"
    runs, api_logs = _prefect_api_logs()
    assert runs > 0 and not _leaks(api_logs, needles), "logs stored by the Prefect API"

    reports = [p for p in (root / "reports").rglob("*") if p.is_file() and p.suffix in {".md", ".json", ".csv", ".txt"}]
    assert reports, "no report was written"
    for p in reports:
        assert not _leaks(p.read_text(encoding="utf-8", errors="replace"), needles), p.name

    # Only the ``texts`` table holds texts: every other table and view of the metadata is free of them.
    with Store(root, read_only=True) as store:
        tables = [r[0] for r in store.con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        for table in tables:
            if table == "texts":
                continue
            dump = repr(store.con.execute(f'SELECT * FROM "{table}"').fetchall())
            assert not _leaks(dump, needles), table


QUERIES = [
    "SELECT * FROM activations",
    "SELECT * FROM dataset_texts",
    "SELECT * FROM datasets",
    "SELECT * FROM lineage",
    "SELECT * FROM arrays",
    "SELECT * FROM runs",
    "SELECT * FROM units",
    "SELECT * FROM vectors",
    "SELECT * FROM eval_results",
    "SELECT text_id, n_chars FROM texts",
    "SELECT dt.*, t.n_chars FROM dataset_texts dt JOIN texts t USING (text_id)",
    "DESCRIBE texts",
    "SHOW TABLES",
]
# These would print texts although no query names the ``text`` column: `safeport query`
# blanks every column derived from texts.text by lineage (store/text_guard.py), issue 18 item 3.
IMPLICIT_TEXT = [
    "SELECT * FROM texts",
    "SELECT t.* FROM texts t JOIN dataset_texts USING (text_id)",
    "SELECT * FROM texts a JOIN texts b USING (text_id)",
    "SUMMARIZE texts",
    "SELECT * FROM (SELECT * FROM texts) t(a, b, c)",
    "SELECT b FROM (SELECT * FROM texts) t(a, b, c)",
    "SELECT t FROM texts t",
]


@pytest.fixture(scope="module")
def extracted(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safeport.flows.extract import extract_flow

    tmp = tmp_path_factory.mktemp("no-text")
    catalog = tiny_catalog(tmp)
    extract_flow(str(catalog))
    return tmp / "store"


def _query_output(root: Path, sql: str, capfd: pytest.CaptureFixture[str], out: Path | None = None) -> str:
    """What `safeport query` prints (every row), and what it writes with ``-o out``."""
    capfd.readouterr()
    assert main(["query", "--store", str(root), "--max-rows", "1000", sql, *(["-o", str(out)] if out else [])]) == 0
    printed, err = capfd.readouterr()
    return printed + err + (out.read_text(encoding="utf-8", errors="replace") if out else "")


@pytest.mark.parametrize("sql", QUERIES)
def test_query_without_the_text_column_never_prints_texts(
    extracted: Path, sql: str, capfd: pytest.CaptureFixture[str]
) -> None:
    needles = _needles(_unsafe_texts(extracted))
    assert not _leaks(_query_output(extracted, sql, capfd), needles)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_query_output_files_without_the_text_column_hold_no_texts(
    extracted: Path, suffix: str, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    needles = _needles(_unsafe_texts(extracted))
    sql = "SELECT a.*, t.n_chars FROM activations a JOIN texts t USING (text_id)"
    assert not _leaks(_query_output(extracted, sql, capfd, tmp_path / f"out{suffix}"), needles)


@pytest.mark.parametrize("sql", IMPLICIT_TEXT)
def test_query_star_over_texts_does_not_print_them(
    extracted: Path, sql: str, capfd: pytest.CaptureFixture[str]
) -> None:
    needles = _needles(_unsafe_texts(extracted))
    assert not _leaks(_query_output(extracted, sql, capfd), needles)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_query_output_files_of_implicit_forms_hold_no_texts(
    extracted: Path, suffix: str, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    needles = _needles(_unsafe_texts(extracted))
    out = tmp_path / f"join{suffix}"
    printed = _query_output(extracted, "SELECT * FROM texts a JOIN texts b USING (text_id)", capfd)
    main(["query", "--store", str(extracted), "SELECT * FROM texts a JOIN texts b USING (text_id)", "-o", str(out)])
    if suffix == ".parquet":  # two columns named text: read by position
        written = repr([c.to_pylist() for c in pq.ParquetFile(out).read().columns])
    else:
        written = out.read_text(encoding="utf-8")
    assert not _leaks(printed + written, needles)


def test_query_naming_the_text_column_does_print_it(
    extracted: Path, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The explicit way to see texts still works (so the checks above can see a leak)."""
    needles = _needles(_unsafe_texts(extracted))
    shown = _query_output(extracted, "SELECT text FROM texts", capfd, tmp_path / "texts.csv")
    assert _leaks(shown, needles)
