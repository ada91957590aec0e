"""Preprocessing for the Ray Data pipeline: raw shard rows -> decoded, transformed, tokenized model
inputs. `preprocess_batch` is what each training rank's stream (data/stream.py) maps over the shards
it reads with `ray.data.read_webdataset(..., decoder=None)`; it uses the transforms serving uses.
The tokenizer is loaded once per Ray worker process (cached by directory).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import numpy as np

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


def sample_id(record: dict[str, Any]) -> int:
    """A stable 63-bit id of a record (dataset, split, id): lets tests and reports count samples."""
    import hashlib

    key = f"{record.get('dataset')}/{record.get('split')}/{record.get('id')}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _record(row_json: Any) -> dict[str, Any]:
    if isinstance(row_json, (bytes, bytearray)):
        return json.loads(row_json.decode("utf-8"))
    if isinstance(row_json, str):
        return json.loads(row_json)
    return dict(row_json)


def preprocess_batch(batch: dict[str, np.ndarray], *, task_name: str | None, tokenizer_dir: str, image_size: int,
                     max_source_length: int, max_target_length: int) -> dict[str, np.ndarray]:
    """Raw WebDataset rows (json + jpg/png bytes) -> model inputs (numpy, padded to the max lengths).
    Each record is turned into an example by `task_name`'s family, or, when that is None, by the family
    its own `task` field names (mixtures of datasets of different tasks)."""
    from ..tasks import get_task

    tasks: dict[str, Any] = {}

    def task_of(record: dict[str, Any]) -> Any:
        name = task_name or record.get("task")
        if not name:
            raise ValueError(f"record {record.get('id')!r} of {record.get('dataset')}: no 'task' field and no task given")
        if name not in tasks:
            tasks[name] = get_task(name)
        return tasks[name]

    tok = tokenizer_from_dir(tokenizer_dir)
    n = len(batch["json"])
    images = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    masks = np.zeros(n, dtype=bool)
    srcs, decs, labels = [], [], []
    ids = np.zeros(n, dtype=np.int64)
    for i in range(n):
        record = _record(batch["json"][i])
        ids[i] = sample_id(record)
        ex = task_of(record).example(record)
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
        "sample_id": ids,
    }
