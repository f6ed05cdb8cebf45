"""The CLI, in-process: user errors print `safeport: error: ...` and exit 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeport.cli import main
from safeport.store.store import Store
from tests.test_catalog import base_catalog, write_catalog

BROKEN = {
    "yaml syntax": b"version: 1\nmodels: {a: [1, 2}\n",
    "unknown key": b"version: 1\nmodels: {}\ndatasets: {}\nprofiles: {}\ncolour: red\n",
    "not utf-8": b"version: 1\nmodels:\n  caf\xe9: {}\n",
    "a list": b"- a\n- b\n",
    "python tag": b"version: !!python/object/apply:os.system ['true']\n",
    "empty": b"",
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _is_user_error(code: int, out: str, err: str) -> None:
    assert code == 2
    assert err.startswith("safeport: error: ")
    assert "Traceback" not in err and "Traceback" not in out


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("command", [["catalog"], ["query", "select 1"], ["status"]])
def test_broken_catalog_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, command: list[str]
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_bytes(BROKEN[broken])
    code, out, err = _run(capsys, *command, "--catalog", str(path))
    _is_user_error(code, out, err)
    assert str(path) in err


def test_missing_catalog_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "catalog", "--catalog", str(tmp_path / "nope.yaml"))
    _is_user_error(code, out, err)
    assert "does not exist" in err


def test_unknown_profile_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_catalog(tmp_path, base_catalog(tmp_path))
    code, out, err = _run(capsys, "catalog", "--catalog", str(path), "--profile", "nope")
    _is_user_error(code, out, err)
    assert "'nope'" in err


def test_catalog_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_catalog(tmp_path, base_catalog(tmp_path))
    code, out, err = _run(capsys, "catalog", "--catalog", str(path))
    assert code == 0, err
    assert "profile 'default': OK" in out and "dataset pr" in out


def test_catalog_reports_a_wrong_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base_catalog(tmp_path)
    data["datasets"]["pr"]["sources"][0]["column"] = "promt"
    code, out, err = _run(capsys, "catalog", "--catalog", str(write_catalog(tmp_path, data)))
    _is_user_error(code, out, err)
    assert "datasets.pr.sources.0" in err and "['promt'] not found" in err and "2 column(s)" in err


def test_catalog_reports_a_file_with_no_usable_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base_catalog(tmp_path)
    (tmp_path / "data" / "prompts.csv").write_text("prompt,cat\n  ,a\n,b\n", encoding="utf-8")
    code, out, err = _run(capsys, "catalog", "--catalog", str(write_catalog(tmp_path, data)))
    _is_user_error(code, out, err)
    assert "no usable texts" in err


def test_catalog_reports_invalid_utf8_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base_catalog(tmp_path)
    (tmp_path / "data" / "prompts.csv").write_bytes(b"prompt,cat\ncaf\xe9,a\n")
    code, out, err = _run(capsys, "catalog", "--catalog", str(write_catalog(tmp_path, data)))
    _is_user_error(code, out, err)
    assert "byte 14 (line 2)" in err and "encoding:" in err


# --- query ------------------------------------------------------------------------------------


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    rows = pa.table(
        {
            "idx": pa.array([0, 1, 2], pa.int32()),
            "text_id": ["t0", "t1", "t2"],
            "text": ["one", "two", "three"],
            "split": ["train", "val", "test"],
            "category": [None, "a", "b"],
            "pair_id": pa.array([None, None, None], pa.int32()),
            "side": pa.array([None, None, None], pa.string()),
        }
    )
    with Store(root) as s:
        s.register_dataset("prompts", "prompts", "h", rows, {})
    return root


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_query_writes_output(tmp_path: Path, store_dir: Path, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    out_path = tmp_path / "out" / f"result{suffix}"
    sql = "select text_id, text from texts order by text_id"
    code, out, err = _run(capsys, "query", sql, "--store", str(store_dir), "-o", str(out_path))
    assert code == 0, err
    assert f"wrote 3 row(s) as {suffix[1:]}" in out
    if suffix == ".parquet":
        assert pq.read_table(out_path).column("text").to_pylist() == ["one", "two", "three"]
    elif suffix == ".json":
        rows = [json.loads(x) for x in out_path.read_text(encoding="utf-8").splitlines()]
        assert rows[0] == {"text_id": "t0", "text": "one"}
    else:
        assert out_path.read_text(encoding="utf-8").splitlines()[1] == '"t0","one"'


def test_query_format_flag_and_terminal_table(
    store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "result.data"
    code, out, err = _run(
        capsys, "query", "from texts", "--store", str(store_dir), "-o", str(out_path), "--format", "json"
    )
    assert code == 0 and "as json" in out, err
    code, out, _ = _run(capsys, "query", "select count(*) as n from texts", "--store", str(store_dir))
    assert code == 0 and out.splitlines()[0].strip() == "n" and "(1 row)" in out


def test_query_with_store_ignores_a_broken_catalog(
    tmp_path: Path, store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_bytes(BROKEN["yaml syntax"])
    code, _, err = _run(capsys, "query", "select 1 as x", "--store", str(store_dir), "--catalog", str(path))
    assert code == 0, err


@pytest.mark.parametrize(
    "sql",
    [
        "drop table texts",
        "delete from texts",
        "select 1; drop table texts",
        "copy texts to '/tmp/safeport-cli-test.csv'",
        "select * from read_csv('/etc/passwd')",
        "attach '/tmp/x.db'",
        "pragma version",
    ],
)
def test_refused_query_exits_2_with_one_line(store_dir: Path, capsys: pytest.CaptureFixture[str], sql: str) -> None:
    before = (store_dir / "meta.duckdb").read_bytes()
    code, out, err = _run(capsys, "query", sql, "--store", str(store_dir))
    _is_user_error(code, out, err)
    assert len(err.strip().splitlines()) == 1 and "refused" in err
    assert (store_dir / "meta.duckdb").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{store}/meta.duckdb", "--format", "parquet"], "inside the store"),
        (["-o", "{tmp}/out.xlsx"], "output format 'xlsx'"),
        (["--max-rows", "-1"], "--max-rows 0 or more"),
    ],
)
def test_query_output_errors_exit_2(
    tmp_path: Path, store_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    before = (store_dir / "meta.duckdb").read_bytes()
    argv = [x.format(store=store_dir, tmp=tmp_path) for x in extra]
    code, out, err = _run(capsys, "query", "select * from texts", "--store", str(store_dir), *argv)
    _is_user_error(code, out, err)
    assert message in err
    assert (store_dir / "meta.duckdb").read_bytes() == before


def test_query_on_a_missing_store_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "query", "select 1", "--store", str(tmp_path / "none"))
    _is_user_error(code, out, err)
    assert "no store at" in err


def test_query_sql_error_exits_2(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "query", "select * from no_such_table", "--store", str(store_dir))
    _is_user_error(code, out, err)
    assert "no_such_table" in err


def test_a_closed_pipe_ends_quietly(store_dir: Path) -> None:
    """`safeport query ... | head -1`: the reader leaving is not an error and prints no traceback."""
    cmd = [sys.executable, "-m", "safeport.cli", "query", "select * from range(200000)", "--store", str(store_dir)]
    cmd += ["--max-rows", "200000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line, as `head -1` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first
    assert err == ""
    assert proc.returncode == 141


# --- Ctrl-C -----------------------------------------------------------------------------------


class _Stderr:
    """A subprocess's stderr, collected by a thread so the test can wait for a phrase in it."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import threading

        self.data = b""
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import os

        assert self._proc.stderr is not None
        while chunk := os.read(self._proc.stderr.fileno(), 4096):
            self.data += chunk

    def wait_for(self, phrase: bytes, timeout: float = 180) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while phrase not in self.data and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return phrase in self.data

    def text(self) -> str:
        self._thread.join(timeout=60)
        return self.data.decode(errors="replace")


