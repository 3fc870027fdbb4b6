"""`ws3d demo` / `make demo`: the whole method end to end on synthetic rooms, honestly small.

The protocol (recorded in results.json as `protocol`):

- the offline teacher (the stand-in for CLIP) is fitted on its **own corpus**: rooms synthesised
  from a separate seed namespace with their own scene ids (:mod:`pipeline.teacher.corpus`), rendered into
  a separate store. It never opens the 3D store; the trainers refuse a teacher whose corpus is
  their store or shares any of their scenes;
- the 3D rooms are split into named train, dev and validation lists: the dev rooms are carved
  from the training rooms (base-class labels only, left out of pre-training and fine-tuning) and
  are where weights and rules are chosen; pre-training and fine-tuning read only the train list,
  evaluation the validation list; nothing is tuned on validation rooms;
- novel classes get no label from the 3D rooms through any path (loss, boundary target, model
  selection): fine-tuning sees `labels` points per scene of the base classes only;
- one table from one prediction: mIoU, base, novel and harmonic-mean IoU all from the final
  (calibrated) prediction; the semantic head alone is a separate column; AP and box mAP count
  instances of at least `min_region_size` points;
- a 2D-fusion row (the teacher's segment embeddings against the class texts, projected onto the
  points through the stored pixel->point maps, no 3D training) shows what 3D training adds; the
  full run's CLIP head ensembled per point with those 2D features (OpenScene's 2D-3D ensemble,
  the scenes' own images at inference time, no label) is a row of its own, from the same
  checkpoint.

Synthesises rooms (train + val) in the ScanNet raw layout, preprocesses them through the executor
(ingest, over-segment, render), builds the teacher corpus and fits the teacher on it, embeds,
pre-trains, fine-tunes with few labels on the base classes of the synthetic open-vocabulary split,
evaluates on the validation rooms, and writes a results table (JSON + terminal) and pictures.
With `ablation=True` it runs the miniature benchmark instead: the rows of `rows` (supervised
only; + the boundary network and energy; + region contrast at several stages (and at one, for
comparison); + pre-training; all base labels; the 2D-3D ensemble; 2D fusion) in each label setting
of `settings` (``la``: limited annotations, `labels` points a room; ``lr``: limited
reconstructions, `limited_rooms` training rooms fully labelled on base classes) over `seeds`,
resumable per row, setting and seed (each finished evaluation is kept in
eval/<split>/<setting>_<row>_s<seed>[_<tag>][_refit].json). With `eval_split="dev"` it scores on the dev rooms
instead (novel labels hidden there too), with `overrides` applied to every trained row: how the
weights and rules of SETTINGS were chosen (docs/benchmarks.md).

Writes under `out/`: raw/, store.zarr, train.txt dev.txt val.txt lr.txt, corpus/ (raw/,
store.zarr), teacher/, pretrain[_sN]/, finetune_*/, eval/, results.json, report/ (PNGs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import from_dict, to_dict
from pipeline.embed.config import EmbedConfig
from pipeline.executor import ExecutorConfig
from pipeline.datasets.synthetic import SynthConfig, synthesise


@dataclass(frozen=True)
class DemoConfig:
    """The demo and the miniature benchmark."""

    out: str = "data/demo"
    """Output folder."""
    scale: float = 1.0
    """Multiplies the scene counts and training steps (DEMO_SCALE)."""
    train_scenes: int = 24
    """Training rooms at scale 1."""
    val_scenes: int = 8
    """Validation rooms at scale 1 (never seen by the teacher or the trainer)."""
    dev_scenes: int = 4
    """Training rooms set aside at scale 1 as the dev split (base-class labels only): where weights
    and rules are chosen, by runs that never train on them. 0: none."""
    refit: bool = True
    """Runs scored on the validation rooms train on the training and dev rooms together (the usual
    refit once model selection is done: the dev rooms' labelled points are part of the label
    budget, and the validation rooms stay unseen); runs scored on the dev rooms never train on
    them. False: validation runs train on the training rooms alone."""
    limited_rooms: int = 5
    """Limited reconstructions (setting ``lr``): training rooms fully labelled on base classes,
    the only rooms fine-tuning reads (pre-training still reads every training room)."""
    seed: int = 0
    """Seed of the rooms, the label draw and training."""
    room: SynthConfig = SynthConfig()
    """How rooms are generated."""
    labels: str = "la20"
    """Label budget of fine-tuning (labelled points per scene)."""
    ov_split: str = "b15n4"
    """Open-vocabulary split of the synthetic classes (novel classes get no labels)."""
    voxel_size_m: float = 0.08
    """Voxel size of the trainer (8 cm keeps the CPU demo inside its time budget; 2 cm at paper scale)."""
    max_voxels: int = 40_000
    """Crop size of training samples."""
    network_preset: str = "tiny"
    """Sparse U-Net preset."""
    corpus_rooms: int = 24
    """Rooms of the teacher's own corpus at scale 1 (a separate seed namespace and scene ids; 20%
    held out to measure the teacher)."""
    teacher_steps: int = 500
    """Training steps of the offline teacher (a step count, not a time budget, so that the demo's
    teacher does not depend on how busy the machine is)."""
    teacher_seconds: float = 1800.0
    """Safety cap on the teacher's training time (far above the 500 steps' ~5 minutes on one idle
    core, so that the step count, not the machine's load, decides the teacher)."""
    teacher_threads: int = 1
    """torch threads of the teacher's training: on a shared 2-core machine one thread ran ~4x faster
    than two (0.6 vs 2.6 s a step, measured under load; the model is small)."""
    pretrain_steps: int = 250
    """Pre-training steps at scale 1."""
    finetune_steps: int = 200
    """Fine-tuning steps at scale 1."""
    batch_size: int = 2
    """Scenes per training batch."""
    lr: float = 2e-3
    """Peak learning rate of both loops."""
    ablation: bool = False
    """Run the miniature benchmark (the settings of `rows` over `seeds`) instead of the single full run."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds of the miniature benchmark (the rooms, corpus and labelled points stay those of `seed`)."""
    rows: tuple[str, ...] = ("supervised", "+boundary energy", "+region (multi-stage)", "+region (single-stage)",
                             "+pretrain (full)", "full + 2d-3d ensemble", "all base labels", "2d fusion")
    """Rows of the miniature benchmark (keys of SETTINGS, "full + 2d-3d ensemble" and "2d fusion")."""
    settings: tuple[str, ...] = ("lr", "la")
    """Label settings of the miniature benchmark (keys of LABEL_SETTINGS); "all base labels" and
    "2d fusion" do not depend on them and run once."""
    eval_split: str = "val"
    """Where rows are scored: ``val`` (the validation rooms) or ``dev`` (the dev rooms carved from
    the training rooms, novel labels hidden: model selection)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """FinetuneConfig fields applied to every trained row on top of SETTINGS (dev searches)."""
    tag: str = ""
    """Suffix of run folders and kept evaluations (tells dev variants apart)."""
    min_region_size: int = 20
    """Smallest instance (points) counted by AP and box mAP (ScanNet: 100; the 8-cm demo rooms are small)."""
    embed: EmbedConfig = EmbedConfig()
    """EmbedConfig fields for the demo: the stage's default ("packed"). Until issue 26 the demo
    used mode "crops" with 2 views x 2 scales (`embed.mode=crops embed.views_per_segment=2
    embed.scales=[1.0,2.0]`); docs/benchmarks.md compares the two."""
    executor: ExecutorConfig = ExecutorConfig(kind="local")
    """Where preprocessing runs."""
    num_workers: int = 0
    """DataLoader workers of the trainer (0 on 2-core machines: the main process decodes)."""
    train_threads: int = 1
    """torch threads of pre-training and fine-tuning (the sparse convolutions run on
    one CPU thread anyway; the rest of a tiny U-Net's step gains little from a second thread and
    loses much when the cores are shared)."""
    report: bool = True
    """Write pictures of the run."""


COMMON: dict[str, Any] = {"combine": "calibrated", "energy_confidence_weight": 1.0}
"""Rules shared by every trained row (chosen on the dev rooms: docs/benchmarks.md)."""
ENERGY: dict[str, Any] = {"w_energy": 0.1}
"""The energy's weight in every row that has it (chosen on the dev rooms)."""
REGION: dict[str, Any] = {"w_region": 0.1, "region_stages": [8, 4, 2, 1], "region_embedding": "projection"}
"""Region contrast at the four decoder stages, each through its projection head."""
PRETRAINED: dict[str, Any] = {"init": True, "w_align": 1.0, "boundary_teacher_weight": 0.5}
"""With pre-training, fine-tuning keeps the segments aligned with the teacher (w_align): the only
signal the novel classes get, since their labels are removed. The boundary network also learns the
teacher's region-level edges at half weight (chosen on the dev rooms, LA seed 0: boundary AP 0.28
-> 0.39, mIoU 20.2 -> 20.3; no 3D label involved)."""

