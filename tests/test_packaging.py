"""One ``safeport`` namespace: the built wheel installs only ``safeport``, imports outside the checkout, and
the README's downstream snippets (a vector; a SafeDIG bundle) run from it against the bundled tiny Flux; no
source file imports a stage folder by its old top-level name.
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
from typing import Any

import numpy as np
import pytest

import safeport
from tests.conftest import REPO

STAGES = ("flows", "extractors", "store", "mappers", "eval")
VECTOR = "calibrated:llama31-8b->flux1-schnell:ridge"  # the name the README's vector snippet loads
BUNDLE = "safedig:flux1-dev:Sexual"  # the name the README's SafeDIG snippet loads
# The README's marked downstream snippets, each run from the built wheel against the bundled tiny Flux.
VECTOR_SNIPPET = "<!-- tests/test_packaging.py runs this snippet from the built wheel against the bundled tiny Flux -->"
SAFEDIG_SNIPPET = (
    "<!-- tests/test_packaging.py runs this SafeDIG snippet from the built wheel against the bundled tiny Flux -->"
)
SNIPPETS = {"vector": VECTOR_SNIPPET, "safedig": SAFEDIG_SNIPPET}
TINY_FLUX = REPO / "models" / "tiny-flux"
HUB = {"black-forest-labs/FLUX.1-schnell": str(TINY_FLUX), "black-forest-labs/FLUX.1-dev": str(TINY_FLUX)}


def readme_snippet(marker: str) -> str:
    """A README downstream snippet: the python block right after its ``marker`` comment."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(marker) + r"\n```python\n(.*?)```", text, re.DOTALL)
    assert found, f"README.md lost the snippet marked {marker}"
    return found.group(1)


