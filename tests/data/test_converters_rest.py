"""The converters of the last datasets whose specs had none (TREC 2022 Clinical Trials, SEER,
NCBI BioNLP corpora, OIA-DDR), on small records written here in each release's documented format
(SEER is credentialed; the others were not available offline), built into shards through their specs."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from data_testing import skipped, tiny_jpeg

from biomedgpt.data.build import build_shards
from biomedgpt.data.converters import SourceFormatError, open_converter
from biomedgpt.data.converters.base import RecordDefect
from biomedgpt.data.dataset_spec import load_dataset_spec
from biomedgpt.data.plan import BadRecordsError
from biomedgpt.data.shards import read_shard
from biomedgpt.tasks import get_task

REPO = Path(__file__).resolve().parents[2]


def records(conv, split):
    return [r.record for r in conv.records(split)]


def all_records(conv):
    return {split: records(conv, split) for split in conv.splits()}


# --- TREC 2022 Clinical Trials ------------------------------------------------------------------

TOPICS = """<topics task="2022 TREC Clinical Trials">
  <topic number="{n}">
    A {n}-year-old man presents with
    progressive dyspnea and a history of heart failure.
  </topic>
</topics>"""

TRIAL = """<?xml version="1.0" encoding="UTF-8"?>
<clinical_study rank="1">
  <id_info><nct_id>{nct}</nct_id></id_info>
  <brief_title>Study {nct}</brief_title>
  <eligibility>
    <criteria>
      <textblock>
        Inclusion Criteria:

          -  Heart failure with reduced ejection fraction

        Exclusion Criteria:

          -  Pregnancy
      </textblock>
    </criteria>
    <gender>All</gender>
    <minimum_age>18 Years</minimum_age>
    <maximum_age>N/A</maximum_age>
  </eligibility>