SETTINGS: dict[str, dict[str, Any]] = {
    "supervised": {**COMMON, "init": False, "w_boundary": 0.0, "w_energy": 0.0, "w_region": 0.0, "two_copies": False},
    # the boundary network and the boundary-aware energy acting on its region-level boundaries
    "+boundary energy": {**COMMON, **ENERGY, "init": False, "w_region": 0.0, "two_copies": False},
    "+region (multi-stage)": {**COMMON, **ENERGY, **REGION, "init": False},
    # the earlier single-stage contrast (last decoder features, no projection head), for comparison
    "+region (single-stage)": {**COMMON, **ENERGY, **REGION, "init": False, "region_stages": [1], "region_embedding": "feats"},
    "+pretrain (full)": {**COMMON, **ENERGY, **REGION, **PRETRAINED},
    # the upper bound of the label budget: every point of the base classes labelled (novel still none)
    "all base labels": {**COMMON, **ENERGY, **REGION, **PRETRAINED, "labels": "all"},
    # diagnostics (not in the default rows): the boundary network alone, the energy left out of
    # the full method; read against the rows above, never used to choose a default
    "+boundary only": {**COMMON, "init": False, "w_energy": 0.0, "w_region": 0.0, "two_copies": False},
    "full without energy": {**COMMON, **REGION, **PRETRAINED, "w_energy": 0.0},
}
"""The miniature benchmark's trained rows, each adding one part of the method, and the
all-labels upper bound; the "2d fusion" row needs no training (:mod:`ws3d_train.infer.fusion`)."""
LABEL_SETTINGS: dict[str, str] = {"la": "limited annotations", "lr": "limited reconstructions"}
"""The label settings: ``la`` `labels` points a training room; ``lr`` `limited_rooms` training rooms
fully labelled (base classes), the other training rooms unused by fine-tuning."""
SHARED_ROWS = ("all base labels", "2d fusion")
"""Rows that do not depend on the label setting (run once, named without it)."""
FUSION_ROW = "2d fusion"
ENSEMBLE_ROW = "full + 2d-3d ensemble"
"""The full run's network, its CLIP head ensembled per point with the scene's fused 2D features
(OpenScene's 2D-3D ensemble): no extra training, the same checkpoint as "+pretrain (full)"."""
FULL_ROW = "+pretrain (full)"


def _n(value: int, scale: float) -> int:
    return max(1, int(round(value * scale)))


