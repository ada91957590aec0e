"""Synthetic BART-layout BPE files (the real GPT-2/BART files cannot be downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel

BART_VOCAB_SIZE = 50265
WORDS = ["what", "is", "the", "lesion", "in", "image", "region", "does", "describe", "left", "lung", "of", "a"]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def write_bart_like_files(directory: Path, *, with_mask: bool = True) -> tuple[Path, Path]:
    """Write a BART-layout vocab.json (50,265 entries) and merges.txt into `directory`."""
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIALS)}
    for symbol in sorted(ByteLevel.alphabet()):  # GPT-2's byte order is the code point order
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # left-to-right merges: "Ġ w", "Ġw h", "Ġwh a", "Ġwha t"
        pieces = "Ġ" + word
        current = pieces[0]
        for ch in pieces[1:]:
            if (current, ch) not in merges:
                merges.append((current, ch))
            vocab.setdefault(current + ch, len(vocab))
            current += ch
    filler = 0
    while len(vocab) < BART_VOCAB_SIZE - 1:
        vocab[f"madeupword{filler:05d}"] = len(vocab)
        filler += 1
    if with_mask:
        vocab["<mask>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


