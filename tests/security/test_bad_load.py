"""Bad load becomes a clear status, never a 500: a model that cannot be loaded (its files differ from the
manifest's checksums, a file is gone), storage that fails, memory that runs out, a full queue and a
timeout answer a retryable JSON error (503/504 with `"retryable": true` and Retry-After); the token
limits of texts and labels are counted with the model's tokenizer (413 naming the field, also when the
logits a label list would allocate exceed the budget); non-finite scores are sent as null; images over
the pixel cap are 413 however PIL reports them.

The first tests drive the pieces without Ray (the engine's check, the ingress's call of the model
deployment with a stand-in handle); the last deploys the application on local Ray Serve (127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serve_helpers import VQA_ANSWERS, make_model_dir, png_bytes  # noqa: E402

from biomedgpt.serve.engine import Query, QueryRefused, check_query, load_model, out_of_memory  # noqa: E402
from biomedgpt.serve.requests import ApiError, open_image  # noqa: E402
from biomedgpt.spec import Limits, serve_spec_from_dict  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_tokenizer_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("m") / "cls", demo_tokenizer_dir, task="classify",
                          answers=["a", "b"], train_data=("chestmnist/train",))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, "dept/cls@1", threads=1, device="cpu")


# -- token limits, counted by the model's tokenizer ----------------------------------------------------


def test_labels_and_texts_are_limited_in_tokens_not_characters(loaded):
    tok = loaded.predictor.tok
    limits = Limits(max_label_tokens=8, max_text_tokens=40)
    short = "pneumonia"
    # 150 characters that are few tokens pass; 150 characters of rare bytes are many tokens and do not
    repeated = " ".join(["effusion"] * 16)[:150]
    rare = "\u0416\u2603\U0001F9EA" * 15
    assert len(tok.encode_text(rare)) > 8
    check_query(loaded, Query("classify", "what?", labels=(short,), labels_field="labels"), limits)
    with pytest.raises(QueryRefused) as err:
        check_query(loaded, Query("classify", "what?", labels=(short, rare), labels_field="labels"), limits)
    assert err.value.status == 413 and err.value.field == "labels[1]" and "tokens" in str(err.value)
    n = len(tok.encode_text(repeated))
    assert n > 8 and len(repeated) <= 200  # within the character limit the ingress checks first
    with pytest.raises(QueryRefused) as err:
        check_query(loaded, Query("summarize", "x", texts={"text": repeated * 2}), limits)
    assert err.value.field == "text" and f"more than the limit of {limits.max_text_tokens}" in str(err.value)


def test_a_label_list_over_the_logits_budget_is_413(loaded):
    vocab = loaded.predictor.model.config.vocab_size
    labels = tuple(f"finding {i}" for i in range(50))
    longest = max(len(loaded.predictor.tok.encode_text(x)) for x in labels)
    need = 50 * (longest + 1) * vocab
    check_query(loaded, Query("classify", "q", labels=labels), Limits(max_logits=need))
    with pytest.raises(QueryRefused) as err:
        check_query(loaded, Query("classify", "q", labels=labels), Limits(max_logits=need - 1))
    assert err.value.status == 413 and err.value.field == "labels" and f"{need:,} decoder logits" in str(err.value)


def test_out_of_memory_is_recognised():
    assert out_of_memory(MemoryError())
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory: "
                                      "you tried to allocate 1234 bytes. Error code 12 (Cannot allocate memory) "
                                      "out of memory"))
    assert not out_of_memory(RuntimeError("shape mismatch"))


# -- images over the pixel cap -------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (PIL reads only the header before it decides)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(10_000, 9_500), (20_000, 10_000), (7_000, 7_000)])
def test_images_over_the_pixel_cap_are_413_whatever_pil_says(width, height):
    """95M pixels: PIL warns (over its MAX_IMAGE_PIXELS); 200M: PIL refuses; 49M: our own cap."""
    with pytest.raises(ApiError) as err:
        open_image(png_header_only(width, height), Limits(max_image_pixels=40_000_000))
    assert err.value.status == 413 and err.value.field == "image", err.value.detail


# -- the ingress's call of the model deployment ---------------------------------------------------------


class _Response:
    def __init__(self, result=None, delay: float = 0.0, error: BaseException | None = None) -> None:
        self.result, self.delay, self.error, self.cancelled = result, delay, error, False

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """Stands in for the model deployment's handle: `options(...).infer.remote(query)`."""

    def __init__(self, response: _Response) -> None:
        self.response = response
        self.infer = self

    def options(self, **_):
        return self

    def remote(self, _query):
        return self.response


