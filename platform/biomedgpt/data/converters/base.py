"""What every converter shares: the record it yields, image references, source errors, file roles.

A converter reads one dataset in its native release format (files exactly as the public release
ships them) and yields, per split, :class:`SourceRecord` objects: the shard record (the ``json``
member: ``task``, ``dataset``, ``split``, ``id`` + the task's fields) and a reference to its image.
Images are referenced, not loaded, so that a build can plan shards from sizes alone and load the
bytes only when a shard is written (possibly in another process: references are small and
picklable).

Split names are canonical across datasets: ``train``, ``val``, ``test``. A converter maps its
release's names onto them (SLAKE ``validate``, ROCO ``validation``) and reports the native name.

Real releases are not clean (an empty answer in SLAKE's train.json, rows without images, duplicated
ids). A record a converter cannot use is skipped, not fatal: the converter wraps each record's
conversion in :meth:`Converter.guard`, and a :class:`SourceFormatError` about that one record becomes a
:class:`RecordDefect` (file, record index and id, field, reason) in :attr:`Converter.defects`. Errors
about a whole file (not found, invalid JSON, an unknown layout) still stop the converter. Whether the
defects are acceptable is the build's decision (its error budget, :mod:`..error_budget`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

from .. import storage

CANONICAL_SPLITS = ("train", "val", "test")
MISSING_IMAGE_POLICIES = ("error", "skip")


class SourceFormatError(ValueError):
    """A source file does not match its dataset's native format.

    The message names the file, the record (index and id where known) and the field, e.g.
    ``.../trainset.json: record 12 (qid 57): field 'answer_type': expected CLOSED or OPEN, got 'MAYBE'``.
    """

    def __init__(self, file: str, message: str, *, record: str | None = None, field: str | None = None):
        self.file = file
        self.record = record
        self.field = field
        self.message = message
        parts = [str(file)]
        if record is not None:
            parts.append(record)
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join(parts + [message]))

    def __reduce__(self):
        # keyword-only fields: the default exception pickling (cls(*args)) would lose them; shard
        # writing raises these inside Ray tasks, whose errors travel back to the driver pickled
        return _rebuild_source_format_error, (type(self), self.file, self.message, self.record, self.field)


def _rebuild_source_format_error(cls, file, message, record, field):
    return cls(file, message, record=record, field=field)


class MissingImageError(SourceFormatError):
    """A record's image is not in the release (one record's defect, wherever the message puts the record)."""


class UnusableImageError(SourceFormatError):
    """An image whose content cannot become a shard image (not a readable DICOM, no pixel data, pixels of an
    unsupported layout): a defect of the record it belongs to, found when the shard is written."""


def is_record_error(err: BaseException) -> bool:
    """Whether a converter error is about one record (skippable) rather than a whole file."""
    return isinstance(err, (MissingImageError, UnusableImageError)) or (
        isinstance(err, SourceFormatError) and err.record is not None)


@dataclass(frozen=True)
class RecordDefect:
    """A source record skipped because it cannot be used: where it is and why.

    ``record`` is the converter's own name for the place (``record 12 (qid 57)``, ``line 3``,
    ``test[4] (CXR1)``); ``index`` its position in the file (0-based records, or the line number of text
    files) and ``id`` its id, when the converter knows them."""

    file: str
    reason: str
    record: str | None = None
    index: int | None = None
    id: str | None = None
    field: str | None = None

    def describe(self) -> str:
        parts = [self.file]
        if self.record:
            parts.append(self.record)
        elif self.id:
            parts.append(f"id {self.id}")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts + [self.reason])

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RecordDefect":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_error(cls, err: SourceFormatError, *, index: int | None = None, record_id: str | None = None
                   ) -> "RecordDefect":
        return cls(file=str(err.file), reason=err.message, record=err.record, index=index, id=record_id,
                   field=err.field)


class RecordGuard:
    """``with converter.guard(split, index) as rec:`` around one source record: a record-level
    :class:`SourceFormatError` raised inside skips the record (a :class:`RecordDefect`); anything else
    propagates (with ``whole_file``, every :class:`SourceFormatError`: the record is a file of its own). Set
    ``rec.id`` (and ``rec.split`` when the record's split is only known from its
    fields) as soon as they are known, so that the defect names them."""

    def __init__(self, converter: "Converter", split: str | None, index: int | None, whole_file: bool = False):
        self.converter = converter
        self.split = split
        self.index = index
        self.whole_file = whole_file
        self.id: str | None = None

    def __enter__(self) -> "RecordGuard":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not (is_record_error(exc) or (self.whole_file and isinstance(exc, SourceFormatError))):
            return False
        self.converter.skip_record(self.split, RecordDefect.from_error(exc, index=self.index, record_id=self.id))
        return True


# --- image references ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileImage:
    """An image file at ``url`` of ``size`` bytes (from a directory listing)."""

    url: str
    size: int

    def read(self) -> bytes:
        try:
            return storage.read_bytes(self.url)
        except FileNotFoundError:
            raise SourceFormatError(self.url, "image file disappeared after the source was listed") from None

    @property
    def name(self) -> str:
        return self.url


@functools.lru_cache(maxsize=2)
def _load_npz(url: str) -> dict[str, Any]:
    import numpy as np

    with storage.open_url(url, "rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def load_npz(url: str) -> dict[str, Any]:
    """All arrays of an ``.npz`` file (cached per process: MedMNIST images are read many times)."""
    return _load_npz(url)


def encode_png(array) -> bytes:
    """Lossless PNG of a uint8 image array (H, W) grayscale or (H, W, 3) RGB; deterministic bytes."""
    from PIL import Image

    import numpy as np

    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        image = Image.fromarray(array)  # uint8 (H, W) -> mode "L"
    elif array.ndim == 3 and array.shape[2] in (1, 3, 4):
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    else:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image array, got shape {tuple(array.shape)}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@dataclass(frozen=True)
class ArrayImage:
    """Image ``index`` of array ``array`` in the ``.npz`` at ``url``, encoded as PNG when read."""

    url: str
    array: str
    index: int

    def read(self) -> bytes:
        try:
            return encode_png(load_npz(self.url)[self.array][self.index])
        except ValueError as err:
            raise UnusableImageError(self.url, str(err), field=f"{self.array}[{self.index}]") from None

    @property
    def size(self) -> int:
        return len(self.read())

    @property
    def name(self) -> str:
        return f"{self.url}[{self.array}][{self.index}]"


ImageRef = FileImage | ArrayImage


@dataclass(frozen=True)
class SourceRecord:
    """One converted record: the shard record (``json`` member) and its image (None: text only)."""

    record: dict[str, Any]
    image: ImageRef | None

    @property
    def id(self) -> str:
        return self.record["id"]


class ImageIndex:
    """Sizes of every file under an images directory, from one listing (cheap on object stores)."""

    def __init__(self, url: str):
        self.url = url
        self._files: dict[str, int] | None = None

    @property
    def files(self) -> dict[str, int]:
        if self._files is None:
            self._files = storage.list_files(self.url)
        return self._files

    def get(self, relpath: str) -> FileImage | None:
        relpath = relpath.lstrip("/")
        size = self.files.get(relpath)
        return None if size is None else FileImage(storage.join(self.url, relpath), size)


# --- converter base ------------------------------------------------------------------------------


class Converter(abc.ABC):
    """Reads one dataset's native release and yields :class:`SourceRecord` per split.

    Subclasses set the class attributes and implement :meth:`splits` and :meth:`records`.
    ``files`` overrides where the converter looks for each of its file roles (``file_roles``:
    role -> default path relative to ``source``), for releases that were renamed or re-packaged.
    ``on_missing_image``: ``"error"`` (default): a record whose image is missing is a defect (skipped,
    named in :attr:`defects`, counted against the build's error budget); ``"skip"``: such records are
    dropped on purpose, without limit, and counted in :attr:`skipped` (for a release known to lack some
    images).

    Subclasses convert each source record inside ``with self.guard(split, index) as rec:`` so that a
    record they cannot use is skipped and named (see the module docstring).
    """

    name: ClassVar[str]
    task: ClassVar[str]
    native_format: ClassVar[str]
    licence: ClassVar[str]
    access: ClassVar[str] = "open"
    file_roles: ClassVar[Mapping[str, str]] = {}
    #: True for converters of a format rather than of one dataset (OFA TSV, summarisation tables,
    #: DICOM folders): their records take the dataset name from ``dataset_name`` (the dataset spec).
    generic: ClassVar[bool] = False
    #: The dataset name records and shard paths use when it differs from ``name`` (set by the builder
    #: from the dataset spec, or by a generic converter's ``dataset`` option).
    dataset_name: str | None = None

    def __init__(self, source: str, files: Mapping[str, str] | None = None, *, on_missing_image: str = "error"):
        self.source = str(source).rstrip("/") if "://" in str(source) else str(source)
        unknown = sorted(set(files or {}) - set(self.file_roles))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown file role(s) {unknown}; this converter reads {sorted(self.file_roles)}")
        self.files = {**self.file_roles, **(files or {})}
        if on_missing_image not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"on_missing_image must be one of {MISSING_IMAGE_POLICIES}, got {on_missing_image!r}")
        self.on_missing_image = on_missing_image
        self.skipped: dict[str, list[str]] = {}
        self.dropped: dict[str, dict[str, int]] = {}
        #: Records skipped as unusable, per split (None: records whose split could not be told), keyed by
        #: place so that reading a split twice does not count them twice.
        self.defects: dict[str | None, dict[tuple, RecordDefect]] = {}

    # what a subclass provides
    @abc.abstractmethod
    def splits(self) -> list[str]:
        """Canonical names of the splits present in the source, in train/val/test order."""

    @abc.abstractmethod
    def records(self, split: str) -> Iterator[SourceRecord]:
        """The records of one split, in a deterministic order."""

    def native_split(self, split: str) -> str:
        """The release's own name for a canonical split (default: the same)."""
        return split

    @property
    def dataset(self) -> str:
        """Name used for shard paths and the ``dataset`` field."""
        return self.dataset_name or self.name

    # helpers for subclasses
    def url(self, role: str) -> str:
        """URL of a file role (its default path or the ``files`` override) under the source."""
        rel = self.files[role]
        return rel if "://" in rel or rel.startswith("/") else storage.join(self.source, rel)

    def make_record(self, split: str, record_id: str, **fields: Any) -> dict[str, Any]:
        return {"task": self.task, "dataset": self.dataset, "split": split, "id": record_id, **fields}

    def split_files_present(self, native_splits: Mapping[str, str], what: str) -> list[str]:
        """The canonical splits (keys of `native_splits`, also their file roles) whose files exist;
        none at all is an error naming `what` and the files expected."""
        present = [s for s in native_splits if storage.exists(self.url(s))]
        if not present:
            expected = ", ".join(self.files[s] for s in native_splits)
            raise SourceFormatError(self.source, f"no {what} found (expected {expected})")
        return sort_splits(present)

    def require_split(self, split: str) -> None:
        if split not in self.splits():
            raise ValueError(f"{self.name}: no split {split!r} in {self.source} (present: {self.splits()})")

    def missing_image(self, split: str, file: str, image: str, *, record: str | None = None,
                      field: str | None = None) -> None:
        """Apply the missing-image policy to the record at ``file``/``record`` that names ``image``: raise
        :class:`MissingImageError` (inside :meth:`guard`: the record becomes a defect), or note the record
        as skipped on purpose."""
        if self.on_missing_image == "error":
            raise MissingImageError(
                file, f"image {image!r} not found (use on_missing_image='skip' to drop such records)",
                record=record, field=field)
        self.skipped.setdefault(split, []).append(image)

    def guard(self, split: str | None, index: int | None = None, *, whole_file: bool = False) -> RecordGuard:
        """Context for converting one source record (see :class:`RecordGuard`). ``whole_file``: the record
        is a file of its own (one XML annotation per image), so any error about that file is its defect."""
        return RecordGuard(self, split, index, whole_file)

    def skip_record(self, split: str | None, defect: RecordDefect) -> None:
        """Note a record that cannot be used (the guard calls this; converters may too)."""
        self.defects.setdefault(split, {})[(defect.file, defect.record, defect.index, defect.field)] = defect

    def bad_row(self, split: str | None):
        """A ``skip`` callback for :func:`.tables.read_rows`: an unreadable row becomes a defect of ``split``."""

        def skip(err: SourceFormatError, number: int) -> None:
            self.skip_record(split, RecordDefect.from_error(err, index=number or None))

        return skip

    def defects_of(self, split: str) -> list[RecordDefect]:
        """The records of ``split`` skipped as unusable, with those whose split could not be told."""
        return list(self.defects.get(split, {}).values()) + list(self.defects.get(None, {}).values())

    def drop(self, split: str, reason: str) -> None:
        """Count a source record left out on purpose (e.g. a report without a FINDINGS section); the
        counts per reason are written into the split's manifest (``notes.dropped``)."""
        counts = self.dropped.setdefault(split, {})
        counts[reason] = counts.get(reason, 0) + 1


def vqa_fields(raw: Mapping[str, Any], file: str, where: str) -> tuple[str, Any, str, str]:
    """(question, raw answer, normalised answer, answer type CLOSED|OPEN) of a VQA-RAD/SLAKE-style record;
    an empty question or answer or an unknown answer type is an error naming the record and field."""
    from .normalise import clean_text, normalise_answer

    question = clean_text(require(raw, "question", str, file, where))
    if not question:
        raise SourceFormatError(file, "empty question", record=where, field="question")
    answer_raw = require(raw, "answer", (str, int, float), file, where)
    answer = normalise_answer(answer_raw)
    if not answer:
        raise SourceFormatError(file, "empty answer", record=where, field="answer")
    answer_type = clean_text(require(raw, "answer_type", str, file, where)).upper()
    if answer_type not in ("CLOSED", "OPEN"):
        raise SourceFormatError(file, f"expected CLOSED or OPEN, got {raw['answer_type']!r}",
                                record=where, field="answer_type")
    return question, answer_raw, answer, answer_type


def sort_splits(splits) -> list[str]:
    """Canonical split order: train, val, test, then anything else alphabetically."""
    order = {name: i for i, name in enumerate(CANONICAL_SPLITS)}
    return sorted(set(splits), key=lambda s: (order.get(s, len(order)), s))


def stable_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from a key: reproducible pseudo-random splits that do not
    change when records are added or reordered."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def load_json(url: str) -> Any:
    """Parse a JSON file; errors name the file, line and column."""
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        raise SourceFormatError(url, "file not found") from None
    except UnicodeDecodeError as err:
        raise SourceFormatError(url, f"not UTF-8 text ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceFormatError(url, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def require(obj: Any, key: str, types: type | tuple[type, ...], file: str, record: str) -> Any:
    """``obj[key]`` checked to be of ``types``; a :class:`SourceFormatError` naming file, record and field."""
    if not isinstance(obj, dict):
        raise SourceFormatError(file, f"expected a JSON object, got {type(obj).__name__}", record=record)
    if key not in obj:
        raise SourceFormatError(file, "missing", record=record, field=key)
    value = obj[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise SourceFormatError(file, f"expected {names}, got {type(value).__name__} {value!r}", record=record, field=key)
    return value
