"""The one predictor (`biomedgpt.inference`): the model and every input tensor on the model's device,
floating inputs in the model's dtype, for every decoding method. Proven on the CPU with a bfloat16 model:
every call of the model's forward and of its encoder is checked, and what the inputs would have been in
float32 fails the check."""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import pytest
import torch

from biomedgpt.inference import Predictor, resolve_device, resolve_dtype
from biomedgpt.tasks import DecodePlan


def _tensors(value: Any, where: str):
    """(where, tensor) of every tensor in call arguments: tensors, sequences, mappings and model outputs."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")
    elif isinstance(value, dict):  # keyword arguments, and transformers' ModelOutput (a dict)
        for k, v in value.items():
            yield from _tensors(v, f"{where}.{k}")


class PlacementSpy:
    """Wraps a module's forward: every tensor argument must be on `device`, floating ones in `dtype`."""

    def __init__(self, module: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> None:
        self.calls, self.tensors, self.problems = 0, 0, []
        forward = module.forward

        @functools.wraps(forward)  # generate() reads the forward's signature
        def checked(*args, **kwargs):
            self.calls += 1
            for where, t in _tensors({"args": list(args), **kwargs}, name):
                self.tensors += 1
                if t.device != device:
                    self.problems.append(f"{where} on {t.device}")
                if t.is_floating_point() and t.dtype != dtype:
                    self.problems.append(f"{where} in {t.dtype}")
            return forward(*args, **kwargs)

        module.forward = checked


@pytest.fixture(scope="module")
def bf16_predictor(demo_tokenizer_dir):
    from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from biomedgpt.model.tokenizer import BiomedGPTTokenizer

    tok = BiomedGPTTokenizer.from_pretrained(demo_tokenizer_dir)
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_size("demo", vocab_size=len(tok)))
    return Predictor(model, tok, image_size=32, max_source_length=32, batch_size=2, device="cpu", dtype="bfloat16")


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_device_and_dtype_options():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device cuda: this process sees no CUDA device"):
            resolve_device("cuda")


def test_every_input_reaches_the_model_on_its_device_in_its_dtype(bf16_predictor):
    p = bf16_predictor
    assert p.device == torch.device("cpu") and p.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in p.model.parameters())
    images = [np.random.default_rng(i).uniform(-1, 1, (3, 32, 32)).astype(np.float32) for i in range(2)] + [None]
    inputs = p.inputs([" is there a fracture?", " which organ?", " what is this?"], images)
    assert inputs["patch_images"].dtype == torch.bfloat16 and inputs["patch_masks"].tolist() == [True, True, False]
    assert all(t.device == p.device for t in inputs.values())

    spies = [PlacementSpy(p.model, "model", p.device, p.dtype), PlacementSpy(p.model.encoder, "encoder", p.device,
                                                                             p.dtype)]
    answers = ("yes", "no", "left lung")
    classes = ("atelectasis", "effusion", "pneumonia")
    plans = [DecodePlan("vqa", "score", 1, 8, candidates=answers), DecodePlan("vqa", "trie", 1, 8, candidates=answers),
             DecodePlan("classify", "multilabel", 1, 8, candidates=classes),
             DecodePlan("caption", "free", 2, 6, no_repeat_ngram_size=2)]
    for plan in plans:
        out = p.decode(plan, inputs)
        assert len(out) == 3, plan
        if plan.method == "score":
            assert all(d.prediction in answers and abs(sum(d.probabilities) - 1) < 1e-3 for d in out)
            assert all(np.isfinite(d.log_probs).all() for d in out)
        if plan.method == "trie":
            assert all(d.prediction in answers for d in out)
        if plan.method == "multilabel":
            assert all(set(d.prediction) <= set(classes) and len(d.probabilities) == 4 for d in out)
    # evaluation's path: shard records through their task, images decoded from bytes
    records = [{"id": "a", "question": "is there a fracture?", "answer": "no", "answer_type": "closed",
                "_image": _png(1)},
               {"id": "b", "question": "which lung?", "answer": "left lung", "answer_type": "open", "_image": _png(2)}]
    preds = p.predict(DecodePlan("vqa", "score", 1, 8, candidates=answers), records)
    assert [x["id"] for x in preds] == ["a", "b"] and all(x["prediction"] in answers for x in preds)
    for spy in spies:
        assert spy.calls and spy.tensors, "the spy saw no call"
        assert not spy.problems, spy.problems[:5]


def test_the_spy_catches_float32_inputs_to_a_bfloat16_model(bf16_predictor):
    """The check above is not vacuous: images left in float32 are caught at the encoder."""
    p = bf16_predictor
    spy = PlacementSpy(p.model.encoder, "encoder", p.device, p.dtype)
    inputs = p.inputs([" what is this?"], [np.zeros((3, 32, 32), dtype=np.float32)])
    inputs["patch_images"] = inputs["patch_images"].float()
    with pytest.raises(RuntimeError):  # the bf16 convolution refuses float32 pixels ...
        p.decode(DecodePlan("vqa", "score", 1, 8, candidates=("yes", "no")), inputs)
    assert any("patch_images in torch.float32" in x for x in spy.problems)  # ... and the spy names them


def test_training_works_after_inference_in_the_same_process(bf16_predictor):
    """The position-bias tables are cached per process: built under the predictor's inference mode they must
    still be ordinary tensors, or a later training step in that process (rank 0 evaluating during training,
    a test session) fails with "Inference tensors cannot be saved for backward"."""
    from biomedgpt.model import BiomedGPTForConditionalGeneration

    p = bf16_predictor
    p.decode(DecodePlan("vqa", "score", 1, 8, candidates=("yes", "no")), p.inputs([" is it?"]))
    torch.manual_seed(1)
    model = BiomedGPTForConditionalGeneration(p.model.config).float().train()
    ids = p.inputs([" is there a fracture?"])["input_ids"]
    out = model(input_ids=ids, decoder_input_ids=ids[:, :4], labels=ids[:, 1:5])
    out.loss.backward()
    assert torch.isfinite(out.loss)
