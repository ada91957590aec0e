"""BART whole-word span masking (text infilling): 30% of the words in Poisson(3) spans, one `<mask>` per
span, deterministic per seed."""

from __future__ import annotations

import math
import random
from statistics import mean, pvariance

import pytest

from biomedgpt.tasks.infilling import MASK, poisson, span_lengths, unmask, whole_word_mask

WORDS = [f"w{i}" for i in range(200)]


def masks_of(n_texts: int, n_words: int, seed: int = 0):
    words = WORDS[:n_words]
    return [whole_word_mask(words, random.Random(f"{seed}:{i}")) for i in range(n_texts)]


def test_thirty_percent_of_the_words_in_poisson_spans():
    results = masks_of(300, 200)
    for m in results:
        assert m.masked_words == math.ceil(0.3 * 200)  # exactly the budget of every text
        assert unmask(m, WORDS) == WORDS  # each <mask> stands for exactly its span
        assert m.words.count(MASK) == len(m.spans)  # one <mask> per span (insertions included)
        assert all(not (a == MASK and b == MASK) for a, b in zip(m.words, m.words[1:]))
        assert sum(m.lengths) == 60 and sorted(n for _, n in m.spans) == sorted(m.lengths)
    ratio = sum(m.masked_words for m in results) / (300 * 200)
    assert ratio == pytest.approx(0.3)
    drawn = [x for m in results for x in m.lengths[:-1]]  # the last span of a text is cut to the budget
    assert len(drawn) > 4000
    assert mean(drawn) == pytest.approx(3.0, abs=0.12)  # Poisson(3): mean 3, variance 3, P(0) = e^-3
    assert pvariance(drawn) == pytest.approx(3.0, abs=0.3)
    assert sum(1 for x in drawn if x == 0) / len(drawn) == pytest.approx(math.exp(-3), abs=0.015)
    # zero-length spans are insertions: a <mask> that stands for no word
    assert any(n == 0 for m in results for _, n in m.spans)


def test_masked_ratio_over_texts_of_many_lengths():
    rng = random.Random(5)
    total = masked = 0
    for i in range(500):
        n = rng.randint(5, 60)
        m = whole_word_mask(WORDS[:n], random.Random(i))
        assert m.masked_words == math.ceil(0.3 * n)
        assert unmask(m, WORDS[:n]) == WORDS[:n]
        total += n
        masked += m.masked_words
    assert masked / total == pytest.approx(0.3, abs=0.02)


def test_deterministic_per_seed():
    a = whole_word_mask(WORDS[:40], random.Random("seed-1"))
    assert whole_word_mask(WORDS[:40], random.Random("seed-1")) == a
    assert len({whole_word_mask(WORDS[:40], random.Random(f"seed-{s}")).words for s in range(10)}) > 5


def test_short_texts():
    one = whole_word_mask(["pneumonia"], random.Random(0))
    assert one.words == (MASK,) and one.spans == ((0, 1),)
    for n in range(1, 8):
        for s in range(50):
            m = whole_word_mask(WORDS[:n], random.Random(s))
            assert unmask(m, WORDS[:n]) == WORDS[:n] and MASK in m.words
    assert whole_word_mask([], random.Random(0)).words == ()


def test_poisson_and_span_budget():
    rng = random.Random(1)
    draws = [poisson(rng, 3.0) for _ in range(20000)]
    assert mean(draws) == pytest.approx(3.0, abs=0.05)
    lengths = span_lengths(random.Random(2), 17, 3.0)
    assert sum(lengths) == 17 and all(x >= 0 for x in lengths)
    with pytest.raises(ValueError, match="mask ratio"):
        whole_word_mask(WORDS[:5], random.Random(0), ratio=0.0)
