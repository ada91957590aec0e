"""Captioning metrics as the COCO caption evaluation (pycocoevalcap) computes them: BLEU-1..4, METEOR,
ROUGE-L and CIDEr-D, our own code, tested against pycocoevalcap on the same inputs.

Inputs to the single metrics are *tokenised* captions: strings of tokens joined by single spaces, as
`coco_tokenize` (PTB tokenisation, lower-cased, punctuation removed) returns them. `caption_metrics`
tokenises raw captions itself. Each metric splits the tokenised string the way its reference does
(BLEU and CIDEr-D on any white space, ROUGE-L on single spaces).

Scales: BLEU, METEOR and ROUGE-L are fractions in [0, 1]; CIDEr-D is on the conventional scale
(0..10, x10 built into the metric), where 1.227 is what papers print as 122.7.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from .ptb_tokenizer import coco_tokenize

if TYPE_CHECKING:
    from .meteor import Meteor

NGram = tuple[str, ...]


def ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[NGram]:
    """Counts of every n-gram of `tokens` for n = 1..max_n."""
    counts: Counter[NGram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"sample {i}: references must be a non-empty list of strings")


# ---------------------------------------------------------------- BLEU
# Corpus BLEU as coco-caption's bleu_scorer computes it: clipped n-gram counts summed over the corpus,
# the effective reference length of each sample is the reference length closest to the hypothesis
# (the shorter one on a tie), and every precision is (matches + 1e-15) / (guesses + 1e-9). Those two
# constants are part of the definition: with no 4-gram match at all BLEU-4 is about 1e-4, not 0.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..BLEU-max_n (fractions) of tokenised hypotheses against tokenised references."""
    _check_pairs(hypotheses, references)
    guesses = [0] * max_n
    matches = [0] * max_n
    hyp_length = ref_length = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_tokens = hyp.split()
        max_ref_counts: dict[NGram, int] = {}
        ref_lengths = []
        for ref in refs:
            ref_tokens = ref.split()
            ref_lengths.append(len(ref_tokens))
            for gram, count in ngram_counts(ref_tokens, max_n).items():
                if count > max_ref_counts.get(gram, 0):
                    max_ref_counts[gram] = count
        n_hyp = len(hyp_tokens)
        hyp_length += n_hyp
        ref_length += min(ref_lengths, key=lambda length: (abs(length - n_hyp), length))
        for gram, count in ngram_counts(hyp_tokens, max_n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts.get(gram, 0))
        for n in range(1, max_n + 1):
            guesses[n - 1] += max(0, n_hyp - n + 1)

    scores = []
    product = 1.0
    for n in range(max_n):
        product *= (matches[n] + _BLEU_TINY) / (guesses[n] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (hyp_length + _BLEU_TINY) / (ref_length + _BLEU_SMALL)
    if ratio < 1:  # brevity penalty
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


# ---------------------------------------------------------------- ROUGE-L
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Allison and Dix 1986): one big-integer operation per token of `b`, so long reports
    cost little; equal to the textbook dynamic programme.
    """
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for i, tok in enumerate(a):
        positions[tok] = positions.get(tok, 0) | (1 << i)
    all_ones = (1 << len(a)) - 1
    v = all_ones
    for tok in b:
        u = v & positions.get(tok, 0)
        v = ((v + u) | (v - u)) & all_ones
    return len(a) - v.bit_count()


_ROUGE_L_BETA = 1.2


def rouge_l_sample(hypothesis: str, references: Sequence[str]) -> float:
    """coco-caption's ROUGE-L of one sample: F-measure (beta 1.2) of the best precision and the best
    recall over the references (each maximised separately)."""
    hyp_tokens = hypothesis.split(" ")
    best_precision = best_recall = 0.0
    for ref in references:
        ref_tokens = ref.split(" ")
        lcs = lcs_length(ref_tokens, hyp_tokens)
        if lcs == 0 and hyp_tokens == [""] and ref_tokens == [""]:
            lcs = 1  # two empty captions: the reference's split(" ") makes them one equal empty token
        best_precision = max(best_precision, lcs / len(hyp_tokens))
        best_recall = max(best_recall, lcs / len(ref_tokens))
    if best_precision == 0 or best_recall == 0:
        return 0.0
    beta2 = _ROUGE_L_BETA ** 2
    return (1 + beta2) * best_precision * best_recall / (best_recall + beta2 * best_precision)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean coco-caption ROUGE-L (fraction) over samples of tokenised captions."""
    _check_pairs(hypotheses, references)
    return sum(rouge_l_sample(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)


# ---------------------------------------------------------------- CIDEr-D
def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (conventional x10 scale) of tokenised captions: the mean of `cider_d_samples`."""
    scores = cider_d_samples(hypotheses, references, max_n, sigma)
    return sum(scores) / len(scores)


def cider_d_samples(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                    sigma: float = 6.0) -> list[float]:
    """Per-sample CIDEr-D (conventional x10 scale) of tokenised captions, with the document
    frequencies of this whole corpus.

    As in coco-caption: TF-IDF n-gram vectors (n = 1..4) with document frequencies counted over the
    reference sets of *this* corpus (an n-gram counts once per sample) and log(number of samples) as
    the IDF numerator; per n, the hypothesis weights are clipped at the reference weights, the dot
    product is divided by the unclipped norms and multiplied by a Gaussian length penalty
    exp(-delta^2 / (2 sigma^2)); scores are averaged over n and over the references, times 10.
    The length in that penalty is, as there, the number of bigrams (words - 1).
    """
    _check_pairs(hypotheses, references)
    ref_counts = [[ngram_counts(r.split(), max_n) for r in refs] for refs in references]
    document_frequency: Counter[NGram] = Counter()
    for counts_of_sample in ref_counts:
        document_frequency.update(set().union(*counts_of_sample))
    log_corpus_size = math.log(float(len(references)))

    def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        vectors: list[dict[NGram, float]] = [{} for _ in range(max_n)]
        norms = [0.0] * max_n
        bigrams = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (log_corpus_size - math.log(max(1.0, document_frequency[gram])))
            vectors[n][gram] = weight
            norms[n] += weight * weight
            if n == 1:
                bigrams += tf
        return vectors, [math.sqrt(x) for x in norms], bigrams

    penalty_denominator = 2 * sigma ** 2
    scores = []
    for hyp, counts_of_refs in zip(hypotheses, ref_counts):
        hyp_vec, hyp_norm, hyp_len = tfidf(ngram_counts(hyp.split(), max_n))
        per_n = [0.0] * max_n
        for ref_count in counts_of_refs:
            ref_vec, ref_norm, ref_len = tfidf(ref_count)
            length_penalty = math.exp(-((hyp_len - ref_len) ** 2) / penalty_denominator)
            for n in range(max_n):
                dot = 0.0
                for gram, weight in hyp_vec[n].items():
                    ref_weight = ref_vec[n].get(gram, 0.0)
                    dot += min(weight, ref_weight) * ref_weight
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                per_n[n] += dot * length_penalty
        scores.append(sum(per_n) / max_n / len(counts_of_refs) * 10.0)
    return scores


# ---------------------------------------------------------------- all of them
def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenize: bool = True,
                    meteor: "bool | Meteor" = True) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of raw captions, as pycocoevalcap reports them.

    `predictions[i]` is one caption, `references[i]` the non-empty list of its reference captions.
    With `tokenize`, both sides go through `coco_tokenize` first (pass already tokenised text with
    tokenize=False). METEOR needs Java (see `biomedgpt.metrics.meteor`); `meteor=False` leaves it out,
    and a running `Meteor` is used as it is (and left running), saving the jar's start-up.
    Keys: bleu_1..bleu_4, meteor, rouge_l (fractions), cider_d (conventional x10 scale).
    """
    _check_pairs(predictions, references)
    if tokenize:
        flat = coco_tokenize([r for refs in references for r in refs])
        tokenised_refs: list[list[str]] = []
        start = 0
        for refs in references:
            tokenised_refs.append(flat[start:start + len(refs)])
            start += len(refs)
        hyps = coco_tokenize(predictions)
    else:
        hyps, tokenised_refs = list(predictions), [list(r) for r in references]

    from .meteor import Meteor

    own_scorer = meteor is True
    # started first: the jar loads its tables while the other metrics are computed
    meteor_scorer = Meteor() if own_scorer else (meteor if isinstance(meteor, Meteor) else None)
    try:
        result = {f"bleu_{n}": s for n, s in enumerate(bleu(hyps, tokenised_refs), start=1)}
        result["rouge_l"] = rouge_l(hyps, tokenised_refs)
        result["cider_d"] = cider_d(hyps, tokenised_refs)
        if meteor_scorer is not None:
            result["meteor"] = meteor_scorer.corpus_score(hyps, tokenised_refs)
    finally:
        if own_scorer and meteor_scorer is not None:
            meteor_scorer.close()
    return result
