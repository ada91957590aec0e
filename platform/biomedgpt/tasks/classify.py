"""Image classification (MedMNIST v2, CBIS-DDSM, SZ-CXR/MC-CXR, RSNA Pneumonia) as generation.

Instruction: ` what does the image describe?`; target: ` {label_name}` (the class name, lower-cased).
Decoding scores every class name under a prefix tree and takes the best (the dataset's class names are
the answer candidates, `answer_candidates.policy: class_names` in its dataset spec).

Text-only classification records (a `text` field and no image, e.g. SEER case records) are asked
` what is the treatment for the patient " {text} "?` (datasets_spec/seer.yaml's prompt).
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import Decoding, Example, clean_text, pre_caption, register, require

INSTRUCTION = " what does the image describe?"
TEXT_INSTRUCTION = ' what is the treatment for the patient " {text} "?'


def label_text(name: Any) -> str:
    return clean_text(str(name).lower().replace("_", " "))


@register
class ClassifyTask:
    name = "classify"
    has_image = True
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=16)
    metrics = ("accuracy", "macro_f1")
    input_fields: tuple[str, ...] = ()

    def __init__(self, labels: Sequence[str] | None = None, max_text_words: int = 512) -> None:
        self.labels = tuple(label_text(x) for x in labels) if labels else None
        self.max_text_words = max_text_words

    def instruction(self, record: dict[str, Any] | None = None) -> str:
        if record and record.get("text") and not record.get("image"):
            return TEXT_INSTRUCTION.format(text=pre_caption(record["text"], self.max_text_words))
        return INSTRUCTION

    def example(self, record: dict[str, Any]) -> Example:
        require(record, "classification", "label_name")
        answer = label_text(record["label_name"])
        instruction = self.instruction(record)
        return Example(
            instruction=instruction,
            target=" " + answer,
            has_image=instruction == INSTRUCTION,
            meta={"id": str(record.get("id", "")), "answer": answer, "label": record.get("label")},
            candidates=self.labels,
        )
