"""The LightningModule that trains a BiomedGPT model.

The model is built in `configure_model()` (identically on every rank: seeded, or loaded from the same
`init` directory) and, with FSDP, sharded there per layer and backbone on the strategy's
data-parallel mesh. Optimiser: AdamW with linear warmup then linear decay to 0 (the official recipe);
gradients are clipped by global norm before each step.

The loss is OFA's `adjust_label_smoothed_cross_entropy` (criterions/label_smoothed_cross_entropy.py of
OFA and BiomedGPT), written anew:
- label smoothing as fairseq does it: the target gets 1 - eps, every other allowed token eps / (n - 1);
- constrained training (`constraint_candidates`, the answer candidates of VQA, classification and NLI):
  at every target position the tokens the candidates' prefix tree allows after the target's prefix are
  the only ones scored (logits elsewhere are -inf, OFA's `constraint_masks`), so the softmax and the
  smoothing mass cover only candidate tokens; a target that leaves the tree is scored unconstrained;
- per-example loss weights (the batch's `loss_weight` column, when present);
- drop-worst (`drop_worst_ratio` after `drop_worst_after` steps): OFA ranks the per-token losses of
  the batch and keeps the best (1 - ratio) of them (captioning);
- decoder-input noise (`decoder_noise`, OFA's `noise_ratio` of summarisation): each decoder input token
  after BOS is replaced with probability `decoder_noise` by a random text token (ids 4 ..
  `noise_vocab_end` - 1, i.e. not specials, image codes or bins);
- the mean is taken over the target tokens kept (fairseq's sample size = tokens).
Optionally: frozen token embeddings (OFA's --freeze-encoder/decoder-embedding; the embedding is shared
with the output projection, so that is frozen too) and an exponential moving average of the weights
(`ema_decay`, fairseq's EMA: every floating parameter and buffer, updated after each optimizer step),
kept as buffers of the `ema` submodule so that it is sharded like the model and saved in checkpoints.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from ..model.adapters import add_lora, lora_config, sha256_file
from .parallelize import apply_fsdp
from .recipe import local_dir
from .schedule import warmup_linear_decay


# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU); matched on the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12,
                   "A5000": 111e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}

FIRST_TEXT_TOKEN = 4  # after <s>, <pad>, </s>, <unk>


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# -- the loss -------------------------------------------------------------------------------------


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float = 0.0,
                  allowed: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                  drop_worst_ratio: float = 0.0) -> tuple[torch.Tensor, int]:
    """Label-smoothed token cross-entropy as OFA computes it; returns (mean loss over the kept target
    tokens, number of tokens kept).

    logits (B, T, V); labels (B, T), -100 where nothing is predicted; `allowed` (B, T, V) bool: the
    tokens scored at each position (the others get probability 0 and no smoothing mass; must include
    the label); `weights` (B,): per-example loss weights; `drop_worst_ratio`: drop that fraction of the
    highest token losses (OFA's drop-worst)."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    valid = labels != -100
    lprobs = F.log_softmax(logits[valid], dim=-1)  # (N, V)
    target = labels[valid]
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if epsilon > 0:
        if allowed is not None:
            mask = allowed[valid]
            smooth = -lprobs.masked_fill(~mask, 0.0).sum(-1)
            n = mask.sum(-1)
            # a position where only the target is allowed carries no smoothing: (1 - eps) * nll, as OFA
            eps_i = torch.where(n > 1, epsilon / (n - 1).clamp(min=1).to(lprobs.dtype), torch.zeros_like(nll))
        else:
            smooth = -lprobs.sum(-1)
            eps_i = torch.full_like(nll, epsilon / (lprobs.size(-1) - 1))
        loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    else:
        loss = nll
    if weights is not None:
        loss = loss * weights.to(loss.dtype).unsqueeze(1).expand_as(labels)[valid]
    if drop_worst_ratio > 0 and loss.numel():
        keep = int(loss.numel() * (1.0 - drop_worst_ratio))
        loss = torch.topk(loss, k=keep, largest=False).values
    n_kept = int(loss.numel())
    return loss.sum() / max(n_kept, 1), n_kept


class CandidateTrie:
    """Prefix tree over the candidate answers' label sequences (target tokens then EOS): gives, for a
    batch of labels, the tokens allowed at every position (OFA's constraint masks)."""

    def __init__(self, candidates: Sequence[Sequence[int]]) -> None:
        self.root: dict[int, dict] = {}
        for seq in candidates:
            node = self.root
            for tok in seq:
                node = node.setdefault(int(tok), {})
        if not self.root:
            raise ValueError("no answer candidates given")

    def allowed_mask(self, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, T, V) bool on labels' device: True for the tokens the trie allows after the label
        prefix; a whole row where the prefix has left the trie (a target that is no candidate) or no
        label is predicted."""
        rows = labels.tolist()
        b_idx, t_idx, v_idx, free_b, free_t = [], [], [], [], []
        for b, row in enumerate(rows):
            node: dict | None = self.root
            for t, lab in enumerate(row):
                if node is not None and lab != -100 and lab in node:
                    kids = list(node)
                    b_idx += [b] * len(kids)
                    t_idx += [t] * len(kids)
                    v_idx += kids
                    node = node[lab]
                else:
                    node = None
                    free_b.append(b)
                    free_t.append(t)
        mask = torch.zeros(labels.shape + (vocab_size,), dtype=torch.bool, device=labels.device)
        if b_idx:
            mask[torch.tensor(b_idx), torch.tensor(t_idx), torch.tensor(v_idx)] = True
        if free_b:
            mask[torch.tensor(free_b), torch.tensor(free_t)] = True
        return mask


# -- exponential moving average of the weights --------------------------------------------------------


def ema_key(name: str) -> str:
    """Buffer name of a model tensor in the EMA module (buffer names cannot contain '.')."""
    return name.replace(".", "-")


def ema_sources(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What the EMA tracks (as fairseq's EMA): every parameter and every floating persistent buffer."""
    persistent = set(model.state_dict().keys())
    out = [(n, p) for n, p in model.named_parameters()]
    out += [(n, b) for n, b in model.named_buffers() if n in persistent and b.is_floating_point()]
    return out


class EMA(nn.Module):
    """fp32 moving average `ema = decay * ema + (1 - decay) * weight` of a model's tensors, as buffers
    (sharded like the parameters they follow under FSDP, saved with the LightningModule's state)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        with torch.no_grad():
            for name, t in ema_sources(model):
                self.register_buffer(ema_key(name), t.detach().clone().float())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, t in ema_sources(model):
            buf = getattr(self, ema_key(name))
            buf.lerp_(t.detach().to(buf.dtype), 1.0 - self.decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """{model tensor name: EMA tensor}."""
        return {k.replace("-", "."): v for k, v in self.named_buffers()}


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
        ema_decay: float | None = None,
        freeze_token_embeddings: bool = False,
        drop_worst_ratio: float = 0.0,
        drop_worst_after: int = 0,
        decoder_noise: float = 0.0,
        noise_vocab_end: int | None = None,
        constraint_candidates: Sequence[Sequence[int]] | None = None,
        sample_patch_num: int | None = None,
        adapter: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["constraint_candidates"])
        # adapters: checkpoints hold the trainable state only; the frozen base comes from init_dir again
        self.strict_loading = adapter is None
        self.model: BiomedGPTForConditionalGeneration | None = None
        self.ema: EMA | None = None
        self.trie = CandidateTrie(constraint_candidates) if constraint_candidates else None
        self._t_last = None
        self._samples = 0
        self._tokens = 0

    # -- model -----------------------------------------------------------------------------------

    def build_model(self) -> BiomedGPTForConditionalGeneration:
        hp = self.hparams
        torch.manual_seed(hp.seed)  # fully_shard does not broadcast: every rank builds the same weights
        cfg = dict(hp.model_config)
        cfg.pop("model_type", None)
        cfg.pop("transformers_version", None)
        if hp.init_dir:
            # the initial weights with the run's config (the checkpoint's architecture + the spec's dropout),
            # from model.safetensors only: a pickle (pytorch_model.bin) beside it is never loaded
            model = BiomedGPTForConditionalGeneration.from_pretrained(local_dir(hp.init_dir),
                                                                      config=BiomedGPTConfig(**cfg),
                                                                      use_safetensors=True)
        else:
            model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg))
        if hp.adapter:
            base = hp.adapter.get("base") or {}
            weights = Path(local_dir(hp.init_dir)) / "model.safetensors"
            if base.get("sha256") and sha256_file(weights) != base["sha256"]:
                raise ValueError(f"{hp.init_dir}: the base's weights have changed since the run was planned (sha256 "
                                 f"differs from {base['sha256'][:12]}...); adapters fit only the base they train on")
            a = hp.adapter
            add_lora(model, lora_config(a["rank"], a["alpha"], a["dropout"], a["target_modules"], a["trainable"]))
        if hp.freeze_token_embeddings:
            # shared by encoder, decoder and output projection (OFA's --share-all-embeddings)
            model.get_input_embeddings().weight.requires_grad_(False)
        return model.train()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_model()
        if self.hparams.fsdp:
            dtype = getattr(torch, self.hparams.param_dtype) if self.hparams.param_dtype else None
            apply_fsdp(model, self.device_mesh["data_parallel"], param_dtype=dtype)
        self.model = model
        if self.hparams.ema_decay is not None:
            self.ema = EMA(model, self.hparams.ema_decay)  # after sharding: its buffers are sharded alike
        self._n_params = sum(p.numel() for p in model.parameters())

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """With adapters, only the trainable state (LoRA weights and the modules trained in full): what a
        checkpoint holds beside its reference to the base (id and sha256); the frozen base is not copied."""
        state = super().state_dict(*args, **kwargs)
        if not self.hparams.get("adapter") or self.model is None:
            return state
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        prefix = kwargs.get("prefix", "")
        return type(state)((k, v) for k, v in state.items() if k[len(prefix):] in keep)

    # -- training --------------------------------------------------------------------------------

    def noisy_decoder_inputs(self, decoder_input_ids: torch.Tensor, batch_idx: int = 0) -> torch.Tensor:
        """OFA's summarisation noise: each decoder input token after BOS (padding excepted) replaced,
        with probability `decoder_noise`, by a random text token. Seeded by (seed, step, batch, rank),
        so a resumed run draws the same noise."""
        ratio = self.hparams.decoder_noise
        if not ratio:
            return decoder_input_ids
        end = self.hparams.noise_vocab_end or self.model.config.vocab_size
        g = torch.Generator().manual_seed(
            ((self.hparams.seed * 1_000_003 + self.global_step) * 1_009 + batch_idx) * 131 + self.global_rank)
        ids = decoder_input_ids.cpu()
        hit = torch.rand(ids.shape, generator=g) < ratio
        hit[:, 0] = False
        hit &= ids != self.model.config.pad_token_id
        noise = torch.randint(FIRST_TEXT_TOKEN, end, ids.shape, generator=g)
        return torch.where(hit, noise, ids).to(decoder_input_ids.device)

    def loss(self, batch: dict[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        hp = self.hparams
        decoder_input_ids = batch["decoder_input_ids"]
        if self.training:
            decoder_input_ids = self.noisy_decoder_inputs(decoder_input_ids, batch_idx)
        out = self.model(
            input_ids=batch["input_ids"],
            patch_images=batch["patch_images"],
            patch_masks=batch["patch_masks"].bool(),
            decoder_input_ids=decoder_input_ids,
            code_masks=batch["code_masks"].bool() if "code_masks" in batch else None,  # image-code targets
            use_cache=False,
            # OFA's sample_patch_num, in training, for the examples that allow it (the pipeline's column)
            sample_patch_num=hp.sample_patch_num if self.training and "sample_patches" in batch else None,
            sample_patch_rows=batch["sample_patches"].bool() if self.training and "sample_patches" in batch else None,
        )
        labels = batch["labels"]
        allowed = self.trie.allowed_mask(labels, out.logits.size(-1)) if self.trie is not None else None
        drop = hp.drop_worst_ratio if hp.drop_worst_ratio > 0 and self.global_step > hp.drop_worst_after else 0.0
        loss, _ = sequence_loss(out.logits, labels, epsilon=hp.label_smoothing, allowed=allowed,
                                weights=batch.get("loss_weight"), drop_worst_ratio=drop)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.get("adapter"):
            # the base is frozen whole: batch norm's running statistics (the image backbone) stay the base's too
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, batch_idx)
        self._samples += batch["input_ids"].size(0)
        self._tokens += int((batch["labels"] != -100).sum()) + int((batch["input_ids"] != 1).sum())
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, sync_dist=False)
        self.log("train/lr", lr, on_step=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

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
