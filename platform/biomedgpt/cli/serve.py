"""`biomedgpt serve`, `biomedgpt serve-config` and `biomedgpt registry`: the serving side of the CLI.

    biomedgpt serve MODEL_DIR|SPEC.yaml          serve one model directory, or a serving spec, on local Ray
    biomedgpt serve-config SPEC.yaml [-o FILE]   the Ray Serve config (`serve deploy`/`serve run`) of a spec
    biomedgpt registry export SRC --department D --name N --team T   publish a new immutable version (T owns D)
    biomedgpt registry list [--department D] [--json]       the registry's models
    biomedgpt registry show MODEL_ID                        one version's model card
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REGISTRY_HELP = "registry URL: a path, file:// or s3:// (default $BIOMEDGPT_REGISTRY, else ./registry)"


def _cmd_serve(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from ..console import libraries_to_file
    from ..session import ensure_ray, keep_ray_logs
    from ..serve.spec import apply_serve_ray_env

    apply_serve_ray_env()  # before Ray starts (and before ray.serve reads its constants)
    logs = Path(tempfile.gettempdir()) / "biomedgpt-logs" / time.strftime("serve-%Y%m%d-%H%M%S")
    if libraries_to_file(logs / "driver.log"):
        print(f"[biomedgpt] logs: Ray's and Serve's own logs go to {logs} (--verbose shows them here)", flush=True)
    from ..serve.app import start, start_spec, stop

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml") and target.is_file():
        from ..spec import load_serve_spec

        spec = load_serve_spec(target)  # validated before Ray starts
        ensure_ray()
        url = start_spec(spec, host=args.host, port=args.port)
        name = spec.name
        what = f"{spec.name} ({spec.source})"
    else:
        ensure_ray()
        # a model directory named relative to here: absolute, since Serve's replicas have their own cwd
        model = str(target.absolute()) if "://" not in args.target and target.exists() else args.target
        url = start(model, host=args.host or "127.0.0.1", port=args.port or 8000, team=args.team,
                    tenants_path=args.tenants)
        name = "biomedgpt"
        what = args.target
    print(f"serving {what} at {url} (POST /v1/vqa|caption|classify|nli|summarize, GET /v1/models, /healthz, "
          f"/docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(name)
        keep_ray_logs(logs)
    return 0


def _cmd_serve_config(args: argparse.Namespace) -> int:
    from ..spec import load_serve_spec
    from ..serve.spec import dump_deploy_config

    text = dump_deploy_config(load_serve_spec(args.spec))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out} (run it with `serve run {args.out}` or `serve deploy {args.out}`)")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_registry_export(args: argparse.Namespace) -> int:
    from ..serve.registry import Registry

    from ..tenancy import load_tenants

    team = args.team or os.environ.get("BIOMEDGPT_TEAM")
    if not team:
        raise ValueError("registry export: --team (or $BIOMEDGPT_TEAM) is required: the exporter's team, which must "
                         f"own --department {args.department!r}")
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    entry = Registry(args.registry).export(args.source, args.department, args.name, licence=args.licence,
                                           metrics=metrics, description=args.description or "",
                                           tasks=args.task or None, team=team, tenants=load_tenants(args.tenants),
                                           merge=args.merge, base=args.base)
    print(f"published {entry.id} at {entry.url} ({len(entry.manifest['files'])} files)")
    return 0


def _cmd_registry_list(args: argparse.Namespace) -> int:
    from ..serve.registry import Registry, format_table

    entries = Registry(args.registry).list(args.department, all_versions=not args.latest)
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
    elif not entries:
        print(f"no models in {Registry(args.registry).url}" + (f" for {args.department}" if args.department else ""))
    else:
        print(format_table(entries))
    return 0


def _cmd_registry_show(args: argparse.Namespace) -> int:
    from ..serve.registry import Registry

    entry = Registry(args.registry).resolve(args.model)
    print(json.dumps(dict(entry.card, url=entry.url), indent=2, sort_keys=True))
    return 0


def add_serve_commands(sub) -> None:
    """Register `serve`, `serve-config` and `registry` on the `biomedgpt` parser."""
    serve = sub.add_parser(
        "serve", help="serve a model directory or a serving spec over HTTP with Ray Serve (127.0.0.1)",
        description="TARGET is an exported model directory (`biomedgpt export`, a run's export/, a registry version) "
                    "or a serving spec (jobs/serve/*.yaml: the model registry, API keys, multiplexing, batching, "
                    "autoscaling). Serves on a local Ray until Ctrl-C.")
    serve.add_argument("target", help="model directory, or serving spec YAML")
    serve.add_argument("--host", default=None, help="bind address (default: the spec's, else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default: the spec's, else 8000)")
    serve.add_argument("--team", help="model directory: serve for this department; requests need its API keys")
    serve.add_argument("--tenants", help="model directory: tenants file with the API-key hashes "
                                         "(default cluster/tenants.yaml)")
    serve.set_defaults(func=_cmd_serve)

    cfg = sub.add_parser("serve-config", help="write the Ray Serve config (serve deploy / serve run) of a serving spec",
                         description="Validates SPEC and prints (or writes with -o) the Ray Serve config file: one "
                                     "application (import_path biomedgpt.serve.app:app_builder, the spec as args) "
                                     "with the ingress and model deployments' replicas, autoscaling and resources. "
                                     "Use it with `serve run`, `serve deploy` or as a RayService's serveConfigV2.")
    cfg.add_argument("spec", help="serving spec YAML (jobs/serve/*.yaml)")
    cfg.add_argument("-o", "--out", help="write to this file instead of stdout")
    cfg.set_defaults(func=_cmd_serve_config)

    reg = sub.add_parser("registry", help="the model registry: export, list and show versioned models",
                         description="Versioned, immutable model directories on object storage, named "
                                     "<department>/<name>@<version>.")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    reg_sub.required = True

    exp = reg_sub.add_parser("export", help="publish a run checkpoint or a model directory as a new version",
                             description="SOURCE is a run checkpoint (<run>/checkpoint-XXXXXXXX, exported first) or a "
                                         "model directory with config.json (`biomedgpt convert`/`export`) or an "
                                         "adapter run's checkpoint or adapter directory (its base must be in the "
                                         "registry, or at the model directory it names, unchanged). Writes "
                                         "weights, config, tokenizer, answers, training.json and the model card "
                                         "(training data, metrics from <run>/eval/metrics.json, licences) as the "
                                         "next version; existing versions are never overwritten.")
    exp.add_argument("source", help="run checkpoint or model directory (path or URL)")
    exp.add_argument("--department", required=True, help="owning department: the team name of cluster/tenants.yaml "
                                                          "(e.g. stanford-like-radiology)")
    exp.add_argument("--name", required=True, help="model name within the department (e.g. vqa-rad)")
    exp.add_argument("--team", default=None, help="the exporter's team (default $BIOMEDGPT_TEAM, which a RayJob sets): "
                                                  "it must be the department exported into")
    exp.add_argument("--tenants", default=None, help="the tenants file (default: $BIOMEDGPT_TENANTS, else "
                                                     "./cluster/tenants.yaml, else the checkout's)")
    exp.add_argument("--registry", default=None, help=REGISTRY_HELP)
    exp.add_argument("--licence", default=None, help="licence of the model weights (default Apache-2.0)")
    exp.add_argument("--metrics", default=None, help="metrics.json to record instead of the run's eval/metrics.json")
    exp.add_argument("--task", action="append", default=None,
                     help="task family the model serves (repeatable; default: the task it was trained on)")
    exp.add_argument("--description", default=None, help="one line for the model card")
    exp.add_argument("--merge", action="store_true",
                     help="an adapter run: publish a standalone model with the adapter folded into its base")
    exp.add_argument("--base", default=None,
                     help="an adapter run: the registry id of its base (default: what the run recorded); its weights "
                          "must be those the adapter was trained on")
    exp.set_defaults(func=_cmd_registry_export)

    ls = reg_sub.add_parser("list", help="the registry's models (every version)")
    ls.add_argument("--registry", default=None, help=REGISTRY_HELP)
    ls.add_argument("--department", default=None, help="only this department's models")
    ls.add_argument("--latest", action="store_true", help="only the latest version of each model")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    ls.set_defaults(func=_cmd_registry_list)

    show = reg_sub.add_parser("show", help="the model card of one version (MODEL_ID may end in @latest)")
    show.add_argument("model", help="model id, e.g. stanford-like-radiology/vqa-rad@latest")
    show.add_argument("--registry", default=None, help=REGISTRY_HELP)
    show.set_defaults(func=_cmd_registry_show)
