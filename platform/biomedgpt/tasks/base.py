"""What a task family turns a shard record into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Example:
    """One model example: encoder instruction text, decoder target text, whether an image is used,
    and the record fields evaluation needs (id, reference answer, answer type)."""

    instruction: str
    target: str
    has_image: bool
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str

    def example(self, record: dict[str, Any]) -> Example: ...


_TASKS: dict[str, type] = {}


def register(cls: type) -> type:
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str, **options: Any) -> Task:
    """The task family `name` (e.g. "vqa")."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name](**options)
