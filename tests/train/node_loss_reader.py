"""The reader of `test_node_loss_of_a_read_node_mid_epoch` (a process of its own, so that the node loss it
lives through cannot take the test process with it): reads the training stream of each plan rank in RANKS
(comma-separated) of a spec for `batches` batches on the Ray cluster in RAY_ADDRESS (a fresh local Ray
without it), and writes the batches' sample keys to OUT as JSON ({rank: [[key, ...], ...]}). With
PAUSE_AFTER > 0 it stops after that many batches (of the first rank), writes DIR/paused and waits for DIR/go
before reading on: the test takes a node away meanwhile.

    python node_loss_reader.py SHARDS SPEC_JSON TOKENIZER_DIR RANKS BATCHES PAUSE_AFTER DIR OUT
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from stream_positions import StreamOf  # noqa: E402


def main(shards: str, spec_json: str, tokenizer_dir: str, ranks: str, batches: str, pause_after: str, folder: str,
         out: str) -> int:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = StreamOf(shards, "vqa_rad", json.loads(spec_json))
    keys: dict[int, list[list[str]]] = {}
    # Every stream stays open until the process ends: Ray 2.x aborts the driver (task_manager.cc
    # "PeekObjectRefStream ... stream has been created and not removed") when a Ray Data stream is
    # dropped mid-epoch while its tasks are being cancelled, so none is dropped.
    streams = []
    for n, rank in enumerate(int(r) for r in ranks.split(",")):
        it = iter(plan.stream(rank, tokenizer_dir))
        streams.append(it)
        keys[rank] = []
        for i in range(int(batches)):
            if n == 0 and int(pause_after) and i == int(pause_after):
                Path(folder, "paused").write_text(str(i))
                deadline = time.time() + 300
                while not Path(folder, "go").exists():
                    if time.time() > deadline:
                        raise TimeoutError("no go from the test")
                    time.sleep(0.2)
            keys[rank].append([str(k) for k in next(it)["__key__"]])
    Path(out).write_text(json.dumps(keys))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not ray.shutdown(): see above; the test kills this process group, Ray's processes with it


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
