"""Text clean-up shared by the converters.

Releases carry stray tabs (VQA-RAD: ``"Heart \\tlungs"``), trailing and doubled spaces (PathVQA,
IU X-ray), answers stored as numbers (VQA-RAD: ``12``) and mixed-case answers (``"Yes"``/``"yes"``).
Questions and captions keep their case; answers are compared by exact match in the VQA literature
after stripping and lower-casing, so that is the stored ``answer`` (the original stays in
``answer_raw``).
"""

from __future__ import annotations

import re
from typing import Any

_WHITESPACE = re.compile(r"\s+")
CLOSED_ANSWERS = frozenset({"yes", "no"})


def clean_text(value: str) -> str:
    """Collapse every run of whitespace (tabs, newlines, doubled spaces) to one space and strip."""
    return _WHITESPACE.sub(" ", value).strip()


def answer_text(value: Any) -> str:
    """An answer as text: strings as they are, integral numbers without a decimal point (``12``,
    ``2.0`` -> ``"2"``). Raises TypeError for anything else (lists, null, booleans)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"expected a string or number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string or number, got {type(value).__name__}")


def normalise_answer(value: Any) -> str:
    """The stored ``answer``: text of the raw answer, whitespace collapsed, stripped, lower-cased."""
    return clean_text(answer_text(value)).lower()


def is_closed_answer(answer: str) -> bool:
    """True for yes/no answers (the closed questions of PathVQA, which has no answer_type field)."""
    return answer in CLOSED_ANSWERS
