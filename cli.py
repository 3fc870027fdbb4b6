"""The `ws3d` command line: every stage and loop as a subcommand.

The CLI parses, resolves configs (defaults < --config YAML < key=value overrides), and calls the
library. The per-scene stage commands (`ingest`, `overseg`, `render`, `embed`) are built from
`pipeline.stages.STAGES`, the list the workflow runner uses too, and run through
`pipeline.stage.run_stage`. Stage declarations are light, and heavy imports happen inside commands,
so that `ws3d --help` is quick and a missing optional dependency is reported by the command needing it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from pipeline.errors import UserError


class _App(typer.Typer):
    """A Typer whose every command turns a user's mistake (:class:`pipeline.errors.UserError`,
    raised anywhere below it) into one `error: ...` line and exit code 2: the one place where
    that happens. Any other exception is a bug and keeps its traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        register = super().command(*args, **kwargs)

        def decorator(fn: Any) -> Any:
            @functools.wraps(fn)
            def run(*a: Any, **k: Any) -> Any:
                from pipeline.progress import quiet_library_bars

                quiet_library_bars()  # no carriage-return bars of other libraries in a log
                try:
                    return fn(*a, **k)
                except UserError as exc:
                    fail(str(exc))

            register(run)
            return fn

        return decorator


app = _App(help="ws3d: raw 3D scans -> a 3D vision-language model (WS3D++).", no_args_is_help=True,
           pretty_exceptions_show_locals=False)
views_app = _App(help="Look at rendered views.", no_args_is_help=True)
teacher_app = _App(help="The offline CLIP teacher.", no_args_is_help=True)
manifests_app = _App(help="Scene lists, splits and class lists.", no_args_is_help=True)
app.add_typer(views_app, name="views")
app.add_typer(teacher_app, name="teacher")
app.add_typer(manifests_app, name="manifests")

STORE = typer.Option(..., "--store", "-s", help="The ws3d store (Zarr v3): a folder, file://PATH, s3://BUCKET/NAME or gs://BUCKET/NAME.")
SCENES = typer.Option(None, "--scenes", help="Text file of scene ids (one a line); default: all.")
SHARD = typer.Option(None, "--shard", help="Run shard i/n of the sorted scene list (array jobs).")
EXECUTOR = typer.Option(None, "--executor", "-x", help="sync | local | address | slurm | pbs (default local; sync with --shard).")
CONFIG = typer.Option(None, "--config", "-c", help="YAML file with the stage's config (and an `executor:` section).")
FORCE = typer.Option(False, "--force", help="Recompute scenes even when complete with the same config.")
OVERRIDES = typer.Argument(None, help="key=value overrides of the config (executor.KEY=VALUE for the executor).")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    stage, executor = [], []
    for item in overrides or []:
        (executor if item.startswith("executor.") else stage).append(item.removeprefix("executor."))
    return stage, executor


def _resolve(cls: type, config: Path | None, overrides: list[str], section: str | None = None,
             sections: dict[str, type] | None = None, base: Any = None) -> Any:
    """A command's config: defaults (or `base`) < its --config file < key=value overrides.

    With `section`, the file is one of sections (`sections`: every section such a file may hold,
    each checked whole) or, without any section key, the section's own config (a run's
    config.yaml); see `pipeline.config.read_sections`. A mistake raises ConfigError (a
    UserError: one `error:` line, exit 2)."""
    from pipeline.config import read_mapping, read_sections, resolve

    data: dict[str, Any] = {}
    where = cls.__name__
    if config is not None and section is None:
        data, where = read_mapping(config), str(config)
    elif config is not None:
        data = read_sections(config, sections or {section: cls}, reads=(section,), flat=section).get(section, {})
        where = f"{config}:{section}"
    return resolve(cls, data, overrides, base=base, where=where)


