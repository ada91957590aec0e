"""Text summarisation (MeQSum, HealthcareMagic, MIMIC-III radiology findings -> impression).

Instruction: ` what is the summary of article " {text} "?` with the article normalised as OFA does
(lower-cased, whitespace collapsed, at most `max_source_words` words). Target: the summary, lower-cased
and whitespace-collapsed. Decoding: beam 5, length penalty 0.7, no repeated 3-grams. Scores: ROUGE-1,
ROUGE-2 and ROUGE-L F1 with stemming (`biomedgpt.metrics.summarize`). Served at `POST /v1/summarize`
(a text).
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import Decoding, Example, Line, RequestField, Task, clean_text, pre_caption, register, require


@register
class SummarizeTask(Task):
    name = "summarize"
    has_image = False
    decoding = Decoding(constrained=False, beam_size=5, max_new_tokens=128, no_repeat_ngram_size=3, length_penalty=0.7)
    metrics = ("rouge1", "rouge2", "rougeL")
    input_fields = ("text",)
    spec_metrics = {"rouge1": "rouge1", "rouge2": "rouge2", "rouge_l": "rougeL"}
    default_metrics = ("rouge1", "rouge2", "rouge_l")
    title = "Summarisation"
    request_fields = (RequestField("text", description="the text to summarise"),)
    summary = "Summarise a text"
    source_length = 512

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

    def reference_fields(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"references": list(meta["references"])}

    def read_references(self, lines: Sequence[Line]) -> list[Any]:
        return [line.strings("references", allow_string=False) for line in lines]

    def score(self, predictions: Sequence[str], references: Sequence[Any], *, meteor: Any = True) -> dict[str, Any]:
        # NLTK's stemmer takes seconds to import: only where summaries are scored
        from ..metrics.summarize import summarization_metrics

        return summarization_metrics(list(predictions), list(references))

    def correct(self, prediction: Any, references: Any) -> bool | None:
        return None  # a summary is scored against its references, not right or wrong
