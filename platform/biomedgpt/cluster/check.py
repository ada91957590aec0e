"""`biomedgpt cluster validate`: everything that describes the shared cluster, checked offline.

1. cluster/tenants.yaml against its schema and rules (load_tenants), and tenants.schema.json current
2. k8s/ rendered from it is current (a fresh render gives the same files)
3. every manifest file under k8s/, static and rendered (core kinds: kubernetes-validate strict; KubeRay
   and Kueue kinds: their CRD schemas, strict, with defaults, CEL rules and the operators' rules)
4. `kubectl kustomize` builds every folder with a kustomization.yaml; what it builds validates too
5. names between objects resolve (queues, flavors, priority classes, ServiceAccounts, Roles)
6. the RayJobs of the example job specs in cluster/jobs/ (as `biomedgpt k8s rayjob` prints them)
7. the Ray cluster-launcher configs in cluster/launcher/ (Ray's schema and Ray's own checks)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..spec import load_spec
from ..tenancy import REPO, Tenants, load_tenants
from ..tenancy.schema import SCHEMA
from .launcher import launcher_problems, load_launcher_config
from .rayjob import rayjob_manifests
from .render import render, stale_files
from .validate import ManifestValidator, check_references, kustomize_build, kustomize_dirs, load_documents

CRDS_ENV = "BIOMEDGPT_CRDS"


def default_crd_dir() -> Path:
    """$BIOMEDGPT_CRDS, else the KubeRay and Kueue CRDs the repository carries at the versions it targets
    (tests/fixtures/crds, xz-compressed; provenance in tests/fixtures/README.md)."""
    if os.environ.get(CRDS_ENV):
        return Path(os.environ[CRDS_ENV])
    return REPO / "tests" / "fixtures" / "crds"


@dataclass
class Report:
    files: int = 0
    objects: int = 0
    kustomizations: int = 0
    rayjobs: int = 0
    launcher_configs: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.files} manifest files ({self.objects} objects), {self.kustomizations} kustomize builds, "
                f"{self.rayjobs} RayJobs from cluster/jobs/, {self.launcher_configs} cluster-launcher configs")


def manifest_files(k8s_dir: Path) -> list[Path]:
    return sorted(p for p in Path(k8s_dir).rglob("*.yaml") if p.name != "kustomization.yaml")


def check_everything(tenants_path: str | Path | None = None, *, k8s_dir: Path | None = None,
                     crd_dir: Path | None = None, launcher_dir: Path | None = None, jobs_dir: Path | None = None,
                     validator: ManifestValidator | None = None) -> Report:
    tenants: Tenants = load_tenants(tenants_path)  # TenancyError on a bad file
    repo = tenants.path.resolve().parent.parent
    k8s_dir = Path(k8s_dir or repo / "k8s")
    launcher_dir = Path(launcher_dir or tenants.path.parent / "launcher")
    jobs_dir = Path(jobs_dir or tenants.path.parent / "jobs")
    validator = validator or ManifestValidator(crd_dir or default_crd_dir())
    report = Report()
    out = report.problems

    schema_file = tenants.path.parent / "tenants.schema.json"
    if not schema_file.is_file() or json.loads(schema_file.read_text()) != SCHEMA:
        out.append(f"{schema_file}: missing or out of date: run `biomedgpt cluster render`")
    for rel in stale_files(render(tenants, k8s_dir / "base"), k8s_dir):
        out.append(f"{k8s_dir / rel}: differs from what {tenants.path} renders: run `biomedgpt cluster render`")

    for f in manifest_files(k8s_dir):
        objs = load_documents(f.read_text())
        report.files += 1
        report.objects += len(objs)
        out += validator.validate(objs, str(f))

    built: dict[tuple[str, str, str], dict] = {}
    for d in kustomize_dirs(k8s_dir):
        report.kustomizations += 1
        try:
            objs = load_documents(kustomize_build(d))
        except Exception as err:  # noqa: BLE001 (reported, the other folders still build)
            out.append(str(err))
            continue
        out += validator.validate(objs, f"kubectl kustomize {d}")
        for o in objs:
            m = o.get("metadata", {})
            built[(o.get("kind"), m.get("namespace", ""), m.get("name"))] = o
    out += [f"{k8s_dir}: {p}" for p in check_references(list(built.values()))]

    for spec_file in sorted(jobs_dir.glob("*.yaml")) if jobs_dir.is_dir() else []:
        try:
            docs = rayjob_manifests(load_spec(spec_file), spec_file, tenants)
        except ValueError as err:
            out.append(f"{spec_file}: {err}")
            continue
        report.rayjobs += 1
        out += validator.validate(docs, f"biomedgpt k8s rayjob {spec_file}")
        out += [f"{spec_file}: {p}" for p in check_references(docs, known=built.values())]

    for cfg in sorted(launcher_dir.glob("*.yaml")) if launcher_dir.is_dir() else []:
        report.launcher_configs += 1
        config = load_launcher_config(cfg)
        out += launcher_problems(config, str(cfg))
        image = (config.get("docker") or {}).get("image")
        if image and image != tenants.image:
            out.append(f"{cfg}: docker.image {image} is not cluster.image {tenants.image} of {tenants.path}")
    return report
