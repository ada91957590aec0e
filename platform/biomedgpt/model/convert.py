"""`biomedgpt convert`: official checkpoints -> our model directory.

Sources: a fairseq `.pt` (weights under `model`, EMA weights under `extra_state.ema`, architecture in
`cfg.model` or the legacy `args`), or a Hugging Face-port `pytorch_model.bin` / `.safetensors` with
its OFA `config.json`; a directory holding one of these is accepted too. The result is a directory
with `config.json`, `model.safetensors` and, when `vocab.json` + `merges.txt` sit beside the source
(or are given), the tokenizer files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .configuration import BiomedGPTConfig
from .modeling import BiomedGPTForConditionalGeneration
from .safe_pickle import torch_load_weights_only
from .state_dict_adapter import (
    CANONICAL_EMBEDDING,
    TIED_ALIASES,
    config_from_fairseq_args,
    convert_state_dict,
    fairseq_model_args,
    load_fairseq_checkpoint,
)
from .tokenizer import BiomedGPTTokenizer

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class ConversionReport:
    source: str
    destination: str
    naming: str
    config_from: str
    parameters: int
    tokenizer: bool
    ema: bool


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON config: {err}") from err


def config_from_json(path: Path) -> BiomedGPTConfig:
    """Our config.json (model_type biomedgpt) or an OFA port config.json (model_type ofa)."""
    data = _read_json(path)
    if data.get("model_type") == BiomedGPTConfig.model_type:
        data.pop("model_type", None)
        data.pop("transformers_version", None)
        return BiomedGPTConfig(**data)
    return BiomedGPTConfig.from_ofa_config(data, source=str(path))


def _locate(src: Path) -> Path:
    if src.is_file():
        return src
    if src.is_dir():
        for name in WEIGHT_FILES:
            if (src / name).is_file():
                return src / name
        pts = sorted(src.glob("*.pt"))
        if len(pts) == 1:
            return pts[0]
        raise FileNotFoundError(
            f"{src}: no {' or '.join(WEIGHT_FILES)} and not exactly one *.pt file (found {len(pts)})")
    raise FileNotFoundError(f"{src}: no such file or directory")


def _strip_ema(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_source(src: str | os.PathLike, config_path: str | os.PathLike | None = None, ema: bool = False
                ) -> tuple[BiomedGPTConfig, dict[str, torch.Tensor], str]:
    """Read an official checkpoint: (config, state dict as stored, where the config came from)."""
    path = _locate(Path(src))
    cfg: BiomedGPTConfig | None = None
    config_from = ""
    if path.suffix == ".pt":
        ckpt = load_fairseq_checkpoint(str(path))
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
        if ema:
            extra = ckpt.get("extra_state") or {}
            if not isinstance(extra, dict) or "ema" not in extra:
                raise ValueError(f"{path}: --ema given but the checkpoint has no extra_state.ema")
            sd = _strip_ema(dict(extra["ema"]))
        else:
            sd = _strip_ema(dict(ckpt["model"]))
        vocab = _vocab_size(sd, path)
        if config_path is not None:
            cfg, config_from = config_from_json(Path(config_path)), str(config_path)
        else:
            args = fairseq_model_args(ckpt)
            if not args:
                raise ValueError(f"{path}: the checkpoint carries no cfg/args; pass --config CONFIG.json")
            cfg, config_from = config_from_fairseq_args(args, vocab, str(path)), f"{path} (cfg.model)"
    else:
        if ema:
            raise ValueError(f"{path}: --ema applies to fairseq .pt checkpoints only")
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch_load_weights_only(path, map_location="cpu")
            if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
                sd = sd["model"]
        cfg_file = Path(config_path) if config_path is not None else path.parent / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{path}: no config.json beside it; pass --config CONFIG.json")
        cfg, config_from = config_from_json(cfg_file), str(cfg_file)
    vocab = _vocab_size(sd, path)
    if cfg.vocab_size != vocab:
        cfg.vocab_size = vocab
    return cfg, sd, config_from


def _vocab_size(sd: dict[str, torch.Tensor], path: Path) -> int:
    for key in (CANONICAL_EMBEDDING, *TIED_ALIASES, "model." + CANONICAL_EMBEDDING):
        if key in sd:
            return int(sd[key].shape[0])
    raise ValueError(f"{path}: no token embedding ({CANONICAL_EMBEDDING}) in the state dict")


def build_model(config: BiomedGPTConfig, state_dict: dict[str, torch.Tensor], source: str
                ) -> BiomedGPTForConditionalGeneration:
    """Model with the converted weights, without first allocating random ones."""
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(config)
    clean = convert_state_dict(state_dict, model, source)
    clean = {k: v.float() if v.is_floating_point() else v for k, v in clean.items()}
    model.load_state_dict(clean, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def convert(src: str | os.PathLike, dst: str | os.PathLike, config_path: str | os.PathLike | None = None,
            ema: bool = False, vocab: str | None = None, merges: str | None = None) -> ConversionReport:
    """Convert `src` into the model directory `dst` (config.json, model.safetensors, tokenizer)."""
    path = _locate(Path(src))
    cfg, sd, config_from = load_source(src, config_path, ema)
    naming = "fairseq" if path.suffix == ".pt" else "hf-port"
    model = build_model(cfg, sd, str(path))
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    vocab = vocab or (str(path.parent / "vocab.json") if (path.parent / "vocab.json").is_file() else None)
    merges = merges or (str(path.parent / "merges.txt") if (path.parent / "merges.txt").is_file() else None)
    has_tok = False
    if vocab and merges:
        tok = BiomedGPTTokenizer.from_bpe_files(vocab, merges)
        if len(tok) != cfg.vocab_size:
            raise ValueError(f"{vocab}: the tokenizer has {len(tok)} ids but the checkpoint's embedding has "
                             f"{cfg.vocab_size}; these files do not belong to this checkpoint")
        tok.save_pretrained(out)
        has_tok = True
    elif vocab or merges:
        raise ValueError("give both --vocab and --merges (or neither)")
    n = sum(p.numel() for p in model.parameters())
    return ConversionReport(str(path), str(out), naming, config_from, n, has_tok, ema)
