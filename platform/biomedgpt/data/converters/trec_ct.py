"""TREC 2022 Clinical Trials track (Roberts et al. 2022): patient descriptions judged against
ClinicalTrials.gov trials, as patient-trial matching (NLI-style) records.

Native layout (the track's files as NIST and ClinicalTrials.gov distribute them):

- ``topics2022.xml``: ``<topics task="2022 TREC Clinical Trials"><topic number="1">free-text patient
  description</topic>...</topics>``;
- ``qrels2022.txt``: whitespace-separated ``topic 0 NCTid relevance`` lines, relevance 0 not relevant,
  1 excluded, 2 eligible;
- the track's ClinicalTrials.gov snapshot: one ``NCT<id>.xml`` per trial (``<clinical_study>`` with
  ``<eligibility><criteria><textblock>``, ``<gender>``, ``<minimum_age>``, ``<maximum_age>``), in
  any folder layout under ``trials/`` (the release zips nest them as ``NCT0000xxxx/NCT00000102.xml``).

Records: ``premise`` = the patient description, ``hypothesis`` = the trial's eligibility criteria
(the criteria text block followed by its gender and age limits), ``label`` = ``eligible`` /
``excluded`` / ``irrelevant`` (the qrel's ``relevance`` kept as well), id ``<topic>_<NCTid>``.

The paper publishes neither its pairing of topic and trial text nor its split, so both are our
choice: the trial text above, and a topic-disjoint split by a stable hash of the topic number
(``test_fraction`` of the topics, default 0.2, go to ``test``; option ``val_fraction`` adds a
``val`` split). Judged trials missing from the snapshot or without criteria are dropped and counted.

Defects (skipped and named, ``Converter.guard``; the build's error budget decides whether there are too
many): a ``<topic>`` without a ``number``, with an empty description, or whose number another topic
has too (neither description is then used: the judgements could be about either) is left out
(``topics2022.xml: topic element 3 (number 7): empty patient description``, index = the topic's
0-based position), in the split its number hashes to (no split when it has no number). Judgements of
such a topic are dropped and counted (``topic_unusable``); a judgement naming a topic that is not in
the topics file at all, judged twice, of an unreadable trial record, or an unreadable qrels line is a
defect of its own (``qrels2022.txt: line 12: field 'topic': topic 2 is not in topics2022.xml``). An
unreadable topics file, or one without any usable topic, still stops the converter.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Iterator

from .. import storage
from .base import Converter, SourceFormatError, SourceRecord, sort_splits, stable_fraction
from .normalise import clean_text
from .tables import read_source_bytes, read_text_file, row_number

LABELS = {"0": "irrelevant", "1": "excluded", "2": "eligible"}


def parse_xml(url: str) -> ET.Element:
    """The root element of an XML file; errors name the file, line and column."""
    data = read_source_bytes(url)
    try:
        return ET.fromstring(data)
    except ET.ParseError as err:
        line, col = err.position
        raise SourceFormatError(url, f"invalid XML at line {line} column {col}: {err}") from None


def element_text(element: ET.Element | None) -> str:
    """All the text inside an element (children included), whitespace collapsed."""
    return clean_text(" ".join(element.itertext())) if element is not None else ""


def trial_criteria(root: ET.Element) -> str:
    """A ClinicalTrials.gov record's eligibility as one text: criteria, then gender and age limits."""
    eligibility = root.find("eligibility")
    if eligibility is None:
        return ""
    criteria = element_text(eligibility.find("criteria/textblock"))
    if not criteria:
        return ""
    limits = []
    for tag, label in (("gender", "Gender"), ("minimum_age", "Minimum age"), ("maximum_age", "Maximum age")):
        value = element_text(eligibility.find(tag))
        if value:
            limits.append(f"{label}: {value}.")
    return " ".join([criteria] + limits)


