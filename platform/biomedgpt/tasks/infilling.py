"""The two infilling objectives' data side: BART whole-word span masking for text infilling, and the
VQGAN codes of the image centre for image infilling.

Text infilling (BART's `add_whole_word_mask` with OFA's pretraining settings: mask ratio 0.3, span
lengths ~ Poisson(3), `replace_length=1`, no random or kept tokens): the text is split into words at
spaces; `ceil(0.3 * words)` words are masked in spans whose lengths are drawn from Poisson(3) until they
cover the budget (the last one cut to fit); each span becomes one `<mask>`. A span of length 0 is an
insertion: a `<mask>` standing for no word (BART's insertion noise). Spans do not overlap and are not
adjacent (so every `<mask>` stands for exactly one span and the masked-word count is exactly the
budget; when a short text has more spans than room for them, the last spans are merged). Everything is
drawn from a `random.Random` the caller seeds, so a (seed, record) pair always gives the same masking
on every Python and NumPy version.

Image infilling: the target is the 256 VQGAN codes (16 x 16, row-major) of the centre 128 x 128 of the
256 px image. Shards carry them as a `codes.npy` member (or, from the official `image.tsv`, a `codes`
field): 256 codes are taken as the centre's; a full 32 x 32 grid of the 256 px image (1024 codes) is cut
to its centre 16 x 16.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

MASK = "<mask>"
CENTER_GRID = 16  # codes per side of the image centre (128 px / VQGAN stride 8)


@dataclass(frozen=True)
class SpanMask:
    """A masked text: `words` (the text's words with each span replaced by one `<mask>`), `spans` (start
    word index and length of each span in the original words, in text order; length 0 = an inserted
    `<mask>` before that word) and `lengths` (the span lengths in the order they were drawn, the last one
    cut to the budget: what follows Poisson(lambda))."""

    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    lengths: tuple[int, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def masked_words(self) -> int:
        return sum(n for _, n in self.spans)


def poisson(rng: random.Random, lam: float) -> int:
    """One Poisson(lam) draw (Knuth's method; exact, and stable across Python versions)."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def span_lengths(rng: random.Random, budget: int, lam: float) -> list[int]:
    """Poisson(lam) span lengths drawn until they cover `budget` words, the last cut to fit exactly."""
    lengths: list[int] = []
    total = 0
    while total < budget:
        n = poisson(rng, lam)
        lengths.append(min(n, budget - total))
        total += lengths[-1]
    return lengths


def whole_word_mask(words: Sequence[str], rng: random.Random, ratio: float = 0.3, lam: float = 3.0) -> SpanMask:
    """BART whole-word span masking of `words` (see the module doc)."""
    words = list(words)
    n = len(words)
    if n == 0:
        return SpanMask((), (), ())
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    lengths = span_lengths(rng, math.ceil(n * ratio), lam)
    inserts = sum(1 for x in lengths if x == 0)
    spans = [x for x in lengths if x > 0]
    masked = sum(spans)
    gaps = n - masked + 1  # places between (and around) the unmasked words
    while len(spans) > gaps:  # a short text: no room for every span apart
        spans[-2:] = [spans[-2] + spans[-1]]
    rng.shuffle(spans)
    places = sorted(rng.sample(range(gaps), len(spans)))
    out: list[str] = []
    placed: list[tuple[int, int]] = []
    pos = 0  # next original word index
    span_at = dict(zip(places, spans))
    for gap in range(gaps):
        if gap in span_at:
            length = span_at[gap]
            placed.append((pos, length))
            out.append(MASK)
            pos += length
        if pos < n:
            out.append(words[pos])
            pos += 1
    # insertions: a <mask> before a random unmasked word (or at the end), never beside another <mask>
    for _ in range(inserts):
        free = [i for i in range(len(out) + 1)
                if (i == 0 or out[i - 1] != MASK) and (i == len(out) or out[i] != MASK)]
        if not free:
            break
        i = rng.choice(free)
        out.insert(i, MASK)
    spans_out = _spans_of(out, words, placed)
    return SpanMask(tuple(out), spans_out, tuple(lengths))


def _spans_of(out: list[str], words: list[str], placed: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Spans in text order, insertions included (recovered by walking the output against the words)."""
    lengths = {start: length for start, length in placed}
    spans: list[tuple[int, int]] = []
    pos = 0
    for token in out:
        if token == MASK:
            length = lengths.pop(pos, 0)  # an insertion never sits where a span starts
            spans.append((pos, length))
            pos += length
        else:
            pos += 1
    return tuple(spans)


def unmask(masked: SpanMask, words: Sequence[str]) -> list[str]:
    """The original words back from a SpanMask (tests and sanity checks)."""
    out: list[str] = []
    spans = iter(masked.spans)
    for token in masked.words:
        if token == MASK:
            start, length = next(spans)
            out += list(words[start:start + length])
        else:
            out.append(token)
    return out


# -- image codes ------------------------------------------------------------------------------------


def load_codes(data: Any) -> list[int]:
    """VQGAN code ids from `codes.npy` bytes, an array or a list (any shape; flattened row-major)."""
    import numpy as np

    if isinstance(data, (bytes, bytearray, memoryview)):
        arr = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    else:
        arr = np.asarray(data)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"VQGAN codes must be integers, got dtype {arr.dtype}")
    return [int(c) for c in arr.reshape(-1)]


def center_codes(codes: Sequence[int], num_codes: int) -> list[int]:
    """The 256 codes of the image centre: `codes` itself when it has 256, the centre 16 x 16 of a
    32 x 32 grid (1024 codes of the whole 256 px image) otherwise. Raises ValueError on other counts or
    ids outside [0, num_codes)."""
    codes = [int(c) for c in codes]
    side = CENTER_GRID
    if len(codes) == (2 * side) ** 2:
        full = 2 * side
        lo = side // 2
        codes = [codes[r * full + c] for r in range(lo, lo + side) for c in range(lo, lo + side)]
    elif len(codes) != side * side:
        raise ValueError(f"expected {side * side} VQGAN codes of the image centre (or {(2 * side) ** 2} of the whole "
                         f"256 px image), got {len(codes)}")
    bad = [c for c in codes if not 0 <= c < num_codes]
    if bad:
        raise ValueError(f"VQGAN code {bad[0]} is outside [0, {num_codes})")
    return codes
