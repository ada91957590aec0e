"""CBIS-DDSM (Lee et al. 2017, TCIA): scanned-film mammograms with verified pathology, CC BY 3.0.
Two datasets, as in BiomedGPT: ``cbis_ddsm_mass`` and ``cbis_ddsm_calc`` (calcifications), each a
benign/malignant classification of one abnormality.

Native layout (the TCIA release): the case description CSVs
``{mass,calc}_case_description_{train,test}_set.csv`` (one row per abnormality: patient_id,
breast density, left or right breast, image view, abnormality id, ..., pathology, ...,
``image file path``, ``cropped image file path``, ``ROI mask file path``) and the DICOM files under
``CBIS-DDSM/`` (or directly under the source).

Label: ``pathology`` MALIGNANT -> ``malignant`` (1); BENIGN and BENIGN_WITHOUT_CALLBACK -> ``benign``
(0): "without callback" means benign findings the radiologist would not recall the patient for, so
they are benign for this task; the raw value stays in ``pathology``.

Image (``image``): ``crop`` (default) the abnormality's cropped ROI image from ``cropped image file
path``: the label is per abnormality, and a full mammogram can hold several abnormalities with
different pathologies, so the crop is what the label describes. ``full``: the whole mammogram from
``image file path`` (one record per abnormality still; images repeat). ``roi_mask``: the binary
mask. DICOMs become 8-bit PNG (:mod:`.dicom`: no window in these files, so min..max).

Finding the file of a CSV path: the CSV paths (``<folder>/<study UID>/<series UID>/000000.dcm``)
do not match the folder names of a TCIA (NBIA) download
(``<folder>/<date>-DDSM-<5 digits>/<n>.000000-<description>-<5 digits>/1-1.dcm``). The converter
takes the exact path if it exists; else the DICOMs under ``<folder>/``: the only one; else the one in
the series folder ending with the series UID's last 5 digits; else the one whose series folder
names the image kind ("full mammogram", "cropped", "ROI mask"); else, when a crop and its mask share
one series folder, the smaller file is the crop and the larger the mask. Quirks handled: paths with
a trailing newline inside the quotes, Windows backslashes, the ``breast density`` column spelled
``breast_density`` in the mass files.
"""

from __future__ import annotations

import re
from typing import Iterator

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord
from .dicom import DicomImage, is_dicom_name
from .tables import cell_text, read_rows, row_number

IMAGE_KINDS = {"crop": "cropped image file path", "full": "image file path", "roi_mask": "ROI mask file path"}
KIND_WORDS = {"crop": "cropped", "full": "full mammogram", "roi_mask": "roi mask"}
LABELS = ("benign", "malignant")
PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}


