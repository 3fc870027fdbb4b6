"""Where a store's bytes live: a local folder or an object store (``s3://``, ``gs://``, ...).

A store is named by a URL: a path or ``file://...`` (a folder on a local or shared POSIX file
system), ``s3://bucket/prefix`` (AWS S3 or any S3-compatible server), ``gs://bucket/prefix``
(Google Cloud Storage) or another protocol that fsspec knows and that has an asynchronous driver.
:func:`open_location` turns the URL into a :class:`Location`: a small key-value interface (keys are
``/``-separated paths relative to the store's root) that :mod:`pipeline.store` builds the store on,
and the Zarr store that zarr reads arrays through.

Object stores go through fsspec's drivers (``s3fs``, ``gcsfs``), so endpoint and credentials come
from where those libraries look: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` (an S3-compatible server), ``AWS_DEFAULT_REGION`` and
``~/.aws/config`` / ``~/.aws/credentials``; ``GOOGLE_APPLICATION_CREDENTIALS`` or the gcloud
application-default login for GCS. A URL whose driver is not installed is a
:class:`StorageError` naming the package. Every remote call runs in zarr's event loop (one
loop, one connection pool per process); the driver is created again in a forked child (a
DataLoader worker), since an HTTP session does not survive a fork.

Reads and writes nothing by itself; imports no driver until a URL needs it.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, Awaitable, Iterable, Mapping, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")

DRIVERS: dict[str, str] = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
    "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
}
"""The package that provides each object-store protocol (pip install it, or ws3d[s3] / ws3d[gcs])."""

CONCURRENCY = 32
"""Requests in flight at once for one batch of remote reads, writes or deletes."""


class StorageError(UserError):
    """A store URL that cannot be used: unknown protocol, driver not installed, bucket unreachable."""


def is_url(location: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://`` (an object store)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def canonical(location: str | Path) -> str:
    """One spelling per store: an absolute local path, or ``scheme://bucket/prefix`` without a
    trailing slash (for comparing two stores, e.g. a teacher's corpus and the 3D store)."""
    text = str(location)
    if is_url(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def open_location(location: str | Path) -> "Location":
    """The :class:`Location` of a store path or URL.

    Raises:
        StorageError: an unknown protocol, or one whose driver package is not installed.
    """
    if isinstance(location, Path) or not is_url(location):
        text = str(location)
        return LocalLocation(Path(text.removeprefix("file://")) if text.startswith("file://") else Path(location))
    return RemoteLocation(str(location))


class Location:
    """A store's root: keys are ``/``-separated paths relative to it (``scenes/x/zarr.json``)."""

    url: str
    """The store as the user named it (a path or a URL)."""
    local: bool
    """True for a folder on a (local or shared) file system."""

    def zarr_store(self) -> Any:
        """A zarr Store over the root (read-only): what zarr reads arrays through."""
        raise NotImplementedError

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine in zarr's event loop and return its result."""
        from zarr.core.sync import sync

        return sync(coro)

    # the async interface (remote calls run concurrently inside one event-loop call)
    async def aget(self, key: str) -> bytes | None:
        """The bytes at `key`, or None when absent."""
        raise NotImplementedError

    async def aexists(self, key: str) -> bool:
        """True when an object is at `key`."""
        raise NotImplementedError

    async def aget_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        keys = list(keys)
        values = await gather_limited([self.aget(k) for k in keys])
        return dict(zip(keys, values))

    async def aput_many(self, objects: Mapping[str, Any]) -> None:
        """Write every key (bytes-like values); no order among them."""
        raise NotImplementedError

    async def alist_sizes(self, prefix: str) -> dict[str, int]:
        """Every object below `prefix` (recursively): its key relative to `prefix` -> size in bytes."""
        raise NotImplementedError

    async def achildren(self, prefix: str) -> list[str]:
        """Names directly below `prefix` (objects and sub-prefixes); [] when there is none."""
        raise NotImplementedError

    async def adelete_prefix(self, prefix: str) -> None:
        """Delete everything below `prefix` (nothing there is fine)."""
        raise NotImplementedError

    async def adelete(self, key: str) -> None:
        """Delete one object (absent is fine)."""
        raise NotImplementedError

    async def adelete_keys(self, keys: list[str]) -> None:
        """Delete these objects (absent ones are fine)."""
        await gather_limited([self.adelete(k) for k in keys])

    # the same, synchronous
    def get(self, key: str) -> bytes | None:
        return self.run(self.aget(key))

    def exists(self, key: str) -> bool:
        return self.run(self.aexists(key))

    def put(self, key: str, data: bytes) -> None:
        self.run(self.aput_many({key: data}))

    def list_sizes(self, prefix: str) -> dict[str, int]:
        return self.run(self.alist_sizes(prefix))

    def children(self, prefix: str) -> list[str]:
        return self.run(self.achildren(prefix))

    def delete_prefix(self, prefix: str) -> None:
        self.run(self.adelete_prefix(prefix))

    def delete(self, key: str) -> None:
        self.run(self.adelete(key))

    def sibling(self, suffix: str) -> "Location":
        """The location beside this one whose name ends with `suffix` (``<store>.logs``)."""
        raise NotImplementedError


async def gather_limited(coros: list[Awaitable[T]], limit: int = CONCURRENCY) -> list[T]:
    """``asyncio.gather`` with at most `limit` awaitables running at once."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


class LocalLocation(Location):
    """A folder on a POSIX file system (atomic renames: see :mod:`pipeline.store`)."""

    local = True

    def __init__(self, path: Path):
        self.path = path
        self.url = str(path)

    def file(self, key: str) -> Path:
        return self.path / key if key else self.path

    def zarr_store(self) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=True)

    async def aget(self, key: str) -> bytes | None:
        try:
            return self.file(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    async def aexists(self, key: str) -> bool:
        return self.file(key).is_file()

    async def aput_many(self, objects: Mapping[str, Any]) -> None:
        made: set[Path] = set()
        for key, data in objects.items():
            path = self.file(key)
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            with open(path, "wb") as handle:
                handle.write(data)

    async def alist_sizes(self, prefix: str) -> dict[str, int]:
        return list_folder_sizes(self.file(prefix))

    async def achildren(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self.file(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def adelete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.file(prefix), ignore_errors=True)

    async def adelete(self, key: str) -> None:
        try:
            self.file(key).unlink()
        except FileNotFoundError:
            pass

    def sibling(self, suffix: str) -> "Location":
        return LocalLocation(self.path.with_name(self.path.name + suffix))


def list_folder_sizes(top: Path) -> dict[str, int]:
    """Every file below `top`: its ``/``-separated path relative to `top` -> size ({} if absent)."""
    out: dict[str, int] = {}
    stack = [(top, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            key = f"{rel}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), key + "/"))
            else:
                out[key] = entry.stat(follow_symlinks=False).st_size
    return out


class RemoteLocation(Location):
    """An object store through an asynchronous fsspec driver (s3fs, gcsfs, ...)."""

    local = False

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower()
        self.root = self.url.split("://", 1)[1].strip("/")
        if "/" not in self.root:
            raise StorageError(f"{url}: expected {self.protocol}://BUCKET/NAME (a store is a prefix in a bucket)")
        self._cls = driver_class(self.url, self.protocol)
        self._fs: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:  # a driver never travels to another process
        state = dict(self.__dict__)
        state["_fs"], state["_pid"] = None, -1
        return state

    @property
    def fs(self) -> Any:
        """The asynchronous driver of this process, shared by the locations of one protocol
        (a client is costly to make: ~0.3 s for botocore's); made again after a fork."""
        pid = os.getpid()
        if self._fs is None or self._pid != pid:
            cached = _DRIVERS.get((self.protocol, pid))
            if cached is None:
                options: dict[str, Any] = {"asynchronous": True, "skip_instance_cache": True}
                if self.protocol in ("s3", "s3a", "gs", "gcs"):
                    options["use_listings_cache"] = False  # other processes write: never trust a cached listing
                cached = self._cls(**options)
                _DRIVERS[(self.protocol, pid)] = cached
                _close_at_exit(cached)
            self._fs, self._pid = cached, pid
        return self._fs

    def key(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def zarr_store(self) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore(self.fs, read_only=True, path=self.root)

    async def aget(self, key: str) -> bytes | None:
        try:
            return await self.fs._cat_file(self.key(key))
        except FileNotFoundError:
            return None

    async def aexists(self, key: str) -> bool:
        try:
            await self.fs._info(self.key(key))
            return True
        except FileNotFoundError:
            return False

    async def aput_many(self, objects: Mapping[str, Any]) -> None:
        fs = self.fs
        await gather_limited([fs._pipe_file(self.key(k), bytes(v)) for k, v in objects.items()])

    async def alist_sizes(self, prefix: str) -> dict[str, int]:
        base = self.key(prefix).rstrip("/") + "/"
        try:
            found = await self.fs._find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(base):]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(base) and info.get("type", "file") == "file"}

    async def achildren(self, prefix: str) -> list[str]:
        base = self.key(prefix).rstrip("/")
        try:
            names = await self.fs._ls(base, detail=False)
        except FileNotFoundError:
            return []
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != base})

    async def adelete_prefix(self, prefix: str) -> None:
        base = prefix.rstrip("/") + "/"
        await self.adelete_keys([base + k for k in await self.alist_sizes(prefix)])

    async def adelete_keys(self, keys: list[str]) -> None:
        if keys:  # batched multi-object deletes (1000 keys a request on S3)
            try:
                await self.fs._rm([self.key(k) for k in keys])
            except FileNotFoundError:
                pass

    async def adelete(self, key: str) -> None:
        try:
            await self.fs._rm_file(self.key(key))
        except FileNotFoundError:
            pass

    def sibling(self, suffix: str) -> "Location":
        return RemoteLocation(self.url + suffix)


