"""Catalog validation: every bad catalog is a CatalogError naming the field, the value and the fix.

Also fuzzed (hypothesis): random YAML-like data and random mutations of the real
catalog.yaml either validate or raise CatalogError, never anything else.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeport.catalog import (
    DEFAULT_CATALOG,
    Catalog,
    CatalogError,
    load_catalog,
    parse_catalog,
    resolve_profile,
)
from safeport.store.readers import DataFileError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def base_catalog(root: Path) -> dict[str, Any]:
    """A small valid catalog whose files live under ``root`` (shared with other test modules)."""
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "prompts.csv").write_text("prompt,cat\nhello there,a\nsecond prompt,b\n", encoding="utf-8")
    (data / "pairs.csv").write_text("safe,unsafe,cat\na cat,a bad cat,x\n", encoding="utf-8")
    (data / "pairs_test.csv").write_text("safe,unsafe,cat\na dog,a bad dog,y\n", encoding="utf-8")
    (data / "anchors.txt").write_text("one anchor line\nanother anchor line\n", encoding="utf-8")
    model = root / "model"
    model.mkdir(exist_ok=True)
    (model / "m.gguf").write_bytes(b"GGUF")
    return {
        "version": 1,
        "models": {
            "src": {"role": "source", "family": "causal_lm", "path": "model", "gguf_file": "m.gguf"},
            "tgt": {"role": "target", "family": "text_encoder", "hub_id": "org/encoder"},
        },
        "datasets": {
            "anc": {"kind": "anchors", "sources": [{"path": "data/anchors.txt"}]},
            "prs": {
                "kind": "pairs",
                "sources": [
                    {"path": "data/pairs.csv", "split": "train"},
                    {"path": "data/pairs_test.csv", "split": "test"},
                ],
                "safe_column": "safe",
                "unsafe_column": "unsafe",
                "category_column": "cat",
            },
            "pr": {
                "kind": "prompts",
                "sources": [{"path": "data/prompts.csv", "column": "prompt"}],
                "category_column": "cat",
            },
        },
        "profiles": {"default": {"models": ["src", "tgt"], "anchors": "anc", "pairs": "prs", "prompts": ["pr"]}},
    }


def write_catalog(root: Path, data: Any, name: str = "catalog.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _error(tmp_path: Path, mutate: Callable[[dict[str, Any]], None], profile: str = "default") -> str:
    data = base_catalog(tmp_path)
    mutate(data)
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, data), profile)
    return str(info.value)


def test_base_catalog_is_valid(tmp_path: Path) -> None:
    resolved = load_catalog(write_catalog(tmp_path, base_catalog(tmp_path)))
    assert resolved.name == "default"
    assert set(resolved.datasets) == {"anc", "prs", "pr"}
    assert resolved.source_path(resolved.datasets["pr"].sources[0]) == tmp_path / "data" / "prompts.csv"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = d
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = d
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[last]

    return mutate


def _rename(section: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    """Rename a model or dataset, and its use in the default profile."""

    def mutate(d: dict[str, Any]) -> None:
        d[section][new] = d[section].pop(old)
        prof = d["profiles"]["default"]
        key = "models" if section == "models" else "prompts"
        prof[key] = [new if x == old else x for x in prof[key]]

    return mutate


# (mutation, substrings the message must contain: field path, offending value, fix)
CASES: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "unknown key": (_set("models.src.colour", "red"), ("models.src.colour", "'red'", "unknown key", "remove it")),
    "unknown top-level key": (_set("extras", 1), ("extras", "unknown key", "remove it")),
    "missing required key": (_del("models.src.role"), ("models.src.role", "missing", "add it")),
    "missing section": (_del("profiles"), ("profiles", "missing", "add it")),
    "wrong type int": (_set("models.src.batch_size", "many"), ("models.src.batch_size", "'many'", "integer")),
    "wrong type list": (_set("datasets.pr.sources", "data/prompts.csv"), ("datasets.pr.sources", "list")),
    "wrong type mapping": (_set("models", ["src", "tgt"]), ("models", "['src', 'tgt']", "dictionary")),
    "out of range": (_set("models.src.batch_size", 0), ("models.src.batch_size", "0", "greater than")),
    "bad role": (_set("models.src.role", "both"), ("models.src.role", "'both'", "'source' or 'target'")),
    "bad family": (_set("models.src.family", "gpt"), ("models.src.family", "'gpt'", "use one of", "causal_lm")),
    "bad device": (_set("models.src.device", "tpu"), ("models.src.device", "'tpu'", "use auto, cpu, cuda")),
    "bad device index": (_set("models.src.device", "cuda:x"), ("'cuda:x'", "cuda:N")),
    "unicode digit device": (_set("models.src.device", "cuda:١"), ("'cuda:١'", "cuda:N")),
    "bad dtype": (_set("models.src.dtype", "int8"), ("models.src.dtype", "'int8'", "float16")),
    "both hub_id and path": (_set("models.tgt.path", "model"), ("models.tgt", "exactly one of hub_id", "path")),
    "neither hub_id nor path": (_del("models.tgt.hub_id"), ("models.tgt", "exactly one of hub_id")),
    "missing model folder": (
        _set("models.src.path", "no-such-folder"),
        ("models.src.path", "'no-such-folder'", "does not exist", "fix the path"),
    ),
    "missing gguf file": (
        _set("models.src.gguf_file", "other.gguf"),
        ("models.src.gguf_file", "'other.gguf'", "not found", "fix the file name"),
    ),
    "pkg path not installed": (
        _set("models.src.path", "pkg://no_such_pkg_xyz/model"),
        ("pkg://no_such_pkg_xyz/model", "not installed", "install it"),
    ),
    "pkg path bad module name": (_set("models.src.path", "pkg://a..b/x"), ("pkg://a..b/x", "not installed")),
    "pkg path empty module": (_set("models.src.path", "pkg:///x"), ("pkg:///x", "not installed")),
    "path with NUL": (_set("models.src.path", "mo\x00del"), ("NUL", "fix the path")),
    "missing data file": (
        _set("datasets.pr.sources.0.path", "data/missing.csv"),
        ("datasets.pr.sources.0.path", "'data/missing.csv'", "does not exist", "fix the path"),
    ),
    "source with path and hub": (
        _set("datasets.pr.sources.0.hub", "org/data"),
        ("datasets.pr.sources.0", "exactly one of path", "hub"),
    ),
    "unknown suffix": (
        _set("datasets.pr.sources.0.path", "data/prompts.xlsx"),
        ("datasets.pr.sources.0", "'data/prompts.xlsx'", "add format:", "csv, parquet, jsonl, text"),
    ),
    "unknown suffix in a pairs dataset": (
        _set("datasets.prs.sources.0.path", "data/pairs.tsv"),
        ("datasets.prs.sources.0", "'data/pairs.tsv'", "add format:"),
    ),
    "bad format": (_set("datasets.pr.sources.0.format", "xlsx"), ("datasets.pr.sources.0.format", "'xlsx'")),
    "unknown encoding": (
        _set("datasets.pr.sources.0.encoding", "klingon"),
        ("datasets.pr.sources.0.encoding", "'klingon'", "utf-8"),
    ),
    "prompts source without column": (_del("datasets.pr.sources.0.column"), ("datasets.pr", "needs column:")),
    "pairs without safe_column": (
        _del("datasets.prs.safe_column"),
        ("datasets.prs", "safe_column and unsafe_column", "add both"),
    ),
    "pairs without unsafe_column": (_del("datasets.prs.unsafe_column"), ("datasets.prs", "unsafe_column")),
    "pairs from a text file": (
        _set("datasets.prs.sources.0.path", "data/anchors.txt"),
        ("datasets.prs", "'data/anchors.txt'", "text file", "csv, parquet or jsonl"),
    ),
    "splits not summing to 1": (
        _set("datasets.anc.splits", [0.5, 0.5, 0.5]),
        ("datasets.anc", "[0.5, 0.5, 0.5]", "summing to 1"),
    ),
    "negative split": (_set("datasets.anc.splits", [1.2, -0.2, 0.0]), ("datasets.anc", "non-negative")),
    "NaN split": (_set("datasets.anc.splits", [math.nan, 0.5, 0.5]), ("datasets.anc", "nan", "finite")),
    "two splits": (_set("datasets.anc.splits", [0.5, 0.5]), ("datasets.anc.splits", "[0.5, 0.5]")),
    "NaN alpha": (_set("profiles.default.alphas", [0.0, math.nan]), ("profiles.default.alphas", "finite")),
    "empty sources": (_set("datasets.pr.sources", []), ("datasets.pr.sources", "at least 1")),
    "bad dataset kind": (_set("datasets.pr.kind", "images"), ("datasets.pr.kind", "'images'", "'anchors'")),
    "bad version": (_set("version", 2), ("version", "2", "1")),
    "one model in profile": (_set("profiles.default.models", ["src"]), ("profiles.default.models", "at least 2")),
    "unknown model in profile": (
        _set("profiles.default.models", ["src", "ghost"]),
        ("profiles.default.models", "'ghost'", "add it under models:"),
    ),
    "no target model": (
        _set("models.tgt.role", "source"),
        ("profiles.default.models", "role: target", "'src': 'source'"),
    ),
    "unknown prompts dataset": (
        _set("profiles.default.prompts", ["ghost"]),
        ("profiles.default.prompts", "'ghost'", "add it under datasets:"),
    ),
    "unknown anchors dataset": (_set("profiles.default.anchors", "ghost"), ("profiles.default.anchors", "'ghost'")),
    "anchors slot names a prompts dataset": (
        _set("profiles.default.anchors", "pr"),
        ("profiles.default.anchors", "'pr'", "kind 'prompts'", "kind 'anchors'"),
    ),
    "pairs slot names an anchors dataset": (
        _set("profiles.default.pairs", "anc"),
        ("profiles.default.pairs", "'anc'", "kind 'anchors'", "kind 'pairs'"),
    ),
    "bad mapper": (_set("profiles.default.mappers", ["svm"]), ("profiles.default.mappers", "'svm'", "procrustes")),
    "options with a list value": (_set("models.src.options", {"k": [1, 2]}), ("models.src.options.k",)),
    "non-string model name": (_set("models", {1: {"role": "source"}}), ("models.1",)),
    # -- issue 18: catalogs that validated, then crashed after the expensive part
    **{
        f"encoding {codec}": (
            _set("datasets.pr.sources.0.encoding", codec),
            ("datasets.pr.sources.0.encoding", f"'{codec}'", "not a text encoding", "utf-8"),
        )
        for codec in ("rot13", "base64", "zlib", "hex", "uu")
    },
    "unsafe_column equal to safe_column": (
        _set("datasets.prs.unsafe_column", "safe"),
        ("datasets.prs", "'safe'", "two different columns"),
    ),
    "category_column equal to safe_column": (
        _set("datasets.prs.category_column", "safe"),
        ("datasets.prs", "'safe'", "category_column"),
    ),
    "shard_rows of 2e9": (
        _set("profiles.default.shard_rows", 2_000_000_000),
        ("profiles.default.shard_rows", "2000000000", "less than or equal to 65536"),
    ),
    "shard_rows beyond int32": (
        _set("profiles.default.shard_rows", 2**40),
        ("profiles.default.shard_rows", str(2**40), "less than or equal to 65536"),
    ),
    "dataset named __concept__": (
        _rename("datasets", "pr", "__concept__"),
        ("datasets.__concept__", "reserved", "rename it"),
    ),
    "dataset named _x": (_rename("datasets", "pr", "_x"), ("datasets._x", "reserved", "rename it")),
    "model named org/x": (_rename("models", "tgt", "org/x"), ("models.org/x", "'org/x'", "letters, digits")),
    "model named ..": (_rename("models", "tgt", ".."), ("models..", "'..'", "letters, digits")),
    "dataset named with a space": (
        _rename("datasets", "pr", "my prompts"),
        ("datasets.my prompts", "'my prompts'", "letters, digits"),
    ),
    "no mappers": (_set("profiles.default.mappers", []), ("profiles.default.mappers", "at least 1")),
    "no alphas": (_set("profiles.default.alphas", []), ("profiles.default.alphas", "at least 1")),
    "absurd alphas": (
        _set("profiles.default.alphas", [1e308, -1e308]),
        ("profiles.default.alphas", "1e+308", "between -100 and 100"),
    ),
    "inf alpha": (_set("profiles.default.alphas", [0.0, math.inf]), ("profiles.default.alphas", "inf", "finite")),
    "negative profile seed": (
        _set("profiles.default.seed", -1),
        ("profiles.default.seed", "-1", "greater than or equal to 0"),
    ),
    "negative dataset seed": (_set("datasets.pr.seed", -1), ("datasets.pr.seed", "-1", "greater than or equal to 0")),
    "seed beyond 32 bits": (_set("datasets.pr.seed", 2**32), ("datasets.pr.seed", str(2**32), "less than or equal")),
    "pairs source without split": (
        _del("datasets.prs.sources.0.split"),
        ("datasets.prs", "sources.0 ('data/pairs.csv') has no split;", "needs split: train or split: test"),
    ),
    "pairs source with an unknown split": (
        _set("datasets.prs.sources.0.split", "validation"),
        ("datasets.prs", "sources.0", "'validation'", "split: train or split: test"),
    ),
    "pairs without a test source": (
        _set("datasets.prs.sources.1.split", "train"),
        ("datasets.prs", "no source with split: test", "add one"),
    ),
    "pairs without a train source": (
        _set("datasets.prs.sources.0.split", "test"),
        ("datasets.prs", "no source with split: train", "add one"),
    ),
    "huge max_count": (_set("datasets.pr.max_count", 10**30), ("datasets.pr.max_count", "less than or equal")),
    "huge source max_count": (
        _set("datasets.pr.sources.0.max_count", 10**30),
        ("datasets.pr.sources.0.max_count", "less than or equal"),
    ),
    "huge max_batch_tokens": (
        _set("models.src.max_batch_tokens", 10**30),
        ("models.src.max_batch_tokens", "less than or equal"),
    ),
    "huge generation integer": (
        _set("models.src.generation", {"height": 10**4000}),
        ("models.src.generation", "height", "integer"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_catalog_names_field_value_and_fix(tmp_path: Path, case: str) -> None:
    mutate, expected = CASES[case]
    message = _error(tmp_path, mutate)
    for part in expected:
        assert part in message, f"{case}: {part!r} not in {message!r}"
    assert "Traceback" not in message


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["models"]["src"]["family"] = "gpt"
        d["models"]["tgt"]["device"] = "tpu"
        d["datasets"]["pr"]["kind"] = "images"

    message = _error(tmp_path, mutate)
    assert "3 problem(s)" in message
    assert "models.src.family" in message and "models.tgt.device" in message and "datasets.pr.kind" in message


def test_unknown_profile(tmp_path: Path) -> None:
    message = _error(tmp_path, lambda d: None, profile="nope")
    assert "'nope'" in message and "use one of default" in message and "--profile" in message


def test_no_profiles_at_all(tmp_path: Path) -> None:
    message = _error(tmp_path, _set("profiles", {}), profile="default")
    assert "'default'" in message and "(none)" in message


def test_long_values_are_shortened(tmp_path: Path) -> None:
    message = _error(tmp_path, _set("models.src.family", "x" * 500))
    assert "x" * 76 + "..." in message and "x" * 100 not in message


# --- the file itself -------------------------------------------------------------------


def test_missing_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"does not exist.*--catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_catalog_path_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not a file"):
        load_catalog(tmp_path)


def test_non_utf8_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_bytes(b"version: 1\nmodels:\n  caf\xe9: {}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert "byte 24" in message and "line 3" in message and "save the catalog as UTF-8" in message


def test_catalog_with_utf8_bom_is_read(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, base_catalog(tmp_path))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_catalog(path).name == "default"


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text("version: 1\nmodels: {a: [1, 2}\n", encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert "not valid YAML" in message and "fix the syntax" in message and "line 2" in message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, base_catalog(tmp_path))
    text = path.read_text(encoding="utf-8") + "profiles:\n  other: {}\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError, match="'profiles' twice; keep one"):
        load_catalog(path)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    base = base_catalog(tmp_path)
    path = write_catalog(tmp_path, base)
    text = (
        path.read_text(encoding="utf-8").replace("  tgt:\n    role: target\n", "  tgt: &t\n    role: target\n")
        + "x_unused: {<<: *t}\n"
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError, match="x_unused"):  # merged fine, then refused as unknown key
        load_catalog(path)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int"), ("", "NoneType"), ("~\n", "NoneType")],
)
def test_catalog_that_is_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert f"is a {kind}" in message and "not a mapping" in message and "version:, models:" in message


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/object:pathlib.Path {{}}",
        "!!python/name:os.system",
    ],
)
def test_python_tags_are_refused_and_run_nothing(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "catalog.yaml"
    path.write_text(f"version: 1\nmodels: {payload.format(marker=marker)}\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(path)
    assert not marker.exists()


def test_yaml_alias_bomb_fails_fast(tmp_path: Path) -> None:
    """9**9 leaves by reference: the error must not try to print (or validate) them all."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    lines += ["version: 1", "models: *l8", "datasets: {}", "profiles: {default: {alphas: *l8}}"]
    path = tmp_path / "catalog.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert len(str(info.value)) < 5000 and "models = [[[" in str(info.value)


@pytest.mark.parametrize("where", ["models.src.batch_size", "profiles.default.seed", "models.src.description"])
def test_a_5000_digit_integer_names_its_field_and_line(tmp_path: Path, where: str) -> None:
    """Python refuses to parse it (int-string limit); the catalog names the key and the line instead."""
    data = base_catalog(tmp_path)
    _set(where, 424242)(data)
    path = write_catalog(tmp_path, data)
    text = path.read_text(encoding="utf-8")
    line = text[: text.index("424242")].count("\n") + 1
    path.write_text(text.replace("424242", "9" * 5000), encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert where in message and f"an integer of 5000 digits at line {line}" in message and len(message) < 600


def test_a_huge_hex_integer_is_shown_short(tmp_path: Path) -> None:
    """0x + 5000 hex digits parses (powers of two are exempt from the limit) but cannot be printed in decimal."""
    path = write_catalog(tmp_path, base_catalog(tmp_path))
    path.write_text(path.read_text(encoding="utf-8") + "x_big: 0x" + "f" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert "x_big" in str(info.value) and "20000-bit integer" in str(info.value)


def test_real_catalog_profiles_resolve() -> None:
    for profile in ("default", "paper"):
        resolved = load_catalog(DEFAULT_CATALOG, profile)
        assert resolved.name == profile


# --- fuzzing -----------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["source", "target", "causal_lm", "anchors", "pairs", "prompts", "csv", "cuda:0", "auto"]),
)
_keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(
        [
            "version",
            "models",
            "datasets",
            "profiles",
            "role",
            "family",
            "path",
            "hub_id",
            "kind",
            "sources",
            "column",
            "splits",
            "anchors",
            "pairs",
            "prompts",
            "safe_column",
            "unsafe_column",
            "format",
        ]
    ),
)
_yamlish = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=4)),
    max_leaves=20,
)


