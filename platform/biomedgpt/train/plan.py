"""The training plan: everything the Ray Train workers need, decided on the driver before they start.

`plan_training(spec, run_dir)` reads the training records and the manifests the validated JobSpec names,
makes the run's assets (the tokenizer, trained or loaded; the answer candidates of the constrained
tasks) in `<run_dir>/assets/`, and returns a `TrainPlan`: the spec's trainer section with its length in
optimizer steps, the model config, the mixing plan of the shards, the preprocessing, what every
checkpoint records, and the evaluation during training. The plan is plain data (dataclasses, lists,
dicts, bytes): Ray pickles it to every worker, and `train/ray_trainer.py` reads its fields by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import storage as st
from ..data.stream import ErrorBudget, ShardInfo, elastic_layout, list_shards, records
from ..evaluate.job import training_eval_config
import torch

from ..model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from ..model.tokenizer import BiomedGPTTokenizer
from ..model.adapters import sha256_file
from ..modeldir import CARD, CHECKPOINT_META, WEIGHTS
from ..session import say
from ..spec import JobSpec, TrainerSpec
from ..tasks import get_task
from ..tasks.classify import multi_label_classes
from .recipe import (TaskExamples, answer_candidates, candidate_label_ids, local_dir, local_file, mixing_weights,
                     steps_for_epochs)


@dataclass
class DataPlan:
    """What each worker's `ShardStream` reads and how it turns rows into batches."""

    groups: list[tuple[list[ShardInfo], float]]
    """Per training dataset: its shards and its mixing weight (shards per epoch = weight x shards)."""
    shuffle_buffer: int
    preprocess: dict[str, Any]
    """The keyword arguments of the preprocessing (data/pipeline.py): task family, tokenizer folder, image
    size, source/target lengths, augmentation, task options."""
    error_budget: ErrorBudget
    world: int = 1
    """The ranks of every epoch's plan (the data world): the worker count the run started with, kept when it
    continues on another number of workers (ElasticStream); a fresh run's is `trainer.workers`."""


@dataclass
class TrainPlan:
    """One training run, as the workers carry it out (see the module docstring)."""

    name: str
    """The run's name: Ray Train's run name, so the same name resumes from the latest checkpoint."""
    storage: str
    """The folder or URL holding the run directory (Ray Train's storage path)."""
    trainer: TrainerSpec
    """The spec's trainer section, its length resolved: `max_steps` optimizer steps (epochs converted)."""
    model_config: dict[str, Any]
    init_dir: str | None
    """Initial weights (a model directory), or None for a fresh model."""
    noise_vocab_end: int
    """OFA's decoder noise and label smoothing draw text tokens: the ids below this one."""
    constraint_candidates: list[list[int]] | None
    """Label ids of the constrained tasks' answers, when the loss smooths over candidates only."""
    torch_threads: int
    data: DataPlan
    log_dir: str
    """Rank 0's local folder for metrics.csv, TensorBoard events and data_errors.json."""
    log_url: str | None
    """On object storage, where rank 0 uploads `log_dir` at every checkpoint and at the end."""
    checkpoint_meta: dict[str, Any]
    """What every checkpoint records about the run (model card and serving read it after export)."""
    assets: dict[str, bytes]
    """Files saved beside every checkpoint: the tokenizer, answers.json, candidates.json."""
    evaluate: dict[str, Any] | None
    """The evaluation during training (`biomedgpt.evaluate.job.training_eval_config`), or None."""
    adapter: dict[str, Any] | None = None
    """finetune.method lora: the adapter settings (`FinetuneSpec.adapter`) and `base` (`base_reference`);
    None: every weight trains."""

    @property
    def max_steps(self) -> int:
        return int(self.trainer.max_steps)


