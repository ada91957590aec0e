"""`biomedgpt convert`: fairseq .pt and HF-port checkpoints into our model directory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from bpe_files import write_bart_like_files
from safetensors.torch import load_file, save_file

from biomedgpt.model import BiomedGPTForConditionalGeneration, BiomedGPTTokenizer
from biomedgpt.model.convert import convert
from biomedgpt.model.state_dict_adapter import CheckpointMismatchError, derived_entries

MICRO_FAIRSEQ_ARGS = dict(
    encoder_embed_dim=20, decoder_embed_dim=20, encoder_ffn_embed_dim=40, decoder_ffn_embed_dim=40,
    encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
    resnet_type="resnet18", token_bucket_size=256, image_bucket_size=42, attn_scale_factor=2.0,
    code_image_size=128, max_source_positions=1024, max_target_positions=1024, activation_fn="gelu",
    dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, encoder_drop_path_rate=0.1,
    decoder_drop_path_rate=0.1, resnet_drop_path_rate=0.0, scale_attn=True, scale_fc=True, scale_heads=True,
    encoder_normalize_before=True, decoder_normalize_before=True, layernorm_embedding=True,
    patch_layernorm_embedding=True, code_layernorm_embedding=True, add_type_embedding=True,
    no_scale_embedding=True, entangle_position_embedding=False, disable_entangle=True,
    share_all_embeddings=True,
)


class AverageMeter:
    """Stands for fairseq's meter pickled into extra_state. fairseq is not installed here: the class is saved
    under fairseq's module name and loads as an inert placeholder; its numpy values load as numpy values."""

    def __init__(self) -> None:
        self.val = 3.5
        self.sum = np.float64(7.0)
        self.history = np.arange(3, dtype=np.float32)


AverageMeter.__module__ = "fairseq.logging.meters"


def write_fairseq_checkpoint(path: Path, model_sd: dict, ema_sd: dict | None = None, with_cfg: bool = True) -> None:
    ckpt: dict = {"model": model_sd, "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion"}]}
    if with_cfg:
        ckpt["cfg"] = {"model": argparse.Namespace(**MICRO_FAIRSEQ_ARGS), "task": {"_name": "vqa_gen"}}
    extra: dict = {"metrics": {"train": AverageMeter()}, "train_iterator": {"epoch": 3}}
    if ema_sd is not None:
        extra["ema"] = ema_sd
    ckpt["extra_state"] = extra
    fairseq = {name: types.ModuleType(name) for name in ("fairseq", "fairseq.logging", "fairseq.logging.meters")}
    fairseq["fairseq.logging.meters"].AverageMeter = AverageMeter
    with mock.patch.dict(sys.modules, fairseq):  # pickle saves a class by the module it names
        torch.save(ckpt, path)


def full_fairseq_sd(micro_fairseq_state_dict, micro_hf_state_dict, micro_config) -> dict:
    """As fairseq saves it: with the tied copies, the bucket tables and the 1026-entry positions."""
    sd = dict(micro_fairseq_state_dict)
    emb = sd["encoder.embed_tokens.weight"]
    sd["decoder.embed_tokens.weight"] = emb.clone()
    sd["decoder.output_projection.weight"] = emb.clone()
    for k, v in derived_entries(micro_config).items():
        sd[k] = v.clone()
    sd["decoder.image_position_idx"] = torch.cat([sd["decoder.image_position_idx"], torch.tensor([1024])])
    return sd


def logits_of(model_dir: Path, case: dict) -> torch.Tensor:
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=case["input_ids"], patch_images=case["patch_images"], patch_masks=case["patch_masks"],
                     decoder_input_ids=case["decoder_input_ids"], use_cache=False).logits


@pytest.fixture(scope="module")
def case_a(ofa_case):
    return ofa_case("a_image_text")


def test_fairseq_pt_with_cfg_converts_and_reproduces_reference(tmp_path, micro_fairseq_state_dict, micro_hf_state_dict,
                                                               micro_config, case_a):
    src = tmp_path / "src"
    src.mkdir()
    sd = full_fairseq_sd(micro_fairseq_state_dict, micro_hf_state_dict, micro_config)
    assert sd["decoder.image_position_idx"].numel() == 1026
    write_fairseq_checkpoint(src / "checkpoint_best.pt", sd)
    write_bart_like_files(src)
    dst = tmp_path / "converted"
    out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "convert", str(src / "checkpoint_best.pt"), str(dst)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fairseq names" in out.stdout and "tokenizer written" in out.stdout
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= names
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "biomedgpt" and config["d_model"] == 20 and config["decoder_layers"] == 3
    stored = load_file(str(dst / "model.safetensors"))
    assert not any("rp_bucket" in k or "image_position_idx" in k for k in stored)
    assert sum("embed_tokens" in k or "output_projection" in k for k in stored) == 1, "tied embedding stored once"
    torch.testing.assert_close(logits_of(dst, case_a), case_a["logits"], atol=1e-4, rtol=0)
    tok = BiomedGPTTokenizer.from_pretrained(dst)
    assert len(tok) == 59457