WORKFLOW_KEYS = frozenset({"dataset", "raw", "store", "stages", "scenes", "shard", "synth", "teacher"})
"""Top-level keys of a workflow file that no stage section has: a stage command given a workflow
as --config reads it as a workflow (checked whole) and takes the stage's config from it."""


def _stage_configs(stage: Any, config: Path | None, stage_overrides: list[str], kind: str | None,
                   shard: str | None, exec_overrides: list[str]) -> tuple[Any, Any]:
    """A stage command's (stage config, executor config) from one --config file: a file of sections
    (one per stage, `executor`), each checked whole; a stage's own config without sections; or a
    workflow file (checked as a workflow; the stage's config as the workflow would run it)."""
    from pipeline.config import load_config, read_mapping, read_sections, resolve
    from pipeline.executor import ExecutorConfig
    from pipeline.stages import STAGES

    if kind is None and shard:
        kind = "sync"  # an array-job shard runs in its own process: no Dask cluster needed
    exec_overrides = ([f"kind={kind}"] if kind is not None else []) + exec_overrides
    stage_data: dict[str, Any] = {}
    exec_data: dict[str, Any] = {}
    stage_base = exec_base = None
    where = str(config) if config is not None else ""
    if config is not None and WORKFLOW_KEYS & set(read_mapping(config)):
        from pipeline.workflow import WorkflowConfig

        workflow = load_config(WorkflowConfig, config)
        stage_base, exec_base = workflow.stage_config(stage.name), workflow.executor
    elif config is not None:
        sections = {s.name: s.config for s in STAGES} | {"executor": ExecutorConfig}
        parts = read_sections(config, sections, reads=(stage.name, "executor"), flat=stage.name)
        stage_data, exec_data = parts.get(stage.name, {}), parts.get("executor", {})
    cfg = resolve(stage.config, stage_data, stage_overrides, base=stage_base, where=f"{where}:{stage.name}".lstrip(":"))
    exec_cfg = resolve(ExecutorConfig, exec_data, exec_overrides, base=exec_base, where=f"{where}:executor".lstrip(":"))
    return cfg, exec_cfg


def _scene_ids(store_scenes: list[str], scenes: Path | None, shard: str | None) -> list[str]:
    from pipeline.executor import read_scene_list, select_shard

    try:
        ids = read_scene_list(scenes) if scenes else store_scenes
        return select_shard(ids, shard)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    return []


def _open_store(path: str) -> Any:
    from pipeline.store import Store, StoreError

    try:
        return Store.open(path)
    except StoreError as exc:
        fail(str(exc))


def _stage_command(stage: Any) -> None:
    """Register `ws3d <stage>` for a `pipeline.stage.Stage`: the common options (store, scenes,
    shard, executor, config, force, overrides) and the stage's own (`Stage.options`), all running
    through `pipeline.stage.run_stage`, the path a workflow's stage takes too."""
    import inspect

    common = [
        ("store", str, STORE), ("scenes", Optional[Path], SCENES), ("shard", Optional[str], SHARD),
        ("executor", Optional[str], EXECUTOR), ("config", Optional[Path], CONFIG), ("force", bool, FORCE),
    ]
    own = [(o.name, Path if o.raw else str, typer.Option(... if o.required else None, *o.flags, help=o.help))
           for o in stage.options]
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
              for name, kind, default in [*own, *common]]
    params.append(inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, default=OVERRIDES,
                                    annotation=Optional[list[str]]))

    def command(**kw: Any) -> None:
        from pipeline.stage import StageRun, run_stage

        raw = next((kw[o.name] for o in stage.options if o.raw), None)
        stage_overrides, exec_overrides = _split_overrides(kw["overrides"])
        # `overseg.voxel_m=0.03` (a workflow's and the docs' name) means `voxel_m=0.03` here
        stage_overrides = [o.removeprefix(f"{stage.name}.") for o in stage_overrides]
        given = [f"{o.name}={kw[o.name]}" for o in stage.options if not o.raw and kw[o.name] is not None]
        cfg, exec_cfg = _stage_configs(stage, kw["config"], given + stage_overrides, kw["executor"], kw["shard"],
                                       exec_overrides)
        run = StageRun(store=str(kw["store"]), cfg=cfg, raw=None if raw is None else str(raw), force=kw["force"],
                       scenes=None if kw["scenes"] is None else str(kw["scenes"]), shard=kw["shard"])
        report = run_stage(stage, run, executor=exec_cfg, echo=typer.echo)
        typer.echo(report.summary())
        if not report.ok:
            raise typer.Exit(1)

    command.__name__ = stage.name
    command.__doc__ = stage.help
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    app.command(stage.name)(command)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the ScanNet-layout rooms into."),
    scenes: int = typer.Option(8, "--scenes", "-n", help="Number of rooms."),
    seed: int = typer.Option(0, "--seed", help="Random seed (rooms are deterministic per seed and index)."),
    start: int = typer.Option(0, "--start", help="Index of the first room (scene ids follow it)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of the room config, e.g. room_edge_m=0.018 (in-process: no executor)."),
) -> None:
    """Generate synthetic rooms in the ScanNet raw layout."""
    from pipeline.datasets.synthetic import SynthConfig, synthesise

    cfg = _resolve(SynthConfig, None, [o.removeprefix("synth.") for o in overrides or []])
    ids = synthesise(out, scenes, seed=seed, start=start, cfg=cfg)
    typer.echo(f"wrote {len(ids)} rooms to {out}/scans ({ids[0]} .. {ids[-1]})")


