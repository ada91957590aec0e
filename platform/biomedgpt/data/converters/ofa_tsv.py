"""The official BiomedGPT / OFA TSV files, so that users of the official code can bring their
prepared data as it is.

Those files are headerless, tab-separated, one example per line, images inline as base64 (standard
or URL-safe alphabet, as OFA decodes both). One converter per record kind; the column layouts read
by default are the ones the official preprocessing scripts write (the ``--selected-cols`` of the
official run scripts pick from them):

=================  =====================================================================  ==============
converter          columns (default ``columns`` option)                                   official file
=================  =====================================================================  ==============
ofa_tsv_vqa        uniq_id, image_id, question, answer, objects, image                    VQA-RAD, SLAKE, PathVQA ``*.tsv``
ofa_tsv_caption    uniq_id, image_id, caption, objects, image                             IU X-ray, PEIR Gross, ROCO, MIMIC-CXR
ofa_tsv_classify   image, label, label_name                                               MedMNIST ``<subset>_{train,val,test}.tsv``
ofa_tsv_nli        premise, hypothesis, label (0 neutral, 1 entailment, 2 contradiction)  ``mednli_{train,val,test}.tsv``
ofa_tsv_summarize  text, summary                                                          MeQSum, HealthCareMagic, MIMIC-III
ofa_tsv_text       uniq_id, text                                                          pretraining ``text.tsv``
ofa_tsv_image      uniq_id, image, codes (VQGAN code ids, space-separated)                pretraining ``image.tsv``
ofa_tsv_detection  uniq_id, image, objects (``x0,y0,x1,y1,cat_id,name&&...``, pixels)     pretraining ``detection.tsv``
=================  =====================================================================  ==============

The pretraining ``vision_language.tsv`` mixes kinds in one file: uniq_id, image, caption, question,
answer (refs), objects (gt_objects), source_dataset, type (``caption``/``qa``/``visual_grounding``).
``ofa_tsv_pretrain_caption`` reads its ``caption`` rows and ``ofa_tsv_pretrain_vqa`` its ``qa`` rows;
the other rows are dropped and counted per type (``notes.dropped``).

``columns`` renames or reorders them for other layouts (e.g. OFA's ImageNet ``[image, label_name]``);
``-`` marks a column to ignore, and columns after the named ones are ignored (BiomedGPT's MedNLI
files carry a 4th ``genre:sentence`` column). The VQA ``answer`` cell is OFA's
``<confidence>|!+<answer>`` list joined by ``&&``: the answer is the most confident one (first on
ties), every answer and confidence is kept in ``answers``; ``objects`` there is BiomedGPT's organ
(VQA-RAD ``image_organ``). A caption cell with ``&&`` holds several references (OFA test files):
``caption`` is the first, ``captions`` all. Detection boxes are stored normalised by the image's
pixel size (read from the image header). TSVs have no answer type: yes/no answers are ``closed``.

Split files: ``files={"train": ..., "val": ..., "test": ...}``, or found in the source folder by name:
a ``.tsv`` whose name ends in ``train``/``train_val``/``trainval`` is train, ``val``/``valid``/``dev``
val, ``test`` test (``vqa_rad_train.tsv``, ``pathmnist_test.tsv``, ``test.tsv``...).

Images are not held in memory: a record references its byte range in the TSV (:class:`TsvImage`),
and the shard writer reads and decodes just that range.
"""

from __future__ import annotations

import abc
import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord, UnusableImageError, sort_splits
from .normalise import clean_text, is_closed_answer, normalise_answer

SPLIT_PATTERNS = {
    "train": re.compile(r"(^|[_\-.])(train|train_val|trainval)$"),
    "val": re.compile(r"(^|[_\-.])(val|valid|validation|dev)$"),
    "test": re.compile(r"(^|[_\-.])test$"),
}
_B64_TRANSLATE = bytes.maketrans(b"-_", b"+/")
NLI_LABELS = {"0": "maybe", "1": "yes", "2": "no", "neutral": "maybe", "entailment": "yes", "contradiction": "no",
              "maybe": "maybe", "yes": "yes", "no": "no"}


