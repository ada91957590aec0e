"""Pretraining through the data pipeline: mixed raw shard rows (json + image bytes + codes.npy, as read
from a shard) -> one example per row, with the loss weights, the code flags and the blanked image
centre of image infilling."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from biomedgpt.data.pipeline import TRAIN_COLUMNS, apply_image_op, preprocess_batch, tokenizer_from_dir
from biomedgpt.data.shards import ShardSample, read_shard, write_shard
from biomedgpt.tasks import MissingFieldError

CODES = [(7 * i + 3) % 8192 for i in range(256)]


def png(value: int, size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def jpg(value: int, size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def codes_npy(codes) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(codes, dtype=np.int16).reshape(16, 16))
    return buf.getvalue()


def rec(task, dataset, rid, **fields):
    return {"task": task, "dataset": dataset, "split": "train", "id": rid, **fields}


SAMPLES = [
    ShardSample("c1", rec("caption", "iu_xray", "c1", caption="The heart is normal."), jpg(200), "jpg"),
    ShardSample("c2", rec("caption", "iu_xray", "c2", caption="Lung nodule."), jpg(90), "jpg"),
    ShardSample("q1", rec("vqa", "slake", "q1", question="is there a pleural effusion", answer="no"), jpg(120), "jpg"),
    ShardSample("d1", rec("detection", "deeplesion", "d1", boxes=[[0.1, 0.2, 0.3, 0.4]], labels=["liver"]),
                png(255), "png"),
    ShardSample("t1", rec("text", "pubmed_abstracts", "t1",
                          text="the patient was admitted with chest pain and shortness of breath")),
    ShardSample("i1", rec("image", "chexpert_small", "i1"), png(255), "png", {"codes.npy": codes_npy(CODES)}),
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("pretrain-shard") / "mixed-train-000000.tar")
    write_shard(url, SAMPLES)
    return list(read_shard(url))


def batch_of(rows):
    """The columns Ray Data's read_webdataset(decoder=None) gives: one per member extension, None where a
    row lacks the member."""
    cols = sorted({k for r in rows for k in r if k != "__key__"})
    return {c: np.array([r.get(c) for r in rows], dtype=object) for c in cols}


def run(rows, **kw):
    args = dict(task_name="pretrain", image_size=32, max_source_length=48, max_target_length=260)
    args.update(kw)
    return preprocess_batch(batch_of(rows), **args)


def test_mixed_rows_one_example_each(rows, pretrain_tokenizer_dir):
    assert {"json", "jpg", "png", "codes.npy"} <= set(batch_of(rows))
    out = run(rows, tokenizer_dir=pretrain_tokenizer_dir, task_options={"seed": 0})
    tok = tokenizer_from_dir(pretrain_tokenizer_dir)
    assert set(out) == set(TRAIN_COLUMNS) | {"sample_id"}
    assert {"loss_weight", "code_masks"} <= set(TRAIN_COLUMNS)
    n = len(SAMPLES)
    assert out["input_ids"].shape == (n, 48) and out["decoder_input_ids"].shape == (n, 260)
    assert out["labels"].shape == (n, 260) and out["patch_images"].shape == (n, 3, 32, 32)
    assert out["loss_weight"].dtype == np.float32 and out["code_masks"].dtype == bool
    # weights: image-text objectives 1, the second group (detection, text infilling, image infilling) 2
    assert out["loss_weight"].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert out["code_masks"].tolist() == [False] * 5 + [True]
    assert out["patch_masks"].tolist() == [True, True, True, True, False, True]
    # image infilling: the centre half blanked (0 = mid grey), the rest the white image
    img = out["patch_images"][5]
    assert (img[:, 8:24, 8:24] == 0).all()
    assert np.allclose(img[:, :8, :], 1.0) and np.allclose(img[:, 24:, :], 1.0) and np.allclose(img[:, :, :8], 1.0)
    assert np.allclose(out["patch_images"][3], 1.0)  # the same white image, not masked, for detection
    # its target: the 256 code ids then </s>; the decoder input: <s> then the codes
    labels = out["labels"][5]
    assert labels[:256].tolist() == [tok.code_offset + c for c in CODES]
    assert labels[256] == tok.eos_token_id and (labels[257:] == -100).all()
    assert out["decoder_input_ids"][5][:257].tolist() == [tok.bos_token_id] + [tok.code_offset + c for c in CODES]
    src = out["input_ids"][5]
    assert src[src != tok.pad_token_id].tolist() == tok.encode_source(" what is the image in the middle part?")
    # detection: 4 bins + the label
    det = out["labels"][3]
    assert det[det != -100].tolist() == [tok.bin_offset + b for b in (100, 200, 300, 400)] + \
        tok.encode_text("liver") + [tok.eos_token_id]
    # text infilling: text only, the full text as the target, <mask> in the source
    assert tok.mask_token_id in out["input_ids"][4].tolist()
    txt = out["labels"][4]
    assert txt[txt != -100].tolist() == tok.encode_text("the patient was admitted with chest pain and shortness of "
                                                         "breath") + [tok.eos_token_id]
    # deterministic
    again = run(rows, tokenizer_dir=pretrain_tokenizer_dir, task_options={"seed": 0})
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_itm_negatives_come_from_the_batch(rows, pretrain_tokenizer_dir):
    tok = tokenizer_from_dir(pretrain_tokenizer_dir)
    out = run(rows[:3], tokenizer_dir=pretrain_tokenizer_dir,
              task_options={"objectives": {"caption": {"itm": 1}}, "itm_negative_ratio": 1.0})
    decoded = [tok.decode(ids[ids != tok.pad_token_id][1:-1].tolist()) for ids in out["input_ids"][:2]]
    assert decoded == [' does the image describe " lung nodule "?', ' does the image describe " the heart is normal "?']
    targets = [ids[ids != -100].tolist() for ids in out["labels"][:2]]
    assert targets == [tok.encode_text("no") + [tok.eos_token_id]] * 2


def test_image_infilling_errors_name_the_record(rows, pretrain_tokenizer_dir):
    with pytest.raises(ValueError, match="record 'i1' of chexpert_small: its image-code target is 257 tokens with "
                                         r"</s> but max_target_length is 30.*>= 257"):
        run(rows, tokenizer_dir=pretrain_tokenizer_dir, max_target_length=30)
    no_codes = [dict(r) for r in rows]
    del no_codes[5]["codes.npy"]
    with pytest.raises(MissingFieldError, match="image-infilling record 'i1' of chexpert_small has no VQGAN codes"):
        run(no_codes, tokenizer_dir=pretrain_tokenizer_dir)
    no_image = [dict(r) for r in rows]
    del no_image[5]["png"]
    with pytest.raises(ValueError, match="record 'i1' of chexpert_small: its example needs the image"):
        run(no_image, tokenizer_dir=pretrain_tokenizer_dir)


def test_other_tasks_get_default_columns(rows, pretrain_tokenizer_dir):
    out = preprocess_batch(batch_of(rows[2:3]), task_name="vqa", tokenizer_dir=pretrain_tokenizer_dir, image_size=16,
                           max_source_length=24, max_target_length=8)
    assert out["loss_weight"].tolist() == [1.0] and out["code_masks"].tolist() == [False]
    assert json.loads(rows[2]["json"])["task"] == "vqa"


def test_mask_center_op():
    img = np.ones((3, 256, 256), dtype=np.float32)
    apply_image_op(img, "mask_center")
    assert (img[:, 64:192, 64:192] == 0).all() and img.sum() == 3 * (256 * 256 - 128 * 128)
    with pytest.raises(ValueError, match="unknown image_op 'flip'"):
        apply_image_op(img, "flip")


def test_the_streams_epoch_seed_salts_the_objective(pretrain_tokenizer_dir):
    rows = [{"json": json.dumps(rec("caption", "iu_xray", f"c{i}", caption=f"finding {i}")).encode()}
            for i in range(24)]
    batch = batch_of(rows)
    args = dict(task_name="pretrain", tokenizer_dir=pretrain_tokenizer_dir, image_size=16, max_source_length=24,
                max_target_length=12)
    epoch0 = preprocess_batch({**batch, "__augment_seed__": np.full(24, 11, dtype=np.int64)}, **args)
    again = preprocess_batch({**batch, "__augment_seed__": np.full(24, 11, dtype=np.int64)}, **args)
    epoch1 = preprocess_batch({**batch, "__augment_seed__": np.full(24, 12, dtype=np.int64)}, **args)
    assert np.array_equal(epoch0["input_ids"], again["input_ids"])
    assert not np.array_equal(epoch0["input_ids"], epoch1["input_ids"])
