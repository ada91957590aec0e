"""The admission boundary: every location a job reads or writes is judged where it really leads.

`biomedgpt.tenancy.admit` decides which team may read and write what; the scenarios here are the ways
around it that the door must close: a location spelled with `..`, `.` or empty segments (object storage
keeps them in the key, a local path resolves them), fields admission did not look at (the tokenizer, the
splits, `data.build`'s sources and datasets), a symlink or a `file://` host leading out of a declared
prefix, a manifest naming shards outside its folder, and `biomedgpt submit` carrying variables that change
the policy the cluster applies. Each error names the spec (or manifest) file, the field and the rule.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tests_paths import REPO

TENANTS = REPO / "cluster" / "tenants.yaml"
CLUSTER_SPEC = REPO / "cluster" / "jobs" / "stanford-like-radiology-vqa-rad.yaml"
DEMO = "jobs/demo/vqa_rad.yaml"
OWN = "s3://biomedgpt-stanford-like/radiology"          # stanford-like-radiology's storage prefix
OTHER = "s3://biomedgpt-stanford-like/pathology"        # stanford-like-pathology's
OPEN = "s3://biomedgpt-shared/shards/open/"             # a shared read prefix
PHYSIONET = "s3://biomedgpt-shared/shards/physionet/"   # readable with the physionet credential only


@pytest.fixture(scope="module")
def tenants():
    from biomedgpt.tenancy import load_tenants

    return load_tenants(TENANTS)


def cluster_spec(team: str = "stanford-like-radiology", source: str = "jobs/x.yaml", **changes):
    """The cluster's radiology fine-tuning spec for `team`, with `changes` ("section__field": value;
    None removes the field), validated as `biomedgpt run` validates it."""
    from biomedgpt.spec import spec_from_dict

    data = yaml.safe_load(CLUSTER_SPEC.read_text())
    data["team"] = team
    data["data"]["eval"] = []
    for key, value in changes.items():
        *path, last = key.split("__")
        node = data
        for part in path:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return spec_from_dict(data, source)


def refused(spec, tenants, *, on_cluster: bool = True):
    from biomedgpt.tenancy import AdmissionError, admit

    with pytest.raises(AdmissionError) as err:
        admit(spec, tenants, on_cluster=on_cluster)
    return err.value


# ----------------------------------------------------------------------------------------------
# `..`, `.` and empty segments: refused outright, in every field
# ----------------------------------------------------------------------------------------------

SEGMENTS = {
    "dot-dot": (f"{OTHER}/../radiology", "'..'"),
    "dot": (f"{OWN}/./x", "'.'"),
    "empty": (f"{OWN}//x", "empty segment"),
}
FIELDS = {
    "output.storage": lambda url: dict(output__storage=url),
    "model.init": lambda url: dict(model__init=f"{url}/model/"),
    "model.tokenizer.path": lambda url: dict(model__tokenizer={"path": f"{url}/model/"}),
    "data.shards": lambda url: dict(data__shards=f"{url}/shards/"),
    "data.build.vqa_rad": lambda url: dict(data__shards=f"{OWN}/shards/", data__build={"vqa_rad": f"{url}/raw/"}),
}


@pytest.mark.parametrize("segment", sorted(SEGMENTS))
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_dot_dot_dot_and_empty_segments_are_refused_in_every_location(tenants, field, segment):
    """`s3://bucket/pathology/../radiology` is a key under pathology/ to s3fs: it must not be admitted as
    radiology's, nor `radiology/./x` or `radiology//x` (other keys than the ones they normalise to)."""
    url, named = SEGMENTS[segment]
    err = refused(cluster_spec(**FIELDS[field](url)), tenants)
    assert err.field == field
    assert str(err).startswith(f"jobs/x.yaml: {field}: team 'stanford-like-radiology' may not ")
    assert named in err.rule and "object storage keeps" in err.rule


def test_dot_dot_is_refused_in_local_paths_too(tenants, tmp_path):
    """Outside the cluster any local path is allowed, but not one spelled with `..`: the rule is the same
    for every location."""
    (tmp_path / "a").mkdir()
    err = refused(cluster_spec("demo", output__storage=str(tmp_path / "a" / ".." / "runs"), model__init=None,
                               data__shards=str(tmp_path / "shards")), tenants, on_cluster=False)
    assert err.field == "output.storage" and "'..'" in err.rule


