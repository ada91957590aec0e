"""Our pure-Python PTB tokenisation against pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biomedgpt.metrics.ptb_tokenizer import coco_tokenize, ptb_tokens

# Constructions that the lexer treats specially, each as captions and reports write them.
TRICKY = [
    "The heart is normal in size. The mediastinum is unremarkable.",
    'No pneumothorax, pleural effusion, or focal airspace disease; "stable" (since 2010) - 3.5 cm nodule.',
    "Don't can't won't it's colour tumour; the patient's films. Cannot exclude gonna wanna 'tis 'twas",
    "T2-weighted MRI: 5mm x 3mm lesion at L4/L5, 50% stenosis & mild oedema... see Fig. 1a.",
    "e.g. i.e. U.S. a.m. x-ray X-ray 1/2 ½ — – -- °C µm ×10 ±2 $5 £3 €4 ¢",
    "[brackets] {curly} <angle> a*b a/b http://www.example.com user@mail.com 3:45 #5 @home 10,000 -5 +5 5-10",
    "He said \"hi.\" 'Tis the '90s. O'Neil's rock'n'roll. Dr. Jones, Ph.D., Inc. etc.",
    "Arrows (white arrow) and arrowheads (black arrowhead) indicate the mass!? What?! Wow!!!",
    "1.5-2.0 cm; 0.5-µl; 1-1.5 cm; 3-4.5mm; 2.5-cm; 1,000-fold; lungs,non-enhancing; x-ray., T2-w.,",
    "l'interligne d'un l’arc O’Neil dell'arte β-TCP/N-SHh mg/dL ng/mL T1/T2 and/or a/b/c/d",
    "fig.2 figs. 3-4 No. 5 approx. 5 ca. 10 vs. v. cf. al. et al. St. Louis pp. 5 Pt. 5",
    "The U.S. The patient Inc. Co. Ltd. Jr. Ph.D. M.D. MD. A. B. C. I. He said I. The end",
    "He's we're they've I'll I'd I'm isn't aren't couldn't ain't y'all ’em ’till s’mores qu’il",
    "c++ C# E! 3:45pm 1:1000 3+ +/- 5±2 ~5 ≥5 ≤ 3 > 2 < 1 :) :-( (--) ('') (^^) ^_^ H₂O x² 10⁻³",
    "'sorry' 'a 'ab `tick` ``tex'' “curly” ‘single’ «guil» ‚low„ it’s don’t ''double''",
    "www.google.com https://doi.org/10.1000/xyz. a@b.com, x@y foo@bar.org) image.jpg 5.x v1.2 A.B.C.",
    "...... .... . . . … Blvd. MRI Sr. The x Calif. The x #e.g. 1 1/2 5 7/8 10-12-2010 2010",
    "Visualized osseous structures of the thorax are without acute abnormality.",
]


def _reference_tokenize(captions: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({0: [{"caption": c} for c in captions]})
    return out[0]


def _release_text(dev_data: Path) -> list[str]:
    texts = [r["report"] for split in json.loads((dev_data / "iu_xray" / "dev.json").read_text()).values()
             for r in split]
    texts += [line.split("\t", 1)[1] for line in
              (dev_data / "roco" / "dev_captions.txt").read_text(encoding="utf-8").splitlines() if "\t" in line]
    vqa_rad = json.loads((dev_data / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())
    texts += [str(r[key]) for r in vqa_rad for key in ("question", "answer")]
    return texts


def test_equals_reference_on_every_report_caption_and_question_of_the_fixtures(dev_data):
    texts = _release_text(dev_data)
    assert len(texts) > 300
    expected = _reference_tokenize(texts)
    ours = coco_tokenize(texts)
    mismatches = [(t, e, o) for t, e, o in zip(texts, expected, ours) if e != o]
    assert not mismatches, mismatches[:5]


def test_equals_reference_on_tricky_constructions():
    # alone, and in one batch (the lexer reads all captions of one side as one text)
    assert coco_tokenize(TRICKY) == _reference_tokenize(TRICKY)


@pytest.mark.parametrize("caption, expected", [
    ("The heart is normal in size.", "the heart is normal in size"),
    # brackets become -lrb- -rrb- after lower-casing, which the punctuation filter (written -LRB-) keeps
    ("Opacity (arrow) in the RUL.", "opacity -lrb- arrow -rrb- in the rul"),
    ("Don't miss it: 3.5 cm, 50%!", "do n't miss it 3.5 cm 50 %"),
    ('"Bat-wing" edema', "bat-wing edema"),
    ("e.g. T2-weighted MRI at L4/L5", "e.g. t2-weighted mri at l4/l5"),
    ("Cannot exclude it", "can not exclude it"),
    ("1 1/2 cm", "1\u00a01/2 cm"),  # a fraction keeps its space as U+00A0 inside one token
    ("", ""),
])
def test_hand_checked_examples(caption, expected):
    assert coco_tokenize([caption]) == [expected]


def test_one_output_per_caption_even_with_line_breaks_inside():
    assert coco_tokenize(["two\nlines", "third\u2028one", "x"]) == ["two lines", "third one", "x"]


def test_ptb_tokens_keep_case_and_punctuation():
    assert ptb_tokens("No effusion (see Fig. 2).") == ["No", "effusion", "-LRB-", "see", "Fig.", "2", "-RRB-", "."]
