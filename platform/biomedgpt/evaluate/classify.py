"""Classification and NLI metrics: accuracy and macro-F1 over label strings.

Labels are compared after `normalize_label` (white space collapsed and stripped, lower-cased), because
decoded class names carry the BPE's leading space. The label set is the union of the labels seen in
references and predictions, as scikit-learn does: macro-F1 is the unweighted mean over that set of the
per-class F1 = 2 TP / (2 TP + FP + FN), so a predicted label that never occurs in the references
counts as a class with F1 0 (sklearn's `f1_score(average="macro")`, `zero_division=0`). The arithmetic
is torchmetrics'.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def normalize_label(label: str) -> str:
    """A label string as compared: white space collapsed and stripped, lower-cased."""
    return " ".join(label.split()).lower()


def classification_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Accuracy and macro-F1 (fractions) of predicted label strings against reference labels."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no samples to score")
    preds = [normalize_label(p) for p in predictions]
    refs = [normalize_label(r) for r in references]
    labels = sorted(set(preds) | set(refs))
    index = {label: i for i, label in enumerate(labels)}
    # torchmetrics' multiclass metrics need two classes at least; a class that occurs nowhere
    # (neither predicted nor true) is left out of its macro average, as it is out of sklearn's.
    num_classes = max(2, len(labels))
    pred_t = torch.tensor([index[p] for p in preds])
    ref_t = torch.tensor([index[r] for r in refs])
    accuracy = multiclass_accuracy(pred_t, ref_t, num_classes=num_classes, average="micro")
    macro_f1 = multiclass_f1_score(pred_t, ref_t, num_classes=num_classes, average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "macro_f1": float(macro_f1), "count": len(preds),
            "num_labels": len(labels)}
