"""What a task family is: everything that differs between tasks, in one file per family
(tasks/<name>.py, a `Task` subclass registered with `@register`). Evaluation, scoring, reports and
serving ask the task; nothing outside tasks/ branches on a task's name.

A task family owns, about a record (the shard `json`, DESIGN.md's contract):
- `instruction(record)`: the encoder text, from the input fields only (what serving has);
- `example(record)`: instruction + decoder target + whether the image is used + the fields evaluation
  needs (`meta`); a record missing a field raises `MissingFieldError` naming the record and the field;
about answers and decoding:
- `decoding`: its official decoding; `decode_plan(...)`: how one dataset is decoded (the `DecodePlan`
  the predictor follows); `multi_label(record)`: whether records answer with lists of classes;
- `unspecified_candidates` / `fixed_answers`: where the answer candidates of a dataset without a
  dataset spec come from; `candidate_text(text)`: how a candidate is written (as the targets are);
about scores and reports:
- `reference_fields(meta)`: a references line of `biomedgpt score`; `read_references` /
  `read_prediction`: reading those files back (errors name file, line and field); `score(...)`: the
  metrics; `extra_metrics(...)`: metrics beside them that need more than the two files (AUC, the
  majority baseline); `spec_metrics` / `default_metrics`: the names a dataset spec reports them under;
- `title`, `extra_columns`, `answer_text`, `reference_text`, `correct`: its results table and report;
about serving (`POST /v1/<name>`):
- `request_fields`: the body fields beside `image` (when `has_image`), `top_k` (when constrained),
  `model` and `zero_shot`; `request(fields, model)`: the record and candidates a request becomes;
  `source_length`: its encoder length when the model was not trained on it; `present(answer)`: the
  answer as the API returns it; `serves(model)`: whether a model may be asked this task at all.
The defaults below are a free-text task's (generation, exact-match scoring of one reference string).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Protocol, Sequence

from ..metrics.classify import classification_metrics, normalize_label


class MissingFieldError(ValueError):
    """A record lacks a field its task needs (the message names the record id and the field)."""


@dataclass
class Example:
    """One model example: encoder instruction text, decoder target text, whether an image is used,
    and the record fields evaluation needs (id, reference answer, answer type). `weight` scales the
    example's loss (pretraining weights its second group of objectives 2x); `image_op` names a change
    the image transform makes before the model sees it (``"mask_center"`` for image infilling);
    `candidates` restricts label smoothing and decoding to these target texts (constrained tasks);
    `decoder_codes` marks a target of image-code tokens (`<code_i>`), which the decoder embeds with
    image positions (the model's per-sample `code_masks` flag; image infilling); `sample_patches` lets the
    encoder see a random sample of the image's patches in training (`trainer.sample_patch_num`; the
    pretraining's image-text objectives, as the official criterion samples them)."""

    instruction: str
    target: str
    has_image: bool
    meta: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    image_op: str | None = None
    candidates: tuple[str, ...] | None = None
    decoder_codes: bool = False
    sample_patches: bool = False


@dataclass(frozen=True)
class Decoding:
    """A task's official decoding. `constrained`: decode over the candidate answers (VQA,
    classification, NLI): generation under a prefix tree over them, or, with `scored`, every candidate
    scored under the tree and the best taken (classification); otherwise beam search with these
    settings."""

    constrained: bool
    beam_size: int = 1
    max_new_tokens: int = 16
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    scored: bool = False


@dataclass(frozen=True)
class DecodePlan:
    """How one dataset (or one group of served requests) is decoded. `method`: `trie` (generation under
    a prefix tree over `candidates`: only a candidate can come out), `score` (every candidate scored
    under the tree, the best taken), `multilabel` (a list of the `candidates`, class names in class
    order, generated under `MultiLabelTrie`, plus per-class scores) or `free` (beam search with these
    settings)."""

    task: str
    method: str
    beam_size: int
    max_new_tokens: int
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    candidates: tuple[str, ...] | None = None


class ScoreInputError(ValueError):
    """A predictions or references file that cannot be scored; the message names file, line and field."""


def json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


@dataclass(frozen=True)
class Line:
    """One object of a predictions or references file (JSON Lines), with typed field readers whose
    errors name the file, the line and the field."""

    path: Path
    lineno: int
    obj: Mapping[str, Any]

    def error(self, message: str) -> ScoreInputError:
        return ScoreInputError(f"{self.path}:{self.lineno}: {message}")

    def field(self, name: str) -> Any:
        if name not in self.obj:
            raise self.error(f"missing field {name!r}")
        return self.obj[name]

    def string(self, name: str) -> str:
        value = self.field(name)
        if not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got {json_type(value)}")
        return value

    def strings(self, name: str, allow_string: bool) -> list[str] | str:
        """A non-empty list of strings (or, with `allow_string`, one string)."""
        value = self.field(name)
        if allow_string and isinstance(value, str):
            return value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            expected = "a string or a non-empty list of strings" if allow_string else "a non-empty list of strings"
            got = json_type(value) if not isinstance(value, list) else (
                "an empty list" if not value else "a list with a " + next(json_type(v) for v in value
                                                                          if not isinstance(v, str)))
            raise self.error(f"field {name!r} must be {expected}, got {got}")
        return value

    def labels(self, name: str, allow_string: bool) -> list[str] | str:
        """A list of class names (empty allowed), or with `allow_string` a string of them."""
        value = self.field(name)
        if allow_string and isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            expected = "a list of class names or a string of them joined by commas" if allow_string else \
                "a list of class names (like the first line)"
            got = json_type(value) if not isinstance(value, list) else \
                "a list with a " + next(json_type(v) for v in value if not isinstance(v, str))
            raise self.error(f"field {name!r} must be {expected}, got {got}")
        return value


@dataclass(frozen=True)
class RequestField:
    """A field of a task's serving request body (besides `image`, `top_k`, `model` and `zero_shot`):
    `kind` text (a string, at most the `limit` attribute of the serving limits in characters) or labels
    (a list of candidate labels)."""

    name: str
    kind: Literal["text", "labels"] = "text"
    required: bool = True
    limit: str = "max_text_chars"
    description: str = ""


class RequestError(ValueError):
    """A request a task cannot answer as sent (the serving API returns `status` naming `field`)."""

    def __init__(self, field: str, problem: str, status: int = 400) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.status = status


@dataclass(frozen=True)
class ServeRequest:
    """What a served request becomes: the record the task's instruction reads, the candidates of
    constrained decoding (None: free generation) and whether the answer is a list of classes."""

    record: dict[str, Any]
    candidates: tuple[str, ...] | None = None
    multi_label: bool = False


class ServedModel(Protocol):
    """What serving tells a task about the model asked (`biomedgpt.modeldir.ModelMeta` and an id)."""

    id: str
    answers: tuple[str, ...] | None
    classes: tuple[str, ...] | None

    def trained_for(self, task: str) -> bool: ...


def normalize_text(text: Any) -> str:
    """Stripped, lower-case, inner whitespace collapsed (how candidate answers are written)."""
    return re.sub(r"\s+", " ", str(text).strip().lower())


class Task(abc.ABC):
    """A task family: its records, decoding, scores, reports and serving (see the module docstring).
    Subclasses set the class attributes, implement `instruction` and `example`, and override what
    differs from a free-text task."""

    name: str = ""
    #: whether an example uses the record's image
    has_image: bool = False
    decoding: Decoding = Decoding(constrained=False)
    #: the metric keys `score` reports
    metrics: tuple[str, ...] = ()
    #: the record fields the instruction reads
    input_fields: tuple[str, ...] = ()
    #: whether datasets of this task are evaluated (False: a training objective without an evaluation)
    evaluated: bool = True
    #: whether a model trained on this task may be asked any task (a pretrained generalist)
    generalist: bool = False
    #: whether the family draws each record's example from a `seed` option (training passes the job's seed)
    seeded: bool = False
    #: dataset-spec metric name -> the key `score` (or `extra_metrics`) reports it under
    spec_metrics: Mapping[str, str] = {}
    #: the dataset-spec metric names reported for a dataset without a spec
    default_metrics: tuple[str, ...] = ()
    #: whether `score` uses METEOR (the evaluation then starts the jar once)
    needs_meteor: bool = False
    #: candidates of a dataset without a dataset spec: model_answers (the model's answers.json, required),
    #: fixed (`fixed_answers`), class_names (the label names in its shards) or none (free generation)
    unspecified_candidates: str = "none"
    fixed_answers: tuple[str, ...] = ()
    #: the fields of a references line (`reference_fields`), split off the predictions
    reference_keys: tuple[str, ...] = ("references",)
    #: the results table: its title, and metrics shown beside the dataset spec's when present
    title: str = ""
    extra_columns: tuple[str, ...] = ()
    #: serving: the request body fields, the OpenAPI summary, the encoder length for a model not trained on it
    request_fields: tuple[RequestField, ...] = ()
    summary: str = ""
    source_length: int = 80

    # -- records --------------------------------------------------------------------------------

    @abc.abstractmethod
    def instruction(self, record: dict[str, Any]) -> str:
        """The encoder text of a record, from its input fields only (what a serving request has)."""

    @abc.abstractmethod
    def example(self, record: dict[str, Any]) -> Example:
        """The record as a model example; a record missing a field raises `MissingFieldError`."""

    def multi_label(self, record: dict[str, Any]) -> bool:
        """Whether the record answers with a list of classes (decoded with method `multilabel`)."""
        return False

    # -- answers and decoding -------------------------------------------------------------------

    def candidate_text(self, text: Any) -> str:
        """A candidate answer as the targets write it (so that decoding under the trie can produce it)."""
        return normalize_text(text)

    def decode_plan(self, candidates: Sequence[str] | None, *, mode: str = "official", decoding: str | None = None,
                    beam_size: int | None = None, max_new_tokens: int | None = None,
                    multi_label: bool = False) -> DecodePlan:
        """The decoding of a dataset for `mode` official | zero_shot: official constrained decoding over
        `candidates` (trie generation, or scoring with `Decoding.scored`, or with `multi_label` lists of
        classes), else free generation. `decoding` (trie | beam) overrides how a constrained task decodes
        in official mode, `beam_size` / `max_new_tokens` the official values. A constrained task without
        candidates (dataset policy `none`) generates freely."""
        official = self.decoding
        beams = beam_size or official.beam_size
        max_new = max_new_tokens or official.max_new_tokens
        cands = tuple(candidates) if candidates else None
        if mode == "official" and official.constrained and cands and decoding != "beam":
            method = "multilabel" if multi_label else "score" if official.scored else "trie"
            return DecodePlan(self.name, method, beams, max_new, candidates=cands)
        return DecodePlan(self.name, "free", beams, max_new, official.no_repeat_ngram_size, official.length_penalty,
                          candidates=cands)

    # -- scores ---------------------------------------------------------------------------------

    def reference_fields(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The fields of a references line (`reference_keys`), from an Example's meta."""
        return {"references": meta["answer"]}

    def read_references(self, lines: Sequence[Line]) -> list[Any]:
        """The references of a references file, one per line, validated."""
        return [line.string("references") for line in lines]

    def read_prediction(self, line: Line, reference: Any) -> Any:
        """The prediction of a predictions line (its reference beside it), validated."""
        return line.string("prediction")

    def score(self, predictions: Sequence[Any], references: Sequence[Any], *, meteor: Any = True) -> dict[str, Any]:
        """The task's metrics: exact match after `normalize_label` (accuracy, macro-F1)."""
        return classification_metrics(predictions, references)

    def extra_metrics(self, predictions: Sequence[dict[str, Any]], metric_names: Sequence[str],
                      candidates: Any = None) -> dict[str, Any]:
        """Metrics beside `score`'s that need the predictions' extras (scores) or the dataset's candidate
        answers (`Candidates`): none by default."""
        return {}

    # -- reports --------------------------------------------------------------------------------

    def answer_text(self, value: Any) -> str:
        return str(value)

    def reference_text(self, references: Any) -> str:
        return " | ".join(references) if isinstance(references, list) else str(references)

    def correct(self, prediction: Any, references: Any) -> bool | None:
        """Whether a prediction is right (the report's tick); None where the task has no such verdict."""
        return normalize_label(str(prediction)) == normalize_label(str(references))

    # -- serving --------------------------------------------------------------------------------

    def serves(self, model: ServedModel) -> bool:
        """Whether `model` may be asked this task without `zero_shot`: it was trained for it (or lists it
        on its card), or it is a generalist."""
        return model.trained_for(self.name)

    def request(self, fields: Mapping[str, Any], model: ServedModel) -> ServeRequest:
        """What a request (its validated `request_fields`) asks of `model`: the record, free generation."""
        return ServeRequest({f.name: fields[f.name] for f in self.request_fields
                             if f.kind == "text" and fields.get(f.name) is not None})

    def present(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The answer as the API returns it (`answer`, `scores`, ... of the serving engine)."""
        return answer


_TASKS: dict[str, type] = {}


def register(cls: type) -> type:
    """Register a task family (a `Task` subclass) under its `name`."""
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def evaluated_task_names() -> list[str]:
    """The task families whose datasets have an evaluation."""
    return [n for n in sorted(_TASKS) if _TASKS[n].evaluated]


def get_task(name: str, **options: Any) -> Task:
    """The task family `name` (e.g. "vqa")."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name](**options)


def require(record: dict[str, Any], what: str, *keys: str) -> None:
    """Raise MissingFieldError naming the record and the first of `keys` it lacks (or has empty)."""
    for key in keys:
        value = record.get(key)
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
            raise MissingFieldError(f"{what} record {record.get('id', '?')!r} has no {key!r} field")


def clean_text(text: str) -> str:
    """Whitespace collapsed and stripped (tabs and newlines of the sources included)."""
    return re.sub(r"\s+", " ", str(text)).strip()


def truncate_words(text: str, max_words: int | None) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if max_words and len(words) > max_words else text


def unique(texts: Iterable[str]) -> list[str]:
    """Distinct texts in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        seen.setdefault(t, None)
    return list(seen)


def pre_caption(text: str, max_words: int | None = None) -> str:
    """OFA's text normalisation for captions, NLI sentences and articles: lower-cased, leading
    punctuation stripped, '-' and '/' read as spaces, whitespace collapsed, at most `max_words` words."""
    t = str(text).lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    return truncate_words(clean_text(t), max_words)