@FUZZ
@given(data=_yamlish)
def test_fuzz_random_data_is_catalog_error_or_valid(data: Any) -> None:
    try:
        cat = parse_catalog(data)
    except CatalogError as err:
        assert str(err)
        return
    assert isinstance(cat, Catalog)


@FUZZ
@given(
    data=st.dictionaries(st.sampled_from(["version", "models", "datasets", "profiles", "other"]), _yamlish, max_size=5)
)
def test_fuzz_random_top_level_is_catalog_error_or_valid(data: dict[str, Any]) -> None:
    with contextlib.suppress(CatalogError):
        parse_catalog(data)


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzz_random_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(CatalogError):
        load_catalog(path)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    with pytest.raises(CatalogError):
        load_catalog(path)


REAL = yaml.safe_load(DEFAULT_CATALOG.read_text(encoding="utf-8"))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


REAL_PATHS = _paths(REAL)[1:]


def _mutate(data: Any, where: tuple[Any, ...], op: str, value: Any) -> None:
    parent = data
    for k in where[:-1]:
        parent = parent[k]
    last = where[-1]
    if op == "drop":
        del parent[last]
    elif op == "retype":
        parent[last] = value
    elif op == "insert" and isinstance(parent[last], dict):
        parent[last]["unknown_" + str(value)[:5]] = value


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(REAL_PATHS), st.sampled_from(["drop", "retype", "insert"]), _yamlish),
        min_size=1,
        max_size=3,
    ),
    profile=st.sampled_from(["default", "paper", "missing"]),
)
def test_fuzz_mutated_real_catalog(edits: list[tuple[tuple[Any, ...], str, Any]], profile: str) -> None:
    data = copy.deepcopy(REAL)
    for where, op, value in edits:
        try:
            _mutate(data, where, op, value)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or retyped the parent
            continue
    try:
        resolved = resolve_profile(parse_catalog(data), DEFAULT_CATALOG.resolve(), profile)
    except CatalogError as err:
        assert str(err)
        return
    from safeport.datasets import check_columns

    try:
        check_columns(resolved)  # reads only headers/schemas of the real files
    except DataFileError as err:
        assert "not found" in str(err)
