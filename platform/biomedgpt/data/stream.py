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
                 shuffle_buffer: int = 256, as_torch: bool = True) -> None:
        self.groups = [(list(s), float(w)) for s, w in groups]
        self.rank, self.world = rank, world
        self.batch_size = batch_size
        self.seed = seed
        self.preprocess = preprocess
        self.columns = list(columns)
        self.shuffle_buffer = shuffle_buffer
        self.as_torch = as_torch
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

    def _rows(self, shards: Sequence[ShardInfo], skip_rows: int) -> Iterator[dict[str, np.ndarray]]:
        """Preprocessed rows of `shards` in order, as numpy batches, minus the first `skip_rows`."""
        import ray.data

        from .pipeline import preprocess_batch

        # Whole shards inside the skipped region are not read at all.
        while shards and skip_rows >= shards[0].samples:
            skip_rows -= shards[0].samples
            shards = shards[1:]
        if not shards:
            return
        fs, _ = storage.pyarrow_filesystem(shards[0].url)
        paths = [storage.pyarrow_filesystem(s.url)[1] for s in shards]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # plan order is what the position refers to
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, override_num_blocks=len(paths))
        ds = ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=64, fn_kwargs=self.preprocess)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch[self.columns[0]])
            if skip_rows >= n:
                skip_rows -= n
                continue
            if skip_rows:
                batch = {k: v[skip_rows:] for k, v in batch.items()}
                skip_rows = 0
            yield batch

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        """This epoch's batches from the current position on.

        Rows are shuffled within fixed windows of `window` rows (a multiple of the batch size), each
        permuted by (seed, epoch, rank, window index): the position (batches done) then names a window
        and an offset in it, so a resumed epoch yields exactly the batches the interrupted one had not.
        """
        plan = plan_epoch(self.groups, self.epoch, self.seed)
        per_epoch = batches_per_epoch(plan, self.world, self.batch_size)
        if self.batches_in_epoch >= per_epoch:
            return
        mine = rank_shards(plan, self.rank, self.world)
        window = max(1, self.shuffle_buffer // self.batch_size) * self.batch_size
        per_window = window // self.batch_size
        w_index = self.batches_in_epoch // per_window
        skip_in_window = self.batches_in_epoch % per_window
        pending: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        n_pending = 0

        def flush(rows: dict[str, np.ndarray], n: int, index: int, skip: int) -> Iterator[dict[str, Any]]:
            order = np.random.default_rng([self.seed, self.epoch, self.rank, index]).permutation(n)
            for i in range(skip, n // self.batch_size):
                if self.batches_in_epoch >= per_epoch:
                    return
                sel = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield self._emit({c: rows[c][sel] for c in self.columns})

        for rows in self._rows(mine, w_index * window):
            for c in self.columns:
                pending[c].append(rows[c])
            n_pending += len(rows[self.columns[0]])
            while n_pending >= window:
                cat = {c: np.concatenate(pending[c]) for c in self.columns}
                yield from flush({c: cat[c][:window] for c in self.columns}, window, w_index, skip_in_window)
                pending = {c: [cat[c][window:]] for c in self.columns}
                n_pending -= window
                w_index += 1
                skip_in_window = 0
                if self.batches_in_epoch >= per_epoch:
                    return
        if n_pending:
            cat = {c: np.concatenate(pending[c]) for c in self.columns}
            yield from flush(cat, n_pending, w_index, skip_in_window)
        if self.batches_in_epoch < per_epoch:
            raise RuntimeError(f"rank {self.rank} read fewer rows than its {per_epoch} batches of epoch {self.epoch} "
                               "need; a shard holds fewer samples than its manifest says")

    def _emit(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.batches_in_epoch += 1
        if not self.as_torch:
            return batch
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self._epoch_batches()
            self.epoch += 1
            self.batches_in_epoch = 0
