"""Training steps/s of the platform (Ray Data + Ray Train + Lightning, 1 worker) against a bare PyTorch
loop over the same model, the same batches and the same cores, in one run. Target: >= 0.85x.

Both train the demo-size BiomedGPT on the VQA-RAD sample (96 px images, batch 8) with AdamW and
gradient clipping, using 2 compute threads:
- bare loop: reads the shards with the same preprocessing (decode, resize, tokenize) inline and steps;
- platform: `biomedgpt run` machinery (a 1-worker TorchTrainer, DDP strategy, the shard stream through
  Ray Data with decoding in Ray tasks, step logging, a checkpoint at the end).
Steady-state steps/s: the platform's from its logged samples/s (the first logging interval, which
holds start-up, is dropped); the bare loop's over the steps after a warm-up.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
THREADS = 2


def bare_loop(spec, tok_dir: str, steps: int, warmup: int) -> float:
    """Steps/s of a plain PyTorch loop with inline preprocessing."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from biomedgpt.data.pipeline import TRAIN_COLUMNS, preprocess_batch
    from biomedgpt.data.shards import read_shard
    from biomedgpt.data.stream import list_shards
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.train.schedule import warmup_linear_decay

    torch.set_num_threads(THREADS)
    tok = BiomedGPTTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(spec.trainer.seed)
    cfg = BiomedGPTConfig.from_size(spec.model.size, vocab_size=len(tok), dropout=spec.trainer.dropout or 0.0)
    model = BiomedGPTForConditionalGeneration(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.trainer.lr, weight_decay=spec.trainer.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear_decay(s, 0, steps + warmup))
    bs = spec.trainer.batch_size
    pre = dict(task_name="vqa", tokenizer_dir=tok_dir, image_size=spec.model.image_size,
               max_source_length=spec.data.max_source_length, max_target_length=spec.data.max_target_length)

    def raw_batches():
        while True:
            rows = []
            for shard in list_shards(spec.data.shards, "vqa_rad", "train"):
                for sample in read_shard(shard.url):
                    rows.append(sample)
                    if len(rows) == bs:
                        yield {"json": np.array([r["json"] for r in rows], dtype=object),
                               "jpg": np.array([r.get("jpg") for r in rows], dtype=object)}
                        rows = []

    it = raw_batches()
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = {k: torch.from_numpy(v) for k, v in preprocess_batch(next(it), **pre).items() if k in TRAIN_COLUMNS}
        logits = model(input_ids=batch["input_ids"], patch_images=batch["patch_images"],
                       patch_masks=batch["patch_masks"], decoder_input_ids=batch["decoder_input_ids"],
                       use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["labels"].reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.trainer.clip_grad_norm)
        opt.step()
        sched.step()
    return steps / (time.perf_counter() - t0)


def platform_run(spec) -> tuple[float, float]:
    """(steady-state steps/s, wall seconds) of the platform's training."""
    from biomedgpt.runner import run_training

    t0 = time.perf_counter()
    run_training(spec, num_cpus=2)
    wall = time.perf_counter() - t0
    rates = []
    with open(Path(spec.run_dir) / "logs" / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/samples_per_s"):
                rates.append(float(row["train/samples_per_s"]))
    steady = rates[1:] or rates
    return statistics.median(steady) / spec.trainer.batch_size, wall


def main() -> None:
    import yaml

    from biomedgpt.spec import spec_from_dict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    data = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    data["name"] = "overhead"
    data["data"]["shards"] = str(work / "shards")
    data["data"]["build"] = {"vqa_rad": str(REPO / "datasets_spec" / "samples" / "vqa_rad")}
    data["trainer"].update(workers=1, strategy="ddp", cpus_per_worker=1.0, torch_threads=THREADS,
                           max_steps=args.steps, checkpoint_every=0, log_every=20, batch_size=8)
    data["evaluate"]["enabled"] = False
    data["output"]["storage"] = str(work / "runs")
    spec = spec_from_dict(data, "benchmarks/train_overhead.py")

    platform_sps, wall = platform_run(spec)
    tok_dir = str(Path(spec.run_dir) / "assets" / "tokenizer")
    bare_sps = bare_loop(spec, tok_dir, args.steps - args.warmup, args.warmup)
    ratio = platform_sps / bare_sps
    print(f"Training overhead: demo-size BiomedGPT, VQA-RAD sample, 96 px, batch 8, {THREADS} compute threads")
    print()
    print(f"  {'loop':<52}{'steps/s':>10}")
    print(f"  {'bare PyTorch (inline preprocessing)':<52}{bare_sps:>10.3f}")
    print(f"  {'platform (Ray Data + Ray Train + Lightning, 1 worker)':<52}{platform_sps:>10.3f}")
    print(f"  ratio platform/bare: {ratio:.2f}x (target >= 0.85x) -> {'PASS' if ratio >= 0.85 else 'FAIL'}")
    print(f"  platform wall time for {args.steps} steps incl. start-up and checkpoint: {wall:.0f} s")
    print(json.dumps({"benchmark": "train_overhead", "platform_steps_per_s": round(platform_sps, 4),
                      "bare_steps_per_s": round(bare_sps, 4), "ratio": round(ratio, 3), "target_min_ratio": 0.85,
                      "pass": ratio >= 0.85, "platform_wall_s": round(wall, 1), "steps": args.steps}))


if __name__ == "__main__":
    main()
