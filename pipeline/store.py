"""The scene store: a Zarr v3 hierarchy in a folder or on object storage (``s3://``, ``gs://``).

Reads and writes the arrays declared in `pipeline.schema`; nothing else in the project opens
array paths. Where the bytes live is :mod:`pipeline.storage` (a path or a URL).

**Every chunk is checksummed and checked on every read.** Arrays are written with zarr's
``crc32c`` codec after blosc, and with every chunk present (``write_empty_chunks``). A read
fetches a chunk, checks its checksum before anything decodes it, and a chunk that is missing,
truncated or altered raises :class:`DamagedDataError` naming the scene, the array and the chunk,
never wrong data, never a decoder crash. Arrays written before checksums (no ``crc32c`` codec)
still read; their blosc headers are checked against the chunk's length before decoding (a
truncated blosc chunk crashes numcodecs), and validation lists them as unchecked.

**A stage's output for a scene is one commit**, visible whole or not at all. Its node (the scene
group for ingest, the stage's group otherwise, ``vocab/<name>``) is encoded in memory; its
``zarr.json`` carries the stage record (config, config hash, stats) and a manifest (every other
key of the node and its size) and is the *marker* of a complete node:

- on a file system, the node is written into ``<store>/.tmp/<host>-<pid>-<hex>`` and renamed into
  place (atomic on POSIX); a node replaced is first renamed into ``.tmp/`` too, so nothing but
  scenes ever appears in ``scenes/``;
- on object storage (no renames), the old marker is deleted, the node's prefix is cleared, every
  other key is uploaded, and the marker is written last. A prefix without a marker is a write that
  did not finish: never read as data, cleared by the next write of that node.

A reader or a rerun trusts a node only when its marker exists and the manifest's keys are all
there with their sizes (one listing, no data read); ``validate --deep`` reads every chunk.
Leftovers of killed runs (``.tmp/*``, legacy ``scenes/.trash-*``) are never taken for scenes and
:meth:`Store.clean_leftovers` (called at the start of every stage run) removes those whose
process is gone. Two runs racing on one scene both compute it; on a disk the first rename wins,
on object storage the last marker (same content for the same config). No lock files: a killed
worker leaves nothing locked.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import schema
from pipeline.errors import SceneError, UserError
from pipeline.schema import ArraySpec
from pipeline.storage import Location, LocalLocation, StorageError, canonical, gather_limited, open_location

STORE_FORMAT = "ws3d-store"
MARKER = "zarr.json"
"""A node's metadata file: written last (object storage) or moved in whole (disk)."""
TMP = ".tmp"
"""Private folder of a local store for nodes being written and nodes being replaced."""
MANIFEST = "ws3d_manifest"
"""Attribute of a node's zarr.json: every other key of the node -> its size in bytes."""
ARRAYS = "ws3d_arrays"
"""Attribute of a node's zarr.json: the metadata of each of its arrays (path in the node -> the
array's zarr.json), so that reading a node's arrays takes one metadata request, not one an array."""
STALE_TMP_S = 6 * 3600.0
"""A temporary folder of another host (or of an unknown process) older than this is a leftover."""

__all__ = ["DamagedDataError", "Store", "StoreError", "StorageError", "is_node_name", "log_dir", "append_log"]


class StoreError(UserError, RuntimeError):
    """A store that is missing, foreign, or from an incompatible schema version."""


class DamagedDataError(SceneError):
    """Stored bytes that fail their check: a chunk missing, truncated or altered, metadata that
    does not parse. Names the scene (or ``vocab/<name>``), the array and the chunk."""


def _codecs(spec: ArraySpec) -> list[Any]:
    """blosc (byte shuffle; zstd for data read often, lz4 for bulky images written once), then a
    crc32c checksum of the compressed bytes, checked before blosc decodes anything."""
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

    shuffle = BloscShuffle.shuffle if np.dtype(spec.dtype).itemsize > 1 else BloscShuffle.noshuffle
    level = 3 if spec.codec == "zstd" else 1
    return [BloscCodec(cname=spec.codec, clevel=level, shuffle=shuffle), Crc32cCodec()]


_compressors = _codecs  # the name older code and tests use


_BATCH_BYTES = 256 << 20
"""Arrays are encoded in memory in batches of about this many raw bytes (see `_encode`)."""


