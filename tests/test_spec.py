"""The job-spec schema: every spec in jobs/ validates; bad specs fail naming the file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biomedgpt.spec import JobSpec, SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo" / "vqa_rad.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "jobs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_job_spec_validates(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec) and spec.source == str(path)


def test_demo_spec_fields():
    spec = load_spec(DEMO)
    assert spec.kind == "finetune" and spec.trainer.workers == 2 and spec.trainer.strategy == "fsdp"
    assert spec.trainer.lr == 1e-3 and spec.model.size == "demo"
    assert spec.run_dir == "runs/demo/runs/demo/demo-vqa-rad"


def edited(**changes):
    data = yaml.safe_load(DEMO.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.mark.parametrize("changes, message", [
    (dict(trainer__max_stpes=3), "my.yaml: trainer.max_stpes: unknown field (did you mean 'max_steps'?)"),
    (dict(trainer__batch_size="eight"), "my.yaml: trainer.batch_size: expected an integer, got 'eight'"),
    (dict(trainer__strategy="zero3"), "my.yaml: trainer.strategy: expected one of 'fsdp', 'ddp', got 'zero3'"),
    (dict(trainer__lr=-1), "my.yaml: trainer.lr: must be > 0"),
    (dict(model__size="huge"), "my.yaml: model.size: 'huge' is not a named size"),
    (dict(model__image_size=100), "my.yaml: model.image_size: must be a multiple of 16"),
    (dict(data__train=[{"dataset": "vqa_rad", "splt": "train"}]), "my.yaml: data.train[0].splt: unknown field"),
    (dict(kind=KeyError), "my.yaml: kind: required field is missing"),
    (dict(name="Demo Run"), "my.yaml: name: 'Demo Run' must be lower-case"),
    (dict(model__tokenizer={"path": "x", "train_vocab_size": 500}), "my.yaml: model.tokenizer: give exactly one of"),
    (dict(data=KeyError), "my.yaml: data: required for kind 'finetune'"),
])
def test_bad_specs_name_file_and_field(changes, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict(edited(**changes), "my.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_yaml_scientific_notation_is_a_number():
    data = edited(trainer__lr="5e-5")  # YAML 1.1 reads 5e-5 as a string
    assert spec_from_dict(data, "x.yaml").trainer.lr == 5e-5


def test_run_with_a_mistyped_spec_exits_2_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("max_steps:", "max_stepz:"))
    out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "run", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert f"{bad}: trainer.max_stepz: unknown field (did you mean 'max_steps'?)" in out.stderr
    assert "ray" not in out.stderr.lower().replace("biomedgpt run", "")
