"""The job-spec schema: one typed, validated description of every job.

A job is one YAML document with `kind` (finetune | pretrain | evaluate | serve). Training and evaluation
jobs (`JobSpec`) have the sections `team`, `name`, `model`, `data`, `trainer`, `evaluate`, `output`; a
serving application (`kind: serve`, jobs/serve/, `ServeAppSpec`) names its registry, ingress, model
deployment and limits (its Ray Serve deploy config is made by `biomedgpt.serve.spec`). Loading validates
everything before any resource is used (`biomedgpt.yamlspec`): unknown keys are errors (with a
suggestion when the key looks mistyped), types and ranges are checked, and every error names the file
and the field path.

    spec = load_spec("jobs/demo/vqa_rad.yaml")          # a JobSpec, or a ServeAppSpec for kind: serve
    serving = load_serve_spec("jobs/serve/cluster.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import storage
from .data.transforms import Augment
from .tasks import task_names
from .yamlspec import Dialect, SchemaError, build


class SpecError(SchemaError):
    """A job spec is invalid. The message names the file and the field path."""


DIALECT = Dialect(error=SpecError)


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
        from .model.configuration import SIZES  # transformers: heavy (~4 s), needed only to check a job's model

        if self.size not in SIZES:
            raise SpecError(f"{where}.size: {self.size!r} is not a named size ({', '.join(SIZES)})")
        if self.image_size % 16 or not 16 <= self.image_size <= 672:
            raise SpecError(f"{where}.image_size: must be a multiple of 16 in [16, 672], got {self.image_size}")
        self.tokenizer.validate(f"{where}.tokenizer")


@dataclass
class DatasetRef:
    """One dataset split. Training datasets are mixed either by `weight` (shards per epoch = weight x
    the dataset's shards) or, with `group`, by the group's share of rows in `data.group_ratios`."""

    dataset: str
    split: str = "train"
    weight: float = 1.0
    group: str | None = None

    def validate(self, where: str) -> None:
        if self.weight <= 0:
            raise SpecError(f"{where}.weight: must be > 0, got {self.weight}")
        if self.group is not None and self.weight != 1.0:
            raise SpecError(f"{where}.weight: a dataset of a mixing group ({self.group!r}) takes its share from "
                            "data.group_ratios; leave weight out")


@dataclass
class RandomResizedCropSpec:
    """Random resized crop: a random `scale` fraction of the image area at a random aspect `ratio`,
    resized to the model's image size (torchvision's algorithm)."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])


@dataclass
class RandAugmentSpec:
    """RandAugment: `n` operations per image at magnitude `m` (0-10), plus gaussian noise of std `mstd`
    on the magnitude per operation; `ops` restricts the operations (default: all 14)."""

    n: int = 2
    m: float = 9.0
    mstd: float = 0.0
    ops: list[str] | None = None


@dataclass
class AugmentSpec:
    """Training-only image augmentation on the CPU workers (never in evaluation or serving),
    deterministic given trainer.seed. The official image-classification fine-tuning recipe is
    `{random_resized_crop: {}, hflip: 0.5, randaugment: {n: 2, m: 9, mstd: 0.5}, random_erasing: 0.25}`."""

    random_resized_crop: bool | RandomResizedCropSpec | None = None
    hflip: bool | float = 0.0
    randaugment: RandAugmentSpec | None = None
    random_erasing: float = 0.0

    def validate(self, where: str) -> None:
        try:
            Augment.from_config(self.to_config())
        except ValueError as err:
            msg = str(err)
            raise SpecError(f"{where}{msg[len('augment'):]}" if msg.startswith("augment.") else f"{where}: {msg}") from None

    def to_config(self) -> dict[str, Any]:
        """The plain mapping preprocessing takes (data/transforms.Augment.from_config)."""
        return dataclasses.asdict(self)


