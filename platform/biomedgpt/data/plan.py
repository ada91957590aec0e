"""The two steps of a shard build, and what a build may skip: below both :mod:`.build` (one process) and
:mod:`.ray_build` (one Ray task per shard), which import them.

1. :func:`plan_split` reads a split's records through the dataset's converter and assigns them to
   shards deterministically (record order, ``shard_max_samples``, ``shard_max_bytes`` computed from
   the JSON and the image file sizes, no image is read). Each :class:`ShardPlan` is small and
   picklable (records as JSON bytes, images as references) and carries an ``input_sha256`` digest.
2. :func:`write_planned_shard` writes one planned shard (reads its images, writes the tar), and with a
   :class:`CodesPlan` the VQGAN codes of every image beside it (``<key>.codes.npy``: the image-infilling
   recipe's 16 x 16 grid, row-major, int16), encoded in batches by a tokenizer loaded once per process.

Defective records: the converter skips a record it cannot use (empty answer or question, missing
image, unreadable row) and names it (:class:`~.converters.base.RecordDefect`); a planned record whose
image cannot be used (a DICOM that does not convert, invalid base64, not an image) is left out when
its shard is written and named in the shard's manifest entry (``skipped``). Each split may lose at
most its error budget (:class:`~.error_budget.ErrorBudget`, default 1% of its records): past it the
build stops with :class:`BadRecordsError`, before writing when the plan already shows it. Every
skipped record is printed (the first few) and listed in the split's manifest (``notes.defects``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..console import Progress
from ..model.vqgan import VQGANError, VQGANTokenizer, codes_npy
from . import storage
from .converters import Converter
from .converters.base import ImageRef, RecordDefect, UnusableImageError
from .error_budget import ErrorBudget
from .shards import (DEFAULT_SHARD_MAX_BYTES, DEFAULT_SHARD_MAX_SAMPLES, Manifest, ShardBudget, ShardEntry,
                     ShardError, ShardSample, encode_record, image_as_stored, input_digest_update, make_key,
                     shard_name, split_url, tar_member_size, write_manifest, write_shard)

log = logging.getLogger(__name__)

#: Skipped records printed one by one per split (the manifest lists up to MANIFEST_DEFECTS of them).
PRINTED_DEFECTS = 10
MANIFEST_DEFECTS = 100


class BadRecordsError(ValueError):
    """A split has more unusable source records than its error budget allows; the message names the
    counts, the budget, how to change it, and the first records."""


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
    defects: list[RecordDefect] = field(default_factory=list)
    """Source records skipped because they cannot be used (found while planning)."""
    budget: ErrorBudget = field(default_factory=ErrorBudget.for_build)

    @property
    def samples(self) -> int:
        return sum(len(s.samples) for s in self.shards)

    @property
    def records(self) -> int:
        """The split's source records: planned samples and the ones skipped while planning."""
        return self.samples + len(self.defects)

    @property
    def allowance(self) -> int:
        return self.budget.allowance(self.records)

    def all_defects(self, entries: Iterable[ShardEntry]) -> list[RecordDefect]:
        """The plan's defects and those met writing ``entries`` (in shard order)."""
        return self.defects + [RecordDefect.from_json(s) for e in entries for s in e.skipped]

    def check_budget(self, entries: Iterable[ShardEntry]) -> None:
        """Raise :class:`BadRecordsError` when the defects so far exceed the split's budget."""
        defects = self.all_defects(entries)
        if len(defects) > self.allowance:
            raise BadRecordsError(
                f"{self.dataset}/{self.split}: {len(defects)} of {self.records} source records cannot be used, more "
                f"than the {self.allowance} its error budget allows ({self.budget.describe()}; set "
                f"source.max_bad_fraction in the dataset spec or --max-bad-fraction to tolerate more). "
                + "; ".join(d.describe() for d in defects[:5]) + (" ..." if len(defects) > 5 else ""))

    def defects_note(self, entries: Iterable[ShardEntry]) -> dict[str, Any]:
        """``notes.defects`` of the manifest: counts, the budget and the first records."""
        defects = self.all_defects(entries)
        by_field: dict[str, int] = {}
        for d in defects:
            by_field[d.field or "(record)"] = by_field.get(d.field or "(record)", 0) + 1
        return {"count": len(defects), "records": self.records, "allowed": self.allowance,
                "budget": self.budget.describe(), "by_field": dict(sorted(by_field.items())),
                "skipped": [d.to_json() for d in defects[:MANIFEST_DEFECTS]]}


