"""Preprocessing for the Ray Data pipeline: raw shard rows -> decoded, transformed, tokenized model
inputs. `preprocess_batch` is what each training rank's stream (data/stream.py) maps over the shards
it reads with `ray.data.read_webdataset(..., decoder=None)`; it uses the transforms serving uses.
The tokenizer is loaded once per Ray worker process (cached by directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Sequence

import numpy as np

from ..model.tokenizer import BiomedGPTTokenizer
from ..tasks import get_task
from ..tasks.pretrain import record_captions
from .transforms import Augment, ImageDecodeError, augment_rng, encode_pair, load_image, pad_sequences

log = logging.getLogger(__name__)

_TOKENIZERS: dict[str, Any] = {}

# Columns a training batch carries (all numeric: iter_torch_batches turns them into tensors).
# loss_weight (float32, B): the example's loss weight (Example.weight; 1.0, pretraining's second group 2.0);
# code_masks (bool, B): the decoder target is image-code tokens (image infilling), the model's `code_masks`.
# sample_patches (bool, B): the encoder may see a sample of the image's patches (Example.sample_patches;
# trainer.sample_patch_num).
TRAIN_COLUMNS = ("input_ids", "patch_images", "patch_masks", "decoder_input_ids", "labels", "loss_weight",
                 "code_masks", "sample_patches")


def tokenizer_from_dir(path: str) -> Any:
    """The BiomedGPT tokenizer saved in `path`, loaded once per process."""
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = BiomedGPTTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def sample_id(record: dict[str, Any]) -> int:
    """A stable 63-bit id of a record (dataset, split, id): lets tests and reports count samples."""
    key = f"{record.get('dataset')}/{record.get('split')}/{record.get('id')}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _record(row_json: Any) -> dict[str, Any]:
    if isinstance(row_json, (bytes, bytearray)):
        return json.loads(row_json.decode("utf-8"))
    if isinstance(row_json, str):
        return json.loads(row_json)
    return dict(row_json)


def apply_image_op(image: np.ndarray, op: str | None) -> np.ndarray:
    """An Example's `image_op` on a (3, S, S) normalised image: "mask_center" blanks the centre half
    (rows and columns S/4 .. 3S/4, the 128 px centre of a 256 px image) to 0, mid-grey after
    normalisation, as OFA's image infilling does."""
    if op is None:
        return image
    if op == "mask_center":
        s = image.shape[-1]
        lo, hi = s // 4, s - s // 4
        image[:, lo:hi, lo:hi] = 0.0
        return image
    raise ValueError(f"unknown image_op {op!r} (known: mask_center)")


def _batch_captions(batch: dict[str, np.ndarray]) -> list[tuple[int, str]]:
    """(row, caption) of every row of the batch with a caption: the image-text matching negatives."""
    out = []
    for i, raw in enumerate(batch["json"]):
        try:
            caps = record_captions(_record(raw))
        except (ValueError, TypeError, AttributeError):
            continue  # a bad row is reported where it is processed
        if caps:
            out.append((i, caps[0]))
    return out


def _row_codes(batch: dict[str, np.ndarray], i: int) -> Any:
    col = batch.get("codes.npy")
    if col is None or not isinstance(col[i], (bytes, bytearray)) or len(col[i]) == 0:
        return None
    return bytes(col[i])


def preprocess_batch(batch: dict[str, np.ndarray], *, task_name: str | None, tokenizer_dir: str, image_size: int,
                     max_source_length: int, max_target_length: int, task_options: dict[str, Any] | None = None,
                     salt: int = 0, augment: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Raw WebDataset rows (json + jpg/png bytes) -> model inputs (numpy, padded to the max lengths).
    Each record is turned into an example by `task_name`'s family (built with `task_options`), or, when
    that is None, by the family its own `task` field names (mixtures of datasets of different tasks).
    Families with `uses_batch_context` (pretraining) also get the other rows' captions (image-text
    matching negatives), the row's `codes.npy` (image infilling) and a salt for their random choices:
    the row's `__augment_seed__` (the stream's per-epoch seed) when the batch has it, else `salt`."""
    tasks: dict[str, Any] = {}

    def task_of(record: dict[str, Any]) -> Any:
        name = task_name or record.get("task")
        if not name:
            raise ValueError(f"record {record.get('id')!r} of {record.get('dataset')}: no 'task' field and no task given")
        if name not in tasks:
            tasks[name] = get_task(name, **(task_options or {})) if name == task_name else get_task(name)
        return tasks[name]

    captions: list[tuple[int, str]] | None = None

    tok = tokenizer_from_dir(tokenizer_dir)
    # training augmentations (data.augment), seeded per row by the stream's epoch seed and the sample id
    aug = Augment.from_config(augment)
    aug_seeds = batch.get("__augment_seed__")
    n = len(batch["json"])
    images = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    masks = np.zeros(n, dtype=bool)
    srcs, decs, labels = [], [], []
    ids = np.zeros(n, dtype=np.int64)
    weights = np.ones(n, dtype=np.float32)
    code_masks = np.zeros(n, dtype=bool)
    sample_patches = np.zeros(n, dtype=bool)
    for i in range(n):
        record = _record(batch["json"][i])
        ids[i] = sample_id(record)
        task = task_of(record)
        if getattr(task, "uses_batch_context", False):
            if captions is None:
                captions = _batch_captions(batch)
            # salt: the stream's per-epoch seed when the rows carry it, so objectives change across epochs
            row_salt = salt if aug_seeds is None else int(aug_seeds[i])
            ex = task.example(record, negatives=[c for j, c in captions if j != i], codes=_row_codes(batch, i),
                              salt=row_salt)
        else:
            ex = task.example(record)
        weights[i] = ex.weight
        sample_patches[i] = ex.sample_patches
        data = None
        for ext in ("jpg", "png"):
            col = batch.get(ext)
            if col is not None and isinstance(col[i], (bytes, bytearray)) and len(col[i]) > 0:
                data = bytes(col[i])
                break
        if ex.has_image and data is not None:
            try:
                row_aug = aug if ex.image_op is None else None  # image infilling: codes are of the plain image
                rng = augment_rng(0 if aug_seeds is None else int(aug_seeds[i]), int(ids[i])) if row_aug else None
                images[i] = load_image(data, image_size, row_aug, rng)
                masks[i] = True
            except ImageDecodeError as err:
                raise ImageDecodeError(f"record {record.get('id')!r} of {record.get('dataset')}: {err}") from err
        if ex.image_op is not None:
            if not masks[i]:
                raise ValueError(f"record {record.get('id')!r} of {record.get('dataset')}: its example needs the image "
                                 f"({ex.image_op}) but the row has no jpg/png")
            apply_image_op(images[i], ex.image_op)
        if ex.decoder_codes:
            code_masks[i] = True
            need = len(tok.encode_text(ex.target)) + 1
            if need > max_target_length:
                raise ValueError(f"record {record.get('id')!r} of {record.get('dataset')}: its image-code target is "
                                 f"{need} tokens with </s> but max_target_length is {max_target_length}; image "
                                 f"infilling needs data.max_target_length >= {need}")
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
        "loss_weight": weights,
        "code_masks": code_masks,
        "sample_patches": sample_patches,
        "sample_id": ids,
    }
