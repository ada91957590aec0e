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

Scores: accuracy and macro-F1 of the class names; multi-label: accuracy (1 - Hamming loss), macro-F1
and exact match of the lists (`biomedgpt.metrics.classify`); where the dataset spec reports `auc`, the
ROC AUC of the per-class scores. Served at `POST /v1/classify` (image, optional `labels`; without them
the model's label set, and a multi-label model answers with the list of its findings).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..metrics.classify import (NO_FINDING, classification_metrics, join_labels, label_set, multilabel_auc,
                                multilabel_metrics, normalize_label)
from .base import (Decoding, Example, Line, MissingFieldError, RequestError, RequestField, ServedModel, ServeRequest,
                   Task, clean_text, pre_caption, register, require)

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
class ClassifyTask(Task):
    name = "classify"
    has_image = True
    decoding = Decoding(constrained=True, beam_size=1, max_new_tokens=16, scored=True)
    metrics = ("accuracy", "macro_f1")
    spec_metrics = {"accuracy": "accuracy", "f1_macro": "macro_f1", "auc": "auc"}
    default_metrics = ("accuracy", "f1_macro")
    unspecified_candidates = "class_names"
    title = "Image classification"
    request_fields = (RequestField("labels", kind="labels", required=False,
                                   description="candidate labels; omitted: the model's label set"),)
    summary = "Classify an image among candidate labels (default: the model's label set)"

    def __init__(self, labels: Sequence[str] | None = None, max_text_words: int = 512) -> None:
        self.labels = tuple(label_text(x) for x in labels) if labels else None
        self.max_text_words = max_text_words

    def instruction(self, record: dict[str, Any] | None = None) -> str:
        if record and record.get("text") and not record.get("image"):
            return TEXT_INSTRUCTION.format(text=pre_caption(record["text"], self.max_text_words))
        return INSTRUCTION

    def multi_label(self, record: dict[str, Any]) -> bool:
        return is_multi_label(record)

    def candidate_text(self, text: Any) -> str:
        return label_text(text)

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

    # -- scores and reports ---------------------------------------------------------------------

    def read_references(self, lines: Sequence[Line]) -> list[Any]:
        """Class names; multi-label: lists of them (every line of a file the kind of its first)."""
        out: list[Any] = []
        first_is_list = isinstance(lines[0].obj.get("references"), list) if lines else False
        for line in lines:
            if first_is_list:
                out.append(line.labels("references", allow_string=False))
                continue
            if isinstance(line.obj.get("references"), list):
                raise line.error(f"field 'references' is a list (multi-label) but on line {lines[0].lineno} a string "
                                 "(single-label): one file holds one kind")
            out.append(line.string("references"))
        return out

    def read_prediction(self, line: Line, reference: Any) -> Any:
        """A class name; for a multi-label reference a list of names or a text of them joined by commas."""
        if isinstance(reference, list):
            return line.labels("prediction", allow_string=True)
        return line.string("prediction")

    def score(self, predictions: Sequence[Any], references: Sequence[Any], *, meteor: Any = True) -> dict[str, Any]:
        if references and isinstance(references[0], list):
            return multilabel_metrics(predictions, references)
        return classification_metrics(predictions, references)

    def extra_metrics(self, predictions: Sequence[dict[str, Any]], metric_names: Sequence[str],
                      candidates: Any = None) -> dict[str, Any]:
        """`auc` where the dataset reports it: the ROC AUC of the candidate scores."""
        return {"auc": classification_auc(predictions)} if "auc" in metric_names else {}

    def answer_text(self, value: Any) -> str:
        return join_labels(value) if isinstance(value, list) else str(value)

    def reference_text(self, references: Any) -> str:
        return self.answer_text(references)

    def correct(self, prediction: Any, references: Any) -> bool | None:
        if isinstance(references, list):  # the whole set right
            return set(label_set(prediction)) == set(label_set(references))
        return normalize_label(str(prediction)) == normalize_label(str(references))

    # -- serving --------------------------------------------------------------------------------

    def request(self, fields: Mapping[str, Any], model: ServedModel) -> ServeRequest:
        """The labels sent, else the model's label set: a multi-label model's classes (answered with the
        list of its findings) or its answers.json."""
        labels = fields.get("labels")
        if labels is not None:
            return ServeRequest({}, tuple(labels))
        if model.classes:
            return ServeRequest({}, tuple(model.classes), multi_label=True)
        if not model.answers:
            raise RequestError("labels", f"required: model {model.id} has no label set (answers.json)")
        return ServeRequest({}, tuple(model.answers))


def classification_auc(preds: Sequence[dict[str, Any]]) -> float | None:
    """ROC AUC of the candidate probabilities (binary: of the second class; more classes: macro
    one-vs-rest; multi-label, i.e. references that are lists: `multilabel_auc`, the mean of the
    per-class AUCs); None without scores (free generation) or with fewer than two classes present."""
    rows = [p for p in preds if p.get("scores")]
    if not rows:
        return None
    if isinstance(rows[0]["references"], list):
        classes = [n for n in rows[0]["scores"] if normalize_label(n) != NO_FINDING]
        return multilabel_auc([[p["scores"][c] for c in classes] for p in rows], [p["references"] for p in rows],
                              classes)
    # torchmetrics takes seconds to import: only where an AUC is computed
    import torch
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    names = list(rows[0]["scores"])
    index = {normalize_label(n): i for i, n in enumerate(names)}
    rows = [p for p in rows if normalize_label(p["references"]) in index]
    targets = torch.tensor([index[normalize_label(p["references"])] for p in rows])
    if len(rows) < 2 or len(set(targets.tolist())) < 2:
        return None
    probs = torch.tensor([[p["scores"][n] for n in names] for p in rows], dtype=torch.float32)
    if len(names) == 2:
        return float(binary_auroc(probs[:, 1], targets))
    return float(multiclass_auroc(probs, targets, num_classes=len(names), average="macro"))
