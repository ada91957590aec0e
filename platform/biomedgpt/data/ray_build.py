"""Shard building fanned out to Ray tasks: ``build_shards(..., parallel=True)`` and
``biomedgpt shards build --ray``.

The driver plans every split (:func:`~biomedgpt.data.plan.plan_split`: records and image
references only, no pixels), then:

1. decides which shards to keep: a shard is kept when the previous manifest lists it with the same
   ``input_sha256`` and its file still has the recorded size and sha256. The sha256 checks run as Ray
   tasks (a restart of a big build re-reads every kept shard, in parallel, on the cluster); kept
   shards are never resubmitted for writing;
2. submits one Ray task per remaining shard (:func:`~biomedgpt.data.plan.write_planned_shard`: the
   task reads its images from the source and writes the tar straight to the output URL, so no image
   passes through the driver), at most ``workers`` in flight, shards of every split in one queue;
3. as tasks complete, records their manifest entries and rewrites each split's manifest
   (``complete: false``, entries in shard order, at most every ``manifest_interval_s`` seconds and
   whenever a split finishes), so an interrupted build restarts from what was finished;
4. when a split's shards are all done: deletes stale shards, writes the final manifest
   (``complete: true``).

With VQGAN codes (:class:`~biomedgpt.data.plan.CodesPlan`), step 2 is a Ray Data stage instead: the shards
to write are the rows of a dataset mapped by an actor pool (at most ``workers`` actors, a GPU each when the
cluster has GPUs, one CPU otherwise); each actor loads the tokenizer once, then per shard reads its images,
encodes them in batches and writes the tar with every image's ``codes.npy``; entries stream back to the
driver as shards finish, and are recorded as in step 3.

The shards and manifests are byte-identical to the single-process build's (same plan, same
deterministic writer). Progress is a bar of completed/total shards. A failed task stops new
submissions; the tasks in flight finish and are recorded, then the first error is raised. So do
records left out for unusable images beyond a split's error budget (:class:`~.plan.BadRecordsError`).

Output URLs must be reachable from every worker: ``s3://`` on a cluster, local paths on one machine
(or a shared file system). The driver's ``AWS_*`` variables are passed to the tasks, so an
S3-compatible endpoint configured for the driver is the one the workers write to.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..console import Progress
from . import storage
from .plan import (BadRecordsError, BuildResult, CodesPlan, ShardPlan, SplitPlan, finish_split, report_defects,
                   vqgan_tokenizer, write_planned_shard)
from .shards import Manifest, ShardEntry, ShardError, file_sha256, write_manifest

FORWARDED_ENV_PREFIXES = ("AWS_",)


@dataclass
class SplitJob:
    """One planned split: its plan, the manifest being built and the previous build's entries."""

    plan: SplitPlan
    manifest: Manifest
    old: dict[str, ShardEntry]
    entries: dict[int, ShardEntry] = field(default_factory=dict)
    written: int = 0
    kept: int = 0
    remaining: int = 0
    dirty: bool = False

    def sync_manifest(self) -> None:
        """The manifest's shard list = the finished entries in shard order."""
        self.manifest.shards = [self.entries[i] for i in sorted(self.entries)]


