"""The run folder: one module that knows its layout, writes its label space and reads it back.

A training run (``ws3d pretrain`` / ``ws3d finetune --out RUN``) is one folder::

    RUN/config.yaml               the resolved config (written by the loop)
    RUN/metrics.jsonl             one record per logged step (ws3d_train.logging)
    RUN/checkpoints/step_*.pt     checkpoints (ws3d_train.checkpoint); the config inside too
    RUN/labels.json               the label space (:class:`LabelSpace`): class names, dataset,
                                  open-vocabulary split (spec and ids), the vocabulary it came
                                  from, its prompt templates and the CLIP model that embedded it
    RUN/text.npy                  [C, D] float32 text embeddings of the class names (row c = class c)
    RUN/eval/<store>.<split>.json one file per evaluated store and split (:func:`eval_path`)
    RUN/query_<text>_<scene>.ply  query heatmaps by default (:func:`query_path`)

The label space travels with the run, so evaluation, prediction, queries, reports and the viewer
work on another store of the same dataset (e.g. its test split preprocessed later, without an
``embed`` stage) without re-embedding anything. Runs written before ``labels.json`` existed still
load: their class names and split come from the checkpoint and their text embeddings from the
store's vocabulary.

For a viewer or any other reader, the API is:

- :func:`open_run` ``(path) -> RunInfo``: what the folder holds (checkpoint, step, config, label
  space) without building a network;
- :func:`load_run` ``(path, device=...) -> LoadedRun``: the same plus the network in eval mode;
- :func:`resolve_classes` ``(run, store) -> ClassSetup``: class names, text embeddings on the run's
  device and the base/novel/ignored split a prediction chooses among.

Reads checkpoints, ``labels.json``/``text.npy``, the store's vocabulary and the manifests (split
names); writes only ``labels.json`` and ``text.npy`` (:func:`write_label_space`).
"""
from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import datasets
from pipeline.config import ConfigError, from_dict
from pipeline.store import Store
from ws3d_train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ws3d_train.data.dataset import DataConfig, read_scene_list
from ws3d_train.network import MinkUNet, NetworkConfig, build_network

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LABELS_FILE",
    "TEXT_FILE",
    "ClassSetup",
    "LabelSpace",
    "LoadedRun",
    "RunInfo",
    "eval_path",
    "find_checkpoint",
    "label_space_from_store",
    "load_run",
    "model_source",
    "open_run",
    "query_path",
    "read_label_space",
    "gt_to_run_classes",
    "has_split",
    "resolve_classes",
    "resolve_ov_split",
    "run_classes",
    "resolve_scene_ids",
    "run_dir_of",
    "write_label_space",
]

CHECKPOINT_DIR = "checkpoints"
"""Checkpoints live in ``<run>/checkpoints/step_*.pt``."""
CONFIG_FILE = "config.yaml"
"""The resolved config of a run, ``<run>/config.yaml``."""
LABELS_FILE = "labels.json"
"""The run's label space, ``<run>/labels.json``."""
TEXT_FILE = "text.npy"
"""The run's class text embeddings, ``<run>/text.npy``."""
LABELS_FORMAT = 1
"""Bumped when the content of ``labels.json`` changes."""


# ---------------------------------------------------------------------------------------------
# the label space


@dataclass(frozen=True, eq=False)
class LabelSpace:
    """The classes a run was trained with and how it names them in CLIP space."""

    class_names: tuple[str, ...]
    """The C class names (ids are positions)."""
    dataset: str
    """The store's dataset (for manifest split names)."""
    base_ids: tuple[int, ...] | None
    """Classes the semantic head was supervised on; None for a pre-training run (head untrained)."""
    novel_ids: tuple[int, ...] = ()
    """Classes of the open-vocabulary split only the CLIP head can name."""
    ignored_ids: tuple[int, ...] = ()
    """Classes of the split neither trained, predicted nor evaluated."""
    ov_split: str | None = None
    """The split as given (a manifest name like ``b15n4`` or ``novel=...``), None without one."""
    vocab: str = "classes"
    """The store vocabulary the text embeddings were copied from."""
    text: np.ndarray | None = None
    """[C, D] float32 text embedding per class (row c = class c); None when not recorded."""
    text_model: str = ""
    """Identity of the CLIP model that embedded the text (``dir:<folder>:<hashes>`` or ``hub:<id>``)."""
    prompts: tuple[str, ...] = ()
    """Prompt templates the class names were embedded with."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else recorded (e.g. the init checkpoint)."""

    def names_of(self, ids: Sequence[int]) -> list[str]:
        return [self.class_names[i] for i in ids]


