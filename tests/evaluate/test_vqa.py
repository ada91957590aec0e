"""VQA accuracy: the official VQA answer normalisation, exact match, closed / open / overall."""

from __future__ import annotations

import pytest

from biomedgpt.metrics.vqa import normalize_answer, vqa_accuracy


@pytest.mark.parametrize("answer, normalized", [
    ("Yes", "yes"),
    ("  YES.\n", "yes"),                    # case, white space and the final period
    ("yes?", "yes"),                        # ? is in the punctuation list
    ("The left lung", "left lung"),         # articles dropped
    ("an MRI", "mri"),
    ("Two", "2"),                           # number words zero..ten become digits
    ("none", "0"),
    ("three lesions", "3 lesions"),
    ("3.5 cm", "3.5 cm"),                   # a decimal point stays
    ("5.", "5"),
    ("1,000", "1000"),                      # digit,digit: commas deleted
    ("right, left", "right left"),          # punctuation next to a space: deleted
    ("t2/flair", "t2 flair"),               # punctuation inside a word: a space
    ("(axial)", "axial"),
    ("x-ray", "x-ray"),                     # - is not in the list
    ("dont", "don’t"),                      # contractions regain their apostrophe (U+2019, as there)
    ("isnt", "isn’t"),
    ("a\tb", "b"),
])
def test_normalize_answer(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_accuracy_closed_open_overall():
    predictions = ["Yes", "no", "the liver", "Two", "left lung", "CT"]
    references = ["yes", "yes", "Liver", "2", "right lung", ["ct", "computed tomography"]]
    types = ["closed", "closed", "open", "open", "open", "open"]
    result = vqa_accuracy(predictions, references, types)
    assert result == {"accuracy": pytest.approx(4 / 6), "closed_accuracy": pytest.approx(1 / 2),
                      "open_accuracy": pytest.approx(3 / 4), "count": 6, "closed_count": 2, "open_count": 4}


def test_accuracy_with_one_answer_type_only():
    result = vqa_accuracy(["yes", "no"], ["yes", "yes"], ["closed", "closed"])
    assert result["accuracy"] == 0.5 and result["closed_accuracy"] == 0.5 and result["open_accuracy"] is None


def test_accuracy_input_errors():
    with pytest.raises(ValueError, match="answer_type 'other'"):
        vqa_accuracy(["yes"], ["yes"], ["other"])
    with pytest.raises(ValueError, match="lengths must agree"):
        vqa_accuracy(["yes"], ["yes", "no"], ["closed"])
