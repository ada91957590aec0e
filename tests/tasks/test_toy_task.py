"""A task is one file: the toy family of toy_task.py, registered by importing it, goes through evaluation
(planning from its shards, the predictor, the files and metrics of `biomedgpt score`, the results table
and report), `biomedgpt score` itself, and serving (the request schema, reading and checking a request
body, the model query, the engine's batched answer and the answer the API returns, and the 422 for a
model not trained for it) with no other module changed."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from toy_task import ANSWERS, TruthTask

from biomedgpt.tasks import DecodePlan, evaluated_task_names, get_task, task_names

STATEMENTS = [("the heart is normal in size", True), ("the lungs are clear", False),
              ("there is a pleural effusion", True), ("no acute disease", False), ("the liver is enlarged", True)]


@pytest.fixture(scope="module")
def predictor(demo_tokenizer_dir):
    from biomedgpt.inference import Predictor
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer
    from biomedgpt.modeldir import ModelMeta

    tok = BiomedGPTTokenizer.from_pretrained(demo_tokenizer_dir)
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_size("demo", vocab_size=len(tok)))
    return Predictor(model, tok, image_size=32, max_source_length=48, batch_size=2, device="cpu",
                     meta=ModelMeta(tasks=("truth",)))


@pytest.fixture(scope="module")
def truth_shards(tmp_path_factory) -> str:
    from biomedgpt.data.shards import ShardSample, ShardWriter

    root = tmp_path_factory.mktemp("truth-shards")
    with ShardWriter(str(root), "toy_truth", "test", task="truth", source="handwritten") as w:
        for i, (statement, truth) in enumerate(STATEMENTS):
            w.write(ShardSample(f"s{i}", {"id": f"s{i}", "task": "truth", "statement": statement, "truth": truth}))
    return str(root)


def test_the_task_is_registered_by_its_file():
    assert "truth" in task_names() and "truth" in evaluated_task_names()
    assert isinstance(get_task("truth"), TruthTask)


def test_evaluation_score_and_report(predictor, truth_shards, tmp_path):
    from biomedgpt.evaluate.candidates import shard_records
    from biomedgpt.evaluate.job import plan_entries, reported
    from biomedgpt.evaluate.report import write_html_report, write_results_markdown
    from biomedgpt.evaluate.score import add_score_parser, score_predictions
    from biomedgpt.spec import spec_from_dict

    spec = spec_from_dict({
        "kind": "evaluate", "name": "toy", "team": "demo",
        "model": {"size": "demo", "init": "models/toy", "tokenizer": {"path": "models/toy"}},
        "data": {"shards": truth_shards, "eval": [{"dataset": "toy_truth", "split": "test"}]},
        "evaluate": {"splits": ["test"]}}, "toy.yaml")
    (entry,) = plan_entries(spec)  # the task from the records, candidates and metrics from the task
    assert entry.task == "truth" and entry.candidates.policy == "fixed" and entry.count == len(STATEMENTS)
    assert entry.plan.method == "trie" and entry.plan.candidates == ANSWERS
    assert entry.metric_names == ["accuracy", "yes_rate"]

    records = list(shard_records(truth_shards, "toy_truth", "test"))
    preds = predictor.predict(entry.plan, records)
    assert [p["id"] for p in preds] == [f"s{i}" for i in range(len(STATEMENTS))]
    assert all(p["prediction"] in ANSWERS and p["references"] in ANSWERS for p in preds)
    pred_file, ref_file = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    metrics = score_predictions("truth", preds, pred_file, ref_file, candidates=entry.candidates,
                                metric_names=entry.metric_names)
    truth = ["yes" if t else "no" for _, t in STATEMENTS]
    right = sum(p["prediction"] == t for p, t in zip(preds, truth))
    assert metrics == {"accuracy": right / 5, "said_yes": sum(p["prediction"] == "yes" for p in preds) / 5, "count": 5}

    parser = argparse.ArgumentParser(prog="biomedgpt")  # `biomedgpt score --task truth` on the same files
    add_score_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["score", "--task", "truth", "--predictions", str(pred_file), "--references",
                              str(ref_file)])
    assert args.func(args) == 0

    row = {"dataset": "toy_truth", "split": "test", "task": "truth", "count": len(preds), "metrics": metrics,
           "reported": reported("truth", entry.metric_names, metrics),
           "decoding": dict(asdict(entry.plan), candidates=len(entry.plan.candidates))}
    assert row["reported"] == {"accuracy": metrics["accuracy"], "yes_rate": metrics["said_yes"]}
    summary = {"model": "models/toy", "job": "toy", "team": "demo", "mode": "official", "created": "now",
               "seconds": 1.0, "workers": 1, "image_size": 32, "datasets": [row]}
    write_results_markdown(summary, tmp_path / "results.md")
    md = (tmp_path / "results.md").read_text()
    assert "## True or false (toy)" in md and "| dataset | split | n | accuracy | yes_rate | decoding |" in md
    write_html_report(summary, [preds], [{}], tmp_path / "report.html", samples=2)
    page = (tmp_path / "report.html").read_text()
    assert "is the statement &quot; the heart is normal in size &quot; true?" in page and ("&#10003;" in page or "&#10007;" in page)


def _json_request(body: dict):
    from starlette.requests import Request

    data = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/truth", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    return Request(scope, receive)


def test_serving(predictor):
    from biomedgpt.modeldir import ModelMeta
    from biomedgpt.serve.app import served_tasks
    from biomedgpt.serve.engine import LoadedModel, run_batch
    from biomedgpt.serve.requests import ApiError, AskedModel, prepare, read_fields
    from biomedgpt.serve.schemas import Answer, body_doc, request_model
    from biomedgpt.spec import Limits

    task = get_task("truth")
    assert task.name in [t.name for t in served_tasks()]  # an endpoint POST /v1/truth
    schema = request_model(task).model_json_schema()
    assert set(schema["properties"]) == {"model", "zero_shot", "top_k", "statement"} and schema["required"] == [
        "statement"]
    assert set(body_doc(task)["requestBody"]["content"]) == {"application/json"}  # no image: JSON only

    limits = Limits(max_text_chars=200)
    model = AskedModel("local/truth@1", predictor.meta)
    served = LoadedModel("local/truth@1", predictor)

    async def ask(body: dict, asked: AskedModel = model) -> dict:
        fields = await read_fields(_json_request(body), task, limits)
        query = await prepare(task, fields, asked, limits)
        (result,) = run_batch(served, [query])
        return Answer(model=asked.id, version=1, task=task.name, **task.present(result)).model_dump(exclude_none=True)

    out = asyncio.run(ask({"statement": "The heart is normal in size.", "top_k": 2}))
    assert out["answer"] in ANSWERS and out["label"] == ("true" if out["answer"] == "yes" else "false")
    assert out["decoding"] == "trie" and [s["candidate"] for s in out["scores"]][0] == out["answer"]
    assert abs(sum(s["probability"] for s in out["scores"]) - 1) < 1e-4
    # the same answer as evaluation's predictor gives for that statement (scored over the same candidates)
    plan = DecodePlan("truth", "score", 1, 4, candidates=ANSWERS)
    (alone,) = predictor.decode(plan, predictor.inputs([task.instruction({"statement": "The heart is normal in size."})]))
    assert alone.prediction == out["answer"]

    with pytest.raises(ApiError) as err:  # bad bodies: the field named
        asyncio.run(ask({"statement": "   "}))
    assert err.value.status == 400 and err.value.detail == "statement: empty"
    with pytest.raises(ApiError) as err:
        asyncio.run(ask({"text": "x"}))
    assert err.value.status == 422 and err.value.detail.startswith("statement: field required")
    # a model trained for something else is not asked this task, unless the request says zero-shot
    vqa = AskedModel("t/vqa@1", ModelMeta(tasks=("vqa",)))
    with pytest.raises(ApiError) as err:
        asyncio.run(ask({"statement": "the lungs are clear"}, vqa))
    assert err.value.status == 422 and err.value.detail.startswith("model: t/vqa@1 was trained for vqa, not truth")
    assert asyncio.run(ask({"statement": "the lungs are clear", "zero_shot": True}, vqa))["answer"] in ANSWERS
    assert asyncio.run(ask({"statement": "the lungs are clear"}, AskedModel("t/any@1", ModelMeta())))  # generalist
