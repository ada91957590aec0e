"""Adapter quality: the demo's trained model as the base, adapted to a second open dataset with LoRA and with full
fine-tuning for the same steps; accuracy of both on held-back images (issue 18, item 6: target LoRA >= 0.9x full).

1. The base: `jobs/demo/vqa_rad.yaml` run as `make demo` runs it (the demo-size model trained 400 steps on the
   VQA-RAD sample, 2 Ray Train workers, FSDP2 over gloo), unless `--base` names its export already made.
2. LoRA: `jobs/demo/pneumoniamnist_lora.yaml` (rank 16 on every attention and FFN projection, the base frozen)
   on the PneumoniaMNIST sample of `datasets_spec/samples/pneumoniamnist` (320 training images, half normal,
   half pneumonia), evaluated on the adapter merged into its base.
3. Full fine-tuning: the same spec with `finetune.method: full` (every weight trains) and the demo's learning
   rate (1e-3, the LoRA spec's 2e-3 halved: full fine-tuning moves every weight), the same steps, batch, data
   order (seed) and evaluation.
Both are evaluated as every classification is: each class name scored under the trie, argmax, on the 160
held-back test images (80 per class: chance is 0.5). Every run goes through `biomedgpt run` (its own local Ray
on 127.0.0.1); paths are rewritten into `--out` so nothing is written into the checkout.

The table is printed first; the LAST line is one JSON object:
    {"lora_accuracy", "full_accuracy", "ratio", "steps", "lora_checkpoint_values", "full_checkpoint_values",
     "adapter_bytes", "model_bytes", "lora_train_s", "full_train_s", "base_accuracy": {...}, "wall_s"}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo" / "vqa_rad.yaml"
LORA = REPO / "jobs" / "demo" / "pneumoniamnist_lora.yaml"
DATASET = "pneumoniamnist"


def env() -> dict[str, str]:
    e = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # each run starts its own local Ray
        e.pop(var, None)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def run(spec: dict, out: Path, name: str) -> tuple[Path, float]:
    """`biomedgpt run` of the spec (written to out/<name>.yaml); returns (run directory, seconds)."""
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    log = out / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "run", str(path)], stdout=fh,
                              stderr=subprocess.STDOUT, env=env(), cwd=out, timeout=3600)
    seconds = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{name}: biomedgpt run failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    print(f"  {name}: {seconds:.0f} s ({log})", file=sys.stderr, flush=True)
    return Path(spec["output"]["storage"]) / spec["team"] / spec["name"], seconds


def accuracy(run_dir: Path) -> float:
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return float(metrics[f"{DATASET}/test"]["accuracy"])


def checkpoint_values(run_dir: Path) -> int:
    """Values in the model state of the run's last checkpoint: the adapters only, or every weight and buffer."""
    from biomedgpt.modeldir import checkpoint_model_state

    last = sorted(run_dir.glob("checkpoint-*"))[-1]
    return sum(v.numel() for v in checkpoint_model_state(last).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--base", default=None, help="the demo's exported model, if already trained "
                                                     "(runs/demo/runs/demo/demo-vqa-rad/export after `make demo`)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps of both runs (default: the spec's)")
    args = parser.parse_args()
    t_start = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="adapter-quality-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards, runs = out / "shards", out / "runs"
    base_acc: dict = {}
    if args.base:
        base = Path(args.base).resolve()
    else:
        demo = yaml.safe_load(DEMO.read_text())
        demo["data"]["shards"] = str(shards)
        demo["data"]["build"] = {"vqa_rad": str(REPO / "datasets_spec" / "samples" / "vqa_rad")}
        demo["output"]["storage"] = str(runs)
        demo_dir, _ = run(demo, out, "base-demo")
        base = demo_dir / "export"
        base_acc = json.loads((demo_dir / "eval" / "metrics.json").read_text()).get("vqa_rad/test", {})

    lora = yaml.safe_load(LORA.read_text())
    lora["model"]["init"] = str(base)
    lora["model"]["tokenizer"] = {"path": str(base)}
    lora["data"]["shards"] = str(shards)
    lora["data"]["build"] = {DATASET: str(REPO / "datasets_spec" / "samples" / DATASET)}
    lora["output"]["storage"] = str(runs)
    if args.steps:
        lora["trainer"]["max_steps"] = args.steps
        lora["trainer"]["checkpoint_every"] = args.steps
    full = json.loads(json.dumps(lora))
    full["name"] = lora["name"].replace("-lora", "-full")
    full["description"] = "PneumoniaMNIST sample, full fine-tuning of the demo's VQA-RAD model (classify)."
    del full["finetune"]  # method: full, the default
    full["trainer"]["lr"] = 1.0e-3
    lora_dir, lora_s = run(lora, out, "lora")
    full_dir, full_s = run(full, out, "full")

    lora_acc, full_acc = accuracy(lora_dir), accuracy(full_dir)
    ratio = lora_acc / full_acc if full_acc else float("nan")
    adapter_bytes = (lora_dir / "export" / "adapter_model.safetensors").stat().st_size
    model_bytes = (full_dir / "export" / "model.safetensors").stat().st_size
    result = {"lora_accuracy": round(lora_acc, 4), "full_accuracy": round(full_acc, 4), "ratio": round(ratio, 3),
              "steps": lora["trainer"]["max_steps"], "lora_lr": lora["trainer"]["lr"], "full_lr": full["trainer"]["lr"],
              "lora_checkpoint_values": checkpoint_values(lora_dir),
              "full_checkpoint_values": checkpoint_values(full_dir),
              "adapter_bytes": adapter_bytes, "model_bytes": model_bytes, "lora_train_s": round(lora_s, 1),
              "full_train_s": round(full_s, 1), "base_accuracy": base_acc, "test_images": 160, "chance": 0.5,
              "wall_s": round(time.time() - t_start, 1), "out": str(out)}
    rows = [("method", "steps", "lr", "checkpoint values", "export bytes", f"{DATASET} test acc", "run s"),
            ("LoRA r16", str(result["steps"]), f"{lora['trainer']['lr']:g}", f"{result['lora_checkpoint_values']:,}",
             f"{adapter_bytes:,}", f"{lora_acc:.3f}", f"{lora_s:.0f}"),
            ("full", str(result["steps"]), f"{full['trainer']['lr']:g}", f"{result['full_checkpoint_values']:,}",
             f"{model_bytes:,}", f"{full_acc:.3f}", f"{full_s:.0f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows))
    print(f"LoRA / full accuracy: {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); "
          f"160 held-back images, chance 0.5; base: the demo's VQA-RAD model ({base})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
