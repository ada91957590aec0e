"""Every pretraining recipe (`jobs/pretrain/*.yaml`) runs from native sources.

Tiny releases of the recipes' 14 sources are laid out here in their native formats (image-text pairs:
IU X-ray's annotation.json, PEIR Gross's bioCaption TSVs, MedICat's jsonl; VQA: PathVQA's LXMERT files,
SLAKE's json; detection boxes: DeepLesion's DL_info.csv over 16-bit HU PNGs, OIA-DDR's Pascal VOC XML;
image folders: CheXpert-small, CytoImageNet, ISIC 2020, retinal fundus; text corpora: MIMIC-III
NOTEEVENTS.csv.gz, NCBI PubTator, PubMed sentences). `biomedgpt shards build` converts each through its
dataset spec, the image folders with VQGAN codes from the micro VQGAN fixture (`--codes`). The shipped
recipes are one recipe at three model sizes (checked: nothing else differs but name and description), so
one of them, base, is loaded as written and run with what a user on a laptop changes in a copy of it: the model
size (demo, 32 px images), a tokenizer trained on the data (the recipes name the released BPE files on
object storage), the shard and output locations, one CPU worker, one epoch, no endless retries, a loss
line per step. Nothing of `data` but `shards` changes: the sources, groups, ratios and lengths are the
recipe's own.

What is checked on the samples each run trained on (their keys, BIOMEDGPT_RECORD_SAMPLES):

- every objective the recipe's records can serve is sampled (caption, image-text matching, VQA, text and
  image infilling, detection), each trained sample's objective being the pretraining family's seeded
  draw for that record and epoch. Grounding and grounded captioning are not among them: they need a
  caption record with one box, or detection records whose objectives include them, and neither the 14
  sources nor the recipes give those;
- the mixture: per 8 image-text rows 2 text, 1 image and 1 detection row (`data.group_ratios`). The
  tolerance is exact, not statistical: the run trains one whole epoch (its rows a multiple of the batch,
  so the stream drops none), and the epoch's plan takes each grouped dataset's shards `weight` times,
  the fractional part rounded to whole shards. With one sample per shard, each dataset of a group is off
  by at most half a row, so group g's rows are within 0.5 x (its datasets) of ratio_g x R, R the
  image-text rows (all read once). Rows the stream dropped at the epoch's end would add to that bound;
  the test asserts there are none;
- image infilling trains on the computed codes: every image row trained is image infilling and has its
  `codes.npy`, every image source's manifest names the micro VQGAN's weights, and a trained image's codes
  are that VQGAN's argmax codes of its centre;
- the loss is finite at every step and the run exports a model.

One local Ray and one shard build serve every recipe (module fixtures).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixture_files import fixture
from PIL import Image

from biomedgpt.cli import main
from biomedgpt.data.dataset_spec import load_dataset_spec
from biomedgpt.data.shards import read_shard
from biomedgpt.data.stream import _augment_seed  # the epoch's seed the stream gives each row: the objective's salt
from biomedgpt.model.vqgan import VQGANTokenizer, convert_taming_checkpoint
from biomedgpt.runner import run
from biomedgpt.session import ensure_ray
from biomedgpt.spec import spec_from_dict
from biomedgpt.tasks import get_task
from tests_paths import REPO

RECIPES = sorted((REPO / "jobs" / "pretrain").glob("*.yaml"))
#: Training rows of each source in the tiny releases. Image-text R = 32 rows; the text group has 16 rows for
#: its 8 per epoch (weight 0.5), image 8 for 4 (0.5), detection 3 for 4 (4/3: repeated): one epoch is
#: 32 + 8 + 4 + 4 = 48 rows, 2 batches of the recipes' 24.
ROWS = {"iu_xray": 8, "peir_gross": 6, "medicat": 6, "pathvqa": 6, "slake": 6,
        "mimic_iii_notes": 6, "ncbi_bionlp": 4, "pubmed_abstracts": 6,
        "chexpert_small": 3, "cytoimagenet": 2, "isic_2020": 2, "retinal_fundus": 1,
        "deeplesion": 2, "oia_ddr": 1}
EPOCH_ROWS = 48
WORDS = ("left lung right heart small large opacity normal effusion nodule liver kidney mass tissue cells "
         "chest film shows mild severe no sign of the a patient pain fever cough lesion tumour").split()


# ---------------------------------------------------------------------------------------------------
# Tiny native releases
# ---------------------------------------------------------------------------------------------------


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def picture(rng: np.random.Generator, path: Path, size: tuple[int, int] = (40, 48), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def lay_out_sources(root: Path) -> dict[str, Path]:
    """The 14 sources in their release layouts under `root`; {dataset: --source folder}."""
    rng = np.random.default_rng(19)
    src = {d: root / d for d in ROWS}

    # image-text pairs
    studies = [{"id": f"CXR{i}_IM-{i:04d}", "report": words(rng, 9).capitalize() + ".",
                "image_path": [f"CXR{i}_IM-{i:04d}/0.png", f"CXR{i}_IM-{i:04d}/1.png"], "split": "train"}
               for i in range(ROWS["iu_xray"])]
    for s in studies:
        picture(rng, src["iu_xray"] / "images" / s["image_path"][0], mode="L")
    (src["iu_xray"] / "annotation.json").write_text(json.dumps({"train": studies}))
    peir = src["peir_gross"]
    n_tsv = next(n for n in range(99) if n - round(0.2 * n) == ROWS["peir_gross"])  # the spec's val_fraction 0.2
    (peir / "peir_gross_images").mkdir(parents=True)
    lines = []
    for i in range(n_tsv):
        picture(rng, peir / "peir_gross_images" / f"PEIR_gross_{i}.jpg")
        lines.append(f"PEIR_gross_{i}.jpg\t{words(rng, 2).capitalize()}: {words(rng, 5)}")
    (peir / "train_images.tsv").write_text("\n".join(lines) + "\n")
    picture(rng, peir / "peir_gross_images" / "PEIR_gross_900.jpg")
    (peir / "test_images.tsv").write_text("PEIR_gross_900.jpg\tKidney: infarct\n")
    figures = [{"pdf_hash": f"h{i:03d}", "fig_uri": f"{i}-Figure1-1.png",
                "s2_caption": f"Figure {i}. {words(rng, 8).capitalize()}."} for i in range(ROWS["medicat"])]
    for f in figures:
        picture(rng, src["medicat"] / "figures" / f"{f['pdf_hash']}_{f['fig_uri']}")
    (src["medicat"] / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl").write_text(
        "\n".join(json.dumps(f) for f in figures) + "\n")

    # VQA: 3 questions per image
    pvqa = []
    for i in range(ROWS["pathvqa"] // 3):
        img_id = f"train_{i:04d}"
        picture(rng, src["pathvqa"] / "images" / "train" / f"{img_id}.jpg")
        pvqa.append({"img_id": img_id, "labelf": {"pvqa": [{"yes": 1}, {words(rng, 2): 1}, {"no": 1}]},
                     "sentf": {"pvqa": [f"is there {words(rng, 2)}?", f"what does the {words(rng, 1)} show?",
                                        f"is this {words(rng, 1)}?"]}})
    (src["pathvqa"] / "pvqa_train.json").write_text(json.dumps(pvqa))
    slake = []
    for i in range(ROWS["slake"]):
        img = i // 3 + 1
        if i % 3 == 0:
            picture(rng, src["slake"] / "imgs" / f"xmlab{img}" / "source.jpg", mode="L")
        closed = i % 2 == 0
        slake.append({"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": f"Is there {words(rng, 2)}?",
                      "answer": "Yes" if closed else words(rng, 1).capitalize(), "q_lang": "en", "location": "Lung",
                      "modality": "CT", "answer_type": "CLOSED" if closed else "OPEN", "base_type": "vqa",
                      "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": i})
    (src["slake"] / "train.json").write_text(json.dumps(slake))

    # text corpora
    src["mimic_iii_notes"].mkdir(parents=True)
    header = "ROW_ID,SUBJECT_ID,HADM_ID,CHARTDATE,CHARTTIME,STORETIME,CATEGORY,DESCRIPTION,CGID,ISERROR,TEXT\n"
    notes = header + "".join(
        f'{100 + i},{2000 + i},{3000 + i},2151-08-04,,,Radiology,Report,,,"FINDINGS: {words(rng, 12)}.\n'
        f'IMPRESSION: {words(rng, 6)}."\n' for i in range(ROWS["mimic_iii_notes"]))
    (src["mimic_iii_notes"] / "NOTEEVENTS.csv.gz").write_bytes(gzip.compress(notes.encode()))
    docs = "".join(f"{10021000 + i}|t|{words(rng, 6).capitalize()}.\n{10021000 + i}|a|{words(rng, 20).capitalize()}.\n"
                   f"{10021000 + i}\t0\t4\tword\tDisease\tD0001\n\n" for i in range(ROWS["ncbi_bionlp"]))
    (src["ncbi_bionlp"] / "corpus" / "ncbi_disease").mkdir(parents=True)
    (src["ncbi_bionlp"] / "corpus" / "ncbi_disease" / "NCBItrainset_corpus.txt").write_text(docs)
    src["pubmed_abstracts"].mkdir(parents=True)
    (src["pubmed_abstracts"] / "pubmed_uncased_sentence_nltk.txt").write_text(
        "".join(f"{words(rng, 10)} .\n" for _ in range(ROWS["pubmed_abstracts"])))

    # image folders
    for i in range(ROWS["chexpert_small"]):
        view = src["chexpert_small"] / "train" / f"patient{i:05d}" / "study1" / "view1_frontal.jpg"
        picture(rng, view, (48, 56), "L")
    picture(rng, src["chexpert_small"] / "valid" / "patient99999" / "study1" / "view1_frontal.jpg", mode="L")
    for i in range(ROWS["cytoimagenet"]):
        picture(rng, src["cytoimagenet"] / ("nucleus" if i % 2 else "mitochondria") / f"img{i}.png")
    for i in range(ROWS["isic_2020"]):
        picture(rng, src["isic_2020"] / "ISIC_2020_Training_JPEG" / "train" / f"ISIC_{i:07d}.jpg")
    for i in range(ROWS["retinal_fundus"]):
        picture(rng, src["retinal_fundus"] / "train" / f"{i + 1}_{'left' if i % 2 else 'right'}.jpeg")

    # boxes: DeepLesion key slices (16-bit PNG, HU + 32768), OIA-DDR Pascal VOC
    rows = []
    for i in range(ROWS["deeplesion"]):
        series = f"{i + 1:06d}_01_01"
        hu = rng.integers(-1000, 400, (64, 64)).astype(np.int64)
        (src["deeplesion"] / "Images_png" / series).mkdir(parents=True)
        Image.fromarray((hu + 32768).astype(np.uint16)).save(src["deeplesion"] / "Images_png" / series / "050.png")
        rows.append(f'{series}_050.png,{i + 1},1,1,50,"1,2,3,4","{8 + i}, 10, {30 + i}, 40","11.2, 9.8",'
                    f'"0.4, 0.2, 0.5",{i % 8 + 1},0,"40, 60","0.78, 0.78, 5","64, 64","-175, 275",F,51,1\n')
    (src["deeplesion"] / "DL_info.csv").write_text(
        "File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
        "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
        "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test\n" + "".join(rows))
    det = src["oia_ddr"] / "lesion_detection" / "train"
    for i in range(ROWS["oia_ddr"]):
        picture(rng, det / "image" / f"007-{i}.jpg", (50, 40))
        (det / "label").mkdir(parents=True, exist_ok=True)
        (det / "label" / f"007-{i}.xml").write_text(
            f"<annotation><folder>train</folder><filename>007-{i}.jpg</filename><size><width>50</width>"
            "<height>40</height><depth>3</depth></size><object><name>MA</name><bndbox><xmin>5</xmin><ymin>6</ymin>"
            "<xmax>20</xmax><ymax>30</ymax></bndbox></object><object><name>EX</name><bndbox><xmin>25</xmin>"
            "<ymin>10</ymin><xmax>45</xmax><ymax>35</ymax></bndbox></object></annotation>")
    return src


# ---------------------------------------------------------------------------------------------------
# Fixtures: one shard build, one Ray session
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqgan") / "micro"
    convert_taming_checkpoint(fixture("vqgan/micro_vqgan_gumbel.npz"), out, config=fixture("vqgan/config.yaml"))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vqgan_dir) -> Path:
    """`biomedgpt shards build` of every source (train split); image folders with codes. The grouped sources
    (text, image, detection) are cut one sample per shard, so that an epoch's plan takes their rows to the
    row; an image-text source is one shard (read whole every epoch: the batch context of image-text
    matching's negatives is its rows). Fewer shards, fewer read tasks: the stream reads ahead at least
    4,096 rows, i.e. ~85 of these epochs, whatever the run trains."""
    root = tmp_path_factory.mktemp("pretrain-native")
    sources = lay_out_sources(root / "sources")
    out = root / "shards"
    for dataset, source in sources.items():
        spec = REPO / "datasets_spec" / f"{dataset}.yaml"
        task = load_dataset_spec(spec).task
        codes = ["--codes", str(vqgan_dir)] if task == "image" else []
        per_shard = "1" if task in ("text", "image", "detection") else "100"
        argv = ["shards", "build", dataset, "--source", str(source), "--out", str(out), "--split", "train",
                "--spec", str(spec), "--shard-max-samples", per_shard, "--quiet", *codes]
        assert main(argv) == 0, argv
        manifest = json.loads((out / dataset / "train" / "manifest.json").read_text())
        assert sum(e["samples"] for e in manifest["shards"]) == ROWS[dataset], dataset
    return out


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One local Ray for every recipe; its workers record the keys of every batch they train on."""
    import ray  # here: ensure_ray sets Ray's environment before Ray is imported

    samples = tmp_path_factory.mktemp("trained-samples")
    saved = {v: os.environ.get(v) for v in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "BIOMEDGPT_RECORD_SAMPLES")}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(var, None)
    os.environ["BIOMEDGPT_RECORD_SAMPLES"] = str(samples)  # Ray's worker processes inherit it from here
    started = ensure_ray(num_cpus=2)
    try:
        yield samples / "rank0.jsonl"
    finally:
        if started:
            ray.shutdown()
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def shard_rows(shards: Path, dataset: str) -> dict[str, dict]:
    """{key: sample} of a dataset's train shards."""
    return {s["__key__"]: s for tar in sorted((shards / dataset / "train").glob("*.tar"))
            for s in read_shard(str(tar))}


