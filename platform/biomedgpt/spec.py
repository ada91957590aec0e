"""The job-spec schema: one typed, validated description of every job.

A job is one YAML document with `kind` (finetune | pretrain | evaluate | serve) and the sections
`team`, `name`, `model`, `data`, `trainer`, `evaluate`, `serve`, `output`. Loading validates
everything before any resource is used: unknown keys are errors (with a suggestion when the key
looks mistyped), types and ranges are checked, and every error names the file and the field path.

    spec = load_spec("jobs/demo/vqa_rad.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class SpecError(ValueError):
    """A job spec is invalid. The message names the file and the field path."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenizerSpec:
    """Where the tokenizer comes from: a directory with tokenizer files (`path`), BART/OFA BPE files
    (`vocab` + `merges`), or a byte-level BPE trained on the job's training text (`train_vocab_size`)."""

    path: str | None = None
    vocab: str | None = None
    merges: str | None = None
    train_vocab_size: int | None = None

    def validate(self, where: str) -> None:
        chosen = [bool(self.path), bool(self.vocab or self.merges), self.train_vocab_size is not None]
        if sum(chosen) != 1:
            raise SpecError(f"{where}: give exactly one of path, vocab+merges, train_vocab_size")
        if bool(self.vocab) != bool(self.merges):
            raise SpecError(f"{where}: vocab and merges go together")
        if self.train_vocab_size is not None and self.train_vocab_size < 256:
            raise SpecError(f"{where}.train_vocab_size: must be >= 256 (the byte alphabet), got {self.train_vocab_size}")


@dataclass
class ModelSpec:
    """The network: a named size, optionally with config overrides, or initial weights (`init`, a model
    directory such as `biomedgpt convert` writes; its config wins over `size`)."""

    size: str = "demo"
    init: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    image_size: int = 256

    def validate(self, where: str) -> None:
        from .model.configuration import SIZES

        if self.size not in SIZES:
            raise SpecError(f"{where}.size: {self.size!r} is not a named size ({', '.join(SIZES)})")
        if self.image_size % 16 or not 16 <= self.image_size <= 672:
            raise SpecError(f"{where}.image_size: must be a multiple of 16 in [16, 672], got {self.image_size}")
        self.tokenizer.validate(f"{where}.tokenizer")


@dataclass
class DatasetRef:
    dataset: str
    split: str = "train"
    weight: float = 1.0

    def validate(self, where: str) -> None:
        if self.weight <= 0:
            raise SpecError(f"{where}.weight: must be > 0, got {self.weight}")


@dataclass
class DataSpec:
    """Shards and the datasets a job reads. `shards` is the root URL holding
    `{dataset}/{split}/*.tar`; `build` (optional) names native sources to convert first. Training
    datasets are mixed by `weight` (shards per epoch = weight x the dataset's shards); rows are shuffled
    within windows of `shuffle_buffer` rows; the shard order changes every epoch (trainer.seed). Each
training rank reads whole shards, so a dataset needs at least as many shards as there are workers:
`shard_max_samples` cuts the shards `build` writes."""

    shards: str
    task: Literal["vqa"] = "vqa"
    train: list[DatasetRef] = field(default_factory=list)
    eval: list[DatasetRef] = field(default_factory=list)
    build: dict[str, str] = field(default_factory=dict)
    max_source_length: int = 80
    max_target_length: int = 30
    shuffle_buffer: int = 256
    shard_max_samples: int = 100_000

    def validate(self, where: str) -> None:
        for i, ref in enumerate(self.train):
            ref.validate(f"{where}.train[{i}]")
        for i, ref in enumerate(self.eval):
            ref.validate(f"{where}.eval[{i}]")
        if self.shard_max_samples < 1:
            raise SpecError(f"{where}.shard_max_samples: must be >= 1, got {self.shard_max_samples}")
        if self.shuffle_buffer < 1:
            raise SpecError(f"{where}.shuffle_buffer: must be >= 1 (rows shuffled together), got {self.shuffle_buffer}")
        if self.max_source_length < 4 or self.max_target_length < 2:
            raise SpecError(f"{where}: max_source_length >= 4 and max_target_length >= 2 required")


