"""Every converter on real release files (the subsets in tests/fixtures/data), quirks included, and its
errors on malformed input (each naming the file, the record and the field)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biomedgpt.data.converters import CONVERTERS, SourceFormatError, open_converter
from biomedgpt.data.converters.medmnist import SUBSETS

REQUIRED_FIELDS = ("task", "dataset", "split", "id")


def records(conv, split):
    return [r.record for r in conv.records(split)]


def check_vqa(recs):
    for r in recs:
        assert all(k in r for k in REQUIRED_FIELDS + ("question", "answer", "answer_raw", "answer_type", "organ"))
        assert r["answer_type"] in ("closed", "open")
        assert r["answer"] == r["answer"].strip().lower() and r["answer"]
        assert "\t" not in r["question"] and "  " not in r["question"] and r["question"] == r["question"].strip()


# --- VQA-RAD ----------------------------------------------------------------------------------------


def test_vqa_rad_osf_release(vqa_rad_release: Path):
    conv = open_converter("vqa_rad", str(vqa_rad_release))
    assert conv.layout == "osf" and conv.splits() == ["train", "test"]
    train, test = records(conv, "train"), records(conv, "test")
    assert (len(train), len(test)) == (35, 11)  # freeform+para / test_freeform+test_para
    assert {r["phrase_type"] for r in train} == {"freeform", "para"}
    assert {r["phrase_type"] for r in test} == {"test_freeform", "test_para"}
    check_vqa(train + test)
    by_id = {r["id"]: r for r in train + test}
    assert by_id["0"]["answer"] == "yes" and by_id["0"]["answer_raw"] == "Yes"  # qid "0" is a string in the file
    assert by_id["472"]["answer"] == "skull cartilage and medulla"
    assert by_id["472"]["answer_raw"] == "Skull \tcartilage and medulla"
    assert by_id["2156"]["answer_type"] == "closed"  # "CLOSED " with a trailing space
    assert by_id["1568"]["answer"] == "2" and by_id["1568"]["answer_raw"] == "2"  # stored as a number
    assert by_id["168"]["question"] == "Are the liver splee n stomac h and esophagus all visualized in this image?"
    assert {r["organ"] for r in train} == {"HEAD", "CHEST", "ABD"}
    first = next(conv.records("train"))
    data = first.image.read()
    assert data[:3] == b"\xff\xd8\xff" and len(data) == first.image.size
    assert first.image.url.endswith("VQA_RAD Image Folder/synpic54610.jpg")


def test_vqa_rad_mevf_layout(vqa_rad_release: Path):
    for source, options in ((vqa_rad_release, {"layout": "mevf"}), (vqa_rad_release / "data_RAD", {})):
        conv = open_converter("vqa_rad", str(source), **options)
        assert conv.layout == "mevf"
        train, test = records(conv, "train"), records(conv, "test")
        assert (len(train), len(test)) == (54, 11)
        assert Counter(r["phrase_type"] for r in train)["frame"] == 19
        check_vqa(train + test)
    assert {r["answer"] for r in train if r["id"] in ("2485", "2486")} == {"2"}  # stored as a number


def test_vqa_rad_demo_sample(sample_vqa_rad: Path):
    """The repository's demo sample is read exactly like the release, and stays small."""
    conv = open_converter("vqa_rad", str(sample_vqa_rad))
    train, test = records(conv, "train"), records(conv, "test")
    assert len(train) + len(test) == 335 and len(test) == 69
    images = sorted((sample_vqa_rad / "VQA_RAD Image Folder").iterdir())
    assert len(images) == 40 and sum(p.stat().st_size for p in images) < 2 * 2**20
    per_image = Counter(r["image"] for r in train + test)
    assert min(per_image.values()) >= 5
    assert Counter(r["answer_type"] for r in train + test) == {"closed": 188, "open": 147}
    assert "CC0" in (sample_vqa_rad / "README.md").read_text()


# --- SLAKE -----------------------------------------------------------------------------------------


def test_slake(dev_data: Path, slake_images: Path):
    files = {"train": str(dev_data / "slake/dev.json"), "images": str(slake_images)}
    conv = open_converter("slake", "/nonexistent-root", files)
    assert conv.splits() == ["train"]
    english = records(conv, "train")
    assert len(english) == 107 and {r["language"] for r in english} == {"en"}
    check_vqa(english)
    assert Counter(r["answer_type"] for r in english).keys() == {"open", "closed"}
    assert {r["organ"] for r in english} >= {"Abdomen", "Lung", "Brain_Tissue"}
    first = english[0]
    assert first["answer"] == "mri" and first["answer_raw"] == "MRI" and first["image"] == "xmlab1/source.jpg"
    both = records(open_converter("slake", "/nonexistent-root", files, languages="all"), "train")
    assert len(both) == 213


