"""The LightningModule that trains a BiomedGPT model.

The model is built in `configure_model()` (identically on every rank: seeded, or loaded from the same
`init` directory) and, with FSDP, sharded there per layer and backbone on the strategy's
data-parallel mesh. Loss: token cross-entropy over the labels (-100 ignored) with optional label
smoothing. Optimiser: AdamW with linear warmup then linear decay to 0 (the official recipe);
gradients are clipped by global norm before each step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from .schedule import warmup_linear_decay


# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU); matched on the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12,
                   "A5000": 111e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class BiomedGPTModule(L.LightningModule):
    def __init__(
        self,
        model_config: dict[str, Any],
        init_dir: str | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_ratio: float = 0.04,
        max_steps: int = 100,
        clip_grad_norm: float = 1.0,
        label_smoothing: float = 0.0,
        seed: int = 0,
        fsdp: bool = False,
        param_dtype: str | None = None,
        log_every: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: BiomedGPTForConditionalGeneration | None = None
        self._t_last = None
        self._samples = 0
        self._tokens = 0

    # -- model -----------------------------------------------------------------------------------

    def build_model(self) -> BiomedGPTForConditionalGeneration:
        hp = self.hparams
        torch.manual_seed(hp.seed)  # fully_shard does not broadcast: every rank builds the same weights
        if hp.init_dir:
            model = BiomedGPTForConditionalGeneration.from_pretrained(hp.init_dir)
        else:
            cfg = dict(hp.model_config)
            cfg.pop("model_type", None)
            cfg.pop("transformers_version", None)
            model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg))
        return model.train()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_model()
        if self.hparams.fsdp:
            from .parallelize import apply_fsdp

            dtype = getattr(torch, self.hparams.param_dtype) if self.hparams.param_dtype else None
            apply_fsdp(model, self.device_mesh["data_parallel"], param_dtype=dtype)
        self.model = model
        self._n_params = sum(p.numel() for p in model.parameters())

    # -- training --------------------------------------------------------------------------------

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            patch_images=batch["patch_images"],
            patch_masks=batch["patch_masks"].bool(),
            decoder_input_ids=batch["decoder_input_ids"],
            use_cache=False,
        )
        logits = out.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1),
                               ignore_index=-100, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self._samples += batch["input_ids"].size(0)
        self._tokens += int((batch["labels"] != -100).sum()) + int((batch["input_ids"] != 1).sum())
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, sync_dist=False)
        self.log("train/lr", lr, on_step=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if step % self.hparams.log_every == 0 or step == self.hparams.max_steps:
            now = time.perf_counter()
            if self._t_last is not None:
                dt = now - self._t_last
                world = self.trainer.world_size
                self.log("train/samples_per_s", self._samples * world / dt, on_step=True)
                self.log("train/tokens_per_s", self._tokens * world / dt, on_step=True)
                peak = peak_flops(self.device)
                if peak:
                    # model FLOPs utilisation: ~6 FLOPs per parameter per token (forward + backward)
                    flops = 6 * self._n_params * self._tokens * world / dt
                    self.log("train/mfu", flops / (peak * world), on_step=True)
            self._t_last, self._samples, self._tokens = now, 0, 0

    def on_train_start(self) -> None:
        # Parameters that get no gradient in a run (the image-code parts of the decoder when only text
        # is decoded) would have no AdamW state, and a checkpoint without their state cannot be loaded
        # into a fresh optimizer. Their state is created empty up front: AdamW skips parameters without
        # gradients, so training is unchanged.
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if not opt.state.get(p):
                        opt.state[p] = {
                            "step": torch.zeros((), dtype=torch.float32),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hparams.clip_grad_norm and self.hparams.clip_grad_norm > 0:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.clip_grad_norm)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm.detach().float(), on_step=True)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.adam_betas), eps=hp.adam_eps,
        )
        warmup = int(math.ceil(hp.warmup_ratio * hp.max_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear_decay(s, warmup, hp.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
