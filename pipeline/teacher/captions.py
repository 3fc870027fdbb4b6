"""The teacher's captions and tokenizer: class synonyms, named colours, caption phrases over prompt
templates, and a byte-level BPE tokenizer with CLIP's conventions trained on those captions (ids
canonical, so the same captions give the same tokenizer in every process). Pure, except that
`train_tokenizer` saves the tokenizer files into the teacher folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

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
