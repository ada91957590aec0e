"""The Ray Train entry: a TorchTrainer whose workers run Lightning, fed by Ray Data.

Each worker builds a Lightning Trainer on its Ray process group (ModelParallelStrategy = FSDP2, or
DDP), streams its own shards of each epoch's plan through Ray Data (data/stream.py: every rank the
same number of batches per epoch), trains for a fixed number of optimizer steps, reports metrics and
step checkpoints (which carry the stream position), and resumes from the latest checkpoint (weights,
optimizer, step and data position) when the run (same name and storage) is started again or retried
after a failure.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import ray.data
import ray.train
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.lightning import RayLightningEnvironment
from ray.train.torch import TorchConfig, TorchTrainer

from ..console import libraries_to_file
from ..data import storage
from ..data.pipeline import TRAIN_COLUMNS
from ..data.stream import ElasticStream, merge_data_errors, merge_positions
from ..modeldir import read_checkpoint_meta
from ..spec import TrainerSpec
from .checkpoints import StepCheckpointer, fit_from_checkpoint
from .eval_callback import EvalDuringTraining
from .module import BiomedGPTModule
from .plan import TrainPlan
from .progress import attach, send
from .report import keep_earlier_attempt


class DataPosition(L.Callback):
    """Saves the training stream's position (epoch, batches; with an ElasticStream also the data world,
    the ranks of the epoch plan) in every checkpoint and restores it, so a resumed run reads exactly the
    batches the interrupted one had not, on as many workers as before or on another number of them.

    It also carries the bad data the ranks' streams skipped (data/stream.py): every checkpoint gathers
    the ranks' positions (where bad rows moved a rank's windows) and counts into the checkpoint; the
    total is logged as train/bad_samples every `log_every` steps, and rank 0 writes the counts by
    dataset and shard to `<log_dir>/data_errors.json` (the run report shows them)."""

    def __init__(self, stream: Any, log_dir: str | None = None, log_every: int = 1, max_steps: int = 0) -> None:
        self.stream = stream
        self.log_dir, self.log_every, self.max_steps = log_dir, max(1, log_every), max_steps
        # batches trained since the stream started or was sought: Lightning fetches one batch ahead, so
        # the stream's own position is a batch past what a checkpoint holds; save the position after these
        self.trained = 0

    def _gather(self) -> list[dict[str, Any]]:
        position = self.stream.position_after(self.trained)
        local = {"position": position, "errors": self.stream.data_errors(since_epoch=position["epoch"])}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, local)  # every rank saves checkpoints and ends training together
            return out
        return [local]

    def _merged(self) -> tuple[dict[str, Any], dict[str, Any]]:
        gathered = self._gather()
        position = merge_positions([g["position"] for g in gathered])
        errors = merge_data_errors([g["errors"] for g in gathered])
        if self.log_dir and self.stream.rank == 0:
            report = {k: v for k, v in errors.items() if k != "pending"}
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.log_dir) / "data_errors.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        return position, errors

    def state_dict(self) -> dict[str, Any]:
        position, errors = self._merged()
        return {"position": position, "data_errors": errors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stream.seek(state_dict["position"])
        self.trained = 0
        self.stream.restore_data_errors(state_dict.get("data_errors"), keep_counts=self.stream.rank == 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.trained += 1  # counted before the step: the checkpoint of this step is saved at its end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.log_every == 0 or step == self.max_steps:
            pl_module.log("train/bad_samples", float(self.stream.bad_samples), on_step=True, reduce_fx="sum",
                          sync_dist=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._merged()


def make_module(t: TrainerSpec, model_config: dict[str, Any], init_dir: str | None, *,
                noise_vocab_end: int | None = None, constraint_candidates: list[list[int]] | None = None,
                adapter: dict[str, Any] | None = None) -> BiomedGPTModule:
    """The LightningModule for the trainer section `t` (its `max_steps` set: a plan's `trainer`)."""
    fsdp = t.strategy == "fsdp"
    param_dtype = "bfloat16" if fsdp and t.precision == "bf16-mixed" else None
    return BiomedGPTModule(
        model_config=model_config, init_dir=init_dir, lr=t.lr, weight_decay=t.weight_decay,
        adam_betas=tuple(t.adam_betas), adam_eps=t.adam_eps, warmup_ratio=t.warmup_ratio,
        max_steps=t.max_steps, clip_grad_norm=t.clip_grad_norm, label_smoothing=t.label_smoothing,
        seed=t.seed, fsdp=fsdp, param_dtype=param_dtype, log_every=t.log_every,
        ema_decay=t.ema.decay if t.ema.enabled else None, freeze_token_embeddings=t.freeze_token_embeddings,
        drop_worst_ratio=t.drop_worst_ratio, drop_worst_after=t.drop_worst_after,
        decoder_noise=t.decoder_noise, noise_vocab_end=noise_vocab_end, constraint_candidates=constraint_candidates,
        sample_patch_num=t.sample_patch_num,
        adapter=adapter,
    )


def make_lightning_trainer(t: TrainerSpec, callbacks: list[L.Callback], logger: Any = False) -> L.Trainer:
    """A Lightning Trainer on this Ray Train worker's process group: FSDP2 through
    ModelParallelStrategy (data-parallel size = world size) or DDP; gloo on CPU, NCCL on GPU."""
    ctx = ray.train.get_context()
    world, local_world = ctx.get_world_size(), ctx.get_local_world_size()
    fsdp = t.strategy == "fsdp"
    precision = t.precision
    if fsdp and precision == "bf16-mixed":
        precision = "32-true"  # FSDP2's MixedPrecisionPolicy does the casting (see make_module)
    if world == 1 and not fsdp:
        strategy = "auto"  # one process: nothing to all-reduce, no DDP wrapper
    elif fsdp:
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                         save_distributed_checkpoint=t.checkpoint_format == "sharded")
    else:
        # Text batches never touch the image-code parts of the decoder (and masked images the
        # backbone's outputs): DDP must tolerate parameters without gradients.
        strategy = DDPStrategy(process_group_backend="nccl" if t.use_gpu else "gloo", find_unused_parameters=True)
    return L.Trainer(
        accelerator="gpu" if t.use_gpu else "cpu", devices=local_world, num_nodes=world // local_world,
        strategy=strategy, plugins=[RayLightningEnvironment()], precision=precision, max_steps=t.max_steps,
        accumulate_grad_batches=t.grad_accumulation, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every, use_distributed_sampler=False,
    )


