"""Fault injection for recovery tests and fire drills.

`BIOMEDGPT_FAULTS="crash-before-report@STEP:RANK"` makes training rank RANK exit abruptly at step
STEP after writing its checkpoint shard and before reporting it to Ray Train, i.e. a worker lost
in the middle of a checkpoint. With `BIOMEDGPT_FAULTS_ONCE=/path/marker` the fault fires only once
(the marker file records it), so a retried run gets past that step. `hold-after-report@STEP:RANK`
makes rank RANK stop, alive, once the checkpoint of step STEP is reported (the other ranks wait for it
in the next collective): a run held at a known checkpoint, for a test to stop, kill or shrink. Unset:
nothing happens.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .progress import send


def maybe_crash(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("BIOMEDGPT_FAULTS", "")
    if not spec:
        return
    for item in spec.split(","):
        name, _, where = item.strip().partition("@")
        at_step, _, at_rank = where.partition(":")
        if name != point or int(at_step) != step or int(at_rank or 0) != rank:
            continue
        once = os.environ.get("BIOMEDGPT_FAULTS_ONCE")
        if once:
            marker = Path(once)
            if marker.exists():
                return
            marker.write_text(f"{point}@{step}:{rank}\n")
        hold = name.startswith("hold-")
        text = f"{point} at step {step} on rank {rank}: " + ("holding" if hold else "exiting")
        try:  # the driver's console shows it (the worker's own output goes to its log)
            send({"kind": "fault", "text": text}, wait=True)
        except Exception:
            pass
        sys.stderr.write(f"[fault] {text}\n")
        sys.stderr.flush()
        while hold:
            time.sleep(60)
        os._exit(13)
