"""The offline teacher: a small CLIP trained on its own corpus of captioned crops, never on the 3D scenes.

No pretrained CLIP can be fetched here, yet the pipeline needs a model whose image and text
embeddings live in one space. The teacher is a transformers `CLIPModel` sized for a CPU
(`TeacherConfig`), trained contrastively on crops of rendered objects and segments of a
**corpus store**: rooms that are not the 3D benchmark's (for the demo, rooms synthesised from a
separate seed namespace, see :mod:`pipeline.corpus`). Real CLIP learnt from web images, never from
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

from pipeline import schema
from pipeline.clip_model import DEFAULT_TEMPLATES, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_encoder
from pipeline.config import ConfigError, to_dict
from pipeline.embed import embed_vocabulary, extract_crops, segment_crops
from pipeline.readers.base import SceneError
from pipeline.store import Store

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CORPUS_FILE = "teacher_corpus.json"
"""The teacher folder's record of what it was fitted on."""

CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "cabinet": ("cabinet", "cupboard"), "chair": ("chair", "seat"), "sofa": ("sofa", "couch"),
    "table": ("table", "dining table"), "bookshelf": ("bookshelf", "bookcase"), "picture": ("picture", "painting"),
    "counter": ("counter", "countertop"), "desk": ("desk", "writing desk"), "curtain": ("curtain", "drape"),
    "refrigerator": ("refrigerator", "fridge"), "toilet": ("toilet", "toilet bowl"), "sink": ("sink", "washbasin"),
    "bathtub": ("bathtub", "tub"), "otherfurniture": ("otherfurniture", "furniture"),
}
"""Caption words per class name (the name itself first: the class vocabulary queries with it).
A class missing here is captioned by its name alone."""

COLOUR_NAMES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (30, 30, 32)), ("dark grey", (75, 75, 78)), ("grey", (125, 125, 128)), ("silver", (185, 190, 195)),
    ("white", (238, 238, 232)), ("red", (205, 55, 50)), ("dark red", (140, 50, 50)), ("orange", (230, 130, 40)),
    ("yellow", (238, 200, 60)), ("beige", (200, 165, 120)), ("brown", (145, 102, 62)),
    ("dark brown", (95, 70, 50)), ("green", (60, 165, 85)), ("dark green", (55, 90, 75)), ("olive", (120, 130, 85)),
    ("blue", (50, 115, 200)), ("steel blue", (85, 110, 150)), ("navy blue", (35, 50, 85)),
    ("light blue", (150, 190, 225)), ("purple", (165, 80, 165)), ("pink", (230, 150, 170)),
)
"""Named colour prototypes (RGB); a point takes the nearest, an object its points' majority."""


def synonyms(name: str) -> tuple[str, ...]:
    """Caption words of a class (its name first)."""
    return CLASS_SYNONYMS.get(name, (name,))


def colour_index(rgb: np.ndarray) -> np.ndarray:
    """Nearest named colour of each RGB row: uint8 [N, 3] -> int64 [N] index into COLOUR_NAMES."""
    protos = np.array([c for _, c in COLOUR_NAMES], np.float32)
    rgb = np.asarray(rgb, np.float32).reshape(-1, 3)
    out = np.empty(len(rgb), np.int64)
    for lo in range(0, len(rgb), 65536):  # [chunk, K] distances, bounded memory
        chunk = rgb[lo:lo + 65536]
        out[lo:lo + 65536] = ((chunk[:, None, :] - protos[None]) ** 2).sum(-1).argmin(1)
    return out


