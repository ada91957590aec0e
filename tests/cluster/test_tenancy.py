"""cluster/tenants.yaml: its schema and rules, the quota arithmetic, job admission and serving keys."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from biomedgpt.tenancy.quantity import parse_quantity
from biomedgpt.tenancy import (AdmissionError, TenancyError, admit, hash_api_key, load_tenants, new_api_key,
                               verify_api_key)

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "cluster" / "jobs"


def spec(team: str = "stanford-like-radiology", *, train=("vqa_rad",), storage="s3://biomedgpt-stanford-like/radiology",
         shards="s3://biomedgpt-shared/shards/open/", init="s3://biomedgpt-shared/models/biomedgpt-base/",
         build=None, source="jobs/test.yaml"):
    from biomedgpt.spec import spec_from_dict

    data = yaml.safe_load((JOBS / "stanford-like-radiology-vqa-rad.yaml").read_text())
    data["team"] = team
    data["data"]["train"] = [{"dataset": d, "split": "train"} for d in train]
    data["data"]["eval"] = []
    data["data"]["shards"] = shards
    if build:
        data["data"]["build"] = build
    data["output"]["storage"] = storage
    if init is None:
        data["model"].pop("init")
    else:
        data["model"]["init"] = init
    return spec_from_dict(data, source)


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def test_repository_tenants_file_loads_and_names_teams_institution_department(tenants):
    assert set(tenants.institutions) == {"stanford-like", "mayo-like", "charite-like"}
    assert {"stanford-like-radiology", "stanford-like-pathology", "mayo-like-radiology", "mayo-like-cardiology",
            "charite-like-dermatology", "demo"} == set(tenants.teams)
    team = tenants.team("stanford-like-radiology")
    assert (team.institution, team.department, team.namespace, team.queue) == \
        ("stanford-like", "radiology", "stanford-like", "radiology")
    assert tenants.team("demo").local_only
    # credentialed datasets go only to teams holding the credential
    for t in tenants.teams.values():
        for name in t.credentialed_datasets:
            assert set(tenants.credentials_unlocking(name)) & set(t.credentials), (t.name, name)


def test_every_credentialed_dataset_is_unlocked_by_a_credential(tenants):
    credentialed = sorted(n for n, a in tenants.dataset_access.items() if a == "credentialed")
    missing = [n for n in credentialed if not tenants.credentials_unlocking(n)]
    assert not missing, f"datasets_spec/ marks {missing} credentialed; list them under a credential in tenants.yaml"
    assert tenants.dataset_access["vqa_rad"] == "open"


def test_schema_file_beside_tenants_is_current():
    from biomedgpt.tenancy.schema import SCHEMA

    assert json.loads((REPO / "cluster" / "tenants.schema.json").read_text()) == SCHEMA


def test_quota_arithmetic_nominal_quotas_add_up_to_the_gpu_inventory(tenants_data):
    """Straight from the YAML, independent of the loader: per GPU type, per CPU and memory."""
    cluster, institutions = tenants_data["cluster"], tenants_data["institutions"].values()
    for gpu_type, g in cluster["gpuTypes"].items():
        total = sum(i["quota"]["gpus"].get(gpu_type, {"nominal": 0})["nominal"] for i in institutions)
        assert total == g["gpus"], gpu_type
    assert sum(parse_quantity(i["quota"]["cpu"]["nominal"]) for i in institutions) == parse_quantity(cluster["cpu"]["cpus"])
    assert sum(parse_quantity(i["quota"]["memory"]["nominal"]) for i in institutions) == \
        parse_quantity(cluster["cpu"]["memory"])
    # nothing lends more than it owns
    for i in institutions:
        for lim in [i["quota"]["cpu"], i["quota"]["memory"], *i["quota"]["gpus"].values()]:
            assert parse_quantity(lim.get("lendingLimit", lim["nominal"])) <= parse_quantity(lim["nominal"])


def test_loader_refuses_quotas_that_do_not_add_up(tenants_file):
    def more(d):
        d["institutions"]["mayo-like"]["quota"]["gpus"]["h100-80gb"]["nominal"] = 5

    with pytest.raises(TenancyError, match=r"cluster\.gpuTypes\.h100-80gb\.gpus: .*add up to 17 GPUs, not the inventory 16"):
        load_tenants(tenants_file(more))

    def less_memory(d):
        d["institutions"]["charite-like"]["quota"]["memory"]["nominal"] = "1Ti"

    with pytest.raises(TenancyError, match=r"cluster\.cpu\.memory"):
        load_tenants(tenants_file(less_memory))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["cluster"].__setitem__("gpuTypez", {}), r"cluster: unknown key .*gpuTypez"),
    (lambda d: d["institutions"]["mayo-like"]["departments"]["radiology"].__setitem__("storage", ["s3://b/no-slash"]),
     r"institutions\.mayo-like\.departments\.radiology\.storage\.0: 's3://b/no-slash' does not match"),
    (lambda d: d["institutions"]["mayo-like"]["quota"]["cpu"].__setitem__("nominal", "12 cores"),
     r"institutions\.mayo-like\.quota\.cpu\.nominal"),
    (lambda d: d["institutions"]["mayo-like"]["quota"]["gpus"]["a100-80gb"].__setitem__("lendingLimit", 13),
     r"quota\.gpus\.a100-80gb\.lendingLimit: 13 exceeds the nominal quota 12"),
    (lambda d: d["institutions"]["mayo-like"]["quota"]["gpus"].__setitem__("v100", {"nominal": 0}),
     r"quota\.gpus\.v100: unknown GPU type"),
    (lambda d: d["institutions"]["charite-like"]["departments"]["dermatology"]["datasets"].__setitem__(
        "credentialed", ["mimic_cxr"]), r"dermatology\.datasets\.credentialed: 'mimic_cxr' needs credential physionet"),
    (lambda d: d["institutions"]["charite-like"]["departments"]["dermatology"]["datasets"]["open"].append("mednli"),
     r"dermatology\.datasets\.open: 'mednli' is credentialed"),
    (lambda d: d["institutions"]["mayo-like"]["departments"]["cardiology"].__setitem__(
        "storage", ["s3://biomedgpt-mayo-like/radiology/cardio/"]), r"storage prefixes overlap"),
    (lambda d: d["priorities"]["pretraining"].__setitem__("kinds", ["finetune"]),
     r"priorities: job kind 'finetune' must map to exactly one class"),
    (lambda d: d["institutions"]["mayo-like"]["departments"]["radiology"]["serving"].__setitem__("gpuType", "h200"),
     r"serving\.gpuType: 'h200': the institution has no quota"),
    (lambda d: d["institutions"]["mayo-like"]["departments"]["radiology"]["serving"].__setitem__(
        "registry", "s3://biomedgpt-stanford-like/radiology/registry/"),
     r"radiology\.serving\.registry: .* under none of"),
    # the schema before registries: a serving entry named one exported model directory
    (lambda d: d["institutions"]["mayo-like"]["departments"]["radiology"]["serving"].update(
        model=d["institutions"]["mayo-like"]["departments"]["radiology"]["serving"].pop("registry")),
     r"radiology\.serving: unknown key \('model' was unexpected\) \(and 1 more\)"),
    (lambda d: d.pop("servingSpec"), r"servingSpec: required when departments serve \(stanford-like-radiology, "
                                     r"mayo-like-radiology\)"),
    (lambda d: d["credentials"]["physionet"]["datasets"].append("vqa_rad"),
     r"credentials\.physionet\.datasets: 'vqa_rad' is open in"),
])
def test_loader_names_the_file_the_field_and_the_rule(tenants_file, mutate, message):
    path = tenants_file(mutate)
    with pytest.raises(TenancyError, match=message) as err:
        load_tenants(path)
    assert str(err.value).startswith(f"{path}: ")


def test_duplicate_keys_are_errors_not_silently_merged(tmp_path):
    text = (REPO / "cluster" / "tenants.yaml").read_text()
    dup = text.replace("  mayo-like:\n", "  stanford-like:\n", 1)
    path = tmp_path / "tenants.yaml"
    path.write_text(dup)
    with pytest.raises(TenancyError, match="duplicate key 'stanford-like'"):
        load_tenants(path)


# ----------------------------------------------------------------------------------------------
# Admission
# ----------------------------------------------------------------------------------------------


def test_the_example_cluster_jobs_and_the_demo_are_admitted(tenants):
    from biomedgpt.spec import load_spec

    for path in sorted(JOBS.glob("*.yaml")):
        admit(load_spec(path), tenants, on_cluster=True)
    admit(load_spec(REPO / "jobs" / "demo" / "vqa_rad.yaml"), tenants, on_cluster=False)


def test_refusal_names_spec_file_team_dataset_and_rule(tenants):
    s = spec("charite-like-dermatology", train=("pathvqa",), storage="s3://biomedgpt-charite-like/dermatology")
    with pytest.raises(AdmissionError) as err:
        admit(s, tenants, on_cluster=True)
    e = err.value
    assert isinstance(e, ValueError)
    assert (e.spec_file, e.team) == ("jobs/test.yaml", "charite-like-dermatology") and "pathvqa" in e.subject
    assert e.field == "data.train[0].dataset"
    assert str(e).startswith("jobs/test.yaml: data.train[0].dataset: team 'charite-like-dermatology' may not read "
                             "dataset 'pathvqa': open dataset not granted")
    assert "institutions.charite-like.departments.dermatology.datasets.open" in str(e)


def test_credentialed_datasets_need_the_credential_and_the_grant(tenants):
    # mayo-like radiology holds no physionet credential
    with pytest.raises(AdmissionError, match=r"team 'mayo-like-radiology' may not read dataset 'mednli': credentialed "
                                             r"datasets need a credential the team holds: mednli needs physionet"):
        admit(spec("mayo-like-radiology", train=("mednli",), storage="s3://biomedgpt-mayo-like/radiology"), tenants,
              on_cluster=True)
    # mayo-like cardiology holds it but was granted mednli only
    with pytest.raises(AdmissionError, match=r"'mimic_cxr': credentialed dataset not granted"):
        admit(spec("mayo-like-cardiology", train=("mimic_cxr",), storage="s3://biomedgpt-mayo-like/cardiology"),
              tenants, on_cluster=True)
    # granted and held; its shards under the credential's prefix are readable
    admit(spec("stanford-like-radiology", train=("mimic_cxr", "vqa_rad"),
               shards="s3://biomedgpt-shared/shards/physionet/"), tenants, on_cluster=True)
    # ... but not by a team without the credential, even for open data
    with pytest.raises(AdmissionError, match=r"may not read s3://biomedgpt-shared/shards/physionet/ \(shards\)"):
        admit(spec("stanford-like-pathology", train=("pathvqa",), storage="s3://biomedgpt-stanford-like/pathology",
                   shards="s3://biomedgpt-shared/shards/physionet/"), tenants, on_cluster=True)


def test_unknown_datasets_and_credentialed_specs_without_a_credential_are_refused(tenants, tenants_file, tmp_path):
    with pytest.raises(AdmissionError, match=r"'no_such_set': it is not described in datasets_spec/"):
        admit(spec(train=("no_such_set",)), tenants, on_cluster=True)
    # a dataset spec that says credentialed, but no credential in tenants.yaml unlocks it
    specs = tmp_path / "datasets_spec"
    specs.mkdir()
    (specs / "vqa_rad.yaml").write_text("name: vqa_rad\naccess: open\n")
    (specs / "secret_notes.yaml").write_text("name: secret_notes\naccess: credentialed\n")
    t = load_tenants(tenants_file(lambda d: d.__setitem__("datasetSpecs", str(specs))))
    with pytest.raises(AdmissionError, match=r"'secret_notes': it is credentialed and no credential in tenants.yaml"):
        admit(spec(train=("secret_notes",)), t, on_cluster=True)


def test_output_prefix_rules(tenants):
    with pytest.raises(AdmissionError) as err:
        admit(spec(storage="s3://biomedgpt-mayo-like/radiology"), tenants, on_cluster=True)
    assert "may not write s3://biomedgpt-mayo-like/radiology/stanford-like-radiology/vqa-rad-ft (output (run " \
           "directory)): a team may write only under its storage prefixes: s3://biomedgpt-stanford-like/radiology/" \
           in str(err.value)
    # `..` cannot climb out of the prefix (it is refused outright: object storage keeps it in the key)
    with pytest.raises(AdmissionError, match="may not write s3://biomedgpt-stanford-like/radiology/../pathology"):
        admit(spec(storage="s3://biomedgpt-stanford-like/radiology/../pathology"), tenants, on_cluster=True)
    # a prefix matches whole path segments only
    with pytest.raises(AdmissionError):
        admit(spec(storage="s3://biomedgpt-stanford-like/radiology-old"), tenants, on_cluster=True)
    # shards a job builds are written: they must be under the team's prefixes too
    with pytest.raises(AdmissionError, match=r"may not write s3://biomedgpt-shared/shards/open/ \(shards it builds\)"):
        admit(spec(build={"vqa_rad": "datasets_spec/samples/vqa_rad"}), tenants, on_cluster=True)
    # the initial model: shared read prefixes are readable, other teams' prefixes are not
    with pytest.raises(AdmissionError, match=r"may not read s3://biomedgpt-mayo-like/radiology/x/ \(initial model\)"):
        admit(spec(init="s3://biomedgpt-mayo-like/radiology/x/"), tenants, on_cluster=True)


def test_local_paths_local_runs_only_unless_declared(tenants, tenants_file, tmp_path, monkeypatch):
    local = spec(storage=str(tmp_path / "runs"), shards=str(tmp_path / "shards"), init=None)
    admit(local, tenants, on_cluster=False)  # local.anyLocalPath: true
    with pytest.raises(AdmissionError, match=r"on the cluster a local path is allowed only under one of the team's"):
        admit(local, tenants, on_cluster=True)
    # the environment decides when not told: the cluster's pods set BIOMEDGPT_ON_CLUSTER=1
    monkeypatch.setenv("BIOMEDGPT_ON_CLUSTER", "1")
    with pytest.raises(AdmissionError):
        admit(local, tenants)
    monkeypatch.delenv("BIOMEDGPT_ON_CLUSTER")
    admit(local, tenants)
    # a declared file:// prefix (mayo-like's NFS share on its own GPU servers) is fine on a cluster
    admit(spec("mayo-like-radiology", storage="file:///mnt/biomedgpt/mayo-like/radiology/runs"), tenants,
          on_cluster=True)
    strict = load_tenants(tenants_file(lambda d: d["local"].__setitem__("anyLocalPath", False)))
    with pytest.raises(AdmissionError, match="local.anyLocalPath is false"):
        admit(local, strict, on_cluster=False)


def test_unknown_and_local_only_teams(tenants):
    with pytest.raises(AdmissionError, match=r"team 'radiology' may not run jobs: the team is not a department"):
        admit(spec("radiology"), tenants)
    with pytest.raises(AdmissionError, match=r"'demo' is a local-only team"):
        admit(spec("demo", storage="runs"), tenants, on_cluster=True)


# ----------------------------------------------------------------------------------------------
# Serving keys
# ----------------------------------------------------------------------------------------------


def test_api_keys_are_salted_scrypt_hashes_that_verify_per_team(tenants_file):
    key, other = new_api_key("test"), new_api_key("test")
    h1, h2 = hash_api_key(key), hash_api_key(key)
    assert h1 != h2 and h1.startswith("scrypt$n=16384,r=8,p=1$")  # a fresh salt each time
    assert key not in h1

    def add(d):
        d["institutions"]["charite-like"]["departments"]["dermatology"]["apiKeys"] = [{"id": "test", "hash": h1}]

    t = load_tenants(tenants_file(add))
    assert verify_api_key("charite-like-dermatology", key, t)
    assert verify_api_key("charite-like-dermatology", key, t)  # cached the second time
    assert not verify_api_key("charite-like-dermatology", other, t)
    assert not verify_api_key("stanford-like-radiology", key, t)  # another team's key set
    assert not verify_api_key("nobody", key, t)
    assert not verify_api_key("charite-like-dermatology", "", t)
    with pytest.raises(ValueError, match="at least 20 characters"):
        hash_api_key("test.short")


def test_repository_key_hashes_are_well_formed_and_reject_guesses(tenants):
    keys = [(t.name, k) for t in tenants.teams.values() for k in t.api_keys]
    assert len(keys) >= 3
    for team, k in keys:
        assert k.hash.count("$") == 3
        assert not verify_api_key(team, "x" * 43, tenants)
        assert not verify_api_key(team, f"{k.id}." + "x" * 43, tenants)


def test_fraction_quantities():
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("2Gi") == 2 * 2**30
    assert parse_quantity(12) == 12
    with pytest.raises(ValueError):
        parse_quantity("12 cores")