def _task_env() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised (``RayTaskError.cause``), or the error itself."""
    return getattr(err, "cause", None) or err


def write_splits_ray(jobs: list[SplitJob], result: BuildResult, *, workers: int | None = None,
                     progress: bool = True, manifest_interval_s: float = 2.0,
                     codes: CodesPlan | None = None) -> BuildResult:
    """Write the planned shards of ``jobs`` as Ray tasks; fills ``result`` (``{split: Manifest}``,
    ``written``/``kept``/``removed``) and returns it. See the module docstring for the steps."""
    import ray

    started_here = False
    if not ray.is_initialized():
        # RAY_ADDRESS's cluster, else a fresh local Ray (never the stale pointer of a dead head: session.ensure_ray)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) * 2)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        options = _task_env()
        write_task = ray.remote(num_cpus=1, max_retries=2)(write_planned_shard).options(**options)
        sha_task = ray.remote(num_cpus=1, max_retries=2)(file_sha256).options(**options)
        total = sum(len(job.plan.shards) for job in jobs)
        with Progress(total, "write shards", unit="shard", enabled=progress, stream=sys.stderr) as bar:
            to_write = _keep_existing(jobs, sha_task, workers, result, bar)
            if codes is None:
                _write_all(jobs, to_write, write_task, workers, result, bar, manifest_interval_s, progress)
            else:
                _record(jobs, _write_with_codes(to_write, codes, workers, options), {"stop": False}, result, bar,
                        manifest_interval_s, progress)
        for job in jobs:
            job.sync_manifest()
            result[job.plan.split] = finish_split(job.plan, job.manifest, result, job.written, job.kept, progress)
        return result
    finally:
        if started_here:
            ray.shutdown()


def _keep_existing(jobs: list[SplitJob], sha_task, workers: int, result: BuildResult, bar) -> deque:
    """Check the previous build's shards (sha256 in Ray tasks); returns the shards left to write."""
    candidates: list[tuple[SplitJob, ShardPlan, ShardEntry]] = []
    to_write: deque = deque()
    for job in jobs:
        storage.makedirs(job.plan.url)
        listing = storage.list_files(job.plan.url, recursive=False)
        job.remaining = len(job.plan.shards)
        for shard in job.plan.shards:
            old = job.old.get(shard.name)
            # a size mismatch or a missing file needs no hashing to be rebuilt
            if old is not None and old.input_sha256 == shard.input_sha256 and listing.get(shard.name) == old.bytes:
                candidates.append((job, shard, old))
            else:
                to_write.append((job, shard))
    checks = _bounded(candidates, lambda c: sha_task.remote(storage.join(c[0].plan.url, c[1].name)), workers)
    for (job, shard, old), outcome in checks:
        if isinstance(outcome, BaseException) or tuple(outcome) != (old.sha256, old.bytes):
            to_write.append((job, shard))
            continue
        job.entries[shard.index] = old
        job.kept += 1
        job.remaining -= 1
        result.kept.append(storage.join(job.plan.url, shard.name))
        bar.update(1)
    # write in plan order (split by split, shard by shard): the first shards of each split land first
    order = {id(job): i for i, job in enumerate(jobs)}
    return deque(sorted(to_write, key=lambda item: (order[id(item[0])], item[1].index)))


def _bounded(items: list, submit, limit: int):
    """Run ``submit(item)`` for every item with at most ``limit`` in flight; yields ``(item, result or
    exception)`` in completion order."""
    import ray

    pending = deque(items)
    in_flight: dict = {}
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            item = pending.popleft()
            in_flight[submit(item)] = item
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            item = in_flight.pop(ref)
            try:
                yield item, ray.get(ref)
            except Exception as err:  # the task's error, re-raised by ray.get
                yield item, err


class ShardCodesWriter:
    """The Ray Data actor of a build with codes: loads the VQGAN tokenizer once, then writes each shard of its
    batches (images encoded ``codes.batch_size`` at a time) and returns the manifest entries, or the error."""

    def __init__(self, codes: CodesPlan) -> None:
        import torch

        device = codes.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.codes = codes
        self.tokenizer = vqgan_tokenizer(codes.model_dir, device)

    def __call__(self, batch: dict) -> dict:
        entries, errors = [], []
        for blob, split_dir in zip(batch["plan"], batch["split_dir"]):
            try:
                entry = write_planned_shard(pickle.loads(blob), str(split_dir), self.codes, self.tokenizer)
                entries.append(pickle.dumps(entry))
                errors.append(b"")
            except Exception as err:  # noqa: BLE001 - returned to the driver, which records the rest and raises it
                entries.append(b"")
                errors.append(pickle.dumps(err))
        return {"slot": batch["slot"], "entry": entries, "error": errors}