def driver_class(url: str, protocol: str) -> type:
    """The fsspec file-system class of a protocol (its driver imported).

    Raises:
        StorageError: the protocol is unknown, its driver is not installed, or it has no
        asynchronous implementation (zarr reads through one).
    """
    import fsspec

    package = DRIVERS.get(protocol)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = package or f"the fsspec driver for {protocol}://"
        raise StorageError(f"{url}: the {protocol}:// driver is not installed: pip install {package}") from None
    except ValueError:
        raise StorageError(f"{url}: unknown store protocol {protocol!r} (use a path, file://, s3:// or gs://)") from None
    if not getattr(cls, "async_impl", False):
        raise StorageError(f"{url}: the {protocol}:// driver ({cls.__name__}) is not asynchronous; ws3d needs one")
    return cls


_OPEN: list[Any] = []
_DRIVERS: dict[tuple[str, int], Any] = {}
"""The driver of each protocol in each process."""


def _close_at_exit(fs: Any) -> None:
    """Close an asynchronous driver's HTTP session when the process exits (fsspec does so only
    for synchronous instances; an open session makes aiohttp print a warning at exit)."""
    import atexit

    if not _OPEN:
        atexit.register(_close_all)
    _OPEN.append((os.getpid(), fs))


def _close_all() -> None:
    from zarr.core.sync import sync

    for pid, fs in _OPEN:
        client = getattr(fs, "_s3", None)
        if pid != os.getpid() or client is None:
            continue
        try:
            sync(client.__aexit__(None, None, None), timeout=5)
        except Exception:  # the loop may be gone at exit: nothing left to close then
            pass
    _OPEN.clear()

