"""Tests of the BiomedGPT tokenizer (biomedgpt.model.tokenizer).

The real BART vocab.json/merges.txt cannot be downloaded here, so the tests synthesise files with
the same layout: 4 fairseq specials, the 256 byte-level symbols, merges for a few common words,
filler tokens up to 50,264 entries, and <mask> last (50,265 entries, like BART).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import fsspec
import pytest
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer

from biomedgpt.model.tokenizer import (
    BiomedGPTTokenizer,
    bin_ids_to_box,
    bin_tokens_to_box,
    box_to_bin_ids,
    box_to_bin_tokens,
)

from bpe_files import BART_VOCAB_SIZE, SPECIALS, WORDS, write_bart_like_files as _bart_like_files  # noqa: E402


@pytest.fixture(scope="module")
def bart_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _bart_like_files(tmp_path_factory.mktemp("bart"))


@pytest.fixture(scope="module")
def tok(bart_files: tuple[Path, Path]) -> BiomedGPTTokenizer:
    return BiomedGPTTokenizer.from_bpe_files(*bart_files)


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    findings = ["nodule", "opacity", "effusion", "consolidation", "pneumothorax", "atelectasis", "mass",
                "fracture", "calcification", "cardiomegaly", "infiltrate", "edema", "lesion", "cyst", "tumour",
                "haemorrhage", "thickening", "emphysema", "fibrosis", "granuloma"]
    places = ["left upper lobe", "right lower lobe", "middle lobe", "lung apex", "costophrenic angle",
              "mediastinum", "hilum", "pleura", "liver", "kidney", "spleen", "pancreas", "brain", "retina",
              "breast", "thyroid", "colon", "prostate", "femur", "spine"]
    modalities = ["chest radiograph", "computed tomography", "magnetic resonance image", "ultrasound",
                  "fundus photograph", "histopathology slide", "dermoscopy image", "mammogram"]
    grades = ["mild", "moderate", "severe", "small", "large", "subtle", "extensive", "focal", "diffuse"]
    templates = [
        "The {m} shows a {g} {f} in the {p}.",
        "There is no evidence of {f} in the {p}.",
        "What abnormality is seen in the {p} on this {m}?",
        "{g} {f} of the {p}, consistent with prior {m}.",
        "Which region does the text \" {g} {f} \" describe?",
        "Findings: {g} {f} involving the {p}; impression: {f}.",
    ]
    return [
        rng.choice(templates).format(m=rng.choice(modalities), g=rng.choice(grades), f=rng.choice(findings),
                                     p=rng.choice(places))
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------- layout


def test_bart_layout_ids(tok: BiomedGPTTokenizer) -> None:
    assert len(tok) == 59457
    assert tok.vocab_size == BART_VOCAB_SIZE  # BPE part with the specials and <mask>
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    ids = tok.convert_tokens_to_ids(["<mask>", "<code_0>", "<code_8191>", "<bin_0>", "<bin_999>"])
    assert ids == [50264, 50265, 58456, 58457, 59456]
    assert tok.mask_token_id == 50264
    assert (tok.code_offset, tok.bin_offset, tok.num_codes, tok.num_bins) == (50265, 58457, 8192, 1000)
    assert tok.code_id(0) == 50265 and tok.code_id(8191) == 58456
    assert tok.bin_id(0) == 58457 and tok.bin_id(999) == 59456
    assert not tok.is_code_id(50264) and tok.is_code_id(50265) and tok.is_code_id(58456)
    assert not tok.is_code_id(58457) and tok.is_bin_id(58457) and tok.is_bin_id(59456)
    assert not tok.is_bin_id(59457) and not tok.is_bin_id(58456)
    for bad in (-1, 8192):
        with pytest.raises(ValueError):
            tok.code_id(bad)
    with pytest.raises(ValueError):
        tok.bin_id(1000)


def test_from_urls(bart_files: tuple[Path, Path], tok: BiomedGPTTokenizer) -> None:
    vocab_path, merges_path = bart_files
    via_file_url = BiomedGPTTokenizer.from_bpe_files(vocab_path.as_uri(), merges_path.as_uri())
    assert via_file_url.get_vocab() == tok.get_vocab()
    # any fsspec filesystem works: an in-memory one stands in for s3:// / http(s)://
    for path in bart_files:
        with fsspec.open(f"memory://biomedgpt-test/{path.name}", "wb") as f:
            f.write(path.read_bytes())
    via_memory = BiomedGPTTokenizer.from_bpe_files(
        "memory://biomedgpt-test/vocab.json", "memory://biomedgpt-test/merges.txt", num_codes=16, num_bins=10
    )
    assert len(via_memory) == BART_VOCAB_SIZE + 16 + 10
    assert (via_memory.code_offset, via_memory.bin_offset) == (50265, 50281)


def test_mask_appended_when_absent(tmp_path: Path) -> None:
    vocab_path, merges_path = _bart_like_files(tmp_path, with_mask=False)
    assert len(json.loads(vocab_path.read_text(encoding="utf-8"))) == BART_VOCAB_SIZE - 1
    tok = BiomedGPTTokenizer.from_bpe_files(vocab_path, merges_path)
    assert tok.mask_token_id == 50264 and tok.code_offset == 50265 and len(tok) == 59457


def test_raw_gpt2_vocab_rejected(tmp_path: Path) -> None:
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="GPT-2") as err:
        BiomedGPTTokenizer.from_bpe_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert "BART" in str(err.value) and "vocab.json" in str(err.value)


def _edit_vocab(vocab: dict[str, int], case: str) -> dict[str, int] | str:
    if case == "not-json":
        return "{not json"
    if case == "swapped-specials":
        vocab["<s>"], vocab["<pad>"] = 1, 0
    elif case == "gap":
        del vocab["madeupword00007"]
    elif case == "mask-not-last":
        vocab["<mask>"], vocab["madeupword00000"] = vocab["madeupword00000"], vocab["<mask>"]
    elif case == "string-id":
        vocab["madeupword00000"] = "x"  # type: ignore[assignment]
    return vocab


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-json", "not a valid JSON"),
        ("swapped-specials", "'<s>' at id 0"),
        ("gap", "id .* is missing"),
        ("mask-not-last", "'<mask>' must be the last entry"),
        ("string-id", "not a token -> integer id"),
    ],
)
def test_malformed_vocab_rejected(bart_files: tuple[Path, Path], tmp_path: Path, case: str, message: str) -> None:
    vocab_path, merges_path = bart_files
    edited = _edit_vocab(json.loads(vocab_path.read_text(encoding="utf-8")), case)
    bad = tmp_path / "bad_vocab.json"
    bad.write_text(edited if isinstance(edited, str) else json.dumps(edited), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        BiomedGPTTokenizer.from_bpe_files(bad, merges_path)
    assert "bad_vocab.json" in str(err.value)


def test_vocab_without_byte_alphabet_rejected(tmp_path: Path) -> None:
    vocab = {t: i for i, t in enumerate([*SPECIALS, "a", "b", "ab", "<mask>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="byte-level symbols are missing"):
        BiomedGPTTokenizer.from_bpe_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize(
    ("merges_text", "message"),
    [
        ("#version: 0.2\nĠ w h\n", "line 2: expected two space-separated symbols"),
        ("Ġ w\nĠw zzz\n", "merge 2 .* 'zzz', which is not in the vocabulary"),
    ],
)
def test_malformed_merges_rejected(
    bart_files: tuple[Path, Path], tmp_path: Path, merges_text: str, message: str
) -> None:
    bad = tmp_path / "bad_merges.txt"
    bad.write_text(merges_text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        BiomedGPTTokenizer.from_bpe_files(bart_files[0], bad)
    assert "bad_merges.txt" in str(err.value)


# ----------------------------------------------------------------------------- encoding


def test_plain_text_gets_leading_space_form(tok: BiomedGPTTokenizer) -> None:
    ids = tok.encode_text("what is the lesion")
    assert tok.convert_ids_to_tokens(ids) == ["Ġwhat", "Ġis", "Ġthe", "Ġlesion"]
    assert ids == tok.encode_text("  what is the lesion \n")  # OFA strips, then prepends one space
    assert tok.decode(ids) == " what is the lesion"
    # unknown words fall back to byte-level pieces and still round trip, non-ASCII included
    text = "pneumothorax 5 mm, naïve β-cells?"
    ids = tok.encode_text(text)
    assert tok.decode(ids) == " " + text
    assert tok.encode_text(tok.decode(ids)) == ids


def test_bins_and_codes_are_whole_tokens(tok: BiomedGPTTokenizer) -> None:
    what_is = tok.encode_text("what is")
    ids = tok.encode_text(" what is <bin_12> <bin_300>")
    assert ids == [*what_is, tok.bin_id(12), tok.bin_id(300)]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["Ġwhat", "Ġis", "<bin_12>", "<bin_300>"]
    assert "Ġ" not in tokens
    # spacing around the tokens does not matter; text after them gets the Ġ form
    assert tok.encode_text("what is<bin_12>   <bin_300>") == ids
    codes = tok.encode_text("<code_0> <code_8191> <code_42> what is")
    assert codes == [tok.code_id(0), tok.code_id(8191), tok.code_id(42), *what_is]
    mixed = tok.encode_text("the lesion <bin_1> <bin_2> <bin_3> <bin_4> is <code_7>")
    assert tok.convert_ids_to_tokens(mixed) == [
        "Ġthe", "Ġlesion", "<bin_1>", "<bin_2>", "<bin_3>", "<bin_4>", "Ġis", "<code_7>",
    ]
    # decode writes them space separated (OFA's convention) and re-encodes to the same ids
    assert tok.decode(ids) == " what is <bin_12> <bin_300>"
    assert tok.decode(mixed) == " the lesion <bin_1> <bin_2> <bin_3> <bin_4> is <code_7>"
    assert tok.encode_text(tok.decode(mixed)) == mixed
    assert tok.decode(mixed, skip_special_tokens=True) == " the lesion is"
    assert tok.tokenize(" what is <bin_12> <bin_300>") == tokens


def test_call_and_encode_source(tok: BiomedGPTTokenizer) -> None:
    text = "what is the lesion <bin_5>"
    body = tok.encode_text(text)
    assert len(body) == 5
    assert tok.encode_source(text) == [0, *body, 2]
    assert tok(text)["input_ids"] == [0, *body, 2]  # __call__ keeps working, with <s> ... </s>
    assert tok.encode_source(text, max_length=4) == [0, *body[:2], 2]
    assert tok.encode_source(text, max_length=2) == [0, 2]
    assert tok.encode_text(text, max_length=3) == body[:3]
    with pytest.raises(ValueError):
        tok.encode_source(text, max_length=1)
    batch = tok(["what is", "the lesion <bin_1> <bin_2>"], padding=True, truncation=True, max_length=4)
    assert batch["input_ids"] == [[0, *tok.encode_text("what is"), 2], [0, *tok.encode_text("the lesion"), 2]]
    padded = tok(["what", "what is the lesion"], padding=True)
    assert padded["input_ids"][0] == [0, *tok.encode_text("what"), 2, 1, 1, 1]  # <pad> = 1
    assert padded["attention_mask"][0] == [1, 1, 1, 0, 0, 0]
    # the truncation just used on the backend does not leak into encode_text
    assert tok.encode_text(text) == body
    pair = tok("what is", "the lesion")["input_ids"]
    assert pair == [0, *tok.encode_text("what is"), 2, 2, *tok.encode_text("the lesion"), 2]


# ----------------------------------------------------------------------------- training


def test_train_layout_and_determinism() -> None:
    corpus = _corpus()
    a = BiomedGPTTokenizer.train(corpus, vocab_size=500)
    b = BiomedGPTTokenizer.train(iter(corpus), vocab_size=500)
    assert a.get_vocab() == b.get_vocab()
    assert a.bpe_vocab_and_merges() == b.bpe_vocab_and_merges()
    # this corpus has enough distinct pairs for all 500 - 256 merges; had the trainer stopped
    # early, the layout below would hold with the actual BPE size instead of 500
    bpe_size = a.vocab_size - 5  # minus the 4 specials and <mask>
    assert bpe_size == 500
    assert [a.convert_ids_to_tokens(i) for i in range(4)] == SPECIALS
    assert a.convert_ids_to_tokens(list(range(4, 260))) == sorted(ByteLevel.alphabet())
    assert a.mask_token_id == 4 + bpe_size
    assert a.code_offset == 5 + bpe_size and a.bin_offset == a.code_offset + 8192
    assert len(a) == 4 + 500 + 1 + 8192 + 1000
    assert a.convert_ids_to_tokens(len(a) - 1) == "<bin_999>"
    ids = a.encode_text("The chest radiograph shows a mild nodule <bin_10> <bin_20> <bin_30> <bin_40>")
    assert ids[-4:] == [a.bin_id(i) for i in (10, 20, 30, 40)]
    assert all(i < a.mask_token_id for i in ids[:-4])
    assert len(ids) < 30  # learned merges compress the text well below byte level
    with pytest.raises(ValueError, match="vocab_size"):
        BiomedGPTTokenizer.train(corpus, vocab_size=100)
    small = BiomedGPTTokenizer.train(corpus[:50], vocab_size=300, num_codes=4, num_bins=3)
    assert len(small) == small.vocab_size + 4 + 3 and small.code_offset == small.mask_token_id + 1


# ----------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tok: BiomedGPTTokenizer, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    files = tok.save_pretrained(out)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file() and str(out / name) in files
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == BART_VOCAB_SIZE
    assert list(vocab)[:4] == SPECIALS and list(vocab)[-1] == "<mask>" and vocab["<mask>"] == 50264
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "BiomedGPTTokenizer" and config["num_codes"] == 8192

    texts = [
        "what is the lesion",
        " which region does the text \" left lung \" describe? <bin_0> <bin_999> <bin_12> <bin_500>",
        "<code_0> <code_1> <code_8191> what is <mask> in the image",
    ]
    loaded = BiomedGPTTokenizer.from_pretrained(out)
    via_auto = AutoTokenizer.from_pretrained(out)
    rebuilt = BiomedGPTTokenizer.from_bpe_files(out / "vocab.json", out / "merges.txt")
    assert type(via_auto) is BiomedGPTTokenizer
    for other in (loaded, via_auto, rebuilt):
        assert len(other) == len(tok)
        assert (other.code_offset, other.bin_offset) == (tok.code_offset, tok.bin_offset)
        for text in texts:
            assert other.encode_text(text) == tok.encode_text(text)
            assert other(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()


def test_save_and_load_trained(tmp_path: Path) -> None:
    trained = BiomedGPTTokenizer.train(_corpus(120, seed=1), vocab_size=300, num_codes=32, num_bins=100)
    trained.save_pretrained(tmp_path)
    loaded = BiomedGPTTokenizer.from_pretrained(tmp_path)
    assert (loaded.num_codes, loaded.num_bins, len(loaded)) == (32, 100, len(trained))
    text = "the mammogram shows a focal mass <bin_3> <bin_99> <code_31>"
    assert loaded.encode_text(text) == trained.encode_text(text)


# ----------------------------------------------------------------------------- boxes


def test_box_to_bin_tokens_known_values() -> None:
    assert round(0.5 * 999) == 500  # 499.5 rounds half to even
    assert box_to_bin_tokens((0, 0.5, 1, 1)) == "<bin_0> <bin_500> <bin_999> <bin_999>"
    assert box_to_bin_tokens((0.1, 0.2, 0.3, 0.4)) == "<bin_100> <bin_200> <bin_300> <bin_400>"
    assert box_to_bin_tokens((0.25, 0.25, 0.75, 1.0), num_bins=5) == "<bin_1> <bin_1> <bin_3> <bin_4>"
    assert bin_tokens_to_box("<bin_0> <bin_500> <bin_999> <bin_999>") == (0.0, 500 / 999, 1.0, 1.0)
    assert bin_tokens_to_box(["<bin_0>", "<bin_1>", "<bin_2>", "<bin_3>"], num_bins=4) == (0.0, 1 / 3, 2 / 3, 1.0)
    assert bin_tokens_to_box("<bin_1><bin_2><bin_3><bin_4>") == (1 / 999, 2 / 999, 3 / 999, 4 / 999)


def test_box_round_trip_within_one_bin() -> None:
    rng = random.Random(0)
    for _ in range(200):
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        back = bin_tokens_to_box(box_to_bin_tokens((x0, y0, x1, y1)))
        for value, restored in zip((x0, y0, x1, y1), back):
            assert abs(value - restored) <= 0.5 / 999 + 1e-12


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((-0.1, 0, 1, 1), "x0=-0.1"),
        ((0, 0, 1.5, 1), "x1=1.5"),
        ((0.6, 0, 0.5, 1), "x1=0.5 < x0=0.6"),
        ((0, 0.9, 1, 0.2), "y1=0.2 < y0=0.9"),
        ((0, 0, float("nan"), 1), "x1=nan"),
        ((0, 0, 1), "4 numbers"),
        (("a", 0, 1, 1), "4 numbers"),
    ],
)
def test_invalid_boxes_raise(box: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        box_to_bin_tokens(box)


@pytest.mark.parametrize(
    "bad",
    [
        "<bin_1> <bin_2> <bin_3>",
        "<bin_1> <bin_2> <bin_3> <bin_4> <bin_5>",
        "<bin_1> <bin_2> <bin_3> 4",
        "<bin_1> <bin_2> <bin_3> <bin_1000>",
        "<bin_1> <bin_2> <bin_3> <code_4>",
        ["<bin_1>", "<bin_2>", "<bin_3>", "bin_4"],
        ["<bin_1>", "<bin_2>", "<bin_3>", 4],
    ],
)
def test_bad_bin_tokens_raise(bad: object) -> None:
    with pytest.raises(ValueError):
        bin_tokens_to_box(bad)  # type: ignore[arg-type]


def test_box_ids(tok: BiomedGPTTokenizer) -> None:
    box = (0.0, 0.5, 1.0, 1.0)
    ids = box_to_bin_ids(box, tok)
    assert ids == [58457, 58457 + 500, 59456, 59456]
    assert ids == tok.encode_text(box_to_bin_tokens(box))
    assert bin_ids_to_box(ids, tok) == (0.0, 500 / 999, 1.0, 1.0)
    with pytest.raises(ValueError, match="not a bin token id"):
        bin_ids_to_box([*ids[:3], tok.code_id(0)], tok)
    with pytest.raises(ValueError, match="expected 4"):
        bin_ids_to_box(ids[:3], tok)
    with pytest.raises(ValueError):
        box_to_bin_ids((0.5, 0, 0.4, 1), tok)