def _register_stage_commands() -> None:
    from pipeline.stages import STAGES

    for stage in STAGES:
        _stage_command(stage)


_register_stage_commands()


@app.command()
def validate(store: str = STORE, scenes: Optional[Path] = SCENES,
             deep: bool = typer.Option(False, "--deep", help="Read and check every chunk (checksums) and every value."),
             repair: bool = typer.Option(False, "--repair", help="Recompute the scenes and stages found bad (with --deep: also damaged chunks); no run may write to the store meanwhile."),
             raw: Optional[Path] = typer.Option(None, "--raw", help="Raw folder for ingest repairs whose record names none (stores written before ws3d recorded it).")) -> None:
    """Check the store (markers, manifests, schema; --deep: every chunk) and flag suspect scans; exit 1 naming what is damaged or flagged."""
    from pipeline.validate import open_for_repair, repair_store, validate_store

    st = open_for_repair(store, echo=typer.echo) if repair else _open_store(store)
    ids = _scene_ids(st.scene_ids(), scenes, None) if scenes else None
    report = validate_store(st, ids, deep=deep)
    if repair and (report.problems or report.leftovers):
        for line in report.lines()[:-1]:
            typer.echo(line)
        typer.echo(f"repairing {len(report.problems)} problem(s) ...")
        repair_store(st, report, raw=None if raw is None else str(raw), echo=typer.echo)
        report = validate_store(st, ids, deep=deep)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def info(store: str = STORE, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """A table of the store: scenes, points, classes present, instances, stages done."""
    from pipeline.summary import summarise_store

    summary = summarise_store(_open_store(store))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from pipeline.summary import format_summary

    typer.echo(format_summary(summary))


@views_app.command("export")
def views_export(store: str = STORE, scene: str = typer.Option(..., "--scene"),
                 out: Path = typer.Option(..., "--out", "-o")) -> None:
    """Write PNGs of a scene's views and a contact sheet."""
    from pipeline.render.export import export_views

    paths = export_views(str(store), scene, out)
    typer.echo(f"wrote {len(paths)} files to {out}")


@teacher_app.command("corpus")
def teacher_corpus(out: Path = typer.Option(..., "--out", "-o", help="Folder for the corpus (raw/ and store.zarr)."),
                   rooms: int = typer.Option(32, "--rooms", help="Synthetic corpus rooms."),
                   seed: int = typer.Option(0, "--seed", help="Seed of the 3D rooms it goes with (the corpus uses its own namespace)."),
                   executor: Optional[str] = EXECUTOR) -> None:
    """Build the teacher's own corpus: synthetic rooms from a separate seed namespace, rendered into their own store."""
    from pipeline.teacher.corpus import CorpusConfig, build_corpus

    result = build_corpus(out, CorpusConfig(rooms=rooms, seed=seed), executor=_executor_config(executor, None, None, []),
                          echo=typer.echo)
    typer.echo(f"corpus store {result['store']}: {len(result['scenes'])} rooms; fit with `ws3d teacher fit --corpus {result['store']}`")


@teacher_app.command("fit")
def teacher_fit(corpus: str = typer.Option(..., "--corpus", help="The teacher's own corpus store (never the 3D store it will embed)."),
                out: Path = typer.Option(..., "--out", "-o", help="Folder for the teacher."),
                scenes: Optional[Path] = SCENES, config: Optional[Path] = CONFIG,
                overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Train a small CLIP-architecture teacher on captioned crops of its corpus (offline stand-in for CLIP)."""
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import run_fit

    cfg = _resolve(TeacherConfig, config, overrides or [], section="teacher")
    st = _open_store(corpus)
    result = run_fit(str(corpus), _scene_ids(st.scene_ids(), scenes, None), out, cfg)
    typer.echo(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, indent=2))


@app.command()
def preprocess(workflow: Path = typer.Option(..., "--workflow", "-w", help="workflows/<dataset>.yaml"),
               force: bool = FORCE, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Run a workflow's stages in order (resumable: complete scenes are skipped)."""
    from pipeline.config import ConfigError
    from pipeline.workflow import load_workflow, run_workflow

    try:
        cfg = load_workflow(workflow, list(overrides or []))
    except ConfigError as exc:
        fail(str(exc))
    reports = run_workflow(cfg, echo=typer.echo, force=force)
    if any(not r.ok for r in reports):
        typer.echo("some scenes failed (see above); rerun after fixing them: finished scenes are skipped")
        raise typer.Exit(1)


@manifests_app.command("check")
def manifests_check(dataset: str = typer.Option(..., "--dataset", "-d"), raw: Path = typer.Option(..., "--raw", "-r"),
                    split: str = typer.Option("all", "--split", help="Which list to compare (all, train, val, ...).")) -> None:
    """Scenes listed in the manifests but missing on disk, and the reverse."""
    from pipeline.datasets import check_raw

    missing, extra = check_raw(dataset, raw, split)
    typer.echo(f"{len(missing)} listed but missing on disk, {len(extra)} on disk but not listed")
    for name in missing[:50]:
        typer.echo(f"  missing: {name}")
    for name in extra[:50]:
        typer.echo(f"  unlisted: {name}")
    if missing or extra:
        raise typer.Exit(1)


RUN = typer.Option(..., "--run", help="A training run folder (its latest checkpoint) or a checkpoint file.")


SPLIT = typer.Option(None, "--scenes", help="Split name or scene list file (default: the config's, else the "
                     "train split; 'all' = every scene).")
LOOP_CONFIG = typer.Option(None, "--config", "-c", help="YAML file: a `pretrain:` and/or `finetune:` section, or a "
                           "run's own config.yaml (the command that wrote it).")


def _scenes_override(scenes: str | None) -> list[str]:
    """--scenes as an override: nothing when not given (the config file's, else the train split)."""
    if scenes is None:
        return []
    return ["scenes=null"] if scenes == "all" else [f"scenes={scenes}"]


def _loop_sections() -> dict[str, type]:
    """The sections of a training config file: both loops', so that a shared file is checked whole."""
    from ws3d_train.train.finetune import FinetuneConfig
    from ws3d_train.train.pretrain import PretrainConfig

    return {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


@app.command()
def pretrain(store: str = STORE, out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
             scenes: Optional[str] = SPLIT, config: Optional[Path] = LOOP_CONFIG,
             resume: bool = typer.Option(False, "--resume", help="Continue the run exactly."),
             overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Hierarchical 2D-3D alignment pre-training (scene views, segments, KL over the vocabulary)."""
    from ws3d_train.train.pretrain import PretrainConfig, pretrain as pretrain_loop

    extra = [f"store={store}"] + _scenes_override(scenes)
    cfg = _resolve(PretrainConfig, config, extra + list(overrides or []), section="pretrain",
                   sections=_loop_sections(), base=PretrainConfig(scenes="train"))
    summary = pretrain_loop(cfg, out, resume=resume)
    typer.echo(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=2))


@app.command()
def finetune(store: str = STORE, out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
             init: Optional[str] = typer.Option(None, "--init", help="Pre-training run or checkpoint (default: from scratch)."),
             scenes: Optional[str] = SPLIT, config: Optional[Path] = LOOP_CONFIG,
             resume: bool = typer.Option(False, "--resume", help="Continue the run exactly."),
             overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Fine-tune with few labels (labels=la20|lr..., ov_split=b15n4, loss switches and weights)."""
    from ws3d_train.train.finetune import FinetuneConfig, finetune as finetune_loop

    extra = [f"store={store}"] + ([f"init={init}"] if init else []) + _scenes_override(scenes)
    cfg = _resolve(FinetuneConfig, config, extra + list(overrides or []), section="finetune",
                   sections=_loop_sections(), base=FinetuneConfig(scenes="train"))
    summary = finetune_loop(cfg, out, resume=resume)
    typer.echo(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=2))


@app.command("eval")
def eval_cmd(run: Path = RUN, store: str = STORE,
             split: Optional[str] = typer.Option(None, "--split", help="Split name or scene list file (default: the val split, or every scene of a store that has none; 'all' = every scene)."),
             ov_split: Optional[str] = typer.Option(None, "--ov-split", help="Open-vocabulary split (default: the run's)."),
             combine: Optional[str] = typer.Option(None, "--combine", help="calibrated | clip | semantic (default: the run's rule, its config's `combine`)"),
             min_region_size: int = typer.Option(100, "--min-region-size", help="Smallest instance in points."),
             ensemble_2d: bool = typer.Option(False, "--ensemble-2d", help="Per point, the 3D CLIP feature or the scene's fused 2D one, whichever is more confident (OpenScene's 2D-3D ensemble; needs the embed stage)."),
             vs_fusion: bool = typer.Option(False, "--vs-fusion", help="Also score the prediction against the 2D fusion's class of every point (CLIP on the scene's own images, no 3D label; needs the embed stage): the novel classes seen without a novel label, for choosing on dev scenes."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON file (default RUN/eval/<store>.<split>.json).")) -> None:
    """Semantic mIoU, open-vocabulary base/novel/hIoU, instance AP and box mAP; table + JSON."""
    from ws3d_train.infer.evaluate import evaluate, format_table, write_json
    from ws3d_train.run import eval_path, has_split, resolve_scene_ids

    st = _open_store(store)
    if split is None:  # the val split where the store's dataset has one, else every scene (said so)
        split = "val" if has_split(st, "val") else "all"
        if split == "all":
            typer.secho(f"warning: {store} has no 'val' split (scans of one's own: put held-out scans under val/ "
                        "of the raw folder); evaluating every scene, training scenes included", fg=typer.colors.YELLOW,
                        err=True)
    ids = resolve_scene_ids(st, split) if split != "all" else None
    results = evaluate(run, store, ids, ov_split=ov_split, combine=combine, min_region_size=min_region_size,
                       ensemble_2d=ensemble_2d, vs_fusion=vs_fusion, progress=True)
    typer.echo(format_table(results))
    target = out or eval_path(run, store, split if split != "all" else None)  # one file per store and split
    write_json(results, target)
    typer.echo(f"written {target}")


STORE_OR_INPUT = typer.Option(None, "--store", "-s", help="Path of the ws3d store (or --input: scan files, no store).")
INPUT = typer.Option(None, "--input", "-i", help="A scan file or a folder of them (.ply .pcd .npy .npz .las .laz "
                     ".txt .xyz .pts .bin, as `ws3d ingest --dataset files` reads them): no store needed.")
READER = typer.Option(None, "--reader", help="Reader option KEY=VALUE for --input files (repeatable), e.g. up_axis=y, units=mm, kind=lidar.")


def _reader_config(options: list[str] | None) -> Any:
    from pipeline.datasets.files import FilesReaderConfig

    return _resolve(FilesReaderConfig, None, list(options or []))


def _one_of(store: str | None, input_: Path | None, command: str) -> None:
    if (store is None) == (input_ is None):
        fail(f"ws3d {command}: give --store (with --scene) or --input (scan files), one of them")


def _scan_inputs(input_: Path) -> dict[str, Path]:
    from pipeline.datasets.files import scan_files, scene_id_of

    if input_.is_dir():
        return scan_files(input_)
    if not input_.is_file():
        fail(f"{input_}: no such file or folder")
    return {scene_id_of(input_.name): input_}


def _predict_files(run: Path, input_: Path, out: Path, reader: list[str] | None, min_region_size: int,
                   device: str, instances: bool = True) -> None:
    """`ws3d predict --input`: one PLY per scan, the model loaded once for the whole folder."""
    import time

    from pipeline.errors import SceneError
    from ws3d_train.infer.model import Model
    from ws3d_train.infer.predict import write_prediction_ply

    files = _scan_inputs(input_)
    single = len(files) == 1 and input_.is_file()
    if single and out.suffix.lower() != ".ply" and out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder; give a .ply file or a folder for --out")
    reader_cfg = _reader_config(reader)
    model = Model.load(run, device=device)
    failed = 0
    for scene_id, path in files.items():
        target = out if single and out.suffix.lower() == ".ply" else out / f"{scene_id}.ply"
        start = time.perf_counter()
        try:
            pred = model.predict_file(path, reader=reader_cfg, min_instance_points=min_region_size,
                                      instances=instances)
        except (SceneError, ValueError) as exc:  # one bad file: said in one line, the others go on
            failed += 1
            typer.secho(f"error: {path}: {getattr(exc, 'message', exc)}", fg=typer.colors.RED, err=True)
            continue
        write_prediction_ply(target, pred.xyz, pred.labels, pred.instance, num_classes=len(pred.class_names),
                             boundary=pred.boundary)
        counts = np.bincount(pred.labels, minlength=len(pred.class_names))
        top = ", ".join(f"{pred.class_names[c]} {counts[c]}" for c in np.argsort(-counts)[:4] if counts[c])
        typer.echo(f"wrote {target}: {pred.num_points} points, {len(pred.instance_class)} instances in "
                   f"{time.perf_counter() - start:.2f} s; {top}")
    if failed:
        typer.echo(f"{failed} of {len(files)} scan(s) failed (see above)")
        raise typer.Exit(1)


@app.command()
def predict(run: Path = RUN, store: Optional[str] = STORE_OR_INPUT,
            input_: Optional[Path] = INPUT,
            scene: Optional[str] = typer.Option(None, "--scene", help="One scene (required for --format ply)."),
            scenes: Optional[str] = typer.Option(None, "--scenes", help="Split name or scene list file (benchmark formats; default: every scene)."),
            fmt: str = typer.Option("ply", "--format", help="ply | scannet (semantic benchmark) | scannet-instance"),
            out: Path = typer.Option(..., "--out", "-o", help="PLY file (ply; a folder for --input DIR) or folder (scannet formats)."),
            raw: Optional[Path] = typer.Option(None, "--raw", help="Raw ScanNet folder: check vertex counts against its PLYs."),
            min_region_size: int = typer.Option(100, "--min-region-size", help="Smallest exported instance in points."),
            ensemble_2d: bool = typer.Option(False, "--ensemble-2d", help="Combine the CLIP head with the scene's fused 2D features (as `ws3d eval --ensemble-2d`)."),
            reader: Optional[list[str]] = READER,
            instances: bool = typer.Option(True, "--instances/--no-instances", help="--input: group over-segments into instances (over-segmenting is most of a scan's time); --no-instances writes instance -1."),
            device: str = typer.Option("auto", "--device")) -> None:
    """Write a scene coloured by predicted class (PLY), scans from files, or scenes in the ScanNet benchmark formats."""
    from ws3d_train.infer.predict import predict_scene, write_prediction_ply

    _one_of(store, input_, "predict")
    if input_ is not None:
        if fmt != "ply" or ensemble_2d or scene or scenes:
            fail("--input predicts scan files as PLY files: --format, --scene(s) and --ensemble-2d need a --store")
        _predict_files(run, input_, out, reader, min_region_size, device, instances)
        return
    if not instances:
        fail("--no-instances applies to --input (a store's scenes take their over-segments from the store)")
    if fmt in ("scannet", "scannet-instance"):
        from ws3d_train.infer.export import export_scenes
        from ws3d_train.run import resolve_scene_ids

        ids = [scene] if scene else resolve_scene_ids(_open_store(store), scenes)
        paths = export_scenes(run, store, ids, out, fmt=fmt, raw=raw, min_instance_points=min_region_size,
                              ensemble_2d=ensemble_2d, progress=True)
        typer.echo(f"wrote {len(paths)} scene file(s) in the {fmt} format to {out}")
        return
    if fmt != "ply":
        fail(f"--format {fmt!r}: expected ply, scannet or scannet-instance")
    if scene is None:
        fail("--format ply writes one scene: pass --scene SCENE_ID (or --format scannet for many)")
    prediction = predict_scene(run, store, scene, ensemble_2d=ensemble_2d, device=device)
    write_prediction_ply(out, prediction)
    counts = np.bincount(prediction.pred_class, minlength=len(prediction.class_names))
    top = ", ".join(f"{prediction.class_names[c]} {counts[c]}" for c in np.argsort(-counts)[:6] if counts[c])
    typer.echo(f"wrote {out}: {len(prediction.xyz)} points, {len(prediction.instance_class)} instances; {top}")


@app.command()
def query(text: str = typer.Argument(..., help='The query, e.g. "a red chair".'), run: Path = RUN,
          store: Optional[str] = STORE_OR_INPUT, input_: Optional[Path] = INPUT,
          scene: Optional[str] = typer.Option(None, "--scene", help="The scene of the store (with --store)."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Heatmap PLY (default RUN/query_<text>_<scene>.ply)."),
          model: Optional[str] = typer.Option(None, "--model", help="CLIP model (default: the one that embedded the run's vocabulary)."),
          top_k: int = typer.Option(5, "--top-k"), reader: Optional[list[str]] = READER,
          device: str = typer.Option("auto", "--device")) -> None:
    """Per-point similarity to a text query (heatmap PLY) and the best-matching segments."""
    from ws3d_train.infer.predict import format_query, query_scene, write_heatmap_ply
    from ws3d_train.run import query_path

    _one_of(store, input_, "query")
    if input_ is not None:
        from pipeline.datasets.files import load_scan
        from ws3d_train.infer.model import Model

        if not input_.is_file():
            fail(f"{input_}: --input of `ws3d query` is one scan file")
        (scene_id, path), = _scan_inputs(input_).items()
        m = Model.load(run, device=device, text_model=model)
        scan = load_scan(path, _reader_config(reader))
        result = m.query_segments(scan.xyz, text, scan.rgb, scan.faces, top_k=top_k, scene_id=scene_id,
                                  viewpoint=scan.sensor_origin)
        target = out or query_path(run, text, scene_id)
        write_heatmap_ply(target, scan.xyz, result.similarity)
        from dataclasses import replace

        typer.echo(format_query(replace(result, ply=target)))
        return
    if scene is None:
        fail("ws3d query --store needs --scene SCENE_ID")
    target = out or query_path(run, text, scene)
    result = query_scene(run, store, scene, text, model_dir=model, top_k=top_k, out_ply=target, device=device)
    typer.echo(format_query(result))


@app.command()
def view(store: Optional[str] = STORE_OR_INPUT, input_: Optional[Path] = INPUT,
         scene: Optional[str] = typer.Option(None, "--scene", help="Scene shown first (default: the first)."),
         run: Optional[Path] = typer.Option(None, "--run", help="A run folder or checkpoint: predictions and queries."),
         port: int = typer.Option(8080, "--port"),
         host: str = typer.Option("127.0.0.1", "--host", help="Bind address (0.0.0.0 exposes the page to the network)."),
         point_budget: int = typer.Option(400_000, "--point-budget", help="Points drawn at most (larger scenes: a random subset)."),
         model: Optional[str] = typer.Option(None, "--model", help="CLIP model for queries (default: the run's)."),
         reader: Optional[list[str]] = READER,
         device: str = typer.Option("auto", "--device")) -> None:
    """Interactive web viewer (viser): colour modes, legend, scene picker, text queries, camera views."""
    import time

    from ws3d_train.viewer.server import serve

    _one_of(store, input_, "view")
    app_ = serve(store, scene, run=run, host=host, port=port, point_budget=point_budget, device=device, model_dir=model,
                 scans=input_, reader=_reader_config(reader) if input_ is not None else None)
    typer.echo(f"ws3d view: http://{host}:{app_.port}  (remote machine: ssh -L {app_.port}:127.0.0.1:{app_.port} "
               f"user@host, then open http://127.0.0.1:{app_.port}); Ctrl-C stops")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        app_.stop()


@app.command()
def report(run: Path = RUN, out: Path = typer.Option(..., "--out", "-o"),
           store: Optional[str] = typer.Option(None, "--store", "-s", help="Default: the run's store (a folder or a URL)."),
           scene: Optional[str] = typer.Option(None, "--scene"), query_text: Optional[str] = typer.Option(None, "--query")) -> None:
    """Pictures of a run: curves, results table, views GT vs prediction, a query heatmap."""
    from ws3d_train.infer.report import write_report

    paths = write_report(run, out, store=str(store) if store else None, scene=scene, query=query_text)
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command()
def demo(out: Path = typer.Option(Path("data/demo"), "--out", "-o"),
         scale: float = typer.Option(1.0, "--scale", help="Multiplies scene counts and steps (DEMO_SCALE)."),
         ablation: bool = typer.Option(False, "--ablation", help="The miniature benchmark: the settings of `rows` over `seeds`."),
         config: Optional[Path] = CONFIG, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """The whole method on synthetic rooms: preprocess, teacher, pre-train, fine-tune, evaluate, pictures."""
    from ws3d_train.demo import DemoConfig, run_demo

    cfg = _resolve(DemoConfig, config, [f"out={out}", f"scale={scale}", f"ablation={str(ablation).lower()}",
                                        *(overrides or [])])
    run_demo(cfg, echo=typer.echo)


@app.command()
def bench(out: Path = typer.Option(Path("data/bench.json"), "--out", "-o"),
          sections: Optional[list[str]] = typer.Option(None, "--section", help="Only these sections (repeatable)."),
          size: str = typer.Option("full", "--size", help="full | tiny"),
          store: Optional[str] = typer.Option(None, "--store", help="A preprocessed store for the trainer sections.")) -> None:
    """Measure every stage against a reference in the same process; a table and a JSON file."""
    from ws3d_train.bench import format_table, run_bench, write_json

    results = run_bench(sections, size=size, store=store, echo=typer.echo)
    write_json(results, out)
    typer.echo(format_table(results))
    typer.echo(f"written {out}")


if __name__ == "__main__":
    app()