# ----------------------------------------------------------------------------------------------
# Fields admission did not judge
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", [
    {"path": "s3://biomedgpt-mayo-like/radiology/models/tok/"},
    {"vocab": "s3://biomedgpt-mayo-like/radiology/bpe/vocab.json", "merges": f"{OPEN}bpe/merges.txt"},
])
def test_the_tokenizer_is_read_only_where_the_team_may_read(tenants, tokenizer):
    err = refused(cluster_spec(model__tokenizer=tokenizer), tenants)
    field = "model.tokenizer." + ("path" if "path" in tokenizer else "vocab")
    assert err.field == field and "s3://biomedgpt-mayo-like/radiology/" in err.subject
    assert "a team may read only under its storage prefixes" in err.rule


@pytest.mark.parametrize("side", ["train", "eval"])
@pytest.mark.parametrize("split", ["../../physionet/mimic_cxr/train", "/abs/physionet/mimic_cxr/train",
                                   "train/../../../physionet/mimic_cxr/train"])
def test_a_split_that_is_a_path_is_refused(tenants, side, split):
    """Shards of a split live at <data.shards>/<dataset>/<split>: a split that climbs out of (or, being
    absolute, replaces) the shard root would let a team without the physionet credential read its shards
    while data.shards names the open prefix."""
    refs = {"train": [{"dataset": "pathvqa", "split": "train"}], "eval": []}
    refs[side] = [{"dataset": "pathvqa", "split": split}]
    s = cluster_spec("stanford-like-pathology", output__storage=OTHER, model__init=None, data__train=refs["train"],
                     data__eval=refs["eval"])
    err = refused(s, tenants)
    assert err.field == f"data.{side}[0].split", str(err)
    assert "a split is named by one path segment" in err.rule and split in err.subject


def test_an_absolute_split_on_local_shards_is_refused_on_the_cluster(tenants_copy, tmp_path):
    """Locally, <shards>/<dataset>/<split> with an absolute split is the split itself: the team's NFS shard
    root is admitted, the absolute split leads into another team's folder."""
    mayo, other = tmp_path / "nfs" / "mayo", tmp_path / "nfs" / "pathology"
    t = tenants_copy(mayo=mayo, pathology=other)
    s = cluster_spec("mayo-like-radiology", output__storage=f"file://{mayo}/runs", model__init=None,
                     data__shards=f"file://{mayo}/shards/",
                     data__train=[{"dataset": "vqa_rad", "split": str(other / "shards" / "vqa_rad" / "train")}])
    err = refused(s, t)
    assert err.field == "data.train[0].split" and "one path segment" in err.rule


def test_a_credentialed_dataset_cannot_be_copied_in_through_data_build(tenants):
    """stanford-like-pathology holds no physionet credential: it may not build MIMIC-CXR into its own
    prefix, whether the build names the dataset or passes it off as an open one."""
    base = dict(output__storage=OTHER, model__init=None, data__shards=f"{OTHER}/shards/",
                data__train=[{"dataset": "pathvqa", "split": "train"}])
    err = refused(cluster_spec("stanford-like-pathology", **base,
                               data__build={"mimic_cxr": f"{PHYSIONET}raw/mimic_cxr/"}), tenants)
    assert err.field == "data.build.mimic_cxr"
    assert "may not read dataset 'mimic_cxr': credentialed datasets need a credential the team holds" in str(err)
    err = refused(cluster_spec("stanford-like-pathology", **base,
                               data__build={"vqa_rad": f"{PHYSIONET}raw/mimic_cxr/"}), tenants)
    assert err.field == "data.build.vqa_rad"
    assert f"may not read {PHYSIONET}raw/mimic_cxr/ (native source of vqa_rad)" in str(err)
    # the department that holds the credential and the grant builds it into its own prefix (as pretraining does)
    from biomedgpt.tenancy import admit

    admit(cluster_spec(output__storage=OWN, data__shards=f"{OWN}/shards/", data__train=[{"dataset": "mimic_cxr"}],
                       data__build={"mimic_cxr": f"{PHYSIONET}raw/mimic_cxr/"}), tenants, on_cluster=True)