def ingress(model_dir: Path, response: _Response, timeout_s: float = 0.2):
    from biomedgpt.serve.app import PlainIngress

    spec = {"kind": "serve", "name": "t", "model_dir": str(model_dir), "auth": False,
            "ingress": {"request_timeout_s": timeout_s}}
    return PlainIngress(_Handle(response), spec, "t.yaml")


class _Entry:
    id = "dept/m@1"


def test_no_answer_within_the_timeout_is_504_retryable(model_dir):
    response = _Response({"answer": "late"}, delay=5)
    with pytest.raises(ApiError) as err:
        asyncio.run(ingress(model_dir, response, timeout_s=0.1).ask(_Entry(), object()))
    assert err.value.status == 504 and err.value.body()["retryable"] is True
    assert err.value.headers["Retry-After"] and response.cancelled
    assert "did not answer within 0.1 s" in err.value.detail


def test_a_full_queue_is_503_retryable(model_dir):
    from ray.serve.exceptions import BackPressureError

    response = _Response(error=BackPressureError(num_queued_requests=9, max_queued_requests=8))
    with pytest.raises(ApiError) as err:
        asyncio.run(ingress(model_dir, response).ask(_Entry(), object()))
    assert err.value.status == 503 and err.value.body() == {
        "detail": "model: dept/m@1: too many requests are waiting for it; retry later", "field": "model",
        "retryable": True}


def test_an_error_the_model_replica_answers_is_sent_as_it_is(model_dir):
    response = _Response({"error": {"status": 503, "detail": "model: dept/m@1 could not be loaded (RegistryError); "
                                    "retry later", "field": "model", "retry_after_s": 5.0}})
    with pytest.raises(ApiError) as err:
        asyncio.run(ingress(model_dir, response).ask(_Entry(), object()))
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "5"}


def test_storage_errors_while_resolving_are_503(model_dir, monkeypatch):
    app = ingress(model_dir, _Response())

    def broken(_ref):
        raise ConnectionError("Could not connect to the endpoint URL: http://127.0.0.1:9/models")

    monkeypatch.setattr(app.source, "resolve", broken)
    with pytest.raises(ApiError) as err:
        asyncio.run(app.resolve(app.source.entry.id, app.source.entry.department))
    assert err.value.status == 503 and err.value.body()["retryable"] is True
    assert "127.0.0.1:9" not in err.value.detail  # the storage's address stays in the replica's log


def test_non_finite_scores_are_null_in_the_json():
    from biomedgpt.serve.app import finite

    body = finite({"answer": "a", "scores": [{"candidate": "a", "log_prob": float("-inf"), "probability": float("nan")},
                                             {"candidate": "b", "log_prob": -1.5, "probability": 0.2}]})
    assert json.loads(json.dumps(body, allow_nan=False))["scores"][0] == {"candidate": "a", "log_prob": None,
                                                                          "probability": None}


def test_the_spec_sets_serves_timeout_and_queue_limits():
    from biomedgpt.serve.spec import SERVE_TIMEOUT_MARGIN_S, deploy_config
    from biomedgpt.spec import SpecError

    spec = serve_spec_from_dict({"kind": "serve", "name": "t", "registry": "/tmp/r",
                                 "ingress": {"request_timeout_s": 30, "max_queued_requests": 100},
                                 "models": {"max_queued_requests": 40}}, "t.yaml")
    config = deploy_config(spec)
    assert config["http_options"]["request_timeout_s"] == 30 + SERVE_TIMEOUT_MARGIN_S
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deployments["BiomedGPTIngress"]["max_queued_requests"] == 100
    assert deployments["BiomedGPTModels"]["max_queued_requests"] == 40
    with pytest.raises(SpecError, match=r"t.yaml: models.max_queued_requests: must be >= 1, or -1"):
        serve_spec_from_dict({"kind": "serve", "name": "t", "registry": "/tmp/r", "models": {"max_queued_requests": 0}},
                             "t.yaml")
    with pytest.raises(SpecError, match=r"t.yaml: ingress.request_timeout_s: must be > 0"):
        serve_spec_from_dict({"kind": "serve", "name": "t", "registry": "/tmp/r",
                              "ingress": {"request_timeout_s": 0}}, "t.yaml")


# -- on Ray Serve ----------------------------------------------------------------------------------------

