"""Chest X-ray classification sets: the tuberculosis sets SZ-CXR (Shenzhen) and MC-CXR
(Montgomery County) (Jaeger et al. 2014, U.S. NLM), and the RSNA Pneumonia Detection Challenge.

SZ-CXR / MC-CXR native layout: ``CXR_png/CHNCXR_<nnnn>_<t>.png`` (Shenzhen) or
``CXR_png/MCUCXR_<nnnn>_<t>.png`` (Montgomery; the source may be ``MontgomerySet/`` or the
``CXR_png`` folder itself), where ``<t>`` is 0 (normal) or 1 (tuberculosis). Neither release has a
split: ``val_fraction``/``test_fraction`` (default 0.1/0.2) assign each image by a hash of its id,
so the split is reproducible and does not change when files are added.

RSNA Pneumonia native layout (Kaggle ``rsna-pneumonia-detection-challenge``):
``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``; one row per box, Target 0
rows without a box) and ``stage_2_train_images/<patientId>.dcm``. Label: ``pneumonia`` when any
row of the patient has Target 1, else ``normal``; the boxes are kept, normalised by the DICOM's
1024x1024 size. The challenge's test labels were never released, so the training file is split like
the TB sets (default: everything in ``test``, the zero-shot evaluation the paper uses it for).
"""

from __future__ import annotations

import re
from typing import Iterator

from .. import storage
from .base import Converter, FileImage, SourceFormatError, SourceRecord, sort_splits, stable_fraction
from .dicom import DicomImage
from .ofa_tsv import normalised_box
from .tables import cell_text, read_rows, row_number

TB_LABELS = ("normal", "tuberculosis")
PNEUMONIA_LABELS = ("normal", "pneumonia")
RSNA_IMAGE_SIZE = 1024  # every image of the challenge is 1024 x 1024


def hashed_split(dataset: str, record_id: str, val_fraction: float, test_fraction: float) -> str:
    """``train``/``val``/``test`` from a stable hash of the id (fractions of the whole)."""
    u = stable_fraction(f"{dataset}/{record_id}")
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _check_fractions(name: str, val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1):
        raise ValueError(f"{name}: val_fraction and test_fraction must be in [0, 1] and sum to at most 1, "
                         f"got {val_fraction} and {test_fraction}")


class _TuberculosisConverter(Converter):
    task = "classify"
    licence = "Public release of the U.S. National Library of Medicine (free use with citation: Jaeger et al. 2014)"
    access = "open"
    prefix = ""
    file_roles = {"images": "CXR_png"}

    def __init__(self, source: str, files=None, *, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        _check_fractions(self.name, val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        if "images" not in given and not storage.isdir(self.url("images")):
            self.files["images"] = ""
        self._by_split: dict[str, list] | None = None

    def url(self, role: str) -> str:
        return self.source if role == "images" and not self.files["images"] else super().url(role)

    def _load(self) -> dict[str, list]:
        if self._by_split is None:
            pattern = re.compile(rf"^({self.prefix}_\d+)_([01])\.png$", re.IGNORECASE)
            out: dict[str, list] = {}
            root = self.url("images")
            for rel, size in storage.list_files(root, recursive=False).items():
                match = pattern.match(rel)
                if not match:
                    continue
                record_id, label = match.group(1).upper(), int(match.group(2))
                split = hashed_split(self.name, record_id, self.val_fraction, self.test_fraction)
                out.setdefault(split, []).append((record_id, label, rel, FileImage(storage.join(root, rel), size)))
            if not out:
                raise SourceFormatError(root, f"no {self.prefix}_<nnnn>_<0|1>.png images found")
            self._by_split = {s: out[s] for s in sort_splits(out)}
        return self._by_split

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        for record_id, label, rel, image in self._load()[split]:
            yield SourceRecord(self.make_record(split, record_id, label=label, label_name=TB_LABELS[label], image=rel), image)


class SzCxrConverter(_TuberculosisConverter):
    name = "sz_cxr"
    prefix = "CHNCXR"
    native_format = "Shenzhen set: CXR_png/CHNCXR_<nnnn>_<0|1>.png (0 normal, 1 tuberculosis)"


class McCxrConverter(_TuberculosisConverter):
    name = "mc_cxr"
    prefix = "MCUCXR"
    native_format = "Montgomery County set: MontgomerySet/CXR_png/MCUCXR_<nnnn>_<0|1>.png (0 normal, 1 tuberculosis)"


class RsnaPneumoniaConverter(Converter):
    name = "rsna_pneumonia"
    task = "classify"
    native_format = "RSNA Pneumonia Detection Challenge: stage_2_train_labels.csv + stage_2_train_images/<patientId>.dcm"
    licence = "RSNA challenge data: non-commercial research use under the competition rules (images from NIH ChestX-ray14)"
    access = "open"
    file_roles = {"labels": "stage_2_train_labels.csv", "images": "stage_2_train_images"}

    def __init__(self, source: str, files=None, *, val_fraction: float = 0.0, test_fraction: float = 1.0,
                 on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        _check_fractions(self.name, val_fraction, test_fraction)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._by_split: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._by_split is None:
            file = self.url("labels")
            patients: dict[str, list] = {}
            for where, row in read_rows(file, "csv", skip=self.bad_row(None)):
                with self.guard(None, row_number(where)) as guard:
                    patient = guard.id = cell_text(row, "patientId", file, where)
                    guard.split = hashed_split(self.name, patient, self.val_fraction, self.test_fraction)
                    target = cell_text(row, "Target", file, where)
                    if target not in ("0", "1"):
                        raise SourceFormatError(file, f"expected 0 or 1, got {target!r}", record=where, field="Target")
                    entry = patients.setdefault(patient, [0, []])
                    if target == "1":
                        entry[0] = 1
                        try:
                            x, y, w, h = (float(cell_text(row, c, file, where)) for c in ("x", "y", "width", "height"))
                        except ValueError:
                            raise SourceFormatError(file, "box values must be numbers", record=where) from None
                        entry[1].append(normalised_box(x, y, x + w, y + h, RSNA_IMAGE_SIZE, RSNA_IMAGE_SIZE))
            out: dict[str, list] = {}
            for patient, (label, boxes) in patients.items():
                split = hashed_split(self.name, patient, self.val_fraction, self.test_fraction)
                out.setdefault(split, []).append((patient, label, boxes))
            self._by_split = {s: out[s] for s in sort_splits(out)}
        return self._by_split

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        images = storage.list_files(self.url("images"), recursive=False)
        for patient, label, boxes in self._load()[split]:
            with self.guard(split) as guard:
                guard.id = patient
                name = f"{patient}.dcm"
                if name not in images:
                    self.missing_image(split, self.url("labels"), name, record=f"patientId {patient}")
                    continue
                yield SourceRecord(self.make_record(
                    split, patient, label=label, label_name=PNEUMONIA_LABELS[label], boxes=boxes, image=name,
                ), DicomImage(storage.join(self.url("images"), name), images[name]))
