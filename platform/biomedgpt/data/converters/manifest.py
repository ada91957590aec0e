"""A department's own data: a manifest (CSV, TSV or JSON Lines) whose rows name an image (or none) and
carry the task's fields, converted into shard records of one task family.

One converter per task family (``manifest_vqa``, ``manifest_caption``, ``manifest_classify``,
``manifest_nli``, ``manifest_summarize``): the dataset spec's ``source.manifest`` section (written by
``biomedgpt datasets new``) gives its options, the spec's ``licence`` and ``access`` the shards'.

Options:

- ``manifest``: the manifest file, relative to the source folder (``.csv``, ``.tsv``/``.txt``,
  ``.jsonl``; ``.gz`` too).
- ``columns``: record field -> manifest column. The fields of each task (each converter's
  ``required_fields``, ``optional_fields`` and ``one_of``):
  ``question``/``answer`` (+ ``answer_type``, ``organ``) for vqa, ``caption`` for caption, ``label``
  (one class) or ``labels`` (several: a JSON list, or text split by ``label_separator``; empty = no
  finding) for classify (+ ``text`` for text-only classification), ``premise``/``hypothesis``/``label``
  for nli, ``text``/``summary`` for summarize; and for every task ``image`` (the image path), ``id``
  (the record id) and ``group`` (rows that must share a split, e.g. the patient).
- ``split_column``: the column naming each row's split (``train``/``training``, ``val``/``valid``/
  ``validation``/``dev``, ``test``/``testing``, any case), or ``split_ratio`` (``{train: 0.8, val: 0.1,
  test: 0.1}``) with ``seed``: a row goes to a split by a stable hash of ``seed`` and its group (the
  ``group`` column, else its image, else its id), so the split is deterministic, does not move when rows
  are added or reordered, and keeps every question of an image (every study of a patient) together.
- ``label_separator``: between the class names of a ``labels`` cell (default ``|``).
- ``window``: DICOM windowing (``auto``, ``minmax`` or ``[center, width]``, see :mod:`.dicom`).

Images: a path relative to the manifest's folder: JPEG and PNG are kept byte for byte, a DICOM file
(``.dcm``/``.dicom``, or a file starting with the DICOM preamble) becomes an 8-bit PNG, other formats
(TIFF, BMP, ...) a lossless PNG. A path may not leave the manifest's folder: absolute paths, URLs, ``..``
components and symbolic links that resolve outside the folder are refused. A row whose image is
refused or missing, a required field empty, a split value unknown, an id repeated, is a defect of the
build: skipped and named (file, line, field), within the error budget.

Record ids: the ``id`` column, else a digest of the row's mapped fields (``<dataset>-<12 hex>``),
stable when rows move; two rows with the same id are a defect (the second is skipped).

VQA answers are normalised as VQA-RAD's; without an ``answer_type`` column a yes/no answer is
``closed`` and any other ``open`` (VQA-RAD's convention).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from pathlib import PurePosixPath
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from .. import storage
from .base import Converter, FileImage, SourceFormatError, SourceRecord, CANONICAL_SPLITS, sort_splits, stable_fraction
from .dicom import WINDOW_MODES, DicomImage, is_dicom_name
from ...tasks.nli import GOLD_TO_ANSWER
from .normalise import clean_text, normalise_answer
from .tables import cell_text, read_rows, table_format

#: Manifest formats (tables.py formats a manifest may be in).
MANIFEST_FORMATS = ("csv", "tsv", "jsonl")

COMMON_FIELDS = ("image", "id", "group")

#: Split values a split column may hold (any case) -> canonical split.
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
CLOSED_ANSWERS = ("yes", "no")


def task_fields(task: str) -> tuple[str, ...]:
    """Every record field a manifest of ``task`` may map."""
    return manifest_converter(task).fields()


def manifest_converter(task: str) -> "type[ManifestConverter]":
    """The manifest converter of a task family (ValueError naming the ones there are)."""
    try:
        return MANIFEST_CONVERTERS[task]
    except KeyError:
        raise ValueError(f"task: manifests carry {', '.join(MANIFEST_CONVERTERS)} records, not {task!r}") from None


def check_manifest_options(task: str, manifest: str, columns: Mapping[str, str], split_column: str | None,
                           split_ratio: Mapping[str, float] | None, label_separator: str) -> None:
    """The options of a manifest converter are coherent; ValueError naming the option (``columns.answr``,
    ``split_ratio.train`` ...) otherwise. Whether the columns exist is the manifest's matter."""
    cls = manifest_converter(task)
    if not isinstance(manifest, str) or not manifest.strip():
        raise ValueError("manifest: the manifest file, relative to the source folder")
    try:
        fmt = table_format(manifest)
    except SourceFormatError:
        fmt = None
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"manifest: {manifest!r} is not a .csv, .tsv (.txt) or .jsonl file")
    _check_relative(manifest, "manifest")
    cls.check_columns(columns)
    if (split_column is None) == (not split_ratio):
        raise ValueError("split: give a split column or a split ratio (not both)")
    if split_column is not None and (not isinstance(split_column, str) or not split_column.strip()):
        raise ValueError("split.column: the manifest column naming each row's split")
    if split_ratio:
        for split, share in split_ratio.items():
            if split not in CANONICAL_SPLITS:
                raise ValueError(f"split.ratio.{split}: split names are {', '.join(CANONICAL_SPLITS)}")
            if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
                raise ValueError(f"split.ratio.{split}: a share in (0, 1], got {share!r}")
        if abs(sum(split_ratio.values()) - 1) > 1e-6:
            raise ValueError(f"split.ratio: the shares must add up to 1, got {sum(split_ratio.values()):g}")
    if not isinstance(label_separator, str) or not label_separator or label_separator.isspace():
        raise ValueError("label_separator: a non-blank separator between class names")


