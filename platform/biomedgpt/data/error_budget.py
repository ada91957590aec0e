"""How much bad data a step may skip before it fails: one shape for the shard build and the training
stream.

The build (:mod:`.plan`) skips source records a converter cannot use (empty answers, missing images,
unreadable rows or images) and fails once a split has more than ``max_bad_fraction`` of its records
bad (default :data:`DEFAULT_BUILD_MAX_BAD_FRACTION`; ``source.max_bad_fraction`` in a dataset spec,
``--max-bad-fraction`` on ``biomedgpt shards build``). The training stream (:mod:`.stream`) skips bad
samples per rank and epoch within ``data.max_bad_samples`` / ``data.max_bad_fraction`` of a job spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Share of a split's source records a shard build may skip as unusable before it fails.
DEFAULT_BUILD_MAX_BAD_FRACTION = 0.01


@dataclass(frozen=True)
class ErrorBudget:
    """How many bad items may be skipped: at most `max_bad_samples` and at most `max_bad_fraction` of the
    items planned (whichever is smaller; None: no such limit; both None: no bad item allowed)."""

    max_bad_samples: int | None = 0
    max_bad_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.max_bad_samples is not None and self.max_bad_samples < 0:
            raise ValueError(f"max_bad_samples must be >= 0, got {self.max_bad_samples}")
        if self.max_bad_fraction is not None and not 0 <= self.max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")

    def allowance(self, rows: int) -> int:
        limits = []
        if self.max_bad_samples is not None:
            limits.append(int(self.max_bad_samples))
        if self.max_bad_fraction is not None:
            limits.append(int(self.max_bad_fraction * rows))
        return max(0, min(limits)) if limits else 0

    def describe(self) -> str:
        parts = []
        if self.max_bad_samples is not None:
            parts.append(f"max_bad_samples={self.max_bad_samples}")
        if self.max_bad_fraction is not None:
            parts.append(f"max_bad_fraction={self.max_bad_fraction}")
        return ", ".join(parts) or "no bad sample allowed"

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> "ErrorBudget":
        if not config:
            return cls()
        return cls(max_bad_samples=config.get("max_bad_samples"), max_bad_fraction=config.get("max_bad_fraction"))

    @classmethod
    def for_build(cls, max_bad_fraction: float | None = None) -> "ErrorBudget":
        """A shard build's budget: a fraction of each split's records (default 1%), no absolute cap."""
        fraction = DEFAULT_BUILD_MAX_BAD_FRACTION if max_bad_fraction is None else float(max_bad_fraction)
        return cls(max_bad_samples=None, max_bad_fraction=fraction)
