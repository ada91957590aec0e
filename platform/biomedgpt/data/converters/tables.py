"""Tabular source files as rows of named fields: CSV/TSV (optionally ``.gz``), JSON Lines, JSON,
and Excel ``.xlsx`` (openpyxl).

Every row comes with a ``where`` label (``line 12``, ``row 7``, ``record 3``) so converters can name
the file, the row and the field in their errors. Headerless files (the OFA/BiomedGPT TSVs) take
their column names from ``columns``. A row that cannot be read (wrong number of columns, invalid JSON
line) stops the reading, unless ``skip`` is given: it is then called with the error and the row's
number, and reading goes on (converters pass ``Converter.bad_row(split)``: the row becomes a defect).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from typing import Any, Callable, Iterator, Sequence

from .. import storage
from .base import SourceFormatError

FORMATS = ("csv", "tsv", "jsonl", "json", "xlsx")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # clinical notes and base64 images exceed the 128 KiB default


def table_format(url: str) -> str:
    """The table format from a file name (``.csv``, ``.csv.gz``, ``.tsv``, ``.txt`` = TSV, ``.jsonl``,
    ``.json``, ``.xlsx``)."""
    name = storage.basename(url).lower().removesuffix(".gz")
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".txt", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                     (".json", "json"), (".xlsx", "xlsx")):
        if name.endswith(ext):
            return fmt
    raise SourceFormatError(url, f"unknown table format (expected one of {', '.join(FORMATS)}, by file extension)")


def read_source_bytes(url: str) -> bytes:
    """A whole file, gunzipped when its name ends with ``.gz``."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise SourceFormatError(url, "file not found") from None
    if url.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise SourceFormatError(url, f"not a readable gzip file ({err})") from None
    return data


def read_text_file(url: str) -> str:
    data = read_source_bytes(url)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceFormatError(url, f"not UTF-8 text ({err})") from None


RowSkip = Callable[[SourceFormatError, int], None]


def row_number(where: str) -> int | None:
    """The number in a ``where`` label (``line 12`` -> 12), None when there is none."""
    last = where.split(" ", 2)[1] if where.count(" ") >= 1 else ""
    return int(last) if last.isdigit() else None


def read_rows(url: str, fmt: str | None = None, *, columns: Sequence[str] | None = None,
              json_key: str | None = None, skip: RowSkip | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of a table file.

    ``columns``: names for a headerless CSV/TSV (every line is data); without it the first line is
    the header. JSON files hold a list of objects, or an object with the list under ``json_key``
    (default: the only list value, e.g. BioBART's ``{"data": [...]}``). ``skip(error, number)``: called
    for a row that cannot be read, which is then left out (default: the error is raised).
    """
    rows = _read_rows(url, fmt or table_format(url), columns, json_key)
    for item in rows:
        if isinstance(item, SourceFormatError):
            if skip is None:
                raise item
            skip(item, row_number(item.record or "") or 0)
            continue
        yield item


def _read_rows(url: str, fmt: str, columns: Sequence[str] | None, json_key: str | None
               ) -> Iterator[tuple[str, dict[str, Any]] | SourceFormatError]:
    """Rows, and in their place the error of each row that cannot be read (file-level errors raise)."""
    if fmt in ("csv", "tsv"):
        text = read_text_file(url)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t",
                            quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
        header = list(columns) if columns else None
        last_line = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # e.g. a NUL byte: the reader goes on with the next line
                number, last_line = last_line + 1, reader.line_num
                if header is not None:
                    yield SourceFormatError(url, f"unreadable row ({err})", record=f"line {number}")
                    continue
                raise SourceFormatError(url, f"line {number}: unreadable header ({err})") from None
            # quoted fields may span lines: name the row by its first physical line
            number, last_line = last_line + 1, reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if len(cells) != len(header):
                yield SourceFormatError(url, f"{len(cells)} columns, expected {len(header)} ({', '.join(header)})",
                                        record=f"line {number}")
                continue
            yield f"line {number}", dict(zip(header, cells))
    elif fmt == "jsonl":
        text = read_text_file(url)
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield SourceFormatError(url, f"invalid JSON at column {err.colno}: {err.msg}", record=f"line {number}")
                continue
            if not isinstance(row, dict):
                yield SourceFormatError(url, f"expected a JSON object, got {type(row).__name__}", record=f"line {number}")
                continue
            yield f"line {number}", row
    elif fmt == "json":
        text = read_text_file(url)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SourceFormatError(url, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            key = json_key or (lists[0] if len(lists) == 1 else None)
            if key is None or not isinstance(data.get(key), list):
                raise SourceFormatError(url, f"expected a list of records or an object with one list (keys: {sorted(data)})")
            data = data[key]
        if not isinstance(data, list):
            raise SourceFormatError(url, f"expected a list of records, got {type(data).__name__}")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                yield SourceFormatError(url, f"expected a JSON object, got {type(row).__name__}", record=f"record {i}")
                continue
            yield f"record {i}", row
    elif fmt == "xlsx":
        yield from _read_xlsx(url)
    else:
        raise ValueError(f"table format must be one of {FORMATS}, got {fmt!r}")


def _read_xlsx(url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import openpyxl
    except ImportError:  # declared in pyproject.toml; a clear message if an install lacks it
        raise SourceFormatError(url, "reading .xlsx needs the openpyxl package (pip install openpyxl)") from None
    data = read_source_bytes(url)
    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises zipfile/KeyError/InvalidFileException for broken files
        raise SourceFormatError(url, f"not a readable .xlsx workbook ({type(err).__name__}: {err})") from None
    try:
        sheet = book.worksheets[0]
        header: list[str] | None = None
        for number, values in enumerate(sheet.iter_rows(values_only=True), start=1):
            if values is None or all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                continue
            if header is None:
                header = [str(v).strip() if v is not None else "" for v in values]
                continue
            row = {name: value for name, value in zip(header, values) if name}
            yield f"row {number}", row
    finally:
        book.close()


def cell_text(row: dict[str, Any], column: str, file: str, where: str, *, required: bool = True) -> str:
    """A cell as text (numbers without a trailing ``.0``), stripped; missing/empty -> error or ``""``."""
    if column not in row:
        if required:
            raise SourceFormatError(file, f"missing (columns: {', '.join(map(str, row))})", record=where, field=column)
        return ""
    value = row[column]
    if value is None:
        text = ""
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
    text = text.strip()
    if required and not text:
        raise SourceFormatError(file, "empty", record=where, field=column)
    return text
