"""VQA accuracy as the medical VQA papers report it: exact match after the answer normalisation of
the official VQA evaluation (vqaEval.py), split into closed (yes/no and other fixed-choice), open and
overall accuracy.

Normalisation (`normalize_answer`), applied to predictions and references alike, in the official order:
1. newlines and tabs become spaces, then surrounding white space is stripped;
2. punctuation: each of ; : / ' [ ] " ( ) = + \\ _ > < @ ` , ? is deleted when the answer has it next to
   a space or contains a digit,digit comma, and otherwise replaced by a space; then every period not
   followed by a digit is deleted (so "3.5" keeps its point and "yes." loses its period);
3. lower-case, split on white space, number words zero..ten (and "none") become digits, the
   articles a, an, the are dropped, common contractions without apostrophe get it back ("dont" ->
   "don’t"), and the words are joined by single spaces.

Unlike the VQA-v2 metric (min(#humans agreeing / 3, 1) over ten human answers), medical VQA sets have
one reference answer per question, so a prediction scores 1 when its normalised form equals the
normalised form of any reference answer, else 0.
"""

from __future__ import annotations

import re
from typing import Sequence

ANSWER_TYPES = ("closed", "open")

# Number words that the official evaluation maps to digits.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCTUATION = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern, kept as written: in effect "a period not followed by a digit".
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official table of contractions written without apostrophe (its right sides use U+2019 mostly).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve",
    "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s",
    "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s",
    "shouldve": "should’ve", "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve",
    "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve",
    "somebody’dve": "somebody’d’ve", "somebodyll": "somebody’ll", "somebodys": "somebody’s",
    "someoned": "someone’d", "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve",
    "someonell": "someone’ll", "someones": "someone’s", "somethingd": "something’d",
    "somethingd’ve": "something’d’ve", "something’dve": "something’d’ve", "somethingll": "something’ll",
    "thats": "that’s", "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas",
    "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t",
    "whatll": "what’ll", "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s",
    "whered": "where’d", "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll",
    "whyre": "why’re", "whys": "why’s", "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve",
    "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re",
    "youve": "you’ve",
}


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        # the official test looks at the original text, not at what earlier replacements left
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # (the official call passes re.UNICODE where sub() takes its count, capping it at 32 periods: no
    # answer has that many, so all are handled here)
    return _PERIOD.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation's normalisation of one answer (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                 answer_types: Sequence[str]) -> dict[str, float | int | None]:
    """Exact-match accuracy after `normalize_answer`, overall and per answer type.

    `references[i]` is the reference answer of question i, or a list of acceptable answers (any
    match counts); `answer_types[i]` is "closed" or "open". Returns fractions in [0, 1]:
    accuracy (overall), closed_accuracy, open_accuracy (None when no question of that type), and the
    counts count, closed_count, open_count.
    """
    if not (len(predictions) == len(references) == len(answer_types)):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references and "
                         f"{len(answer_types)} answer types: the lengths must agree")
    if not predictions:
        raise ValueError("no questions to score")
    correct = {t: 0 for t in ANSWER_TYPES}
    count = {t: 0 for t in ANSWER_TYPES}
    for i, (pred, ref, kind) in enumerate(zip(predictions, references, answer_types)):
        if kind not in ANSWER_TYPES:
            raise ValueError(f"question {i}: answer_type {kind!r}, expected one of {ANSWER_TYPES}")
        acceptable = {normalize_answer(r) for r in ([ref] if isinstance(ref, str) else ref)}
        count[kind] += 1
        correct[kind] += normalize_answer(pred) in acceptable
    total = sum(count.values())
    return {
        "accuracy": sum(correct.values()) / total,
        "closed_accuracy": correct["closed"] / count["closed"] if count["closed"] else None,
        "open_accuracy": correct["open"] / count["open"] if count["open"] else None,
        "count": total,
        "closed_count": count["closed"],
        "open_count": count["open"],
    }
