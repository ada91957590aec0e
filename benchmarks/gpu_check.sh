#!/usr/bin/env bash
# The GPU check, for a machine with a GPU, torch, Lightning and transformers but no package index (no
# Ray, nothing installed: our package runs from platform/). Four parts, each printing its table and a
# last JSON line, within 8 minutes on one H100/H200:
#   1. gpu_step.py --strategy fsdp   base-size FSDP2 bf16 training steps: samples/s, tokens/s, MFU
#   2. gpu_step.py --strategy ddp    the same with DDP and bf16 autocast
#   3. strategy.py --gpu             DDP against FSDP2 steps/s, small and medium sizes
#   4. gpu_infer.py                  evaluation (VQA-RAD sample questions) and the serving engine's
#                                    batched answers on the GPU in bf16, every input on the device
# Each part runs even if one before it failed; the exit status is the number of parts that failed.
#     bash benchmarks/gpu_check.sh            # on the GPU machine
#     bash benchmarks/gpu_check.sh --smoke    # anywhere: demo size on the CPU (checks the script)
# With OUT set (a folder), each part's output is also written to $OUT/<part>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS="${OUT:-}"
failed=0
part() {
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if [ -n "$LOGS" ]; then "$PY" "$@" 2>&1 | tee "$LOGS/$name.log"; else "$PY" "$@" 2>&1; fi
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
if [ "${1:-}" = "--smoke" ]; then
  part step_fsdp benchmarks/gpu_step.py --smoke --strategy fsdp
  part step_ddp benchmarks/gpu_step.py --smoke --strategy ddp
  part strategy benchmarks/strategy.py --sizes demo --workers 1 --steps 3 --warmup 1 --image 64 --batch 2
  part infer benchmarks/gpu_infer.py --smoke
else
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
  part step_fsdp benchmarks/gpu_step.py --strategy fsdp --steps 150
  part step_ddp benchmarks/gpu_step.py --strategy ddp --steps 150
  part strategy benchmarks/strategy.py --gpu --sizes small,medium --steps 40 --warmup 10
  part infer benchmarks/gpu_infer.py
fi
echo "gpu_check: $failed part(s) failed"
exit "$failed"
