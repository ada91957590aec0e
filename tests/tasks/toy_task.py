"""A toy task family, whole in this one file: "is this statement true?" over text records
{"id", "statement", "truth": true | false}. Importing the module registers it; evaluation, scoring,
reports and serving then know it without a change anywhere else (tests/tasks/test_toy_task.py)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from biomedgpt.tasks import Decoding, Example, RequestField, ServeRequest, Task, register
from biomedgpt.tasks.base import pre_caption, require

ANSWERS = ("yes", "no")


@register
class TruthTask(Task):
    name = "truth"
    has_image = False
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=4)
    metrics = ("accuracy", "said_yes")
    input_fields = ("statement",)
    spec_metrics = {"accuracy": "accuracy", "yes_rate": "said_yes"}
    default_metrics = ("accuracy", "yes_rate")
    unspecified_candidates = "fixed"
    fixed_answers = ANSWERS
    title = "True or false (toy)"
    request_fields = (RequestField("statement", description="the statement to judge"),)
    summary = "Is the statement true?"
    source_length = 64

    def instruction(self, record: dict[str, Any]) -> str:
        require(record, "truth", "statement")
        return f' is the statement " {pre_caption(record["statement"], 64)} " true?'

    def example(self, record: dict[str, Any]) -> Example:
        if not isinstance(record.get("truth"), bool):
            require(record, "truth", "truth")
        answer = "yes" if record["truth"] else "no"
        return Example(self.instruction(record), " " + answer, has_image=False,
                       meta={"id": str(record.get("id", "")), "answer": answer}, candidates=ANSWERS)

    def score(self, predictions: Sequence[str], references: Sequence[str], *, meteor: Any = True) -> dict[str, Any]:
        said = [p.strip().lower() for p in predictions]
        return {"accuracy": sum(p == r for p, r in zip(said, references)) / len(said),
                "said_yes": sum(p == "yes" for p in said) / len(said), "count": len(said)}

    def request(self, fields: Mapping[str, Any], model: Any) -> ServeRequest:
        return ServeRequest({"statement": fields["statement"]}, ANSWERS)

    def present(self, answer: dict[str, Any]) -> dict[str, Any]:
        return dict(answer, label="true" if answer["answer"] == "yes" else "false")