def label_space_from_store(
    store: Store,
    *,
    vocab: str = "classes",
    base_ids: Sequence[int] | None,
    novel_ids: Sequence[int] = (),
    ignored_ids: Sequence[int] = (),
    ov_split: str | None = None,
    extra: dict[str, Any] | None = None,
) -> LabelSpace:
    """The label space of a run trained on ``store`` with its vocabulary ``vocab``.

    ``base_ids`` None marks a pre-training run: then a vocabulary that does not name every class
    is recorded without text embeddings instead of raising.

    Raises:
        ConfigError: the vocabulary is missing or (for a fine-tuning run) lacks a class name.
    """
    names = tuple(store.class_names)
    try:
        text, attrs = store.read_vocab(vocab)
    except KeyError as exc:
        raise ConfigError(str(exc).strip("'\"")) from exc
    try:
        rows = _vocab_rows(names, list(attrs.get("names") or []), text.shape[0], f"{store.path}: vocabulary {vocab!r}")
        class_text = np.asarray(text, np.float32)[rows]
    except ConfigError:
        if base_ids is not None:
            raise
        class_text = None  # a pre-training vocabulary need not name the store's classes
    return LabelSpace(
        class_names=names,
        dataset=store.dataset,
        base_ids=tuple(int(i) for i in base_ids) if base_ids is not None else None,
        novel_ids=tuple(int(i) for i in novel_ids),
        ignored_ids=tuple(int(i) for i in ignored_ids),
        ov_split=ov_split,
        vocab=vocab,
        text=class_text,
        text_model=str(attrs.get("model") or ""),
        prompts=tuple(str(p) for p in attrs.get("prompts") or ()),
        extra=dict(extra or {}),
    )


def _vocab_rows(names: Sequence[str], vocab_names: list[str], rows: int, where: str) -> np.ndarray:
    """Row of each class name in a vocabulary (rows in class order when it records no names)."""
    if vocab_names == list(names) or (not vocab_names and rows == len(names)):
        return np.arange(len(names))
    missing = [n for n in names if n not in vocab_names]
    if missing:
        raise ConfigError(f"{where} has no text embedding for classes {missing}")
    return np.array([vocab_names.index(n) for n in names])


