"""Image classification (MedMNIST v2, CBIS-DDSM, SZ-CXR/MC-CXR, RSNA Pneumonia) as generation.

Instruction: ` what does the image describe?`; target: ` {label_name}` (the class name, lower-cased).
Decoding scores every class name under a prefix tree and takes the best (the dataset's class names are
the answer candidates, `answer_candidates.policy: class_names` in its dataset spec).
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import Decoding, Example, clean_text, register, require

INSTRUCTION = " what does the image describe?"


def label_text(name: Any) -> str:
    return clean_text(str(name).lower().replace("_", " "))


@register
class ClassifyTask:
    name = "classify"
    has_image = True
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=16)
    metrics = ("accuracy", "macro_f1")
    input_fields: tuple[str, ...] = ()

    def __init__(self, labels: Sequence[str] | None = None) -> None:
        self.labels = tuple(label_text(x) for x in labels) if labels else None

    def instruction(self, record: dict[str, Any] | None = None) -> str:
        return INSTRUCTION

    def example(self, record: dict[str, Any]) -> Example:
        require(record, "classification", "label_name")
        answer = label_text(record["label_name"])
        return Example(
            instruction=INSTRUCTION,
            target=" " + answer,
            has_image=True,
            meta={"id": str(record.get("id", "")), "answer": answer, "label": record.get("label")},
            candidates=self.labels,
        )
