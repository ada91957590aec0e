"""The evaluate job's spec and plan, without Ray: jobs/evaluate/paper.yaml covers the paper's downstream
datasets; bad evaluate sections fail naming the file and field; each task's official decoding; the
planning errors name the dataset and split."""

from __future__ import annotations

from pathlib import Path

import pytest

from biomedgpt.data.dataset_spec import load_dataset_specs
from biomedgpt.evaluate.candidates import EVAL_TASKS, EvaluationError
from biomedgpt.evaluate.job import plan_entries, resolve_model_dir
from biomedgpt.evaluate.predict import decode_plan
from biomedgpt.spec import SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "jobs" / "evaluate" / "paper.yaml"


def test_paper_job_lists_every_downstream_dataset():
    """paper.yaml holds the open datasets (team demo); the credentialed ones are in one spec per team that
    may read them (paper_*.yaml), except SEER, which no team of the shipped tenants.yaml holds."""
    spec = load_spec(PAPER)
    specs = load_dataset_specs(REPO / "datasets_spec")
    downstream = {n for n, d in specs.items() if set(d.stages) & {"finetune", "zero_shot"}}
    listed = [r.dataset for r in spec.data.eval]
    assert len(listed) == len(set(listed))
    assert spec.team == "demo" and all(specs[d].access == "open" for d in listed)
    credentialed = [r.dataset for p in sorted(PAPER.parent.glob("paper_*.yaml")) for r in load_spec(p).data.eval]
    assert len(credentialed) == len(set(credentialed)) and all(specs[d].access == "credentialed" for d in credentialed)
    # all of them that have a converter (shards can be built), the multi-label ChestMNIST included
    assert set(listed) | set(credentialed) | {"seer"} == {n for n in downstream if specs[n].source.converter}
    assert "chestmnist" in listed
    assert {specs[d].task for d in listed} == set(EVAL_TASKS)
    assert all(r.split in specs[r.dataset].splits for r in spec.data.eval)
    assert spec.kind == "evaluate" and spec.evaluate.mode == "official" and spec.evaluate.image_sizes == {"caption": 480}


