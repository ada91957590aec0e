"""The Ray Train entry: a TorchTrainer whose workers run Lightning, fed by Ray Data.

Each worker builds a Lightning Trainer on its Ray process group (ModelParallelStrategy = FSDP2, or
DDP), reads its split of the training dataset, trains for a fixed number of optimizer steps (every
rank runs the same number: the stream is repeated epoch after epoch, batches are dropped at the
epoch end so ranks stay equal), reports metrics and step checkpoints, and resumes from the latest
checkpoint when the run (same name and storage) is started again or retried after a failure.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import lightning as L

log = logging.getLogger(__name__)


class RepeatingBatches:
    """Batches of a Ray Data shard, epoch after epoch, as tensors (an endless iterable for Lightning;
    the step budget ends training)."""

    def __init__(self, shard: Any, batch_size: int, seed: int, columns: tuple[str, ...]) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.columns = columns
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            empty = True
            for batch in self.shard.iter_torch_batches(
                batch_size=self.batch_size, drop_last=True,
                local_shuffle_buffer_size=max(4 * self.batch_size, 64),
                local_shuffle_seed=self.seed + self.epoch,
            ):
                empty = False
                yield {k: batch[k] for k in self.columns}
            if empty:
                raise RuntimeError(f"this worker's share of the training data holds fewer than one batch of "
                                   f"{self.batch_size}; lower trainer.batch_size or add data")
            self.epoch += 1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from ray.train.lightning import RayLightningEnvironment

    from ..data.pipeline import TRAIN_COLUMNS
    from .checkpoints import StepCheckpointer, lightning_checkpoint_path
    from .module import BiomedGPTModule

    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    ctx = ray.train.get_context()
    world, local_world = ctx.get_world_size(), ctx.get_local_world_size()
    t = config["trainer"]
    fsdp = t["strategy"] == "fsdp"
    use_gpu = t["use_gpu"]
    precision = t["precision"]
    param_dtype = None
    if fsdp and precision == "bf16-mixed":
        param_dtype, precision = "bfloat16", "32-true"  # FSDP2's MixedPrecisionPolicy does the casting
    if fsdp:
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    else:
        strategy = DDPStrategy(process_group_backend="nccl" if use_gpu else "gloo")
    module = BiomedGPTModule(
        model_config=config["model_config"], init_dir=config.get("init_dir"), lr=t["lr"],
        weight_decay=t["weight_decay"], adam_betas=tuple(t["adam_betas"]), adam_eps=t["adam_eps"],
        warmup_ratio=t["warmup_ratio"], max_steps=t["max_steps"], clip_grad_norm=t["clip_grad_norm"],
        label_smoothing=t["label_smoothing"], seed=t["seed"], fsdp=fsdp, param_dtype=param_dtype,
        log_every=t["log_every"],
    )
    checkpointer = StepCheckpointer(
        every=t["checkpoint_every"], max_steps=t["max_steps"], fsdp=fsdp, meta=config["checkpoint_meta"],
        assets=config["assets"], report_every=t["log_every"],
    )
    callbacks: list[L.Callback] = [checkpointer, ProgressPrinter(t["max_steps"], t["log_every"])]
    logger = CSVLogger(config["log_dir"], name="", version="") if ctx.get_world_rank() == 0 else False
    trainer = L.Trainer(
        accelerator="gpu" if use_gpu else "cpu", devices=local_world, num_nodes=world // local_world,
        strategy=strategy, plugins=[RayLightningEnvironment()], precision=precision, max_steps=t["max_steps"],
        accumulate_grad_batches=t["grad_accumulation"], logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=t["log_every"], use_distributed_sampler=False,
    )
    shard = ray.train.get_dataset_shard("train")
    batches = RepeatingBatches(shard, t["batch_size"], t["seed"] + ctx.get_world_rank(), TRAIN_COLUMNS)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, train_dataloaders=batches)
        return
    with checkpoint.as_directory() as ckpt_dir:
        path = lightning_checkpoint_path(Path(ckpt_dir))
        if ctx.get_world_rank() == 0:
            sys.stdout.write(f"[train] resuming from {checkpoint.path}\n")
            sys.stdout.flush()
        trainer.fit(module, train_dataloaders=batches, ckpt_path=str(path))


class ProgressPrinter(L.Callback):
    """Prints one progress line every `every` steps on rank 0 (Lightning's bar is off in workers)."""

    def __init__(self, max_steps: int, every: int) -> None:
        self.max_steps = max_steps
        self.every = every
        self.last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last or (step % self.every and step != self.max_steps):
            return
        self.last = step
        m = trainer.callback_metrics
        parts = [f"step {step}/{self.max_steps}"]
        for key, label, fmt in (("train/loss", "loss", ".4f"), ("train/lr", "lr", ".2e"),
                                ("train/samples_per_s", "samples/s", ".1f")):
            if key in m:
                parts.append(f"{label} {float(m[key]):{fmt}}")
        # Written to the stream directly: Ray Train's patched print() would echo the line twice.
        sys.stdout.write("[train] " + "  ".join(parts) + "\n")
        sys.stdout.flush()


def fit(config: dict[str, Any], datasets: dict[str, Any], *, run_name: str, storage: str, workers: int,
        use_gpu: bool, cpus_per_worker: float, max_failures: int, num_to_keep: int):
    """Run the TorchTrainer; returns Ray's Result (its `.checkpoint` is the latest checkpoint)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..data import storage as st

    fs, path = st.pyarrow_filesystem(storage)
    if st.is_local(storage):
        Path(path).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()