def prepare(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Rooms -> a preprocessed store; a corpus -> a fitted teacher; the store embedded with it.
    Returns paths, scene lists and the teacher's numbers."""
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.corpus import CorpusConfig, build_corpus
    from pipeline.teacher.evaluate import crop_accuracy_on_store
    from pipeline.teacher.fit import run_fit
    from pipeline.workflow import WorkflowConfig, run_workflow
    from ws3d_train.run import resolve_ov_split

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_train, n_val = _n(cfg.train_scenes, cfg.scale), _n(cfg.val_scenes, cfg.scale)
    raw, store = out / "raw", out / "store.zarr"
    t0 = time.perf_counter()
    ids = synthesise(raw, n_train + n_val, seed=cfg.seed, cfg=cfg.room)
    lists = split_rooms(ids[:n_train], ids[n_train:], dev=min(_n(cfg.dev_scenes, cfg.scale), n_train - 1) if cfg.dev_scenes else 0,
                        limited=_n(cfg.limited_rooms, cfg.scale), seed=cfg.seed)
    train_ids, dev_ids, val_ids = lists["train"], lists["dev"], lists["val"]
    for name, scene_list in {**lists, "fit": sorted(train_ids + dev_ids)}.items():  # fit: the refit's rooms
        _write_if_changed(out / f"{name}.txt", "\n".join(scene_list) + "\n")
    timings: dict[str, float] = {"synth": time.perf_counter() - t0}
    echo(f"synth: {len(ids)} rooms ({len(train_ids)} train, {len(dev_ids)} dev carved from the training rooms, "
         f"{len(val_ids)} val) in {timings['synth']:.0f} s")
    base = WorkflowConfig(dataset="synthetic", raw=str(raw), store=str(store), executor=cfg.executor,
                          stages=("ingest", "overseg", "render"))
    reports = run_workflow(base, echo=echo)
    for report in reports:
        timings[report.stage] = report.seconds
        if not report.ok:
            raise RuntimeError(f"demo preprocessing failed:\n{report.summary()}")

    # the teacher's own corpus: other rooms (seed namespace, scene ids), another store
    t0 = time.perf_counter()
    corpus = build_corpus(out / "corpus", CorpusConfig(rooms=_n(cfg.corpus_rooms, cfg.scale), seed=cfg.seed, room=cfg.room),
                          executor=cfg.executor, echo=echo)
    timings["corpus"] = time.perf_counter() - t0
    shared = sorted(set(corpus["scenes"]) & set(ids))
    if shared:  # by construction impossible; checked because every claim of the demo rests on it
        raise RuntimeError(f"teacher corpus and 3D rooms share scene ids {shared[:3]}")
    teacher_dir = out / "teacher"
    tcfg = TeacherConfig(steps=_n(cfg.teacher_steps, max(1.0, cfg.scale)),
                         max_seconds=cfg.teacher_seconds * max(1.0, cfg.scale), seed=cfg.seed,
                         threads=cfg.teacher_threads)
    t0 = time.perf_counter()
    report_path = teacher_dir / "teacher_report.json"
    if not (teacher_dir / "config.json").exists() or not report_path.exists():
        fit = run_fit(corpus["store"], None, teacher_dir, tcfg)  # the corpus store only
    else:
        fit = json.loads(report_path.read_text())
    timings["teacher"] = time.perf_counter() - t0
    echo("teacher (held-out corpus rooms): " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in fit.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))
    # the teacher on crops of the 3D validation rooms (evaluation only), by base and novel class
    split = resolve_ov_split(cfg.ov_split, list(_class_names(str(store))), "synthetic")
    # (200 crops a room: a measurement, not training data; it costs seconds, not a minute)
    on_val = crop_accuracy_on_store(teacher_dir, str(store), val_ids, dataclasses.replace(tcfg, max_crops_per_scene=200),
                                    base_ids=split.base,
                                    novel_ids=split.novel, ignored_ids=split.ignored)
    echo(f"teacher crop-classification accuracy on the 3D validation rooms: all {on_val['all']:.3f}, "
         f"base {on_val['base']:.3f} ({on_val['n_base']} crops), novel {on_val['novel']:.3f} ({on_val['n_novel']} crops)")
    embed_cfg = dataclasses.replace(base, stages=("embed",), embed=dataclasses.replace(cfg.embed, model=str(teacher_dir)))
    for report in run_workflow(embed_cfg, echo=echo):
        timings[report.stage] = report.seconds
        if not report.ok:
            raise RuntimeError(f"demo embedding failed:\n{report.summary()}")
    return {"raw": str(raw), "store": str(store), "teacher": str(teacher_dir), "train": train_ids,
            "val": val_ids, "dev": dev_ids, "lr": lists["lr"], "train_list": str(out / "train.txt"),
            "val_list": str(out / "val.txt"), "dev_list": str(out / "dev.txt"), "lr_list": str(out / "lr.txt"),
            "fit_list": str(out / "fit.txt"),
            "corpus_store": corpus["store"], "corpus_scenes": corpus["scenes"],
            "teacher_fit": fit, "teacher_on_val": on_val, "split": split, "preprocess_seconds": timings}


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` unless the file holds it already (a run of the benchmark beside another on the
    same folder never sees a scene list half written)."""
    from ws3d_train.run import atomic_write

    if not (path.is_file() and path.read_text() == text):
        atomic_write(path, text.encode())


def split_rooms(train_all: list[str], val: list[str], *, dev: int, limited: int, seed: int) -> dict[str, list[str]]:
    """The scene lists of the demo: ``dev`` rooms drawn (seeded) from the training rooms and left
    out of training, the rest ``train``; ``lr`` the first `limited` rooms of ``train`` in a seeded
    order (the fully labelled rooms of limited reconstructions); ``val`` as given.

    Raises:
        ValueError when the dev split would take every training room.
    """
    if dev >= len(train_all) and dev > 0:
        raise ValueError(f"dev split of {dev} rooms leaves none of the {len(train_all)} training rooms to train on")
    rng = np.random.default_rng([seed, 2300])
    order = rng.permutation(len(train_all))
    dev_ids = sorted(train_all[i] for i in order[:dev])
    train = [s for s in train_all if s not in set(dev_ids)]
    lr = sorted(train[i] for i in rng.permutation(len(train))[:min(limited, len(train))])
    return {"train": train, "dev": dev_ids, "val": list(val), "lr": lr}


def _class_names(store_path: str) -> list[str]:
    from pipeline.store import Store

    return Store.open(store_path).class_names


def protocol_record(cfg: DemoConfig, prep: dict[str, Any]) -> dict[str, Any]:
    """What the numbers rest on: teacher corpus, scene lists, class split, label budget."""
    from ws3d_train.data.labels import parse_label_budget

    names = _class_names(prep["store"])
    split = prep["split"]
    kind, amount = parse_label_budget(cfg.labels)
    return {
        "teacher_store": prep["corpus_store"], "teacher_scenes": list(prep["corpus_scenes"]),
        "teacher_seed_namespace": f"corpus_seed({cfg.seed})",
        "train_scenes": _trained_rooms(cfg, prep), "val_scenes": list(prep["val"]), "dev_scenes": list(prep["dev"]),
        "refit": bool(training_rooms(cfg, prep)[1]),
        "dev_split": "carved from the training rooms; base-class labels only; weights and rules are chosen there "
                     "(by runs that never train on them), never on the validation rooms"
                     + ("; the runs scored on the validation rooms then train on the training and dev rooms together (refit)"
                        if training_rooms(cfg, prep)[1] else ""),
        "lr_scenes": list(prep["lr"]),
        "base_classes": [names[c] for c in split.base], "novel_classes": [names[c] for c in split.novel],
        "ignored_classes": [names[c] for c in split.ignored],
        "labels": cfg.labels, "labelled_points_per_scene": int(amount) if kind == "count" else None,
        "label_classes": "base classes only", "label_seed": cfg.seed, "min_region_size": cfg.min_region_size,
        "prediction": "calibrated (CLIP head decides base vs novel, semantic head splits the base mass)",
    }


def _trained_rooms(cfg: DemoConfig, prep: dict[str, Any]) -> list[str]:
    return sorted(prep["train"] + prep["dev"]) if training_rooms(cfg, prep)[1] else list(prep["train"])


def _train_common(cfg: DemoConfig, seed: int) -> dict[str, Any]:
    return {"data": {"voxel_size_m": cfg.voxel_size_m, "max_voxels": cfg.max_voxels},
            "network": {"preset": cfg.network_preset}, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "seed": seed, "num_workers": cfg.num_workers, "threads": cfg.train_threads, "progress": True,
            "tensorboard": False}


def training_rooms(cfg: DemoConfig, prep: dict[str, Any]) -> tuple[str, str]:
    """(scene list file, run-folder suffix) that training reads: the training rooms, or, for runs
    scored on the validation rooms with `cfg.refit`, the training and dev rooms together."""
    if cfg.refit and cfg.eval_split == "val" and prep["dev"]:
        return prep["fit_list"], "_refit"
    return prep["train_list"], ""


def run_pretrain(cfg: DemoConfig, prep: dict[str, Any], seed: int, echo: Callable[[str], None] = print) -> str:
    from ws3d_train.train.pretrain import PretrainConfig, pretrain

    scenes, suffix = training_rooms(cfg, prep)
    run = Path(cfg.out) / (f"pretrain_s{seed}{suffix}" if cfg.ablation else "pretrain")
    steps = _n(cfg.pretrain_steps, cfg.scale)
    pcfg = from_dict(PretrainConfig, {**_train_common(cfg, seed), "store": prep["store"], "scenes": scenes,
                                      "steps": steps, "warmup_steps": max(1, steps // 10),
                                      "checkpoint_every": steps}, where="demo.pretrain")
    t0 = time.perf_counter()
    summary = pretrain(pcfg, run, resume=(run / "metrics.jsonl").exists())
    echo(f"pretrain: {steps} steps in {time.perf_counter() - t0:.0f} s -> {run} ({_brief(summary)})")
    return str(run)


def run_finetune(cfg: DemoConfig, prep: dict[str, Any], name: str, overrides: dict[str, Any], seed: int,
                 init: str | None, echo: Callable[[str], None] = print, *, setting: str = "la") -> str:
    from ws3d_train.train.finetune import FinetuneConfig, finetune

    scenes, suffix = training_rooms(cfg, prep)
    if cfg.ablation:
        where = name if name in SHARED_ROWS else f"{setting}_{name}"
        run = Path(cfg.out) / f"finetune_{_slug(where)}_s{seed}{_tag(cfg)}{suffix}"
    else:
        run = Path(cfg.out) / "finetune"
    steps = _n(cfg.finetune_steps, cfg.scale)
    values = {**_train_common(cfg, seed), "store": prep["store"], "scenes": scenes, "init": init,
              "labels": cfg.labels, "label_seed": cfg.seed, "ov_split": cfg.ov_split, "steps": steps,
              "warmup_steps": max(1, steps // 10), "checkpoint_every": steps}
    if setting == "lr" and name not in SHARED_ROWS:  # a few rooms, every base-class point labelled
        values.update(labels="all", limited_scenes=prep["lr_list"])
    values.update({k: v for k, v in overrides.items() if k != "init"})
    values.update(cfg.overrides)
    fcfg = from_dict(FinetuneConfig, values, where="demo.finetune")
    t0 = time.perf_counter()
    summary = finetune(fcfg, run, resume=(run / "metrics.jsonl").exists())
    echo(f"finetune [{setting} {name}, seed {seed}]: {steps} steps in {time.perf_counter() - t0:.0f} s ({_brief(summary)})")
    return str(run)


def _tag(cfg: DemoConfig) -> str:
    return f"_{cfg.tag}" if cfg.tag else ""


def _brief(summary: dict[str, Any]) -> str:
    keys = [k for k in ("first_loss", "final_loss", "loss", "share_energy") if isinstance(summary.get(k), (int, float))]
    return ", ".join(f"{k}={summary[k]:.3f}" for k in keys) or "done"


COLUMNS = ("mIoU", "base mIoU", "novel mIoU", "hIoU", "sem-head mIoU", "AP50", "AP25", "box mAP@25", "box mAP@50",
           "boundary AP", "region AP", "flag AP", "interface AP", "novel mIoU vs 2d fusion")
"""The columns of the results table (in %; the boundary ones are average precisions against true
semantic boundaries: the boundary network's voxels, its region-level labels, the over-segmentation
flag, the voxels on over-segment interfaces); "novel mIoU vs 2d fusion" scores the prediction's
novel classes against the 2D fusion's class of every point (CLIP on the rooms' own images, no 3D
label): on the dev rooms, where novel labels stay hidden, it is how model selection sees what
fine-tuning keeps of the open vocabulary."""


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of the results table from an `evaluate` (or `evaluate_fusion`) result: mIoU,
    base, novel and hIoU all from the final (combined) prediction; the semantic head alone apart;
    boundary average precisions."""
    sem = metrics.get("semantic", {})
    ov = (metrics.get("open_vocab", {}) or {}).get("combined", {}) or {}
    inst, box = metrics.get("instance", {}) or {}, metrics.get("box", {}) or {}
    bd = metrics.get("boundary", {}) or {}

    def pick(d: dict[str, Any], *keys: str) -> float:
        for key in keys:
            if isinstance(d.get(key), (int, float)):
                return float(d[key])
        return float("nan")

    return {"mIoU": pick(ov, "miou"), "base mIoU": pick(ov, "base_miou"), "novel mIoU": pick(ov, "novel_miou"),
            "hIoU": pick(ov, "hiou"), "sem-head mIoU": pick(sem, "miou"), "AP50": pick(inst, "ap50"),
            "AP25": pick(inst, "ap25"), "box mAP@25": pick(box, "map@0.25", "map25"),
            "box mAP@50": pick(box, "map@0.5", "map50"), "boundary AP": pick(bd.get("head") or {}, "ap"),
            "region AP": pick(bd.get("region") or {}, "ap"), "flag AP": pick(bd.get("overseg_flag") or {}, "ap"),
            "interface AP": pick(bd.get("overseg_interface") or {}, "ap"),
            "novel mIoU vs 2d fusion": pick(metrics.get("vs_2d_fusion") or {}, "novel_miou")}


def _slug(name: str) -> str:
    return name.replace("+", "plus_").replace(" ", "_").replace("(", "").replace(")", "")


def row_key(setting: str, name: str) -> str:
    """The results table's name of a row in a label setting ("LA +pretrain (full)"); rows that do not
    depend on the setting keep their own name."""
    return name if name in SHARED_ROWS else f"{setting.upper()} {name}"


def kept_evaluation(cfg: DemoConfig, prep: dict[str, Any], name: str, seed: int, setting: str = "la") -> Path:
    """Where the benchmark keeps the evaluation of one row, setting and seed (read back instead of
    training again): per split, tag and training rooms (a refit run is another run)."""
    where = name if name in SHARED_ROWS else f"{setting}_{name}"
    trained_on = "" if name == FUSION_ROW else training_rooms(cfg, prep)[1]
    return Path(cfg.out) / "eval" / cfg.eval_split / f"{_slug(where)}_s{seed}{_tag(cfg)}{trained_on}.json"


def _evaluate_row(cfg: DemoConfig, prep: dict[str, Any], name: str, seed: int, pre_run: Callable[[], str],
                  echo: Callable[[str], None], setting: str = "la") -> tuple[dict[str, Any], str | None]:
    """One row, setting and seed: train (resumable) and evaluate on `cfg.eval_split`, or read the kept evaluation."""
    from ws3d_train.infer.evaluate import evaluate, evaluate_fusion, json_safe

    kept = kept_evaluation(cfg, prep, name, seed, setting)
    if cfg.ablation and kept.is_file():
        echo(f"{row_key(setting, name)} [seed {seed}]: kept evaluation {kept}")
        return json.loads(kept.read_text()), None
    scenes, hidden = _eval_scenes(cfg, prep)
    run = None
    if name == FUSION_ROW:
        metrics = evaluate_fusion(prep["store"], scenes, ov_split=cfg.ov_split, min_region_size=cfg.min_region_size)
    else:
        trained = FULL_ROW if name == ENSEMBLE_ROW else name  # the ensemble reuses the full run
        overrides = SETTINGS[trained]
        run = run_finetune(cfg, prep, trained, overrides, seed, pre_run() if overrides["init"] else None, echo,
                           setting=setting)
        metrics = evaluate(run, prep["store"], scenes, ov_split=cfg.ov_split, min_region_size=cfg.min_region_size,
                           ensemble_2d=name == ENSEMBLE_ROW, gt_ignore=hidden, vs_fusion=True)
        if cfg.eval_split == "dev":  # the other combination rule too: the rule is chosen here
            rule = metrics["open_vocab"]["combine"]
            other = "clip" if rule == "calibrated" else "calibrated"
            metrics["other_combine"] = {"combine": other, **_headline(evaluate(
                run, prep["store"], scenes, ov_split=cfg.ov_split, min_region_size=cfg.min_region_size,
                ensemble_2d=name == ENSEMBLE_ROW, gt_ignore=hidden, combine=other))}
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(json_safe(metrics)))
    return metrics, run


def _eval_scenes(cfg: DemoConfig, prep: dict[str, Any]) -> tuple[list[str], tuple[int, ...]]:
    """The scenes rows are scored on and the classes whose labels are hidden there: on the dev
    rooms the novel classes' labels stay unseen (nothing is chosen on a novel label)."""
    if cfg.eval_split == "val":
        return list(prep["val"]), ()
    if cfg.eval_split == "dev":
        if not prep["dev"]:
            raise ValueError("DemoConfig.eval_split='dev' needs dev rooms (dev_scenes > 0)")
        return list(prep["dev"]), tuple(prep["split"].novel)
    raise ValueError(f"DemoConfig.eval_split: expected 'val' or 'dev', got {cfg.eval_split!r}")


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo (or, with cfg.ablation, the miniature benchmark). Returns and writes results.json."""
    start = time.perf_counter()
    names = list(cfg.rows) if cfg.ablation else [FULL_ROW, ENSEMBLE_ROW, FUSION_ROW]
    settings = list(cfg.settings) if cfg.ablation else ["la"]
    unknown = [n for n in names if n not in SETTINGS and n not in (ENSEMBLE_ROW, FUSION_ROW)]
    unknown += [f"setting {s}" for s in settings if s not in LABEL_SETTINGS]
    if unknown:  # before hours of preprocessing
        raise ValueError(f"DemoConfig.rows/settings: unknown {unknown}; rows: {[*SETTINGS, ENSEMBLE_ROW, FUSION_ROW]}, "
                         f"settings: {list(LABEL_SETTINGS)}")
    if cfg.eval_split not in ("val", "dev"):
        raise ValueError(f"DemoConfig.eval_split: expected 'val' or 'dev', got {cfg.eval_split!r}")
    prep = prepare(cfg, echo)
    fit, on_val = prep["teacher_fit"], prep["teacher_on_val"]
    results: dict[str, Any] = {
        "config": to_dict(cfg), "train_scenes": len(_trained_rooms(cfg, prep)), "val_scenes": len(prep["val"]),
        "dev_scenes": len(prep["dev"]), "eval_split": cfg.eval_split,
        "preprocess_seconds": prep["preprocess_seconds"], "protocol": protocol_record(cfg, prep),
        "teacher": {
            "crop_accuracy_heldout_corpus": fit.get("crop_accuracy_heldout"),
            "crop_class_accuracy_heldout_corpus": fit.get("crop_class_accuracy_heldout"),
            "majority_heldout_corpus": fit.get("majority_heldout"),
            "colour_accuracy_heldout_corpus": fit.get("colour_accuracy_heldout"),
            "crop_accuracy_3d_val": {k: on_val[k] for k in ("all", "base", "novel", "n_base", "n_novel")},
            "steps": fit.get("steps"), "seconds": prep["preprocess_seconds"].get("teacher"),
        },
        **chance_iou(prep["store"], _eval_scenes(cfg, prep)[0], cfg.ov_split),
    }
    rows: dict[str, list[dict[str, float]]] = {}
    other_rule: dict[str, list[dict[str, float]]] = {}
    seeds = cfg.seeds if cfg.ablation else (cfg.seed,)
    last_run = None
    row_seconds: dict[str, float] = {}
    for seed in seeds:
        pre: dict[str, str] = {}

        def pre_run(seed: int = seed, pre: dict[str, str] = pre) -> str:  # once per seed, if a row needs it
            if "run" not in pre:
                pre["run"] = run_pretrain(cfg, prep, seed, echo)
            return pre["run"]

        for setting in settings:
            for name in names:
                if name in SHARED_ROWS and setting != settings[0]:
                    continue  # the same in every setting
                if name == FUSION_ROW and seed != seeds[0]:
                    continue  # nothing is trained: the same for every seed
                key = row_key(setting, name)
                t0 = time.perf_counter()
                metrics, run = _evaluate_row(cfg, prep, name, seed, pre_run, echo, setting)
                row_seconds[key] = row_seconds.get(key, 0.0) + time.perf_counter() - t0
                rows.setdefault(key, []).append(_headline(metrics))
                if "other_combine" in metrics:
                    other_rule.setdefault(key, []).append(metrics["other_combine"])
                if name == FULL_ROW:
                    last_run = run or last_run
                    if not cfg.ablation:
                        results["metrics"] = metrics
                elif name == FUSION_ROW and not cfg.ablation:
                    results["fusion_metrics"] = metrics
    results["table"] = {name: _aggregate(values) for name, values in rows.items()}
    if other_rule:
        results["other_combine"] = {name: {"combine": values[0]["combine"],
                                           **_aggregate([{k: v for k, v in x.items() if k != "combine"} for x in values])}
                                    for name, values in other_rule.items()}
    results["ratios"] = anchor_ratios(results["table"], results["chance_miou"])
    if not cfg.ablation and last_run is not None:  # the per-vertex boundaries of `ws3d predict` on the raw annotation
        scenes, hidden = _eval_scenes(cfg, prep)
        results["vertex_boundaries"] = vertex_boundary_check(last_run, prep, scenes, hidden_classes=hidden, echo=echo)
    results["row_seconds"] = row_seconds
    results["seconds"] = time.perf_counter() - start
    out = Path(cfg.out)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2))
    echo(format_results(results))
    if cfg.report and last_run is not None and not cfg.ablation:
        try:
            from ws3d_train.infer.report import write_report

            write_report(last_run, out / "report", store=prep["store"], scene=prep["val"][0])
            echo(f"pictures: {out / 'report'}")
        except ImportError as exc:  # pictures are a nicety; the numbers are already written
            echo(f"report skipped: {exc}")
    return results


def vertex_boundary_check(run: str, prep: dict[str, Any], scene_ids: list[str], *, radius_m: float = 0.05,
                          hidden_classes: tuple[int, ...] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The per-vertex ``boundary`` of ``ws3d predict`` (:func:`ws3d_train.infer.predict.predict_scene`)
    against true semantic boundaries taken from the raw annotation: a labelled vertex joined to a
    labelled vertex of another class by a mesh edge or lying within `radius_m` of one (the dataset
    reader's labels, novel classes included; the synthetic rooms' objects are meshes of their own,
    so their edges never cross a class), beside the over-segmentation's per-point border flag and
    random (AP = the share of boundary vertices). Also the boundary network's voxel probability per
    vertex (``head``). `hidden_classes` are treated as unlabelled (dev rooms: the novel classes)."""
    from scipy.spatial import cKDTree

    from pipeline import schema
    from pipeline.datasets import get_dataset
    from pipeline.store import Store
    from ws3d_train.infer.boundary import point_boundary, voxel_boundaries
    from ws3d_train.infer.metrics import BoundaryCurve, boundary_quality, semantic_boundaries
    from ws3d_train.infer.predict import infer_scene, load_run, predict_scene

    store = Store.open(prep["store"])
    reader = get_dataset(store.dataset, readable=True)
    loaded = load_run(run)
    curves = {"predict": BoundaryCurve(), "head": BoundaryCurve(), "overseg_flag": BoundaryCurve()}
    for scene_id in scene_ids:
        raw = reader.read_scene(prep["raw"], scene_id)
        if raw.faces is None:
            raise ValueError(f"{scene_id}: the vertex check needs a mesh (faces) in the raw annotation")
        faces = raw.faces.astype(np.int64)
        near = cKDTree(raw.xyz).query_pairs(radius_m, output_type="ndarray").astype(np.int64)
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [0, 2]], near.reshape(-1, 2)])
        labels = raw.semantic.astype(np.int64)
        labels[np.isin(labels, np.asarray(hidden_classes, np.int64))] = schema.IGNORE_INDEX
        truth = semantic_boundaries(labels, edges)
        labelled = labels != schema.IGNORE_INDEX
        pred = predict_scene(loaded, prep["store"], scene_id)
        if pred.boundary is None or pred.boundary.shape[0] != labels.shape[0]:
            raise ValueError(f"{scene_id}: {0 if pred.boundary is None else pred.boundary.shape[0]} predicted vertices for "
                             f"{labels.shape[0]} raw vertices")
        flag = store.read(scene_id, schema.BOUNDARY)
        outputs = infer_scene(loaded, store, scene_id)
        p2v = outputs.point_to_voxel.cpu().numpy()
        head = point_boundary(voxel_boundaries(outputs.coords, outputs.boundary, p2v, store.read(scene_id, schema.SEGMENT),
                                               flag), p2v, flag, "head")
        for name, score in (("predict", pred.boundary), ("head", head), ("overseg_flag", flag.astype(np.float64))):
            curves[name].update(score[labelled], truth[labelled])
    out: dict[str, Any] = {"truth": f"raw-annotation vertex joined by a mesh edge to, or within {radius_m} m of, a vertex "
                                    "of another class",
                           "scenes": len(scene_ids), **{k: boundary_quality(c) for k, c in curves.items()}}
    out["random"] = {"ap": out["predict"]["positive_rate"]}
    flag_ap = out["overseg_flag"]["ap"]
    out["predict_ap_over_flag"] = out["predict"]["ap"] / flag_ap if flag_ap else float("nan")
    out["head_ap_over_flag"] = out["head"]["ap"] / flag_ap if flag_ap else float("nan")
    echo(f"boundaries per vertex (ws3d predict vs the raw annotation, {len(scene_ids)} rooms): AP {out['predict']['ap']:.3f} "
         f"(head alone {out['head']['ap']:.3f}), over-segmentation flag {flag_ap:.3f}, random {out['random']['ap']:.3f}: "
         f"{out['predict_ap_over_flag']:.2f}x the flag")
    return out


def chance_iou(store_path: str, scene_ids: list[str], ov_split: str) -> dict[str, float]:
    """mIoU of a uniformly random prediction over the C classes, from the validation labels:
    E[IoU_c] = (n_c / C) / (n_c + N / C - n_c / C) for a class with n_c of the N labelled points;
    averaged over the classes present (all, and the novel ones of the split). The targets
    ("novel mIoU >= 3x chance") are measured against these."""
    from pipeline import schema
    from pipeline.datasets import load_ov_split
    from pipeline.store import Store

    store = Store.open(store_path)
    num_classes = len(store.class_names)
    counts = np.zeros(num_classes, dtype=np.float64)
    for scene_id in scene_ids:
        semantic = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
        counts += np.bincount(semantic[semantic >= 0], minlength=num_classes)
    total = counts.sum()
    expected = (counts / num_classes) / np.maximum(counts + total / num_classes - counts / num_classes, 1e-12)
    present = counts > 0
    novel = np.zeros(num_classes, dtype=bool)
    novel[list(load_ov_split(store.dataset, ov_split).novel)] = True
    return {"chance_miou": float(expected[present].mean()),
            "chance_novel_miou": float(expected[present & novel].mean()) if (present & novel).any() else float("nan")}


def anchor_ratios(table: dict[str, dict[str, dict[str, float]]], chance: float) -> dict[str, float]:
    """The ratios the issues compare with their goals and the literature's anchors, from the
    table's means, per label setting present (``la`` rows unprefixed in the keys, ``lr`` rows
    ``lr_``): full method over the all-base-labels row (CSC on ScanNet, 20 points a scene: 0.73),
    novel over base mIoU (PLA 0.92, RegionPLC 1.04 with a real CLIP), novel mIoU over chance, full
    minus supervised mIoU (points), what each part adds (points: the boundary energy over
    supervised, multi-stage region contrast over the boundary energy row, multi- over single-stage),
    and each row's boundary AP over the over-segmentation flag's."""
    def mean(row: str, col: str) -> float:
        return float(table[row][col]["mean"]) if row in table and col in table[row] else float("nan")

    out: dict[str, float] = {}
    for setting, prefix in (("LA", ""), ("LR", "lr_")):
        full, ens, sup = f"{setting} {FULL_ROW}", f"{setting} {ENSEMBLE_ROW}", f"{setting} supervised"
        for row, tag in ((full, "full"), (ens, "ensemble")):
            if row not in table:
                continue
            out[f"{prefix}{tag}_novel_over_base"] = mean(row, "novel mIoU") / mean(row, "base mIoU")
            out[f"{prefix}{tag}_novel_over_chance"] = mean(row, "novel mIoU") / chance
            if "all base labels" in table:
                out[f"{prefix}{tag}_over_all_base_labels"] = mean(row, "mIoU") / mean("all base labels", "mIoU")
            if sup in table:
                out[f"{prefix}{tag}_minus_supervised_miou"] = 100 * (mean(row, "mIoU") - mean(sup, "mIoU"))
        steps = (("energy_gain_miou", "+boundary energy", "supervised"),
                 ("region_gain_miou", "+region (multi-stage)", "+boundary energy"),
                 ("multi_minus_single_stage_miou", "+region (multi-stage)", "+region (single-stage)"))
        for name, a, b in steps:
            if f"{setting} {a}" in table and f"{setting} {b}" in table:
                out[f"{prefix}{name}"] = 100 * (mean(f"{setting} {a}", "mIoU") - mean(f"{setting} {b}", "mIoU"))
        for row in table:
            if row.startswith(f"{setting} ") and mean(row, "flag AP") > 0:
                slug = _slug(row[len(setting) + 1:]).lower()
                out[f"{prefix}{slug}_boundary_ap_over_flag"] = mean(row, "boundary AP") / mean(row, "flag AP")
                out[f"{prefix}{slug}_region_ap_over_flag"] = mean(row, "region AP") / mean(row, "flag AP")
                out[f"{prefix}{slug}_region_ap_over_interface"] = mean(row, "region AP") / mean(row, "interface AP")
    return out


def _aggregate(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = values[0].keys()
    return {k: {"mean": float(np.nanmean([v[k] for v in values])) if any(math.isfinite(v[k]) for v in values) else float("nan"),
                "std": float(np.nanstd([v[k] for v in values])) if len(values) > 1 else 0.0,
                "n": len(values)} for k in keys}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def format_results(results: dict[str, Any]) -> str:
    """The results table (percentages; mean ± std over seeds where there are several), with the
    protocol and the teacher's numbers above it."""
    table = results["table"]
    cols = list(COLUMNS)
    protocol = results.get("protocol") or {}
    min_size = protocol.get("min_region_size", (results.get("config") or {}).get("min_region_size"))
    lines = []
    if protocol:
        lines.append(f"protocol: teacher fitted on {len(protocol['teacher_scenes'])} corpus rooms of its own "
                     f"(no 3D room); trained on {len(protocol['train_scenes'])} rooms with {protocol['labels']} labelled "
                     f"points per scene of {len(protocol['base_classes'])} base classes; novel "
                     f"{', '.join(protocol['novel_classes'])} never labelled; {len(protocol.get('dev_scenes') or [])} dev "
                     "rooms carved from the training rooms (weights and rules are chosen there, by runs that never train on them"
                     + ("; the validation runs refit on them too" if protocol.get("refit") else "")
                     + "); evaluated on "
                     f"{len(protocol['val_scenes'])} validation rooms")
    teacher = results.get("teacher") or {}
    if teacher:
        on_val = teacher["crop_accuracy_3d_val"]

        def pct(v: Any) -> str:
            return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"

        lines.append(f"teacher crop-classification accuracy: held-out corpus rooms {pct(teacher['crop_accuracy_heldout_corpus'])} "
                     f"(majority class {pct(teacher['majority_heldout_corpus'])}, mean class "
                     f"{pct(teacher['crop_class_accuracy_heldout_corpus'])}, colour {pct(teacher['colour_accuracy_heldout_corpus'])}); "
                     f"3D validation rooms base {pct(on_val['base'])}, novel {pct(on_val['novel'])}")
    split = results.get("eval_split", "val")
    where = (f"{results['val_scenes']} validation rooms" if split == "val" else
             f"{results.get('dev_scenes')} DEV rooms (novel labels hidden; model selection)")
    lines += [f"results on {where} (trained on {results['train_scenes']}; "
              f"chance mIoU {100 * results['chance_miou']:.1f}, chance novel mIoU "
              f"{100 * results['chance_novel_miou']:.1f}; percentages; mIoU/base/novel/hIoU from the final prediction; "
              f"AP and box mAP over instances of >= {min_size} points; boundary/region/flag/interface AP: average "
              "precision against true semantic boundaries of the boundary network, its region-level labels, the "
              "over-segmentation flag and the over-segment interfaces)",
              f"{'setting':<28}" + "".join(f" {c:>13}" for c in cols)]
    for name, stats in table.items():
        cells = []
        for c in cols:
            if c not in stats:
                cells.append("-")
                continue
            m, s, n = stats[c]["mean"], stats[c]["std"], stats[c]["n"]
            cells.append("-" if not math.isfinite(m) else (f"{100 * m:.1f}±{100 * s:.1f}" if n > 1 else f"{100 * m:.1f}"))
        lines.append(f"{name:<28}" + "".join(f" {c:>13}" for c in cells))
    for name, stats in (results.get("other_combine") or {}).items():
        cells = [f"{100 * stats[c]['mean']:.1f}" if c in stats and math.isfinite(stats[c]["mean"]) else "-" for c in cols[:5]]
        lines.append(f"  {name} with combine={stats['combine']}: " + ", ".join(f"{c} {v}" for c, v in zip(cols[:5], cells)))
    vb = results.get("vertex_boundaries")
    if vb:
        lines.append(f"boundaries per vertex (ws3d predict against the raw annotation): AP {100 * vb['predict']['ap']:.1f}, "
                     f"best F1 {100 * vb['predict']['best_f1']:.1f}; over-segmentation flag AP {100 * vb['overseg_flag']['ap']:.1f}; "
                     f"random {100 * vb['random']['ap']:.1f}; {vb['predict_ap_over_flag']:.2f}x the flag")
    ratios = {k: v for k, v in (results.get("ratios") or {}).items() if v is not None and math.isfinite(v)}
    if ratios:
        lines.append("ratios (anchors: CSC 20 pts/all labels 0.73 on ScanNet; novel/base PLA 0.92, RegionPLC 1.04): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)


def build_store_for_bench(folder: Path, n_scenes: int = 4) -> str:
    """A small preprocessed synthetic store (ingest, overseg, render, embed with a randomly
    initialised teacher-sized CLIP) for the trainer-side benchmarks."""
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import random_teacher
    from pipeline.workflow import WorkflowConfig, run_workflow

    raw, store = folder / "raw", folder / "store.zarr"
    synthesise(raw, n_scenes, seed=0)
    from pipeline.datasets.scannet import CLASS_NAMES

    model_dir = random_teacher(folder / "clip", CLASS_NAMES, TeacherConfig())
    wf = WorkflowConfig(dataset="synthetic", raw=str(raw), store=str(store), executor=ExecutorConfig(kind="sync"),
                        stages=("ingest", "overseg", "render", "embed"), embed=EmbedConfig(model=str(model_dir)))
    run_workflow(wf, echo=lambda _: None)
    return str(store)
