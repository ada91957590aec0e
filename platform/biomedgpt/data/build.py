"""Build WebDataset shards of one dataset from its native release: ``biomedgpt shards build``.

Two steps, so that the second can be fanned out (to Ray tasks, later) one shard per task:

1. :func:`plan_split` reads a split's records through the dataset's converter and assigns them to
   shards deterministically (record order, ``shard_max_samples``, ``shard_max_bytes`` computed from
   the JSON and the image file sizes, no image is read). Each :class:`ShardPlan` is small and
   picklable (records as JSON bytes, images as references) and carries an ``input_sha256`` digest.
2. :func:`write_planned_shard` writes one planned shard (reads its images, writes the tar).

:func:`build_shards` runs both for every split and is restartable: a shard whose manifest entry
has the same ``input_sha256`` and whose file still has the recorded sha256 is kept, not
rewritten; the manifest is rewritten after every shard, so an interrupted build resumes where it
stopped; shards left over from a previous, larger plan are deleted.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from . import storage
from .converters import Converter, open_converter
from .converters.base import ImageRef
from .shards import (DEFAULT_SHARD_MAX_BYTES, DEFAULT_SHARD_MAX_SAMPLES, Manifest, ShardBudget, ShardEntry,
                     ShardError, ShardSample, encode_record, file_sha256, image_as_stored, input_digest_update,
                     make_key, read_manifest, shard_name, split_url, tar_member_size, write_manifest, write_shard)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedSample:
    """A record ready for a shard: key, encoded JSON, image reference and its planned size."""

    key: str
    record_json: bytes
    image: ImageRef | None
    image_size: int | None

    @property
    def member_bytes(self) -> int:
        """Bytes the sample's members take in the tar (exact for JPEG/PNG sources)."""
        size = tar_member_size(len(self.record_json))
        return size + (tar_member_size(self.image_size) if self.image_size is not None else 0)


@dataclass(frozen=True)
class ShardPlan:
    """The samples of one shard, in order, and the digest of what it is built from."""

    index: int
    name: str
    samples: tuple[PlannedSample, ...]
    input_sha256: str


@dataclass
class SplitPlan:
    """Every shard of one split, plus what the manifest needs to say about it."""

    dataset: str
    split: str
    native_split: str
    url: str
    shards: list[ShardPlan]
    skipped_missing_images: int = 0

    @property
    def samples(self) -> int:
        return sum(len(s.samples) for s in self.shards)


