"""safeport/errors.py and the model-loading messages: which errors are one line, and what that line says.

The end-to-end checks (real flows, what the terminal shows) are in tests/flows/test_flow_errors.py.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

import pytest
import torch

from safeport.errors import (
    PREFECT_RUN_LOGGERS,
    is_out_of_memory,
    quiet_user_errors_in_flows,
    user_message,
)
from safeport.extractors import load_extractor
from safeport.extractors.base import ExtractionError, ModelSource, load_failure, model_load_errors, resolve_dtype
from safeport.store.store import StoreBusyError

HUB = ModelSource(name="big-llm", family="causal_lm", hub_id="org/not-cached", revision="main")


def test_offline_hub_failure_names_model_hub_id_offline_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = load_failure(HUB, OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection."))
    for needle in ("'big-llm'", "'org/not-cached'", "offline", "HF_HUB_OFFLINE", "hf download org/not-cached", "path:"):
        assert needle in line
    assert "\n" not in line and "Check your connection" not in line  # the cause's first line only


def test_online_hub_failure_says_it_is_online(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    line = load_failure(HUB, OSError("401 Client Error: gated repo"))
    assert "could not be downloaded" in line and "process is online" in line and "HF_TOKEN" in line
    assert "401 Client Error" in line


def test_local_folder_failure_names_the_folder() -> None:
    source = ModelSource(name="enc", family="text_encoder", path="/models/enc")
    line = load_failure(source, ValueError("Unrecognized model in /models/enc"))
    assert "'enc'" in line and "/models/enc" in line and "config.json" in line


def test_model_load_errors_wraps_library_errors_only() -> None:
    with pytest.raises(ExtractionError, match="'big-llm'") as info, model_load_errors(HUB):
        struct.unpack("<I", b"")  # what a truncated GGUF header raises
    assert isinstance(info.value.__cause__, struct.error)  # SAFEPORT_DEBUG=1 still shows the cause
    with pytest.raises(torch.OutOfMemoryError), model_load_errors(HUB):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ExtractionError, match=r"^ours$"), model_load_errors(HUB):
        raise ExtractionError("ours")
    with pytest.raises(ValueError, match=r"^dtype 'float8' is not supported"), model_load_errors(HUB):
        resolve_dtype("float8", torch.device("cpu"))  # safeport's own message already says what to fix


def test_load_extractor_of_an_uncached_hub_model_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ModelSource(name="enc", family="text_encoder", hub_id="safeport-tests/not-cached", device="cpu")
    with pytest.raises(ExtractionError, match=r"model 'enc': hub id 'safeport-tests/not-cached'.*offline"):
        load_extractor(source)


def test_user_message() -> None:
    assert user_message(StoreBusyError("store x is busy")) == "store x is busy"
    oom = user_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore"))
    assert oom is not None and oom.startswith("out of GPU memory (CUDA out of memory. Tried to allocate 2 GiB)")
    assert "batch_size" in oom and "\n" not in oom
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert user_message(ValueError("bad\nvalue")) == "ValueError: bad value (SAFEPORT_DEBUG=1 shows details)"
    assert user_message(KeyError("a bug")) is None and user_message(RuntimeError("a bug")) is None


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def run_logger() -> Iterator[tuple[logging.Logger, _Keep, _Keep]]:
    """Prefect's flow-run logger with a handler of its own (the API's place) and one on the root (the console's)."""
    logger = logging.getLogger(PREFECT_RUN_LOGGERS[0])
    own, console = _Keep(), _Keep()
    logger.addHandler(own)
    logging.getLogger().addHandler(console)
    saved = (logger.filters[:], logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = True
    try:
        yield logger, own, console
    finally:
        logger.removeHandler(own)
        logging.getLogger().removeHandler(console)
        logger.filters[:], logger.level, logger.propagate = saved


def _fail(logger: logging.Logger, err: Exception) -> None:
    try:
        raise err
    except Exception:
        logger.exception("Encountered exception during execution: %r", err)


def test_quiet_filter_keeps_user_errors_off_the_console(run_logger: tuple[logging.Logger, _Keep, _Keep]) -> None:
    logger, own, console = run_logger
    quiet_user_errors_in_flows()
    quiet_user_errors_in_flows()  # idempotent: one filter
    assert len([f for f in logger.filters if type(f).__name__ == "_UserErrorsOffTheTerminal"]) == 1
    _fail(logger, StoreBusyError("store /s is open for writing by another process"))
    logger.error("Finished in state Failed('Task run encountered an exception ExtractionError: model x')")
    assert console.records == []
    assert [r.exc_info for r in own.records] == [None, None]  # the run's log keeps the line, not the traceback
    assert "open for writing" in own.records[0].getMessage()
    _fail(logger, KeyError("a bug"))  # not a user error: Prefect reports it as before, with its traceback
    logger.error("Finished in state Failed('Task run encountered an exception KeyError: a bug')")
    assert len(console.records) == 2 and console.records[0].exc_info is not None


def test_safeport_debug_keeps_prefects_traceback(
    run_logger: tuple[logging.Logger, _Keep, _Keep], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from safeport.cli import main

    logger, _own, console = run_logger
    logger.filters.clear()
    monkeypatch.setenv("SAFEPORT_DEBUG", "1")
    assert main(["query", "--store", "/nonexistent/store", "select 1"]) == 2
    _fail(logger, StoreBusyError("busy"))
    assert len(console.records) == 1 and console.records[0].exc_info is not None
    monkeypatch.delenv("SAFEPORT_DEBUG")
    assert main(["query", "--store", "/nonexistent/store", "select 1"]) == 2
    _fail(logger, StoreBusyError("busy"))
    assert len(console.records) == 1
    assert capsys.readouterr().err.count("safeport: error: no store at /nonexistent/store") == 2