# The child of the Ctrl-C test gets SIGINT the way a foreground command at a terminal does. A test run
# started as a background job of a script (`pytest ... &`, `nohup`, some CI runners) has SIGINT ignored,
# its children inherit that, and safeport then rightly keeps ignoring Ctrl-C (as any background job must):
# the first SIGINT would be dropped and the extraction run to its end.
FOREGROUND_CHILD = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "from safeport.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _committed_rows(store: Path) -> int:
    """Rows the extraction's running tasks have committed, as `safeport query` shows them (0: none yet)."""
    from safeport.store.query import readonly_query
    from safeport.store.store import StoreError

    try:
        table = readonly_query(store, "SELECT coalesce(sum(rows), 0) AS n FROM runs WHERE status = 'running'")
    except StoreError:  # not created yet, or busy for longer than a reader waits: look again
        return 0
    return int(table.column("n")[0].as_py())


def _wait_for_committed_rows(proc: subprocess.Popen[bytes], store: Path, timeout: float = 300) -> bool:
    """Poll the store while ``proc`` runs until a running task has committed rows; False if it ended first."""
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (store / "meta.duckdb").is_file() and _committed_rows(store) > 0:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "second", [pytest.param("while the run stops", marks=pytest.mark.slow), "while safeport shuts down"]
)
def test_a_second_ctrl_c_is_quiet(prefect_api: str, tmp_path: Path, second: str) -> None:
    """Ctrl-C, then Ctrl-C again: one line saying what happened, exit 130, no KeyboardInterrupt trace."""
    import os
    import signal
    import time

    from safeport.store.query import readonly_query
    from safeport.store.verify import verify_path
    from tests.conftest import REPO
    from tests.flows.catalogs import tiny_catalog

    catalog = tiny_catalog(tmp_path, anchors=400, shard_rows=8)
    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREGROUND_CHILD, "extract", "--catalog", str(catalog)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    err = _Stderr(proc)
    # The first Ctrl-C lands inside the extraction, once it has committed rows (a state, not a delay).
    assert _wait_for_committed_rows(proc, store), "safeport ended before committing rows:\n" + err.text()[-3000:]
    proc.send_signal(signal.SIGINT)
    if second == "while the run stops":
        time.sleep(0.05)
    else:
        assert err.wait_for(b"safeport: interrupted"), err.text()
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    text = err.text()
    assert still_running, "safeport ended before the second Ctrl-C: this run tested nothing"
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "leaked" not in text, text[-3000:]
    assert proc.returncode == 130, text[-3000:]
    assert "safeport: interrupted" in text
    assert verify_path(store).ok  # whatever was committed is intact ...
    assert readonly_query(store, "SELECT count(*) AS n FROM shards").column("n")[0].as_py() > 0  # ... and kept


