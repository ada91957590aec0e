"""ROCO (Pelka et al. 2018), radiology figure captions from PubMed Central open-access papers.

Native layout (the ``roco-dataset`` repository after ``scripts/fetch.py``):
``data/{train,validation,test}/radiology/captions.txt`` with one ``ROCO_<n><TAB> caption`` line per
image, and the images fetched to ``data/<split>/radiology/images/ROCO_<n>.jpg``. ``validation``
becomes our ``val``. The source may also be the ``data/`` folder itself.

Quirks handled: the space after the tab, Windows line ends, blank lines, non-ASCII typography
(thin spaces, ``×``) kept as text. A line without a tab or an id that is not ``ROCO_<digits>`` is an
error naming the file and line. Licence is per item (CC BY for the radiology subset used here, as
listed in ``licences.txt``).
"""

from __future__ import annotations

import re
from typing import Iterator

from .. import storage
from .base import Converter, ImageIndex, SourceFormatError, SourceRecord
from .normalise import clean_text

NATIVE_SPLITS = {"train": "train", "val": "validation", "test": "test"}
_ROCO_ID = re.compile(r"^ROCO_\d+$")


class RocoConverter(Converter):
    name = "roco"
    task = "caption"
    native_format = "ROCO: data/{train,validation,test}/radiology/captions.txt ('ROCO_<n>\\t caption') + images/ROCO_<n>.jpg"
    licence = "per item (the source article's PMC open-access licence, listed in licences.txt; mostly CC BY)"
    access = "open"
    file_roles = {
        **{split: f"data/{native}/radiology/captions.txt" for split, native in NATIVE_SPLITS.items()},
        **{f"{split}_images": f"data/{native}/radiology/images" for split, native in NATIVE_SPLITS.items()},
    }

    def __init__(self, source: str, files=None, *, on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        # the source may be the repository root or its data/ folder
        if not given and not any(storage.exists(self.url(s)) for s in NATIVE_SPLITS):
            for role, rel in self.file_roles.items():
                self.files[role] = rel.removeprefix("data/")

    def splits(self) -> list[str]:
        return self.split_files_present(NATIVE_SPLITS, "ROCO captions files")

    def native_split(self, split: str) -> str:
        return NATIVE_SPLITS.get(split, split)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url(split)
        try:
            text = storage.read_text(file)
        except UnicodeDecodeError as err:
            raise SourceFormatError(file, f"not UTF-8 text ({err})") from None
        images = ImageIndex(self.url(f"{split}_images"))
        seen: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            with self.guard(split, number) as guard:
                where = f"line {number}"
                if "\t" not in line:
                    raise SourceFormatError(file, f"expected 'ROCO_<n><TAB>caption', got {line[:60]!r}", record=where)
                roco_id, caption = line.split("\t", 1)
                roco_id = guard.id = roco_id.strip()
                if not _ROCO_ID.match(roco_id):
                    raise SourceFormatError(file, f"expected an id like ROCO_00020, got {roco_id!r}", record=where, field="id")
                if roco_id in seen:
                    raise SourceFormatError(file, f"duplicate id (also line {seen[roco_id]})", record=where, field="id")
                seen[roco_id] = number
                caption = clean_text(caption)
                if not caption:
                    raise SourceFormatError(file, "empty caption", record=f"{where} ({roco_id})", field="caption")
                image_name = f"{roco_id}.jpg"
                image = images.get(image_name)
                if image is None:
                    self.missing_image(split, file, image_name, record=where)
                    continue
                yield SourceRecord(self.make_record(split, roco_id, caption=caption, image=image_name), image)
