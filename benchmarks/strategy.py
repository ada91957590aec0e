"""Data parallelism without sharding (DDP) against FSDP2, steps per second, for the sizes that fit on
one device: our LightningModule on synthetic batches, the same strategies the Ray Train workers use
(`train/ray_trainer.py`: Lightning's DDPStrategy, or ModelParallelStrategy with `fully_shard` per
layer), launched by Lightning on this machine's devices. Same data, same steps, same seed for both;
each (size, strategy) runs in its own processes, one after the other.

    python3 benchmarks/strategy.py                       # 2 CPU workers (gloo), small and medium
    python3 benchmarks/strategy.py --sizes demo --steps 3 --warmup 1 --image 64 --batch 2   # quick check
    python3 benchmarks/strategy.py --gpu                 # on GPUs: NCCL, bf16, one worker per GPU (at most 2)

Prints a table and, as its last line, one JSON object: per size `ddp_steps_per_s`, `fsdp_steps_per_s`
and `ratio` (DDP / FSDP2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One (size, strategy) run; Lightning starts the other ranks by re-running this command."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from biomedgpt.model import BiomedGPTConfig
    from biomedgpt.train.module import BiomedGPTModule

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.workers))
    fsdp = args.strategy == "fsdp"
    cfg = BiomedGPTConfig.from_size(args.size)
    bf16 = args.gpu
    module = BiomedGPTModule(model_config=json.loads(cfg.to_json_string(use_diff=False)), lr=5e-5,
                             warmup_ratio=0.04, max_steps=args.steps, clip_grad_norm=5.0, fsdp=fsdp,
                             param_dtype="bfloat16" if bf16 and fsdp else None, log_every=10**9)
    n_src, n_tgt = 40, 16
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    from synthetic import Cycle, StepClock, batches

    # each rank its own data, the same for both strategies
    data = Cycle(batches(cfg.vocab_size, args.batch, args.image, n_src, n_tgt, seed=1000 + rank, count=2), args.steps)
    clock = StepClock(args.gpu)

    backend = "nccl" if args.gpu else "gloo"
    if fsdp:
        strategy = ModelParallelStrategy(data_parallel_size=args.workers, tensor_parallel_size=1)
        precision = "32-true"  # bf16 (GPU) is FSDP2's parameter dtype, as in the trainer
    else:
        strategy = DDPStrategy(process_group_backend=backend, find_unused_parameters=True)
        precision = "bf16-mixed" if bf16 else "32-true"
    trainer = L.Trainer(accelerator="gpu" if args.gpu else "cpu", devices=args.workers, num_nodes=1,
                        max_steps=args.steps, strategy=strategy, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=data)
    if trainer.global_rank == 0:
        step_s = statistics.median(clock.times[args.warmup:] or clock.times)
        n_params = sum(p.numel() for p in module.model.parameters())
        print("RESULT " + json.dumps({"size": args.size, "strategy": args.strategy, "params": n_params,
                                      "step_ms": round(step_s * 1000, 1), "steps_per_s": round(1 / step_s, 3)}),
              flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="per worker (default 4 on CPU, 32 on GPU)")
    ap.add_argument("--image", type=int, default=None, help="pixels (default 128 on CPU, 256 on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="default 8 on CPU, 60 on GPU")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out (default 2 on CPU, 10 on GPU)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--run", nargs=2, metavar=("SIZE", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch = args.batch or (32 if args.gpu else 4)
    args.image = args.image or (256 if args.gpu else 128)
    args.steps = args.steps or (60 if args.gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.gpu else 2)
    if args.gpu:
        import torch

        args.workers = max(1, min(args.workers, torch.cuda.device_count()))
    if args.run:
        args.size, args.strategy = args.run
        worker(args)
        return {}

    results: dict[str, dict[str, float]] = {}
    rows = []
    for size in args.sizes.split(","):
        for strategy in ("ddp", "fsdp"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run", size, strategy,
                   "--workers", str(args.workers), "--batch", str(args.batch), "--image", str(args.image),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--gpu"] if args.gpu else [])
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
            env.pop("LOCAL_RANK", None)
            print(f"{size} {strategy}: {args.workers} worker(s), {args.steps} steps ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                raise SystemExit(f"strategy benchmark: {size} {strategy} failed (exit {proc.returncode})")
            res = json.loads(lines[-1][len("RESULT "):])
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(res)
            results.setdefault(size, {})[f"{strategy}_steps_per_s"] = res["steps_per_s"]
        r = results[size]
        r["ratio"] = round(r["ddp_steps_per_s"] / r["fsdp_steps_per_s"], 3)

    device = "cuda" if args.gpu else "cpu"
    print(f"\nDDP against FSDP2, {args.workers} {device} worker(s), batch {args.batch} per worker, {args.image} px, "
          f"median of steps {args.warmup + 1}..{args.steps}")
    print(f"| {'size':<7} | {'params':>8} | {'strategy':<8} | {'step ms':>8} | {'steps/s':>8} |")
    print(f"|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['size']:<7} | {r['params'] / 1e6:>7.1f}M | {r['strategy']:<8} | {r['step_ms']:>8} | "
              f"{r['steps_per_s']:>8} |")
    for size, r in results.items():
        print(f"{size}: DDP / FSDP2 = {r['ratio']}x")
    out = {"benchmark": "strategy", "device": device, "workers": args.workers, "batch": args.batch,
           "image_px": args.image, "steps": args.steps, **results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
