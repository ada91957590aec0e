"""Predictions of a model on shard records.

`Predictor` decodes any task family (tasks/) the official way (`decode_plan`): generation under a
prefix tree (trie) over the answer candidates for VQA and NLI (beam 1), every class name scored
under the trie for classification (argmax), beam search with the official beam size, no-repeat
n-gram size and length penalty for captioning and summarisation; or freely for every task
(zero-shot). `predict_vqa` is the single-task path serving uses. The evaluation job that runs
Predictors on Ray and writes the results is `biomedgpt.evaluate.job`.

Multi-label classification (records whose `label_name` is a list, e.g. ChestMNIST) decodes with
method `multilabel`: generation under `MultiLabelTrie` (class names in class order, no repeats, or
"no finding" alone; the task's beam size, and always room for the longest list) gives the prediction,
a list of class names (empty for none); then `label_list_probabilities` gives each class a probability
of being listed, judged where that answer would list it (the class against the answer's own
continuation there), stored per record as `scores` {class: probability, "no finding": probability of
the answer for none} for the ROC AUC. Each is a probability of its own event: they do not sum to 1.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch


def load_model_dir(model_dir: str | Path):
    """(model in eval mode, tokenizer, answer candidates or None) of an exported model directory."""
    from ..model import BiomedGPTForConditionalGeneration
    from ..model.tokenizer import BiomedGPTTokenizer

    model_dir = Path(model_dir)
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = BiomedGPTTokenizer.from_pretrained(model_dir)
    answers_file = model_dir / "answers.json"
    answers = json.loads(answers_file.read_text()) if answers_file.is_file() else None
    return model, tok, answers


@torch.no_grad()
def predict_vqa(model, tok, recs: list[dict[str, Any]], *, image_size: int, max_source_length: int,
                answers: list[str] | None, decoding: str = "trie", beam_size: int = 1, max_new_tokens: int = 16,
                batch_size: int = 16) -> list[dict[str, Any]]:
    """Answer each record's question about its image; returns one dict per record."""
    from ..data.transforms import load_image, pad_sequences
    from ..model.constrained import AnswerTrie
    from ..tasks import get_task

    task = get_task("vqa")
    trie = None
    if decoding == "trie":
        if not answers:
            raise ValueError("trie decoding needs answer candidates (answers.json beside the model)")
        trie = AnswerTrie.from_texts(tok, answers)
    out: list[dict[str, Any]] = []
    for start in range(0, len(recs), batch_size):
        chunk = recs[start:start + batch_size]
        exs = [task.example(r) for r in chunk]
        ids = torch.from_numpy(pad_sequences([tok.encode_source(e.instruction, max_length=max_source_length)
                                              for e in exs], tok.pad_token_id))
        images = np.zeros((len(chunk), 3, image_size, image_size), dtype=np.float32)
        masks = np.zeros(len(chunk), dtype=bool)
        for i, r in enumerate(chunk):
            if r.get("_image"):
                images[i] = load_image(r["_image"], image_size)
                masks[i] = True
        kwargs = dict(input_ids=ids, patch_images=torch.from_numpy(images), patch_masks=torch.from_numpy(masks),
                      num_beams=beam_size, max_new_tokens=max_new_tokens, do_sample=False)
        if trie is not None:
            kwargs["prefix_allowed_tokens_fn"] = trie.prefix_allowed_tokens_fn()
        seqs = model.generate(**kwargs)
        texts = tok.batch_decode(seqs[:, 1:], skip_special_tokens=True)
        for r, e, text in zip(chunk, exs, texts):
            out.append({"id": e.meta["id"], "question": e.meta["question"], "prediction": text.strip().lower(),
                        "answer": e.meta["answer"], "answer_type": e.meta["answer_type"]})
    return out


