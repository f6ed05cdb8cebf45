"""Prefect's ephemeral API server dies with the process that started it.

Without ``PREFECT_API_URL`` every flow run starts a temporary Prefect server: Prefect's
``SubprocessASGIServer`` runs ``python -m uvicorn ... prefect.server.api.server:create_app`` as
a child and stops it at exit (``atexit``). A ``kill -9`` (or any death that skips ``atexit``)
left that child running for good, re-parented to init (~220 MB each). Here the child is
started through a tiny wrapper that watches its parent and shuts uvicorn down (SIGTERM, then
exit) as soon as the parent is gone; everything else about the server is Prefect's.

The patch is applied when ``prefect.server.api.server`` is imported (an import hook, so
processes that talk to a real server never pay for importing it); it is written against
Prefect 3.8.8's ``_run_uvicorn_command`` (same arguments, same environment).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

SERVER_MODULE = "prefect.server.api.server"

# Runs in the server's process (no safeport import: it starts as fast as plain uvicorn).
# argv: PARENT_PID, then uvicorn's own arguments.
CHILD = """
import os, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's clean shutdown
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, name="parent-watch", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
from uvicorn.main import main
main()
"""


def _run_uvicorn_command(self: Any) -> subprocess.Popen[Any]:
    """Prefect's ``SubprocessASGIServer._run_uvicorn_command``, started under the parent watcher."""
    import prefect
    from prefect.settings import get_current_settings

    server_env = {
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    return subprocess.Popen(
        args=[
            sys.executable,
            "-c",
            CHILD,
            str(os.getpid()),
            "--app-dir",
            str(prefect.__module_path__.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env={
            **os.environ,
            **server_env,
            **get_current_settings().to_environment_variables(exclude_unset=True),
        },
    )


def _patch(module: ModuleType) -> None:
    server = getattr(module, "SubprocessASGIServer", None)
    if server is not None and hasattr(server, "_run_uvicorn_command"):
        server._run_uvicorn_command = _run_uvicorn_command


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch(module)


class _Hook(importlib.abc.MetaPathFinder):
    """Patches Prefect's server module right after it is imported."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != SERVER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Make every ephemeral Prefect server of this process die with it (idempotent)."""
    module = sys.modules.get(SERVER_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
