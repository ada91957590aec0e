"""What the training-step benchmarks (gpu_step.py, strategy.py) share: synthetic batches of the model's
input shape, fed for a number of steps, and a Lightning callback timing each step."""

from __future__ import annotations

import time

import lightning as L
import torch


def batches(vocab: int, batch: int, image: int, n_src: int, n_tgt: int, *, seed: int = 0, count: int = 4
            ) -> list[dict[str, torch.Tensor]]:
    """`count` distinct random batches (text ids, images, decoder inputs and labels), made once: the data
    path is not what these benchmarks measure."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(4, vocab, (batch, n_tgt), generator=g)
        out.append({
            "input_ids": torch.randint(4, vocab, (batch, n_src), generator=g),
            "patch_images": torch.randn(batch, 3, image, image, generator=g),
            "patch_masks": torch.ones(batch, dtype=torch.bool),
            "decoder_input_ids": torch.cat([torch.zeros(batch, 1, dtype=torch.long), labels[:, :-1]], 1),
            "labels": labels,
        })
    return out


class Cycle:
    """The batches in turn, for `steps` steps (an iterable Lightning takes as a train dataloader)."""

    def __init__(self, items: list[dict[str, torch.Tensor]], steps: int) -> None:
        self.items, self.steps = items, steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.items[i % len(self.items)]


class StepClock(L.Callback):
    """Wall time of every training step into `times` (seconds), the GPU synchronised around each."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.gpu:
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.gpu:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
