"""Classification / NLI accuracy and macro-F1 against scikit-learn's definitions."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import accuracy_score, f1_score

from biomedgpt.metrics.classify import classification_metrics


def test_hand_computed_macro_f1():
    # classes a: TP1 FN1 -> F1 2/3; b: TP1 FP1 -> 2/3; c: FN1 -> 0; d (predicted only): FP1 -> 0
    result = classification_metrics(["a", "b", "b", "d"], ["a", "a", "b", "c"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    assert result["count"] == 4 and result["num_labels"] == 4


def test_equals_sklearn_on_random_label_sets():
    rng = random.Random(0)
    for _ in range(200):
        labels = rng.choice([["yes"], ["yes", "no"], ["entailment", "contradiction", "neutral"],
                             [f"class {i}" for i in range(9)]])
        n = rng.randint(1, 40)
        refs = [rng.choice(labels) for _ in range(n)]
        preds = [rng.choice(labels + ["unseen"]) for _ in range(n)]
        result = classification_metrics(preds, refs)
        assert result["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-6)
        assert result["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro", zero_division=0), abs=1e-6)


def test_labels_compared_without_case_and_surrounding_space():
    # decoded class names carry the BPE's leading space
    result = classification_metrics([" Yes", "NO ", " maybe"], ["yes", "no", "maybe"])
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0


def test_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics([], [])
