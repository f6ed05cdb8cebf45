"""Where a store's Zarr arrays live: its own folder (the default) or any fsspec URL.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import zarr

DEFAULT = "arrays.zarr"  # inside the store folder; recorded relative so the folder can move

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
class ArrayLocation:
    """An absolute path or fsspec URL holding a store's ``zarr`` group; small and picklable."""

    url: str

    @property
    def remote(self) -> bool:
        """True for a URL (even ``file://``): the Zarr group is opened through fsspec."""
        return protocol(self.url) is not None

    def open_group(self, mode: str) -> zarr.Group:
        check_url(self.url)
        return zarr.open_group(self.url, mode=mode)  # type: ignore[arg-type]

    def open_array(self, path: str) -> zarr.Array:
        check_url(self.url)
        return zarr.open_array(store=self.url, path=path, mode="r+")

    def _fs(self) -> tuple[Any, str]:
        fs, base = fsspec.core.url_to_fs(self.url)
        return fs, base.rstrip("/")

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` (relative to the group, e.g. a chunk key) exists."""
        fs, base = self._fs()
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
        return bool(fs.exists(f"{base}/{key}"))

    def size(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (an array or group path); 0 when absent."""
        fs, base = self._fs()
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
        try:
            return int(sum(int(info.get("size") or 0) for info in fs.find(f"{base}/{prefix}", detail=True).values()))
        except FileNotFoundError:
            return 0

    def newest(self, prefix: str) -> float | None:
        """Latest modification time (epoch seconds) of anything under ``prefix``; None when unknown.

        ``gc`` keeps what may still be in flight: anything written since a running writer started.
        """
        fs, base = self._fs()
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
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
        fs, base = self._fs()
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
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
        fs, base = self._fs()
        with contextlib.suppress(AttributeError):
            fs.invalidate_cache()
        target = f"{base}/{prefix}"
        if fs.exists(target):
            fs.rm(target, recursive=True)

    def __str__(self) -> str:
        return self.url
