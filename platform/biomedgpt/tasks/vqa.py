"""Visual question answering (VQA-RAD, SLAKE, PathVQA): the official BiomedGPT/OFA prompt.

Instruction: the question, pre-processed as OFA does (lower-cased, leading punctuation stripped,
'-' and '/' read as spaces, whitespace collapsed, at most `max_question_words` words) and ending
with '?', written with a leading space. Target: ' ' + the answer (normalised: stripped, lower-case).
"""

from __future__ import annotations

import re
from typing import Any

from .base import Decoding, Example, register, require


def pre_question(question: str, max_words: int) -> str:
    """OFA's question normalisation."""
    q = question.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    q = re.sub(r"\s{2,}", " ", q).rstrip("\n").strip(" ")
    words = q.split(" ")
    if len(words) > max_words:
        q = " ".join(words[:max_words])
    return q


def normalize_answer(answer: str) -> str:
    """Answers as the VQA literature compares them: stripped, lower-case, inner whitespace collapsed."""
    return re.sub(r"\s+", " ", str(answer).strip().lower())


@register
class VQATask:
    name = "vqa"
    has_image = True
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=16)
    metrics = ("accuracy", "closed_accuracy", "open_accuracy")
    input_fields = ("question",)

    def __init__(self, max_question_words: int = 128, add_organ: bool = False) -> None:
        self.max_question_words = max_question_words
        self.add_organ = add_organ

    def instruction(self, record: dict[str, Any]) -> str:
        """` {question}?` (and ` object: {organ}` with add_organ)."""
        require(record, "VQA", "question")
        return self.prompt(record["question"], record.get("organ"))

    def prompt(self, question: str, organ: str | None = None) -> str:
        q = pre_question(question, self.max_question_words)
        if not q.endswith("?"):
            q += "?"
        if self.add_organ and organ:
            q += f" object: {organ.strip().lower()}"
        return " " + q

    def example(self, record: dict[str, Any]) -> Example:
        require(record, "VQA", "question")
        if record.get("answer") is None:
            require(record, "VQA", "answer")
        answer = normalize_answer(record["answer"])
        answer_type = str(record.get("answer_type", "open")).strip().lower()
        return Example(
            instruction=self.prompt(record["question"], record.get("organ")),
            target=" " + answer,
            has_image=True,
            meta={"id": str(record.get("id", "")), "answer": answer, "answer_type": answer_type,
                  "question": record["question"]},
        )