</clinical_study>"""


def write_trec(root: Path, topics=range(1, 16)) -> None:
    root.mkdir(parents=True, exist_ok=True)
    body = "".join(TOPICS.split("\n", 1)[1].rsplit("</topics>", 1)[0].format(n=n) for n in topics)
    (root / "topics2022.xml").write_text(TOPICS.split("\n", 1)[0] + "\n" + body + "</topics>\n")
    lines = []
    for n in topics:
        for j, rel in enumerate((0, 1, 2)):
            lines.append(f"{n} 0 NCT0000{n:02d}{j} {rel}")
    lines.append("1 0 NCT09999999 2")  # judged, but not in the snapshot
    (root / "qrels2022.txt").write_text("\n".join(lines) + "\n")
    for n in topics:
        for j in range(3):
            nct = f"NCT0000{n:02d}{j}"
            path = root / "trials" / f"NCT0000{n:02d}xx" / f"{nct}.xml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(TRIAL.format(nct=nct))


def test_trec_2022(tmp_path: Path):
    write_trec(tmp_path)
    conv = open_converter("trec_2022", str(tmp_path))
    got = all_records(conv)
    assert set(got) <= {"train", "test"} and "train" in got and "test" in got
    topics = {split: {r["topic"] for r in recs} for split, recs in got.items()}
    assert not topics["train"] & topics["test"] and topics["train"] | topics["test"] == {str(n) for n in range(1, 16)}
    rec = next(r for recs in got.values() for r in recs if r["id"] == "3_NCT0000032")
    assert rec == {"task": "nli", "dataset": "trec_2022", "split": rec["split"], "id": "3_NCT0000032",
                   "premise": "A 3-year-old man presents with progressive dyspnea and a history of heart failure.",
                   "hypothesis": "Inclusion Criteria: - Heart failure with reduced ejection fraction Exclusion "
                                 "Criteria: - Pregnancy Gender: All. Minimum age: 18 Years. Maximum age: N/A.",
                   "label": "eligible", "relevance": 2, "topic": "3", "trial": "NCT0000032"}
    assert sorted({r["label"] for recs in got.values() for r in recs}) == ["eligible", "excluded", "irrelevant"]
    assert sum(len(v) for v in got.values()) == 45 and topics["test"] == {"11", "12", "14"}
    split1 = next(s for s, t in topics.items() if "1" in t)
    assert conv.dropped[split1] == {"trial_not_in_snapshot": 1}
    # the instruction the spec's prompt gives is what the NLI family builds from these fields
    assert get_task("nli").instruction(rec).startswith(' can text1 " a 3 year old man presents')

    (tmp_path / "qrels2022.txt").write_text("1 0 NCT0000010 3\n")
    assert re.search(r"qrels2022.txt: line 1: field 'relevance': expected 0, 1 or 2",
                     skipped(open_converter("trec_2022", str(tmp_path))))
    (tmp_path / "topics2022.xml").write_text("<topics><topic number='1'>x</topic>")
    with pytest.raises(SourceFormatError, match=r"topics2022.xml: invalid XML at line 1"):
        open_converter("trec_2022", str(tmp_path)).splits()


def test_trec_2022_defective_topics_are_skipped_with_their_judgements(tmp_path: Path, capsys):
    """topics2022.xml with a topic without a number, one with an empty description and a number given
    twice; qrels2022.txt with judgements of those and of a topic the file does not have."""
    src = tmp_path / "src"
    write_trec(src)
    topics = (src / "topics2022.xml").read_text()
    topics = topics.replace("</topics>", '  <topic>A 40-year-old woman whose topic lost its number.</topic>\n'
                                         '  <topic number="16">   </topic>\n'
                                         '  <topic number="4">A second description under number 4.</topic>\n'
                                         "</topics>")
    (src / "topics2022.xml").write_text(topics)
    qrels = (src / "qrels2022.txt").read_text().splitlines()
    qrels += ["16 0 NCT0000010 2", "99 0 NCT0000010 1"]  # the empty topic's judgement; an unknown topic's
    (src / "qrels2022.txt").write_text("\n".join(qrels) + "\n")
    line_99 = len(qrels)
    split_of = open_converter("trec_2022", str(src)).split_of

    result = build_shards("trec_2022", str(src), str(tmp_path / "out"), max_bad_fraction=0.2, progress=True)
    err = capsys.readouterr().err
    samples = {split: [json.loads(s["json"]) for shard in sorted((tmp_path / "out/trec_2022" / split).glob("*.tar"))
                       for s in read_shard(shard.as_posix())] for split in result}
    topics_out = {r["topic"] for recs in samples.values() for r in recs}
    assert topics_out == {str(n) for n in range(1, 16)} - {"4"}  # 4 has two descriptions: neither is used
    assert sum(m.samples for m in result.values()) == 42

    xml = str(src / "topics2022.xml")
    no_number = f"{xml}: topic element 16: field 'number': missing"
    empty = f"{xml}: topic element 17 (number 16): empty patient description"
    twice = (f"{xml}: topic element 18 (number 4): field 'number': duplicate topic number (also topic element 4): "
             f"neither description is used")
    unknown = f"{src / 'qrels2022.txt'}: line {line_99}: field 'topic': topic 99 is not in topics2022.xml"
    by_split = {split: {RecordDefect.from_json(d).describe() for d in m.notes["defects"]["skipped"]}
                for split, m in result.items()}
    for split in result:  # a topic without a number belongs to no split: each split names it
        assert no_number in by_split[split] and f"trec_2022/{split}: skipped record: {no_number}" in err
    for text, topic in ((empty, "16"), (twice, "4"), (unknown, "99")):
        split = split_of(topic) if split_of(topic) in result else None
        named_in = {s for s in result if text in by_split[s]}
        assert named_in == ({split} if split else set(result)), (text, named_in)
        assert f"skipped record: {text}" in err
    skipped_json = [d for m in result.values() for d in m.notes["defects"]["skipped"]]
    assert {"file": xml, "reason": "empty patient description", "record": "topic element 17 (number 16)",
            "index": 16, "id": "16"} in skipped_json
    assert any(d.get("id") == "99_NCT0000010" and d["index"] == line_99 for d in skipped_json)
    # the judgements of topics 4 and 16 are dropped and counted, in the split of each topic
    dropped = {}
    for topic, judged in (("4", 3), ("16", 1)):
        dropped[split_of(topic)] = dropped.get(split_of(topic), 0) + judged
    for split, m in result.items():
        assert m.notes.get("dropped", {}).get("topic_unusable", 0) == dropped.get(split, 0)


def test_trec_2022_builds_through_its_spec(tmp_path: Path):
    write_trec(tmp_path / "src")
    spec = load_dataset_spec(REPO / "datasets_spec" / "trec_2022.yaml")
    result = build_shards("trec_2022", str(tmp_path / "src"), str(tmp_path / "out"), spec=spec, progress=False)
    assert sum(m.samples for m in result.values()) == 45
    sample = next(read_shard(next((tmp_path / "out" / "trec_2022" / "train").glob("*.tar")).as_posix()))
    assert json.loads(sample["json"])["task"] == "nli" and "jpg" not in sample


# --- SEER ------------------------------------------------------------------------------------------

SEER_CSV = '''"Patient ID","Record number recode","Age recode with <1 year olds","Sex","Primary Site - labeled","Derived AJCC Stage Group, 7th ed (2010-2015)","Radiation recode","Chemotherapy recode (yes, no/unk)"
"00000001","1","60-64 years","Female","C50.9-Breast, NOS","IIA","Beam radiation","Yes"
"00000001","2","65-69 years","Female","C18.7-Sigmoid colon","Blank(s)","None/Unknown","No/Unknown"
"00000002","1","45-49 years","Male","C34.1-Upper lobe, lung","IIIB","Beam radiation","Yes"
"00000003","1","70-74 years","Male","C61.9-Prostate gland","II","None/Unknown",""
'''


def test_seer(tmp_path: Path):
    lines = SEER_CSV.splitlines()
    extra = [f'"{i:08d}","1","50-54 years","Female","C50.9-Breast, NOS","I","None/Unknown","No/Unknown"'
             for i in range(10, 40)]
    (tmp_path / "cases.csv").write_text("\n".join(lines + extra) + "\n")
    conv = open_converter("seer", str(tmp_path))
    got = all_records(conv)
    assert set(got) == {"train", "test"}
    every = {r["id"]: r for recs in got.values() for r in recs}
    assert len(every) == 3 + 30 and "00000003_1" not in every  # no label: dropped and counted
    assert sum(conv.dropped.get(s, {}).get("no_label", 0) for s in got) == 1
    rec = every["00000001_2"]
    assert rec["text"] == ("Record number recode: 2; Age recode with <1 year olds: 65-69 years; Sex: Female; "
                           "Primary Site - labeled: C18.7-Sigmoid colon; Radiation recode: None/Unknown")
    assert rec["label_name"] == "no/unknown" and rec["task"] == "classify"
    assert every["00000001_1"]["split"] == every["00000001_2"]["split"]  # patient-disjoint
    picked = open_converter("seer", str(tmp_path), text_columns=["Sex", "Primary Site - labeled"],
                            label_column="Radiation recode")
    rec = next(r for recs in all_records(picked).values() for r in recs if r["id"] == "00000002_1")
    assert rec["text"] == "Sex: Male; Primary Site - labeled: C34.1-Upper lobe, lung" and rec["label_name"] == "beam radiation"
    assert re.search(r"cases.csv: line 2: field 'Stage': text column not in the listing",
                     skipped(open_converter("seer", str(tmp_path), text_columns=["Stage"])))
    spec = load_dataset_spec(REPO / "datasets_spec" / "seer.yaml")
    result = build_shards("seer", str(tmp_path), str(tmp_path / "out"), spec=spec, progress=False)
    assert sum(m.samples for m in result.values()) == 33 and result["train"].access == "credentialed"


# --- NCBI BioNLP -----------------------------------------------------------------------------------

PUBTATOR = """10021369|t|Identification of APC2, a homologue of the adenomatous polyposis coli tumour suppressor.
10021369|a|The adenomatous polyposis coli (APC) tumour-suppressor protein controls the Wnt signalling pathway.
10021369\t43\t69\tadenomatous polyposis coli\tSpecificDisease\tD011125

