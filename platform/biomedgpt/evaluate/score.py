"""Score a predictions file against a references file: `score()` and `biomedgpt score`.

Both files are JSON Lines, one object per line (blank lines are skipped), matched by `id` (a string or
an integer; 7 and "7" are the same id). Predictions: `{"id": ..., "prediction": "text"}` for every task.
References, by task:

| task              | reference line                                                                 |
|-------------------|--------------------------------------------------------------------------------|
| vqa               | `{"id", "references": "answer" or ["answer", ...], "answer_type": "closed"|"open"}` |
| caption           | `{"id", "references": ["caption", ...]}` (one or more)                         |
| summarize         | `{"id", "references": ["summary", ...]}` (one or more)                         |
| classify, nli     | `{"id", "references": "label"}`                                                |
| classify, multi-label | `{"id", "references": ["class", ...]}` (the positive classes; `[]` for none) |

Multi-label classification (ChestMNIST): when the references are lists (all of them: one file holds
one kind), a prediction is a list of class names or a text of names joined by commas (`"atelectasis,
effusion"`; `"no finding"`, `""` and `[]` mean none; a class name with a comma needs the list form),
scored by `biomedgpt.metrics.classify.multilabel_metrics` (accuracy = 1 - Hamming loss, macro-F1,
exact match).

Other fields are ignored. Every id must appear once in each file. Errors name the file, the line
and the field. The result is a flat dict of metrics (see `biomedgpt.metrics`) and counts;
all metrics are fractions in [0, 1] except `cider_d`, on the conventional x10 scale (1.227 is what
papers print as 122.7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

TASKS = ("vqa", "caption", "classify", "nli", "summarize")


class ScoreInputError(ValueError):
    """A predictions or references file that cannot be scored; the message names file, line and field."""


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise ScoreInputError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ScoreInputError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ScoreInputError(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
            yield lineno, obj


def _records_by_id(path: Path) -> dict[str, tuple[int, dict]]:
    """{str(id): (line number, record)} in file order."""
    records: dict[str, tuple[int, dict]] = {}
    for lineno, obj in _read_jsonl(path):
        if "id" not in obj:
            raise ScoreInputError(f"{path}:{lineno}: missing field 'id'")
        raw = obj["id"]
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise ScoreInputError(f"{path}:{lineno}: field 'id' must be a string or an integer, got {_json_type(raw)}")
        key = str(raw)
        if key in records:
            raise ScoreInputError(f"{path}:{lineno}: duplicate id {raw!r} (first on line {records[key][0]})")
        records[key] = (lineno, obj)
    if not records:
        raise ScoreInputError(f"{path}: no records")
    return records


def _field(path: Path, lineno: int, obj: dict, name: str) -> Any:
    if name not in obj:
        raise ScoreInputError(f"{path}:{lineno}: missing field {name!r}")
    return obj[name]


def _string(path: Path, lineno: int, obj: dict, name: str) -> str:
    value = _field(path, lineno, obj, name)
    if not isinstance(value, str):
        raise ScoreInputError(f"{path}:{lineno}: field {name!r} must be a string, got {_json_type(value)}")
    return value


def _string_list(path: Path, lineno: int, obj: dict, name: str, allow_string: bool) -> list[str] | str:
    value = _field(path, lineno, obj, name)
    if allow_string and isinstance(value, str):
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        expected = "a string or a non-empty list of strings" if allow_string else "a non-empty list of strings"
        got = _json_type(value) if not isinstance(value, list) else (
            "an empty list" if not value else "a list with a " + next(_json_type(v) for v in value if not isinstance(v, str)))
        raise ScoreInputError(f"{path}:{lineno}: field {name!r} must be {expected}, got {got}")
    return value


def _label_list(path: Path, lineno: int, obj: dict, name: str, allow_string: bool) -> list[str] | str:
    """A multi-label field: a list of strings (empty allowed), or with `allow_string` a string."""
    value = _field(path, lineno, obj, name)
    if allow_string and isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        expected = "a list of class names or a string of them joined by commas" if allow_string else \
            "a list of class names (like the first line)"
        got = _json_type(value) if not isinstance(value, list) else \
            "a list with a " + next(_json_type(v) for v in value if not isinstance(v, str))
        raise ScoreInputError(f"{path}:{lineno}: field {name!r} must be {expected}, got {got}")
    return value


def _paired(task: str, predictions_path: Path, references_path: Path) -> tuple[list[Any], list[Any], list[str]]:
    """(predictions, references, answer types) in the order of the references file, validated."""
    preds = _records_by_id(predictions_path)
    refs = _records_by_id(references_path)
    for key, (lineno, obj) in preds.items():
        if key not in refs:
            raise ScoreInputError(f"{predictions_path}:{lineno}: id {obj['id']!r} is not in {references_path}")
    predictions, references, answer_types = [], [], []
    multi_label: tuple[int, bool] | None = None  # classify: (first line, whether its references are a list)
    for key, (lineno, obj) in refs.items():
        if key not in preds:
            raise ScoreInputError(f"{references_path}:{lineno}: id {obj['id']!r} has no prediction in {predictions_path}")
        pred_line, pred_obj = preds[key]
        if task == "classify":
            is_list = isinstance(obj.get("references"), list)
            if multi_label is None:
                multi_label = (lineno, is_list)
            if multi_label[1]:
                references.append(_label_list(references_path, lineno, obj, "references", allow_string=False))
                predictions.append(_label_list(predictions_path, pred_line, pred_obj, "prediction", allow_string=True))
                continue
            if is_list:
                raise ScoreInputError(f"{references_path}:{lineno}: field 'references' is a list (multi-label) but on "
                                      f"line {multi_label[0]} a string (single-label): one file holds one kind")
        predictions.append(_string(predictions_path, pred_line, pred_obj, "prediction"))
        if task in ("caption", "summarize"):
            references.append(_string_list(references_path, lineno, obj, "references", allow_string=False))
        elif task == "vqa":
            references.append(_string_list(references_path, lineno, obj, "references", allow_string=True))
            kind = _string(references_path, lineno, obj, "answer_type")
            if kind.strip().lower() not in ("closed", "open"):
                raise ScoreInputError(f"{references_path}:{lineno}: field 'answer_type' must be \"closed\" or "
                                      f"\"open\", got {kind!r}")
            answer_types.append(kind.strip().lower())
        else:
            references.append(_string(references_path, lineno, obj, "references"))
    return predictions, references, answer_types


def score(task: str, predictions_path: str | os.PathLike, references_path: str | os.PathLike, *,
          meteor: Any = True) -> dict[str, float | int | None]:
    """Metrics of one task's predictions file against its references file (formats in the module
    docstring). For captions, `meteor=False` leaves METEOR out (it needs Java) and a running
    `biomedgpt.metrics.meteor.Meteor` is reused instead of starting the jar."""
    if task not in TASKS:
        raise ScoreInputError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    predictions, references, answer_types = _paired(task, Path(predictions_path), Path(references_path))
    if task == "vqa":
        from ..metrics.vqa import vqa_accuracy

        return vqa_accuracy(predictions, references, answer_types)
    if task == "caption":
        from ..metrics.caption import caption_metrics

        result: dict[str, float | int | None] = dict(caption_metrics(predictions, references, meteor=meteor))
        result["count"] = len(predictions)
        return result
    if task == "summarize":
        from ..metrics.summarize import summarization_metrics

        return summarization_metrics(predictions, references)
    from ..metrics.classify import classification_metrics, multilabel_metrics

    if task == "classify" and isinstance(references[0], list):
        return multilabel_metrics(predictions, references)
    return classification_metrics(predictions, references)


def _cmd_score(args: argparse.Namespace) -> int:
    from ..metrics.meteor import MeteorUnavailable

    try:
        result = score(args.task, args.predictions, args.references, meteor=not args.no_meteor)
    except (ScoreInputError, MeteorUnavailable) as err:
        print(f"biomedgpt score: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def add_score_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `score` subcommand to an argparse subparsers object; its func returns the exit code."""
    parser = subparsers.add_parser(
        "score",
        help="score a predictions file against a references file (VQA, captioning, classification, NLI, "
             "summarisation metrics)",
        description="Print the task's metrics as JSON. Files are JSON Lines matched by 'id': predictions carry "
                    "'prediction'; references carry 'references' (a list of strings for caption and summarize, "
                    "an answer or list of answers plus 'answer_type' closed|open for vqa, a label for classify "
                    "and nli; for multi-label classify, the list of positive classes, and predictions a list "
                    "or a comma-joined text).",
        epilog="Metrics are fractions in [0, 1] except cider_d, on the conventional x10 scale (1.227 = 122.7 in "
               "papers). Caption metrics tokenise like pycocoevalcap; METEOR runs pycocoevalcap's METEOR 1.5 jar "
               "and needs Java. Exit code 2 on an input error, naming the file, line and field.",
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="which metrics")
    parser.add_argument("--predictions", required=True, metavar="P.jsonl", help="predictions file")
    parser.add_argument("--references", required=True, metavar="R.jsonl", help="references file")
    parser.add_argument("--no-meteor", action="store_true", help="caption: leave METEOR out (no Java needed)")
    parser.set_defaults(func=_cmd_score)
    return parser