#: Set to a folder, the workers append the sample keys of every batch they train on to
#: `<folder>/rank<R>.jsonl` ({"step", "epoch", "world", "keys"} a line): what the resume tests compare
#: with the epochs' plans.
RECORD_SAMPLES_ENV = "BIOMEDGPT_RECORD_SAMPLES"


class SampleRecorder(L.Callback):
    """Writes the keys of each batch as it is trained (see RECORD_SAMPLES_ENV); the stream keeps them
    (`ElasticStream(keys=True)`)."""

    def __init__(self, stream: ElasticStream, folder: str) -> None:
        self.stream = stream
        self.path = Path(folder) / f"rank{stream.rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.taken = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.taken = 0  # the stream counts its batches from its start or from the seek of a resume

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.taken += 1
        line = {"step": trainer.global_step + 1, "epoch": self.stream.position_after(self.taken)["epoch"],
                "world": self.stream.world, "keys": self.stream.keys_after(self.taken)}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def data_world_of(plan: TrainPlan, checkpoint_dir: Path | None) -> int:
    """The ranks of the run's epoch plan: the worker count it started with, which its checkpoints record
    (`data_world`); a fresh run's is the plan's. A checkpoint from before elastic resume records none:
    it is read as one of the current worker count (its samples are then not continued exactly when the
    count changed)."""
    if checkpoint_dir is not None:
        recorded = read_checkpoint_meta(checkpoint_dir).get("data_world")
        if recorded:
            return int(recorded)
        return ray.train.get_context().get_world_size()
    return plan.data.world


