"""Text-only pretraining corpora (the text-infilling objective) and MedICat image-caption pairs.

``text_corpus`` (generic): the ``corpus`` file is either plain text with one document or sentence per
line (``.txt``, optionally ``.gz``: e.g. BLUE's ``pubmed_uncased_sentence_nltk.txt`` used for PubMed
abstracts), or a table (``.csv``/``.csv.gz``/``.tsv``/``.jsonl``/``.json``) whose ``text_column`` holds
the text, e.g. MIMIC-III ``NOTEEVENTS.csv.gz`` (``TEXT``, ids from ``ROW_ID``, ``filter_column:
CATEGORY`` + ``filter_values: [Discharge summary, Radiology]`` to keep some note types). Everything
goes into ``split`` (default ``train``: pretraining corpora have no evaluation split). Records:
``text`` with whitespace collapsed; empty texts are dropped and counted.

``medicat`` (Subramanian et al. 2020): ``s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl``
(one figure per line: ``pdf_hash``, ``fig_uri``, ``s2_caption``, ...) and ``figures/<pdf_hash>_<fig_uri>``.
The leading "Figure N." label of a caption is removed, as BiomedGPT's preprocessing does.
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

from .. import storage
from .base import Converter, ImageIndex, SourceFormatError, SourceRecord
from .normalise import clean_text
from .tables import cell_text, read_rows, read_text_file, row_number, table_format

_FIGURE_LABEL = re.compile(r"^\s*(fig\.?|figure)\s*[A-Za-z]?\d+[A-Za-z]?\s*[.:|]\s*", re.IGNORECASE)


class TextCorpusConverter(Converter):
    name = "text_corpus"
    task = "text"
    generic = True
    native_format = "one document/sentence per line (.txt) or a table with a text column (.csv/.tsv/.jsonl/.json)"
    licence = "unknown: set by the dataset spec"
    access = "credentialed"  # unknown data is treated as restricted until a spec says otherwise
    file_roles = {"corpus": "corpus.txt"}

    def __init__(self, source: str, files=None, *, text_column: str = "text", id_column: str | None = None,
                 filter_column: str | None = None, filter_values: Sequence[str] = (), split: str = "train",
                 dataset: str | None = None, on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if split not in ("train", "val", "test"):
            raise ValueError(f"text_corpus: split must be train, val or test, got {split!r}")
        if bool(filter_column) != bool(filter_values):
            raise ValueError("text_corpus: filter_column and filter_values go together")
        self.text_column, self.id_column, self.split = text_column, id_column, split
        self.filter_column, self.filter_values = filter_column, {v.strip().lower() for v in filter_values}
        if dataset:
            self.dataset_name = dataset

    def splits(self) -> list[str]:
        if not storage.exists(self.url("corpus")):
            raise SourceFormatError(self.url("corpus"), "corpus file not found (pass files={'corpus': ...})")
        return [self.split]

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url("corpus")
        name = storage.basename(file).lower().removesuffix(".gz")
        if name.endswith(".txt"):
            for number, line in enumerate(read_text_file(file).splitlines(), start=1):
                text = clean_text(line)
                if not text:
                    continue
                yield SourceRecord(self.make_record(split, f"line{number:09d}", text=text), None)
            return
        seen: set[str] = set()
        for n, (where, row) in enumerate(read_rows(file, table_format(file), skip=self.bad_row(split))):
            with self.guard(split, row_number(where)) as guard:
                if self.filter_column and cell_text(row, self.filter_column, file, where, required=False).lower() \
                        not in self.filter_values:
                    continue
                text = clean_text(cell_text(row, self.text_column, file, where, required=False))
                if self.text_column not in row:
                    raise SourceFormatError(file, f"missing (columns: {', '.join(map(str, row))})", record=where,
                                            field=self.text_column)
                if not text:
                    self.drop(split, "empty_text")
                    continue
                record_id = guard.id = cell_text(row, self.id_column, file, where) if self.id_column else f"row{n:09d}"
                if record_id in seen:
                    raise SourceFormatError(file, "duplicate id", record=where, field=self.id_column)
                seen.add(record_id)
                yield SourceRecord(self.make_record(split, record_id, text=text), None)


class MedicatConverter(Converter):
    name = "medicat"
    task = "caption"
    native_format = "MedICat: s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl + figures/<pdf_hash>_<fig_uri>"
    licence = "figures: the source papers' open-access licences (PMC OA subset); dataset released on request (access form)"
    access = "credentialed"  # released only to those who fill in the access form
    file_roles = {"captions": "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl", "images": "figures"}

    def splits(self) -> list[str]:
        if not storage.exists(self.url("captions")):
            raise SourceFormatError(self.url("captions"), "MedICat captions file not found")
        return ["train"]

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url("captions")
        images = ImageIndex(self.url("images"))
        seen: set[str] = set()
        for where, row in read_rows(file, "jsonl", skip=self.bad_row(split)):
            with self.guard(split, row_number(where)) as guard:
                name = guard.id = f"{cell_text(row, 'pdf_hash', file, where)}_{cell_text(row, 'fig_uri', file, where)}"
                caption = clean_text(_FIGURE_LABEL.sub("", cell_text(row, "s2_caption", file, where, required=False)))
                if not caption:
                    self.drop(split, "empty_caption")
                    continue
                if name in seen:
                    raise SourceFormatError(file, "figure listed twice", record=where, field="fig_uri")
                seen.add(name)
                image = images.get(name)
                if image is None:
                    self.missing_image(split, file, name, record=where)
                    continue
                record_id = name.rsplit(".", 1)[0]
                yield SourceRecord(self.make_record(split, record_id, caption=caption, image=name), image)