# ----------------------------------------------------------------------------------------------
# Local paths: judged after realpath; file:// names a path of this machine
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tenants_copy(tmp_path):
    """tenants.yaml with mayo-like-radiology's and stanford-like-pathology's file:// prefixes moved to
    folders of the test (the NFS shares of on-prem servers)."""
    from biomedgpt.tenancy import load_tenants

    def make(mayo: Path, pathology: Path):
        data = copy.deepcopy(yaml.safe_load(TENANTS.read_text()))
        data["datasetSpecs"] = str(REPO / "datasets_spec")
        data["servingSpec"] = str(REPO / "jobs" / "serve" / "cluster.yaml")
        deps = data["institutions"]
        deps["mayo-like"]["departments"]["radiology"]["storage"] = [f"file://{mayo}/"]
        deps["mayo-like"]["departments"]["radiology"]["serving"]["registry"] = f"file://{mayo}/registry/"
        deps["stanford-like"]["departments"]["pathology"]["storage"] = [f"file://{pathology}/"]
        for d in (mayo, pathology):
            d.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "tenants.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_tenants(path)

    return make


@pytest.mark.parametrize("field", ["output.storage", "model.init", "data.shards"])
def test_a_symlink_cannot_lead_out_of_a_local_prefix(tenants_copy, tmp_path, field):
    mayo, other = tmp_path / "nfs" / "mayo", tmp_path / "nfs" / "pathology"
    t = tenants_copy(mayo=mayo, pathology=other)
    (mayo / "escape").symlink_to(other, target_is_directory=True)
    paths = dict(output__storage=f"file://{mayo}/runs", model__init=None, data__shards=f"file://{mayo}/shards/")
    key = {"output.storage": "output__storage", "model.init": "model__init", "data.shards": "data__shards"}[field]
    paths[key] = f"file://{mayo}/escape/x/"
    err = refused(cluster_spec("mayo-like-radiology", **paths), t)
    assert err.field == field and f"it resolves to {other.resolve()}/x" in err.subject, str(err)
    assert "compared after symlinks are resolved" in err.rule
    # the same folders without the symlink are the team's own
    from biomedgpt.tenancy import admit

    paths[key] = f"file://{mayo}/x/"
    admit(cluster_spec("mayo-like-radiology", **paths), t, on_cluster=True)


def test_a_file_url_with_a_host_is_refused(tenants, monkeypatch):
    """`file://mnt/...` is opened by the storage layer as `/...` (the host dropped), so it must not be
    judged as the relative path `mnt/...` (from `/`, mayo-like radiology's NFS share)."""
    monkeypatch.chdir("/")
    err = refused(cluster_spec("mayo-like-radiology", output__storage="file://mnt/biomedgpt/mayo-like/radiology/runs",
                               model__init=None), tenants)
    assert err.field == "output.storage" and "has no host" in err.rule


@pytest.mark.parametrize("prefix", ["s3://biomedgpt-stanford-like/staging/../pathology/",
                                    "s3://biomedgpt-stanford-like//pathology/", "s3://biomedgpt-stanford-like/./pathology/"])
def test_the_policy_declares_prefixes_without_dot_dot_dot_or_empty_segments(tmp_path, prefix):
    """A prefix spelled with them would match no location admission lets through, or not the place it says."""
    from biomedgpt.tenancy import TenancyError, load_tenants

    data = yaml.safe_load(TENANTS.read_text())
    data["datasetSpecs"] = str(REPO / "datasets_spec")
    data["servingSpec"] = str(REPO / "jobs" / "serve" / "cluster.yaml")
    data["institutions"]["stanford-like"]["departments"]["pathology"]["storage"] = [prefix]
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(TenancyError) as err:
        load_tenants(path)
    assert str(err.value).startswith(f"{path}: institutions.stanford-like.departments.pathology.storage: {prefix}: ")
    assert "is refused in storage locations" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Manifests: the stream opens only files of the manifest's own folder
# ----------------------------------------------------------------------------------------------


def write_split(root: Path, dataset: str = "vqa_rad", split: str = "train", n: int = 2):
    """One split of `n` text-only VQA records in one shard; returns (split folder, its manifest entry)."""
    from biomedgpt.data.shards import Manifest, ShardSample, shard_name, split_url, write_manifest, write_shard

    url = split_url(str(root), dataset, split)
    samples = [ShardSample(f"{dataset}-{root.name}-{i}", {"id": f"{root.name}-{i}", "question": "q?", "answer": root.name},
                           None, None) for i in range(n)]
    entry = write_shard(f"{url}/{shard_name(dataset, split, 0)}", samples)
    write_manifest(url, Manifest(dataset=dataset, split=split, task="vqa", source="written by the test",
                                 licence="test data", access="open", shards=[entry]))
    return Path(url), entry