def write_label_space(run_dir: str | Path, labels: LabelSpace) -> Path:
    """Write ``labels.json`` (and ``text.npy`` when there are embeddings) into the run folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "format": LABELS_FORMAT,
        "class_names": list(labels.class_names),
        "dataset": labels.dataset,
        "base_ids": list(labels.base_ids) if labels.base_ids is not None else None,
        "novel_ids": list(labels.novel_ids),
        "ignored_ids": list(labels.ignored_ids),
        "base": labels.names_of(labels.base_ids or ()),
        "novel": labels.names_of(labels.novel_ids),
        "ignored": labels.names_of(labels.ignored_ids),
        "ov_split": labels.ov_split,
        "vocab": labels.vocab,
        "text_model": labels.text_model,
        "prompts": list(labels.prompts),
        "text_file": TEXT_FILE if labels.text is not None else None,
        "extra": labels.extra,
    }
    if labels.text is not None:
        text = np.asarray(labels.text, np.float32)
        if text.shape[0] != len(labels.class_names):
            raise ValueError(f"{run_dir}: {text.shape[0]} text rows for {len(labels.class_names)} classes")
        buffer = io.BytesIO()
        np.save(buffer, text, allow_pickle=False)
        atomic_write(run_dir / TEXT_FILE, buffer.getvalue())
    path = run_dir / LABELS_FILE
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file under a temporary name and rename it into place (no half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def read_label_space(run_dir: str | Path) -> LabelSpace | None:
    """The label space recorded in a run folder; None when it has no ``labels.json`` (older runs).

    Raises:
        CheckpointError naming the file when it is unreadable or inconsistent.
    """
    run_dir = Path(run_dir)
    path = run_dir / LABELS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        names = tuple(record["class_names"])
        text = None
        if record.get("text_file"):
            text = np.load(run_dir / record["text_file"], allow_pickle=False).astype(np.float32)
            if text.ndim != 2 or text.shape[0] != len(names):
                raise ValueError(f"text embeddings of shape {text.shape} for {len(names)} classes")
        return LabelSpace(
            class_names=names,
            dataset=str(record.get("dataset", "")),
            base_ids=tuple(record["base_ids"]) if record.get("base_ids") is not None else None,
            novel_ids=tuple(record.get("novel_ids") or ()),
            ignored_ids=tuple(record.get("ignored_ids") or ()),
            ov_split=record.get("ov_split"),
            vocab=str(record.get("vocab") or "classes"),
            text=text,
            text_model=str(record.get("text_model") or ""),
            prompts=tuple(record.get("prompts") or ()),
            extra=dict(record.get("extra") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable label space: {exc}") from exc


_DIR_IDENTITY = re.compile(r"^dir:(.*?):[0-9a-f]{16}(?:/|$)")


def model_source(identity: str) -> str:
    """The folder or hub id of a recorded model identity (``dir:<folder>:<hashes>``, ``hub:<id>``
    or a plain folder/id); empty for an empty identity."""
    if identity.startswith("dir:"):
        match = _DIR_IDENTITY.match(identity)
        return match.group(1) if match else identity[4:]
    if identity.startswith("hub:"):
        return identity[4:]
    return identity


# ---------------------------------------------------------------------------------------------
# finding and loading a run


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a run directory (latest of ``<run>/checkpoints/`` or of the
    directory itself) or a checkpoint path.

    Raises:
        CheckpointError naming the path when there is none.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for directory in (path / CHECKPOINT_DIR, path):
            found = latest_checkpoint(directory)
            if found is not None:
                return found
        raise CheckpointError(f"{path}: a directory without checkpoints (expected {CHECKPOINT_DIR}/step_*.pt)")
    raise CheckpointError(f"{path}: no such run directory or checkpoint")


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint file (``RUN/checkpoints/step_*.pt`` -> ``RUN``)."""
    parent = Path(checkpoint).parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


@dataclass(frozen=True, eq=False)
class RunInfo:
    """What a run folder holds, without a network."""

    path: Path
    """The run folder."""
    checkpoint: Path
    """The checkpoint used (the latest unless a file was given)."""
    step: int
    """Optimiser steps of that checkpoint."""
    config: dict[str, Any]
    """The run's resolved config (plain dict)."""
    labels: LabelSpace | None
    """The label space; from ``labels.json``, else rebuilt from the checkpoint without text
    embeddings (older runs), else None (a pre-training run from before ``labels.json``)."""

    @property
    def store(self) -> str | None:
        """The store the run trained on (its config's ``store``)."""
        return self.config.get("store") or None


def _info_from(path: Path, ckpt: dict[str, Any]) -> RunInfo:
    run_dir = run_dir_of(path)
    labels = read_label_space(run_dir)
    if labels is None:
        info = (ckpt.get("extra") or {}).get("finetune") or {}
        if "class_names" in info:
            labels = LabelSpace(
                class_names=tuple(info["class_names"]),
                dataset="",
                base_ids=tuple(info["base_ids"]) if "base_ids" in info else None,
                novel_ids=tuple(info.get("novel_ids", ())),
                ignored_ids=tuple(info.get("ignored_ids", ())),
                ov_split=(ckpt.get("config") or {}).get("ov_split"),
                vocab=str((ckpt.get("config") or {}).get("vocab") or "classes"),
            )
    return RunInfo(path=run_dir, checkpoint=path, step=int(ckpt["step"]), config=dict(ckpt["config"]), labels=labels)


