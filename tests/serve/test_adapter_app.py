"""Department adapters on the registry-backed Serve app (local Ray Serve, 127.0.0.1): a shared base of one
department (listed in `models.shared_bases`) and adapters of other departments; concurrent requests for three
adapters are answered in shared batches on one resident base, each as alone; an adapter belongs to its
department (403 for another's key, 404 unknown), bad input is 4xx; `/v1/models` shows kind, base and what is
resident."""

from __future__ import annotations

import concurrent.futures

import pytest
import yaml
from serve_helpers import make_adapter_checkpoint, make_model_dir, png_bytes
from test_api import b64, call

STANFORD, MAYO, CHARITE = "stanford-like-radiology", "mayo-like-radiology", "charite-like-dermatology"
APP = "adapter-api"


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_tokenizer_dir, api_keys):
    from ray import serve

    from biomedgpt.demo import wait_healthy
    from biomedgpt.serve.app import start_spec
    from biomedgpt.serve.registry import Registry
    from biomedgpt.session import ensure_ray, free_port
    from biomedgpt.spec import load_serve_spec

    root = tmp_path_factory.mktemp("adapter-app")
    reg = Registry(str(root / "registry"))
    base = reg.export(make_model_dir(root / "base", demo_tokenizer_dir, seed=21), MAYO, "base")
    base_dir = reg.local_dir(base)
    for i in range(3):
        reg.export(make_adapter_checkpoint(root / "runs" / f"lora-{i}", base_dir, seed=200 + i, base_id=base.id),
                   STANFORD, f"lora-{i}")
    own = reg.export(make_model_dir(root / "own", demo_tokenizer_dir, seed=22), CHARITE, "own-base")
    reg.export(make_adapter_checkpoint(root / "runs" / "unshared", reg.local_dir(own), seed=9, base_id=own.id),
               STANFORD, "unshared")
    tenants, keys = api_keys
    port = free_port()
    spec_file = root / "app.yaml"
    spec_file.write_text(yaml.safe_dump({
        "kind": "serve", "name": APP, "registry": reg.url, "tenants": str(tenants),
        "http": {"host": "127.0.0.1", "port": port}, "ingress": {"replicas": 1, "num_cpus": 0.25},
        "models": {"max_models_per_replica": 2, "max_adapters_per_replica": 8, "shared_bases": [MAYO],
                   "num_cpus": 0.5, "torch_threads": 1, "batch": {"max_batch_size": 16, "wait_timeout_s": 0.2},
                   "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 64}}}))
    ensure_ray(num_cpus=2)
    try:
        url = start_spec(load_serve_spec(spec_file), port=port)
        wait_healthy(url, timeout=300)
        yield url, keys, base.id
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("BiomedGPTModels", app_name=APP).stats.remote().result()


def test_adapters_share_batches_on_one_base_and_answer_as_alone(app):
    from ray import serve

    url, keys, base_id = app
    key = keys[STANFORD]
    asks = [(f"{STANFORD}/lora-{i % 3}@1", f"is there an abnormality in region {i}?", png_bytes((64, 64), "RGB", 9 * i))
            for i in range(12)]

    def ask(a):
        return call(url, "/v1/vqa", {"question": a[1], "image": b64(a[2]), "model": a[0]}, key=key)

    alone = [ask(a) for a in asks[:3]]
    assert all(code == 200 for code, _ in alone), alone
    serve.get_deployment_handle("BiomedGPTModels", app_name=APP).reset_stats.remote().result()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, asks))
    assert all(code == 200 for code, _ in together), together
    st = stats()
    assert st["resident"] == [base_id] and st["loads"] == {base_id: 1}, st  # one base, never the adapters as models
    assert sorted(st["adapters"][base_id]) == [f"{STANFORD}/lora-{i}@1" for i in range(3)]
    assert st["max_batch"] > 1 and st["batches"] < 12, st
    for (code, a), (_, t), asked in zip(alone, together[:3], asks[:3]):
        assert t["model"] == asked[0] and t["answer"] == a["answer"]
        assert [round(s["log_prob"], 4) for s in t["scores"]] == [round(s["log_prob"], 4) for s in a["scores"]]
    # the three adapters answer differently (each its own weights)
    assert len({tuple(round(s["log_prob"], 4) for s in t["scores"]) for _, t in together[:3]}) == 3
    # another task of the same adapter, constrained decoding over the client's labels
    code, body = call(url, "/v1/classify", {"image": b64(png_bytes()), "labels": ["normal", "effusion"],
                                            "model": f"{STANFORD}/lora-1@1", "zero_shot": True}, key=key)
    assert code == 200 and body["answer"] in ("normal", "effusion") and body["model"] == f"{STANFORD}/lora-1@1"


def test_adapters_keep_tenancy_and_bad_input_behaviour(app):
    url, keys, base_id = app
    img = b64(png_bytes((64, 64), "RGB", 50))
    code, body = call(url, "/v1/vqa", {"question": "what?", "image": img, "model": f"{STANFORD}/lora-0@1"},
                      key=keys[CHARITE])
    assert code == 403 and "belongs to department 'stanford-like-radiology'" in body["detail"]
    code, body = call(url, "/v1/vqa", {"question": "what?", "image": img, "model": f"{STANFORD}/lora-9@1"},
                      key=keys[STANFORD])
    assert code == 404
    code, body = call(url, "/v1/vqa", {"question": "what?", "image": img, "model": f"{STANFORD}/unshared@1"},
                      key=keys[STANFORD])
    assert code == 403 and "shares no bases" in body["detail"]
    code, body = call(url, "/v1/vqa", {"question": "   ", "image": img, "model": f"{STANFORD}/lora-0@1"},
                      key=keys[STANFORD])
    assert code == 400 and body["detail"].startswith("question: empty")
    code, body = call(url, "/v1/vqa", {"question": "what?", "image": b64(b"not an image"),
                                       "model": f"{STANFORD}/lora-0@1"}, key=keys[STANFORD])
    assert code == 400 and body["detail"].startswith("image:")
    code, listing = call(url, "/v1/models", key=keys[STANFORD])
    assert code == 200
    kinds = {m["id"]: (m["kind"], m["base"]) for m in listing["models"]}
    assert kinds[f"{STANFORD}/lora-0@1"] == ("adapter", base_id)
    resident = {r["model"]: r["adapters"] for r in listing["resident"]}
    assert f"{STANFORD}/lora-0@1" in resident.get(base_id, []), listing["resident"]
    code, listing = call(url, "/v1/models", key=keys[CHARITE])
    assert all(not r["adapters"] for r in listing["resident"]), "another department's adapters are not shown"