def elastic_line(stream: ElasticStream, t: TrainerSpec) -> str:
    """What a worker count other than the plan's changes, in words (rank 0 says it)."""
    n, m, b = stream.data_world, stream.world, stream.plan_batch_size
    return (f"the run's data plan has {n} rank(s) of batch {b} (the worker count it started with); on {m} worker(s) "
            f"each takes {stream.batch_size} samples per batch (trainer.batch_size {b} -> {stream.batch_size}), "
            f"grad_accumulation {t.grad_accumulation} unchanged: the global batch stays {n * b * t.grad_accumulation} "
            f"samples per optimizer step, every step trains the samples the {n}-worker run would, and the "
            f"schedule continues at the checkpoint's step ({stream.describe()})")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker; `config["plan"]` is the run's TrainPlan. The group may have another
    size than the run started with (a resume on another `trainer.workers`, or Ray Train restarting an
    elastic group smaller): the stream keeps the run's data plan and global batch (ElasticStream)."""
    plan: TrainPlan = config["plan"]
    t = plan.trainer
    torch.set_num_threads(max(1, plan.torch_threads))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Lightning's, Ray's and torch's records go to the run's logs/workers/, progress to the driver
    libraries_to_file(Path(plan.log_dir) / "workers" / f"rank{rank}.log")
    attach(config.get("progress"))
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint is not None else nullcontext(None)) as ckpt_dir:
        data_world = data_world_of(plan, Path(ckpt_dir) if ckpt_dir is not None else None)
        ray.data.DataContext.get_current().enable_progress_bars = False
        record = os.environ.get(RECORD_SAMPLES_ENV)
        batches = ElasticStream(plan.data.groups, rank=rank, world=world, data_world=data_world,
                                batch_size=t.batch_size, seed=t.seed, preprocess=plan.data.preprocess,
                                columns=TRAIN_COLUMNS, shuffle_buffer=plan.data.shuffle_buffer,
                                error_budget=plan.data.error_budget, keys=bool(record),
                                max_batches=plan.max_steps * t.grad_accumulation)
        if data_world != world and rank == 0:
            send({"kind": "elastic", "text": elastic_line(batches, t)})
        module = make_module(t, plan.model_config, plan.init_dir, noise_vocab_end=plan.noise_vocab_end,
                             constraint_candidates=plan.constraint_candidates, adapter=plan.adapter)
        checkpointer = StepCheckpointer(
            every=t.checkpoint_every, max_steps=plan.max_steps,
            sharded=t.strategy == "fsdp" and t.checkpoint_format == "sharded",
            meta=dict(plan.checkpoint_meta, data_world=data_world, workers=world), assets=plan.assets,
            run_url=f"{plan.storage.rstrip('/')}/{plan.name}",
        )
        position = DataPosition(batches, plan.log_dir, t.log_every, plan.max_steps)
        callbacks: list[L.Callback] = [checkpointer, position, ProgressReporter(plan.max_steps, t.log_every)]
        if record:
            callbacks.insert(0, SampleRecorder(batches, record))
        logger: Any = False
        if rank == 0:  # metrics.csv for the report, TensorBoard events for people
            if plan.log_url and not (Path(plan.log_dir) / "metrics.csv").exists():
                # a retry on another node continues the logs of earlier attempts
                storage.download_dir(plan.log_url, plan.log_dir)
            keep_earlier_attempt(Path(plan.log_dir))
            logger = [CSVLogger(plan.log_dir, name="", version=""),
                      TensorBoardLogger(plan.log_dir, name="", version="tensorboard", default_hp_metric=False)]
            if plan.log_url:
                callbacks.append(LogSync(plan.log_dir, plan.log_url, t.checkpoint_every))
        if plan.evaluate:  # every rank: the full weights are gathered collectively, rank 0 evaluates
            callbacks.append(EvalDuringTraining(plan.evaluate, plan.model_config, plan.assets))
        trainer = make_lightning_trainer(t, callbacks, logger)
        if ckpt_dir is None:
            trainer.fit(module, train_dataloaders=batches)
            return
        if rank == 0:
            send({"kind": "resume", "path": checkpoint.path})
        # Lightning restores the callbacks' state (DataPosition seeks the stream) before it iterates the stream;
        # FSDP2's sharded checkpoints are resharded by torch's distributed checkpoint for any world size
        fit_from_checkpoint(trainer, module, batches, Path(ckpt_dir))


class LogSync(L.Callback):
    """On rank 0 of a run whose storage is remote: flush the loggers and upload the log folder to the
    run's `logs/` every `every` steps (the checkpoint interval) and at the end, so the report and
    TensorBoard see the logs wherever the worker ran, and a retried or resumed run keeps them."""

    def __init__(self, log_dir: str, url: str, every: int) -> None:
        self.log_dir, self.url, self.every = log_dir, url, every

    def sync(self, trainer: L.Trainer) -> None:
        for lg in trainer.loggers:
            lg.save()
        storage.upload_dir(self.log_dir, self.url)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step:
            self.sync(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.sync(trainer)


class ProgressReporter(L.Callback):
    """Rank 0 sends a progress item every `every` steps and at the last one (train/progress.py: the
    driver draws the bar; Lightning's own bar is off in workers)."""

    def __init__(self, max_steps: int, every: int) -> None:
        self.max_steps = max_steps
        self.every = max(1, every)
        self.last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last or (step % self.every and step != self.max_steps):
            return
        self.last = step
        m = trainer.callback_metrics
        item: dict[str, Any] = {"kind": "step", "step": step, "max_steps": self.max_steps}
        for key, name in (("train/loss", "loss"), ("train/lr", "lr"), ("train/samples_per_s", "samples_per_s")):
            if key in m:
                item[name] = float(m[key])
        send(item)


def scaling_config(t: TrainerSpec) -> ScalingConfig:
    """`trainer.workers` workers, each reserving `cpus_per_worker` CPUs and, with `use_gpu`, one GPU; with
    `min_workers` below it, an elastic group of (min_workers, workers): Ray Train starts and restarts it
    with as many as the cluster's nodes hold; `placement` packs the workers on few nodes or spreads them."""
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    elastic = t.min_workers is not None and t.min_workers < t.workers
    return ScalingConfig(num_workers=(t.min_workers, t.workers) if elastic else t.workers, use_gpu=t.use_gpu,
                         resources_per_worker=resources, placement_strategy=t.placement.upper())


def fit(plan: TrainPlan, progress: Any = None) -> Result:
    """Run the plan on a TorchTrainer (`trainer.workers` workers; the run `<storage>/<name>`, resumed from
    its latest checkpoint when there is one); returns Ray's Result (`.checkpoint`: the latest checkpoint).
    `progress`: a ProgressInbox (train/progress.py) rank 0 sends its progress to; None: printed."""
    t = plan.trainer
    fs, path = storage.pyarrow_filesystem(plan.storage)
    if storage.is_local(plan.storage):
        Path(path).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "progress": progress},  # Ray's config is a dict
        scaling_config=scaling_config(t),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=plan.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )
    return trainer.fit()
