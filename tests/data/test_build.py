"""build_shards: native release -> shards + manifests; restartable; inspect_shards on the result."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from biomedgpt.data import build
from biomedgpt.data.build import build_shards, plan_split
from biomedgpt.data.converters import open_converter
from biomedgpt.data.dataset_spec import load_dataset_spec
from biomedgpt.data.inspect import inspect_shards
from biomedgpt.data.shards import read_manifest, tar_archive_size, verify_shards

REPO = Path(__file__).resolve().parents[2]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*.tar"))}


def test_build_vqa_rad_sample(sample_vqa_rad: Path, tmp_path: Path):
    out = tmp_path / "shards"
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(out), shard_max_samples=100, progress=False)
    assert list(result) == ["train", "test"]
    assert (result["train"].samples, len(result["train"].shards)) == (266, 3)
    assert (result["test"].samples, len(result["test"].shards)) == (69, 1)
    assert read_manifest(str(out / "vqa_rad/train")).to_json() == result["train"].to_json()
    manifest = json.loads((out / "vqa_rad/test/manifest.json").read_text())
    assert manifest["licence"] == "CC0 1.0" and manifest["access"] == "open" and manifest["task"] == "vqa"
    assert manifest["source"] == str(sample_vqa_rad) and manifest["complete"] is True
    assert verify_shards(str(out)).ok

    # every sample's image is the source file byte for byte (no re-encoding)
    images = sample_vqa_rad / "VQA_RAD Image Folder"
    with tarfile.open(out / "vqa_rad/test/vqa_rad-test-000000.tar") as tar:
        names = tar.getnames()
        first = json.loads(tar.extractfile(names[0]).read())
        assert names[:2] == [f"vqa_rad-{first['id']}.json", f"vqa_rad-{first['id']}.jpg"]
        assert tar.extractfile(names[1]).read() == (images / first["image"]).read_bytes()
        assert first["split"] == "test" and first["dataset"] == "vqa_rad"


def test_rebuild_writes_nothing(sample_vqa_rad: Path, tmp_path: Path):
    out = tmp_path / "shards"
    first = build_shards("vqa_rad", str(sample_vqa_rad), str(out), shard_max_samples=100, progress=False)
    before = mtimes(out)
    manifests = {p: p.read_bytes() for p in out.rglob("manifest.json")}
    again = build_shards("vqa_rad", str(sample_vqa_rad), str(out), shard_max_samples=100, progress=False)
    assert again.written == [] and len(again.kept) == len(first.written) == 4
    assert mtimes(out) == before
    assert {p: p.read_bytes() for p in out.rglob("manifest.json")} == manifests


def test_rebuild_repairs_only_damaged_shards(sample_vqa_rad: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "shards"
    build_shards("vqa_rad", str(sample_vqa_rad), str(out), shard_max_samples=100, progress=False)
    split = out / "vqa_rad/train"
    (split / "vqa_rad-train-000001.tar").unlink()
    damaged = split / "vqa_rad-train-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")
    calls = []
    real = build.write_planned_shard
    monkeypatch.setattr(build, "write_planned_shard", lambda plan, *args: calls.append(plan.name) or real(plan, *args))
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(out), shard_max_samples=100, progress=False)
    assert calls == ["vqa_rad-train-000001.tar", "vqa_rad-train-000002.tar"]
    assert len(result.kept) == 2 and verify_shards(str(out)).ok


def test_interrupted_build_resumes(sample_vqa_rad: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "shards"
    real = build.write_planned_shard

    def crash_on_third(plan, *args):
        if plan.index == 2:
            raise KeyboardInterrupt
        return real(plan, *args)

    monkeypatch.setattr(build, "write_planned_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_shards("vqa_rad", str(sample_vqa_rad), str(out), ["train"], shard_max_samples=100, progress=False)
    partial = read_manifest(str(out / "vqa_rad/train"))
    assert not partial.complete and [s.name for s in partial.shards] == ["vqa_rad-train-000000.tar", "vqa_rad-train-000001.tar"]
    assert not list((out / "vqa_rad/train").glob(".*partial"))  # nothing half-written left behind
    monkeypatch.setattr(build, "write_planned_shard", real)
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(out), ["train"], shard_max_samples=100, progress=False)
    assert [Path(u).name for u in result.written] == ["vqa_rad-train-000002.tar"] and len(result.kept) == 2
    assert result["train"].complete and verify_shards(str(out)).ok


def test_changed_plan_rewrites_and_removes_stale(sample_vqa_rad: Path, tmp_path: Path):
    out = tmp_path / "shards"
    build_shards("vqa_rad", str(sample_vqa_rad), str(out), ["train"], shard_max_samples=50, progress=False)
    assert len(list((out / "vqa_rad/train").glob("*.tar"))) == 6
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(out), ["train"], shard_max_samples=100, progress=False)
    assert len(result.written) == 3 and len(result.removed) == 3
    assert len(list((out / "vqa_rad/train").glob("*.tar"))) == 3 and verify_shards(str(out)).ok


def test_changed_source_record_rewrites_its_shard(vqa_rad_copy: Path, tmp_path: Path):
    out = tmp_path / "shards"
    build_shards("vqa_rad", str(vqa_rad_copy), str(out), ["train"], shard_max_samples=100, progress=False)
    path = vqa_rad_copy / "VQA_RAD Dataset Public.json"
    records = json.loads(path.read_text())
    last_train = [r for r in records if not r["phrase_type"].startswith("test")][-1]
    last_train["answer"] = "Corrected answer"
    path.write_text(json.dumps(records))
    result = build_shards("vqa_rad", str(vqa_rad_copy), str(out), ["train"], shard_max_samples=100, progress=False)
    assert [Path(u).name for u in result.written] == ["vqa_rad-train-000002.tar"]


def test_same_input_same_bytes_in_another_place(sample_vqa_rad: Path, tmp_path: Path):
    a = build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path / "a"), shard_max_samples=100, progress=False)
    b = build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path / "b"), shard_max_samples=100, progress=False)
    assert [s.sha256 for s in a["train"].shards] == [s.sha256 for s in b["train"].shards]


def test_plan_is_deterministic_and_byte_exact(sample_vqa_rad: Path, tmp_path: Path):
    conv = open_converter("vqa_rad", str(sample_vqa_rad))
    plans = [plan_split(conv, "train", str(tmp_path), shard_max_bytes=2 * 2**20) for _ in range(2)]
    assert [s.input_sha256 for s in plans[0].shards] == [s.input_sha256 for s in plans[1].shards]
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path), ["train"], shard_max_bytes=2 * 2**20, progress=False)
    planned = [tar_archive_size(sum(s.member_bytes for s in p.samples)) for p in plans[0].shards]
    assert planned == [s.bytes for s in result["train"].shards]
    assert all(s.bytes <= 2 * 2**20 for s in result["train"].shards)


def test_build_medmnist_encodes_png(dev_data: Path, tmp_path: Path):
    result = build_shards("pneumoniamnist", str(dev_data / "medmnist"), str(tmp_path), ["val"],
                          files={"npz": "dev.npz"}, shard_max_samples=30, progress=False)
    assert result["val"].samples == 50 and len(result["val"].shards) == 2
    with tarfile.open(tmp_path / "pneumoniamnist/val/pneumoniamnist-val-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["pneumoniamnist-val_000000.json", "pneumoniamnist-val_000000.png"]
        record = json.loads(tar.extractfile(names[0]).read())
        assert record["label_name"] in ("normal", "pneumonia") and record["task"] == "classify"


def test_build_with_spec_and_split_errors(sample_vqa_rad: Path, tmp_path: Path):
    spec = load_dataset_spec(REPO / "datasets_spec/vqa_rad.yaml")
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path), ["test"], spec=spec, progress=False)
    assert result["test"].licence == spec.licence and result["test"].notes["options"] == {"layout": "auto"}
    with pytest.raises(ValueError, match=r"vqa_rad: split\(s\) \['val'\] not in .* \(present: \['train', 'test'\]\)"):
        build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path), ["val"], progress=False)


def test_progress_output(sample_vqa_rad: Path, tmp_path: Path, capsys):
    build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path), ["test"], progress=True)
    err = capsys.readouterr().err
    assert "vqa_rad/test: 69 samples in 1 shards" in err and "1 written, 0 kept" in err


def test_inspect_shards(sample_vqa_rad: Path, tmp_path: Path):
    build_shards("vqa_rad", str(sample_vqa_rad), str(tmp_path), shard_max_samples=100, progress=False)
    summary = inspect_shards(str(tmp_path), n=3)
    assert summary.counts == {"vqa_rad/test": 69, "vqa_rad/train": 266}
    test = summary.splits[0]
    assert len(test.examples) == 3 and all(e["split"] == "test" for e in test.examples)
    assert test.examples[0]["__image__"]["format"] == "jpg" and test.examples[0]["__image__"]["width"] > 0
    text = summary.format()
    assert "vqa_rad/train: 266 samples in 3 shards" in text and '"question":' in text
    one_split = inspect_shards(str(tmp_path / "vqa_rad/train"), n=1)
    assert one_split.counts == {"vqa_rad/train": 266} and len(one_split.splits[0].examples) == 1
    assert json.dumps(summary.to_json())
    assert "no manifest.json found" in inspect_shards(str(tmp_path / "nothing")).format()


def test_shard_plans_travel_to_other_processes(sample_vqa_rad: Path, dev_data: Path, tmp_path: Path):
    """A ShardPlan pickles (as it must to become a Ray task) and writes the same bytes elsewhere."""
    import pickle

    from biomedgpt.data.build import write_planned_shard

    for conv, split in ((open_converter("vqa_rad", str(sample_vqa_rad)), "test"),
                        (open_converter("pneumoniamnist", str(dev_data / "medmnist"), {"npz": "dev.npz"}), "val")):
        plan = plan_split(conv, split, str(tmp_path), shard_max_samples=40).shards[0]
        here = write_planned_shard(plan, str(tmp_path / "here"))
        there = write_planned_shard(pickle.loads(pickle.dumps(plan)), str(tmp_path / "there"))
        assert here == there and here.samples == 40