@dataclass
class DataSpec:
    """Shards and the datasets a job reads. `shards` is the root URL holding
    `{dataset}/{split}/*.tar`; `build` (optional) names native sources to convert first. Training
    datasets are mixed by `weight` (shards per epoch = weight x the dataset's shards); rows are shuffled
    within windows of `shuffle_buffer` rows; the shard order changes every epoch (trainer.seed). Each
training rank reads whole shards, so a dataset needs at least as many shards as there are workers:
`shard_max_samples` cuts the shards `build` writes.

`task` names the task family (tasks/) that turns every record into an example; null: each record's own
`task` field (mixtures of datasets of different tasks). `group_ratios` mixes by rows, as the official
pretraining does: the datasets without a `group` are read `weight` times per epoch (their rows, from the
manifests, are the epoch's reference R); a group with ratio r adds r x R rows per epoch, shared by its
datasets in proportion to their sizes (e.g. per 8 image-text rows 2 text rows: `{text: 0.25}`).

`augment` adds training-only image augmentations (AugmentSpec). Bad data (an undecodable image, a
record missing a field, a truncated shard) is skipped and counted by dataset and shard; each training
rank may skip at most `max_bad_samples` and at most `max_bad_fraction` of its rows per epoch (null: no
such limit), beyond which the run stops naming the shard and key. The budget is held back from every
epoch's batches (so ranks stay equal)."""

    shards: str
    task: str | None = None
    train: list[DatasetRef] = field(default_factory=list)
    eval: list[DatasetRef] = field(default_factory=list)
    build: dict[str, str] = field(default_factory=dict)
    max_source_length: int = 80
    max_target_length: int = 30
    shuffle_buffer: int = 256
    shard_max_samples: int = 100_000
    group_ratios: dict[str, float] = field(default_factory=dict)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    max_bad_samples: int | None = None
    max_bad_fraction: float | None = 0.001

    def validate(self, where: str) -> None:
        self.augment.validate(f"{where}.augment")
        if self.max_bad_samples is not None and self.max_bad_samples < 0:
            raise SpecError(f"{where}.max_bad_samples: must be >= 0 (bad samples a training rank may skip per "
                            f"epoch), got {self.max_bad_samples}")
        if self.max_bad_fraction is not None and not 0 <= self.max_bad_fraction < 1:
            raise SpecError(f"{where}.max_bad_fraction: must be in [0, 1), got {self.max_bad_fraction}")
        if self.task is not None:
            if self.task not in task_names():
                raise SpecError(f"{where}.task: {self.task!r} is not a task family ({', '.join(task_names())}; "
                                "null: each record's own task)")
        for i, ref in enumerate(self.train):
            ref.validate(f"{where}.train[{i}]")
            if ref.group is not None and ref.group not in self.group_ratios:
                raise SpecError(f"{where}.train[{i}].group: {ref.group!r} has no ratio in data.group_ratios "
                                f"(known: {', '.join(self.group_ratios) or 'none'})")
        for name, ratio in self.group_ratios.items():
            if ratio <= 0:
                raise SpecError(f"{where}.group_ratios.{name}: must be > 0, got {ratio}")
            if not any(ref.group == name for ref in self.train):
                raise SpecError(f"{where}.group_ratios.{name}: no training dataset is in group {name!r}")
            if all(ref.group is not None for ref in self.train):
                raise SpecError(f"{where}.group_ratios: list at least one training dataset without a group "
                                "(its rows are what the ratios are relative to)")
        for i, ref in enumerate(self.eval):
            ref.validate(f"{where}.eval[{i}]")
        if self.shard_max_samples < 1:
            raise SpecError(f"{where}.shard_max_samples: must be >= 1, got {self.shard_max_samples}")
        if self.shuffle_buffer < 1:
            raise SpecError(f"{where}.shuffle_buffer: must be >= 1 (rows shuffled together), got {self.shuffle_buffer}")
        if self.max_source_length < 4 or self.max_target_length < 2:
            raise SpecError(f"{where}: max_source_length >= 4 and max_target_length >= 2 required")


@dataclass
class EMASpec:
    """Exponential moving average of the weights (fairseq's --uses-ema/--store-ema, as the official VQA
    recipe): kept in fp32 beside the model, updated after every optimizer step with `decay`, saved in
    every checkpoint; the export (hence evaluation and serving) writes the EMA weights."""

    enabled: bool = False
    decay: float = 0.9999

    def validate(self, where: str) -> None:
        if not 0 < self.decay < 1:
            raise SpecError(f"{where}.decay: must be in (0, 1), got {self.decay!r}")