def _write_with_codes(to_write: deque, codes: CodesPlan, workers: int, options: dict):
    """The shards of ``to_write`` through the Ray Data stage of :class:`ShardCodesWriter` (an actor pool of at
    most ``workers`` actors; one GPU each when the cluster has GPUs, then at most that many); yields
    ``((job, shard), entry or exception)`` as shards finish."""
    import ray

    items = list(to_write)
    if not items:
        return
    rows = [{"slot": i, "split_dir": job.plan.url, "plan": pickle.dumps(shard)} for i, (job, shard) in enumerate(items)]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = max(1, min(workers, len(rows), gpus or workers))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardCodesWriter, fn_constructor_kwargs={"codes": codes}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size), num_gpus=1 if gpus else 0, num_cpus=1,
        **({"runtime_env": options["runtime_env"]} if options.get("runtime_env") else {}))
    for row in ds.iter_rows():
        outcome = pickle.loads(row["error"]) if len(row["error"]) else pickle.loads(row["entry"])
        yield items[int(row["slot"])], outcome


def _write_all(jobs: list[SplitJob], to_write: deque, write_task, workers: int, result: BuildResult, bar,
               manifest_interval_s: float, progress: bool = False) -> None:
    """The shards of ``to_write`` as Ray tasks, at most ``workers`` in flight; a failure stops new submissions."""
    import ray

    state = {"stop": False}

    def outcomes():
        pending = to_write
        in_flight: dict = {}
        while (pending and not state["stop"]) or in_flight:
            while pending and not state["stop"] and len(in_flight) < workers:
                item = pending.popleft()
                job, shard = item
                in_flight[write_task.remote(shard, job.plan.url)] = item
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                item = in_flight.pop(ref)
                try:
                    yield item, ray.get(ref)
                except Exception as err:  # the task's error
                    yield item, _cause(err)

    _record(jobs, outcomes(), state, result, bar, manifest_interval_s, progress)


def _record(jobs: list[SplitJob], outcomes, state: dict, result: BuildResult, bar, manifest_interval_s: float,
            progress: bool) -> None:
    """Record shard outcomes ``((job, shard), entry or exception)`` as they come: entries into the manifests
    (rewritten at most every ``manifest_interval_s``, and when a split finishes), defects against each
    split's budget; the first failure sets ``state["stop"]`` (no new submissions) and is raised at the end."""
    first_error: tuple[str, BaseException] | None = None
    over_budget: BadRecordsError | None = None
    last_write = 0.0
    named = {id(job): len(job.plan.defects) for job in jobs}
    for job in jobs:  # kept shards bring the records their first build skipped
        if any(e.skipped for e in job.entries.values()):
            try:
                job.plan.check_budget(job.entries.values())
            except BadRecordsError as err:
                over_budget = over_budget or err
    state["stop"] = over_budget is not None

    def flush(force: bool = False) -> None:
        nonlocal last_write
        if not force and time.monotonic() - last_write < manifest_interval_s:
            return
        for job in jobs:
            if job.dirty:
                job.sync_manifest()
                write_manifest(job.plan.url, job.manifest)
                job.dirty = False
        last_write = time.monotonic()

    for (job, shard), outcome in outcomes:
        url = storage.join(job.plan.url, shard.name)
        if isinstance(outcome, BaseException):  # a failed shard: stop submitting, let the others finish
            if first_error is None:
                first_error = (url, outcome)
            state["stop"] = True
            continue
        entry = outcome
        job.entries[shard.index] = entry
        job.written += 1
        job.remaining -= 1
        job.dirty = True
        result.written.append(url)
        bar.update(1)
        if entry.skipped:
            new = job.plan.all_defects([entry])[len(job.plan.defects):]
            report_defects(job.plan.dataset, job.plan.split, new, progress, already=named[id(job)])
            named[id(job)] += len(new)
            try:
                job.plan.check_budget(job.entries.values())
            except BadRecordsError as err:  # stop submitting; the manifests keep what was written
                over_budget = over_budget or err
                state["stop"] = True
        flush(force=job.remaining == 0)
    flush(force=True)
    if over_budget is not None and first_error is None:
        raise over_budget
    if first_error is not None:
        url, cause = first_error
        print(f"shard build stopped: {url} failed; finished shards are recorded, rerun to continue", file=sys.stderr)
        raise ShardError(f"{url}: {type(cause).__name__}: {cause}") from cause
