"""What a task family turns a shard record into, and how its outputs are decoded and scored.

A task family knows three things about a record (the shard `json`, DESIGN.md's contract):
- `instruction(record)`: the encoder text, from the input fields only (what serving has);
- `example(record)`: instruction + decoder target + whether the image is used + the fields evaluation
  needs (`meta`); a record missing a field raises `MissingFieldError` naming the record and the field;
- `decoding` and `metrics`: the official decoding of the family and the metrics it reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol


class MissingFieldError(ValueError):
    """A record lacks a field its task needs (the message names the record id and the field)."""


@dataclass
class Example:
    """One model example: encoder instruction text, decoder target text, whether an image is used,
    and the record fields evaluation needs (id, reference answer, answer type). `weight` scales the
    example's loss (pretraining weights its second group of objectives 2x); `image_op` names a change
    the image transform makes before the model sees it (``"mask_center"`` for image infilling);
    `candidates` restricts label smoothing and decoding to these target texts (constrained tasks);
    `decoder_codes` marks a target of image-code tokens (`<code_i>`), which the decoder embeds with
    image positions (the model's per-sample `code_masks` flag; image infilling)."""

    instruction: str
    target: str
    has_image: bool
    meta: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    image_op: str | None = None
    candidates: tuple[str, ...] | None = None
    decoder_codes: bool = False


@dataclass(frozen=True)
class Decoding:
    """A task's official decoding. `constrained`: generate under a prefix tree over the candidate
    answers (VQA, classification, NLI); otherwise beam search with these settings."""

    constrained: bool
    beam_size: int = 1
    max_new_tokens: int = 16
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0


class Task(Protocol):
    name: str
    has_image: bool
    decoding: Decoding
    metrics: tuple[str, ...]
    input_fields: tuple[str, ...]

    def instruction(self, record: dict[str, Any]) -> str: ...

    def example(self, record: dict[str, Any]) -> Example: ...


_TASKS: dict[str, type] = {}


def register(cls: type) -> type:
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **options: Any) -> Task:
    """The task family `name` (e.g. "vqa")."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name](**options)


def require(record: dict[str, Any], what: str, *keys: str) -> None:
    """Raise MissingFieldError naming the record and the first of `keys` it lacks (or has empty)."""
    for key in keys:
        value = record.get(key)
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
            raise MissingFieldError(f"{what} record {record.get('id', '?')!r} has no {key!r} field")


def clean_text(text: str) -> str:
    """Whitespace collapsed and stripped (tabs and newlines of the sources included)."""
    return re.sub(r"\s+", " ", str(text)).strip()


def truncate_words(text: str, max_words: int | None) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if max_words and len(words) > max_words else text


def unique(texts: Iterable[str]) -> list[str]:
    """Distinct texts in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        seen.setdefault(t, None)
    return list(seen)


def pre_caption(text: str, max_words: int | None = None) -> str:
    """OFA's text normalisation for captions, NLI sentences and articles: lower-cased, leading
    punctuation stripped, '-' and '/' read as spaces, whitespace collapsed, at most `max_words` words."""
    t = str(text).lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    return truncate_words(clean_text(t), max_words)
