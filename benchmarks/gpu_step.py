"""Base-size BiomedGPT training throughput and model FLOPs utilisation on one GPU: our LightningModule
sharded with FSDP2 (`--strategy fsdp`: `fully_shard` per encoder/decoder layer and the image backbone,
bf16 parameters, float32 gradient reduction) under Lightning's ModelParallelStrategy, or replicated
with DDP (`--strategy ddp`: float32 weights, bf16 autocast), the same code paths the Ray Train
workers run, on synthetic batches of the pretraining shape (256 px images = 256 patches, 80 source and
30 target tokens). No Ray and no shards: the GPU machines lent here have PyTorch, Lightning and
transformers but cannot install Ray, and the data path is measured on CPUs by data_pipeline.py.

    python3 benchmarks/gpu_step.py                 # on a GPU: base size, batch 32, 300 steps
    python3 benchmarks/gpu_step.py --strategy ddp  # the same with DDP and bf16 autocast
    python3 benchmarks/gpu_step.py --smoke         # anywhere: demo size on CPU, 4 steps (checks the script)

Prints a table and, as its last line, one JSON object (samples/s, tokens/s, MFU, GPU name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the figures")
    ap.add_argument("--image", type=int, default=256)
    ap.add_argument("--strategy", choices=("fsdp", "ddp"), default="fsdp")
    ap.add_argument("--smoke", action="store_true", help="demo size on CPU, batch 2, 4 steps, 64 px")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.steps, args.warmup, args.image = "demo", 2, 4, 1, 64
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from biomedgpt.model import BiomedGPTConfig
    from biomedgpt.train.module import BiomedGPTModule, peak_flops

    gpu = torch.cuda.is_available() and not args.smoke
    fsdp = args.strategy == "fsdp"
    cfg = BiomedGPTConfig.from_size(args.size)
    module = BiomedGPTModule(model_config=json.loads(cfg.to_json_string(use_diff=False)), lr=5e-5,
                             warmup_ratio=0.04, max_steps=args.steps, clip_grad_norm=5.0, fsdp=fsdp,
                             param_dtype="bfloat16" if gpu and fsdp else None, log_every=10**9)
    n_src, n_tgt, vocab = 80, 30, cfg.vocab_size
    from synthetic import Cycle, StepClock, batches

    clock = StepClock(gpu)
    data = Cycle(batches(vocab, args.batch, args.image, n_src, n_tgt, seed=0), args.steps)
    if fsdp:  # bf16 parameters inside FSDP2's mixed-precision policy; Lightning's precision stays 32
        strategy, precision = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), "32-true"
    else:  # as train/ray_trainer.py: frozen parts give no gradients, so DDP must tolerate unused parameters
        strategy = DDPStrategy(process_group_backend="nccl" if gpu else "gloo", find_unused_parameters=True)
        precision = "bf16-mixed" if gpu else "32-true"
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, max_steps=args.steps,
                        strategy=strategy, precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock], use_distributed_sampler=False)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=data)
    wall = time.perf_counter() - t0
    step_s = statistics.median(clock.times[args.warmup:] or clock.times)
    n_params = sum(p.numel() for p in module.model.parameters())
    patches = (args.image // 16) ** 2
    tokens = args.batch * (n_src + patches + n_tgt)  # encoder text + image patches + decoder tokens
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    peak = peak_flops(device)
    out = {"benchmark": "gpu_step", "strategy": args.strategy, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
           "size": args.size, "params": n_params, "batch": args.batch, "image_px": args.image,
           "steps": args.steps, "step_ms": round(step_s * 1000, 2),
           "samples_per_s": round(args.batch / step_s, 2), "tokens_per_s": round(tokens / step_s, 1),
           # ~6 FLOPs per parameter per token (forward + backward), against the GPU's dense bf16 peak
           "mfu": round(6 * n_params * tokens / step_s / peak, 4) if peak else None,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
           "wall_s": round(wall, 1)}
    print(f"BiomedGPT-{args.size} ({n_params / 1e6:.1f}M), {'FSDP2' if fsdp else 'DDP'} {'bf16' if gpu else 'fp32'}, 1 x {out['device']}, "
          f"batch {args.batch}, {args.image} px, median of steps {args.warmup + 1}..{args.steps}")
    print(f"| {'figure':<14} | {'value':>12} |\n|{'-' * 16}|{'-' * 14}|")
    for k in ("step_ms", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gib", "wall_s"):
        print(f"| {k:<14} | {str(out[k]):>12} |")
    print(json.dumps(out))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
