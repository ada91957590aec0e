"""Text summarisation sources: MeQSum (its Excel release or the BiomedGPT TSVs), HealthCareMagic
(BioBART's split), and ``summarize_table``, any TSV/CSV/JSON(L)/XLSX with a text and a summary column
(e.g. MIMIC-III findings -> impression pairs).

Records: ``text`` (the article, question or findings), ``summary`` (the reference), both with
whitespace collapsed. Rows with an empty text or summary are dropped and counted
(``notes.dropped``): BiomedGPT's HealthCareMagic preprocessing notes empty targets in the release.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord, sort_splits
from .normalise import clean_text
from .tables import cell_text, read_rows, row_number, table_format

SPLITS = ("train", "val", "test")


class _SummaryTable(Converter):
    """Shared reading: per-split table files with a text and a summary column."""

    task = "summarize"
    text_column = "text"
    summary_column = "summary"
    id_column: str | None = None
    headerless_columns: tuple[str, ...] = ("text", "summary")

    def _rows(self, split: str, file: str) -> Iterator[tuple[str, dict[str, Any]]]:
        fmt = table_format(file)
        columns = self.headerless_columns if fmt == "tsv" and self.headerless else None
        return read_rows(file, fmt, columns=columns, skip=self.bad_row(split))

    headerless = True

    def splits(self) -> list[str]:
        present = [s for s in SPLITS if self.files.get(s) and storage.exists(self.url(s))]
        if not present:
            expected = ", ".join(self.files[s] for s in SPLITS if self.files.get(s))
            raise SourceFormatError(self.source, f"no {self.dataset} files found (expected {expected})")
        return sort_splits(present)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url(split)
        seen: dict[str, str] = {}
        for n, (where, row) in enumerate(self._rows(split, file)):
            with self.guard(split, row_number(where)) as guard:
                text = clean_text(cell_text(row, self.text_column, file, where, required=False))
                summary = clean_text(cell_text(row, self.summary_column, file, where, required=False))
                for column in (self.text_column, self.summary_column):
                    if column not in row:
                        raise SourceFormatError(file, f"missing (columns: {', '.join(map(str, row))})", record=where, field=column)
                if not text or not summary:
                    self.drop(split, "empty_text" if not text else "empty_summary")
                    continue
                record_id = cell_text(row, self.id_column, file, where) if self.id_column else f"{split}_{n:06d}"
                guard.id = record_id
                if record_id in seen:
                    raise SourceFormatError(file, f"duplicate id (also {seen[record_id]})", record=where, field=self.id_column)
                seen[record_id] = where
                yield SourceRecord(self.make_record(split, record_id, text=text, summary=summary), None)


class SummarizeTableConverter(_SummaryTable):
    """Any summarisation table: ``train``/``val``/``test`` files (``.tsv``, ``.csv``, ``.jsonl``, ``.json``,
    ``.xlsx``; gzip allowed) with ``text_column`` and ``summary_column``.

    Headerless TSV (``header=False``, the default for ``.tsv`` as in OFA's summarisation files) reads
    the columns named by ``columns`` (default ``[text, summary]``); CSV, JSON(L) and XLSX always have
    names. ``id_column`` names an id column; without it ids are ``<split>_<row:06d>``.
    """

    name = "summarize_table"
    generic = True
    native_format = "table per split (TSV/CSV/JSONL/JSON/XLSX) with a text and a summary column"
    licence = "unknown: set by the dataset spec"
    access = "credentialed"  # unknown data is treated as restricted until a spec says otherwise
    file_roles = {"train": "train.tsv", "val": "val.tsv", "test": "test.tsv"}

    def __init__(self, source: str, files=None, *, text_column: str = "text", summary_column: str = "summary",
                 id_column: str | None = None, header: bool = False, columns: Sequence[str] = ("text", "summary"),
                 dataset: str | None = None, on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        self.text_column, self.summary_column, self.id_column = text_column, summary_column, id_column
        self.headerless = not header
        self.headerless_columns = tuple(columns)
        if dataset:
            self.dataset_name = dataset


class MeQSumConverter(_SummaryTable):
    """MeQSum (Ben Abacha & Demner-Fushman 2019): 1,000 consumer health questions with expert summaries.

    Layouts: ``xlsx``: the release file ``MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx`` (columns
    ``File``, ``CHQ``, ``Summary``; no split: ``split_sizes`` cuts it in file order, e.g.
    ``{train: 500, val: 100, test: 400}``, default everything in ``train``); ``tsv``: BiomedGPT's
    ``train.tsv``/``val.tsv``/``test.tsv`` (headerless ``question<TAB>summary``), the split its
    results use. ``auto``: the TSVs when present, else the Excel file.
    """

    name = "meqsum"
    native_format = "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx (File, CHQ, Summary) or BiomedGPT {train,val,test}.tsv"
    licence = "research use (the MeQSum repository states no licence; questions from the U.S. NLM, de-identified)"
    access = "open"
    file_roles = {"xlsx": "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx", "train": "train.tsv", "val": "val.tsv",
                  "test": "test.tsv"}

    def __init__(self, source: str, files=None, *, layout: str = "auto", split_sizes: dict[str, int] | None = None,
                 on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        if layout not in ("auto", "xlsx", "tsv"):
            raise ValueError(f"meqsum: layout must be auto, xlsx or tsv, got {layout!r}")
        if layout == "auto":
            tsv = any(storage.exists(self.url(s)) for s in SPLITS) and "xlsx" not in given
            layout = "tsv" if tsv else "xlsx"
        self.layout = layout
        sizes = dict(split_sizes or {})
        bad = sorted(set(sizes) - set(SPLITS))
        if bad or any(not isinstance(v, int) or v < 0 for v in sizes.values()):
            raise ValueError(f"meqsum: split_sizes maps train/val/test to row counts, got {split_sizes!r}")
        self.split_sizes = {s: sizes[s] for s in SPLITS if s in sizes}
        if self.layout == "xlsx":
            self.text_column, self.summary_column, self.id_column = "CHQ", "Summary", "File"
        self._xlsx_rows: list | None = None

    def splits(self) -> list[str]:
        if self.layout == "tsv":
            return super().splits()
        file = self.url("xlsx")
        if not storage.exists(file):
            raise SourceFormatError(file, "MeQSum release file not found (or BiomedGPT's train/val/test.tsv)")
        return list(self.split_sizes) if self.split_sizes else ["train"]

    def _rows(self, split: str, file: str):
        if self.layout == "tsv":
            return super()._rows(split, file)
        if self._xlsx_rows is None:
            self._xlsx_rows = list(read_rows(self.url("xlsx"), "xlsx", skip=self.bad_row(None)))
            total = sum(self.split_sizes.values())
            if self.split_sizes and total != len(self._xlsx_rows):
                raise SourceFormatError(self.url("xlsx"), f"split_sizes add up to {total} but the file has "
                                                          f"{len(self._xlsx_rows)} rows")
        if not self.split_sizes:
            return iter(self._xlsx_rows)
        start = 0
        for name in SPLITS:
            size = self.split_sizes.get(name, 0)
            if name == split:
                return iter(self._xlsx_rows[start:start + size])
            start += size
        return iter(())

    def url(self, role: str) -> str:
        if getattr(self, "layout", "") == "xlsx" and role in SPLITS:
            role = "xlsx"
        return super().url(role)


class HealthCareMagicConverter(_SummaryTable):
    """HealthCareMagic (from Zeng et al. 2020, MedDialog): patient question + doctor dialogue, the
    patient's one-line description as the summary, in BioBART's split.

    Layouts: ``biobart``: ``train.json``/``dev.json``/``test.json`` = ``{"data": [{id, src, tgt}]}``
    (src = dialogue, tgt = description); ``tsv``: BiomedGPT's headerless ``train.tsv``/``val.tsv``/
    ``test.tsv`` (``dialogue<TAB>description``). The leading ``Q.`` of a description is removed.
    """

    name = "healthcaremagic"
    native_format = "BioBART split {train,dev,test}.json ({data: [{id, src, tgt}]}) or BiomedGPT {train,val,test}.tsv"
    licence = "research use (MedDialog / HealthCareMagic: no licence stated; public web forum content)"
    access = "open"
    file_roles = {"train": "train.json", "val": "dev.json", "test": "test.json"}

    def __init__(self, source: str, files=None, *, on_missing_image: str = "error"):
        given = set(files or {})
        super().__init__(source, files, on_missing_image=on_missing_image)
        if not given and not any(storage.exists(self.url(s)) for s in SPLITS):
            self.files.update(train="train.tsv", val="val.tsv", test="test.tsv")

    def _rows(self, split: str, file: str):
        if table_format(file) == "json":
            self.text_column, self.summary_column, self.id_column = "src", "tgt", "id"
            for where, row in read_rows(file, "json", json_key="data", skip=self.bad_row(split)):
                row = dict(row)
                row["id"] = str(row.get("id", ""))
                row["tgt"] = _strip_q(row.get("tgt"))
                yield where, row
            return
        self.text_column, self.summary_column, self.id_column = "text", "summary", None
        for where, row in read_rows(file, "tsv", columns=("text", "summary"), skip=self.bad_row(split)):
            row["summary"] = _strip_q(row["summary"])
            yield where, row


def _strip_q(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return text[2:].strip() if text.startswith("Q.") else text
    return value