def open_run(run: str | Path) -> RunInfo:
    """Read what a run folder (or checkpoint file) holds, without building its network.

    Raises:
        CheckpointError naming the path: no checkpoint, one of another format/schema, or an
            unreadable ``labels.json``.
    """
    path = find_checkpoint(run)
    return _info_from(path, load_checkpoint(path, map_location="cpu"))


@dataclass(frozen=True, eq=False)
class LoadedRun:
    """A network with the config and label space it was trained with, ready for inference."""

    model: MinkUNet
    """The network in eval mode on `device`."""
    checkpoint: Path
    """The checkpoint file it came from."""
    step: int
    """Optimiser steps of that checkpoint."""
    config: dict[str, Any]
    """The run's resolved config (plain dict)."""
    data: DataConfig
    """The run's data config (voxel size, input features)."""
    class_names: tuple[str, ...] | None
    """Class names of a fine-tuning run; None for a pre-training run."""
    base_ids: tuple[int, ...] | None
    """Supervised classes of a fine-tuning run (None: not recorded / pre-training)."""
    novel_ids: tuple[int, ...]
    """Novel classes of the run's open-vocabulary split (empty without one)."""
    ignored_ids: tuple[int, ...]
    """Ignored classes of the run's open-vocabulary split."""
    device: torch.device
    """Where the model runs."""
    labels: LabelSpace | None = None
    """The run's label space (see :class:`RunInfo`)."""
    path: Path | None = None
    """The run folder."""
    threads: int = 0
    """torch intra-op threads inference runs on (a CPU): the run's own ``threads`` as training set
    them (:func:`ws3d_train.device.set_torch_threads`); 0 on a GPU."""


def load_run(run: str | Path | LoadedRun, *, device: str = "auto", threads: int | None = None) -> LoadedRun:
    """Load a run directory (its latest checkpoint) or a checkpoint file for inference.

    On a CPU, torch's thread count is set as the run's training set it: ``threads``, else the
    run config's ``threads``, else OMP_NUM_THREADS or the cores available
    (:func:`ws3d_train.device.set_torch_threads`); inference puts it back before every forward.

    Raises:
        CheckpointError naming the path: no checkpoint, or one of another format/schema.
    """
    if isinstance(run, LoadedRun):
        return run
    from ws3d_train.device import resolve_device, set_torch_threads

    path = find_checkpoint(run)
    torch_device = resolve_device(device)
    ckpt = load_checkpoint(path, map_location="cpu")
    info = _info_from(path, ckpt)
    config = info.config
    network = from_dict(NetworkConfig, config["network"], where=f"{path}:network")
    model = build_network(network)
    model.load_state_dict(ckpt["model"])
    model = model.to(torch_device).eval()
    data = from_dict(DataConfig, config["data"], where=f"{path}:data")
    labels = info.labels
    supervised = labels is not None and labels.base_ids is not None
    used_threads = 0
    if torch_device.type == "cpu":
        wanted = threads if threads is not None else int(config.get("threads") or 0)
        used_threads = set_torch_threads(wanted)
    return LoadedRun(
        model=model,
        checkpoint=path,
        step=info.step,
        config=config,
        data=data,
        class_names=labels.class_names if supervised else None,
        base_ids=labels.base_ids if supervised else None,
        novel_ids=labels.novel_ids if supervised else (),
        ignored_ids=labels.ignored_ids if supervised else (),
        device=torch_device,
        labels=labels,
        path=info.path,
        threads=used_threads,
    )


# ---------------------------------------------------------------------------------------------
# classes of a prediction


@dataclass(frozen=True, eq=False)
class ClassSetup:
    """The classes a prediction chooses among, and their text embeddings."""

    class_names: tuple[str, ...]
    """The store's C class names."""
    text: torch.Tensor
    """[C, D] float32 text embedding of each class."""
    base_ids: tuple[int, ...]
    """Classes the semantic head was supervised on."""
    novel_ids: tuple[int, ...]
    """Classes only the CLIP head can name."""
    ignored_ids: tuple[int, ...]
    """Classes neither predicted nor evaluated."""
    text_source: str = ""
    """Where the text embeddings came from: ``run`` (the run folder) or ``store:<vocab>``."""

    @property
    def has_split(self) -> bool:
        return bool(self.novel_ids)


