"""Task families: record -> (instruction, target, image, answer candidates). Knows the tokenizer and
records; nothing of Ray."""

from .base import Example, Task, get_task
from .vqa import VQATask

__all__ = ["Example", "Task", "VQATask", "get_task"]
