"""The pretraining objectives (`get_task("pretrain")`): for each, the exact instruction text and the exact
target token ids; how a record's objective is chosen; the official loss weights."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest

from biomedgpt.tasks import MissingFieldError, get_task, task_names
from biomedgpt.tasks.infilling import MASK
from biomedgpt.tasks.pretrain import DEFAULT_OBJECTIVES, OFFICIAL_LOSS_WEIGHTS

CAPTION = {"task": "caption", "dataset": "iu_xray", "split": "train", "id": "c1",
           "caption": "The heart is normal in size. The lungs are clear."}
VQA = {"task": "vqa", "dataset": "slake", "split": "train", "id": "q1", "question": "Is there a pleural effusion",
       "answer": "No", "answer_type": "closed"}
GROUNDING = {"task": "grounding", "dataset": "regions", "split": "train", "id": "g1", "caption": "Liver lesion",
             "boxes": [[0.1, 0.25, 0.5, 0.75]]}
DETECTION = {"task": "detection", "dataset": "deeplesion", "split": "train", "id": "d1",
             "boxes": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0]], "labels": ["liver", "soft tissue"]}
TEXT = {"task": "text", "dataset": "pubmed_abstracts", "split": "train", "id": "t1",
        "text": "The patient was admitted with  chest pain and shortness of breath after a long walk in the cold."}
IMAGE = {"task": "image", "dataset": "chexpert_small", "split": "train", "id": "i1"}


def bins(tok, *indices):
    return [tok.bin_offset + i for i in indices]


def test_registered_with_official_weights():
    assert "pretrain" in task_names()
    assert OFFICIAL_LOSS_WEIGHTS == {"caption": 1.0, "itm": 1.0, "vqa": 1.0, "grounding": 1.0, "grounded_caption": 1.0,
                                     "text_infilling": 2.0, "image_infilling": 2.0, "detection": 2.0}


def test_captioning(pretrain_tokenizer):
    tok = pretrain_tokenizer
    ex = get_task("pretrain").example(CAPTION, objective="caption")
    assert ex.instruction == " what does the image describe?"
    assert ex.target == " the heart is normal in size the lungs are clear"
    assert tok.encode_text(ex.target) == tok.encode_text("the heart is normal in size the lungs are clear")
    assert tok.decode(tok.encode_text(ex.target)) == ex.target
    assert (ex.has_image, ex.weight, ex.image_op, ex.decoder_codes) == (True, 1.0, None, False)
    assert ex.meta["objective"] == "caption" and ex.meta["id"] == "c1"


def test_image_text_matching_positive_and_negative(pretrain_tokenizer):
    tok = pretrain_tokenizer
    task = get_task("pretrain", itm_negative_ratio=1.0)
    pos = task.example(CAPTION, objective="itm")  # no negatives in the pool: a positive
    assert pos.instruction == ' does the image describe " the heart is normal in size the lungs are clear "?'
    assert pos.target == " yes" and tok.encode_text(pos.target) == [tok.convert_tokens_to_ids("Ġyes")]
    neg = task.example(CAPTION, objective="itm", negatives=["No acute cardiopulmonary disease.",
                                                            "The heart is normal in size; the lungs are clear"])
    # the record's own caption (after normalisation) is never its negative
    assert neg.instruction == ' does the image describe " no acute cardiopulmonary disease "?'
    assert neg.target == " no" and tok.encode_text(neg.target) == [tok.convert_tokens_to_ids("Ġno")]
    assert neg.weight == 1.0 and neg.meta["answer"] == "no"
    # half the ITM examples are negatives by default
    task = get_task("pretrain", objectives={"caption": {"itm": 1}})
    answers = Counter(task.example({**CAPTION, "id": str(i)}, negatives=["other finding"]).target for i in range(400))
    assert 160 < answers[" no"] < 240 and answers[" no"] + answers[" yes"] == 400


def test_vqa(pretrain_tokenizer):
    ex = get_task("pretrain").example(VQA)
    assert ex.meta["objective"] == "vqa"
    assert ex.instruction == " is there a pleural effusion?"
    assert ex.target == " no" and pretrain_tokenizer.encode_text(ex.target) == [pretrain_tokenizer.convert_tokens_to_ids("Ġno")]
    assert ex.weight == 1.0 and ex.has_image


def test_visual_grounding_target_is_four_bins(pretrain_tokenizer):
    tok = pretrain_tokenizer
    ex = get_task("pretrain").example(GROUNDING, objective="grounding")
    assert ex.instruction == ' which region does the text " liver lesion " describe?'
    assert ex.target == " <bin_100> <bin_250> <bin_500> <bin_749>"
    assert tok.encode_text(ex.target) == bins(tok, 100, 250, 500, 749)
    assert ex.weight == 1.0 and ex.has_image
    # a detection record grounds a uniquely labelled object when configured to
    task = get_task("pretrain", objectives={"detection": {"grounding": 1}})
    ex = task.example({**DETECTION, "labels": ["liver", "liver", "lung"],
                       "boxes": DETECTION["boxes"] + [[0.0, 0.0, 1.0, 1.0]]})
    assert ex.instruction == ' which region does the text " lung " describe?'
    assert tok.encode_text(ex.target) == bins(tok, 0, 0, 999, 999)
    with pytest.raises(MissingFieldError, match="record 'd1' of deeplesion has no region"):
        task.example({**DETECTION, "labels": ["liver", "liver"]})


def test_grounded_captioning_region_in_the_instruction(pretrain_tokenizer):
    tok = pretrain_tokenizer
    ex = get_task("pretrain").example(GROUNDING, objective="grounded_caption")
    assert ex.instruction == " what does the region describe? region: <bin_100> <bin_250> <bin_500> <bin_749>"
    assert tok.encode_source(ex.instruction) == (
        [tok.bos_token_id] + tok.encode_text(" what does the region describe? region:")
        + bins(tok, 100, 250, 500, 749) + [tok.eos_token_id])
    assert ex.target == " liver lesion" and tok.encode_text(ex.target) == tok.encode_text("liver lesion")
    # a caption record with one box serves it; a caption record without boxes does not
    boxed = {**CAPTION, "boxes": [[0.0, 0.5, 0.5, 1.0]]}
    gc = get_task("pretrain").example(boxed, objective="grounded_caption")
    assert gc.instruction.endswith("region: <bin_0> <bin_500> <bin_500> <bin_999>")
    assert gc.target == " the heart is normal in size the lungs are clear"
    assert set(get_task("pretrain").supported(boxed)) == {"caption", "itm", "grounding", "grounded_caption"}
    assert set(get_task("pretrain").supported(CAPTION)) == {"caption", "itm"}


def test_detection_target_is_bins_and_labels(pretrain_tokenizer):
    tok = pretrain_tokenizer
    ex = get_task("pretrain").example(DETECTION)
    assert ex.meta["objective"] == "detection" and ex.weight == 2.0
    assert ex.instruction == " what are the objects in the image?"
    assert ex.target == " <bin_100> <bin_200> <bin_300> <bin_400> liver <bin_500> <bin_500> <bin_899> <bin_999> soft tissue"
    assert tok.encode_text(ex.target) == (bins(tok, 100, 200, 300, 400) + tok.encode_text("liver")
                                          + bins(tok, 500, 500, 899, 999) + tok.encode_text("soft tissue"))
    with pytest.raises(ValueError, match="record 'd1' of deeplesion: 2 boxes but labels"):
        get_task("pretrain").example({**DETECTION, "labels": ["liver"]})
    with pytest.raises(ValueError, match=r"record 'd1' of deeplesion: box \[0.5, 0.2, 0.3, 0.4\]"):
        get_task("pretrain").example({**DETECTION, "boxes": [[0.5, 0.2, 0.3, 0.4], [0, 0, 1, 1]]})


def test_text_infilling(pretrain_tokenizer):
    tok = pretrain_tokenizer
    task = get_task("pretrain", seed=3)
    ex = task.example(TEXT)
    text = "the patient was admitted with chest pain and shortness of breath after a long walk in the cold."
    assert ex.meta["objective"] == "text_infilling" and ex.weight == 2.0 and not ex.has_image
    assert ex.target == " " + text
    assert tok.encode_text(ex.target) == tok.encode_text(text)
    m = re.fullmatch(r' what is the complete text of " (.*) "\?', ex.instruction)
    assert m, ex.instruction
    masked = m.group(1).split(" ")
    words = text.split(" ")
    n_masks = masked.count(MASK)
    assert n_masks >= 1 and len(masked) < len(words) + n_masks
    assert ex.meta["masked_words"] == 6 and ex.meta["words"] == 18  # ceil(0.3 * 18) words in the spans
    # the masked text's ids: one <mask> id per span, the words' BPE ids around them
    ids = tok.encode_text(m.group(1))
    assert ids.count(tok.mask_token_id) == n_masks
    # the same seed gives the same masking; another seed (or salt) another one
    assert get_task("pretrain", seed=3).example(TEXT).instruction == ex.instruction
    others = {get_task("pretrain", seed=s).example(TEXT).instruction for s in range(8)}
    assert len(others) > 4
    assert task.example(TEXT, salt=1).instruction != ex.instruction or task.example(TEXT, salt=2).instruction != ex.instruction
    # exact: a pinned seed's masking
    short = {**TEXT, "text": "mild cardiomegaly with small bilateral pleural effusions and no pneumothorax"}
    pinned = get_task("pretrain", seed=0).example(short).instruction
    m2 = re.fullmatch(r' what is the complete text of " (.*) "\?', pinned)
    assert m2 and m2.group(1).count(MASK) >= 1
    assert pinned == PINNED_TEXT_INFILLING


# 10 words, ceil(3.0) = 3 masked: spans "small" and "and no"
PINNED_TEXT_INFILLING = ' what is the complete text of " mild cardiomegaly with <mask> bilateral pleural effusions <mask> pneumothorax "?'


def codes_npy(codes) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(codes, dtype=np.int32))
    return buf.getvalue()


def test_image_infilling_target_is_256_codes(pretrain_tokenizer):
    tok = pretrain_tokenizer
    codes = [(i * 37) % 8192 for i in range(256)]
    task = get_task("pretrain")
    ex = task.example(IMAGE, codes=codes_npy(np.array(codes).reshape(16, 16)))
    assert ex.meta["objective"] == "image_infilling" and ex.weight == 2.0
    assert ex.instruction == " what is the image in the middle part?"
    ids = tok.encode_text(ex.target)
    assert ids == [tok.code_offset + c for c in codes] and len(ids) == 256
    assert (ex.image_op, ex.decoder_codes, ex.has_image) == ("mask_center", True, True)
    # the official image.tsv puts the codes in the record
    assert task.example({**IMAGE, "codes": codes}).target == ex.target
    # a 32 x 32 grid of the whole 256 px image: its centre 16 x 16
    full = np.arange(1024).reshape(32, 32)
    centre = task.example(IMAGE, codes=codes_npy(full))
    assert tok.encode_text(centre.target) == [tok.code_offset + int(c) for c in full[8:24, 8:24].reshape(-1)]
    with pytest.raises(ValueError, match="record 'i1' of chexpert_small: expected 256 VQGAN codes"):
        task.example(IMAGE, codes=list(range(100)))
    with pytest.raises(ValueError, match="VQGAN code 9000 is outside"):
        task.example(IMAGE, codes=[9000] * 256)


def test_image_infilling_without_codes_names_the_record():
    with pytest.raises(MissingFieldError, match=r"image-infilling record 'i1' of chexpert_small has no VQGAN codes "
                                                r"\(no 'codes.npy' member and no 'codes' field\)"):
        get_task("pretrain").example(IMAGE)


def test_objective_choice_is_deterministic_and_follows_proportions():
    task = get_task("pretrain", seed=7)
    recs = [{**CAPTION, "id": str(i)} for i in range(600)]
    chosen = [task.example(r, negatives=["x y"]).meta["objective"] for r in recs]
    assert chosen == [get_task("pretrain", seed=7).example(r, negatives=["x y"]).meta["objective"] for r in recs]
    counts = Counter(chosen)
    assert set(counts) == {"caption", "itm"}  # no box: no grounding objectives
    assert 150 < counts["caption"] < 250  # proportions caption 1 : itm 2
    # the seed and the salt change the draw
    other = [get_task("pretrain", seed=8).example(r).meta["objective"] for r in recs]
    salted = [task.example(r, salt=1).meta["objective"] for r in recs]
    assert other != chosen and salted != chosen
    assert DEFAULT_OBJECTIVES["caption"] == {"caption": 1.0, "itm": 2.0, "grounding": 1.0, "grounded_caption": 1.0}


def test_objectives_are_configurable():
    only_caption = get_task("pretrain", objectives={"caption": {"caption": 1.0}})
    assert {only_caption.example({**CAPTION, "id": str(i)}).meta["objective"] for i in range(50)} == {"caption"}
    by_name = get_task("pretrain", objectives=["itm", "text_infilling"])
    assert {by_name.example({**CAPTION, "id": str(i)}).meta["objective"] for i in range(50)} == {"itm"}
    assert by_name.example(TEXT).meta["objective"] == "text_infilling"
    with pytest.raises(ValueError, match="record 'd1' of deeplesion: no pretraining objective is configured for "
                                         "'detection' records"):
        by_name.example(DETECTION)  # detection left out: nothing for detection records
    weighted = get_task("pretrain", loss_weights={"detection": 1.0})
    assert weighted.example(DETECTION).weight == 1.0 and weighted.example(TEXT).weight == 2.0
    with pytest.raises(ValueError, match="objectives.caption.detection: caption records can serve"):
        get_task("pretrain", objectives={"caption": {"detection": 1}})
    with pytest.raises(ValueError, match="objectives: unknown objective"):
        get_task("pretrain", objectives=["captioning"])
    with pytest.raises(ValueError, match="unknown record task"):
        get_task("pretrain", objectives={"ocr": {"caption": 1}})
    with pytest.raises(ValueError, match="pretraining has no objective for record task 'classify'"):
        get_task("pretrain").example({"task": "classify", "id": "m", "dataset": "pathmnist", "label_name": "x"})


def test_text_infilling_roundtrip_over_records():
    task = get_task("pretrain", seed=11)
    for i in range(50):
        rec = {**TEXT, "id": f"t{i}"}
        ex = task.example(rec)
        words = ex.target.strip().split(" ")
        assert ex.meta["masked_words"] == -(-len(words) * 3 // 10)
        assert MASK in ex.instruction
        # every mask sits where words were: the unmasked words keep their order
        masked = re.fullmatch(r' what is the complete text of " (.*) "\?', ex.instruction).group(1).split(" ")
        kept = [w for w in masked if w != MASK]
        it = iter(words)
        assert all(any(w == x for x in it) for w in kept)
