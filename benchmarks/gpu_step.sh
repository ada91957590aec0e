#!/usr/bin/env bash
# Base-size FSDP2 bf16 training throughput and model FLOPs utilisation on one GPU (e.g. an H100),
# for the day a GPU is lent. Sized to finish within 8 minutes: model build + 300 steps of batch 32 at
# 256 px (~2-4 min on an H100). The lent GPU machines have PyTorch, Lightning and transformers but
# no package index, so this uses their python3 as it is (our package from platform/, no install);
# elsewhere it uses the project's .venv. Run from anywhere:
#     bash benchmarks/gpu_step.sh            (extra arguments go to gpu_step.py, e.g. --steps 100)
# Prints a table and, as its last line, one JSON object (samples/s, tokens/s, MFU, GPU name).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_step.py "$@"
