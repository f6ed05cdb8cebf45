"""Where a store's Zarr arrays and generated outputs live: its own folder (the default) or any fsspec URL.

DuckDB metadata always stays in the local store folder (one writer process);
the arrays, which are most of the bytes and what Dask workers write, can live on
any filesystem fsspec knows: a shared mount, ``s3://bucket/prefix``, ``gs://…``,
``memory://…`` (one process only). Credentials and endpoints are never part of
the catalog or the store: fsspec takes them from the environment (``AWS_*``
variables, ``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/``), which every
process, Dask workers included, reads the same way.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem

DEFAULT = "arrays.zarr"  # inside the store folder; recorded relative so the folder can move
OUTPUTS = "outputs"  # generated PNGs, inside the store folder unless the profile says otherwise

# Packages that implement common protocols, for the "install it" hint.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class LocationError(ValueError):
    """An arrays location that cannot be used; the message names it and the fix."""


def protocol(url: str) -> str | None:
    """``s3`` for ``s3://b/p``; None for a plain path."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head else None


def check_url(url: str) -> None:
    """Refuse an unknown protocol or one whose package is not installed, naming what to do."""
    proto = protocol(url)
    if proto is None:
        return
    if proto not in fsspec.available_protocols():
        raise LocationError(
            f"arrays location {url!r} has protocol {proto!r}, which fsspec does not know; use a local path "
            "or a URL such as s3://bucket/prefix/arrays.zarr, gs://…, memory://…"
        )
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError:
        package = _PACKAGES.get(proto, f"the fsspec implementation of {proto}://")
        raise LocationError(
            f"arrays location {url!r} needs {package}; install it (`pip install {package}`"
            + (", or the project's `[s3]` extra)" if package == "s3fs" else ")")
        ) from None


def resolve(setting: str, root: Path) -> str:
    """A location setting made absolute: URLs as they are, paths against ``root``."""
    if protocol(setting) is not None:
        return setting.rstrip("/")
    path = Path(setting).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


@dataclass(frozen=True)
class _Location:
    """An absolute path or fsspec URL; small and picklable (Dask workers receive it)."""

    url: str

    @property
    def remote(self) -> bool:
        """True for a URL (even ``file://``): it is reached through fsspec."""
        return protocol(self.url) is not None

    def _fs(self) -> tuple[Any, str]:
        check_url(self.url)
        fs, base = fsspec.core.url_to_fs(self.url)
        return fs, base.rstrip("/")

    def _fresh_fs(self) -> tuple[Any, str]:
        """:meth:`_fs` with fsspec's listing cache dropped, so what other processes wrote is seen."""
        fs, base = self._fs()
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
        return fs, base

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class OutputLocation(_Location):
    """Where a store's generated PNGs live: ``<store>/outputs`` (the default), another folder, or a URL.

    Files are written whole or not at all: a local file through a temporary name, fsynced and
    renamed; an object store (``s3://``, ``gs://``) by one PUT, which is atomic there. Names are
    content keys, so a rewrite after a crash writes the same bytes.
    """

    def _local(self) -> Path | None:
        """The folder, when the location is on this machine's filesystem (a path or ``file://``)."""
        if not self.remote:
            return Path(self.url)
        fs, base = self._fs()
        return Path(base) if isinstance(fs, LocalFileSystem) else None

    def write(self, names: Sequence[str], blobs: Sequence[bytes]) -> None:
        """Write each file whole (``OSError`` on failure: nothing half-written is left under its name)."""
        folder = self._local()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in zip(names, blobs, strict=True):
                _write_atomic(folder / name, data)
            _fsync_dir(folder)
            return
        fs, base = self._fs()
        with contextlib.suppress(NotImplementedError):
            fs.makedirs(base, exist_ok=True)
        for name, data in zip(names, blobs, strict=True):
            fs.pipe_file(f"{base}/{name}", data)

    def read(self, name: str) -> bytes:
        """The bytes of one file (``OSError``, e.g. ``FileNotFoundError``, when it cannot be read)."""
        folder = self._local()
        if folder is not None:
            return (folder / name).read_bytes()
        fs, base = self._fs()
        data: bytes = fs.cat_file(f"{base}/{name}")
        return data

    def present(self, names: Iterable[str]) -> set[str]:
        """Those of ``names`` that exist (one listing for a remote location, not one request per file)."""
        wanted = set(names)
        folder = self._local()
        if folder is not None:
            return {n for n in wanted if (folder / n).is_file()}
        fs, base = self._fresh_fs()
        try:
            listed = fs.ls(base, detail=False)
        except FileNotFoundError:
            return set()
        return wanted & {str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed}

    def where(self, name: str) -> str:
        """The file's path or URL, for messages."""
        return f"{self.url.rstrip('/')}/{name}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ArrayLocation(_Location):
    """An absolute path or fsspec URL holding a store's ``zarr`` group."""

    def open_group(self, mode: str) -> zarr.Group:
        check_url(self.url)
        return zarr.open_group(self.url, mode=mode)  # type: ignore[arg-type]

    def open_array(self, path: str) -> zarr.Array:
        check_url(self.url)
        return zarr.open_array(store=self.url, path=path, mode="r+")

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` (relative to the group, e.g. a chunk key) exists."""
        fs, base = self._fresh_fs()
        return bool(fs.exists(f"{base}/{key}"))

    def size(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (an array or group path); 0 when absent."""
        fs, base = self._fresh_fs()
        try:
            return int(sum(int(info.get("size") or 0) for info in fs.find(f"{base}/{prefix}", detail=True).values()))
        except FileNotFoundError:
            return 0

    def newest(self, prefix: str) -> float | None:
        """Latest modification time (epoch seconds) of anything under ``prefix``; None when unknown.

        ``gc`` keeps what may still be in flight: anything written since a running writer started.
        """
        fs, base = self._fresh_fs()
        try:
            found = fs.find(f"{base}/{prefix}", detail=True, withdirs=True)
        except FileNotFoundError:
            return None
        times = []
        for info in found.values():
            stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated") if k in info), None)
            if stamp is None:
                return None
            times.append(stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp))
        return max(times, default=None)

    def leftovers(self) -> dict[str, int]:
        """``{path: bytes}`` of half-written files (``*.partial``) a killed local write left behind.

        Zarr's folder store writes a chunk to ``<key>.<uuid>.partial`` and renames it; a kill
        between the two leaves the temporary file, which no reader ever opens. Object stores
        write whole objects and have none.
        """
        fs, base = self._fresh_fs()
        try:
            found = fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {
            name[len(base) + 1 :]: int(info.get("size") or 0)
            for name, info in found.items()
            if name.endswith(".partial")
        }

    def remove(self, prefix: str) -> None:
        """Delete everything under ``prefix`` (what a Zarr delete leaves behind on some stores)."""
        fs, base = self._fresh_fs()
        target = f"{base}/{prefix}"
        if fs.exists(target):
            fs.rm(target, recursive=True)
