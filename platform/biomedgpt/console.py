"""The console is for people: one line per phase, a progress bar on long work, then a summary.

Ray's, Serve's, Lightning's and torch's own logs go to a file of the run (`libraries_to_file`), whose
path the job prints once; `--verbose` (or BIOMEDGPT_VERBOSE=1, which reaches Ray's workers through
their environment) brings them back to the terminal. Warnings the platform itself would cause are
silenced here (`quiet_warnings`), not left for the user to read.

    say("training: 2 workers, 300 steps")
    with Progress(total=n, desc="evaluate", unit="sample") as bar:
        bar.update(k)

Nothing here imports the rest of the package, or Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "BIOMEDGPT_VERBOSE"
_LOG_FILE: Path | None = None  # where libraries_to_file last sent the libraries' logs

# The libraries whose log records go to the run's log file unless --verbose.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "lightning", "lightning.pytorch",
                   "lightning.fabric", "pytorch_lightning", "torch", "fsspec", "s3fs", "botocore", "urllib3",
                   "filelock", "transformers", "py.warnings", "uvicorn", "fastapi")

# Warnings that come from how the libraries are wired together, not from anything the user did; each
# is either handled by the platform or harmless here (reasons beside them).
SILENCED_WARNINGS = (
    # Lightning's hints about dataloader workers and logging intervals: Ray Data feeds the batches.
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # Lightning's own tips (LitLogger, tensorboardX) printed when a Trainer is made.
    r".*Tip: .*",
    r".*Consider installing .*",
    # A Ray Data iterator handed to Lightning has no length; the step budget (max_steps) ends the epoch.
    r".*Total length of `.*` across ranks is zero.*",
    r".*Your `IterableDataset` has `__len__` defined.*",
    # Deprecations inside Ray and Lightning that their next releases resolve.
    r".*pkg_resources is deprecated.*",
    r".*is deprecated and will be removed.*",
    r".*The '.*' parameter is deprecated.*",
    # torch.distributed.checkpoint's notice that a single-process save/load runs without a process group.
    r".*torch.distributed is disabled, unavailable or uninitialized.*",
    r".*TypedStorage is deprecated.*",
)


def verbose() -> bool:
    """Whether the libraries' own logs go to the terminal (`--verbose` or BIOMEDGPT_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Set for this process and everything it starts (Ray's workers read the same variable)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def say(msg: str) -> None:
    """One progress line of the driver."""
    print(f"[biomedgpt] {msg}", flush=True)


def quiet_warnings() -> None:
    """Silence the warnings the platform's wiring of the libraries causes (unless --verbose), and
    Lightning's tips; does nothing to warnings from the user's own code or data."""
    if verbose():
        return
    for pattern in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # workers Ray starts from here
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # "GPU available: False", "Tip: ..."
    # transformers' "Writing model shards" bar on every export: our own line says what was exported.
    # The variable is read when huggingface_hub is imported; if it already was, switch the bars off there.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = sys.modules.get("huggingface_hub")
    if hub is not None and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        hub.utils.disable_progress_bars()
        hf_logging = sys.modules.get("transformers.utils.logging")
        if hf_logging is not None:
            hf_logging.disable_progress_bar()


def libraries_to_file(log_file: str | os.PathLike[str]) -> Path | None:
    """Send the libraries' log records (and Python warnings) to `log_file` instead of the terminal;
    returns the file, or None when --verbose keeps them on the terminal. Their levels are left as
    they are: the file holds what the terminal would have shown."""
    global _LOG_FILE
    if verbose():
        return None
    path = Path(log_file)
    _LOG_FILE = path
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
            elif isinstance(old, logging.FileHandler) and getattr(old, "_biomedgpt", False):
                logger.removeHandler(old)
                old.close()
        handler._biomedgpt = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    return path


