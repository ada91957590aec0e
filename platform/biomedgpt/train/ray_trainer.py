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
from ..data.stream import ShardStream, merge_data_errors
from ..modeldir import lightning_checkpoint_path
from ..spec import TrainerSpec
from .checkpoints import StepCheckpointer
from .eval_callback import EvalDuringTraining
from .module import BiomedGPTModule
from .plan import TrainPlan
from .progress import attach, send
from .report import keep_earlier_attempt


class DataPosition(L.Callback):
    """Saves the training stream's position (epoch, batches) in every checkpoint and restores it, so a
    resumed run reads exactly the batches the interrupted one had not.

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
        local = {"position": self.stream.position_after(self.trained), "errors": self.stream.data_errors()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, local)  # every rank saves checkpoints and ends training together
            return out
        return [local]

    def _merged(self) -> tuple[dict[str, Any], dict[str, Any]]:
        gathered = self._gather()
        position = {k: v for k, v in gathered[0]["position"].items() if k != "rows"}
        rows = [g["position"].get("rows") for g in gathered]
        if any(r is not None for r in rows):
            position["rows_by_rank"] = rows
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
                noise_vocab_end: int | None = None, constraint_candidates: list[list[int]] | None = None
                ) -> BiomedGPTModule:
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker; `config["plan"]` is the run's TrainPlan."""
    plan: TrainPlan = config["plan"]
    t = plan.trainer
    torch.set_num_threads(max(1, plan.torch_threads))
    ctx = ray.train.get_context()
    # Lightning's, Ray's and torch's records go to the run's logs/workers/, progress to the driver
    libraries_to_file(Path(plan.log_dir) / "workers" / f"rank{ctx.get_world_rank()}.log")
    attach(config.get("progress"))
    module = make_module(t, plan.model_config, plan.init_dir, noise_vocab_end=plan.noise_vocab_end,
                         constraint_candidates=plan.constraint_candidates)
    checkpointer = StepCheckpointer(
        every=t.checkpoint_every, max_steps=plan.max_steps,
        sharded=t.strategy == "fsdp" and t.checkpoint_format == "sharded",
        meta=plan.checkpoint_meta, assets=plan.assets, report_every=t.log_every,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    batches = ShardStream(plan.data.groups, rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                          batch_size=t.batch_size, seed=t.seed, preprocess=plan.data.preprocess,
                          columns=TRAIN_COLUMNS, shuffle_buffer=plan.data.shuffle_buffer,
                          error_budget=plan.data.error_budget)
    callbacks: list[L.Callback] = [checkpointer, DataPosition(batches, plan.log_dir, t.log_every, plan.max_steps),
                                   ProgressReporter(plan.max_steps, t.log_every)]
    logger: Any = False
    if ctx.get_world_rank() == 0:  # metrics.csv for the report, TensorBoard events for people
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
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, train_dataloaders=batches)
        return
    with checkpoint.as_directory() as ckpt_dir:
        path = lightning_checkpoint_path(Path(ckpt_dir))
        if ctx.get_world_rank() == 0:
            send({"kind": "resume", "path": checkpoint.path})
        trainer.fit(module, train_dataloaders=batches, ckpt_path=str(path))


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
    """`trainer.workers` workers, each reserving `cpus_per_worker` CPUs and, with `use_gpu`, one GPU."""
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources)


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
