"""The README's cluster lines as written (Jobs): `ray start --head`, `ray job submit ... -- biomedgpt run
jobs/demo/vqa_rad.yaml` and `biomedgpt submit jobs/demo/vqa_rad.yaml --address ...`, with the shipped
demo spec and its relative paths; only the ports, Ray's temp dir and the output root differ. The run's
report is where the README says: under $BIOMEDGPT_OUTPUT_ROOT (default ~/biomedgpt-runs), not in Ray's
unpacked working dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = Path("runs/demo/runs/demo/demo-vqa-rad")  # <output.storage>/<team>/<name> of jobs/demo/vqa_rad.yaml

pytestmark = pytest.mark.slow(seconds=360)

# Ports a head takes by default besides --port and --dashboard-port: another Ray on this machine (a
# test running beside this one) may hold them, and a head whose job agent cannot bind never takes jobs.
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
               "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


def readme_env(**extra: str) -> dict[str, str]:
    """`export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token`, with this venv's commands on PATH."""
    e = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", **extra)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        e.pop(var, None)
    return e


def test_readme_cluster_lines_with_the_shipped_demo_spec(tmp_path):
    from biomedgpt.session import free_port

    port, dash = free_port(), free_port()
    address = f"http://127.0.0.1:{dash}"
    outputs = tmp_path / "outputs"  # the cluster's $BIOMEDGPT_OUTPUT_ROOT
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # Ray's socket paths must stay short
    log = open(tmp_path / "head.log", "w")
    # `ray start --head --dashboard-host=127.0.0.1 --num-cpus=2`; --block keeps it our child, so
    # stopping that process group stops exactly this head (never `ray stop`)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--block",
         f"--port={port}", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *(f"--{flag}={free_port()}" for flag in AGENT_PORTS)],
        stdout=log, stderr=subprocess.STDOUT, env=readme_env(BIOMEDGPT_OUTPUT_ROOT=str(outputs)),
        start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            check = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                                   text=True, timeout=60, env=readme_env())
            if check.returncode == 0:
                break
            assert time.time() < deadline, "the head's job API did not come up: " + check.stderr[-2000:]
            time.sleep(2)

        # ray job submit --address http://127.0.0.1:8265 --working-dir . -- biomedgpt run jobs/demo/vqa_rad.yaml
        for _ in range(12):  # a head that just started may have no job agent yet
            proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                                   "--", "biomedgpt", "run", "jobs/demo/vqa_rad.yaml"],
                                  capture_output=True, text=True, timeout=1500, env=readme_env(), cwd=REPO)
            log_text = proc.stdout + proc.stderr
            if "No available agent" not in log_text:
                break
            time.sleep(5)
        assert proc.returncode == 0, log_text[-6000:]
        assert "the working dir Ray unpacked for job" in log_text and "runtime_resources" in log_text
        run_dir = outputs / RUN
        assert f"run directory {run_dir}" in log_text
        report = run_dir / "report.md"
        assert report.is_file() and (run_dir / "export" / "model.safetensors").is_file()
        assert (outputs / "runs" / "demo" / "shards" / "vqa_rad").is_dir()  # built where it outlives the job
        assert not list(Path(temp_dir).rglob("runtime_resources/**/runs/demo/shards"))  # not in Ray's package
        first = json.loads((run_dir / "result.json").read_text())
        assert first["evaluation"]["vqa_rad/test"]["count"] > 0

        # biomedgpt submit jobs/demo/vqa_rad.yaml --address http://127.0.0.1:8265: the same run, resumed
        # from its latest checkpoint (the spec's max_steps reached: export and evaluation again)
        proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "submit", "jobs/demo/vqa_rad.yaml",
                               "--address", address], capture_output=True, text=True, timeout=1500,
                              env=readme_env(), cwd=REPO)
        log_text = proc.stdout + proc.stderr
        assert proc.returncode == 0, log_text[-6000:]
        # the job's own log is followed to its end (the run directory line is the job's, not submit's)
        assert "[submit] job demo-demo-vqa-rad-" in log_text and "SUCCEEDED" in log_text
        assert f"run directory {run_dir}" in log_text
        assert report.is_file()
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
