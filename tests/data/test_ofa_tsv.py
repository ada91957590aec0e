"""The official BiomedGPT / OFA TSV files: written here from real release files (tests/fixtures/data) exactly as the
official preprocessing scripts lay them out, then converted; images come back byte for byte."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_testing import skipped, tiny_jpeg, tiny_png
from PIL import Image

from biomedgpt.data.build import build_shards
from biomedgpt.data.converters import SourceFormatError, open_converter


def b64(data: bytes, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode("ascii")


@pytest.fixture(scope="module")
def vqa_rad_tsv(vqa_rad_release: Path, tmp_path_factory) -> Path:
    """test.tsv as BiomedGPT's scripts/preprocess/finetuning/vqa_rad.py writes it from data_RAD:
    qid, image id, question, 1|!+answer, organ, base64 image."""
    root = vqa_rad_release / "data_RAD"
    out = tmp_path_factory.mktemp("ofa-vqa") / "test.tsv"
    lines = []
    for item in json.loads((root / "testset.json").read_text()):
        image = (root / "images" / item["image_name"]).read_bytes()
        answer = str(item["answer"]).replace("\t", "").lower().strip()
        lines.append("\t".join([str(item["qid"]), item["image_name"][:-4], item["question"].replace("\t", "").lower().strip(),
                                f"1|!+{answer}", item["image_organ"].lower(), b64(image)]))
    out.write_text("\n".join(lines) + "\n")
    return out


def test_vqa_tsv_from_real_vqa_rad(vqa_rad_release: Path, vqa_rad_tsv: Path, tmp_path: Path):
    conv = open_converter("vqa_rad", str(vqa_rad_tsv.parent), converter="ofa_tsv_vqa")
    assert conv.splits() == ["test"] and conv.files["test"] == "test.tsv"  # found by name
    recs = list(conv.records("test"))
    assert len(recs) == 11
    first = recs[0].record
    assert first["dataset"] == "vqa_rad" and first["task"] == "vqa" and first["answers"] == {first["answer"]: 1.0}
    assert first["organ"] in ("head", "chest", "abd") and first["answer_type"] in ("closed", "open")
    source = vqa_rad_release / "data_RAD/images" / f"{first['image_id']}.jpg"
    assert recs[0].image.read() == source.read_bytes() and recs[0].image.size == source.stat().st_size

    result = build_shards("vqa_rad", str(vqa_rad_tsv.parent), str(tmp_path), converter="ofa_tsv_vqa",
                          shard_max_samples=8, progress=False)
    assert result["test"].samples == 11 and len(result["test"].shards) == 2
    assert result["test"].notes["converter"] == "ofa_tsv_vqa"
    with tarfile.open(tmp_path / "vqa_rad/test/vqa_rad-test-000000.tar") as tar:
        names = tar.getnames()
        assert names[1].endswith(".jpg") and tar.extractfile(names[1]).read() == source.read_bytes()


def test_classify_tsv_from_real_medmnist(dev_data: Path, tmp_path: Path):
    """<subset>_val.tsv as BiomedGPT's medmnist.py writes it: base64 PNG, label index, label name."""
    arrays = np.load(dev_data / "medmnist/dev.npz")
    info = json.loads((dev_data / "medmnist/info.json").read_text())["pneumoniamnist"]["label"]
    lines = []
    for image, label in zip(arrays["val_images"][:30], arrays["val_labels"][:30]):
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="PNG")
        lines.append(f"{b64(buf.getvalue(), urlsafe=True)}\t{int(label[0])}\t{info[str(int(label[0]))]}")
    (tmp_path / "pneumoniamnist_val.tsv").write_text("\n".join(lines) + "\n")
    recs = list(open_converter("pneumoniamnist", str(tmp_path), converter="ofa_tsv_classify").records("val"))
    assert len(recs) == 30 and recs[0].id == "val_000000"
    assert [r.record["label"] for r in recs] == [int(x[0]) for x in arrays["val_labels"][:30]]
    assert recs[0].record["label_name"] == info[str(recs[0].record["label"])]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(recs[0].image.read())))[:, :, 0], arrays["val_images"][0])


def test_caption_nli_summarize_text_tsv(tmp_path: Path):
    jpg = tiny_jpeg(30)
    (tmp_path / "peir_gross_train.tsv").write_text(
        f"3_1\tPEIR_1\tliver: cirrhosis\t\t{b64(jpg)}\n3_2\tPEIR_2\tkidney:  infarct&&renal infarct\t\t{b64(jpg)}\r\n\n")
    recs = [r.record for r in open_converter("peir_gross", str(tmp_path), converter="ofa_tsv_caption").records("train")]
    assert [r["caption"] for r in recs] == ["liver: cirrhosis", "kidney: infarct"]
    assert recs[1]["captions"] == ["kidney: infarct", "renal infarct"] and recs[0]["image_id"] == "PEIR_1"

    nli = tmp_path / "nli"
    nli.mkdir()
    (nli / "mednli_train.tsv").write_text("He has a fever.\tHe is febrile.\t1\tclinical:He has a fever.\n"
                                          "No pain.\tShe has pain.\t2\tclinical:No pain.\nA\tB\t0\tclinical:A\n")
    recs = [r.record for r in open_converter("mednli", str(nli), converter="ofa_tsv_nli").records("train")]
    assert [r["label"] for r in recs] == ["yes", "no", "maybe"] and recs[0]["premise"] == "He has a fever."

    summ = tmp_path / "summ"
    summ.mkdir()
    (summ / "val.tsv").write_text("SUBJECT: Kidney Stone. MESSAGE: what can i do?\tWhat are the treatments for kidney stones?\n")
    rec = next(open_converter("meqsum", str(summ), converter="ofa_tsv_summarize").records("val")).record
    assert rec["text"].startswith("SUBJECT: Kidney") and rec["summary"].endswith("kidney stones?")

    text = tmp_path / "text"
    text.mkdir()
    (text / "text_train.tsv").write_text("1\tthe liver is enlarged .\n2\tno acute findings .\n")
    recs = [r.record for r in open_converter("pubmed_abstracts", str(text), converter="ofa_tsv_text").records("train")]
    assert [r["id"] for r in recs] == ["1", "2"] and recs[1]["text"] == "no acute findings ." and recs[0]["task"] == "text"


