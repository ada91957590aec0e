"""The Ray Data pipeline: shards -> decoded, transformed, tokenized batches for Ray Train workers.

    ds = training_dataset(shards_root, refs, task, tokenizer_dir, image_size, max_src, max_tgt)
    # in TorchTrainer(datasets={"train": ds}); each worker reads its share with
    # ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=..., drop_last=True)

Shards are read raw (`decoder=None`) and decoded here with the same transforms serving uses.
The tokenizer is loaded once per Ray worker process (cached by directory).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import numpy as np

from . import storage
from .shards import read_manifest, split_url
from .transforms import ImageDecodeError, encode_pair, load_image, pad_sequences

log = logging.getLogger(__name__)

_TOKENIZERS: dict[str, Any] = {}

# Columns a training batch carries (all numeric: iter_torch_batches turns them into tensors).
TRAIN_COLUMNS = ("input_ids", "patch_images", "patch_masks", "decoder_input_ids", "labels")


def tokenizer_from_dir(path: str) -> Any:
    """The BiomedGPT tokenizer saved in `path`, loaded once per process."""
    if path not in _TOKENIZERS:
        from ..model.tokenizer import BiomedGPTTokenizer

        _TOKENIZERS[path] = BiomedGPTTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def split_shard_urls(shards_root: str, dataset: str, split: str) -> list[str]:
    """URLs of a split's shards, from its manifest (so a half-written build is never read)."""
    url = split_url(shards_root, dataset, split)
    manifest = read_manifest(url)
    if not manifest.complete:
        raise ValueError(f"{url}: the shard build of {dataset}/{split} is incomplete; rerun `biomedgpt shards build`")
    return [storage.join(url, entry.name) for entry in manifest.shards]


def _record(row_json: Any) -> dict[str, Any]:
    if isinstance(row_json, (bytes, bytearray)):
        return json.loads(row_json.decode("utf-8"))
    if isinstance(row_json, str):
        return json.loads(row_json)
    return dict(row_json)


def preprocess_batch(batch: dict[str, np.ndarray], *, task_name: str, tokenizer_dir: str, image_size: int,
                     max_source_length: int, max_target_length: int) -> dict[str, np.ndarray]:
    """Raw WebDataset rows (json + jpg/png bytes) -> model inputs (numpy, padded to the max lengths)."""
    from ..tasks import get_task

    task = get_task(task_name)
    tok = tokenizer_from_dir(tokenizer_dir)
    n = len(batch["json"])
    images = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    masks = np.zeros(n, dtype=bool)
    srcs, decs, labels = [], [], []
    for i in range(n):
        record = _record(batch["json"][i])
        ex = task.example(record)
        data = None
        for ext in ("jpg", "png"):
            col = batch.get(ext)
            if col is not None and col[i] is not None and len(col[i]) > 0:
                data = bytes(col[i])
                break
        if ex.has_image and data is not None:
            try:
                images[i] = load_image(data, image_size)
                masks[i] = True
            except ImageDecodeError as err:
                raise ImageDecodeError(f"record {record.get('id')!r} of {record.get('dataset')}: {err}") from err
        src, dec, lab = encode_pair(tok, ex.instruction, ex.target, max_source_length, max_target_length)
        srcs.append(src)
        decs.append(dec)
        labels.append(lab)
    label_arr = pad_sequences(labels, -100, max_target_length)
    return {
        "input_ids": pad_sequences(srcs, tok.pad_token_id, max_source_length),
        "patch_images": images,
        "patch_masks": masks,
        "decoder_input_ids": pad_sequences(decs, tok.pad_token_id, max_target_length),
        "labels": label_arr,
    }


def training_dataset(shards_root: str, refs: Sequence[Any], *, task: str, tokenizer_dir: str, image_size: int,
                     max_source_length: int, max_target_length: int, batch_size: int = 32):
    """A Ray Dataset of preprocessed training rows over the shards of `refs` (dataset, split)."""
    import ray.data

    paths: list[str] = []
    for ref in refs:
        paths += split_shard_urls(shards_root, ref.dataset, ref.split)
    if not paths:
        raise ValueError(f"{shards_root}: no shards for {[(r.dataset, r.split) for r in refs]}")
    fs, read_paths = None, []
    for p in paths:
        fs, path = storage.pyarrow_filesystem(p)
        read_paths.append(path)
    ds = ray.data.read_webdataset(read_paths, filesystem=fs, decoder=None, shuffle="files")
    return ds.map_batches(
        preprocess_batch, batch_format="numpy", batch_size=batch_size,
        fn_kwargs=dict(task_name=task, tokenizer_dir=tokenizer_dir, image_size=image_size,
                       max_source_length=max_source_length, max_target_length=max_target_length),
    )
