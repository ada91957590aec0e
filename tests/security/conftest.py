"""Fixtures of the security boundary tests: the repository's tenants file, its copies with changes, the
manifest validator over the repository's CRDs (tests/fixtures/crds), and every kustomize build of k8s/."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from fixture_files import fixture

REPO = Path(__file__).resolve().parents[2]
TENANTS = REPO / "cluster" / "tenants.yaml"
K8S = REPO / "k8s"


@pytest.fixture(scope="session")
def tenants():
    from biomedgpt.tenancy import load_tenants

    return load_tenants(TENANTS)


@pytest.fixture(scope="session")
def validator():
    from biomedgpt.cluster.validate import ManifestValidator

    return ManifestValidator(fixture("crds"))


@pytest.fixture(scope="session")
def builds() -> dict[Path, list[dict[str, Any]]]:
    """`kubectl kustomize` of every folder of k8s/ with a kustomization.yaml: what `kubectl apply -k` applies."""
    from biomedgpt.cluster.validate import kustomize_build, kustomize_dirs, load_documents

    return {d: load_documents(kustomize_build(d)) for d in kustomize_dirs(K8S)}


@pytest.fixture(scope="session")
def rayjobs(tenants) -> list[dict[str, Any]]:
    """The RayJobs (and their ConfigMaps) `biomedgpt k8s rayjob` makes of the example specs of cluster/jobs/."""
    from biomedgpt.cluster.rayjob import rayjob_manifests
    from biomedgpt.spec import load_spec

    out = []
    for spec_file in sorted((REPO / "cluster" / "jobs").glob("*.yaml")):
        out += rayjob_manifests(load_spec(spec_file), spec_file, tenants)
    assert len([o for o in out if o["kind"] == "RayJob"]) >= 2
    return out


@pytest.fixture
def tenants_file(tmp_path: Path) -> Callable[..., Path]:
    """tenants_file(mutate) -> the path of a changed copy of the repository's tenants.yaml (still reading the
    repository's datasets_spec/ and serving spec)."""
    data = yaml.safe_load(TENANTS.read_text())

    def make(mutate: Callable[[dict[str, Any]], Any] | None = None) -> Path:
        d = copy.deepcopy(data)
        d["datasetSpecs"] = str(REPO / "datasets_spec")
        d["servingSpec"] = str(REPO / "jobs" / "serve" / "cluster.yaml")
        if mutate:
            mutate(d)
        path = tmp_path / "tenants.yaml"
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path

    return make
