"""The downstream task families: exact instruction and target text of the official prompts."""

from __future__ import annotations

import pytest

from biomedgpt.tasks import MissingFieldError, get_task, task_names


def test_all_families_registered():
    assert {"vqa", "caption", "classify", "nli", "summarize"} <= set(task_names())


def test_caption_prompt_and_target():
    task = get_task("caption")
    ex = task.example({"id": "c1", "caption": "The heart is normal in size.\tLungs  CLEAR, no effusion."})
    assert ex.instruction == " what does the image describe?"
    assert ex.target == " the heart is normal in size lungs clear no effusion"
    assert ex.has_image and ex.meta["references"] == ["The heart is normal in size. Lungs CLEAR, no effusion."]
    long = get_task("caption", max_target_words=3).example({"caption": "one two three four five"})
    assert long.target == " one two three"
    multi = task.example({"captions": ["A b.", "c d"]})
    assert multi.target == " a b" and multi.meta["references"] == ["A b.", "c d"]
    assert task.decoding.beam_size == 10 and task.decoding.no_repeat_ngram_size == 3 and not task.decoding.constrained


def test_classify_prompt_and_target():
    task = get_task("classify", labels=["Normal", "Pneumonia"])
    ex = task.example({"id": "m1", "label": 1, "label_name": "Pneumonia"})
    assert (ex.instruction, ex.target) == (" what does the image describe?", " pneumonia")
    assert ex.candidates == ("normal", "pneumonia") and task.decoding.constrained


def test_nli_prompt_and_target():
    task = get_task("nli")
    ex = task.example({"id": "n1", "premise": "Patient has  HTN.", "hypothesis": "The patient is well-controlled",
                       "label": "neutral"})
    assert ex.instruction == ' can text1 " patient has htn. " imply text2 " the patient is well controlled "?'
    assert ex.target == " maybe" and not ex.has_image and ex.candidates == ("yes", "no", "maybe")
    assert task.example({"premise": "a", "hypothesis": "b", "label": "yes"}).target == " yes"
    with pytest.raises(ValueError, match="label 'unsure'"):
        task.example({"premise": "a", "hypothesis": "b", "label": "unsure"})


def test_summarize_prompt_and_target():
    task = get_task("summarize")
    ex = task.example({"id": "s1", "text": "What is the dose of\nIbuprofen for kids?", "summary": "Ibuprofen dose, children."})
    assert ex.instruction == ' what is the summary of article " what is the dose of ibuprofen for kids? "?'
    assert ex.target == " ibuprofen dose, children."
    d = task.decoding
    assert (d.beam_size, d.length_penalty, d.no_repeat_ngram_size) == (5, 0.7, 3)


@pytest.mark.parametrize("task,record,field", [
    ("caption", {"id": "x"}, "caption"),
    ("classify", {"id": "x", "label": 0}, "label_name"),
    ("nli", {"id": "x", "premise": "a"}, "hypothesis"),
    ("summarize", {"id": "x", "text": "   "}, "text"),
    ("vqa", {"id": "x", "answer": "yes"}, "question"),
])
def test_missing_fields_are_named(task, record, field):
    with pytest.raises(MissingFieldError, match=f"record 'x' has no '{field}' field"):
        get_task(task).example(record)


def test_trec_trial_matching_keeps_its_own_label_set():
    task = get_task("nli")
    ex = task.example({"id": "t1", "premise": "A 58-year-old woman with type 2 diabetes.",
                       "hypothesis": "Inclusion: adults with diabetes", "label": "eligible"})
    assert ex.target == " eligible" and ex.candidates == ("eligible", "excluded", "irrelevant")
    fixed = get_task("nli", answers=["Eligible", "Excluded"])
    assert fixed.example({"premise": "a", "hypothesis": "b", "label": "excluded"}).candidates == ("eligible", "excluded")
    with pytest.raises(ValueError, match="label 'irrelevant' is not one of eligible, excluded"):
        fixed.example({"premise": "a", "hypothesis": "b", "label": "irrelevant"})


def test_text_only_classification_asks_about_the_record_text():
    ex = get_task("classify").example({"id": "s1", "text": "Site: Breast;  Stage: II", "label": "surgery",
                                       "label_name": "Surgery"})
    assert ex.instruction == ' what is the treatment for the patient " site: breast; stage: ii "?'
    assert ex.target == " surgery" and not ex.has_image


