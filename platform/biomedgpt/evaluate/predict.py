"""Predictions of a model directory on shard records, and the evaluation of a job's splits.

VQA decoding follows the official recipe: generation under a prefix tree over the candidate answers
(the answers seen in training, shipped with the model as answers.json), beam 1; or free beam search.
Writes `<out>/<dataset>-<split>.jsonl` (one prediction per line), `metrics.json` and `report.md`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

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


def evaluate_model_dir(model_dir: str | Path, spec, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate on the spec's `evaluate.splits` ("train" = the training datasets, other names = the
    `data.eval` entries with that split); writes predictions, metrics.json and report.md."""
    from ..runner import records, say

    ev = spec.evaluate
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, answers = load_model_dir(model_dir)
    train_answers = [str(r.get("answer", "")).strip().lower()
                     for ref in spec.data.train for r in records(spec.data.shards, ref.dataset, ref.split)]
    results: dict[str, Any] = {}
    lines = [f"# Evaluation of {model_dir}", "",
             "| dataset | split | n | overall | closed | open | majority baseline |", "|---|---|---|---|---|---|---|"]
    for split in ev.splits:
        refs = spec.data.train if split == "train" else [r for r in spec.data.eval if r.split == split]
        for ref in refs:
            recs = list(records(spec.data.shards, ref.dataset, ref.split))
            if ev.max_samples:
                recs = recs[: ev.max_samples]
            say(f"evaluate: {ref.dataset}/{ref.split} ({len(recs)} questions, {ev.decoding} decoding)")
            preds = predict_vqa(model, tok, recs, image_size=spec.model.image_size,
                                max_source_length=spec.data.max_source_length, answers=answers,
                                decoding=ev.decoding, beam_size=ev.beam_size, max_new_tokens=ev.max_new_tokens,
                                batch_size=ev.batch_size)
            with open(out / f"{ref.dataset}-{ref.split}.jsonl", "w") as fh:
                for p in preds:
                    fh.write(json.dumps(p) + "\n")
            m = vqa_scores(preds)
            m["majority_baseline"] = majority_baseline(train_answers, preds)
            results[f"{ref.dataset}/{ref.split}"] = m

            def fmt(v: float | None) -> str:
                return "-" if v is None else f"{v:.3f}"

            lines.append(f"| {ref.dataset} | {ref.split} | {len(preds)} | {fmt(m['accuracy'])} | "
                         f"{fmt(m['closed_accuracy'])} | {fmt(m['open_accuracy'])} | {fmt(m['majority_baseline'])} |")
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return results
