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


def _data_pairs(shared: Path) -> list[tuple[str, list[str]]]:
    """Report/caption pairs from the shared IU X-ray and ROCO samples. The prediction is a model-like
    variation of the reference (sentences dropped, swapped in from another study, words dropped), so
    that the scores fall in the range real models reach; some samples get a second reference."""
    rng = random.Random(7)
    reports = [r["report"] for split in json.loads((shared / "data" / "iu_xray" / "dev.json").read_text()).values()
               for r in split if r["report"].strip()]
    captions = [line.split("\t", 1)[1].strip()
                for line in (shared / "data" / "roco" / "dev_captions.txt").read_text(encoding="utf-8").splitlines()
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
def caption_pairs(shared: Path) -> list[tuple[str, list[str]]]:
    return HANDWRITTEN_PAIRS + _data_pairs(shared)


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
    from biomedgpt.evaluate.meteor import Meteor

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
