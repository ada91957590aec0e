"""Per-rank training streams with a resumable position.

Each epoch has a plan computed identically on every rank from (seed, epoch): the shards of every
training dataset, repeated or cut by the dataset's mixing weight, in a seeded random order; shard i of
the plan goes to rank i % world. Every rank yields the same number of batches per epoch (the smallest
rank's sample count // batch size), so collective steps never deadlock. A rank reads its shards with
Ray Data (in plan order), decodes and tokenizes them with `preprocess_batch`, shuffles rows within
fixed windows, and batches.

The position is (epoch, batches yielded in that epoch), the same on every rank. Resuming skips the
shards the position has fully consumed without reading them (shard level) and the consumed rows of the
partly read window, so no sample is read twice or dropped within an epoch (beyond the tail every
epoch drops so that ranks stay equal).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from . import storage
from .shards import read_manifest, split_url


@dataclass(frozen=True)
class ShardInfo:
    url: str
    dataset: str
    split: str
    samples: int


def list_shards(shards_root: str, dataset: str, split: str) -> list[ShardInfo]:
    """The shards of one split, from its manifest (an incomplete build is refused)."""
    url = split_url(shards_root, dataset, split)
    manifest = read_manifest(url)
    if not manifest.complete:
        raise ValueError(f"{url}: the shard build of {dataset}/{split} is incomplete; rerun `biomedgpt shards build`")
    return [ShardInfo(storage.join(url, e.name), dataset, split, e.samples) for e in manifest.shards if e.samples]


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


def batches_per_epoch(plan: Sequence[ShardInfo], world: int, batch_size: int) -> int:
    """Batches every rank yields this epoch: the smallest rank's samples // batch_size."""
    per_rank = [sum(s.samples for s in rank_shards(plan, r, world)) for r in range(world)]
    return min(per_rank) // batch_size if per_rank else 0