def decode_base64(data: bytes, source: str = "<tsv>") -> bytes:
    """Bytes of a base64 cell in either alphabet (standard or URL-safe), padding optional."""
    data = data.strip().translate(_B64_TRANSLATE)
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise UnusableImageError(source, f"image column is not valid base64 ({err})") from None


def base64_decoded_size(cell: bytes) -> int:
    """Decoded size of a base64 cell without decoding it."""
    n = len(cell.strip())
    padding = len(cell.strip()) - len(cell.strip().rstrip(b"="))
    return (n - padding) * 3 // 4


@dataclass(frozen=True)
class TsvImage:
    """A base64 image cell at bytes ``offset``..``offset+length`` of the TSV at ``url``; ``size`` is
    the decoded size."""

    url: str
    offset: int
    length: int
    size: int

    def read(self) -> bytes:
        with storage.open_url(self.url, "rb") as f:
            f.seek(self.offset)
            cell = f.read(self.length)
        if len(cell) != self.length:
            raise SourceFormatError(self.url, f"file shorter than when it was planned (byte {self.offset})")
        return decode_base64(cell, self.name)

    @property
    def name(self) -> str:
        return f"{self.url}@{self.offset}"


class _OfaTsvConverter(Converter):
    generic = True
    licence = "unknown: set by the dataset spec"
    access = "credentialed"  # unknown data is treated as restricted until a spec says otherwise
    file_roles = {"train": "", "val": "", "test": ""}
    default_columns: ClassVar[tuple[str, ...]]
    allowed_columns: ClassVar[tuple[str, ...]]
    required_columns: ClassVar[tuple[str, ...]]
    #: Rows of a mixed file (OFA's vision_language.tsv) that this converter reads, by its type column.
    row_type: ClassVar[str | None] = None

    def __init__(self, source: str, files=None, *, columns: Sequence[str] | None = None, dataset: str | None = None,
                 on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        self.columns = tuple(columns) if columns else self.default_columns
        unknown = [c for c in self.columns if c != "-" and c not in self.allowed_columns]
        missing = [c for c in self.required_columns if c not in self.columns]
        if unknown or missing or len(set(c for c in self.columns if c != "-")) != len([c for c in self.columns if c != "-"]):
            raise ValueError(f"{self.name}: columns {list(self.columns)}: allowed names {list(self.allowed_columns)} "
                             f"(and '-'), required {list(self.required_columns)}, each at most once")
        if dataset:
            self.dataset_name = dataset
        if not any(self.files.values()):
            self._discover()

    def _discover(self) -> None:
        names = sorted(n for n in storage.list_files(self.source, recursive=False) if n.lower().endswith(".tsv"))
        for split, pattern in SPLIT_PATTERNS.items():
            hits = [n for n in names if pattern.search(n[:-4].lower())]
            if len(hits) > 1:
                raise SourceFormatError(self.source, f"several {split} files {hits}: choose one with files={{'{split}': ...}}")
            if hits:
                self.files[split] = hits[0]

    def splits(self) -> list[str]:
        present = [s for s in ("train", "val", "test") if self.files.get(s) and storage.exists(self.url(s))]
        if not present:
            raise SourceFormatError(self.source, "no OFA TSV files found (a .tsv named *train/*val/*test, or pass "
                                                 "files={'train': ..., 'test': ...})")
        return sort_splits(present)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url(split)
        seen: dict[str, int] = {}
        index = 0
        for number, offset, cells in _tsv_lines(file, len(self.columns), skip=self.bad_row(split)):
            with self.guard(split, number) as guard:
                where = f"line {number}"
                row: dict[str, tuple[bytes, int]] = {}
                for name, (cell, cell_offset) in zip(self.columns, cells):
                    if name != "-":
                        row[name] = (cell, offset + cell_offset)
                if self.row_type is not None and "type" in row:
                    kind = self.text(row, "type", file, where)
                    if kind != self.row_type:
                        self.drop(split, f"type_{kind}")
                        continue
                row_index, index = index, index + 1  # counted before converting: ids stay put when a row is bad
                record_id, fields, image = self.convert_row(row, file, where, split, row_index)
                guard.id = record_id
                if row.get("source_dataset") and self.text(row, "source_dataset", file, where, required=False):
                    fields["source_dataset"] = self.text(row, "source_dataset", file, where)
                if record_id in seen:
                    raise SourceFormatError(file, f"duplicate uniq_id (also line {seen[record_id]})", record=where,
                                            field="uniq_id")
                seen[record_id] = number
                yield SourceRecord(self.make_record(split, record_id, **fields), image)

    # helpers for the kinds
    @staticmethod
    def text(row: dict, name: str, file: str, where: str, required: bool = True) -> str:
        if name not in row:
            return ""
        try:
            value = row[name][0].decode("utf-8")
        except UnicodeDecodeError as err:
            raise SourceFormatError(file, f"not UTF-8 ({err})", record=where, field=name) from None
        value = clean_text(value)
        if required and not value:
            raise SourceFormatError(file, "empty", record=where, field=name)
        return value

    def record_id(self, row: dict, file: str, where: str, split: str, index: int) -> str:
        if "uniq_id" in row:
            return self.text(row, "uniq_id", file, where)
        return f"{split}_{index:06d}"

    @staticmethod
    def image(row: dict, file: str) -> TsvImage:
        cell, offset = row["image"]
        return TsvImage(file, offset, len(cell), base64_decoded_size(cell))

    @abc.abstractmethod
    def convert_row(self, row: dict, file: str, where: str, split: str, index: int) -> tuple[str, dict[str, Any], Any]:
        """One TSV row -> (record id, record fields, image or None); each task's layout defines it."""


def _tsv_lines(url: str, n_columns: int, skip=None) -> Iterator[tuple[int, int, list[tuple[bytes, int]]]]:
    """``(line number, byte offset of the line, [(cell, offset of the cell in the line)])`` of a
    headerless TSV, read as a stream (files of many GB with inline images). ``skip(error, line number)``:
    called for a line with too few columns, which is then left out (default: the error is raised)."""
    try:
        f = storage.open_url(url, "rb")
    except FileNotFoundError:
        raise SourceFormatError(url, "file not found") from None
    with f:
        offset = 0
        for number, line in enumerate(f, start=1):
            start = offset
            offset += len(line)
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue
            parts = body.split(b"\t")
            if len(parts) < n_columns:
                error = SourceFormatError(url, f"{len(parts)} tab-separated columns, expected at least {n_columns}",
                                          record=f"line {number}")
                if skip is None:
                    raise error
                skip(error, number)
                continue
            cells, pos = [], 0
            for part in parts:
                cells.append((part, pos))
                pos += len(part) + 1
            yield number, start, cells


class OfaTsvVqaConverter(_OfaTsvConverter):
    name = "ofa_tsv_vqa"
    task = "vqa"
    native_format = "OFA/BiomedGPT VQA TSV: uniq_id, image_id, question, '<conf>|!+<answer>&&...', objects, base64 image"
    default_columns = ("uniq_id", "image_id", "question", "answer", "objects", "image")
    allowed_columns = default_columns
    required_columns = ("question", "answer", "image")

    def convert_row(self, row, file, where, split, index):
        record_id = self.record_id(row, file, where, split, index)
        answers: dict[str, float] = {}
        for item in self.text(row, "answer", file, where).split("&&"):
            conf, sep, answer = item.partition("|!+")
            if not sep:
                conf, answer = "1.0", item  # a bare answer: full confidence
            try:
                score = float(conf)
            except ValueError:
                raise SourceFormatError(file, f"expected '<confidence>|!+<answer>', got {item!r}", record=where,
                                        field="answer") from None
            answer = normalise_answer(answer)
            if answer and answer not in answers:
                answers[answer] = score
        if not answers:
            raise SourceFormatError(file, "no answer", record=where, field="answer")
        best = max(answers, key=answers.__getitem__)
        objects = [o for o in self.text(row, "objects", file, where, required=False).split("&&") if o.strip()]
        return record_id, {
            "question": self.text(row, "question", file, where), "answer": best,
            "answer_type": "closed" if is_closed_answer(best) else "open",
            "organ": objects[0].strip() if objects else None, "answers": answers,
            "image_id": self.text(row, "image_id", file, where, required=False) or None,
        }, self.image(row, file)


class OfaTsvCaptionConverter(_OfaTsvConverter):
    name = "ofa_tsv_caption"
    task = "caption"
    native_format = "OFA/BiomedGPT caption TSV: uniq_id, image_id, caption ('&&'-joined references), objects, base64 image"
    default_columns = ("uniq_id", "image_id", "caption", "objects", "image")
    allowed_columns = default_columns
    required_columns = ("caption", "image")

    def convert_row(self, row, file, where, split, index):
        captions = [clean_text(c) for c in self.text(row, "caption", file, where).split("&&") if c.strip()]
        fields: dict[str, Any] = {"caption": captions[0]}
        if len(captions) > 1:
            fields["captions"] = captions
        fields["image_id"] = self.text(row, "image_id", file, where, required=False) or None
        return self.record_id(row, file, where, split, index), fields, self.image(row, file)


class OfaTsvClassifyConverter(_OfaTsvConverter):
    name = "ofa_tsv_classify"
    task = "classify"
    native_format = "OFA/BiomedGPT classification TSV: base64 image, label index, label name (or image, label name)"
    default_columns = ("image", "label", "label_name")
    allowed_columns = ("uniq_id", "image", "label", "label_name")
    required_columns = ("image", "label_name")

    def convert_row(self, row, file, where, split, index):
        label_text = self.text(row, "label", file, where, required=False)
        label: int | None = None
        if label_text:
            if not label_text.lstrip("-").isdigit():
                raise SourceFormatError(file, f"expected an integer class index, got {label_text!r}", record=where, field="label")
            label = int(label_text)
        return self.record_id(row, file, where, split, index), {
            "label": label, "label_name": self.text(row, "label_name", file, where)}, self.image(row, file)


class OfaTsvNliConverter(_OfaTsvConverter):
    name = "ofa_tsv_nli"
    task = "nli"
    native_format = "OFA MNLI-style TSV: premise, hypothesis, label (0 neutral / 1 entailment / 2 contradiction)"
    default_columns = ("premise", "hypothesis", "label")
    allowed_columns = ("uniq_id", "premise", "hypothesis", "label")
    required_columns = ("premise", "hypothesis", "label")

    def convert_row(self, row, file, where, split, index):
        raw = self.text(row, "label", file, where).lower()
        if raw not in NLI_LABELS:
            raise SourceFormatError(file, f"expected 0/1/2 or entailment/contradiction/neutral, got {raw!r}",
                                    record=where, field="label")
        return self.record_id(row, file, where, split, index), {
            "premise": self.text(row, "premise", file, where), "hypothesis": self.text(row, "hypothesis", file, where),
            "label": NLI_LABELS[raw], "gold_label": raw}, None


class OfaTsvSummarizeConverter(_OfaTsvConverter):
    name = "ofa_tsv_summarize"
    task = "summarize"
    native_format = "OFA summarisation TSV: source text, target summary"
    default_columns = ("text", "summary")
    allowed_columns = ("uniq_id", "text", "summary")
    required_columns = ("text", "summary")

    def convert_row(self, row, file, where, split, index):
        return self.record_id(row, file, where, split, index), {
            "text": self.text(row, "text", file, where), "summary": self.text(row, "summary", file, where)}, None


class OfaTsvTextConverter(_OfaTsvConverter):
    name = "ofa_tsv_text"
    task = "text"
    native_format = "OFA pretraining text.tsv: uniq_id, text"
    default_columns = ("uniq_id", "text")
    allowed_columns = default_columns
    required_columns = ("text",)

    def convert_row(self, row, file, where, split, index):
        return self.record_id(row, file, where, split, index), {"text": self.text(row, "text", file, where)}, None


class OfaTsvImageConverter(_OfaTsvConverter):
    name = "ofa_tsv_image"
    task = "image"
    native_format = "OFA pretraining image.tsv: uniq_id, base64 image, VQGAN codes (space-separated ids)"
    default_columns = ("uniq_id", "image", "codes")
    allowed_columns = default_columns
    required_columns = ("image",)

    def convert_row(self, row, file, where, split, index):
        fields: dict[str, Any] = {}
        codes = self.text(row, "codes", file, where, required=False)
        if codes:
            try:
                fields["codes"] = [int(c) for c in codes.split()]
            except ValueError:
                raise SourceFormatError(file, "expected space-separated integer code ids", record=where, field="codes") from None
        return self.record_id(row, file, where, split, index), fields, self.image(row, file)


class OfaTsvDetectionConverter(_OfaTsvConverter):
    name = "ofa_tsv_detection"
    task = "detection"
    native_format = "OFA pretraining detection.tsv: uniq_id, base64 image, 'x0,y0,x1,y1,cat_id,name&&...' (pixels)"
    default_columns = ("uniq_id", "image", "objects")
    allowed_columns = default_columns
    required_columns = ("image", "objects")

    def convert_row(self, row, file, where, split, index):
        from PIL import Image, UnidentifiedImageError

        image = self.image(row, file)
        try:
            with Image.open(io.BytesIO(decode_base64(row["image"][0], f"{file}: {where}"))) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError) as err:
            raise SourceFormatError(file, f"not a readable image ({err})", record=where, field="image") from None
        boxes, labels = [], []
        for item in self.text(row, "objects", file, where).split("&&"):
            parts = [p.strip() for p in item.split(",")]
            if len(parts) < 6:
                raise SourceFormatError(file, f"expected 'x0,y0,x1,y1,cat_id,name', got {item!r}", record=where, field="objects")
            try:
                x0, y0, x1, y1 = (float(p) for p in parts[:4])
            except ValueError:
                raise SourceFormatError(file, f"box coordinates must be numbers, got {item!r}", record=where,
                                        field="objects") from None
            boxes.append(normalised_box(x0, y0, x1, y1, width, height))
            labels.append(",".join(parts[5:]))
        return self.record_id(row, file, where, split, index), {
            "boxes": boxes, "labels": labels, "width": width, "height": height}, image