def rename_entry(folder: Path, name: str) -> Path:
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"][0]["name"] = name
    manifest.write_text(json.dumps(data))
    return manifest


@pytest.mark.parametrize("how", ["climbs", "absolute", "url", "subfolder"])
def test_a_manifest_cannot_name_shards_outside_its_folder(tmp_path, how):
    from biomedgpt.data.shards import ShardError
    from biomedgpt.data.stream import list_shards, records

    mine, _ = write_split(tmp_path / "radiology")
    theirs, entry = write_split(tmp_path / "pathology")
    name = {"climbs": f"../../../pathology/vqa_rad/train/{entry.name}",
            "absolute": str(theirs / entry.name),
            "url": f"s3://biomedgpt-stanford-like/pathology/shards/vqa_rad/train/{entry.name}",
            "subfolder": f"sub/{entry.name}"}[how]
    manifest = rename_entry(mine, name)
    for read in (lambda: list_shards(str(tmp_path / "radiology"), "vqa_rad", "train"),
                 lambda: list(records(str(tmp_path / "radiology"), "vqa_rad", "train"))):
        with pytest.raises(ShardError) as err:
            read()
        assert str(err.value).startswith(f"{manifest}: field 'shards[0].name': {name!r}"), str(err.value)
        assert "the manifest's own folder" in str(err.value)


def test_a_local_shard_that_is_a_symlink_out_of_its_folder_is_refused(tmp_path):
    from biomedgpt.data.shards import ShardError
    from biomedgpt.data.stream import list_shards

    mine, entry = write_split(tmp_path / "radiology")
    theirs, _ = write_split(tmp_path / "pathology")
    (mine / entry.name).unlink()
    (mine / entry.name).symlink_to(theirs / entry.name)
    with pytest.raises(ShardError) as err:
        list_shards(str(tmp_path / "radiology"), "vqa_rad", "train")
    assert str(err.value).startswith(f"{mine / 'manifest.json'}: field 'shards[0].name': {entry.name!r} resolves to "
                                     f"{theirs / entry.name}, outside the manifest's folder")


# ----------------------------------------------------------------------------------------------
# `biomedgpt submit`: variables that change admission are not carried to the cluster
# ----------------------------------------------------------------------------------------------


class _RecordingClient:
    """A job API that records what it was asked to run."""

    submitted: list[dict] = []

    def __init__(self, address: str, *args, **kwargs) -> None:
        self.address = address

    def submit_job(self, **kwargs):
        type(self).submitted.append(kwargs)
        return kwargs["submission_id"]


@pytest.mark.parametrize("variable", ["BIOMEDGPT_TENANTS", "BIOMEDGPT_ON_CLUSTER", "BIOMEDGPT_OUTPUT_ROOT"])
def test_submit_refuses_to_forward_variables_that_change_admission(monkeypatch, capsys, tmp_path, variable):
    """The job is admitted again where it runs, by the cluster's policy: a laptop's own tenants file, an
    on-cluster switch of 0 or an output root of its choosing must not travel with it (Ray's runtime_env
    variables override the cluster's), nor make the admission here one under another policy."""
    import ray.job_submission

    from biomedgpt.cli import main

    own = tmp_path / "tenants.yaml"  # the laptop's own copy of the policy, to be edited at will
    data = yaml.safe_load(TENANTS.read_text())
    data["datasetSpecs"] = str(REPO / "datasets_spec")
    data["servingSpec"] = str(REPO / "jobs" / "serve" / "cluster.yaml")
    own.write_text(yaml.safe_dump(data, sort_keys=False))
    value = {"BIOMEDGPT_TENANTS": str(own), "BIOMEDGPT_ON_CLUSTER": "0",
             "BIOMEDGPT_OUTPUT_ROOT": str(tmp_path / "elsewhere")}[variable]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _RecordingClient)
    _RecordingClient.submitted = []
    code = main(["submit", DEMO, "--address", "http://127.0.0.1:8265", "--no-wait"])
    err = capsys.readouterr().err
    assert _RecordingClient.submitted == [], "the job reached the cluster"
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("biomedgpt submit: error:")]
    assert len(line) == 1 and f"{variable} set: submit does not forward variables that change admission" in line[0]
    assert f"Unset {variable}" in line[0]
    from biomedgpt.submit import FORWARDED_ENV, NEVER_FORWARDED_ENV

    assert variable in NEVER_FORWARDED_ENV and not set(FORWARDED_ENV) & set(NEVER_FORWARDED_ENV)
