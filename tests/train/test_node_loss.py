"""Node loss on a local multi-node Ray cluster (ray.cluster_utils.Cluster: a head and worker nodes, each a
raylet of its own with its own CPUs, all on 127.0.0.1): a whole node goes away, with every process on it.

- Training (`biomedgpt run` as a user runs it, against the cluster): two workers spread one per node
  (`trainer.placement: spread`, 2 CPUs each on 2-CPU nodes). Once checkpoint K is recorded, while the run
  goes on, one worker's node is removed; Ray Train's retry (`max_failures`) waits for room for the group,
  a node is added back (capacity returns), and the run resumes from its latest complete checkpoint. It
  finishes with at most one checkpoint interval of steps trained twice, each repeated step on exactly the
  samples of its first try, and every step's global batch that of an uninterrupted run.
- The data stream: plan rank 0's Ray Data stream reads on a cluster whose only CPUs are on one worker node,
  so every read task ran there and the blocks read ahead live in its object store; mid-epoch that node is
  removed (another added first). The stream must go on without skipping or repeating a sample: the keys
  are, batch for batch, those of an uninterrupted read. The reader is a process of its own
  (node_loss_reader.py), as a training worker is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from job_runs import env, registered, run_dir, spec_file, start, steps_logged, wait_until

HERE = Path(__file__).resolve().parent
K, EVERY, MAX = 5, 5, 18
DATA = {"shuffle_buffer": 32}


def read_keys(shards: str, spec: dict, tokenizer_dir: str, ranks: str, batches: int, out: Path, *,
              pause_after: int = 0, folder: Path | None = None, **extra_env: str) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "node_loss_reader.py"), shards, json.dumps(spec), tokenizer_dir, ranks,
           str(batches), str(pause_after), str(folder or out.parent), str(out)]
    e = env(**extra_env)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), e.get("PYTHONPATH", "")])
    return subprocess.Popen(cmd, stdout=open(out.with_suffix(".log"), "w"), stderr=subprocess.STDOUT, env=e,
                            start_new_session=True)


def finished(proc: subprocess.Popen, out: Path, timeout: float = 300) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        try:  # the reader and whatever Ray processes it started (it leaves without shutting Ray down)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc == 0, out.with_suffix(".log").read_text()[-4000:]
    return {int(r): keys for r, keys in json.loads(out.read_text()).items()}


def trained(folder: Path) -> dict[int, tuple[list[str], int]]:
    """Per step: the global batch trained (the workers' keys in rank order) and how many times a worker
    recorded it (more than once: the step was trained again after the loss). Every try of a step by one
    worker must have read the same samples."""
    parts: dict[int, dict[int, list[list[str]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            parts[rec["step"]][rank].append(rec["keys"])
    out = {}
    for step, by_rank in sorted(parts.items()):
        assert sorted(by_rank) == [0, 1], f"step {step}: ranks {sorted(by_rank)}"
        for rank, tries in by_rank.items():  # the data position was exact: a repeated step read the same samples
            assert all(t == tries[0] for t in tries), f"step {step}, rank {rank}: tries read different samples"
        out[step] = ([k for r in sorted(by_rank) for k in by_rank[r][0]], max(len(t) for t in by_rank.values()))
    return out


def test_node_loss_mid_run_resumes_when_a_node_returns(tmp_path, monkeypatch, demo_tokenizer_dir):
    from ray.cluster_utils import Cluster

    from biomedgpt.session import free_port

    shards = tmp_path / "shards"
    name = "node-loss"
    spec = spec_file(tmp_path, shards, name, data=DATA, max_steps=MAX, checkpoint_every=EVERY, log_every=1,
                     workers=2, cpus_per_worker=2, torch_threads=1, batch_size=8, strategy="ddp",
                     checkpoint_format="full", placement="spread", max_failures=2)
    run = run_dir(tmp_path, name)
    log = tmp_path / "log.txt"
    port = free_port()
    for var, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                       "BIOMEDGPT_RECORD_SAMPLES": str(tmp_path / "samples")}.items():
        monkeypatch.setenv(var, value)  # the Ray processes the cluster starts inherit these
    # the head: 1 CPU for Ray Data's reads and the driver's actors, no room for a 2-CPU worker
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                      "dashboard_port": port})
    proc = None
    try:
        cluster.add_node(num_cpus=2)
        second = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        proc = start(spec, log, RAY_ADDRESS=cluster.address)
        wait_until(lambda: f"{K:08d}" in registered(run), 900, f"checkpoint {K} recorded", proc)
        lost_at = registered(run)[-1]
        cluster.remove_node(second, allow_graceful=False)  # the node, its raylet, its worker, its objects
        time.sleep(5)  # the group fails and Ray Train waits for room for two workers
        assert proc.poll() is None, log.read_text()[-4000:]
        cluster.add_node(num_cpus=2)  # capacity returns
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    text = log.read_text()
    resumed = text.split("[train] resuming from ")[1].splitlines()[0]
    resumed_step = int(resumed.rsplit("checkpoint-", 1)[1][:8])
    assert resumed_step >= int(lost_at), (resumed, lost_at)  # the latest complete checkpoint, not an older one
    assert max(steps_logged(text)) == MAX and registered(run)[-1] == f"{MAX:08d}"

    steps = trained(tmp_path / "samples")
    assert sorted(steps) == list(range(1, MAX + 1))
    repeated = [s for s, (_, tries) in steps.items() if tries > 1]
    assert len(repeated) <= EVERY, f"steps trained twice: {repeated}"
    assert all(s > resumed_step for s in repeated), (repeated, resumed_step)

    settings = yaml.safe_load(spec.read_text())
    out = tmp_path / "reference.json"
    expected = finished(read_keys(str(shards), settings, demo_tokenizer_dir, "0,1", MAX, out), out)
    for s, (batch, _) in steps.items():  # every step: the global batch of an uninterrupted run
        assert batch == expected[0][s - 1] + expected[1][s - 1], f"step {s}"


def test_node_loss_of_a_read_node_mid_epoch(tmp_path, demo_shards, demo_tokenizer_dir, monkeypatch):
    from ray.cluster_utils import Cluster

    spec = {"trainer": {"workers": 1, "batch_size": 4, "seed": 3}, "data": {"shuffle_buffer": 16}}
    batches, pause = 40, 6  # 266 samples: 66 batches an epoch
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ref_out = tmp_path / "reference.json"
    expected = finished(read_keys(demo_shards, spec, demo_tokenizer_dir, "0", batches, ref_out), ref_out)[0]

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    reader = None
    out = tmp_path / "keys.json"
    try:
        first = cluster.add_node(num_cpus=1)  # every read task runs here, and its blocks live here
        cluster.wait_for_nodes()
        reader = read_keys(demo_shards, spec, demo_tokenizer_dir, "0", batches, out, pause_after=pause,
                           folder=tmp_path, RAY_ADDRESS=cluster.address)
        wait_until(lambda: (tmp_path / "paused").exists(), 300, "the reader paused mid-epoch", reader)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cluster.remove_node(first, allow_graceful=False)
        (tmp_path / "go").write_text("")
        got = finished(reader, out)[0]
    finally:
        if reader is not None and reader.poll() is None:
            os.killpg(reader.pid, signal.SIGKILL)
        cluster.shutdown()
    assert got == expected  # nothing skipped, nothing twice, in the order of an uninterrupted read
    keys = [k for batch in got for k in batch]
    assert len(keys) == len(set(keys)) == batches * 4