def test_an_interrupt_buried_under_a_cleanup_error_is_still_an_interrupt(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C, then a cleanup step fails with its own error (KeyboardInterrupt only as its context):
    one line and exit 130, not "error: cleanup failed" or a traceback."""
    import signal

    import safeport.cli

    def interrupted_then_cleanup_fails(args: object) -> int:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("cleanup failed")

    monkeypatch.setattr(safeport.cli, "cmd_status", interrupted_then_cleanup_fails)
    before = signal.getsignal(signal.SIGINT)
    try:
        code, _, err = _run(capsys, "status")
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and err == "safeport: interrupted; committed work is kept, rerun to resume\n"


def test_a_ctrl_c_prefect_drops_once_the_flow_finished_is_still_an_interrupt(
    prefect_api: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C once the flow run is final (here: in its completion hook): Prefect's engine logs the
    KeyboardInterrupt at debug level and returns the result; safeport still stops with exit 130."""
    import signal
    from typing import Any

    from prefect import flow

    import safeport.cli

    del prefect_api  # the flow runs in this process, against the test server the fixture started

    def ctrl_c(flow: Any, flow_run: Any, state: Any) -> None:  # names as in Prefect's FlowStateHook
        signal.raise_signal(signal.SIGINT)

    @flow(name="ctrl-c-after-the-end", on_completion=[ctrl_c])
    def finished() -> int:
        return 0

    monkeypatch.setattr(safeport.cli, "cmd_status", lambda args: finished())
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, however pytest was started
    try:
        code, _, err = _run(capsys, "status")
    finally:
        signal.signal(signal.SIGINT, before)
    assert "Traceback" not in err
    assert code == 130 and err.endswith("safeport: interrupted; committed work is kept, rerun to resume\n"), err


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch", "0"), ("--dask-workers", "0"), ("--gpus", "-1"), ("--batch", "-2")]
)
def test_eval_counts_below_one_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    code, out, err = _run(capsys, "eval", "--store", str(tmp_path / "none"), flag, value)
    _is_user_error(code, out, err)
    assert f"{flag} {value}: give 1 or more" in err
