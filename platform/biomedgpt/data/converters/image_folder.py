"""Folders of images as image-only records (the ``image`` pretraining objective: image infilling),
and the generic DICOM ingest.

``image_folder``: every JPEG/PNG (and DICOM, converted) under the source, recursively, in path
order. ``dicom_folder``: every DICOM file (``.dcm``/``.dicom``) under the source, converted to
8-bit PNG by :mod:`.dicom` (modality rescale, the file's window or min..max, MONOCHROME1 inverted;
``window`` forces ``minmax`` or ``[center, width]``).

Splits: ``split_by="folder"`` reads the first path component as the split (``train/``, ``val/``
(``valid``, ``validation``, ``dev``), ``test/``; other folders are an error); ``split_by="none"``
(default) puts everything in ``split`` (default ``train``). ``label_from="parent"`` adds the parent
folder's name as ``label_name`` (class-per-folder releases such as CytoImageNet). Record id: the path
below the split folder without its extension. An image that cannot be used (a DICOM that does not
convert, a file outside the class folders) is skipped and named as a defect of the build.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Iterator, Sequence

from .. import storage
from .base import Converter, FileImage, SourceFormatError, SourceRecord, sort_splits
from .dicom import WINDOW_MODES, DicomImage, is_dicom_name

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageFolderConverter(Converter):
    name = "image_folder"
    task = "image"
    generic = True
    native_format = "a folder tree of JPEG/PNG/DICOM images (optionally train/val/test subfolders)"
    licence = "unknown: set by the dataset spec"
    access = "credentialed"  # unknown data is treated as restricted until a spec says otherwise
    file_roles = {"images": ""}
    dicom_only = False

    def __init__(self, source: str, files=None, *, split: str = "train", split_by: str = "none",
                 label_from: str = "none", window: str | Sequence[float] = "auto", dataset: str | None = None,
                 on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if split_by not in ("none", "folder"):
            raise ValueError(f"{self.name}: split_by must be 'none' or 'folder', got {split_by!r}")
        if label_from not in ("none", "parent"):
            raise ValueError(f"{self.name}: label_from must be 'none' or 'parent', got {label_from!r}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"{self.name}: split must be train, val or test, got {split!r}")
        if isinstance(window, str):
            if window not in WINDOW_MODES:
                raise ValueError(f"{self.name}: window must be one of {WINDOW_MODES} or [center, width], got {window!r}")
            self.window: str | tuple[float, float] = window
        else:
            values = list(window)
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[1] < 1:
                raise ValueError(f"{self.name}: window must be one of {WINDOW_MODES} or [center, width >= 1], got {window!r}")
            self.window = (float(values[0]), float(values[1]))
        self.split, self.split_by, self.label_from = split, split_by, label_from
        if dataset:
            self.dataset_name = dataset
        self._by_split: dict[str, list[tuple[str, str, int]]] | None = None

    def url(self, role: str) -> str:
        return self.source if role == "images" and not self.files["images"] else super().url(role)

    def _wanted(self, rel: str) -> bool:
        if is_dicom_name(rel):
            return True
        return not self.dicom_only and rel.lower().endswith(IMAGE_SUFFIXES)

    def _load(self) -> dict[str, list[tuple[str, str, int]]]:
        """Per split: (record id, relative path, size)."""
        if self._by_split is None:
            root = self.url("images")
            out: dict[str, list] = {}
            for rel, size in storage.list_files(root).items():
                name = rel.rsplit("/", 1)[-1]
                if name.startswith(".") or not self._wanted(rel):
                    continue
                if self.split_by == "folder":
                    top, _, below = rel.partition("/")
                    if not below:
                        raise SourceFormatError(storage.join(root, rel), "with split_by='folder' every image must be "
                                                                         "inside a train/val/test folder")
                    if top.lower() not in SPLIT_FOLDERS:
                        raise SourceFormatError(storage.join(root, top), f"not a split folder (expected one of "
                                                                         f"{sorted(SPLIT_FOLDERS)})")
                    split, below_split = SPLIT_FOLDERS[top.lower()], below
                else:
                    split, below_split = self.split, rel
                out.setdefault(split, []).append((str(PurePosixPath(below_split).with_suffix("")), rel, size))
            if not out:
                kinds = "DICOM" if self.dicom_only else "JPEG/PNG/DICOM"
                raise SourceFormatError(root, f"no {kinds} images found")
            self._by_split = {s: out[s] for s in sort_splits(out)}
        return self._by_split

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        root = self.url("images")
        for record_id, rel, size in self._load()[split]:
            with self.guard(split) as guard:
                guard.id = record_id
                url = storage.join(root, rel)
                image = DicomImage(url, size, self.window) if is_dicom_name(rel) else FileImage(url, size)
                fields = {"image": rel, "source_format": "dicom" if is_dicom_name(rel) else rel.rsplit(".", 1)[-1].lower()}
                if self.label_from == "parent":
                    parent = PurePosixPath(rel).parent.name
                    if not parent or (self.split_by == "folder" and parent.lower() in SPLIT_FOLDERS
                                      and PurePosixPath(rel).parent.parent == PurePosixPath(".")):
                        raise SourceFormatError(url, "label_from='parent' needs every image inside a class folder",
                                                record=f"image {rel}")
                    fields["label_name"] = parent
                yield SourceRecord(self.make_record(split, record_id, **fields), image)


class DicomFolderConverter(ImageFolderConverter):
    name = "dicom_folder"
    native_format = "a folder tree of DICOM files (.dcm/.dicom), converted to 8-bit PNG"
    dicom_only = True
