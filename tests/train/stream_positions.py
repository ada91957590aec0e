"""Where a training run's data stream stood, worked out from its spec and shards, for the recovery
tests: the batches a data position stands for (to compare with the step its checkpoint was taken at),
and the samples each rank reads before and after a restart (to check that together they cover every
epoch once)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from biomedgpt.data.error_budget import ErrorBudget
from biomedgpt.data.shards import read_shard
from biomedgpt.data.stream import ShardStream, batches_per_epoch, list_shards, plan_epoch, rank_shards


class StreamOf:
    """The training stream of a single-dataset run: `shards` root, `dataset`'s train split, and the job
    spec's settings that decide the order of batches (seed, ranks, batch size, shuffle window, budget)."""

    def __init__(self, shards: str, dataset: str, spec: dict[str, Any]):
        trainer, data = spec["trainer"], spec["data"]
        self.shards, self.dataset = shards, dataset
        self.groups = [(list_shards(shards, dataset, "train"), 1.0)]
        self.seed = trainer.get("seed", 0)
        self.world = trainer.get("workers", 2)
        self.batch_size = trainer["batch_size"]
        assert trainer.get("grad_accumulation", 1) == 1, "one batch per step is assumed"
        self.shuffle_buffer = data.get("shuffle_buffer", 256)
        self.budget = ErrorBudget(data.get("max_bad_samples"), data.get("max_bad_fraction", 0.001))

    def epoch_batches(self, epoch: int) -> int:
        return batches_per_epoch(plan_epoch(self.groups, epoch, self.seed), self.world, self.batch_size, self.budget)

    def batches_before(self, position: dict[str, Any]) -> int:
        """How many batches (= optimizer steps) a rank had taken at `position` (epoch, batches in it)."""
        assert "rows_by_rank" not in position, "no bad rows are expected in these runs"
        return sum(self.epoch_batches(e) for e in range(position["epoch"])) + position["batches"]

    def stream(self, rank: int, tokenizer_dir: str, columns: Sequence[str] = ("__key__",)) -> ShardStream:
        """The stream plan rank `rank` reads, as a training worker makes it (iterating it needs a running Ray:
        tests read it in a process of their own, job_runs.read_streams)."""
        preprocess = dict(task_name="vqa", tokenizer_dir=tokenizer_dir, image_size=16, max_source_length=24,
                          max_target_length=8)
        return ShardStream(self.groups, rank=rank, world=self.world, batch_size=self.batch_size, seed=self.seed,
                           preprocess=preprocess, columns=tuple(columns), shuffle_buffer=self.shuffle_buffer,
                           as_torch=False, min_rows_per_read=1, error_budget=self.budget)

    def planned_keys(self, epoch: int) -> list[str]:
        """The keys of every sample of the shards epoch `epoch`'s plan lists (a shard listed twice, twice)."""
        return [s["__key__"] for sh in plan_epoch(self.groups, epoch, self.seed) for s in read_shard(sh.url)]

    def planned_rows(self, epoch: int) -> list[int]:
        """Rows each rank's shards hold in epoch `epoch`."""
        plan = plan_epoch(self.groups, epoch, self.seed)
        return [sum(sh.samples for sh in rank_shards(plan, r, self.world)) for r in range(self.world)]

    def check_epochs_covered_once(self, per_rank: Sequence[Sequence[Sequence[int]]], whole_epoch: bool = True) -> None:
        """`per_rank[r]`: the sample ids of the batches rank r trained on, in order, from the start. Within
        every epoch no sample may be read twice, by one rank or two; with `whole_epoch` the runs must span
        at least one whole epoch (each rank takes all `epoch_batches` of it)."""
        done, epoch = 0, 0
        total = len(per_rank[0])
        assert all(len(b) == total for b in per_rank), "every rank takes the same number of batches"
        while done < total:
            n = min(self.epoch_batches(epoch), total - done)  # the last epoch may be cut short
            seen: Counter[int] = Counter()
            for batches in per_rank:
                ids = [i for batch in batches[done:done + n] for i in batch]
                assert len(ids) == n * self.batch_size
                seen.update(ids)
            twice = [i for i, c in seen.items() if c > 1]
            assert not twice, f"epoch {epoch}: {len(twice)} samples read twice"
            done, epoch = done + n, epoch + 1
        assert not whole_epoch or total >= self.epoch_batches(0), "the runs do not span a whole epoch"
