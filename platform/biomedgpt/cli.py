"""The `biomedgpt` command.

    biomedgpt model info SIZE [--json]        config and parameter count of a named size
    biomedgpt convert SRC DST [--config C]    official checkpoint -> our model directory

Every subcommand has `--help`. Errors are printed as one line naming the file or field, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _cmd_model_info(args: argparse.Namespace) -> int:
    import torch

    from .model import BiomedGPTConfig, BiomedGPTForConditionalGeneration

    config = BiomedGPTConfig.from_size(args.size)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = BiomedGPTForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    info = {"config": json.loads(config.to_json_string(use_diff=True)), "parameters": params}
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        c = config
        print(f"BiomedGPT-{args.size}: {params:,} parameters (tied embeddings counted once)")
        print(f"  d_model {c.d_model}, FFN {c.encoder_ffn_dim}, heads {c.encoder_attention_heads}, "
              f"layers {c.encoder_layers} enc / {c.decoder_layers} dec, image backbone {c.resnet_type} "
              f"{c.resnet_layers}, vocabulary {c.vocab_size}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .model.convert import convert

    report = convert(args.src, args.dst, config_path=args.config, ema=args.ema, vocab=args.vocab, merges=args.merges)
    print(f"converted {report.source} ({report.naming} names{', EMA weights' if report.ema else ''}) -> "
          f"{report.destination}: {report.parameters:,} parameters, config from {report.config_from}, "
          f"tokenizer {'written' if report.tokenizer else 'not found (no vocab.json + merges.txt beside the source)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .model.configuration import SIZES

    parser = argparse.ArgumentParser(prog="biomedgpt", description="Pretrain, fine-tune, evaluate and serve BiomedGPT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    model = sub.add_parser("model", help="inspect the network's named sizes")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    model_sub.required = True
    info = model_sub.add_parser("info", help="config and unique parameter count of a named size (no weights allocated)")
    info.add_argument("size", choices=list(SIZES), help="named size")
    info.add_argument("--json", action="store_true", help='print {"config": ..., "parameters": N} as JSON')
    info.set_defaults(func=_cmd_model_info)

    conv = sub.add_parser(
        "convert",
        help="convert an official BiomedGPT/OFA checkpoint into a model directory",
        description="Convert a fairseq .pt (weights under 'model', architecture from its cfg) or a Hugging Face-port "
                    "pytorch_model.bin/.safetensors with its OFA config.json into DST: config.json + "
                    "model.safetensors (+ tokenizer files when vocab.json and merges.txt sit beside SRC).",
    )
    conv.add_argument("src", help="checkpoint file, or a directory holding one")
    conv.add_argument("dst", help="output model directory")
    conv.add_argument("--config", help="config.json (ours or OFA's) when the checkpoint carries no architecture")
    conv.add_argument("--ema", action="store_true", help="take the EMA weights (fairseq extra_state.ema)")
    conv.add_argument("--vocab", help="vocab.json of the BART/OFA BPE (path or URL)")
    conv.add_argument("--merges", help="merges.txt of the BART/OFA BPE (path or URL)")
    conv.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"biomedgpt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
