"""Summarisation ROUGE-1/2/L F1 with stemming against Google's rouge-score package."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from biomedgpt.metrics.summarize import rouge_f1_sample, summarization_metrics

SUMMARIES = [
    ("What are the side effects of metformin?", ["What are metformin's side effects?",
                                                 "Side effects of metformin (Glucophage)."]),
    ("How is diabetes type 2 treated?", ["What is the treatment for type 2 diabetes?"]),
    ("Patient admitted with chest pain; troponins negative, discharged on aspirin 81 mg.",
     ["Chest pain, ruled out for MI (negative troponins). Discharged on aspirin."]),
    ("Where can I find information on Alzheimer's disease clinical trials?",
     ["Where can I find clinical trials for Alzheimers?"]),
    ("", ["Empty prediction."]),
    ("Ãccented téxt, numbers 12.5 and UPPER case!", ["accented text numbers 12 5 and upper case"]),
]


@pytest.fixture(scope="module")
def scorer():
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _pairs(dev_data):
    reports = [r["report"] for split in json.loads((dev_data / "iu_xray" / "dev.json").read_text()).values()
               for r in split][:300]
    # each report "summarised" by its neighbour: realistic vocabulary, partial overlap
    return SUMMARIES + [(reports[i], [reports[i + 1]]) for i in range(len(reports) - 1)]


def test_per_sample_f1_equals_rouge_score(dev_data, scorer):
    for prediction, references in _pairs(dev_data):
        for reference in references:
            expected = scorer.score(reference, prediction)
            ours = rouge_f1_sample(prediction, reference)
            for key in ("rouge1", "rouge2", "rougeL"):
                assert ours[key] == pytest.approx(expected[key].fmeasure, abs=1e-6), (key, prediction, reference)


def test_corpus_score_is_mean_of_best_reference_f1(dev_data, scorer):
    pairs = _pairs(dev_data)
    result = summarization_metrics([p for p, _ in pairs], [r for _, r in pairs])
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score_multi(refs, pred)[key].fmeasure for pred, refs in pairs) / len(pairs)
        assert result[key] == pytest.approx(expected, abs=1e-6)
    assert result["count"] == len(pairs)


def test_input_errors():
    with pytest.raises(ValueError, match="non-empty list"):
        summarization_metrics(["a"], [[]])
