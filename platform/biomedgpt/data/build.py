"""Build WebDataset shards of one dataset from its native release: ``biomedgpt shards build``.

Two steps, so that the second can be fanned out to Ray tasks, one shard per task:

1. :func:`plan_split` reads a split's records through the dataset's converter and assigns them to
   shards deterministically (record order, ``shard_max_samples``, ``shard_max_bytes`` computed from
   the JSON and the image file sizes, no image is read). Each :class:`ShardPlan` is small and
   picklable (records as JSON bytes, images as references) and carries an ``input_sha256`` digest.
2. :func:`write_planned_shard` writes one planned shard (reads its images, writes the tar).

:func:`build_shards` runs both for every split and is restartable: a shard whose manifest entry
has the same ``input_sha256`` and whose file still has the recorded sha256 is kept, not
rewritten; the manifest is rewritten after every shard, so an interrupted build resumes where it
stopped; shards left over from a previous, larger plan are deleted.

``parallel=True`` (or ``workers=N``) sends the planned shards to Ray tasks instead
(:mod:`.ray_build`): same plans, same bytes, same manifests, same restart rules.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
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
    dropped: dict[str, int] = field(default_factory=dict)
    """Source records the converter left out on purpose, per reason (see ``Converter.drop``)."""

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
        dropped=dict(converter.dropped.get(split, {})),
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
    converter: str | None = None,
    progress: bool = True,
    parallel: bool = False,
    workers: int | None = None,
) -> BuildResult:
    """Convert ``dataset`` from its native release at ``source`` into shards under ``out``.

    Writes ``<out>/<dataset>/<split>/<dataset>-<split>-<n:06d>.tar`` and ``manifest.json`` per split
    and returns ``{split: Manifest}`` (a :class:`BuildResult`). ``splits``: which canonical splits
    (default: all present in the source). ``shard_max_samples``/``shard_max_bytes``: where shards
    are cut (bytes of the tar file). ``files``/``options``: converter file-role overrides and
    options (see the converter). ``licence``/``access`` override the converter's; ``spec`` (a
    :class:`~biomedgpt.data.dataset_spec.DatasetSpec`) supplies the converter, files, options,
    licence and access. ``converter`` names a generic converter (``ofa_tsv_vqa``, ``summarize_table``,
    ``dicom_folder`` ...) reading ``dataset``. Rerunning with the same input rewrites nothing.

    ``parallel=True`` writes the shards as Ray tasks (joining the running Ray cluster, or starting a
    local one); ``workers`` caps the shards in flight (default: twice the cluster's CPUs) and implies
    ``parallel``. The shards and manifests are byte-identical to the single-process build's.
    """
    if spec is not None:
        if spec.name != dataset:
            raise ValueError(f"{spec.path or 'dataset spec'}: describes {spec.name!r}, not {dataset!r}")
        if spec.source.converter is None and converter is None:
            raise ValueError(f"{spec.path or dataset}: {dataset} has no converter yet (source.converter: null): "
                             f"{spec.source.converter_note.strip()}")
        if converter is None or converter == spec.source.converter:
            # the spec's file roles and options belong to its converter; another converter
            # (e.g. --converter ofa_tsv_vqa for the official TSVs) gets only the caller's
            files = {**spec.source.files, **(files or {})}
            options = {**spec.source.options, **(options or {})}
        licence = licence or spec.licence
        access = access or spec.access
        converter = converter or spec.source.converter
    conv = open_converter(dataset, source, files, converter=converter, **(options or {}))
    licence = licence or conv.licence
    access = access or conv.access
    present = conv.splits()
    wanted = list(splits) if splits else present
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise ValueError(f"{dataset}: split(s) {unknown} not in {source} (present: {present})")

    result = BuildResult()
    if parallel or workers is not None:
        from .ray_build import SplitJob, write_splits_ray

        jobs = []
        for split in wanted:
            plan = plan_split(conv, split, out, shard_max_samples=shard_max_samples,
                              shard_max_bytes=shard_max_bytes, progress=progress)
            jobs.append(SplitJob(plan, new_manifest(plan, conv, source, licence, access, options or {},
                                                    shard_max_samples, shard_max_bytes), previous_entries(plan)))
        write_splits_ray(jobs, result, workers=workers, progress=progress)
        return result
    for split in wanted:
        plan = plan_split(conv, split, out, shard_max_samples=shard_max_samples,
                          shard_max_bytes=shard_max_bytes, progress=progress)
        manifest = new_manifest(plan, conv, source, licence, access, options or {}, shard_max_samples, shard_max_bytes)
        result[split] = _write_split(plan, manifest, previous_entries(plan), progress, result)
    return result


def previous_entries(plan: SplitPlan) -> dict[str, ShardEntry]:
    """The shard entries of an earlier build's manifest of this split (empty when there is none or
    it is unreadable, in which case every shard is rebuilt)."""
    try:
        previous = read_manifest(plan.url)
    except ShardError as err:
        if storage.exists(storage.join(plan.url, "manifest.json")):
            log.warning("%s; rebuilding every shard of %s/%s", err, plan.dataset, plan.split)
        return {}
    return {e.name: e for e in previous.shards}


def new_manifest(plan: SplitPlan, converter: Converter, source: str, licence: str, access: str,
                 options: Mapping[str, Any], shard_max_samples: int, shard_max_bytes: int) -> Manifest:
    """The (still empty, incomplete) manifest of a planned split: provenance, licence, converter notes."""
    notes: dict[str, Any] = {"converter": converter.name, "native_format": converter.native_format}
    if options:
        notes["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items())}
    if plan.skipped_missing_images:
        notes["skipped_missing_images"] = plan.skipped_missing_images
    if plan.dropped:
        notes["dropped"] = dict(sorted(plan.dropped.items()))
    return Manifest(
        dataset=plan.dataset, split=plan.split, native_split=plan.native_split, task=converter.task,
        source=str(source), licence=licence, access=access, shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes, complete=False, notes=notes,
    )


def keep_existing(url: str, shard: ShardPlan, old: ShardEntry | None) -> bool:
    """Whether the shard file at ``url`` can be kept: built from the same input (``input_sha256``)
    and still the file its manifest entry describes (size and sha256)."""
    return old is not None and old.input_sha256 == shard.input_sha256 and _existing_matches(url, old)


def finish_split(plan: SplitPlan, manifest: Manifest, result: BuildResult, written: int, kept: int,
                 progress: bool) -> Manifest:
    """Delete shards no longer in the plan, mark the manifest complete and write it."""
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
        dropped = f", {sum(plan.dropped.values())} dropped ({', '.join(f'{k}: {v}' for k, v in sorted(plan.dropped.items()))})" \
            if plan.dropped else ""
        print(f"{plan.dataset}/{plan.split}: {manifest.samples} samples in {len(manifest.shards)} shards "
              f"({manifest.bytes / 2**20:.1f} MiB): {written} written, {kept} kept{skipped}{dropped} -> {plan.url}",
              file=sys.stderr)
    return manifest


def _write_split(plan: SplitPlan, manifest: Manifest, old_entries: Mapping[str, ShardEntry], progress: bool,
                 result: BuildResult) -> Manifest:
    storage.makedirs(plan.url)
    written = kept = 0
    with _progress(progress, total=plan.samples, desc=f"{plan.dataset}/{plan.split}", unit="sample") as bar:
        for shard in plan.shards:
            url = storage.join(plan.url, shard.name)
            old = old_entries.get(shard.name)
            if keep_existing(url, shard, old):
                manifest.shards.append(old)
                result.kept.append(url)
                kept += 1
            else:
                manifest.shards.append(write_planned_shard(shard, plan.url))
                result.written.append(url)
                written += 1
                write_manifest(plan.url, manifest)  # progress survives an interruption
            bar.update(len(shard.samples))
    return finish_split(plan, manifest, result, written, kept, progress)


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
