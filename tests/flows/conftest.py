"""Flow-test fixtures shared across modules: one tiny store rebuilt once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from safeport.flows.rebuild import rebuild
from tests.flows.catalogs import tiny_catalog

# Sizes of the shared rebuilt store (small: every test copies it).
REBUILT_SIZES: dict[str, Any] = {"anchors": 24, "pairs": 6, "prompts": 4}


@pytest.fixture(scope="session")
def rebuilt_tiny(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny models and a store rebuilt once for src -> tgt (read-only: copy it to change it)."""
    tmp = tmp_path_factory.mktemp("rebuild-base")
    result = rebuild(str(tiny_catalog(tmp, **REBUILT_SIZES)))
    assert {r.status for r in result.extracted} == {"done"}
    return tmp