# ---------------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------------


def test_the_recipes_read_every_pretraining_source_family():
    """The shipped recipes' sources, by the task of their dataset specs: image-text pairs, VQA, boxes, image
    folders and text corpora; every source has a converter (so builds from its native release)."""
    assert [p.name for p in RECIPES] == ["base.yaml", "medium.yaml", "small.yaml"]
    for recipe in RECIPES:
        train = yaml.safe_load(recipe.read_text())["data"]["train"]
        specs = {ref["dataset"]: load_dataset_spec(REPO / "datasets_spec" / f"{ref['dataset']}.yaml") for ref in train}
        assert set(specs) == set(ROWS), recipe.name
        assert {s.task for s in specs.values()} == {"caption", "vqa", "detection", "image", "text"}, recipe.name
        assert all(s.source.converter for s in specs.values()), recipe.name
    # the recipes are one recipe at three sizes: what the run below proves for one, it proves for all
    def rest(recipe: Path) -> dict:
        data = yaml.safe_load(recipe.read_text())
        data.pop("name"), data.pop("description"), data["model"].pop("size")
        return data
    assert all(rest(r) == rest(RECIPES[0]) for r in RECIPES[1:])


def user_copy(recipe: Path, shards: Path, out: Path) -> dict:
    """The recipe as a user on a laptop edits a copy of it: everything else as written."""
    data = yaml.safe_load(recipe.read_text())
    data["model"].update(size="demo", image_size=32, tokenizer={"train_vocab_size": 300})
    data["data"]["shards"] = str(shards)
    data["trainer"].update(workers=1, use_gpu=False, cpus_per_worker=1, precision="32-true", epochs=1,
                           max_failures=0, log_every=1)
    data["output"]["storage"] = str(out)
    return data


