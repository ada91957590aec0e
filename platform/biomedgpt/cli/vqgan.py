"""The ``biomedgpt vqgan`` subcommands: the image tokenizer of image infilling (model/vqgan.py).

    biomedgpt vqgan convert SRC DST [--config model.yaml]     taming GumbelVQ checkpoint -> model directory
    biomedgpt vqgan codes MODEL_DIR IMAGE... [--whole] [--json] [--batch-size N]

``codes`` prints one line per image: by default the infilling recipe's 16 x 16 codes (the image resized to
256 x 256 bicubic, its centre 128 x 128); ``--whole`` encodes the image as given (sides multiples of 8).
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..model.vqgan import IGNORED_PREFIXES, convert_taming_checkpoint

    report = convert_taming_checkpoint(args.src, args.dst, config=args.config)
    ignored = ", ".join(f"{n} {p}* ({IGNORED_PREFIXES[p]})" for p, n in sorted(report.ignored.items())) or "none"
    print(f"converted {report.source} -> {report.destination}: {report.used} keys used (encoder, quant_conv, "
          f"quantize.proj, quantize.embed), {report.parameters:,} parameters; ignored: {ignored}; "
          f"config from {report.config_from}")
    if report.other_entries:
        print(f"  checkpoint entries besides state_dict (not read): {', '.join(report.other_entries)}")
    return 0


def _cmd_codes(args: argparse.Namespace) -> int:
    from ..model.vqgan import VQGANTokenizer

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    tok = VQGANTokenizer.from_pretrained(args.model_dir, device=args.device)
    codes = tok.encode(args.images, whole=args.whole, batch_size=args.batch_size, names=args.images)
    for path, grid in zip(args.images, codes):
        if args.json:
            print(json.dumps({"image": path, "recipe": "whole" if args.whole else "center",
                              "shape": list(grid.shape), "codes": grid.tolist()}))
        else:
            print(f"{path}: {grid.shape[0]}x{grid.shape[1]} codes: {' '.join(str(int(c)) for c in grid.reshape(-1))}")
    sys.stdout.flush()
    return 0


def add_vqgan_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``vqgan {convert,codes}`` to a ``biomedgpt`` subparsers object."""
    vqgan = subparsers.add_parser("vqgan", help="the VQGAN image tokenizer of image infilling (convert, codes)",
                                  description="taming-transformers' GumbelVQ encoder (vqgan_gumbel_f8_8192 and its "
                                              "family): the codes image infilling is trained to predict.")
    sub = vqgan.add_subparsers(dest="vqgan_command", metavar="SUBCOMMAND")
    sub.required = True

    conv = sub.add_parser("convert", help="a taming checkpoint -> a VQGAN model directory",
                          description="Read a taming GumbelVQ checkpoint (a Lightning .ckpt with a state_dict, a "
                                      "state-dict .pt, or an .npz of arrays by name) without running any code it "
                                      "names, and write DST: config.json + model.safetensors. The decoder, "
                                      "post_quant_conv and loss weights are named and left out; any other unknown key "
                                      "is an error.")
    conv.add_argument("src", help="the checkpoint (.ckpt, .pt or .npz)")
    conv.add_argument("dst", help="output model directory")
    conv.add_argument("--config", help="taming model.yaml (default: the architecture read off the weights' shapes, "
                                       "resolution 256)")
    conv.set_defaults(func=_cmd_convert)

    codes = sub.add_parser("codes", help="the VQGAN codes of images",
                           description="One line per image. Default: the infilling recipe (resize to 256 x 256 "
                                       "bicubic without keeping the aspect ratio, the centre box (64, 64, 192, 192), "
                                       "values 2x-1): a 16 x 16 grid, row-major. Codes are the argmax of the "
                                       "quantiser's logits (deterministic).")
    codes.add_argument("model_dir", help="a directory written by `biomedgpt vqgan convert`")
    codes.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    codes.add_argument("--whole", action="store_true", help="encode each image as given (sides multiples of 8)")
    codes.add_argument("--json", action="store_true",
                       help='one JSON object per line: {"image", "recipe", "shape", "codes": [[...], ...]}')
    codes.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    codes.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    codes.set_defaults(func=_cmd_codes)
    return vqgan