class Trec2022Converter(Converter):
    name = "trec_2022"
    task = "nli"
    native_format = ("TREC 2022 Clinical Trials: topics2022.xml + qrels2022.txt (topic 0 NCTid 0/1/2) + the "
                     "ClinicalTrials.gov snapshot (NCT<id>.xml under trials/)")
    licence = "Topics and judgements published by NIST for research; ClinicalTrials.gov records are public domain"
    access = "open"
    file_roles = {"topics": "topics2022.xml", "qrels": "qrels2022.txt", "trials": "trials"}

    def __init__(self, source: str, files=None, *, test_fraction: float = 0.2, val_fraction: float = 0.0,
                 on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
            raise ValueError(f"trec_2022: need 0 < test_fraction, 0 <= val_fraction, sum < 1; got {test_fraction}, "
                             f"{val_fraction}")
        self.test_fraction, self.val_fraction = test_fraction, val_fraction
        self._topics: dict[str, str] | None = None
        #: Topics left out as defects: (0-based position, number or None, the error naming them).
        self._bad_topics: list[tuple[int, str | None, SourceFormatError]] = []
        #: Numbers of the topics left out (their judgements are dropped as ``topic_unusable``).
        self._unusable_topics: set[str] = set()
        self._trials: dict[str, str] | None = None

    def split_of(self, topic: str) -> str:
        f = stable_fraction(f"trec_2022:topic:{topic}")
        if f < self.test_fraction:
            return "test"
        if f < self.test_fraction + self.val_fraction:
            return "val"
        return "train"

    def topics(self) -> dict[str, str]:
        """topic number -> patient description, of the usable topics; the others are defects (see the
        module docstring), named through :meth:`guard` in the split their number hashes to."""
        if self._topics is None:
            file = self.url("topics")
            if not storage.exists(file):
                raise SourceFormatError(file, "topics file not found")
            out: dict[str, str] = {}
            first: dict[str, str] = {}  # number -> where its first topic is
            bad: list[tuple[int, str | None, SourceFormatError]] = []
            unusable: set[str] = set()
            n = 0
            for i, topic in enumerate(parse_xml(file).iter("topic")):
                n += 1
                number = (topic.get("number") or "").strip() or None
                where = f"topic element {i + 1}" + (f" (number {number})" if number else "")
                if number is None:
                    bad.append((i, None, SourceFormatError(file, "missing", record=where, field="number")))
                    continue
                if number in first:
                    bad.append((i, number, SourceFormatError(
                        file, f"duplicate topic number (also {first[number]}): neither description is used",
                        record=where, field="number")))
                    out.pop(number, None)
                    unusable.add(number)
                    continue
                first[number] = f"topic element {i + 1}"
                text = element_text(topic)
                if not text:
                    bad.append((i, number, SourceFormatError(file, "empty patient description", record=where)))
                    unusable.add(number)
                    continue
                out[number] = text
            if not out:
                reasons = "; ".join(str(err) for _, _, err in bad[:3])
                raise SourceFormatError(file, f"no usable <topic> elements ({n} found{': ' if reasons else ''}"
                                              f"{reasons})")
            self._topics, self._bad_topics, self._unusable_topics = out, bad, unusable
            present = {self.split_of(number) for number in out}
            for i, number, err in bad:
                split = self.split_of(number) if number is not None else None
                with self.guard(split if split in present else None, i) as guard:
                    guard.id = number
                    raise err
        return self._topics

    def qrels(self, skip=None) -> Iterator[tuple[str, str, str, str]]:
        """(where, topic, NCT id, relevance) per judgement line; ``skip(error, line number)``: called for an
        unreadable line, which is then left out (default: the error is raised)."""
        file = self.url("qrels")
        for number, line in enumerate(read_text_file(file).splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            where = f"line {number}"
            error = None
            if len(parts) != 4:
                error = SourceFormatError(file, f"expected 'topic 0 NCTid relevance', got {line.strip()!r}", record=where)
            elif parts[3] not in LABELS:
                error = SourceFormatError(file, f"expected 0, 1 or 2, got {parts[3]!r}", record=where, field="relevance")
            if error is not None:
                if skip is None:
                    raise error
                skip(error, number)
                continue
            topic, _, nct, rel = parts
            yield where, topic, nct, rel

    def trials(self) -> dict[str, str]:
        """NCT id -> URL of its XML record, from one listing of the snapshot folder."""
        if self._trials is None:
            root = self.url("trials")
            self._trials = {}
            for rel in storage.list_files(root):
                name = storage.basename(rel)
                if name.upper().startswith("NCT") and name.lower().endswith(".xml"):
                    self._trials[name[:-4].upper()] = storage.join(root, rel)
        return self._trials

    def splits(self) -> list[str]:
        if not storage.exists(self.url("qrels")):
            raise SourceFormatError(self.url("qrels"), "qrels file not found")
        return sort_splits({self.split_of(topic) for topic in self.topics()})

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        topics, trials = self.topics(), self.trials()
        file = self.url("qrels")
        criteria: dict[str, str | None] = {}  # NCT id -> eligibility text (None: not in the snapshot)
        seen: dict[str, str] = {}
        present = self.splits()
        for where, topic, nct, rel in self.qrels(skip=self.bad_row(None)):
            topic_split = self.split_of(topic)
            if topic_split in present and topic_split != split:
                continue
            # a judgement is its topic's split's defect (of no split when that split has no usable topic)
            with self.guard(topic_split if topic_split in present else None, row_number(where)) as guard:
                record_id = guard.id = f"{topic}_{nct}"
                if topic in self._unusable_topics:  # the topic is a defect already: its judgements go with it
                    if topic_split == split:
                        self.drop(split, "topic_unusable")
                    continue
                if topic not in topics:
                    raise SourceFormatError(file, f"topic {topic} is not in {self.files['topics']}", record=where,
                                            field="topic")
                if record_id in seen:
                    raise SourceFormatError(file, f"judged twice (also {seen[record_id]})", record=where)
                seen[record_id] = where
                if nct not in criteria:
                    url = trials.get(nct.upper())
                    try:
                        criteria[nct] = None if url is None else trial_criteria(parse_xml(url))
                    except SourceFormatError as err:  # an unreadable trial record: this judgement's defect
                        raise SourceFormatError(file, f"trial {nct}: {err}", record=where, field="trial") from None
                text = criteria[nct]
                if text is None:
                    self.drop(split, "trial_not_in_snapshot")
                    continue
                if not text:
                    self.drop(split, "no_eligibility_criteria")
                    continue
                yield SourceRecord(self.make_record(
                    split, record_id, premise=topics[topic], hypothesis=text, label=LABELS[rel], relevance=int(rel),
                    topic=topic, trial=nct,
                ), None)
