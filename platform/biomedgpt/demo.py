"""`biomedgpt demo`: the whole platform path on local Ray and local disk.

raw VQA-RAD sample (datasets_spec/samples/vqa_rad) -> WebDataset shards -> Ray Data stream -> 2 Ray
Train workers running Lightning (FSDP2 over gloo) -> step checkpoints -> export -> evaluation
(closed/open accuracy, majority baseline) -> Ray Serve deployment on 127.0.0.1 -> one question over
HTTP -> answer printed -> everything shut down.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .data.stream import records
from .runner import run_training
from .session import ensure_ray, free_port, keep_ray_logs, say
from .spec import spec_from_dict

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO / "jobs" / "demo" / "vqa_rad.yaml"


def demo_spec(spec_path: Path, out: Path):
    """The demo job spec with its working paths moved under `out`."""
    data = yaml.safe_load(spec_path.read_text())
    data["data"]["shards"] = str(out / "shards")
    data["output"]["storage"] = str(out / "runs")
    builds = data["data"].get("build", {})
    for name, src in builds.items():
        if not Path(src).is_absolute():
            builds[name] = str((REPO / src).resolve())
    return spec_from_dict(data, str(spec_path))


def ask(url: str, question: str, image: bytes, timeout: float = 120.0) -> dict[str, Any]:
    body = json.dumps({"question": question, "image": base64.b64encode(image).decode()}).encode()
    req = urllib.request.Request(url + "/v1/vqa", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout:.0f} s")
        time.sleep(1)


def run_demo(out: str = "runs/demo", spec_path: str | None = None) -> dict[str, Any]:
    t0 = time.time()
    out_dir = Path(out).resolve()
    spec = demo_spec(Path(spec_path) if spec_path else DEFAULT_SPEC, out_dir)
    say(f"demo: {spec.description or spec.name}; working directory {out_dir}")
    result = run_training(spec, num_cpus=2)
    ev = result.evaluation
    train_m = ev.get("vqa_rad/train", {})
    test_m = ev.get("vqa_rad/test", {})
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    if train_m:
        say(f"training questions: accuracy {fmt(train_m['accuracy'])} vs majority-answer baseline "
            f"{fmt(train_m['majority_baseline'])}")
    if test_m:
        say(f"held-back questions: overall {fmt(test_m['accuracy'])}, closed {fmt(test_m['closed_accuracy'])}, "
            f"open {fmt(test_m['open_accuracy'])} (n={test_m['count']})")

    # Serve the exported model and ask it about one held-back image. Ray is imported here, once
    # run_training's ensure_ray has set its environment (serve.app imports Ray Serve at its top).
    import ray
    from ray import serve

    from .serve.app import start

    sample = next(r for r in records(spec.data.shards, "vqa_rad", "test") if r.get("_image"))
    port = free_port()
    ensure_ray(num_cpus=2)
    try:
        url = start(result.export_dir, host="127.0.0.1", port=port)
        wait_healthy(url)
        say(f"serving {result.export_dir} at {url}")
        answer = ask(url, sample["question"], sample["_image"])
        say(f"Q: {sample['question']}  (image {sample.get('image', sample['id'])})")
        say(f"A: {answer['answer']}   [reference: {sample['answer']}; model {answer['model']}, {answer['decoding']}]")
    finally:
        serve.shutdown()
        keep_ray_logs(Path(result.run_dir) / "logs" / "serve")  # the Serve controller's, proxy's and replica's logs
        ray.shutdown()
    summary = {"run_dir": result.run_dir, "export": result.export_dir, "evaluation": ev,
               "question": sample["question"], "answer": answer["answer"], "reference": sample["answer"],
               "seconds": round(time.time() - t0, 1)}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    say(f"demo finished in {summary['seconds']:.0f} s; summary in {out_dir / 'demo_summary.json'}")
    return summary
