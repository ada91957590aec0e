"""The `biomedgpt cluster ...` and `biomedgpt k8s ...` subcommands.

    biomedgpt cluster render [--tenants FILE] [--out DIR]     tenants.yaml -> k8s/ (kustomize)
    biomedgpt cluster validate [--tenants FILE] [--crds DIR]  tenants, manifests, kustomize, launcher configs
    biomedgpt tenants add-key TEAM --id ID [--tenants FILE]   a new serving key, its hash and the manifest change
    biomedgpt tenants revoke-key TEAM ID [--tenants FILE]     the entry to remove and the manifest change
    biomedgpt k8s rayjob SPEC [--tenants FILE] [--image IMAGE] [...]    a RayJob for a job spec, on stdout

`biomedgpt.cli` wires them into the main parser with `add_cluster_commands(subparsers)`; each sets `func` to a
function of the parsed arguments that returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tenants_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenants", metavar="FILE", default=None,
                        help="the tenants file (default: $BIOMEDGPT_TENANTS, else ./cluster/tenants.yaml, "
                             "else the checkout's cluster/tenants.yaml)")


def _cmd_render(args: argparse.Namespace) -> int:
    from ..tenancy import load_tenants
    from ..cluster.render import render, write_rendered, write_schema

    tenants = load_tenants(args.tenants)
    out = Path(args.out) if args.out else tenants.path.resolve().parent.parent / "k8s"
    base = out / "base"
    if not (base / "raycluster" / "raycluster.yaml").is_file():
        raise FileNotFoundError(f"{base}: the static base manifests (raycluster/, rayservice/) must be there; "
                                "overlays refer to them")
    files = render(tenants, base)
    written = write_rendered(files, out)
    schema = write_schema(tenants.path)
    print(f"rendered {len(written)} files from {tenants.path} into {out} "
          f"({len(tenants.institutions)} institutions, {len(tenants.teams) - len(tenants.local_teams)} teams); "
          f"schema: {schema}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from ..cluster.validate import missing_tooling

    if missing := missing_tooling():
        print(f"biomedgpt cluster validate: needs the dev tooling ({', '.join(missing)} not installed): "
              "pip install -e '.[dev]' (make install does)", file=sys.stderr)
        return 2
    from ..cluster.check import check_everything, default_crd_dir

    crds = Path(args.crds) if args.crds else default_crd_dir()
    if not crds.is_dir():
        raise FileNotFoundError(f"{crds}: CRD schemas not found; give --crds DIR or set $BIOMEDGPT_CRDS "
                                "(the KubeRay and Kueue CustomResourceDefinition YAML files)")
    report = check_everything(args.tenants, k8s_dir=Path(args.k8s) if args.k8s else None, crd_dir=crds)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    if report.problems:
        print(f"cluster validate: {len(report.problems)} problem(s) in {report.summary()}", file=sys.stderr)
        return 1
    print(f"cluster validate: OK: {report.summary()}")
    return 0


def _department(tenants, name: str):
    team = tenants.team(name)
    if team.local_only:
        raise ValueError(f"{tenants.path}: {name!r} is a local-only team ({team.where}); serving keys belong to "
                         "departments")
    return team


def _key_manifest_change(tenants, team, keys: list[dict]) -> str:
    """What changes in k8s/ when the department's apiKeys become `keys`: a unified diff of its rendered key Secret,
    and how to apply it (the RayService reloads the mounted file; no image rebuild, no redeploy)."""
    import copy
    import difflib

    from ..cluster.render import api_keys_secret, dump_yaml
    from ..tenancy import tenants_from_dict

    if team.serving is None:
        return (f"{team.name} has no RayService (no `serving` in {team.where}): nothing in k8s/ changes; local "
                f"serving (`biomedgpt serve ... --team {team.name}` or a serving spec) reads {tenants.path}.")
    data = copy.deepcopy(tenants.raw)
    data["institutions"][team.institution]["departments"][team.department]["apiKeys"] = keys
    for key in ("datasetSpecs", "servingSpec"):  # relative to the tenants file, wherever the copy is made
        if key in data:
            data[key] = str((tenants.path.parent / data[key]).resolve())
    after = tenants_from_dict(data, tenants.path)  # the changed file must still load
    rel = f"k8s/tenants/{team.institution}/api-keys.yaml"
    old = dump_yaml(api_keys_secret(tenants, team)).splitlines(keepends=True)
    new = dump_yaml(api_keys_secret(after, after.team(team.name))).splitlines(keepends=True)
    diff = "".join(difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}"))
    return (f"The manifest change (Secret {team.namespace}/{team.api_keys_secret}, mounted into the RayService "
            f"{team.namespace}/{team.department}-biomedgpt-serve):\n{diff}"
            f"Render and apply it: biomedgpt cluster render && kubectl apply -f {rel}\n"
            "The serving replicas read the mounted file again when it changes (the kubelet updates it within about a "
            "minute): no image rebuild, no redeploy.")


def _cmd_add_key(args: argparse.Namespace) -> int:
    from ..tenancy import hash_api_key, load_tenants, new_api_key

    tenants = load_tenants(args.tenants)
    team = _department(tenants, args.team)
    taken = {k.id: t.name for t in tenants.teams.values() for k in t.api_keys}
    if args.id in taken:
        raise ValueError(f"{tenants.path}: key id {args.id!r} is taken (by {taken[args.id]}); key ids are unique in "
                         "the whole file")
    key = new_api_key(args.id)
    digest = hash_api_key(key)
    entry = {"id": args.id, "hash": digest, **({"description": args.description} if args.description else {})}
    keys = [{"id": k.id, "hash": k.hash, **({"description": k.description} if k.description else {})}
            for k in team.api_keys] + [entry]
    lines = [f"  - id: {args.id}"] + ([f"    description: {args.description}"] if args.description else []) + \
        [f"    hash: {digest}"]
    print(f"API key for {team.name} (give it to the client once; only its hash is stored):\n  {key}\n"
          f"hash: {digest}\n"
          f"Add to {tenants.path} under {team.where}.apiKeys:\n" + "\n".join(lines) + "\n"
          + _key_manifest_change(tenants, team, keys))
    return 0


def _cmd_revoke_key(args: argparse.Namespace) -> int:
    from ..tenancy import load_tenants

    tenants = load_tenants(args.tenants)
    team = _department(tenants, args.team)
    gone = next((k for k in team.api_keys if k.id == args.key_id), None)
    if gone is None:
        raise ValueError(f"{tenants.path}: {team.where}.apiKeys: no key {args.key_id!r} "
                         f"(its keys: {', '.join(k.id for k in team.api_keys) or 'none'})")
    keys = [{"id": k.id, "hash": k.hash, **({"description": k.description} if k.description else {})}
            for k in team.api_keys if k.id != args.key_id]
    print(f"Revoking {team.name}'s key {gone.id!r} (hash: {gone.hash}).\n"
          f"Remove from {tenants.path} under {team.where}.apiKeys the entry with id: {gone.id}\n"
          + _key_manifest_change(tenants, team, keys))
    return 0


def _cmd_rayjob(args: argparse.Namespace) -> int:
    from ..spec import load_spec
    from ..tenancy import load_tenants
    from ..cluster.rayjob import RayJobOptions, rayjob_manifests
    from ..cluster.render import dump_yaml

    spec = load_spec(args.spec)  # validated before anything else
    tenants = load_tenants(args.tenants)
    options = RayJobOptions(image=args.image, gpu_type=args.gpu_type, data_workers=args.data_workers,
                            ttl_seconds=args.ttl, retries=args.retries, deadline_seconds=args.deadline)
    docs = rayjob_manifests(spec, args.spec, tenants, options)
    sys.stdout.write(dump_yaml(docs, f"# biomedgpt k8s rayjob {args.spec}: team {spec.team}, queue "
                                     f"{docs[1]['metadata']['namespace']}/{docs[1]['metadata']['labels']['kueue.x-k8s.io/queue-name']}\n"))
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_cluster_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `cluster` (render, validate), `tenants` (add-key, revoke-key) and `k8s` (rayjob) to a `biomedgpt`
    subparsers object."""
    cluster = subparsers.add_parser(
        "cluster", help="the shared cluster as data: render k8s/ from cluster/tenants.yaml, validate it",
        description="cluster/tenants.yaml describes who shares the Kubernetes GPU cluster; these commands turn it "
                    "into Kubernetes manifests and check everything offline.")
    csub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    csub.required = True

    render = csub.add_parser(
        "render", help="render k8s/ (kustomize) from the tenants file",
        description="Write k8s/kustomization.yaml, k8s/kueue/ (ResourceFlavors, ClusterQueues in one cohort, "
                    "WorkloadPriorityClasses), k8s/tenants/<institution>/ (Namespace, ResourceQuota, LimitRange, "
                    "ServiceAccount, RBAC, LocalQueues) and k8s/overlays/<team>/ (the base RayCluster and "
                    "RayService in the team's namespace and queue), plus tenants.schema.json beside the tenants "
                    "file. k8s/base/ is static and left alone.")
    _tenants_arg(render)
    render.add_argument("--out", metavar="DIR", default=None,
                        help="the k8s folder to write (default: k8s/ beside the tenants file's folder)")
    render.set_defaults(func=_cmd_render)

    validate = csub.add_parser(
        "validate", help="validate tenants.yaml, every manifest, kustomize builds and launcher configs, offline",
        description="Check the tenants file, that k8s/ is what it renders, every manifest (core kinds with "
                    "kubernetes-validate --strict; KubeRay and Kueue kinds against their CRD schemas, strict, with "
                    "CEL rules), `kubectl kustomize` of every overlay, names between objects, the RayJobs of "
                    "cluster/jobs/ and the Ray cluster-launcher configs. Exit code 1 when anything is wrong.")
    _tenants_arg(validate)
    validate.add_argument("--k8s", metavar="DIR", default=None, help="the k8s folder (default: beside cluster/)")
    validate.add_argument("--crds", metavar="DIR", default=None,
                          help="folder of KubeRay and Kueue CRD YAML files, plain or .xz (default: $BIOMEDGPT_CRDS, "
                               "else the repository's tests/fixtures/crds)")
    validate.set_defaults(func=_cmd_validate)

    tenants = subparsers.add_parser(
        "tenants", help="serving API keys of the departments: add and revoke (tenants.yaml and the key Secrets)",
        description="A serving API key is <key-id>.<secret>; tenants.yaml stores the id and a salted scrypt hash of "
                    "the secret under the department's apiKeys, and `cluster render` writes them into the "
                    "department's Secret <department>-biomedgpt-api-keys, which its RayService mounts and reloads.")
    tsub = tenants.add_subparsers(dest="tenants_command", metavar="SUBCOMMAND")
    tsub.required = True
    add_key = tsub.add_parser(
        "add-key", help="make a serving API key: print it, its hash, the tenants.yaml entry and the manifest change",
        description="Print a fresh key <ID>.<secret> (give it to the client once), its hash, the entry to add to the "
                    "department's apiKeys in tenants.yaml and the change of its rendered key Secret. Nothing is "
                    "written: edit tenants.yaml, `biomedgpt cluster render`, `kubectl apply`.")
    add_key.add_argument("team", help="the department (<institution>-<department>)")
    add_key.add_argument("--id", required=True, help="the key's id: lower-case letters, digits, '-', '_' (unique in "
                                                     "the tenants file; it is the key's first part)")
    add_key.add_argument("--description", default=None, help="one line: who holds the key")
    _tenants_arg(add_key)
    add_key.set_defaults(func=_cmd_add_key)
    revoke = tsub.add_parser(
        "revoke-key", help="revoke a serving API key: print the entry to remove and the manifest change",
        description="Print which entry to remove from the department's apiKeys in tenants.yaml and the change of its "
                    "rendered key Secret; once applied, the RayService refuses the key without a rebuild.")
    revoke.add_argument("team", help="the department (<institution>-<department>)")
    revoke.add_argument("key_id", help="the id of the key to revoke")
    _tenants_arg(revoke)
    revoke.set_defaults(func=_cmd_revoke_key)

    k8s = subparsers.add_parser("k8s", help="Kubernetes manifests for job specs (KubeRay + Kueue)",
                                description="Print Kubernetes manifests for job specs; pipe them to kubectl.")
    ksub = k8s.add_subparsers(dest="k8s_command", metavar="SUBCOMMAND")
    ksub.required = True
    rayjob = ksub.add_parser(
        "rayjob", help="print a RayJob (and its spec ConfigMap) for a job spec",
        description="Admit SPEC for its team as a cluster run, then print a ConfigMap holding the spec and a "
                    "KubeRay RayJob: queue label of the team's LocalQueue, priority class of the job kind, "
                    "entrypoint `biomedgpt run SPEC`, worker groups sized from the spec (autoscaling off, as "
                    "Kueue requires), shut down after it finishes, deleted after --ttl seconds. "
                    "Use: biomedgpt k8s rayjob SPEC | kubectl apply -f -")
    rayjob.add_argument("spec", help="job spec YAML")
    _tenants_arg(rayjob)
    rayjob.add_argument("--image", default=None, help="container image (default: cluster.image of the tenants file)")
    rayjob.add_argument("--gpu-type", default=None,
                        help="GPU type for the trainers (default: the first type the institution has enough quota of)")
    rayjob.add_argument("--data-workers", type=_non_negative, default=2,
                        help="cpu-preprocess pods for Ray Data (default 2)")
    rayjob.add_argument("--ttl", type=_non_negative, default=3600,
                        help="seconds a finished RayJob is kept before deletion (default 3600)")
    rayjob.add_argument("--retries", type=_non_negative, default=1,
                        help="new clusters after a failed one; each resumes the run from its latest checkpoint "
                             "(default 1)")
    rayjob.add_argument("--deadline", type=_positive, default=None,
                        help="activeDeadlineSeconds: stop the job after this many seconds (default: none)")
    rayjob.set_defaults(func=_cmd_rayjob)