def unit_colours(unit: np.ndarray, point_colour: np.ndarray, min_share: float) -> np.ndarray:
    """Majority named colour of each unit (object or segment), -1 where no colour has `min_share`.

    Args:
        unit: int [N] unit id per point, -1 = none; point_colour: int [N] from `colour_index`.
    Returns:
        int64 [U] (U = max unit id + 1).
    """
    K = len(COLOUR_NAMES)
    U = int(unit.max()) + 1 if len(unit) and unit.max() >= 0 else 0
    has = unit >= 0
    votes = np.bincount(unit[has].astype(np.int64) * K + point_colour[has], minlength=U * K).reshape(U, K)
    best = votes.argmax(axis=1)
    sizes = votes.sum(axis=1)
    ok = (sizes > 0) & (votes[np.arange(U), best] >= min_share * np.maximum(sizes, 1))
    return np.where(ok, best, -1).astype(np.int64)


def caption_phrases(name: str, colour: int) -> list[str]:
    """What a crop of class `name` with named colour `colour` (-1: none) may be called."""
    words = synonyms(name)
    if colour < 0:
        return list(words)
    return [f"{COLOUR_NAMES[colour][0]} {w}" for w in words]


def caption_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every caption the teacher can be trained on (the tokenizer's training text)."""
    out = []
    for name in class_names:
        for colour in range(-1, len(COLOUR_NAMES)):
            out += [t.format(p) for p in caption_phrases(name, colour) for t in templates]
    return out


@dataclass(frozen=True)
class TeacherConfig:
    """The offline teacher: architecture, training and crop collection."""

    image_size: int = 64
    """Input side of the vision tower (pixels)."""
    patch_size: int = 16
    """ViT patch side; (image_size / patch_size)^2 patches (16 tokens at 64/16: the step cost
    grows with the token count, and a CPU has minutes, not hours)."""
    vision_width: int = 128
    """Vision transformer hidden size."""
    vision_layers: int = 4
    """Vision transformer layers."""
    vision_heads: int = 4
    """Vision attention heads."""
    text_width: int = 128
    """Text transformer hidden size."""
    text_layers: int = 3
    """Text transformer layers."""
    text_heads: int = 4
    """Text attention heads."""
    max_text_length: int = 32
    """Longest caption in tokens (the text model's max_position_embeddings)."""
    projection_dim: int = 64
    """Width D of the joint embedding space."""
    vocab_size: int = 2000
    """Target BPE vocabulary (training stops earlier when the captions have no more merges)."""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    """Caption templates; the embed stage's vocabulary uses the same by default."""
    steps: int = 3000
    """Optimiser steps at most (fewer when `max_seconds` runs out first)."""
    max_seconds: float = 300.0
    """Wall-clock budget for training; the cosine schedule is fitted to it after a few steps."""
    batch_size: int = 128
    """Crops per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    class_balance: float = 0.5
    """Crops are drawn with probability proportional to count(class)^-class_balance: 0 = as
    collected (walls and floors dominate rooms), 1 = every class equally often."""
    crop_area: tuple[float, float] = (0.5, 1.0)
    """Random resized crop: range of the kept fraction of the crop's area."""
    flip: bool = True
    """Random horizontal flips."""
    colour_jitter: float = 0.2
    """Random brightness, contrast and saturation factors in [1 - j, 1 + j]."""
    val_fraction: float = 0.2
    """Held out for the crop-classification accuracy: this fraction of the corpus scenes
    (`run_fit`), or of crops when `fit_teacher` gets no validation set."""
    colour_weight: float = 0.5
    """Weight of the caption term (crops against their coloured captions, "a photo of a red
    chair.") next to the class term (crops against colourless class captions); 0 = class names only."""
    max_caption_pairs: int = 48
    """Most coloured captions through the text tower per step (a random subset of the batch's
    (class, colour) pairs; the crops of the others skip the caption term that step): step time."""
    min_colour_share: float = 0.5
    """An object/segment is captioned with a colour only if this fraction of its points has it."""
    seed: int = 0
    """Seed for the split, the initialisation, sampling and augmentation."""
    threads: int = 0
    """torch intra-op threads while training; 0 = torch's default (one per core). Small models
    train faster on 1-2 threads than on many, and far faster when the cores are shared."""
    crop_size: int = 80
    """Side of the collected crops (a bit larger than image_size so random crops have room)."""
    sources: tuple[str, ...] = ("instance", "segment")
    """What is cropped: ground-truth instances (whole objects) and over-segments (parts, with
    context from the larger scales); stuff classes without instances come from segments."""
    views_per_object: int = 3
    """Crops of each object/segment from its best views."""
    min_pixels: int = 100
    """Smallest object/segment pixel count in a view to be cropped from it."""
    scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    """Context scales of the crops (as in the embed stage)."""
    min_purity: float = 0.6
    """An object/segment is captioned only if this fraction of its points has its majority class."""
    max_crops_per_scene: int = 800
    """Random subsample per scene above this (memory: 80x80x3 bytes per crop)."""


# --- tokenizer ------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], out_dir: str | Path, *, vocab_size: int = 2000, max_length: int = 32):
    """Train a byte-level BPE tokenizer with CLIP's conventions and save it into `out_dir`.

    Same normaliser (NFC, collapse whitespace, lower case), pre-tokeniser and `</w>` word-end
    suffix as CLIP, `<|startoftext|>`/`<|endoftext|>` as bos/eos (eos doubles as pad and unk).
    Every byte and byte+`</w>` is in the vocabulary, so any string encodes without unknowns.
    Saved as tokenizer.json + tokenizer_config.json (CLIPTokenizer) + vocab.json + merges.txt;
    `AutoTokenizer.from_pretrained(out_dir)` reloads it offline.

    Returns:
        the transformers CLIPTokenizer.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import CLIPTokenizer

    tok = Tokenizer(BPE(unk_token=EOS_TOKEN, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = _canonical_vocab(model["vocab"], merges, alphabet)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    # the classic slow-tokenizer files too, for older transformers and other CLIP readers
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return tokenizer


def _canonical_vocab(trained: dict[str, int], merges: Sequence[tuple[str, str]], alphabet: Sequence[str]) -> dict[str, int]:
    """The trained vocabulary with ids that do not depend on the run: bos, eos, every byte, every
    byte + `</w>` (also those the captions never showed: without them such words would map to
    unk), then each merge's token in merge order (CLIP's layout, specials first).

    The BPE trainer of `tokenizers` numbers its word-final tokens (`e</w>` ...) in hash-map
    iteration order, so the same captions gave different ids from one process to the next
    (huggingface/tokenizers#1794, fix proposed in #2066), hence a different teacher from the same
    seed. The merges (what tokenisation does) came out the same on the demo's captions; the trainer
    breaks ties between equal-count pairs by those ids, so on other captions they might not (the
    test compares both across processes)."""
    vocab: dict[str, int] = {}
    for piece in (BOS_TOKEN, EOS_TOKEN, *sorted(alphabet), *(ch + "</w>" for ch in sorted(alphabet)),
                  *(a + b for a, b in merges)):
        vocab.setdefault(piece, len(vocab))
    missing = set(trained) - set(vocab)
    if missing:  # a token neither a byte, a special nor a merge: the trainer changed its rules
        raise RuntimeError(f"tokenizer training produced tokens outside bytes and merges: {sorted(missing)[:5]}")
    return vocab


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


def crop_predictions(
    encoder: Any, crops: np.ndarray, class_names: Sequence[str], templates: Sequence[str],
    candidates: Sequence[int] | None = None,
) -> np.ndarray:
    """Class of each crop by its nearest class prompt (templates averaged, as the embed stage's
    vocabulary): int64 [M] index into `class_names`. `candidates` restricts the choice (e.g. the
    classes that are evaluated, without the ignored ones)."""
    if len(crops) == 0:
        return np.zeros(0, np.int64)
    keep = np.arange(len(class_names)) if candidates is None else np.asarray(sorted(candidates), np.int64)
    text = embed_vocabulary([class_names[c] for c in keep], templates, encoder)
    image = encoder.encode_images(crops, batch_size=256, fit="crop")
    return keep[(image @ text.T).argmax(axis=1)]


def crop_accuracy(
    encoder: Any, crops: np.ndarray, class_ids: np.ndarray, class_names: Sequence[str], templates: Sequence[str]
) -> tuple[float, float]:
    """(accuracy, mean per-class accuracy) of classifying crops by their nearest class prompt.

    Classification accuracy on crops of known classes (the teacher was trained on every class
    name), not zero-shot recognition of unseen categories.

    Args:
        encoder: a loaded `ClipEncoder`; crops: uint8 [M, h, w, 3]; class_ids: int [M].
    """
    if len(crops) == 0:
        return float("nan"), float("nan")
    correct = crop_predictions(encoder, crops, class_names, templates) == class_ids
    per_class = [correct[class_ids == c].mean() for c in np.unique(class_ids)]
    return float(correct.mean()), float(np.mean(per_class))


def colour_accuracy(
    encoder: Any, crops: np.ndarray, class_ids: np.ndarray, colour_ids: np.ndarray, class_names: Sequence[str],
) -> float:
    """Of the crops with a colour: how often "a photo of a <colour> <class name>." over every named
    colour (with the crop's true class) is nearest for the true colour. NaN without coloured crops."""
    has = np.flatnonzero(colour_ids >= 0)[:1000]
    if not len(has):
        return float("nan")
    image = encoder.encode_images(crops[has], batch_size=256, fit="crop")
    correct = 0
    for c in np.unique(class_ids[has]):
        rows = np.flatnonzero(class_ids[has] == c)
        text = encoder.encode_texts([f"a photo of a {name} {class_names[c]}." for name, _ in COLOUR_NAMES])
        pred = (image[rows] @ text.T).argmax(axis=1)
        correct += int((pred == colour_ids[has][rows]).sum())
    return correct / len(has)


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
    _save(model, out_dir, cfg, class_names)
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
    (out_dir / "teacher_report.json").write_text(json.dumps(result.report(), indent=2))
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
    _save(CLIPModel(_clip_config(cfg, tokenizer)).eval(), out_dir, cfg, class_names)
    return out_dir


def _save(model: Any, out_dir: Path, cfg: TeacherConfig, class_names: Sequence[str]) -> None:
    model.save_pretrained(out_dir)
    # what pipeline.clip_model reads (and what CLIPImageProcessor would, where it is installed)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": cfg.image_size},
        "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
    }, indent=2))
    (out_dir / "teacher_config.json").write_text(
        json.dumps({"config": to_dict(cfg), "class_names": list(class_names)}, indent=2)
    )


