"""Build WebDataset shards of one dataset from its native release: ``biomedgpt shards build``.

:func:`build_shards` plans every split and writes its shards (:mod:`.plan`: the two steps, and the
error budget for records a converter cannot use), and is restartable: a shard whose manifest entry
has the same ``input_sha256`` and whose file still has the recorded sha256 is kept, not rewritten;
the manifest is rewritten after every shard, so an interrupted build resumes where it stopped; shards
left over from a previous, larger plan are deleted.

``parallel=True`` (or ``workers=N``) sends the planned shards to Ray tasks instead
(:mod:`.ray_build`): same plans, same bytes, same manifests, same restart rules.

VQGAN codes (image infilling's targets): with ``codes=MODEL_DIR`` (``--codes``; or the dataset spec's
``source.codes``) every image gets a ``<key>.codes.npy`` member, the recipe's 16 x 16 grid of the
tokenizer's codes; on Ray they are computed by a Ray Data stage whose actor pool loads the tokenizer once
per actor (a GPU each when the cluster has them). The codes' fingerprint is part of each shard's
``input_sha256``, so the restart rules hold (a build with other codes, or none, rewrites the shard). A
dataset whose records serve only objectives that need codes (``tasks.pretrain.needs_codes``: image
folders) built without a VQGAN is said to be useless for pretraining as it is.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping, Sequence

from ..console import Progress
from ..tasks.pretrain import needs_codes
from . import storage
from .converters import Converter, open_converter
from .error_budget import ErrorBudget
from .plan import (BadRecordsError, BuildResult, CodesPlan, PlannedSample, ShardPlan, SplitPlan, finish_split,
                   plan_split, report_defects, with_codes, write_planned_shard)
from .ray_build import SplitJob, write_splits_ray
from .shards import (DEFAULT_SHARD_MAX_BYTES, DEFAULT_SHARD_MAX_SAMPLES, Manifest, ShardEntry, ShardError,
                     file_sha256, read_manifest, write_manifest)

log = logging.getLogger(__name__)

__all__ = ["BadRecordsError", "BuildResult", "CodesPlan", "PlannedSample", "ShardPlan", "SplitPlan", "build_shards",
           "keep_existing", "new_manifest", "plan_split", "previous_entries", "write_planned_shard"]


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
    max_bad_fraction: float | None = None,
    codes: str | None = None,
    codes_batch_size: int = 32,
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

    Source records that cannot be used are skipped and named (console, manifest ``notes.defects``); a
    split with more of them than ``max_bad_fraction`` of its records (default: the spec's
    ``source.max_bad_fraction``, else 1%) raises :class:`~.plan.BadRecordsError`.
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
        if max_bad_fraction is None:
            max_bad_fraction = getattr(spec.source, "max_bad_fraction", None)
        codes = codes or getattr(spec.source, "codes", None)
    codes_plan = CodesPlan.load(codes, batch_size=codes_batch_size) if codes else None
    budget = ErrorBudget.for_build(max_bad_fraction)
    conv = open_converter(dataset, source, files, converter=converter, **(options or {}))
    licence = licence or conv.licence
    access = access or conv.access
    present = conv.splits()
    wanted = list(splits) if splits else present
    unknown = [s for s in wanted if s not in present]
    if unknown:
        raise ValueError(f"{dataset}: split(s) {unknown} not in {source} (present: {present})")

    if codes_plan is None and needs_codes(conv.task):
        line = (f"{dataset}: its {conv.task!r} records serve only image infilling, whose targets are VQGAN codes: "
                "built without them they cannot be trained on (pass --codes MODEL_DIR, a VQGAN from "
                "`biomedgpt vqgan convert`, or set source.codes in its dataset spec)")
        if progress:
            print(line, file=sys.stderr)
        else:
            log.warning("%s", line)

    def planned(split: str) -> tuple[SplitPlan, Manifest]:
        plan = with_codes(plan_split(conv, split, out, shard_max_samples=shard_max_samples,
                                     shard_max_bytes=shard_max_bytes, budget=budget, progress=progress), codes_plan)
        manifest = new_manifest(plan, conv, source, licence, access, options or {}, shard_max_samples, shard_max_bytes)
        if codes_plan is not None:
            manifest.notes["codes"] = codes_plan.note()
        return plan, manifest

    result = BuildResult()
    if parallel or workers is not None:
        jobs = []
        for split in wanted:
            plan, manifest = planned(split)
            jobs.append(SplitJob(plan, manifest, previous_entries(plan)))
        write_splits_ray(jobs, result, workers=workers, progress=progress, codes=codes_plan)
        return result
    for split in wanted:
        plan, manifest = planned(split)
        result[split] = _write_split(plan, manifest, previous_entries(plan), progress, result, codes_plan)
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


def _write_split(plan: SplitPlan, manifest: Manifest, old_entries: Mapping[str, ShardEntry], progress: bool,
                 result: BuildResult, codes: CodesPlan | None = None) -> Manifest:
    storage.makedirs(plan.url)
    written = kept = 0
    named = len(plan.defects)
    with Progress(plan.samples, f"write {plan.dataset}/{plan.split}", unit="sample", enabled=progress,
                  stream=sys.stderr) as bar:
        for shard in plan.shards:
            url = storage.join(plan.url, shard.name)
            old = old_entries.get(shard.name)
            if keep_existing(url, shard, old):
                entry = old
                manifest.shards.append(old)
                result.kept.append(url)
                kept += 1
            else:
                entry = write_planned_shard(shard, plan.url, codes)
                manifest.shards.append(entry)
                result.written.append(url)
                written += 1
                write_manifest(plan.url, manifest)  # progress survives an interruption
            bar.update(len(shard.samples))
            if entry.skipped:
                report_defects(plan.dataset, plan.split, plan.all_defects([entry])[len(plan.defects):], progress,
                               already=named)
                named += len(entry.skipped)
                plan.check_budget(manifest.shards)  # the manifest stays incomplete: a rerun keeps these shards
    return finish_split(plan, manifest, result, written, kept, progress)
