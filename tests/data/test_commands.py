"""The ``biomedgpt shards`` subcommands, through an argparse parser like the one cli.py builds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from biomedgpt.cli.shards import add_shards_commands


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="biomedgpt")
    sub = parser.add_subparsers(dest="command")
    add_shards_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_inspect_verify(sample_vqa_rad: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # so datasets_spec/vqa_rad.yaml is found
    out = tmp_path / "shards"
    assert run(["shards", "build", "vqa_rad", "--source", str(sample_vqa_rad), "--out", str(out),
                "--shard-max-samples", "100", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "vqa_rad/train: 266 samples, 3 shards" in printed and "4 shards written, 0 kept" in printed
    assert run(["shards", "verify", str(out)]) == 0
    assert "4/4 shards match" in capsys.readouterr().out
    assert run(["shards", "inspect", str(out / "vqa_rad"), "-n", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["splits"]["vqa_rad/test"]["samples"] == 69 and len(data["splits"]["vqa_rad/test"]["examples"]) == 2
    (out / "vqa_rad/test/vqa_rad-test-000000.tar").write_bytes(b"")
    assert run(["shards", "verify", str(out)]) == 1


def test_build_options_and_datasets_list(dev_data: Path, tmp_path: Path, capsys):
    assert run(["shards", "build", "pneumoniamnist", "--source", str(dev_data / "medmnist"), "--out", str(tmp_path),
                "--split", "test", "--file", "npz=dev.npz", "--shard-max-mb", "1", "--quiet"]) == 0
    assert "pneumoniamnist/test: 40 samples" in capsys.readouterr().out

    from data_testing import tiny_jpeg, write_images

    slake = tmp_path / "Slake1.0"
    slake.mkdir()
    records = [{"qid": i, "img_id": 1, "img_name": f"xmlab{i % 3}/source.jpg", "question": "Is this a CT?",
                "answer": "Yes", "q_lang": lang, "answer_type": "CLOSED", "location": "Lung"}
               for i, lang in enumerate(["en", "zh", "en", "zh"])]
    (slake / "train.json").write_text(json.dumps(records))
    write_images(slake / "imgs", ["xmlab0/source.jpg", "xmlab1/source.jpg"], tiny_jpeg())  # xmlab2 missing
    assert run(["shards", "build", "slake", "--source", str(slake), "--out", str(tmp_path / "o"),
                "--option", "languages=[en, zh]", "--skip-missing-images", "--quiet"]) == 0
    assert "slake/train: 3 samples" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "o/slake/train/manifest.json").read_text())
    assert manifest["notes"]["skipped_missing_images"] == 1
    assert manifest["notes"]["options"] == {"languages": ["en", "zh"], "on_missing_image": "skip"}
    assert run(["shards", "datasets"]) == 0
    listing = capsys.readouterr().out
    assert "vqa_rad" in listing and "pneumoniamnist" in listing
