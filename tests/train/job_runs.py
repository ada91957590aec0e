"""Training jobs run as a user runs them, for the recovery and elastic-resume tests: `biomedgpt run` on a
small spec (the demo job cut down: 16-pixel images, 16-sample shards) as a subprocess with its own local
Ray, and what to read back from the run: the checkpoints Ray Train recorded, a checkpoint's data
position, the steps the console showed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from stream_positions import StreamOf
from tests_paths import REPO

BIN = Path(sys.executable).parent


def spec_file(tmp: Path, shards: Path, name: str, *, data: dict | None = None, **trainer) -> Path:
    """The demo spec cut down, writing under `tmp`; `trainer` (and `data`) settings override it."""
    spec = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    spec["name"] = name
    spec["model"]["image_size"] = 16
    spec["model"]["tokenizer"]["train_vocab_size"] = 300
    spec["data"]["shards"] = str(shards)
    spec["data"]["build"] = {"vqa_rad": str(REPO / "datasets_spec" / "samples" / "vqa_rad")}
    spec["data"]["shard_max_samples"] = 16
    spec["data"].update(data or {})
    spec["trainer"].update(batch_size=4, log_every=5, checkpoint_every=10, max_failures=0)
    spec["trainer"].update(trainer)
    spec["evaluate"]["enabled"] = False
    spec["output"]["storage"] = str(tmp / "runs")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_dir(tmp: Path, name: str) -> Path:
    return tmp / "runs" / "demo" / name


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1", **extra)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    if "RAY_ADDRESS" not in extra:
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # a Ray of an earlier test is not this one
            e.pop(var, None)
    return e


def start(spec: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biomedgpt.cli", "run", str(spec)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env(**extra_env), start_new_session=True)


def registered(run: Path) -> list[str]:
    """Checkpoints Ray Train has recorded (a checkpoint counts only once every rank reported it)."""
    snap = run / "checkpoint_manager_snapshot.json"
    if not snap.is_file():
        return []
    try:
        text = snap.read_text()
    except OSError:
        return []
    return sorted(set(part.split('"')[0] for part in text.split("checkpoint-")[1:] if part[:8].isdigit()))


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before: {what}")
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def train_workers(proc: subprocess.Popen) -> list:
    """The Ray Train workers of the job `proc` runs (its local Ray's processes descend from it; other
    Rays on the machine are not this job's)."""
    import psutil

    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def checkpoint_state(checkpoint: Path) -> dict:
    """What Lightning saved besides the weights and optimizer (sharded: meta.pt; full: the whole file)."""
    sharded = checkpoint / "lightning" / "meta.pt"
    return torch.load(sharded if sharded.is_file() else checkpoint / "lightning.ckpt", map_location="cpu",
                      weights_only=False)


def data_position(checkpoint: Path) -> dict:
    meta = checkpoint_state(checkpoint)
    return next(v["position"] for k, v in meta["callbacks"].items() if "DataPosition" in k)


def stream_of(shards: Path, spec: Path) -> StreamOf:
    return StreamOf(str(shards), "vqa_rad", yaml.safe_load(spec.read_text()))


HERE = Path(__file__).resolve().parent


def read_streams(shards: str | Path, spec: dict, tokenizer_dir: str, reads: list[dict], out: Path, *,
                 pause_after: int = 0, folder: Path | None = None, **extra_env: str) -> subprocess.Popen:
    """Start stream_reader.py (a process of its own: see its docstring) on `reads` ({"rank", "batches",
    "position", "column"} each) of the spec's training stream; `read_finished` waits for it and returns,
    for each read, its batches' values."""
    cmd = [sys.executable, str(HERE / "stream_reader.py"), str(shards), json.dumps(spec), tokenizer_dir,
           json.dumps(reads), str(out), str(pause_after), str(folder or out.parent)]
    e = env(**extra_env)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), e.get("PYTHONPATH", "")])
    return subprocess.Popen(cmd, stdout=open(out.with_suffix(".log"), "w"), stderr=subprocess.STDOUT, env=e,
                            start_new_session=True)


def read_finished(proc: subprocess.Popen, out: Path, timeout: float = 300) -> list[list[list]]:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        try:  # the reader and the Ray processes it started (it leaves without shutting Ray down)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc == 0, out.with_suffix(".log").read_text()[-4000:]
    return json.loads(out.read_text())


def read_stream_batches(shards: str | Path, spec: dict, tokenizer_dir: str, reads: list[dict], out: Path
                        ) -> list[list[list]]:
    """`read_streams` on a fresh local Ray of its own, waited for."""
    return read_finished(read_streams(shards, spec, tokenizer_dir, reads, out), out)


def steps_logged(log: str) -> list[int]:
    return [int(line.split("[train] step ")[1].split("/")[0]) for line in log.splitlines() if "[train] step " in line]
