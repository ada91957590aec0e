"""Evaluation during training: every `evaluate.every_n_steps` optimizer steps, the evaluation job's
datasets (capped at `evaluate.max_samples_during_training` samples each) are decoded the official way
and scored with the same code as `biomedgpt score`; the metrics go to the Lightning loggers (CSV and
TensorBoard) as `eval/<dataset>/<metric>` (`eval/<dataset>_<split>/<metric>` when a dataset is
evaluated in several splits).

With FSDP2 every rank holds only its shards of the weights, and generation cannot run sharded (ranks
would decode different lengths, so their all-gathers would not pair up). So all ranks take part in
one collective `get_model_state_dict(full_state_dict=True, cpu_offload=True)`, which leaves the full
weights on rank 0 only (with `trainer.ema` the moving-average weights replace them, gathered likewise:
the weights the export writes); rank 0 loads them into an unsharded copy of the model (built once, in eval
mode) and evaluates while the other ranks wait at a barrier. Without sharding (DDP, one process)
rank 0 copies its own weights. Every rank makes the same calls at the same steps.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..data.shards import read_shard
from ..evaluate.score import score_predictions
from ..inference import Predictor
from ..metrics.meteor import Meteor
from ..model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from ..model.tokenizer import BiomedGPTTokenizer
from ..modeldir import materialise
from ..tasks import get_task
from .progress import send


def full_state_dict(model: torch.nn.Module, rank0: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights on CPU on rank 0, {} elsewhere. When the model is
    FSDP2-sharded this is a collective: every rank must call it."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if rank0 else {}


def full_ema_weights(ema: torch.nn.Module, rank0: bool) -> dict[str, torch.Tensor]:
    """The EMA weights (train/module.py's `EMA` buffers: every parameter and floating buffer), unsharded,
    on CPU on rank 0 ({} elsewhere). Each sharded buffer is all-gathered in the same order on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in ema.named_buffers():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if rank0:
            out[name.replace("-", ".")] = full.detach().to("cpu", copy=True)
    return out


def metric_prefixes(entries: list[dict[str, Any]]) -> list[str]:
    """`eval/<dataset>` per entry, `eval/<dataset>_<split>` where a dataset occurs more than once."""
    names = [e["dataset"] for e in entries]
    return [f"eval/{e['dataset']}" if names.count(e["dataset"]) == 1 else f"eval/{e['dataset']}_{e['split']}"
            for e in entries]


class EvalDuringTraining(L.Callback):
    """See the module docstring. `config` is `biomedgpt.evaluate.job.training_eval_config(spec)`;
    `model_config` the run's model config; `assets` the run's assets (the tokenizer files)."""

    def __init__(self, config: dict[str, Any], model_config: dict[str, Any], assets: dict[str, bytes]) -> None:
        self.config = config
        self.every = int(config["every_n_steps"])
        self.model_config = model_config
        self.assets = assets
        self.prefixes = metric_prefixes(config["entries"])
        self._last = -1
        self._dir: Path | None = None
        self._model = None
        self._predictor = None
        self._records: list[list[dict[str, Any]]] | None = None
        self._meteor = None
        self.history: list[dict[str, float]] = []

    # -- hooks (every rank) ------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last:
            return
        self._last = step
        self.evaluate(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        state = full_state_dict(pl_module.model, trainer.is_global_zero)  # collective when sharded
        ema = getattr(pl_module, "ema", None)
        if ema is not None:  # the official recipes evaluate (and export) the moving average
            state.update(full_ema_weights(ema, trainer.is_global_zero))
        if trainer.is_global_zero:
            t0 = time.perf_counter()
            metrics = self.run(state, pl_module.device)
            metrics["eval/seconds"] = time.perf_counter() - t0
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self.history.append(dict(metrics, step=float(step)))
            shown = "  ".join(f"{k[len('eval/'):]} {v:.4f}" for k, v in metrics.items()
                              if not k.endswith(("/count", "_count", "/num_labels")) and k != "eval/seconds")
            send({"kind": "eval", "text": f"step {step}: {shown} ({metrics['eval/seconds']:.1f} s)"})
        del state
        trainer.strategy.barrier("biomedgpt-eval-during-training")

    # -- rank 0 ------------------------------------------------------------------------------------

    def setup_rank0(self, device: torch.device) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="biomedgpt-train-eval-"))
        materialise({k: v for k, v in self.assets.items() if k.startswith("tokenizer/")}, self._dir)
        tok = BiomedGPTTokenizer.from_pretrained(self._dir / "tokenizer")
        cfg = dict(self.model_config)
        cfg.pop("model_type", None)
        cfg.pop("transformers_version", None)
        self._model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg)).to(device).eval()
        c = self.config
        self._predictor = Predictor(self._model, tok, image_size=c["image_size"],
                                    max_source_length=c["max_source_length"], batch_size=c["batch_size"],
                                    device=device, dtype=c.get("dtype", "float32"))
        self._model = self._predictor.model
        self._records = [self.read(e["units"]) for e in c["entries"]]
        if c.get("meteor") and any(get_task(e["task"]).needs_meteor for e in c["entries"]):
            self._meteor = Meteor()

    @staticmethod
    def read(units: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
        recs: list[dict[str, Any]] = []
        for url, take in units:
            for i, sample in enumerate(read_shard(url)):
                if take is not None and i >= take:
                    break
                rec = json.loads(sample["json"])
                rec["_image"] = sample.get("jpg") or sample.get("png")
                recs.append(rec)
        return recs

    @torch.no_grad()
    def run(self, state: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
        if self._model is None:
            self.setup_rank0(device)
        missing, unexpected = self._model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight", "model.decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight", "encoder.embed_tokens.weight"}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"evaluation during training: the training weights do not fit the evaluation copy "
                               f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
        self._model.tie_weights()
        self._model.eval()
        out: dict[str, float] = {}
        for entry, prefix, recs in zip(self.config["entries"], self.prefixes, self._records):
            preds = self._predictor.predict(entry["plan"], recs, image_size=entry.get("image_size"))
            metrics = score_predictions(entry["task"], preds, self._dir / "predictions.jsonl",
                                        self._dir / "references.jsonl",
                                        meteor=self._meteor if self._meteor is not None else False,
                                        metric_names=entry["metric_names"])
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{prefix}/{key}"] = float(value)
        return out
