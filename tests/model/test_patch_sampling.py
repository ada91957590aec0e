"""The official pretraining's patch sampling (`--sample-patch-num 196`): in training, the encoder of an
image-text example sees a random sample of its image's patches and nothing of the others; the examples
beside it in the batch that may not be sampled (image infilling, detection) keep every patch; the
pretraining recipes set it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.tasks import get_task

REPO = Path(__file__).resolve().parents[2]


def tiny_model() -> BiomedGPTForConditionalGeneration:
    torch.manual_seed(0)
    config = BiomedGPTConfig(vocab_size=500, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, resnet_type="resnet18", dropout=0.0)
    return BiomedGPTForConditionalGeneration(config).eval()


def inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 500, (n, 6), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids, torch.randn(n, 3, 64, 64, generator=g)  # 4 x 4 = 16 patches per image


def test_the_encoder_sees_the_sampled_patches_only():
    model = tiny_model()
    enc = model.encoder
    ids, images = inputs()
    k = 6
    feats = enc.embed_images(images).detach()  # (3, C, 4, 4)
    calls = {"feats": feats}
    # the patches' features, under the test's control
    enc.embed_images.register_forward_hook(lambda _module, _args, _out: calls["feats"])
    rows = torch.tensor([True, False, True])

    def run(**kw):
        torch.manual_seed(7)  # the same patches drawn every run
        with torch.no_grad():
            return enc(ids, patch_images=images, **kw)

    sampled = run(sample_patch_num=k, sample_patch_rows=rows)
    torch.manual_seed(7)
    perms = [torch.randperm(16) for _ in range(3)]
    # a sampled row: its left-out patches are padding; the same row as OFA's gather computes it (only the
    # k drawn patches in the encoder at all) gives the same text states and the same states of those k
    gathered = run(sample_patch_num=k)
    assert gathered.last_hidden_state.shape[1] == k + 6 and sampled.last_hidden_state.shape[1] == 16 + 6
    for r in (0, 2):
        assert sampled.padding_mask[r, :16].tolist() == [False] * k + [True] * (16 - k)
        assert torch.allclose(sampled.last_hidden_state[r, 16:], gathered.last_hidden_state[r, k:], atol=1e-5)
        assert torch.allclose(sampled.last_hidden_state[r, :k], gathered.last_hidden_state[r, :k], atol=1e-5)
    # changing the patches a sampled row left out changes nothing it computes
    changed = feats.clone().flatten(2)
    for r in (0, 1, 2):
        changed[r, :, perms[r][k:]] += 100.0
    calls["feats"] = changed.view_as(feats)
    again = run(sample_patch_num=k, sample_patch_rows=rows)
    for r in (0, 2):
        assert torch.allclose(again.last_hidden_state[r, 16:], sampled.last_hidden_state[r, 16:], atol=1e-5)
    # ... while a row that is not sampled sees every patch (and equals the run without sampling)
    assert not torch.allclose(again.last_hidden_state[1], sampled.last_hidden_state[1])
    calls["feats"] = feats
    plain = run()
    assert not sampled.padding_mask[1].any()
    assert torch.allclose(sampled.last_hidden_state[1], plain.last_hidden_state[1], atol=1e-5)


def test_only_the_image_text_objectives_are_sampled():
    task = get_task("pretrain")
    caption = {"task": "caption", "dataset": "iu_xray", "split": "train", "id": "c1", "caption": "The lungs are clear."}
    text = {"task": "text", "dataset": "pubmed_abstracts", "split": "train", "id": "t1",
            "text": "The patient was admitted with chest pain and shortness of breath after a walk."}
    detection = {"task": "detection", "dataset": "deeplesion", "split": "train", "id": "d1",
                 "boxes": [[0.1, 0.2, 0.3, 0.4]], "labels": ["liver"]}
    assert task.example(caption, objective="caption").sample_patches
    assert task.example(caption, objective="itm", negatives=["other"]).sample_patches
    assert not task.example(caption, objective="image_infilling", codes=np.zeros((16, 16), np.int32)).sample_patches
    assert not task.example(text, objective="text_infilling").sample_patches
    assert not task.example(detection, objective="detection").sample_patches
    assert not get_task("vqa").example({"question": "q", "answer": "yes"}).sample_patches  # fine-tuning: never


def test_the_pretraining_recipes_sample_196_patches_and_fine_tuning_none():
    from biomedgpt.spec import load_spec

    for path in sorted((REPO / "jobs" / "pretrain").glob("*.yaml")):
        assert load_spec(path).trainer.sample_patch_num == 196, path
        assert yaml.safe_load(path.read_text())["model"]["image_size"] == 256  # 196 of 16 x 16 patches
    for path in sorted((REPO / "jobs" / "finetune").glob("*.yaml")):
        assert load_spec(path).trainer.sample_patch_num is None, path
