"""Caption and report pairs for the metric tests, and the reference scorers (pycocoevalcap, Java)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

# Handwritten prediction / references pairs in the style of radiology reports (IU X-ray, MIMIC-CXR),
# radiology figure captions (ROCO) and pathology captions (PEIR Gross, PathVQA): punctuation, numbers,
# units, abbreviations, brackets, quotes, mixed case, one to three references.
HANDWRITTEN_PAIRS: list[tuple[str, list[str]]] = [
    ("The heart is normal in size. The lungs are clear.",
     ["Heart size is normal. Lungs are clear bilaterally.", "The cardiac silhouette is within normal limits."]),
    ("No acute cardiopulmonary abnormality.", ["No acute cardiopulmonary disease."]),
    ("Mild cardiomegaly. No pleural effusion or pneumothorax.",
     ["Mild enlargement of the cardiac silhouette; no pleural effusion, no pneumothorax.",
      "Cardiomegaly (mild). No effusion."]),
    ("Left lower lobe opacity, likely atelectasis vs. pneumonia.",
     ["Left basilar opacity which may represent atelectasis or pneumonia."]),
    ("Degenerative changes of the thoracic spine.", ["Degenerative changes are present in the thoracic spine."]),
    ("Stable 5 mm nodule in the right upper lobe (series 3, image 45).",
     ["5-mm right upper lobe nodule, unchanged since 2012.", "Stable 5mm RUL nodule."]),
    ("Axial CT image showing a 3.5 x 2.1 cm hypodense lesion in segment VII of the liver (arrow).",
     ["Contrast-enhanced CT (axial) shows a 3.5 cm hypodense hepatic lesion (arrow).",
      "CT abdomen: 35 x 21 mm low-attenuation mass, liver segment 7."]),
    ("T2-weighted MRI demonstrating a hyperintense mass at L4-L5.",
     ["Sagittal T2-weighted MR image shows a hyperintense lesion at the L4/L5 level."]),
    ("Chest X-ray: bilateral infiltrates, worse on the right.",
     ["Chest radiograph shows bilateral pulmonary infiltrates, more pronounced on the right side."]),
    ("Ultrasound shows a 12-mm gallstone with posterior acoustic shadowing.",
     ["US: gallstone (1.2 cm) with acoustic shadow.", "Cholelithiasis; a 12 mm stone is seen."]),
    ("Gross photograph of the kidney with multiple cysts.",
     ["Polycystic kidney: gross specimen showing numerous cysts of varying size."]),
    ("Liver, cirrhosis, micronodular, gross.", ["Micronodular cirrhosis of the liver, gross specimen."]),
    ("Lung with anthracotic pigment deposition; emphysema.",
     ["Lung: anthracosis and centrilobular emphysema (gross)."]),
    ("Heart: left ventricular hypertrophy, wall thickness 2.5 cm (normal, 1-1.5 cm).",
     ["Marked concentric left ventricular hypertrophy; the wall measures 2.5 cm.",
      "LVH with a 25-mm thick left ventricular wall."]),
    ("H&E stain, x400: sheets of atypical cells with high N/C ratio.",
     ["High-power view (H&E, 400x) showing atypical cells with increased nuclear-to-cytoplasmic ratio."]),
    ("Brain, glioblastoma multiforme, gross: hemorrhagic, necrotic mass crossing the corpus callosum.",
     ["Glioblastoma ('butterfly' tumor) crossing the corpus callosum; necrosis and hemorrhage."]),
    ("The patient's lungs are hyperinflated, consistent with COPD.",
     ["Hyperinflated lungs, compatible with chronic obstructive pulmonary disease."]),
    ("There's no evidence of free air under the diaphragm.", ["No free intraperitoneal air."]),
    ("Fracture of the left 5th and 6th ribs.", ["Acute fractures of the left fifth and sixth ribs."]),
    ("Post-operative changes; sternotomy wires are intact.",
     ["Status post median sternotomy with intact sternal wires.", "Sternotomy wires in place."]),
    ("Figure 2. PET/CT (18F-FDG) with SUVmax = 8.4 in the mediastinal nodes.",
     ["FDG PET-CT: hypermetabolic mediastinal lymph nodes (SUV max 8.4)."]),
    ("MRI of the knee shows a tear of the medial meniscus (white arrowhead).",
     ["Sagittal proton density image: medial meniscal tear (arrowhead)."]),
    ("Normal chest.", ["No acute disease.", "Normal chest x-XXXX."]),
    ("Small right pleural effusion; no focal consolidation.",
     ["Small right-sided pleural effusion. No consolidation.", "Trace R effusion."]),
    ("Endometrium, adenocarcinoma, well differentiated.", ["Well-differentiated endometrioid adenocarcinoma."]),
    ("Colon: multiple polyps (familial adenomatous polyposis), gross.",
     ["Familial polyposis coli - hundreds of adenomatous polyps in the colon."]),
    ("Skin: melanoma, 1.2 mm thick (Breslow), Clark level IV.",
     ["Cutaneous malignant melanoma; Breslow thickness 1.2 mm; Clark level IV."]),
    ("Aorta, atherosclerosis, severe, with ulcerated plaques!",
     ["Severe aortic atherosclerosis with ulcerated plaques and mural thrombi."]),
    ("CT angiography: aneurysm of the A-comm artery, 7 mm.",
     ["CTA demonstrating a 7-mm anterior communicating artery aneurysm."]),
    ("\"Bat-wing\" perihilar opacities - pulmonary edema?",
     ["Perihilar 'bat wing' opacities consistent with pulmonary edema."]),
    ("Kidney; renal cell carcinoma (clear cell type), 6 cm.",
     ["Renal cell carcinoma, clear-cell, measuring 6 cm, with hemorrhage and necrosis."]),
    ("XXXX opacity in the right lung base, which may represent atelectasis.",
     ["Right basilar opacity, XXXX atelectasis."]),
]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _data_pairs(dev_data: Path) -> list[tuple[str, list[str]]]:
    """Report/caption pairs from the IU X-ray and ROCO subsets of tests/fixtures/data. The prediction is a model-like
    variation of the reference (sentences dropped, swapped in from another study, words dropped), so
    that the scores fall in the range real models reach; some samples get a second reference."""
    rng = random.Random(7)
    reports = [r["report"] for split in json.loads((dev_data / "iu_xray" / "dev.json").read_text()).values()
               for r in split if r["report"].strip()]
    captions = [line.split("\t", 1)[1].strip()
                for line in (dev_data / "roco" / "dev_captions.txt").read_text(encoding="utf-8").splitlines()
                if "\t" in line]
    pairs = []
    for pool, count in ((reports, 60), (captions, 40)):
        chosen = rng.sample(range(len(pool)), count)
        for k, i in enumerate(chosen):
            reference = pool[i]
            other = pool[chosen[(k + 1) % count]]
            sentences = _sentences(reference)
            if len(sentences) > 1 and rng.random() < 0.5:
                sentences.pop(rng.randrange(len(sentences)))
            if rng.random() < 0.5:
                sentences.append(rng.choice(_sentences(other)))
            words = " ".join(sentences).split()
            words = [w for w in words if rng.random() > 0.1] or words[:1]
            refs = [reference] + ([other] if rng.random() < 0.3 else [])
            pairs.append((" ".join(words), refs))
    return pairs


@pytest.fixture(scope="session")
def caption_pairs(dev_data: Path) -> list[tuple[str, list[str]]]:
    return HANDWRITTEN_PAIRS + _data_pairs(dev_data)


@pytest.fixture(scope="session")
def reference_meteor():
    """pycocoevalcap's METEOR wrapper (its own jar process, started once)."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    yield meteor
    meteor.meteor_p.kill()  # it has no close(); its __del__ copes with a process already gone
    meteor.meteor_p.wait()


