"""benchmarks/gpu_step.sh (the GPU throughput benchmark, for the day a GPU is lent) runs its smoke mode
on CPU: the FSDP2 path of the benchmark works and its last line is the JSON of figures."""

from __future__ import annotations

import json
import os
import subprocess

from tests_paths import REPO


def test_gpu_step_benchmark_smoke_mode_runs_on_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_step.sh"), "--smoke"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "gpu_step" and figures["size"] == "demo" and figures["steps"] == 4
    assert figures["samples_per_s"] > 0 and figures["tokens_per_s"] > 0 and figures["device"] == "cpu"
    assert "| samples_per_s" in proc.stdout