def _encode(
    root_attributes: dict[str, Any],
    child_groups: Sequence[str],
    arrays: Sequence[tuple[str, ArraySpec, np.ndarray]],
    emit: Callable[[dict[str, Any]], None],
) -> tuple[dict[str, Any], dict[str, int]]:
    """Encode a Zarr node (a group with `root_attributes`, its `child_groups`, and `arrays` as
    ``(group, spec, data)`` with group "" for the node itself) and hand the encoded objects to
    `emit` batch by batch ({key relative to the node: bytes-like}).

    Zarr encodes everything (metadata, chunks, codecs) into a `MemoryStore`, all arrays of a
    batch in one event-loop call; a batch holds ~`_BATCH_BYTES` of raw data, so memory stays
    bounded (each array is cast to its stored dtype when its batch is encoded). The node's own
    ``zarr.json`` is not emitted: it is returned (parsed) with the manifest {key: size} of
    everything emitted, for the caller to write last.
    """
    import zarr
    from zarr.core.sync import sync
    from zarr.storage import MemoryStore

    batches: list[list[tuple[str, ArraySpec, np.ndarray]]] = [[]]
    size = 0
    for item in arrays:
        spec, data = item[1], item[2]
        nbytes = np.dtype(spec.dtype).itemsize * int(np.size(data))
        if batches[-1] and size + nbytes > _BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += nbytes
    groups = sorted(set(child_groups) | {g for g, _, _ in arrays if g})

    async def encode(batch: list[tuple[str, ArraySpec, np.ndarray]], first: bool, objects: dict[str, Any]) -> None:
        api = zarr.api.asynchronous
        store = MemoryStore(objects)
        top = await (api.open_group(store=store, mode="w", attributes=root_attributes) if first
                     else api.open_group(store=store, mode="r+"))
        if first:
            for name in groups:
                await top.create_group(name)
        nodes = {"": top}
        for name in {g for g, _, _ in batch if g}:
            nodes[name] = await api.open_group(store=store, path=name, mode="r+")
        coerced = [(g, spec, schema.coerce(spec, data)) for g, spec, data in batch]
        await asyncio.gather(*(nodes[g].create_array(
            spec.name, data=data, chunks=tuple(max(1, c) for c in spec.chunks(data.shape)),
            compressors=_codecs(spec), fill_value=0, dimension_names=[str(d) for d in spec.dims],
            config={"write_empty_chunks": True},  # every chunk exists: a missing one is damage
        ) for g, spec, data in coerced))

    metadata: dict[str, Any] = {}
    manifest: dict[str, int] = {}
    arrays_metadata: dict[str, Any] = {}
    for k, batch in enumerate(batches):
        objects: dict[str, Any] = {}
        if k > 0:  # later batches add arrays to groups encoded before: their metadata from memory
            for key in [MARKER, *(f"{g}/{MARKER}" for g, _, _ in batch if g)]:
                objects[key] = metadata[key]
        preloaded = set(objects)
        sync(encode(batch, k == 0, objects))
        out = {}
        for key, buffer in objects.items():
            if key in preloaded:
                continue
            if key == MARKER or (key.endswith("/" + MARKER) and key[: -len(MARKER) - 1] in groups):
                metadata[key] = buffer
            elif key.endswith("/" + MARKER):  # an array's: kept in the marker too (one read a node)
                arrays_metadata[key[: -len(MARKER) - 1]] = json.loads(buffer.to_bytes())
            if key != MARKER:
                data = buffer.as_numpy_array().data
                out[key] = data
                manifest[key] = data.nbytes
        emit(out)
    root = json.loads(metadata[MARKER].to_bytes())
    root.setdefault("attributes", {})[ARRAYS] = arrays_metadata
    return root, manifest


def _marker_bytes(root: dict[str, Any], manifest: dict[str, int]) -> bytes:
    root = dict(root)
    root["attributes"] = {**root.get("attributes", {}), MANIFEST: manifest}
    return json.dumps(root, indent=2).encode()


def _chunk_problem(data: Any, checked: bool, blosc: bool) -> str | None:
    """Why a chunk's bytes cannot be trusted (None when they can): a crc32c that does not
    match (checked arrays), or a blosc header whose compressed size is not the chunk's length
    (older arrays; numcodecs crashes on a truncated blosc chunk, so this runs before it)."""
    view = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
    if checked:
        import google_crc32c

        if len(view) < 4:
            return f"{len(view)} bytes, shorter than its checksum"
        stored = view[-4:].tobytes()
        computed = np.uint32(google_crc32c.value(view[:-4])).tobytes()
        return None if stored == computed else "fails its crc32c checksum"
    if blosc:
        if len(view) < 16:
            return f"truncated ({len(view)} bytes, shorter than a blosc header)"
        cbytes = int.from_bytes(view[12:16].tobytes(), "little")
        if cbytes != len(view):
            return f"truncated or altered (blosc header says {cbytes} bytes, the chunk has {len(view)})"
    return None


def _checked_store(inner: Any, prefix: str, checked: bool, blosc: bool, where: Callable[[str, str], Exception]) -> Any:
    """A zarr store over `inner` whose chunk reads below `prefix` are checked (see
    `_chunk_problem`); a missing chunk of a checked array is damage (every chunk is written)."""
    from zarr.storage import WrapperStore

    chunk_prefix = prefix + "/c"

    class CheckedStore(WrapperStore):
        def _with_store(self, store: Any) -> Any:
            return _checked_store(store, prefix, checked, blosc, where)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            buffer = await self._store.get(key, prototype, byte_range)
            if byte_range is not None or not (key == chunk_prefix or key.startswith(chunk_prefix + "/")):
                return buffer
            chunk = key[len(prefix) + 1:]
            if buffer is None:
                if checked:
                    raise where(chunk, "is missing")
                return buffer
            problem = _chunk_problem(buffer.as_numpy_array(), checked, blosc)
            if problem:
                raise where(chunk, problem)
            return buffer

    return CheckedStore(inner)


