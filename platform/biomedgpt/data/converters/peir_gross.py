"""PEIR Gross (Jing et al. 2018, from the Pathology Education Informational Resource): gross
pathology photographs with one descriptive caption each, for captioning.

PEIR has no official release file; two layouts are read (``layout="auto"`` picks the one present):

- ``biocaption`` (the layout the bioCaption tools produce and BiomedGPT's preprocessing reads):
  ``peir_gross_images/<file>.jpg`` plus ``train_images.tsv`` and ``test_images.tsv``, headerless,
  one ``<file name><TAB><caption>`` line per image. There is no validation file: the last
  ``val_fraction`` of the training lines (file order, default 0.2 = BiomedGPT's 80/20 cut of its
  training file) become ``val``, deterministically.
- ``table``: ``captions.json`` (a list of ``{"image", "caption", "split"}`` objects),
  ``captions.jsonl`` or ``captions.csv`` (header ``image,caption,split``) beside an ``images/``
  folder; ``split`` is ``train``/``val``/``test`` (``validation``/``dev`` accepted).

Record id: the image file name without extension (one caption per image). Quirks handled: captions
with tabs or doubled spaces, Windows line ends, a header line in the TSV (skipped when its first
cell is ``File_name``/``image``), blank lines.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Iterator

from .. import storage
from .base import Converter, ImageIndex, SourceFormatError, SourceRecord, sort_splits
from .normalise import clean_text
from .tables import cell_text, read_rows, read_text_file, row_number

LAYOUTS = ("auto", "biocaption", "table")
TABLE_FILES = ("captions.json", "captions.jsonl", "captions.csv")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}
_HEADER_CELLS = {"file_name", "filename", "image", "file"}


class PeirGrossConverter(Converter):
    name = "peir_gross"
    task = "caption"
    native_format = ("bioCaption layout: peir_gross_images/ + train_images.tsv / test_images.tsv ('<file>\\t<caption>'); "
                     "or captions.{json,jsonl,csv} ({image, caption, split}) + images/")
    licence = "PEIR Digital Library: free for educational use (per image terms of the PEIR library); research use"
    access = "open"
    file_roles = {
        "train": "train_images.tsv",
        "test": "test_images.tsv",
        "images": "peir_gross_images",
        "table": "",
        "table_images": "images",
    }

    def __init__(self, source: str, files=None, *, layout: str = "auto", val_fraction: float = 0.2,
                 on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        if layout not in LAYOUTS:
            raise ValueError(f"peir_gross: layout must be one of {LAYOUTS}, got {layout!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"peir_gross: val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = float(val_fraction)
        if not self.files["table"]:
            found = [name for name in TABLE_FILES if storage.exists(storage.join(self.source, name))]
            self.files["table"] = found[0] if found else TABLE_FILES[0]
        if layout == "auto":
            if "table" in given or (not given & {"train", "test"} and storage.exists(self.url("table"))
                                    and not storage.exists(self.url("train"))):
                layout = "table"
            else:
                layout = "biocaption"
        self.layout = layout
        self._by_split: dict[str, list[tuple[str, str, str, str]]] | None = None

    def _load(self) -> dict[str, list[tuple[str, str, str, str]]]:
        """Per split: (file, where, image name, caption)."""
        if self._by_split is None:
            self._by_split = self._load_table() if self.layout == "table" else self._load_biocaption()
        return self._by_split

    def _load_biocaption(self) -> dict[str, list]:
        out: dict[str, list] = {}
        found = False
        for split in ("train", "test"):
            file = self.url(split)
            if not storage.exists(file):
                continue
            found = True
            rows = []
            for number, line in enumerate(read_text_file(file).splitlines(), start=1):
                if not line.strip():
                    continue
                with self.guard(split, number) as guard:
                    where = f"line {number}"
                    if "\t" not in line:
                        raise SourceFormatError(file, f"expected '<file name><TAB><caption>', got {line[:60]!r}", record=where)
                    name, caption = line.split("\t", 1)
                    name = guard.id = name.strip()
                    if not rows and name.lower() in _HEADER_CELLS:
                        continue
                    rows.append((file, where, name, caption))
            if split == "train" and self.val_fraction > 0:
                n_val = int(round(len(rows) * self.val_fraction))
                cut = len(rows) - n_val
                out["train"], out["val"] = rows[:cut], rows[cut:]
            else:
                out[split] = rows
        if not found:
            raise SourceFormatError(self.source, f"no PEIR Gross caption files found (expected {self.files['train']} and "
                                                 f"{self.files['test']}, or one of {', '.join(TABLE_FILES)})")
        return {s: out[s] for s in sort_splits(out) if out[s]}

    def _load_table(self) -> dict[str, list]:
        file = self.url("table")
        out: dict[str, list] = {}
        for where, row in read_rows(file, skip=self.bad_row(None)):
            with self.guard(None, row_number(where)) as guard:
                name = guard.id = cell_text(row, "image", file, where)
                caption = cell_text(row, "caption", file, where)
                raw_split = cell_text(row, "split", file, where).lower()
                if raw_split not in SPLIT_NAMES:
                    raise SourceFormatError(file, f"expected one of {sorted(SPLIT_NAMES)}, got {raw_split!r}",
                                            record=where, field="split")
                guard.split = SPLIT_NAMES[raw_split]
                out.setdefault(guard.split, []).append((file, where, name, caption))
        return {s: out[s] for s in sort_splits(out)}

    def splits(self) -> list[str]:
        return list(self._load())

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        images = ImageIndex(self.url("table_images" if self.layout == "table" else "images"))
        seen: dict[str, str] = {}
        for file, where, name, caption_raw in self._load()[split]:
            with self.guard(split, row_number(where)) as guard:
                guard.id = name
                caption = clean_text(caption_raw)
                if not caption:
                    raise SourceFormatError(file, "empty caption", record=f"{where} ({name})", field="caption")
                record_id = PurePosixPath(name).stem
                if record_id in seen:
                    raise SourceFormatError(file, f"image listed twice (also {seen[record_id]})", record=where, field="image")
                seen[record_id] = where
                image = images.get(name)
                if image is None:
                    self.missing_image(split, file, name, record=where)
                    continue
                yield SourceRecord(self.make_record(split, record_id, caption=caption, image=name), image)
