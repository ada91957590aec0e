"""Fixtures for the shared-cluster tests: the repository's tenants file, the manifest validator over the
KubeRay and Kueue CRDs of tests/fixtures/crds, and every kustomize build of k8s/ (built once per session)."""

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
def tenants_data() -> dict[str, Any]:
    return yaml.safe_load(TENANTS.read_text())


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    return fixture("crds")


@pytest.fixture(scope="session")
def validator(crd_dir: Path):
    from biomedgpt.cluster.validate import ManifestValidator

    return ManifestValidator(crd_dir)


@pytest.fixture(scope="session")
def builds() -> dict[Path, list[dict[str, Any]]]:
    """`kubectl kustomize` of every folder of k8s/ with a kustomization.yaml."""
    from biomedgpt.cluster.validate import kustomize_build, kustomize_dirs, load_documents

    return {d: load_documents(kustomize_build(d)) for d in kustomize_dirs(K8S)}


@pytest.fixture(scope="session")
def cluster_objects(builds) -> list[dict[str, Any]]:
    """Every distinct object the kustomize builds produce (the whole cluster as applied)."""
    out = {}
    for objs in builds.values():
        for o in objs:
            m = o["metadata"]
            out[(o["kind"], m.get("namespace", ""), m["name"])] = o
    return list(out.values())


@pytest.fixture
def tenants_file(tmp_path: Path, tenants_data) -> Callable[..., Path]:
    """Write a modified copy of the repository's tenants.yaml: tenants_file(mutate) -> path. The copy
    keeps reading the repository's datasets_spec/ and serving spec unless mutate says otherwise."""

    def make(mutate: Callable[[dict[str, Any]], Any] | None = None, name: str = "tenants.yaml") -> Path:
        data = copy.deepcopy(tenants_data)
        data["datasetSpecs"] = str(REPO / "datasets_spec")
        data["servingSpec"] = str(REPO / "jobs" / "serve" / "cluster.yaml")
        if mutate:
            mutate(data)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make