def plan_training(spec: JobSpec, run_dir: Path, *, log_url: str | None = None, storage: str | None = None) -> TrainPlan:
    """The plan of `spec`'s training run; writes the run's assets to `<run_dir>/assets/`. `storage`: the
    folder or URL holding the run directory (default: run_dir's parent); `log_url`: where the logs go
    when the run lives on object storage."""
    assert spec.data is not None
    d, t = spec.data, spec.trainer
    train_recs = [r for ref in d.train for r in records(d.shards, ref.dataset, ref.split)]
    say(f"data: {len(train_recs)} training records from " + ", ".join(f"{r.dataset}/{r.split}" for r in d.train))
    assets_dir = run_dir / "assets"
    tok = prepare_tokenizer(spec, train_recs, assets_dir / "tokenizer")
    say(f"tokenizer: {len(tok)} ids (saved to {assets_dir / 'tokenizer'})")
    # answer candidates of the constrained tasks: the trie of evaluation and of constrained training
    candidates = answer_candidates(d.task, train_recs)
    answers = sorted({a for task_answers in candidates.values() for a in task_answers})
    (assets_dir / "answers.json").write_text(json.dumps(answers, indent=0))
    (assets_dir / "candidates.json").write_text(json.dumps(candidates, indent=1))
    model_config = model_config_for(spec, len(tok))

    shard_lists = [list_shards(d.shards, r.dataset, r.split) for r in d.train]
    groups = list(zip(shard_lists, mixing_weights(d.train, shard_lists, d.group_ratios)))
    budget = ErrorBudget(d.max_bad_samples, d.max_bad_fraction)
    storage_root = storage or str(run_dir.parent.resolve())
    previous = previous_checkpoint_meta(st.join(storage_root, spec.name))
    data_world = data_world_for(spec, previous)
    strategy, why = choose_strategy(t, model_config)
    if previous and previous.get("format") == "sharded" and strategy == "ddp":
        if t.strategy != "auto":
            raise ValueError(f"{spec.source}: trainer.strategy: ddp cannot resume this run's sharded FSDP2 checkpoints "
                             f"(checkpoint of step {previous.get('step')}); use fsdp or auto")
        strategy, why = "fsdp", "auto: this run's checkpoints are sharded FSDP2 ones"
    say(f"strategy: {strategy} ({why})")
    adapter = spec.finetune.adapter()
    if adapter is not None:
        base = base_reference(spec.model.init)
        recorded = (previous or {}).get("base")
        if recorded and recorded.get("sha256") != base["sha256"]:
            raise ValueError(f"{spec.source}: model.init: the base {spec.model.init} has changed since this run's "
                             f"checkpoints were written (sha256 {base['sha256'][:12]}..., the checkpoints name "
                             f"{str(recorded.get('sha256'))[:12]}...); its adapters fit only the base they were "
                             "trained on: restore it or start a new run")
        adapter = dict(adapter, base=base)
        say(f"adapters: LoRA rank {adapter['rank']} on {', '.join(adapter['target_modules'])}"
            + (f" (+ {', '.join(adapter['trainable'])} in full)" if adapter["trainable"] else "")
            + f"; base {base['id'] or base['init']} (sha256 {base['sha256'][:12]}...) frozen")
    max_steps = t.max_steps or steps_for_epochs(groups, t.epochs, world=data_world, batch_size=t.batch_size,
                                                grad_accumulation=t.grad_accumulation, seed=t.seed, budget=budget)
    if t.epochs is not None:
        say(f"schedule: {t.epochs:g} epoch(s) = {max_steps} optimizer steps (from the manifests' sample counts)")
    constrained = [a for task_answers in candidates.values() for a in task_answers]
    assets = {f"tokenizer/{p.name}": p.read_bytes() for p in sorted((assets_dir / "tokenizer").iterdir()) if p.is_file()}
    assets.update({name: (assets_dir / name).read_bytes() for name in ("answers.json", "candidates.json")})
    return TrainPlan(
        name=spec.name,
        storage=storage_root,
        trainer=dataclasses.replace(t, max_steps=max_steps, epochs=None, strategy=strategy),
        model_config=model_config,
        init_dir=spec.model.init,
        # OFA's noise and smoothing tokens are text tokens: ids below the first image code
        noise_vocab_end=tok.code_offset if tok.num_codes else len(tok),
        constraint_candidates=candidate_label_ids(tok, constrained, d.max_target_length)
        if t.label_smoothing_candidates and constrained else None,
        torch_threads=t.torch_threads or max(1, int(t.cpus_per_worker)),
        data=DataPlan(
            groups=groups, shuffle_buffer=d.shuffle_buffer, error_budget=budget, world=data_world,
            preprocess=dict(task_name=d.task, tokenizer_dir=str((assets_dir / "tokenizer").resolve()),
                            image_size=spec.model.image_size, max_source_length=d.max_source_length,
                            max_target_length=d.max_target_length, augment=d.augment.to_config(),
                            # a family that draws each record's example from the seed (pretraining) gets it
                            task_options={"seed": t.seed} if get_task(d.task).seeded else None)),
        log_dir=str((run_dir / "logs").resolve()),
        log_url=log_url,
        checkpoint_meta={"run": spec.name, "team": spec.team, "size": spec.model.size, "model_config": model_config,
                         "task": d.task, "ema": t.ema.enabled, "image_size": spec.model.image_size,
                         "max_source_length": d.max_source_length,
                         "train_data": [f"{r.dataset}/{r.split}" for r in d.train], **multi_label_meta(train_recs),
                         **({"adapter": {k: v for k, v in adapter.items() if k != "base"}, "base": adapter["base"]}
                            if adapter else {})},
        assets=assets,
        # evaluation during training (evaluate.every_n_steps > 0), planned here: the workers only decode
        evaluate=training_eval_config(spec, model_answers=answers),
        adapter=adapter,
    )


