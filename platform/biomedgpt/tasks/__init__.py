"""Task families: record -> (instruction, target, image, answer candidates). Knows the tokenizer and
records; nothing of Ray."""

from . import caption, classify, nli, summarize  # noqa: F401  (register the families)
from .base import Decoding, Example, MissingFieldError, Task, get_task, task_names
from .vqa import VQATask

__all__ = ["Decoding", "Example", "MissingFieldError", "Task", "VQATask", "get_task", "task_names"]
