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

Each task reads its own lines and computes its own metrics (`Task.read_references`,
`Task.read_prediction`, `Task.score` in tasks/); this module pairs the files by id. Other fields are
ignored. Every id must appear once in each file. Errors name the file, the line and the field. The
result is a flat dict of metrics (see `biomedgpt.metrics`) and counts;
all metrics are fractions in [0, 1] except `cider_d`, on the conventional x10 scale (1.227 is what
papers print as 122.7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..tasks import Line, ScoreInputError, Task, evaluated_task_names, get_task
from ..tasks.base import json_type


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
                raise ScoreInputError(f"{path}:{lineno}: expected a JSON object, got {json_type(obj)}")
            yield lineno, obj


def _records_by_id(path: Path) -> dict[str, tuple[int, dict]]:
    """{str(id): (line number, record)} in file order."""
    records: dict[str, tuple[int, dict]] = {}
    for lineno, obj in _read_jsonl(path):
        if "id" not in obj:
            raise ScoreInputError(f"{path}:{lineno}: missing field 'id'")
        raw = obj["id"]
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise ScoreInputError(f"{path}:{lineno}: field 'id' must be a string or an integer, got {json_type(raw)}")
        key = str(raw)
        if key in records:
            raise ScoreInputError(f"{path}:{lineno}: duplicate id {raw!r} (first on line {records[key][0]})")
        records[key] = (lineno, obj)
    if not records:
        raise ScoreInputError(f"{path}: no records")
    return records


def _paired(task: Task, predictions_path: Path, references_path: Path) -> tuple[list[Any], list[Any]]:
    """(predictions, references) in the order of the references file, validated by the task."""
    preds = _records_by_id(predictions_path)
    refs = _records_by_id(references_path)
    for key, (lineno, obj) in preds.items():
        if key not in refs:
            raise ScoreInputError(f"{predictions_path}:{lineno}: id {obj['id']!r} is not in {references_path}")
    for key, (lineno, obj) in refs.items():
        if key not in preds:
            raise ScoreInputError(f"{references_path}:{lineno}: id {obj['id']!r} has no prediction in {predictions_path}")
    references = task.read_references([Line(references_path, lineno, obj) for lineno, obj in refs.values()])
    predictions = [task.read_prediction(Line(predictions_path, *preds[key]), ref) for key, ref in zip(refs, references)]
    return predictions, references


def score(task: str, predictions_path: str | os.PathLike, references_path: str | os.PathLike, *,
          meteor: Any = True) -> dict[str, float | int | None]:
    """Metrics of one task's predictions file against its references file (formats in the module
    docstring). For captions, `meteor=False` leaves METEOR out (it needs Java) and a running
    `biomedgpt.metrics.meteor.Meteor` is reused instead of starting the jar."""
    if task not in evaluated_task_names():
        raise ScoreInputError(f"task {task!r}: expected one of {', '.join(evaluated_task_names())}")
    family = get_task(task)
    predictions, references = _paired(family, Path(predictions_path), Path(references_path))
    return family.score(predictions, references, meteor=meteor)


# -- the evaluation's files -------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_files(task: Task, preds: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(prediction lines, reference lines) in `biomedgpt score`'s formats: the task's reference fields
    (`Task.reference_keys`) go to the references."""
    keys = task.reference_keys
    pred_lines = [{k: v for k, v in p.items() if k not in keys} for p in preds]
    ref_lines = [{"id": p["id"], **{k: p[k] for k in keys if k in p}} for p in preds]
    return pred_lines, ref_lines


def score_predictions(task: str, preds: list[dict[str, Any]], pred_path: Path, ref_path: Path, *,
                      meteor: Any = False, candidates: Any = None, metric_names: Sequence[str] = ()) -> dict[str, Any]:
    """Write the predictions and references files and score them with `score()`, so that the metrics are
    by construction those of `biomedgpt score` on the files; plus the task's `extra_metrics` (e.g. the
    AUC of classification from the candidate scores, the majority-answer baseline of VQA from the
    answers of the candidate splits)."""
    family = get_task(task)
    pred_lines, ref_lines = split_files(family, preds)
    write_jsonl(pred_path, pred_lines)
    write_jsonl(ref_path, ref_lines)
    metrics: dict[str, Any] = dict(score(task, pred_path, ref_path, meteor=meteor))
    metrics.update(family.extra_metrics(preds, metric_names, candidates))
    return metrics


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
    parser.add_argument("--task", required=True, choices=evaluated_task_names(), help="which metrics")
    parser.add_argument("--predictions", required=True, metavar="P.jsonl", help="predictions file")
    parser.add_argument("--references", required=True, metavar="R.jsonl", help="references file")
    parser.add_argument("--no-meteor", action="store_true", help="caption: leave METEOR out (no Java needed)")
    parser.set_defaults(func=_cmd_score)
    return parser