def base_reference(init: str) -> dict[str, Any]:
    """What an adapter run records about its base (`model.init`): the path or URL it was given, its registry id
    when it is a registry version (its model card says), and the sha256 of its weights."""
    folder = Path(local_dir(init))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"model.init: {init} has no {WEIGHTS} (the base of an adapter run is a model directory)")
    card = folder / CARD
    card_id = None
    if card.is_file():
        try:
            card_id = json.loads(card.read_text()).get("id")
        except ValueError:
            card_id = None
    return {"init": init, "id": card_id if isinstance(card_id, str) else None, "sha256": sha256_file(weights)}


def previous_checkpoint_meta(run_url: str) -> dict[str, Any] | None:
    """The metadata (`biomedgpt.json`) of the newest checkpoint an earlier start of the run left in
    `run_url` (Ray Train's run folder), or None for a new run."""
    metas = sorted(rel for rel in st.list_files(run_url) if rel.startswith("checkpoint-") and rel.count("/") == 1
                   and rel.endswith("/" + CHECKPOINT_META))
    for rel in reversed(metas):
        try:
            return json.loads(st.read_text(st.join(run_url, rel)))
        except (OSError, ValueError):
            continue  # a checkpoint being written: the one before says as much about the run
    return None


def data_world_for(spec: JobSpec, previous: dict[str, Any] | None) -> int:
    """The run's data world (DataPlan.world): the one its checkpoints record, else `trainer.workers`.
    Refuses a worker count (and with `min_workers`, any count of the elastic range) that cannot share the
    run's global batch equally (data/stream.py: elastic_layout)."""
    t = spec.trainer
    data_world = int((previous or {}).get("data_world") or t.workers)
    for workers in range(t.min_workers or t.workers, t.workers + 1):
        try:
            elastic_layout(data_world, workers, t.batch_size)
        except ValueError as err:
            raise ValueError(f"{spec.source}: {err}") from None
    return data_world


#: Bytes of training state per parameter: float32 weights and gradients, and AdamW's two moments.
STATE_BYTES_PER_PARAM = 16
#: `auto` picks DDP when the training state takes at most this share of one device's memory: the rest is
#: for activations (which grow with batch and image size), communication buffers and the allocator.
DDP_FIT_FRACTION = 0.25
#: A GPU's memory when the driver cannot see the workers' GPUs: the smallest common data-centre GPU.
ASSUMED_GPU_MEMORY = 16 * 2**30


