"""Captioning metrics against pycocoevalcap on the same inputs: BLEU-1..4, ROUGE-L and CIDEr-D to 1e-6,
METEOR to 1e-3; on text tokenised by pycocoevalcap's own (Java) tokenizer, and end to end from raw text."""

from __future__ import annotations

import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from biomedgpt.metrics.caption import (
    bleu,
    caption_metrics,
    cider_d,
    cider_d_samples,
    lcs_length,
    rouge_l,
    rouge_l_sample,
)


def _lists(gts: dict, res: dict) -> tuple[list[str], list[list[str]]]:
    ids = list(gts)
    return [res[i][0] for i in ids], [gts[i] for i in ids]


def _reference_scores(gts: dict, res: dict, meteor=None) -> dict[str, float]:
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu_{n}": s for n, s in enumerate(bleu_scores, start=1)}
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider_d"] = float(Cider().compute_score(gts, res)[0])
    if meteor is not None:
        scores["meteor"] = meteor.compute_score(gts, res)[0]
    return scores


def _subsets(gts: dict, res: dict):
    """The whole corpus, and parts of it: CIDEr-D's document frequencies depend on the corpus."""
    ids = list(gts)
    for part in (ids, ids[:32], ids[32:92], ids[92:], ids[::7]):
        yield {i: gts[i] for i in part}, {i: res[i] for i in part}


def test_bleu_rouge_cider_equal_pycocoevalcap_on_its_tokens(coco_tokenized):
    for gts, res in _subsets(*coco_tokenized):
        hyps, refs = _lists(gts, res)
        expected = _reference_scores(gts, res)
        assert bleu(hyps, refs) == pytest.approx([expected[f"bleu_{n}"] for n in range(1, 5)], abs=1e-6)
        assert rouge_l(hyps, refs) == pytest.approx(expected["rouge_l"], abs=1e-6)
        assert cider_d(hyps, refs) == pytest.approx(expected["cider_d"], abs=1e-6)


def test_per_sample_rouge_l_and_cider_d_equal_pycocoevalcap(coco_tokenized):
    gts, res = coco_tokenized
    hyps, refs = _lists(gts, res)
    _, rouge_per_sample = Rouge().compute_score(gts, res)
    _, cider_per_sample = Cider().compute_score(gts, res)
    assert [rouge_l_sample(h, r) for h, r in zip(hyps, refs)] == pytest.approx(list(rouge_per_sample), abs=1e-6)
    assert cider_d_samples(hyps, refs) == pytest.approx(list(cider_per_sample), abs=1e-6)


def test_scores_are_in_the_range_of_real_models(coco_tokenized):
    # the test pairs are neither trivial nor hopeless: agreement is shown where it matters
    expected = _reference_scores(*coco_tokenized)
    assert 0.15 < expected["bleu_4"] < 0.8 and 0.3 < expected["rouge_l"] < 0.9 and 0.5 < expected["cider_d"] < 8


def test_meteor_equals_pycocoevalcap_on_its_tokens(coco_tokenized, reference_meteor, our_meteor):
    gts, res = coco_tokenized
    hyps, refs = _lists(gts, res)
    expected, expected_per_sample = reference_meteor.compute_score(gts, res)
    corpus, per_sample = our_meteor.scores(hyps, refs)
    assert corpus == pytest.approx(expected, abs=1e-3)
    assert per_sample == pytest.approx(list(expected_per_sample), abs=1e-3)


def test_end_to_end_from_raw_text_equals_pycocoevalcap(caption_pairs, coco_tokenized, reference_meteor, our_meteor):
    predictions = [p for p, _ in caption_pairs]
    references = [r for _, r in caption_pairs]
    ours = caption_metrics(predictions, references, meteor=our_meteor)
    expected = _reference_scores(*coco_tokenized, meteor=reference_meteor)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-3 if key == "meteor" else 1e-6), key


def test_edge_cases_equal_pycocoevalcap():
    # tokenised already: an empty hypothesis, a one-word one, an exact copy, no 3-gram or 4-gram match
    gts = {0: ["the heart is normal"], 1: ["no acute disease", "normal chest"], 2: ["small left effusion"],
           3: ["mild cardiomegaly with clear lungs"], 4: ["a b c d e"]}
    res = {0: [""], 1: ["normal"], 2: ["small left effusion"], 3: ["lungs clear mild cardiomegaly"],
           4: ["a b x c d"]}
    hyps, refs = _lists(gts, res)
    expected = _reference_scores(gts, res)
    assert bleu(hyps, refs) == pytest.approx([expected[f"bleu_{n}"] for n in range(1, 5)], abs=1e-6)
    assert rouge_l(hyps, refs) == pytest.approx(expected["rouge_l"], abs=1e-6)
    assert cider_d(hyps, refs) == pytest.approx(expected["cider_d"], abs=1e-6)
    # a corpus of one sample: every n-gram is in every "document", so CIDEr-D is 0, as in the reference
    one_gts, one_res = {0: gts[2]}, {0: res[2]}
    assert cider_d(*_lists(one_gts, one_res)) == pytest.approx(Cider().compute_score(one_gts, one_res)[0], abs=1e-9)


def test_bleu_of_hand_computed_example():
    # hypothesis "the cat sat on the mat", reference "the cat is on the mat": p1 = 5/6, p2 = 3/5,
    # p3 = 1/4, p4 = 0/3 (hence ~1e-4 through the reference's 1e-15 floor), no brevity penalty
    scores = bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert scores[0] == pytest.approx(5 / 6, abs=1e-9)
    assert scores[1] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-9)
    assert scores[2] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-9)
    assert 0 < scores[3] < 1e-3


def test_lcs_length_equals_dynamic_programme():
    def lcs_dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        assert lcs_length(a, b) == lcs_dp(a, b)


def test_caption_metrics_without_meteor_and_input_errors():
    result = caption_metrics(["The heart is normal."], [["Heart size is normal."]], meteor=False)
    assert set(result) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics(["a"], [[]], meteor=False)
    with pytest.raises(ValueError, match="1 hypotheses but 2"):
        caption_metrics(["a"], [["a"], ["b"]], meteor=False)
