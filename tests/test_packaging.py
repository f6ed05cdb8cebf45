"""One ``safeport`` namespace: the built wheel installs only ``safeport``, imports outside the checkout, and
the README's downstream snippet runs from it (against the bundled tiny Flux); no source file imports a stage
folder by its old top-level name.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import safeport
from tests.conftest import REPO

STAGES = ("flows", "extractors", "store", "mappers", "eval")
VECTOR = "calibrated:llama31-8b->flux1-schnell:ridge"  # the name the README snippet loads
SNIPPET_MARK = "<!-- tests/test_packaging.py runs this snippet"


def readme_snippet() -> str:
    """The README's downstream snippet: the python block right after its marker comment."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(SNIPPET_MARK) + r".*?-->\n```python\n(.*?)```", text, re.DOTALL)
    assert found, "README.md lost the marked downstream snippet"
    return found.group(1)


def test_the_readme_snippet_uses_only_the_public_api() -> None:
    tree = ast.parse(readme_snippet())
    imported = [
        (node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    ours = [(module, name) for module, name in imported if (module or "").split(".")[0] == "safeport"]
    assert ours and all(module == "safeport" and name in safeport.__all__ for module, name in ours), ours
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any("safeport" in a.name for a in n.names)]


def test_public_api_is_lazy_typed_and_versioned() -> None:
    assert sorted(safeport.__all__) == sorted(
        [
            "Store",
            "__version__",
            "combine",
            "load_catalog",
            "load_safedig",
            "load_vector",
            "read_exported_safedig",
            "read_exported_vector",
            "steer",
        ]
    )
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert safeport.__version__ == version
    heavy = "('torch', 'duckdb', 'diffusers', 'prefect', 'transformers', 'numpy')"
    probe = f"import sys, safeport; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"  # `import safeport` loads none of the heavy libraries
    for name in safeport.__all__:
        assert getattr(safeport, name) is not None
        assert name == "__version__" or getattr(safeport, name).__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = safeport.nope


_OLD_IMPORT = re.compile(rf"^\s*(?:from|import)\s+(?:{'|'.join(STAGES)})(?:\.|\s|$)", re.MULTILINE)


def test_no_source_imports_a_stage_folder_by_its_old_top_level_name() -> None:
    files = [
        p
        for p in REPO.rglob("*.py")
        if not {".venv", "build", ".git"} & set(p.relative_to(REPO).parts) and not p.is_symlink()
    ]
    assert len(files) > 50
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in STAGES]
        # import statements inside strings (subprocess scripts) count too
        offenders += [f"{path.relative_to(REPO)}: {m.group(0).strip()}" for m in _OLD_IMPORT.finditer(_strings(tree))]
    assert offenders == []


def _strings(tree: ast.AST) -> str:
    return "\n".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel .`` of a copy of the sources (so the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("safeport", *STAGES):  # safeport/flows -> ../flows etc. stay links, as in the checkout
        shutil.copytree(REPO / name, src / name, symlinks=True)
    for cache in src.rglob("__pycache__"):
        shutil.rmtree(cache)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp)],
        check=True,
        capture_output=True,
    )
    (found,) = tmp.glob("safeport-*.whl")
    return found


def test_the_wheel_holds_only_the_safeport_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"safeport", f"safeport-{safeport.__version__}.dist-info"}
    for stage in STAGES:  # each stage folder is inside, as safeport.<stage>
        assert f"safeport/{stage}/__init__.py" in names
    assert "safeport/py.typed" in names and "safeport/store/text_guard.py" in names
    top_level = [n for n in names if n.endswith("top_level.txt")]
    assert not top_level or zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["safeport"]


RUN_FROM_WHEEL = textwrap.dedent(
    """
    import importlib, json, sys
    sys.path.insert(0, sys.argv[1])  # the wheel's install folder, first
    import safeport, safeport.store.query
    assert safeport.__file__.startswith(sys.argv[1]), safeport.__file__
    assert safeport.store.query.__file__.startswith(sys.argv[1]), safeport.store.query.__file__
    shadowed = []
    for name in ("flows", "extractors", "store", "mappers", "eval"):
        try:
            importlib.import_module(name)
            shadowed.append(name)
        except ImportError:
            pass
    assert not shadowed, shadowed

    # The README's snippet, with the hub id served by the bundled tiny Flux (no hub here).
    import diffusers
    original = diffusers.FluxPipeline.from_pretrained.__func__
    local = {"black-forest-labs/FLUX.1-schnell": sys.argv[2]}
    diffusers.FluxPipeline.from_pretrained = classmethod(lambda cls, name, **kw: original(cls, local[name], **kw))
    scope = {}
    exec(compile(sys.stdin.read(), "README.md", "exec"), scope)
    print(json.dumps({"shape": list(scope["v"].shape), "name": scope["lineage"]["name"],
                      "size": list(scope["image"].size), "version": safeport.__version__}))
    """
)


def test_the_wheel_imports_outside_the_checkout_and_runs_the_readme_snippet(wheel: Path, tmp_path: Path) -> None:
    from safeport.cli import main
    from safeport.store.artifacts import VectorRecord, save_vectors
    from safeport.store.store import Store

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    job = tmp_path / "job"  # the job's folder: its store and an exported copy of the vector
    key = hashlib.sha256(VECTOR.encode()).hexdigest()[:20]
    values = np.random.default_rng(0).standard_normal(32).astype(np.float32)  # tiny Flux's T5 dim
    with Store(job / "safeport-store") as store:
        save_vectors(
            store,
            "fit-readme",
            [VectorRecord(key, VECTOR, "calibrated", "llama31-8b", "flux1-schnell", "ridge", None, values, {})],
        )
    assert main(["export", "--store", str(job / "safeport-store"), "-o", str(job / "vectors"), VECTOR]) == 0

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUN_FROM_WHEEL, str(target), str(REPO / "models" / "tiny-flux")],
        input=readme_snippet(),
        cwd=job,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"shape": [32], "name": VECTOR, "size": [128, 128], "version": safeport.__version__}
    assert (job / "steered.png").is_file()
