"""README "Your own data", end to end: a folder of images (PNG and DICOM) and the README's CSV, the
README's `biomedgpt datasets new` (first refused as the README says, then as written) and `biomedgpt shards
build` lines run as written, the README's grant in a copy of cluster/tenants.yaml admitting the README's
fine-tuning spec, and that spec run for a few steps (a tiny model from scratch) on the shards built."""

from __future__ import annotations

import csv
import json
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from biomedgpt.cli import main
from data_testing import tiny_png, write_dicom
from tests_paths import REPO

README = (REPO / "README.md").read_text()
_START = README.index("## Your own data")
SECTION = README[_START:README.index("\n## ", _START + 1)]  # up to the next top-level section


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", SECTION, flags=re.S)


def lines(prefix: str) -> list[str]:
    return [ln.strip() for b in blocks("bash") for ln in b.splitlines() if ln.strip().startswith(prefix)]


@pytest.fixture()
def department(tmp_path: Path, monkeypatch) -> Path:
    """tmp_path as the working directory, holding chest_qa/: the README's CSV rows plus more of the same
    shape, their images (PNG and DICOM), and one row whose image is missing."""
    monkeypatch.chdir(tmp_path)
    readme_csv = blocks("text")[0]
    rows = list(csv.DictReader(readme_csv.splitlines()))
    assert [r["image"] for r in rows] == ["images/c001.png", "images/c002.dcm"]
    answers = ["yes", "no", "left upper lobe", "right lung"]
    for i in range(3, 41):
        rows.append({"case": f"c{i:03d}", "image": f"images/c{i:03d}.png", "Question": f"is finding {i % 4} present",
                     "Finding": answers[i % 4], "split": "test" if i % 5 == 0 else "train"})
    folder = tmp_path / "chest_qa"
    (folder / "images").mkdir(parents=True)
    for r in rows:
        if r["image"].endswith(".dcm"):
            write_dicom(folder / r["image"], np.array([[0, 500], [1000, 1500]], dtype=np.uint16))
        elif r["case"] != "c039":  # one image missing: a defect the build names
            (folder / r["image"]).write_bytes(tiny_png(int(r["case"][1:]) * 5))
    with open(folder / "qa.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


@pytest.mark.slow(seconds=31)
def test_readme_own_data_from_folder_and_csv_to_a_fine_tuning_run(department: Path, capsys):
    new, = lines("biomedgpt datasets new")
    build, = lines("biomedgpt shards build")
    # without the answer's column, refused as the README quotes it
    args = shlex.split(new)[1:]
    i = args.index("--map")
    assert main(args[:i] + args[i + 2:]) == 2
    quoted = re.search(r"\(`(cannot infer which column holds answer.*?)`\)", SECTION.replace("\n", " ")).group(1)
    assert quoted in capsys.readouterr().err
    # as written
    assert main(args) == 0
    out = capsys.readouterr()
    spec = yaml.safe_load((department / "datasets_spec" / "chest_qa.yaml").read_text())
    assert spec["source"]["converter"] == "manifest_vqa" and spec["access"] == "credentialed"
    assert spec["source"]["manifest"]["columns"] == {"answer": "Finding", "image": "image", "question": "Question",
                                                     "id": "case"}
    assert spec["source"]["manifest"]["location"] == "../chest_qa"
    assert "image <- column 'image'" in out.err
    # the shards, from the spec alone (no --source): the missing image is 1 of 31 train rows, more than 1%
    assert main(shlex.split(build)[1:] + ["--quiet"]) == 2
    assert "images/c039.png' not found" in capsys.readouterr().err
    assert main(shlex.split(build)[1:] + ["--quiet", "--max-bad-fraction", "0.1"]) == 0
    assert "chest_qa/train: 30 samples" in capsys.readouterr().out
    train = department / "runs/shards/chest_qa/train"
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["licence"] == "internal use by the radiology department only"
    assert manifest["notes"]["defects"]["count"] == 1
    members = {}
    with tarfile.open(next(train.glob("*.tar"))) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    assert members["chest_qa-c001.json"] and members["chest_qa-c001.png"] == (department / "chest_qa/images/c001.png").read_bytes()
    assert json.loads(members["chest_qa-c001.json"])["answer_type"] == "closed"
    test_members = tarfile.open(next((department / "runs/shards/chest_qa/test").glob("*.tar"))).getnames()
    assert "chest_qa-c002.png" in test_members  # the DICOM row, as PNG

    # the README's grant, in a copy of the shipped tenants file, admits the README's fine-tuning spec
    from biomedgpt.spec import spec_from_dict
    from biomedgpt.tenancy import admit, load_tenants

    grant_block, job_block = blocks("yaml")
    grant = yaml.safe_load(grant_block)
    tenants = yaml.safe_load((REPO / "cluster" / "tenants.yaml").read_text())
    tenants["datasetSpecs"] = str(department / "datasets_spec")
    tenants["credentials"].update(grant["credentials"])
    radiology = tenants["institutions"]["stanford-like"]["departments"]["radiology"]
    commented = yaml.safe_load("\n".join(ln.split("#", 1)[1] for ln in grant_block.splitlines()
                                         if ln.startswith("#   ")))
    radiology["credentials"] = commented["credentials"]
    radiology["datasets"] = commented["datasets"]
    (department / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    job = yaml.safe_load(job_block)
    admit(spec_from_dict(job, "chest_qa_ft.yaml"), load_tenants(department / "tenants.yaml"))
    with pytest.raises(Exception, match="chest_qa"):  # the shipped policy does not grant it
        admit(spec_from_dict(job, "chest_qa_ft.yaml"), load_tenants(REPO / "cluster" / "tenants.yaml"))

    # and it trains on the shards: the README's spec with a tiny model from scratch, a few steps
    from biomedgpt.runner import run_training

    job["model"] = {"size": "demo", "image_size": 32, "tokenizer": {"train_vocab_size": 300}}
    job["data"]["shards"] = str(department / "runs/shards")
    job["trainer"].update(max_steps=2, batch_size=4, checkpoint_every=0, log_every=1, cpus_per_worker=1)
    job["evaluate"] = {"enabled": False}
    job["output"]["storage"] = str(department / "runs/own")
    result = run_training(spec_from_dict(job, "chest_qa_ft.yaml"), num_cpus=2)
    export = Path(result.run_dir) / "export"
    assert (export / "model.safetensors").is_file()
    candidates = json.loads((export / "candidates.json").read_text())["vqa"]
    assert {"yes", "no", "left upper lobe"} <= set(candidates)
