"""Text summarisation (MeQSum, HealthcareMagic, MIMIC-III radiology findings -> impression).

Instruction: ` what is the summary of article " {text} "?` with the article normalised as OFA does
(lower-cased, whitespace collapsed, at most `max_source_words` words). Target: the summary, lower-cased
and whitespace-collapsed. Decoding: beam 5, length penalty 0.7, no repeated 3-grams.
"""

from __future__ import annotations

from typing import Any

from .base import Decoding, Example, clean_text, pre_caption, register, require


@register
class SummarizeTask:
    name = "summarize"
    has_image = False
    decoding = Decoding(constrained=False, beam_size=5, max_new_tokens=128, no_repeat_ngram_size=3, length_penalty=0.7)
    metrics = ("rouge1", "rouge2", "rougeL")
    input_fields = ("text",)

    def __init__(self, max_source_words: int = 512, max_target_words: int = 128) -> None:
        self.max_source_words = max_source_words
        self.max_target_words = max_target_words

    def instruction(self, record: dict[str, Any]) -> str:
        require(record, "summarisation", "text")
        return f' what is the summary of article " {pre_caption(record["text"], self.max_source_words)} "?'

    def example(self, record: dict[str, Any]) -> Example:
        instruction = self.instruction(record)
        require(record, "summarisation", "summary")
        return Example(
            instruction=instruction,
            target=" " + pre_caption(record["summary"], self.max_target_words),
            has_image=False,
            meta={"id": str(record.get("id", "")), "references": [clean_text(record["summary"])]},
        )
