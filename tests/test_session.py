"""The job session: local runs start their own Ray whatever a dead head left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Starts Ray as `biomedgpt run` does (num_cpus given), says which cluster it got, stops it.
PROBE = """
from biomedgpt.session import ensure_ray
assert ensure_ray(num_cpus=1)
import ray
print("GCS", ray.get_runtime_context().gcs_address, "CPUS", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


@pytest.fixture
def ray_tmpdir():
    """A throwaway RAY_TMPDIR (short: Ray's socket paths must stay under 107 bytes); no other Ray uses it."""
    path = Path(tempfile.mkdtemp(prefix="raytmp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def probe_env(ray_tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmpdir), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    return env


def test_local_run_starts_its_own_ray_despite_a_dead_heads_pointer_file(ray_tmpdir):
    from biomedgpt.session import free_port

    # What `ray start --head` leaves behind when the head dies or is killed: the pointer to its GCS.
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env=probe_env(ray_tmpdir), cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "num_cpus and num_gpus must not be provided" not in log
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("GCS "))
    assert dead not in line and line.endswith("CPUS 1.0"), line  # a fresh Ray with the CPUs asked for
