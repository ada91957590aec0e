"""Which samples of a batch a model call's rows belong to, for per-sample adapters (`model/adapters.py`).

Constrained decoding reshapes a batch: the decoder scores samples x candidates (`score_candidates`) or
chosen continuations (`score_continuations`), rows whose sample is known only where they are built. Those
calls say so with `sample_rows(rows)`; the adapter router reads `current_rows()` to give each row its
sample's adapter. A call without it has one row per sample, or (beam search) `k` consecutive rows per
sample. Plain context, no peft: the decoding code stays light.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

_ROWS: ContextVar["torch.Tensor | None"] = ContextVar("biomedgpt_sample_rows", default=None)


@contextmanager
def sample_rows(rows: torch.Tensor) -> Iterator[None]:
    """Within the block, model calls have one row per entry of `rows` (the index of its sample)."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def current_rows() -> "torch.Tensor | None":
    return _ROWS.get()
