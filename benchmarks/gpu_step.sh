#!/usr/bin/env bash
# Base-size FSDP2 bf16 training throughput and model FLOPs utilisation on one GPU (e.g. an H100).
# Sized to finish within 8 minutes: install (~2 min), 300 steps of batch 32 at 256 px (~3-4 min on
# an H100), then the figures from the run's metrics. Run from the repository root:
#     bash benchmarks/gpu_step.sh
# Prints a table and, as its last line, one JSON object (samples/s, tokens/s, MFU, GPU name).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # On a GPU machine take the CUDA build of the same torch release.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -c constraints.txt -e ".[dev]"
fi
rm -rf runs/bench
start=$(date +%s)
.venv/bin/biomedgpt run jobs/bench/gpu_base.yaml > runs-bench.log 2>&1 || { tail -50 runs-bench.log; exit 1; }
end=$(date +%s)
.venv/bin/python - "$((end - start))" <<'PY'
import csv, json, statistics, sys
import torch
rows = list(csv.DictReader(open("runs/bench/runs/bench/gpu-base/logs/metrics.csv")))
def series(key):
    return [float(r[key]) for r in rows if r.get(key)]
sps, tps, mfu = series("train/samples_per_s")[1:], series("train/tokens_per_s")[1:], series("train/mfu")[1:]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
out = {"benchmark": "gpu_step", "gpu": gpu, "size": "base", "batch": 32, "image_px": 256,
       "samples_per_s": round(statistics.median(sps), 2) if sps else None,
       "tokens_per_s": round(statistics.median(tps), 1) if tps else None,
       "mfu": round(statistics.median(mfu), 4) if mfu else None, "wall_s": int(sys.argv[1])}
print(f"BiomedGPT-base, FSDP2 bf16, 1 x {gpu}, batch 32, 256 px")
for k in ("samples_per_s", "tokens_per_s", "mfu", "wall_s"):
    print(f"  {k:<16}{out[k]}")
print(json.dumps(out))
PY
