"""Image captioning / report generation (IU X-ray, PEIR Gross, MIMIC-CXR, ROCO, MedICat).

Instruction: ` what does the image describe?`. Target: the caption as OFA trains on it (lower-cased,
punctuation removed, whitespace collapsed, at most `max_target_words` words, 20 in the official
recipe). The references kept for scoring are the record's captions as released (`caption`, or the
list `captions`). Decoding: beam 10, at most 32 tokens, no repeated 3-grams. Scores: BLEU-1..4, METEOR,
ROUGE-L and CIDEr-D as pycocoevalcap computes them (`biomedgpt.metrics.caption`). Served at
`POST /v1/caption` (an image).
"""

from __future__ import annotations

import string
from typing import Any, Sequence

from ..metrics.caption import caption_metrics
from .base import Decoding, Example, Line, Task, clean_text, register, require, truncate_words

_NO_PUNCT = str.maketrans({c: None for c in string.punctuation})
INSTRUCTION = " what does the image describe?"


def caption_target(caption: str, max_words: int | None) -> str:
    """OFA's training form of a caption: lower-case, no punctuation, at most `max_words` words."""
    return truncate_words(clean_text(str(caption).lower().translate(_NO_PUNCT)), max_words)


def references(record: dict[str, Any]) -> list[str]:
    caps = record.get("captions")
    if isinstance(caps, list) and caps:
        return [clean_text(c) for c in caps]
    return [clean_text(record["caption"])]


@register
class CaptionTask(Task):
    name = "caption"
    has_image = True
    decoding = Decoding(constrained=False, beam_size=10, max_new_tokens=32, no_repeat_ngram_size=3)
    metrics = ("bleu_4", "meteor", "rouge_l", "cider_d")
    spec_metrics = {"bleu4": "bleu_4", "rouge_l": "rouge_l", "meteor": "meteor", "cider": "cider_d"}
    default_metrics = ("bleu4", "rouge_l", "meteor", "cider")
    needs_meteor = True
    title = "Captioning / report generation"
    summary = "Describe an image (report generation / captioning)"

    def __init__(self, max_target_words: int = 20) -> None:
        self.max_target_words = max_target_words

    def instruction(self, record: dict[str, Any] | None = None) -> str:
        return INSTRUCTION

    def example(self, record: dict[str, Any]) -> Example:
        if not record.get("captions"):
            require(record, "caption", "caption")
        refs = references(record)
        return Example(
            instruction=INSTRUCTION,
            target=" " + caption_target(refs[0], self.max_target_words),
            has_image=True,
            meta={"id": str(record.get("id", "")), "references": refs},
        )

    def reference_fields(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"references": list(meta["references"])}

    def read_references(self, lines: Sequence[Line]) -> list[Any]:
        return [line.strings("references", allow_string=False) for line in lines]

    def score(self, predictions: Sequence[str], references: Sequence[Any], *, meteor: Any = True) -> dict[str, Any]:
        """`meteor`: True (start the jar), False (leave METEOR out) or a running `Meteor` to reuse."""
        return {**caption_metrics(list(predictions), list(references), meteor=meteor), "count": len(predictions)}

    def correct(self, prediction: Any, references: Any) -> bool | None:
        return None  # a caption is scored against its references, not right or wrong
