"""The offline teacher: a small CLIP trained on its own corpus of captioned crops, never on the 3D scenes.

No pretrained CLIP can be fetched here, yet the pipeline needs a model whose image and text
embeddings live in one space. The teacher is a transformers `CLIPModel` sized for a CPU
(`TeacherConfig`), trained contrastively on crops of rendered objects and segments of a
**corpus store**: rooms that are not the 3D benchmark's (for the demo, rooms synthesised from a
separate seed namespace, see :mod:`pipeline.teacher.corpus`). Real CLIP learnt from web images, never from
the benchmark's scans; this teacher stands in for it the same way, so the 3D store is never opened
while fitting (`run_fit` takes only the corpus store). Captions carry the class, a synonym and the
object's colour ("a photo of a navy blue couch."), so free-text queries such as "a red chair"
mean something. A byte-level BPE tokenizer is trained on those captions by `tokenizers`. The
model is saved as a folder that `CLIPModel.from_pretrained` + `AutoTokenizer.from_pretrained`
load offline, so the embed stage uses it exactly like a real CLIP (and a real CLIP folder or hub
id replaces it unchanged).

The teacher folder records its corpus (`teacher_corpus.json`: store path, scene ids, caption
vocabulary); `ws3d embed` copies that record into the vocabulary's attrs, and pre-training and
fine-tuning refuse a teacher whose corpus is the store they train on or shares any of its scenes
(`check_teacher_corpus`).

The teacher only knows the words of its captions; open-vocabulary results for other names need a
real CLIP.

Reads (corpus store only): views/rgb, views/point_index (render), points/semantic,
        points/instance, points/rgb (ingest), overseg/segment (overseg, when `sources` has "segment").
Writes: a model folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
        vocab.json, merges.txt, preprocessor_config.json, teacher_config.json, teacher_report.json,
        teacher_corpus.json.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.defaults import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pipeline.clip.model import load_encoder
from pipeline.config import ConfigError
from pipeline.store import Store
from pipeline.teacher.captions import caption_phrases, caption_texts, train_tokenizer
from pipeline.teacher.config import TeacherConfig
from pipeline.teacher.crops import collect_crops, split_scenes
from pipeline.teacher.evaluate import colour_accuracy, crop_accuracy
from pipeline.teacher.folder import REPORT_FILE, save_folder, write_corpus_record


# --- augmentation ---------------------------------------------------------------------------
def augment(images: torch.Tensor, cfg: TeacherConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop + flip + colour jitter, vectorised over the batch.

    Args:
        images: float [B, 3, h, w] in 0..1.
    Returns:
        float [B, 3, image_size, image_size] in 0..1.
    """
    B = len(images)
    lo, hi = cfg.crop_area
    area = lo + (hi - lo) * torch.rand(B, generator=generator)
    aspect = torch.exp((torch.rand(B, generator=generator) - 0.5) * math.log(4 / 3) * 2)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)  # half-extent in normalised coordinates
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (torch.rand(B, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(B, generator=generator) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(B)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    size = cfg.image_size
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    j = cfg.colour_jitter
    if j > 0:
        def factor() -> torch.Tensor:
            return (1 + (torch.rand(B, 1, 1, 1, generator=generator) * 2 - 1) * j)
        out = out * factor()
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * factor() + mean
        grey = out.mean(dim=1, keepdim=True)
        out = (out - grey) * factor() + grey
    return out.clamp(0, 1)


# --- training -------------------------------------------------------------------------------
@dataclass
class TeacherResult:
    """A trained teacher and how well it does."""

    model: Any
    """The trained CLIPModel (eval mode, CPU)."""
    tokenizer: Any
    """Its CLIPTokenizer."""
    train_accuracy: float
    """Crop-classification accuracy (nearest class prompt) on un-augmented training crops (at most 2000)."""
    val_accuracy: float
    """Crop-classification accuracy on held-out crops (NaN when there are none): unseen rooms of
    seen classes, so classification accuracy, not zero-shot recognition."""
    val_class_accuracy: float
    """Mean over held-out classes of their crop-classification accuracy (chance: 1 / classes)."""
    chance: float
    """Accuracy of always guessing the most frequent held-out class."""
    val_colour_accuracy: float = float("nan")
    """Held-out crops with a colour: how often the nearest of "a photo of a <colour> <class>."
    over all colours (true class) names the right colour (chance: 1 / colours)."""
    steps: int = 0
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    final_loss: float = float("nan")

    def report(self) -> dict[str, Any]:
        return {
            "crop_accuracy_train": self.train_accuracy, "crop_accuracy_heldout": self.val_accuracy,
            "crop_class_accuracy_heldout": self.val_class_accuracy, "majority_heldout": self.chance,
            "colour_accuracy_heldout": self.val_colour_accuracy,
            "steps": self.steps, "seconds": round(self.seconds, 1), "n_train": self.n_train,
            "n_val": self.n_val, "final_loss": self.final_loss,
        }


def _clip_config(cfg: TeacherConfig, tokenizer: Any):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": cfg.text_width, "intermediate_size": 4 * cfg.text_width,
            "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
            "max_position_embeddings": cfg.max_text_length, "bos_token_id": tokenizer.bos_token_id,
            # the text tower pools at the first eos: it must be the tokenizer's eos (not CLIP's legacy 2)
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_size": cfg.vision_width,
            "intermediate_size": 4 * cfg.vision_width, "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
        },
        projection_dim=cfg.projection_dim,
    )


