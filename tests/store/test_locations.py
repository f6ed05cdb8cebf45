"""A store's arrays at a path or fsspec URL: recorded once, owned by one store, refused clearly when wrong."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import fsspec
import numpy as np
import pytest

from safeport.catalog import CatalogError, load_catalog
from safeport.store.location import ArrayLocation, LocationError, check_url, resolve
from safeport.store.store import Store, StoreError
from tests.flows.catalogs import tiny_catalog
from tests.store.test_maintenance import _build


def _memory_files(url: str) -> list[str]:
    fs, base = fsspec.core.url_to_fs(url)
    return sorted(fs.find(base)) if fs.exists(base) else []


def test_arrays_at_a_url_live_there_only_and_the_location_is_recorded(tmp_path: Path, memory_url: str) -> None:
    root = tmp_path / "store"
    vectors = _build(root, memory_url)
    assert sorted(p.name for p in root.iterdir()) == ["meta.duckdb", "waiting.lock", "writer.lock"]  # no arrays
    files = _memory_files(memory_url)
    assert any("/acts/mk/u1/c/1/0" in f for f in files) and any("/vectors/" in f for f in files)

    with Store(root, read_only=True) as store:  # no location given: the recorded one
        assert store.location.url == memory_url
        assert store.scalar("SELECT value FROM meta WHERE key = 'arrays'") == memory_url
        meta, values = store.activations("mk", "d")  # checksum-verified read through the URL
        assert meta.num_rows == 4 and np.isfinite(values).all()
        from safeport.store import artifacts

        np.testing.assert_array_equal(artifacts.load_vector(store, "native:n")[0], vectors["native:n"])


def test_the_default_location_is_recorded_relative_so_the_folder_can_move(tmp_path: Path) -> None:
    _build(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    with Store(tmp_path / "b", read_only=True) as store:
        assert store.scalar("SELECT value FROM meta WHERE key = 'arrays'") == "arrays.zarr"
        assert store.location.url == str((tmp_path / "b" / "arrays.zarr").resolve())
        assert store.activations("mk", "d")[0].num_rows == 4


def test_asking_for_another_location_than_the_recorded_one_is_refused_by_name(tmp_path: Path, memory_url: str) -> None:
    _build(tmp_path / "local")
    with pytest.raises(StoreError, match=r"keeps its arrays at .*arrays\.zarr, but memory://.* was asked for"):
        Store(tmp_path / "local", arrays=memory_url)
    _build(tmp_path / "remote", memory_url)
    other = str(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match=rf"keeps its arrays at {memory_url}, but {other} was asked for") as err:
        Store(tmp_path / "remote", arrays=other)
    assert f"arrays: {memory_url}" in str(err.value)  # the fix: what to write in the profile
    with Store(tmp_path / "remote", read_only=True) as store:  # nothing was changed by the refusals
        assert store.activations("mk", "d")[0].num_rows == 4


def test_two_stores_cannot_share_one_arrays_location(tmp_path: Path, memory_url: str) -> None:
    _build(tmp_path / "first", memory_url)
    with pytest.raises(StoreError, match=rf"arrays location {memory_url} belongs to another store"):
        Store(tmp_path / "second", arrays=memory_url)
    with Store(tmp_path / "first", read_only=True) as store:
        assert store.activations("mk", "d")[0].num_rows == 4


def test_a_store_whose_arrays_vanished_says_so_and_how_to_recover(
    tmp_path: Path, memory_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """memory:// is per process: a later process sees an empty location (as after a wiped bucket)."""
    _build(tmp_path, memory_url)
    fs, base = fsspec.core.url_to_fs(memory_url)
    fs.rm(base, recursive=True)
    with pytest.raises(StoreError, match=r"records committed shards, but its arrays location .* holds no arrays"):
        Store(tmp_path, read_only=True)
    with caplog.at_level(logging.WARNING, logger="safeport.store"), Store(tmp_path) as store:
        assert "safeport verify --repair" in caplog.text  # the writer opens (repair needs it) and warns
        with pytest.raises(StoreError, match="cannot be read"):
            store.activations("mk", "d")


def test_unknown_protocols_and_missing_packages_are_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LocationError, match=r"protocol 'nosuchfs', which fsspec does not know"):
        check_url("nosuchfs://bucket/arrays.zarr")
    if importlib.util.find_spec("gcsfs") is None:  # gcsfs is not a dependency: a real missing package
        with pytest.raises(StoreError, match=r"gs://b/arrays\.zarr' needs gcsfs; install it"):
            Store(tmp_path, arrays="gs://b/arrays.zarr")
    catalog = tiny_catalog(tmp_path, arrays="nosuchfs://bucket/arrays.zarr")
    with pytest.raises(CatalogError, match=r"arrays 'nosuchfs://bucket/arrays.zarr': protocol 'nosuchfs'"):
        load_catalog(str(catalog))


def test_profile_locations_resolve_against_the_catalog_folder(tmp_path: Path) -> None:
    assert resolve("s3://bucket/prefix/", tmp_path) == "s3://bucket/prefix"
    assert resolve("shared/arrays.zarr", tmp_path) == str(tmp_path / "shared" / "arrays.zarr")
    assert resolve("/abs/arrays.zarr", tmp_path) == "/abs/arrays.zarr"
    assert load_catalog(str(tiny_catalog(tmp_path, arrays="shared/a.zarr"))).arrays_url == str(
        tmp_path / "shared" / "a.zarr"
    )
    assert load_catalog(str(tiny_catalog(tmp_path))).arrays_url is None


def test_location_sizes_and_removal_go_through_fsspec(memory_url: str) -> None:
    loc = ArrayLocation(memory_url)
    group = loc.open_group("a")
    group.create_array("x/y", data=np.ones((8, 2), dtype=np.float32))
    assert loc.exists("x/y/zarr.json") and not loc.exists("x/z/zarr.json")
    assert loc.size("x") > 0 and loc.size("nothing") == 0
    loc.remove("x")
    assert loc.size("x") == 0 and not loc.exists("x/y/zarr.json")
    assert loc.remote and not ArrayLocation("/tmp/a.zarr").remote
