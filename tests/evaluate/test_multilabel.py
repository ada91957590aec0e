"""Multi-label classification (ChestMNIST): metrics against hand-computed values and scikit-learn's
definitions (MedMNIST's getACC / getAUC), `biomedgpt score` with list references, and the list trie
over the real class names with the tests' tokenizer (what it generates is exactly the training target)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, hamming_loss, roc_auc_score

from biomedgpt.metrics.classify import label_set, multilabel_auc, multilabel_metrics
from biomedgpt.evaluate.score import ScoreInputError, score

REFS = [["a", "b"], [], ["b"], ["c"]]
PREDS = [["a"], "no finding", ["b", "c"], "c"]  # lists or comma-joined texts
# per sample: scores of a, b, c, d (d never occurs: no ROC curve)
SCORES = [[0.9, 0.25, 0.1, 0.5], [0.2, 0.3, 0.2, 0.5], [0.1, 0.8, 0.7, 0.5], [0.3, 0.2, 0.7, 0.5]]


def test_hand_computed_multilabel_metrics():
    result = multilabel_metrics(PREDS, REFS)
    # indicator matrix over a, b, c: 10 of 12 entries right (sample 1 misses b, sample 3 adds c)
    assert result["accuracy"] == pytest.approx(10 / 12)
    # F1: a 1 (TP 1); b 2/3 (TP 1, FN 1); c 2/3 (TP 1, FP 1)
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert result["exact_match"] == pytest.approx(0.5) and result["count"] == 4 and result["num_labels"] == 3
    # a: the positive above every negative (1); b: 0.25 loses to 0.3 (3/4); c: 0.7 ties with 0.7 (2.5/3)
    assert multilabel_auc(SCORES, REFS, ["a", "b", "c", "d"]) == pytest.approx((1 + 3 / 4 + 2.5 / 3) / 3)
    assert multilabel_auc([row[3:] for row in SCORES], REFS, ["d"]) is None  # no class with both outcomes
    # names compared as labels are; "no finding" and empty text are no class
    assert label_set(" Atelectasis ,effusion, atelectasis") == ["atelectasis", "effusion"]
    assert label_set("No Finding") == label_set("") == label_set(["no finding"]) == []
    nothing = multilabel_metrics([[], "no finding"], [[], []])
    assert nothing["accuracy"] == 1.0 and nothing["exact_match"] == 1.0 and nothing["macro_f1"] is None
    one = multilabel_metrics([["a"], []], [["a"], ["a"]])  # a single class: the binary metrics
    assert one["accuracy"] == 0.5 and one["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        multilabel_metrics([[], []], [[]])


def test_equals_sklearn_and_medmnist_definitions_on_random_sets():
    rng = random.Random(1)
    classes = [f"finding {i}" for i in range(6)]
    for _ in range(60):
        n = rng.randint(2, 30)
        refs = [rng.sample(classes, rng.randint(0, 3)) for _ in range(n)]
        preds = [rng.sample(classes, rng.randint(0, 3)) for _ in range(n)]
        seen = sorted(set().union(*map(set, refs), *map(set, preds)))
        if len(seen) < 2:
            continue
        y_true = np.array([[c in r for c in seen] for r in refs], dtype=int)
        y_pred = np.array([[c in p for c in seen] for p in preds], dtype=int)
        result = multilabel_metrics(preds, refs)
        # MedMNIST's getACC: the mean over labels of accuracy_score per label = 1 - Hamming loss
        assert result["accuracy"] == pytest.approx(1 - hamming_loss(y_true, y_pred), abs=1e-6)
        assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-6)
        scores = [[rng.random() for _ in classes] for _ in range(n)]
        truth = np.array([[c in r for c in classes] for r in refs], dtype=int)
        s = np.array(scores)
        both = [j for j in range(len(classes)) if 0 < truth[:, j].sum() < n]
        expected = np.mean([roc_auc_score(truth[:, j], s[:, j]) for j in both]) if both else None
        got = multilabel_auc(scores, refs, classes)
        assert got == pytest.approx(expected, abs=1e-6) if expected is not None else got is None


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_accepts_list_references_and_list_or_text_predictions(tmp_path):
    refs = _write(tmp_path / "r.jsonl", [{"id": i, "references": r} for i, r in enumerate(REFS)])
    preds = _write(tmp_path / "p.jsonl", [{"id": i, "prediction": p} for i, p in enumerate(PREDS)])
    assert score("classify", preds, refs) == multilabel_metrics(PREDS, REFS)
    texts = _write(tmp_path / "t.jsonl", [{"id": 0, "prediction": "A"}, {"id": 1, "prediction": ""},
                                          {"id": 2, "prediction": "b, c"}, {"id": 3, "prediction": ["c"]}])
    assert score("classify", texts, refs)["accuracy"] == pytest.approx(10 / 12)
    # errors name the file, the line and the field
    with pytest.raises(ScoreInputError, match=r"p2\.jsonl:2: field 'prediction' must be a list of class names or a "
                                              r"string of them joined by commas, got a list with a number"):
        score("classify", _write(tmp_path / "p2.jsonl", [{"id": 0, "prediction": []}, {"id": 1, "prediction": [3]},
                                                         {"id": 2, "prediction": []}, {"id": 3, "prediction": []}]), refs)
    mixed = _write(tmp_path / "r2.jsonl", [{"id": 0, "references": "a"}, {"id": 1, "references": ["b"]}])
    two = _write(tmp_path / "p3.jsonl", [{"id": 0, "prediction": "a"}, {"id": 1, "prediction": "b"}])
    with pytest.raises(ScoreInputError, match=r"r2\.jsonl:2: field 'references' is a list \(multi-label\) but on line "
                                              r"1 a string \(single-label\)"):
        score("classify", two, mixed)
    mixed.write_text(json.dumps({"id": 0, "references": ["a"]}) + "\n" + json.dumps({"id": 1, "references": "b"}) + "\n")
    with pytest.raises(ScoreInputError, match=r"r2\.jsonl:2: field 'references' must be a list of class names "
                                              r"\(like the first line\), got string"):
        score("classify", two, mixed)


def test_list_trie_over_the_chestmnist_classes_generates_the_training_targets(demo_tokenizer_dir):
    from biomedgpt.data.converters.medmnist import label_names
    from biomedgpt.model.constrained import MultiLabelTrie
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.tasks import get_task
    from biomedgpt.tasks.classify import NO_FINDING

    tok = BiomedGPTTokenizer.from_pretrained(demo_tokenizer_dir)
    names = label_names("chestmnist")
    trie = MultiLabelTrie.from_texts(tok, names, NO_FINDING)
    assert tok.decode(list(trie.separator)) == ","  # " a, b" = " a" + "," + " b" with this BPE
    task = get_task("classify")
    rng = random.Random(0)
    for positives in [[], [0], [13], list(range(14))] + [sorted(rng.sample(range(14), 3)) for _ in range(20)]:
        ex = task.example({"id": "x", "label": positives, "label_name": [names[i] for i in positives]})
        target = tok.encode_text(ex.target)
        assert target == trie.tokens(positives) and trie.parse(target + [tok.eos_token_id]) == positives
        for i in range(len(target)):  # every step of the target is one the trie allows
            assert target[i] in trie.next_tokens(target[:i])
        after = trie.next_tokens(target)
        assert tok.eos_token_id in after
        assert (trie.separator[0] in after) == (0 < len(positives) and positives[-1] < 13)  # only later classes
    assert trie.max_length >= len(tok.encode_text(", ".join(names))) + 1
