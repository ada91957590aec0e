"""Look inside built shards: ``biomedgpt shards inspect URL``.

:func:`inspect_shards` reads the manifest(s) at or below a URL (a split, a dataset or a whole shard
root) and the first few samples of each split, and returns counts and those samples' records
with a description of their images (format, bytes, pixel size) and of their VQGAN codes (``codes.npy``:
shape, dtype, the first codes), and what the manifest says of how the codes were made.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from . import storage
from .shards import MANIFEST_NAME, Manifest, find_manifests, read_manifest, read_shard


@dataclass
class SplitSummary:
    """One split: its manifest and up to ``n`` sample records (with ``__image__`` descriptions)."""

    url: str
    manifest: Manifest
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.manifest.dataset}/{self.manifest.split}"


@dataclass
class ShardsSummary:
    """Every split found under a URL; :meth:`format` renders it for a terminal."""

    url: str
    splits: list[SplitSummary]

    @property
    def counts(self) -> dict[str, int]:
        """``{"dataset/split": samples}``."""
        return {s.name: s.manifest.samples for s in self.splits}

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "splits": {
                s.name: {
                    "url": s.url,
                    "samples": s.manifest.samples,
                    "shards": len(s.manifest.shards),
                    "bytes": s.manifest.bytes,
                    "complete": s.manifest.complete,
                    "licence": s.manifest.licence,
                    "access": s.manifest.access,
                    "codes": s.manifest.notes.get("codes"),
                    "examples": s.examples,
                }
                for s in self.splits
            },
        }

    def format(self) -> str:
        if not self.splits:
            return f"{self.url}: no {MANIFEST_NAME} found"
        lines = []
        for s in self.splits:
            m = s.manifest
            state = "" if m.complete else "  [INCOMPLETE]"
            lines.append(f"{s.name}: {m.samples} samples in {len(m.shards)} shards, {m.bytes / 2**20:.1f} MiB, "
                         f"task {m.task}, {m.access}, licence {m.licence}{state}")
            note = m.notes.get("codes")
            if isinstance(note, dict):
                lines.append(f"  codes: {note.get('member', 'codes.npy')} beside each image, "
                             f"{'x'.join(str(g) for g in note.get('grid', []))} {note.get('order', '')} from "
                             f"{note.get('model')} (weights sha256 {str(note.get('weights_sha256'))[:12]})")
            for example in s.examples:
                image = example.get("__image__")
                record = {k: v for k, v in example.items() if k not in ("__key__", "__image__", "__codes__")}
                lines.append(f"  {example['__key__']}: {json.dumps(record, ensure_ascii=False)}")
                if image:
                    size = f" {image['width']}x{image['height']} {image['mode']}" if "width" in image else ""
                    lines.append(f"    image: {image['format']}, {image['bytes']} bytes{size}")
                codes = example.get("__codes__")
                if codes:
                    what = (f"{'x'.join(map(str, codes['shape']))} {codes['dtype']}: {' '.join(map(str, codes['first']))} ..."
                            if "shape" in codes else codes.get("error"))
                    lines.append(f"    codes: {what}")
        return "\n".join(lines)


def _describe_image(ext: str, data: bytes) -> dict[str, Any]:
    info: dict[str, Any] = {"format": ext, "bytes": len(data)}
    try:
        with Image.open(io.BytesIO(data)) as image:  # header only: no full decode
            info.update(width=image.width, height=image.height, mode=image.mode)
    except Exception as err:  # a broken image is worth showing, not worth crashing over
        info["error"] = f"{type(err).__name__}: {err}"
    return info


def _describe_codes(data: bytes) -> dict[str, Any]:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        return {"shape": list(arr.shape), "dtype": str(arr.dtype), "first": [int(c) for c in arr.reshape(-1)[:8]]}
    except Exception as err:  # a broken member is worth showing, not worth crashing over
        return {"error": f"{type(err).__name__}: {err}"}


def inspect_shards(url: str, n: int = 3) -> ShardsSummary:
    """Counts per split and the first ``n`` samples of each split found at or below ``url``."""
    splits = []
    for where in find_manifests(url):
        manifest = read_manifest(where)
        directory = where[: -len(MANIFEST_NAME)].rstrip("/")
        examples: list[dict[str, Any]] = []
        for entry in manifest.shards:
            if len(examples) >= n:
                break
            for sample in read_shard(storage.join(directory, entry.name)):
                if len(examples) >= n:
                    break
                example: dict[str, Any] = {"__key__": sample["__key__"]}
                if "json" in sample:
                    example.update(json.loads(sample["json"]))
                for ext in ("jpg", "png"):
                    if ext in sample:
                        example["__image__"] = _describe_image(ext, sample[ext])
                if "codes.npy" in sample:
                    example["__codes__"] = _describe_codes(sample["codes.npy"])
                examples.append(example)
        splits.append(SplitSummary(directory, manifest, examples))
    return ShardsSummary(url, splits)