class BuildResult(dict):
    """``{split: Manifest}`` returned by :func:`~.build.build_shards`, with what the build did to the
    files: ``written``, ``kept`` and ``removed`` shard URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []
        self.kept: list[str] = []
        self.removed: list[str] = []


@dataclass(frozen=True)
class CodesPlan:
    """VQGAN codes to store beside each image of a build: the tokenizer's model directory, its fingerprint
    (weights and recipe: part of every shard's ``input_sha256``, so a build with other codes, or none,
    rewrites the shard), images per forward pass, and the torch device (None: cuda when available)."""

    model_dir: str
    fingerprint: str
    batch_size: int = 32
    device: str | None = None

    @classmethod
    def load(cls, model_dir: str, batch_size: int = 32, device: str | None = None) -> "CodesPlan":
        """Check the model directory now (on the driver: a bad one fails before any shard is written)."""
        if batch_size < 1:
            raise ValueError(f"codes batch size must be >= 1, got {batch_size}")
        model_dir = os.path.abspath(str(model_dir))  # Ray workers may run elsewhere than the driver's cwd
        return cls(model_dir, vqgan_tokenizer(model_dir, "cpu").fingerprint, batch_size, device)

    def note(self) -> dict[str, Any]:
        """The manifest's ``notes.codes``."""
        tok = vqgan_tokenizer(self.model_dir, "cpu")
        return {"member": "codes.npy", "model": self.model_dir, "fingerprint": self.fingerprint,
                "weights_sha256": tok.meta.get("weights_sha256"), "n_embed": tok.config.n_embed,
                "recipe": "resize to 256 x 256 bicubic, centre box (64, 64, 192, 192), values 2x-1",
                "grid": [128 // tok.config.factor] * 2, "order": "row-major", "dtype": "int16",
                "codes": "argmax of the Gumbel quantiser's logits (deterministic)"}


_VQGAN: dict[tuple[str, str], VQGANTokenizer] = {}


def vqgan_tokenizer(model_dir: str, device: str | None = None) -> VQGANTokenizer:
    """The VQGAN tokenizer of ``model_dir``, loaded once per process and device."""
    key = (model_dir, str(device))
    if key not in _VQGAN:
        _VQGAN[key] = VQGANTokenizer.from_pretrained(model_dir, device=device)
    return _VQGAN[key]


def with_codes(plan: SplitPlan, codes: CodesPlan | None) -> SplitPlan:
    """The plan whose shards also carry ``codes``: each shard's ``input_sha256`` covers the codes' fingerprint."""
    if codes is None:
        return plan
    plan.shards = [dataclasses.replace(s, input_sha256=hashlib.sha256(
        f"{s.input_sha256}|codes|{codes.fingerprint}".encode()).hexdigest()) for s in plan.shards]
    return plan


def report_defects(dataset: str, split: str, defects: Sequence[RecordDefect], progress: bool, *,
                   already: int = 0) -> None:
    """Name skipped records on the console (stderr with ``progress``, else the log): the first
    :data:`PRINTED_DEFECTS` of a split one by one (``already``: how many were named before)."""
    for i, defect in enumerate(defects, start=already):
        if i < PRINTED_DEFECTS:
            line = f"{dataset}/{split}: skipped record: {defect.describe()}"
        elif i == PRINTED_DEFECTS:
            line = f"{dataset}/{split}: more records skipped (every one is listed in the manifest's notes.defects)"
        else:
            break
        if progress:
            print(line, file=sys.stderr)
        else:
            log.warning("%s", line)


def plan_split(
    converter: Converter,
    split: str,
    out: str,
    *,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    budget: ErrorBudget | None = None,
    progress: bool = False,
) -> SplitPlan:
    """Assign the records of one split to shards (deterministic: same input, same plan). Records the
    converter skipped are named; more than ``budget`` allows (default 1% of the split) raises
    :class:`BadRecordsError`."""
    shard_budget = ShardBudget(shard_max_samples, shard_max_bytes)
    dataset = converter.dataset
    shards: list[ShardPlan] = []
    current: list[PlannedSample] = []
    keys: dict[str, str] = {}
    sized_defects: list[RecordDefect] = []

    def close_shard() -> None:
        digest = hashlib.sha256()
        for sample in current:
            input_digest_update(digest, sample.key, sample.record_json, sample.image_size)
        index = len(shards)
        shards.append(ShardPlan(index, shard_name(dataset, split, index), tuple(current), digest.hexdigest()))
        current.clear()
        shard_budget.reset()

    with Progress(None, f"plan {dataset}/{split}", unit="record", enabled=progress, stream=sys.stderr) as bar:
        for source_record in converter.records(split):
            record = source_record.record
            key = make_key(dataset, record["id"])
            if key in keys:
                raise ShardError(f"{dataset}/{split}: records {keys[key]!r} and {record['id']!r} map to the same key {key!r}")
            keys[key] = record["id"]
            image = source_record.image
            try:
                image_size = None if image is None else image.size  # MedMNIST arrays are encoded here
            except UnusableImageError as err:
                sized_defects.append(RecordDefect.from_error(err, record_id=str(record["id"])))
                continue
            sample = PlannedSample(key, encode_record(record), image, image_size)
            if not shard_budget.fits(sample.member_bytes):
                close_shard()
            shard_budget.add(sample.member_bytes)
            current.append(sample)
            bar.update(1)
    if current:
        close_shard()
    plan = SplitPlan(
        dataset=dataset, split=split, native_split=converter.native_split(split),
        url=split_url(out, dataset, split), shards=shards,
        skipped_missing_images=len(converter.skipped.get(split, [])),
        dropped=dict(converter.dropped.get(split, {})),
        defects=converter.defects_of(split) + sized_defects,
        budget=budget or ErrorBudget.for_build(),
    )
    report_defects(dataset, split, plan.defects, progress)
    plan.check_budget(())
    return plan


def _record_id(record_json: bytes) -> str | None:
    try:
        return str(json.loads(record_json)["id"])
    except (ValueError, KeyError, TypeError):
        return None


def write_planned_shard(plan: ShardPlan, split_dir: str, codes: CodesPlan | None = None,
                        tokenizer: VQGANTokenizer | None = None) -> ShardEntry:
    """Write one planned shard into ``split_dir``: read its images, write the tar. Self-contained
    (plan in, manifest entry out), so it can run in another process or a Ray task. A sample whose
    image cannot be used is left out and named in the entry's ``skipped``; any other failure (an
    image gone since planning, storage errors) raises. With ``codes``, every image's VQGAN codes are
    stored beside it (``tokenizer``: the loaded one, else loaded once per process)."""
    skipped: list[dict[str, Any]] = []
    image_names: dict[str, str] = {}

    def samples() -> Iterable[ShardSample]:
        if codes is None:
            yield from plain()
            return
        tok = tokenizer or vqgan_tokenizer(codes.model_dir, codes.device)
        pending: list[ShardSample] = []

        def flush() -> Iterable[ShardSample]:
            with_image = [s for s in pending if s.image is not None]
            grids: dict[str, Any] = {}
            try:
                for s, grid in zip(with_image, tok.encode([s.image for s in with_image], batch_size=codes.batch_size,
                                                          names=[s.key for s in with_image])):
                    grids[s.key] = grid
            except VQGANError:  # one image PIL cannot decode: find it, encode the others
                for s in with_image:
                    try:
                        grids[s.key] = tok.encode([s.image], names=[s.key])[0]
                    except VQGANError as err:
                        name = image_names[s.key]
                        skipped.append(RecordDefect(file=name, reason=f"no VQGAN codes: {err}".replace(f"{s.key}: ", ""),
                                                    id=_record_id(s.record)).to_json())
            for s in pending:
                if s.image is None:
                    yield s
                elif s.key in grids:
                    yield dataclasses.replace(s, extras={**s.extras, "codes.npy": codes_npy(grids[s.key])})
            pending.clear()

        for sample in plain():
            pending.append(sample)
            if len(pending) >= codes.batch_size:
                yield from flush()
        yield from flush()

    def plain() -> Iterable[ShardSample]:
        for sample in plan.samples:
            if sample.image is None:
                yield ShardSample(sample.key, sample.record_json)
                continue
            try:
                data, ext = image_as_stored(sample.image.read(), sample.image.name)
            except UnusableImageError as err:
                skipped.append(RecordDefect.from_error(err, record_id=_record_id(sample.record_json)).to_json())
                continue
            except ShardError as err:  # image_as_stored: bytes that are no image at all
                skipped.append(RecordDefect(file=sample.image.name, reason=str(err).removeprefix(f"{sample.image.name}: "),
                                            id=_record_id(sample.record_json)).to_json())
                continue
            image_names[sample.key] = sample.image.name
            yield ShardSample(sample.key, sample.record_json, data, ext)

    entry = write_shard(storage.join(split_dir, plan.name), samples(), input_sha256=plan.input_sha256)
    return dataclasses.replace(entry, skipped=tuple(skipped)) if skipped else entry


def finish_split(plan: SplitPlan, manifest: Manifest, result: BuildResult, written: int, kept: int,
                 progress: bool) -> Manifest:
    """Delete shards no longer in the plan, mark the manifest complete and write it."""
    planned = {s.name for s in plan.shards}
    for rel in storage.list_files(plan.url, recursive=False):
        if rel.endswith(".tar") and rel not in planned:
            stale = storage.join(plan.url, rel)
            storage.remove(stale)
            result.removed.append(stale)
    defects = plan.defects_note(manifest.shards)
    if defects["count"]:
        manifest.notes["defects"] = defects
    else:
        manifest.notes.pop("defects", None)
    manifest.complete = True
    write_manifest(plan.url, manifest)
    if progress:
        skipped = f", {plan.skipped_missing_images} records skipped (missing images)" if plan.skipped_missing_images else ""
        dropped = f", {sum(plan.dropped.values())} dropped ({', '.join(f'{k}: {v}' for k, v in sorted(plan.dropped.items()))})" \
            if plan.dropped else ""
        bad = f", {defects['count']} unusable records skipped (budget {defects['allowed']})" if defects["count"] else ""
        print(f"{plan.dataset}/{plan.split}: {manifest.samples} samples in {len(manifest.shards)} shards "
              f"({manifest.bytes / 2**20:.1f} MiB): {written} written, {kept} kept{skipped}{dropped}{bad} -> {plan.url}",
              file=sys.stderr)
    return manifest
