"""MedNLI (Romanov & Shivade 2018): natural language inference on MIMIC-III clinical sentences,
PhysioNet credentialed access.

Native layout (the PhysioNet release ``mednli/1.0.0``): ``mli_train_v1.jsonl``, ``mli_dev_v1.jsonl``,
``mli_test_v1.jsonl``; one JSON object per line with ``sentence1`` (premise), ``sentence2``
(hypothesis), ``gold_label`` (``entailment``/``contradiction``/``neutral``) and ``pairID`` (plus parse
trees, ignored). ``dev`` becomes our ``val``.

``label`` is the answer BiomedGPT is trained to give, as in OFA's MNLI task that the official
scripts reuse: entailment -> ``yes``, contradiction -> ``no``, neutral -> ``maybe``; the release's
word stays in ``gold_label``. Lines whose gold_label is ``-`` (no annotator consensus, an SNLI
convention) are dropped and counted, as the official preprocessing does.
"""

from __future__ import annotations

from typing import Iterator

from .base import Converter, SourceFormatError, SourceRecord
from .normalise import clean_text
from .tables import cell_text, read_rows, row_number

NATIVE_SPLITS = {"train": "train", "val": "dev", "test": "test"}
ANSWERS = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}


class MedNliConverter(Converter):
    name = "mednli"
    task = "nli"
    native_format = "MedNLI jsonl: mli_{train,dev,test}_v1.jsonl ({sentence1, sentence2, gold_label, pairID})"
    licence = "PhysioNet Credentialed Health Data License 1.5.0 (data use agreement; no redistribution)"
    access = "credentialed"
    file_roles = {split: f"mli_{native}_v1.jsonl" for split, native in NATIVE_SPLITS.items()}

    def splits(self) -> list[str]:
        return self.split_files_present(NATIVE_SPLITS, "MedNLI files")

    def native_split(self, split: str) -> str:
        return NATIVE_SPLITS.get(split, split)

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url(split)
        seen: dict[str, str] = {}
        for where, row in read_rows(file, "jsonl", skip=self.bad_row(split)):
            with self.guard(split, row_number(where)) as guard:
                gold = cell_text(row, "gold_label", file, where).lower()
                if gold == "-":
                    self.drop(split, "no_gold_label")
                    continue
                if gold not in ANSWERS:
                    raise SourceFormatError(file, f"expected one of {sorted(ANSWERS)} or '-', got {row['gold_label']!r}",
                                            record=where, field="gold_label")
                pair_id = guard.id = cell_text(row, "pairID", file, where, required=False) or f"{split}_{len(seen):06d}"
                if pair_id in seen:
                    raise SourceFormatError(file, f"duplicate pairID (also {seen[pair_id]})", record=where, field="pairID")
                seen[pair_id] = where
                premise = clean_text(cell_text(row, "sentence1", file, where))
                hypothesis = clean_text(cell_text(row, "sentence2", file, where))
                yield SourceRecord(self.make_record(
                    split, pair_id, premise=premise, hypothesis=hypothesis, label=ANSWERS[gold], gold_label=gold,
                ), None)
