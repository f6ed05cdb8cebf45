"""Store concurrency without models: short transactions, bounded waits, claims with leases, lock sanity,
schema versions and damaged metadata (issue 13; issue 18 item 9)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import safeport.store.db as db_module
import safeport.store.schema as store_module
from safeport.cli import main
from safeport.store import connect
from safeport.store.claims import HOST
from safeport.store.maintenance import collect_garbage, export_vectors
from safeport.store.query import readonly_query
from safeport.store.recovery import recover
from safeport.store.store import SCHEMA_VERSION, Store, StoreBusyError, StoreDamagedError, StoreError
from safeport.store.verify import verify_path
from tests.conftest import REPO
from tests.store.test_maintenance import _build


class Helper:
    """A Python subprocess running ``code`` (with the store's root as ``ROOT``) that says "ready" and waits.

    Closing its stdin lets it finish; ``kill()`` ends it with SIGKILL.
    """

    def __init__(self, root: Path, code: str, env: dict[str, str] | None = None) -> None:
        prelude = f"import sys, time\nfrom pathlib import Path\nROOT = Path({str(root)!r})\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", (line, self.proc.stderr.read() if self.proc.stderr else "")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        """Let the helper finish (it reads stdin to its end)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def finish(self) -> str:
        self.release()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out, err = self.proc.stdout.read(), self.proc.stderr.read()
        assert self.proc.wait(timeout=120) == 0, err[-3000:]
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)


