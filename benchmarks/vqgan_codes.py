"""Throughput of the VQGAN image tokenizer (model/vqgan.py): images/s per CPU core of computing image
infilling's codes, at the micro config of the test fixtures and at the real `vqgan_gumbel_f8_8192` config
(random weights: throughput does not depend on them), and of a shard build with codes.

(a) The tokenizer's path per image, one process: the recipe (PNG decode, RGB, bicubic resize to 256, centre
    128 x 128, 2x-1) alone, then the whole path (recipe + encoder + argmax) in batches of `--batch` images,
    with torch on 1 thread and on all of the machine's threads (per core = images/s / threads). Synthetic
    320 x 320 PNG images of noise and gradients (`--images` of them). Best of `--repeat` runs.
(b) `build_shards(..., codes=MODEL_DIR)` of an image folder of the same images, one process (torch's default
    threads), against the same build without codes: what the codes stage costs in a build.

`.venv/bin/python benchmarks/vqgan_codes.py [--images 32] [--batch 16] [--repeat 2] [--skip-real]`. The last
line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from biomedgpt.model.vqgan import (GUMBEL_F8_8192, VQGANConfig, VQGANTokenizer, prepare, random_model,  # noqa: E402
                                   save)

MICRO = {"kl_weight": 1e-8, "embed_dim": 16, "n_embed": 8192,
         "ddconfig": {"double_z": False, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                      "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [32], "dropout": 0.0}}


def images(n: int, side: int = 320) -> list[bytes]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    out = []
    for i in range(n):
        base = np.stack([x * 255, y * 255, (x * y) * 255 * (i % 3)], axis=-1)
        arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def tokenizer_path(params: dict, n: int, data: list[bytes], batch: int, repeat: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = VQGANConfig.from_taming({"params": params})
    tok = VQGANTokenizer(random_model(cfg), device="cpu")
    tok.encode(data[:batch], batch_size=batch)  # warm-up
    seconds = best(lambda: tok.encode(data[:n], batch_size=batch), repeat)
    return {"threads": threads, "images_per_s": n / seconds, "images_per_s_per_core": n / seconds / threads,
            "params_m": sum(p.numel() for p in tok.model.parameters()) / 1e6}


def build_cost(data: list[bytes], model_dir: Path, batch: int) -> dict:
    from biomedgpt.data.build import build_shards

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "imgs"
        src.mkdir()
        for i, d in enumerate(data):
            (src / f"img{i:04d}.png").write_bytes(d)
        out = {}
        for name, codes in (("without_codes", None), ("with_codes", str(model_dir))):
            t0 = time.perf_counter()
            build_shards("bench", str(src), str(Path(tmp) / name), converter="image_folder", codes=codes,
                         codes_batch_size=batch, progress=False, licence="synthetic", access="open")
            out[name] = len(data) / (time.perf_counter() - t0)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-real", action="store_true", help="micro config only")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    data = images(args.images)
    recipe_s = best(lambda: [prepare(d) for d in data], args.repeat)
    results: dict = {"cores": cores, "images": args.images, "batch": args.batch, "torch": torch.__version__,
                     "recipe_images_per_s_per_core": args.images / recipe_s, "configs": {}}
    configs = [("micro", MICRO)] + ([] if args.skip_real else [("vqgan_gumbel_f8_8192", GUMBEL_F8_8192)])
    for name, params in configs:
        n = args.images if name == "micro" else min(args.images, args.batch)
        rows = [tokenizer_path(params, n, data, args.batch, args.repeat, t) for t in sorted({1, cores})]
        results["configs"][name] = rows
    torch.set_num_threads(cores)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save(random_model(VQGANConfig.from_taming({"params": MICRO})), Path(tmp) / "micro")
        results["build_micro_images_per_s"] = build_cost(data, model_dir, args.batch)

    print(f"VQGAN codes, {cores} CPU cores, torch {torch.__version__}, {args.images} images of 320x320, batch {args.batch}")
    print(f"recipe alone (decode, resize 256, crop, 2x-1): {results['recipe_images_per_s_per_core']:.0f} images/s per core")
    print(f"{'config':24} {'params':>8} {'threads':>8} {'images/s':>10} {'per core':>10}")
    for name, rows in results["configs"].items():
        for r in rows:
            print(f"{name:24} {r['params_m']:7.1f}M {r['threads']:8d} {r['images_per_s']:10.2f} "
                  f"{r['images_per_s_per_core']:10.2f}")
    b = results["build_micro_images_per_s"]
    print(f"shard build of the images (micro VQGAN, one process): {b['with_codes']:.1f} images/s with codes, "
          f"{b['without_codes']:.1f} without")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