@pytest.fixture(scope="session")
def our_meteor():
    from biomedgpt.metrics.meteor import Meteor

    with Meteor() as meteor:
        yield meteor


@pytest.fixture(scope="session")
def coco_tokenized(caption_pairs) -> tuple[dict, dict]:
    """(tokenised references, tokenised predictions) of `caption_pairs` by pycocoevalcap's
    PTBTokenizer (Java), keyed by sample index."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(caption_pairs)}
    res = {i: [{"caption": pred}] for i, (pred, _) in enumerate(caption_pairs)}
    tokenizer = PTBTokenizer()
    return tokenizer.tokenize(gts), tokenizer.tokenize(res)


# --- the evaluation job: shards of five task families and a demo-size model --------------------------

REPO = Path(__file__).resolve().parents[2]
VQA_RAD_SAMPLE = REPO / "datasets_spec" / "samples" / "vqa_rad"

# MedNLI is credentialed (PhysioNet): records in its release format (mli_*_v1.jsonl), written here.
MEDNLI_ROWS = [
    ("Labs were notable for Cr 1.7 (baseline 0.5 per old records) and lactate 2.4.", "Patient has elevated Cr", "entailment"),
    ("No history of blood clots.", "Patient has a DVT", "contradiction"),
    ("Family history of diabetes.", "Patient is obese", "neutral"),
    ("He was febrile to 102.4 on admission.", "The patient had a fever", "entailment"),
    ("Chest x-ray showed no infiltrate.", "The patient has pneumonia", "contradiction"),
    ("She takes metformin for type 2 diabetes.", "The patient has high blood pressure", "neutral"),
]
# MeQSum in BiomedGPT's headerless test.tsv layout (question<TAB>summary).
MEQSUM_ROWS = [
    ("SUBJECT: lupus. MESSAGE: I was diagnosed with lupus last year, what are the side effects of hydroxychloroquine?",
     "What are the side effects of hydroxychloroquine?"),
    ("My father has Parkinson's disease. Is there any new treatment that can slow it down?",
     "What are the treatments for Parkinson's disease?"),
    ("SUBJECT: metformin. MESSAGE: can metformin cause vitamin b12 deficiency? I have been taking it for 5 years.",
     "Can metformin cause vitamin B12 deficiency?"),
    ("Hello, my son has a peanut allergy. How do I know if he is having anaphylaxis?",
     "What are the signs of anaphylaxis?"),
    ("I have had a dry cough for three weeks after a cold. When should I worry and see a doctor?",
     "When should a persistent cough be evaluated by a doctor?"),
    ("SUBJECT: shingles vaccine. MESSAGE: I am 62 and had chickenpox as a child. Should I get the shingles vaccine?",
     "Who should get the shingles vaccine?"),
]


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory, dev_data: Path) -> str:
    """One shard root with five task families from real small data: VQA-RAD (vqa, the shipped sample),
    IU X-ray (caption: the first 12 test studies of the R2Gen annotation in tests/fixtures/data, with PNG
    views made from the VQA-RAD sample's radiographs), PneumoniaMNIST (classify, the .npz subset), MedNLI (nli)
    and MeQSum (summarize). Small shards, so that datasets span several."""
    from PIL import Image

    from biomedgpt.data.build import build_shards

    root = tmp_path_factory.mktemp("eval-shards")
    src = tmp_path_factory.mktemp("eval-sources")
    build_shards("vqa_rad", str(VQA_RAD_SAMPLE), str(root), shard_max_samples=40, progress=False)

    studies = json.loads((dev_data / "iu_xray" / "dev.json").read_text())["test"][:12]
    (src / "iu_xray").mkdir()
    (src / "iu_xray" / "annotation.json").write_text(json.dumps({"test": studies}))
    jpgs = sorted((VQA_RAD_SAMPLE / "VQA_RAD Image Folder").glob("*.jpg"))
    for i, rel in enumerate(p for s in studies for p in s["image_path"]):
        target = src / "iu_xray" / "images" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(jpgs[i % len(jpgs)]) as img:
            img.convert("L").resize((64, 64)).save(target, format="PNG")
    build_shards("iu_xray", str(src / "iu_xray"), str(root), ["test"], shard_max_samples=5, progress=False)

    build_shards("pneumoniamnist", str(dev_data / "medmnist"), str(root), ["val"], files={"npz": "dev.npz"},
                 shard_max_samples=100, progress=False)

    (src / "mednli").mkdir()
    (src / "mednli" / "mli_test_v1.jsonl").write_text("".join(
        json.dumps({"sentence1": a, "sentence2": b, "gold_label": g, "pairID": f"p{i}"}) + "\n"
        for i, (a, b, g) in enumerate(MEDNLI_ROWS)))
    build_shards("mednli", str(src / "mednli"), str(root), progress=False)

    (src / "meqsum").mkdir()
    (src / "meqsum" / "test.tsv").write_text("".join(f"{q}\t{s}\n" for q, s in MEQSUM_ROWS))
    build_shards("meqsum", str(src / "meqsum"), str(root), progress=False)
    return str(root)


@pytest.fixture(scope="session")
def eval_model_dir(demo_tokenizer_dir, tmp_path_factory) -> str:
    """A demo-size model (random weights, seed 0) saved with the demo tokenizer, as `biomedgpt export`
    lays a model directory out."""
    import torch

    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer

    tok = BiomedGPTTokenizer.from_pretrained(demo_tokenizer_dir)
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_size("demo", vocab_size=len(tok)))
    out = tmp_path_factory.mktemp("eval-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ChestMNIST (multi-label): the positive classes of each test image of the small .npz the fixture writes
# (class indices of MedMNIST's 14 findings). Classes 0, 2, 3, 4 and 13 occur (each with negatives too); the
# other nine never do, so their ROC AUC is undefined and left out of the mean.
CHESTMNIST_TEST_LABELS = [[], [0, 2], [2], [], [0], [4, 13], [2, 3], [], [0, 2, 3], [13]]


@pytest.fixture(scope="session")
def chestmnist_shards(tmp_path_factory) -> str:
    """Shards of a ChestMNIST test split of 10 random 28 x 28 images with the labels above, written in
    MedMNIST's .npz layout and built by the chestmnist converter (two shards)."""
    import numpy as np

    from biomedgpt.data.build import build_shards

    src = tmp_path_factory.mktemp("chestmnist-source")
    labels = np.zeros((len(CHESTMNIST_TEST_LABELS), 14), dtype=np.uint8)
    for i, positive in enumerate(CHESTMNIST_TEST_LABELS):
        labels[i, positive] = 1
    rng = np.random.default_rng(0)
    np.savez(src / "chestmnist.npz", test_images=rng.integers(0, 255, (len(labels), 28, 28), dtype=np.uint8),
             test_labels=labels)
    root = tmp_path_factory.mktemp("chestmnist-shards")
    build_shards("chestmnist", str(src), str(root), ["test"], shard_max_samples=5, progress=False)
    return str(root)