def resolve_classes(
    run: LoadedRun, store: Store, *, vocab: str | None = None, ov_split: str | None = None
) -> ClassSetup:
    """Class names, text embeddings and the base/novel/ignored split for predictions.

    ``vocab``: None takes the run's own text embeddings when the run folder has them, else the
    store's ``classes`` vocabulary; a name reads that vocabulary of the store. ``ov_split``: None
    takes the run's own split (none for a pre-training run); ``"none"`` drops it; anything else is
    resolved by :func:`resolve_ov_split`.

    Raises:
        ConfigError: the store has other classes than the run, no vocabulary is available, the
            vocabulary lacks a class name, or widths differ.
    """
    names = tuple(store.class_names)
    labels = run.labels
    trained = labels.class_names if labels is not None else run.class_names
    if trained is not None and tuple(trained) != names:
        if vocab is None and labels is not None and labels.text is not None:
            # a store of one's own scans with another class list: predict in the run's label space
            return run_classes(run, ov_split=ov_split)
        raise ConfigError(
            f"{run.checkpoint}: trained on classes {list(trained)[:4]}... but {store.path} has {list(names)[:4]}..."
            + ("" if vocab is None else " (omit vocab to predict in the run's own label space)")
        )
    if vocab is None and labels is not None and labels.text is not None:
        text_np, source = labels.text, "run"
    else:
        name = vocab or "classes"
        try:
            raw, attrs = store.read_vocab(name)
        except KeyError as exc:
            hint = "" if labels is None or labels.text is None else " (omit vocab to use the run's own embeddings)"
            raise ConfigError(f"{str(exc).strip(chr(34) + chr(39))}{hint}; the run {run.checkpoint} records none") from exc
        rows = _vocab_rows(names, list(attrs.get("names") or []), raw.shape[0], f"{store.path}: vocabulary {name!r}")
        text_np, source = np.asarray(raw)[rows], f"store:{name}"
    clip_dim = run.model.config.clip_dim
    if text_np.shape[1] != clip_dim:
        raise ConfigError(f"{source}: text embeddings are {text_np.shape[1]}-d, the run's CLIP head {clip_dim}-d")
    text = torch.from_numpy(np.asarray(text_np, np.float32)).to(run.device)
    if ov_split is None and run.base_ids is not None:
        base, novel, ignored = run.base_ids, run.novel_ids, run.ignored_ids
    elif ov_split is None or ov_split.lower() == "none":
        base, novel, ignored = tuple(range(len(names))), (), ()
    else:
        split = resolve_ov_split(ov_split, names, store.dataset)
        assert split is not None
        base, novel, ignored = split
    return ClassSetup(names, text, tuple(base), tuple(novel), tuple(ignored), text_source=source)


def run_classes(run: LoadedRun, *, ov_split: str | None = None) -> ClassSetup:
    """The classes a run predicts in its own label space, no store needed: its class names and
    text embeddings (``labels.json``, ``text.npy``) and its open-vocabulary split (``ov_split``
    as in :func:`resolve_classes`; a pre-training run has none: every class is base, and only
    its CLIP head is trained).

    Raises:
        ConfigError: the run folder records no text embeddings (runs older than ``labels.json``:
            predict on a store instead), or their width is not the CLIP head's.
    """
    labels = run.labels
    if labels is None or labels.text is None:
        raise ConfigError(f"{run.path or run.checkpoint}: the run records no label space with text embeddings "
                          f"({LABELS_FILE}, {TEXT_FILE}); predict on a store of its dataset instead")
    names = tuple(labels.class_names)
    clip_dim = run.model.config.clip_dim
    if labels.text.shape[1] != clip_dim:
        raise ConfigError(f"{run.path}: text embeddings are {labels.text.shape[1]}-d, the run's CLIP head {clip_dim}-d")
    text = torch.from_numpy(np.asarray(labels.text, np.float32)).to(run.device)
    if ov_split is None and run.base_ids is not None:
        base, novel, ignored = run.base_ids, run.novel_ids, run.ignored_ids
    elif ov_split is None or ov_split.lower() == "none":
        base, novel, ignored = tuple(range(len(names))), (), ()
    else:
        split = resolve_ov_split(ov_split, names, labels.dataset)
        assert split is not None
        base, novel, ignored = split
    return ClassSetup(names, text, tuple(base), tuple(novel), tuple(ignored), text_source="run")