def count_parameters(model_config: dict[str, Any]) -> int:
    """Parameters of the model `model_config` describes, counted on the meta device (no memory used)."""
    cfg = {k: v for k, v in model_config.items() if k not in ("model_type", "transformers_version")}
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg))
    return sum(p.numel() for p in model.parameters())


def device_memory(trainer: TrainerSpec) -> tuple[int, str]:
    """(bytes, where the figure comes from) of one worker's device: the GPU this process sees (or
    ASSUMED_GPU_MEMORY), or this machine's memory shared by the workers."""
    if trainer.use_gpu:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
        return ASSUMED_GPU_MEMORY, "a GPU assumed to have 16 GiB"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // trainer.workers, f"this machine's memory / {trainer.workers} worker(s)"


def choose_strategy(trainer: TrainerSpec, model_config: dict[str, Any],
                    memory: tuple[int, str] | None = None) -> tuple[str, str]:
    """(`ddp` | `fsdp`, the reason): the spec's explicit choice, or for `auto` DDP when the model's training
    state (STATE_BYTES_PER_PARAM per parameter) fits in DDP_FIT_FRACTION of one device, else FSDP2. Data
    parallelism without sharding runs faster for models that fit (no gathers of parameters per layer:
    benchmarks/strategy.py measures the difference)."""
    if trainer.strategy != "auto":
        return trainer.strategy, "as the spec says"
    params = count_parameters(model_config)
    state = params * STATE_BYTES_PER_PARAM
    capacity, source = memory or device_memory(trainer)
    fits = state <= DDP_FIT_FRACTION * capacity
    return ("ddp" if fits else "fsdp"), (
        f"auto: {params / 1e6:.1f}M parameters need {state / 2**30:.2f} GiB of weights, gradients and optimizer "
        f"state, {'within' if fits else 'more than'} {DDP_FIT_FRACTION:.0%} of {capacity / 2**30:.1f} GiB "
        f"({source})")


def prepare_tokenizer(spec: JobSpec, train_records: list[dict[str, Any]], out_dir: Path) -> BiomedGPTTokenizer:
    """The job's tokenizer (model.tokenizer: a folder, BPE files, or trained on the training text), saved
    to out_dir."""
    t = spec.model.tokenizer
    if t.path:
        tok = BiomedGPTTokenizer.from_pretrained(local_dir(t.path))
    elif t.vocab:
        tok = BiomedGPTTokenizer.from_bpe_files(local_file(t.vocab), local_file(t.merges))
    else:
        examples = TaskExamples(spec.data.task)  # the spec's family, or each record's own
        texts = []
        for rec in train_records:
            _, ex = examples.example(rec)
            texts += [ex.instruction, ex.target]
        tok = BiomedGPTTokenizer.train(texts, vocab_size=t.train_vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def model_config_for(spec: JobSpec, vocab_size: int) -> dict[str, Any]:
    """The model config (as a JSON mapping): model.init's architecture, or model.size's, with
    model.overrides and trainer.dropout applied on top."""
    overrides = dict(spec.model.overrides)
    if spec.trainer.dropout is not None:
        overrides["dropout"] = spec.trainer.dropout
    if spec.model.init:
        # the initial checkpoint's architecture; overrides (dropout, drop-path rates) apply on top
        cfg = BiomedGPTConfig.from_pretrained(local_dir(spec.model.init), **overrides)
    else:
        overrides["vocab_size"] = vocab_size
        cfg = BiomedGPTConfig.from_size(spec.model.size, **overrides)
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"{spec.source}: model.init has a vocabulary of {cfg.vocab_size} ids but the tokenizer has "
                         f"{vocab_size}; give the tokenizer that belongs to the initial checkpoint")
    return json.loads(cfg.to_json_string(use_diff=False))


def multi_label_meta(train_recs: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"multi_label": True, "classes": [...]}` (class order) when the training records include multi-label
    classification ones (ChestMNIST), else {}: serving decodes such a model's label set as a list."""
    classes = multi_label_classes(train_recs)
    return {"multi_label": True, "classes": classes} if classes else {}
