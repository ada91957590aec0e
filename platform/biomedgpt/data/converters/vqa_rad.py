"""VQA-RAD (Lau et al. 2018): radiology VQA on MedPix images, CC0.

Two native layouts are read:

- ``osf`` (the official release on OSF): ``VQA_RAD Dataset Public.json``, a list of 14-field records
  (qid, image_name, image_organ, question, answer, answer_type, question_type, phrase_type, ...) and
  ``VQA_RAD Image Folder/``. The split is in ``phrase_type``: ``test_freeform``/``test_para`` are the
  test questions, ``freeform``/``para`` the training questions. There is no validation split.
- ``mevf`` (the MEVF ``data_RAD`` layout many Med-VQA codebases read): ``trainset.json`` and
  ``testset.json`` with 8 fields, plus ``images/``. Its train file adds the templated ``frame``
  questions (``phrase_type: frame``) that the OSF file keeps in its ``question_frame`` field, so it
  has more training questions; the test questions are the same.

``layout="auto"`` reads the OSF file when it is present, else ``data_RAD``.

A record that cannot be used (no or an empty question or answer, an unknown answer type, a duplicate
qid, a missing image) is skipped and named (``Converter.defects``). Quirks handled: ``answer_type``
with trailing spaces (``"CLOSED "``); answers stored as numbers
(``12``); mixed-case answers (``"Yes"``/``"yes"``); stray tabs inside questions and answers
(``"Heart \\tlungs"``); qids that are sometimes strings (``"0"``), sometimes numbers; a record
without ``question_rephrase``; an image in the folder that no question uses.
"""

from __future__ import annotations

from typing import Any, Iterator

from .. import storage
from .base import Converter, ImageIndex, SourceFormatError, SourceRecord, load_json, require, vqa_fields
from .normalise import answer_text, clean_text

OSF_TRAIN_PHRASES = ("freeform", "para")
OSF_TEST_PHRASES = ("test_freeform", "test_para")
LAYOUTS = ("auto", "osf", "mevf")