def gt_to_run_classes(store_names: Sequence[str], run_names: Sequence[str]) -> np.ndarray | None:
    """Store class id -> run class id by name (IGNORE_INDEX for store classes the run lacks), for
    scoring a run on a store of another class list; None when the lists are the same."""
    if list(store_names) == list(run_names):
        return None
    index = {n: i for i, n in enumerate(run_names)}
    from pipeline.schema import IGNORE_INDEX

    return np.array([index.get(n, IGNORE_INDEX) for n in store_names], np.int64)


# ---------------------------------------------------------------------------------------------
# scenes and splits


def resolve_scene_ids(store: Store, spec: str | None) -> list[str]:
    """Scene ids of a split name, a scene-list file, or (None) the whole store.

    A manifest split (``train``, ``val``, ``lr1`` ...) of ``store.dataset`` is cut down to the
    scenes the store holds (a warning says how many are missing; an error if none is there). A
    file is taken strictly: every scene it lists must be in the store.

    Raises:
        ConfigError naming the split/file when it is unknown or selects no stored scene.
    """
    import warnings

    stored = store.scene_ids()
    if spec is None or spec == "":
        if not stored:
            raise ConfigError(f"{store.path}: the store holds no ingested scene")
        return stored
    if Path(spec).is_file():
        try:
            ids = read_scene_list(spec)
        except ValueError as exc:
            raise ConfigError(f"{spec}: {exc}") from exc
        missing = sorted(set(ids) - set(stored))
        if missing:
            raise ConfigError(f"{spec}: {len(missing)} listed scene(s) are not in {store.path} (e.g. {missing[:3]})")
        return ids
    dataset = datasets.DATASETS.get(store.dataset)
    if dataset is not None and dataset.scene_lists is None and dataset.folder_splits is not None:
        return _folder_split(store, spec, stored, dataset.folder_splits(stored))
    try:
        ids = datasets.load_split(store.dataset, spec)
    except (ValueError, datasets.ManifestError) as exc:
        raise ConfigError(f"scenes {spec!r}: neither a file nor a split of dataset {store.dataset!r}: {exc}") from exc
    known = set(stored)
    present = [s for s in ids if s in known]
    if not present:
        raise ConfigError(f"split {spec!r} of {store.dataset}: none of its {len(ids)} scenes is in {store.path}")
    if len(present) < len(ids):
        warnings.warn(
            f"split {spec!r}: {len(ids) - len(present)} of {len(ids)} scenes are not in {store.path}; using {len(present)}",
            stacklevel=2,
        )
    return present


def _folder_split(store: Store, spec: str, stored: list[str], splits: dict[str, tuple[str, ...]]) -> list[str]:
    """A split of a store of plain scans: its scans under a `train/`, `val/` or `test/` folder of the
    raw folder; `train` without such a folder is every scan outside `val/` and `test/`."""
    import warnings

    if spec in splits:
        return list(splits[spec])
    if spec == "train":
        held_out = {s for name in ("val", "test") for s in splits.get(name, ())}
        ids = [s for s in stored if s not in held_out]
        if ids:
            if not held_out:
                warnings.warn(f"{store.path}: no train/ or val/ folders among its scans: training on all {len(ids)} "
                              "(put held-out scans under val/ in the raw folder to evaluate on scans not trained on)",
                              stacklevel=3)
            return ids
    raise ConfigError(f"{store.path}: no {spec!r} split: its scans were not under a {spec}/ folder of the raw folder "
                      f"(splits here: {sorted(splits) or 'none'}); pass a scene-list file, or --split all")


