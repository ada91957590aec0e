"""Relative paths of a job spec resolve once, on the driver, against one base for every process."""

from __future__ import annotations

import json
from pathlib import Path

from biomedgpt.session import localize, submitted_job
from biomedgpt.spec import load_spec, resolve_paths, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo" / "vqa_rad.yaml"


def test_a_local_run_resolves_every_relative_path_against_its_base(tmp_path):
    spec = load_spec(DEMO)  # the shipped spec: relative shards, build source and storage
    resolved, info = resolve_paths(spec, tmp_path)
    assert resolved.data.shards == str(tmp_path / "runs/demo/shards")
    assert resolved.data.build == {"vqa_rad": str(tmp_path / "datasets_spec/samples/vqa_rad")}
    assert resolved.output.storage == str(tmp_path / "runs/demo/runs")
    assert resolved.run_dir == str(tmp_path / "runs/demo/runs/demo/demo-vqa-rad")
    assert info.base == tmp_path and info.outputs is None and len(info.changed) == 3
    assert spec.data.shards == "runs/demo/shards"  # the loaded spec itself is not changed


def test_tokenizer_init_urls_absolute_and_home_paths():
    data = {"kind": "evaluate", "name": "e", "team": "demo",
            "model": {"init": "models/m", "tokenizer": {"vocab": "bpe/vocab.json", "merges": "~/bpe/merges.txt"}},
            "data": {"shards": "s3://bucket/shards", "eval": [{"dataset": "vqa_rad", "split": "test"}]},
            "evaluate": {"splits": ["test"]}, "output": {"storage": "/abs/runs"}}
    resolved, _ = resolve_paths(spec_from_dict(data), "/base")
    assert resolved.model.init == "/base/models/m"
    assert resolved.model.tokenizer.vocab == "/base/bpe/vocab.json"
    assert resolved.model.tokenizer.merges == str(Path.home() / "bpe/merges.txt")
    assert resolved.data.shards == "s3://bucket/shards" and resolved.output.storage == "/abs/runs"
    path_spec = spec_from_dict(dict(data, model={"init": "models/m", "tokenizer": {"path": "tok"}}))
    assert resolve_paths(path_spec, "/base")[0].model.tokenizer.path == "/base/tok"


def test_a_submitted_job_writes_under_the_output_root_and_reads_from_its_working_dir(tmp_path):
    workdir, outputs = tmp_path / "runtime_resources" / "working_dir_files" / "pkg", tmp_path / "keep"
    spec = load_spec(DEMO)
    resolved, info = resolve_paths(spec, workdir, outputs=outputs)
    assert resolved.output.storage == str(outputs / "runs/demo/runs")  # outlives Ray's session
    assert resolved.data.shards == str(outputs / "runs/demo/shards")  # built by the job: an output too
    assert resolved.data.build["vqa_rad"] == str(workdir / "datasets_spec/samples/vqa_rad")  # uploaded input
    assert info.outputs == outputs


def test_a_submitted_job_finds_what_an_earlier_one_wrote_under_the_output_root(tmp_path):
    workdir, outputs = tmp_path / "wd", tmp_path / "keep"
    (workdir / "models" / "shipped").mkdir(parents=True)
    (outputs / "runs" / "demo" / "export").mkdir(parents=True)
    data = {"kind": "evaluate", "name": "e", "team": "demo",
            "model": {"init": "runs/demo/export", "tokenizer": {"path": "models/shipped"}},
            "data": {"shards": "runs/demo/shards", "eval": [{"dataset": "vqa_rad", "split": "test"}]},
            "evaluate": {"splits": ["test"]}, "output": {"storage": "runs/eval"}}
    resolved, _ = resolve_paths(spec_from_dict(data), workdir, outputs=outputs)
    assert resolved.model.init == str(outputs / "runs/demo/export")  # only there
    assert resolved.model.tokenizer.path == str(workdir / "models/shipped")  # in the working dir
    assert resolved.data.shards == str(workdir / "runs/demo/shards")  # nowhere yet: the working dir


def test_submitted_job_is_detected_from_rays_job_config(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert submitted_job() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "demo-demo-vqa-rad-1", "job_name": "demo-demo-vqa-rad-1"}}))
    assert submitted_job() == "demo-demo-vqa-rad-1"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    assert submitted_job() == "?"


def test_localize_prints_the_base_and_the_run_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    local = localize(load_spec(DEMO))
    out = capsys.readouterr().out
    assert f"resolve against {tmp_path} (the current directory of `biomedgpt run`)" in out
    assert local.run_dir == str(tmp_path / "runs/demo/runs/demo/demo-vqa-rad") and local.run_dir in out

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "j1"}}))
    monkeypatch.setenv("BIOMEDGPT_OUTPUT_ROOT", str(tmp_path / "keep"))
    submitted = localize(load_spec(DEMO))
    out = capsys.readouterr().out
    assert "(the working dir Ray unpacked for job j1)" in out and str(tmp_path / "keep") in out
    assert submitted.run_dir == str(tmp_path / "keep/runs/demo/runs/demo/demo-vqa-rad")
    monkeypatch.delenv("BIOMEDGPT_OUTPUT_ROOT")
    default = localize(load_spec(DEMO))
    assert default.output.storage == str(Path.home() / "biomedgpt-runs/runs/demo/runs")


def test_serve_gives_its_replicas_a_relative_model_dir_as_an_absolute_path(monkeypatch, tmp_path):
    import biomedgpt.session
    import biomedgpt.serve.app as app
    from biomedgpt.cli import main

    class Started(Exception):
        pass

    def start(model, **kwargs):
        raise Started(model)

    (tmp_path / "export").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(biomedgpt.session, "ensure_ray", lambda *a, **k: True)
    monkeypatch.setattr(app, "start", start)
    try:
        main(["serve", "export", "--port", "8000"])
    except Started as got:
        assert str(got) == str(tmp_path / "export")
    else:
        raise AssertionError("serve did not start the model")


def test_runs_of_one_name_on_other_object_storage_stage_apart(monkeypatch, tmp_path):
    """A run on object storage makes its files in a local staging folder before uploading them: two runs
    of one team and name writing to other buckets or prefixes get their own folders (a folder named by
    team and name alone mixed their reports and exports)."""
    import yaml

    from biomedgpt.session import staging_dir

    monkeypatch.setenv("BIOMEDGPT_STAGING", str(tmp_path))
    raw = yaml.safe_load(DEMO.read_text())

    def staged(storage: str):
        return staging_dir(resolve_paths(spec_from_dict(dict(raw, output={"storage": storage})), tmp_path)[0])

    a, b = staged("s3://radiology/runs"), staged("s3://cardiology/runs")
    assert a != b and a.parent == b.parent == tmp_path / raw["team"] and a.name.startswith(raw["name"] + "-")
    assert a == staged("s3://radiology/runs")