HOLD_TRANSACTION = """
from safeport.store.store import Store
store = Store(ROOT)
with store.transaction() as con:
    con.execute("INSERT INTO meta VALUES ('held', 'yes')")
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def store(tmp_path: Path) -> Path:
    _build(tmp_path)
    return tmp_path


# -- readers and writers ------------------------------------------------------------------------------
def test_readers_loop_while_another_process_commits(store: Path) -> None:
    """Every read succeeds while a writer commits 30 transactions, and sees only committed states in order."""
    writer = Helper(
        store,
        """
        from safeport.store.store import Store
        store = Store(ROOT)
        print("ready", flush=True)
        for i in range(30):
            with store.transaction() as con:
                con.execute("INSERT INTO meta VALUES (?, 'x')", [f"k{i}"])
                time.sleep(0.02)
            time.sleep(0.02)
        """,
    )
    seen: list[int] = []
    while writer.proc.poll() is None:
        seen.append(int(readonly_query(store, "SELECT count(*) FROM meta WHERE key LIKE 'k%'").column(0)[0].as_py()))
        with Store(store, read_only=True) as ro:
            seen.append(int(ro.scalar("SELECT count(*) FROM meta WHERE key LIKE 'k%'")))
    writer.finish()
    assert seen == sorted(seen) and seen[-1] <= 30
    assert readonly_query(store, "SELECT count(*) FROM meta WHERE key LIKE 'k%'").column(0)[0].as_py() == 30


def test_a_reader_waits_for_a_transaction_in_flight_and_sees_its_commit(store: Path) -> None:
    writer = Helper(store, HOLD_TRANSACTION)
    threading.Timer(0.5, writer.release).start()  # commits while this reader is already waiting
    with connect(store, wait_s=60) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'held'").fetchall() == [("yes",)]
    writer.finish()


def test_a_reader_gives_up_after_its_bound_naming_the_writer(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = Helper(store, HOLD_TRANSACTION)
    try:
        monkeypatch.setenv("SAFEPORT_STORE_WAIT", "0.3")
        with pytest.raises(
            StoreBusyError, match=rf"being written by process {writer.pid}.*this reader waited \(limit 0\.3s"
        ):
            Store(store, read_only=True)
        with pytest.raises(StoreBusyError, match=rf"process {writer.pid}.*Query it later"):
            readonly_query(store, "SELECT 1")
    finally:
        writer.finish()


def test_a_writer_waits_for_readers_and_names_one_that_never_lets_go(store: Path) -> None:
    reader = Helper(
        store,
        """
        import duckdb
        con = duckdb.connect(str(ROOT / "meta.duckdb"), read_only=True)
        print("ready", flush=True)
        sys.stdin.read()
        """,
    )
    try:
        writer = Store(store, read_only=True, wait_s=0.3)  # opening to read works beside another reader
        writer.close()
        with pytest.raises(
            StoreBusyError,
            match=rf"held open by process {reader.pid}.*this writer waited \(limit 0\.3s\).*read-only connection",
        ):
            Store(store, wait_s=0.3)
    finally:
        reader.finish()
    with Store(store, wait_s=5) as st, st.transaction() as con:  # once it closed, the write goes through
        con.execute("INSERT INTO meta VALUES ('after', 'reader')")


def test_connect_helper_is_read_only_and_holds_the_file_only_inside_its_block(store: Path) -> None:
    with connect(store / "meta.duckdb") as con:
        assert con.execute("SELECT count(*) FROM units").fetchall() == [(1,)]
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("DELETE FROM units")
    with Store(store, wait_s=1) as st, st.transaction() as con:  # nothing is held after the block
        con.execute("INSERT INTO meta VALUES ('k', 'v')")


# -- lock sanity ---------------------------------------------------------------------------------------
def test_a_filesystem_without_working_locks_is_refused_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(db_module.fcntl, "flock", no_locks)
    with pytest.raises(StoreError, match=rf"store folder {tmp_path / 'a'} is on a filesystem where file locks do not"):
        Store(tmp_path / "a")

    monkeypatch.setattr(db_module.fcntl, "flock", lambda fd, op: None)  # locks silently ignored
    with pytest.raises(StoreError, match=r"granted twice.*local disk"):
        Store(tmp_path / "b")


def test_a_lock_left_by_a_process_killed_inside_a_transaction_is_recovered_with_a_log_line(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = Helper(store, HOLD_TRANSACTION)
    writer.kill()
    with caplog.at_level(logging.WARNING, "safeport.store"), Store(store) as st:
        assert st.scalar("SELECT count(*) FROM meta WHERE key = 'held'") == 0  # rolled back
    assert f"recovered the write lock left by pid {writer.pid} on {HOST}" in caplog.text


# -- schema versions -------------------------------------------------------------------------------------
def _set_meta(root: Path, key: str, value: str) -> None:
    con = duckdb.connect(str(root / "meta.duckdb"))
    con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])
    con.close()


def test_a_newer_schema_is_refused_naming_both_versions(store: Path) -> None:
    _set_meta(store, "schema_version", "99")
    for read_only in (True, False):
        with pytest.raises(StoreError, match=rf"schema version 99.*reads versions up to {SCHEMA_VERSION}"):
            Store(store, read_only=read_only)


def test_a_store_mid_migration_is_refused_to_readers_and_finished_by_a_writer(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    con = duckdb.connect(str(store / "meta.duckdb"))  # a version-1 store, its migration to 2 interrupted
    con.execute("DROP VIEW running")
    con.execute("DROP TABLE claims")
    con.execute("ALTER TABLE runs DROP COLUMN entry_id")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.execute("INSERT INTO meta VALUES ('migrating', '1->2 by pid 1 on elsewhere')")
    con.close()
    with pytest.raises(StoreError, match=r"being migrated \(schema version 1 found; migration 1->2.*writing command"):
        Store(store, read_only=True)
    with caplog.at_level(logging.INFO, "safeport.store"), Store(store) as st:
        assert st.schema_version == SCHEMA_VERSION and "claims" in st.tables()
    assert "schema 1 -> 2" in caplog.text
    with Store(store, read_only=True) as ro:
        assert ro.scalar("SELECT count(*) FROM meta WHERE key = 'migrating'") == 0


def test_a_version_3_store_gains_run_totals_on_its_first_write(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safeport.cli_ops import print_running

    con = duckdb.connect(str(store / "meta.duckdb"))  # as safeport left it before runs.total
    con.execute(store_module.RUNNING_VIEW_V2)
    con.execute("ALTER TABLE runs DROP COLUMN total")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.close()
    print_running(store)  # a reader of the old schema: no ETA column to show, and no error
    assert "older schema" in capsys.readouterr().out
    with Store(store) as st:
        assert st.schema_version == SCHEMA_VERSION >= 4
        run = st.session.start_run("extract", "extract_unit", "m", "d", "u", total=10)
        with st.transaction():
            st.session.progress(run, 4)
        assert st.fetchall("SELECT rows, total FROM running") == [(4, 10)]
        st.session.finish_run(run, "done")


# -- claims ------------------------------------------------------------------------------------------------
def test_claims_are_exclusive_between_writers_and_free_again_once_released(store: Path) -> None:
    a, b = Store(store), Store(store)
    try:
        assert a.session.claim(["output:1", "output:2"]) == ["output:1", "output:2"]
        assert b.session.claim(["output:2", "output:3"]) == ["output:3"]  # output:2 is a's
        assert b.session.claim(["shard:u/0"], unless=["output:1"]) == []  # blocked while a holds output:1
        a.session.release(["output:1", "output:2"])
        assert b.session.claim(["output:2"]) == ["output:2"]
        assert set(b.session.holders(["output:2", "output:3"])) == set()  # b's own claims are not others'
        assert set(a.session.holders(["output:2", "output:3"])) == {"output:2", "output:3"}
    finally:
        a.close()
        b.close()
    with Store(store, read_only=True) as ro:  # closing a session drops its claims
        assert ro.scalar("SELECT count(*) FROM claims") == 0


def test_a_dead_owners_claim_on_this_host_is_taken_over_at_once(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    owner = Helper(
        store,
        """
        from safeport.store.store import Store
        store = Store(ROOT)
        store.run_id = "dead-run"
        run = store.session.start_run("extract", "extract_unit", "m", "d", "u1")
        assert store.session.claim(["shard:u1/0"]) == ["shard:u1/0"]
        print("ready", flush=True)
        sys.stdin.read()
        """,
    )
    with Store(store) as other:
        assert other.session.claim(["shard:u1/0"]) == []  # alive: left alone
        owner.kill()
        with caplog.at_level(logging.WARNING, "safeport.store"):
            assert other.session.claim(["shard:u1/0"]) == ["shard:u1/0"]
        assert f"taking over shard:u1/0 from pid {owner.pid} on {HOST} (run dead-run" in caplog.text
        assert f"its process {owner.pid} is gone" in caplog.text
        status = other.fetchall("SELECT status, message FROM runs WHERE run_id = 'dead-run'")
        assert [s for s, _ in status] == ["abandoned"] and "taken over" in status[0][1]


def test_a_claim_of_another_host_is_taken_over_only_after_its_lease(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store(store) as st:
        now = time.time()
        with st.transaction() as con:
            con.execute(
                "INSERT INTO claims VALUES ('fit:f1', 'fit', 'remote-owner', 'lost-machine', 4242, '', 'r9', ?, ?, ?)",
                [now, now, now + 1.5],
            )
        assert st.session.claim(["fit:f1"]) == []  # the lease is still running: that machine may be computing
        time.sleep(1.6)
        with caplog.at_level(logging.WARNING, "safeport.store"):
            assert st.session.claim(["fit:f1"]) == ["fit:f1"]
    assert "taking over fit:f1 from pid 4242 on lost-machine" in caplog.text
    assert "host lost-machine stopped renewing it" in caplog.text


def test_the_heartbeat_keeps_a_live_claim_and_a_stalled_writer_loses_it(
    store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SAFEPORT_LEASE_S", "0.8")
    a, b = Store(store), Store(store)
    try:
        assert a.session.claim(["output:x"]) == ["output:x"]
        time.sleep(1.6)  # two leases: only the heartbeat keeps it
        assert b.session.claim(["output:x"]) == []
        assert a.session.valid("output:x")
        a.session._stop.set()  # a stalls: its heartbeat stops (a SIGSTOP or a hung process)
        time.sleep(1.0)
        assert not a.session.valid("output:x")  # it knows not to write any more
        with caplog.at_level(logging.WARNING, "safeport.store"):
            assert b.session.claim(["output:x"]) == ["output:x"]
            assert "alive but not renewing it" in caplog.text
            a.session.renew()
        assert "taken over by another writer" in caplog.text
        assert not a.session.still_mine(["output:x"])
    finally:
        a.close()
        b.close()


# -- damaged metadata (issue 18 item 9) -------------------------------------------------------------------
def _damage(root: Path, how: str) -> None:
    path = root / "meta.duckdb"
    data = path.read_bytes()
    if how == "zero-length":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(os.urandom(len(data)))
    elif how == "truncated":
        path.write_bytes(data[:16384])  # the file headers survive, the blocks they point to do not
    else:  # the first database header block overwritten
        path.write_bytes(data[:4096] + os.urandom(4096) + data[8192:])


DAMAGE = ["zero-length", "random bytes", "truncated", "corrupted header"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_metadata_is_reported_as_damaged_never_as_busy(store: Path, how: str) -> None:
    _damage(store, how)
    message = rf"store metadata {store / 'meta.duckdb'} is damaged.*not busy.*Zarr arrays and output files"
    calls = [
        lambda: Store(store, read_only=True),
        lambda: Store(store),
        lambda: readonly_query(store, "SELECT 1"),
        lambda: verify_path(store),
        lambda: collect_garbage(store),
        lambda: export_vectors(store, store / "out"),
    ]
    for call in calls:
        with pytest.raises(StoreDamagedError, match=message):
            call()


@pytest.fixture(scope="module")
def damaged_cli_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("damaged-cli")
    _build(root)
    _damage(root, "truncated")
    yield root


@pytest.mark.parametrize(
    "argv", [["verify"], ["verify", "--repair"], ["gc"], ["gc", "--apply"], ["export", "-o", "OUT"], ["status"]]
)
def test_every_command_gives_one_clean_line_for_damaged_metadata(
    damaged_cli_store: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("OUT", str(damaged_cli_store / "out")) for a in argv]
    assert main([*argv, "--store", str(damaged_cli_store)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta.duckdb is damaged" in err and "Traceback" not in err
    assert "busy" not in err.replace("not busy", "")


def test_recover_restores_the_last_snapshot_and_keeps_the_damaged_file(store: Path) -> None:
    with Store(store) as st:
        st.snapshot()  # what a writer run that ends without error leaves
        with st.transaction() as con:  # committed after the snapshot: lost with the damaged file
            con.execute("INSERT INTO meta VALUES ('late', 'x')")
    before = verify_path(store)
    with pytest.raises(StoreError, match="readable, not damaged; nothing to recover"):
        recover(store)
    _damage(store, "corrupted header")
    done = recover(store)
    assert done.damaged_kept_as.is_file() and (done.units, done.shards, done.vectors) == (1, 2, 3)
    after = verify_path(store)
    assert after.ok and (after.shards, after.vectors, after.maps) == (before.shards, before.vectors, before.maps)
    with Store(store) as st:
        assert st.scalar("SELECT count(*) FROM meta WHERE key = 'late'") == 0


def test_damaged_metadata_without_a_snapshot_names_the_manual_procedure(store: Path) -> None:
    _damage(store, "zero-length")
    with pytest.raises(
        StoreDamagedError, match=r"no snapshot of it exists yet.*move it aside and rerun `safeport run`"
    ):
        Store(store, read_only=True)
    with pytest.raises(StoreError, match=r"has no metadata snapshot.*Move .*meta\.duckdb aside"):
        recover(store)


# --- Ctrl-C during a statement ------------------------------------------------------------------
LONG_QUERY = "SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3"


@pytest.mark.parametrize("block", ["transaction", "reading"])
def test_ctrl_c_during_a_statement_is_a_keyboard_interrupt_and_commits_nothing(tmp_path: Path, block: str) -> None:
    """DuckDB turns Ctrl-C into "Query interrupted"; the store's blocks hand it back as KeyboardInterrupt.

    (Before, the CLI saw a RuntimeError and printed a traceback instead of "safeport: interrupted".)
    """
    with Store(tmp_path) as store:
        store.register_model(
            "mk", "m", "source", {"family": "text_encoder", "model_id": "m", "revision": "main", "weights": "w"}, 3
        )
        con_box: list[duckdb.DuckDBPyConnection] = []
        timer = threading.Timer(0.3, lambda: con_box[0].interrupt())
        with pytest.raises(KeyboardInterrupt), getattr(store, block)() as con:
            con_box.append(con)
            if block == "transaction":
                con.execute("DELETE FROM models")
            timer.start()
            con.execute(LONG_QUERY).fetchall()
        timer.join()
        assert store.scalar("SELECT count(*) FROM models") == 1  # the interrupted transaction was rolled back
        with store.transaction() as con:  # and the store takes the next one
            con.execute("UPDATE models SET dim = 4")
        assert store.scalar("SELECT dim FROM models") == 4


@pytest.mark.parametrize("block", ["transaction", "reading"])
def test_ctrl_c_between_execute_and_fetch_is_a_keyboard_interrupt_even_when_cleanup_then_fails(
    tmp_path: Path, block: str
) -> None:
    """Ctrl-C lands after ``execute`` returned and before the fetch: the result is left unfinished, so
    the block's ``finally: con.unregister(...)`` raises DuckDB's ResourceInUseException, which carries
    the KeyboardInterrupt only as its context. (CI, `test_a_second_ctrl_c_is_quiet`: the CLI printed a
    Prefect traceback instead of "safeport: interrupted".)
    """
    with Store(tmp_path) as store:
        store.register_model(
            "mk", "m", "source", {"family": "text_encoder", "model_id": "m", "revision": "main", "weights": "w"}, 3
        )
        with pytest.raises(KeyboardInterrupt), getattr(store, block)() as con:
            con.register("_ids", pa.table({"text_id": ["a"]}))
            try:
                con.execute("SELECT * FROM range(10000000)")  # result pending
                raise KeyboardInterrupt  # the signal handler fires here
            finally:
                con.unregister("_ids")
        assert store.scalar("SELECT count(*) FROM models") == 1
        assert store.texts([]) == []  # the store takes the next block


class _InterruptedStream:
    """An Arrow stream whose reading is cut by Ctrl-C (DuckDB reports it inside its own error text)."""

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        raise KeyboardInterrupt


@pytest.mark.parametrize("block", ["transaction", "reading"])
def test_ctrl_c_while_duckdb_reads_a_registered_table_is_a_keyboard_interrupt(tmp_path: Path, block: str) -> None:
    """DuckDB turns a KeyboardInterrupt raised while it reads a registered object into
    InvalidInputException("... failed: KeyboardInterrupt: "), with no exception chain (a stress run of
    the second-Ctrl-C test: Prefect printed it from ``commit_shard``)."""
    with Store(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt), getattr(store, block)() as con:
            con.register("_rows", _InterruptedStream())
            con.execute("SELECT * FROM _rows").fetchall()
        assert store.texts([]) == []


def test_other_runtime_errors_in_a_block_stay_what_they_are(tmp_path: Path) -> None:
    with Store(tmp_path) as store, pytest.raises(RuntimeError, match="not an interrupt"), store.transaction():
        raise RuntimeError("not an interrupt")