@dataclass
class TrainerSpec:
    """How to train: workers, strategy, precision, batch, schedule (AdamW, linear warmup then linear
    decay to 0, as the official recipes), checkpointing and retries. `torch_threads` (default: the
    whole CPUs reserved per worker, `cpus_per_worker`, GPU workers included) sets each worker's intra-op
    threads. `strategy`: `ddp` replicates the model on every worker, `fsdp` shards it (FSDP2), `auto` (the
    default) picks DDP when the model's training state fits comfortably on one device and FSDP2 otherwise
    (`train/plan.py: choose_strategy`; the plan says which and why). With FSDP, checkpoints are
    `sharded` (one file per rank, written in parallel) or `full` (one file gathered on rank 0).

    Length: `max_steps` optimizer steps, or `epochs` passes over the training data, turned into steps
    from the manifests' sample counts (each rank's batches per epoch of the mixing plan, / grad_accumulation).
    The loss (train/module.py, OFA's label-smoothed cross-entropy): `label_smoothing`;
    `label_smoothing_candidates` scores the targets of constrained tasks (VQA, classification, NLI) only
    among their answer candidates' tokens, as OFA's constraint masks do (the softmax and the smoothing mass
    cover the tokens the candidates' prefix tree allows at each position); `drop_worst_ratio` drops that
    fraction of the batch's highest token losses once more than `drop_worst_after` steps are done
    (captioning); `decoder_noise` replaces that fraction of decoder input tokens by random text tokens
    (summarisation, OFA's noise_ratio); `freeze_token_embeddings` freezes the shared token embedding
    (OFA's --freeze-encoder-embedding --freeze-decoder-embedding); `ema` keeps a moving average of the
    weights. Examples carrying a `loss_weight` (pretraining's second group) are weighted by it.
    `sample_patch_num` (the official pretraining's `--sample-patch-num 196`): in training, the encoder of an
    example that allows it (pretraining's image-text objectives) sees that many of its image's patches,
    drawn at random, the others masked; null: every patch.

    `min_workers` (default: `workers`) makes the group elastic: Ray Train starts or restarts it (after a
    failure, `max_failures`) with as many workers between `min_workers` and `workers` as the cluster has
    room for. Whatever the count, the run keeps the data plan and global batch (`workers` x `batch_size`
    x `grad_accumulation`) of the worker count it started with, so every count must divide that batch.
    `placement`: `pack` (Ray's default: as few nodes as hold the workers) or `spread` (each worker on its own
    node while there are nodes: one lost node takes one worker, not the group)."""

    workers: int = 1
    min_workers: int | None = None
    placement: Literal["pack", "spread"] = "pack"
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    strategy: Literal["auto", "fsdp", "ddp"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    batch_size: int = 8
    grad_accumulation: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 5e-5
    warmup_ratio: float = 0.04
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    clip_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    label_smoothing_candidates: bool = False
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0
    decoder_noise: float = 0.0
    sample_patch_num: int | None = None
    freeze_token_embeddings: bool = False
    ema: EMASpec = field(default_factory=EMASpec)
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
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1"),
            (self.epochs is None or self.epochs > 0, "epochs", "must be > 0"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (len(self.adam_betas) == 2, "adam_betas", "must be two numbers"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)"),
            (0 <= self.drop_worst_ratio < 1, "drop_worst_ratio", "must be in [0, 1)"),
            (self.drop_worst_after >= 0, "drop_worst_after", "must be >= 0 (steps)"),
            (0 <= self.decoder_noise < 1, "decoder_noise", "must be in [0, 1)"),
            (self.sample_patch_num is None or self.sample_patch_num >= 1, "sample_patch_num",
             "must be >= 1 (patches per image; null: all)"),
            (self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
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
        if self.min_workers is not None:
            if not 1 <= self.min_workers <= self.workers:
                raise SpecError(f"{where}.min_workers: must be in [1, workers = {self.workers}], got {self.min_workers!r}")
            total = self.workers * self.batch_size
            odd = [m for m in range(self.min_workers, self.workers) if total % m]
            if odd:
                raise SpecError(f"{where}.min_workers: a group of {odd[0]} worker(s) cannot share the global batch of "
                                f"{total} samples (workers {self.workers} x batch_size {self.batch_size}) equally; "
                                f"choose min_workers and batch_size so that every count from min_workers to workers "
                                f"divides workers x batch_size")
        if self.max_steps is not None and self.epochs is not None:
            raise SpecError(f"{where}.epochs: give max_steps or epochs, not both (max_steps is {self.max_steps})")
        self.ema.validate(f"{where}.ema")


@dataclass
class FinetuneSpec:
    """What fine-tuning trains. `method: full` (the default) trains every weight. `method: lora` trains
    adapters (LoRA, with the `peft` library): the base, `model.init`, is loaded once and frozen; rank-`rank`
    updates scaled by `alpha / rank` (with `dropout` on their input) train beside the projections
    `target_modules` names (module names or dotted suffixes of them, as peft matches them; default: the
    attention and FFN projections of every encoder and decoder layer, `model/adapters.py: DEFAULT_TARGETS`);
    `trainable` names further modules trained in full and saved with the adapter (peft's modules_to_save:
    linear or embedding modules, which mixed-adapter serving batches can route per sample, e.g.
    `image_proj`). Checkpoints hold only the trainable state and name the base (path, registry id, sha256);
    export writes an adapter directory (`adapter_config.json`, `adapter_model.safetensors`)."""

    method: Literal["full", "lora"] = "full"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    trainable: list[str] = field(default_factory=list)

    def validate(self, where: str, model: "ModelSpec") -> None:
        if self.method == "full":
            changed = [n for n in ("target_modules",) if getattr(self, n)] + (["trainable"] if self.trainable else [])
            if changed:
                raise SpecError(f"{where}.{changed[0]}: only for method: lora (method is full: every weight trains)")
            return
        from .model.adapters import MAX_RANK, MIN_RANK  # peft and torch: only for a spec that asks for adapters

        if not MIN_RANK <= self.rank <= MAX_RANK:
            raise SpecError(f"{where}.rank: must be in [{MIN_RANK}, {MAX_RANK}], got {self.rank!r}")
        if not self.alpha > 0:
            raise SpecError(f"{where}.alpha: must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise SpecError(f"{where}.dropout: must be in [0, 1), got {self.dropout!r}")
        if not model.init:
            raise SpecError(f"{where}.method: lora adapts a trained base: give model.init (the base model directory, "
                            "e.g. a registry version or a run's export/)")
        if self.target_modules is not None and not self.target_modules:
            raise SpecError(f"{where}.target_modules: list at least one module (or leave it out for the default)")
        linear, every = adapter_module_names(model.size)
        from .model.adapters import matches, nearest

        for i, name in enumerate(self.target_modules or []):
            if not matches(name, linear):
                hint = nearest(name, linear)
                raise SpecError(f"{where}.target_modules[{i}]: {name!r} names no linear module of the model "
                                f"(nearest: {', '.join(hint)})")
        for i, name in enumerate(self.trainable):
            if not matches(name, linear):
                hint = nearest(name, linear)
                kind = "a module that is not linear (mixed-adapter serving batches route only linear " \
                       "and embedding modules per sample)" if matches(name, every) else "no module of the model"
                raise SpecError(f"{where}.trainable[{i}]: {name!r} names {kind} (nearest linear: {', '.join(hint)})")
            if matches(name, {n for n in linear if any(n == t or n.endswith("." + t) for t in self.targets)}):
                raise SpecError(f"{where}.trainable[{i}]: {name!r} is already adapted by target_modules")

    @property
    def targets(self) -> list[str]:
        from .model.adapters import DEFAULT_TARGETS

        return list(self.target_modules) if self.target_modules else list(DEFAULT_TARGETS)

    def adapter(self) -> dict[str, Any] | None:
        """The adapter settings as plain data (what the plan, checkpoints and export carry), or None for full."""
        if self.method != "lora":
            return None
        return {"method": "lora", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.targets, "trainable": list(self.trainable)}


def adapter_module_names(size: str) -> tuple[set[str], set[str]]:
    """(linear module names, every module name) of the architecture (the same for every named size), built on
    the meta device."""
    import torch

    from .model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from .model.adapters import module_names

    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_size(size))
    return module_names(model)


@dataclass
class EvaluateSpec:
    """Evaluation: after training (finetune/pretrain), during training, or as its own job (kind evaluate:
    `model.init` x `data.eval`). Each dataset is decoded with its task's official decoding (tasks/):
    trie-constrained over the candidates its dataset spec's `answer_candidates` policy names for VQA,
    classification and NLI; beam search with the official beam size, no-repeat n-gram size and length
    penalty for captioning and summarisation. `mode: zero_shot` generates freely for every task (a
    classification's generated text is compared with the label). `decoding` (trie | beam) overrides how
    the constrained tasks decode in official mode; `beam_size` / `max_new_tokens` override the official
    values (null: the task's). `splits` chooses what is evaluated ("train": the `data.train` datasets,
    any other name: the `data.eval` entries of that split); `max_samples` caps each dataset (0: all).
    `image_sizes` sets the input resolution per task (e.g. {caption: 480}; default model.image_size).
    The work runs on `concurrency` Ray actors (each loads the model once, `cpus_per_worker` CPUs, a GPU
    each with `use_gpu`); the model and every input run on `device` (auto: CUDA when the actor has a
    GPU; cuda needs use_gpu) in `dtype` (float32 | bfloat16 | float16); the report shows
    `report_samples` predictions per dataset beside their images.
    `enabled` switches the evaluation after training; `every_n_steps` > 0 evaluates during training
    too, on rank 0, on at most `max_samples_during_training` samples per dataset, logging
    `eval/<dataset>/<metric>` to the run's loggers."""

    enabled: bool = True
    mode: Literal["official", "zero_shot"] = "official"
    decoding: Literal["trie", "beam"] | None = None
    beam_size: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 16
    max_samples: int = 0
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    concurrency: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    meteor: bool = True
    report_samples: int = 8
    every_n_steps: int = 0
    max_samples_during_training: int = 32
    image_sizes: dict[str, int] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        checks = [
            (self.beam_size is None or self.beam_size >= 1, "beam_size", "must be >= 1 (or null: the task's official)"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1 (or null)"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.max_samples >= 0, "max_samples", "must be >= 0 (0: all)"),
            (bool(self.splits), "splits", "list at least one split"),
            (self.concurrency >= 1, "concurrency", "must be >= 1 (Ray actors, each with its own model)"),
            (self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0"),
            (self.report_samples >= 0, "report_samples", "must be >= 0"),
            (self.every_n_steps >= 0, "every_n_steps", "must be >= 0 (0: no evaluation during training)"),
            (self.max_samples_during_training >= 1, "max_samples_during_training", "must be >= 1"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise SpecError(f"{where}.{name}: {msg}, got {getattr(self, name)!r}")
        from .tasks import evaluated_task_names

        for task, size in self.image_sizes.items():
            if task not in evaluated_task_names():
                raise SpecError(f"{where}.image_sizes.{task}: not a task family with an evaluation "
                                f"({', '.join(evaluated_task_names())})")
            if size % 16 or not 16 <= size <= 672:
                raise SpecError(f"{where}.image_sizes.{task}: must be a multiple of 16 in [16, 672], got {size}")
        if self.device == "cuda" and not self.use_gpu:
            raise SpecError(f"{where}.device: cuda needs use_gpu: true (Ray gives an evaluation actor a GPU only "
                            "then); or device: auto")
        if self.mode == "zero_shot" and self.decoding == "trie":
            raise SpecError(f"{where}.decoding: 'trie' contradicts mode zero_shot (free generation for every task); "
                            "leave decoding out")


@dataclass(frozen=True)
class Location:
    """A storage location a job reads or writes (`JobSpec.locations`): the spec field that names it, the URL
    or path, `read` or `write`, and what it is, for admission's messages."""

    field: str
    url: str
    mode: Literal["read", "write"]
    what: str


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
    output: OutputSpec = field(default_factory=OutputSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    description: str = ""
    source: str = field(default="<dict>", metadata={"internal": True})

    def validate(self, where: str) -> None:
        for name, value in (("name", self.name), ("team", self.team)):
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", value):
                raise SpecError(f"{where}.{name}: {value!r} must be lower-case letters, digits, '.', '_' or '-' "
                                "(it becomes part of storage paths and job names)")
        self.model.validate(f"{where}.model")
        self.trainer.validate(f"{where}.trainer")
        if self.kind in ("finetune", "pretrain") and self.trainer.max_steps is None and self.trainer.epochs is None:
            raise SpecError(f"{where}.trainer.max_steps: how long to train: give max_steps or epochs")
        if self.kind in ("finetune", "pretrain", "evaluate"):
            if self.data is None:
                raise SpecError(f"{where}.data: required for kind {self.kind!r}")
            self.data.validate(f"{where}.data")
            if self.kind != "evaluate" and not self.data.train:
                raise SpecError(f"{where}.data.train: list at least one dataset to train on")
        self.evaluate.validate(f"{where}.evaluate")
        if self.finetune.method != "full":
            if self.kind != "finetune":
                raise SpecError(f"{where}.finetune.method: {self.finetune.method} is for kind finetune, not {self.kind}")
            self.finetune.validate(f"{where}.finetune", self.model)
            if self.evaluate.every_n_steps:
                raise SpecError(f"{where}.evaluate.every_n_steps: not with finetune.method lora yet (the adapter run "
                                "is evaluated after training, on the adapter merged into its base)")
            if self.trainer.ema.enabled:
                raise SpecError(f"{where}.trainer.ema.enabled: not with finetune.method lora (the average would "
                                "copy the frozen base; adapters export their own weights)")
        else:
            self.finetune.validate(f"{where}.finetune", self.model)  # adapter-only fields refused with method full
        if self.kind == "evaluate":
            assert self.data is not None
            if not self.model.init:
                raise SpecError(f"{where}.model.init: an evaluate job needs the model to evaluate (a model directory "
                                "from `biomedgpt export` / `biomedgpt convert`, a run's export/, or a run checkpoint)")
            if not self.data.eval:
                raise SpecError(f"{where}.data.eval: list the datasets to evaluate ({{dataset, split}} entries)")
            if self.model.tokenizer.train_vocab_size is not None:
                raise SpecError(f"{where}.model.tokenizer.train_vocab_size: an evaluate job uses the model's own "
                                "tokenizer: give its path (the model directory itself when it holds the tokenizer)")
            for i, ref in enumerate(self.data.eval):
                if ref.split not in self.evaluate.splits:
                    raise SpecError(f"{where}.data.eval[{i}]: split {ref.split!r} of {ref.dataset} is not in "
                                    f"evaluate.splits {self.evaluate.splits}, so it would not be evaluated")

    @property
    def run_dir(self) -> str:
        """`<storage>/<team>/<name>`: where this job's checkpoints, logs and reports live."""
        return f"{self.output.storage.rstrip('/')}/{self.team}/{self.name}"

    def locations(self) -> list[Location]:
        """Every storage location the job opens, with the field that names it: what admission
        (tenancy.admit) judges. The run directory; the initial model and the tokenizer's files; the shard
        root (written when `data.build` builds into it); each training and evaluation split's folder
        `<shards>/<dataset>/<split>` (joined as the stream joins it, so a split that is a path is judged
        where it leads); each `data.build` source and the folder `<shards>/<dataset>` it is built into."""
        out = [Location("output.storage", self.run_dir, "write", "output (run directory)")]
        if self.model.init:
            out.append(Location("model.init", self.model.init, "read", "initial model"))
        tok = self.model.tokenizer
        for name in ("path", "vocab", "merges"):
            if getattr(tok, name):
                out.append(Location(f"model.tokenizer.{name}", getattr(tok, name), "read", "tokenizer"))
        d = self.data
        if d is None:
            return out
        if d.build:
            out.append(Location("data.shards", d.shards, "write", "shards it builds"))
        else:
            out.append(Location("data.shards", d.shards, "read", "shards"))
        for side in ("train", "eval"):
            for i, ref in enumerate(getattr(d, side)):
                out.append(Location(f"data.{side}[{i}].split", storage.join(d.shards, ref.dataset, ref.split), "read",
                                    f"split {ref.dataset}/{ref.split}"))
        for dataset, source in d.build.items():
            out.append(Location(f"data.build.{dataset}", source, "read", f"native source of {dataset}"))
            out.append(Location(f"data.build.{dataset}", storage.join(d.shards, dataset), "write",
                                f"shards of {dataset} it builds"))
        return out

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


# ----------------------------------------------------------------------------------------------
# The serving application (kind: serve)
# ----------------------------------------------------------------------------------------------


@dataclass
class HttpSpec:
    """Where Serve's HTTP proxy listens (loopback unless the spec says otherwise)."""

    host: str = "127.0.0.1"
    port: int = 8000


@dataclass
class IngressSpec:
    """The FastAPI ingress: authentication, input checks, model resolution."""

    replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 256
    #: a request the model has not answered within this many seconds gets 504 (JSON, retryable); Serve's own
    #: HTTP timeout is set a little above it as a backstop
    request_timeout_s: float = 60.0
    #: requests waiting for an ingress replica beyond this many get Serve's 503 (-1: no limit)
    max_queued_requests: int = 1024


@dataclass
class AuditSpec:
    """The audit trail of the app's `/v1` requests (`biomedgpt.audit`): one JSON line per request under `root`
    (default `$BIOMEDGPT_AUDIT`, else `_audit/` under the registry), written every `flush_s` seconds."""

    enabled: bool = True
    root: str | None = None
    flush_s: float = 2.0


@dataclass
class BatchSpec:
    """Dynamic batching (`@serve.batch`): requests for the same model within `wait_timeout_s` form one batch."""

    max_batch_size: int = 16
    wait_timeout_s: float = 0.01


@dataclass
class AutoscalingSpec:
    """Ray Serve autoscaling of the model deployment (replicas follow ongoing requests per replica)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0


@dataclass
class ModelsSpec:
    """The multiplexed model deployment: each replica keeps the `max_models_per_replica` most recently used
    models (LRU) and batches requests per model. Each model and every input runs on `device` (auto: CUDA
    when the replica has a GPU, `num_gpus`; cuda needs num_gpus > 0) in `dtype` (float32 | bfloat16 |
    float16).

    Adapters (LoRA versions of the registry, `kind: adapter`) are served on their base: a request for one goes to
    a replica holding the base (the base is the multiplexed model), which keeps at most
    `max_adapters_per_replica` adapters and `max_adapter_bytes` of their weights loaded (LRU over every base it
    holds); requests for different adapters of one base share a batch (per-sample adapters). An adapter is
    served on a base of its own department, or of a department listed in `shared_bases` (e.g. a platform
    team's base that every department's adapters build on)."""

    max_models_per_replica: int = 2
    max_adapters_per_replica: int = 64
    max_adapter_bytes: int = 2**30
    shared_bases: list[str] = field(default_factory=list)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int = 1
    max_ongoing_requests: int = 64
    #: requests waiting for a model replica beyond this many get 503 with Retry-After (-1: no limit)
    max_queued_requests: int = 512
    batch: BatchSpec = field(default_factory=BatchSpec)
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)


@dataclass
class Limits:
    """Serving request limits (`serve/requests.py` checks them); larger or longer input gets a 4xx naming
    the field."""

    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_question_chars: int = 1000
    max_text_chars: int = 20_000
    max_labels: int = 100
    max_label_chars: int = 200
    #: failed API-key checks a client address may make per minute (per ingress replica) before it gets 429
    auth_failures_per_minute: int = 10
    #: token limits, counted with the asked model's tokenizer (characters are only a cheap first check): a
    #: text longer than `max_text_tokens` or a label longer than `max_label_tokens` is 413
    max_text_tokens: int = 1024
    max_label_tokens: int = 32
    #: the decoder logits one request may allocate when its labels are scored (rows scored at once x label
    #: tokens x vocabulary): more is 413
    max_logits: int = 100_000_000


@dataclass
class ServeAppSpec:
    """A serving application over the model registry. With `model_dir` instead of a registry it serves that one
    model directory (as `biomedgpt serve MODEL_DIR`), under the department `team` (or `local`). With `team` a
    registry app serves that department only: its models, for its API keys. `api_keys` is a key file (the
    department's mounted Secret, `biomedgpt.tenancy.keys`) read instead of the tenants file's `apiKeys` and
    reloaded when it changes."""

    kind: Literal["serve"]
    name: str
    registry: str | None = None
    model_dir: str | None = None
    team: str | None = None
    tenants: str | None = None
    api_keys: str | None = None
    auth: bool = True
    route_prefix: str = "/"
    latest_ttl_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)
    http: HttpSpec = field(default_factory=HttpSpec)
    ingress: IngressSpec = field(default_factory=IngressSpec)
    models: ModelsSpec = field(default_factory=ModelsSpec)
    limits: Limits = field(default_factory=Limits)
    audit: AuditSpec = field(default_factory=AuditSpec)
    description: str = ""
    source: str = field(default="<dict>", metadata={"internal": True})

    def validate(self) -> None:
        f = self.source

        def fail(where: str, msg: str, value: Any) -> SpecError:
            return SpecError(f"{f}: {where}: {msg}, got {value!r}")

        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", self.name):
            raise fail("name", "lower-case letters, digits, '.', '_' or '-'", self.name)
        if self.registry and self.model_dir:
            raise SpecError(f"{f}: registry, model_dir: give one of them (a registry, or one model directory)")
        if self.model_dir is None and not self.auth:
            raise SpecError(f"{f}: auth: a registry app serves several departments and needs API keys (auth: true)")
        if self.api_keys and not self.auth:
            raise SpecError(f"{f}: api_keys: a key file needs auth: true")
        if self.api_keys and self.model_dir is not None and not self.team:
            raise SpecError(f"{f}: api_keys: a model directory served with a key file needs `team` (whose keys)")
        if self.models.device == "cuda" and not self.models.num_gpus:
            raise SpecError(f"{f}: models.device: cuda needs models.num_gpus > 0 (Ray gives a replica a GPU only "
                            "then); or device: auto")
        if not self.route_prefix.startswith("/"):
            raise fail("route_prefix", "must start with '/'", self.route_prefix)
        if not 1 <= self.http.port <= 65535:
            raise fail("http.port", "must be in 1..65535", self.http.port)
        a, m = self.models.autoscaling, self.models
        checks = [
            (self.ingress.replicas >= 1, "ingress.replicas", "must be >= 1", self.ingress.replicas),
            (self.ingress.num_cpus >= 0, "ingress.num_cpus", "must be >= 0", self.ingress.num_cpus),
            (self.ingress.max_ongoing_requests >= 1, "ingress.max_ongoing_requests", "must be >= 1",
             self.ingress.max_ongoing_requests),
            (m.max_models_per_replica >= 1, "models.max_models_per_replica", "must be >= 1", m.max_models_per_replica),
            (m.max_adapters_per_replica >= 1, "models.max_adapters_per_replica", "must be >= 1",
             m.max_adapters_per_replica),
            (m.max_adapter_bytes >= 1, "models.max_adapter_bytes", "must be >= 1", m.max_adapter_bytes),
            (m.num_cpus >= 0, "models.num_cpus", "must be >= 0", m.num_cpus),
            (m.num_gpus >= 0, "models.num_gpus", "must be >= 0", m.num_gpus),
            (m.torch_threads >= 1, "models.torch_threads", "must be >= 1", m.torch_threads),
            (m.max_ongoing_requests >= 1, "models.max_ongoing_requests", "must be >= 1", m.max_ongoing_requests),
            (m.batch.max_batch_size >= 1, "models.batch.max_batch_size", "must be >= 1", m.batch.max_batch_size),
            (m.batch.wait_timeout_s >= 0, "models.batch.wait_timeout_s", "must be >= 0", m.batch.wait_timeout_s),
            (a.min_replicas >= 0, "models.autoscaling.min_replicas", "must be >= 0", a.min_replicas),
            (a.max_replicas >= max(1, a.min_replicas), "models.autoscaling.max_replicas",
             "must be >= 1 and >= min_replicas", a.max_replicas),
            (a.initial_replicas is None or a.min_replicas <= a.initial_replicas <= a.max_replicas,
             "models.autoscaling.initial_replicas", "must lie in [min_replicas, max_replicas]", a.initial_replicas),
            (a.target_ongoing_requests > 0, "models.autoscaling.target_ongoing_requests", "must be > 0",
             a.target_ongoing_requests),
            (self.latest_ttl_s >= 0, "latest_ttl_s", "must be >= 0", self.latest_ttl_s),
            (0 < self.audit.flush_s <= 3600, "audit.flush_s", "must be in (0, 3600]", self.audit.flush_s),
            (self.ingress.request_timeout_s > 0, "ingress.request_timeout_s", "must be > 0",
             self.ingress.request_timeout_s),
            (self.ingress.max_queued_requests == -1 or self.ingress.max_queued_requests >= 1,
             "ingress.max_queued_requests", "must be >= 1, or -1 for no limit", self.ingress.max_queued_requests),
            (m.max_queued_requests == -1 or m.max_queued_requests >= 1, "models.max_queued_requests",
             "must be >= 1, or -1 for no limit", m.max_queued_requests),
        ]
        for lf in dataclasses.fields(Limits):
            value = getattr(self.limits, lf.name)
            checks.append((value >= 1, f"limits.{lf.name}", "must be >= 1", value))
        for ok, where, msg, value in checks:
            if not ok:
                raise fail(where, msg, value)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


def serve_spec_from_dict(data: Any, source: str = "<dict>") -> ServeAppSpec:
    spec = build(ServeAppSpec, data, file=source, dialect=DIALECT)
    spec.source = source
    spec.validate()
    return spec


def load_serve_spec(path: str | Path) -> ServeAppSpec:
    """Read and validate a serving spec (raises SpecError naming the file and the field path)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise SpecError(f"{p}: cannot read serving spec: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return serve_spec_from_dict(data, str(p))


# ----------------------------------------------------------------------------------------------
# Paths: one base for every process of a job
# ----------------------------------------------------------------------------------------------

#: Where a job submitted through Ray's job API keeps what a relative `output.storage` names (and the
#: shards it builds at a relative `data.shards`): Ray deletes the job's unpacked working dir with its session.
OUTPUT_ROOT_ENV = "BIOMEDGPT_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT = "~/biomedgpt-runs"


def output_root() -> Path:
    """$BIOMEDGPT_OUTPUT_ROOT, default ~/biomedgpt-runs (on the machine running the job's driver)."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or DEFAULT_OUTPUT_ROOT).expanduser().absolute()


def _relative_local(path: str | None) -> bool:
    """A plain relative path (not a URL, not absolute, not ~)."""
    return bool(path) and "://" not in path and not path.startswith("~") and not Path(path).is_absolute()


@dataclass
class ResolvedPaths:
    """What `resolve_paths` did: the base of relative paths, the root of a submitted job's outputs
    (None for a local run) and each changed field (`field: before -> after`)."""

    base: Path
    outputs: Path | None
    changed: list[str] = field(default_factory=list)


def resolve_paths(spec: JobSpec, base: str | Path, *, outputs: str | Path | None = None) -> tuple[JobSpec, ResolvedPaths]:
    """A copy of `spec` whose relative local paths are absolute, so that every process of the job (driver,
    Ray Data tasks, Ray Train workers, evaluation actors), whatever its own current directory, opens the
    same files. Done once, on the driver, when a job starts.

    Paths the job reads (`data.build` sources, `data.shards` it does not build, `model.init`, the
    tokenizer's files) resolve against `base`. With `outputs` (a job submitted through Ray's job API,
    whose `base` is the working dir Ray unpacked and deletes with its session), the paths it writes
    (`output.storage`, and `data.shards` when `data.build` builds them) resolve against `outputs` instead,
    and so does a read path that exists there but not under `base` (what an earlier submitted job wrote,
    such as the export an evaluate spec names). `~` is expanded; URLs and absolute paths are kept."""
    base = Path(base).expanduser().absolute()
    out_root = Path(outputs).expanduser().absolute() if outputs is not None else None
    new = copy.deepcopy(spec)
    info = ResolvedPaths(base=base, outputs=out_root)

    def fix(where: str, value: str | None, writes: bool) -> str | None:
        if not value:
            return value
        if value.startswith("~") and "://" not in value:
            resolved = str(Path(value).expanduser())
        elif not _relative_local(value):
            return value
        elif out_root is not None and (writes or (not (base / value).exists() and (out_root / value).exists())):
            resolved = str(out_root / value)
        else:
            resolved = str(base / value)
        if resolved != value:
            info.changed.append(f"{where}: {value} -> {resolved}")
        return resolved

    new.output.storage = fix("output.storage", new.output.storage, writes=True)
    new.model.init = fix("model.init", new.model.init, writes=False)
    tok = new.model.tokenizer
    tok.path = fix("model.tokenizer.path", tok.path, writes=False)
    tok.vocab = fix("model.tokenizer.vocab", tok.vocab, writes=False)
    tok.merges = fix("model.tokenizer.merges", tok.merges, writes=False)
    if new.data is not None:
        new.data.build = {name: fix(f"data.build.{name}", src, writes=False) or src
                          for name, src in new.data.build.items()}
        new.data.shards = fix("data.shards", new.data.shards, writes=bool(new.data.build)) or new.data.shards
    return new, info


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def spec_from_dict(data: Any, source: str = "<dict>") -> Any:
    """Validate a parsed YAML document into a JobSpec (raises SpecError naming `source` and the field).
    A serving spec (`kind: serve`, jobs/serve/) has its own schema: it becomes a `ServeAppSpec`."""
    if isinstance(data, dict) and data.get("kind") == "serve":
        return serve_spec_from_dict(data, source)
    spec = build(JobSpec, data, file=source, dialect=DIALECT)
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