DEPT = "stanford-like-radiology"


def tenants_with_a_key(tmp_path: Path) -> tuple[Path, str]:
    """A copy of the shipped cluster/tenants.yaml with a fresh API key for DEPT."""
    from biomedgpt.tenancy import hash_api_key, new_api_key
    from tests_paths import REPO

    data = yaml.safe_load((REPO / "cluster" / "tenants.yaml").read_text())
    data["datasetSpecs"] = str(REPO / "datasets_spec")  # the copy lives elsewhere: access classes from the repo
    key = new_api_key("bad-load-test")
    dept = data["institutions"]["stanford-like"]["departments"]["radiology"]
    dept.setdefault("apiKeys", []).append({"id": "bad-load-test", "hash": hash_api_key(key)})
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, key


def _call(url: str, path: str, body: dict, key: str) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw), err.headers
        except ValueError:
            raise AssertionError(f"{err.code}: not JSON: {raw[:300]!r}") from None


def test_served_bad_loads_answer_retryable_json_and_the_replica_keeps_serving(tmp_path, demo_tokenizer_dir):
    import base64

    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema
    from safetensors.torch import load_file, save_file

    from biomedgpt.demo import wait_healthy
    from biomedgpt.serve.registry import Registry
    from biomedgpt.serve.spec import deploy_config
    from biomedgpt.session import ensure_ray, free_port

    reg = Registry(str(tmp_path / "models"))
    good = make_model_dir(tmp_path / "src" / "good", demo_tokenizer_dir, seed=1, answers=VQA_ANSWERS)
    nan = make_model_dir(tmp_path / "src" / "nan", demo_tokenizer_dir, seed=2, answers=VQA_ANSWERS)
    weights = load_file(str(nan / "model.safetensors"))
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            weights[name] = torch.full_like(tensor, float("nan"))
    save_file(weights, str(nan / "model.safetensors"), metadata={"format": "pt"})
    reg.export(good, DEPT, "good")
    reg.export(good, DEPT, "tampered")
    reg.export(good, DEPT, "gone")
    reg.export(nan, DEPT, "nan")
    (root,) = [p for p in (tmp_path / "models").rglob("tampered") if p.is_dir()]
    (tampered,) = list(root.rglob("model.safetensors"))
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    (root,) = [p for p in (tmp_path / "models").rglob("gone") if p.is_dir()]
    (gone,) = list(root.rglob("model.safetensors"))
    gone.unlink()

    tenants, key = tenants_with_a_key(tmp_path)
    port = free_port()
    spec = serve_spec_from_dict({
        "kind": "serve", "name": "bad-load", "registry": reg.url, "tenants": str(tenants), "latest_ttl_s": 0.5,
        "http": {"host": "127.0.0.1", "port": port}, "ingress": {"replicas": 1, "num_cpus": 0.25},
        "models": {"max_models_per_replica": 2, "num_cpus": 0.5, "torch_threads": 1,
                   "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "limits": {"max_label_tokens": 6}}, "bad-load.yaml")
    schema = ServeDeploySchema.model_validate(deploy_config(spec))
    image = base64.b64encode(png_bytes((40, 40), "RGB", 90)).decode()
    ensure_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _get_global_client().deploy_apps(schema)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=300)
        question = {"image": image, "question": "is there an effusion?"}
        for name in ("tampered", "gone"):
            status, body, headers = _call(url, "/v1/vqa", dict(question, model=f"{DEPT}/{name}@1"), key)
            assert status == 503, body
            assert body["retryable"] is True and body["field"] == "model" and "could not be loaded" in body["detail"]
            assert int(headers["Retry-After"]) >= 1
        status, body, _ = _call(url, "/v1/vqa", dict(question, model=f"{DEPT}/nan@1"), key)
        assert status == 200, body
        assert body["scores"] and all(s["log_prob"] is None for s in body["scores"])
        status, body, _ = _call(url, "/v1/classify", {"image": image, "model": f"{DEPT}/good@1", "zero_shot": True,
                                                      "labels": ["effusion", "\u0416\u2603\U0001F9EA" * 10]}, key)
        assert status == 413 and body["field"] == "labels[1]" and "tokens" in body["detail"], body
        status, body, _ = _call(url, "/v1/vqa", dict(question, model=f"{DEPT}/good@1"), key)
        assert status == 200 and body["answer"] in VQA_ANSWERS, body
    finally:
        serve.shutdown()
        ray.shutdown()