def cluster_messages_to_logs() -> None:
    """Send the messages a Ray cluster pushes to its driver to the libraries' log file too.

    Ray's driver prints those from a thread of its own, straight to stdout and past every logging handler:
    "(raylet) Task ServeController.graceful_shutdown failed ... killed by `ray.kill`" each time Serve shuts
    down, worker-death notices and the like. Once a log file is chosen (`libraries_to_file`) and without
    --verbose, they go to the `ray` logger, i.e. to that file, instead; without a file they stay on the
    terminal. Ray keeps that printer in `ray._private.worker.print_to_stdstream` (Ray 2.x); a release that
    moves it leaves the messages where Ray prints them. Call it once Ray is imported (`session.ensure_ray`)."""
    worker = sys.modules.get("ray._private.worker")
    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_biomedgpt", False):
        return

    def printer(data: dict, ignore_prefix: bool = False, **kwargs):
        if _LOG_FILE is not None and not verbose() and data.get("pid") == "raylet":
            log = logging.getLogger("ray")
            for line in data.get("lines", []):
                log.warning("(raylet) %s", line)
            return None
        return original(data, ignore_prefix=ignore_prefix, **kwargs)

    printer._biomedgpt = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = printer


def reroute() -> Path | None:
    """Send the libraries' logs to the file `libraries_to_file` last chose, again: call it after importing
    a library that installs its own terminal handler (Ray Serve adds one to `ray.serve` when it is
    imported). Does nothing when no file was chosen or under --verbose."""
    if _LOG_FILE is None or verbose():
        return None
    return libraries_to_file(_LOG_FILE)


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A progress bar for long work: tqdm on a terminal, else (a log file, CI) one line per tenth of
    the total with the rate and the time left. `total` may be unknown (None): then a line per
    `every` items if given, else one every `interval_s` seconds (a count of records from a source
    of unknown size must not print a line per hundred of 183M sentences). Work done within `after_s`
    seconds prints no lines (its summary line is enough)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 stream: TextIO | None = None, every: int | None = None, interval_s: float = 30.0,
                 after_s: float = 2.0) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream or sys.stdout
        self.n = 0
        self.t0 = time.monotonic()
        self._bar: Any = None
        self._shown = 0  # the count of the last line printed
        self._every = every or (max(1, total // 10) if total else None)
        self._interval_s = interval_s
        self._after_s = after_s  # no lines for work done within this many seconds: its summary says it all
        self._last_t = self.t0
        self._postfix = ""
        if enabled and self.stream.isatty():
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=f"[biomedgpt] {desc}", unit=unit, leave=False,
                                 file=self.stream, dynamic_ncols=True)
            except ImportError:  # tqdm is a dependency of the libraries we use; lines if not there
                self._bar = None

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"[biomedgpt] {self.desc}: {done} {self.unit}s  {rate:.1f} {self.unit}s/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f"  ETA {clock((self.total - self.n) / rate)}"
        if self._postfix:
            text += f"  {self._postfix}"
        return text

    @property
    def interactive(self) -> bool:
        """Whether a live bar is drawn (a terminal); otherwise progress is lines."""
        return self._bar is not None

    def postfix(self, text: str) -> None:
        """Figures shown beside the bar (loss, samples/s), and at the end of each progress line."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.moveto(self.n + n)

    def moveto(self, n: int) -> None:
        """Set the count (a resumed run starts past zero; a retried one may go back)."""
        if not self.enabled:
            self.n = n
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
            self.n = n
            return
        self.n = n
        if self._every is None:  # unknown total: a line every interval_s
            now = time.monotonic()
            due = now - self._last_t >= self._interval_s
        else:
            due = n // self._every != self._shown // self._every or bool(self.total and n >= self.total)
        if n != self._shown and due and time.monotonic() - self.t0 >= self._after_s:
            self._shown = n
            self._last_t = time.monotonic()
            self.write(self.line())

    def write(self, text: str) -> None:
        """A line above the bar (or on its own without one)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