@pytest.mark.parametrize("marker", list(SNIPPETS.values()), ids=list(SNIPPETS))
def test_the_readme_snippet_uses_only_the_public_api(marker: str) -> None:
    tree = ast.parse(readme_snippet(marker))
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


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own (what a downstream job's environment holds)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


# argv: the wheel's install folder; the hub ids the snippet may load (JSON: hub id -> a bundled tiny pipeline's
# folder); an expression over the snippet's names giving what it loaded; pipeline settings for the replays (JSON).
# The snippet comes on stdin.
RUN_FROM_WHEEL = textwrap.dedent(
    """
    import importlib, inspect, json, sys
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

    # The README's snippet, with the hub ids served by the bundled tiny pipelines (no hub here) and the global
    # seed set before its steer() call, so that the call can be replayed (and run unsteered) afterwards.
    import diffusers, numpy as np, torch
    original = diffusers.FluxPipeline.from_pretrained.__func__
    local = json.loads(sys.argv[2])
    diffusers.FluxPipeline.from_pretrained = classmethod(lambda cls, name, **kw: original(cls, local[name], **kw))
    public_steer, calls = safeport.steer, []

    def seeded_steer(*args, **kwargs):
        calls.append(inspect.signature(public_steer).bind(*args, **kwargs))
        torch.manual_seed(0)
        return public_steer(*args, **kwargs)

    safeport.steer = seeded_steer  # what the snippet's `from safeport import steer` gets
    scope = {}
    exec(compile(sys.stdin.read(), "README.md", "exec"), scope)

    image, (call,) = scope["image"], calls
    report = {**eval(sys.argv[3], scope), "size": list(image.size), "version": safeport.__version__}
    given, replays = call.arguments, json.loads(sys.argv[4])

    def replay(steered):  # the snippet's call with the replays' settings, or the pipeline without the steering
        torch.manual_seed(0)
        if steered:
            return np.asarray(public_steer(*call.args, **{**call.kwargs, **replays}).images[0], dtype=np.int16)
        rest = {**given.get("generate_kwargs", {}), **replays}
        out = given["pipe"](prompt=given["prompt"], negative_prompt=given.get("negative_prompt"), **rest)
        return np.asarray(out.images[0], dtype=np.int16)

    if replays is not None:
        first = replay(True)
        report["replayed"] = int(np.abs(replay(True) - first).max())
        report["steered"] = float(np.abs(replay(False) - first).mean())
    print(json.dumps(report))
    """
)


def run_snippet_from_wheel(
    site: Path, job: Path, marker: str, report: str, replays: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the README snippet after ``marker`` in an isolated interpreter from ``site``, in the folder ``job``.

    Returns ``report`` (an expression over the snippet's names, evaluated after it ran) with the image's size
    and the installed version. With ``replays`` (pipeline settings, e.g. fewer steps), the snippet's steer()
    call is then replayed with those settings from the same seed, twice steered and once unsteered (the
    pipeline called directly), adding ``replayed``, the largest pixel difference (0..255) between the two
    steered images (0: the comparison is deterministic), and ``steered``, the mean one between steered and
    unsteered.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUN_FROM_WHEEL, str(site), json.dumps(HUB), report, json.dumps(replays)],
        input=readme_snippet(marker),
        cwd=job,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _saved(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_the_wheel_imports_outside_the_checkout_and_runs_the_readme_snippet(site: Path, tmp_path: Path) -> None:
    from safeport.cli import main
    from safeport.store.artifacts import VectorRecord, save_vectors
    from safeport.store.store import Store

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

    result = run_snippet_from_wheel(site, job, VECTOR_SNIPPET, '{"shape": list(v.shape), "name": lineage["name"]}')
    assert result == {"shape": [32], "name": VECTOR, "size": [128, 128], "version": safeport.__version__}
    assert _saved(job / "steered.png") == (128, 128)


SAFEDIG_REPORT = (
    '{"name": bundle.name, "model": bundle.model, "holdout": bundle.holdout, "refit": bundle.lineage["refit"], '
    '"bundle_key": bundle.lineage["bundle_key"], "positions": [p.position for p in bundle.steered]}'
)


def test_the_wheel_runs_the_readme_safedig_snippet(site: Path, tmp_path: Path) -> None:
    """The SafeDIG snippet: a bundle from the store, the same bundle exported, steering tiny Flux (as Flux.1-dev)."""
    from diffusers import FluxPipeline

    from safeport.cli import main
    from safeport.eval.safedig import SafeDigBundle
    from tests.safedig_bundles import planted_position, store_bundle, streams

    pipe = FluxPipeline.from_pretrained(str(TINY_FLUX))
    pipe.set_progress_bar_config(disable=True)
    positions = ("te.0.txt", "double.0.img", "single.0.img")  # T5, a double-stream and a single-stream block
    call = {"height": 16, "width": 16, "num_inference_steps": 2, "max_sequence_length": 24, "output_type": "latent"}
    seen = streams(pipe, positions, ["a cat on a red sofa", "a city street at night"], **call)
    planted = tuple(planted_position(p, seen[p], "mixed", seed) for seed, p in enumerate(positions))
    bundle = SafeDigBundle(BUNDLE, "flux1-dev", "Sexual", planted, {})
    job = tmp_path / "job"  # the job's folder: its store and an exported copy of the bundle
    key = hashlib.sha256(BUNDLE.encode()).hexdigest()[:20]
    store_bundle(job / "safeport-store", bundle, key)
    export = ["export", "--store", str(job / "safeport-store"), "--safedig", BUNDLE, "-o", str(job / "bundles")]
    assert main(export) == 0
    assert (job / "bundles" / key / "bundle.json").is_file()

    # The snippet runs as written (Flux.1-dev's 28 steps); the steered/unsteered comparison replays it with 2.
    result = run_snippet_from_wheel(site, job, SAFEDIG_SNIPPET, SAFEDIG_REPORT, {"num_inference_steps": 2})
    steered = result.pop("steered")
    assert result == {
        "name": BUNDLE, "model": "flux1-dev", "holdout": "Sexual", "refit": True, "bundle_key": key,
        "positions": list(positions), "size": [128, 128], "version": safeport.__version__, "replayed": 0,
    }  # fmt: skip
    assert steered > 1.0  # mean |Δ| (0..255) against the unsteered image of the same seed; ~5.6 here
    assert _saved(job / "steered-safedig.png") == (128, 128)
