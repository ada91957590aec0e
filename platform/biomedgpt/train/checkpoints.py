"""Step checkpoints reported to Ray Train, and export of a checkpoint to a model directory.

A checkpoint directory holds:
    lightning/          the Lightning distributed checkpoint (FSDP: .metadata, one .distcp per rank, meta.pt)
    lightning.ckpt      ... or, with DDP, Lightning's single-file checkpoint
    biomedgpt.json      step, model config, run name, metrics
    assets/             files the run carries into every checkpoint (tokenizer, answer candidates)
`export_checkpoint` turns one into the model directory of `biomedgpt convert` (config.json +
model.safetensors + tokenizer files), ready for `from_pretrained` and serving.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from .faults import maybe_crash

CHECKPOINT_META = "biomedgpt.json"
ASSETS_DIR = "assets"


def write_assets(directory: Path, assets: dict[str, bytes]) -> None:
    for rel, data in assets.items():
        target = directory / ASSETS_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class StepCheckpointer(L.Callback):
    """Every `every` optimizer steps (and at the end) save a checkpoint collectively and report it to
    Ray Train (sharded: from every node's first rank, each holding its node's shards; full: from rank
    0); between checkpoints, report metrics every `report_every` steps. Every rank reports equally
    often, as Ray Train requires."""

    def __init__(self, every: int, max_steps: int, sharded: bool, meta: dict[str, Any], assets: dict[str, bytes],
                 report_every: int = 10, report: Callable[..., None] | None = None) -> None:
        self.every = every
        self.max_steps = max_steps
        self.sharded = sharded
        self.meta = meta
        self.assets = assets
        self.report_every = report_every
        self._report = report
        self._last_saved = -1
        self._last_reported = -1

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
        if step == self._last_reported or step >= self.max_steps:
            return  # gradient accumulation repeats a step; the last step is saved by on_train_end
        if self.every and step % self.every == 0:
            self.save(trainer, step)
        elif step % self.report_every == 0:
            self._last_reported = step
            self.report(self._metrics(trainer), None)

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
        self._last_saved = self._last_reported = step
        base = Path(tempfile.gettempdir()) / "biomedgpt-checkpoints" / str(self.meta.get("run", "run")) / f"step-{step:08d}"
        if trainer.is_global_zero and base.exists():
            shutil.rmtree(base)
        trainer.strategy.barrier()
        if self.sharded:
            trainer.save_checkpoint(base / "lightning")  # collective: every rank writes its shard
        else:
            trainer.save_checkpoint(base / "lightning.ckpt")  # gathered; rank 0 writes the full state
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
        trainer.strategy.barrier()
        if trainer.local_rank == 0:
            shutil.rmtree(base, ignore_errors=True)


def lightning_checkpoint_path(checkpoint_dir: Path) -> Path:
    """The path to hand to `trainer.fit(ckpt_path=...)` for a checkpoint directory."""
    if (checkpoint_dir / "lightning").is_dir():
        return checkpoint_dir / "lightning"
    if (checkpoint_dir / "lightning.ckpt").is_file():
        return checkpoint_dir / "lightning.ckpt"
    raise FileNotFoundError(f"{checkpoint_dir}: no lightning/ or lightning.ckpt inside; not a BiomedGPT checkpoint")


def read_checkpoint_meta(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / CHECKPOINT_META
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {CHECKPOINT_META}; not a BiomedGPT checkpoint")
    return json.loads(path.read_text())


def checkpoint_model_state(checkpoint_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full model state dict (keys without the LightningModule's `model.` prefix) of a checkpoint,
    consolidated from its shards in this process (no process group needed). `ema`: the moving-average
    weights the run kept (train/module.py's `ema.` buffers) replace the model's parameters and floating
    buffers (integer buffers stay the model's)."""
    sd = _lightning_state_dict(checkpoint_dir)
    model = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items() if not k.startswith("ema.")}
    if ema:
        averaged = {k[len("ema."):].replace("-", "."): v for k, v in sd.items() if k.startswith("ema.")}
        if not averaged:
            raise ValueError(f"{checkpoint_dir}: the run kept no EMA weights (trainer.ema.enabled was false)")
        from ..model import BiomedGPTForConditionalGeneration

        tied = BiomedGPTForConditionalGeneration._tied_weights_keys  # {tied name: source name}
        for name in list(model):
            source = tied.get(name, name)
            if source in averaged:
                model[name] = averaged[source]
    return model


def _lightning_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The LightningModule's state dict of a checkpoint (sharded or full), in this process."""
    path = lightning_checkpoint_path(checkpoint_dir)
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "full.pt"
            dcp_to_torch_save(str(path), str(out))
            state = torch.load(out, map_location="cpu", weights_only=False)
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` = config.json + model.safetensors + tokenizer files + answers.json (if the run
    had answer candidates) + README.md (model card: training data, step, metrics). A run that kept EMA
    weights (trainer.ema) exports them, as the official recipes evaluate and release the EMA model."""
    from ..model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from ..model.state_dict_adapter import convert_state_dict

    ckpt = Path(checkpoint_dir)
    meta = read_checkpoint_meta(ckpt)
    cfg = dict(meta["model_config"])
    cfg.pop("model_type", None)
    cfg.pop("transformers_version", None)
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg))
    sd = convert_state_dict(checkpoint_model_state(ckpt, ema=bool(meta.get("ema"))), model, str(ckpt))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
    model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    assets = ckpt / ASSETS_DIR
    if (assets / "tokenizer").is_dir():
        for f in (assets / "tokenizer").iterdir():
            shutil.copy2(f, out / f.name)
    for name in ("answers.json", "candidates.json"):  # candidates.json: {task: answers} of mixed runs
        if (assets / name).is_file():
            shutil.copy2(assets / name, out / name)
    card = [f"# {meta.get('run', 'BiomedGPT model')}", "",
            f"BiomedGPT ({meta.get('size', 'custom')} size) trained by the BiomedGPT platform.", "",
            f"- step: {meta.get('step')}",
            f"- weights: {'EMA (moving average) of the training weights' if meta.get('ema') else 'the training weights'}",
            f"- training data: {', '.join(meta.get('train_data', [])) or 'unknown'}",
            f"- licence of the training data: {meta.get('data_licence', 'see the datasets_spec of each dataset')}",
            f"- metrics at export: {json.dumps(meta.get('metrics', {}), sort_keys=True)}"]
    (out / "README.md").write_text("\n".join(card) + "\n")
    (out / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out
