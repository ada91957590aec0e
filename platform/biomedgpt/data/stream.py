"""Per-rank training streams with a resumable position, that skip and count bad data.

Each epoch has a plan computed identically on every rank from (seed, epoch): the shards of every
training dataset, repeated or cut by the dataset's mixing weight, in a seeded random order; shard i of
the plan goes to rank i % world. Every rank yields the same number of batches per epoch, so collective
steps never deadlock. A rank reads its shards with Ray Data (in plan order, from any storage URL:
local, file:// or s3:// through a pyarrow filesystem), decodes and tokenizes them with
`preprocess_batch`, shuffles rows within fixed windows of good rows, and batches.

Bad data: a record whose preprocessing fails (undecodable image, a field its task needs is missing,
invalid JSON) is skipped and counted with its dataset, shard and key; a shard that cannot be read to
its end (truncated or corrupt tar, missing file) has its remaining samples counted as lost, with the
shard and the last key read named. Each rank tolerates an error budget per epoch
(:class:`ErrorBudget`: at most `max_bad_samples` and/or `max_bad_fraction` of its planned rows);
past it the stream raises :class:`BadDataError` naming the shard and key. The budget is also what
keeps ranks equal: batches per epoch are planned from each rank's manifest rows minus its budget
(the smallest rank decides), so a rank that skipped up to its budget still has the rows for its
batches (windows are filled with the next good rows).

The position is (epoch, batches yielded in that epoch), the same on every rank, plus (only when bad
rows moved it) the raw row offset where the current window starts (`rows`; per rank when gathered).
Resuming skips the shards the position has fully consumed without reading them (shard level) and the
consumed rows of the partly read shard, so no sample is read twice or dropped within an epoch (beyond
the tail every epoch drops so that ranks stay equal).

Elastic resume (:class:`ElasticStream`): a run keeps the epoch plan of the worker count it started with,
its data world N, whatever the number M of workers it continues on. The global batch of every step is
the N plan ranks' batches of that step, in rank order; compute rank j of M takes its equal share of
those rows (the whole batches of some plan ranks and/or a slice of one), so each step trains exactly the
samples the N-rank run would have, and epochs cover what the N-rank plan covers. Only the global batch
(N x batch_size) must divide by M.

Memory does not grow with the data: Ray Data may hold at most `buffer_bytes` of preprocessed rows in
the object store ahead of the rank (default: 256 MiB per cluster CPU, 512 MiB to 4 GiB). The reading is
one Ray Data map operator, one task per shard read (`read_and_preprocess`), so reads spread over the
CPUs and each task's output is one shard's rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import storage
from .error_budget import ErrorBudget
from .pipeline import preprocess_batch
from .shards import ShardError, iter_tar_samples, manifest_url, read_manifest, read_shard, split_url

log = logging.getLogger(__name__)

#: Members of a shard sample the reader hands to preprocessing (absent ones are None).
MEMBERS = ("json", "jpg", "png", "codes.npy")
#: Rows read per output batch of a shard read (a shard streams through in pieces of this many).
READ_CHUNK = 32


@dataclass(frozen=True)
class ShardInfo:
    url: str
    dataset: str
    split: str
    samples: int
    bytes: int = 0  # the manifest's size of the file (0: unknown)


def list_shards(shards_root: str, dataset: str, split: str) -> list[ShardInfo]:
    """The shards of one split, from its manifest (an incomplete build is refused). Every shard is a file of
    the manifest's own folder: the manifest's names are file names (read_manifest refuses others), and a
    local shard that is a symlink leading out of that folder is refused, naming the manifest and the entry."""
    url = split_url(shards_root, dataset, split)
    manifest = read_manifest(url)
    if not manifest.complete:
        raise ValueError(f"{url}: the shard build of {dataset}/{split} is incomplete; rerun `biomedgpt shards build`")
    folder = os.path.realpath(storage.local_path(url)) if storage.is_local(url) else None
    out = []
    for i, e in enumerate(manifest.shards):
        shard = storage.join(url, e.name)
        if folder is not None and os.path.dirname(real := os.path.realpath(storage.local_path(shard))) != folder:
            raise ShardError(f"{manifest_url(url)}: field 'shards[{i}].name': {e.name!r} resolves to {real}, outside "
                             f"the manifest's folder {folder}: a shard must be a file of that folder (a symlink may "
                             "not lead elsewhere)")
        if e.samples:
            out.append(ShardInfo(shard, dataset, split, e.samples, e.bytes))
    return out


def records(shards_root: str, dataset: str, split: str) -> Iterator[dict[str, Any]]:
    """The decoded records of one split, shard by shard: the json fields, plus `_image` (the image bytes,
    None for text records) and, for image infilling, the VQGAN `codes` (.npy bytes) when the sample has them."""
    for shard in list_shards(shards_root, dataset, split):
        for sample in read_shard(shard.url):
            rec = json.loads(sample["json"])
            rec["_image"] = sample.get("jpg") or sample.get("png")
            if sample.get("codes.npy") is not None and "codes" not in rec:
                rec["codes"] = sample["codes.npy"]
            yield rec


class BadDataError(RuntimeError):
    """More bad samples than the error budget allows (the message names the shard, the key and the
    counts by shard)."""


def plan_epoch(groups: Sequence[tuple[Sequence[ShardInfo], float]], epoch: int, seed: int) -> list[ShardInfo]:
    """The epoch's shard sequence: each dataset's shards taken `weight` times (a fractional part takes a
    rotating slice of its shards, so over epochs every shard is used), then shuffled by (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    plan: list[ShardInfo] = []
    for shards, weight in groups:
        if not shards:
            continue
        whole, frac = int(weight), weight - int(weight)
        plan += list(shards) * whole
        extra = int(round(frac * len(shards)))
        if extra:
            start = (epoch * extra) % len(shards)
            plan += [shards[(start + i) % len(shards)] for i in range(extra)]
    rng.shuffle(plan)
    return plan


def rank_shards(plan: Sequence[ShardInfo], rank: int, world: int) -> list[ShardInfo]:
    return list(plan[rank::world])


def rank_reads(shards: Sequence[ShardInfo], epoch: int, start: int = 0) -> tuple[list[_Read], int]:
    """A rank's shard reads of one epoch (`shards`: its shards in plan order) from raw row `start` of
    its rows on: the shards wholly before `start` are left out unread, the first read is of the shard
    holding row `start`; with the rows of that shard to skip. Each read carries the offset of its first
    row in the rank's rows, so the reads cover rows [start, planned) exactly. O(shards), whatever the
    samples or the position."""
    first, skip = 0, start
    while first < len(shards) and skip >= shards[first].samples:
        skip -= shards[first].samples
        first += 1
    reads, offset = [], start - skip
    for sh in shards[first:]:
        reads.append(_Read(sh, epoch, offset))
        offset += sh.samples
    return reads, skip


def batches_per_epoch(plan: Sequence[ShardInfo], world: int, batch_size: int,
                      budget: ErrorBudget | None = None) -> int:
    """Batches every rank yields this epoch: min over ranks of (planned rows - error allowance) //
    batch_size, so that every rank within its error budget has the rows for them."""
    budget = budget or ErrorBudget()
    per_rank = [sum(s.samples for s in rank_shards(plan, r, world)) for r in range(world)]
    return min((n - budget.allowance(n)) // batch_size for n in per_rank) if per_rank else 0


# -- the Ray Data side: read shards, preprocess rows (run in Ray worker processes) -----------------


def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _chunk(rows: list[dict[str, Any]], read: int, first_row: int, augment_seed: int) -> dict[str, np.ndarray]:
    n = len(rows)
    out = {"__key__": _column([r["__key__"] for r in rows]),
           "__read__": np.full(n, read, dtype=np.int64),
           "__row__": np.arange(first_row, first_row + n, dtype=np.int64),
           "__augment_seed__": np.full(n, augment_seed, dtype=np.int64)}
    for m in MEMBERS:
        out[m] = _column([r.get(m) for r in rows])
    return out


def read_shards_batch(batch: dict[str, np.ndarray], *, filesystem: Any, chunk: int = READ_CHUNK
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: for each shard read of `batch` (columns path, read, bytes, augment_seed), its
    samples in chunks of raw rows tagged with the read's index and the row's index in the shard.

    A shard that fails part-way (truncated or corrupt tar, vanished file) stops there without failing
    the pipeline: the stream counts its missing rows as lost and names the shard. When the file is
    shorter than its manifest says and the archive still ended cleanly (cut at a member boundary),
    its last sample may be incomplete and is left out too."""
    for path, read, expected_bytes, aug_seed in zip(batch["path"], batch["read"], batch["bytes"],
                                                    batch["augment_seed"]):
        path, read = str(path), int(read)
        rows: list[dict[str, Any]] = []
        emitted = 0
        try:
            size = filesystem.get_file_info(path).size
            with filesystem.open_input_stream(path, buffer_size=1 << 20) as stream:
                for sample in iter_tar_samples(stream):
                    rows.append(sample)
                    if len(rows) > chunk:  # keep one sample back: it is complete only if another follows
                        yield _chunk(rows[:chunk], read, emitted, int(aug_seed))
                        emitted += chunk
                        rows = rows[chunk:]
            if expected_bytes and size is not None and size < int(expected_bytes) and rows:
                log.warning("%s: %d bytes, the manifest says %d: leaving out its last sample %r (maybe incomplete)",
                            path, size, int(expected_bytes), rows[-1]["__key__"])
                rows = rows[:-1]
        except Exception as err:  # noqa: BLE001 - any read failure loses the rest of this shard only
            log.warning("%s: read stopped after %d samples: %s: %s", path, emitted + len(rows), type(err).__name__, err)
        if rows:
            yield _chunk(rows, read, emitted, int(aug_seed))


def _take_rows(batch: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, np.ndarray]:
    index = np.asarray(rows, dtype=np.int64)
    return {k: v[index] for k, v in batch.items()}


def preprocess_rows(batch: dict[str, np.ndarray], **preprocess: Any) -> dict[str, np.ndarray]:
    """Ray Data UDF: `preprocess_batch` over raw rows, where a row that fails (undecodable image,
    missing field, invalid JSON ...) does not fail the batch: it comes out zero-filled with its error
    text in the `error` column, and the stream skips and counts it. The read/row/key columns pass
    through for the stream's accounting.

    A failing batch is retried row by row to find the bad rows, then the good rows are processed
    together again (so batch-level context, e.g. the other rows' captions, stays that of good rows)."""
    meta = {k: batch[k] for k in ("__read__", "__row__", "__key__")}
    raw = {k: v for k, v in batch.items() if k not in meta}
    n = len(meta["__key__"])
    errors = np.full(n, "", dtype=object)
    try:
        out = preprocess_batch(raw, **preprocess)
    except Exception:  # noqa: BLE001 - find the rows that fail
        for i in range(n):
            try:
                preprocess_batch(_take_rows(raw, [i]), **preprocess)
            except Exception as err:  # noqa: BLE001
                errors[i] = f"{type(err).__name__}: {err}"
        good = np.flatnonzero(errors == "")
        try:
            sub = preprocess_batch(_take_rows(raw, good), **preprocess)
        except Exception as err:  # noqa: BLE001 - rows that fail only together
            errors[good] = f"{type(err).__name__}: {err}"
            good = good[:0]
            sub = preprocess_batch(_take_rows(raw, good), **preprocess)
        out = {k: np.zeros((n,) + v.shape[1:], dtype=v.dtype) for k, v in sub.items()}
        for k, v in sub.items():
            out[k][good] = v
    out["error"] = errors
    out.update(meta)
    return out


def read_and_preprocess(batch: dict[str, np.ndarray], *, filesystem: Any, preprocess: dict[str, Any]
                        ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: `read_shards_batch` then `preprocess_rows` chunk by chunk, in one task per shard read."""
    for chunk in read_shards_batch(batch, filesystem=filesystem):
        yield preprocess_rows(chunk, **preprocess)


# -- the rank side ------------------------------------------------------------------------------


@dataclass
class _Read:
    """One shard read of an execution: the shard, its epoch and the raw offset of its first row in the
    rank's sequence of rows for that epoch."""

    shard: ShardInfo
    epoch: int
    offset: int
    delivered: int = 0
    last_key: str | None = None


@dataclass
class _Summary:
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def _reason(message: str) -> str:
    """A short class of an error text (its exception type or first words), for counts by reason."""
    head = message.split(":", 1)[0].strip()
    return head if head and len(head) <= 40 and " " not in head else "error"


class ShardStream:
    """Endless per-rank stream of training batches (dicts of numpy arrays or torch tensors) with a
    resumable `position` and counters of the bad samples it skipped (`data_errors()`)."""

    MAX_EXAMPLES = 5  # example keys kept per shard in the report

    def __init__(self, groups: Sequence[tuple[Sequence[ShardInfo], float]], *, rank: int, world: int,
                 batch_size: int, seed: int, preprocess: dict[str, Any], columns: Sequence[str],
                 shuffle_buffer: int = 256, as_torch: bool = True, min_rows_per_read: int = 4096,
                 error_budget: ErrorBudget | dict[str, Any] | None = None, buffer_bytes: int | None = None,
                 max_batches: int | None = None) -> None:
        self.groups = [(list(s), float(w)) for s, w in groups]
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.seed = seed
        self.preprocess = preprocess
        self.columns = list(columns)
        self.shuffle_buffer = shuffle_buffer
        self.as_torch = as_torch
        self.min_rows_per_read = min_rows_per_read
        self.budget = error_budget if isinstance(error_budget, ErrorBudget) else ErrorBudget.from_config(error_budget)
        self.buffer_bytes = buffer_bytes
        # the batches the consumer will take from the run's start (a training run's steps x accumulation): no
        # Ray Data execution reads epochs past them (the stream still goes on if asked for more)
        self.max_batches = max_batches
        self.last_dataset: Any = None  # the Ray Data dataset of the latest read (for its stats())
        self.epoch = 0
        self.batches_in_epoch = 0
        self._window_rows: int | None = None  # raw offset of the current window when bad rows moved it
        self._bad: dict[tuple[int, int], tuple[int, str, str]] = {}  # (epoch, offset) -> (count, shard, key)
        self._summary: dict[tuple[str, str], _Summary] = {}
        # the position after each of the last batches handed out (a consumer may fetch ahead of what it
        # has used: Lightning prefetches one batch): batches yielded since the start or the last seek
        self._yielded = 0
        self._after: deque[tuple[int, dict[str, int]]] = deque([(0, self.position)], maxlen=16)
        plan = plan_epoch(self.groups, 0, seed)
        if len(plan) < world:
            names = sorted({f"{s.dataset}/{s.split}" for s in plan})
            raise ValueError(f"{', '.join(names)}: {len(plan)} shard(s) per epoch for {world} training ranks; every "
                             "rank reads whole shards: rebuild with smaller shards (data.shard_max_samples, or "
                             "`biomedgpt shards build --shard-max-samples`)")
        if batches_per_epoch(plan, world, batch_size, self.budget) < 1:
            total = sum(s.samples for s in plan)
            raise ValueError(f"{total} training samples over {world} rank(s) give no batch of {batch_size} per rank; "
                             "lower trainer.batch_size or add data")

    # -- position ------------------------------------------------------------------------------

    @property
    def window(self) -> int:
        return max(1, self.shuffle_buffer // self.batch_size) * self.batch_size

    @property
    def position(self) -> dict[str, int]:
        pos = {"epoch": self.epoch, "batches": self.batches_in_epoch}
        w_index = self.batches_in_epoch // (self.window // self.batch_size)
        if self._window_rows is not None and self._window_rows != w_index * self.window:
            pos["rows"] = self._window_rows
        return pos

    @property
    def window_start(self) -> int:
        """The raw row of this rank's rows in the current epoch where its current shuffle window starts:
        where reading resumes (the rows before it were consumed; the batches the window already gave
        are re-read and skipped)."""
        if self._window_rows is not None:
            return self._window_rows
        return self.batches_in_epoch // (self.window // self.batch_size) * self.window

    def batches_from_start(self) -> int:
        """Batches this rank's stream has taken from the run's start to its position."""
        done = sum(batches_per_epoch(plan_epoch(self.groups, e, self.seed), self.world, self.batch_size, self.budget)
                   for e in range(self.epoch))
        return done + self.batches_in_epoch

    def seek(self, position: dict[str, Any]) -> None:
        """Continue from `position` (this rank's, or a gathered one with `rows_by_rank`)."""
        self.epoch = int(position["epoch"])
        self.batches_in_epoch = int(position["batches"])
        rows = position.get("rows")
        by_rank = position.get("rows_by_rank")
        if by_rank is not None:
            rows = by_rank[self.rank] if len(by_rank) == self.world else None
        self._window_rows = None if rows is None else int(rows)
        self._yielded = 0
        self._after = deque([(0, self.position)], maxlen=16)

    def position_after(self, batches: int) -> dict[str, int]:
        """The position right after the `batches`-th batch this stream handed out since it was built or
        last sought: what to save when the consumer has used only that many of the batches it fetched (a
        checkpoint taken while the next batch is already prefetched must not skip that batch on resume)."""
        for count, position in self._after:
            if count == batches:
                return dict(position)
        raise ValueError(f"no position after batch {batches}: the stream has handed out {self._yielded} batches "
                         f"and remembers the last {len(self._after) - 1}")

    # -- bad data ------------------------------------------------------------------------------

    @property
    def bad_samples(self) -> int:
        """Bad samples this rank counted (its share of the run's total, restored ones included)."""
        return sum(s.count for s in self._summary.values())

    def data_errors(self, since_epoch: int | None = None) -> dict[str, Any]:
        """This rank's counts as a JSON-able report (see `merge_data_errors`), with the bad rows already
        counted in the epochs from `since_epoch` on (default: the current one; a checkpoint's position may
        be an epoch behind a stream that fetched ahead), which a resume from there re-reads."""
        since = self.epoch if since_epoch is None else since_epoch
        return {"bad_samples": self.bad_samples,
                "shards": [{"dataset": ds, "shard": url, "count": s.count, "reasons": dict(s.reasons),
                            "examples": list(s.examples)} for (ds, url), s in sorted(self._summary.items())],
                "pending": [[self.rank, e, o, c] for (e, o), (c, _, _) in sorted(self._bad.items()) if e >= since]}

    def restore_data_errors(self, state: dict[str, Any] | None, *, keep_counts: bool) -> None:
        """Continue counting from a merged report (from a checkpoint). Every rank takes the bad rows of the
        current epochs it had already counted (so re-reading them does not count them twice); only one
        rank (`keep_counts`) takes the totals, so that the ranks' counts still add up."""
        if not state:
            return
        for rank, e, o, c in state.get("pending", []):
            if int(rank) == self.rank:
                self._bad[(int(e), int(o))] = (int(c), "", "")
        if keep_counts:
            for item in state.get("shards", []):
                s = self._summary.setdefault((item["dataset"], item["shard"]), _Summary())
                s.count += int(item["count"])
                for k, v in item.get("reasons", {}).items():
                    s.reasons[k] = s.reasons.get(k, 0) + int(v)
                s.examples = (s.examples + list(item.get("examples", [])))[: self.MAX_EXAMPLES]

    def _count_bad(self, read: _Read, offset: int, count: int, key: str, message: str, allowance: dict[int, int]) -> None:
        ident = (read.epoch, offset)
        if ident in self._bad:
            return  # counted before a resume
        self._bad[ident] = (count, read.shard.url, key)
        s = self._summary.setdefault((read.shard.dataset, read.shard.url), _Summary())
        s.count += count
        reason = _reason(message)
        s.reasons[reason] = s.reasons.get(reason, 0) + count
        if len(s.examples) < self.MAX_EXAMPLES:
            s.examples.append(f"{key}: {message}")
        log.warning("skipped bad data: %s/%s %s key %s: %s", read.shard.dataset, read.shard.split, read.shard.url,
                    key, message)
        in_epoch = sum(c for (e, _), (c, _, _) in self._bad.items() if e == read.epoch)
        limit = allowance.get(read.epoch, 0)
        if in_epoch > limit:
            by_shard = "; ".join(f"{url}: {s.count}" for (_, url), s in sorted(self._summary.items()))
            raise BadDataError(
                f"bad training data over the error budget: rank {self.rank} met {in_epoch} bad sample(s) in epoch "
                f"{read.epoch}, more than the {limit} its budget allows ({self.budget.describe()}; set "
                f"data.max_bad_samples / data.max_bad_fraction to tolerate more). Last: dataset {read.shard.dataset}, "
                f"shard {read.shard.url}, key {key!r}: {message}. Bad samples by shard: {by_shard}")

    # -- reading -------------------------------------------------------------------------------

    def _read(self, shards: Sequence[ShardInfo], epochs: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
        """Preprocessed rows (good and flagged) of `shards`, in order, as numpy batches (one Ray Data
        execution), each row tagged with its read index and its row index in the shard."""
        import ray.data  # Ray reads its environment when imported: not before the session set it up

        if not shards:
            return
        fs, _ = storage.pyarrow_filesystem(shards[0].url)
        items = [{"path": storage.pyarrow_path(s.url), "read": i, "bytes": s.bytes,
                  "augment_seed": _augment_seed(self.seed, e)} for i, (s, e) in enumerate(zip(shards, epochs))]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # plan order is what the position refers to
        # Streaming: bound what Ray Data may hold in the object store ahead of this rank's consumption
        # (by default it runs ahead up to a fraction of the whole store, so memory grew with the data).
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=self.buffer_bytes or default_buffer_bytes())
        # The pipeline is one map operator: Ray Data's per-operator reservation would hold half of the CPUs and
        # of the buffer back for operators that do not exist (on 2 CPUs: one read task at a time).
        ctx.op_resource_reservation_enabled = False
        idle = idle_yield_callback()
        if idle not in ctx.custom_execution_callback_classes:
            ctx.custom_execution_callback_classes.append(idle)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # One UDF, one shard read per task: two chained map_batches would fuse into one operator that bundles
        # as many input rows (shard reads) per task as the larger batch size, i.e. every read into one task.
        ds = ds.map_batches(read_and_preprocess, batch_size=1, batch_format="numpy",
                            fn_kwargs={"filesystem": fs, "preprocess": self.preprocess})
        self.last_dataset = ds  # its .stats() tell how the latest read ran
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")

    def _emit(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.batches_in_epoch += 1
        self._yielded += 1
        self._after.append((self._yielded, self.position))
        if not self.as_torch:
            return batch
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, forever.

        Rows are shuffled within fixed windows of `window` good rows (a multiple of the batch size),
        each permuted by (seed, epoch, rank, window index): the position (batches done, and the raw row
        where the window starts when bad rows moved it) names a window and an offset in it, so a resumed
        stream yields exactly the batches the interrupted one had not. Short epochs are read several at
        a time (at least `min_rows_per_read` rows per Ray Data execution) so that small datasets do not
        pay a pipeline start-up every few steps, but never past the epoch holding batch `max_batches`: a
        short run on a small dataset would otherwise decode dozens of epochs it never trains on.
        """
        window = self.window
        per_window = window // self.batch_size
        while True:
            epochs, rows, grouped = [], 0, 0
            e = self.epoch
            left = None if self.max_batches is None else self.max_batches - self.batches_from_start()
            # (grouped <= left: the consumer may fetch one batch past its last, as Lightning does)
            while not epochs or (rows < self.min_rows_per_read and len(epochs) < 1000
                                 and (left is None or grouped <= left)):
                plan = plan_epoch(self.groups, e, self.seed)
                mine = rank_shards(plan, self.rank, self.world)
                per_epoch = batches_per_epoch(plan, self.world, self.batch_size, self.budget)
                epochs.append((e, per_epoch, mine))
                rows += sum(sh.samples for sh in mine)
                grouped += per_epoch - (self.batches_in_epoch if e == self.epoch else 0)
                e += 1
            allowance = {ep: self.budget.allowance(sum(sh.samples for sh in mine)) for ep, _, mine in epochs}
            # Resume inside the first epoch: skip its consumed windows, whole shards unread.
            w_index = self.batches_in_epoch // per_window
            start_rows = self.window_start
            reads, skip_rows = rank_reads(epochs[0][2], epochs[0][0], start_rows)
            for ep, _, mine in epochs[1:]:
                reads += rank_reads(mine, ep)[0]
            reader = _RowReader(self._read([r.shard for r in reads], [r.epoch for r in reads]), self.columns, reads,
                                lambda *a: self._count_bad(*a, allowance))
            reader.skip(skip_rows)
            for i, (epoch, per_epoch, mine) in enumerate(epochs):
                planned = sum(sh.samples for sh in mine)
                if i == 0:
                    consumed = start_rows
                    skip_in_window = self.batches_in_epoch % per_window
                else:
                    w_index, skip_in_window, consumed = 0, 0, 0
                    self._window_rows = None
                while self.batches_in_epoch < per_epoch:
                    # good rows this window may take: the rows left minus the bad ones the budget still allows
                    bad_so_far = consumed - w_index * window
                    n = min(window, planned - consumed - max(0, allowance[epoch] - bad_so_far))
                    if n < self.batch_size:
                        raise RuntimeError(f"rank {self.rank} ran out of rows in epoch {epoch} before its {per_epoch} "
                                           "batches; a shard holds fewer samples than its manifest says")
                    self._window_rows = consumed if consumed != w_index * window else None
                    parts, raw = reader.take(n)
                    starts = np.cumsum([0] + [len(p[self.columns[0]]) for p in parts])
                    order = np.random.default_rng([self.seed, epoch, self.rank, w_index]).permutation(n)
                    last = n // self.batch_size - 1
                    for j in range(skip_in_window, last + 1):
                        if self.batches_in_epoch >= per_epoch:
                            break
                        if j == last and n == window:  # the position after this batch names the next window
                            nxt = consumed + raw
                            self._window_rows = nxt if nxt != (w_index + 1) * window else None
                        # a batch's rows in window order: one copy each, straight from the blocks Ray delivered
                        sel = np.sort(order[j * self.batch_size:(j + 1) * self.batch_size])
                        yield self._emit(_gather(parts, starts, sel, self.columns))
                    consumed += raw
                    w_index += 1
                    skip_in_window = 0
                reader.skip(planned - consumed)  # the tail every rank drops so that ranks stay equal
                self.epoch, self.batches_in_epoch, self._window_rows = epoch + 1, 0, None
                # the epoch just ended stays: a checkpoint taken before the batch fetched ahead resumes in it
                self._bad = {k: v for k, v in self._bad.items() if k[0] >= self.epoch - 1}


def _gather(parts: Sequence[dict[str, np.ndarray]], starts: np.ndarray, rows: np.ndarray, columns: Sequence[str]
            ) -> dict[str, np.ndarray]:
    """Rows `rows` (sorted indices into the concatenation of `parts`, whose first rows are at `starts`) of
    every column, copied once into new contiguous arrays."""
    which = np.searchsorted(starts, rows, side="right") - 1
    cuts = np.flatnonzero(np.diff(which)) + 1
    runs = list(zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]])))
    out = {}
    for c in columns:
        first = parts[which[0]][c]
        arr = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
        for a, b in runs:
            p = which[a]
            np.take(parts[p][c], rows[a:b] - starts[p], axis=0, out=arr[a:b])
        out[c] = arr
    return out


IDLE_STEP_S = 0.002  # a scheduling step this short waited on no task
IDLE_PAUSE_S = 0.01
_IDLE_CALLBACK: type | None = None


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def idle_yield_callback() -> type:
    """A Ray Data execution callback that lets the streaming executor's thread sleep between scheduling
    steps that waited on nothing.

    The executor runs in the process that iterates the dataset: here, the training worker. Its loop blocks
    (in `ray.wait`) only until a task is ready; when the read tasks have finished but their output is held
    back by the buffer limit (a run that reads many epochs ahead), `ray.wait` returns at once, step after
    step, until the consumer has taken enough: the loop spins, holding the GIL. The training thread
    releases the GIL in every torch op and then waits for it up to the interpreter's switch interval
    (5 ms) each time: steps ran 4x slower for whole runs (BENCHMARKS.md, train_overhead's two modes).
    Sleeping 10 ms after such a step gives the GIL back; a read that could start waits that long at most."""
    global _IDLE_CALLBACK
    if _IDLE_CALLBACK is None:
        from ray.data._internal.execution.execution_callback import ExecutionCallback

        class YieldWhenIdle(ExecutionCallback):
            def __init__(self) -> None:
                self._last = 0.0

            def on_execution_step(self, executor: Any) -> None:
                now = time.perf_counter()
                if now - self._last < IDLE_STEP_S:
                    _pause(IDLE_PAUSE_S)
                self._last = time.perf_counter()

        _IDLE_CALLBACK = YieldWhenIdle
    return _IDLE_CALLBACK


def default_buffer_bytes() -> int:
    """Object-store bytes a rank's reading may run ahead: 256 MiB per CPU of the Ray cluster (room for
    each concurrent read/preprocess task's output), at least 512 MiB and at most 4 GiB."""
    import ray  # see _read

    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    return min(4 << 30, max(512 << 20, (256 << 20) * cpus))


def _augment_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's training augmentations (mixed with each sample's id in preprocessing)."""
    digest = hashlib.blake2b(f"augment:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _RowReader:
    """Takes good rows and skips raw rows, in exact numbers, from a stream of preprocessed numpy batches
    whose rows are tagged with their shard read (`__read__`) and row index in it (`__row__`).

    Raw rows are the rows the manifests plan: good rows, flagged rows (`error` set) and the rows a shard
    read did not deliver (lost). Bad ones take their place in the raw sequence, so windows and skips stay
    exact, and are reported through `on_bad(read, offset, count, key, message)` when the stream reaches
    them."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], columns: Sequence[str], reads: Sequence[_Read],
                 on_bad: Callable[..., None]) -> None:
        self.batches = batches
        self.columns = list(columns)
        self.reads = list(reads)
        self.on_bad = on_bad
        self.current = 0  # the read whose rows arrive now
        self.ended = False
        # segments in raw order: [raw count, dict of good rows or None for bad rows, bad-row event or None]
        self.pending: deque[list[Any]] = deque()

    def _finish(self, upto: int) -> None:
        """Account for the reads before `upto` that delivered fewer rows than planned."""
        while self.current < upto:
            read = self.reads[self.current]
            missing = read.shard.samples - read.delivered
            if missing > 0:
                self.pending.append([missing, None, (read, read.offset + read.delivered, missing,
                                                     f"{read.last_key}+" if read.last_key else "<start>",
                                                     self._lost_message(read, missing))])
            self.current += 1

    @staticmethod
    def _lost_message(read: _Read, missing: int) -> str:
        url = read.shard.url
        try:
            size = storage.size(url)
            found = f"the file has {size} bytes" + (f", its manifest {read.shard.bytes}" if read.shard.bytes else "")
        except FileNotFoundError:
            found = "the file is missing"
        except Exception as err:  # noqa: BLE001 - the message is best effort
            found = f"its size could not be read ({type(err).__name__}: {err})"
        after = f"after key {read.last_key!r}" if read.last_key else "before its first sample"
        return (f"ShardReadError: read {read.delivered} of the {read.shard.samples} samples its manifest lists, "
                f"stopping {after} ({found}: truncated, corrupt or missing tar; `biomedgpt shards verify` "
                f"checks it); the remaining {missing} counted as lost")

    def _fill(self) -> None:
        if self.ended:
            raise RuntimeError("the shards ended before the rows their manifests list; a shard holds fewer "
                               "samples than its manifest says")
        try:
            batch = next(self.batches)
        except StopIteration:
            self._finish(len(self.reads))
            self.ended = True
            return
        reads, rows, keys = batch["__read__"], batch["__row__"], batch["__key__"]
        errors = batch.get("error")
        good = np.ones(len(reads), dtype=bool) if errors is None else np.array([not e for e in errors], dtype=bool)
        start = 0
        for i in range(len(reads)):
            r = int(reads[i])
            if r != self.current:
                self._flush(batch, good, start, i)
                start = i
                self._finish(r)
            read = self.reads[r]
            if int(rows[i]) != read.delivered or read.delivered >= read.shard.samples:
                raise RuntimeError(f"{read.shard.url}: holds more samples than the {read.shard.samples} its manifest "
                                   "lists (or rows arrived out of order); rebuild the split or run "
                                   "`biomedgpt shards verify`")
            read.delivered += 1
            read.last_key = str(keys[i])
            if not good[i]:
                self._flush(batch, good, start, i)
                start = i + 1
                self.pending.append([1, None, (read, read.offset + int(rows[i]), 1, str(keys[i]), str(errors[i]))])
        self._flush(batch, good, start, len(reads))

    def _flush(self, batch: dict[str, np.ndarray], good: np.ndarray, start: int, stop: int) -> None:
        """Queue the good rows start:stop of a batch (all good by construction) as one segment."""
        if stop > start:
            self.pending.append([stop - start, {c: batch[c][start:stop] for c in self.columns}, None])

    def _report(self, seg: list[Any]) -> None:
        """Count a bad segment when the stream reaches it (not when Ray delivered it: blocks may run
        epochs ahead), once."""
        if seg[2] is not None:
            event, seg[2] = seg[2], None
            self.on_bad(*event)

    def take(self, n: int) -> tuple[list[dict[str, np.ndarray]], int]:
        """The next `n` good rows (as consecutive parts, views of the delivered blocks) and the number of
        raw rows (good and bad) that took."""
        parts, got, raw = [], 0, 0
        while got < n:
            if not self.pending:
                self._fill()
                continue
            seg = self.pending[0]
            if seg[1] is None:
                self._report(seg)
                raw += seg[0]
                self.pending.popleft()
                continue
            k = min(seg[0], n - got)
            parts.append({c: seg[1][c][:k] for c in self.columns})
            if k == seg[0]:
                self.pending.popleft()
            else:
                seg[0] -= k
                seg[1] = {c: seg[1][c][k:] for c in self.columns}
            got += k
            raw += k
        return parts, raw

    def skip(self, n: int) -> None:
        """Skip exactly `n` raw rows (good or bad)."""
        while n > 0:
            if not self.pending:
                self._fill()
                continue
            seg = self.pending[0]
            self._report(seg)
            k = min(seg[0], n)
            if k == seg[0]:
                self.pending.popleft()
            else:
                seg[0] -= k
                if seg[1] is not None:
                    seg[1] = {c: seg[1][c][k:] for c in self.columns}
            n -= k


def merge_data_errors(reports: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """One report from the ranks' `data_errors()`: counts added by (dataset, shard)."""
    shards: dict[tuple[str, str], dict[str, Any]] = {}
    pending: list[list[int]] = []
    for rep in reports:
        if not rep:
            continue
        pending += [list(p) for p in rep.get("pending", [])]
        for item in rep.get("shards", []):
            s = shards.setdefault((item["dataset"], item["shard"]),
                                  {"dataset": item["dataset"], "shard": item["shard"], "count": 0, "reasons": {},
                                   "examples": []})
            s["count"] += int(item["count"])
            for k, v in item.get("reasons", {}).items():
                s["reasons"][k] = s["reasons"].get(k, 0) + int(v)
            s["examples"] = (s["examples"] + list(item.get("examples", [])))[: ShardStream.MAX_EXAMPLES]
    items = [shards[k] for k in sorted(shards)]
    by_dataset: dict[str, int] = {}
    for s in items:
        by_dataset[s["dataset"]] = by_dataset.get(s["dataset"], 0) + s["count"]
    return {"bad_samples": sum(s["count"] for s in items), "by_dataset": dict(sorted(by_dataset.items())),
            "shards": items, "pending": pending}


# -- elastic resume: the plan of N ranks on M workers ---------------------------------------------


def elastic_layout(data_world: int, world: int, batch_size: int) -> list[list[tuple[int, int, int]]]:
    """How `world` workers share the global batch of a plan of `data_world` ranks of `batch_size`: per
    worker, the pieces (plan rank, first row, end row) of the plan ranks' batches it takes at every step.
    The global batch is the plan ranks' batches in rank order; worker j takes its rows
    [j * per, (j + 1) * per), per = data_world * batch_size / world. A global batch `world` workers
    cannot share equally is refused (ValueError naming trainer.workers and trainer.batch_size)."""
    total = data_world * batch_size
    if world < 1 or total % world:
        fits = [m for m in range(1, 2 * data_world + 1) if total % m == 0]
        raise ValueError(
            f"trainer.workers: this run's data plan has {data_world} rank(s) x trainer.batch_size {batch_size} = a "
            f"global batch of {total} samples per step (the worker count and per-worker batch it started with), "
            f"which {world} workers cannot share equally; continue it on a worker count that divides {total} "
            f"(e.g. {', '.join(map(str, fits))}), or start a new run (another name) whose trainer.batch_size suits "
            f"{world} workers")
    per = total // world
    layout = []
    for j in range(world):
        lo, hi = j * per, (j + 1) * per
        pieces, v = [], lo // batch_size
        while v * batch_size < hi:
            start = v * batch_size
            pieces.append((v, max(lo, start) - start, min(hi, start + batch_size) - start))
            v += 1
        layout.append(pieces)
    return layout


def merge_positions(positions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One position for a checkpoint from the ranks' `position_after` (gathered in rank order): the epoch
    and batches (equal on every rank), and where bad rows moved a rank's window, `rows_by_rank` (one
    entry per plan rank, None where nothing moved). An ElasticStream's positions also carry the data
    world (`world`) and their rows by plan rank."""
    head = positions[0]
    out = {k: v for k, v in head.items() if k != "rows"}
    if "world" in head:  # ElasticStream: rows by plan rank
        rows: list[Any] = [None] * int(head["world"])
        for p in positions:
            for v, r in p.get("rows", {}).items():
                rows[int(v)] = r
    else:  # ShardStream: rank i's rows
        rows = [p.get("rows") for p in positions]
    if any(r is not None for r in rows):
        out["rows_by_rank"] = rows
    return out


class ElasticStream:
    """Compute rank `rank` of `world` workers reading the epoch plan of `data_world` ranks (the worker
    count the run started with): at every step, its share of the plan ranks' batches (see
    `elastic_layout`), so the run's global batch, the samples of every step and the epochs stay those of
    the `data_world`-rank run. With `world == data_world` it is the ShardStream of its rank.

    It reads each plan rank it takes rows of with a ShardStream of that rank (one Ray Data execution
    each; a plan rank shared by two workers is read by both), and has the interface the training
    callbacks use: `position_after`, `seek`, `data_errors`, `restore_data_errors`, `bad_samples`. The
    bad samples of a plan rank are counted (for the run's totals) by the worker holding its first rows.
    `keys`: remember the sample keys of the last batches handed out (`keys_after`), for tests and
    audits."""

    def __init__(self, groups: Sequence[tuple[Sequence[ShardInfo], float]], *, rank: int, world: int,
                 batch_size: int, data_world: int | None = None, columns: Sequence[str], as_torch: bool = True,
                 keys: bool = False, buffer_bytes: int | None = None, **stream_kwargs: Any) -> None:
        self.rank, self.world = rank, world
        self.data_world = data_world or world
        self.plan_batch_size = batch_size
        self.pieces = elastic_layout(self.data_world, world, batch_size)[rank]
        self.columns = list(columns)
        self.as_torch = as_torch
        self.keys = keys
        read_columns = self.columns + (["__key__"] if keys and "__key__" not in self.columns else [])
        if buffer_bytes is None and len(self.pieces) > 1:
            buffer_bytes = max(128 << 20, default_buffer_bytes() // len(self.pieces))  # the rank's budget, shared
        self.streams = [ShardStream(groups, rank=v, world=self.data_world, batch_size=batch_size, columns=read_columns,
                                    as_torch=False, buffer_bytes=buffer_bytes, **stream_kwargs)
                        for v, _, _ in self.pieces]
        # the plan ranks whose counts this worker reports: those it takes the first rows of
        self.owns = [first == 0 for _, first, _ in self.pieces]
        self._keys: deque[tuple[int, list[str]]] = deque(maxlen=16)
        self._yielded = 0

    @property
    def batch_size(self) -> int:
        """This worker's rows per batch: the global batch / world."""
        return self.data_world * self.plan_batch_size // self.world

    @property
    def plan_ranks(self) -> list[int]:
        return [v for v, _, _ in self.pieces]

    def describe(self) -> str:
        """What this worker takes of the plan, in words."""
        parts = [f"plan rank {v}" + ("" if (a, b) == (0, self.plan_batch_size) else f" rows {a}-{b - 1}")
                 for v, a, b in self.pieces]
        return f"worker {self.rank} takes {' + '.join(parts)} of each step ({self.batch_size} samples)"

    # -- position ------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.streams[0].epoch

    @property
    def batches_in_epoch(self) -> int:
        return self.streams[0].batches_in_epoch

    @property
    def last_dataset(self) -> Any:
        return self.streams[0].last_dataset

    def _local(self, positions: Sequence[dict[str, int]]) -> dict[str, Any]:
        head = positions[0]
        rows = {v: p["rows"] for v, p in zip(self.plan_ranks, positions) if "rows" in p}
        return {"epoch": head["epoch"], "batches": head["batches"], "world": self.data_world, "rows": rows}

    @property
    def position(self) -> dict[str, Any]:
        """This worker's position (see `merge_positions` for the one a checkpoint holds)."""
        return self._local([s.position for s in self.streams])

    def position_after(self, batches: int) -> dict[str, Any]:
        """This worker's position right after the `batches`-th batch it handed out (ShardStream.position_after)."""
        return self._local([s.position_after(batches) for s in self.streams])

    def seek(self, position: dict[str, Any]) -> None:
        """Continue from a checkpoint's position (`merge_positions`). Its `world`, when it has one, must be
        this stream's data world; one without (a checkpoint from before elastic resume) keeps its per-rank
        rows only for a plan of as many ranks as it lists."""
        world = position.get("world")
        if world is not None and int(world) != self.data_world:
            raise ValueError(f"the checkpoint's data position is for a plan of {world} ranks, this stream reads a plan of "
                             f"{self.data_world}")
        by_rank = position.get("rows_by_rank")
        for v, stream in zip(self.plan_ranks, self.streams):
            p = {"epoch": int(position["epoch"]), "batches": int(position["batches"])}
            if by_rank is not None and len(by_rank) == self.data_world and by_rank[v] is not None:
                p["rows"] = int(by_rank[v])
            stream.seek(p)
        self._yielded = 0
        self._keys.clear()

    def keys_after(self, batches: int) -> list[str]:
        """The sample keys of the `batches`-th batch handed out since the start or the last seek (`keys=True`)."""
        for count, keys in self._keys:
            if count == batches:
                return keys
        raise ValueError(f"no keys of batch {batches} (keys=True keeps the last {self._keys.maxlen})")

    # -- bad data ------------------------------------------------------------------------------

    @property
    def bad_samples(self) -> int:
        """Bad samples of the plan ranks this worker counts for (their share of the run's total)."""
        return sum(s.bad_samples for s, own in zip(self.streams, self.owns) if own)

    def data_errors(self, since_epoch: int | None = None) -> dict[str, Any]:
        """The counts of the plan ranks this worker counts for, as one report (see `merge_data_errors`)."""
        mine = [s.data_errors(since_epoch) for s, own in zip(self.streams, self.owns) if own]
        if len(mine) == 1:
            return mine[0]
        merged = merge_data_errors(mine)
        return {k: merged[k] for k in ("bad_samples", "shards", "pending")}

    def restore_data_errors(self, state: dict[str, Any] | None, *, keep_counts: bool) -> None:
        """Every plan rank read here takes its already-counted rows; the totals go to this worker's first
        plan rank when `keep_counts` (one worker of the run: rank 0, whose first plan rank it owns)."""
        for i, stream in enumerate(self.streams):
            stream.restore_data_errors(state, keep_counts=keep_counts and i == 0 and self.owns[0])

    # -- reading -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, forever: at every step this worker's rows of the plan
        ranks' batches, in plan-rank order."""
        iters = [iter(s) for s in self.streams]
        whole = len(self.pieces) == 1 and self.pieces[0][1:] == (0, self.plan_batch_size)
        while True:
            parts = [next(it) for it in iters]
            if whole:
                batch = dict(parts[0])
            else:
                batch = {c: np.concatenate([p[c][a:b] for p, (_, a, b) in zip(parts, self.pieces)])
                         for c in parts[0]}
            self._yielded += 1
            keys = batch.pop("__key__", None) if "__key__" not in self.columns else batch.get("__key__")
            if self.keys and keys is not None:
                self._keys.append((self._yielded, [str(k) for k in keys]))
            if self.as_torch:
                batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
            yield batch
