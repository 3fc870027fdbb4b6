"""The scene store: a Zarr v3 hierarchy on a local or shared POSIX file system.

Reads and writes the arrays declared in `pipeline.schema`; nothing else in the project opens
array paths. Writes are atomic per stage and scene: a stage's groups are written into a private
temporary directory under `<store>/.tmp/` and renamed into place when whole. A rename is atomic
on POSIX file systems, so a reader (or a second run on the same store) sees either nothing or
the whole group; two runs racing on one scene both compute it, the first rename wins and the
loser discards its copy. No lock files, so nothing is left locked when a worker is killed (locks
on NFS/Lustre are unreliable anyway); the price is occasionally duplicated work.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.storage import LocalStore

from pipeline import schema
from pipeline.errors import UserError
from pipeline.schema import ArraySpec

STORE_FORMAT = "ws3d-store"


class StoreError(UserError, RuntimeError):
    """A store that is missing, foreign, or from an incompatible schema version."""


def _compressors(spec: ArraySpec) -> list[Any]:
    # blosc with byte shuffle: zstd gives good ratios on point data; lz4 (level 1) writes the
    # bulky rendered images several times faster at a slightly larger size.
    shuffle = BloscShuffle.shuffle if np.dtype(spec.dtype).itemsize > 1 else BloscShuffle.noshuffle
    level = 3 if spec.codec == "zstd" else 1
    return [BloscCodec(cname=spec.codec, clevel=level, shuffle=shuffle)]


_BATCH_BYTES = 256 << 20
"""Arrays are encoded in memory in batches of about this many raw bytes (see `_write_arrays`)."""


def _write_arrays(root: Path, attributes: dict[str, Any], arrays: Mapping[ArraySpec, np.ndarray],
                  group_attributes: Mapping[str, dict[str, Any]] | None = None) -> None:
    """Write a new Zarr hierarchy under the directory `root`: root attributes, `arrays` in their
    groups, and `group_attributes` {group: attrs}.

    Zarr encodes everything (metadata, chunks, codecs) into a `MemoryStore`, all arrays of a
    batch in one event-loop call, and the encoded objects are then written as the files they are
    in a `LocalStore` (a key is a path relative to the root). A `LocalStore` hands every file
    to a worker thread and back: ~7 ms an array on two shared cores, most of a render write's
    time (8 arrays). A batch holds ~`_BATCH_BYTES` of raw data, so memory stays bounded.
    """
    import asyncio

    from zarr.core.sync import sync
    from zarr.storage import MemoryStore

    # batches by the size each array has in its stored dtype; each is cast when its batch is
    # written, so at most one batch of cast copies exists at a time
    batches: list[list[tuple[ArraySpec, np.ndarray]]] = [[]]
    size = 0
    for spec, data in arrays.items():
        nbytes = np.dtype(spec.dtype).itemsize * int(np.size(data))
        if batches[-1] and size + nbytes > _BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((spec, data))
        size += nbytes
    group_names = sorted({spec.group for spec in arrays} | set(group_attributes or {}))

    async def encode(batch: list[tuple[ArraySpec, np.ndarray]], first: bool, objects: dict[str, Any]) -> None:
        api = zarr.api.asynchronous
        store = MemoryStore(objects)
        if first:  # the root and every group, once
            top = await api.open_group(store=store, mode="w", attributes=attributes)
            for name in group_names:
                await top.create_group(name, attributes=(group_attributes or {}).get(name, {}))
        groups = {name: await api.open_group(store=store, path=name, mode="r+")
                  for name in {spec.group for spec, _ in batch}}
        coerced = [(spec, schema.coerce(spec, data)) for spec, data in batch]
        await asyncio.gather(*(groups[spec.group].create_array(
            spec.name, data=data, chunks=tuple(max(1, c) for c in spec.chunks(data.shape)),
            compressors=_compressors(spec), fill_value=0, dimension_names=[str(d) for d in spec.dims],
        ) for spec, data in coerced))

    made: set[Path] = set()
    for k, batch in enumerate(batches):
        objects: dict[str, Any] = {}
        if k > 0:  # later batches add arrays to groups already on disk: their metadata from there
            for key in ["zarr.json", *(f"{name}/zarr.json" for name in {spec.group for spec, _ in batch})]:
                objects[key] = _memory_buffer((root / key).read_bytes())
        preloaded = set(objects)
        sync(encode(batch, k == 0, objects))
        for key, buffer in objects.items():
            if key in preloaded:  # already on disk
                continue
            path = root / key
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            with open(path, "wb") as f:
                f.write(buffer.as_numpy_array().data)


def _memory_buffer(data: bytes) -> Any:
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


class Store:
    """A ws3d store. Open with `Store.open` (existing) or `Store.create` (new or existing)."""

    def __init__(self, path: str | Path, attrs: dict[str, Any]):
        self.path = Path(path)
        self.attrs = attrs

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, *, dataset: str, class_names: list[str], extra: dict[str, Any] | None = None
    ) -> "Store":
        """Create a store (or open it if it already exists for the same dataset and classes)."""
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls.open(path)
            if store.dataset != dataset or list(store.class_names) != list(class_names):
                raise StoreError(
                    f"{path}: holds dataset {store.dataset!r} with classes {store.class_names}; "
                    f"refusing to mix in {dataset!r}. Use another --store."
                )
            return store
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: exists, is not empty and is not a ws3d store")
        attrs = {
            "format": STORE_FORMAT,
            "schema_version": schema.SCHEMA_VERSION,
            "dataset": dataset,
            "class_names": list(class_names),
            "ignore_index": schema.IGNORE_INDEX,
            "created": _now(),
            **(extra or {}),
        }
        root = zarr.open_group(LocalStore(path), mode="w", attributes=attrs)
        root.require_group("scenes")
        root.require_group("vocab")
        return cls(path, attrs)

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing store; raise StoreError if it is missing, foreign or too new/old."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a ws3d store (no zarr.json); run `ws3d ingest` first")
        try:
            root = zarr.open_group(LocalStore(path, read_only=True), mode="r")
            attrs = dict(root.attrs)
        except Exception as exc:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{path}: unreadable Zarr metadata: {exc}") from exc
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: a Zarr store but not a ws3d store (format={attrs.get('format')!r})")
        if attrs.get("schema_version") != schema.SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {attrs.get('schema_version')} but this ws3d reads "
                f"{schema.SCHEMA_VERSION}; re-run the stages or use a matching ws3d"
            )
        return cls(path, attrs)

    @property
    def dataset(self) -> str:
        return self.attrs["dataset"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    def set_attrs(self, **values: Any) -> None:
        """Update root attributes (small metadata only, e.g. resolved configs)."""
        root = zarr.open_group(LocalStore(self.path), mode="r+")
        root.attrs.update(values)
        self.attrs.update(values)

    # -- scenes -----------------------------------------------------------------------------
    def scene_dir(self, scene_id: str) -> Path:
        return self.path / "scenes" / schema.check_scene_id(scene_id)

    def scene_ids(self) -> list[str]:
        """Sorted ids of the scenes whose ingest is complete."""
        base = self.path / "scenes"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "zarr.json").is_file() and (p / "points").is_dir())

    def has_scene(self, scene_id: str) -> bool:
        return (self.scene_dir(scene_id) / "zarr.json").is_file()

    def has_group(self, scene_id: str, group: str) -> bool:
        return (self.scene_dir(scene_id) / group / "zarr.json").is_file()

    def stage_record(self, scene_id: str, stage: str) -> dict[str, Any] | None:
        """The record (config, hash, stats) of a stage's output for a scene, or None if absent."""
        group = "" if stage == "ingest" else schema.STAGE_GROUPS[stage][0]
        target = self.scene_dir(scene_id) / group
        if not (target / "zarr.json").is_file():
            return None
        node = zarr.open_group(LocalStore(target, read_only=True), mode="r")
        attrs = dict(node.attrs)
        return attrs.get("ws3d_stage")

    def is_complete(self, scene_id: str, stage: str, config_hash: str) -> bool:
        """True when the stage's output for the scene exists and was made with `config_hash`."""
        record = self.stage_record(scene_id, stage)
        return record is not None and record.get("config_hash") == config_hash

    def _array_dir(self, scene_id: str, spec: ArraySpec) -> Path:
        """The folder of a stored array (KeyError naming the path if absent)."""
        array_dir = self.scene_dir(scene_id) / spec.group / spec.name
        if not (array_dir / "zarr.json").is_file():
            raise KeyError(f"{self.path}: scene {scene_id} has no {spec.group}/{spec.name}")
        return array_dir

    def read(self, scene_id: str, spec: ArraySpec) -> np.ndarray:
        """Read one whole array of a scene as NumPy (KeyError naming the path if absent)."""
        return zarr.open_array(LocalStore(self._array_dir(scene_id, spec), read_only=True), mode="r")[...]

    def read_many(self, scene_id: str, specs: Sequence[ArraySpec]) -> list[np.ndarray]:
        """Read several whole arrays of a scene in one call (like `read` each; the arrays are
        opened and read concurrently in zarr's event loop: one round trip, not one an array)."""
        import asyncio

        from zarr.core.sync import sync

        dirs = [self._array_dir(scene_id, spec) for spec in specs]

        async def read_one(array_dir: Path) -> np.ndarray:
            array = await zarr.api.asynchronous.open_array(store=LocalStore(array_dir, read_only=True), mode="r")
            return await array.getitem(...)

        async def read_all() -> list[np.ndarray]:
            return list(await asyncio.gather(*(read_one(d) for d in dirs)))

        return [np.asarray(a) for a in sync(read_all())]

    def read_rows(self, scene_id: str, spec: ArraySpec, index: slice | int) -> np.ndarray:
        """Read part of an array along its first axis (e.g. one view)."""
        array_dir = self.scene_dir(scene_id) / spec.group / spec.name
        return zarr.open_array(LocalStore(array_dir, read_only=True), mode="r")[index]

    def shape(self, scene_id: str, spec: ArraySpec) -> tuple[int, ...]:
        array_dir = self.scene_dir(scene_id) / spec.group / spec.name
        return tuple(zarr.open_array(LocalStore(array_dir, read_only=True), mode="r").shape)

    def has(self, scene_id: str, spec: ArraySpec) -> bool:
        return (self.scene_dir(scene_id) / spec.group / spec.name / "zarr.json").is_file()

    # -- writing ----------------------------------------------------------------------------
    def _tmp_dir(self) -> Path:
        tmp = self.path / ".tmp" / f"{uuid.uuid4().hex}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        return tmp

    def write_stage(
        self,
        scene_id: str,
        stage: str,
        arrays: Mapping[ArraySpec, np.ndarray],
        record: dict[str, Any],
    ) -> bool:
        """Write a stage's arrays for one scene atomically; return False if another run won.

        `record` (config, config_hash, stats) is stored in the attrs of the stage's group.
        Arrays must belong to the stage's groups; required ones must all be given.
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
            raise StoreError(f"{self.path}: scene {scene_id} is not ingested; cannot write {stage}")
        full_record = {"stage": stage, "schema_version": schema.SCHEMA_VERSION, "written": _now(), **record}
        tmp = self._tmp_dir()
        try:
            attrs = {"ws3d_stage": full_record}
            if stage == "ingest":
                _write_arrays(tmp, attrs, arrays)
                source = tmp
                target = self.scene_dir(scene_id)
            else:
                # the temporary root holds one group (the stage's); that group is what moves
                (group,) = groups
                _write_arrays(tmp, attrs, arrays, {group: attrs})
                source = tmp / group
                target = self.scene_dir(scene_id) / group
            return _install(source, target, full_record.get("config_hash"))
        finally:
            _drop_tmp(tmp)

    def write_vocab(self, name: str, text: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store a vocabulary's text embeddings [C, D] and its names/prompts/model in attrs."""
        schema.check_scene_id(name)
        tmp = self._tmp_dir()
        try:
            root = zarr.open_group(LocalStore(tmp), mode="w", attributes={"ws3d_vocab": attrs})
            data = schema.coerce(schema.VOCAB_TEXT, text)
            root.create_array(
                "text", shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                compressors=_compressors(schema.VOCAB_TEXT), fill_value=0,
            )[...] = data
            _install(tmp, self.path / "vocab" / name, None, replace=True)
        finally:
            _drop_tmp(tmp)

    def vocab_names(self) -> list[str]:
        base = self.path / "vocab"
        return sorted(p.name for p in base.iterdir() if (p / "zarr.json").is_file()) if base.is_dir() else []

    def read_vocab(self, name: str) -> tuple[np.ndarray, dict[str, Any]]:
        """(text embeddings [C, D], attrs with `names`, `prompts`, `model`)."""
        target = self.path / "vocab" / name
        if not (target / "zarr.json").is_file():
            raise KeyError(f"{self.path}: no vocabulary {name!r}; run `ws3d embed` (known: {self.vocab_names()})")
        root = zarr.open_group(LocalStore(target, read_only=True), mode="r")
        return root["text"][...], dict(root.attrs)["ws3d_vocab"]

    def clean_tmp(self) -> None:
        """Remove temporary directories left by killed runs (safe only when no run is active)."""
        shutil.rmtree(self.path / ".tmp", ignore_errors=True)


def log_dir(store_path: str | Path) -> Path:
    """Where the stage logs of a store go: ``<store>.logs/`` beside it (created).

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


def _install(source: Path, target: Path, config_hash: str | None, *, replace: bool = False) -> bool:
    """Move a finished directory into place atomically.

    If `target` exists: same config hash -> keep it (another run finished first, return False);
    otherwise move the old one aside, rename the new one in, delete the old one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
        return True
    except OSError:
        if not target.exists():
            raise
    if not replace and config_hash is not None:
        existing = zarr.open_group(LocalStore(target, read_only=True), mode="r")
        if dict(existing.attrs).get("ws3d_stage", {}).get("config_hash") == config_hash:
            return False
    trash = target.parent / f".trash-{target.name}-{uuid.uuid4().hex[:8]}"
    os.rename(target, trash)
    try:
        os.rename(source, target)
    except OSError:
        os.rename(trash, target) if not target.exists() else None
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _drop_tmp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # leave no empty .tmp behind (another writer may still use it: then it is not empty)
        tmp.parent.rmdir()
    except OSError:
        pass


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