@dataclass
class TrainerSpec:
    """How to train: workers, strategy, precision, batch, schedule (AdamW, linear warmup then linear
    decay to 0, as the official recipes), checkpointing and retries. `torch_threads` (default: the
    whole CPUs reserved per worker, 4 on GPUs) sets each worker's intra-op threads. With FSDP, checkpoints are
    `sharded` (one file per rank, written in parallel) or `full` (one file gathered on rank 0)."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    strategy: Literal["fsdp", "ddp"] = "fsdp"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    batch_size: int = 8
    grad_accumulation: int = 1
    max_steps: int = 100
    lr: float = 5e-5
    warmup_ratio: float = 0.04
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    clip_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    dropout: float | None = None
    seed: int = 0
    checkpoint_every: int = 0
    checkpoint_format: Literal["sharded", "full"] = "sharded"
    num_to_keep: int = 2
    max_failures: int = 0
    log_every: int = 10

    def validate(self, where: str) -> None:
        checks = [
            (self.workers >= 1, "workers", "must be >= 1"),
            (self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0"),
            (self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1"),
            (self.max_steps >= 1, "max_steps", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (len(self.adam_betas) == 2, "adam_betas", "must be two numbers"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)"),
            (self.num_to_keep >= 1, "num_to_keep", "must be >= 1"),
            (self.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise SpecError(f"{where}.{name}: {msg}, got {getattr(self, name)!r}")
        if self.precision != "32-true" and not self.use_gpu and self.precision == "16-mixed":
            raise SpecError(f"{where}.precision: 16-mixed needs a GPU (use 32-true or bf16-mixed on CPU)")


@dataclass
class EvaluateSpec:
    """Evaluation after training: closed-set decoding over the answers seen in training (`trie`) or
    free beam search (`beam`); `max_samples` caps each split (0: all)."""

    enabled: bool = True
    decoding: Literal["trie", "beam"] = "trie"
    beam_size: int = 1
    max_new_tokens: int = 16
    batch_size: int = 16
    max_samples: int = 0
    splits: list[str] = field(default_factory=lambda: ["train", "test"])


@dataclass
class ServeSpec:
    """Ray Serve deployment of the exported model (host is always loopback for local runs)."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1


@dataclass
class OutputSpec:
    """Run storage: checkpoints and reports go to `<storage>/<team>/<name>/`."""

    storage: str = "runs"


@dataclass
class JobSpec:
    kind: Literal["finetune", "pretrain", "evaluate", "serve"]
    name: str
    team: str = "default"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec | None = None
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    description: str = ""
    source: str = field(default="<dict>", metadata={"internal": True})

    def validate(self, where: str) -> None:
        import re

        for name, value in (("name", self.name), ("team", self.team)):
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", value):
                raise SpecError(f"{where}.{name}: {value!r} must be lower-case letters, digits, '.', '_' or '-' "
                                "(it becomes part of storage paths and job names)")
        self.model.validate(f"{where}.model")
        self.trainer.validate(f"{where}.trainer")
        if self.kind in ("finetune", "pretrain", "evaluate"):
            if self.data is None:
                raise SpecError(f"{where}.data: required for kind {self.kind!r}")
            self.data.validate(f"{where}.data")
            if self.kind != "evaluate" and not self.data.train:
                raise SpecError(f"{where}.data.train: list at least one dataset to train on")

    @property
    def run_dir(self) -> str:
        """`<storage>/<team>/<name>`: where this job's checkpoints, logs and reports live."""
        return f"{self.output.storage.rstrip('/')}/{self.team}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


# ----------------------------------------------------------------------------------------------
# Typed loading
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, file: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, file)
            except SpecError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else SpecError(f"{file}: {path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SpecError(f"{file}: {path}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{file}: {path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{file}: {path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_convert(k, key_tp, f"{path}.{k}", file): (v if val_tp is Any else _convert(v, val_tp, f"{path}.{k}", file))
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, file)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{file}: {path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{file}: {path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-3 as a string (YAML 1.1); accept numeric strings explicitly
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise SpecError(f"{file}: {path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{file}: {path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _build(cls: type, data: Any, path: str, file: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{file}: {path or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else str(key)
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
        raise SpecError(f"{file}: {where}: unknown field{hint}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where, file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{file}: {where}: required field is missing")
    return cls(**kwargs)


def spec_from_dict(data: Any, source: str = "<dict>") -> JobSpec:
    """Validate a parsed YAML document into a JobSpec (raises SpecError naming `source` and the field)."""
    spec = _build(JobSpec, data, "", source)
    spec.source = source
    try:
        spec.validate(source)
    except SpecError as err:
        msg = str(err)
        # validate() names paths as "<source>.field": turn into "<source>: field"
        if msg.startswith(source + "."):
            msg = f"{source}: {msg[len(source) + 1:]}"
        raise SpecError(msg) from None
    return spec


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise SpecError(f"{p}: cannot read job spec: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return spec_from_dict(data, str(p))
