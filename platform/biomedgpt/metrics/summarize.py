"""Summarisation metrics: ROUGE-1, ROUGE-2 and ROUGE-L F1 with Porter stemming, equal to Google's
`rouge-score` package (`RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)`).

Tokenisation as there: lower-case; every run of characters other than a-z and 0-9 is a separator
(so non-ASCII letters separate words too); tokens longer than three characters are stemmed by NLTK's
Porter stemmer (its default, NLTK-extensions mode; no data files involved). ROUGE-N F1 is the harmonic
mean of clipped n-gram precision and recall; ROUGE-L F1 uses the longest common subsequence (whole
text, not per sentence). With several references the best F1 per metric is taken (`score_multi`).
The corpus score is the mean of the per-sample F1.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Sequence

from nltk.stem.porter import PorterStemmer

from .caption import lcs_length

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_SEPARATOR = re.compile(r"[^a-z0-9]+")
_STEMMER = PorterStemmer()


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _STEMMER.stem(word) if len(word) > 3 else word


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokens of `text`, stemmed."""
    return [tok for tok in (_stem(w) for w in _SEPARATOR.split(text.lower())) if tok and _SEPARATOR.search(tok) is None]


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    precision = overlap / max(n_pred, 1)
    recall = overlap / max(n_ref, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_f1_sample(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction against one reference."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    scores = {}
    for n in (1, 2):
        pred_ngrams, ref_ngrams = _ngrams(pred, n), _ngrams(ref, n)
        overlap = sum(min(count, pred_ngrams[g]) for g, count in ref_ngrams.items())
        scores[f"rouge{n}"] = _f1(overlap, sum(pred_ngrams.values()), sum(ref_ngrams.values()))
    scores["rougeL"] = _f1(lcs_length(ref, pred), len(pred), len(ref)) if pred and ref else 0.0
    return scores


def summarization_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Mean ROUGE-1/2/L F1 (fractions) over samples; `references[i]` is a non-empty list of texts."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ValueError("no samples to score")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"sample {i}: references must be a non-empty list of strings")
        per_ref = [rouge_f1_sample(pred, ref) for ref in refs]
        for key in ROUGE_TYPES:
            totals[key] += max(s[key] for s in per_ref)
    result: dict[str, float | int] = {key: total / len(predictions) for key, total in totals.items()}
    result["count"] = len(predictions)
    return result
