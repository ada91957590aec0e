"""Model-side inference for serving, without Ray: a loaded model directory answers a batch of queries.

A `Query` is what the ingress prepared: the task family, the instruction text (the task's
`instruction` of the request's record), the preprocessed image (or None) and, for closed-set tasks,
the candidate answers. `run_batch` groups a batch by (task, candidates, multi-label), and answers each
group with one call of the model's `biomedgpt.inference.Predictor` (the predictor evaluation uses):
- constrained tasks with candidates (VQA with the model's answers.json, classification, NLI): every
  candidate scored under their prefix tree (method `score`, samples x candidates in one decoder pass);
  the answer is the best candidate and the response carries the `top_k` scores;
- classification by a multi-label model over its own label set (`Query.multi_label`; the candidates are
  its classes in class order): method `multilabel`, as evaluation decodes ChestMNIST; the answer is the
  list joined by ", ", `labels` the list, and the scores each class's probability;
- free tasks (caption, summarise, and a constrained task asked without candidates): the task's official
  beam search (`FREE_BEAMS` beams for a constrained one).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..metrics.classify import join_labels
from ..modeldir import ModelMeta, read_model_meta
from ..spec import Limits
from ..tasks import DecodePlan, Task, get_task

if TYPE_CHECKING:
    from ..inference import Decoded, Predictor

#: beams of a constrained task (VQA) asked without candidates: free generation, wider than its trie's beam 1
FREE_BEAMS = 5


@dataclass
class Query:
    task: str
    instruction: str
    image: np.ndarray | None = None
    candidates: tuple[str, ...] | None = None
    top_k: int = 5
    multi_label: bool = False
    #: what the client sent, by field, for the token limits (`check_query`): its texts and its label list
    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    labels_field: str = "labels"
    #: an adapter's id (the replica's multiplexed model is then its base), or None for the model itself
    adapter: str | None = None


class QueryRefused(Exception):
    """A query the model's tokenizer finds over the serving limits: the HTTP status and the field."""

    def __init__(self, status: int, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.status, self.field, self.problem = status, field, problem


def check_query(lm: "LoadedModel", query: Query, limits: Limits) -> None:
    """Token limits of what the client sent, counted with the model's own tokenizer (characters were only
    the ingress's first check): each text within `max_text_tokens`, each label within `max_label_tokens`,
    and the logits scoring its labels allocates (rows scored at once x the longest label's tokens x the
    vocabulary) within `max_logits`. Raises `QueryRefused` (413) naming the field."""
    tok = lm.predictor.tok
    for name, text in query.texts.items():
        n = len(tok.encode_text(text))
        if n > limits.max_text_tokens:
            raise QueryRefused(413, name, f"{n} tokens, more than the limit of {limits.max_text_tokens}")
    if not query.labels:
        return
    longest = 0
    for i, label in enumerate(query.labels):
        n = len(tok.encode_text(label))
        if n > limits.max_label_tokens:
            raise QueryRefused(413, f"{query.labels_field}[{i}]",
                               f"{n} tokens, more than the limit of {limits.max_label_tokens}")
        longest = max(longest, n)
    # torch and the model code load where models are served (this runs there): the ingress stays without them
    from ..model.constrained import SCORE_CHUNK_ROWS

    vocab = int(lm.predictor.model.config.vocab_size)
    logits = min(len(query.labels), SCORE_CHUNK_ROWS) * (longest + 1) * vocab  # +1: each label's EOS
    if logits > limits.max_logits:
        raise QueryRefused(413, query.labels_field,
                           f"{len(query.labels)} labels of up to {longest} tokens need {logits:,} decoder logits "
                           f"({vocab:,} per token), more than the limit of {limits.max_logits:,}")


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the process or the device running out of memory (a retry may succeed elsewhere)."""
    if isinstance(err, MemoryError):
        return True
    name = type(err).__name__
    return name == "OutOfMemoryError" or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


@dataclass
class LoadedModel:
    """A served model: its id and its predictor (which holds the model directory's metadata, `meta`); the
    adapters loaded on it (`predictor.adapters`) with their metadata, least recently used first."""

    model_id: str
    predictor: Predictor
    load_seconds: float = 0.0
    adapter_meta: "collections.OrderedDict[str, ModelMeta]" = dataclasses.field(
        default_factory=collections.OrderedDict)

    def meta_for(self, adapter: str | None) -> ModelMeta:
        return self.predictor.meta if adapter is None else self.adapter_meta[adapter]

    def adapter_bytes(self) -> int:
        return self.predictor.adapters.total_bytes if self.predictor.has_adapters else 0


def ensure_adapters(lm: LoadedModel, wanted: dict[str, Path]) -> list[str]:
    """Load the adapters `wanted` ({id: adapter directory}) on `lm` that are not loaded yet, and mark every one
    of them most recently used; returns the ids loaded. Adapter directories are checked against the model: the
    vocabulary its run recorded must be the model's."""
    loaded = []
    for adapter_id, folder in wanted.items():
        if adapter_id in lm.adapter_meta:
            lm.adapter_meta.move_to_end(adapter_id)
            continue
        meta = read_model_meta(folder)
        vocab = (meta.training.get("model_config") or {}).get("vocab_size")
        if vocab is not None and int(vocab) != int(lm.predictor.model.config.vocab_size):
            raise ValueError(f"{adapter_id}: trained with a vocabulary of {vocab} ids, its base {lm.model_id} has "
                             f"{lm.predictor.model.config.vocab_size}")
        lm.predictor.adapters.load(adapter_id, folder)
        lm.adapter_meta[adapter_id] = meta
        loaded.append(adapter_id)
    return loaded


def evict_adapters(models: Sequence[LoadedModel], max_count: int, max_bytes: int, keep: set[str]) -> list[str]:
    """Unload adapters, least recently used first (each model's in LRU order, models in the order given), never
    those in `keep` (the batch about to run), until at most `max_count` adapters and `max_bytes` of their weights
    stay loaded over all `models`; returns their ids."""
    evicted = []

    def totals() -> tuple[int, int]:
        return sum(len(m.adapter_meta) for m in models), sum(m.adapter_bytes() for m in models)

    count, size = totals()
    while count > max_count or size > max_bytes:
        candidates = [(m, a) for m in models for a in m.adapter_meta if a not in keep]
        if not candidates:
            break
        model, adapter_id = candidates[0]
        model.predictor.adapters.unload(adapter_id)
        del model.adapter_meta[adapter_id]
        evicted.append(adapter_id)
        count, size = totals()
    return evicted


def load_model(model_dir: str | Path, model_id: str, threads: int | None = None, *, device: str = "auto",
               dtype: str = "float32") -> LoadedModel:
    """Load an exported model directory (registry version or `biomedgpt export` output) for serving, on
    `device` in `dtype`."""
    # torch and the model code load where models are served: the ingress builds Queries without them
    import torch

    from ..inference import Predictor

    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor.from_model_dir(model_dir, device=device, dtype=dtype)
    return LoadedModel(model_id, predictor, load_seconds=time.perf_counter() - t0)


def serving_plan(task: Task, candidates: tuple[str, ...] | None, multi_label: bool) -> DecodePlan:
    """The task's official plan, except that a served closed-set answer scores every candidate (the
    response carries their scores) and a constrained task without candidates searches `FREE_BEAMS` beams."""
    plan = task.decode_plan(candidates, multi_label=multi_label)
    if plan.method == "trie":
        return dataclasses.replace(plan, method="score")
    if plan.method == "free" and task.decoding.constrained:
        return dataclasses.replace(plan, beam_size=FREE_BEAMS)
    return plan


def _answer(plan: DecodePlan, query: Query, d: Decoded) -> dict[str, Any]:
    top = max(1, query.top_k)
    if plan.method == "score":
        order = sorted(range(len(d.candidates)), key=lambda i: -d.log_probs[i])[:top]
        scores = [{"candidate": d.candidates[i], "log_prob": round(d.log_probs[i], 6),
                   "probability": round(d.probabilities[i], 6)} for i in order]
        return {"answer": d.prediction, "scores": scores, "decoding": "trie"}
    if plan.method == "multilabel":
        order = sorted(range(len(d.candidates)), key=lambda i: -d.probabilities[i])[:top]
        scores = [{"candidate": d.candidates[i], "log_prob": round(math.log(max(d.probabilities[i], 1e-12)), 6),
                   "probability": round(d.probabilities[i], 6)} for i in order]
        return {"answer": join_labels(d.prediction), "labels": d.prediction, "scores": scores, "decoding": "multilabel"}
    return {"answer": d.prediction, "scores": None, "decoding": "beam" if plan.beam_size > 1 else "greedy"}


def _source_length(lm: LoadedModel, q: Query) -> int:
    meta = lm.meta_for(q.adapter)
    task = get_task(q.task)
    n = meta.max_source_length if q.task in meta.tasks else max(meta.max_source_length, task.source_length)
    return min(n, int(getattr(lm.predictor.model.config, "max_position_embeddings", 1024)))


def _run_group(lm: LoadedModel, task_name: str, candidates: tuple[str, ...] | None, multi_label: bool,
               source_length: int, queries: Sequence[Query]) -> list[dict[str, Any]]:
    task = get_task(task_name)
    p = lm.predictor
    plan = serving_plan(task, candidates, multi_label)
    inputs = p.inputs([q.instruction for q in queries], [q.image for q in queries], source_length=source_length)
    adapters = [q.adapter for q in queries] if any(q.adapter for q in queries) else None
    return [_answer(plan, q, d) for q, d in zip(queries, p.decode(plan, inputs, adapters=adapters))]


def run_batch(lm: LoadedModel, queries: Sequence[Query]) -> list[dict[str, Any]]:
    """Answers for `queries` (any mix of tasks, candidate sets and adapters of the model), in order; one model
    call per group of the same task, candidates, input size and source length, whatever their adapters (each
    sample through its own: `Predictor.decode(adapters=...)`)."""
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(queries):
        size = None if q.image is None else tuple(q.image.shape)
        groups.setdefault((q.task, q.candidates, q.multi_label, size, _source_length(lm, q)), []).append(i)
    results: list[dict[str, Any] | None] = [None] * len(queries)
    for (task, cands, multi, _, length), idx in groups.items():
        for i, res in zip(idx, _run_group(lm, task, cands, multi, length, [queries[i] for i in idx])):
            results[i] = res
    return results  # type: ignore[return-value]