class BuildResult(dict):
    """``{split: Manifest}`` returned by :func:`build_shards`, with what the build did to the files:
    ``written``, ``kept`` and ``removed`` shard URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []
        self.kept: list[str] = []
        self.removed: list[str] = []


def plan_split(
    converter: Converter,
    split: str,
    out: str,
    *,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    progress: bool = False,
) -> SplitPlan:
    """Assign the records of one split to shards (deterministic: same input, same plan)."""
    budget = ShardBudget(shard_max_samples, shard_max_bytes)
    dataset = converter.dataset
    shards: list[ShardPlan] = []
    current: list[PlannedSample] = []
    keys: dict[str, str] = {}

    def close_shard() -> None:
        digest = hashlib.sha256()
        for sample in current:
            input_digest_update(digest, sample.key, sample.record_json, sample.image_size)
        index = len(shards)
        shards.append(ShardPlan(index, shard_name(dataset, split, index), tuple(current), digest.hexdigest()))
        current.clear()
        budget.reset()

    with _progress(progress, desc=f"plan {dataset}/{split}", unit="rec") as bar:
        for source_record in converter.records(split):
            record = source_record.record
            key = make_key(dataset, record["id"])
            if key in keys:
                raise ShardError(f"{dataset}/{split}: records {keys[key]!r} and {record['id']!r} map to the same key {key!r}")
            keys[key] = record["id"]
            image = source_record.image
            sample = PlannedSample(key, encode_record(record), image, None if image is None else image.size)
            if not budget.fits(sample.member_bytes):
                close_shard()
            budget.add(sample.member_bytes)
            current.append(sample)
            bar.update(1)
    if current:
        close_shard()
    return SplitPlan(
        dataset=dataset, split=split, native_split=converter.native_split(split),
        url=split_url(out, dataset, split), shards=shards,
        skipped_missing_images=len(converter.skipped.get(split, [])),
    )


def write_planned_shard(plan: ShardPlan, split_dir: str) -> ShardEntry:
    """Write one planned shard into ``split_dir``: read its images, write the tar. Self-contained
    (plan in, manifest entry out), so it can run in another process or a Ray task."""

    def samples() -> Iterable[ShardSample]:
        for sample in plan.samples:
            if sample.image is None:
                yield ShardSample(sample.key, sample.record_json)
                continue
            data, ext = image_as_stored(sample.image.read(), sample.image.name)
            yield ShardSample(sample.key, sample.record_json, data, ext)

    return write_shard(storage.join(split_dir, plan.name), samples(), input_sha256=plan.input_sha256)


def _existing_matches(url: str, entry: ShardEntry) -> bool:
    try:
        sha, nbytes = file_sha256(url)
    except FileNotFoundError:
        return False
    return nbytes == entry.bytes and sha == entry.sha256


def build_shards(
    dataset: str,
    source: str,
    out: str,
    splits: Sequence[str] | None = None,
    *,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    files: Mapping[str, str] | None = None,
    options: Mapping[str, Any] | None = None,
    licence: str | None = None,
    access: str | None = None,
    spec: Any = None,
    progress: bool = True,
) -> BuildResult:
    """Convert ``dataset`` from its native release at ``source`` into shards under ``out``.

    Writes ``<out>/<dataset>/<split>/<dataset>-<split>-<n:06d>.tar`` and ``manifest.json`` per split
    and returns ``{split: Manifest}`` (a :class:`BuildResult`). ``splits``: which canonical splits
    (default: all present in the source). ``shard_max_samples``/``shard_max_bytes``: where shards
    are cut (bytes of the tar file). ``files``/``options``: converter file-role overrides and
    options (see the converter). ``licence``/``access`` override the converter's; ``spec`` (a
    :class:`~biomedgpt.data.dataset_spec.DatasetSpec`) supplies files, options, licence and access.
    Rerunning with the same input rewrites nothing.
    """
    if spec is not None:
        files = {**spec.source.files, **(files or {})}
        options = {**spec.source.options, **(options or {})}
        licence = licence or spec.licence
        access = access or spec.access
    converter = open_converter(dataset, source, files, **(options or {}))
    licence = licence or converter.licence
    access = access or converter.access
    present = converter.splits()
    wanted = list(splits) if splits else present
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise ValueError(f"{dataset}: split(s) {unknown} not in {source} (present: {present})")

    result = BuildResult()
    for split in wanted:
        plan = plan_split(converter, split, out, shard_max_samples=shard_max_samples,
                          shard_max_bytes=shard_max_bytes, progress=progress)
        result[split] = _write_split(plan, converter, source, licence, access, options or {},
                                     shard_max_samples, shard_max_bytes, progress, result)
    return result


def _write_split(plan: SplitPlan, converter: Converter, source: str, licence: str, access: str,
                 options: Mapping[str, Any], shard_max_samples: int, shard_max_bytes: int, progress: bool,
                 result: BuildResult) -> Manifest:
    try:
        previous = read_manifest(plan.url)
        old_entries = {e.name: e for e in previous.shards}
    except ShardError as err:
        if storage.exists(storage.join(plan.url, "manifest.json")):
            log.warning("%s; rebuilding every shard of %s/%s", err, plan.dataset, plan.split)
        old_entries = {}
    notes: dict[str, Any] = {"converter": converter.name, "native_format": converter.native_format}
    if options:
        notes["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items())}
    if plan.skipped_missing_images:
        notes["skipped_missing_images"] = plan.skipped_missing_images
    manifest = Manifest(
        dataset=plan.dataset, split=plan.split, native_split=plan.native_split, task=converter.task,
        source=str(source), licence=licence, access=access, shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes, complete=False, notes=notes,
    )
    storage.makedirs(plan.url)
    written = kept = 0
    with _progress(progress, total=plan.samples, desc=f"{plan.dataset}/{plan.split}", unit="sample") as bar:
        for shard in plan.shards:
            url = storage.join(plan.url, shard.name)
            old = old_entries.get(shard.name)
            if old is not None and old.input_sha256 == shard.input_sha256 and _existing_matches(url, old):
                manifest.shards.append(old)
                result.kept.append(url)
                kept += 1
            else:
                manifest.shards.append(write_planned_shard(shard, plan.url))
                result.written.append(url)
                written += 1
                write_manifest(plan.url, manifest)  # progress survives an interruption
            bar.update(len(shard.samples))
    planned = {s.name for s in plan.shards}
    for rel in storage.list_files(plan.url, recursive=False):
        if rel.endswith(".tar") and rel not in planned:
            stale = storage.join(plan.url, rel)
            storage.remove(stale)
            result.removed.append(stale)
    manifest.complete = True
    write_manifest(plan.url, manifest)
    if progress:
        skipped = f", {plan.skipped_missing_images} records skipped (missing images)" if plan.skipped_missing_images else ""
        print(f"{plan.dataset}/{plan.split}: {manifest.samples} samples in {len(manifest.shards)} shards "
              f"({manifest.bytes / 2**20:.1f} MiB): {written} written, {kept} kept{skipped} -> {plan.url}",
              file=sys.stderr)
    return manifest


class _progress:
    """tqdm when asked for and available, else a silent stand-in with the same ``update``."""

    def __init__(self, enabled: bool, **kwargs: Any):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(leave=False, **kwargs)
            except ImportError:  # tqdm is optional: the summary line is printed anyway
                self._bar = None

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "_progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
