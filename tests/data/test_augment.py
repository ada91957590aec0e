"""Training augmentations (random resized crop, flip, RandAugment, random erasing): configured from the
job spec, deterministic given a seed, applied in training preprocessing only; evaluation and serving
see exactly the plain transform."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import yaml
from PIL import Image

from biomedgpt.data.pipeline import preprocess_batch
from biomedgpt.data.stream import _augment_seed
from biomedgpt.data.transforms import RANDAUGMENT_OPS, Augment, augment_rng, image_to_array, load_image
from data_testing import raw_batch
from tests_paths import REPO

OFFICIAL = {"random_resized_crop": {"scale": [0.08, 1.0]}, "hflip": 0.5,
            "randaugment": {"n": 2, "m": 9, "mstd": 0.5}, "random_erasing": 0.25}


def photo(size=(120, 90)) -> bytes:
    """A JPEG with structure (a gradient and a bright corner), so every op changes something."""
    x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (size[1], size[0], 1)), np.broadcast_to(y, (size[1], size[0], 1)),
                          np.full((size[1], size[0], 1), 60, np.float32)], axis=2).astype(np.uint8)
    arr[:20, :20] = 250
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_config_is_validated_and_inactive_means_none():
    assert Augment.from_config(None) is None and Augment.from_config({"hflip": 0.0, "randaugment": None}) is None
    aug = Augment.from_config(OFFICIAL)
    assert aug.crop_scale == (0.08, 1.0) and aug.hflip == 0.5 and aug.randaugment_n == 2 and aug.random_erasing == 0.25
    assert Augment.from_config({"hflip": True}).hflip == 0.5 and Augment.from_config({"random_resized_crop": True}).crop_scale
    for bad, match in (({"randaugment": {"m": 11}}, "0 <= m <= 10"), ({"hflip": 1.5}, "probability"),
                       ({"randaugment": {"ops": ["Blur"]}}, "unknown"), ({"mixup": 1}, "unknown option"),
                       ({"random_resized_crop": {"scale": [0.9, 0.1]}}, "scale")):
        with pytest.raises(ValueError, match=match):
            Augment.from_config(bad)


def test_augmentation_is_deterministic_given_the_seed():
    data = photo()
    aug = Augment.from_config(OFFICIAL)
    a = load_image(data, 32, aug, augment_rng(7, 123))
    b = load_image(data, 32, aug, augment_rng(7, 123))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    others = [load_image(data, 32, aug, augment_rng(seed, 123)) for seed in range(8, 14)]
    assert all(not np.array_equal(a, o) for o in others)  # another epoch seed, another view
    with pytest.raises(ValueError, match="needs an rng"):
        load_image(data, 32, aug)


def test_every_randaugment_op_runs_and_changes_the_image():
    img = Image.open(io.BytesIO(photo())).convert("RGB").resize((48, 48))
    plain = np.asarray(img)
    for op in RANDAUGMENT_OPS:
        aug = Augment(randaugment_n=1, randaugment_m=9, randaugment_ops=(op,))
        out = aug.apply(img, 48, random.Random(0))
        assert out.size == (48, 48) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), plain) == (op == "Identity"), op


def test_flip_and_crop_do_what_they_say():
    data = photo()
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (32, 32))  # as load_image decodes it
    img = img.convert("RGB")
    flipped = load_image(data, 32, Augment(hflip=1.0), random.Random(1))
    expected = image_to_array(img.resize((32, 32), Image.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT), 32)
    assert np.allclose(flipped, expected)
    aug = Augment(crop_scale=(0.1, 0.3))
    rng = random.Random(3)
    for _ in range(50):
        left, top, right, bottom = aug._crop_box(img.size, rng)
        area = (right - left) * (bottom - top) / (img.size[0] * img.size[1])
        assert 0 <= left < right <= img.size[0] and 0 <= top < bottom <= img.size[1] and 0.05 < area < 0.4


def test_evaluation_and_serving_transform_is_untouched(demo_shards):
    data = photo()
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (32, 32))
    assert np.array_equal(load_image(data, 32), image_to_array(img.convert("RGB"), 32))
    assert np.array_equal(load_image(data, 32), load_image(data, 32, None))



def test_preprocessing_augments_only_when_configured(demo_shards, demo_tokenizer_dir):
    pre = dict(task_name="vqa", tokenizer_dir=demo_tokenizer_dir, image_size=32, max_source_length=24,
               max_target_length=8)
    batch, _ = raw_batch(demo_shards, 6)
    plain = preprocess_batch(batch, **pre)
    assert np.array_equal(plain["patch_images"], preprocess_batch(batch, **pre, augment=None)["patch_images"])
    assert np.array_equal(plain["patch_images"], preprocess_batch(batch, **pre, augment={})["patch_images"])
    epoch0 = dict(batch, __augment_seed__=np.full(6, _augment_seed(3, 0), dtype=np.int64))
    epoch1 = dict(batch, __augment_seed__=np.full(6, _augment_seed(3, 1), dtype=np.int64))
    a = preprocess_batch(epoch0, **pre, augment=OFFICIAL)
    assert np.array_equal(a["patch_images"], preprocess_batch(epoch0, **pre, augment=OFFICIAL)["patch_images"])
    assert not np.array_equal(a["patch_images"], plain["patch_images"])
    b = preprocess_batch(epoch1, **pre, augment=OFFICIAL)
    assert not np.array_equal(a["patch_images"], b["patch_images"])  # a new view every epoch
    for k in ("input_ids", "labels", "sample_id"):  # text untouched
        assert np.array_equal(a[k], plain[k])


def test_the_job_spec_configures_training_augmentation():
    from biomedgpt.spec import SpecError, spec_from_dict

    data = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    data["data"]["augment"] = {"randaugment": {"n": 2, "m": 9}, "hflip": False, "random_resized_crop": {}}
    spec = spec_from_dict(data, "job.yaml")
    aug = Augment.from_config(spec.data.augment.to_config())
    assert aug == Augment(crop_scale=(0.08, 1.0), randaugment_n=2, randaugment_m=9.0)
    assert Augment.from_config(spec_from_dict(dict(data, data={**data["data"], "augment": {}}), "j.yaml")
                               .data.augment.to_config()) is None
    data["data"]["augment"] = {"randaugment": {"n": 2, "m": 12}}
    with pytest.raises(SpecError, match=r"job.yaml: data.augment.randaugment: need"):
        spec_from_dict(data, "job.yaml")
