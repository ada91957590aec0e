"""The official pretraining mixture as dataset weights.

BiomedGPT/OFA draw, for every 8 image-text examples (captioning, image-text matching, VQA, grounding,
grounded captioning), 2 text-infilling, 1 image-infilling and 1 detection example. Here the datasets are
mixed by the job spec's weights (`data.train[].weight`: per epoch the stream takes each dataset's shards
`weight` times, a fractional part as a rotating slice of its shards), so the proportions become weights:
`official_mixture` gives every dataset of a group the same weight (a group keeps its datasets' natural
sizes), the image-text group weight 1 (each pair once per epoch) and every other group the weight that
makes its rows per epoch `proportion / 8` of the image-text rows. Without image-text data the largest
present group is the anchor instead. The within-image-text proportions (captioning vs. ITM vs. ...) are
the `pretrain` task's `objectives`; the 2x loss weight of the second group is its `loss_weights`.

A job spec using it::

    sources = {f"{r.dataset}/{r.split}": MixtureSource(task_of(r.dataset), rows, shards) for r in ...}
    weights = official_mixture(sources)      # {"iu_xray/train": 1.0, "pubmed_abstracts/train": 0.0021, ...}

(`rows` and `shards` from the split's manifest: `sum(s.samples for s in list_shards(...))`, `len(...)`;
`task_of` from the dataset spec's `task`). A spec that mixes by `data.group_ratios` instead (rows per
image-text row per group) gets the same proportions from `official_group_ratios()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

#: Examples per group in the official mixing (per 8 image-text examples).
OFFICIAL_PROPORTIONS: dict[str, float] = {"image_text": 8.0, "text": 2.0, "image": 1.0, "detection": 1.0}

#: The mixing group of each pretraining record task.
TASK_GROUPS: dict[str, str] = {"caption": "image_text", "vqa": "image_text", "grounding": "image_text",
                               "text": "text", "image": "image", "detection": "detection"}


@dataclass(frozen=True)
class MixtureSource:
    """One training dataset (split): its record task, its rows and, when known, its shard count (the stream
    takes whole shards, so a small weight of a dataset with few shards may round to nothing)."""

    task: str
    rows: int
    shards: int | None = None


def _source(name: str, value) -> MixtureSource:
    if isinstance(value, MixtureSource):
        src = value
    elif isinstance(value, Mapping):
        src = MixtureSource(value["task"], int(value["rows"]), value.get("shards"))
    else:
        src = MixtureSource(*value)
    if src.task not in TASK_GROUPS:
        raise ValueError(f"{name}: record task {src.task!r} is not a pretraining source; pretraining mixes "
                         f"{', '.join(TASK_GROUPS)}")
    if src.rows <= 0:
        raise ValueError(f"{name}: {src.rows} rows; leave empty datasets out of the mixture")
    return src


def official_mixture(sources: Mapping[str, MixtureSource | tuple | Mapping],
                     proportions: Mapping[str, float] | None = None) -> dict[str, float]:
    """Dataset weights (`data.train[].weight`) that realise `proportions` (default: the official 8:2:1:1
    of image-text : text : image : detection examples) for `sources` (name -> MixtureSource, or
    (task, rows[, shards]), or a mapping with those keys). Raises ValueError naming the dataset when a
    source's group has proportion 0 or when its weight would take none of its shards per epoch."""
    props = dict(OFFICIAL_PROPORTIONS if proportions is None else proportions)
    unknown = sorted(set(props) - set(OFFICIAL_PROPORTIONS))
    if unknown:
        raise ValueError(f"proportions: unknown group(s) {', '.join(unknown)}; known: {', '.join(OFFICIAL_PROPORTIONS)}")
    srcs = {name: _source(name, v) for name, v in sources.items()}
    if not srcs:
        raise ValueError("no datasets to mix")
    rows: dict[str, int] = {}
    for name, s in srcs.items():
        group = TASK_GROUPS[s.task]
        if props.get(group, 0.0) <= 0:
            raise ValueError(f"{name}: its group {group!r} has proportion 0; leave it out of data.train")
        rows[group] = rows.get(group, 0) + s.rows
    anchor = "image_text" if "image_text" in rows else max(rows, key=lambda g: props[g])
    group_weight = {g: (props[g] / props[anchor]) * (rows[anchor] / rows[g]) for g in rows}
    weights: dict[str, float] = {}
    for name, s in srcs.items():
        w = float(f"{group_weight[TASK_GROUPS[s.task]]:.6g}")
        if s.shards:
            whole, extra = int(w), int(round((w - int(w)) * s.shards))
            if whole == 0 and extra == 0:
                need = math.ceil(0.5 / w)
                raise ValueError(f"{name}: weight {w:.4g} takes none of its {s.shards} shard(s) per epoch (the stream "
                                 f"reads whole shards); rebuild it with at least {need} smaller shards "
                                 "(data.shard_max_samples) or raise its group's proportion")
        weights[name] = w
    return weights


def official_group_ratios(proportions: Mapping[str, float] | None = None) -> dict[str, float]:
    """The proportions as the job spec's `data.group_ratios` (rows of each other group per image-text row):
    the official ones are {text: 0.25, image: 0.125, detection: 0.125}."""
    props = dict(OFFICIAL_PROPORTIONS if proportions is None else proportions)
    if props.get("image_text", 0) <= 0:
        raise ValueError("group ratios are relative to the image-text rows: proportions need image_text > 0")
    return {g: p / props["image_text"] for g, p in props.items() if g != "image_text"}


def mixture_shares(sources: Mapping[str, MixtureSource | tuple | Mapping], weights: Mapping[str, float]
                   ) -> dict[str, float]:
    """The expected share of each group among an epoch's rows under `weights`, with the stream's shard
    rounding where the shard counts are known (to check a mixture)."""
    per_group: dict[str, float] = {}
    for name, v in sources.items():
        s = _source(name, v)
        w = weights[name]
        if s.shards:
            taken = int(w) * s.shards + int(round((w - int(w)) * s.shards))
            rows = s.rows * taken / s.shards
        else:
            rows = s.rows * w
        group = TASK_GROUPS[s.task]
        per_group[group] = per_group.get(group, 0.0) + rows
    total = sum(per_group.values())
    return {g: r / total for g, r in per_group.items()}
