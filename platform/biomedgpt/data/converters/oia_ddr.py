"""OIA-DDR (Li et al. 2019): colour fundus photographs with diabetic-retinopathy lesion boxes, the
detection pretraining records.

Native layout (the DDR-dataset release): ``lesion_detection/{train,valid,test}/`` holding the JPEG
photographs and one Pascal VOC XML annotation per image (in the same folder or in sub-folders such
as ``image/`` and ``label/``: files are matched by the VOC ``<filename>``). A VOC file:
``<annotation><filename>007-1774-100.jpg</filename><size><width>..</width><height>..</height></size>
<object><name>MA</name><bndbox><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></bndbox>
</object>...</annotation>``.

One detection record per image: ``boxes`` normalised by the VOC size, ``labels`` the lesion names
(``EX`` hard exudate, ``HE`` haemorrhage, ``MA`` microaneurysm, ``SE`` soft exudate; other names are
kept lower-cased), ``width``/``height``/``image``; the JPEG is stored as is. Images without a lesion
box are dropped and counted (``no_lesion``). Splits: ``train``, ``valid`` -> ``val``, ``test``.
"""

from __future__ import annotations

import posixpath
from typing import Iterator

from .. import storage
from .base import Converter, FileImage, SourceFormatError, SourceRecord, sort_splits
from .ofa_tsv import normalised_box
from .trec_ct import parse_xml

LESIONS = {"ex": "hard exudate", "he": "haemorrhage", "ma": "microaneurysm", "se": "soft exudate"}
NATIVE_SPLITS = {"train": "train", "val": "valid", "test": "test"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _number(obj, path: str, file: str, where: str) -> float:
    text = (obj.findtext(path) or "").strip()
    try:
        return float(text)
    except ValueError:
        raise SourceFormatError(file, f"expected a number, got {text!r}", record=where, field=path) from None


class OiaDdrConverter(Converter):
    name = "oia_ddr"
    task = "detection"
    native_format = "DDR-dataset lesion_detection/{train,valid,test}/: JPEG photographs + Pascal VOC XML boxes"
    licence = "Research use as stated by the DDR repository (licence not verified)"
    access = "open"
    file_roles = {"detection": "lesion_detection"}

    def native_split(self, split: str) -> str:
        return NATIVE_SPLITS.get(split, split)

    def _listing(self) -> dict[str, int]:
        if not hasattr(self, "_files_cache"):
            self._files_cache = storage.list_files(self.url("detection"))
        return self._files_cache

    def splits(self) -> list[str]:
        present = {split for split, native in NATIVE_SPLITS.items()
                   if any(rel.startswith(native + "/") and rel.lower().endswith(".xml") for rel in self._listing())}
        if not present:
            raise SourceFormatError(self.url("detection"), "no VOC annotations found (expected "
                                    "lesion_detection/{train,valid,test}/*.xml)")
        return sort_splits(present)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        root, native = self.url("detection"), self.native_split(split)
        files = {rel: size for rel, size in self._listing().items() if rel.startswith(native + "/")}
        images: dict[str, list[str]] = {}
        for rel in files:
            if rel.lower().endswith(IMAGE_EXTS):
                images.setdefault(posixpath.basename(rel), []).append(rel)
        for rel in sorted(r for r in files if r.lower().endswith(".xml")):
            with self.guard(split, whole_file=True) as guard:
                guard.id = posixpath.splitext(posixpath.basename(rel))[0]
                file = storage.join(root, rel)
                ann = parse_xml(file)
                if ann.tag != "annotation":
                    raise SourceFormatError(file, f"not Pascal VOC: root element <{ann.tag}>, expected <annotation>")
                filename = (ann.findtext("filename") or "").strip() or posixpath.basename(rel)[:-4] + ".jpg"
                width = int(_number(ann, "size/width", file, "annotation"))
                height = int(_number(ann, "size/height", file, "annotation"))
                if width <= 0 or height <= 0:
                    raise SourceFormatError(file, f"image size {width}x{height}", record="annotation", field="size")
                boxes, labels = [], []
                for i, obj in enumerate(ann.iter("object")):
                    where = f"object {i + 1}"
                    name = (obj.findtext("name") or "").strip()
                    if not name:
                        raise SourceFormatError(file, "missing", record=where, field="name")
                    box = obj.find("bndbox")
                    if box is None:
                        raise SourceFormatError(file, "missing", record=where, field="bndbox")
                    x0, y0, x1, y1 = (_number(box, k, file, where) for k in ("xmin", "ymin", "xmax", "ymax"))
                    boxes.append(normalised_box(x0, y0, x1, y1, width, height))
                    labels.append(LESIONS.get(name.lower(), name.lower()))
                if not boxes:
                    self.drop(split, "no_lesion")
                    continue
                candidates = images.get(filename, [])
                same_dir = [c for c in candidates if posixpath.dirname(c) == posixpath.dirname(rel)]
                if len(candidates) > 1 and len(same_dir) != 1:
                    raise SourceFormatError(file, f"image {filename!r} found {len(candidates)} times in {native}/: "
                                                  f"{', '.join(candidates)}", field="filename")
                image_rel = (same_dir or candidates or [None])[0]
                if image_rel is None:
                    self.missing_image(split, file, filename, record="annotation", field="filename")
                    continue
                record_id = posixpath.splitext(filename)[0]
                yield SourceRecord(self.make_record(
                    split, record_id, boxes=boxes, labels=labels, width=width, height=height,
                    image=image_rel[len(native) + 1:],
                ), FileImage(storage.join(root, image_rel), files[image_rel]))