class VqaRadConverter(Converter):
    name = "vqa_rad"
    task = "vqa"
    native_format = ("VQA-RAD OSF release ('VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/') or the "
                     "MEVF data_RAD layout (trainset.json, testset.json, images/)")
    licence = "CC0 1.0"
    access = "open"
    file_roles = {
        "annotations": "VQA_RAD Dataset Public.json",
        "images": "VQA_RAD Image Folder",
        "trainset": "data_RAD/trainset.json",
        "testset": "data_RAD/testset.json",
        "mevf_images": "data_RAD/images",
    }

    def __init__(self, source: str, files=None, *, layout: str = "auto", on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if layout not in LAYOUTS:
            raise ValueError(f"vqa_rad: layout must be one of {LAYOUTS}, got {layout!r}")
        given = set(files or {})
        if layout == "auto":
            if given & {"trainset", "testset", "mevf_images"}:
                layout = "mevf"
            elif "annotations" in given or storage.exists(self.url("annotations")):
                layout = "osf"
            else:
                layout = "mevf"
        if layout == "mevf" and not given & {"trainset", "testset", "mevf_images"} \
                and not storage.exists(self.url("trainset")) and storage.exists(storage.join(self.source, "trainset.json")):
            # the source is the data_RAD folder itself
            self.files.update(trainset="trainset.json", testset="testset.json", mevf_images="images")
        self.layout = layout
        self._by_split: dict[str, list[SourceRecord]] | None = None

    def splits(self) -> list[str]:
        return [s for s in ("train", "test") if self._load().get(s)]

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        yield from self._load()[split]

    # reading
    def _load(self) -> dict[str, list[SourceRecord]]:
        if self._by_split is None:
            self._by_split = self._load_osf() if self.layout == "osf" else self._load_mevf()
        return self._by_split

    def _load_osf(self) -> dict[str, list[SourceRecord]]:
        file = self.url("annotations")
        if not storage.exists(file):
            raise SourceFormatError(file, "VQA-RAD annotations not found (expected the OSF release file "
                                          "'VQA_RAD Dataset Public.json', or pass files={'annotations': ...})")
        images = ImageIndex(self.url("images"))
        data = load_json(file)
        if not isinstance(data, list):
            raise SourceFormatError(file, f"expected a JSON list of question records, got {type(data).__name__}")
        out: dict[str, list[SourceRecord]] = {"train": [], "test": []}
        seen: dict[str, int] = {}
        for i, raw in enumerate(data):
            with self.guard(None, i) as guard:  # the split is in the record: unknown until read
                where = f"record {i}"
                if isinstance(raw, dict) and isinstance(raw.get("qid"), (int, str)):
                    guard.id = clean_text(str(raw["qid"]))
                    where = f"record {i} (qid {guard.id})"
                phrase = clean_text(require(raw, "phrase_type", str, file, where)).lower()
                if phrase in OSF_TRAIN_PHRASES:
                    split = "train"
                elif phrase in OSF_TEST_PHRASES:
                    split = "test"
                else:
                    raise SourceFormatError(file, f"expected one of {OSF_TRAIN_PHRASES + OSF_TEST_PHRASES}, got "
                                                  f"{phrase!r}", record=where, field="phrase_type")
                guard.split = split
                rec = self._convert(raw, file, i, split, images, seen)
                if rec is not None:
                    out[split].append(rec)
        return out

    def _load_mevf(self) -> dict[str, list[SourceRecord]]:
        images = ImageIndex(self.url("mevf_images"))
        out: dict[str, list[SourceRecord]] = {}
        seen: dict[str, int] = {}
        found = False
        for split, role in (("train", "trainset"), ("test", "testset")):
            file = self.url(role)
            if not storage.exists(file):
                out[split] = []
                continue
            found = True
            data = load_json(file)
            if not isinstance(data, list):
                raise SourceFormatError(file, f"expected a JSON list of question records, got {type(data).__name__}")
            out[split] = []
            for i, raw in enumerate(data):
                with self.guard(split, i) as guard:
                    if isinstance(raw, dict) and isinstance(raw.get("qid"), (int, str)):
                        guard.id = clean_text(str(raw["qid"]))
                    rec = self._convert(raw, file, i, split, images, seen)
                    if rec is not None:
                        out[split].append(rec)
        if not found:
            raise SourceFormatError(self.source, "no VQA-RAD release found: expected 'VQA_RAD Dataset Public.json' "
                                                 "(OSF release) or data_RAD/trainset.json + testset.json (MEVF layout)")
        return out

    def _convert(self, raw: Any, file: str, i: int, split: str, images: ImageIndex,
                 seen: dict[str, int]) -> SourceRecord | None:
        where = f"record {i}"
        qid = require(raw, "qid", (int, str), file, where)
        record_id = clean_text(str(qid))
        where = f"record {i} (qid {record_id})"
        if record_id in seen:
            raise SourceFormatError(file, f"duplicate qid (also record {seen[record_id]})", record=where, field="qid")
        seen[record_id] = i
        question, answer_raw, answer, answer_type = vqa_fields(raw, file, where)
        image_name = clean_text(require(raw, "image_name", str, file, where))
        organ = raw.get("image_organ")
        image = images.get(image_name)
        if image is None:
            self.missing_image(split, file, image_name, record=where, field="image_name")
            return None
        record = self.make_record(
            split, record_id,
            question=question,
            answer=answer,
            answer_raw=answer_text(answer_raw),  # numbers (12) become text, strings stay byte for byte
            answer_type=answer_type.lower(),
            organ=clean_text(organ) if isinstance(organ, str) and organ.strip() else None,
            question_type=clean_text(str(raw.get("question_type", ""))) or None,
            phrase_type=clean_text(raw["phrase_type"]) if isinstance(raw.get("phrase_type"), str) else None,
            image=image_name,
        )
        return SourceRecord(record, image)
