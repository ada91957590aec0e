"""``biomedgpt datasets new NAME --from MANIFEST --task TASK``: a dataset spec for a department's own data,
written from the manifest's columns.

What can be told from the manifest is not asked: the task's fields from common column names
(``question``, ``answer``, ``caption``/``report``, ``label``/``class``/``diagnosis``, ``labels``/``findings``,
``premise``/``hypothesis``, ``text``/``summary``, ``id``, ``patient`` ...), the image column from its values
(the column whose values are files inside the manifest's folder), the split column from a column named like
one (``split``, ``subset``, ``fold``) whose values are split names, multi-label cells from their separators
or JSON lists. What cannot be told is refused with one message naming it and the flag that gives it
(``--map answer=Finding``, ``--licence "..."``). Without a split column the rows are split 80/10/10 by a
stable hash (``--split-ratio``, ``--seed``). The spec is validated before it is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import storage
from .converters.base import SourceFormatError
from .converters.manifest import MANIFEST_CONVERTERS, MANIFEST_FORMATS, SPLIT_VALUES, ManifestConverter
from .converters.tables import read_rows, table_format
from .dataset_spec import DatasetSpec, parse_dataset_spec

#: Column names (lower case, non-alphanumerics as ``_``) taken to hold a field.
SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "image": ("image", "image_path", "image_file", "image_name", "img", "img_path", "path", "file", "file_name",
              "filename", "filepath", "dicom", "dicom_path", "dicom_file"),
    "id": ("id", "uid", "qid", "case", "case_number", "sample_id", "record_id", "case_id", "study_id", "accession", "accession_number"),
    "group": ("patient", "patient_id", "subject", "subject_id", "mrn"),
    "question": ("question", "questions", "query"),
    "answer": ("answer", "answers", "ans"),
    "answer_type": ("answer_type", "answertype"),
    "organ": ("organ", "image_organ", "body_part", "bodypart"),
    "caption": ("caption", "captions", "report", "description", "impression"),
    "label": ("label", "class", "class_name", "label_name", "diagnosis", "category", "target", "gold_label"),
    "labels": ("labels", "classes", "findings", "diagnoses", "tags"),
    "text": ("text", "article", "document", "note", "notes", "input", "source_text"),
    "summary": ("summary", "abstract", "headline", "output"),
    "premise": ("premise", "sentence1", "text1", "s1"),
    "hypothesis": ("hypothesis", "sentence2", "text2", "s2"),
    "split": ("split", "subset", "fold", "partition", "set"),
}
DEFAULT_RATIO = {"train": 0.8, "val": 0.1, "test": 0.1}
SEPARATORS = ("|", ";")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")

class CannotInfer(ValueError):
    """What ``datasets new`` cannot tell from the manifest, and the flag that says it."""


def normalise_column(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def _values(rows: list[dict[str, Any]], column: str) -> list[Any]:
    return [r[column] for r in rows if column in r and r[column] not in (None, "") and
            not (isinstance(r[column], str) and not r[column].strip())]


def _is_file_inside(folder: Path, value: Any) -> bool:
    """Whether ``value`` names a file inside ``folder`` (the converter's rules: relative, no ``..``, no
    link out)."""
    if not isinstance(value, str):
        return False
    text = value.strip().replace("\\", "/")
    if not text or "://" in text or text.startswith("/") or ".." in text.split("/"):
        return False
    real = os.path.realpath(folder / text)
    return os.path.commonpath([str(folder), real]) == str(folder) and os.path.isfile(real)


def infer_mapping(conv: type[ManifestConverter], columns: list[str], rows: list[dict[str, Any]], folder: Path,
                  maps: Mapping[str, str]) -> tuple[dict[str, str], str | None, str, list[str]]:
    """(field -> column, split column or None, label separator, notes on what was inferred) for the records
    of converter ``conv``."""
    task = conv.task
    allowed = (*conv.fields(), "split")
    notes: list[str] = []
    mapping: dict[str, str] = {}
    for field, column in maps.items():
        if field not in allowed:
            raise CannotInfer(f"--map {field}={column}: {field!r} is not a field of {task} records; fields: "
                              f"{', '.join(allowed)}")
        if column not in columns:
            raise CannotInfer(f"--map {field}={column}: no column {column!r} in the manifest (columns: "
                              f"{', '.join(columns)})")
        mapping[field] = column
    used = set(mapping.values())

    def by_name(field: str) -> str | None:
        found = [c for c in columns if normalise_column(c) in SYNONYMS.get(field, ()) and c not in used]
        if len(found) > 1:
            raise CannotInfer(f"columns {', '.join(repr(c) for c in found)} could each hold {field}; pass "
                              f"--map {field}=COLUMN")
        return found[0] if found else None

    def take(field: str, column: str, how: str) -> None:
        mapping[field] = column
        used.add(column)
        notes.append(f"{field} <- column {column!r} ({how})")

    # the image column: the one whose values are files inside the manifest's folder
    if "image" not in mapping and conv.image_input != "none":
        scores = {}
        for c in columns:
            if c in used:
                continue
            values = _values(rows, c)
            if values:
                share = sum(_is_file_inside(folder, v) for v in values) / len(values)
                if share >= 0.5:
                    scores[c] = share
        if len(scores) > 1:
            named = [c for c in scores if normalise_column(c) in SYNONYMS["image"]]
            if len(named) != 1:
                raise CannotInfer(f"columns {', '.join(repr(c) for c in scores)} all name files in {folder}; pass "
                                  f"--map image=COLUMN")
            scores = {named[0]: scores[named[0]]}
        if scores:
            column, share = next(iter(scores.items()))
            take("image", column, f"{share:.0%} of its values are files beside the manifest")
        elif conv.image_input == "required":
            named = by_name("image")
            hint = f" (column {named!r} names none that exist)" if named else ""
            raise CannotInfer(f"cannot infer the image column: no column's values are files inside {folder}{hint}; "
                              f"image paths must be relative to the manifest's folder; pass --map image=COLUMN")
    # one of several forms of a field (one class or a list of classes): the first named like one
    if conv.one_of and not any(f in mapping for f in conv.one_of):
        for field in conv.one_of:
            column = by_name(field)
            if column:
                take(field, column, "by its name")
                break
    # a single-valued field whose column holds lists (JSON, or names between separators) is the list form
    separator = "|"
    for single, plural in conv.list_fields.items():
        field = plural if plural in mapping else single if single in mapping else None
        if field is None:
            continue
        values = _values(rows, mapping[field])
        if any(isinstance(v, list) for v in values):
            mapping[plural] = mapping.pop(field)
            continue
        texts = [str(v) for v in values]
        for sep in SEPARATORS:
            if any(sep in t for t in texts):
                separator = sep
                if field == single:
                    mapping[plural] = mapping.pop(single)
                    notes.append(f"{plural}: several per row (separated by {sep!r})")
                break
    wanted = [f for f in conv.fields() if f not in mapping and f not in conv.one_of and f != "image"]
    if "image" in mapping:  # an image record: the text inputs of text-only records are not read
        wanted = [f for f in wanted if f not in conv.text_inputs]
    for field in wanted:
        column = by_name(field)
        if column:
            take(field, column, "by its name")
    split_column = mapping.pop("split", None)
    if split_column is None:
        split_column = by_name("split")
        explicit = False
    else:
        explicit = True
    if split_column is not None:
        values = _values(rows, split_column)
        bad = sorted({str(v) for v in values if str(v).strip().lower() not in SPLIT_VALUES})
        good = sum(str(v).strip().lower() in SPLIT_VALUES for v in values)
        if good * 2 < len(values) or not values:
            if explicit:
                raise CannotInfer(f"--map split={split_column}: values {bad[:5]} are not split names "
                                  f"({', '.join(sorted(SPLIT_VALUES))}); pass --split-ratio instead")
            split_column = None
        else:
            notes.append(f"split <- column {split_column!r}" + (" (its values are split names)" if not explicit else "")
                         + (f"; rows with {bad[:5]} will be skipped as defects" if bad else ""))
    missing = [f for f in conv.required_fields if f not in mapping]
    if conv.one_of and not any(f in mapping for f in conv.one_of):
        missing.append(conv.one_of[0])
    if conv.image_input == "optional" and "image" not in mapping and not any(f in mapping for f in conv.text_inputs):
        missing.append("image")
    if missing:
        flags = " ".join(f"--map {f}=COLUMN" for f in missing)
        raise CannotInfer(f"cannot infer which column holds {', '.join(missing)} for {task} records (columns: "
                          f"{', '.join(columns)}); pass {flags}")
    return mapping, split_column, separator, notes


def new_dataset_spec(name: str, manifest: str | Path, task: str, *, out: str | Path | None = None,
                     maps: Mapping[str, str] | None = None, split_ratio: Mapping[str, float] | None = None,
                     seed: int = 0, licence: str | None = None, access: str = "credentialed",
                     description: str | None = None, force: bool = False) -> tuple[Path, DatasetSpec, list[str]]:
    """Write ``out`` (default ``datasets_spec/NAME.yaml``) describing ``manifest`` as a dataset of ``task``;
    returns the path, the validated spec and notes on what was inferred. :class:`CannotInfer` (a
    ValueError) names what could not be told and the flag to pass."""
    if not NAME.match(name):
        raise ValueError(f"NAME: {name!r}: lower-case letters, digits and _, starting with a letter")
    if task not in MANIFEST_CONVERTERS:
        raise ValueError(f"--task: {task!r}; a manifest holds one of {', '.join(MANIFEST_CONVERTERS)}")
    conv = MANIFEST_CONVERTERS[task]
    if access not in ("open", "credentialed"):
        raise ValueError(f"--access: open or credentialed, got {access!r}")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"--from: {manifest}: no such file")
    try:
        fmt = table_format(str(manifest))
    except SourceFormatError:
        fmt = None
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"--from: {manifest}: a manifest is a .csv, .tsv (.txt) or .jsonl file")
    out = Path(out) if out is not None else Path("datasets_spec") / f"{name}.yaml"
    if out.stem != name:
        raise ValueError(f"--out: {out}: a dataset spec's file is named after its dataset ({name}.yaml)")
    if out.exists() and not force:
        raise ValueError(f"--out: {out} exists (--force replaces it)")
    folder = Path(os.path.realpath(manifest.parent))
    skipped: list[str] = []
    rows = [row for _, row in read_rows(str(manifest), fmt, skip=lambda err, n: skipped.append(str(err)))]
    if not rows:
        raise ValueError(f"--from: {manifest}: no rows")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    no_licence = ("cannot infer the licence of the data (who may use it, for what); pass --licence \"...\" "
                  "(e.g. --licence \"internal use by the department only\")")
    try:
        mapping, split_column, separator, notes = infer_mapping(conv, columns, rows, folder, dict(maps or {}))
    except CannotInfer as err:
        if not licence or not licence.strip():
            raise CannotInfer(f"{err}; {no_licence}") from None
        raise
    if not licence or not licence.strip():
        raise CannotInfer(no_licence)
    if skipped:
        notes.append(f"{len(skipped)} unreadable row(s) (skipped by the build, named): {skipped[0]}")
    if split_column is not None:
        if split_ratio:
            raise ValueError(f"--split-ratio: the manifest has a split column ({split_column!r}); pass one or the other")
        present = {SPLIT_VALUES.get(str(v).strip().lower()) for v in _values(rows, split_column)} - {None}
        splits = [s for s in ("train", "val", "test") if s in present]
        split: dict[str, Any] = {"column": split_column}
    else:
        ratio = dict(split_ratio or DEFAULT_RATIO)
        splits = [s for s in ("train", "val", "test") if s in ratio]
        split = {"ratio": ratio, "seed": int(seed)}
        if not split_ratio:
            notes.append("split: no split column; rows split 80/10/10 by a stable hash (--split-ratio, --seed)")
    roles = {"train": "train", "val": "evaluate", "test": "evaluate"}
    instruction, target = conv.prompt if "image" in mapping or conv.text_prompt is None else conv.text_prompt
    candidates: dict[str, Any] = {"policy": conv.candidates}
    if conv.candidates == "answers_of_splits":
        candidates["splits"] = [s for s in splits if s == "train"] or splits[:1]
    elif conv.candidates == "fixed":
        label = conv.required_fields[-1]
        candidates["values"] = conv.fixed_candidates([str(v) for v in _values(rows, mapping[label])])
    listed = any(plural in mapping for plural in conv.list_fields.values())
    metrics = list(conv.list_metrics if listed and conv.list_metrics else conv.metrics)
    location = os.path.relpath(folder, os.path.realpath(out.resolve().parent))
    manifest_section: dict[str, Any] = {"file": manifest.name, "location": location, "columns": mapping,
                                        "split": split}
    if listed:
        manifest_section["label_separator"] = separator
    data = {
        "name": name,
        "task": task,
        "stages": ["finetune"],
        "description": description or f"{name}: the department's own {task} data ({manifest.name}).",
        "source": {
            "format": f"{fmt.upper()} manifest {manifest.name}: one row per record"
                      + (", images named relative to it" if "image" in mapping else ""),
            "converter": conv.name,
            "obtain": f"local: {folder / manifest.name}",
            "manifest": manifest_section,
        },
        "citation": "unpublished: the department's own data",
        "licence": licence.strip(),
        "access": access,
        "splits": {s: {"native": f"rows whose {split_column} is {s}" if split_column else
                       f"{split['ratio'][s]:.0%} of the rows by a stable hash (seed {seed})", "role": roles[s]}
                   for s in splits},
        "prompt": {"instruction": instruction, "target": target},
        "metrics": metrics,
        "answer_candidates": candidates,
    }
    spec = parse_dataset_spec(data, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {name}: written by `biomedgpt datasets new {name} --from {manifest} --task {task}`.\n"
              f"# Build its shards: biomedgpt shards build {name} --spec {out} --out SHARDS\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110), encoding="utf-8")
    return out, spec, notes


def source_of(spec: DatasetSpec) -> str | None:
    """Where a manifest spec's source folder is (``source.manifest.location``), None when it does not say."""
    if spec.source.manifest is None:
        return None
    url = spec.source.manifest.source_url(spec.path)
    return url if url is None or "://" in url else str(storage.local_path(url))