class _CbisDdsmConverter(Converter):
    abnormality = ""
    task = "classify"
    native_format = ("CBIS-DDSM: {kind}_case_description_{train,test}_set.csv + DICOMs under CBIS-DDSM/ "
                     "(TCIA download layout or the CSV's own paths)")
    licence = "CC BY 3.0 (TCIA)"
    access = "open"
    extra_columns: tuple[tuple[str, str], ...] = ()

    def __init__(self, source: str, files=None, *, image: str = "crop", on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        if image not in IMAGE_KINDS:
            raise ValueError(f"{self.name}: image must be one of {sorted(IMAGE_KINDS)}, got {image!r}")
        self.image_kind = image
        if "images" not in given and not storage.isdir(self.url("images")):
            self.files["images"] = ""  # DICOM folders directly under the source
        self._listing: dict[str, dict[str, int]] | None = None

    def url(self, role: str) -> str:
        if role == "images" and not self.files["images"]:
            return self.source
        return super().url(role)

    def splits(self) -> list[str]:
        present = [s for s in ("train", "test") if storage.exists(self.url(s))]
        if not present:
            raise SourceFormatError(self.source, f"no CBIS-DDSM case description files found "
                                                 f"(expected {self.files['train']} and {self.files['test']})")
        return present

    def _dicoms(self) -> dict[str, dict[str, int]]:
        """Top-level folder -> {relative path: size} of every DICOM under the image root (one listing)."""
        if self._listing is None:
            self._listing = {}
            for rel, size in storage.list_files(self.url("images")).items():
                if is_dicom_name(rel):
                    self._listing.setdefault(rel.split("/", 1)[0], {})[rel] = size
        return self._listing

    def _resolve(self, csv_path: str) -> tuple[str, int] | None:
        path = csv_path.strip().replace("\\", "/").strip("/")
        parts = path.split("/")
        candidates = self._dicoms().get(parts[0], {})
        if path in candidates:
            return path, candidates[path]
        if len(candidates) == 1:
            return next(iter(candidates.items()))
        if not candidates:
            return None
        pool = dict(candidates)
        if len(parts) >= 3:
            suffix = parts[-2][-5:]
            by_uid = {rel: size for rel, size in pool.items()
                      if rel.count("/") >= 2 and rel.rsplit("/", 2)[-2].endswith(f"-{suffix}")}
            if len(by_uid) == 1:
                return next(iter(by_uid.items()))
            if by_uid:
                pool = by_uid
        word = KIND_WORDS[self.image_kind]
        by_word = {rel: size for rel, size in pool.items() if word in rel.lower()}
        if len(by_word) == 1:
            return next(iter(by_word.items()))
        if by_word:
            pool = by_word
        if self.image_kind in ("crop", "roi_mask") and len(pool) == 2:
            ordered = sorted(pool.items(), key=lambda item: (item[1], item[0]))
            return ordered[0] if self.image_kind == "crop" else ordered[1]
        raise SourceFormatError(self.url("images"), f"{len(pool)} DICOM files could be the {self.image_kind} image "
                                                    f"of {csv_path.strip()!r}: {sorted(pool)[:4]}")

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url(split)
        column = IMAGE_KINDS[self.image_kind]
        seen: dict[str, str] = {}
        for where, row in read_rows(file, "csv", skip=self.bad_row(split)):
            with self.guard(split, row_number(where)) as guard:
                row = {re.sub(r"\s+", " ", k.strip()).replace("breast_density", "breast density"): v for k, v in row.items()}
                patient = cell_text(row, "patient_id", file, where)
                side = cell_text(row, "left or right breast", file, where).upper()
                view = cell_text(row, "image view", file, where).upper()
                abnormality = cell_text(row, "abnormality id", file, where)
                record_id = guard.id = f"{patient}_{side}_{view}_{abnormality}"
                if record_id in seen:
                    raise SourceFormatError(file, f"abnormality listed twice (also {seen[record_id]})", record=where,
                                            field="abnormality id")
                seen[record_id] = where
                pathology = cell_text(row, "pathology", file, where).upper()
                if pathology not in PATHOLOGY:
                    raise SourceFormatError(file, f"expected one of {sorted(PATHOLOGY)}, got {pathology!r}",
                                            record=f"{where} ({record_id})", field="pathology")
                label = PATHOLOGY[pathology]
                csv_path = cell_text(row, column, file, where)
                try:
                    found = self._resolve(csv_path)
                except SourceFormatError as err:  # an ambiguous image: this record's problem, not the file's
                    raise SourceFormatError(file, err.message, record=f"{where} ({record_id})", field=column) from None
                if found is None:
                    self.missing_image(split, file, csv_path.strip(), record=f"{where} ({record_id})", field=column)
                    continue
                rel, size = found
                extras = {key: cell_text(row, col, file, where, required=False) or None for key, col in self.extra_columns}
                yield SourceRecord(self.make_record(
                    split, record_id, label=label, label_name=LABELS[label], pathology=pathology,
                    abnormality_type=self.abnormality, breast_density=_int_or_text(cell_text(row, "breast density", file, where, required=False)),
                    side=side, view=view, assessment=_int_or_text(cell_text(row, "assessment", file, where, required=False)),
                    subtlety=_int_or_text(cell_text(row, "subtlety", file, where, required=False)), **extras,
                    image=rel, image_kind=self.image_kind,
                ), DicomImage(storage.join(self.url("images"), rel), size))


def _int_or_text(value: str) -> int | str | None:
    if not value:
        return None
    return int(value) if value.isdigit() else value


class CbisDdsmMassConverter(_CbisDdsmConverter):
    name = "cbis_ddsm_mass"
    abnormality = "mass"
    file_roles = {"train": "mass_case_description_train_set.csv", "test": "mass_case_description_test_set.csv",
                  "images": "CBIS-DDSM"}
    extra_columns = (("mass_shape", "mass shape"), ("mass_margins", "mass margins"))


class CbisDdsmCalcConverter(_CbisDdsmConverter):
    name = "cbis_ddsm_calc"
    abnormality = "calcification"
    file_roles = {"train": "calc_case_description_train_set.csv", "test": "calc_case_description_test_set.csv",
                  "images": "CBIS-DDSM"}
    extra_columns = (("calc_type", "calc type"), ("calc_distribution", "calc distribution"))
