"""Helpers of the serving tests: small model directories, run checkpoints, test images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

VQA_ANSWERS = ["yes", "no", "left lung", "ct"]
CLASS_NAMES = ["normal", "pneumonia", "effusion"]


def make_model_dir(out: Path, tokenizer_dir: str, *, seed: int = 0, answers: list[str] | None = None,
                   task: str = "vqa", image_size: int = 64, run: str = "unit-run",
                   train_data: tuple[str, ...] = ("vqa_rad/train",), meta: dict | None = None) -> Path:
    """A demo-size model directory as `biomedgpt export` writes it (random weights); `meta`: more training.json
    fields (a multi-label model's `multi_label` and `classes`)."""
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer

    tok = BiomedGPTTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = BiomedGPTConfig.from_size("demo", vocab_size=len(tok))
    out.mkdir(parents=True, exist_ok=True)
    BiomedGPTForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    if answers:
        (out / "answers.json").write_text(json.dumps(answers))
    (out / "training.json").write_text(json.dumps({
        "run": run, "team": "demo", "size": "demo", "task": task, "image_size": image_size,
        "max_source_length": 32, "train_data": list(train_data), "step": 10, **(meta or {})}))
    return out


def make_checkpoint(run_dir: Path, tokenizer_dir: str, *, step: int = 20, seed: int = 1,
                    answers: list[str] | None = None) -> Path:
    """A run checkpoint as the trainer writes it with `checkpoint_format: full` (lightning.ckpt +
    biomedgpt.json + assets/), plus the run's eval/metrics.json beside it (runner.py's layout)."""
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer

    tok = BiomedGPTTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = BiomedGPTConfig.from_size("demo", vocab_size=len(tok))
    model = BiomedGPTForConditionalGeneration(cfg)
    ckpt = run_dir / f"checkpoint-{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": step},
               ckpt / "lightning.ckpt")
    model_config = json.loads(cfg.to_json_string(use_diff=False))
    meta = {"run": run_dir.name, "team": "stanford-like-radiology", "size": "demo", "model_config": model_config,
            "task": "vqa", "image_size": 64, "max_source_length": 32, "train_data": ["vqa_rad/train", "slake/train"],
            "step": step, "metrics": {"loss": 1.5}, "format": "full"}
    (ckpt / "biomedgpt.json").write_text(json.dumps(meta))
    (ckpt / "assets" / "tokenizer").mkdir(parents=True)
    tok.save_pretrained(ckpt / "assets" / "tokenizer")
    (ckpt / "assets" / "answers.json").write_text(json.dumps(answers or VQA_ANSWERS))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(
        {"vqa_rad/test": {"accuracy": 0.5, "closed_accuracy": 0.6, "open_accuracy": 0.25, "count": 69}}))
    return ckpt


def png_bytes(size: tuple[int, int] = (48, 40), mode: str = "L", color: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def dicom_bytes(rows: int = 32, cols: int = 40, monochrome1: bool = True) -> bytes:
    """A small 16-bit CT-like DICOM file with a window and (optionally) MONOCHROME1."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) % 4096).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_adapter_checkpoint(run_dir: Path, base_dir: Path, *, seed: int = 1, step: int = 10, base_id: str | None = None,
                            answers: list[str] | None = None, rank: int = 4, task: str = "vqa") -> Path:
    """A LoRA run's checkpoint as the trainer writes it with `checkpoint_format: full`: the trainable state only
    (random LoRA weights, seeded, B not zero so the adapter changes the answers), biomedgpt.json naming the base
    (init path, registry id, sha256) and the assets (the base's tokenizer, answers)."""
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.adapters import DEFAULT_TARGETS, add_lora, lora_config, sha256_file
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer

    cfg = BiomedGPTConfig.from_pretrained(base_dir)
    model = BiomedGPTForConditionalGeneration(cfg)
    add_lora(model, lora_config(rank, 2.0 * rank, 0.0, DEFAULT_TARGETS))
    g = torch.Generator().manual_seed(seed)
    state = {f"model.{n}": torch.randn(p.shape, generator=g) * 0.3 for n, p in model.named_parameters()
             if p.requires_grad}
    ckpt = run_dir / f"checkpoint-{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save({"state_dict": state, "global_step": step}, ckpt / "lightning.ckpt")
    meta = {"run": run_dir.name, "team": "stanford-like-radiology", "size": "demo",
            "model_config": json.loads(cfg.to_json_string(use_diff=False)), "task": task, "image_size": 64,
            "max_source_length": 32, "train_data": ["vqa_rad/train"], "step": step, "metrics": {"loss": 1.0},
            "format": "full",
            "adapter": {"method": "lora", "rank": rank, "alpha": 2.0 * rank, "dropout": 0.0,
                        "target_modules": list(DEFAULT_TARGETS), "trainable": []},
            "base": {"init": str(base_dir), "id": base_id, "sha256": sha256_file(base_dir / "model.safetensors")}}
    (ckpt / "biomedgpt.json").write_text(json.dumps(meta))
    (ckpt / "assets" / "tokenizer").mkdir(parents=True)
    BiomedGPTTokenizer.from_pretrained(base_dir).save_pretrained(ckpt / "assets" / "tokenizer")
    (ckpt / "assets" / "answers.json").write_text(json.dumps(answers or VQA_ANSWERS))
    return ckpt
