"""The training data pipeline (shards -> Ray Data -> decode/transform/tokenize -> batches) against a
plain `webdataset` + `torch.utils.data.DataLoader` over the same shards with the same preprocessing and
the same number of processes, in one run; its memory as the data grows; and the image transform alone.

Data: a real VQA-RAD release folder ($BIOMEDGPT_VQA_RAD; the figures in BENCHMARKS.md used a 1,216-question
subset of the official release), else the CC0 sample in datasets_spec/samples/vqa_rad, converted to shards of 100 samples (1x) and
the same shards copied ten times under new names (10x); 256 px images, batch 64, 2 CPU cores.

(a) Throughput, samples/s in steady state over 3 epochs of the 1x shards (the clock starts at the
    first batch, so start-up is left out of both): the platform's `ShardStream` (Ray Data reads and preprocesses in 2 task processes,
    the rank's process shuffles within windows and batches) against `webdataset.WebDataset(urls)
    .batched(64)` mapped through the same `preprocess_batch`, in a `DataLoader` with 2 worker
    processes. Each is run 3 times, interleaved; the best run of each counts (the median ratio of
    adjacent pairs is shown too). Target: >= 0.8x.
(b) Peak memory of the pipeline over one epoch of the 1x and of the 10x shards (separate runs, the
    sampling costs CPU): the sum over the driver and its Ray instance's worker processes (`ray::`) of
    RSS, and of PSS (shared pages counted once), sampled every 0.25 s with psutil. Streaming: the 10x peak must stay within 1.2x of the 1x.
(c) Images/s per core of the image transform alone (`transforms.load_image`: decode at reduced DCT
    scale, RGB, bicubic resize to 256, normalise) on every VQA-RAD JPEG, one process, one thread,
    against plain PIL decode + resize + normalise. Target: >= 200 images/s per core.
(d) The rank's planning state at 100x the shards, from manifests alone (no shard bytes): 1x is 200
    shards, 100x is 20,000, the pretraining corpus's shape (3% image shards of ~1,000 samples, 97% text
    shards of ~9,433 sentences: ~600K images and ~183M sentences at 100x). In a fresh process per point
    (the rank's process: the stream module imported, torch with it), rank 0 of 8 reads the manifests,
    builds its stream (the epoch-0 plan checked), plans an epoch, resumes at a position 40% into it
    (mid-shard, windows moved by bad rows), then re-plans for 3 ranks and resumes there. Figures: the
    wall time; the process's peak RSS (`ru_maxrss`, what the rank needs; the import alone is shown
    too) and the 100x / 1x ratio of it (target <= 1.3x); and, traced with tracemalloc in a second pass,
    the planning state itself: its peak (manifest parsing) and what stays held, which grow with the
    shards (not with the samples or the bytes).

`.venv/bin/python benchmarks/data_pipeline.py [--repeat 3] [--only plan]`: `--only plan` runs (d)
alone (a few seconds, no Ray, no shard bytes). The last line printed is one JSON object with the
figures.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
# A VQA-RAD release folder (the official layout): $BIOMEDGPT_VQA_RAD, else the CC0 sample the repository
# ships (datasets_spec/samples/vqa_rad, 40 images). The figures in BENCHMARKS.md name the data they used.
VQA_RAD = Path(os.environ.get("BIOMEDGPT_VQA_RAD", REPO / "datasets_spec" / "samples" / "vqa_rad"))
IMAGE_SIZE = 256
BATCH = 64
PROCESSES = 2
EPOCHS = 3  # passes over the 1x shards in each throughput run


# -- data ----------------------------------------------------------------------------------------


def build_data(work: Path) -> tuple[str, str, str]:
    """Shards of VQA-RAD (1x), a 10x copy, and a tokenizer trained on the questions and answers."""
    from biomedgpt.data.build import build_shards
    from biomedgpt.data.shards import read_manifest, read_shard, write_manifest
    from biomedgpt.data.stream import list_shards
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.tasks import get_task

    one = work / "x1"
    build_shards("vqa_rad", str(VQA_RAD), str(one), ["train"], shard_max_samples=100, progress=False)
    ten = work / "x10"
    split = ten / "vqa_rad" / "train"
    split.mkdir(parents=True)
    manifest = read_manifest(str(one / "vqa_rad" / "train"))
    entries = []
    for copy in range(10):
        for e in manifest.shards:
            name = e.name.replace("vqa_rad-train-", f"vqa_rad-train-c{copy}-")
            shutil.copyfile(one / "vqa_rad" / "train" / e.name, split / name)
            entries.append(type(e)(name=name, samples=e.samples, bytes=e.bytes, sha256=e.sha256,
                                   input_sha256=e.input_sha256))
    manifest.shards = entries
    write_manifest(str(split), manifest)
    task = get_task("vqa")
    texts = []
    for shard in list_shards(str(one), "vqa_rad", "train"):
        for sample in read_shard(shard.url):
            ex = task.example(json.loads(sample["json"]))
            texts += [ex.instruction, ex.target]
    tok_dir = work / "tokenizer"
    BiomedGPTTokenizer.train(texts, vocab_size=400).save_pretrained(tok_dir)
    return str(one), str(ten), str(tok_dir)


def preprocess_options(tok_dir: str) -> dict:
    return dict(task_name="vqa", tokenizer_dir=tok_dir, image_size=IMAGE_SIZE, max_source_length=40,
                max_target_length=16)


# -- memory sampling -----------------------------------------------------------------------------


class MemorySampler:
    """Peaks, over the run, of: the summed RSS of this process and its Ray instance's `ray::` worker
    processes; the summed PSS of this process and every process it started (raylet, GCS, workers: shared
    pages such as the object store's are split between their users, so the sum is the physical memory);
    and the bytes in Ray's object store. Other Ray clusters on the machine are not counted."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_store = 0
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        rss = pss = 0
        for p in [me] + me.children(recursive=True):  # raylet is our child, the workers its children
            try:
                info = p.memory_full_info()
                pss += getattr(info, "pss", info.rss)
                if p.pid == me.pid or p.name().startswith("ray::"):
                    rss += info.rss
            except Exception:  # noqa: BLE001 - processes come and go
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_store = max(self.peak_store, object_store_bytes())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
                self.samples += 1
            except Exception as err:  # noqa: BLE001 - reported, never silently dropped
                self.errors.append(f"{type(err).__name__}: {err}")
            time.sleep(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.errors or self.samples < 2:
            raise RuntimeError(f"memory sampling failed ({self.samples} samples): {self.errors[:3]}")


def object_store_bytes() -> int:
    """Bytes in use in this Ray instance's object store (from Ray's memory summary)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    # this instance by its address: other Ray instances may run on the machine
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    if not m:
        raise RuntimeError(f"no plasma usage in Ray's memory summary: {text[:200]!r}")
    return int(m.group(1)) << 20


# -- the two pipelines ---------------------------------------------------------------------------


def timed(batches, limit: int | None = None) -> tuple[float, int]:
    """(steady samples/s from the first batch on, samples) over an iterator of batches."""
    it = iter(batches)
    first = next(it)
    n0 = len(first["input_ids"])
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += len(batch["input_ids"])
        if limit is not None and n + n0 >= limit:
            break
    return n / (time.perf_counter() - t0), n + n0


def platform_run(root: str, tok_dir: str, epochs: int = 1, memory: bool = False, min_rows: int = 1
                 ) -> tuple[float, int, MemorySampler | None]:
    """The training stream of one rank (world 1) over `epochs` epochs of the split at `root`; with
    `memory`, the memory of its processes is sampled meanwhile."""
    import contextlib

    from biomedgpt.data.pipeline import TRAIN_COLUMNS
    from biomedgpt.data.stream import ShardStream, batches_per_epoch, list_shards, plan_epoch

    shards = list_shards(root, "vqa_rad", "train")
    stream = ShardStream([(shards, 1.0)], rank=0, world=1, batch_size=BATCH, seed=0,
                         preprocess=preprocess_options(tok_dir), columns=TRAIN_COLUMNS, shuffle_buffer=256,
                         as_torch=True, min_rows_per_read=min_rows)
    per_epoch = sum(batches_per_epoch(plan_epoch(stream.groups, e, 0), 1, BATCH) for e in range(epochs))

    def batches():
        for i, batch in enumerate(stream):
            yield batch
            if i + 1 == per_epoch:
                return

    with MemorySampler() if memory else contextlib.nullcontext() as mem:
        rate, n = timed(batches())
    return rate, n, mem


def to_raw_batch(samples):
    import numpy as np

    return {"json": np.array([s["json"] for s in samples], dtype=object),
            "jpg": np.array([s.get("jpg") for s in samples], dtype=object)}


class Preprocess:
    """The platform's preprocess_batch, then tensors (picklable for DataLoader workers)."""

    def __init__(self, options: dict) -> None:
        self.options = options

    def __call__(self, raw):
        import torch

        from biomedgpt.data.pipeline import preprocess_batch

        return {k: torch.from_numpy(v) for k, v in preprocess_batch(raw, **self.options).items()}


def baseline_run(root: str, tok_dir: str, epochs: int = 1) -> tuple[float, int]:
    """webdataset + DataLoader with PROCESSES workers over the same shards, same preprocessing."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    from biomedgpt.data.stream import list_shards

    urls = [s.url for s in list_shards(root, "vqa_rad", "train")] * epochs
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .batched(BATCH, collation_fn=to_raw_batch, partial=True)
          .map(Preprocess(preprocess_options(tok_dir))))
    loader = DataLoader(ds, batch_size=None, num_workers=PROCESSES, prefetch_factor=4, persistent_workers=False)
    return timed(loader)


# -- the transform alone -------------------------------------------------------------------------


def transform_rates(repeat: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from biomedgpt.data.transforms import load_image

    torch.set_num_threads(1)
    paths = sorted((VQA_RAD / "VQA_RAD Image Folder").glob("*.jpg"))
    data = [p.read_bytes() for p in paths]

    def plain(b: bytes):
        img = Image.open(io.BytesIO(b)).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return ((arr - 0.5) / 0.5).transpose(2, 0, 1)

    def rate(fn) -> float:
        best = 0.0
        for _ in range(repeat):
            t0 = time.process_time()  # CPU time of this process: images per second of one core
            for b in data:
                fn(b)
            best = max(best, len(data) / (time.process_time() - t0))
        return best

    sizes = [Image.open(io.BytesIO(b)).size for b in data]
    return {"images": len(data), "mean_kb": round(sum(map(len, data)) / len(data) / 1024, 1),
            "median_megapixels": round(statistics.median(w * h for w, h in sizes) / 1e6, 2),
            "platform_per_core": round(rate(lambda b: load_image(b, IMAGE_SIZE)), 1),
            "plain_pil_per_core": round(rate(plain), 1)}


# -- the planning state at 100x the shards ----------------------------------------------------------

#: Shards at 1x of (d); 100x is PLAN_SHARDS * 100 (20,000: the pretraining corpus's shape).
PLAN_SHARDS = 200
PLAN_WORLD, PLAN_NEW_WORLD, PLAN_EPOCH = 8, 3, 5


def write_plan_manifests(root: Path, shards: int) -> None:
    """Manifests only (no shard files) of an image split (3% of the shards, ~1,000 samples each) and a
    text split (97%, ~9,433 sentences each) under `root`."""
    from biomedgpt.data.shards import Manifest, ShardEntry, write_manifest

    images = shards * 3 // 100
    for dataset, count, samples in (("pretrain_images", images, lambda i: 995 + i % 11),
                                    ("pubmed_text", shards - images, lambda i: 9_400 + (i * 37) % 67)):
        entries = [ShardEntry(f"{dataset}-train-{i:06d}.tar", samples(i), samples(i) * 300, f"{i:064x}",
                              f"{i + 1:064x}") for i in range(count)]
        write_manifest(str(root / dataset / "train"), Manifest(dataset, "train", "caption", "synthetic", "CC0 1.0",
                                                               "open", entries))


def plan_state(root: str) -> tuple[list, int]:
    """What rank 0 holds to read an epoch from a mid-epoch position, for PLAN_WORLD ranks and again after
    a re-plan for PLAN_NEW_WORLD ranks: the shard lists, the streams, the epoch's plan, the resumed reads."""
    from biomedgpt.data.stream import ShardStream, batches_per_epoch, list_shards, plan_epoch, rank_reads, rank_shards

    groups = [(list_shards(root, ds, "train"), 1.0) for ds in ("pretrain_images", "pubmed_text")]
    per_epoch = batches_per_epoch(plan_epoch(groups, PLAN_EPOCH, 0), PLAN_WORLD, BATCH)
    batches = per_epoch * 2 // 5 + 1
    position = {"epoch": PLAN_EPOCH, "batches": batches,
                "rows_by_rank": [batches // 4 * 256 + 17 * r + 3 for r in range(PLAN_WORLD)]}
    held: list = [groups]
    for world in (PLAN_WORLD, PLAN_NEW_WORLD):
        stream = ShardStream(groups, rank=0, world=world, batch_size=BATCH, seed=0, preprocess={},
                             columns=["input_ids"], shuffle_buffer=256)
        stream.seek(position)
        mine = rank_shards(plan_epoch(groups, PLAN_EPOCH, 0), 0, world)
        reads, skip = rank_reads(mine, PLAN_EPOCH, stream.window_start)
        assert reads[0].offset + skip == stream.window_start, "resume does not start at the window"
        held.append((stream, mine, reads))
    return held, sum(s.samples for shards, _ in groups for s in shards)


def plan_point(root: str) -> dict:
    """One point of (d), in this (fresh) process: times and peak RSS untraced, then the state traced."""
    import resource
    import tracemalloc

    import biomedgpt.data.stream  # noqa: F401 - the rank's process has it (and torch) imported

    import_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    held, samples = plan_state(root)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shards = len(held[0][0][0]) + len(held[0][1][0])
    del held
    gc.collect()
    tracemalloc.start()
    held, _ = plan_state(root)
    traced_held, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"shards": shards, "samples": samples, "seconds": seconds, "import_mb": import_kib / 1024,
            "peak_mb": peak_kib / 1024, "traced_peak_mb": traced_peak / 2**20, "held_mb": traced_held / 2**20}


def plan_memory() -> dict:
    """(d): the 1x and 100x points, each in its own process."""
    points = {}
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        for x, shards in (("1x", PLAN_SHARDS), ("100x", PLAN_SHARDS * 100)):
            root = work / x
            write_plan_manifests(root, shards)
            out = subprocess.run([sys.executable, __file__, "--plan-point", str(root)], check=True,
                                 capture_output=True, text=True).stdout
            points[x] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, hundred = points["1x"], points["100x"]
    figures = {}
    for x, p in points.items():
        figures.update({f"plan_shards_{x}": p["shards"], f"plan_samples_{x}": p["samples"],
                        f"plan_seconds_{x}": round(p["seconds"], 3), f"plan_import_mb_{x}": round(p["import_mb"], 1),
                        f"plan_peak_mb_{x}": round(p["peak_mb"], 1),
                        f"plan_traced_peak_mb_{x}": round(p["traced_peak_mb"], 2),
                        f"plan_held_mb_{x}": round(p["held_mb"], 2)})
    figures["plan_memory_ratio_100x"] = round(hundred["peak_mb"] / one["peak_mb"], 3)
    figures["plan_held_bytes_per_shard_100x"] = round(hundred["held_mb"] * 2**20 / hundred["shards"])
    figures["plan_traced_peak_bytes_per_shard_100x"] = round(hundred["traced_peak_mb"] * 2**20 / hundred["shards"])
    return figures


def print_plan_memory(f: dict) -> None:
    print(f"(d) rank 0's planning state from manifests alone: read, plan an epoch for {PLAN_WORLD} ranks, resume "
          f"40% into it, re-plan for {PLAN_NEW_WORLD} ranks and resume (a fresh process per point)")
    print("| shards | samples | seconds | peak RSS MiB (import alone) | traced peak MiB | held MiB |")
    print("|---|---|---|---|---|---|")
    for x in ("1x", "100x"):
        print(f"| {x}: {f[f'plan_shards_{x}']:,} | {f[f'plan_samples_{x}']:,} | {f[f'plan_seconds_{x}']:.3f} | "
              f"{f[f'plan_peak_mb_{x}']:.1f} ({f[f'plan_import_mb_{x}']:.1f}) | {f[f'plan_traced_peak_mb_{x}']:.2f} | "
              f"{f[f'plan_held_mb_{x}']:.2f} |")
    print(f"| **100x / 1x** | | | **{f['plan_memory_ratio_100x']:.2f}x** (target <= 1.3x) | "
          f"{f['plan_traced_peak_bytes_per_shard_100x']:,} B/shard | {f['plan_held_bytes_per_shard_100x']:,} B/shard |")


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each pipeline, interleaved (best counts)")
    parser.add_argument("--only", choices=["plan"], help="run only (d), the planning state at 100x the shards")
    parser.add_argument("--plan-point", metavar="ROOT", help=argparse.SUPPRESS)  # one point of (d), in its process
    args = parser.parse_args()
    if args.plan_point:
        print(json.dumps(plan_point(args.plan_point)))
        return
    if args.only == "plan":
        plan = plan_memory()
        print()
        print_plan_memory(plan)
        print(json.dumps(plan))
        return

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        one, ten, tok_dir = build_data(work)
        ray.init(num_cpus=PROCESSES, include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        transform = transform_rates(args.repeat)
        platform_rates, baseline_rates = [], []
        platform_run(one, tok_dir)  # warm: Ray worker processes started, tokenizer cached
        gc.collect()  # no earlier execution may still hold objects while memory is sampled
        # memory: one epoch each of the 1x and the 10x shards, sampled
        _, n1, mem1 = platform_run(one, tok_dir, memory=True)
        gc.collect()
        _, n10, mem10 = platform_run(ten, tok_dir, memory=True)
        gc.collect()
        for _ in range(args.repeat):  # throughput: EPOCHS passes over the 1x shards, no sampling
            rate, n_base = baseline_run(one, tok_dir, EPOCHS)
            baseline_rates.append(rate)
            rate, n_platform, _ = platform_run(one, tok_dir, EPOCHS, min_rows=4096)  # the trainer's reading
            platform_rates.append(rate)
            gc.collect()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plan = plan_memory()

    platform, baseline = max(platform_rates), max(baseline_rates)
    gib = 2**30
    figures = {
        "image_size": IMAGE_SIZE, "batch": BATCH, "processes": PROCESSES,
        "samples_1x": n1, "samples_10x": n10, "throughput_samples": n_platform,
        "platform_samples_per_s": round(platform, 1), "baseline_samples_per_s": round(baseline, 1),
        "throughput_ratio": round(platform / baseline, 3),
        "paired_ratio_median": round(statistics.median(p / b for p, b in zip(platform_rates, baseline_rates)), 3),
        "platform_runs": [round(r, 1) for r in platform_rates], "baseline_runs": [round(r, 1) for r in baseline_rates],
        "peak_rss_gib_1x": round(mem1.peak_rss / gib, 3), "peak_rss_gib_10x": round(mem10.peak_rss / gib, 3),
        "peak_pss_gib_1x": round(mem1.peak_pss / gib, 3), "peak_pss_gib_10x": round(mem10.peak_pss / gib, 3),
        "peak_store_gib_1x": round(mem1.peak_store / gib, 3), "peak_store_gib_10x": round(mem10.peak_store / gib, 3),
        "memory_ratio_rss": round(mem10.peak_rss / mem1.peak_rss, 3),
        "memory_ratio_pss": round(mem10.peak_pss / mem1.peak_pss, 3),
        "memory_ratio_store": round(mem10.peak_store / mem1.peak_store, 3),
        "memory_samples": [mem1.samples, mem10.samples],
        "transform": transform,
        **plan,
    }
    print()
    print(f"(a) throughput, {EPOCHS} epochs of the 1x shards ({n_platform} samples), {IMAGE_SIZE} px, batch {BATCH}, "
          f"{PROCESSES} processes, best of {args.repeat}")
    print("| pipeline | samples/s |")
    print("|---|---|")
    print(f"| webdataset + DataLoader ({PROCESSES} workers), same preprocessing | {baseline:.1f} |")
    print(f"| platform: ShardStream (Ray Data, {PROCESSES} CPUs) | {platform:.1f} |")
    print(f"| **ratio** | **{figures['throughput_ratio']:.2f}x** (target >= 0.8x; median of the paired runs "
          f"{figures['paired_ratio_median']:.2f}x) |")
    print()
    print("(b) peak memory of the pipeline over one epoch")
    print("| shards | samples | RSS driver + ray:: workers GiB | PSS driver + Ray instance GiB | object store GiB |")
    print("|---|---|---|---|---|")
    for x, n in (("1x", n1), ("10x", n10)):
        print(f"| {x} | {n} | {figures[f'peak_rss_gib_{x}']:.3f} | {figures[f'peak_pss_gib_{x}']:.3f} | "
              f"{figures[f'peak_store_gib_{x}']:.3f} |")
    print(f"| **10x / 1x** | | **{figures['memory_ratio_rss']:.2f}x** | **{figures['memory_ratio_pss']:.2f}x** "
          f"(target <= 1.2x) | **{figures['memory_ratio_store']:.2f}x** |")
    print()
    t = transform
    print(f"(c) image transform alone, {t['images']} VQA-RAD JPEGs (mean {t['mean_kb']} KB, median "
          f"{t['median_megapixels']} MP) to {IMAGE_SIZE} px, one core")
    print("| transform | images/s per core |")
    print("|---|---|")
    print(f"| plain PIL decode + resize + normalise | {t['plain_pil_per_core']:.1f} |")
    print(f"| platform load_image (draft decode) | {t['platform_per_core']:.1f} (target >= 200) |")
    print()
    print_plan_memory(plan)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
