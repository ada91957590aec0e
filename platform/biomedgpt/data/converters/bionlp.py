"""NCBI BioNLP corpora as text-infilling pretraining records: one record per document (title and
abstract or passages), from the corpora's own formats.

Native formats, as the NCBI BioNLP data page distributes its corpora (NCBI-disease, BC5CDR, GNormPlus,
tmVar, NLM-Chem ...), any number of files anywhere under the ``corpus`` folder:

- PubTator (``.txt``, ``.pubtator``, optionally ``.gz``): documents separated by blank lines, each
  ``PMID|t|title`` and ``PMID|a|abstract`` followed by tab-separated annotation lines (ignored);
- BioC XML (``.xml``, ``.bioc``, optionally ``.gz``): ``<collection><document><id>`` with
  ``<passage><text>`` elements, joined in document order.

A document in several corpora (the same PMID) is kept once (the first file, in path order) and the
repeats counted (``duplicate_document``); documents without text are dropped and counted. Everything
goes to ``train`` (pretraining). Record ids are the PMIDs/BioC ids (``text``: whitespace collapsed).

Defects: a document that cannot be read is skipped and named, not fatal (``Converter.guard``; the
build's error budget decides whether there are too many). In a PubTator file, a line that is neither a
title/abstract line nor an annotation makes its document a defect (``a.pubtator: line 10: not
PubTator ...``, index = that line number, id = the document's PMID when one was read); reading resumes
at the next blank line (or the next title line of another PMID, for files without blank lines). In a
BioC file, a ``<document>`` without an ``<id>`` is a defect (``b.xml: document 2: field 'id':
missing``, index = its 0-based position). A file that cannot be read at all (invalid XML, not BioC, not
UTF-8, a broken gzip) is one defect of its own (``c.xml: invalid XML at line 1 ...``, no index), and
the other files are still converted.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Iterator, NamedTuple

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord
from .normalise import clean_text
from .tables import read_source_bytes, row_number

PUBTATOR_LINE = re.compile(r"^([^|\t]+)\|([ta])\|(.*)$")
PUBTATOR_EXTS = (".txt", ".pubtator")
BIOC_EXTS = (".xml", ".bioc")


class Document(NamedTuple):
    """One document of a corpus file: its id and text, where it is in the file (``line 3``, ``document
    2``) and, for a document that cannot be used, the error naming it (``id``/``text`` then hold what
    could be read: the PMID when known, else None)."""

    id: str | None
    text: str
    where: str
    error: SourceFormatError | None = None


def pubtator_documents(text: str, file: str) -> Iterator[Document]:
    """A :class:`Document` per PubTator document (``where``: the line it starts on). A line that is not
    PubTator makes its document a bad one (``error``, ``where``: that line), and reading resumes at the
    next blank line or at the next title line of another PMID."""
    doc_id: str | None = None
    parts: list[str] = []
    start = 0
    error: SourceFormatError | None = None

    def finish() -> Document:
        if error is not None:
            return Document(doc_id, "", error.record or f"line {start}", error)
        return Document(doc_id, " ".join(parts), f"line {start}")

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if doc_id is not None or error is not None:
                yield finish()
            doc_id, parts, error = None, [], None
            continue
        m = PUBTATOR_LINE.match(line)
        if error is not None:  # skipping the rest of a bad document
            if not (m and m.group(2) == "t" and m.group(1).strip() != doc_id):
                continue
            yield finish()  # a title line of another document (no blank line in between): resynchronised
            doc_id, parts, error = None, [], None
        if m:
            pmid = m.group(1).strip()
            if doc_id is not None and pmid != doc_id:  # no blank line between documents
                yield finish()
                parts = []
            if doc_id != pmid:
                start = number
            doc_id = pmid
            parts.append(m.group(3))
        elif "\t" in line:
            if doc_id is None:
                start = number
                error = SourceFormatError(file, "annotation line before any PMID|t| title line",
                                          record=f"line {number}")
        else:
            if doc_id is None:
                start = number
            error = SourceFormatError(file, f"not PubTator: expected 'PMID|t|title', 'PMID|a|abstract' or a "
                                            f"tab-separated annotation, got {line[:60]!r}", record=f"line {number}")
    if doc_id is not None or error is not None:
        yield finish()


def bioc_documents(data: bytes, file: str) -> list[Document]:
    """A :class:`Document` per BioC ``<document>`` (its passages' text; ``where``: ``document N``, from
    1); one without an id is a bad one (``error``). A file that is not BioC XML raises
    :class:`SourceFormatError` (the whole file is unusable)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        line, col = err.position
        raise SourceFormatError(file, f"invalid XML at line {line} column {col}: {err}") from None
    if root.tag != "collection":
        raise SourceFormatError(file, f"not BioC XML: root element <{root.tag}>, expected <collection>")
    out = []
    for i, doc in enumerate(root.iter("document")):
        where = f"document {i + 1}"
        doc_id = (doc.findtext("id") or "").strip()
        if not doc_id:
            out.append(Document(None, "", where, SourceFormatError(file, "missing", record=where, field="id")))
            continue
        texts = [p.findtext("text") or "" for p in doc.iter("passage")]
        out.append(Document(doc_id, " ".join(t for t in texts if t.strip()), where))
    return out


def read_documents(file: str) -> list[Document]:
    """Every document of one corpus file, by its extension; :class:`SourceFormatError` when the file as a
    whole cannot be read."""
    data = read_source_bytes(file)
    if file.lower().removesuffix(".gz").endswith(BIOC_EXTS):
        return bioc_documents(data, file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceFormatError(file, f"not UTF-8 text ({err})") from None
    return list(pubtator_documents(text, file))


class NcbiBioNlpConverter(Converter):
    name = "ncbi_bionlp"
    task = "text"
    native_format = "NCBI BioNLP corpora: PubTator (.txt/.pubtator) and BioC XML (.xml) files under corpus/"
    licence = "Per corpus (mostly public domain U.S. government work; PubMed text under NLM terms)"
    access = "open"
    file_roles = {"corpus": "corpus"}

    def _files(self) -> list[str]:
        root = self.url("corpus")
        out = []
        for rel in storage.list_files(root):
            name = rel.lower().removesuffix(".gz")
            if name.endswith(PUBTATOR_EXTS + BIOC_EXTS) and not storage.basename(rel).lower().startswith("readme"):
                out.append(storage.join(root, rel))
        return out

    def splits(self) -> list[str]:
        if not self._files():
            raise SourceFormatError(self.url("corpus"), "no PubTator (.txt, .pubtator) or BioC (.xml) files found")
        return ["train"]

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        seen: set[str] = set()
        for file in self._files():
            docs: list[Document] = []
            with self.guard(split, None, whole_file=True):  # an unreadable file: one defect, the others go on
                docs = read_documents(file)
            bioc = file.lower().removesuffix(".gz").endswith(BIOC_EXTS)
            for i, doc in enumerate(docs):
                with self.guard(split, i if bioc else row_number(doc.where)) as guard:
                    guard.id = doc.id
                    if doc.error is not None:
                        raise doc.error
                    text = clean_text(doc.text)
                    if not text:
                        self.drop(split, "empty_text")
                        continue
                    if doc.id in seen:
                        self.drop(split, "duplicate_document")
                        continue
                    seen.add(doc.id)
                    yield SourceRecord(self.make_record(split, doc.id, text=text, corpus=storage.basename(file)), None)
