"""Clinical natural language inference (MedNLI; TREC 2022 patient-to-trial matching), OFA's MNLI prompt.

Instruction: ` can text1 " {premise} " imply text2 " {hypothesis} "?` with both sentences normalised
as OFA does (lower-cased, whitespace collapsed). Target: ` yes` (entailment), ` no` (contradiction)
or ` maybe` (neutral); decoding is constrained to these three answers. Records of a dataset with its
own label set (TREC 2022: eligible / excluded / irrelevant) keep their labels and are constrained to
that set; `answers` fixes the set explicitly. Scores: accuracy and macro-F1 of the answers. Served at
`POST /v1/nli` (premise + hypothesis) over yes / no / maybe, answered with the `label` entailment,
contradiction or neutral beside them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .base import (Decoding, Example, RequestField, ServedModel, ServeRequest, Task, pre_caption, register,
                   require)

ANSWERS = ("yes", "no", "maybe")
GOLD_TO_ANSWER = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
#: the label the serving API gives each answer
ANSWER_TO_LABEL = {answer: gold for gold, answer in GOLD_TO_ANSWER.items()}
#: the label sets of the NLI-style datasets (a record's label must belong to one)
LABEL_SETS = (ANSWERS, ("eligible", "excluded", "irrelevant"))


@register
class NLITask(Task):
    name = "nli"
    has_image = False
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=4)
    metrics = ("accuracy", "macro_f1")
    input_fields = ("premise", "hypothesis")
    spec_metrics = {"accuracy": "accuracy", "f1_macro": "macro_f1"}
    default_metrics = ("accuracy", "f1_macro")
    unspecified_candidates = "fixed"
    fixed_answers = ANSWERS
    title = "Natural language inference"
    request_fields = (RequestField("premise"), RequestField("hypothesis"))
    summary = "Does the premise entail the hypothesis?"
    source_length = 256

    def __init__(self, max_sentence_words: int = 512, answers: Sequence[str] | None = None) -> None:
        self.max_sentence_words = max_sentence_words
        self.answers = tuple(a.strip().lower() for a in answers) if answers else None

    def instruction(self, record: dict[str, Any]) -> str:
        require(record, "NLI", "premise", "hypothesis")
        s1 = pre_caption(record["premise"], self.max_sentence_words)
        s2 = pre_caption(record["hypothesis"], self.max_sentence_words)
        return f' can text1 " {s1} " imply text2 " {s2} "?'

    def example(self, record: dict[str, Any]) -> Example:
        instruction = self.instruction(record)
        require(record, "NLI", "label")
        label = str(record["label"]).strip().lower()
        answer = GOLD_TO_ANSWER.get(label, label)
        sets = (self.answers,) if self.answers else LABEL_SETS
        candidates = next((c for c in sets if answer in c), None)
        if candidates is None:
            known = "; ".join(", ".join(c) for c in sets)
            raise ValueError(f"NLI record {record.get('id', '?')!r}: label {record['label']!r} is not one of "
                             f"{known} (or entailment/contradiction/neutral)")
        return Example(
            instruction=instruction,
            target=" " + answer,
            has_image=False,
            meta={"id": str(record.get("id", "")), "answer": answer},
            candidates=candidates,
        )

    def request(self, fields: Mapping[str, Any], model: ServedModel) -> ServeRequest:
        """Premise and hypothesis, over the answers yes / no / maybe (or the task's own `answers`)."""
        return ServeRequest({"premise": fields["premise"], "hypothesis": fields["hypothesis"]},
                            self.answers or ANSWERS)

    def present(self, answer: dict[str, Any]) -> dict[str, Any]:
        """`label`: entailment, contradiction or neutral; the scores' candidates named the same way."""
        scores = [dict(s, candidate=ANSWER_TO_LABEL.get(s["candidate"], s["candidate"]))
                  for s in answer.get("scores") or []]
        return dict(answer, label=ANSWER_TO_LABEL.get(answer["answer"], answer["answer"]),
                    scores=scores if answer.get("scores") is not None else None)