def test_slake_native_layout(dev_data: Path, slake_images: Path, tmp_path: Path):
    """train/validate/test files: validate becomes val (and is reported as the native name)."""
    data = json.loads((dev_data / "slake/dev.json").read_text(encoding="utf-8"))
    root = tmp_path / "Slake1.0"
    root.mkdir()
    for name, part in (("train.json", data[:130]), ("validate.json", data[130:170]), ("test.json", data[170:])):
        (root / name).write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    (root / "imgs").symlink_to(slake_images)
    conv = open_converter("slake", str(root))
    assert conv.splits() == ["train", "val", "test"] and conv.native_split("val") == "validate"
    assert sum(len(records(conv, s)) for s in conv.splits()) == 107


# --- PathVQA ---------------------------------------------------------------------------------------


def test_pathvqa(dev_data: Path, pathvqa_images: Path):
    files = {"train": str(dev_data / "pathvqa/dev.json"), "images": str(pathvqa_images)}
    conv = open_converter("pathvqa", "/nonexistent-root", files)
    assert conv.splits() == ["train", "val", "test"]  # from the img_id prefixes of one merged file
    recs = {s: records(conv, s) for s in conv.splits()}
    assert {s: len(r) for s, r in recs.items()} == {"train": 31, "val": 31, "test": 16}
    all_recs = [r for rs in recs.values() for r in rs]
    check_vqa(all_recs)
    for split, rs in recs.items():
        assert all(r["img_id"].startswith(f"{split}_") and r["split"] == split for r in rs)
    for r in all_recs:
        assert (r["answer_type"] == "closed") == (r["answer"] in ("yes", "no"))
    answers = {r["answer_raw"]: r["answer"] for r in all_recs}
    assert answers["Cardiovascular"] == answers["cardiovascular"] == "cardiovascular"
    assert answers["collection of proliferating foam macrophages "] == "collection of proliferating foam macrophages"
    q = next(r for r in all_recs if r["id"] == "train_0001_q9")
    assert q["question"] == "What is the appearance of the chromatin texture, with fine and coarse clumps?"
    assert q["answer"] == "a salt-and-pepper pattern"


# --- IU X-ray --------------------------------------------------------------------------------------


def test_iu_xray(dev_data: Path, iu_xray_images: Path):
    files = {"annotation": str(dev_data / "iu_xray/dev.json"), "images": str(iu_xray_images)}
    conv = open_converter("iu_xray", "/nonexistent-root", files)
    assert conv.splits() == ["train", "val", "test"]
    recs = {s: records(conv, s) for s in conv.splits()}
    assert {s: len(r) for s, r in recs.items()} == {"train": 60, "val": 20, "test": 20}
    r = recs["train"][0]
    assert r["id"] == "CXR1451_IM-0291" and r["image"] == "CXR1451_IM-0291/0.png" and r["task"] == "caption"
    assert r["caption"].startswith("Left lower lobe calcified granuloma.")
    assert all("  " not in x["caption"] for rs in recs.values() for x in rs)
    every_view = open_converter("iu_xray", "/nonexistent-root", files, views="all")
    assert len(records(every_view, "val")) == 2 * 20


# --- ROCO ------------------------------------------------------------------------------------------


def test_roco(dev_data: Path, roco_images: Path):
    files = {"val": str(dev_data / "roco/dev_captions.txt"), "val_images": str(roco_images)}
    conv = open_converter("roco", "/nonexistent-root", files)
    assert conv.splits() == ["val"] and conv.native_split("val") == "validation"
    recs = records(conv, "val")
    assert len(recs) == 150
    assert recs[0]["id"] == "ROCO_00020" and recs[0]["caption"].startswith("Axial computed tomography")
    assert all(r["caption"] == r["caption"].strip() for r in recs)
    assert any("\u00d7" in r["caption"] for r in recs)  # non-ASCII typography kept


# --- MedMNIST --------------------------------------------------------------------------------------


def test_medmnist_pneumonia(dev_data: Path):
    conv = open_converter("pneumoniamnist", str(dev_data / "medmnist"), {"npz": "dev.npz"})
    assert conv.splits() == ["train", "val", "test"]
    counts = {s: len(records(conv, s)) for s in conv.splits()}
    assert counts == {"train": 60, "val": 50, "test": 40}
    info = json.loads((dev_data / "medmnist/info.json").read_text())["pneumoniamnist"]["label"]
    arrays = np.load(dev_data / "medmnist/dev.npz")
    for i, source_record in zip(range(20), conv.records("test")):
        r = source_record.record
        assert r["label"] == int(arrays["test_labels"][i][0]) and r["label_name"] == info[str(r["label"])]
        png = source_record.image.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png))
        assert image.mode == "L" and np.array_equal(np.asarray(image), arrays["test_images"][i])  # lossless


