"""The converters added for the rest of BiomedGPT's datasets, on small records written here in each
release's documented format (credentialed data has no sample): MIMIC-CXR, PEIR Gross, MedNLI,
MeQSum (.xlsx and TSV), HealthCareMagic, MIMIC-III summarisation and notes, MedICaT, SZ/MC-CXR,
image folders."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from data_testing import skipped, tiny_jpeg, tiny_png, write_images

from biomedgpt.data.build import build_shards
from biomedgpt.data.converters import SourceFormatError, open_converter
from biomedgpt.data.converters.mimic_cxr import report_caption, report_sections
from biomedgpt.data.dataset_spec import load_dataset_spec

REPO = Path(__file__).resolve().parents[2]


def records(conv, split):
    return [r.record for r in conv.records(split)]


# --- MIMIC-CXR -------------------------------------------------------------------------------------

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_report_sections():
    sections = report_sections(REPORT)
    assert list(sections) == ["EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON", "FINDINGS", "IMPRESSION"]
    assert sections["FINDINGS"] == ("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                                    "nodular opacities that most likely represent nipple shadows.")
    assert report_caption(REPORT, "impression") == "No acute cardiopulmonary process."
    assert report_caption(REPORT, "findings_impression").endswith("nipple shadows. No acute cardiopulmonary process.")
    both = " FINDINGS AND IMPRESSION:  Heart size is normal.\n"
    assert report_caption(both, "findings") == report_caption(both, "findings_impression") == "Heart size is normal."
    assert report_caption(" IMPRESSION: Clear lungs.", "findings") == ""
    assert report_caption(" IMPRESSION: Clear lungs.", "findings_or_impression") == "Clear lungs."


def write_gz_csv(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode()))


@pytest.fixture
def mimic_cxr_source(tmp_path: Path) -> Path:
    root = tmp_path / "mimic"
    studies = [  # subject, study, split, [(dicom, view)], report
        ("10000032", "50414267", "train", [("d-lat", "LATERAL"), ("d-pa", "PA")], REPORT),
        ("10000032", "53189527", "train", [("d-ap", "AP")], " FINDINGS AND IMPRESSION: Stable chest.\n"),
        ("10000764", "57375967", "train", [("d-only", "PA")], " IMPRESSION: No change.\n"),  # no FINDINGS: dropped
        ("10000898", "50771383", "validate", [("d-val", "PA")], " FINDINGS: Lungs are clear.\n"),
        ("10001176", "53186264", "test", [("d-test", "AP")], None),  # report missing: dropped
    ]
    split_lines, meta_lines = ["dicom_id,study_id,subject_id,split"], ["dicom_id,subject_id,study_id,ViewPosition,Rows,Columns"]
    for subject, study, split, dicoms, report in studies:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for dicom, view in dicoms:
            split_lines.append(f"{dicom},{study},{subject},{split}")
            meta_lines.append(f"{dicom},{subject},{study},{view},3056,2544")
            write_images(folder, [f"{dicom}.jpg"], tiny_jpeg(len(dicom) * 10))
        if report is not None:
            path = root / "mimic-cxr-reports/files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report)
    write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", "\n".join(split_lines) + "\n")
    write_gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", "\n".join(meta_lines) + "\n")
    return root


def test_mimic_cxr(mimic_cxr_source: Path, tmp_path: Path):
    conv = open_converter("mimic_cxr", str(mimic_cxr_source))
    assert conv.splits() == ["train", "val", "test"] and conv.native_split("val") == "validate"
    train = records(conv, "train")
    assert [r["id"] for r in train] == ["s50414267", "s53189527"]
    assert train[0]["image"] == "p10/p10000032/s50414267/d-pa.jpg" and train[0]["view"] == "PA"  # PA before LATERAL
    assert train[0]["views"] == ["p10/p10000032/s50414267/d-pa.jpg", "p10/p10000032/s50414267/d-lat.jpg"]
    assert train[0]["caption"].startswith("There is no focal consolidation") and "IMPRESSION" not in train[0]["caption"]
    assert train[1]["caption"] == "Stable chest." and conv.dropped == {"train": {"no_findings": 1}}

    spec = load_dataset_spec(REPO / "datasets_spec/mimic_cxr.yaml")
    result = build_shards("mimic_cxr", str(mimic_cxr_source), str(tmp_path / "out"), spec=spec, progress=False)
    assert {s: m.samples for s, m in result.items()} == {"train": 2, "val": 1, "test": 0}
    assert result["train"].access == "credentialed" and result["train"].notes["dropped"] == {"no_findings": 1}
    assert result["test"].notes["dropped"] == {"no_report": 1} and result["val"].native_split == "validate"

    every = open_converter("mimic_cxr", str(mimic_cxr_source), views="all", section="findings_or_impression")
    assert [r["id"] for r in records(every, "train")] == [
        "s50414267_d-pa", "s50414267_d-lat", "s53189527_d-ap", "s57375967_d-only"]


def test_mimic_cxr_reports_in_image_tree_and_bad_split(mimic_cxr_source: Path):
    (mimic_cxr_source / "mimic-cxr-reports/files").rename(mimic_cxr_source / "reports-elsewhere")
    import shutil

    shutil.copytree(mimic_cxr_source / "reports-elsewhere", mimic_cxr_source / "files", dirs_exist_ok=True)
    shutil.rmtree(mimic_cxr_source / "mimic-cxr-reports")
    assert len(records(open_converter("mimic_cxr", str(mimic_cxr_source)), "train")) == 2
    write_gz_csv(mimic_cxr_source / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split\nx,1,2,dev\n")
    conv = open_converter("mimic_cxr", str(mimic_cxr_source))
    assert conv.splits() == []  # its only row is skipped, and named
    assert re.search(r"split\.csv\.gz: line 2: field 'split': expected one of", skipped(conv))


# --- PEIR Gross ------------------------------------------------------------------------------------


def test_peir_gross_biocaption_layout(tmp_path: Path):
    lines = [f"PEIR_gross_{i}.jpg\tLiver: {'cirrhosis' if i % 2 else 'fatty  change'}\tgross" for i in range(10)]
    (tmp_path / "train_images.tsv").write_text("\r\n".join(lines) + "\r\n")
    (tmp_path / "test_images.tsv").write_text("PEIR_gross_100.jpg\tKidney: infarct\n\n")
    write_images(tmp_path / "peir_gross_images", [f"PEIR_gross_{i}.jpg" for i in list(range(10)) + [100]], tiny_jpeg())
    conv = open_converter("peir_gross", str(tmp_path))
    assert conv.layout == "biocaption" and conv.splits() == ["train", "val", "test"]
    train, val, test = (records(conv, s) for s in ("train", "val", "test"))
    assert [r["id"] for r in val] == ["PEIR_gross_8", "PEIR_gross_9"] and len(train) == 8  # the last 20% of the file
    assert train[0]["caption"] == "Liver: fatty change gross" and test[0]["caption"] == "Kidney: infarct"
    assert open_converter("peir_gross", str(tmp_path), val_fraction=0).splits() == ["train", "test"]


def test_peir_gross_table_layout(tmp_path: Path):
    (tmp_path / "captions.json").write_text(json.dumps([
        {"image": "a.jpg", "caption": "Heart: hypertrophy", "split": "train"},
        {"image": "b.jpg", "caption": "Lung: emphysema", "split": "validation"},
        {"image": "c.jpg", "caption": "Brain: infarct", "split": "test"}]))
    write_images(tmp_path / "images", ["a.jpg", "b.jpg"], tiny_jpeg())
    conv = open_converter("peir_gross", str(tmp_path), on_missing_image="skip")
    assert conv.layout == "table" and conv.splits() == ["train", "val", "test"]
    assert records(conv, "val")[0]["caption"] == "Lung: emphysema"
    assert records(conv, "test") == [] and conv.skipped == {"test": ["c.jpg"]}


# --- MedNLI ----------------------------------------------------------------------------------------


def test_mednli(tmp_path: Path):
    rows = [
        {"sentence1": "Labs were notable for Cr 1.7 (baseline 0.5 per old records) and lactate 2.4.",
         "sentence2": " Patient has elevated Cr", "gold_label": "entailment", "pairID": "23eb94b8-66c7-11e7-a8dc-f45c89b91419",
         "sentence1_parse": "(ROOT ...)", "sentence2_parse": "(ROOT ...)"},
        {"sentence1": "No history of blood clots.", "sentence2": "Patient has a DVT", "gold_label": "contradiction",
         "pairID": "p2"},
        {"sentence1": "Family history of diabetes.", "sentence2": "Patient is obese", "gold_label": "neutral", "pairID": "p3"},
        {"sentence1": "x", "sentence2": "y", "gold_label": "-", "pairID": "p4"},
    ]
    (tmp_path / "mli_train_v1.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "mli_dev_v1.jsonl").write_text(json.dumps(rows[1]) + "\n")
    conv = open_converter("mednli", str(tmp_path))
    assert conv.splits() == ["train", "val"] and conv.native_split("val") == "dev"
    recs = records(conv, "train")
    assert [(r["label"], r["gold_label"]) for r in recs] == [("yes", "entailment"), ("no", "contradiction"),
                                                             ("maybe", "neutral")]
    assert recs[0]["hypothesis"] == "Patient has elevated Cr" and recs[0]["task"] == "nli"
    assert conv.dropped == {"train": {"no_gold_label": 1}}
    (tmp_path / "mli_test_v1.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "gold_label": "entails", "pairID": "q"}\n')
    assert re.search(r"mli_test_v1\.jsonl: line 1: field 'gold_label': expected one of",
                     skipped(open_converter("mednli", str(tmp_path)), "test"))


# --- summarisation ---------------------------------------------------------------------------------


def test_meqsum_xlsx_and_tsv(tmp_path: Path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["File", "CHQ", "Summary"])
    for i in range(5):
        sheet.append([f"1-{i}.xml.txt", f"SUBJECT: question {i}. MESSAGE: I have  a question\nabout drug {i}.",
                      f"What are the side effects of drug {i}?"])
    book.save(tmp_path / "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx")
    conv = open_converter("meqsum", str(tmp_path), split_sizes={"train": 3, "val": 1, "test": 1})
    assert conv.layout == "xlsx" and conv.splits() == ["train", "val", "test"]
    assert [r["id"] for r in records(conv, "train")] == ["1-0.xml.txt", "1-1.xml.txt", "1-2.xml.txt"]
    test = records(conv, "test")[0]
    assert test["text"] == "SUBJECT: question 4. MESSAGE: I have a question about drug 4." and test["task"] == "summarize"
    assert records(open_converter("meqsum", str(tmp_path)), "train")[-1]["id"] == "1-4.xml.txt"
    with pytest.raises(SourceFormatError, match="split_sizes add up to 4 but the file has 5 rows"):
        records(open_converter("meqsum", str(tmp_path), split_sizes={"train": 4}), "train")

    (tmp_path / "test.tsv").write_text("What is TMAU?\tWhat is trimethylaminuria?\n")
    conv = open_converter("meqsum", str(tmp_path))
    assert conv.layout == "tsv" and conv.splits() == ["test"]
    assert records(conv, "test")[0] == {"task": "summarize", "dataset": "meqsum", "split": "test", "id": "test_000000",
                                        "text": "What is TMAU?", "summary": "What is trimethylaminuria?"}


def test_healthcaremagic_biobart_split(tmp_path: Path):
    data = {"data": [{"id": 0, "src": "Patient: I have a headache. Doctor: Take rest.", "tgt": "Q. What causes headache?"},
                     {"id": 1, "src": "Patient: fever", "tgt": ""}]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    (tmp_path / "dev.json").write_text(json.dumps({"data": data["data"][:1]}))
    conv = open_converter("healthcaremagic", str(tmp_path))
    assert conv.splits() == ["train", "val"]
    assert records(conv, "train") == [{"task": "summarize", "dataset": "healthcaremagic", "split": "train", "id": "0",
                                       "text": "Patient: I have a headache. Doctor: Take rest.",
                                       "summary": "What causes headache?"}]
    assert conv.dropped == {"train": {"empty_summary": 1}}


def test_mimic_iii_summaries_through_the_generic_table_converter(tmp_path: Path):
    spec = load_dataset_spec(REPO / "datasets_spec/mimic_iii.yaml")
    rows = [{"findings": "The lungs are clear. No effusion.", "impression": "No acute process."},
            {"findings": "Large right pleural effusion.", "impression": "Right effusion."}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    result = build_shards("mimic_iii", str(tmp_path), str(tmp_path / "out"), spec=spec, progress=False)
    assert result["train"].samples == 2 and result["train"].access == "credentialed"
    assert result["train"].notes["converter"] == "summarize_table" and result["train"].dataset == "mimic_iii"
    assert (tmp_path / "out/mimic_iii/train/mimic_iii-train-000000.tar").is_file()


# --- pretraining sources ----------------------------------------------------------------------------


def test_mimic_iii_notes_corpus(tmp_path: Path):
    csv_text = ('ROW_ID,SUBJECT_ID,HADM_ID,CHARTDATE,CHARTTIME,STORETIME,CATEGORY,DESCRIPTION,CGID,ISERROR,TEXT\n'
                '174,22532,167853,2151-08-04,,,Discharge summary,Report,,,"Admission Date:  [**2151-7-16**]\n\n'
                'Service: ADDENDUM:\nRADIOLOGIC STUDIES:  ""quoted"" text."\n'
                '175,13702,107527,2118-06-14,,,Radiology,CHEST,,,"FINDINGS: clear."\n'
                '176,13702,107527,2118-06-14,,,Nursing,Note,,,""\n')
    (tmp_path / "NOTEEVENTS.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    spec = load_dataset_spec(REPO / "datasets_spec/mimic_iii_notes.yaml")
    conv = open_converter("mimic_iii_notes", str(tmp_path), spec.source.files, converter=spec.source.converter,
                          **spec.source.options)
    recs = records(conv, "train")
    assert [r["id"] for r in recs] == ["174", "175"] and recs[0]["task"] == "text"
    assert recs[0]["text"] == 'Admission Date: [**2151-7-16**] Service: ADDENDUM: RADIOLOGIC STUDIES: "quoted" text.'
    assert conv.dropped == {"train": {"empty_text": 1}}
    radiology = open_converter("mimic_iii_notes", str(tmp_path), spec.source.files, converter="text_corpus",
                               text_column="TEXT", id_column="ROW_ID", filter_column="CATEGORY", filter_values=["radiology"])
    assert [r["id"] for r in records(radiology, "train")] == ["175"]


def test_pubmed_sentences_and_medicat(tmp_path: Path):
    (tmp_path / "pubmed_uncased_sentence_nltk.txt").write_text("the liver was enlarged .\n\nno  metastases were seen .\n")
    conv = open_converter("pubmed_abstracts", str(tmp_path), {"corpus": "pubmed_uncased_sentence_nltk.txt"},
                          converter="text_corpus")
    assert [(r["id"], r["text"]) for r in records(conv, "train")] == [
        ("line000000001", "the liver was enlarged ."), ("line000000003", "no metastases were seen .")]

    figures = [{"pdf_hash": "abc", "fig_uri": "2-Figure1-1.png", "s2_caption": "Figure 1. Axial CT shows a mass."},
               {"pdf_hash": "abd", "fig_uri": "3-Figure2-1.png", "s2_caption": "Fig. 2: MRI of the knee."},
               {"pdf_hash": "abe", "fig_uri": "4-Figure3-1.png", "s2_caption": ""}]
    (tmp_path / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl").write_text(
        "\n".join(json.dumps(f) for f in figures))
    write_images(tmp_path / "figures", [f"{f['pdf_hash']}_{f['fig_uri']}" for f in figures], tiny_png())
    conv = open_converter("medicat", str(tmp_path))
    assert [(r["id"], r["caption"]) for r in records(conv, "train")] == [
        ("abc_2-Figure1-1", "Axial CT shows a mass."), ("abd_3-Figure2-1", "MRI of the knee.")]


def test_tuberculosis_sets_and_image_folders(tmp_path: Path):
    names = [f"CHNCXR_{i:04d}_{i % 2}.png" for i in range(1, 41)] + ["CHNCXR_0041_1.txt", "other.png"]
    write_images(tmp_path / "ChinaSet_AllFiles/CXR_png", names, tiny_png())
    conv = open_converter("sz_cxr", str(tmp_path / "ChinaSet_AllFiles"))
    counts = {s: len(records(conv, s)) for s in conv.splits()}
    assert sum(counts.values()) == 40 and set(counts) == {"train", "val", "test"}
    again = open_converter("sz_cxr", str(tmp_path / "ChinaSet_AllFiles/CXR_png"))
    assert {s: [r["id"] for r in records(again, s)] for s in again.splits()} == \
        {s: [r["id"] for r in records(conv, s)] for s in conv.splits()}  # the hashed split is stable
    rec = records(conv, "train")[0]
    assert rec["label_name"] == ("tuberculosis" if rec["label"] else "normal") and rec["id"].startswith("CHNCXR_")
    write_images(tmp_path / "MontgomerySet/CXR_png", ["MCUCXR_0001_0.png", "MCUCXR_0104_1.png"], tiny_png())
    mc = open_converter("mc_cxr", str(tmp_path / "MontgomerySet"), val_fraction=0, test_fraction=0)
    assert [r["label_name"] for r in records(mc, "train")] == ["normal", "tuberculosis"]

    write_images(tmp_path / "cyto/nucleus", ["a.png", "b.png"], tiny_png())
    write_images(tmp_path / "cyto/mitochondria", ["c.jpg"], tiny_jpeg())
    cyto = open_converter("cytoimagenet", str(tmp_path / "cyto"), converter="image_folder", label_from="parent")
    recs = records(cyto, "train")
    assert [(r["id"], r["label_name"]) for r in recs] == [("mitochondria/c", "mitochondria"), ("nucleus/a", "nucleus"),
                                                          ("nucleus/b", "nucleus")]
    assert recs[0]["task"] == "image" and recs[0]["dataset"] == "cytoimagenet"
    write_images(tmp_path / "CheXpert-v1.0-small/valid/patient1/study1", ["view1_frontal.jpg"], tiny_jpeg())
    write_images(tmp_path / "CheXpert-v1.0-small/train/patient2/study1", ["view1_frontal.jpg"], tiny_jpeg())
    (tmp_path / "CheXpert-v1.0-small/train.csv").write_text("Path,Sex\n")
    spec = load_dataset_spec(REPO / "datasets_spec/chexpert_small.yaml")
    chexpert = open_converter("chexpert_small", str(tmp_path / "CheXpert-v1.0-small"), converter="image_folder",
                              **spec.source.options)
    assert chexpert.splits() == ["train", "val"] and records(chexpert, "val")[0]["id"] == "patient1/study1/view1_frontal"
