"""Task families: everything task-specific, one file per family (`base.Task`): record -> (instruction,
target, image, answer candidates), decoding, scores, results tables and serving requests. Knows the
tokenizer's conventions and records; nothing of Ray, models or files of runs."""

from . import caption, classify, nli, pretrain, summarize  # noqa: F401  (register the families)
from .base import (DecodePlan, Decoding, Example, Line, MissingFieldError, RequestError, RequestField, ScoreInputError,
                   ServeRequest, Task, evaluated_task_names, get_task, register, task_names)
from .mixture import OFFICIAL_PROPORTIONS, MixtureSource, official_mixture
from .pretrain import PretrainTask
from .vqa import VQATask

__all__ = ["DecodePlan", "Decoding", "Example", "Line", "MissingFieldError", "MixtureSource", "OFFICIAL_PROPORTIONS",
           "PretrainTask", "RequestError", "RequestField", "ScoreInputError", "ServeRequest", "Task", "VQATask",
           "evaluated_task_names", "get_task", "official_mixture", "register", "task_names"]