def test_medmnist_label_names_for_every_2d_subset():
    assert len(SUBSETS) == 12
    for name, subset in SUBSETS.items():
        assert name in CONVERTERS and CONVERTERS[name].subset == name
        assert len(subset.labels) == len(set(subset.labels)) >= 2
    assert SUBSETS["pathmnist"].labels[8] == "colorectal adenocarcinoma epithelium"
    assert len(SUBSETS["chestmnist"].labels) == 14 and SUBSETS["chestmnist"].multi_label


def test_medmnist_multilabel_and_rgb(tmp_path: Path):
    rng = np.random.default_rng(0)
    labels = np.zeros((3, 14), dtype=np.uint8)
    labels[1, [0, 13]] = 1
    np.savez(tmp_path / "chestmnist.npz", train_images=rng.integers(0, 255, (3, 28, 28), dtype=np.uint8),
             train_labels=labels)
    recs = records(open_converter("chestmnist", str(tmp_path)), "train")
    assert recs[0]["label"] == [] and recs[1]["label"] == [0, 13]
    assert recs[1]["label_name"] == ["atelectasis", "hernia"]
    rgb = rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "bloodmnist_64.npz", test_images=rgb, test_labels=np.array([[3], [7]], dtype=np.uint8))
    conv = open_converter("bloodmnist", str(tmp_path))
    assert conv.files["npz"] == "bloodmnist_64.npz"
    first = next(conv.records("test"))
    assert first.record["label_name"].startswith("immature granulocytes")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first.image.read()))), rgb[0])


# --- malformed input ----------------------------------------------------------------------------------


def write_vqa_rad(root: Path, records_: list, images=("synpic1.jpg",)) -> Path:
    from data_testing import tiny_jpeg, write_images

    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records_))
    write_images(root / "VQA_RAD Image Folder", images, tiny_jpeg())
    return root


def vqa_rad_record(**overrides):
    record = {"qid": 7, "phrase_type": "freeform", "image_name": "synpic1.jpg", "image_organ": "HEAD",
              "question": "Is this normal?", "answer": "Yes", "answer_type": "CLOSED", "question_type": "ABN"}
    record.update(overrides)
    return record


def defects(conv, split: str) -> list[str]:
    """What the converter says about the records of `split` it skipped."""
    return [d.describe() for d in conv.defects_of(split)]


@pytest.mark.parametrize("overrides, field, message", [
    ({"answer_type": "MAYBE"}, "answer_type", "expected CLOSED or OPEN"),
    ({"phrase_type": "validation"}, "phrase_type", "expected one of"),
    ({"answer": None}, "answer", "expected str or int or float"),
    ({"question": "  "}, "question", "empty question"),
    ({"answer": " "}, "answer", "empty answer"),
])
def test_vqa_rad_malformed_record_is_skipped_and_named(tmp_path: Path, overrides, field, message):
    root = write_vqa_rad(tmp_path, [vqa_rad_record(qid=1), vqa_rad_record(**overrides)])
    conv = open_converter("vqa_rad", str(root))
    assert [r["id"] for r in records(conv, "train")] == ["1"]
    (defect,) = conv.defects_of("train")
    assert defect.file.endswith("VQA_RAD Dataset Public.json") and defect.index == 1 and defect.id == "7"
    assert defect.field == field and message in defect.reason
    assert defect.describe().endswith(f"VQA_RAD Dataset Public.json: record 1 (qid 7): field '{field}': {defect.reason}")


def test_vqa_rad_missing_field_duplicate_and_bad_json(tmp_path: Path):
    bad = vqa_rad_record()
    del bad["question"]
    root = write_vqa_rad(tmp_path, [bad])
    conv = open_converter("vqa_rad", str(root))
    assert conv.splits() == [] and defects(conv, "train")[0].endswith("record 0 (qid 7): field 'question': missing")
    root = write_vqa_rad(tmp_path, [vqa_rad_record(), vqa_rad_record()])
    conv = open_converter("vqa_rad", str(root))
    assert len(records(conv, "train")) == 1 and "duplicate qid (also record 0)" in defects(conv, "train")[0]
    # a file that cannot be read at all is not a record's defect: it stops the converter
    (root / "VQA_RAD Dataset Public.json").write_text('[{"qid": 1,\n "answer": }]')
    with pytest.raises(SourceFormatError, match=r"Public\.json: invalid JSON at line 2 column"):
        open_converter("vqa_rad", str(root)).splits()


