"""Reads training streams in a process of its own, for the tests that compare what a run trained on with
what its data stream holds. Ray 2.x aborts the process whose driver drops a Ray Data stream mid-epoch
while Ray is shutting down or the stream's tasks are being cancelled (task_manager.cc "PeekObjectRefStream
... stream has been created and not removed": Ray's fatal-log path, `_exit(1)`, no Python traceback);
in the test process that would end the whole pytest session without a word. Here every stream stays
open until the process ends, and the process leaves through `os._exit`, never `ray.shutdown()`: the test
kills its process group, Ray's processes with it.

    python stream_reader.py SHARDS SPEC_JSON TOKENIZER_DIR READS_JSON OUT [PAUSE_AFTER DIR]

READS_JSON: a list of reads, each {"rank": r, "batches": n, "position": a data position or null,
"column": "__key__" (strings) or "sample_id" (ints)}, of the stream of the spec's single-dataset run
(stream_positions.StreamOf). OUT gets a JSON list: for each read, its batches' values. The Ray cluster is
RAY_ADDRESS's, or a fresh local one. With PAUSE_AFTER > 0 the first read stops after that many batches,
writes DIR/paused and waits for DIR/go before reading on (the node-loss test takes a node away
meanwhile).
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


def wait_for_go(folder: Path, at: int) -> None:
    Path(folder, "paused").write_text(str(at))
    deadline = time.time() + 300
    while not Path(folder, "go").exists():
        if time.time() > deadline:
            raise TimeoutError("no go from the test")
        time.sleep(0.2)


def main(shards: str, spec_json: str, tokenizer_dir: str, reads_json: str, out: str, pause_after: str = "0",
         folder: str = ".") -> int:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = StreamOf(shards, "vqa_rad", json.loads(spec_json))
    cast = {"__key__": str, "sample_id": int}
    results: list[list[list]] = []
    streams = []  # kept open until the process ends (module docstring)
    for n, read in enumerate(json.loads(reads_json)):
        column = read.get("column", "__key__")
        stream = plan.stream(read["rank"], tokenizer_dir, columns=(column,))
        if read.get("position") is not None:
            stream.seek(read["position"])
        it = iter(stream)
        streams.append(it)
        batches: list[list] = []
        for i in range(read["batches"]):
            if n == 0 and int(pause_after) and i == int(pause_after):
                wait_for_go(Path(folder), i)
            batches.append([cast[column](x) for x in next(it)[column]])
        results.append(batches)
    Path(out).write_text(json.dumps(results))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
