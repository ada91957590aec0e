"""The ``biomedgpt shards`` subcommands, ready to be added to the ``biomedgpt`` parser.

    biomedgpt shards build DATASET [--source DIR] --out URL [--split S]... [--spec YAML]
                           [--shard-max-samples N] [--shard-max-mb N] [--file ROLE=PATH]...
                           [--option KEY=VALUE]... [--converter NAME] [--skip-missing-images]
                           [--max-bad-fraction F] [--codes VQGAN_DIR [--codes-batch-size N]]
                           [--ray [--workers N]] [--quiet]
    biomedgpt shards inspect URL [-n 3] [--json]
    biomedgpt shards verify URL
    biomedgpt shards datasets

``biomedgpt.cli`` wires them with ``add_shards_commands(subparsers)``; each subcommand sets ``func`` (takes
the parsed args, returns the exit code). Errors are ValueError/KeyError/FileNotFoundError with a
message naming the file and field, which the ``biomedgpt`` front door prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pairs(items: list[str] | None, flag: str, parse_values: bool) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if parse_values else value
    return out


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _cmd_build(args: argparse.Namespace) -> int:
    from ..data.build import build_shards
    from ..data.dataset_spec import load_dataset_spec

    spec_path = args.spec
    if args.workers is not None and not args.ray:
        raise ValueError("--workers: only with --ray")
    if spec_path is None and Path("datasets_spec", f"{args.dataset}.yaml").is_file():
        spec_path = str(Path("datasets_spec", f"{args.dataset}.yaml"))
    spec = load_dataset_spec(spec_path) if spec_path else None
    source = args.source
    if source is None:
        from ..data.own_data import source_of

        source = source_of(spec) if spec is not None else None
        if source is None:
            raise ValueError("--source: the folder of the native release (a dataset spec's source.manifest.location "
                             "may say it instead)")
    if spec is not None and not args.quiet:
        print(f"dataset spec: {spec_path}", file=sys.stderr)
    if args.ray:  # Ray's own logs to a file: the console keeps the bar of shards
        import tempfile
        import time

        from ..console import libraries_to_file

        log = Path(tempfile.gettempdir()) / "biomedgpt-logs" / time.strftime("shards-%Y%m%d-%H%M%S.log")
        if libraries_to_file(log) and not args.quiet:
            print(f"[biomedgpt] logs: Ray's own logs go to {log} (--verbose shows them here)", file=sys.stderr)
    options = _pairs(args.option, "--option", parse_values=True)
    if args.skip_missing_images:
        options["on_missing_image"] = "skip"
    result = build_shards(
        args.dataset, source, args.out, args.split or None,
        shard_max_samples=args.shard_max_samples, shard_max_bytes=args.shard_max_mb * 2**20,
        files=_pairs(args.file, "--file", parse_values=False), options=options, spec=spec,
        converter=args.converter, progress=not args.quiet, parallel=args.ray, workers=args.workers,
        max_bad_fraction=args.max_bad_fraction, codes=args.codes, codes_batch_size=args.codes_batch_size,
    )
    for split, manifest in result.items():
        defects = manifest.notes.get("defects", {}).get("count", 0)
        skipped = f", {defects} unusable records skipped (notes.defects of its manifest.json)" if defects else ""
        print(f"{manifest.dataset}/{split}: {manifest.samples} samples, {len(manifest.shards)} shards{skipped}")
    print(f"{len(result.written)} shards written, {len(result.kept)} kept, {len(result.removed)} removed")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..data.inspect import inspect_shards

    summary = inspect_shards(args.url, n=args.n)
    print(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) if args.json else summary.format())
    return 0 if summary.splits else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..data.shards import verify_shards

    report = verify_shards(args.url)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_datasets(args: argparse.Namespace) -> int:
    from ..data.converters import CONVERTERS

    for name in sorted(CONVERTERS):
        cls = CONVERTERS[name]
        kind = "generic (reads the dataset named by a spec or --converter)" if getattr(cls, "generic", False) else cls.licence
        print(f"{name:18} {cls.task:9} {cls.access:12} {kind}")
    return 0


def add_shards_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``shards {build,inspect,verify,datasets}`` to a ``biomedgpt`` subparsers object."""
    from ..data.shards import DEFAULT_SHARD_MAX_BYTES, DEFAULT_SHARD_MAX_SAMPLES

    shards = subparsers.add_parser("shards", help="build, inspect and verify WebDataset shards",
                                   description="WebDataset shards built from native dataset releases.")
    sub = shards.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    sub.required = True

    build = sub.add_parser(
        "build", help="convert a dataset's native release into shards + manifest.json per split",
        description="Convert DATASET from its native release at --source into <out>/DATASET/SPLIT/*.tar + manifest.json. "
                    "Restartable: shards already built from the same input are kept.")
    build.add_argument("dataset", help="dataset name (see `biomedgpt shards datasets`)")
    build.add_argument("--source", help="folder of the native release (path, file:// or s3:// URL); default: the "
                                           "spec's source.manifest.location (a department's own data)")
    build.add_argument("--out", required=True, help="shard root (path, file:// or s3:// URL)")
    build.add_argument("--split", action="append", help="build only this split (repeatable; default: all present)")
    build.add_argument("--spec", help="dataset spec YAML (default: datasets_spec/DATASET.yaml when it exists)")
    build.add_argument("--shard-max-samples", type=int, default=DEFAULT_SHARD_MAX_SAMPLES,
                       help=f"samples per shard at most (default {DEFAULT_SHARD_MAX_SAMPLES})")
    build.add_argument("--shard-max-mb", type=int, default=DEFAULT_SHARD_MAX_BYTES // 2**20,
                       help=f"MiB per shard at most (default {DEFAULT_SHARD_MAX_BYTES // 2**20})")
    build.add_argument("--file", action="append", metavar="ROLE=PATH",
                       help="where the converter finds one of its files, relative to --source (repeatable)")
    build.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="converter option, VALUE parsed as YAML, e.g. languages=[en,zh] (repeatable)")
    build.add_argument("--converter", help="a generic converter reading DATASET (ofa_tsv_vqa, summarize_table, "
                                           "dicom_folder ...; default: the spec's, else the one named DATASET)")
    build.add_argument("--ray", action="store_true",
                       help="write shards as Ray tasks (joins RAY_ADDRESS's cluster, else starts a local Ray)")
    build.add_argument("--workers", type=int, help="with --ray: shards in flight at most (default: 2 x cluster CPUs)")
    build.add_argument("--skip-missing-images", action="store_true",
                       help="drop records whose image is missing, without limit (counted in the manifest); by "
                            "default they count against the error budget")
    build.add_argument("--max-bad-fraction", type=_fraction, default=None, metavar="F",
                       help="share of a split's records that may be skipped as unusable (empty answer or question, "
                            "missing image, unreadable row or image) before the build fails (default: the dataset "
                            "spec's source.max_bad_fraction, else 0.01)")
    build.add_argument("--codes", metavar="VQGAN_DIR",
                       help="store each image's VQGAN codes beside it (codes.npy: the image-infilling recipe's "
                            "16 x 16 grid) computed by this model directory (`biomedgpt vqgan convert`); default: "
                            "the dataset spec's source.codes. With --ray: a Ray Data actor pool, a GPU per actor "
                            "when the cluster has GPUs")
    build.add_argument("--codes-batch-size", type=int, default=32, help="images per VQGAN forward pass (default 32)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_cmd_build)

    inspect = sub.add_parser("inspect", help="counts per split and a few sample records")
    inspect.add_argument("url", help="a shard root, a dataset or a split folder")
    inspect.add_argument("-n", type=int, default=3, help="sample records to show per split (default 3)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_inspect)

    verify = sub.add_parser("verify", help="recompute every shard's sha256 and compare with its manifest")
    verify.add_argument("url", help="a shard root, a dataset or a split folder")
    verify.set_defaults(func=_cmd_verify)

    datasets = sub.add_parser("datasets", help="list the datasets with a converter")
    datasets.set_defaults(func=_cmd_datasets)
    return shards