@pytest.mark.slow(seconds=35)
def test_recipe_pretrains_from_native_sources(shards, vqgan_dir, ray_session, tmp_path):
    """jobs/pretrain/base.yaml (the others differ from it only in name and model size, see above)."""
    recipe = REPO / "jobs" / "pretrain" / "base.yaml"
    written = yaml.safe_load(recipe.read_text())
    edited = user_copy(recipe, shards, tmp_path / "runs")
    assert {k: v for k, v in edited["data"].items() if k != "shards"} == \
        {k: v for k, v in written["data"].items() if k != "shards"}  # sources, groups, ratios, lengths as shipped
    spec = spec_from_dict(edited, str(recipe))
    recorded = ray_session
    before = recorded.read_text().count("\n") if recorded.exists() else 0
    res = run(spec)  # what `biomedgpt run` does with the spec: admit, then train, export
    run_dir = Path(res.run_dir)

    # trained: one epoch, a finite loss at every step, an export
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
              if r.get("train/loss")]
    batch = spec.trainer.batch_size
    assert len(losses) == EPOCH_ROWS // batch and all(np.isfinite(losses)), losses
    assert (run_dir / "export" / "model.safetensors").is_file()

    # the samples of those steps, each with the objective the pretraining family drew for it in its epoch
    lines = [json.loads(line) for line in recorded.read_text().splitlines()[before:]]
    assert [line["step"] for line in lines] == list(range(1, len(losses) + 1))
    rows = {}
    for ref in spec.data.train:
        for key, sample in shard_rows(shards, ref.dataset).items():
            rows[key] = (ref, sample)
    task = get_task("pretrain", seed=spec.trainer.seed)
    trained, objectives = Counter(), Counter()
    image_rows = []
    for line in lines:
        for key in line["keys"]:
            ref, sample = rows[key]
            record = json.loads(sample["json"])
            objective = task.choose(record, codes=sample.get("codes.npy"),
                                    salt=_augment_seed(spec.trainer.seed, line["epoch"]))
            trained[ref.group or "image_text"] += 1
            objectives[objective] += 1
            if record["task"] == "image":
                assert objective == "image_infilling", key
                image_rows.append(sample)
    assert sum(trained.values()) == len(losses) * batch == EPOCH_ROWS  # the whole epoch: no row dropped

    # every objective the recipe's records can serve was sampled
    servable = set()
    for ref, sample in rows.values():
        servable |= set(task.supported(json.loads(sample["json"]), codes=sample.get("codes.npy")))
    assert servable >= {"caption", "itm", "vqa", "text_infilling", "image_infilling", "detection"}
    assert set(objectives) == servable, (objectives, servable)

    # the mixture: per image-text row, ratio_g rows of group g, within half a row per dataset of the group
    reference = sum(ROWS[ref.dataset] for ref in spec.data.train if ref.group is None)
    assert trained["image_text"] == reference
    assert spec.data.group_ratios == {"text": 0.25, "image": 0.125, "detection": 0.125}
    for group, ratio in spec.data.group_ratios.items():
        members = sum(1 for ref in spec.data.train if ref.group == group)
        assert abs(trained[group] - ratio * reference) <= 0.5 * members, (group, trained, reference)

    # image infilling trained on the codes the build computed with the micro VQGAN (its weights' sha256 in
    # every image manifest); one trained image re-encoded here (the build's codes are tested in
    # tests/tasks/test_image_infilling_codes.py)
    assert image_rows and all("codes.npy" in s for s in image_rows)
    sha = json.loads((vqgan_dir / "config.json").read_text())["weights_sha256"]
    for ref in spec.data.train:
        if ref.group == "image":
            note = json.loads((shards / ref.dataset / "train" / "manifest.json").read_text())["notes"]["codes"]
            assert note["weights_sha256"] == sha and note["grid"] == [16, 16], (ref.dataset, note)
    first = image_rows[0]
    (codes,) = VQGANTokenizer.from_pretrained(vqgan_dir, device="cpu").encode([first.get("jpg") or first.get("png")])
    stored = np.load(io.BytesIO(first["codes.npy"]), allow_pickle=False)
    assert stored.shape == (16, 16) and np.array_equal(stored, codes)