def base(**evaluate) -> dict:
    return {"kind": "evaluate", "name": "e", "team": "demo",
            "model": {"init": "models/x", "tokenizer": {"path": "models/x"}},
            "data": {"shards": "shards", "eval": [{"dataset": "vqa_rad", "split": "test"}]},
            "evaluate": {"splits": ["test"], **evaluate}}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["model"].pop("init"), "e.yaml: model.init: an evaluate job needs the model to evaluate"),
    (lambda d: d["data"].update(eval=[]), "e.yaml: data.eval: list the datasets to evaluate"),
    (lambda d: d["data"]["eval"].append({"dataset": "slake", "split": "val"}),
     "e.yaml: data.eval[1]: split 'val' of slake is not in evaluate.splits ['test']"),
    (lambda d: d["evaluate"].update(mode="zero_shot", decoding="trie"), "e.yaml: evaluate.decoding: 'trie' contradicts"),
    (lambda d: d["evaluate"].update(mode="fewshot"), "e.yaml: evaluate.mode: expected one of 'official', 'zero_shot'"),
    (lambda d: d["evaluate"].update(concurrency=0), "e.yaml: evaluate.concurrency: must be >= 1"),
    (lambda d: d["evaluate"].update(every_n_step=5), "e.yaml: evaluate.every_n_step: unknown field (did you mean 'every_n_steps'?)"),
    (lambda d: d["evaluate"].update(image_sizes={"caption": 500}), "e.yaml: evaluate.image_sizes.caption: must be a multiple of 16"),
    (lambda d: d["evaluate"].update(image_sizes={"detection": 256}), "e.yaml: evaluate.image_sizes.detection: not a task"),
    (lambda d: d["model"].update(tokenizer={"train_vocab_size": 500}), "e.yaml: model.tokenizer.train_vocab_size: an evaluate job uses"),
])
def test_bad_evaluate_specs_name_file_and_field(change, message):
    data = base()
    change(data)
    with pytest.raises(SpecError) as err:
        spec_from_dict(data, "e.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_official_and_zero_shot_decoding_per_task():
    assert decode_plan("vqa", ["yes", "no"]).method == "trie"
    assert decode_plan("nli", ["yes", "no", "maybe"]).method == "trie"
    assert decode_plan("classify", ["normal", "pneumonia"]).method == "score"
    cap = decode_plan("caption", None)
    assert (cap.method, cap.beam_size, cap.max_new_tokens, cap.no_repeat_ngram_size) == ("free", 10, 32, 3)
    summ = decode_plan("summarize", None)
    assert (summ.beam_size, summ.max_new_tokens, summ.no_repeat_ngram_size, summ.length_penalty) == (5, 128, 3, 0.7)
    for task in ("vqa", "nli", "classify"):
        assert decode_plan(task, ["a", "b"], mode="zero_shot").method == "free"
    assert decode_plan("classify", None).method == "free"  # a dataset whose policy is `none` (SEER)
    beam = decode_plan("vqa", ["a"], decoding="beam", beam_size=5, max_new_tokens=8)
    assert (beam.method, beam.beam_size, beam.max_new_tokens) == ("free", 5, 8)
    multi = decode_plan("classify", ["atelectasis", "effusion"], multi_label=True)
    assert (multi.method, multi.beam_size, multi.candidates) == ("multilabel", 1, ("atelectasis", "effusion"))
    assert decode_plan("classify", ["a", "b"], multi_label=True, mode="zero_shot").method == "free"


def test_multi_label_dataset_is_planned_with_its_classes_in_order(chestmnist_shards):
    from biomedgpt.data.converters.medmnist import label_names

    data = base()
    data["data"] = {"shards": chestmnist_shards, "eval": [{"dataset": "chestmnist", "split": "test"}]}
    (entry,) = plan_entries(spec_from_dict(data, "e.yaml"))
    assert entry.task == "classify" and entry.plan.method == "multilabel" and entry.count == 10
    assert entry.candidates.multi_label and entry.plan.candidates == tuple(label_names("chestmnist"))
    assert entry.metric_names == ["accuracy", "auc"]
    # without its dataset spec, the class names and their order come from the records (label indices)
    from biomedgpt.evaluate.candidates import answer_candidates

    cands = answer_candidates("chestmnist", "classify", None, chestmnist_shards)
    assert cands.multi_label and cands.values == ["atelectasis", "effusion", "infiltration", "mass", "hernia"]


def test_planning_errors_name_the_dataset_and_split(tmp_path, demo_shards):
    data = base()
    data["data"] = {"shards": demo_shards, "eval": [{"dataset": "vqa_rad", "split": "test"},
                                                    {"dataset": "slake", "split": "test"},
                                                    {"dataset": "iu_xray", "split": "test"}]}
    spec = spec_from_dict(data, "e.yaml")
    with pytest.raises(EvaluationError) as err:
        plan_entries(spec)
    text = str(err.value)
    assert text.startswith("e.yaml: cannot evaluate:")
    assert "slake/test: no shards under" in text and "iu_xray/test: no shards under" in text and "vqa_rad" not in text
    good = spec_from_dict(base() | {"data": {"shards": demo_shards, "eval": [{"dataset": "vqa_rad", "split": "test"}]}},
                          "e.yaml")
    (entry,) = plan_entries(good)
    assert entry.task == "vqa" and entry.count == 69 and entry.candidates.policy == "answers_of_splits"
    assert entry.metric_names == ["vqa_accuracy_closed", "vqa_accuracy_open", "vqa_accuracy"]


def test_model_source_errors(tmp_path):
    with pytest.raises(EvaluationError, match=r"nothing: not a model directory \(no config.json\), run directory"):
        resolve_model_dir(str(tmp_path / "nothing"), tmp_path)
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path / "run"), tmp_path) == tmp_path / "run" / "export"


def test_evaluate_command_builds_a_valid_spec(tmp_path):
    from biomedgpt.cli import build_parser
    from biomedgpt.cli.evaluate import spec_from_args

    args = build_parser().parse_args(["evaluate", "runs/x/export", "--shards", "s3://b/shards", "--dataset", "vqa_rad:test",
                                      "--dataset", "pneumoniamnist:val", "--mode", "zero_shot", "--max-samples", "10",
                                      "--out", str(tmp_path)])
    spec = spec_from_args(args)
    assert spec.kind == "evaluate" and spec.name == "eval-export-zero_shot" and spec.model.init == "runs/x/export"
    assert [(r.dataset, r.split) for r in spec.data.eval] == [("vqa_rad", "test"), ("pneumoniamnist", "val")]
    assert spec.evaluate.splits == ["test", "val"] and spec.evaluate.mode == "zero_shot"
    assert spec.evaluate.max_samples == 10 and spec.model.tokenizer.path == "runs/x/export"
    bad = build_parser().parse_args(["evaluate", "m", "--shards", "s", "--dataset", "vqa_rad"])
    with pytest.raises(SpecError, match=r"--dataset 'vqa_rad': expected DATASET:SPLIT"):
        spec_from_args(bad)