_GROUP_STAGE = {group: stage for stage, groups in schema.STAGE_GROUPS.items() for group in groups}
"""The stage that writes each group of a scene."""


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def _pid_alive(pid: int) -> bool:
    """Whether a process runs with this id; a zombie (killed, not yet reaped: a kill -9'd Dask
    worker whose parent died with it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class Store:
    """A ws3d store. Open with `Store.open` (existing) or `Store.create` (new or existing).

    ``store.url`` is the store as named (a path or a URL); ``store.path`` is a `Path` for a
    store in a folder and the URL string for one on object storage (both round-trip through
    `Store.open` and read well in messages)."""

    def __init__(self, location: Location | str | Path, attrs: dict[str, Any]):
        self.location = location if isinstance(location, Location) else open_location(location)
        self.url = self.location.url
        self.path: Path | str = self.location.path if isinstance(self.location, LocalLocation) else self.url
        self.attrs = attrs
        self._zarr: Any = None
        self._zarr_pid = -1

    @property
    def local(self) -> bool:
        """True for a store in a folder (renames commit), False on object storage (markers do)."""
        return self.location.local

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, *, dataset: str, class_names: list[str], extra: dict[str, Any] | None = None
    ) -> "Store":
        """Create a store (or open it if it already exists for the same dataset and classes).

        A store whose root ``zarr.json`` was deleted while its scenes remain (of this dataset) gets
        it back, with a warning; any other non-empty folder or prefix is refused.
        """
        location = open_location(path)
        root = _get(location, MARKER)
        if root is not None:
            store = cls.open(path)
            if store.dataset != dataset or list(store.class_names) != list(class_names):
                raise StoreError(
                    f"{location.url}: holds dataset {store.dataset!r} with classes {store.class_names}; "
                    f"refusing to mix in {dataset!r}. Use another --store."
                )
            store._ensure_groups()
            return store
        children = [c for c in _call(location, location.children, "") if c != TMP]
        if children:
            found = _scene_datasets(location)
            if set(children) - {"scenes", "vocab"} or found - {dataset}:
                raise StoreError(f"{location.url}: exists, is not empty and is not a ws3d store")
            if any(is_node_name(n) for n in location.children("scenes")):  # not just another process creating it
                warnings.warn(f"{location.url}: the store's root zarr.json was missing (deleted or damaged); "
                              f"restored for dataset {dataset!r}", stacklevel=2)
        attrs = {
            "format": STORE_FORMAT,
            "schema_version": schema.SCHEMA_VERSION,
            "dataset": dataset,
            "class_names": list(class_names),
            "ignore_index": schema.IGNORE_INDEX,
            "created": _now(),
            **(extra or {}),
        }
        store = cls(location, attrs)
        _call(location, store._ensure_groups)
        _call(location, store._write_json, MARKER, _group_json(attrs))
        return store

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing store; raise StoreError if it is missing, foreign or too new/old."""
        location = open_location(path)
        raw = _get(location, MARKER)
        if raw is None:
            if _call(location, location.exists, f"scenes/{MARKER}") or _call(location, location.children, "scenes"):
                raise StoreError(f"{location.url}: the store's root zarr.json is missing (deleted or damaged); "
                                 "`ws3d validate --repair` or rerunning `ws3d ingest` restores it")
            raise StoreError(f"{location.url}: not a ws3d store (no zarr.json); run `ws3d ingest` first")
        try:
            attrs = dict(json.loads(raw)["attributes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{location.url}: unreadable Zarr metadata: {exc}") from exc
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{location.url}: a Zarr store but not a ws3d store (format={attrs.get('format')!r})")
        if attrs.get("schema_version") != schema.SCHEMA_VERSION:
            raise StoreError(
                f"{location.url}: schema version {attrs.get('schema_version')} but this ws3d reads "
                f"{schema.SCHEMA_VERSION}; re-run the stages or use a matching ws3d"
            )
        return cls(location, attrs)

    @property
    def dataset(self) -> str:
        return self.attrs["dataset"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    def set_attrs(self, **values: Any) -> None:
        """Update root attributes (small metadata only, e.g. resolved configs); the root
        ``zarr.json`` is replaced whole (atomically on a disk)."""
        raw = self.location.get(MARKER)
        root = json.loads(raw) if raw else _group_json(self.attrs)
        root.setdefault("attributes", {}).update(values)
        self._write_json(MARKER, root)
        self.attrs.update(values)

    def _ensure_groups(self) -> None:
        for name in ("scenes", "vocab"):
            key = f"{name}/{MARKER}"
            if not self.location.exists(key):
                self._write_json(key, _group_json({}))

    def _write_json(self, key: str, value: dict[str, Any]) -> None:
        data = json.dumps(value, indent=2).encode()
        if isinstance(self.location, LocalLocation):
            target = self.location.file(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, target)  # never a half-written zarr.json
        else:
            self.location.put(key, data)

    # -- scenes -----------------------------------------------------------------------------
    def scene_dir(self, scene_id: str) -> Path:
        """The folder of a scene (stores in a folder only)."""
        if not isinstance(self.location, LocalLocation):
            raise StoreError(f"{self.url}: a store on object storage has no scene folders")
        return self.location.path / "scenes" / schema.check_scene_id(scene_id)

    def scene_ids(self) -> list[str]:
        """Sorted ids of the scenes whose ingest is complete (marker and points present)."""
        names = [n for n in self.location.children("scenes") if is_node_name(n)]
        if isinstance(self.location, LocalLocation):
            base = self.location.path / "scenes"
            return sorted(n for n in names if (base / n / MARKER).is_file() and (base / n / "points").is_dir())
        loc = self.location

        async def complete(name: str) -> bool:
            a, b = await asyncio.gather(loc.aexists(f"scenes/{name}/{MARKER}"),
                                        loc.aexists(f"scenes/{name}/points/{MARKER}"))
            return a and b

        async def check() -> list[bool]:
            return await gather_limited([complete(n) for n in names])

        return sorted(n for n, ok in zip(names, loc.run(check())) if ok)

    def has_scene(self, scene_id: str) -> bool:
        return self.location.exists(f"scenes/{schema.check_scene_id(scene_id)}/{MARKER}")

    def has_group(self, scene_id: str, group: str) -> bool:
        return self.location.exists(f"scenes/{schema.check_scene_id(scene_id)}/{group}/{MARKER}")

    def _node(self, scene_id: str, stage: str) -> str:
        """The key prefix of a stage's node for a scene (ingest: the scene itself)."""
        base = f"scenes/{schema.check_scene_id(scene_id)}"
        return base if stage == "ingest" else f"{base}/{schema.STAGE_GROUPS[stage][0]}"

    def node_attributes(self, prefix: str) -> dict[str, Any] | None:
        """The attributes of the node at `prefix` (a scene, a stage's group, a vocabulary), or None
        when its zarr.json is absent or does not parse."""
        raw = self.location.get(f"{prefix}/{MARKER}")
        return _attributes(raw)

    def stage_record(self, scene_id: str, stage: str) -> dict[str, Any] | None:
        """The record (config, hash, stats) of a stage's output for a scene, or None if absent."""
        attributes = self.node_attributes(self._node(scene_id, stage))
        return None if attributes is None else attributes.get("ws3d_stage")

    def stage_state(self, scene_id: str, stage: str, config_hash: str | None = None) -> str:
        """What a stage's output for a scene is: ``absent`` (no marker), ``damaged`` (the marker
        is there but a key of its manifest is missing or has another size), ``stale`` (made with
        another config hash than `config_hash`), or ``complete``. The marker and one listing,
        fetched together; no data read."""
        prefix = self._node(scene_id, stage)
        loc = self.location

        async def fetch() -> tuple[bytes | None, dict[str, int]]:
            marker, sizes = await asyncio.gather(loc.aget(f"{prefix}/{MARKER}"), loc.alist_sizes(prefix))
            return marker, sizes

        marker, sizes = loc.run(fetch())
        attributes = _attributes(marker)
        if attributes is None or "ws3d_stage" not in attributes:
            return "absent"
        if self.manifest_problems(prefix, attributes, sizes):
            return "damaged"
        if config_hash is not None and attributes["ws3d_stage"].get("config_hash") != config_hash:
            return "stale"
        return "complete"

    def stage_records(self, scene_id: str, stages: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """The records of several stages of a scene, fetched concurrently (see `stage_record`)."""
        prefixes = [self._node(scene_id, stage) for stage in stages]
        raw = self.location.run(self.location.aget_many(f"{p}/{MARKER}" for p in prefixes))
        out = {}
        for stage, prefix in zip(stages, prefixes):
            attributes = _attributes(raw[f"{prefix}/{MARKER}"])
            out[stage] = None if attributes is None else attributes.get("ws3d_stage")
        return out

    def is_complete(self, scene_id: str, stage: str, config_hash: str) -> bool:
        """True when the stage's output for the scene is whole and was made with `config_hash`."""
        return self.stage_state(scene_id, stage, config_hash) == "complete"

    def manifest_problems(self, prefix: str, attributes: dict[str, Any] | None = None,
                          sizes: dict[str, int] | None = None) -> list[str]:
        """Keys of a node's manifest that are missing or have another size (node-relative, with
        what is wrong); [] for a whole node or one written before manifests. `sizes`: the node's
        listing when the caller has it (keys relative to `prefix`)."""
        if attributes is None:
            attributes = self.node_attributes(prefix) or {}
        manifest = attributes.get(MANIFEST)
        if not manifest:
            return []
        if sizes is None:
            sizes = self.location.list_sizes(prefix)
        problems = []
        for key, size in manifest.items():
            if key not in sizes:
                problems.append(f"{key}: missing")
            elif sizes[key] != size:
                problems.append(f"{key}: {sizes[key]} bytes, written as {size}")
        return problems

    # -- reading ----------------------------------------------------------------------------
    def _zarr_root(self) -> Any:
        if self._zarr is None or self._zarr_pid != os.getpid():
            self._zarr = self.location.zarr_store()
            self._zarr_pid = os.getpid()
        return self._zarr

    async def _array(self, owner: str, key: str, label: str, metadata: dict[str, Any] | None = None) -> Any:
        """The zarr AsyncArray at `key` with checked chunk reads (its metadata given, or read
        from its zarr.json); KeyError when absent."""
        from zarr.core.array import AsyncArray
        from zarr.storage import StorePath

        if metadata is None:
            raw = await self.location.aget(f"{key}/{MARKER}")
            if raw is None:
                raise KeyError(f"{self.url}: {owner} has no {label}")

        def damaged(chunk: str, what: str) -> DamagedDataError:
            return DamagedDataError(owner, f"{self.url}/{key}", f"{label}: chunk {chunk} {what}; "
                                    "`ws3d validate --deep --repair` recomputes it")

        try:
            if metadata is None:
                metadata = json.loads(raw)
            names = [c.get("name") for c in metadata.get("codecs", [])]
            checked, blosc = "crc32c" in names, "blosc" in names
            store = _checked_store(self._zarr_root(), key, checked, blosc, damaged)
            return AsyncArray(metadata=metadata, store_path=StorePath(store, key))
        except Exception as exc:  # any malformed metadata: JSON, fields, codecs
            raise DamagedDataError(owner, f"{self.url}/{key}/{MARKER}",
                                   f"{label}: unreadable zarr.json ({type(exc).__name__}: {exc})") from None

    async def _read(self, owner: str, key: str, label: str, selection: Any = ...,
                    metadata: dict[str, Any] | None = None) -> np.ndarray:
        array = await self._array(owner, key, label, metadata)
        try:
            return np.asarray(await array.getitem(selection))
        except (ValueError, RuntimeError, EOFError) as exc:  # a codec that cannot decode what it was given
            raise DamagedDataError(owner, f"{self.url}/{key}", f"{label}: cannot be decoded "
                                   f"({type(exc).__name__}: {exc}); `ws3d validate --deep --repair` recomputes it") from None

    async def _read_specs(self, scene_id: str, specs: Sequence[ArraySpec], selection: Any = ...) -> list[np.ndarray]:
        """Arrays of a scene: the marker of each stage's node first (one request a node: it must be
        there, and it holds its arrays' metadata), then every array's chunks, all concurrently."""
        stages = sorted({_GROUP_STAGE[spec.group] for spec in specs})
        prefixes = {stage: self._node(scene_id, stage) for stage in stages}
        markers = await asyncio.gather(*(self.location.aget(f"{prefixes[st]}/{MARKER}") for st in stages))
        nodes = dict(zip(stages, (_attributes(m) for m in markers)))

        async def one(spec: ArraySpec) -> np.ndarray:
            label = f"{spec.group}/{spec.name}"
            stage = _GROUP_STAGE[spec.group]
            node = nodes[stage]
            if node is None:
                raise KeyError(f"{self.url}: scene {scene_id} has no {label} (no {stage} output)")
            path = label if stage == "ingest" else spec.name
            metadata = (node.get(ARRAYS) or {}).get(path)  # None: an older store, read its zarr.json
            return await self._read(scene_id, self._key(scene_id, spec), label, selection, metadata)

        return list(await asyncio.gather(*(one(spec) for spec in specs)))

    def _key(self, scene_id: str, spec: ArraySpec) -> str:
        return f"scenes/{schema.check_scene_id(scene_id)}/{spec.group}/{spec.name}"

    def read(self, scene_id: str, spec: ArraySpec) -> np.ndarray:
        """Read one whole array of a scene as NumPy (KeyError naming the path if absent or its
        stage's output is not committed; DamagedDataError naming the scene, array and chunk if a
        chunk fails its check)."""
        return self.location.run(self._read_specs(scene_id, [spec]))[0]

    def read_many(self, scene_id: str, specs: Sequence[ArraySpec]) -> list[np.ndarray]:
        """Read several whole arrays of a scene in one call (like `read` each; the nodes' markers,
        then every chunk, fetched concurrently in zarr's event loop: two round trips in all)."""
        return self.location.run(self._read_specs(scene_id, list(specs)))

    def read_rows(self, scene_id: str, spec: ArraySpec, index: slice | int) -> np.ndarray:
        """Read part of an array along its first axis (e.g. one view)."""
        return self.location.run(self._read_specs(scene_id, [spec], index))[0]

    def array_metadata(self, scene_id: str, spec: ArraySpec) -> dict[str, Any] | None:
        """An array's parsed zarr.json (None when absent; DamagedDataError when it does not parse)."""
        key = self._key(scene_id, spec)
        raw = self.location.get(f"{key}/{MARKER}")
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise DamagedDataError(scene_id, f"{self.url}/{key}/{MARKER}", f"{spec.group}/{spec.name}: "
                                   f"unreadable zarr.json ({exc})") from None

    def shape(self, scene_id: str, spec: ArraySpec) -> tuple[int, ...]:
        """An array's shape, from its metadata (no chunk read)."""
        metadata = self.array_metadata(scene_id, spec)
        if metadata is None:
            raise KeyError(f"{self.url}: scene {scene_id} has no {spec.group}/{spec.name}")
        return tuple(int(n) for n in metadata["shape"])

    def has(self, scene_id: str, spec: ArraySpec) -> bool:
        return self.location.exists(f"{self._key(scene_id, spec)}/{MARKER}")

    def damaged_chunks(self, scene_id: str, spec: ArraySpec) -> list[str]:
        """Every chunk of an array that is missing or fails its check, as ``"<chunk> <what>"``
        (reads each chunk's bytes once, decodes nothing); [] for a sound array."""
        key = self._key(scene_id, spec)
        metadata = self.array_metadata(scene_id, spec)
        if metadata is None:
            return []
        names = [c.get("name") for c in metadata.get("codecs", [])]
        checked, blosc = "crc32c" in names, "blosc" in names
        shape = [int(n) for n in metadata["shape"]]
        chunks = [int(n) for n in metadata["chunk_grid"]["configuration"]["chunk_shape"]]
        separator = metadata.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        grid = [-(-s // c) if c else 0 for s, c in zip(shape, chunks)]
        expected = ["c" + "".join(f"{separator}{i}" for i in index) for index in np.ndindex(*grid)] if all(grid) else []
        if not shape:
            expected = ["c"]
        loc = self.location

        async def check(chunk: str) -> str | None:
            data = await loc.aget(f"{key}/{chunk}")
            if data is None:
                return f"{chunk} is missing" if checked else None
            problem = _chunk_problem(data, checked, blosc)
            return f"{chunk} {problem}" if problem else None

        async def check_all() -> list[str | None]:
            return await gather_limited([check(c) for c in expected], limit=8)

        return [p for p in loc.run(check_all()) if p]

    @staticmethod
    def is_checked(metadata: dict[str, Any]) -> bool:
        """True when an array's chunks carry checksums (written by this version or later)."""
        return any(c.get("name") == "crc32c" for c in metadata.get("codecs", []))

    # -- writing ----------------------------------------------------------------------------
    def write_stage(
        self,
        scene_id: str,
        stage: str,
        arrays: Mapping[ArraySpec, np.ndarray],
        record: dict[str, Any],
        *,
        replace: bool = False,
    ) -> bool:
        """Write a stage's arrays for one scene as one commit; return False when a complete output
        with the same config hash was already there and `replace` is False (another run won).

        `record` (config, config_hash, stats) is stored in the attrs of the stage's node. Arrays
        must belong to the stage's groups; required ones must all be given. `replace` (``--force``,
        repairs) replaces an output even when its config hash is the same. Replacing a scene's
        ingest with the same config hash keeps the scene's other stages (they stay valid);
        another hash drops them (their hashes chain on it).
        """
        schema.check_scene_id(scene_id)
        groups = schema.STAGE_GROUPS[stage]
        for spec in arrays:
            if spec.group not in groups:
                raise ValueError(f"stage {stage} may not write {spec.group}/{spec.name}")
        missing = [f"{s.group}/{s.name}" for s in schema.arrays_of_stage(stage) if not s.optional and s not in arrays]
        if missing:
            raise ValueError(f"stage {stage} for scene {scene_id}: missing arrays {missing}")
        if stage != "ingest" and not self.has_scene(scene_id):
            raise StoreError(f"{self.url}: scene {scene_id} is not ingested; cannot write {stage}")
        full_record = {"stage": stage, "schema_version": schema.SCHEMA_VERSION, "written": _now(), **record}
        attributes = {"ws3d_stage": full_record}
        if stage == "ingest":
            items = [(spec.group, spec, data) for spec, data in arrays.items()]
            own = tuple(groups)
        else:
            items = [("", spec, data) for spec, data in arrays.items()]
            own = None
        return self._commit(self._node(scene_id, stage), attributes, items, full_record.get("config_hash"),
                            replace=replace, own_children=own)

    def write_vocab(self, name: str, text: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store a vocabulary's text embeddings [C, D] and its names/prompts/model in attrs."""
        schema.check_scene_id(name)
        self._commit(f"vocab/{name}", {"ws3d_vocab": attrs}, [("", schema.VOCAB_TEXT, text)], None, replace=True,
                     own_children=None)

    def _commit(self, prefix: str, attributes: dict[str, Any], items: list[tuple[str, ArraySpec, np.ndarray]],
                config_hash: str | None, *, replace: bool, own_children: tuple[str, ...] | None) -> bool:
        """Encode a node and commit it at `prefix` (see the module docstring). `own_children`:
        for a scene (ingest), the child groups the node owns; the others are kept when the
        replaced scene had the same config hash."""
        if isinstance(self.location, LocalLocation):
            return self._commit_local(prefix, attributes, items, config_hash, replace, own_children)
        return self._commit_remote(prefix, attributes, items, config_hash, replace, own_children)

    def _commit_remote(self, prefix, attributes, items, config_hash, replace, own_children) -> bool:
        loc = self.location
        sizes = loc.list_sizes(prefix)  # one listing: is there a marker, and what else is there
        existing = _attributes(loc.get(f"{prefix}/{MARKER}")) if MARKER in sizes else None
        old_hash = (existing or {}).get("ws3d_stage", {}).get("config_hash") if existing else None
        if existing is not None and not replace and config_hash is not None and old_hash == config_hash \
                and not self.manifest_problems(prefix, existing, sizes):
            return False  # another run finished it first
        keep_others = own_children is not None and existing is not None and old_hash == config_hash
        if MARKER in sizes:
            loc.delete(f"{prefix}/{MARKER}")  # uncommitted from here until the new marker
        stale = [k for k in sizes if k != MARKER and (not keep_others or k.split("/", 1)[0] in own_children)]
        if stale:
            loc.run(loc.adelete_keys([f"{prefix}/{k}" for k in stale]))
        root, manifest = _encode(attributes, (), items,
                                 lambda objects: loc.run(loc.aput_many({f"{prefix}/{k}": v for k, v in objects.items()})))
        loc.put(f"{prefix}/{MARKER}", _marker_bytes(root, manifest))
        return True

    def _commit_local(self, prefix, attributes, items, config_hash, replace, own_children) -> bool:
        tmp = self._tmp_path()
        try:
            tmp.mkdir(parents=True)
            local = LocalLocation(tmp)
            root, manifest = _encode(attributes, (), items,
                                     lambda objects: local.run(local.aput_many(objects)))
            (tmp / MARKER).write_bytes(_marker_bytes(root, manifest))
            return self._install(tmp, self.location.file(prefix), prefix, config_hash, replace, own_children)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_if_empty(tmp.parent)

    def _install(self, source: Path, target: Path, prefix: str, config_hash: str | None, replace: bool,
                 own_children: tuple[str, ...] | None) -> bool:
        """Move a finished node folder into place with renames (atomic on POSIX).

        Target absent: one rename. Target there: a whole node with the same config hash is kept
        (another run finished first; False) unless `replace`; otherwise the old node is renamed
        into ``.tmp/`` (for a scene with the same hash, its other stages are moved into the new
        node first), the new one is renamed in, and the old one deleted. A folder without a
        marker (damage, a deleted zarr.json) is replaced like an old node.
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                os.rename(source, target)
                return True
            except OSError:
                if not target.exists():
                    raise
            existing = _attributes(_read_file(target / MARKER))
            old_hash = (existing or {}).get("ws3d_stage", {}).get("config_hash") if existing else None
            whole = existing is not None and not self.manifest_problems(prefix, existing)
            if whole and not replace and config_hash is not None and old_hash == config_hash:
                return False
            if own_children is not None and existing is not None and old_hash == config_hash:
                for child in os.listdir(target):
                    if child not in own_children and child != MARKER and (target / child).is_dir():
                        os.rename(target / child, source / child)
            old = self._tmp_path(".old")
            try:
                os.rename(target, old)
            except FileNotFoundError:  # another writer moved it first: try again
                continue
            try:
                os.rename(source, target)
            except OSError:
                if not target.exists():
                    raise
                continue  # another writer's node arrived in between: decide again
            finally:
                shutil.rmtree(old, ignore_errors=True)
            return True
        raise StoreError(f"{self.url}: could not install {prefix}: other writers kept replacing it")

    def _tmp_path(self, suffix: str = "") -> Path:
        assert isinstance(self.location, LocalLocation)
        return self.location.path / TMP / f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"

    # -- vocabularies -----------------------------------------------------------------------
    def vocab_names(self) -> list[str]:
        names = [n for n in self.location.children("vocab") if is_node_name(n)]
        return [n for n in names if self.location.exists(f"vocab/{n}/{MARKER}")]

    def read_vocab(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        """(text embeddings [C, D], attrs with `names`, `prompts`, `model`)."""
        attributes = self.node_attributes(f"vocab/{schema.check_scene_id(name)}")
        if attributes is None or "ws3d_vocab" not in attributes:
            raise KeyError(f"{self.url}: no vocabulary {name!r}; run `ws3d embed` (known: {self.vocab_names()})")
        text = self.location.run(self._read(f"vocab/{name}", f"vocab/{name}/text", "text"))
        return text, dict(attributes["ws3d_vocab"])

    # -- leftovers of killed runs -----------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Keys of what killed runs left behind (a disk: ``.tmp/*`` and legacy ``scenes/.trash-*``),
        whether or not their process is gone."""
        out = [f"{TMP}/{n}" for n in self.location.children(TMP)] if self.local else []
        return out + [f"scenes/{n}" for n in self.location.children("scenes") if n.startswith(".trash-")]

    def clean_leftovers(self, *, everything: bool = False) -> list[str]:
        """Remove leftovers of killed runs; return their keys. A temporary folder is removed when
        its process (named in it) is gone from this host, when it is older than `STALE_TMP_S`
        (another host's, or a reused process id), or when it comes from an older ws3d (no process
        in its name); `everything` removes all (only when no run is writing). Legacy
        ``scenes/.trash-*`` folders always go."""
        removed = []
        now = time.time()
        for key in self.leftovers():
            name = key.split("/", 1)[1]
            if not everything and key.startswith(TMP + "/"):
                parts = name.rsplit("-", 2)
                if len(parts) == 3 and parts[1].isdigit():
                    host, pid = parts[0], int(parts[1])
                    path = self.location.file(key) if isinstance(self.location, LocalLocation) else None
                    age = now - path.stat().st_mtime if path is not None and path.exists() else 0.0
                    if age < STALE_TMP_S and (host != _host() or _pid_alive(pid)):
                        continue  # a writer at work (or one on another host, not yet stale)
            self.location.delete_prefix(key)
            self.location.delete(key)
            removed.append(key)
        if isinstance(self.location, LocalLocation):
            _remove_if_empty(self.location.path / TMP)
        return removed

    def clean_tmp(self) -> None:
        """Remove every temporary folder (safe only when no run is active)."""
        self.clean_leftovers(everything=True)


def _call(location: Location, fn: Callable[..., Any], *args: Any) -> Any:
    """A location call that turns what an unreachable store raises into a StoreError."""
    try:
        return fn(*args)
    except (UserError, KeyError):
        raise
    except Exception as exc:  # the driver's errors: credentials, endpoint, bucket, network
        raise StoreError(f"{location.url}: cannot reach the store ({type(exc).__name__}: {exc}); "
                         "see docs/datasets.md, 'Stores on object storage'") from None


def _get(location: Location, key: str) -> bytes | None:
    return _call(location, location.get, key)


def _attributes(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return dict(value.get("attributes") or {})
    except (ValueError, AttributeError, TypeError):
        return None


def _group_json(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": attributes, "zarr_format": 3, "consolidated_metadata": None, "node_type": "group"}


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def is_node_name(name: str) -> bool:
    """A scene or vocabulary name (not a group's zarr.json, a leftover or a stray file)."""
    if name == MARKER:
        return False
    try:
        schema.check_scene_id(name)
        return True
    except ValueError:
        return False


def _scene_datasets(location: Location) -> set[str]:
    """The datasets named by the ingest records of a store's scenes (a few are enough)."""
    names = [n for n in location.children("scenes") if is_node_name(n)][:16]
    found = set()
    for name in names:
        record = (_attributes(location.get(f"scenes/{name}/{MARKER}")) or {}).get("ws3d_stage") or {}
        dataset = (record.get("config") or {}).get("dataset")
        if dataset:
            found.add(dataset)
    return found


def _remove_if_empty(folder: Path) -> None:
    try:  # another writer may still use it: then it is not empty
        folder.rmdir()
    except OSError:
        pass


def log_dir(store_path: str | Path) -> Path:
    """Where the stage logs of a store in a folder go: ``<store>.logs/`` beside it (created).

    Not inside the store: Zarr warns about every file there that is not a node of the hierarchy
    (``ZarrUserWarning: Object at logs is not recognized...``). A ``logs/`` folder that older
    versions left inside the store is moved out here the first time.
    """
    store_path = Path(store_path)
    target = store_path.with_name(store_path.name + ".logs")
    old = store_path / "logs"
    if old.is_dir() and not (old / "zarr.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        for item in old.iterdir():
            dest = target / item.name
            if dest.exists() and item.is_file():  # both have a log of this stage: keep the old lines first
                dest.write_text(item.read_text() + dest.read_text())
                item.unlink()
            else:
                shutil.move(str(item), str(dest))
        old.rmdir()
    target.mkdir(parents=True, exist_ok=True)
    return target


def append_log(store: str | Path, name: str, text: str) -> str:
    """Append `text` to the log `name` of a store: ``<store>.logs/<name>`` beside it, in a folder
    or on object storage (read, append, write: logs are written by the driver of a run only).
    Returns where it went."""
    location = open_location(store)
    if isinstance(location, LocalLocation):
        path = log_dir(location.path) / name
        with path.open("a") as handle:
            handle.write(text)
        return str(path)
    logs = location.sibling(".logs")
    old = logs.get(name) or b""
    logs.put(name, old + text.encode())
    return f"{logs.url}/{name}"


def same_store(a: str | Path, b: str | Path) -> bool:
    """True when two paths or URLs name the same store."""
    return canonical(a) == canonical(b)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

