"""The VQA task: OFA's question preprocessing and the target format."""

from __future__ import annotations

import pytest

from biomedgpt.tasks import get_task
from biomedgpt.tasks.vqa import normalize_answer, pre_question


def test_pre_question_like_ofa():
    assert pre_question("  Is the lesion well-circumscribed / round?", 128) == "is the lesion well circumscribed round?"
    assert pre_question("?? What   is this", 128) == "what is this"
    assert pre_question("one two three four", 2) == "one two"


def test_example_instruction_and_target():
    task = get_task("vqa")
    ex = task.example({"id": "7", "question": "Is there a pneumothorax", "answer": " Yes ", "answer_type": "CLOSED "})
    assert ex.instruction == " is there a pneumothorax?"
    assert ex.target == " yes"
    assert ex.meta == {"id": "7", "answer": "yes", "answer_type": "closed", "question": "Is there a pneumothorax"}
    with_organ = get_task("vqa", add_organ=True).example({"question": "Where?", "answer": "a", "organ": "CHEST"})
    assert with_organ.instruction == " where? object: chest"


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="record '3' has no 'answer' field"):
        get_task("vqa").example({"id": "3", "question": "q"})
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        get_task("ocr")


def test_normalize_answer():
    assert normalize_answer("  Left  Lung ") == "left lung"
