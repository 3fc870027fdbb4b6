"""`ws3d validate`: a store checked against `pipeline.schema` and its own manifests; `--deep`
reads every chunk; `--repair` recomputes what it found bad. Scans that passed their stages with
suspect warnings (:data:`pipeline.errors.SUSPECT_KINDS`: black views, a LiDAR sweep in a map frame,
most labels lost, unannotated points dropped, views that see little) are flagged (never repaired:
the data is what the scan holds).

- **The structure** (default; one listing and the metadata of each node, no chunk read, cheap on
  object storage): every stage's node has its marker (``zarr.json``) and record, every key of its
  manifest is there with the size it was written with (a deleted chunk or ``zarr.json``, a
  truncated chunk), no data lies without a marker (an interrupted write, a deleted marker), the
  arrays' dtypes and shapes follow the schema and agree across a scene, leftovers of killed runs.
  Arrays written before checksums are counted as unchecked.
- **--deep**: also every chunk read and checked (checksum, presence) and every array decoded for
  its values (finite coordinates, labels in range, contiguous segment ids, valid CSR ...).
- **--repair**: the scenes and stages found bad recomputed, each with the config its record holds
  (or that the same stage's other scenes hold) and, for ingest, from the raw folder named in the
  record; leftovers removed; a deleted root, ``scenes/`` or ``vocab/`` marker restored; a damaged
  vocabulary embedded again with its model.

Reads the store (and, to repair, the raw files); writes only through the stages' runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline import schema
from pipeline.errors import is_suspect, warning_kind
from pipeline.store import MARKER, DamagedDataError, Store, StoreError, is_node_name

GROUP_STAGE = {group: stage for stage, groups in schema.STAGE_GROUPS.items() for group in groups}
"""The stage that writes each group."""


@dataclass
class Problem:
    scene_id: str
    where: str
    message: str
    stage: str | None = None
    """The stage whose output the problem is in (what a repair recomputes); None: store level."""

    def __str__(self) -> str:
        return f"{self.scene_id}: {self.where}: {self.message}"


@dataclass
class ValidationReport:
    scenes: int = 0
    problems: list[Problem] = field(default_factory=list)
    flagged: list[Problem] = field(default_factory=list)
    """Scenes whose stage records hold suspect warnings (where = the stage and the warning's kind)."""
    unchecked: dict[str, int] = field(default_factory=dict)
    """Scene -> arrays written without checksums (before this ws3d checksummed chunks)."""
    leftovers: list[str] = field(default_factory=list)
    """What killed runs left (removed by the next run whose process they are not, or --repair)."""
    deep: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.flagged

    def bad(self) -> dict[str, list[str]]:
        """Stage -> the scenes whose output of it is bad, in pipeline order."""
        out: dict[str, list[str]] = {}
        for stage in schema.STAGE_GROUPS:
            scenes = sorted({p.scene_id for p in self.problems if p.stage == stage})
            if scenes:
                out[stage] = scenes
        return out

    def lines(self) -> list[str]:
        """What to print: every problem, then the notes."""
        out = [f"  {p}" for p in self.problems]
        if self.leftovers:
            out.append(f"  note: {len(self.leftovers)} leftover(s) of killed runs ({', '.join(self.leftovers[:3])}"
                       f"{' ...' if len(self.leftovers) > 3 else ''}); never read as data, removed by the next "
                       "run once their process is gone, or by `ws3d validate --repair`")
        if self.unchecked:
            arrays = sum(self.unchecked.values())
            out.append(f"  note: {arrays} array(s) in {len(self.unchecked)} scene(s) have no checksums (written "
                       "before ws3d checksummed chunks): damage there cannot be detected; `ws3d <stage> --force` "
                       "rewrites them with checksums")
        out += [f"  flagged {flag}" for flag in self.flagged]
        what = "every chunk read" if self.deep else "structure only; --deep reads every chunk"
        flagged = len({f.scene_id for f in self.flagged})
        out.append(f"{self.scenes} scene(s) checked ({what}), {len(self.problems)} problem(s)"
                   + (f", {flagged} flagged scene(s) (suspect scans: see the warnings)" if flagged else ""))
        return out


def suspect_warnings(store: Store, scene_id: str) -> list[Problem]:
    """The suspect warnings kept in a scene's stage records, one :class:`Problem` each."""
    out = []
    for stage in schema.STAGE_GROUPS:
        record = store.stage_record(scene_id, stage) or {}
        for text in (record.get("stats") or {}).get("warnings") or ():
            if is_suspect(str(text)):
                kind, message = warning_kind(str(text))
                out.append(Problem(scene_id, f"{stage} [{kind}]", message))
    return out


def _stage_prefix(scene_id: str, stage: str) -> str:
    return f"scenes/{scene_id}" if stage == "ingest" else f"scenes/{scene_id}/{schema.STAGE_GROUPS[stage][0]}"


def _fetch_scene(store: Store, scene_id: str) -> tuple[dict[str, int], dict[str, bytes | None]]:
    """One listing of a scene and every node's and array's zarr.json, fetched together."""
    import asyncio

    loc = store.location
    base = f"scenes/{scene_id}"
    keys = [f"{_stage_prefix(scene_id, stage)}/{MARKER}" for stage in schema.STAGE_GROUPS]
    keys += [f"{base}/{spec.group}/{spec.name}/{MARKER}" for spec in schema.SCENE_ARRAYS]

    async def fetch() -> tuple[dict[str, int], dict[str, bytes | None]]:
        sizes, blobs = await asyncio.gather(loc.alist_sizes(base), loc.aget_many(keys))
        return sizes, blobs

    return loc.run(fetch())


def validate_scene(store: Store, scene_id: str, *, deep: bool = False,
                   unchecked: dict[str, int] | None = None) -> list[Problem]:
    """All problems of one scene (empty list when it follows the schema and its manifests)."""
    import json

    problems: list[Problem] = []
    dims: dict[str, int] = {}
    sizes, blobs = _fetch_scene(store, scene_id)
    children = {key.split("/", 1)[0] for key in sizes}

    def bad(where: str, message: str, stage: str | None) -> None:
        problems.append(Problem(scene_id, where, message, stage))

    arrays: dict[schema.ArraySpec, np.ndarray] = {}
    for stage, groups in schema.STAGE_GROUPS.items():
        prefix = _stage_prefix(scene_id, stage)
        marker = blobs[f"{prefix}/{MARKER}"]
        attributes = _parse_attributes(marker)
        if marker is None or attributes is None:
            where = f"{groups[0] if stage != 'ingest' else 'zarr.json'}"
            if marker is not None:
                bad(where, "zarr.json does not parse (damaged)", stage)
            elif stage == "ingest":
                bad(where, "scene zarr.json missing (deleted, or an ingest that did not finish)", stage)
            elif groups[0] in children:
                bad(f"{groups[0]}/zarr.json", "missing: data without its marker (a deleted zarr.json or a write "
                    "that did not finish); never read as data", stage)
            continue
        if "ws3d_stage" not in attributes:
            bad(groups[0] if stage != "ingest" else "zarr.json", "stage record (attrs) missing", stage)
        node_sizes = sizes if stage == "ingest" else {
            k[len(groups[0]) + 1:]: v for k, v in sizes.items() if k.startswith(groups[0] + "/")}
        for problem in store.manifest_problems(prefix, attributes, node_sizes):
            key, message = problem.split(": ", 1)
            where = key if stage == "ingest" else f"{groups[0]}/{key}"
            bad(where, f"{message} (a deleted, truncated or altered file)", stage)
        present = []
        for spec in schema.arrays_of_stage(stage):
            name = f"{spec.group}/{spec.name}"
            raw = blobs[f"scenes/{scene_id}/{name}/{MARKER}"]
            if raw is None:
                if not spec.optional:
                    bad(name, "array missing", stage)
                continue
            try:
                metadata = json.loads(raw)
                shape = tuple(int(n) for n in metadata.get("shape", ()))
                dtype = np.dtype(str(metadata.get("data_type")))
            except (ValueError, TypeError) as exc:
                bad(name, f"unreadable zarr.json ({exc})", stage)
                continue
            present.append(spec)
            if not Store.is_checked(metadata) and unchecked is not None:
                unchecked[scene_id] = unchecked.get(scene_id, 0) + 1
            if dtype != np.dtype(spec.dtype):
                bad(name, f"dtype {dtype}, schema says {spec.dtype}", stage)
            if len(shape) != len(spec.dims):
                bad(name, f"shape {shape}, schema dims {spec.dims}", stage)
                continue
            for axis, dim in enumerate(spec.dims):
                size = shape[axis]
                if isinstance(dim, int):
                    if size != dim:
                        bad(name, f"axis {axis} is {size}, schema says {dim}", stage)
                elif dim == "V+1":
                    dims.setdefault("V", size - 1)
                    if dims["V"] != size - 1:
                        bad(name, f"has {size} offsets for {dims['V']} views", stage)
                elif dims.setdefault(dim, size) != size:
                    bad(name, f"dimension {dim} is {size} but {dims[dim]} elsewhere in the scene", stage)
        if deep and present:
            try:  # every chunk of the stage read (and checked) together; chunk by chunk only to name damage
                arrays.update(zip(present, store.read_many(scene_id, present)))
            except DamagedDataError:
                for spec in present:
                    name = f"{spec.group}/{spec.name}"
                    damaged = store.damaged_chunks(scene_id, spec)
                    for chunk in damaged:
                        bad(name, f"chunk {chunk}", stage)
                    if not damaged:
                        try:
                            arrays[spec] = store.read(scene_id, spec)
                        except DamagedDataError as exc:
                            bad(name, f"unreadable: {exc.message}", stage)
    if deep:
        def value(where: str, message: str) -> None:
            bad(where, message, GROUP_STAGE.get(where.split("/", 1)[0]))

        _check_values(arrays, dims, len(store.class_names), value)
    return problems


def _parse_attributes(raw: bytes | None) -> dict[str, Any] | None:
    import json

    if raw is None:
        return None
    try:
        return dict(json.loads(raw).get("attributes") or {})
    except (ValueError, AttributeError, TypeError):
        return None


def _check_values(arrays, dims, n_classes, bad) -> None:
    n = dims.get("N", 0)
    if schema.XYZ in arrays and not np.isfinite(arrays[schema.XYZ]).all():
        bad("points/xyz", "NaN or infinite coordinates")
    if schema.SEMANTIC in arrays:
        sem = arrays[schema.SEMANTIC]
        ok = (sem == schema.IGNORE_INDEX) | ((sem >= 0) & (sem < n_classes))
        if not ok.all():
            bad("points/semantic", f"{int((~ok).sum())} labels outside 0..{n_classes - 1} and not IGNORE_INDEX")
    if schema.FACES in arrays and arrays[schema.FACES].size:
        faces = arrays[schema.FACES]
        if faces.min() < 0 or faces.max() >= n:
            bad("mesh/faces", "vertex index out of range")
    if schema.SEGMENT in arrays:
        seg = arrays[schema.SEGMENT]
        if seg.size and (seg.min() < 0 or len(np.unique(seg)) != seg.max() + 1):
            bad("overseg/segment", "segment ids are not contiguous 0..S-1")
        dims["S"] = int(seg.max()) + 1 if seg.size else 0
        if schema.ADJACENCY in arrays and arrays[schema.ADJACENCY].size:
            adj = arrays[schema.ADJACENCY]
            if adj.min() < 0 or adj.max() >= dims["S"] or (adj[:, 0] >= adj[:, 1]).any():
                bad("overseg/adjacency", "pairs must be segment ids with a < b")
        if schema.CLIP_SEGMENT in arrays and len(arrays[schema.CLIP_SEGMENT]) != dims["S"]:
            bad("clip/segment", f"{len(arrays[schema.CLIP_SEGMENT])} rows for {dims['S']} segments")
    if schema.VIEW_POINT_INDEX in arrays:
        idx = arrays[schema.VIEW_POINT_INDEX]
        if idx.size and (idx.min() < -1 or idx.max() >= n):
            bad("views/point_index", "point ids outside -1..N-1")
    if schema.VISIBLE_PTR in arrays and schema.VISIBLE_IDS in arrays:
        ptr, ids = arrays[schema.VISIBLE_PTR], arrays[schema.VISIBLE_IDS]
        if ptr[0] != 0 or ptr[-1] != len(ids) or (np.diff(ptr) < 0).any():
            bad("views/visible_ptr", "not a valid CSR offset array")
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad("views/visible_ids", "point ids out of range")
    for spec in (schema.CLIP_VIEW, schema.CLIP_SEGMENT):
        if spec in arrays and not np.isfinite(arrays[spec].astype(np.float32)).all():
            bad(f"{spec.group}/{spec.name}", "NaN or infinite embeddings")


def validate_store(store: Store, scene_ids: list[str] | None = None, *, deep: bool = False) -> ValidationReport:
    """Validate the listed (default: all, and any scene data without its marker) scenes, the
    store's groups and the vocabularies; `deep` reads every chunk."""
    report = ValidationReport(deep=deep)
    location = store.location
    for group in ("scenes", "vocab"):
        if not location.exists(f"{group}/{MARKER}"):
            report.problems.append(Problem("store", f"{group}/zarr.json", "missing (deleted)"))
    complete = store.scene_ids()
    if scene_ids is None:
        orphans = [n for n in location.children("scenes") if is_node_name(n) and n not in set(complete)]
        ids = sorted(complete + orphans)
    else:
        ids = list(scene_ids)
    for scene_id in ids:
        report.scenes += 1
        if not location.children(f"scenes/{scene_id}"):
            report.problems.append(Problem(scene_id, "-", "scene not in the store"))
            continue
        report.problems.extend(validate_scene(store, scene_id, deep=deep, unchecked=report.unchecked))
        report.flagged.extend(suspect_warnings(store, scene_id))
    for name in location.children("vocab"):
        if not is_node_name(name):
            continue
        attributes = store.node_attributes(f"vocab/{name}")
        if attributes is None or "ws3d_vocab" not in attributes:
            report.problems.append(Problem("vocab", name, "zarr.json missing or damaged", "vocab"))
            continue
        for problem in store.manifest_problems(f"vocab/{name}", attributes):
            report.problems.append(Problem("vocab", name, problem, "vocab"))
        if deep:
            try:
                text, attrs = store.read_vocab(name)
            except (DamagedDataError, KeyError) as exc:
                report.problems.append(Problem("vocab", name, f"unreadable: {exc}", "vocab"))
                continue
            if len(attrs.get("names", [])) != len(text):
                report.problems.append(Problem("vocab", name, f"{len(text)} embeddings for {len(attrs.get('names', []))} names", "vocab"))
    report.leftovers = store.leftovers()
    return report


# -- repair ------------------------------------------------------------------------------------
def open_for_repair(url: str, echo: Callable[[str], None] = print) -> Store:
    """Open a store, restoring its root zarr.json from its scenes' ingest records when it was
    deleted (the dataset named there, its class names from the dataset's manifests)."""
    try:
        return Store.open(url)
    except StoreError as exc:
        if "root zarr.json is missing" not in str(exc):
            raise
    import warnings

    from pipeline.datasets.ingest import class_names
    from pipeline.storage import open_location

    location = open_location(url)
    datasets = set()
    for name in [n for n in location.children("scenes") if is_node_name(n)]:
        record = (Store(location, {}).stage_record(name, "ingest") or {})
        dataset = (record.get("config") or {}).get("dataset")
        if dataset:
            datasets.add(dataset)
            break
    if len(datasets) != 1:
        raise StoreError(f"{url}: the root zarr.json is missing and no scene's ingest record names the dataset; "
                         "rerun `ws3d ingest --dataset D` on it")
    (dataset,) = datasets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = Store.create(url, dataset=dataset, class_names=class_names(dataset))
    echo(f"restored the root zarr.json of {url} (dataset {dataset})")
    return store


def _config_for(store: Store, stage: Any, scene_id: str, scene_ids: list[str]) -> tuple[Any, dict[str, Any]]:
    """The config (and record) to recompute a stage with: the scene's own record, else the first
    other scene's record of the same stage."""
    from pipeline.config import from_dict

    record = store.stage_record(scene_id, stage.name)
    if record is None or "config" not in record:
        for other in scene_ids:
            record = store.stage_record(other, stage.name)
            if record is not None and "config" in record:
                break
        else:
            raise StoreError(f"{store.url}: scene {scene_id}: no record of `{stage.name}` to repair it from "
                             f"(run `ws3d {stage.name}` on the store)")
    return from_dict(stage.config, dict(record["config"]), where=f"{stage.name} record"), record


def repair_store(store: Store, report: ValidationReport, *, raw: str | None = None,
                 echo: Callable[[str], None] = print) -> list[Any]:
    """Recompute what `report` (a deep validation) found bad; return one RunReport per stage run.

    Leftovers are removed and missing group markers restored first (no run may be writing to
    the store meanwhile). Then stage by stage in pipeline order, each bad scene is recomputed with
    ``force`` from its record's config; a scene whose ingest was recomputed with another config
    hash (another raw folder) has its later stages recomputed too, since they were dropped.
    """
    from pipeline.executor import ExecutorConfig, run_scenes
    from pipeline.stage import StageRun, run_scene
    from pipeline.stages import STAGES

    removed = store.clean_leftovers(everything=True)
    if removed:
        echo(f"removed {len(removed)} leftover(s) of killed runs")
    store._ensure_groups()
    bad = {stage: set(scenes) for stage, scenes in report.bad().items()}
    all_ids = store.scene_ids()
    before = {s: {st.name for st in STAGES if store.stage_record(s, st.name) is not None}
              for s in {s for scenes in bad.values() for s in scenes if s != "vocab"}}
    reports = []
    for stage in STAGES:
        todo = sorted(s for s in bad.get(stage.name, set()) | {
            s for s, had in before.items() if stage.name in had and store.stage_record(s, stage.name) is None})
        groups: dict[str, tuple[Any, str | None, list[str]]] = {}
        failures = []
        for scene_id in todo:
            try:
                cfg, record = _config_for(store, stage, scene_id, all_ids)
            except Exception as exc:  # a scene that cannot be repaired is reported; the others go on
                failures.append(f"{scene_id}: {exc}")
                continue
            scene_raw = None
            if any(o.raw for o in stage.options):
                scene_raw = raw or record.get("raw")
                if not scene_raw:
                    failures.append(f"{scene_id}: its {stage.name} record names no raw folder (written before ws3d "
                                    "recorded it): pass --raw DIR")
                    continue
            from pipeline.config import config_hash

            key = f"{config_hash(cfg)}|{scene_raw}"
            groups.setdefault(key, (cfg, scene_raw, []))[2].append(scene_id)
        for line in failures:
            echo(f"  cannot repair {stage.name} of {line}")
        for cfg, scene_raw, scenes in groups.values():
            run = StageRun(store=store.url, cfg=cfg, raw=scene_raw, force=True)
            if stage.prepare is not None and stage.name != "ingest":
                stage.prepare(run)
            import functools

            result = run_scenes(stage.name, functools.partial(run_scene, stage, run), scenes,
                                ExecutorConfig(kind="sync"), progress=False)
            echo(f"repair {result.summary()}")
            reports.append(result)
    if "vocab" in bad:
        _repair_vocabularies(store, sorted(p.where for p in report.problems if p.stage == "vocab"), echo)
    return reports


def _repair_vocabularies(store: Store, names: list[str], echo: Callable[[str], None]) -> None:
    """Embed damaged vocabularies again with the embed stage's model (from a scene's record)."""
    from pipeline.embed.stage import VOCAB_NAME, run_vocabulary

    model = next(((store.stage_record(s, "embed") or {}).get("config", {}).get("model")
                  for s in store.scene_ids() if store.stage_record(s, "embed")), None)
    for name in sorted(set(names)):
        attributes = (store.node_attributes(f"vocab/{name}") or {}).get("ws3d_vocab") or {}
        if not model or (not attributes and name != VOCAB_NAME):
            echo(f"  cannot repair vocabulary {name!r}: rerun `ws3d embed` (or write it again)")
            continue
        run_vocabulary(store.url, model, attributes.get("names"), vocab_name=name,
                       templates=attributes.get("prompts"))
        echo(f"repair: vocabulary {name!r} embedded again with {model}")
