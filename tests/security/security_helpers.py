"""Helpers of the security tests: the `biomedgpt` CLI in-process, and the serving spec a RayService overlay runs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str]) -> int:
    from biomedgpt.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args))


def overlay_serve_spec(team: str):
    """The serving spec (`ServeAppSpec`) in the serveConfigV2 of the RayService `kubectl kustomize
    k8s/overlays/<team>` builds: what the department's ingress replicas run."""
    from biomedgpt.cluster.validate import kustomize_build, load_documents
    from biomedgpt.spec import serve_spec_from_dict

    objs = load_documents(kustomize_build(REPO / "k8s" / "overlays" / team))
    (service,) = [o for o in objs if o["kind"] == "RayService"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return serve_spec_from_dict(app["args"]["spec"], app["args"]["source"])
