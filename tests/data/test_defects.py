"""Real releases are not clean: a build skips the source records it cannot use, names each one (file,
record index, id, field, reason) on the console and in the manifest, and fails only past the split's
error budget (1% of its records by default; the dataset spec's source.max_bad_fraction; the command
line's --max-bad-fraction). One test per converter family, on real files with defects put in."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_testing import write_dicom

from biomedgpt.data.build import build_shards
from biomedgpt.cli.shards import add_shards_commands
from biomedgpt.data.dataset_spec import DatasetSpecError, load_dataset_spec
from biomedgpt.data.plan import BadRecordsError
from biomedgpt.data.shards import read_manifest, verify_shards

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="biomedgpt")
    add_shards_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def defects_of(out: Path, dataset: str, split: str) -> dict:
    return read_manifest(str(out / dataset / split)).notes.get("defects", {})


# --- JSON: SLAKE, its official train.json's empty answer --------------------------------------------


@pytest.fixture
def slake_release(dev_data: Path, slake_images: Path, tmp_path: Path):
    """Slake1.0/ with the fixture records as train.json and the drawn images; returns (root, records)."""
    root = tmp_path / "Slake1.0"
    root.mkdir()
    (root / "imgs").symlink_to(slake_images)
    return root, json.loads((dev_data / "slake/dev.json").read_text(encoding="utf-8"))


def organ_questions(records: list[dict]) -> list[int]:
    """Indices of English open questions about an organ (the kind of record SLAKE's empty answer is)."""
    return [i for i, r in enumerate(records)
            if r["q_lang"] == "en" and r["answer_type"] == "OPEN" and r["content_type"] == "Organ"]


def test_slake_empty_answer_is_skipped_and_named(slake_release, tmp_path: Path, capsys):
    root, records = slake_release
    i = organ_questions(records)[0]
    records[i]["answer"] = ""  # as in the official SLAKE 1.0 train.json
    (root / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    english = sum(r["q_lang"] == "en" for r in records)

    result = build_shards("slake", str(root), str(tmp_path / "out"), progress=True)
    assert result["train"].samples == english - 1 and result["train"].complete
    err = capsys.readouterr().err
    where = f"train.json: record {i} (qid {records[i]['qid']}): field 'answer': empty answer"
    assert f"slake/train: skipped record: {root / where}" in err
    assert "1 unusable records skipped (budget 1)" in err
    note = defects_of(tmp_path / "out", "slake", "train")
    assert note["count"] == 1 and note["records"] == english and note["allowed"] == 1
    assert note["budget"] == "max_bad_fraction=0.01" and note["by_field"] == {"answer": 1}
    assert note["skipped"] == [{"file": str(root / "train.json"), "reason": "empty answer", "record":
                                f"record {i} (qid {records[i]['qid']})", "index": i, "id": str(records[i]["qid"]),
                                "field": "answer"}]
    assert verify_shards(str(tmp_path / "out")).ok


def test_slake_past_the_budget_fails_and_the_spec_can_raise_it(slake_release, tmp_path: Path):
    root, records = slake_release
    first, second = organ_questions(records)[:2]
    records[first]["answer"] = ""
    records[second]["question"] = "  "
    (root / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(BadRecordsError, match=r"slake/train: 2 of \d+ source records cannot be used, more than the 1 its "
                                              r"error budget allows \(max_bad_fraction=0.01; .*--max-bad-fraction.*\)\. "
                                              rf".*record {first} .*empty answer; .*record {second} .*empty question"):
        build_shards("slake", str(root), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out/slake/train").exists()  # the plan showed it: nothing was written

    spec = (REPO / "datasets_spec/slake.yaml").read_text()
    assert "  options:\n    languages: [en]\n" in spec
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "slake.yaml").write_text(spec.replace("  options:\n", "  max_bad_fraction: 0.05\n  options:\n"))
    result = build_shards("slake", str(root), str(tmp_path / "out"), spec=load_dataset_spec(specs / "slake.yaml"),
                          progress=False)
    assert defects_of(tmp_path / "out", "slake", "train")["count"] == 2 and result["train"].complete
    (specs / "slake.yaml").write_text(spec.replace("  options:\n", "  max_bad_fraction: 1.5\n  options:\n"))
    with pytest.raises(DatasetSpecError, match=r"field 'source.max_bad_fraction': must be in \[0, 1\), got 1.5"):
        load_dataset_spec(specs / "slake.yaml")


# --- CSV / TSV: the official OFA TSV of VQA-RAD, a summarisation CSV --------------------------------


def test_tsv_row_with_missing_columns_and_the_command_line_budget(vqa_rad_release: Path, tmp_path: Path, capsys):
    """test.tsv written from the real data_RAD test set as BiomedGPT's preprocessing writes it, one line cut."""
    import base64

    lines = []
    for item in json.loads((vqa_rad_release / "data_RAD/testset.json").read_text()):
        image = base64.b64encode((vqa_rad_release / "data_RAD/images" / item["image_name"]).read_bytes()).decode()
        answer = str(item["answer"]).replace("\t", "").lower().strip()
        lines.append("\t".join([str(item["qid"]), item["image_name"][:-4], item["question"].lower().strip(),
                                f"1|!+{answer}", item["image_organ"].lower(), image]))
    lines[3] = "\t".join(lines[3].split("\t")[:3])  # a row cut short
    src = tmp_path / "tsv"
    src.mkdir()
    (src / "test.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["shards", "build", "vqa_rad", "--source", str(src), "--out", str(out), "--converter", "ofa_tsv_vqa",
            "--spec", str(REPO / "datasets_spec/vqa_rad.yaml")]
    with pytest.raises(BadRecordsError, match=r"vqa_rad/test: 1 of 11 source records cannot be used, more than the 0 "
                                              r".*test\.tsv: line 4: 3 tab-separated columns, expected at least 6"):
        run_cli(argv)
    assert run_cli(argv + ["--max-bad-fraction", "0.1", "--quiet"]) == 0
    out_text = capsys.readouterr()
    assert "vqa_rad/test: 10 samples, 1 shards, 1 unusable records skipped" in out_text.out
    note = defects_of(out, "vqa_rad", "test")
    assert note["skipped"][0]["record"] == "line 4" and note["skipped"][0]["index"] == 4
    assert note["budget"] == "max_bad_fraction=0.1"
    with pytest.raises(SystemExit):
        run_cli(argv + ["--max-bad-fraction", "2"])
    assert "--max-bad-fraction: expected a number in [0, 1), got '2'" in capsys.readouterr().err


def test_csv_unreadable_row_and_empty_summary(tmp_path: Path, dev_data: Path):
    """A summarisation CSV made of real IU X-ray reports (findings -> their first sentence)."""
    import csv

    studies = json.loads((dev_data / "iu_xray/dev.json").read_text())["train"][:50]
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "summary"])
        for s in studies:
            writer.writerow([s["id"], s["report"], s["report"].split(". ")[0]])
    rows = (src / "train.csv").read_text().splitlines(keepends=True)
    rows.insert(7, "CXR-extra,only two cells\n")  # line 8: a row with a column missing
    (src / "train.csv").write_text("".join(rows))
    result = build_shards("iu_summaries", str(src), str(tmp_path / "out"), converter="summarize_table",
                          files={"train": "train.csv"}, options={"id_column": "id", "header": True},
                          max_bad_fraction=0.05, progress=False)
    assert result["train"].samples == 50
    (skipped,) = defects_of(tmp_path / "out", "iu_summaries", "train")["skipped"]
    assert skipped == {"file": str(src / "train.csv"), "record": "line 8", "index": 8,
                       "reason": "2 columns, expected 3 (id, text, summary)"}


# --- npz: MedMNIST ----------------------------------------------------------------------------------


def test_npz_label_out_of_range(dev_data: Path, tmp_path: Path):
    with np.load(dev_data / "medmnist/dev.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["val_labels"][17] = 7  # PneumoniaMNIST has classes 0 and 1
    src = tmp_path / "medmnist"
    src.mkdir()
    np.savez_compressed(src / "pneumoniamnist.npz", **arrays)
    with pytest.raises(BadRecordsError, match=r"pneumoniamnist/val: 1 of 50 .*pneumoniamnist\.npz: record 17: "
                                              r"field 'val_labels\[17\]': label 7 outside 0\.\.1"):
        build_shards("pneumoniamnist", str(src), str(tmp_path / "out"), ["val"], progress=False)
    result = build_shards("pneumoniamnist", str(src), str(tmp_path / "out"), ["val"], max_bad_fraction=0.05,
                          progress=False)
    assert result["val"].samples == 49
    (skipped,) = defects_of(tmp_path / "out", "pneumoniamnist", "val")["skipped"]
    assert skipped["index"] == 17 and skipped["id"] == "val_000017"


# --- DICOM and folders: images that turn out unusable when their shard is written ---------------------


def dicom_tree(root: Path, n: int, broken: tuple[int, ...]) -> Path:
    for i in range(n):
        path = root / f"case{i}/slice.dcm"
        if i in broken:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"DICM but not really" * 10)
        else:
            write_dicom(path, np.arange(48, dtype=np.uint16).reshape(6, 8) * (i + 1), uid_suffix=100 + i)
    return root


def test_unreadable_dicom_is_skipped_when_written_and_a_rerun_keeps_the_shards(tmp_path: Path, capsys):
    src = dicom_tree(tmp_path / "src", 8, broken=(2, 6))
    out = tmp_path / "out"
    kwargs = dict(converter="dicom_folder", shard_max_samples=2)
    with pytest.raises(BadRecordsError, match=r"ct/train: 1 of 8 source records cannot be used, more than the 0 .*"
                                              r"case2/slice\.dcm: id case2/slice: (not a readable DICOM file|DICOM file has no pixel data)"):
        build_shards("ct", str(src), str(out), progress=True, **kwargs)
    assert "ct/train: skipped record: " in capsys.readouterr().err
    partial = read_manifest(str(out / "ct/train"))
    assert not partial.complete and [s.name for s in partial.shards] == ["ct-train-000000.tar", "ct-train-000001.tar"]
    assert partial.shards[1].samples == 1 and partial.shards[1].skipped[0]["id"] == "case2/slice"

    result = build_shards("ct", str(src), str(out), max_bad_fraction=0.25, progress=False, **kwargs)
    assert len(result.kept) == 2 and len(result.written) == 2 and result["train"].samples == 6
    note = result["train"].notes["defects"]
    assert note["count"] == 2 and note["allowed"] == 2 and [d["id"] for d in note["skipped"]] == ["case2/slice", "case6/slice"]
    assert verify_shards(str(out)).ok


def test_image_folder_with_a_file_that_is_no_image(vqa_rad_release: Path, tmp_path: Path):
    src = tmp_path / "images"
    shutil.copytree(vqa_rad_release / "VQA_RAD Image Folder", src / "radiographs")
    (src / "radiographs/synpic99999.png").write_bytes(b"\x89PNG but cut off")
    result = build_shards("radiographs", str(src), str(tmp_path / "out"), converter="image_folder",
                          max_bad_fraction=0.2, progress=False)
    assert result["train"].samples == 6
    (skipped,) = result["train"].notes["defects"]["skipped"]
    assert skipped["id"] == "radiographs/synpic99999" and "not a readable image" in skipped["reason"]
