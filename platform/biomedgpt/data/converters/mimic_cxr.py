"""MIMIC-CXR (Johnson et al. 2019): chest X-ray studies with free-text radiology reports, PhysioNet
credentialed access. Report generation (captioning) in the official split.

Native layout (one source folder holding the MIMIC-CXR-JPG release and the reports):

- ``files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg``: MIMIC-CXR-JPG images;
- ``mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id, study_id, subject_id, split`` with split
  ``train``/``validate``/``test`` (``validate`` becomes our ``val``);
- ``mimic-cxr-2.0.0-metadata.csv.gz`` (optional): ``dicom_id, ..., ViewPosition, ...``, used to pick
  the frontal view;
- the reports (``mimic-cxr-reports.zip`` of the MIMIC-CXR project):
  ``mimic-cxr-reports/files/p<NN>/p<subject_id>/s<study_id>.txt``, or ``files/.../s<study_id>.txt``
  when the zip was unpacked into the same tree as the images.

Caption target (``section``, default ``findings``): the FINDINGS section of the free-text report,
as in R2Gen and most report-generation work, because the findings describe what is visible in the
image while the impression adds clinical judgement. Studies without a FINDINGS section (about a
third: many reports carry only an IMPRESSION) are dropped and counted in the manifest
(``notes.dropped.no_findings``). Other choices: ``impression``; ``findings_impression`` (both,
findings first, either may be missing); ``findings_or_impression`` (findings, else the impression).
A section runs from its ``NAME:`` header to the next all-capitals ``NAME:`` header; "FINDINGS AND
IMPRESSION:" counts as both. Whitespace is collapsed; the de-identification blanks (``___``) stay.

One record per study (``views="frontal"``): the image is the study's PA view, else AP, else its
first image (by ``dicom_id``; every image is listed in ``views``). ``views="all"``: one record per
image (id ``<study>_<dicom_id>``), for training only.
"""

from __future__ import annotations

import re
from typing import Iterator

from .. import storage
from .base import Converter, ImageIndex, SourceFormatError, SourceRecord, sort_splits
from .normalise import clean_text
from .tables import cell_text, read_rows, read_source_bytes, row_number

