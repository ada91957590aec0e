"""PathVQA (He et al. 2020): pathology VQA from textbooks and PEIR.

Native layout: the LXMERT-format annotation files of the PathVQA release (``pvqa_train.json``,
``pvqa_val.json``, ``pvqa_test.json``: per-image records ``{img_id, labelf: {pvqa: [{answer: score}]},
sentf: {pvqa: [question, ...]}}``, question ``i`` answered by label ``i``) and the images
``images/<split>/<img_id>.jpg`` (``images/<img_id>.jpg`` is accepted too).

The split is the ``img_id`` prefix (``train_0001``, ``val_0417``, ``test_0847``), so annotation files
that were merged or renamed still split correctly; an id without such a prefix takes the split of
the file role it came from. PathVQA has no answer_type field: yes/no answers are ``closed``,
everything else ``open`` (as in the paper). Quirks handled: mixed case (``"Cardiovascular"`` and
``"cardiovascular"``), trailing spaces in answers, doubled spaces in questions, images without
questions (skipped: they carry no record). A record or question that cannot be used is skipped and named
(``Converter.defects``).

Licence: the images and captions are the publishers' copyright; never ship PathVQA images.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from .. import storage
from .base import Converter, ImageIndex, SourceFormatError, SourceRecord, load_json, require, sort_splits
from .normalise import clean_text, is_closed_answer, normalise_answer

_SPLIT_PREFIX = re.compile(r"^(train|val|test)_")
SPLIT_ROLES = ("train", "val", "test")


class PathVqaConverter(Converter):
    name = "pathvqa"
    task = "vqa"
    native_format = "PathVQA LXMERT format: pvqa_{train,val,test}.json (img_id, labelf.pvqa, sentf.pvqa) + images/<split>/<img_id>.jpg"
    licence = "images and captions are the publishers' copyright (research use only; do not redistribute images)"
    access = "open"
    file_roles = {"train": "pvqa_train.json", "val": "pvqa_val.json", "test": "pvqa_test.json", "images": "images"}

    def __init__(self, source: str, files=None, *, on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        self._images = ImageIndex(self.url("images"))
        self._by_split: dict[str, list[tuple[str, dict[str, Any], int, str]]] | None = None

    def _load(self) -> dict[str, list[tuple[str, dict[str, Any], int, str]]]:
        """Image records per split: (file, record, index in file, img_id)."""
        if self._by_split is not None:
            return self._by_split
        by_split: dict[str, list] = {}
        seen: dict[str, str] = {}
        files = []
        for role in SPLIT_ROLES:
            url = self.url(role)
            if url not in [f for _, f in files] and storage.exists(url):
                files.append((role, url))
        if not files:
            expected = ", ".join(self.files[r] for r in SPLIT_ROLES)
            raise SourceFormatError(self.source, f"no PathVQA annotation files found (expected {expected})")
        for role, file in files:
            data = load_json(file)
            if not isinstance(data, list):
                raise SourceFormatError(file, f"expected a JSON list of per-image records, got {type(data).__name__}")
            for i, raw in enumerate(data):
                with self.guard(None, i) as guard:  # the split is in the img_id: unknown until read
                    img_id = guard.id = clean_text(require(raw, "img_id", str, file, f"record {i}"))
                    match = _SPLIT_PREFIX.match(img_id)
                    guard.split = split = match.group(1) if match else role
                    if img_id in seen:
                        raise SourceFormatError(file, f"duplicate img_id (also in {seen[img_id]})",
                                                record=f"record {i} ({img_id})", field="img_id")
                    seen[img_id] = file
                    by_split.setdefault(split, []).append((file, raw, i, img_id))
        self._by_split = {s: by_split[s] for s in sort_splits(by_split)}
        return self._by_split

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        for file, raw, i, img_id in self._load()[split]:
            questions, labels, image = (), (), None
            with self.guard(split, i) as guard:  # the image record: every question of a broken one is lost
                guard.id = img_id
                where = f"record {i} ({img_id})"
                questions = _source_list(require(raw, "sentf", dict, file, where), "sentf", file, where)
                labels = _source_list(require(raw, "labelf", dict, file, where), "labelf", file, where)
                if len(questions) != len(labels):
                    raise SourceFormatError(file, f"{len(questions)} questions in sentf but {len(labels)} answers "
                                                  "in labelf", record=where, field="labelf")
                image_name, image = self._find_image(split, img_id)
                if image is None and questions:
                    self.missing_image(split, file, f"{split}/{img_id}.jpg", record=where)
                    questions = labels = ()
            if image is None:
                continue
            for j, (question, label) in enumerate(zip(questions, labels)):
                with self.guard(split, i) as guard:  # one question: the others of the image stay
                    guard.id = f"{img_id}_q{j}"
                    if not isinstance(question, str) or not question.strip():
                        raise SourceFormatError(file, f"expected a non-empty question string, got {question!r}",
                                                record=where, field=f"sentf.pvqa[{j}]")
                    answer_raw = _best_answer(label, file, where, f"labelf.pvqa[{j}]")
                    answer = normalise_answer(answer_raw)
                    yield SourceRecord(self.make_record(
                        split, f"{img_id}_q{j}",
                        question=clean_text(question),
                        answer=answer,
                        answer_raw=answer_raw,
                        answer_type="closed" if is_closed_answer(answer) else "open",
                        organ=None,
                        image=image_name,
                        img_id=img_id,
                    ), image)

    def _find_image(self, split: str, img_id: str):
        for name in (f"{split}/{img_id}.jpg", f"{img_id}.jpg", f"{split}/{img_id}.png", f"{img_id}.png"):
            image = self._images.get(name)
            if image is not None:
                return name, image
        return f"{split}/{img_id}.jpg", None


def _source_list(container: dict, field: str, file: str, where: str) -> list:
    """The list under the dataset key of an LXMERT ``sentf``/``labelf`` dict (``pvqa``)."""
    if "pvqa" in container:
        key = "pvqa"
    elif len(container) == 1:
        key = next(iter(container))
    else:
        raise SourceFormatError(file, f"expected a 'pvqa' entry, got keys {sorted(container)}", record=where, field=field)
    value = container[key]
    if not isinstance(value, list):
        raise SourceFormatError(file, f"expected a list, got {type(value).__name__}", record=where, field=f"{field}.{key}")
    return value


def _best_answer(label: Any, file: str, where: str, field: str) -> str:
    """The highest-scoring answer of an LXMERT label dict ``{answer: score}`` (first on ties)."""
    if not isinstance(label, dict) or not label:
        raise SourceFormatError(file, f"expected a non-empty {{answer: score}} object, got {label!r}", record=where, field=field)
    best, best_score = None, None
    for answer, score in label.items():
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise SourceFormatError(file, f"score of {answer!r} must be a number, got {score!r}", record=where, field=field)
        if best_score is None or score > best_score:
            best, best_score = answer, score
    if not clean_text(best):
        raise SourceFormatError(file, "empty answer", record=where, field=field)
    return best