def test_ema_weights_are_taken_with_flag(tmp_path, micro_fairseq_state_dict, micro_hf_state_dict, micro_config, case_a):
    sd = full_fairseq_sd(micro_fairseq_state_dict, micro_hf_state_dict, micro_config)
    perturbed = {k: (v * 0.5 if k == "decoder.layer_norm.weight" else v) for k, v in sd.items()}
    pt = tmp_path / "ema.pt"
    write_fairseq_checkpoint(pt, perturbed, ema_sd=sd)  # the EMA copy holds the reference weights
    convert(pt, tmp_path / "raw")
    report = convert(pt, tmp_path / "ema", ema=True)
    assert report.ema
    torch.testing.assert_close(logits_of(tmp_path / "ema", case_a), case_a["logits"], atol=1e-4, rtol=0)
    assert (logits_of(tmp_path / "raw", case_a) - case_a["logits"]).abs().max() > 1e-2


def test_fairseq_pt_without_cfg_needs_config(tmp_path, micro_fairseq_state_dict, micro_hf_state_dict, micro_config,
                                            ofa_dir, case_a):
    pt = tmp_path / "nocfg.pt"
    write_fairseq_checkpoint(pt, dict(micro_fairseq_state_dict), with_cfg=False)
    with pytest.raises(ValueError, match="no cfg/args; pass --config"):
        convert(pt, tmp_path / "x")
    convert(pt, tmp_path / "y", config_path=ofa_dir / "micro_config.json")
    torch.testing.assert_close(logits_of(tmp_path / "y", case_a), case_a["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "model.safetensors"])
def test_hf_port_checkpoint_with_ofa_config(fmt, tmp_path, micro_hf_state_dict, micro_config, ofa_dir, case_a):
    src = tmp_path / "port"
    src.mkdir()
    sd = dict(micro_hf_state_dict)
    sd["decoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()
    for k, v in derived_entries(micro_config).items():  # the port stores its 1025-entry form
        sd[k] = v.clone()
    if fmt.endswith(".bin"):
        torch.save(sd, src / fmt)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src / fmt))
    (src / "config.json").write_text((ofa_dir / "micro_config.json").read_text())
    report = convert(src, tmp_path / "out")  # a directory source
    assert report.naming == "hf-port" and not report.tokenizer
    torch.testing.assert_close(logits_of(tmp_path / "out", case_a), case_a["logits"], atol=1e-4, rtol=0)


def test_missing_and_unexpected_keys_are_listed(tmp_path, micro_hf_state_dict, ofa_dir):
    sd = dict(micro_hf_state_dict)
    del sd["encoder.layers.1.fc1.weight"]
    sd["encoder.adapter.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((ofa_dir / "micro_config.json").read_text())
    with pytest.raises(CheckpointMismatchError) as err:
        convert(tmp_path / "pytorch_model.bin", tmp_path / "out")
    msg = str(err.value)
    assert "missing: encoder.layers.1.fc1.weight" in msg and "unexpected: encoder.adapter.weight" in msg


def test_derived_entries_are_checked_when_present(tmp_path, micro_hf_state_dict, micro_config, ofa_dir):
    sd = dict(micro_hf_state_dict)
    wrong = derived_entries(micro_config)["encoder.token_rp_bucket"].clone()
    wrong[0, 0] += 1
    sd["encoder.token_rp_bucket"] = wrong
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((ofa_dir / "micro_config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match="encoder.token_rp_bucket"):
        convert(tmp_path / "pytorch_model.bin", tmp_path / "out")
    sd = dict(micro_hf_state_dict)
    sd["decoder.output_projection.weight"] = sd["encoder.embed_tokens.weight"] + 1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match="output_projection.weight differs"):
        convert(tmp_path / "pytorch_model.bin", tmp_path / "out")


def test_wrong_config_gives_shape_errors_and_cli_exit_2(tmp_path, micro_hf_state_dict, ofa_dir):
    cfg = json.loads((ofa_dir / "micro_config.json").read_text())
    cfg["encoder_ffn_dim"] = 48
    torch.save(micro_hf_state_dict, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "convert", str(tmp_path), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "shape mismatches" in out.stderr and "encoder.layers.0.fc1.weight" in out.stderr


def test_unsupported_architecture_flag_is_refused(tmp_path, micro_hf_state_dict, ofa_dir):
    cfg = json.loads((ofa_dir / "micro_config.json").read_text())
    cfg["entangle_position_embedding"] = True
    torch.save(micro_hf_state_dict, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="entangle_position_embedding"):
        convert(tmp_path, tmp_path / "o")
