"""The `biomedgpt` command.

    biomedgpt demo                             raw VQA-RAD sample -> shards -> training -> served answer
    biomedgpt shards build DATASET --source DIR --out URL     native dataset -> WebDataset shards
    biomedgpt shards inspect|verify URL        counts and samples / checksums of built shards
    biomedgpt shards datasets                  the datasets with a converter
    biomedgpt datasets new NAME --from MANIFEST --task T      a dataset spec for a department's own data
    biomedgpt run SPEC                         run a job spec (locally, or under `ray job submit`)
    biomedgpt submit SPEC --address URL        submit a job spec to a Ray cluster, follow its log
    biomedgpt serve MODEL_DIR|SPEC             serve a model directory or a serving spec over HTTP (Ray Serve)
    biomedgpt serve-config SPEC                the Ray Serve deploy config of a serving spec (jobs/serve/)
    biomedgpt registry export|list|show        the model registry: versioned, immutable model directories
    biomedgpt export CHECKPOINT OUT            a training checkpoint -> model directory
    biomedgpt model info SIZE [--json]         config and parameter count of a named size
    biomedgpt convert SRC DST [--config C]     official checkpoint -> our model directory
    biomedgpt vqgan convert|codes              the VQGAN image tokenizer: taming checkpoint -> model dir; image codes
    biomedgpt score --task T --predictions P --references R    metrics as JSON
    biomedgpt evaluate MODEL --shards URL --dataset D:SPLIT    model x datasets -> results + HTML report
    biomedgpt cluster render|validate          the shared cluster from cluster/tenants.yaml
    biomedgpt tenants add-key|revoke-key       serving API keys of a department (<key-id>.<secret>)
    biomedgpt k8s rayjob SPEC                  a KubeRay RayJob (Kueue-queued) for a job spec
    biomedgpt audit show [--department D] [--since T]    the audit trail: requests, admission decisions

Every subcommand has `--help`. Errors are printed as one line naming the file or field, exit code 2.
The console shows one line per phase and progress bars; Ray's, Serve's, Lightning's and torch's own
logs go to the run's `logs/` (the path is printed once): `-v/--verbose`, before or after the command,
shows them on the terminal instead.

The package holds the whole command line: this module (the front door and the commands of its own),
`shards.py` (`shards ...`), `datasets.py` (`datasets new`), `serve.py` (`serve`, `serve-config`, `registry ...`),
`evaluate.py` (`evaluate`), `vqgan.py` (`vqgan ...`), `audit.py` (`audit show`) and `cluster.py` (`cluster ...`, `tenants ...`,
`k8s ...`). Each command imports what it runs inside its
function: building the parser loads no command's dependencies (Ray, Ray Serve, the evaluation stack), and
Ray must not be imported before its environment is set.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from typing import Sequence

from ..console import quiet_warnings, set_verbose
from ..evaluate.score import add_score_parser
from ..spec import SpecError
from .audit import add_audit_commands
from .cluster import add_cluster_commands
from .datasets import add_datasets_commands
from .evaluate import add_evaluate_parser
from .serve import add_serve_commands
from .shards import add_shards_commands
from .vqgan import add_vqgan_commands

# Local Ray must register and dial 127.0.0.1 only; this must be set before ray is imported (nothing
# above imports it: every command imports what it runs when it runs).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _cmd_model_info(args: argparse.Namespace) -> int:
    import torch

    from ..model import BiomedGPTConfig, BiomedGPTForConditionalGeneration

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
    from ..model.convert import convert

    report = convert(args.src, args.dst, config_path=args.config, ema=args.ema, vocab=args.vocab, merges=args.merges)
    print(f"converted {report.source} ({report.naming} names{', EMA weights' if report.ema else ''}) -> "
          f"{report.destination}: {report.parameters:,} parameters, config from {report.config_from}, "
          f"tokenizer {'written' if report.tokenizer else 'not found (no vocab.json + merges.txt beside the source)'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ..runner import run
    from ..spec import load_spec

    spec = load_spec(args.spec)  # validated before any resource is used
    result = run(spec)
    print(json.dumps({"run_dir": result.run_dir, "checkpoint": result.checkpoint, "export": result.export_dir,
                      "evaluation": result.evaluation}, indent=2, default=str))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from ..submit import ClusterUnavailable, submit

    try:
        return submit(args.spec, args.address, working_dir=args.working_dir, follow=not args.no_wait)
    except ClusterUnavailable as err:
        print(f"biomedgpt submit: error: {err}", file=sys.stderr)
        return 3


def _cmd_export(args: argparse.Namespace) -> int:
    from ..modeldir import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(out=args.out, spec_path=args.spec)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..model.configuration import SIZES  # transformers (~4 s): `model info` offers the sizes as choices

    parser = argparse.ArgumentParser(prog="biomedgpt", description="Pretrain, fine-tune, evaluate and serve BiomedGPT.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, Serve's, Lightning's and torch's own logs and warnings on the terminal "
                             "(otherwise they go to the run's logs/ folder)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="the whole path on local Ray: sample -> shards -> train -> evaluate -> serve",
                          description="Builds shards from the VQA-RAD sample in datasets_spec/samples, trains the demo "
                                      "model with 2 Ray Train workers, evaluates it, exports and serves it with Ray "
                                      "Serve on 127.0.0.1, asks it one question over HTTP and shuts everything down.")
    demo.add_argument("--out", default="runs/demo", help="working directory (shards, run, export); default runs/demo")
    demo.add_argument("--spec", default=None, help="the job spec to train with (default jobs/demo/vqa_rad.yaml)")
    demo.set_defaults(func=_cmd_demo)

    add_shards_commands(sub)
    add_datasets_commands(sub)

    run = sub.add_parser("run", help="run a job spec (YAML) locally or under `ray job submit`",
                         description="Validates SPEC, then runs it: on the Ray cluster named by RAY_ADDRESS "
                                     "(as `ray job submit` sets it) or on a local Ray started on 127.0.0.1. Running "
                                     "the same spec again resumes from its latest checkpoint.")
    run.add_argument("spec", help="job spec YAML (see jobs/)")
    run.set_defaults(func=_cmd_run)

    submit = sub.add_parser("submit", help="submit a job spec to a Ray cluster and follow its log",
                            description="Validates SPEC, then submits `biomedgpt run SPEC` through the Ray job API "
                                        "(the working dir uploaded as the runtime env; token auth when the cluster "
                                        "uses it; job id <team>-<name>-<time>) and prints the job's log until it "
                                        "ends. Exit code 0 only when the job succeeded, 1 when it did not, 3 when the "
                                        "cluster cannot take it (nothing listens at ADDRESS, no job agent ready, "
                                        "token auth refused).")
    submit.add_argument("spec", help="job spec YAML (inside --working-dir)")
    submit.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    submit.add_argument("--working-dir", default=".", help="folder uploaded with the job (default: .)")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.set_defaults(func=_cmd_submit)

    add_serve_commands(sub)  # serve, serve-config, registry

    export = sub.add_parser("export", help="turn a training checkpoint into a model directory")
    export.add_argument("checkpoint", help="checkpoint directory (<run>/checkpoint-XXXXXXXX)")
    export.add_argument("out", help="output model directory")
    export.set_defaults(func=_cmd_export)

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

    add_score_parser(sub)
    add_evaluate_parser(sub)
    add_cluster_commands(sub)
    add_audit_commands(sub)
    add_vqgan_commands(sub)
    return parser


VERBOSE_FLAGS = ("-v", "--verbose")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose is accepted anywhere before a "--": moved in front of the command, where the parser has it
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in VERBOSE_FLAGS]
    argv = flags[:1] + [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        set_verbose(True)
    quiet_warnings()
    try:
        return int(args.func(args) or 0)
    except (SpecError, ValueError, FileNotFoundError, KeyError, pickle.UnpicklingError) as err:
        # UnpicklingError: a checkpoint naming a global it may not (model/safe_pickle.py)
        print(f"biomedgpt {args.command}: error: {err}", file=sys.stderr)
        return 2
