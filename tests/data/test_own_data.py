"""A department's own data: manifests (CSV, TSV, JSONL) naming images (or DICOM files, or none) and a task's
fields, through the `manifest_<task>` converters, their dataset-spec section and `biomedgpt datasets new`;
defective rows are skipped and named, image paths may not leave the manifest's folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from biomedgpt.data.build import build_shards
from biomedgpt.data.converters import open_converter
from biomedgpt.data.dataset_spec import DatasetSpecError, load_dataset_spec, parse_dataset_spec
from biomedgpt.data.own_data import CannotInfer, new_dataset_spec
from biomedgpt.data.plan import BadRecordsError
from data_testing import skipped, tiny_jpeg, tiny_png, write_dicom


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def images(folder: Path, names, data: bytes = b"") -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data or tiny_jpeg(60))


def records(conv, split: str) -> list[dict]:
    return [r.record for r in conv.records(split)]


def shard_samples(tar_path: Path) -> dict[str, dict]:
    """key -> {ext: bytes} of one shard."""
    out: dict[str, dict] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


# --- the converters --------------------------------------------------------------------------------------


@pytest.fixture()
def vqa_folder(tmp_path: Path) -> Path:
    """A folder of images + qa.csv with a split column, and every kind of defect a real one has."""
    root = tmp_path / "chest"
    images(root, [f"img/{i}.jpg" for i in range(6)])
    (tmp_path / "outside.jpg").write_bytes(tiny_jpeg(9))
    (root / "img/link.jpg").symlink_to(tmp_path / "outside.jpg")   # a link out of the folder
    (root / "img/inside.jpg").symlink_to(root / "img/0.jpg")       # a link inside it is fine
    write(root / "qa.csv", "\n".join([
        "case,image_path,Question,Finding,split",
        "c0,img/0.jpg,Is there a mass?,Yes,train",
        "c1,img/1.jpg,where is the mass,left lung,train",
        "c2,img/2.jpg,is it normal,no,Training",
        "c3,img/3.jpg,what organ,CHEST,val",
        "c4,img/4.jpg,is there fluid,yes,test",
        "c5,img/5.jpg,where,right,TEST",
        "c6,img/inside.jpg,again,yes,train",
        "c7,../outside.jpg,escape,yes,train",             # '..'
        f"c8,{tmp_path / 'outside.jpg'},absolute,yes,train",  # absolute path
        "c9,img/link.jpg,linked out,yes,train",           # symlink out
        "c10,img/missing.jpg,missing,yes,train",          # missing image
        "c11,img/1.jpg,empty answer,,train",              # empty answer
        "c1,img/1.jpg,duplicate id,no,train",             # duplicate id
        "c12,img/1.jpg,bad split,no,holdout",             # unknown split
        "c13,img/1.jpg,too,many,columns,train",           # unreadable row
    ]) + "\n")
    return root


VQA_COLUMNS = {"id": "case", "image": "image_path", "question": "Question", "answer": "Finding"}


def test_vqa_from_a_folder_and_csv_names_every_defect(vqa_folder: Path):
    conv = open_converter("chest_qa", str(vqa_folder), converter="manifest_vqa", manifest="qa.csv",
                          columns=VQA_COLUMNS, split_column="split")
    assert conv.splits() == ["train", "val", "test"] and conv.dataset == "chest_qa"
    train = records(conv, "train")
    assert [r["id"] for r in train] == ["c0", "c1", "c2", "c6"]
    assert train[0] == {"task": "vqa", "dataset": "chest_qa", "split": "train", "id": "c0",
                        "question": "Is there a mass?", "answer": "yes", "answer_raw": "Yes", "answer_type": "closed",
                        "image": "img/0.jpg"}
    assert train[1]["answer_type"] == "open"  # no answer-type column: yes/no closed, the rest open
    assert [r["id"] for r in records(conv, "val")] == ["c3"] and [r["id"] for r in records(conv, "test")] == ["c4", "c5"]
    text = skipped(conv)
    for expected in ["line 9: field 'image_path': image path '../outside.jpg': '..' is refused",
                     "line 10: field 'image_path': image path '/", "absolute paths and URLs are refused",
                     "line 11: field 'image_path': image path 'img/link.jpg': a symbolic link out of the manifest's "
                     "folder is refused",
                     "line 12: field 'image_path': image 'img/missing.jpg' not found",
                     "line 13: field 'Finding': empty",
                     "line 14: field 'case': duplicate id 'c1' (also line 3)",
                     "line 15: field 'split': unknown split 'holdout'",
                     "line 16: 6 columns, expected 5"]:
        assert expected in text, (expected, text)
    assert len(text.splitlines()) == 8


def test_vqa_build_skips_within_the_budget_and_fails_beyond(vqa_folder: Path, tmp_path: Path):
    options = dict(manifest="qa.csv", columns=VQA_COLUMNS, split_column="split")
    with pytest.raises(BadRecordsError, match=r"chest_qa/train: .* source records cannot be used"):
        build_shards("chest_qa", str(vqa_folder), str(tmp_path / "out"), converter="manifest_vqa", options=options,
                     progress=False)
    result = build_shards("chest_qa", str(vqa_folder), str(tmp_path / "out"), converter="manifest_vqa",
                          options=options, progress=False, max_bad_fraction=0.9, licence="internal",
                          access="credentialed")
    assert {s: m.samples for s, m in result.items()} == {"train": 4, "val": 1, "test": 2}
    manifest = result["train"]
    assert manifest.licence == "internal" and manifest.notes["converter"] == "manifest_vqa"
    assert manifest.notes["defects"]["count"] == 8
    samples = shard_samples(tmp_path / "out/chest_qa/train/chest_qa-train-000000.tar")
    assert all(set(s) == {"json", "jpg"} for s in samples.values())
    assert samples["chest_qa-c0"]["jpg"] == (vqa_folder / "img/0.jpg").read_bytes()  # JPEG kept byte for byte


def test_caption_from_jsonl_split_by_a_seeded_ratio(tmp_path: Path):
    root = tmp_path / "reports"
    names = [f"studies/s{i // 2}.png" for i in range(40)]  # two reports per image
    images(root, sorted(set(names)), tiny_png(5))
    lines = [json.dumps({"image": n, "report": f"finding number {i}."}) for i, n in enumerate(names)]
    lines[3] = "{not json"
    lines[5] = json.dumps({"image": names[5], "report": "  "})
    write(root / "reports.jsonl", "\n".join(lines) + "\n")
    opts = dict(manifest="reports.jsonl", columns={"image": "image", "caption": "report"},
                split_ratio={"train": 0.6, "val": 0.2, "test": 0.2})
    conv = open_converter("reports", str(root), converter="manifest_caption", seed=7, **opts)
    by_split = {s: records(conv, s) for s in conv.splits()}
    assert set(by_split) == {"train", "val", "test"}
    assert sum(map(len, by_split.values())) == 38
    first = by_split["train"][0]
    assert set(first) == {"task", "dataset", "split", "id", "caption", "image"} and first["id"].startswith("reports-")
    # every report of one image lands in one split (the image is the split's group)
    split_of = {}
    for split, recs in by_split.items():
        for r in recs:
            assert split_of.setdefault(r["image"], split) == split
    # deterministic, stable when rows move, and the seed moves it
    again = open_converter("reports", str(root), converter="manifest_caption", seed=7, **opts)
    assert {s: records(again, s) for s in again.splits()} == by_split
    write(root / "reports.jsonl", "\n".join(reversed(lines)) + "\n")
    moved = open_converter("reports", str(root), converter="manifest_caption", seed=7, **opts)
    assert {s: sorted(r["id"] for r in records(moved, s)) for s in moved.splits()} == \
        {s: sorted(r["id"] for r in recs) for s, recs in by_split.items()}
    other = open_converter("reports", str(root), converter="manifest_caption", seed=8, **opts)
    assert {r["id"] for r in records(other, "train")} != {r["id"] for r in by_split["train"]}
    text = skipped(conv)
    assert "reports.jsonl: line 4: invalid JSON" in text and "line 6: field 'report': empty" in text


def test_multi_label_classification_from_tsv(tmp_path: Path):
    root = tmp_path / "derm"
    images(root, [f"{i}.png" for i in range(5)], tiny_png(80))
    write(root / "labels.tsv", "\n".join([
        "file\tfindings\tsplit",
        "0.png\tnevus|melanoma\ttrain",
        "1.png\tmelanoma\ttrain",
        "2.png\t\ttrain",                    # no finding
        "3.png\tkeratosis| nevus |nevus\ttest",
        "4.png\tnevus\tnowhere",             # unknown split
    ]) + "\n")
    conv = open_converter("derm", str(root), converter="manifest_classify", manifest="labels.tsv",
                          columns={"image": "file", "labels": "findings"}, split_column="split")
    assert conv.classes == ["keratosis", "melanoma", "nevus"]
    train = records(conv, "train")
    assert [(r["label"], r["label_name"]) for r in train] == [([1, 2], ["melanoma", "nevus"]), ([1], ["melanoma"]),
                                                              ([], [])]
    assert records(conv, "test")[0]["label_name"] == ["keratosis", "nevus"]
    assert "line 6: field 'split': unknown split 'nowhere'" in skipped(conv)
    # the classification task reads them as multi-label records
    from biomedgpt.tasks import get_task

    ex = get_task("classify").example(train[0])
    assert ex.target == " melanoma, nevus"


def test_single_label_and_text_only_tasks(tmp_path: Path):
    root = tmp_path / "text"
    write(root / "nli.jsonl", "\n".join(json.dumps(r) for r in [
        {"p": "the patient has a fever", "h": "the patient is ill", "gold": "entailment", "s": "train"},
        {"p": "no fever", "h": "fever", "gold": "contradiction", "s": "test"},
        {"p": "", "h": "x", "gold": "neutral", "s": "train"},
    ]) + "\n")
    conv = open_converter("ward_nli", str(root), converter="manifest_nli", manifest="nli.jsonl",
                          columns={"premise": "p", "hypothesis": "h", "label": "gold"}, split_column="s")
    assert records(conv, "train")[0]["label"] == "entailment" and records(conv, "train")[0].get("image") is None
    assert "line 3: field 'p': empty" in skipped(conv)
    write(root / "notes.csv", "note,summary\na long note about the patient,short\n")
    conv = open_converter("notes", str(root), converter="manifest_summarize", manifest="notes.csv",
                          columns={"text": "note", "summary": "summary"}, split_ratio={"train": 1.0})
    assert records(conv, "train")[0]["summary"] == "short"
    write(root / "cls.csv", "x,y\nimg,cancer\n")
    conv = open_converter("cls", str(root), converter="manifest_classify", manifest="cls.csv",
                          columns={"text": "x", "label": "y"}, split_ratio={"train": 1.0})
    assert records(conv, "train")[0] | {"id": None} == {"task": "classify", "dataset": "cls", "split": "train", "id": None,
                                                        "label": 0, "label_name": "cancer", "text": "img"}


def test_dicom_rows_become_png_and_bad_dicoms_are_defects(tmp_path: Path, caplog):
    root = tmp_path / "ct"
    ct = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    write_dicom(root / "studies/a.dcm", ct)
    write_dicom(root / "studies/b", ct, uid_suffix=2)   # no extension: told by the DICOM preamble
    (root / "studies/c.dcm").write_bytes(b"not a dicom" * 30)
    write(root / "m.csv", "dicom,question,answer,split\nstudies/a.dcm,is it ct,yes,train\nstudies/b,is it ct,no,train\n"
                          "studies/c.dcm,broken,yes,train\n")
    result = build_shards("ct", str(root), str(tmp_path / "out"), converter="manifest_vqa",
                          options=dict(manifest="m.csv", columns={"image": "dicom", "question": "question",
                                                                  "answer": "answer"}, split_column="split"),
                          progress=False, max_bad_fraction=0.5)
    manifest = result["train"]
    assert manifest.samples == 2
    defect, = manifest.notes["defects"]["skipped"]
    assert defect["file"].endswith("studies/c.dcm") and "DICOM" in defect["reason"]
    samples = shard_samples(next((tmp_path / "out/ct/train").glob("*.tar")))
    pngs = [s["png"] for s in samples.values()]
    assert len(pngs) == 2
    assert np.asarray(Image.open(io.BytesIO(pngs[0]))).tolist() == [[0, 85], [170, 255]]  # min..max to 8 bits


# --- the dataset spec's manifest section ---------------------------------------------------------------


def spec_data(**manifest) -> dict:
    section = {"file": "qa.csv", "columns": dict(VQA_COLUMNS), "split": {"column": "split"}, **manifest}
    return {
        "name": "chest_qa", "task": "vqa", "stages": ["finetune"], "description": "own data",
        "source": {"format": "CSV", "converter": "manifest_vqa", "obtain": "local", "manifest": section},
        "citation": "unpublished", "licence": "internal", "access": "credentialed",
        "splits": {"train": {"native": "x"}, "test": {"native": "y", "role": "evaluate"}},
        "prompt": {"instruction": " {question}?", "target": " {answer}"}, "metrics": ["vqa_accuracy"],
        "answer_candidates": {"policy": "answers_of_splits", "splits": ["train"]},
    }


@pytest.mark.parametrize("changes, message", [
    ({"columns": {"question": "Q", "answr": "A", "image": "i"}},
     "field 'source.manifest.columns.answr': not a field of vqa records"),
    ({"columns": {"question": "Q", "image": "i"}}, "field 'source.manifest.columns.answer': missing"),
    ({"columns": {"question": "Q", "answer": "A"}}, "field 'source.manifest.columns.image': missing"),
    ({"split": {"column": "s", "ratio": {"train": 1.0}}}, "field 'source.manifest.split': give a split column or"),
    ({"split": {"ratio": {"train": 0.5, "test": 0.4}}}, "field 'source.manifest.split.ratio': the shares must add up"),
    ({"split": {"ratio": {"train": 0.5, "dev": 0.5}}}, "field 'source.manifest.split.ratio.dev': split names are"),
    ({"split": {"ratio": {"train": 1.0}}}, "field 'source.manifest.split.ratio': splits ['train'] but the spec's"),
    ({"file": "../qa.csv"}, "field 'source.manifest.file': '../qa.csv' may not leave the source folder"),
    ({"file": "qa.xlsx"}, "field 'source.manifest.file': 'qa.xlsx' is not a .csv"),
    ({"colums": {}}, "field 'source.manifest.colums': unknown key"),
    ({"window": "bright"}, "field 'source.manifest.window': auto, minmax or [center, width >= 1]"),
])
def test_manifest_section_errors_name_the_field(changes, message):
    with pytest.raises(DatasetSpecError) as err:
        parse_dataset_spec(spec_data(**changes), "chest_qa.yaml")
    assert message in str(err.value), str(err.value)


def test_manifest_section_goes_with_a_manifest_converter():
    data = spec_data()
    del data["source"]["manifest"]
    with pytest.raises(DatasetSpecError, match="field 'source.manifest': converter 'manifest_vqa' reads a manifest"):
        parse_dataset_spec(data, "chest_qa.yaml")
    data = spec_data()
    data["source"]["converter"] = "ofa_tsv_vqa"
    with pytest.raises(DatasetSpecError, match="field 'source.manifest': only with a manifest converter"):
        parse_dataset_spec(data, "chest_qa.yaml")
    spec = parse_dataset_spec(spec_data(), "chest_qa.yaml")
    assert spec.source.options["columns"] == VQA_COLUMNS and spec.source.options["split_column"] == "split"


# --- biomedgpt datasets new --------------------------------------------------------------------------


def test_datasets_new_infers_what_the_columns_say(vqa_folder: Path, tmp_path: Path):
    out = tmp_path / "specs" / "chest_qa.yaml"
    path, spec, notes = new_dataset_spec("chest_qa", vqa_folder / "qa.csv", "vqa", out=out,
                                         maps={"answer": "Finding"}, licence="internal use only")
    assert path == out and spec.source.converter == "manifest_vqa"
    m = spec.source.manifest
    assert m.file == "qa.csv" and m.split.column == "split" and m.location == "../chest"
    assert m.columns == {"answer": "Finding", "image": "image_path", "question": "Question", "id": "case"}
    assert list(spec.splits) == ["train", "val", "test"] and spec.splits["test"].role == "evaluate"
    assert spec.licence == "internal use only" and spec.access == "credentialed"
    assert any("image <- column 'image_path'" in n for n in notes)
    assert load_dataset_spec(out).source.options == spec.source.options  # what was written is what was checked


def test_datasets_new_multi_label_jsonl_and_ratio(tmp_path: Path):
    root = tmp_path / "x"
    images(root, ["a.png", "b.png"], tiny_png(1))
    write(root / "m.jsonl", "\n".join(json.dumps({"picture": f"{n}.png", "Findings": labels, "patient": n})
                                      for n, labels in (("a", ["x", "y"]), ("b", []))) + "\n")
    out = tmp_path / "derm.yaml"
    _, spec, notes = new_dataset_spec("derm", root / "m.jsonl", "classify", out=out, licence="cc-by",
                                      split_ratio={"train": 0.5, "test": 0.5}, seed=3)
    m = spec.source.manifest
    assert m.columns == {"image": "picture", "labels": "Findings", "group": "patient"}
    assert m.split.ratio == {"train": 0.5, "test": 0.5} and m.split.seed == 3
    assert spec.answer_candidates.policy == "class_names" and spec.metrics == ["accuracy", "auc"]
    write(root / "s.csv", "img,diagnosis\na.png,x;y\nb.png,y\n")
    _, spec, _ = new_dataset_spec("derm", root / "s.csv", "classify", out=out, licence="cc-by", force=True)
    assert spec.source.manifest.columns == {"image": "img", "labels": "diagnosis"}
    assert spec.source.manifest.label_separator == ";"
    assert spec.source.manifest.split.ratio == {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.mark.parametrize("task, csv, kwargs, message", [
    ("vqa", "image_path,Question,Finding\nimg/0.jpg,q,a\n", {"licence": "l"},
     "cannot infer which column holds answer for vqa records (columns: image_path, Question, Finding); "
     "pass --map answer=COLUMN"),
    ("vqa", "image_path,Question,Finding\nimg/0.jpg,q,a\n", {},
     "pass --map answer=COLUMN; cannot infer the licence of the data (who may use it, for what); pass --licence"),
    ("vqa", "image_path,question,answer\nimg/0.jpg,q,a\n", {}, "cannot infer the licence"),
    ("vqa", "where,question,answer\nnowhere.jpg,q,a\n", {"licence": "l"},
     "cannot infer the image column: no column's values are files inside"),
    ("vqa", "image,question,answer\nimg/0.jpg,q,a\n", {"licence": "l", "maps": {"answer": "Finding"}},
     "--map answer=Finding: no column 'Finding' in the manifest (columns: image, question, answer)"),
    ("vqa", "image,question,answer\nimg/0.jpg,q,a\n", {"licence": "l", "maps": {"answr": "answer"}},
     "--map answr=answer: 'answr' is not a field of vqa records"),
    ("vqa", "image,question,answer,Answers\nimg/0.jpg,q,a,b\n", {"licence": "l"},
     "columns 'answer', 'Answers' could each hold answer; pass --map answer=COLUMN"),
    ("vqa", "image,question,answer,split\nimg/0.jpg,q,a,holdout\n", {"licence": "l", "maps": {"split": "split"}},
     "--map split=split: values ['holdout'] are not split names"),
    ("classify", "image,question\nimg/0.jpg,q\n", {"licence": "l"}, "pass --map label=COLUMN"),
])
def test_datasets_new_refuses_what_it_cannot_infer(vqa_folder: Path, tmp_path: Path, task, csv, kwargs, message):
    manifest = write(vqa_folder / "other.csv", csv)
    with pytest.raises(ValueError) as err:
        new_dataset_spec("mine", manifest, task, out=tmp_path / "mine.yaml", **kwargs)
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "mine.yaml").exists()
    if "cannot infer" in message:
        assert isinstance(err.value, CannotInfer)


def test_datasets_new_refuses_bad_names_and_overwrites(vqa_folder: Path, tmp_path: Path):
    args = dict(maps={"answer": "Finding"}, licence="l")
    with pytest.raises(ValueError, match="NAME: 'Chest-QA'"):
        new_dataset_spec("Chest-QA", vqa_folder / "qa.csv", "vqa", out=tmp_path / "Chest-QA.yaml", **args)
    with pytest.raises(ValueError, match="a dataset spec's file is named after its dataset"):
        new_dataset_spec("chest_qa", vqa_folder / "qa.csv", "vqa", out=tmp_path / "other.yaml", **args)
    out = tmp_path / "chest_qa.yaml"
    new_dataset_spec("chest_qa", vqa_folder / "qa.csv", "vqa", out=out, **args)
    with pytest.raises(ValueError, match="exists"):
        new_dataset_spec("chest_qa", vqa_folder / "qa.csv", "vqa", out=out, **args)
    assert yaml.safe_load(out.read_text())["source"]["manifest"]["columns"]["answer"] == "Finding"
