"""`biomedgpt serve MODEL_DIR` / serve.app.start(): one model directory on Ray Serve at 127.0.0.1 (what the
demo runs): health, the demo's JSON /v1/vqa request, 4xx errors for bad requests, and a department's keys."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model.tokenizer import BiomedGPTTokenizer

ANSWERS = ["yes", "no", "left lung", "ct"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_tokenizer_dir) -> Path:
    """A model directory without a run name: it is served as local/<directory name>@1."""
    out = tmp_path_factory.mktemp("served-model")
    tok = BiomedGPTTokenizer.from_pretrained(demo_tokenizer_dir)
    torch.manual_seed(0)
    cfg = BiomedGPTConfig.from_size("demo", vocab_size=len(tok))
    BiomedGPTForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "answers.json").write_text(json.dumps(ANSWERS))
    (out / "training.json").write_text(json.dumps({"image_size": 64, "max_source_length": 32}))
    return out


@pytest.fixture(scope="module")
def served(model_dir):
    import ray
    from ray import serve

    from biomedgpt.demo import wait_healthy
    from biomedgpt.session import ensure_ray, free_port
    from biomedgpt.serve.app import start

    ensure_ray(num_cpus=2)
    try:
        url = start(str(model_dir), port=free_port())
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/vqa", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_and_an_answer_from_the_candidates(served, model_dir, demo_shards):
    from biomedgpt.data.stream import records

    from biomedgpt.demo import ask

    model_id = f"local/{model_dir.name}@1"
    with urllib.request.urlopen(served + "/healthz", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["model"] == model_id
    rec = next(records(demo_shards, "vqa_rad", "test"))
    status, body = post(served, {"question": rec["question"], "image": base64.b64encode(rec["_image"]).decode()})
    assert status == 200, body
    assert body["answer"] in ANSWERS and body["decoding"] == "trie" and body["model"] == model_id
    assert body["version"] == 1 and [s["candidate"] for s in body["scores"]][0] == body["answer"]
    assert ask(served, rec["question"], rec["_image"])["answer"] == body["answer"]  # the demo's client


@pytest.mark.parametrize("body, status, detail", [
    ({"question": "what?", "image": "%%% not base64"}, 400, "image: not valid base64"),
    ({"question": "what?", "image": base64.b64encode(b"plain text, not an image").decode()}, 400,
     "image: cannot decode image"),
    ({"question": "   ", "image": base64.b64encode(b"x").decode()}, 400, "question: empty"),
    ({"question": "q" * 1001, "image": base64.b64encode(b"x").decode()}, 400, "question: longer than"),
    ({"image": "aGk="}, 422, "question: field required"),
    (b"{not json", 422, "body: not valid JSON"),
    ({"question": "what?", "image": "aGk=", "model": "local/other@1"}, 404, "model: no model"),
])
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(served, body, status, detail):
    code, payload = post(served, body)
    assert code == status, payload
    if detail:
        assert payload["detail"].startswith(detail), payload
    with urllib.request.urlopen(served + "/healthz", timeout=30) as resp:
        assert resp.status == 200


@pytest.fixture(scope="module")
def team_served(served, model_dir, tmp_path_factory):
    """A second application on the running Serve, serving for one department, with a fresh key added
    to a copy of cluster/tenants.yaml."""
    import yaml
    from ray import serve

    from biomedgpt.demo import wait_healthy
    from biomedgpt.serve.app import build_app
    from biomedgpt.tenancy import hash_api_key, new_api_key
    from tests_paths import REPO

    key = new_api_key("test-client")
    data = yaml.safe_load((REPO / "cluster" / "tenants.yaml").read_text())
    data["datasetSpecs"] = str(REPO / "datasets_spec")  # the copy lives elsewhere: access classes from the repo
    radiology = data["institutions"]["stanford-like"]["departments"]["radiology"]
    radiology["apiKeys"].append({"id": "test-client", "hash": hash_api_key(key)})
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(data, sort_keys=False))
    serve.run(build_app(str(model_dir), team="stanford-like-radiology", tenants_path=str(tenants)),
              name="radiology", route_prefix="/radiology", blocking=False)
    url = served + "/radiology"
    try:
        wait_healthy(url)
        yield url, key
    finally:
        serve.delete("radiology")


def test_a_served_department_needs_one_of_its_api_keys(team_served, demo_shards):
    from biomedgpt.data.stream import records

    url, key = team_served
    rec = next(records(demo_shards, "vqa_rad", "test"))
    body = json.dumps({"question": rec["question"], "image": base64.b64encode(rec["_image"]).decode()}).encode()

    def ask(headers: dict) -> tuple[int, dict]:
        req = urllib.request.Request(url + "/v1/vqa", data=body, headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert ask({})[0] == 401
    code, payload = ask({"Authorization": "Bearer " + "x" * 43})
    assert code == 401 and "not one of team 'stanford-like-radiology'" in payload["detail"]
    code, payload = ask({"Authorization": f"Bearer {key}"})
    assert code == 200 and payload["model"].startswith("stanford-like-radiology/")
    assert ask({"X-API-Key": key})[0] == 200


def test_served_requests_leave_audit_lines(team_served, demo_shards):
    """Through Ray Serve: each /v1 request is one line of the audit trail (biomedgpt.audit) with the department,
    the key id, the model id@version, the body's sha256 (never the body), the status and the latency; a key
    that failed is recorded by the id it claimed."""
    import datetime as dt
    import hashlib
    import os
    import time

    from biomedgpt.audit import parse_time, read_audit
    from biomedgpt.data.stream import records

    url, key = team_served
    since = parse_time("1s")
    rec = next(records(demo_shards, "vqa_rad", "test"))
    question = f"audit probe {time.time_ns()}: {rec['question']}"
    body = json.dumps({"question": question, "image": base64.b64encode(rec["_image"]).decode()}).encode()

    def ask(headers: dict) -> int:
        req = urllib.request.Request(url + "/v1/vqa", data=body, headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    assert ask({"Authorization": f"Bearer {key}"}) == 200
    assert ask({"Authorization": "Bearer stranger." + "x" * 43}) == 401
    root = os.environ["BIOMEDGPT_AUDIT"]
    deadline = time.monotonic() + 30  # the replica flushes every audit.flush_s (2 s)
    while True:
        lines = list(read_audit(root, "requests", since=since - dt.timedelta(seconds=5)))
        ok = [r for r in lines if r.get("input_sha256") == hashlib.sha256(body).hexdigest()]
        refused = [r for r in lines if r.get("claimed_key_id") == "stranger"]
        if (ok and refused) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ok) == 1 and len(refused) == 1, lines
    ok, refused = ok[0], refused[0]
    assert (ok["status"], ok["department"], ok["key_id"], ok["endpoint"]) == \
        (200, "stanford-like-radiology", "test-client", "/v1/vqa")
    assert ok["model"].startswith("stanford-like-radiology/") and ok["model"].endswith("@1")
    assert ok["input_bytes"] == len(body) and ok["latency_ms"] > 0
    # refused before its body was read: no hash of a body the app never took
    assert (refused["status"], refused["department"], refused["input_sha256"]) == (401, None, None)
    assert "audit probe" not in json.dumps(lines)
