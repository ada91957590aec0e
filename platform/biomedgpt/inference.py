"""The one predictor: a model and its tokenizer answering tasks, for evaluation and serving alike.

`Predictor` holds a model placed on a device in a dtype (`device` auto | cpu | cuda, auto = CUDA when
there is one; `dtype` float32 | bfloat16 | float16), and decodes what a task's `DecodePlan` says:

| method       | how                                                                               |
|--------------|-----------------------------------------------------------------------------------|
| `trie`       | generation under the prefix tree of the candidates (`AnswerTrie`): only a candidate comes out |
| `score`      | every candidate scored under the tree (`model.constrained.score_candidates`, the decoder over samples x candidates at once); the best is the answer, with every candidate's log-probability and softmax probability |
| `multilabel` | a list of classes generated under `MultiLabelTrie` (class order, no repeats, or "no finding"), with each class's probability (`constrained.decode_label_lists`) |
| `free`       | beam search with the plan's beam size, no-repeat n-gram size and length penalty    |

`inputs` tokenises instructions and stacks preprocessed images; every tensor it returns is on the
model's device, floating ones in the model's dtype, so that inference runs in that dtype. The tries of
constrained decoding are built once per candidate set and kept in one LRU. `predict` answers shard
records (evaluation: each record through its task's `example`, one dict per record with the reference
fields of `biomedgpt score`); the serving engine (`serve/engine.py`) calls `inputs` and `decode` with
the requests' instructions and images, and `adapters` per sample when LoRA adapters are loaded on the model
(`Predictor.adapters`: one batch, each sample through its own adapter). Nothing here imports Ray: the predictor
runs on any machine with torch.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data.transforms import load_image, pad_sequences
from .metrics.classify import NO_FINDING, SEPARATOR
from .model import BiomedGPTForConditionalGeneration
from .model.adapters import AdapterSet
from .model.constrained import AnswerTrie, MultiLabelTrie, decode_label_lists, score_candidates
from .model.tokenizer import BiomedGPTTokenizer
from .modeldir import ModelMeta, read_model_meta
from .tasks import DecodePlan, Task, get_task

DEVICES = ("auto", "cpu", "cuda")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: CUDA when this process sees a GPU, else the CPU; `cuda` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: this process sees no CUDA device (a Ray actor needs a GPU to be asked "
                           "for it: evaluate.use_gpu / models.num_gpus)")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Decoded:
    """One sample's answer: `prediction` (text; for `multilabel` the list of class names) and, for the
    closed-set methods, the `candidates` with their `log_probs` (`score`) and `probabilities` (`score`:
    the softmax over the candidates; `multilabel`: each class's own probability, and the answer for none's)."""

    prediction: str | list[str]
    candidates: list[str] | None = None
    log_probs: list[float] | None = None
    probabilities: list[float] | None = None


def load_model_dir(model_dir: str | Path, *, tokenizer_dir: str | Path | None = None
                   ) -> tuple[BiomedGPTForConditionalGeneration, BiomedGPTTokenizer, ModelMeta]:
    """(model in eval mode, on the CPU in float32; tokenizer; metadata) of an exported model directory. The
    weights are read from model.safetensors only: a model directory's pickles (pytorch_model.bin) are never
    loaded."""
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True).eval()
    tok = BiomedGPTTokenizer.from_pretrained(tokenizer_dir or model_dir)
    return model, tok, read_model_meta(model_dir)


class Predictor:
    """A model answering task plans (see the module docstring). `device` / `dtype`: where and in what the
    model runs (None: leave the model as it is, e.g. the evaluation during training hands over a copy
    already on the training device). `image_size` / `max_source_length`: the input resolution and
    encoder length unless a call says otherwise; `batch_size`: records per model call in `predict`."""

    def __init__(self, model, tokenizer, *, image_size: int = 256, max_source_length: int = 80,
                 batch_size: int = 16, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = "float32", max_tries: int = 16,
                 meta: ModelMeta | None = None) -> None:
        if device is not None or dtype is not None:
            model = model.to(device=resolve_device(device) if device is not None else None,
                             dtype=resolve_dtype(dtype) if dtype is not None else None)
        self.model = model.eval()
        self.tok = tokenizer
        self.image_size = image_size
        self.max_source_length = max_source_length
        self.batch_size = batch_size
        self.max_tries = max_tries
        self.meta = meta or ModelMeta()
        self._tries: OrderedDict[tuple, Any] = OrderedDict()
        self._adapters: AdapterSet | None = None

    # -- adapters --------------------------------------------------------------------------------

    @property
    def adapters(self) -> AdapterSet:
        """The LoRA adapters loaded on this predictor's model (`model/adapters.py`), by id."""
        if self._adapters is None:
            self._adapters = AdapterSet(self.model)
        return self._adapters

    @property
    def has_adapters(self) -> bool:
        return self._adapters is not None and self._adapters.peft is not None

    def _routing(self, adapters: Sequence[str | None] | None, n: int):
        """Each sample through its adapter (None: the model alone); with adapters loaded, samples that name none
        go through the model alone too."""
        if adapters is None and not self.has_adapters:
            return nullcontext()
        return self.adapters.route(list(adapters) if adapters is not None else [None] * n)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, device: str | torch.device = "auto", dtype: str = "float32",
                       image_size: int | None = None, max_source_length: int | None = None, batch_size: int = 16,
                       tokenizer_dir: str | Path | None = None) -> "Predictor":
        """The predictor of an exported model directory, with the image size and source length its
        training recorded unless given."""
        model, tok, meta = load_model_dir(model_dir, tokenizer_dir=tokenizer_dir)
        return cls(model, tok, image_size=image_size or meta.image_size,
                   max_source_length=max_source_length or meta.max_source_length, batch_size=batch_size,
                   device=device, dtype=dtype, meta=meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- inputs ----------------------------------------------------------------------------------

    def source_length(self, task: Task, trained: bool) -> int:
        """The encoder length for `task`: the model's own when it was trained on it, else at least the
        task's (`Task.source_length`: an NLI pair or an article needs more than a question); never more
        than the model's positions."""
        n = self.max_source_length if trained else max(self.max_source_length, task.source_length)
        return min(n, int(getattr(self.model.config, "max_position_embeddings", 1024)))

    def inputs(self, instructions: Sequence[str], images: Sequence[np.ndarray | None] | None = None,
               source_length: int | None = None) -> dict[str, torch.Tensor]:
        """`input_ids` of the instructions and, when any sample has one, `patch_images` (the preprocessed
        (3, S, S) images, zeros where a sample has none) and `patch_masks`: all on the model's device,
        the images in its dtype."""
        device, dtype = self.device, self.dtype
        length = source_length or self.max_source_length
        ids = pad_sequences([self.tok.encode_source(text, max_length=length) for text in instructions],
                            self.tok.pad_token_id)
        out = {"input_ids": torch.from_numpy(ids).to(device)}
        if images is not None and any(im is not None for im in images):
            size = next(im for im in images if im is not None).shape[-1]
            pixels = np.zeros((len(images), 3, size, size), dtype=np.float32)
            masks = np.zeros(len(images), dtype=bool)
            for i, im in enumerate(images):
                if im is not None:
                    pixels[i] = im
                    masks[i] = True
            out["patch_images"] = torch.from_numpy(pixels).to(device=device, dtype=dtype)
            out["patch_masks"] = torch.from_numpy(masks).to(device)
        return out

    # -- tries (one LRU) -------------------------------------------------------------------------

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._tries:
            self._tries[key] = build()
            while len(self._tries) > self.max_tries:
                self._tries.popitem(last=False)
        self._tries.move_to_end(key)
        return self._tries[key]

    def answer_trie(self, candidates: tuple[str, ...]) -> tuple[AnswerTrie, list[str]]:
        """The prefix tree of `candidates` (encoded as targets are, then EOS) and the text of each of its
        candidates (the first text, where two texts have the same tokens)."""

        def build():
            seqs = [tuple(self.tok.encode_text(c)) + (self.tok.eos_token_id,) for c in candidates]
            trie = AnswerTrie(seqs, eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            texts: dict[tuple[int, ...], str] = {}
            for seq, text in zip(seqs, candidates):
                texts.setdefault(seq, text)
            return trie, [texts[c] for c in trie.candidates]

        return self._cached(("answers", candidates), build)

    def label_list_trie(self, classes: tuple[str, ...]) -> MultiLabelTrie:
        """The `MultiLabelTrie` of `classes` (class order; "no finding" is the answer for none, not a class)."""
        names = [c for c in classes if c != NO_FINDING]
        return self._cached(("label lists", classes),
                            lambda: MultiLabelTrie.from_texts(self.tok, names, NO_FINDING, SEPARATOR))

    # -- decoding --------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, plan: DecodePlan, inputs: dict[str, torch.Tensor],
               adapters: Sequence[str | None] | None = None) -> list[Decoded]:
        """One `Decoded` per sample of `inputs`, as `plan.method` says (module docstring); `adapters`: per sample,
        the id of a loaded adapter to answer through (None: the model alone), all in one batch."""
        with self._routing(adapters, int(inputs["input_ids"].size(0))):
            return self._decode(plan, inputs)

    def _decode(self, plan: DecodePlan, inputs: dict[str, torch.Tensor]) -> list[Decoded]:
        images, masks = inputs.get("patch_images"), inputs.get("patch_masks")
        if plan.method == "score":
            trie, texts = self.answer_trie(plan.candidates)
            logp = score_candidates(self.model, trie, inputs["input_ids"], patch_images=images, patch_masks=masks)
            probs = torch.softmax(logp, dim=-1).cpu()
            logp = logp.cpu()
            return [Decoded(texts[int(lp.argmax())], texts, lp.tolist(), pr.tolist()) for lp, pr in zip(logp, probs)]
        if plan.method == "multilabel":
            trie = self.label_list_trie(plan.candidates)
            names = [c for c in plan.candidates if c != NO_FINDING]
            listed, probs = decode_label_lists(self.model, trie, inputs["input_ids"], images, masks,
                                               beam_size=plan.beam_size, max_new_tokens=plan.max_new_tokens,
                                               length_penalty=plan.length_penalty)
            return [Decoded([names[i] for i in items], [*names, NO_FINDING], None, row.tolist())
                    for items, row in zip(listed, probs)]
        kwargs: dict[str, Any] = dict(inputs, num_beams=plan.beam_size, max_new_tokens=plan.max_new_tokens,
                                      do_sample=False)
        if plan.beam_size > 1:
            kwargs.update(length_penalty=plan.length_penalty, early_stopping=True)
        if plan.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = plan.no_repeat_ngram_size
        if plan.method == "trie":
            kwargs["prefix_allowed_tokens_fn"] = self.answer_trie(plan.candidates)[0].prefix_allowed_tokens_fn()
        seqs = self.model.generate(**kwargs)
        texts = [t.strip() for t in self.tok.batch_decode(seqs[:, 1:], skip_special_tokens=True)]
        if plan.method == "trie":
            # the trie's tokens decode to the candidate's text; map back exactly (no re-normalisation drift)
            by_text = {" ".join(v.split()).lower(): v for v in self.answer_trie(plan.candidates)[1]}
            texts = [by_text.get(" ".join(t.split()).lower(), t) for t in texts]
        return [Decoded(t) for t in texts]

    # -- evaluation: shard records ---------------------------------------------------------------

    def predict(self, plan: DecodePlan, records: list[dict[str, Any]], image_size: int | None = None
                ) -> list[dict[str, Any]]:
        """One dict per record: id, prediction (text; for `multilabel` the list of class names), the
        instruction, the task's reference fields (`Task.reference_fields`: what `biomedgpt score` reads)
        and, for `score` and `multilabel`, `scores` {candidate: probability}. `image_size` overrides the
        predictor's input resolution for these records."""
        task = get_task(plan.task)
        size = image_size or self.image_size
        out: list[dict[str, Any]] = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            exs = []
            for r in chunk:
                try:
                    exs.append(task.example(r))
                except ValueError as err:
                    raise ValueError(f"{r.get('dataset', '?')}/{r.get('split', '?')}: {err}") from None
            images = [load_image(r["_image"], size) if e.has_image and r.get("_image") else None
                      for r, e in zip(chunk, exs)]
            for e, d in zip(exs, self.decode(plan, self.inputs([e.instruction for e in exs], images))):
                pred: dict[str, Any] = {"id": e.meta["id"], "prediction": d.prediction,
                                        "instruction": e.instruction.strip()}
                pred.update(task.reference_fields(e.meta))
                if d.probabilities is not None:
                    pred["scores"] = {c: round(float(p), 6) for c, p in zip(d.candidates, d.probabilities)}
                out.append(pred)
        return out

