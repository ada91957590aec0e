"""IU X-ray (Demner-Fushman et al. 2016), report generation, in the R2Gen split.

Native layout (R2Gen ``data/iu_xray/``): ``annotation.json`` = ``{"train"|"val"|"test": [{id, report,
image_path: ["<study>/0.png", "<study>/1.png"], split}]}`` and ``images/<study>/<n>.png``.

One record per study by default (``views="first"``): the caption is the report, the image is the
first listed view (frontal in R2Gen's ordering), and every view is listed in ``views``. With
``views="all"`` each image becomes its own record (id ``<study>_<n>``) sharing the report; use that
for training only, as it counts a study several times in evaluation. Quirks handled: split keys
are stripped of surrounding spaces, and an unknown key is an error naming it (one public copy
stored the test split under a blank ``"    "`` key: we do not guess); doubled spaces inside
reports are collapsed; a ``split`` field that disagrees with its key is an error.
"""

from __future__ import annotations

from typing import Iterator

from .base import Converter, ImageIndex, SourceFormatError, SourceRecord, load_json, require, sort_splits
from .normalise import clean_text

SPLITS = ("train", "val", "test")
VIEWS = ("first", "all")


class IuXrayConverter(Converter):
    name = "iu_xray"
    task = "caption"
    native_format = "R2Gen annotation.json ({train,val,test: [{id, report, image_path, split}]}) + images/<study>/<n>.png"
    licence = "Open-i public release; licence unverified: treat as non-commercial research use"
    access = "open"
    file_roles = {"annotation": "annotation.json", "images": "images"}

    def __init__(self, source: str, files=None, *, views: str = "first", on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if views not in VIEWS:
            raise ValueError(f"iu_xray: views must be one of {VIEWS}, got {views!r}")
        self.views = views
        self._images = ImageIndex(self.url("images"))
        self._data: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self._data is None:
            file = self.url("annotation")
            data = load_json(file)
            if not isinstance(data, dict):
                raise SourceFormatError(file, f"expected an object with keys {SPLITS}, got {type(data).__name__}")
            out: dict[str, list] = {}
            for key, value in data.items():
                split = key.strip()
                if split not in SPLITS:
                    raise SourceFormatError(file, f"unknown split key (expected {SPLITS})", field=repr(key))
                if not isinstance(value, list):
                    raise SourceFormatError(file, f"expected a list of studies, got {type(value).__name__}", field=key)
                out[split] = value
            self._data = {s: out[s] for s in sort_splits(out)}
        return self._data

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url("annotation")
        seen: set[str] = set()
        for i, raw in enumerate(self._load()[split]):
            with self.guard(split, i) as guard:
                where = f"{split}[{i}]"
                study = guard.id = clean_text(require(raw, "id", str, file, where))
                where = f"{split}[{i}] ({study})"
                if study in seen:
                    raise SourceFormatError(file, "duplicate study id", record=where, field="id")
                seen.add(study)
                caption = clean_text(require(raw, "report", str, file, where))
                if not caption:
                    raise SourceFormatError(file, "empty report", record=where, field="report")
                paths = require(raw, "image_path", list, file, where)
                if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
                    raise SourceFormatError(file, f"expected a non-empty list of image paths, got {paths!r}",
                                            record=where, field="image_path")
                declared = raw.get("split")
                if isinstance(declared, str) and declared.strip() and declared.strip() != split:
                    raise SourceFormatError(file, f"says {declared!r} but the record is listed under {split!r}",
                                            record=where, field="split")
                paths = [p.strip() for p in paths]
                chosen = list(enumerate(paths)) if self.views == "all" else [(0, paths[0])]
                for view, path in chosen:
                    image = self._images.get(path)
                    if image is None:
                        self.missing_image(split, file, path, record=where, field="image_path")
                        continue
                    record_id = study if self.views == "first" else f"{study}_{view}"
                    yield SourceRecord(self.make_record(
                        split, record_id, caption=caption, image=path, study=study, view=view, views=paths,
                    ), image)