class ShardStream:
    """Endless per-rank stream of training batches (dicts of numpy arrays or torch tensors) with a
    resumable `position`."""

    def __init__(self, groups: Sequence[tuple[Sequence[ShardInfo], float]], *, rank: int, world: int,
                 batch_size: int, seed: int, preprocess: dict[str, Any], columns: Sequence[str],
                 shuffle_buffer: int = 256, as_torch: bool = True, min_rows_per_read: int = 4096) -> None:
        self.groups = [(list(s), float(w)) for s, w in groups]
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.seed = seed
        self.preprocess = preprocess
        self.columns = list(columns)
        self.shuffle_buffer = shuffle_buffer
        self.as_torch = as_torch
        self.min_rows_per_read = min_rows_per_read
        self.epoch = 0
        self.batches_in_epoch = 0
        plan = plan_epoch(self.groups, 0, seed)
        if len(plan) < world:
            names = sorted({f"{s.dataset}/{s.split}" for s in plan})
            raise ValueError(f"{', '.join(names)}: {len(plan)} shard(s) per epoch for {world} training ranks; every "
                             "rank reads whole shards: rebuild with smaller shards (data.shard_max_samples, or "
                             "`biomedgpt shards build --shard-max-samples`)")
        if batches_per_epoch(plan, world, batch_size) < 1:
            total = sum(s.samples for s in plan)
            raise ValueError(f"{total} training samples over {world} rank(s) give no batch of {batch_size} per rank; "
                             "lower trainer.batch_size or add data")

    # -- position ------------------------------------------------------------------------------

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches_in_epoch}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch = int(position["epoch"])
        self.batches_in_epoch = int(position["batches"])

    # -- reading -------------------------------------------------------------------------------

    def _read(self, shards: Sequence[ShardInfo]) -> Iterator[dict[str, np.ndarray]]:
        """Preprocessed rows of `shards`, in order, as numpy batches (one Ray Data execution)."""
        import ray.data

        from .pipeline import preprocess_batch

        if not shards:
            return
        fs, _ = storage.pyarrow_filesystem(shards[0].url)
        paths = [storage.pyarrow_filesystem(s.url)[1] for s in shards]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # plan order is what the position refers to
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, override_num_blocks=len(paths))
        ds = ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=64, fn_kwargs=self.preprocess)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")

    def _emit(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.batches_in_epoch += 1
        if not self.as_torch:
            return batch
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position on, forever.

        Rows are shuffled within fixed windows of `window` rows (a multiple of the batch size), each
        permuted by (seed, epoch, rank, window index): the position (batches done) names a window and
        an offset in it, so a resumed stream yields exactly the batches the interrupted one had not.
        Short epochs are read several at a time (at least `min_rows_per_read` rows per Ray Data
        execution) so that small datasets do not pay a pipeline start-up every few steps.
        """
        window = max(1, self.shuffle_buffer // self.batch_size) * self.batch_size
        per_window = window // self.batch_size
        while True:
            epochs, rows = [], 0
            e = self.epoch
            while not epochs or (rows < self.min_rows_per_read and len(epochs) < 1000):
                plan = plan_epoch(self.groups, e, self.seed)
                mine = rank_shards(plan, self.rank, self.world)
                epochs.append((e, batches_per_epoch(plan, self.world, self.batch_size), mine))
                rows += sum(sh.samples for sh in mine)
                e += 1
            # Resume inside the first epoch: skip its consumed windows, whole shards unread.
            w_index = self.batches_in_epoch // per_window
            skip_rows = w_index * window
            first = list(epochs[0][2])
            while first and skip_rows >= first[0].samples:
                skip_rows -= first[0].samples
                first = first[1:]
            skipped_whole = sum(sh.samples for sh in epochs[0][2]) - sum(sh.samples for sh in first)
            reader = _RowReader(self._read(first + [sh for _, _, mine in epochs[1:] for sh in mine]), self.columns)
            reader.skip(skip_rows)
            for i, (epoch, per_epoch, mine) in enumerate(epochs):
                epoch_rows = sum(sh.samples for sh in mine)
                if i == 0:
                    epoch_rows -= skipped_whole + skip_rows
                    skip_in_window = self.batches_in_epoch % per_window
                else:
                    w_index, skip_in_window = 0, 0
                while self.batches_in_epoch < per_epoch:
                    n = min(window, epoch_rows)
                    if n < self.batch_size:
                        raise RuntimeError(f"rank {self.rank} ran out of rows in epoch {epoch} before its {per_epoch} "
                                           "batches; a shard holds fewer samples than its manifest says")
                    chunk = reader.take(n)
                    epoch_rows -= n
                    order = np.random.default_rng([self.seed, epoch, self.rank, w_index]).permutation(n)
                    for j in range(skip_in_window, n // self.batch_size):
                        if self.batches_in_epoch >= per_epoch:
                            break
                        sel = order[j * self.batch_size:(j + 1) * self.batch_size]
                        yield self._emit({c: chunk[c][sel] for c in self.columns})
                    w_index += 1
                    skip_in_window = 0
                reader.skip(epoch_rows)  # the tail every rank drops so that ranks stay equal
                self.epoch, self.batches_in_epoch = epoch + 1, 0


class _RowReader:
    """Takes and skips exact numbers of rows from a stream of numpy batches."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], columns: Sequence[str]) -> None:
        self.batches = batches
        self.columns = list(columns)
        self.pending: list[dict[str, np.ndarray]] = []
        self.count = 0

    def _fill(self, n: int) -> None:
        while self.count < n:
            try:
                batch = next(self.batches)
            except StopIteration:
                raise RuntimeError(f"the shards ended {n - self.count} rows early; a shard holds fewer samples "
                                   "than its manifest says") from None
            batch = {c: batch[c] for c in self.columns}
            self.pending.append(batch)
            self.count += len(batch[self.columns[0]])

    def take(self, n: int) -> dict[str, np.ndarray]:
        self._fill(n)
        cat = {c: np.concatenate([b[c] for b in self.pending]) if len(self.pending) > 1 else self.pending[0][c]
               for c in self.columns}
        rest = {c: cat[c][n:] for c in self.columns}
        self.pending = [rest] if len(rest[self.columns[0]]) else []
        self.count -= n
        return {c: cat[c][:n] for c in self.columns}

    def skip(self, n: int) -> None:
        if n > 0:
            self.take(n)