def test_image_and_detection_tsv(tmp_path: Path):
    png = tiny_png(9, size=20)
    (tmp_path / "image_train.tsv").write_text(f"1_1\t{b64(png)}\t{' '.join(str(i) for i in range(256))}\n")
    rec = next(open_converter("chexpert_small", str(tmp_path), converter="ofa_tsv_image").records("train"))
    assert rec.record["codes"] == list(range(256)) and rec.image.read() == png
    (tmp_path / "detection_train.tsv").write_text(f"4_1\t{b64(png)}\t2,4,12,10,5,lung&&0,0,30,20,4,liver\n")
    rec = next(open_converter("deeplesion", str(tmp_path), {"train": "detection_train.tsv"},
                               converter="ofa_tsv_detection").records("train")).record
    assert rec["labels"] == ["lung", "liver"] and (rec["width"], rec["height"]) == (20, 20)
    assert rec["boxes"] == [[0.1, 0.2, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]]  # normalised, clipped to the image


def test_tsv_errors_name_file_line_and_field(tmp_path: Path):
    (tmp_path / "train.tsv").write_text(f"1\timg\tis it?\tsure|!+yes\torgan\t{b64(tiny_jpeg())}\n")
    assert re.search(r"train\.tsv: line 1: field 'answer': expected '<confidence>\|!\+<answer>'",
                     skipped(open_converter("x", str(tmp_path), converter="ofa_tsv_vqa"), "train"))
    (tmp_path / "train.tsv").write_text("1\timg\tis it?\n")
    assert re.search(r"train\.tsv: line 1: 3 tab-separated columns, expected at least 6",
                     skipped(open_converter("x", str(tmp_path), converter="ofa_tsv_vqa"), "train"))
    (tmp_path / "train.tsv").write_text("1\timg\tis it?\t1.0|!+yes\t\t%%%notbase64\n")
    rec = next(open_converter("x", str(tmp_path), converter="ofa_tsv_vqa").records("train"))
    with pytest.raises(SourceFormatError, match="image column is not valid base64"):
        rec.image.read()
    with pytest.raises(ValueError, match=r"ofa_tsv_vqa: columns \['question', 'image'\]: .*required \['question', 'answer', 'image'\]"):
        open_converter("x", str(tmp_path), converter="ofa_tsv_vqa", columns=["question", "image"])
    (tmp_path / "val.tsv").write_text("")
    (tmp_path / "dev.tsv").write_text("")
    with pytest.raises(SourceFormatError, match=r"several val files \['dev.tsv', 'val.tsv'\]"):
        open_converter("x", str(tmp_path), converter="ofa_tsv_vqa")


def test_cli_reads_the_official_tsv_of_a_dataset_with_a_spec(vqa_rad_tsv: Path, tmp_path: Path, capsys, monkeypatch):
    """`--converter ofa_tsv_vqa` with datasets_spec/vqa_rad.yaml present: the spec's licence and access
    apply, its converter options (layout: auto) do not."""
    import argparse

    from biomedgpt.cli.shards import add_shards_commands

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    parser = argparse.ArgumentParser(prog="biomedgpt")
    add_shards_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shards", "build", "vqa_rad", "--source", str(vqa_rad_tsv.parent), "--out", str(tmp_path),
                              "--converter", "ofa_tsv_vqa", "--quiet"])
    assert args.func(args) == 0
    assert "vqa_rad/test: 11 samples, 1 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "vqa_rad/test/manifest.json").read_text())
    assert manifest["licence"] == "CC0 1.0" and manifest["access"] == "open" and manifest["notes"]["converter"] == "ofa_tsv_vqa"


def test_pretraining_vision_language_tsv(tmp_path: Path):
    """vision_language.tsv as BiomedGPT's pretraining scripts write it (MedICaT captions, PathVQA QA)."""
    image = b64(tiny_jpeg(77))
    (tmp_path / "vision_language.tsv").write_text(
        f"7_1\t{image}\tCT of the abdomen shows a mass.\t\t\t\tmedicat\tcaption\n"
        f"train_0001\t{image}\t\tWhat is present?\t1|!+fibrosis\t\tpathvqa\tqa\n"
        f"9_1\t{image}\ta lesion\t\t0.1,0.2,0.5,0.6\t\tdeeplesion\tvisual_grounding\n")
    files = {"train": "vision_language.tsv"}
    captions = open_converter("medicat", str(tmp_path), files, converter="ofa_tsv_pretrain_caption")
    recs = [r.record for r in captions.records("train")]
    assert [(r["id"], r["caption"], r["source_dataset"]) for r in recs] == [("7_1", "CT of the abdomen shows a mass.", "medicat")]
    assert captions.dropped == {"train": {"type_qa": 1, "type_visual_grounding": 1}}
    vqa = [r.record for r in open_converter("pathvqa", str(tmp_path), files, converter="ofa_tsv_pretrain_vqa").records("train")]
    assert [(r["question"], r["answer"], r["answer_type"]) for r in vqa] == [("What is present?", "fibrosis", "open")]
