"""The model registry: export from checkpoints and model directories, immutable versions, @latest, the model
card, concurrent exports, and the same on S3 (moto's server on 127.0.0.1); the `biomedgpt registry` CLI."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest
from serve_helpers import VQA_ANSWERS, make_checkpoint, make_model_dir

from biomedgpt.serve.registry import BadModelId, ModelRef, Registry, RegistryError, UnknownModel


def test_model_ids():
    assert ModelRef.parse("radiology/vqa-rad@3") == ModelRef("radiology", "vqa-rad", 3)
    assert ModelRef.parse("radiology/vqa-rad@latest") == ModelRef("radiology", "vqa-rad", None)
    assert ModelRef.parse("radiology/vqa-rad") == ModelRef("radiology", "vqa-rad", None)
    assert ModelRef.parse("vqa-rad@2", default_department="radiology") == ModelRef("radiology", "vqa-rad", 2)
    assert str(ModelRef("radiology", "vqa-rad", None)) == "radiology/vqa-rad@latest"
    for bad in ("vqa-rad@2", "Radiology/x@1", "a/b@0", "a/b@-1", "a/b/c@1", "a/b@v1", "", "a/b@1 ; rm"):
        with pytest.raises(BadModelId):
            ModelRef.parse(bad)


def test_export_model_dir_versions_are_immutable_and_latest_resolves(tmp_path, vqa_model_dir):
    reg = Registry(str(tmp_path / "registry"))
    first = reg.export(vqa_model_dir, "stanford-like-radiology", "vqa-rad")
    assert first.id == "stanford-like-radiology/vqa-rad@1"
    v1 = tmp_path / "registry" / "stanford-like-radiology" / "vqa-rad" / "1"
    before = {p.name: p.read_bytes() for p in v1.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "answers.json", "training.json", "model_card.json",
            "README.md", "manifest.json", ".claim"} <= set(before)
    second = reg.export(vqa_model_dir, "stanford-like-radiology", "vqa-rad", licence="CC-BY-4.0")
    assert second.version == 2
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == before  # version 1 untouched
    assert reg.resolve("stanford-like-radiology/vqa-rad@latest").version == 2
    assert reg.resolve("stanford-like-radiology/vqa-rad@1").card["licence"] == "Apache-2.0"
    assert reg.resolve("vqa-rad", default_department="stanford-like-radiology").card["licence"] == "CC-BY-4.0"
    with pytest.raises(UnknownModel):
        reg.resolve("stanford-like-radiology/vqa-rad@3")
    with pytest.raises(UnknownModel):
        reg.resolve("stanford-like-radiology/other@latest")
    # a claimed version without a manifest (a crashed export) is invisible and its number is not reused
    (v1.parent / "3").mkdir()
    (v1.parent / "3" / ".claim").write_text("{}")
    assert reg.versions("stanford-like-radiology", "vqa-rad") == [1, 2]
    assert reg.resolve("stanford-like-radiology/vqa-rad@latest").version == 2
    assert reg.export(vqa_model_dir, "stanford-like-radiology", "vqa-rad").version == 4
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert manifest["id"] == "stanford-like-radiology/vqa-rad@1"
    assert set(manifest["files"]) == set(before) - {"manifest.json", ".claim"}
    with pytest.raises(RegistryError, match="department 'Radiology'"):
        reg.export(vqa_model_dir, "Radiology", "x")
    with pytest.raises(RegistryError, match="neither a run checkpoint"):
        reg.export(tmp_path, "radiology", "x")


def test_export_a_run_checkpoint_writes_the_model_card(tmp_path, demo_tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "runs" / "stanford-like-radiology" / "vqa-rad-ft", demo_tokenizer_dir)
    reg = Registry(str(tmp_path / "registry"))
    entry = reg.export(ckpt, "stanford-like-radiology", "vqa-rad")
    files = set(entry.manifest["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "answers.json", "training.json",
            "model_card.json", "README.md"} <= files
    card = json.loads((Path(entry.url) / "model_card.json").read_text())
    assert card["id"] == "stanford-like-radiology/vqa-rad@1" and card["run"] == "vqa-rad-ft" and card["step"] == 20
    assert [d["dataset"] for d in card["training_data"]] == ["vqa_rad", "slake"]
    assert card["data_licences"]["vqa_rad"] == "CC0 1.0"  # from datasets_spec/vqa_rad.yaml
    assert card["metrics"] == {"vqa_rad/test": {"accuracy": 0.5, "closed_accuracy": 0.6, "open_accuracy": 0.25,
                                                "count": 69}}
    assert card["licence"] == "Apache-2.0" and card["tasks"] == ["vqa"] and card["answers"] == VQA_ANSWERS
    readme = (Path(entry.url) / "README.md").read_text()
    assert "# stanford-like-radiology/vqa-rad@1" in readme and "| vqa_rad | train | CC0 1.0 | open |" in readme
    assert '"closed_accuracy": 0.6' in readme
    # the exported weights load and equal the checkpoint's
    import torch

    from biomedgpt.inference import load_model_dir

    model, tok, meta = load_model_dir(entry.url)
    state = torch.load(ckpt / "lightning.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(model.state_dict()["encoder.layers.0.fc1.weight"], state["model.encoder.layers.0.fc1.weight"])
    assert list(meta.answers) == VQA_ANSWERS and meta.tasks == ("vqa",)


def _export_worker(args):
    registry, source, name = args
    return Registry(registry).export(source, "stanford-like-radiology", name).version


def test_a_multi_label_model_exports_only_with_classes_it_can_list(tmp_path, demo_tokenizer_dir):
    from serve_helpers import make_model_dir

    reg = Registry(str(tmp_path / "registry"))
    classes = ["atelectasis", "effusion", "pneumonia"]
    good = make_model_dir(tmp_path / "good", demo_tokenizer_dir, task="classify", answers=[*classes, "no finding"],
                          meta={"multi_label": True, "classes": classes})
    entry = reg.export(good, "radiology", "chest-findings")
    assert entry.card["multi_label"] is True and list(entry.meta.classes) == classes
    assert list(reg.resolve("radiology/chest-findings@1").meta.classes) == classes
    bad = make_model_dir(tmp_path / "bad", demo_tokenizer_dir, task="classify",
                         meta={"multi_label": True, "classes": ["effusion", "effusion"]})
    with pytest.raises(RegistryError, match=r"bad: training.json's multi-label classes cannot be answered as a list"):
        reg.export(bad, "radiology", "chest-findings")
    assert reg.versions("radiology", "chest-findings") == [1]


def test_concurrent_exports_get_distinct_versions(tmp_path, vqa_model_dir):
    registry = str(tmp_path / "registry")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        versions = pool.map(_export_worker, [(registry, str(vqa_model_dir), "race")] * 6)
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    reg = Registry(registry)
    assert reg.versions("stanford-like-radiology", "race") == [1, 2, 3, 4, 5, 6]
    for v in versions:
        assert reg.entry("stanford-like-radiology", "race", v).manifest["version"] == v


def test_registry_on_s3(s3_bucket, vqa_model_dir, tmp_path, demo_tokenizer_dir, monkeypatch):
    url = f"{s3_bucket}/registry"
    reg = Registry(url)
    entries = []
    threads = [threading.Thread(target=lambda: entries.append(reg.export(vqa_model_dir, "mayo-like-radiology", "slake")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.version for e in entries) == [1, 2, 3]  # conditional PUTs: distinct versions
    ckpt = make_checkpoint(tmp_path / "run" / "slake-ft", demo_tokenizer_dir)
    e4 = reg.export(ckpt, "mayo-like-radiology", "slake")
    assert e4.version == 4 and e4.url == f"{url}/mayo-like-radiology/slake/4"
    assert [e.id for e in reg.list("mayo-like-radiology", all_versions=False)] == ["mayo-like-radiology/slake@4"]
    latest = reg.resolve("mayo-like-radiology/slake@latest")
    assert latest.card["metrics"]["vqa_rad/test"]["accuracy"] == 0.5
    monkeypatch.setenv("BIOMEDGPT_MODEL_CACHE", str(tmp_path / "cache"))
    local = reg.local_dir(latest)  # downloaded once, sha256-checked against the manifest
    assert local.is_relative_to(tmp_path / "cache") and (local / "model.safetensors").is_file()
    assert reg.local_dir(latest) == local
    from biomedgpt.inference import load_model_dir

    assert list(load_model_dir(local)[2].answers) == VQA_ANSWERS
    # an existing version's object is never replaced by the protocol's exclusive writes
    from biomedgpt.serve.registry import create_exclusive

    assert not create_exclusive(f"{url}/mayo-like-radiology/slake/1/manifest.json", b"{}")
    assert reg.entry("mayo-like-radiology", "slake", 1).manifest["version"] == 1


def test_registry_cli(tmp_path, vqa_model_dir, demo_tokenizer_dir, monkeypatch, capsys):
    from biomedgpt.cli import main

    monkeypatch.setenv("BIOMEDGPT_REGISTRY", str(tmp_path / "reg"))
    ckpt = make_checkpoint(tmp_path / "runs" / "vqa-rad-ft", demo_tokenizer_dir)
    assert main(["registry", "export", str(ckpt), "--department", "stanford-like-radiology", "--name", "vqa-rad",
                 "--team", "stanford-like-radiology"]) == 0
    assert "published stanford-like-radiology/vqa-rad@1" in capsys.readouterr().out
    other = make_model_dir(tmp_path / "caption-model", demo_tokenizer_dir, task="caption", answers=None,
                           train_data=("iu_xray/train",))
    monkeypatch.setenv("BIOMEDGPT_TEAM", "charite-like-dermatology")  # what a RayJob's environment says
    assert main(["registry", "export", str(other), "--department", "charite-like-dermatology", "--name", "captioner",
                 "--licence", "CC-BY-NC-4.0"]) == 0
    capsys.readouterr()
    assert main(["registry", "list"]) == 0
    table = capsys.readouterr().out
    assert "stanford-like-radiology/vqa-rad@1" in table and "charite-like-dermatology/captioner@1" in table
    assert "vqa_rad,slake" in table and "accuracy 0.500" in table
    assert main(["registry", "list", "--department", "charite-like-dermatology", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed] == ["charite-like-dermatology/captioner@1"]
    assert listed[0]["tasks"] == ["caption"] and listed[0]["licence"] == "CC-BY-NC-4.0"
    assert main(["registry", "show", "stanford-like-radiology/vqa-rad@latest"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["registry", "show", "stanford-like-radiology/nope@latest"]) == 2
    assert "no model stanford-like-radiology/nope" in capsys.readouterr().err
    assert main(["registry", "export", str(tmp_path), "--department", "x", "--name", "y"]) == 2
