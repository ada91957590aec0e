"""Serving without Ray: the one candidate scorer gives the same scores however its rows are batched, a
batch answers as its requests one by one, and bad images become 4xx errors naming the field."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from serve_helpers import VQA_ANSWERS, dicom_bytes, png_bytes

from biomedgpt.serve.engine import Query, load_model, run_batch
from biomedgpt.serve.requests import ApiError, image_array, label_list, open_image, text_field
from biomedgpt.spec import Limits


@pytest.fixture(scope="module")
def loaded(vqa_model_dir):
    return load_model(vqa_model_dir, "t/vqa@1", threads=1)


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (3, 64, 64)).astype(np.float32)


def test_scores_do_not_depend_on_how_rows_are_batched(loaded):
    """`score_candidates` runs samples x candidates through the decoder in chunks of rows: the scores of a
    batch, split across chunks anywhere, equal those of each sample alone."""
    from biomedgpt.model.constrained import score_candidates

    p = loaded.predictor
    trie, texts = p.answer_trie(tuple(VQA_ANSWERS))
    assert texts == VQA_ANSWERS
    questions = (" is there a fracture?", " which organ?", " is the lung clear on the left?")
    images = [_image(i) for i in range(3)]
    inputs = p.inputs(questions, images, source_length=32)
    together = score_candidates(p.model, trie, **inputs)
    split = score_candidates(p.model, trie, chunk_size=5, **inputs)  # rows split across chunks
    alone = torch.cat([score_candidates(p.model, trie, **p.inputs([q], [im], source_length=32))
                       for q, im in zip(questions, images)])
    assert torch.allclose(split, together, atol=1e-5) and torch.allclose(alone, together, atol=1e-5), (split, alone)


def test_a_batch_answers_as_single_requests(loaded):
    from biomedgpt.tasks import get_task

    vqa, nli, cap, summ = (get_task(n) for n in ("vqa", "nli", "caption", "summarize"))
    queries = [
        Query("vqa", vqa.instruction({"question": "is the heart enlarged?"}), _image(1), tuple(VQA_ANSWERS)),
        Query("nli", nli.instruction({"premise": "the patient has a fever", "hypothesis": "the patient is ill"}),
              None, ("yes", "no", "maybe"), top_k=2),
        Query("vqa", vqa.instruction({"question": "what modality is this?"}), _image(2), tuple(VQA_ANSWERS)),
        Query("caption", cap.instruction({}), _image(3)),
        Query("summarize", summ.instruction({"text": "the patient was admitted with chest pain and discharged."})),
        Query("classify", " what does the image describe?", _image(4), ("normal", "pneumonia")),
    ]
    batched = run_batch(loaded, queries)
    single = [run_batch(loaded, [q])[0] for q in queries]
    for b, s in zip(batched, single):
        assert b["answer"] == s["answer"] and b["decoding"] == s["decoding"]
        if s["scores"] is not None:
            assert [x["candidate"] for x in b["scores"]] == [x["candidate"] for x in s["scores"]]
            assert np.allclose([x["log_prob"] for x in b["scores"]], [x["log_prob"] for x in s["scores"]], atol=1e-4)
    assert batched[0]["answer"] in VQA_ANSWERS and len(batched[0]["scores"]) == 4
    assert abs(sum(x["probability"] for x in batched[0]["scores"]) - 1) < 1e-4
    assert len(batched[1]["scores"]) == 2 and batched[1]["answer"] in ("yes", "no", "maybe")
    assert batched[3]["decoding"] == "beam" and batched[3]["scores"] is None  # caption: beam 10 (task.decoding)
    assert batched[5]["answer"] in ("normal", "pneumonia")


CHEST = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia")


def test_a_multi_label_model_answers_with_a_list_of_its_classes(loaded):
    """Classification over a multi-label model's own classes decodes a list (class order, no repeats, or "no
    finding") as evaluation does, with each class's probability; batched as one by one; a single-label query
    with the same candidates stays a single choice."""
    from biomedgpt.model.constrained import MultiLabelTrie, label_list_probabilities
    from biomedgpt.tasks.classify import NO_FINDING, join_labels

    instr = " what does the image describe?"
    queries = [Query("classify", instr, _image(i), CHEST, top_k=20, multi_label=True) for i in range(3)]
    queries.append(Query("classify", instr, _image(3), CHEST))
    batched = run_batch(loaded, queries)
    single = [run_batch(loaded, [q])[0] for q in queries]
    for b, s in zip(batched[:3], single[:3]):
        assert b["decoding"] == "multilabel" and b["answer"] == join_labels(b["labels"])
        assert b["labels"] == s["labels"] and b["labels"] == sorted(set(b["labels"]), key=CHEST.index)
        assert sorted(x["candidate"] for x in b["scores"]) == sorted([*CHEST, NO_FINDING])
        assert all(0 <= x["probability"] <= 1 for x in b["scores"])
        assert np.allclose([x["probability"] for x in b["scores"]], [x["probability"] for x in s["scores"]], atol=1e-4)
    assert batched[3]["decoding"] == "trie" and batched[3]["answer"] in CHEST and "labels" not in batched[3]
    # the probabilities are label_list_probabilities' for the generated lists
    p = loaded.predictor
    trie = MultiLabelTrie.from_texts(p.tok, list(CHEST), NO_FINDING)
    inputs = p.inputs([queries[0].instruction], [queries[0].image])
    listed = [[CHEST.index(n) for n in batched[0]["labels"]]]
    probs = label_list_probabilities(p.model, trie, **inputs, listed=listed)[0]
    by_class = {x["candidate"]: x["probability"] for x in batched[0]["scores"]}
    assert np.allclose([by_class[c] for c in [*CHEST, NO_FINDING]], probs.tolist(), atol=1e-5)


LIM = Limits(max_upload_bytes=200_000, max_image_pixels=1_000_000)


def _err(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


def test_images_png_jpeg_and_dicom(tmp_path):
    from PIL import Image

    from biomedgpt.data.transforms import load_image

    arr = image_array(png_bytes((80, 60), "RGB", 90), 64, LIM)
    assert arr.shape == (3, 64, 64) and arr.dtype == np.float32
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, "JPEG")
    assert np.allclose(image_array(buf.getvalue(), 64, LIM), load_image(buf.getvalue(), 64))  # as training sees it
    dcm = dicom_bytes(32, 40, monochrome1=True)
    img = open_image(dcm, LIM)
    assert img.size == (40, 32) and img.mode == "RGB"
    from biomedgpt.data.converters.dicom import dicom_to_png

    ref = np.asarray(Image.open(io.BytesIO(dicom_to_png(dcm))).convert("RGB"))
    assert np.array_equal(np.asarray(img), ref)  # the converters' windowing and MONOCHROME1 inversion


def test_bad_images_are_4xx_naming_the_field():
    from PIL import Image

    e = _err(open_image, b"plain text, not an image", LIM)
    assert e.status == 400 and e.detail.startswith("image: cannot decode image")
    good = png_bytes((200, 200), "RGB", 7)
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 50).convert("RGB").save(buf, "PNG")
    noisy = buf.getvalue()
    e = _err(open_image, noisy[: len(noisy) // 2], LIM)
    assert e.status == 400 and "truncated or corrupt PNG" in e.detail, e.detail
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, "PNG")  # 16 megapixels in a few KB
    assert len(bomb.getvalue()) < 100_000
    e = _err(open_image, bomb.getvalue(), LIM)
    assert e.status == 413 and "more than the limit of 1,000,000" in e.detail
    e = _err(open_image, b"", LIM)
    assert e.status == 400 and e.detail == "image: empty"
    e = _err(open_image, good + b"\0" * 200_000, LIM)
    assert e.status == 413 and "byte limit" in e.detail
    e = _err(open_image, dicom_bytes(2000, 1000), Limits(max_upload_bytes=10_000_000, max_image_pixels=1_000_000))
    assert e.status == 413 and e.detail.startswith("image: DICOM image has 1000x2000x1 pixels")
    e = _err(open_image, b"\0" * 128 + b"DICM" + b"\x02\x00garbage", LIM)
    assert e.status == 400 and e.detail.startswith("image: DICOM")


def test_text_and_labels():
    assert text_field("  what?  ", "question", 10) == "what?"
    assert _err(text_field, "   ", "question", 10).detail == "question: empty"
    assert _err(text_field, "x" * 11, "question", 10).detail.startswith("question: longer than 10 characters")
    assert _err(text_field, None, "premise", 10).status == 422
    assert _err(text_field, 3, "premise", 10).detail == "premise: expected a string, got int"
    assert label_list(["Normal", "Pleural_Effusion"], LIM) == ["normal", "pleural effusion"]
    assert label_list('["a", "b"]', LIM) == ["a", "b"] and label_list("a,b", LIM) == ["a", "b"]
    assert _err(label_list, ["a", "A"], LIM).detail.startswith("labels[1]: duplicate label")
    assert _err(label_list, [], LIM).detail == "labels: empty list"
    assert _err(label_list, ["a", ""], LIM).detail == "labels[1]: empty"