NATIVE_SPLITS = {"train": "train", "val": "validate", "test": "test"}
SECTIONS = ("findings", "impression", "findings_impression", "findings_or_impression")
VIEWS = ("frontal", "all")
VIEW_PREFERENCE = ("PA", "AP")
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,&/()\-]*[A-Z)])[ \t]*:", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """``{HEADER: text}`` of a free-text radiology report (headers upper-case, text whitespace-collapsed;
    a header seen twice keeps both texts, joined)."""
    out: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = clean_text(match.group(1))
        body = clean_text(text[match.end():end])
        out[name] = f"{out[name]} {body}".strip() if name in out else body
    return out


def _findings(sections: dict[str, str]) -> str:
    parts = [body for name, body in sections.items() if name.startswith("FINDING") and body]
    return " ".join(parts)


def _impression(sections: dict[str, str]) -> str:
    parts = [body for name, body in sections.items()
             if body and (name.startswith(("IMPRESSION", "CONCLUSION")) or name == "FINDINGS AND IMPRESSION")]
    return " ".join(parts)


def report_caption(text: str, section: str = "findings") -> str:
    """The caption a report gives under a ``section`` policy (empty when the report lacks it)."""
    sections = report_sections(text)
    findings, impression = _findings(sections), _impression(sections)
    if section == "findings":
        return findings
    if section == "impression":
        return impression
    if section == "findings_impression":
        # "FINDINGS AND IMPRESSION:" is both sections: its text is not repeated
        return " ".join(p for p in (findings, "" if impression == findings else impression) if p)
    if section == "findings_or_impression":
        return findings or impression
    raise ValueError(f"section must be one of {SECTIONS}, got {section!r}")


class MimicCxrConverter(Converter):
    name = "mimic_cxr"
    task = "caption"
    native_format = ("MIMIC-CXR-JPG files/p<NN>/p<subject>/s<study>/<dicom_id>.jpg + mimic-cxr-2.0.0-split.csv.gz "
                     "(+ metadata.csv.gz) + reports (mimic-cxr-reports/)files/p<NN>/p<subject>/s<study>.txt")
    licence = "PhysioNet Credentialed Health Data License 1.5.0 (data use agreement; no redistribution)"
    access = "credentialed"
    file_roles = {
        "split": "mimic-cxr-2.0.0-split.csv.gz",
        "metadata": "mimic-cxr-2.0.0-metadata.csv.gz",
        "images": "files",
        "reports": "mimic-cxr-reports/files",
    }

    def __init__(self, source: str, files=None, *, section: str = "findings", views: str = "frontal",
                 on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        if section not in SECTIONS:
            raise ValueError(f"mimic_cxr: section must be one of {SECTIONS}, got {section!r}")
        if views not in VIEWS:
            raise ValueError(f"mimic_cxr: views must be one of {VIEWS}, got {views!r}")
        self.section = section
        self.views = views
        if "reports" not in given and not storage.isdir(self.url("reports")):
            self.files["reports"] = self.files["images"]  # the reports zip unpacked into the image tree
        self._images = ImageIndex(self.url("images"))
        self._studies: dict[str, list[tuple[str, str, list[str]]]] | None = None
        self._view_of: dict[str, str] | None = None

    def _load(self) -> dict[str, list[tuple[str, str, list[str]]]]:
        """Per canonical split: (subject_id, study_id, [dicom_id, ...]) in file order."""
        if self._studies is not None:
            return self._studies
        file = self.url("split")
        native_to_canonical = {v: k for k, v in NATIVE_SPLITS.items()}
        by_study: dict[tuple[str, str], tuple[str, list[str]]] = {}
        order: list[tuple[str, str]] = []
        for where, row in read_rows(file, "csv", skip=self.bad_row(None)):
            with self.guard(None, row_number(where)) as guard:
                dicom_id = guard.id = cell_text(row, "dicom_id", file, where)
                study = cell_text(row, "study_id", file, where)
                subject = cell_text(row, "subject_id", file, where)
                native = cell_text(row, "split", file, where)
                if native not in native_to_canonical:
                    raise SourceFormatError(file, f"expected one of {sorted(native_to_canonical)}, got {native!r}",
                                            record=where, field="split")
                key = (subject, study)
                split = guard.split = native_to_canonical[native]
                if key not in by_study:
                    by_study[key] = (split, [])
                    order.append(key)
                elif by_study[key][0] != split:
                    raise SourceFormatError(file, f"study s{study} is in both {by_study[key][0]!r} and {split!r}",
                                            record=where, field="split")
                by_study[key][1].append(dicom_id)
        out: dict[str, list] = {}
        for key in order:
            split, dicoms = by_study[key]
            out.setdefault(split, []).append((key[0], key[1], sorted(dicoms)))
        self._studies = {s: out[s] for s in sort_splits(out)}
        return self._studies

    def _views(self) -> dict[str, str]:
        """dicom_id -> ViewPosition from the metadata file (empty when the file is absent)."""
        if self._view_of is None:
            file = self.url("metadata")
            self._view_of = {}
            if storage.exists(file):
                for where, row in read_rows(file, "csv", skip=self.bad_row(None)):
                    self._view_of[cell_text(row, "dicom_id", file, where)] = cell_text(
                        row, "ViewPosition", file, where, required=False).upper()
        return self._view_of

    def splits(self) -> list[str]:
        return list(self._load())

    def native_split(self, split: str) -> str:
        return NATIVE_SPLITS.get(split, split)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        views = self._views()
        for subject, study, dicoms in self._load()[split]:
            with self.guard(split) as guard:
                guard.id = f"s{study}"
                folder = f"p{subject[:2]}/p{subject}/s{study}"
                report_url = storage.join(self.url("reports"), f"p{subject[:2]}/p{subject}/s{study}.txt")
                try:
                    report = read_source_bytes(report_url).decode("utf-8", errors="replace")
                except SourceFormatError:
                    self.drop(split, "no_report")
                    continue
                caption = report_caption(report, self.section)
                if not caption:
                    self.drop(split, f"no_{self.section}")
                    continue
                ordered = sorted(dicoms, key=lambda d: (_view_rank(views.get(d, "")), d))
                chosen = ordered if self.views == "all" else ordered[:1]
                for dicom_id in chosen:
                    relpath = f"{folder}/{dicom_id}.jpg"
                    image = self._images.get(relpath)
                    if image is None:
                        self.missing_image(split, self.url("split"), relpath, record=f"study s{study}")
                        continue
                    record_id = f"s{study}" if self.views == "frontal" else f"s{study}_{dicom_id}"
                    yield SourceRecord(self.make_record(
                        split, record_id, caption=caption, image=relpath, study=f"s{study}", subject=f"p{subject}",
                        view=views.get(dicom_id) or None, views=[f"{folder}/{d}.jpg" for d in ordered],
                        section=self.section,
                    ), image)


def _view_rank(view: str) -> int:
    return VIEW_PREFERENCE.index(view) if view in VIEW_PREFERENCE else len(VIEW_PREFERENCE)
