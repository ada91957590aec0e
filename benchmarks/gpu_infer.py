"""Evaluation and serving on a GPU: the one predictor (`biomedgpt.inference.Predictor`) placed on the
device in the dtype a spec names, on real questions of the VQA-RAD sample (datasets_spec/samples).

1. Evaluation: the held-back questions decoded the official way (generation under the answer trie),
   on the CPU in float32 and on the device in `--dtype`; figures: samples/s on each, how many answers
   agree, and the VQA accuracy from the task's own scoring (`Task.score`). Every input the model sees is
   checked to be on the model's device and in its dtype.
2. Serving: the serving engine (`serve/engine.run_batch`, what a Ray Serve replica runs) answers
   batched VQA requests (every candidate scored) on the device: latency of a batch of 1, 16 and 32
   requests, and the throughput of batches against one request at a time.

The model is the architecture of `--size` with random weights and a tokenizer trained on the sample's
questions (no weights are downloaded): the figures are speeds and placement, not accuracy. No Ray: the
GPU machines lent here have torch and transformers but no package index.

    python3 benchmarks/gpu_infer.py                 # on a GPU: base size, bfloat16
    python3 benchmarks/gpu_infer.py --smoke         # anywhere: demo size on the CPU (checks the script)

Prints a table and, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))


def _records(shards_root: str, split: str) -> list[dict]:
    from biomedgpt.data.shards import read_shard
    from biomedgpt.data.stream import list_shards

    out = []
    for shard in list_shards(shards_root, "vqa_rad", split):
        for sample in read_shard(shard.url):
            rec = json.loads(sample["json"])
            rec["_image"] = sample.get("jpg") or sample.get("png")
            out.append(rec)
    return out


def _timed(fn, sync) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    res = fn()
    sync()
    return time.perf_counter() - t0, res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16")
    ap.add_argument("--image", type=int, default=256)
    ap.add_argument("--cpu-samples", type=int, default=16, help="held-back questions also decoded on the CPU")
    ap.add_argument("--requests", type=int, default=32, help="the largest serving batch")
    ap.add_argument("--smoke", action="store_true", help="demo size on the CPU in float32, 64 px, few samples")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.device, args.dtype, args.image, args.cpu_samples, args.requests = \
            "demo", "cpu", "float32", 64, 4, 4

    import numpy as np
    import torch

    from biomedgpt.data.build import build_shards
    from biomedgpt.data.transforms import load_image
    from biomedgpt.inference import Predictor
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.serve.engine import LoadedModel, Query, run_batch
    from biomedgpt.tasks import get_task

    torch.manual_seed(0)
    task = get_task("vqa")
    with tempfile.TemporaryDirectory() as tmp:
        print("building shards of the VQA-RAD sample ...", flush=True)
        build_shards("vqa_rad", str(REPO / "datasets_spec" / "samples" / "vqa_rad"), tmp, progress=False)
        train, test = _records(tmp, "train"), _records(tmp, "test")
    if args.smoke:
        test = test[:8]  # the smoke mode checks the script, quickly
    texts = []
    for rec in train:
        ex = task.example(rec)
        texts += [ex.instruction, ex.target]
    tok = BiomedGPTTokenizer.train(texts, vocab_size=2000)
    answers = sorted({task.example(r).target.strip() for r in train + test})
    cfg = BiomedGPTConfig.from_size(args.size, vocab_size=len(tok))
    cpu_model = BiomedGPTForConditionalGeneration(cfg).eval()
    n_params = sum(p.numel() for p in cpu_model.parameters())

    # -- evaluation ----------------------------------------------------------------------------
    plan = task.decode_plan(answers)
    reference = Predictor(cpu_model, tok, image_size=args.image, device="cpu", dtype="float32")
    subset = test[: args.cpu_samples]
    t_cpu, cpu_preds = _timed(lambda: reference.predict(plan, subset), lambda: None)
    model = BiomedGPTForConditionalGeneration(cfg).eval()
    model.load_state_dict(cpu_model.state_dict())
    predictor = Predictor(model, tok, image_size=args.image, device=args.device, dtype=args.dtype)
    device, dtype = predictor.device, predictor.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    seen: list[str] = []  # every tensor argument of every forward call: on the model's device, in its dtype

    def check(module, args_, kwargs):
        for name, value in list(kwargs.items()) + [(f"arg{i}", v) for i, v in enumerate(args_)]:
            if isinstance(value, torch.Tensor):
                ok = value.device == device and (not value.is_floating_point() or value.dtype == dtype)
                if not ok:
                    seen.append(f"{name}: {value.device} {value.dtype}")

    hooks = [predictor.model.register_forward_pre_hook(check, with_kwargs=True),
             predictor.model.get_encoder().register_forward_pre_hook(check, with_kwargs=True)]
    predictor.predict(plan, test[:4])  # warm-up (kernels, tries)
    t_dev, dev_preds = _timed(lambda: predictor.predict(plan, test), sync)
    for h in hooks:
        h.remove()
    agree = sum(a["prediction"] == b["prediction"] for a, b in zip(cpu_preds, dev_preds[: len(cpu_preds)]))
    refs = [(p["references"], p["answer_type"]) for p in dev_preds]
    accuracy = task.score([p["prediction"] for p in dev_preds], refs, meteor=False)

    # -- serving -------------------------------------------------------------------------------
    lm = LoadedModel("bench/vqa-rad@1", predictor)
    queries = [Query(task="vqa", instruction=task.instruction(r), image=load_image(r["_image"], args.image),
                     candidates=tuple(answers)) for r in (test * 2)[:args.requests]]
    run_batch(lm, queries[: max(1, args.requests // 2)])  # warm-up
    sizes = sorted({1, max(1, args.requests // 2), args.requests})
    lat = {}
    for n in sizes:
        times = [_timed(lambda: run_batch(lm, queries[:n]), sync)[0] for _ in range(3)]
        lat[n] = statistics.median(times)
    t_one, _ = _timed(lambda: [run_batch(lm, [q]) for q in queries], sync)
    t_batched, answers32 = _timed(lambda: run_batch(lm, queries), sync)
    assert all(a["answer"] in answers for a in answers32)

    out = {"benchmark": "gpu_infer", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "size": args.size, "params": n_params, "image_px": args.image,
           "eval_samples": len(test), "eval_samples_per_s": round(len(test) / t_dev, 2),
           "eval_cpu_fp32_samples_per_s": round(len(subset) / t_cpu, 2),
           "eval_agreement_with_cpu_fp32": f"{agree}/{len(cpu_preds)}",
           "eval_vqa_accuracy_random_weights": round(float(accuracy.get("overall", accuracy.get("accuracy", 0.0))), 4),
           "inputs_off_device": len(seen),
           **{f"serve_batch{n}_ms": round(t * 1000, 1) for n, t in lat.items()},
           "serve_one_at_a_time_req_per_s": round(len(queries) / t_one, 1),
           "serve_batched_req_per_s": round(len(queries) / t_batched, 1),
           "serve_batching_speedup": round(t_one / t_batched, 2)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"BiomedGPT-{args.size} ({n_params / 1e6:.1f}M, random weights), {out['dtype']} on {out['device']}, "
          f"{args.image} px, {len(test)} held-back VQA-RAD questions, {len(answers)} candidate answers")
    print(f"| {'figure':<34} | {'value':>14} |\n|{'-' * 36}|{'-' * 16}|")
    for k, v in out.items():
        if k not in ("benchmark", "device", "dtype", "size", "params", "image_px"):
            print(f"| {k:<34} | {str(v):>14} |")
    if seen:
        print("inputs not on the model's device/dtype:", "; ".join(sorted(set(seen))[:5]))
    print(json.dumps(out))
    if seen:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