def test_missing_images_are_defects_or_skipped_on_purpose(tmp_path: Path):
    root = write_vqa_rad(tmp_path, [vqa_rad_record(qid=1), vqa_rad_record(qid=2, image_name="synpic404.jpg")])
    conv = open_converter("vqa_rad", str(root))
    assert [r["id"] for r in records(conv, "train")] == ["1"]
    assert defects(conv, "train") == [f"{root / 'VQA_RAD Dataset Public.json'}: record 1 (qid 2): field 'image_name': "
                                      "image 'synpic404.jpg' not found (use on_missing_image='skip' to drop such records)"]
    conv = open_converter("vqa_rad", str(root), on_missing_image="skip")
    assert [r["id"] for r in records(conv, "train")] == ["1"] and conv.skipped == {"train": ["synpic404.jpg"]}
    assert conv.defects_of("train") == []


def test_no_release_found(tmp_path: Path):
    with pytest.raises(SourceFormatError, match="no VQA-RAD release found"):
        open_converter("vqa_rad", str(tmp_path)).splits()
    with pytest.raises(SourceFormatError, match="no SLAKE split files found"):
        open_converter("slake", str(tmp_path)).splits()


def test_other_malformed_sources(tmp_path: Path):
    (tmp_path / "test.json").write_text(json.dumps([{"qid": 1, "q_lang": "fr"}]))
    conv = open_converter("slake", str(tmp_path))
    assert records(conv, "test") == []
    assert re.search(r"test\.json: record 0 \(qid 1\): field 'q_lang': expected one of", defects(conv, "test")[0])

    (tmp_path / "pvqa_val.json").write_text(json.dumps(
        [{"img_id": "val_0001", "sentf": {"pvqa": ["Is it?", "What?"]}, "labelf": {"pvqa": [{"yes": 1}]}}]))
    conv = open_converter("pathvqa", str(tmp_path))
    assert records(conv, "val") == []
    assert re.search(r"pvqa_val\.json: record 0 \(val_0001\): field 'labelf': 2 questions", defects(conv, "val")[0])

    (tmp_path / "annotation.json").write_text(json.dumps({"train": [], "    ": []}))
    with pytest.raises(SourceFormatError, match=r"annotation\.json: field ''    '': unknown split key"):
        open_converter("iu_xray", str(tmp_path)).splits()
    (tmp_path / "annotation.json").write_text(json.dumps({"test": [{"id": "CXR1", "image_path": ["CXR1/0.png"]}]}))
    conv = open_converter("iu_xray", str(tmp_path))
    assert records(conv, "test") == [] and re.search(r"test\[0\] \(CXR1\): field 'report': missing", defects(conv, "test")[0])

    captions = tmp_path / "data/test/radiology/captions.txt"
    captions.parent.mkdir(parents=True)
    captions.write_text("ROCO_00001\t fine caption\nROCO_00002 no tab here\n")
    conv = open_converter("roco", str(tmp_path), on_missing_image="skip")
    assert records(conv, "test") == [] and conv.skipped == {"test": ["ROCO_00001.jpg"]}
    assert re.search(r"captions\.txt: line 2: expected 'ROCO_<n><TAB>caption'", defects(conv, "test")[0])

    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8),
             train_labels=np.array([[0], [5]], np.uint8))
    conv = open_converter("breastmnist", str(tmp_path))
    assert [r["id"] for r in records(conv, "train")] == ["train_000000"]
    assert re.search(r"breastmnist\.npz: record 1: field 'train_labels\[1\]': label 5 outside 0\.\.1",
                     defects(conv, "train")[0])
    (tmp_path / "info.json").write_text(json.dumps({"breastmnist": {"label": {"0": "benign", "1": "malignant"}}}))
    with pytest.raises(SourceFormatError, match=r"info\.json: field 'breastmnist\.label\.0'"):
        open_converter("breastmnist", str(tmp_path)).splits()


def test_registry_errors(tmp_path: Path):
    with pytest.raises(KeyError, match="no converter for dataset 'mimic_cxr_lt'; known: .*vqa_rad"):
        open_converter("mimic_cxr_lt", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown file role\(s\) \['questions'\]"):
        open_converter("slake", str(tmp_path), {"questions": "q.json"})
    with pytest.raises(ValueError, match="slake: .*unexpected keyword argument 'language'"):
        open_converter("slake", str(tmp_path), language="en")
