"""What each evaluated dataset is: its task, the metrics its dataset spec reports, and the answer
candidates of constrained decoding, from `datasets_spec/<name>.yaml`'s `answer_candidates` policy:

| policy              | candidates                                                                  |
|---------------------|-----------------------------------------------------------------------------|
| `answers_of_splits` | every distinct normalised answer of the records of those splits' shards     |
| `class_names`       | the dataset's class names (the converter's list, else the `label_name`s of all its shards) |
| `fixed`             | the listed values                                                           |
| `none`              | none: free generation                                                       |

A dataset without a spec takes its task's `unspecified_candidates` policy instead: the model's own
answers (answers.json), the task's `fixed_answers`, the class names of its shards, or none.
Candidates are written as the task's targets are (`Task.candidate_text`), so that decoding under the
trie can produce exactly them.

A multi-label dataset (MedMNIST's ChestMNIST, or records whose `label_name` is a list) has its class
names in class order (the converter's list; from shards, by the records' class indices `label`), the
order its answers list them in, and `Candidates.multi_label` set.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..tasks import get_task

DATASETS_SPEC_ENV = "BIOMEDGPT_DATASETS_SPEC"
REPO = Path(__file__).resolve().parents[3]


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the dataset, split or file."""


def datasets_spec_dir() -> Path:
    """$BIOMEDGPT_DATASETS_SPEC, else ./datasets_spec, else the checkout's datasets_spec/."""
    if os.environ.get(DATASETS_SPEC_ENV):
        return Path(os.environ[DATASETS_SPEC_ENV])
    here = Path("datasets_spec")
    if here.is_dir() and any(here.glob("*.yaml")):
        return here
    return REPO / "datasets_spec"


def load_dataset_spec_or_none(dataset: str, directory: Path | None = None):
    """The dataset's spec, or None when `datasets_spec/<dataset>.yaml` does not exist."""
    from ..data.dataset_spec import load_dataset_spec

    path = (directory or datasets_spec_dir()) / f"{dataset}.yaml"
    return load_dataset_spec(path) if path.is_file() else None


def shard_records(shards_root: str, dataset: str, split: str, *, images: bool = True) -> Iterator[dict[str, Any]]:
    """The records of one split (json fields, plus `_image` bytes when present and `images`)."""
    from ..data.shards import read_shard

    for shard in list_split_shards(shards_root, dataset, split):
        for sample in read_shard(shard.url):
            rec = json.loads(sample["json"])
            if images:
                rec["_image"] = sample.get("jpg") or sample.get("png")
            yield rec


def list_split_shards(shards_root: str, dataset: str, split: str):
    """`list_shards`, with an error that names the dataset, the split and the shard root."""
    from ..data.shards import ShardError
    from ..data.stream import list_shards

    try:
        return list_shards(shards_root, dataset, split)
    except (FileNotFoundError, ShardError) as err:
        raise EvaluationError(f"{dataset}/{split}: no shards under {shards_root} ({err}); build them with "
                              f"`biomedgpt shards build {dataset} --source DIR --out {shards_root}`") from None


@dataclass
class Candidates:
    """Answer candidates of one dataset (None: free generation) and, for answers_of_splits, how often
    each answer occurs in those splits (for the majority-answer baseline)."""

    values: list[str] | None
    policy: str
    counts: Counter = field(default_factory=Counter)
    #: True: the class names of a multi-label dataset (in class order); None: not known from the candidates
    multi_label: bool | None = None


def answer_candidates(dataset: str, task_name: str, spec: Any, shards_root: str,
                      model_answers: list[str] | None = None) -> Candidates:
    """The candidates of `dataset` by its dataset spec's policy, or without a spec by its task's
    `unspecified_candidates` (see the module docstring)."""
    task = get_task(task_name)
    if spec is None:
        policy = task.unspecified_candidates
        if policy == "model_answers":
            if not model_answers:
                raise EvaluationError(f"{dataset}: a {task_name} dataset without datasets_spec/{dataset}.yaml needs "
                                      "the model's answers.json for its candidates")
            return Candidates(sorted({task.candidate_text(a) for a in model_answers}), policy)
        if policy == "fixed":
            return Candidates(list(task.fixed_answers), policy)
        if policy == "class_names":
            names, multi = _label_names_of_shards(dataset, shards_root, None)
            return Candidates(names, policy, multi_label=multi)
        return Candidates(None, "none")
    policy = spec.answer_candidates.policy
    if policy == "none":
        return Candidates(None, policy)
    if policy == "fixed":
        return Candidates(_distinct(task.candidate_text(v) for v in spec.answer_candidates.values), policy)
    if policy == "class_names":
        from ..data.converters.medmnist import SUBSETS, label_names

        if spec.source.converter in SUBSETS:
            names = label_names(spec.source.converter)
            multi: bool | None = SUBSETS[spec.source.converter].multi_label
        else:
            names, multi = _label_names_of_shards(dataset, shards_root, list(spec.splits))
        return Candidates(_distinct(task.candidate_text(n) for n in names), policy, multi_label=multi)
    # answers_of_splits
    counts: Counter = Counter()
    for split in spec.answer_candidates.splits:
        for rec in shard_records(shards_root, dataset, split, images=False):
            if rec.get("answer") is not None and str(rec["answer"]).strip():
                counts[task.candidate_text(rec["answer"])] += 1
    if not counts:
        raise EvaluationError(f"{dataset}: answer_candidates.policy answers_of_splits found no answers in the "
                              f"splits {spec.answer_candidates.splits} under {shards_root}")
    return Candidates(sorted(counts), policy, counts)


def _label_names_of_shards(dataset: str, shards_root: str, splits: list[str] | None) -> tuple[list[str], bool]:
    """(class names, multi-label) of the records' `label_name`s: sorted; multi-label (lists) in the
    order of their class indices (`label`, where it is a parallel list of integers), then by name."""
    names: set[str] = set()
    index: dict[str, int] = {}
    multi = False
    for split in splits or ["train", "val", "test"]:
        try:
            list_split_shards(shards_root, dataset, split)
        except EvaluationError:
            continue
        for rec in shard_records(shards_root, dataset, split, images=False):
            value = rec.get("label_name")
            if isinstance(value, str) and value.strip():
                names.add(value)
            elif isinstance(value, list):
                multi = True
                names.update(v for v in value if isinstance(v, str) and v.strip())
                label = rec.get("label")
                if isinstance(label, list) and len(label) == len(value):
                    index.update((n, i) for n, i in zip(value, label) if isinstance(i, int) and isinstance(n, str))
    if not names and not multi:
        raise EvaluationError(f"{dataset}: no class names: the converter has no list and no shard under "
                              f"{shards_root} has a label_name")
    if not names:
        raise EvaluationError(f"{dataset}: no class names: every multi-label record under {shards_root} has "
                              "an empty label_name list")
    return sorted(names, key=lambda n: (index.get(n, len(index)), n)), multi


def _distinct(values) -> list[str]:
    out: dict[str, None] = {}
    for v in values:
        if v:
            out.setdefault(v, None)
    return list(out)