10021416|t|Cloning of the human
10021416|a|
10021416\t0\t5\tX\tDiseaseClass\tD1
"""

BIOC = """<?xml version="1.0" encoding="UTF-8"?>
<collection><source>PubMed</source><date>2020</date><key>BioC.key</key>
  <document><id>10021369</id>
    <passage><infon key="type">title</infon><offset>0</offset><text>duplicate of the PubTator one</text></passage>
  </document>
  <document><id>2000</id>
    <passage><infon key="type">title</infon><offset>0</offset><text>Chemical   induced injury.</text></passage>
    <passage><infon key="type">abstract</infon><offset>27</offset><text>Rats were given doses.</text>
      <annotation id="1"><text>Rats</text></annotation></passage>
  </document>
</collection>"""


def test_ncbi_bionlp(tmp_path: Path):
    (tmp_path / "corpus" / "ncbi_disease").mkdir(parents=True)
    (tmp_path / "corpus" / "ncbi_disease" / "NCBItrainset_corpus.txt").write_text(PUBTATOR)
    (tmp_path / "corpus" / "zz_bc5cdr.xml.gz").write_bytes(gzip.compress(BIOC.encode()))
    (tmp_path / "corpus" / "README.md").write_text("not a corpus")
    conv = open_converter("ncbi_bionlp", str(tmp_path))
    assert conv.splits() == ["train"]
    got = records(conv, "train")
    assert [r["id"] for r in got] == ["10021369", "10021416", "2000"]
    assert got[0]["text"].startswith("Identification of APC2") and got[0]["text"].endswith("Wnt signalling pathway.")
    assert got[1]["text"] == "Cloning of the human" and got[2]["text"] == "Chemical induced injury. Rats were given doses."
    assert got[2]["corpus"] == "zz_bc5cdr.xml.gz" and got[0]["task"] == "text"
    assert conv.dropped["train"] == {"duplicate_document": 1}
    (tmp_path / "corpus" / "bad.pubtator").write_text("10021369|t|x\nfree text without a tab\n")
    assert re.fullmatch(r".*bad.pubtator: line 2: not PubTator: .*'free text without a tab'",
                        skipped(open_converter("ncbi_bionlp", str(tmp_path))))
    (tmp_path / "corpus" / "bad.pubtator").unlink()
    spec = load_dataset_spec(REPO / "datasets_spec" / "ncbi_bionlp.yaml")
    assert build_shards("ncbi_bionlp", str(tmp_path), str(tmp_path / "out"), spec=spec, progress=False)["train"].samples == 3


def test_ncbi_bionlp_defects_are_documents_and_files(tmp_path: Path, capsys):
    """A PubTator file with one malformed document among good ones, a BioC file with a document
    without its id, and a file that is not XML at all: the good documents are built, each defect is
    named (file, index, id, reason) on the console and in the manifest, and the budget decides."""
    corpus = tmp_path / "src" / "corpus"
    corpus.mkdir(parents=True)
    pubtator = PUBTATOR + ("\n30000001|t|A title\nthis line is not PubTator\n30000001|a|Its abstract.\n"
                           "30000001\t0\t1\tA\tDisease\tD1\n"
                           "\n30000002|t|After the bad one.\n30000002|a|Read again.\n")
    (corpus / "a.pubtator").write_text(pubtator)
    bad_line = pubtator.splitlines().index("this line is not PubTator") + 1
    (corpus / "b.xml").write_text(BIOC.replace("<document><id>2000</id>", "<document>"))
    (corpus / "c.xml").write_text("PMID\ttitle\n1\tnot XML\n")
    spec = load_dataset_spec(REPO / "datasets_spec" / "ncbi_bionlp.yaml")
    build = dict(spec=spec, progress=True)

    # 3 defects among 6 source records: past the default 1% budget, nothing is written
    with pytest.raises(BadRecordsError, match=r"ncbi_bionlp/train: 3 of 6 source records cannot be used, more than "
                                              r"the 0 its error budget allows \(max_bad_fraction=0.01; .*"
                                              rf"a\.pubtator: line {bad_line}: not PubTator"):
        build_shards("ncbi_bionlp", str(tmp_path / "src"), str(tmp_path / "out"), **build)
    assert not (tmp_path / "out" / "ncbi_bionlp" / "train").exists()
    capsys.readouterr()

    result = build_shards("ncbi_bionlp", str(tmp_path / "src"), str(tmp_path / "out"), max_bad_fraction=0.5, **build)
    manifest = result["train"]
    ids = [json.loads(s["json"])["id"] for shard in sorted((tmp_path / "out/ncbi_bionlp/train").glob("*.tar"))
           for s in read_shard(shard.as_posix())]
    assert sorted(ids) == ["10021369", "10021416", "30000002"] and manifest.samples == 3
    assert manifest.notes["dropped"] == {"duplicate_document": 1}  # b.xml's first document repeats a.pubtator's
    note = manifest.notes["defects"]
    assert note["count"] == 3 and note["records"] == 6 and note["allowed"] == 3
    by_file = {Path(d["file"]).name: d for d in note["skipped"]}
    assert by_file["a.pubtator"] == {
        "file": str(corpus / "a.pubtator"), "record": f"line {bad_line}", "index": bad_line, "id": "30000001",
        "reason": "not PubTator: expected 'PMID|t|title', 'PMID|a|abstract' or a tab-separated annotation, "
                  "got 'this line is not PubTator'"}
    assert by_file["b.xml"] == {"file": str(corpus / "b.xml"), "record": "document 2", "index": 1, "field": "id",
                                "reason": "missing"}
    assert by_file["c.xml"]["reason"].startswith("invalid XML at line 1") and "index" not in by_file["c.xml"]
    err = capsys.readouterr().err
    for line in (f"{corpus / 'a.pubtator'}: line {bad_line}: not PubTator",
                 f"{corpus / 'b.xml'}: document 2: field 'id': missing",
                 f"{corpus / 'c.xml'}: invalid XML at line 1"):
        assert f"ncbi_bionlp/train: skipped record: {line}" in err
    assert "3 unusable records skipped (budget 3)" in err


# --- OIA-DDR ---------------------------------------------------------------------------------------

VOC = """<annotation>
  <folder>train</folder><filename>{name}.jpg</filename>
  <size><width>200</width><height>100</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJ = "<object><name>{label}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def write_ddr(root: Path) -> None:
    det = root / "lesion_detection"
    for split, names in (("train", ["007-1", "007-2", "007-3"]), ("valid", ["008-1"])):
        (det / split / "image").mkdir(parents=True)
        (det / split / "label").mkdir(parents=True)
        for name in names:
            (det / split / "image" / f"{name}.jpg").write_bytes(tiny_jpeg(100))
            objects = "" if name == "007-3" else (OBJ.format(label="MA", x0=10, y0=20, x1=30, y1=40)
                                                  + OBJ.format(label="EX", x0=150, y0=50, x1=250, y1=90))
            (det / split / "label" / f"{name}.xml").write_text(VOC.format(name=name, objects=objects))


