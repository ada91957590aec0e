"""What a training spec's recipe needs from the data before training starts: each record's example
(by the spec's task family, or the record's own), the answer candidates of the constrained tasks, the
mixing weights (`data.group_ratios`) and the optimizer steps of `trainer.epochs`, all from the records
and the manifests' sample counts. No Ray here: the runner calls these on the driver."""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data import storage
from ..data.stream import batches_per_epoch, plan_epoch
from ..tasks import Example, get_task


class TaskExamples:
    """Records -> examples with one family per task name (`task`, or each record's `task` field)."""

    def __init__(self, task: str | None) -> None:
        self.task = task
        self._families: dict[str, Any] = {}

    def family(self, record: dict[str, Any]) -> Any:
        name = self.task or record.get("task")
        if not name:
            raise ValueError(f"record {record.get('id')!r} of {record.get('dataset')}: no 'task' field and the spec "
                             "names no data.task")
        if name not in self._families:
            self._families[name] = get_task(name)
        return self._families[name]

    def example(self, record: dict[str, Any]) -> tuple[str, Example]:
        """(task name, example) of one record."""
        fam = self.family(record)
        return fam.name, fam.example(record)


def answer_candidates(task: str | None, records: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """{task: sorted candidate answers} for every constrained task (VQA, classification, NLI) among the
    records: the family's fixed candidates when it has them (NLI: yes/no/maybe; classification built with
    its class names), else the answers its training examples have (VQA: the training answers, as OFA's
    ans2label; classification: the class names seen)."""
    examples = TaskExamples(task)
    out: dict[str, set[str]] = {}
    for rec in records:
        name, ex = examples.example(rec)
        if not examples.family(rec).decoding.constrained:
            continue
        bucket = out.setdefault(name, set())
        if ex.candidates:
            bucket.update(c.strip() for c in ex.candidates)
        else:
            bucket.add(str(ex.meta.get("answer", ex.target)).strip())
    return {name: sorted(a for a in answers if a) for name, answers in out.items()}


def candidate_label_ids(tokenizer: Any, answers: Iterable[str], max_target_length: int) -> list[list[int]]:
    """Each answer's label sequence exactly as the pipeline builds a target's labels (transforms.encode_pair:
    the target's text ids cut to max_target_length - 1, then EOS)."""
    return [tokenizer.encode_text(a)[: max_target_length - 1] + [tokenizer.eos_token_id] for a in answers]


def mixing_weights(refs: Sequence[Any], shard_lists: Sequence[Sequence[Any]], group_ratios: dict[str, float]) -> list[float]:
    """The shard weight of each training dataset (data/stream.py's plan: shards per epoch = weight x the
    dataset's shards). Datasets without a group keep their `weight`; their rows per epoch are the reference
    R. The datasets of a group with ratio r share r x R rows per epoch in proportion to their sizes, i.e.
    each gets weight r x R / (rows of the group)."""
    rows = [sum(s.samples for s in shards) for shards in shard_lists]
    reference = sum(ref.weight * n for ref, n in zip(refs, rows) if ref.group is None)
    weights = []
    for ref, n in zip(refs, rows):
        if ref.group is None:
            weights.append(float(ref.weight))
            continue
        group_rows = sum(m for r, m in zip(refs, rows) if r.group == ref.group)
        if not group_rows or not reference:
            raise ValueError(f"data.group_ratios.{ref.group}: no rows to mix (group {group_rows} rows, "
                             f"reference {reference} rows)")
        weights.append(group_ratios[ref.group] * reference / group_rows)
    return weights


def steps_for_epochs(groups: Sequence[tuple[Sequence[Any], float]], epochs: float, *, world: int, batch_size: int,
                     grad_accumulation: int, seed: int, budget: Any = None) -> int:
    """Optimizer steps of `epochs` passes over the mixing plan: every rank's batches per epoch (the
    stream's own count from the manifests' sample counts, less the data error budget's allowance),
    summed over the epochs (a fractional last epoch counts its fraction), divided by grad_accumulation."""
    whole, frac = int(epochs), epochs - int(epochs)
    batches = sum(batches_per_epoch(plan_epoch(groups, e, seed), world, batch_size, budget) for e in range(whole))
    if frac:
        batches += frac * batches_per_epoch(plan_epoch(groups, whole, seed), world, batch_size, budget)
    return max(1, int(math.floor(batches / grad_accumulation)))


def local_dir(url: str) -> str:
    """A local folder holding the files under `url`: the path itself when local, else a copy made once
    per process under the temp folder (model.init and tokenizer.path on object storage)."""
    if storage.is_local(url):
        return str(storage.local_path(url))
    target = Path(tempfile.gettempdir()) / "biomedgpt-models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    done = target / ".complete"
    if not done.is_file():
        if not storage.download_dir(url, target):
            raise FileNotFoundError(f"{url}: no files there (model.init / tokenizer.path must be a model directory)")
        done.write_text(url)
    return str(target)


def local_file(url: str) -> str:
    """A local path of the file at `url` (a copy under the temp folder when it is on object storage)."""
    if storage.is_local(url):
        return str(storage.local_path(url))
    target = Path(tempfile.gettempdir()) / "biomedgpt-models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    path = target / storage.basename(url)
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(url))
    return str(path)
