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
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Iterator

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord
from .normalise import clean_text
from .tables import read_source_bytes

PUBTATOR_LINE = re.compile(r"^([^|\t]+)\|([ta])\|(.*)$")
PUBTATOR_EXTS = (".txt", ".pubtator")
BIOC_EXTS = (".xml", ".bioc")


def pubtator_documents(text: str, file: str) -> Iterator[tuple[str, str]]:
    """(PMID, title + abstract) per PubTator document."""
    doc_id, parts = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if doc_id is not None:
                yield doc_id, " ".join(parts)
            doc_id, parts = None, []
            continue
        m = PUBTATOR_LINE.match(line)
        if m:
            pmid = m.group(1).strip()
            if doc_id is not None and pmid != doc_id:  # no blank line between documents
                yield doc_id, " ".join(parts)
                parts = []
            doc_id = pmid
            parts.append(m.group(3))
        elif "\t" in line:
            if doc_id is None:
                raise SourceFormatError(file, "annotation line before any PMID|t| title line", record=f"line {number}")
        else:
            raise SourceFormatError(file, f"not PubTator: expected 'PMID|t|title', 'PMID|a|abstract' or a tab-separated "
                                          f"annotation, got {line[:60]!r}", record=f"line {number}")
    if doc_id is not None:
        yield doc_id, " ".join(parts)


def bioc_documents(data: bytes, file: str) -> Iterator[tuple[str, str]]:
    """(document id, its passages' text) per BioC document."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        line, col = err.position
        raise SourceFormatError(file, f"invalid XML at line {line} column {col}: {err}") from None
    if root.tag != "collection":
        raise SourceFormatError(file, f"not BioC XML: root element <{root.tag}>, expected <collection>")
    for i, doc in enumerate(root.iter("document")):
        doc_id = (doc.findtext("id") or "").strip()
        if not doc_id:
            raise SourceFormatError(file, "missing", record=f"document {i + 1}", field="id")
        texts = [p.findtext("text") or "" for p in doc.iter("passage")]
        yield doc_id, " ".join(t for t in texts if t.strip())


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
            data = read_source_bytes(file)
            name = file.lower().removesuffix(".gz")
            if name.endswith(BIOC_EXTS):
                docs = bioc_documents(data, file)
            else:
                try:
                    docs = pubtator_documents(data.decode("utf-8-sig"), file)
                except UnicodeDecodeError as err:
                    raise SourceFormatError(file, f"not UTF-8 text ({err})") from None
            for doc_id, text in docs:
                text = clean_text(text)
                if not text:
                    self.drop(split, "empty_text")
                    continue
                if doc_id in seen:
                    self.drop(split, "duplicate_document")
                    continue
                seen.add(doc_id)
                yield SourceRecord(self.make_record(split, doc_id, text=text, corpus=storage.basename(file)), None)
