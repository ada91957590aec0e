"""Node loss on a local multi-node Ray cluster (ray.cluster_utils.Cluster: a head and worker nodes, each a
raylet of its own with its own CPUs, all on 127.0.0.1): a whole node goes away, with every process on it.

- Training: a whole node lost mid-run, with one of the job's two workers (one per worker node, spread), is
  test_elastic.py's `test_elastic_retry_with_fewer_workers_after_node_loss`: Ray Train's retry restarts the group with the
  one worker the remaining node holds and the run continues from its latest checkpoint, every step on the
  samples of an uninterrupted run.
- The data stream: plan rank 0's Ray Data stream reads on a cluster whose only CPUs are on one worker node,
  so every read task ran there and the blocks read ahead live in its object store; mid-epoch that node is
  removed (another added first). The stream must go on without skipping or repeating a sample: the keys
  are, batch for batch, those of an uninterrupted read. The reader is a process of its own
  (stream_reader.py), as a training worker is.
"""

from __future__ import annotations

import os
import signal

import pytest

from job_runs import read_finished, read_streams, wait_until


@pytest.mark.slow(seconds=30)
def test_node_loss_of_a_read_node_mid_epoch(tmp_path, demo_shards, demo_tokenizer_dir, monkeypatch):
    from ray.cluster_utils import Cluster

    spec = {"trainer": {"workers": 1, "batch_size": 4, "seed": 3}, "data": {"shuffle_buffer": 16}}
    batches, pause = 40, 6  # 266 samples: 66 batches an epoch
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ref_out = tmp_path / "reference.json"
    reads = [{"rank": 0, "batches": batches}]
    expected = read_finished(read_streams(demo_shards, spec, demo_tokenizer_dir, reads, ref_out), ref_out)[0]

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    reader = None
    out = tmp_path / "keys.json"
    try:
        first = cluster.add_node(num_cpus=1)  # every read task runs here, and its blocks live here
        cluster.wait_for_nodes()
        reader = read_streams(demo_shards, spec, demo_tokenizer_dir, reads, out, pause_after=pause, folder=tmp_path,
                              RAY_ADDRESS=cluster.address)
        wait_until(lambda: (tmp_path / "paused").exists(), 300, "the reader paused mid-epoch", reader)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cluster.remove_node(first, allow_graceful=False)
        (tmp_path / "go").write_text("")
        got = read_finished(reader, out)[0]
    finally:
        if reader is not None and reader.poll() is None:
            os.killpg(reader.pid, signal.SIGKILL)
        cluster.shutdown()
    assert got == expected  # nothing skipped, nothing twice, in the order of an uninterrupted read
    keys = [k for batch in got for k in batch]
    assert len(keys) == len(set(keys)) == batches * 4