# --- crops from a store -----------------------------------------------------------------------
def unit_classes(unit: np.ndarray, semantic: np.ndarray, num_classes: int, min_purity: float) -> np.ndarray:
    """Majority class of each unit (object or segment), -1 where impure or unlabelled.

    Args:
        unit: int [N] unit id per point, -1 = none.
        semantic: int [N] class id per point, IGNORE_INDEX = unlabelled.
    Returns:
        int64 [U] (U = max unit id + 1): the class holding >= min_purity of the unit's points.
    """
    U = int(unit.max()) + 1 if len(unit) and unit.max() >= 0 else 0
    has_unit = unit >= 0
    labelled = has_unit & (semantic >= 0) & (semantic < num_classes)
    votes = np.bincount(unit[labelled].astype(np.int64) * num_classes + semantic[labelled],
                        minlength=U * num_classes).reshape(U, num_classes)
    sizes = np.bincount(unit[has_unit], minlength=U)
    best = votes.argmax(axis=1)
    ok = votes[np.arange(U), best] >= min_purity * np.maximum(sizes, 1)
    return np.where(ok & (sizes > 0), best, -1).astype(np.int64)


def scene_crops(
    view_rgb: np.ndarray, point_index: np.ndarray, units: Sequence[np.ndarray], semantic: np.ndarray,
    num_classes: int, cfg: TeacherConfig, rng: np.random.Generator, point_colour: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Captioned crops of one scene's units (pure core of `collect_crops`).

    Args:
        view_rgb: uint8 [V, H, W, 3]; point_index: int32 [V, H, W] (-1 = nothing).
        units: per-point unit ids (e.g. instance, segment), each int [N], -1 = none.
        semantic: int [N] classes (IGNORE_INDEX = unlabelled).
        point_colour: int [N] named colour per point (`colour_index`); None: no colours.
    Returns:
        crops uint8 [M, crop_size, crop_size, 3], class ids int64 [M], colour ids int64 [M] (-1: none).
    """
    views, boxes, ids, colours = [], [], [], []
    for unit in units:
        classes = unit_classes(unit, semantic, num_classes, cfg.min_purity)
        if not (classes >= 0).any():
            continue
        unit_colour = (unit_colours(unit, point_colour, cfg.min_colour_share) if point_colour is not None
                       else np.full(len(classes), -1, np.int64))
        chosen = segment_crops(
            point_index, unit, num_segments=len(classes), k=cfg.views_per_object, min_pixels=cfg.min_pixels,
            scales=cfg.scales, min_side=16.0,
        )
        keep = np.flatnonzero(classes[chosen.segment] >= 0)
        views.append(chosen.view[keep])
        boxes.append(chosen.box[keep])
        ids.append(classes[chosen.segment[keep]])
        colours.append(unit_colour[chosen.segment[keep]])
    if not ids or not sum(len(i) for i in ids):
        return np.zeros((0, cfg.crop_size, cfg.crop_size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    view, box, class_ids, colour_ids = (np.concatenate(a) for a in (views, boxes, ids, colours))
    if cfg.max_crops_per_scene and len(class_ids) > cfg.max_crops_per_scene:
        # subsample before cutting: cutting is the expensive part
        pick = np.sort(rng.choice(len(class_ids), cfg.max_crops_per_scene, replace=False))
        view, box, class_ids, colour_ids = view[pick], box[pick], class_ids[pick], colour_ids[pick]
    images = torch.from_numpy(np.ascontiguousarray(view_rgb)).permute(0, 3, 1, 2).float().div_(255.0)
    cut = extract_crops(images, view, box, size=cfg.crop_size, fill=OPENAI_CLIP_MEAN)
    crops = cut.mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return crops, class_ids.astype(np.int64), colour_ids.astype(np.int64)


def collect_crops(
    store_path: str, scene_ids: Sequence[str], cfg: TeacherConfig, *, colours: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops of objects and segments from the rendered views of a store, with their class and colour ids.

    Needs ingest (semantic, instance, rgb) and render; overseg too when `sources` has "segment".
    Returns:
        crops uint8 [M, crop_size, crop_size, 3], class ids int64 [M] (store class indices),
        colour ids int64 [M] (COLOUR_NAMES index, -1: none or `colours` False).
    """
    store = Store.open(store_path)
    num_classes = len(store.class_names)
    rng = np.random.default_rng(cfg.seed)
    unknown = set(cfg.sources) - {"instance", "segment"}
    if unknown:
        raise ValueError(f"TeacherConfig.sources: unknown {sorted(unknown)}; use 'instance' and/or 'segment'")
    crops, ids, cols = [], [], []
    for scene_id in scene_ids:
        try:
            view_rgb = store.read(scene_id, schema.VIEW_RGB)
            point_index = store.read(scene_id, schema.VIEW_POINT_INDEX)
            semantic = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
            point_colour = colour_index(store.read(scene_id, schema.RGB)) if colours else None
            units = []
            if "instance" in cfg.sources:
                units.append(store.read(scene_id, schema.INSTANCE).astype(np.int64))
            if "segment" in cfg.sources:
                units.append(store.read(scene_id, schema.SEGMENT).astype(np.int64))
        except KeyError as exc:
            raise SceneError(scene_id, None, f"teacher crops need ingest, render and overseg: {exc}") from exc
        c, i, k = scene_crops(view_rgb, point_index, units, semantic, num_classes, cfg, rng, point_colour)
        crops.append(c)
        ids.append(i)
        cols.append(k)
    if not crops:
        return np.zeros((0, cfg.crop_size, cfg.crop_size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(crops), np.concatenate(ids), np.concatenate(cols)


def split_scenes(scene_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) scene lists; at least one held-out scene when there are two or more."""
    ids = sorted(scene_ids)
    if len(ids) < 2 or fraction <= 0:
        return ids, []
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, int(round(len(ids) * fraction))))
    val = sorted(ids[i] for i in order[:n_val])
    return [s for s in ids if s not in set(val)], val


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
    (Path(out_dir) / "teacher_report.json").write_text(json.dumps(report, indent=2))
    write_corpus_record(out_dir, store, sorted(scene_ids), cfg)
    return report


# --- provenance -----------------------------------------------------------------------------
def write_corpus_record(out_dir: str | Path, store: Store, scene_ids: Sequence[str], cfg: TeacherConfig) -> Path:
    """`teacher_corpus.json`: what the teacher was fitted on (store, its scenes, caption vocabulary)."""
    record = {
        "store": str(Path(store.path).resolve()), "dataset": store.dataset, "created": store.attrs.get("created"),
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


def teacher_provenance(model: str | Path | None) -> dict[str, Any] | None:
    """The corpus record of a teacher folder (None for other models, e.g. a real CLIP)."""
    if model is None:
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
    same = corpus is not None and Path(corpus).resolve() == Path(store_path).resolve()
    if same or shared:
        what = "is this store" if same else f"shares {len(shared)} scene(s) with it (e.g. {shared[:3]})"
        raise ConfigError(
            f"{store_path}: the teacher that embedded this store was fitted on {corpus}, which {what}; "
            f"{where} on it would distil the teacher's labels of these scenes (novel classes included). "
            "Fit the teacher on its own corpus (`ws3d teacher corpus`, `ws3d teacher fit --corpus`) and re-run `ws3d embed`."
        )


def crop_accuracy_on_store(
    model_dir: str | Path, store_path: str, scene_ids: Sequence[str], cfg: TeacherConfig,
    *, base_ids: Sequence[int] = (), novel_ids: Sequence[int] = (), ignored_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The teacher's crop-classification accuracy on crops of (validation) scenes of a 3D store,
    split by base and novel class. Evaluation only: the teacher is already fitted; the labels
    of these scenes decide nothing.

    Returns:
        {"all", "base", "novel", "n_base", "n_novel", "per_class"} (accuracy over crops; the
        choice is among the base and novel classes, ignored classes neither chosen nor counted).
    """
    store = Store.open(store_path)
    names = store.class_names
    crops, class_ids, _ = collect_crops(store_path, scene_ids, cfg, colours=False)
    keep = ~np.isin(class_ids, np.asarray(list(ignored_ids), np.int64))
    crops, class_ids = crops[keep], class_ids[keep]
    encoder = load_encoder(str(model_dir), device="cpu", dtype="fp32")
    candidates = [c for c in range(len(names)) if c not in set(ignored_ids)]
    pred = crop_predictions(encoder, crops, names, cfg.templates, candidates)
    correct = pred == class_ids

    def acc(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    is_base, is_novel = np.isin(class_ids, list(base_ids)), np.isin(class_ids, list(novel_ids))
    return {"all": acc(np.ones(len(class_ids), bool)), "base": acc(is_base), "novel": acc(is_novel),
            "n_base": int(is_base.sum()), "n_novel": int(is_novel.sum()),
            "per_class": {names[c]: acc(class_ids == c) for c in np.unique(class_ids)}}
