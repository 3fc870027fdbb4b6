"""The teacher folder: what a fitted (or random) teacher is on disk, and the record of its corpus.

A teacher folder is a CLIP folder that `CLIPModel.from_pretrained` + `AutoTokenizer.from_pretrained`
load offline (config.json, model.safetensors, tokenizer files, preprocessor_config.json) plus
`teacher_config.json` (its TeacherConfig, whose prompt templates the vocabulary then uses),
`teacher_report.json` (how well it does) and `teacher_corpus.json` (what it was fitted on: store,
scenes, caption vocabulary). The embed stage reads a teacher folder through this module only;
pre-training and fine-tuning refuse a teacher whose corpus is their store or shares a scene.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from pipeline.clip.defaults import DEFAULT_TEMPLATES, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, is_local_model
from pipeline.config import ConfigError, to_dict
from pipeline.storage import canonical
from pipeline.store import Store, same_store
from pipeline.teacher.captions import COLOUR_NAMES, synonyms
from pipeline.teacher.config import TeacherConfig

CONFIG_FILE = "teacher_config.json"
"""The teacher folder's TeacherConfig and class names."""
REPORT_FILE = "teacher_report.json"
"""The teacher folder's accuracies and training figures."""
CORPUS_FILE = "teacher_corpus.json"
"""The teacher folder's record of what it was fitted on."""


def save_folder(model: Any, out_dir: Path, cfg: TeacherConfig, class_names: Sequence[str]) -> None:
    model.save_pretrained(out_dir)
    # what pipeline.clip.model reads (and what CLIPImageProcessor would, where it is installed)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": cfg.image_size},
        "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
    }, indent=2))
    (out_dir / CONFIG_FILE).write_text(
        json.dumps({"config": to_dict(cfg), "class_names": list(class_names)}, indent=2)
    )


def write_corpus_record(out_dir: str | Path, store: Store, scene_ids: Sequence[str], cfg: TeacherConfig) -> Path:
    """`teacher_corpus.json`: what the teacher was fitted on (store, its scenes, caption vocabulary)."""
    record = {
        "store": canonical(store.url), "dataset": store.dataset, "created": store.attrs.get("created"),
        "corpus": store.attrs.get("teacher_corpus"), "scenes": list(scene_ids),
        "caption_vocabulary": {
            "classes": list(store.class_names),
            "synonyms": {n: list(synonyms(n)) for n in store.class_names},
            "colours": [name for name, _ in COLOUR_NAMES] if cfg.colour_weight > 0 else [],
            "templates": list(cfg.templates),
        },
    }
    path = Path(out_dir) / CORPUS_FILE
    path.write_text(json.dumps(record, indent=2))
    return path


def corpus_record(model: str | Path | None) -> dict[str, Any] | None:
    """A teacher folder's corpus record (`teacher_corpus.json`: store, scenes, caption vocabulary);
    None for a model without one (a real CLIP learnt from other images, or a hub id)."""
    if not model or not is_local_model(str(model)):
        return None
    path = Path(model).expanduser() / CORPUS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_teacher_corpus(provenance: dict[str, Any] | None, store_path: str | Path, scene_ids: Sequence[str],
                         *, where: str = "training") -> None:
    """Refuse a teacher fitted on the store a loop trains on, or on any of its scenes.

    Args:
        provenance: the teacher's corpus record (a vocabulary's `teacher_corpus` attrs); None
            (a real CLIP, or a model without a record) passes.
        store_path: the store being trained on; scene_ids: its training scenes.
    Raises:
        ConfigError naming the teacher's corpus and the shared scenes.
    """
    if not provenance:
        return
    corpus = provenance.get("store")
    shared = sorted(set(provenance.get("scenes") or []) & set(scene_ids))
    same = corpus is not None and same_store(corpus, store_path)
    if same or shared:
        what = "is this store" if same else f"shares {len(shared)} scene(s) with it (e.g. {shared[:3]})"
        raise ConfigError(
            f"{store_path}: the teacher that embedded this store was fitted on {corpus}, which {what}; "
            f"{where} on it would distil the teacher's labels of these scenes (novel classes included). "
            "Fit the teacher on its own corpus (`ws3d teacher corpus`, `ws3d teacher fit --corpus`) and re-run `ws3d embed`."
        )


def model_templates(model: str | None) -> tuple[str, ...]:
    """The prompt templates a teacher folder was trained with, else `DEFAULT_TEMPLATES`."""
    if model and is_local_model(model):
        path = Path(model).expanduser() / CONFIG_FILE
        if path.is_file():
            templates = json.loads(path.read_text()).get("config", {}).get("templates")
            if templates:
                return tuple(templates)
    return DEFAULT_TEMPLATES
