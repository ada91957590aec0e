"""Training progress for people: the workers send it, the driver shows it.

Ray's workers print into log files of their own (the terminal gets them only with --verbose), so rank
0 sends its progress (step, loss, learning rate, samples/s; a resume; an evaluation during training;
a skipped bad shard) to a small actor, the `ProgressInbox`, and the driver's `ProgressView` polls it
and draws one bar with the ETA (a terminal) or prints a line per tenth of the steps (a log file):

    with ProgressView(plan.max_steps) as view:
        fit(plan, progress=view.inbox)          # workers: attach(inbox); send(...)

Without an inbox (a worker run outside `biomedgpt run`, a test) `send` prints the line to stdout, as
before.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..console import Progress, clock, verbose

_INBOX: Any = None


@ray.remote(num_cpus=0)
class ProgressInbox:
    """Holds what the workers sent until the driver takes it."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


def attach(inbox: Any) -> None:
    """In a worker: send progress to `inbox` (None: print it), and forward the platform's own warnings
    (a skipped bad shard, a short read) to it, since the worker's log does not reach the terminal."""
    global _INBOX
    _INBOX = inbox
    logger = logging.getLogger("biomedgpt")
    for handler in list(logger.handlers):
        if isinstance(handler, _ToInbox):
            logger.removeHandler(handler)
    if inbox is not None and not verbose():
        logger.addHandler(_ToInbox(logging.WARNING))


class _ToInbox(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            send({"kind": "warning", "text": record.getMessage()})
        except Exception:  # a log line must never fail the step that logs it
            pass


def send(item: dict[str, Any], wait: bool = False) -> None:
    """Send one progress item from a worker (`wait`: until the driver's inbox holds it, e.g. before
    the process exits on purpose)."""
    if _INBOX is None or verbose():
        sys.stdout.write(format_line(item) + "\n")
        sys.stdout.flush()
        if _INBOX is None:
            return
    ref = _INBOX.put.remote(item)
    if wait:
        ray.get(ref, timeout=30)


def format_line(item: dict[str, Any]) -> str:
    """The line a person reads for one progress item."""
    kind = item.get("kind", "step")
    if kind == "step":
        parts = [f"step {item['step']}/{item['max_steps']}"]
        for key, label, fmt in (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("samples_per_s", "samples/s", ".1f")):
            if item.get(key) is not None:
                parts.append(f"{label} {float(item[key]):{fmt}}")
        if item.get("eta_s") is not None:
            parts.append(f"ETA {clock(item['eta_s'])}")
        return "[train] " + "  ".join(parts)
    if kind == "resume":
        return f"[train] resuming from {item['path']}"
    if kind == "eval":
        return f"[eval] {item['text']}"
    if kind == "fault":
        return f"[fault] {item['text']}"
    return f"[train] {item.get('kind')}: {item.get('text', '')}"


class ProgressView:
    """On the driver: a thread that polls the inbox and shows the training's progress. A terminal gets
    a bar over the steps (loss and samples/s beside it, tqdm's ETA); a log file a step line per tenth
    of the steps and at the last step. Every other item (resume, evaluation, warning) is one line."""

    def __init__(self, max_steps: int, poll_s: float = 0.5) -> None:
        self.max_steps = max_steps
        self.poll_s = poll_s
        self.inbox: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Progress | None = None
        self._t0 = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) of the first step seen: rate since then
        self._every = max(1, max_steps // 10)
        self._last_line = -1

    def __enter__(self) -> "ProgressView":
        # on the driver's node: the workers' nodes may be lost (a retry, an elastic restart) while the job goes on
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.inbox = ProgressInbox.options(name=None, lifetime=None, scheduling_strategy=here).remote()
        self._bar = Progress(self.max_steps, "train", unit="step", every=10 ** 12)
        self._thread = threading.Thread(target=self._run, name="biomedgpt-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drain()
        if self._bar is not None:
            self._bar.close()
        if self.inbox is not None:
            ray.kill(self.inbox)
            self.inbox = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        if self.inbox is None:
            return
        try:
            items = ray.get(self.inbox.take.remote(), timeout=30)
        except Exception:  # the inbox is gone with Ray (Ctrl-C): nothing more to show
            return
        for item in items:
            self.show(item)

    def show(self, item: dict[str, Any]) -> None:
        assert self._bar is not None
        if item.get("kind", "step") != "step":
            self._bar.write(format_line(item))
            return
        step = int(item["step"])
        now = time.monotonic()
        if self._first is None or step < self._first[0]:
            self._first = (step, now)
        elif step > self._first[0] and now > self._first[1]:
            rate = (step - self._first[0]) / (now - self._first[1])
            item = dict(item, eta_s=(self.max_steps - step) / rate if rate > 0 else None)
        if self._bar.interactive:  # a terminal: the bar, with the figures beside it
            self._bar.postfix(format_line(item).split("  ", 1)[-1])
            self._bar.moveto(step)
            return
        if step >= self.max_steps or step // self._every > self._last_line // self._every or self._last_line < 0:
            if step != self._last_line:
                self._last_line = step
                self._bar.write(format_line(item))