def _check_relative(path: str, what: str) -> None:
    if "://" in path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", path):
        raise ValueError(f"{what}: {path!r} must be relative to the source folder")
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        raise ValueError(f"{what}: {path!r} may not leave the source folder ('..')")


class ManifestConverter(Converter):
    """Rows of a manifest as records of :attr:`task` (see the module docstring)."""

    name: ClassVar[str] = "manifest"
    task: ClassVar[str]
    generic = True
    native_format = "a CSV, TSV or JSON Lines manifest naming images (relative paths or DICOM files) and the task's fields"
    licence = "unknown: set by the dataset spec"
    access = "credentialed"  # a department's data is restricted until its spec says otherwise
    file_roles: ClassVar[Mapping[str, str]] = {}
    #: The record fields a row must map, and those it may (besides image, id and group).
    required_fields: ClassVar[tuple[str, ...]] = ()
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: Exactly one of these fields is mapped (classification: one class or a list of classes).
    one_of: ClassVar[tuple[str, ...]] = ()
    #: A single-valued field -> its list form (a column holding lists or separated names is the list form).
    list_fields: ClassVar[Mapping[str, str]] = {}
    #: Whether records have an image: ``required``, ``optional`` (else the ``text_inputs`` fields are the
    #: input: text-only classification) or ``none`` (text tasks).
    image_input: ClassVar[str] = "required"
    text_inputs: ClassVar[tuple[str, ...]] = ()
    #: The dataset spec's defaults (``datasets new``): prompt, metrics (with a list field mapped:
    #: ``list_metrics``), where the answer candidates come from.
    prompt: ClassVar[tuple[str, str]] = ("", "")
    text_prompt: ClassVar[tuple[str, str] | None] = None
    metrics: ClassVar[tuple[str, ...]] = ()
    list_metrics: ClassVar[tuple[str, ...]] = ()
    candidates: ClassVar[str] = "none"

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        common = COMMON_FIELDS if cls.image_input != "none" else tuple(f for f in COMMON_FIELDS if f != "image")
        return (*cls.required_fields, *cls.optional_fields, *cls.one_of, *common)

    @classmethod
    def check_columns(cls, columns: Mapping[str, str]) -> None:
        """ValueError naming ``columns.<field>`` when the mapping does not fit the records."""
        allowed = cls.fields()
        for field, column in columns.items():
            if field not in allowed:
                raise ValueError(f"columns.{field}: not a field of {cls.task} records; fields: {', '.join(allowed)}")
            if not isinstance(column, str) or not column.strip():
                raise ValueError(f"columns.{field}: the manifest column holding it (a non-empty name)")
        for field in cls.required_fields:
            if field not in columns:
                raise ValueError(f"columns.{field}: missing; {cls.task} records need {', '.join(cls.required_fields)}")
        if cls.one_of and sum(f in columns for f in cls.one_of) != 1:
            raise ValueError(f"columns.{cls.one_of[0]}: {cls.task} needs exactly one of {' or '.join(cls.one_of)}")
        if "image" not in columns:
            if cls.image_input == "required":
                raise ValueError(f"columns.image: missing; {cls.task} records need an image")
            if cls.image_input == "optional" and not any(f in columns for f in cls.text_inputs):
                raise ValueError(f"columns.image: {cls.task} needs an image or a {' or '.join(cls.text_inputs)} column")

    @classmethod
    def fixed_candidates(cls, values: Sequence[str]) -> list[str]:
        """The fixed answer candidates from the values of the label column (``candidates: fixed``)."""
        return sorted(set(values))

    def note_row(self, row: Mapping[str, Any], where: str) -> None:
        """Called for every row whose split is known, before any record is made (classification collects
        its class names here)."""

    def __init__(self, source: str, files=None, *, manifest: str = "manifest.csv",
                 columns: Mapping[str, str] | None = None, split_column: str | None = None,
                 split_ratio: Mapping[str, float] | None = None, seed: int = 0, label_separator: str = "|",
                 window: str | Sequence[float] = "auto", dataset: str | None = None,
                 on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        columns = dict(columns or {})
        try:
            check_manifest_options(self.task, manifest, columns, split_column, split_ratio, label_separator)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None
        if isinstance(window, str):
            if window not in WINDOW_MODES:
                raise ValueError(f"{self.name}: window must be one of {WINDOW_MODES} or [center, width], got {window!r}")
            self.window: str | tuple[float, float] = window
        else:
            values = list(window)
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[1] < 1:
                raise ValueError(f"{self.name}: window must be one of {WINDOW_MODES} or [center, width >= 1]")
            self.window = (float(values[0]), float(values[1]))
        self.manifest = manifest
        self.columns = columns
        self.split_column = split_column
        self.split_ratio = dict(split_ratio or {})
        self.seed = int(seed)
        self.label_separator = label_separator
        if dataset:
            self.dataset_name = dataset
        self._rows: dict[str, list[tuple[str, dict[str, Any]]]] | None = None

    # -- where things are -----------------------------------------------------------------------

    @property
    def manifest_url(self) -> str:
        return storage.join(self.source, self.manifest)

    @property
    def root(self) -> str:
        """The manifest's folder: image paths are relative to it, and may not leave it."""
        url = self.manifest_url
        return url.rsplit("/", 1)[0] if "/" in url else "."

    # -- reading ----------------------------------------------------------------------------------

    def _cell(self, row: Mapping[str, Any], field: str, where: str, *, required: bool) -> str:
        column = self.columns[field]
        if column not in row and not required:
            return ""
        return cell_text(dict(row), column, self.manifest_url, where, required=required)

    def _split_of(self, row: Mapping[str, Any], where: str, key: str) -> str:
        if self.split_column is not None:
            value = cell_text(dict(row), self.split_column, self.manifest_url, where)
            split = SPLIT_VALUES.get(value.strip().lower())
            if split is None:
                raise SourceFormatError(self.manifest_url, f"unknown split {value!r} (expected one of "
                                        f"{', '.join(sorted(SPLIT_VALUES))})", record=where, field=self.split_column)
            return split
        f = stable_fraction(f"{self.seed}:{key}")
        total = 0.0
        ordered = [s for s in CANONICAL_SPLITS if s in self.split_ratio]
        for split in ordered:
            total += self.split_ratio[split]
            if f < total:
                return split
        return ordered[-1]

    def _labels_of(self, row: Mapping[str, Any], where: str) -> list[str]:
        column = self.columns["labels"]
        if column not in row:
            raise SourceFormatError(self.manifest_url, f"missing (columns: {', '.join(map(str, row))})",
                                    record=where, field=column)
        value = row[column]
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if value is None:
            items: list[Any] = []
        elif isinstance(value, list):
            items = value
        elif isinstance(value, str):
            items = value.split(self.label_separator)
        else:
            raise SourceFormatError(self.manifest_url, f"expected a list of class names, got {value!r}",
                                    record=where, field=column)
        names = []
        for item in items:
            if not isinstance(item, (str, int)) or isinstance(item, bool):
                raise SourceFormatError(self.manifest_url, f"expected class names, got {item!r}", record=where,
                                        field=column)
            name = clean_text(str(item))
            if name and name not in names:
                names.append(name)
        return names

    def _record_id(self, row: Mapping[str, Any], where: str) -> str:
        if "id" in self.columns:
            return self._cell(row, "id", where, required=True)
        mapped = {f: row.get(c) for f, c in sorted(self.columns.items()) if f != "group"}
        digest = hashlib.sha256(json.dumps(mapped, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()
        return f"{self.dataset}-{digest[:12]}"

    def _load(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Per split: the rows (where, row) whose split could be told, in manifest order."""
        if self._rows is None:
            url = self.manifest_url
            if not storage.exists(url):
                raise SourceFormatError(url, "manifest not found")
            fmt = table_format(url)
            out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for where, row in read_rows(url, fmt, skip=self.bad_row(None)):
                with self.guard(None) as guard:
                    record_id = guard.id = self._record_id(row, where)
                    key = record_id
                    if "group" in self.columns:
                        key = "group:" + self._cell(row, "group", where, required=True)
                    elif "image" in self.columns and self.split_column is None:
                        key = "image:" + self._cell(row, "image", where, required=True)
                    split = self._split_of(row, where, key)
                    self.note_row(row, where)
                    out.setdefault(split, []).append((where, row))
            if not out:
                raise SourceFormatError(url, "no usable rows")
            self._rows = {s: out[s] for s in sort_splits(out)}
        return self._rows

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        rows = self._load()[split]
        seen: dict[str, str] = {}
        for where, row in rows:
            index = _line(where)
            with self.guard(split, index) as guard:
                record_id = guard.id = self._record_id(row, where)
                if record_id in seen:
                    raise SourceFormatError(self.manifest_url, f"duplicate id {record_id!r} (also {seen[record_id]})",
                                            record=where, field=self.columns.get("id", "id"))
                seen[record_id] = where
                fields = self.task_fields(row, where)
                image = None
                if "image" in self.columns:
                    rel = self._cell(row, "image", where, required=True)
                    image = self.image(rel, where, split)
                    if image is None:
                        continue
                    fields["image"] = rel
                yield SourceRecord(self.make_record(split, record_id, **fields), image)

    def task_fields(self, row: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The record fields of one row (``image`` and ``id`` aside)."""
        raise NotImplementedError

    # -- images -----------------------------------------------------------------------------------

    def image(self, rel: str, where: str, split: str):
        """The image reference of a manifest path, or None when it is missing and the policy skips it.
        Refuses paths that leave the manifest's folder (a defect of the row)."""
        field = self.columns["image"]
        text = rel.strip().replace("\\", "/")

        def refuse(reason: str) -> SourceFormatError:
            return SourceFormatError(self.manifest_url, f"image path {rel!r}: {reason}", record=where, field=field)

        if "://" in text or text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
            raise refuse("absolute paths and URLs are refused; image paths are relative to the manifest's folder")
        parts = PurePosixPath(text).parts
        if ".." in parts:
            raise refuse("'..' is refused; image paths must stay inside the manifest's folder")
        clean = posixpath.normpath(text)
        if clean in (".", ""):
            raise refuse("not a file")
        url = storage.join(self.root, clean)
        if storage.is_local(self.root):
            root = os.path.realpath(storage.local_path(self.root))
            real = os.path.realpath(storage.local_path(url))
            if os.path.commonpath([root, real]) != root:
                raise refuse("a symbolic link out of the manifest's folder is refused")
            if not os.path.isfile(real):
                self.missing_image(split, self.manifest_url, rel, record=where, field=field)
                return None
            size = os.path.getsize(real)
            if is_dicom_name(clean) or (not clean.lower().endswith(KNOWN_IMAGE_SUFFIXES) and _has_dicom_preamble(real)):
                return DicomImage(real, size, self.window)
            return FileImage(real, size)
        if not storage.exists(url):
            self.missing_image(split, self.manifest_url, rel, record=where, field=field)
            return None
        size = storage.size(url)
        return DicomImage(url, size, self.window) if is_dicom_name(clean) else FileImage(url, size)


KNOWN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def _has_dicom_preamble(path: str) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM`` (files without an extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _line(where: str) -> int | None:
    last = where.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


def closed_or_open(answer: str) -> str:
    """VQA-RAD's convention without an answer-type column: yes/no questions are closed."""
    return "closed" if answer in CLOSED_ANSWERS else "open"


class ManifestVqaConverter(ManifestConverter):
    name = "manifest_vqa"
    task = "vqa"
    required_fields = ("question", "answer")
    optional_fields = ("answer_type", "organ")
    prompt = (" {question}?", " {answer}")
    metrics = ("vqa_accuracy_closed", "vqa_accuracy_open", "vqa_accuracy")
    candidates = "answers_of_splits"

    def task_fields(self, row, where):
        question = clean_text(self._cell(row, "question", where, required=True))
        raw = self._cell(row, "answer", where, required=True)
        answer = normalise_answer(raw)
        if not answer:
            raise SourceFormatError(self.manifest_url, "empty answer", record=where, field=self.columns["answer"])
        if "answer_type" in self.columns:
            kind = self._cell(row, "answer_type", where, required=True).strip().upper()
            if kind not in ("CLOSED", "OPEN"):
                raise SourceFormatError(self.manifest_url, f"expected CLOSED or OPEN, got {kind!r}", record=where,
                                        field=self.columns["answer_type"])
            answer_type = kind.lower()
        else:
            answer_type = closed_or_open(answer)
        fields: dict[str, Any] = {"question": question, "answer": answer, "answer_raw": raw, "answer_type": answer_type}
        if "organ" in self.columns:
            fields["organ"] = clean_text(self._cell(row, "organ", where, required=False)) or None
        return fields


class ManifestCaptionConverter(ManifestConverter):
    name = "manifest_caption"
    task = "caption"
    required_fields = ("caption",)
    prompt = (" what does the image describe?", " {caption}")
    metrics = ("bleu4", "rouge_l", "meteor", "cider")

    def task_fields(self, row, where):
        return {"caption": clean_text(self._cell(row, "caption", where, required=True))}


class ManifestClassifyConverter(ManifestConverter):
    name = "manifest_classify"
    task = "classify"
    optional_fields = ("text",)
    one_of = ("label", "labels")
    list_fields = {"label": "labels"}
    image_input = "optional"
    text_inputs = ("text",)
    prompt = (" what does the image describe?", " {label_name}")
    text_prompt = (' what is the treatment for the patient " {text} "?', " {label_name}")
    metrics = ("accuracy", "f1_macro")
    list_metrics = ("accuracy", "auc")
    candidates = "class_names"

    _classes: set[str] | None = None

    def note_row(self, row, where):
        if self._classes is None:
            self._classes = set()
        if "labels" in self.columns:
            self._classes.update(self._labels_of(row, where))
        else:
            label = clean_text(self._cell(row, "label", where, required=False))
            if label:
                self._classes.add(label)

    @property
    def classes(self) -> list[str]:
        """The class names of the manifest, sorted (the class indices of the records)."""
        self._load()
        return sorted(self._classes or ())

    def task_fields(self, row, where):
        classes = self.classes
        fields: dict[str, Any] = {}
        if "labels" in self.columns:
            names = self._labels_of(row, where)
            order = sorted(names, key=classes.index)
            fields["label"] = [classes.index(n) for n in order]
            fields["label_name"] = order
        else:
            name = clean_text(self._cell(row, "label", where, required=True))
            fields["label"] = classes.index(name)
            fields["label_name"] = name
        if "text" in self.columns:
            text = clean_text(self._cell(row, "text", where, required="image" not in self.columns))
            if text:
                fields["text"] = text
        return fields


class ManifestNliConverter(ManifestConverter):
    name = "manifest_nli"
    task = "nli"
    required_fields = ("premise", "hypothesis", "label")
    image_input = "none"
    prompt = (' can text1 " {premise} " imply text2 " {hypothesis} "?', " {label}")
    metrics = ("accuracy",)
    candidates = "fixed"

    @classmethod
    def fixed_candidates(cls, values):
        """The answers the model gives for the labels (MedNLI's entailment -> yes ...)."""
        return sorted({GOLD_TO_ANSWER.get(v.strip().lower(), v.strip().lower()) for v in values})

    def task_fields(self, row, where):
        return {"premise": clean_text(self._cell(row, "premise", where, required=True)),
                "hypothesis": clean_text(self._cell(row, "hypothesis", where, required=True)),
                "label": clean_text(self._cell(row, "label", where, required=True)).lower()}


class ManifestSummarizeConverter(ManifestConverter):
    name = "manifest_summarize"
    task = "summarize"
    required_fields = ("text", "summary")
    image_input = "none"
    prompt = (' what is the summary of article " {text} "?', " {summary}")
    metrics = ("rouge1", "rouge2", "rouge_l")

    def task_fields(self, row, where):
        return {"text": clean_text(self._cell(row, "text", where, required=True)),
                "summary": clean_text(self._cell(row, "summary", where, required=True))}


MANIFEST_CONVERTERS: dict[str, type[ManifestConverter]] = {
    cls.task: cls for cls in (ManifestVqaConverter, ManifestCaptionConverter, ManifestClassifyConverter,
                              ManifestNliConverter, ManifestSummarizeConverter)
}
