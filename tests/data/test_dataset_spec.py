"""Every datasets_spec/*.yaml loads and validates; malformed specs fail naming file and field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from biomedgpt.data.converters import CONVERTERS
from biomedgpt.data.converters.medmnist import SUBSETS
from biomedgpt.data.dataset_spec import DatasetSpecError, load_dataset_spec, load_dataset_specs

SPEC_DIR = Path(__file__).resolve().parents[2] / "datasets_spec"
SPEC_FILES = sorted(SPEC_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_every_spec_validates(path: Path):
    spec = load_dataset_spec(path)
    converter = CONVERTERS[spec.source.converter]
    assert spec.name == path.stem and spec.task == converter.task
    assert spec.access == converter.access
    assert set(spec.splits) <= {"train", "val", "test"}


def test_specs_cover_the_datasets_with_converters():
    specs = load_dataset_specs(SPEC_DIR)
    assert {"vqa_rad", "slake", "pathvqa", "iu_xray", "roco"} | set(SUBSETS) <= set(specs)
    assert set(CONVERTERS) <= set(specs)  # every converter is described
    assert specs["vqa_rad"].prompt.instruction == " {question}?"
    assert specs["iu_xray"].prompt.instruction == " what does the image describe?"
    assert specs["pneumoniamnist"].answer_candidates.policy == "class_names"


def write_spec(tmp_path: Path, name: str = "vqa_rad", **changes) -> Path:
    data = yaml.safe_load((SPEC_DIR / "vqa_rad.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"licnce": "CC0"}, r"field 'licnce': unknown key; expected one of: name, task"),
    ({"source__fromat": "x"}, r"field 'source\.fromat': unknown key"),
    ({"splits__test__nativ": "x"}, r"field 'splits\.test\.nativ': unknown key"),
    ({"citation": KeyError}, r"field 'citation': missing \(expected a string\)"),
    ({"access": "private"}, r"field 'access': expected one of 'open', 'credentialed', got 'private'"),
    ({"metrics": "vqa_accuracy"}, r"field 'metrics': expected a list"),
    ({"metrics": ["bleu4"]}, r"field 'metrics\[0\]': unknown metric 'bleu4' for task vqa"),
    ({"splits__dev": {"native": "x"}}, r"field 'splits\.dev': split names are canonical"),
    ({"prompt__instruction": " {questoin}?"}, r"field 'prompt\.instruction': unknown placeholder \{questoin\}"),
    ({"source__converter": "vqarad"}, r"field 'source\.converter': no converter named 'vqarad'"),
    ({"source__files": {"questions": "q.json"}}, r"field 'source\.files\.questions': unknown file role"),
    ({"source__options": {"languages": ["en"]}}, r"field 'source\.options\.languages': not an option of converter"),
    ({"task": "caption"}, r"field 'task': 'caption' but converter 'vqa_rad' produces 'vqa' records"),
    ({"answer_candidates__splits": ["val"]}, r"field 'answer_candidates\.splits\[0\]': 'val' is not one of"),
    ({"answer_candidates__policy": "fixed"}, r"field 'answer_candidates\.splits': only used with policy"),
])
def test_errors_name_file_and_field(tmp_path: Path, changes, message):
    path = write_spec(tmp_path, **changes)
    with pytest.raises(DatasetSpecError, match=message) as err:
        load_dataset_spec(path)
    assert str(err.value).startswith(f"{path}: field '")


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(DatasetSpecError, match=r"slake\.yaml: field 'name': must equal the file name 'slake'"):
        load_dataset_spec(write_spec(tmp_path, name="slake"))
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(DatasetSpecError, match=r"broken\.yaml: not valid YAML"):
        load_dataset_spec(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(DatasetSpecError, match=r"broken\.yaml: field '<document>': expected a mapping"):
        load_dataset_spec(bad)
    with pytest.raises(DatasetSpecError, match="file not found"):
        load_dataset_spec(tmp_path / "absent.yaml")
