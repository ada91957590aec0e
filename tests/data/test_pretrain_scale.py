"""The training data plan at the pretraining corpus's scale, from manifests alone (no shard bytes).

The corpus's shape: ~600K image samples (600 shards of ~1,000) and text of ~183M sentences (19,400
shards of ~9,433), 20,000 shards in all, described by real `manifest.json` files with sample counts.
Planning an epoch for 8 ranks, resuming each rank at an arbitrary position (mid-epoch, mid-shard,
windows moved by bad rows) and re-planning the epoch for 3 ranks are checked exactly, with sample
counts and row ranges per shard (183M samples are never listed), and take seconds and memory that
grow with the shards, not with the samples: the same plans over 1,000x the samples per shard take the
same memory.

A worker-count change re-plans the epoch for the new ranks: each continues at the position's batch
count in its own rows (`seek` drops the per-rank `rows_by_rank` of another world size); which samples
the old ranks had read is not carried over shard by shard, so exactness holds within each world's plan.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from biomedgpt.data.shards import Manifest, ShardEntry, write_manifest  # noqa: E402
from biomedgpt.data.stream import (ShardInfo, ShardStream, batches_per_epoch, list_shards, plan_epoch,  # noqa: E402
                                   rank_reads, rank_shards)

IMAGE_SHARDS, TEXT_SHARDS = 600, 19_400
BATCH, SEED, EPOCH = 64, 11, 5
WORLD, NEW_WORLD = 8, 3


def image_samples(i: int) -> int:
    return 995 + i % 11  # 600 shards, 600,000 samples in all


def text_samples(i: int) -> int:
    return 9_400 + (i * 37) % 67  # 19,400 shards, ~183M sentences in all


def write_corpus(root: Path, scale: int = 1) -> None:
    """Manifests (only) of the two pretraining splits under `root`, `scale` times the samples per shard."""
    for dataset, count, samples in (("pretrain_images", IMAGE_SHARDS, image_samples),
                                    ("pubmed_text", TEXT_SHARDS, text_samples)):
        entries = [ShardEntry(f"{dataset}-train-{i:06d}.tar", samples(i) * scale, samples(i) * scale * 300,
                              f"{i:064x}", f"{i + 1:064x}") for i in range(count)]
        manifest = Manifest(dataset, "train", "caption" if dataset == "pretrain_images" else "text", "synthetic",
                            "CC0 1.0", "open", entries)
        write_manifest(str(root / dataset / "train"), manifest)


def read_corpus(root: Path) -> list[tuple[list[ShardInfo], float]]:
    """The training groups from the manifests (what a run's plan reads), each with weight 1.0."""
    return [(list_shards(str(root), ds, "train"), 1.0) for ds in ("pretrain_images", "pubmed_text")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain-manifests")
    write_corpus(root)
    return root


def stream(groups, rank: int, world: int) -> ShardStream:
    return ShardStream(groups, rank=rank, world=world, batch_size=BATCH, seed=SEED, preprocess={},
                       columns=["input_ids"])


def positions(groups, world: int) -> tuple[dict, dict]:
    """Two gathered positions of `world` ranks ~40% into epoch EPOCH: on a window boundary, and with every rank's window
    moved by bad rows to its own raw row (as DataPosition saves them)."""
    per_epoch = batches_per_epoch(plan_epoch(groups, EPOCH, SEED), world, BATCH)
    batches = per_epoch * 2 // 5 + 1  # not a multiple of the 4 batches of a 256-row window
    on_window = {"epoch": EPOCH, "batches": batches}
    start = batches // 4 * 256
    moved = dict(on_window, rows_by_rank=[start + 17 * r + 3 for r in range(world)])
    return on_window, moved


def coverage(groups, world: int, position: dict) -> dict:
    """Plan epoch EPOCH for `world` ranks and resume every rank at `position`: per shard of the corpus,
    the rows read before the position and the row range the resumed reads cover, and per-rank facts.
    A rank resumes at the start of its current shuffle window (`window_start`): the rows before it were
    consumed, and the window's batches already given are re-read and skipped (test_stream.py checks
    those batch by batch against a real stream)."""
    plan = plan_epoch(groups, EPOCH, SEED)
    per_shard: dict[str, list[int]] = {}  # url -> [planned, consumed, first resumed row, resumed rows]
    ranks = []
    for r in range(world):
        s = stream(groups, r, world)
        s.seek(position)
        mine = rank_shards(plan, r, world)
        planned = sum(sh.samples for sh in mine)
        start = s.window_start
        reads, skip = rank_reads(mine, EPOCH, start)
        offset = 0
        for sh in mine:  # what the position consumed, shard by shard
            consumed = min(max(start - offset, 0), sh.samples)
            entry = per_shard.setdefault(sh.url, [0, 0, None, 0])
            entry[0] += sh.samples
            entry[1] += consumed
            offset += sh.samples
        for k, read in enumerate(reads):  # what the resumed reads cover
            first = skip if k == 0 else 0
            entry = per_shard[read.shard.url]
            assert entry[2] is None, f"{read.shard.url} read twice"
            entry[2], entry[3] = first, read.shard.samples - first
            assert read.offset + first == (start if k == 0 else reads[k - 1].offset + reads[k - 1].shard.samples)
        end = reads[-1].offset + reads[-1].shard.samples if reads else start
        ranks.append({"planned": planned, "start": start, "end": end, "skip": skip, "unread": len(mine) - len(reads),
                      "batches": batches_per_epoch(plan, world, BATCH), "epoch": s.epoch})
    return {"plan": plan, "per_shard": per_shard, "ranks": ranks}


def check_exact(groups, world: int, position: dict, result: dict) -> None:
    every = [sh for shards, _ in groups for sh in shards]
    total = sum(sh.samples for sh in every)
    plan, per_shard, ranks = result["plan"], result["per_shard"], result["ranks"]
    # the epoch: every shard of the corpus (weights 1.0) in exactly one rank's plan, each sample once
    assert Counter(sh.url for sh in plan) == Counter(sh.url for sh in every)
    assert set(per_shard) == {sh.url for sh in every}
    assert {u: e[0] for u, e in per_shard.items()} == {sh.url: sh.samples for sh in every}
    assert sum(r["planned"] for r in ranks) == total
    assert len({r["batches"] for r in ranks}) == 1 and ranks[0]["batches"] * BATCH <= min(r["planned"] for r in ranks)
    # the resume: per shard, the rows read before the position and the rows the resumed reads cover are
    # [0, consumed) and [consumed, samples): nothing read twice, nothing left out
    for url, (samples, consumed, first, resumed) in per_shard.items():
        if first is None:
            assert consumed == samples, f"{url}: {samples - consumed} rows neither read nor planned"
        else:
            assert (first, first + resumed) == (consumed, samples), url
    for r in ranks:
        assert r["epoch"] == EPOCH and r["end"] == r["planned"]
        assert 0 < r["start"] < r["planned"] and r["unread"] > 0  # mid-epoch, whole shards skipped unread
    assert sum(r["start"] for r in ranks) == sum(e[1] for e in per_shard.values())
    assert any(r["skip"] for r in ranks), "the position falls mid-shard"
    if "rows_by_rank" in position and len(position["rows_by_rank"]) == world:
        assert [r["start"] for r in ranks] == position["rows_by_rank"]


def run_all(groups) -> dict:
    """Plan the epoch for WORLD ranks, resume them at both positions, re-plan for NEW_WORLD ranks and
    resume those at the same positions (what a restarted run on another cluster size does)."""
    out = {}
    for name, position in zip(("window", "moved"), positions(groups, WORLD)):
        out[(WORLD, name)] = (position, coverage(groups, WORLD, position))
        out[(NEW_WORLD, name)] = (position, coverage(groups, NEW_WORLD, position))
    return out


def test_corpus_has_the_pretraining_shape(corpus):
    groups = read_corpus(corpus)
    images, text = (sum(sh.samples for sh in shards) for shards, _ in groups)
    assert (len(groups[0][0]), len(groups[1][0])) == (IMAGE_SHARDS, TEXT_SHARDS)
    assert images == 599_985 and 182_500_000 < text < 183_500_000


def test_plan_resume_and_replan_are_exact_in_seconds(corpus):
    t0 = time.perf_counter()
    groups = read_corpus(corpus)
    results = run_all(groups)
    elapsed = time.perf_counter() - t0
    for (world, _), (position, result) in results.items():
        check_exact(groups, world, position, result)
    # the 8 -> 3 re-plan: the same epoch over 3 ranks, each resuming at the position's batch count in its rows
    (position, three) = results[(NEW_WORLD, "moved")]
    window = position["batches"] // 4 * 256
    assert [r["start"] for r in three["ranks"]] == [window] * NEW_WORLD
    # manifests read, 4 plans of the 20,000 shards, 22 ranks resumed (generous: 2 shared slow cores)
    assert elapsed < 10, f"{elapsed:.1f} s"
    print(f"20,000 shards: manifests, plan, resume and re-plan in {elapsed:.2f} s")


def rank_state(root: Path) -> list:
    """What the ranks hold to read epoch EPOCH from a position: the manifests' shard lists, each rank's
    stream (its plan of epoch 0 checked), the epoch's plan and the rank's resumed reads; for WORLD ranks
    and again for NEW_WORLD ranks, all in this one process (in a run, each rank holds its own)."""
    groups = read_corpus(root)
    _, moved = positions(groups, WORLD)
    held = []
    for world in (WORLD, NEW_WORLD):
        for r in range(world):
            s = stream(groups, r, world)
            s.seek(moved)
            mine = rank_shards(plan_epoch(groups, EPOCH, SEED), r, world)
            held.append((s, mine, rank_reads(mine, EPOCH, s.window_start)))
    return held


def traced_peak(root: Path) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        assert len(rank_state(root)) == WORLD + NEW_WORLD
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def traced_peak_alone(root: Path) -> int:
    """traced_peak in a fresh interpreter: tracemalloc counts every thread's allocations, and in a full
    test session other tests leave threads behind (an S3 server, Ray's clients) that allocate meanwhile."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "import test_pretrain_scale as t; print(t.traced_peak(Path(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(root)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_memory_grows_with_shards_not_samples(corpus, tmp_path):
    write_corpus(tmp_path, scale=1000)  # ~183 billion text samples, the same 20,000 shards
    peak, peak_1000 = traced_peak_alone(corpus), traced_peak_alone(tmp_path)
    mib = 2**20
    print(f"20,000 shards: traced peak {peak / mib:.1f} MiB, with 1000x the samples {peak_1000 / mib:.1f} MiB")
    assert peak < 48 * mib, f"{peak / mib:.1f} MiB for 20,000 shards"  # a few KiB per shard at most
    assert peak_1000 <= peak * 1.05 + mib, (peak, peak_1000)


def test_resume_time_does_not_grow_with_the_position():
    """A rank's resume walks its shard list once: at the end of an epoch of 200,000 shards as at its start."""
    shards = [ShardInfo(f"s3://b/text/train/text-train-{i:06d}.tar", "text", "train", 9_433) for i in range(200_000)]
    total = 9_433 * len(shards)
    times = {}
    for start in (5, total // 2 + 7, total - 5):
        t0 = time.perf_counter()
        reads, skip = rank_reads(shards, 0, start)
        times[start] = time.perf_counter() - t0
        assert reads[0].offset + skip == start and reads[-1].offset + reads[-1].shard.samples == total
    assert len(reads) == 1 and skip == 9_433 - 5
    assert max(times.values()) < 3, times  # the old walk (a list copy per skipped shard) took ~50 s here
