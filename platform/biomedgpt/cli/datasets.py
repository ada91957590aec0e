"""``biomedgpt datasets new NAME --from MANIFEST --task TASK``: a dataset spec for a department's own data
(``data/own_data.py`` infers it from the manifest's columns), ready for ``biomedgpt shards build``."""

from __future__ import annotations

import argparse
import sys


def _maps(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--map: expected FIELD=COLUMN, got {item!r}")
        field, column = item.split("=", 1)
        out[field.strip()] = column.strip()
    return out


def _ratio(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        split, _, share = part.partition("=")
        try:
            out[split.strip()] = float(share)
        except ValueError:
            raise ValueError(f"--split-ratio: expected SPLIT=SHARE,... (train=0.8,val=0.1,test=0.1), got {text!r}") from None
    return out


def _cmd_new(args: argparse.Namespace) -> int:
    from ..data.own_data import new_dataset_spec

    path, spec, notes = new_dataset_spec(
        args.name, args.manifest, args.task, out=args.out, maps=_maps(args.map), split_ratio=_ratio(args.split_ratio),
        seed=args.seed, licence=args.licence, access=args.access, description=args.description, force=args.force)
    for note in notes:
        print(f"  {note}", file=sys.stderr)
    print(f"{path}: {spec.task} dataset {spec.name}, splits {', '.join(spec.splits)}, access {spec.access}")
    print(f"next: biomedgpt shards build {spec.name} --spec {path} --out SHARDS")
    return 0


def add_datasets_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``datasets new`` to a ``biomedgpt`` subparsers object."""
    from ..data.converters.manifest import MANIFEST_CONVERTERS

    datasets = subparsers.add_parser("datasets", help="dataset specs for a department's own data",
                                     description="Dataset specs (datasets_spec/*.yaml) for data that has no converter "
                                                 "of its own: a folder of images (or DICOM files) and a manifest.")
    sub = datasets.add_subparsers(dest="datasets_command", metavar="SUBCOMMAND")
    sub.required = True
    new = sub.add_parser(
        "new", help="write a dataset spec from a CSV/TSV/JSONL manifest's columns",
        description="Write datasets_spec/NAME.yaml (or --out) describing MANIFEST as TASK records: the column of each "
                    "field, the image column (values that are files beside the manifest), the split column or a "
                    "ratio, the licence. What the columns cannot tell is refused, naming the flag that says it.")
    new.add_argument("name", help="dataset name (lower case, digits, _)")
    new.add_argument("--from", dest="manifest", required=True, metavar="MANIFEST",
                     help="the manifest: .csv, .tsv or .jsonl; image paths in it are relative to its folder")
    new.add_argument("--task", required=True, choices=list(MANIFEST_CONVERTERS), help="the task family of its records")
    new.add_argument("--out", help="where to write the spec (default datasets_spec/NAME.yaml)")
    new.add_argument("--map", action="append", metavar="FIELD=COLUMN",
                     help="the column holding a field, when its name does not say (e.g. answer=Finding; fields: "
                          "question answer answer_type organ caption label labels text premise hypothesis summary "
                          "image id group split) (repeatable)")
    new.add_argument("--split-ratio", metavar="SPLIT=SHARE,...",
                     help="without a split column: shares of a stable hash (default train=0.8,val=0.1,test=0.1)")
    new.add_argument("--seed", type=int, default=0, help="the split hash's seed (default 0)")
    new.add_argument("--licence", help="who may use the data and for what (required: it cannot be inferred)")
    new.add_argument("--access", default="credentialed", choices=["credentialed", "open"],
                     help="access class (default credentialed: granted per department in cluster/tenants.yaml)")
    new.add_argument("--description", help="one line about the data")
    new.add_argument("--force", action="store_true", help="replace an existing spec file")
    new.set_defaults(func=_cmd_new)
    return datasets