def normalised_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> list[float]:
    """A pixel box as ``[x0, y0, x1, y1]`` in [0, 1] (clipped, corners ordered, 6 decimals)."""
    xs = sorted((min(max(x0 / width, 0.0), 1.0), min(max(x1 / width, 0.0), 1.0)))
    ys = sorted((min(max(y0 / height, 0.0), 1.0), min(max(y1 / height, 0.0), 1.0)))
    return [round(xs[0], 6), round(ys[0], 6), round(xs[1], 6), round(ys[1], 6)]


PRETRAIN_VL_COLUMNS = ("uniq_id", "image", "caption", "question", "answer", "objects", "source_dataset", "type")


class OfaTsvPretrainCaptionConverter(OfaTsvCaptionConverter):
    name = "ofa_tsv_pretrain_caption"
    native_format = "OFA pretraining vision_language.tsv, its type=caption rows"
    default_columns = PRETRAIN_VL_COLUMNS
    allowed_columns = PRETRAIN_VL_COLUMNS
    row_type = "caption"


class OfaTsvPretrainVqaConverter(OfaTsvVqaConverter):
    name = "ofa_tsv_pretrain_vqa"
    native_format = "OFA pretraining vision_language.tsv, its type=qa rows"
    default_columns = PRETRAIN_VL_COLUMNS
    allowed_columns = PRETRAIN_VL_COLUMNS
    row_type = "qa"


OFA_TSV_CONVERTERS = (OfaTsvVqaConverter, OfaTsvCaptionConverter, OfaTsvClassifyConverter, OfaTsvNliConverter,
                      OfaTsvSummarizeConverter, OfaTsvTextConverter, OfaTsvImageConverter, OfaTsvDetectionConverter,
                      OfaTsvPretrainCaptionConverter, OfaTsvPretrainVqaConverter)
