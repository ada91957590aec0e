"""Helpers for tests/cluster: the `biomedgpt` parser holding the cluster commands (as cli.py wires them)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cluster_parser():
    """The `biomedgpt` parser as cli.py builds it, holding the cluster and k8s commands."""
    import argparse

    from biomedgpt.cli.cluster import add_cluster_commands

    parser = argparse.ArgumentParser(prog="biomedgpt")
    add_cluster_commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def run_cli(argv: list[str]) -> int:
    args = cluster_parser().parse_args(argv)
    return int(args.func(args))
