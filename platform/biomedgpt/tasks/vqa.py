"""Visual question answering (VQA-RAD, SLAKE, PathVQA): the official BiomedGPT/OFA prompt.

Instruction: the question, pre-processed as OFA does (lower-cased, leading punctuation stripped,
'-' and '/' read as spaces, whitespace collapsed, at most `max_question_words` words) and ending
with '?', written with a leading space. Target: ' ' + the answer (normalised: stripped, lower-case).

Decoding: generation under the prefix tree of the dataset's answers (its dataset spec's policy, else
the model's answers.json), beam 1. Scores: exact match after the official VQA answer normalisation,
overall, closed and open (`biomedgpt.metrics.vqa`); beside them the accuracy of always answering the
most frequent answer of the candidate splits (`majority_baseline`). Served at `POST /v1/vqa` (image +
question), every answer of the model's answers.json scored.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Mapping, Sequence

from ..metrics import vqa as vqa_metrics
from .base import (Decoding, Example, Line, RequestField, ServedModel, ServeRequest, Task, normalize_text, register,
                   require)


def pre_question(question: str, max_words: int) -> str:
    """OFA's question normalisation."""
    q = question.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    q = re.sub(r"\s{2,}", " ", q).rstrip("\n").strip(" ")
    words = q.split(" ")
    if len(words) > max_words:
        q = " ".join(words[:max_words])
    return q


def normalize_answer(answer: str) -> str:
    """Answers as targets and candidates write them: stripped, lower-case, inner whitespace collapsed."""
    return normalize_text(answer)


@register
class VQATask(Task):
    name = "vqa"
    has_image = True
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=16)
    metrics = ("accuracy", "closed_accuracy", "open_accuracy")
    input_fields = ("question",)
    spec_metrics = {"vqa_accuracy": "accuracy", "vqa_accuracy_closed": "closed_accuracy",
                    "vqa_accuracy_open": "open_accuracy"}
    default_metrics = ("vqa_accuracy", "vqa_accuracy_closed", "vqa_accuracy_open")
    unspecified_candidates = "model_answers"
    reference_keys = ("references", "answer_type")
    title = "Visual question answering"
    extra_columns = ("majority_baseline",)
    request_fields = (RequestField("question", limit="max_question_chars", description="the question about the image"),)
    summary = "Answer a question about an image"

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

    # -- scores and reports ---------------------------------------------------------------------

    def reference_fields(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"references": meta["answer"], "answer_type": meta["answer_type"]}

    def read_references(self, lines: Sequence[Line]) -> list[tuple[list[str] | str, str]]:
        """(answer or answers, answer type closed | open) per line."""
        out = []
        for line in lines:
            answers = line.strings("references", allow_string=True)
            kind = line.string("answer_type")
            if kind.strip().lower() not in vqa_metrics.ANSWER_TYPES:
                raise line.error(f"field 'answer_type' must be \"closed\" or \"open\", got {kind!r}")
            out.append((answers, kind.strip().lower()))
        return out

    def score(self, predictions: Sequence[str], references: Sequence[tuple[Any, str]], *, meteor: Any = True
              ) -> dict[str, Any]:
        return vqa_metrics.vqa_accuracy(list(predictions), [r for r, _ in references], [t for _, t in references])

    def extra_metrics(self, predictions: Sequence[dict[str, Any]], metric_names: Sequence[str],
                      candidates: Any = None) -> dict[str, Any]:
        """`majority_baseline`: the accuracy of always answering the most frequent answer of the candidate
        splits (when the candidates came from them, with their counts)."""
        counts: Counter | None = getattr(candidates, "counts", None)
        if not counts or not predictions:
            return {}
        majority = vqa_metrics.normalize_answer(counts.most_common(1)[0][0])
        hits = sum(vqa_metrics.normalize_answer(str(p["references"])) == majority for p in predictions)
        return {"majority_baseline": hits / len(predictions)}

    def correct(self, prediction: Any, references: Any) -> bool | None:
        return vqa_metrics.normalize_answer(str(prediction)) == vqa_metrics.normalize_answer(str(references))

    # -- serving --------------------------------------------------------------------------------

    def request(self, fields: Mapping[str, Any], model: ServedModel) -> ServeRequest:
        """The question; the model's answers (answers.json) are the candidates, else free generation."""
        return ServeRequest({"question": fields["question"]}, tuple(model.answers) if model.answers else None)