def _lr_at(step: int, total: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def _to_float(crops: torch.Tensor) -> torch.Tensor:
    """uint8 [B, h, w, 3] -> float [B, 3, h, w] in 0..1."""
    return crops.permute(0, 3, 1, 2).float().div_(255.0)


def _contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with one caption per class: images -> their class caption, and each
    class caption -> all images of its class (uniform target), so same-class pairs in a batch are
    positives rather than negatives."""
    logits = scale * image @ text.T  # [B, C]
    image_loss = F.cross_entropy(logits, labels)
    present = torch.unique(labels)
    targets = (labels[None, :] == present[:, None]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    text_logits = logits.T[present]  # [P, B]
    text_loss = -(targets * F.log_softmax(text_logits, dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def fit_teacher(
    crops: np.ndarray,
    class_ids: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    cfg: TeacherConfig,
    *,
    colour_ids: np.ndarray | None = None,
    val_crops: np.ndarray | None = None,
    val_class_ids: np.ndarray | None = None,
    val_colour_ids: np.ndarray | None = None,
    verbose: bool = True,
) -> TeacherResult:
    """Train the teacher on captioned crops and save it as a loadable CLIP folder.

    Args:
        crops: uint8 [M, h, w, 3] square crops (any h = w; resized to image_size).
        class_ids: int [M] index into `class_names`.
        class_names: caption names, e.g. the store's class names (synonyms from `CLASS_SYNONYMS`).
        out_dir: folder to write (created; existing model files are replaced).
        colour_ids: int [M] index into `COLOUR_NAMES` (-1: no colour); None: no colours.
        val_crops / val_class_ids / val_colour_ids: held-out crops (e.g. from other scenes);
            without them a random `val_fraction` of the crops is held out.
    Returns:
        TeacherResult (accuracies measured by reloading the saved folder, as the embed stage would).
    """
    crops = np.asarray(crops)
    class_ids = np.asarray(class_ids, dtype=np.int64)
    colour_ids = np.full(len(class_ids), -1, np.int64) if colour_ids is None else np.asarray(colour_ids, np.int64)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8 or len(crops) != len(class_ids):
        raise ValueError(f"crops must be uint8 [M, h, w, 3] with M class ids; got {crops.shape} {crops.dtype}, "
                         f"{class_ids.shape}")
    if len(colour_ids) != len(class_ids):
        raise ValueError(f"{len(colour_ids)} colour ids for {len(class_ids)} crops")
    if len(crops) == 0:
        raise ValueError("no crops to train the teacher on (are the views rendered and the scenes labelled?)")
    if class_ids.min() < 0 or class_ids.max() >= len(class_names):
        raise ValueError(f"class ids must be in 0..{len(class_names) - 1}, got {class_ids.min()}..{class_ids.max()}")
    rng = np.random.default_rng(cfg.seed)
    if val_crops is None:
        order = rng.permutation(len(crops))
        n_val = int(round(len(crops) * cfg.val_fraction))
        val_crops, val_class_ids, val_colour_ids = crops[order[:n_val]], class_ids[order[:n_val]], colour_ids[order[:n_val]]
        crops, class_ids, colour_ids = crops[order[n_val:]], class_ids[order[n_val:]], colour_ids[order[n_val:]]
    val_class_ids = np.asarray(val_class_ids, dtype=np.int64)
    val_colour_ids = (np.full(len(val_class_ids), -1, np.int64) if val_colour_ids is None
                      else np.asarray(val_colour_ids, np.int64))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _fit(crops, class_ids, colour_ids, class_names, out_dir, cfg, val_crops, val_class_ids,
                    val_colour_ids, verbose)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Captions:
    """Every caption variant of each (class, colour) pair, tokenised once."""

    ids: torch.Tensor       # [T, L] token ids of all variants
    mask: torch.Tensor      # [T, L]
    start: torch.Tensor     # [P] first variant of pair p
    count: torch.Tensor     # [P] variants of pair p
    pair: dict[tuple[int, int], int]  # (class, colour or -1) -> pair index

    def sample(self, pairs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One random variant (template x synonym) per pair index: ids, mask [len(pairs), L]."""
        offset = (torch.rand(len(pairs), generator=generator) * self.count[pairs]).long()
        rows = self.start[pairs] + offset
        return self.ids[rows], self.mask[rows]


def _captions(tokenizer: Any, class_names: Sequence[str], pairs: Sequence[tuple[int, int]], cfg: TeacherConfig) -> _Captions:
    texts, start, count, index = [], [], [], {}
    for p, (c, k) in enumerate(pairs):
        variants = [t.format(phrase) for phrase in caption_phrases(class_names[c], k) for t in cfg.templates]
        index[(c, k)] = p
        start.append(len(texts))
        count.append(len(variants))
        texts += variants
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_text_length, return_tensors="pt")
    return _Captions(tokens["input_ids"], tokens["attention_mask"], torch.tensor(start), torch.tensor(count), index)