# --- multi-label classification (ChestMNIST: label_name is the list of positive findings) -----------

CHEST = {"task": "classify", "dataset": "chestmnist", "split": "train", "id": "train_000001"}


def test_multi_label_target_lists_the_findings_in_class_order():
    from biomedgpt.tasks.classify import NO_FINDING

    task = get_task("classify")
    # the converter's lists are in class-index order; a list written otherwise is put in that order
    ex = task.example({**CHEST, "label": [2, 0], "label_name": ["Effusion", "atelectasis"]})
    assert (ex.instruction, ex.target, ex.has_image) == (" what does the image describe?", " atelectasis, effusion", True)
    assert ex.meta["answer"] == ["atelectasis", "effusion"] and ex.meta["multi_label"] is True
    assert ex.candidates == ("atelectasis", "effusion", NO_FINDING)  # the list items (the recipe's union: the classes)
    none = task.example({**CHEST, "label": [], "label_name": []})
    assert none.target == " no finding" and none.meta["answer"] == [] and NO_FINDING == "no finding"
    # with the class list known, its order rules and an unknown class is an error
    known = get_task("classify", labels=["Mass", "Nodule", "Hernia"])
    assert known.example({**CHEST, "label_name": ["hernia", "mass"]}).target == " mass, hernia"
    assert known.example({**CHEST, "label_name": []}).candidates == ("mass", "nodule", "hernia", NO_FINDING)
    with pytest.raises(ValueError, match="'edema' is not one of the classes mass, nodule, hernia"):
        known.example({**CHEST, "label_name": ["edema"]})
    with pytest.raises(ValueError, match="contains a comma"):
        task.example({**CHEST, "label_name": ["normal, benign"]})
    # single-label records are unchanged
    assert task.example({**CHEST, "label": 1, "label_name": "Pneumonia"}).meta == {
        "id": "train_000001", "answer": "pneumonia", "label": 1}


def test_multi_label_classes_of_the_training_records_are_in_class_order():
    """What a run writes into its checkpoint meta (and the exported training.json) for serving to decode a
    multi-label model's label set as a list."""
    from biomedgpt.train.plan import multi_label_meta
    from biomedgpt.tasks.classify import multi_label_classes

    recs = [{**CHEST, "label": [6, 2], "label_name": ["Pneumonia", "Effusion"]},
            {**CHEST, "label": [], "label_name": []},
            {**CHEST, "label": [0], "label_name": ["Atelectasis"]},
            {**CHEST, "label_name": ["hernia"]},  # no indices: after the indexed classes
            {"task": "vqa", "question": "q?", "answer": "yes"}]
    assert multi_label_classes(recs) == ["atelectasis", "effusion", "pneumonia", "hernia"]
    assert multi_label_meta(recs) == {"multi_label": True, "classes": ["atelectasis", "effusion", "pneumonia", "hernia"]}
    assert multi_label_meta([{**CHEST, "label": 1, "label_name": "Pneumonia"}]) == {}  # single-label: nothing


def test_multi_label_records_train(pretrain_tokenizer_dir):
    """A ChestMNIST record goes through the training preprocessing; its labels are the list's tokens, and
    the training recipe's candidates (answers.json, the constraint trie) are the classes and "no finding"."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from biomedgpt.data.pipeline import preprocess_batch, tokenizer_from_dir
    from biomedgpt.train.recipe import answer_candidates

    recs = [{**CHEST, "id": "a", "label": [0, 13], "label_name": ["atelectasis", "hernia"]},
            {**CHEST, "id": "b", "label": [], "label_name": []}]
    png = io.BytesIO()
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(png, format="PNG")
    batch = {"json": np.array([json.dumps(r).encode() for r in recs], dtype=object),
             "png": np.array([png.getvalue()] * 2, dtype=object)}
    out = preprocess_batch(batch, task_name="classify", tokenizer_dir=pretrain_tokenizer_dir, image_size=32,
                           max_source_length=16, max_target_length=24)
    tok = tokenizer_from_dir(pretrain_tokenizer_dir)
    assert out["patch_masks"].all()
    for row, text in zip(out["labels"], (" atelectasis, hernia", " no finding")):
        assert row[row != -100].tolist() == tok.encode_text(text) + [tok.eos_token_id]
    assert answer_candidates("classify", recs) == {"classify": ["atelectasis", "hernia", "no finding"]}
