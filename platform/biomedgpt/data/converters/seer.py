"""SEER (NCI Surveillance, Epidemiology, and End Results) case listings as text classification
records: a patient's structured tumour record rendered as text, its first-course treatment as the label.

Native format: a SEER*Stat case listing exported as CSV (or tab-separated ``.txt``/``.tsv``), one row
per tumour, the header holding SEER*Stat's variable names, e.g. ``Patient ID``, ``Age recode with <1
year olds``, ``Sex``, ``Race recode (W, B, AI, API)``, ``Primary Site - labeled``, ``Histologic Type
ICD-O-3``, ``Derived AJCC Stage Group, 7th ed (2010-2015)``, ``RX Summ--Surg Prim Site (1998+)``,
``Radiation recode``, ``Chemotherapy recode (yes, no/unk)``.

Records: ``text`` = the chosen fields as ``name: value`` pairs joined by ``; `` (``text_columns``;
default every column but the label and id columns; empty values and SEER's ``Blank(s)`` left out),
``label_name`` = the ``label_column`` value (default ``Chemotherapy recode (yes, no/unk)``), id from
``id_column`` (default ``Patient ID``) plus the row's ``Record number recode`` when present (one
patient may have several tumours). The paper publishes neither its cohort, fields nor label, so these
are options; the split is patient-disjoint by a stable hash of the patient id (``test_fraction``,
default 0.2; ``val_fraction`` optional). Rows without a label are dropped and counted.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord, is_record_error, sort_splits, stable_fraction
from .normalise import clean_text
from .tables import cell_text, read_rows, row_number, table_format

BLANK = {"", "blank(s)", "blank", "unknown/blank"}


class SeerConverter(Converter):
    name = "seer"
    task = "classify"
    native_format = "SEER*Stat case listing: CSV/TSV, one row per tumour, SEER*Stat variable names as header"
    licence = "SEER Research Data Use Agreement (no redistribution)"
    access = "credentialed"
    file_roles = {"cases": "cases.csv"}

    def __init__(self, source: str, files=None, *, label_column: str = "Chemotherapy recode (yes, no/unk)",
                 id_column: str = "Patient ID", text_columns: Sequence[str] = (), test_fraction: float = 0.2,
                 val_fraction: float = 0.0, on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
            raise ValueError(f"seer: need 0 < test_fraction, 0 <= val_fraction, sum < 1; got {test_fraction}, "
                             f"{val_fraction}")
        self.label_column, self.id_column = label_column, id_column
        self.text_columns = list(text_columns)
        self.test_fraction, self.val_fraction = test_fraction, val_fraction

    def split_of(self, patient: str) -> str:
        f = stable_fraction(f"seer:patient:{patient}")
        if f < self.test_fraction:
            return "test"
        return "val" if f < self.test_fraction + self.val_fraction else "train"

    def _rows(self) -> Iterator[tuple[str, dict]]:
        file = self.url("cases")
        if not storage.exists(file):
            raise SourceFormatError(file, "SEER case listing not found (pass files={'cases': ...})")
        yield from read_rows(file, table_format(file), skip=self.bad_row(None))

    def splits(self) -> list[str]:
        file = self.url("cases")
        found = set()
        for where, row in self._rows():
            try:
                found.add(self.split_of(cell_text(row, self.id_column, file, where)))
            except SourceFormatError as err:  # a row without an id: a defect, met again by records()
                if not is_record_error(err):
                    raise
        return sort_splits(found)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url("cases")
        seen: dict[str, str] = {}
        for where, row in self._rows():
            with self.guard(None, row_number(where)) as guard:
                patient = guard.id = cell_text(row, self.id_column, file, where)
                if self.split_of(patient) != split:
                    continue
                guard.split = split
                columns = self.text_columns or [c for c in row if c not in (self.label_column, self.id_column)]
                label = clean_text(cell_text(row, self.label_column, file, where, required=False))
                if self.label_column not in row:
                    raise SourceFormatError(file, f"missing (columns: {', '.join(row)})", record=where,
                                            field=self.label_column)
                if label.lower() in BLANK:
                    self.drop(split, "no_label")
                    continue
                parts = []
                for column in columns:
                    value = clean_text(cell_text(row, column, file, where, required=False))
                    if column not in row:
                        raise SourceFormatError(file, f"text column not in the listing (columns: {', '.join(row)})",
                                                record=where, field=column)
                    if value.lower() not in BLANK:
                        parts.append(f"{column}: {value}")
                if not parts:
                    self.drop(split, "no_fields")
                    continue
                tumour = cell_text(row, "Record number recode", file, where, required=False)
                record_id = f"{patient}_{tumour}" if tumour else patient
                if record_id in seen:
                    raise SourceFormatError(file, f"duplicate case {record_id!r} (also {seen[record_id]})", record=where,
                                            field=self.id_column)
                seen[record_id] = where
                yield SourceRecord(self.make_record(split, record_id, text="; ".join(parts), label=label.lower(),
                                                    label_name=label.lower()), None)
