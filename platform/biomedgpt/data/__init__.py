"""The data room: storage URLs, WebDataset shards + manifests, native-format converters, builds.

    storage        URLs (local, file://, s3://) -> fsspec / pyarrow filesystems, webdataset s3 opener
    shards         ShardWriter, manifest.json, read_manifest, verify_shards
    converters/    one module per native dataset format + the registry (CONVERTERS); dicom (DICOM ->
                   8-bit PNG), tables (CSV/TSV/JSONL/JSON/XLSX rows), ofa_tsv (the official TSVs)
    plan           the build's two steps (plan_split, write_planned_shard) and its error budget
    build          build_shards: native release -> shards, restartable
    ray_build      the same build with one Ray task per shard (build_shards(parallel=True))
    error_budget   how much bad data the build and the training stream may skip
    inspect        inspect_shards: counts and sample records of built shards
    dataset_spec   typed loader/validator for datasets_spec/*.yaml

Only ``ray_build`` (and the training pipeline) import Ray, on first use; names below are imported
on first use to keep ``import biomedgpt.data`` cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_shards": "build",
    "plan_split": "plan",
    "write_planned_shard": "plan",
    "inspect_shards": "inspect",
    "ShardWriter": "shards",
    "ShardSample": "shards",
    "Manifest": "shards",
    "read_manifest": "shards",
    "verify_shards": "shards",
    "CONVERTERS": "converters",
    "open_converter": "converters",
    "DatasetSpec": "dataset_spec",
    "load_dataset_spec": "dataset_spec",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