def vqa_scores(preds: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, closed and open (the same metric code as `biomedgpt score --task vqa`)."""
    from .vqa import vqa_accuracy

    preds = list(preds)
    return vqa_accuracy([p["prediction"] for p in preds], [p["answer"] for p in preds],
                        [p["answer_type"] for p in preds])


def majority_baseline(train_answers: list[str], preds: list[dict[str, Any]]) -> float:
    """Accuracy of always answering the most frequent training answer."""
    if not preds or not train_answers:
        return 0.0
    from .vqa import normalize_answer

    majority = normalize_answer(Counter(train_answers).most_common(1)[0][0])
    return sum(normalize_answer(p["answer"]) == majority for p in preds) / len(preds)


# -- every task: the official decoding of each task family, or free (zero-shot) generation ---------


@dataclass(frozen=True)
class DecodePlan:
    """How one dataset is decoded. `method`: `trie` (generation under a prefix tree over `candidates`:
    only a candidate can come out), `score` (every candidate scored under the trie, the best taken: the
    official classification decoding), `multilabel` (a list of the `candidates`, the class names in
    class order, generated under `MultiLabelTrie`, plus per-class scores) or `free` (beam search with
    these settings)."""

    task: str
    method: str
    beam_size: int
    max_new_tokens: int
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    candidates: tuple[str, ...] | None = None


def decode_plan(task_name: str, candidates: Sequence[str] | None, *, mode: str = "official",
                decoding: str | None = None, beam_size: int | None = None,
                max_new_tokens: int | None = None, multi_label: bool = False) -> DecodePlan:
    """The decoding of `task_name` (tasks/: its official `Decoding`) for `mode` official | zero_shot;
    `decoding` (trie | beam) overrides how constrained tasks decode in official mode, `beam_size` /
    `max_new_tokens` override the official values. A constrained task without candidates (dataset
    policy `none`) generates freely. `multi_label` (classification whose records list several class
    names): the candidates are the class names in class order, decoded with method `multilabel`."""
    from ..tasks import get_task

    official = get_task(task_name).decoding
    beams = beam_size or official.beam_size
    max_new = max_new_tokens or official.max_new_tokens
    cands = tuple(candidates) if candidates else None
    if mode == "official" and official.constrained and cands and decoding != "beam":
        if multi_label and task_name == "classify":
            return DecodePlan(task_name, "multilabel", beams, max_new, candidates=cands)
        method = "score" if task_name == "classify" else "trie"
        return DecodePlan(task_name, method, beams, max_new, candidates=cands)
    return DecodePlan(task_name, "free", beams, max_new, official.no_repeat_ngram_size, official.length_penalty,
                      candidates=cands)


def reference_fields(task_name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The fields `biomedgpt score` reads from a references line, from an Example's meta."""
    if task_name == "vqa":
        return {"references": meta["answer"], "answer_type": meta["answer_type"]}
    if task_name in ("caption", "summarize"):
        return {"references": list(meta["references"])}
    return {"references": meta["answer"]}


class Predictor:
    """Predictions of one model for shard records of any task family, batch by batch (no Ray, no
    files): used by the evaluation's Ray actors and by the evaluation during training."""

    def __init__(self, model, tokenizer, *, image_size: int, max_source_length: int, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.image_size = image_size
        self.max_source_length = max_source_length
        self.batch_size = batch_size
        self._tries: dict[tuple[str, ...], tuple[Any, dict[tuple[int, ...], str]]] = {}
        self._list_tries: dict[tuple[str, ...], Any] = {}

    def trie(self, candidates: tuple[str, ...]):
        """(AnswerTrie over the candidates, candidate token sequence -> text), cached."""
        from ..model.constrained import AnswerTrie

        if candidates not in self._tries:
            seqs = {}
            for text in candidates:
                seq = tuple(self.tok.encode_text(text)) + (self.tok.eos_token_id,)
                seqs.setdefault(seq, text)
            trie = AnswerTrie(list(seqs), eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            self._tries[candidates] = (trie, seqs)
        return self._tries[candidates]

    def multi_label_trie(self, classes: tuple[str, ...]):
        """MultiLabelTrie over the class names (in class order) and "no finding", cached."""
        from ..model.constrained import MultiLabelTrie
        from ..tasks.classify import NO_FINDING, SEPARATOR

        if classes not in self._list_tries:
            self._list_tries[classes] = MultiLabelTrie.from_texts(self.tok, [c for c in classes if c != NO_FINDING],
                                                                  NO_FINDING, SEPARATOR)
        return self._list_tries[classes]

    @torch.no_grad()
    def predict(self, plan: DecodePlan, records: list[dict[str, Any]], image_size: int | None = None
                ) -> list[dict[str, Any]]:
        """One dict per record: id, prediction (text; for `multilabel` the list of class names), the
        reference fields of `biomedgpt score`, and what the report shows (instruction; class
        probabilities for `score` and `multilabel`). `image_size` overrides the
        predictor's input resolution for these records."""
        from ..tasks import get_task

        task = get_task(plan.task)
        out: list[dict[str, Any]] = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            exs = []
            for r in chunk:
                try:
                    exs.append(task.example(r))
                except ValueError as err:
                    raise ValueError(f"{r.get('dataset', '?')}/{r.get('split', '?')}: {err}") from None
            texts, extras = self._decode(plan, chunk, exs, image_size or self.image_size)
            for r, e, text, extra in zip(chunk, exs, texts, extras):
                pred = {"id": e.meta["id"], "prediction": text, "instruction": e.instruction.strip()}
                pred.update(reference_fields(plan.task, e.meta))
                pred.update(extra)
                out.append(pred)
        return out

    def _inputs(self, chunk: list[dict[str, Any]], exs: list[Any], size: int) -> dict[str, torch.Tensor]:
        from ..data.transforms import load_image, pad_sequences

        device = next(self.model.parameters()).device
        ids = torch.from_numpy(pad_sequences([self.tok.encode_source(e.instruction, max_length=self.max_source_length)
                                              for e in exs], self.tok.pad_token_id))
        inputs: dict[str, torch.Tensor] = {"input_ids": ids.to(device)}
        if any(e.has_image and r.get("_image") for r, e in zip(chunk, exs)):
            images = np.zeros((len(chunk), 3, size, size), dtype=np.float32)
            masks = np.zeros(len(chunk), dtype=bool)
            for i, (r, e) in enumerate(zip(chunk, exs)):
                if e.has_image and r.get("_image"):
                    images[i] = load_image(r["_image"], size)
                    masks[i] = True
            inputs["patch_images"] = torch.from_numpy(images).to(device)
            inputs["patch_masks"] = torch.from_numpy(masks).to(device)
        return inputs

    def _decode(self, plan: DecodePlan, chunk, exs, size: int) -> tuple[list[Any], list[dict[str, Any]]]:
        inputs = self._inputs(chunk, exs, size)
        if plan.method == "multilabel":
            return self._decode_multi_label(plan, inputs)
        if plan.method == "score":
            from ..model.constrained import score_candidates

            trie, texts = self.trie(plan.candidates)
            scores = score_candidates(self.model, trie, inputs["input_ids"], patch_images=inputs.get("patch_images"),
                                      patch_masks=inputs.get("patch_masks"))
            probs = torch.softmax(scores.float(), dim=-1).cpu()
            names = [texts[c] for c in trie.candidates]
            preds = [names[i] for i in probs.argmax(-1).tolist()]
            return preds, [{"scores": {n: round(float(p), 6) for n, p in zip(names, row)}} for row in probs]
        kwargs: dict[str, Any] = dict(inputs, num_beams=plan.beam_size, max_new_tokens=plan.max_new_tokens,
                                      do_sample=False)
        if plan.beam_size > 1:
            kwargs.update(length_penalty=plan.length_penalty, early_stopping=True)
        if plan.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = plan.no_repeat_ngram_size
        if plan.method == "trie":
            kwargs["prefix_allowed_tokens_fn"] = self.trie(plan.candidates)[0].prefix_allowed_tokens_fn()
        seqs = self.model.generate(**kwargs)
        texts = [t.strip() for t in self.tok.batch_decode(seqs[:, 1:], skip_special_tokens=True)]
        if plan.method == "trie":
            # the trie's tokens decode to the candidate's text; map back exactly (no re-normalisation drift)
            _, by_seq = self.trie(plan.candidates)
            by_text = {" ".join(v.split()).lower(): v for v in by_seq.values()}
            texts = [by_text.get(" ".join(t.split()).lower(), t) for t in texts]
        return texts, [{} for _ in texts]

    def _decode_multi_label(self, plan: DecodePlan, inputs: dict[str, torch.Tensor]
                            ) -> tuple[list[list[str]], list[dict[str, Any]]]:
        from ..model.constrained import decode_label_lists
        from ..tasks.classify import NO_FINDING

        trie = self.multi_label_trie(plan.candidates)
        names = [c for c in plan.candidates if c != NO_FINDING]
        listed, probs = decode_label_lists(self.model, trie, inputs["input_ids"], inputs.get("patch_images"),
                                           inputs.get("patch_masks"), beam_size=plan.beam_size,
                                           max_new_tokens=plan.max_new_tokens, length_penalty=plan.length_penalty)
        keys = [*names, NO_FINDING]
        preds = [[names[i] for i in row] for row in listed]
        return preds, [{"scores": {k: round(float(p), 6) for k, p in zip(keys, row)}} for row in probs]
