"""DeepLesion (Yan et al. 2018, NIH Clinical Center): CT key slices with lesion boxes, the detection
pretraining source.

Native layout: ``DL_info.csv`` (one row per lesion: ``File_name`` ``<patient>_<study>_<series>_<slice>.png``,
``Bounding_boxes`` ``"x0, y0, x1, y1"`` in pixels, ``Coarse_lesion_type`` 1-8 or -1 (unknown),
``DICOM_windows`` ``"low, high"`` in HU, ``Image_size``, ``Train_Val_Test`` 1/2/3, ...) and
``Images_png/<patient>_<study>_<series>/<slice>.png``: 16-bit PNGs storing HU + 32768.

One detection record per key slice, with every typed lesion on it (``boxes`` normalised by
``Image_size``, ``labels`` the coarse type names). Lesions of type -1 are left out, as BiomedGPT's
preprocessing does; a slice left without lesions is dropped and counted (``no_typed_lesion``). The
slice is stored as 8-bit PNG: HU = pixel - 32768, windowed with the row's ``DICOM_windows`` (the
radiologist's window at annotation time) by :func:`.dicom.window_to_uint8`. Splits:
``Train_Val_Test`` 1 train, 2 val, 3 test.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord, UnusableImageError, encode_png, sort_splits
from .dicom import window_to_uint8
from .ofa_tsv import normalised_box
from .tables import cell_text, read_rows, row_number

LESION_TYPES = {1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung", 6: "kidney", 7: "soft tissue",
                8: "pelvis"}
SPLITS = {"1": "train", "2": "val", "3": "test"}
HU_OFFSET = 32768


@dataclass(frozen=True)
class HounsfieldPng:
    """A 16-bit PNG holding HU + 32768 at ``url`` (``size`` bytes), windowed to 8-bit PNG when read."""

    url: str
    size: int
    window_low: float
    window_high: float

    def read(self) -> bytes:
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            data = storage.read_bytes(self.url)
        except FileNotFoundError:
            raise SourceFormatError(self.url, "image file disappeared after the source was listed") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image, dtype=np.int64)
        except (UnidentifiedImageError, OSError) as err:
            raise UnusableImageError(self.url, f"not a readable PNG ({err})") from None
        hu = pixels - HU_OFFSET
        width = self.window_high - self.window_low
        return encode_png(window_to_uint8(hu, self.window_low + width / 2, width))

    @property
    def name(self) -> str:
        return self.url


def _numbers(text: str, count: int, file: str, where: str, field: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if len(values) != count:
        raise SourceFormatError(file, f"expected {count} comma-separated numbers, got {text!r}", record=where, field=field)
    return values


class DeepLesionConverter(Converter):
    name = "deeplesion"
    task = "detection"
    native_format = "DeepLesion: DL_info.csv + Images_png/<patient>_<study>_<series>/<slice>.png (16-bit, HU + 32768)"
    licence = "NIH Clinical Center release, free for research with citation"
    access = "open"
    file_roles = {"info": "DL_info.csv", "images": "Images_png"}

    def __init__(self, source: str, files=None, *, on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        self._by_split: dict[str, dict[str, dict]] | None = None

    def _load(self) -> dict[str, dict[str, dict]]:
        """Per split: slice file name -> {boxes, labels, window, size, where}, in file order."""
        if self._by_split is None:
            file = self.url("info")
            out: dict[str, dict[str, dict]] = {}
            for where, row in read_rows(file, "csv", skip=self.bad_row(None)):
                with self.guard(None, row_number(where)) as guard:
                    name = guard.id = cell_text(row, "File_name", file, where)
                    split_code = cell_text(row, "Train_Val_Test", file, where)
                    if split_code not in SPLITS:
                        raise SourceFormatError(file, f"expected 1, 2 or 3, got {split_code!r}", record=where, field="Train_Val_Test")
                    guard.split = SPLITS[split_code]
                    entry = out.setdefault(SPLITS[split_code], {}).setdefault(name, {"boxes": [], "labels": [], "where": where})
                    width, height = _numbers(cell_text(row, "Image_size", file, where), 2, file, where, "Image_size")
                    low, high = _numbers(cell_text(row, "DICOM_windows", file, where), 2, file, where, "DICOM_windows")
                    entry.setdefault("window", (low, high))
                    lesion_type = cell_text(row, "Coarse_lesion_type", file, where)
                    try:
                        kind = int(float(lesion_type))
                    except ValueError:
                        raise SourceFormatError(file, f"expected an integer, got {lesion_type!r}", record=where,
                                                field="Coarse_lesion_type") from None
                    if kind == -1:
                        continue
                    if kind not in LESION_TYPES:
                        raise SourceFormatError(file, f"expected 1-8 or -1, got {kind}", record=where, field="Coarse_lesion_type")
                    x0, y0, x1, y1 = _numbers(cell_text(row, "Bounding_boxes", file, where), 4, file, where, "Bounding_boxes")
                    entry["boxes"].append(normalised_box(x0, y0, x1, y1, int(width), int(height)))
                    entry["labels"].append(LESION_TYPES[kind])
                    entry["size"] = (int(width), int(height))
            self._by_split = {s: out[s] for s in sort_splits(out)}
        return self._by_split

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        images = storage.list_files(self.url("images"))
        for name, entry in self._load()[split].items():
            with self.guard(split) as guard:
                guard.id = name
                if not entry["boxes"]:
                    self.drop(split, "no_typed_lesion")
                    continue
                series, _, slice_name = name.rpartition("_")
                relpath = f"{series}/{slice_name}"
                if relpath not in images:
                    self.missing_image(split, self.url("info"), relpath, record=f"{entry['where']} ({name})")
                    continue
                low, high = entry["window"]
                width, height = entry["size"]
                yield SourceRecord(self.make_record(
                    split, name.removesuffix(".png"), boxes=entry["boxes"], labels=entry["labels"], width=width,
                    height=height, window=[low, high], image=relpath,
                ), HounsfieldPng(storage.join(self.url("images"), relpath), images[relpath], low, high))
