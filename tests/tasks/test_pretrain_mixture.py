"""The official pretraining mixture (8 image-text : 2 text : 1 image : 1 detection) as dataset weights."""

from __future__ import annotations

import pytest

from biomedgpt.data.stream import ShardInfo, plan_epoch
from biomedgpt.tasks import OFFICIAL_PROPORTIONS, MixtureSource, official_mixture
from biomedgpt.tasks.mixture import mixture_shares, official_group_ratios


def test_official_proportions():
    assert OFFICIAL_PROPORTIONS == {"image_text": 8.0, "text": 2.0, "image": 1.0, "detection": 1.0}
    assert official_group_ratios() == {"text": 0.25, "image": 0.125, "detection": 0.125}  # data.group_ratios


def test_weights_realise_eight_two_one_one():
    sources = {
        "iu_xray/train": MixtureSource("caption", 6000),
        "slake/train": ("vqa", 4000),
        "pubmed_abstracts/train": {"task": "text", "rows": 1_000_000},
        "chexpert_small/train": ("image", 200_000),
        "deeplesion/train": ("detection", 2_500),
    }
    w = official_mixture(sources)
    assert w["iu_xray/train"] == w["slake/train"] == 1.0  # image-text rows once per epoch, natural sizes
    assert w["pubmed_abstracts/train"] == pytest.approx(10_000 * 2 / 8 / 1_000_000)
    assert w["chexpert_small/train"] == pytest.approx(10_000 / 8 / 200_000)
    assert w["deeplesion/train"] == pytest.approx(10_000 / 8 / 2_500)  # small sources are repeated
    shares = mixture_shares(sources, w)
    assert shares == pytest.approx({"image_text": 8 / 12, "text": 2 / 12, "image": 1 / 12, "detection": 1 / 12})


def test_configurable_proportions_and_no_image_text():
    w = official_mixture({"a": ("text", 100), "b": ("detection", 50)}, proportions={"text": 1, "detection": 1})
    assert w == {"a": 1.0, "b": 2.0}
    w = official_mixture({"a": ("text", 100), "b": ("detection", 50)})  # text anchors: 2 text : 1 detection
    assert mixture_shares({"a": ("text", 100), "b": ("detection", 50)}, w) == pytest.approx({"text": 2 / 3,
                                                                                            "detection": 1 / 3})


def test_weights_with_the_streams_shard_rounding():
    sources = {"cap": ("caption", 8000, 8), "txt": ("text", 20_000, 20), "det": ("detection", 500, 1)}
    w = official_mixture(sources)
    assert w == {"cap": 1.0, "txt": 0.1, "det": 2.0}
    groups = [([ShardInfo(f"{name}-{i}", name, "train", rows // n) for i in range(n)], w[name])
              for name, (task, rows, n) in sources.items()]
    plan = plan_epoch(groups, epoch=0, seed=0)
    rows = {name: sum(s.samples for s in plan if s.dataset == name) for name in sources}
    assert rows == {"cap": 8000, "txt": 2000, "det": 1000}  # 8 : 2 : 1 per epoch, as the stream reads it
    with pytest.raises(ValueError, match=r"txt: weight 0.01 takes none of its 20 shard\(s\) per epoch.*at least 50"):
        official_mixture({"cap": ("caption", 800, 1), "txt": ("text", 20_000, 20)})


def test_errors_name_the_dataset():
    with pytest.raises(ValueError, match="x: record task 'classify' is not a pretraining source"):
        official_mixture({"x": ("classify", 10)})
    with pytest.raises(ValueError, match="y: 0 rows"):
        official_mixture({"y": ("caption", 0)})
    with pytest.raises(ValueError, match="z: its group 'image' has proportion 0"):
        official_mixture({"c": ("caption", 5), "z": ("image", 5)}, proportions={"image_text": 1, "image": 0})
    with pytest.raises(ValueError, match="unknown group"):
        official_mixture({"c": ("caption", 5)}, proportions={"images": 1})
