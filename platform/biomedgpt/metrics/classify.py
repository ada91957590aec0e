"""Classification and NLI metrics: accuracy and macro-F1 over label strings.

Labels are compared after `normalize_label` (white space collapsed and stripped, lower-cased), because
decoded class names carry the BPE's leading space. The label set is the union of the labels seen in
references and predictions, as scikit-learn does: macro-F1 is the unweighted mean over that set of the
per-class F1 = 2 TP / (2 TP + FP + FN), so a predicted label that never occurs in the references
counts as a class with F1 0 (sklearn's `f1_score(average="macro")`, `zero_division=0`). The arithmetic
is torchmetrics' (imported by the functions that use it: it takes seconds to load, and the answer format
below is read by tasks/classify.py wherever a classification record is, training and serving included).

Multi-label classification (`multilabel_metrics`, `multilabel_auc`; ChestMNIST): each sample's answer is
a set of class names (normalised the same way; "no finding" or an empty list is the empty set). The
classes are, again, the union of the names in references and predictions, so on a full test split
they are the dataset's classes (all 14 of ChestMNIST's occur), and a smaller sample is scored over the
classes it shows. Over the samples x classes indicator matrix:
- `accuracy`: the mean over the classes of the per-class binary accuracy, i.e. 1 - Hamming loss, as
  MedMNIST's `getACC` reports multi-label accuracy (torchmetrics' multilabel accuracy, micro);
- `macro_f1`: the mean over the classes of the per-class F1, zero where a class has no true or
  predicted positive (sklearn's `f1_score(average="macro", zero_division=0)` on the indicator matrix;
  torchmetrics' multilabel F1);
- `exact_match`: the fraction of samples whose predicted set equals the reference set;
- `auc` (`multilabel_auc`, from per-class scores): the mean over the classes of the per-class ROC AUC,
  as MedMNIST's `getAUC` averages sklearn's `roc_auc_score` per label. A class whose references are all
  positive or all negative has no ROC curve (sklearn raises there, torchmetrics' `multilabel_auroc`
  counts it as 0): it is left out of the mean; None when no class has both.
"""

from __future__ import annotations

from typing import Sequence

#: the answer of a multi-label record with no positive class
NO_FINDING = "no finding"
#: what joins the class names of a multi-label answer
SEPARATOR = ", "


def join_labels(names: Sequence[str]) -> str:
    """A multi-label answer as text: the names joined by ", ", or `NO_FINDING` for none."""
    return SEPARATOR.join(names) if names else NO_FINDING


def split_labels(text: str) -> list[str]:
    """The class names of a multi-label answer text (`join_labels`' inverse): split at commas, each
    name stripped and lower-cased; `NO_FINDING` or an empty text is the empty list."""
    names = [" ".join(part.split()).lower() for part in str(text).split(",")]
    names = [n for n in names if n]
    return [] if names == [NO_FINDING] else names


def normalize_label(label: str) -> str:
    """A label string as compared: white space collapsed and stripped, lower-cased."""
    return " ".join(label.split()).lower()


def classification_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Accuracy and macro-F1 (fractions) of predicted label strings against reference labels."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

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


def label_set(names: Sequence[str] | str) -> list[str]:
    """A multi-label answer as its normalised class names, distinct, in order: a list of names, or a
    text of names joined by commas (a name with a comma must come in a list); "no finding" and empty
    names are dropped."""
    if isinstance(names, str):
        names = split_labels(names)
    out: list[str] = []
    for n in names:
        n = normalize_label(n)
        if n and n != NO_FINDING and n not in out:
            out.append(n)
    return out


def multilabel_metrics(predictions: Sequence[Sequence[str] | str], references: Sequence[Sequence[str] | str]
                       ) -> dict[str, float | int | None]:
    """Accuracy (1 - Hamming loss), macro-F1 and exact match (fractions) of predicted class-name sets
    against reference sets, over the classes that occur in either (see the module docstring). With no
    class anywhere (every answer "no finding") accuracy and exact match are 1 and macro-F1 is None."""
    import torch
    from torchmetrics.functional.classification import (binary_accuracy, binary_f1_score, multilabel_accuracy,
                                                        multilabel_f1_score)

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no samples to score")
    preds = [set(label_set(p)) for p in predictions]
    refs = [set(label_set(r)) for r in references]
    classes = sorted(set().union(*preds, *refs))
    exact = sum(p == r for p, r in zip(preds, refs)) / len(refs)
    if not classes:
        return {"accuracy": 1.0, "macro_f1": None, "exact_match": exact, "count": len(refs), "num_labels": 0}
    pred_t = torch.tensor([[c in p for c in classes] for p in preds], dtype=torch.long)
    ref_t = torch.tensor([[c in r for c in classes] for r in refs], dtype=torch.long)
    if len(classes) == 1:  # torchmetrics' multilabel metrics need two labels at least
        accuracy = binary_accuracy(pred_t[:, 0], ref_t[:, 0])
        macro_f1 = binary_f1_score(pred_t[:, 0], ref_t[:, 0], zero_division=0)
    else:
        accuracy = multilabel_accuracy(pred_t, ref_t, num_labels=len(classes), average="micro")
        macro_f1 = multilabel_f1_score(pred_t, ref_t, num_labels=len(classes), average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "macro_f1": float(macro_f1), "exact_match": exact, "count": len(refs),
            "num_labels": len(classes)}


def multilabel_auc(scores: Sequence[Sequence[float]], references: Sequence[Sequence[str] | str],
                   classes: Sequence[str]) -> float | None:
    """Mean over `classes` of the per-class ROC AUC of `scores[i][c]` (sample i's score of class c)
    against whether sample i's reference lists class c; classes without both outcomes are left out,
    None when none has both (module docstring)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    if len(scores) != len(references):
        raise ValueError(f"{len(scores)} score rows but {len(references)} references")
    if not scores:
        return None
    names = [normalize_label(c) for c in classes]
    score_t = torch.tensor([list(row) for row in scores], dtype=torch.float32)
    if score_t.shape[1] != len(names):
        raise ValueError(f"{score_t.shape[1]} scores per sample but {len(names)} classes")
    refs = [set(label_set(r)) for r in references]
    target = torch.tensor([[c in r for c in names] for r in refs], dtype=torch.long)
    aucs = [float(binary_auroc(score_t[:, j], target[:, j])) for j in range(len(names))
            if 0 < int(target[:, j].sum()) < len(refs)]
    return sum(aucs) / len(aucs) if aucs else None
