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


#: Every dataset the BiomedGPT paper uses: downstream (fine-tuning and zero-shot), then pretraining.
PAPER_DOWNSTREAM = {"vqa_rad", "slake", "pathvqa", "iu_xray", "peir_gross", "mimic_cxr", "roco", *SUBSETS,
                    "cbis_ddsm_mass", "cbis_ddsm_calc", "sz_cxr", "mc_cxr", "mednli", "trec_2022", "seer", "mimic_iii",
                    "healthcaremagic", "meqsum", "rsna_pneumonia"}
PAPER_PRETRAINING = {"iu_xray", "peir_gross", "medicat", "pathvqa", "slake", "deeplesion", "oia_ddr", "chexpert_small",
                     "cytoimagenet", "isic_2020", "retinal_fundus", "mimic_iii_notes", "ncbi_bionlp", "pubmed_abstracts"}


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_every_spec_validates(path: Path):
    spec = load_dataset_spec(path)
    assert spec.name == path.stem and set(spec.splits) <= {"train", "val", "test"}
    assert spec.source.obtain.startswith("https://") and spec.citation.strip() and spec.licence.strip()
    if spec.source.converter is None:
        assert spec.source.converter_note.strip()
        return
    converter = CONVERTERS[spec.source.converter]
    assert spec.task == converter.task
    if not converter.generic:  # a generic converter's licence and access come from the spec
        assert spec.access == converter.access and converter.name == spec.name


def test_specs_cover_every_dataset_of_the_paper():
    specs = load_dataset_specs(SPEC_DIR)
    assert PAPER_DOWNSTREAM | PAPER_PRETRAINING <= set(specs)
    assert {n for n, s in specs.items() if "pretrain" in s.stages} == PAPER_PRETRAINING
    assert {n for n, s in specs.items() if s.stages == ["zero_shot"]} == {"rsna_pneumonia"}
    assert {n for n in specs if specs[n].source.converter is None} == set()  # every dataset has its converter
    assert {n for n in specs if specs[n].access == "credentialed"} >= {"mimic_cxr", "mednli", "mimic_iii",
                                                                       "mimic_iii_notes", "seer"}
    # every dataset-specific converter is described by a spec
    assert {n for n, c in CONVERTERS.items() if not c.generic} <= set(specs)
    assert specs["vqa_rad"].prompt.instruction == " {question}?"
    assert specs["iu_xray"].prompt.instruction == " what does the image describe?"
    assert specs["pneumoniamnist"].answer_candidates.policy == "class_names"
    assert specs["mednli"].prompt.instruction == ' can text1 " {premise} " imply text2 " {hypothesis} "?'
    assert specs["mednli"].answer_candidates.values == ["yes", "no", "maybe"]
    assert specs["meqsum"].prompt.instruction == ' what is the summary of article " {text} "?'
    assert {specs[n].task for n in PAPER_PRETRAINING} == {"caption", "vqa", "detection", "image", "text"}


def _without_converter() -> dict:
    """trec_2022's spec as it was before its converter: converter null, with a note."""
    data = yaml.safe_load((SPEC_DIR / "trec_2022.yaml").read_text())
    data["source"]["converter"] = None
    data["source"]["converter_note"] = "Not written yet: it would read topics, qrels and trials."
    for key in ("files", "options"):
        data["source"].pop(key, None)
    return data


def test_converter_null_must_be_explicit_and_explained(tmp_path: Path):
    for changes, message in [
        ({"converter": "__delete__"}, r"field 'source\.converter': missing \(expected a string or null\)"),
        ({"converter_note": "  "}, r"field 'source\.converter_note': a spec with 'converter: null' must say why"),
        ({"options": {"x": 1}}, r"field 'source\.options': only used with a converter"),
    ]:
        data = _without_converter()
        for key, value in changes.items():
            if value == "__delete__":
                del data["source"][key]
            else:
                data["source"][key] = value
        path = tmp_path / "trec_2022.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(DatasetSpecError, match=message):
            load_dataset_spec(path)
    from biomedgpt.data.build import build_shards

    path = tmp_path / "trec_2022.yaml"
    path.write_text(yaml.safe_dump(_without_converter()))
    with pytest.raises(ValueError, match=r"trec_2022 has no converter yet \(source\.converter: null\): Not written yet"):
        build_shards("trec_2022", str(tmp_path), str(tmp_path / "out"), spec=load_dataset_spec(path))


def test_stages_and_generic_converter_rules(tmp_path: Path):
    cases = [
        ("mimic_cxr", {"stages": []}, r"field 'stages': at least one of pretrain, finetune, zero_shot"),
        ("mimic_cxr", {"stages": ["pretrain", "train"]}, r"field 'stages\[1\]': expected one of 'pretrain'"),
        ("pubmed_abstracts", {"stages": ["finetune"]}, r"field 'stages': 'text' records are a pretraining objective"),
        ("peir_gross", {"metrics": []}, r"field 'metrics': at least one metric \(only pretraining-only sources"),
        ("peir_gross", {"source": {"converter": "roco"}}, r"field 'source\.converter': converter 'roco' reads one dataset only"),
        ("mimic_iii", {"source": {"converter": "ofa_tsv_caption"}}, r"field 'task': 'summarize' but converter 'ofa_tsv_caption'"),
        ("mimic_iii", {"source": {"options": {"text_colum": "x"}}}, r"field 'source\.options\.text_colum': not an option"),
    ]
    for name, changes, message in cases:
        data = yaml.safe_load((SPEC_DIR / f"{name}.yaml").read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                data[key].update(value)
            else:
                data[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(DatasetSpecError, match=message):
            load_dataset_spec(path)


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
