"""Step checkpoints reported to Ray Train.

A checkpoint directory holds:
    lightning/          the Lightning distributed checkpoint (FSDP: .metadata, one .distcp per rank, meta.pt)
    lightning.ckpt      ... or, with DDP, Lightning's single-file checkpoint
    biomedgpt.json      step, model config, run name, metrics
    assets/             files the run carries into every checkpoint (tokenizer, answer candidates)
Reading one back (consolidating its state, exporting it to a model directory) is `biomedgpt.modeldir`'s,
below training, evaluation and serving; resuming (`fit_from_checkpoint`) is Lightning's, weights-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import lightning as L

from ..model.safe_pickle import refusal
from ..modeldir import ASSETS_DIR, CHECKPOINT_META, check_checkpoint_pickles
from .faults import maybe_crash


def write_assets(directory: Path, assets: dict[str, bytes]) -> None:
    for rel, data in assets.items():
        target = directory / ASSETS_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def fit_from_checkpoint(trainer: L.Trainer, module: L.LightningModule, batches: Any, checkpoint_dir: Path) -> None:
    """Resume training from a run checkpoint without running code it names: a distributed checkpoint's
    `.metadata` (which torch unpickles with plain `pickle.load`) is checked against its exact classes
    first, and Lightning loads the rest with `torch.load(weights_only=True)`. A refused global raises
    ForbiddenGlobalError naming the file and the global."""
    path = check_checkpoint_pickles(checkpoint_dir)
    try:
        trainer.fit(module, train_dataloaders=batches, ckpt_path=str(path), weights_only=True)
    except pickle.UnpicklingError as err:
        # what Lightning unpickles: the full checkpoint, or a sharded one's meta.pt (loops, callbacks, hparams)
        raise refusal(str(path if path.is_file() else path / "meta.pt"), err) from None


def staging_folder(run: str, run_url: str) -> Path:
    """The local folder where this node's ranks write a run's checkpoint before Ray Train uploads it:
    `<tmp>/biomedgpt-checkpoints-<uid>/<run>-<hash of the run's URL>`, the same for every rank of the run
    (the ranks of a node write their shards into one folder) and distinct for two runs of one name with
    other outputs (two departments' `demo-vqa-rad`, a test beside a demo), which a folder named by the run
    alone made overwrite each other's checkpoints. The per-user root is made private (0700)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"biomedgpt-checkpoints-{uid}"
    root.mkdir(mode=0o700, exist_ok=True)
    if root.is_symlink() or (hasattr(os, "getuid") and root.stat().st_uid != uid):
        raise PermissionError(f"{root}: the checkpoint staging folder is not this user's own; remove it or set TMPDIR")
    key = hashlib.sha256(run_url.encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run) or "run"
    return root / f"{safe}-{key}"


class StepCheckpointer(L.Callback):
    """Every `every` optimizer steps (and at the end) save a checkpoint collectively and report it, with
    the metrics of its step, to Ray Train (sharded: from every node's first rank, each holding its node's
    shards; full: from rank 0). Every rank reports equally often, as Ray Train requires.

    Nothing is reported between checkpoints: the metrics go to the run's logs (Lightning's loggers) and
    the progress to the driver (train/progress.py). Ray Train holds one unconsumed report per worker and
    its controller takes it when it polls (every 2 s), so a report while one is pending blocks the step:
    metrics-only reports at every logged step held runs that log often to about one step per second."""

    def __init__(self, every: int, max_steps: int, sharded: bool, meta: dict[str, Any], assets: dict[str, bytes],
                 report: Callable[..., None] | None = None, run_url: str = "") -> None:
        self.every = every
        self.run_url = run_url
        self.max_steps = max_steps
        self.sharded = sharded
        self.meta = meta
        self.assets = assets
        self._report = report
        self._last_saved = -1

    def _metrics(self, trainer: L.Trainer) -> dict[str, float]:
        out = {"step": float(trainer.global_step)}
        for k, v in trainer.callback_metrics.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                pass
        return out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_saved or step >= self.max_steps:
            return  # gradient accumulation repeats a step; the last step is saved by on_train_end
        if self.every and step % self.every == 0:
            self.save(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved:
            self.save(trainer, trainer.global_step)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, name: str | None = None) -> None:
        if self._report is not None:
            self._report(metrics, checkpoint_dir, name)
            return
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt is not None else None)

    def save(self, trainer: L.Trainer, step: int) -> None:
        self._last_saved = step
        base = staging_folder(str(self.meta.get("run", "run")), self.run_url) / f"step-{step:08d}"
        if trainer.is_global_zero and base.exists():
            shutil.rmtree(base)
        trainer.strategy.barrier()
        if self.sharded:
            # collective: every rank writes its shard. weights_only=False: the full state (optimizer, loops,
            # the data position), said explicitly (Lightning logs a notice when it is left unset)
            trainer.save_checkpoint(base / "lightning", weights_only=False)
        else:
            trainer.save_checkpoint(base / "lightning.ckpt", weights_only=False)  # gathered; rank 0 writes the full state
        metrics = self._metrics(trainer)
        if trainer.is_global_zero:
            meta = dict(self.meta, step=step, metrics=metrics, format="sharded" if self.sharded else "full")
            (base / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            write_assets(base, self.assets)
        trainer.strategy.barrier()
        maybe_crash("crash-before-report", step, trainer.global_rank)
        # One upload per node (its local rank 0 holds that node's shards and, on node 0, the metadata).
        local_zero = trainer.local_rank == 0 and (self.sharded or trainer.is_global_zero)
        self.report(metrics, base if local_zero else None, f"checkpoint-{step:08d}")
        maybe_crash("hold-after-report", step, trainer.global_rank)
        trainer.strategy.barrier()
        if trainer.local_rank == 0:
            shutil.rmtree(base, ignore_errors=True)