def has_split(store: Store, spec: str) -> bool:
    """Whether ``spec`` names a split of the store's dataset (manifest lists, or folders of plain
    scans) that holds at least one stored scene."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(resolve_scene_ids(store, spec))
    except ConfigError:
        return False


def resolve_ov_split(spec: str | None, class_names: Sequence[str], dataset: str) -> datasets.OVSplit | None:
    """Base, novel and ignored class ids of an open-vocabulary split.

    Args:
        spec: None (no split), a manifest name of ``dataset`` (``b15n4`` ...), or
            ``novel=name,name[;ignored=name,...]`` naming the novel (and ignored) classes; all
            others are base.
        class_names: the store's class names (ids are positions in this list).
        dataset: the store's dataset (for manifest names).

    Raises:
        ConfigError for an unknown split or class name, or a manifest whose classes are not the store's.
    """
    if spec is None or spec == "":
        return None
    names = list(class_names)
    if spec.startswith("novel="):
        parts = dict(part.split("=", 1) for part in spec.split(";") if "=" in part)
        if set(parts) - {"novel", "ignored"} or spec.count("=") != len(parts):
            raise ConfigError(f"ov_split {spec!r}: expected novel=name,...[;ignored=name,...]")
        picked = {}
        for key in ("novel", "ignored"):
            chosen = [n.strip() for n in parts.get(key, "").split(",") if n.strip()]
            unknown = [n for n in chosen if n not in names]
            if unknown:
                raise ConfigError(f"ov_split {spec!r}: unknown class name(s) {unknown}; classes are {names}")
            picked[key] = tuple(sorted({names.index(n) for n in chosen}))
        novel, ignored = picked["novel"], picked["ignored"]
        if not novel or set(novel) & set(ignored):
            raise ConfigError(f"ov_split {spec!r}: needs at least one novel class, none of them also ignored")
        base = tuple(i for i in range(len(names)) if i not in novel and i not in ignored)
        if not base:
            raise ConfigError(f"ov_split {spec!r}: no base class left")
        return datasets.OVSplit(base, novel, ignored)
    if not (dataset in datasets.DATASETS and datasets.list_ov_splits(dataset)):
        # a store of plain scans names no splits itself: the dataset whose class list it has does
        dataset = next((d for d in datasets.DATASETS if datasets.list_ov_splits(d) and
                        list(datasets.load_classes(d)) == names), dataset)
    try:
        split = datasets.load_ov_split(dataset, spec)
        manifest_classes = datasets.load_classes(dataset)
    except (ValueError, datasets.ManifestError) as exc:
        raise ConfigError(f"ov_split {spec!r}: {exc}") from exc
    if list(manifest_classes) != names:
        raise ConfigError(
            f"ov_split {spec!r}: the {dataset} manifest classes {list(manifest_classes)[:4]}... are not the "
            f"store's classes {names[:4]}...; use novel=name,... instead"
        )
    return split


# ---------------------------------------------------------------------------------------------
# where outputs of a run go


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_.")
    return slug[:limit] or "x"


def eval_path(run: str | Path, store: str | Path, split: str | None) -> Path:
    """``RUN/eval/<store name>.<split>.json``: one file per evaluated store and split (a split
    given as a scene-list file is named by the file's stem; None is ``all``)."""
    run = Path(run)
    run_dir = run if run.is_dir() else run_dir_of(run)
    store_name = Path(str(store).rstrip("/")).name
    store_name = store_name[:-5] if store_name.endswith(".zarr") else store_name
    split_name = "all" if not split else (Path(split).stem if Path(split).is_file() else split)
    return run_dir / "eval" / f"{_slug(store_name)}.{_slug(split_name)}.json"


def query_path(run: str | Path, text: str, scene_id: str) -> Path:
    """``RUN/query_<text>_<scene>.ply``: where a query heatmap goes when no ``--out`` is given."""
    run = Path(run)
    run_dir = run if run.is_dir() else run_dir_of(run)
    return run_dir / f"query_{_slug('_'.join(text.split()))}_{_slug(scene_id)}.ply"
