"""The model as a transformers citizen: save/load, Auto classes, SDPA, sharding units, training use,
non-square images, padding semantics, and the room's import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from biomedgpt.model import (
    BiomedGPTConfig,
    BiomedGPTDecoderLayer,
    BiomedGPTEncoderLayer,
    BiomedGPTForConditionalGeneration,
    ResNetBackbone,
)


def tiny_config(**kw) -> BiomedGPTConfig:
    base = dict(vocab_size=500, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, resnet_type="resnet18")
    base.update(kw)
    return BiomedGPTConfig(**base)


def batch(n: int = 2, size: tuple[int, int] = (64, 64)):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (n, 7), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return dict(input_ids=ids, patch_images=torch.randn(n, 3, *size, generator=g),
                patch_masks=torch.ones(n, dtype=torch.bool),
                decoder_input_ids=torch.randint(4, 500, (n, 5), generator=g))


def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    b = batch()
    with torch.no_grad():
        ref = model(**b, use_cache=False).logits
        for loader in (BiomedGPTForConditionalGeneration, AutoModelForSeq2SeqLM, AutoModel):
            loaded = loader.from_pretrained(tmp_path).eval()
            assert type(loaded) is BiomedGPTForConditionalGeneration
            assert loaded.decoder.output_projection.weight is loaded.encoder.embed_tokens.weight
            assert loaded.decoder.embed_tokens.weight is loaded.encoder.embed_tokens.weight
            torch.testing.assert_close(loaded(**b, use_cache=False).logits, ref, atol=0, rtol=0)
    assert type(AutoConfig.from_pretrained(tmp_path)) is BiomedGPTConfig
    sd, sd2 = model.state_dict(), BiomedGPTForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_attention_runs_on_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    config = tiny_config()
    model = BiomedGPTForConditionalGeneration(config).eval()
    with torch.no_grad():
        model(**batch(), use_cache=False)
    assert len(calls) == config.encoder_layers + 2 * config.decoder_layers


def test_model_package_imports_no_ray_or_lightning():
    code = ("import sys, biomedgpt.model, biomedgpt.model.convert, biomedgpt.model.constrained; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sharding_units_are_the_layers_and_backbone():
    model = BiomedGPTForConditionalGeneration(tiny_config())
    units = model.sharding_units()
    assert isinstance(units[0], ResNetBackbone)
    assert sum(isinstance(u, BiomedGPTEncoderLayer) for u in units) == 2
    assert sum(isinstance(u, BiomedGPTDecoderLayer) for u in units) == 3
    assert set(BiomedGPTForConditionalGeneration._no_split_modules) == {
        "BiomedGPTEncoderLayer", "BiomedGPTDecoderLayer", "ResNetBackbone"}


def test_training_step_with_labels_dropout_and_patch_sampling():
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(tiny_config(dropout=0.1)).train()
    b = batch()
    labels = b.pop("decoder_input_ids")
    labels[:, -1] = -100
    out = model(**b, labels=labels, sample_patch_num=6)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.encoder.embed_tokens.weight.grad.abs().sum() > 0
    # dropout is live in training mode and off in eval mode
    with torch.no_grad():
        a, b2 = (model(**b, labels=labels).loss for _ in range(2))
        model.eval()
        c, d = (model(**b, labels=labels).loss for _ in range(2))
    assert a != b2 and c == d


def test_non_square_images():
    model = BiomedGPTForConditionalGeneration(tiny_config()).eval()
    b = batch(size=(64, 112))  # 4 x 7 patches
    with torch.no_grad():
        enc = model.encoder(b["input_ids"], patch_images=b["patch_images"], patch_masks=b["patch_masks"])
        assert enc.padding_mask.shape == (2, 28 + 7)
        out = model(**b, use_cache=False)
    assert out.logits.shape == (2, 5, 500) and torch.isfinite(out.logits).all()
    # the 2-D position of a patch matters: transposing the image changes the encoding
    transposed = b["patch_images"].transpose(2, 3)
    with torch.no_grad():
        enc_t = model.encoder(b["input_ids"], patch_images=transposed, patch_masks=b["patch_masks"])
    assert enc_t.padding_mask.shape == (2, 28 + 7)
    assert (enc_t.last_hidden_state - enc.last_hidden_state).abs().max() > 1e-4


def test_image_larger_than_position_grid_is_a_clear_error():
    model = BiomedGPTForConditionalGeneration(tiny_config(image_bucket_size=4)).eval()
    b = batch(size=(80, 64))  # 5 x 4 patches > 4 x 4
    with pytest.raises(ValueError, match="5x4 patch grid.*at most 4x4"):
        model(**b)


def test_decoder_self_attention_ignores_padding_keys():
    """A padding token in the decoder input is not attended to by later positions."""
    model = BiomedGPTForConditionalGeneration(tiny_config()).eval()
    b = batch()
    dec = b.pop("decoder_input_ids")
    with_pad = dec.clone()
    with_pad[:, 2] = 1  # pad
    other = dec.clone()
    other[:, 2] = 77
    mask = torch.ones_like(dec)
    mask[:, 2] = 0
    with torch.no_grad():
        padded = model(**b, decoder_input_ids=with_pad, use_cache=False).logits
        masked_other = model(**b, decoder_input_ids=other, decoder_attention_mask=mask, use_cache=False).logits
        unmasked_other = model(**b, decoder_input_ids=other, use_cache=False).logits
    torch.testing.assert_close(padded[:, 3:], masked_other[:, 3:], atol=1e-5, rtol=0)
    assert (unmasked_other[:, 3:] - padded[:, 3:]).abs().max() > 1e-4


def test_encoder_padding_is_ignored():
    """Extra trailing padding in the source changes nothing for the real tokens."""
    model = BiomedGPTForConditionalGeneration(tiny_config()).eval()
    b = batch()
    longer = dict(b)
    longer["input_ids"] = torch.cat([b["input_ids"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**longer, use_cache=False).logits, model(**b, use_cache=False).logits,
                                   atol=1e-5, rtol=0)
