"""Task families: record -> (instruction, target, image, answer candidates). Knows the tokenizer and
records; nothing of Ray."""

from . import caption, classify, nli, pretrain, summarize  # noqa: F401  (register the families)
from .base import Decoding, Example, MissingFieldError, Task, get_task, task_names
from .mixture import OFFICIAL_PROPORTIONS, MixtureSource, official_mixture
from .pretrain import PretrainTask
from .vqa import VQATask

__all__ = ["Decoding", "Example", "MissingFieldError", "MixtureSource", "OFFICIAL_PROPORTIONS", "PretrainTask", "Task",
           "VQATask", "get_task", "official_mixture", "task_names"]
