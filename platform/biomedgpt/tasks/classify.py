"""Image classification (MedMNIST v2, CBIS-DDSM, SZ-CXR/MC-CXR, RSNA Pneumonia) as generation.

Instruction: ` what does the image describe?`; target: ` {label_name}` (the class name, lower-cased).
Decoding scores every class name under a prefix tree and takes the best (the dataset's class names are
the answer candidates, `answer_candidates.policy: class_names` in its dataset spec).

Multi-label records (ChestMNIST: `label_name` is the list of positive findings, `label` their class
indices, empty lists for none) are answered with the list of their class names, in class order,
joined by ", ": ` atelectasis, effusion`; a record with no positive class answers ` no finding`
(`NO_FINDING`). Class order is that of `label` (the class indices the converter wrote beside the
names), else of the `labels` the task was built with, else the record's own order; so one image has
exactly one target, and decoding can constrain lists to class order without repeats
(`model.constrained.MultiLabelTrie`). `meta["answer"]` is then the list of names (empty for none) and
`meta["multi_label"]` is True. A class name with a comma cannot be listed that way and is an error.
`Example.candidates` of a multi-label record are the list items (the class names and `NO_FINDING`), so
the training recipe's candidates, answers.json and a model's label set are the classes; constrained
training (the candidates' prefix tree) then constrains a target up to the end of its first item and
scores the rest of a longer list unconstrained.

Text-only classification records (a `text` field and no image, e.g. SEER case records) are asked
` what is the treatment for the patient " {text} "?` (datasets_spec/seer.yaml's prompt).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..metrics.classify import NO_FINDING, SEPARATOR, join_labels, split_labels  # noqa: F401 (the answer format)
from .base import Decoding, Example, MissingFieldError, clean_text, pre_caption, register, require

INSTRUCTION = " what does the image describe?"
TEXT_INSTRUCTION = ' what is the treatment for the patient " {text} "?'


def label_text(name: Any) -> str:
    return clean_text(str(name).lower().replace("_", " "))


def is_multi_label(record: dict[str, Any]) -> bool:
    """Whether a classification record is multi-label (its `label_name` is a list)."""
    return isinstance(record.get("label_name"), (list, tuple))


def multi_label_classes(records: Sequence[dict[str, Any]]) -> list[str]:
    """The class names of the multi-label records among `records`, in class order: by the class indices
    (`label`) written beside the names, names without one after them in the order first seen;
    `NO_FINDING` is not a class. What a model trained on them lists, and how (serving reads it from the
    model's training.json)."""
    indexed: dict[str, int] = {}
    unindexed: list[str] = []
    for rec in records:
        if not is_multi_label(rec):
            continue
        names = [label_text(n) for n in rec["label_name"] if isinstance(n, str)]
        indices = rec.get("label")
        if isinstance(indices, (list, tuple)) and len(indices) == len(names) and \
                all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            for i, n in zip(indices, names):
                indexed.setdefault(n, i)
        else:
            unindexed += [n for n in names if n not in unindexed]
    ordered = sorted(indexed, key=lambda n: indexed[n])
    return [n for n in ordered + [n for n in unindexed if n not in indexed] if n != NO_FINDING]


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
        if is_multi_label(record):
            return self._multi_label_example(record)
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

    def multi_label_names(self, record: dict[str, Any]) -> list[str]:
        """The positive class names of a multi-label record, normalised (`label_text`), without
        duplicates or `NO_FINDING`, in class order (see the module docstring)."""
        rid = record.get("id", "?")
        raw = list(record["label_name"])
        if not all(isinstance(n, str) and n.strip() for n in raw):
            raise MissingFieldError(f"classification record {rid!r}: 'label_name' must be a list of class names, "
                                    f"got {raw!r}")
        names = [label_text(n) for n in raw]
        indices = record.get("label")
        if isinstance(indices, (list, tuple)) and len(indices) == len(names) and \
                all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            names = [n for _, n in sorted(zip(indices, names), key=lambda pair: pair[0])]
        elif self.labels:
            unknown = [n for n in names if n not in self.labels and n != NO_FINDING]
            if unknown:
                raise ValueError(f"classification record {rid!r}: {unknown[0]!r} is not one of the classes "
                                 f"{', '.join(self.labels)}")
            names = sorted(names, key=lambda n: self.labels.index(n) if n in self.labels else -1)
        out: list[str] = []
        for n in names:
            if "," in n:
                raise ValueError(f"classification record {rid!r}: class name {n!r} contains a comma, so it cannot be "
                                 "listed in a multi-label answer")
            if n != NO_FINDING and n not in out:
                out.append(n)
        return out

    def _multi_label_example(self, record: dict[str, Any]) -> Example:
        names = self.multi_label_names(record)
        instruction = self.instruction(record)
        # the list items: the classes (all of them when known, else this record's; the training recipe
        # takes the union over the records) and the answer for none
        items = [n for n in self.labels if n != NO_FINDING] if self.labels else names
        candidates = (*items, NO_FINDING)
        return Example(
            instruction=instruction,
            target=" " + join_labels(names),
            has_image=instruction == INSTRUCTION,
            meta={"id": str(record.get("id", "")), "answer": names, "label": record.get("label"),
                  "multi_label": True},
            candidates=candidates,
        )
