"""`biomedgpt evaluate`: a model on datasets from the command line (an evaluate job spec built from the
arguments, validated and admitted like any spec, then run as `biomedgpt run` runs one)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def spec_from_args(args: argparse.Namespace):
    """The kind-evaluate JobSpec the arguments describe."""
    from ..spec import SpecError, spec_from_dict

    refs = []
    for item in args.dataset:
        dataset, sep, split = item.partition(":")
        if not dataset or not sep or not split:
            raise SpecError(f"--dataset {item!r}: expected DATASET:SPLIT, e.g. vqa_rad:test")
        refs.append({"dataset": dataset, "split": split})
    splits = list(dict.fromkeys(r["split"] for r in refs))
    stem = Path(args.model.rstrip("/")).name or "model"
    name = args.name or re.sub(r"[^a-z0-9._-]+", "-", f"eval-{stem}-{args.mode}".lower()).strip("-")[:63]
    evaluate: dict[str, Any] = {"mode": args.mode, "splits": splits, "max_samples": args.max_samples,
                                "concurrency": args.concurrency, "batch_size": args.batch_size,
                                "meteor": not args.no_meteor, "report_samples": args.report_samples,
                                "use_gpu": args.gpu}
    data = {"kind": "evaluate", "name": name, "team": args.team,
            "model": {"init": args.model, "image_size": args.image_size,
                      "tokenizer": {"path": args.tokenizer or args.model}},
            "data": {"shards": args.shards, "eval": refs, "max_source_length": args.max_source_length},
            "evaluate": evaluate, "output": {"storage": args.out}}
    return spec_from_dict(data, "biomedgpt evaluate")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..runner import run

    spec = spec_from_args(args)
    result = run(spec)
    run_dir = Path(spec.run_dir)
    if (run_dir / "results.md").is_file():
        print((run_dir / "results.md").read_text())
    print(json.dumps({"run_dir": result.run_dir, "evaluation": result.evaluation}, indent=2, default=str))
    return 0


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on datasets (each with its task's official decoding) on Ray; tables + HTML report",
        description="Evaluate MODEL (a model directory from `biomedgpt export` / `biomedgpt convert`, a run's "
                    "export/, a run directory or a run checkpoint) on each --dataset DATASET:SPLIT of the shards "
                    "under --shards, with each task's official decoding (or free generation with --mode "
                    "zero_shot), on Ray actors. Writes results.md, results.json, report.html and per-dataset "
                    "predictions/references to <out>/<team>/<name>/. For a saved job, write a spec "
                    "(jobs/evaluate/) and use `biomedgpt run SPEC`.",
    )
    parser.add_argument("model", help="model directory, run directory or run checkpoint (path or URL)")
    parser.add_argument("--shards", required=True, help="shard root holding <dataset>/<split>/")
    parser.add_argument("--dataset", action="append", required=True, metavar="DATASET:SPLIT",
                        help="a dataset split to evaluate (repeat for several)")
    parser.add_argument("--mode", choices=("official", "zero_shot"), default="official",
                        help="official decoding per task (default) or free generation for every task")
    parser.add_argument("--max-samples", type=int, default=0, help="cap per dataset (default 0: all)")
    parser.add_argument("--concurrency", type=int, default=2, help="Ray actors, each with the model (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    parser.add_argument("--image-size", type=int, default=256, help="input resolution in px (default 256)")
    parser.add_argument("--max-source-length", type=int, default=80, help="encoder tokens (default 80)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    parser.add_argument("--report-samples", type=int, default=8, help="predictions per dataset in report.html")
    parser.add_argument("--no-meteor", action="store_true", help="captions: leave METEOR out (no Java needed)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--team", default="demo", help="the team the evaluation runs for (default demo)")
    parser.add_argument("--name", help="run name (default eval-<model>-<mode>)")
    parser.add_argument("--out", default="runs/evaluate", help="output storage (default runs/evaluate)")
    parser.set_defaults(func=_cmd_evaluate)
    return parser