def test_oia_ddr(tmp_path: Path):
    write_ddr(tmp_path)
    conv = open_converter("oia_ddr", str(tmp_path))
    assert conv.splits() == ["train", "val"] and conv.native_split("val") == "valid"
    got = list(conv.records("train"))
    assert [r.id for r in got] == ["007-1", "007-2"] and conv.dropped["train"] == {"no_lesion": 1}
    rec = got[0].record
    assert rec["boxes"] == [[0.05, 0.2, 0.15, 0.4], [0.75, 0.5, 1.0, 0.9]]  # clipped to the image
    assert rec["labels"] == ["microaneurysm", "hard exudate"] and (rec["width"], rec["height"]) == (200, 100)
    assert rec["image"] == "image/007-1.jpg" and got[0].image.read() == tiny_jpeg(100)
    (tmp_path / "lesion_detection" / "train" / "image" / "007-2.jpg").unlink()
    assert re.search(r"007-2.xml: annotation: field 'filename': image '007-2.jpg' not found",
                     skipped(open_converter("oia_ddr", str(tmp_path)), "train"))
    assert [r.id for r in open_converter("oia_ddr", str(tmp_path), on_missing_image="skip").records("train")] == ["007-1"]
    (tmp_path / "lesion_detection" / "valid" / "label" / "008-1.xml").write_text(
        VOC.format(name="008-1", objects=OBJ.format(label="HE", x0="ten", y0=0, x1=1, y1=1)))
    assert re.search(r"008-1.xml: object 1: field 'xmin': expected a number, got 'ten'",
                     skipped(open_converter("oia_ddr", str(tmp_path)), "val"))


def test_oia_ddr_builds_through_its_spec(tmp_path: Path):
    write_ddr(tmp_path)
    spec = load_dataset_spec(REPO / "datasets_spec" / "oia_ddr.yaml")
    result = build_shards("oia_ddr", str(tmp_path), str(tmp_path / "out"), spec=spec, progress=False)
    assert result["train"].samples == 2 and result["val"].samples == 1
    sample = next(read_shard(next((tmp_path / "out" / "oia_ddr" / "train").glob("*.tar")).as_posix()))
    assert sample["jpg"] == tiny_jpeg(100) and json.loads(sample["json"])["task"] == "detection"
