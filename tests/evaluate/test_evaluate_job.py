"""The evaluate job on real local Ray: a demo-size model x five datasets of five task families (VQA-RAD,
IU X-ray, PneumoniaMNIST, MedNLI, MeQSum) -> results.md / results.json / report.html with each task's
metrics; the metrics equal `biomedgpt score` on the job's own files; trie-constrained answers are
always candidates; zero-shot mode generates freely; the multi-label ChestMNIST lists its findings."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from biomedgpt.spec import spec_from_dict

SCORE_KEYS = {
    "vqa": {"accuracy", "closed_accuracy", "open_accuracy", "count"},
    "caption": {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d", "count"},
    "classify": {"accuracy", "macro_f1", "count"},
    "nli": {"accuracy", "macro_f1", "count"},
    "summarize": {"rouge1", "rouge2", "rougeL", "count"},
}
REPORTED = {  # the metric names each dataset spec lists
    "vqa_rad": {"vqa_accuracy", "vqa_accuracy_closed", "vqa_accuracy_open"},
    "iu_xray": {"bleu4", "rouge_l", "meteor", "cider"},
    "pneumoniamnist": {"accuracy"},
    "mednli": {"accuracy"},
    "meqsum": {"rouge1", "rouge2", "rouge_l"},
}
DATASETS = [("vqa_rad", "test", "vqa"), ("iu_xray", "test", "caption"), ("pneumoniamnist", "val", "classify"),
            ("mednli", "test", "nli"), ("meqsum", "test", "summarize")]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from biomedgpt.session import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def eval_spec(tmp_path: Path, shards: str, model_dir: str, name: str, datasets=DATASETS, **evaluate):
    data = {
        "kind": "evaluate", "name": name, "team": "demo",
        "model": {"size": "demo", "init": model_dir, "image_size": 32, "tokenizer": {"path": model_dir}},
        "data": {"shards": shards, "max_source_length": 64,
                 "eval": [{"dataset": d, "split": s} for d, s, _ in datasets]},
        "evaluate": {"splits": ["test", "val"], "max_samples": 6, "batch_size": 4, "concurrency": 2,
                     "report_samples": 3, **evaluate},
        "output": {"storage": str(tmp_path / "runs")},
    }
    return spec_from_dict(data, f"{name}.yaml")


def score_cli(task: str, predictions: Path, references: Path) -> dict:
    from biomedgpt.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["score", "--task", task, "--predictions", str(predictions), "--references", str(references)]) == 0
    return json.loads(buf.getvalue())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_official_evaluation_of_five_tasks(tmp_path, eval_shards, eval_model_dir, local_ray):
    from biomedgpt.evaluate.job import run_evaluate_job

    spec = eval_spec(tmp_path, eval_shards, eval_model_dir, "eval-official")
    result = run_evaluate_job(spec)
    out = Path(spec.run_dir)
    assert set(result.evaluation) == {f"{d}/{s}" for d, s, _ in DATASETS}
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "official" and summary["workers"] == 2
    by_name = {r["dataset"]: r for r in summary["datasets"]}
    for dataset, split, task in DATASETS:
        r = by_name[dataset]
        assert r["task"] == task and r["split"] == split and r["count"] == 6
        assert SCORE_KEYS[task] <= set(r["metrics"]), (dataset, r["metrics"])
        assert set(r["reported"]) == REPORTED[dataset] and all(v is not None for v in r["reported"].values())
        # the job's metrics are those of `biomedgpt score` on the job's own files
        cli = score_cli(task, out / r["predictions"], out / r["references"])
        for key, value in cli.items():
            assert r["metrics"][key] == pytest.approx(value, abs=1e-9) if value is not None else r["metrics"][key] is None
    # official decoding of each family
    assert by_name["vqa_rad"]["decoding"]["method"] == "trie" and by_name["vqa_rad"]["decoding"]["beam_size"] == 1
    assert by_name["mednli"]["decoding"]["method"] == "trie" and by_name["mednli"]["decoding"]["candidates"] == 3
    assert by_name["pneumoniamnist"]["decoding"]["method"] == "score"
    assert by_name["iu_xray"]["decoding"] == {"task": "caption", "method": "free", "beam_size": 10, "max_new_tokens": 32,
                                              "no_repeat_ngram_size": 3, "length_penalty": 1.0, "candidates": 0}
    assert by_name["meqsum"]["decoding"]["beam_size"] == 5 and by_name["meqsum"]["decoding"]["length_penalty"] == 0.7
    assert "majority_baseline" in by_name["vqa_rad"]["metrics"]

    # trie-constrained predictions are always candidates (answers_of_splits: the train split's answers)
    from biomedgpt.evaluate.candidates import shard_records
    from biomedgpt.tasks.vqa import normalize_answer

    train_answers = {normalize_answer(r["answer"]) for r in shard_records(eval_shards, "vqa_rad", "train", images=False)}
    vqa_preds = read_jsonl(out / by_name["vqa_rad"]["predictions"])
    assert len(vqa_preds) == 6 and all(p["prediction"] in train_answers for p in vqa_preds)
    assert all(p["prediction"] in ("yes", "no", "maybe") for p in read_jsonl(out / by_name["mednli"]["predictions"]))
    cls = read_jsonl(out / by_name["pneumoniamnist"]["predictions"])
    assert all(p["prediction"] in ("normal", "pneumonia") and set(p["scores"]) == {"normal", "pneumonia"} for p in cls)
    assert all(p["prediction"] == max(p["scores"], key=p["scores"].get) for p in cls)

    # the tables and the report
    md = (out / "results.md").read_text()
    for title in ("Visual question answering", "Captioning", "Image classification", "Natural language inference",
                  "Summarisation"):
        assert f"## {title}" in md
    assert re.search(r"\| vqa_rad \| test \| 6 \| [0-9.]+ \|", md)
    assert "| dataset | split | n | bleu4 | rouge_l | meteor | cider | decoding |" in md
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 3 + 3 + 3  # vqa, caption, classify samples
    assert "can text1 &quot;" in page and 'can text1 "' not in page  # the NLI prompt's quotes, escaped
    assert (out / "metrics.json").is_file() and json.loads((out / "result.json").read_text())["evaluation"]


def test_zero_shot_generates_freely(tmp_path, eval_shards, eval_model_dir, local_ray):
    from biomedgpt.evaluate.job import run_evaluate_job

    datasets = [d for d in DATASETS if d[2] in ("vqa", "classify", "nli")]
    spec = eval_spec(tmp_path, eval_shards, eval_model_dir, "eval-zero-shot", datasets, mode="zero_shot",
                     max_samples=4, concurrency=1, max_new_tokens=4)
    run_evaluate_job(spec)
    out = Path(spec.run_dir)
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "zero_shot" and summary["workers"] == 1
    for r in summary["datasets"]:
        assert r["decoding"]["method"] == "free" and r["decoding"]["max_new_tokens"] == 4
        preds = read_jsonl(out / r["predictions"])
        assert len(preds) == 4 and all("scores" not in p for p in preds)
        cli = score_cli(r["task"], out / r["predictions"], out / r["references"])
        assert r["metrics"]["accuracy"] == pytest.approx(cli["accuracy"])
    # an untrained model's free text is not a class name: zero-shot classification compares text to labels
    cls = next(r for r in summary["datasets"] if r["task"] == "classify")
    preds = read_jsonl(out / cls["predictions"])
    assert cls["metrics"]["accuracy"] == sum(p["prediction"].lower() in ("normal", "pneumonia") and
                                             p["prediction"].lower() == ref["references"]
                                             for p, ref in zip(preds, read_jsonl(out / cls["references"]))) / 4


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """ROC AUC by hand: the probability that a positive outscores a negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def test_multi_label_chestmnist(tmp_path, chestmnist_shards, eval_model_dir, local_ray):
    """ChestMNIST's official evaluation: lists of findings generated under the list trie, accuracy
    (1 - Hamming loss) and macro-F1 equal to `biomedgpt score` on the job's files, and the AUC of the
    per-class scores equal to the mean per-class ROC AUC computed by hand."""
    from biomedgpt.data.converters.medmnist import label_names
    from biomedgpt.evaluate.candidates import shard_records
    from biomedgpt.evaluate.job import run_evaluate_job

    spec = eval_spec(tmp_path, chestmnist_shards, eval_model_dir, "eval-chestmnist", [("chestmnist", "test", "classify")],
                     max_samples=10, concurrency=1)
    result = run_evaluate_job(spec)
    out = Path(spec.run_dir)
    (r,) = json.loads((out / "results.json").read_text())["datasets"]
    assert r["count"] == 10 and r["decoding"]["method"] == "multilabel" and r["decoding"]["candidates"] == 14
    assert set(r["reported"]) == {"accuracy", "auc"} and all(v is not None for v in r["reported"].values())
    assert {"accuracy", "macro_f1", "exact_match", "auc"} <= set(r["metrics"]) == set(result.evaluation["chestmnist/test"])

    names = label_names("chestmnist")
    preds, refs = read_jsonl(out / r["predictions"]), read_jsonl(out / r["references"])
    records = list(shard_records(chestmnist_shards, "chestmnist", "test", images=False))
    assert [ref["references"] for ref in refs] == [[names[i] for i in rec["label"]] for rec in records]
    assert [] in [ref["references"] for ref in refs] and any(len(ref["references"]) > 1 for ref in refs)
    for p in preds:  # valid lists: class names in class order, no repeats; a score per class and for none
        assert isinstance(p["prediction"], list) and set(p["prediction"]) <= set(names)
        order = [names.index(n) for n in p["prediction"]]
        assert order == sorted(set(order))
        assert list(p["scores"]) == [*names, "no finding"] and all(0 <= v <= 1 for v in p["scores"].values())
    cli = score_cli("classify", out / r["predictions"], out / r["references"])
    assert cli == {k: r["metrics"][k] for k in cli} and cli["count"] == 10
    truth = [[names[j] in ref["references"] for j in range(14)] for ref in refs]
    # accuracy: the fraction of right (sample, class) entries over the classes listed anywhere
    seen = [j for j in range(14) if any(names[j] in p["prediction"] or t[j] for p, t in zip(preds, truth))]
    right = sum((names[j] in p["prediction"]) == t[j] for p, t in zip(preds, truth) for j in seen)
    assert r["metrics"]["accuracy"] == pytest.approx(right / (10 * len(seen)))
    aucs = [roc_auc([p["scores"][names[j]] for p in preds], [t[j] for t in truth]) for j in range(14)
            if 0 < sum(t[j] for t in truth) < 10]
    assert len(aucs) == 5 and r["metrics"]["auc"] == pytest.approx(sum(aucs) / 5, abs=1e-6)
    md = (out / "results.md").read_text()
    assert "| dataset | split | n | accuracy | auc | decoding |" in md and "list trie" in md
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 3 and "no finding" in page
