"""Exceptions that mean "the user can fix this": the CLI prints them as one line, without a traceback.

Errors raised inside a Prefect flow are reported twice by default: Prefect's flow and task engines
log the failure with its traceback (on the terminal and in the run's stored logs), then the
exception reaches the CLI. :func:`quiet_user_errors_in_flows` keeps those engine records off the
terminal for the errors :func:`user_message` describes; the run is still marked failed with the
message, and its stored log keeps the line (without the traceback).
"""

from __future__ import annotations

import logging
import re

from safeport.catalog import CatalogError
from safeport.extractors.base import ExtractionError
from safeport.store.query import QueryError
from safeport.store.readers import DataFileError
from safeport.store.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    CatalogError,
    DataFileError,
    ExtractionError,
    QueryError,
    StoreError,
)

# Anything else a user can cause (a bad option value, an unreadable path) is still one line,
# prefixed with its type; SAFEPORT_DEBUG=1 shows the traceback for bug reports.
_PLAIN_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)

OUT_OF_MEMORY_FIX = (
    "lower `batch_size:` of that model in the catalog, use `--offload` (eval) or `dtype: bfloat16`, or run on a "
    "larger GPU; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps when memory is fragmented"
)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error (CUDA or another accelerator), recognised without importing torch."""
    return any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(err).__mro__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def user_message(err: BaseException) -> str | None:
    """The one line to print for an error a user can fix, or None for a bug (shown with its traceback)."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    if is_out_of_memory(err):
        return f"out of GPU memory ({_first_line(err)}); {OUT_OF_MEMORY_FIX}"
    if isinstance(err, _PLAIN_ERRORS):
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        return f"{type(err).__name__}: {text} (SAFEPORT_DEBUG=1 shows details)"
    return None


def _subclass_names(classes: tuple[type[BaseException], ...]) -> set[str]:
    seen: set[str] = set()
    todo: list[type[BaseException]] = list(classes)
    while todo:
        cls = todo.pop()
        if cls.__name__ not in seen:
            seen.add(cls.__name__)
            todo.extend(cls.__subclasses__())
    return seen


# Prefect's final-state lines: "Task run encountered an exception OSError: ..." /
# "Flow run encountered an exception: StoreBusyError: ..." (inside "Finished in state Failed(...)").
_FAILED_STATE = re.compile(r"encountered an exception:? (\w+):")
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _UserErrorsOffTheTerminal(logging.Filter):
    """On Prefect's run loggers: a record about a user error goes to the run's stored logs only, without traceback."""

    def _about_a_user_error(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            return user_message(record.exc_info[1]) is not None
        found = _FAILED_STATE.search(record.getMessage())
        if found is None:
            return False
        return found.group(1) == "OutOfMemoryError" or found.group(1) in _subclass_names(USER_ERRORS + _PLAIN_ERRORS)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._about_a_user_error(record):
            return True
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        # The run logger's own handlers (Prefect's API handler) still get it; the console, on the
        # root logger it would propagate to, does not.
        for handler in logging.getLogger(record.name).handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        return False


_QUIET = _UserErrorsOffTheTerminal()


def quiet_user_errors_in_flows() -> None:
    """Keep Prefect's traceback of a user error raised inside a flow off the terminal (idempotent)."""
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(_QUIET)
