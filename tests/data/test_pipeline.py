"""Preprocessing of raw shard rows into model inputs (the function Ray Data maps over batches)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from biomedgpt.data.pipeline import TRAIN_COLUMNS, preprocess_batch, tokenizer_from_dir
from biomedgpt.data.transforms import ImageDecodeError, load_image
from data_testing import raw_batch



def test_preprocess_batch_shapes_and_targets(demo_shards, demo_tokenizer_dir):
    batch, rows = raw_batch(demo_shards)
    out = preprocess_batch(batch, task_name="vqa", tokenizer_dir=demo_tokenizer_dir, image_size=64,
                           max_source_length=24, max_target_length=8)
    assert set(out) == set(TRAIN_COLUMNS) | {"sample_id"}
    assert out["input_ids"].shape == (5, 24) and out["decoder_input_ids"].shape == (5, 8)
    assert out["patch_images"].shape == (5, 3, 64, 64) and out["patch_images"].dtype == np.float32
    assert out["patch_masks"].all()
    assert -1.0 <= out["patch_images"].min() and out["patch_images"].max() <= 1.0
    tok = tokenizer_from_dir(demo_tokenizer_dir)
    for i, row in enumerate(rows):
        rec = json.loads(row["json"])
        src = out["input_ids"][i]
        assert src[0] == tok.bos_token_id and tok.eos_token_id in src
        labels = out["labels"][i][out["labels"][i] != -100].tolist()
        assert labels[-1] == tok.eos_token_id
        assert tok.decode(labels[:-1]).strip() == rec["answer"].strip().lower()
        dec = out["decoder_input_ids"][i]
        assert dec[0] == tok.bos_token_id and dec[1:len(labels)].tolist() == labels[:-1]  # shifted by one


def test_undecodable_image_names_the_record(demo_shards, demo_tokenizer_dir):
    batch, _ = raw_batch(demo_shards, 2)
    batch["jpg"][1] = b"not an image at all"
    with pytest.raises(ImageDecodeError, match="record '.*' of vqa_rad: cannot decode image"):
        preprocess_batch(batch, task_name="vqa", tokenizer_dir=demo_tokenizer_dir, image_size=32,
                         max_source_length=16, max_target_length=8)


def test_load_image_normalises_like_training(demo_shards):
    _, rows = raw_batch(demo_shards, 1)
    arr = load_image(rows[0]["jpg"], 96)
    assert arr.shape == (3, 96, 96)
    assert abs(float(arr.mean())) < 1.0