def _fit(crops, class_ids, colour_ids, class_names, out_dir, cfg, val_crops, val_class_ids, val_colour_ids,
         verbose) -> TeacherResult:
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokenizer = train_tokenizer(caption_texts(class_names, cfg.templates), out_dir, vocab_size=cfg.vocab_size,
                                max_length=cfg.max_text_length)
    model = CLIPModel(_clip_config(cfg, tokenizer)).train()
    C = len(class_names)
    # pairs 0..C-1: the colourless caption of each class; then every (class, colour) of the crops
    coloured = sorted({(int(c), int(k)) for c, k in zip(class_ids, colour_ids) if k >= 0})
    captions = _captions(tokenizer, class_names, [(c, -1) for c in range(C)] + coloured, cfg)
    crop_pair = torch.tensor([captions.pair[(int(c), int(k))] if k >= 0 else -1 for c, k in zip(class_ids, colour_ids)])
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    classes = torch.arange(C)
    train_images = torch.from_numpy(np.ascontiguousarray(crops))  # uint8; floats per batch only (memory)
    train_labels = torch.from_numpy(class_ids)
    frequency = np.bincount(class_ids, minlength=C).astype(np.float64)
    sample_weight = torch.from_numpy(frequency[class_ids] ** -cfg.class_balance)
    total_steps, start, loss_value, step = cfg.steps, time.perf_counter(), float("nan"), 0
    while step < total_steps:
        if step == 3:
            warm = time.perf_counter()
        if step >= 13 and (step - 13) % 25 == 0:
            # fit the schedule to the time budget from the mean warm step time so far, again every
            # 25 steps: one early estimate taken while the machine was busy once cut a 500-step
            # teacher to 163 steps although later steps ran 20x faster
            per_step = (time.perf_counter() - warm) / (step - 3)
            spent = time.perf_counter() - start
            total_steps = max(step + 1, min(cfg.steps, step + int((cfg.max_seconds - spent) / per_step)))
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, total_steps, cfg)
        batch = torch.multinomial(sample_weight, cfg.batch_size, replacement=True, generator=generator)
        pixels = (augment(_to_float(train_images[batch]), cfg, generator) - mean) / std
        # the class captions (one random template and synonym each) and the coloured captions of
        # the batch's (class, colour) pairs go through the text tower together
        pairs = crop_pair[batch]
        present = torch.unique(pairs[pairs >= 0]) if cfg.colour_weight > 0 else torch.zeros(0, dtype=torch.long)
        if len(present) > cfg.max_caption_pairs:
            keep = torch.randperm(len(present), generator=generator)[:cfg.max_caption_pairs]
            present = torch.sort(present[keep]).values
        ids, mask = captions.sample(torch.cat([classes, present]), generator)
        text = F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        scale = model.logit_scale.clamp(max=math.log(100)).exp()
        loss = _contrastive_loss(image, text[:C], train_labels[batch], scale)
        has = torch.isin(pairs, present) if len(present) else torch.zeros_like(pairs, dtype=torch.bool)
        if bool(has.any()):
            local = torch.searchsorted(present, pairs[has])
            loss = loss + cfg.colour_weight * _contrastive_loss(image[has], text[C:], local, scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        loss_value = float(loss.detach())
        if verbose and (step % 100 == 0 or step == total_steps - 1):
            print(f"teacher step {step}/{total_steps} loss {loss_value:.3f} ({time.perf_counter() - start:.0f} s)")
        step += 1
    seconds = time.perf_counter() - start
    model.eval()
    save_folder(model, out_dir, cfg, class_names)
    encoder = load_encoder(str(out_dir), device="cpu", dtype="fp32")
    train_accuracy, _ = crop_accuracy(encoder, crops[:2000], class_ids[:2000], class_names, cfg.templates)
    val_accuracy, val_class_accuracy = crop_accuracy(encoder, val_crops, val_class_ids, class_names, cfg.templates)
    result = TeacherResult(
        model=model, tokenizer=tokenizer, train_accuracy=train_accuracy, val_accuracy=val_accuracy,
        val_class_accuracy=val_class_accuracy,
        chance=float(np.bincount(val_class_ids).max() / len(val_class_ids)) if len(val_class_ids) else float("nan"),
        val_colour_accuracy=colour_accuracy(encoder, val_crops, val_class_ids, val_colour_ids, class_names),
        steps=step, seconds=seconds, n_train=len(crops), n_val=len(val_crops), final_loss=loss_value,
    )
    (out_dir / REPORT_FILE).write_text(json.dumps(result.report(), indent=2))
    if verbose:
        print(f"teacher: crop-classification accuracy train {result.train_accuracy:.3f}, held-out "
              f"{result.val_accuracy:.3f} (majority class {result.chance:.3f}), held-out mean class accuracy "
              f"{val_class_accuracy:.3f}, held-out colour accuracy {result.val_colour_accuracy:.3f} "
              f"after {step} steps, {seconds:.0f} s")
    return result


def random_teacher(out_dir: str | Path, class_names: Sequence[str], cfg: TeacherConfig = TeacherConfig()) -> Path:
    """An untrained teacher-sized CLIP (tokenizer included) saved like a fitted one: for benchmarks
    and tests that need a loadable model folder but not a meaningful one."""
    from transformers import CLIPModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(caption_texts(class_names, cfg.templates), out_dir, vocab_size=cfg.vocab_size,
                                max_length=cfg.max_text_length)
    save_folder(CLIPModel(_clip_config(cfg, tokenizer)).eval(), out_dir, cfg, class_names)
    return out_dir


def run_fit(corpus_store: str, scene_ids: Sequence[str] | None, out_dir: str | Path, cfg: TeacherConfig) -> dict[str, Any]:
    """`ws3d teacher fit`: collect crops of the corpus store, hold out whole scenes, train, save, report.

    The corpus store is the teacher's own images-with-captions (rooms that are not the 3D
    benchmark's); no other store is opened. The folder records it in `teacher_corpus.json`.

    Args:
        corpus_store: the corpus store (ingested, over-segmented, rendered; labelled).
        scene_ids: corpus scenes to use (None: all of them).
    Returns:
        the report (also written to out_dir/teacher_report.json): accuracies, chance, steps,
        seconds, crop counts, held-out scene ids.
    """
    store = Store.open(corpus_store)
    scene_ids = store.scene_ids() if scene_ids is None else list(scene_ids)
    if not scene_ids:
        raise ConfigError(f"{corpus_store}: the teacher corpus holds no scene")
    train_ids, val_ids = split_scenes(scene_ids, cfg.val_fraction, cfg.seed)
    crops, class_ids, colour_ids = collect_crops(corpus_store, train_ids, cfg, colours=cfg.colour_weight > 0)
    val = collect_crops(corpus_store, val_ids, cfg, colours=True) if val_ids else (None, None, None)
    print(f"teacher: {len(crops)} training crops from {len(train_ids)} corpus scenes, "
          f"{0 if val[0] is None else len(val[0])} held-out crops from {len(val_ids)} corpus scenes")
    result = fit_teacher(crops, class_ids, store.class_names, out_dir, cfg, colour_ids=colour_ids,
                         val_crops=val[0], val_class_ids=val[1], val_colour_ids=val[2])
    report = {**result.report(), "held_out_scenes": val_ids, "train_scenes": len(train_ids),
              "coloured_crops": float((colour_ids >= 0).mean()) if len(colour_ids) else 0.0}
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2))
    write_corpus_record(out_dir, store, sorted(scene_ids), cfg)
    return report
