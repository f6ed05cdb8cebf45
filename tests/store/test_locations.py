"""A store's arrays at a path or fsspec URL: recorded once, owned by one store, refused clearly when wrong."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml

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
    cat = yaml.safe_load(catalog.read_text(encoding="utf-8"))
    cat["profiles"]["default"] = {**cat["profiles"]["default"], "arrays": None, "outputs": "nosuchfs://b/outputs"}
    catalog.write_text(yaml.safe_dump(cat), encoding="utf-8")
    with pytest.raises(
        CatalogError, match=r"outputs 'nosuchfs://b/outputs': protocol 'nosuchfs'.*s3://bucket/prefix/out"
    ):
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


# --- generated outputs: the store folder, another folder, or a URL ------------------------------
def _one_output(store: Store, key_seed: int = 0) -> tuple[str, bytes]:
    """Write and record one generated output the way eval does; its key and PNG bytes."""
    from PIL import Image

    from safeport.store.outputs import OutputSpec, record_outputs, write_output_files

    spec = OutputSpec("tgt", "tk", "native", "v", 1.0, key_seed, "t0", "sk")
    image = Image.new("RGB", (4, 4), (key_seed, 2, 3))
    record_outputs(store, [write_output_files(store, spec, [image], {"steps": 1}, 0.1)])
    return spec.key, store.outputs.read(f"{spec.key}.png")


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_outputs_go_to_the_profile_location_and_are_read_back_from_it(
    tmp_path: Path, memory_url: str, where: str
) -> None:
    from safeport.store.outputs import done_keys, load_images

    url = str(tmp_path / "elsewhere") if where == "folder" else memory_url.replace("arrays.zarr", "outputs")
    root = tmp_path / "store"
    with Store(root, outputs=url) as store:
        key, png = _one_output(store)
        assert done_keys(store, [key, "nope"]) == {key}
        assert load_images(store, key)[0].getpixel((0, 0)) == (0, 2, 3)
    assert not (root / "outputs").exists()  # nothing in the store folder
    if where == "folder":
        assert (tmp_path / "elsewhere" / f"{key}.png").read_bytes() == png
    else:
        assert fsspec.filesystem("memory").cat_file(f"{url.removeprefix('memory://')}/{key}.png") == png
    with Store(root, read_only=True) as store:  # recorded: a reader without the profile finds them
        assert str(store.outputs) == url and done_keys(store, [key]) == {key}
    (tmp_path / "elsewhere" / f"{key}.png").unlink(missing_ok=True)
    if where == "memory":
        fsspec.filesystem("memory").rm(f"{url.removeprefix('memory://')}/{key}.png")
    with Store(root, read_only=True) as store:
        assert done_keys(store, [key]) == set()  # a record whose file is gone is not done


def test_the_outputs_location_may_change_until_an_output_is_recorded(tmp_path: Path) -> None:
    root, first, second = tmp_path / "store", str(tmp_path / "a"), str(tmp_path / "b")
    with Store(root) as store:
        assert str(store.outputs) == str(root / "outputs")  # the default
    with Store(root, outputs=first) as store:  # nothing generated yet: the profile decides
        assert str(store.outputs) == first
        _one_output(store)
    with Store(root, outputs=first) as store:
        assert str(store.outputs) == first
    with pytest.raises(StoreError, match=rf"keeps its generated outputs at {first} \(1 recorded\), but {second}"):
        Store(root, outputs=second)
    with pytest.raises(StoreError, match=r"protocol 'nosuchfs'"):
        Store(root, outputs="nosuchfs://x/outputs")
    with Store(root, read_only=True) as store:
        assert str(store.outputs) == first  # the refused opens changed nothing


def test_a_file_written_whole_or_not_at_all(tmp_path: Path) -> None:
    """A local write goes through a temporary name: a failure leaves neither a partial file nor the temp."""
    from safeport.store.location import OutputLocation

    where = OutputLocation(str(tmp_path / "out"))
    where.write(["a.png", "b.png"], [b"A", b"B"])
    assert where.present(["a.png", "b.png", "c.png"]) == {"a.png", "b.png"} and where.read("b.png") == b"B"
    with pytest.raises(TypeError):
        where.write(["c.png"], ["not bytes"])  # type: ignore[list-item]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    with pytest.raises(FileNotFoundError):
        where.read("c.png")
