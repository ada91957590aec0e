"""Forward+backward time of one training step of the network, in one process.

(a) BiomedGPT-small on text-only input (batch 8, 286 source tokens, 20 target tokens) against a
    transformers BART with the same width, depth, heads, FFN, vocabulary and lengths: what OFA's
    position biases, NormFormer extras and per-layer relative tables cost. Target: <= 1.3x BART.
(b) The full image+text step (256 px images, 30 text tokens) of BiomedGPT-small, with the time
    split between the image backbone (ResNet, forward+backward alone) and the rest.

Both models run in training mode (dropout 0.1) in float32 on the CPU threads torch is given.
Usage: python benchmarks/model_step.py [--steps N] [--warmup N] [--batch N]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration


def timed_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def make_step(model, inputs: dict):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = model(**inputs).loss
        loss.backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src-len", type=int, default=286)
    ap.add_argument("--tgt-len", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()

    cfg = BiomedGPTConfig.from_size("small", dropout=0.1)
    ours = BiomedGPTForConditionalGeneration(cfg).train()
    bart_cfg = BartConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.encoder_attention_heads,
        decoder_attention_heads=cfg.decoder_attention_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
        decoder_ffn_dim=cfg.decoder_ffn_dim, max_position_embeddings=1024, dropout=0.1,
        activation_function="gelu", attn_implementation="sdpa",
    )
    bart = BartForConditionalGeneration(bart_cfg).train()

    b, s, t = args.batch, args.src_len, args.tgt_len
    src = torch.randint(4, cfg.vocab_size, (b, s))
    labels = torch.randint(4, cfg.vocab_size, (b, t))
    text_inputs = dict(input_ids=src, labels=labels)

    # Interleave the two models' runs so machine noise hits both alike.
    ours_step, bart_step = make_step(ours, text_inputs), make_step(bart, dict(text_inputs, use_cache=False))
    ours_t, bart_t = [], []
    for _ in range(args.warmup):
        ours_step()
        bart_step()
    for _ in range(args.steps):
        ours_t += timed_steps(ours_step, 0, 1)
        bart_t += timed_steps(bart_step, 0, 1)
    ours_ms, bart_ms = statistics.median(ours_t) * 1e3, statistics.median(bart_t) * 1e3

    # (b) image + text
    images = torch.randn(b, 3, 256, 256)
    img_inputs = dict(input_ids=torch.randint(4, cfg.vocab_size, (b, 30)), patch_images=images,
                      patch_masks=torch.ones(b, dtype=torch.bool), labels=torch.randint(4, cfg.vocab_size, (b, 30)))
    full_t = timed_steps(make_step(ours, img_inputs), args.warmup, args.steps)
    backbone = ours.encoder.embed_images

    def backbone_step():
        for p in backbone.parameters():
            p.grad = None
        backbone(images).float().mean().backward()

    bb_t = timed_steps(backbone_step, args.warmup, args.steps)
    full_ms, bb_ms = statistics.median(full_t) * 1e3, statistics.median(bb_t) * 1e3
    ratio = ours_ms / bart_ms

    print(f"BiomedGPT model step (forward+backward, training mode, float32, {threads} threads, median of {args.steps})")
    print()
    print(f"(a) text only: batch {b}, {s} source / {t} target tokens, small size (d 256, 4+4 layers, vocab 59457)")
    print(f"    {'model':<28}{'ms/step':>10}")
    print(f"    {'transformers BART (sdpa)':<28}{bart_ms:>10.1f}")
    print(f"    {'BiomedGPT-small':<28}{ours_ms:>10.1f}")
    print(f"    ratio ours/BART: {ratio:.2f}x (target <= 1.30x) -> {'PASS' if ratio <= 1.3 else 'FAIL'}")
    print()
    print(f"(b) image+text: batch {b}, 256x256 images (16x16 patches), 30 text tokens, 30 target tokens")
    print(f"    {'part':<28}{'ms/step':>10}{'share':>8}")
    print(f"    {'whole step':<28}{full_ms:>10.1f}{'100%':>8}")
    print(f"    {'image backbone (ResNet-50)':<28}{bb_ms:>10.1f}{bb_ms / full_ms:>8.0%}")
    print(f"    {'transformer and the rest':<28}{full_ms - bb_ms:>10.1f}{(full_ms - bb_ms) / full_ms:>8.0%}")
    print(json.dumps({
        "benchmark": "model_step", "threads": threads, "batch": b,
        "text_only": {"ours_ms": round(ours_ms, 2), "bart_ms": round(bart_ms, 2), "ratio": round(ratio, 3),
                      "target_max_ratio": 1.3, "pass": ratio <= 1.3},
        "image_text": {"step_ms": round(full_ms, 2), "backbone_ms": round(bb_ms, 2),
                       "transformer_ms": round(full_ms - bb_ms, 2), "backbone_share": round(bb_ms / full_ms, 3)},
    }))


if __name__ == "__main__":
    main()
