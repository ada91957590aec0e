"""benchmarks/gpu_check.sh (the GPU check: FSDP2 and DDP training steps, DDP against FSDP2, evaluation and
serving on the device) runs its smoke mode on the CPU: every part works and prints its JSON figures."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests_paths import REPO


@pytest.mark.slow(seconds=39)
def test_gpu_check_smoke_mode_runs_every_part_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "gpu_check: 0 part(s) failed" in proc.stdout
    figures = {}
    for part in ("step_fsdp", "step_ddp", "strategy", "infer"):
        lines = (tmp_path / f"{part}.log").read_text().strip().splitlines()
        figures[part] = json.loads(lines[-1])
    for part, strategy in (("step_fsdp", "fsdp"), ("step_ddp", "ddp")):
        f = figures[part]
        assert f["benchmark"] == "gpu_step" and f["strategy"] == strategy and f["size"] == "demo"
        assert f["samples_per_s"] > 0 and f["tokens_per_s"] > 0 and f["device"] == "cpu"
    s = figures["strategy"]["demo"]
    assert s["ddp_steps_per_s"] > 0 and s["fsdp_steps_per_s"] > 0 and s["ratio"] > 0
    infer = figures["infer"]
    assert infer["benchmark"] == "gpu_infer" and infer["inputs_off_device"] == 0
    assert infer["eval_samples_per_s"] > 0 and infer["serve_batched_req_per_s"] > 0
    assert re.fullmatch(r"\d+/\d+", infer["eval_agreement_with_cpu_fp32"])
    assert "| eval_samples_per_s" in proc.stdout
