"""SLAKE 1.0 (Liu et al. 2021): bilingual (English/Chinese) radiology VQA, CC BY 4.0.

Native layout (``Slake1.0/``): ``train.json``, ``validate.json``, ``test.json`` (lists of records:
img_id, img_name, question, answer, q_lang, location, modality, answer_type, base_type,
content_type, triple, qid) and ``imgs/xmlab<N>/source.jpg``. ``validate`` becomes our ``val``.

By default only English questions are kept (``languages=("en",)``), as BiomedGPT and most Med-VQA
papers report SLAKE-EN; ``languages="all"`` keeps both. ``answer_type`` comes from the record
(OPEN/CLOSED); ``organ`` is SLAKE's ``location`` field (body region: Abdomen, Lung, Brain_Tissue...).
A record that cannot be used (the official train.json has one with an empty answer) is skipped and
named (``Converter.defects``).
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .base import Converter, ImageIndex, SourceFormatError, SourceRecord, load_json, require, vqa_fields
from .normalise import answer_text, clean_text

NATIVE_SPLITS = {"train": "train", "val": "validate", "test": "test"}
LANGUAGES = ("en", "zh")


class SlakeConverter(Converter):
    name = "slake"
    task = "vqa"
    native_format = "SLAKE 1.0: train.json / validate.json / test.json + imgs/xmlab<N>/source.jpg"
    licence = "CC BY 4.0"
    access = "open"
    file_roles = {"train": "train.json", "val": "validate.json", "test": "test.json", "images": "imgs"}

    def __init__(self, source: str, files=None, *, languages: str | Sequence[str] = ("en",),
                 on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if languages == "all":
            languages = LANGUAGES
        if isinstance(languages, str):
            languages = (languages,)
        bad = sorted(set(languages) - set(LANGUAGES))
        if bad or not languages:
            raise ValueError(f"slake: languages must be 'all' or a subset of {LANGUAGES}, got {list(languages)}")
        self.languages = tuple(languages)
        self._images = ImageIndex(self.url("images"))

    def splits(self) -> list[str]:
        return self.split_files_present(NATIVE_SPLITS, "SLAKE split files")

    def native_split(self, split: str) -> str:
        return NATIVE_SPLITS.get(split, split)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url(split)
        data = load_json(file)
        if not isinstance(data, list):
            raise SourceFormatError(file, f"expected a JSON list of question records, got {type(data).__name__}")
        seen: dict[str, int] = {}
        for i, raw in enumerate(data):
            with self.guard(split, i) as guard:
                if (record := self._convert(raw, file, i, split, seen, guard)) is not None:
                    yield record

    def _convert(self, raw, file: str, i: int, split: str, seen: dict[str, int], guard) -> SourceRecord | None:
        where = f"record {i}"
        qid = require(raw, "qid", (int, str), file, where)
        record_id = guard.id = clean_text(str(qid))
        where = f"record {i} (qid {record_id})"
        if record_id in seen:
            raise SourceFormatError(file, f"duplicate qid (also record {seen[record_id]})", record=where, field="qid")
        seen[record_id] = i
        language = clean_text(require(raw, "q_lang", str, file, where)).lower()
        if language not in LANGUAGES:
            raise SourceFormatError(file, f"expected one of {LANGUAGES}, got {raw['q_lang']!r}", record=where, field="q_lang")
        if language not in self.languages:
            return None
        question, answer_raw, answer, answer_type = vqa_fields(raw, file, where)
        image_name = clean_text(require(raw, "img_name", str, file, where))
        image = self._images.get(image_name)
        if image is None:
            self.missing_image(split, file, image_name, record=where, field="img_name")
            return None
        location = raw.get("location")
        return SourceRecord(self.make_record(
            split, record_id,
            question=question,
            answer=answer,
            answer_raw=answer_text(answer_raw),
            answer_type=answer_type.lower(),
            organ=clean_text(location) if isinstance(location, str) and location.strip() else None,
            modality=clean_text(raw["modality"]) if isinstance(raw.get("modality"), str) else None,
            content_type=clean_text(raw["content_type"]) if isinstance(raw.get("content_type"), str) else None,
            base_type=clean_text(raw["base_type"]) if isinstance(raw.get("base_type"), str) else None,
            language=language,
            image=image_name,
        ), image)
