"""WebDataset tar shards and their per-split manifest.

A shard is a plain POSIX (ustar) tar file. Each sample is a group of consecutive members sharing
one key (``<key>.json``, then ``<key>.jpg`` or ``<key>.png``, then any extras), which is exactly what
``tar``, the ``webdataset`` library and ``ray.data.read_webdataset`` expect. Shards of one split live
at ``<out>/<dataset>/<split>/<dataset>-<split>-<n:06d>.tar`` beside ``manifest.json``.

Output is deterministic: member order, mtime, uid/gid, owner names and permissions are fixed and
JSON is written with a fixed layout, so rebuilding the same input gives byte-identical shards (same
sha256). That is what lets a restarted build keep the shards it already wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Mapping

from PIL import Image, UnidentifiedImageError

from . import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Production shards are ~100-500 MB (DESIGN.md); these are the defaults when nothing is configured.
DEFAULT_SHARD_MAX_BYTES = 256 * 2**20
DEFAULT_SHARD_MAX_SAMPLES = 100_000
IMAGE_EXTENSIONS = ("jpg", "png")
ACCESS_CLASSES = ("open", "credentialed")

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to a multiple of this (RECORDSIZE)
_MEMBER_MTIME = 0  # fixed so rebuilt shards are byte-identical
_MEMBER_MODE = 0o644
_MAX_KEY_LENGTH = 90  # ustar names are at most 100 bytes, leave room for ".json"/".codes.npy"
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class ShardError(ValueError):
    """A shard or manifest is missing, malformed or does not match its manifest."""


# --- names ---------------------------------------------------------------------------------------


def shard_name(dataset: str, split: str, index: int) -> str:
    """File name of shard ``index`` of a split: ``{dataset}-{split}-{index:06d}.tar``."""
    return f"{dataset}-{split}-{index:06d}.tar"


#: A dataset or split name: one path segment, never ``.`` or ``..`` (it becomes a folder of the shard root).
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def split_url(out: str, dataset: str, split: str) -> str:
    """The directory holding one split's shards and manifest: ``<out>/<dataset>/<split>``. The dataset and
    the split must be plain names (one path segment): a path there would lead out of ``out``."""
    for what, name in (("dataset", dataset), ("split", split)):
        if not isinstance(name, str) or not _PLAIN_NAME.match(name):
            raise ShardError(f"{out}: {what} {name!r} is not a name (one path segment of letters, digits, '_', '.', "
                             f"'-'): shards live at <root>/<dataset>/<split>/, so a path there would lead elsewhere")
    return storage.join(out, dataset, split)


def shard_name_problem(name: str) -> str | None:
    """Why a manifest's shard name does not name a file beside the manifest, or None. A manifest lists the
    files of its own folder only: no ``/`` or ``\\``, no URL, not ``.``, ``..`` or empty."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return ("a shard is named by a file name in the manifest's own folder (no '/', '\\', URL, '.' or '..'): "
                "a manifest cannot point the stream at files elsewhere")
    return None


def make_key(dataset: str, record_id: str) -> str:
    """The WebDataset key of a record: ``<dataset>-<id>`` restricted to ``[A-Za-z0-9_-]``.

    WebDataset splits member names at the first dot, so keys must not contain dots (or slashes,
    which tar would turn into directories). When the id had to be changed, a short hash of the
    original id is appended so that distinct ids stay distinct.
    """
    raw = f"{dataset}-{record_id}"
    key = _KEY_SAFE.sub("_", raw)
    if key != raw or len(key) > _MAX_KEY_LENGTH:
        digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
        key = f"{key[: _MAX_KEY_LENGTH - 9]}-{digest}"
    return key


# --- samples -------------------------------------------------------------------------------------


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The ``json`` member of a sample: UTF-8, compact, keys in the record's own order."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sniff_image_format(data: bytes) -> str | None:
    """``"jpg"`` or ``"png"`` from the file signature, None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def image_as_stored(data: bytes, source: str = "<image>") -> tuple[bytes, str]:
    """``(bytes, ext)`` for a shard: JPEG and PNG are kept byte for byte; other formats (GIF, BMP,
    TIFF, ...) are re-encoded losslessly as PNG. ``source`` names the file in errors."""
    ext = sniff_image_format(data)
    if ext is not None:
        return data, ext
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
                image = image.convert("RGB")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
    except (UnidentifiedImageError, OSError) as err:
        raise ShardError(f"{source}: not a readable image ({err})") from None
    return buf.getvalue(), "png"


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its key, the record (the ``json`` member, a mapping or its encoded
    bytes), the image and extras.

    ``image_ext`` is ``"jpg"`` or ``"png"``; ``extras`` maps further extensions (e.g.
    ``"codes.npy"``) to their bytes.
    """

    key: str
    record: Mapping[str, Any] | bytes
    image: bytes | None = None
    image_ext: str | None = None
    extras: Mapping[str, bytes] = field(default_factory=dict)

    def members(self) -> list[tuple[str, bytes]]:
        """The tar members of this sample, in the order they are written."""
        if "." in self.key or "/" in self.key or not self.key:
            raise ShardError(f"sample key {self.key!r}: keys must be non-empty and contain no '.' or '/'")
        record = self.record if isinstance(self.record, bytes) else encode_record(self.record)
        out = [(f"{self.key}.json", record)]
        if self.image is not None:
            if self.image_ext not in IMAGE_EXTENSIONS:
                raise ShardError(f"sample {self.key}: image_ext must be one of {IMAGE_EXTENSIONS}, got {self.image_ext!r}")
            out.append((f"{self.key}.{self.image_ext}", self.image))
        for ext in sorted(self.extras):
            out.append((f"{self.key}.{ext}", self.extras[ext]))
        return out


def tar_member_size(payload_bytes: int) -> int:
    """Bytes one member occupies in a ustar archive: a header block plus the padded payload."""
    return _TAR_BLOCK + -(-payload_bytes // _TAR_BLOCK) * _TAR_BLOCK


def tar_archive_size(member_bytes: int) -> int:
    """Size of an archive whose members occupy ``member_bytes``: end blocks, padded to a record."""
    raw = member_bytes + 2 * _TAR_BLOCK
    return -(-raw // _TAR_RECORD) * _TAR_RECORD


class ShardBudget:
    """Decides where one shard ends: at ``max_samples`` samples or before ``max_bytes`` is exceeded.

    A sample larger than ``max_bytes`` on its own still gets a shard (alone). Used both by the
    streaming :class:`ShardWriter` and by the build planner, so both cut shards identically.
    """

    def __init__(self, max_samples: int, max_bytes: int):
        if max_samples < 1:
            raise ValueError(f"shard_max_samples must be >= 1, got {max_samples}")
        if max_bytes < _TAR_RECORD:
            raise ValueError(f"shard_max_bytes must be >= {_TAR_RECORD}, got {max_bytes}")
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.samples = 0
        self.member_bytes = 0

    def fits(self, sample_member_bytes: int) -> bool:
        """Whether a sample occupying ``sample_member_bytes`` still belongs in the current shard."""
        if self.samples == 0:
            return True
        if self.samples >= self.max_samples:
            return False
        return tar_archive_size(self.member_bytes + sample_member_bytes) <= self.max_bytes

    def add(self, sample_member_bytes: int) -> None:
        self.samples += 1
        self.member_bytes += sample_member_bytes

    def reset(self) -> None:
        self.samples = 0
        self.member_bytes = 0


def input_digest_update(digest: "hashlib._Hash", key: str, record_json: bytes, image_bytes: int | None) -> None:
    """Feed one sample into a shard's input digest (key, record JSON, image size).

    The digest identifies what a shard was built from without reading the images again; a restarted
    build keeps an existing shard only when its manifest's ``input_sha256`` equals the new plan's.
    """
    digest.update(key.encode("utf-8") + b"\0")
    digest.update(len(record_json).to_bytes(8, "little") + record_json)
    digest.update((-1 if image_bytes is None else image_bytes).to_bytes(8, "little", signed=True))


# --- writing one shard ---------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: IO[bytes]):
        super().__init__()
        self._target = target
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        data = bytes(data)
        self._target.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes


def _write_tar(target: IO[bytes], samples: Iterable[ShardSample]) -> tuple[int, int, str, str]:
    """Write samples as a deterministic tar; returns (samples, bytes, sha256, input_sha256)."""
    sink = _HashingWriter(target)
    inputs = hashlib.sha256()
    count = 0
    seen: set[str] = set()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            if sample.key in seen:
                raise ShardError(f"duplicate sample key {sample.key!r} in one shard")
            seen.add(sample.key)
            members = sample.members()
            input_digest_update(inputs, sample.key, members[0][1], None if sample.image is None else len(sample.image))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = _MEMBER_MTIME
                info.mode = _MEMBER_MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(payload))
            count += 1
    return count, sink.bytes, sink.sha256.hexdigest(), inputs.hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard in a manifest: file name, sample count, size in bytes, sha256 of the file, and the
    digest of the inputs it was built from (see :func:`input_digest_update`). ``skipped``: the planned
    records left out when the shard was written because their image could not be used (JSON objects
    naming file, id and reason; kept with the shard so that a restarted build still counts them)."""

    name: str
    samples: int
    bytes: int
    sha256: str
    input_sha256: str = ""
    skipped: tuple[dict[str, Any], ...] = field(default=(), hash=False)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skipped"] = [dict(s) for s in self.skipped]
        if not self.skipped:
            del out["skipped"]
        return out


def write_shard(url: str, samples: Iterable[ShardSample], *, input_sha256: str | None = None) -> ShardEntry:
    """Write one shard to ``url`` (local path, ``file://`` or ``s3://``) and describe it.

    Local shards appear atomically (written to a ``.partial`` file, then renamed); on S3 the object
    appears when the upload completes and an interrupted upload is discarded. ``input_sha256``
    overrides the digest computed from the samples (the build planner passes the digest of its plan,
    which uses source image sizes).
    """
    name = storage.basename(url)
    if storage.is_local(url):
        path = storage.local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as f:
                count, nbytes, sha, inputs = _write_tar(f, samples)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    else:
        fs, path_in_fs = storage.filesystem(url)
        f = fs.open(path_in_fs, "wb")
        try:
            count, nbytes, sha, inputs = _write_tar(f, samples)
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()
            raise
        f.close()
    return ShardEntry(name=name, samples=count, bytes=nbytes, sha256=sha, input_sha256=input_sha256 or inputs)


def file_sha256(url: str, chunk: int = 8 * 2**20) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of the file at ``url``, read in chunks."""
    digest = hashlib.sha256()
    total = 0
    with storage.open_url(url, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
            total += len(block)
    return digest.hexdigest(), total


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as ``{"__key__": key, "<ext>": bytes, ...}``, in file order."""
    with storage.open_url(url, "rb") as f:
        try:
            yield from iter_tar_samples(f)
        except ShardError as err:
            raise ShardError(f"{url}: {err}") from None


def iter_tar_samples(stream: Any) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar stream as ``{"__key__": key, "<ext>": bytes}`` (members grouped by
    key, the part of the name before the first dot), in file order. A sample is yielded only once the
    next one starts or the archive ends, so a tar cut inside a sample never yields that sample."""
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            prefix = member.name[: len(member.name) - len(base)]
            if "." not in base:
                raise ShardError(f"member {member.name!r} has no extension")
            key, ext = base.split(".", 1)
            key = prefix + key
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current


# --- manifest ------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """``manifest.json`` of one split: what was built, from what, under which licence.

    ``complete`` is False while a build is still adding shards (a restarted build continues it).
    ``native_split`` is the split's name in the source release (e.g. SLAKE's ``validate``).
    """

    dataset: str
    split: str
    task: str
    source: str
    licence: str
    access: str
    shards: list[ShardEntry] = field(default_factory=list)
    native_split: str = ""
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES
    complete: bool = True
    schema_version: int = SCHEMA_VERSION
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "split": self.split,
            "native_split": self.native_split or self.split,
            "task": self.task,
            "source": self.source,
            "licence": self.licence,
            "access": self.access,
            "shard_max_samples": self.shard_max_samples,
            "shard_max_bytes": self.shard_max_bytes,
            "complete": self.complete,
            "totals": {"shards": len(self.shards), "samples": self.samples, "bytes": self.bytes},
            "shards": [s.to_json() for s in self.shards],
            "notes": self.notes,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest.json") -> "Manifest":
        """Parse and check a manifest; errors name ``where`` and the field."""

        def need(obj: Any, key: str, types: type | tuple[type, ...], path: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise ShardError(f"{where}: field '{path}': missing")
            value = obj[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
                raise ShardError(f"{where}: field '{path}': expected {_type_names(types)}, got {type(value).__name__}")
            return value

        version = need(data, "schema_version", int, "schema_version")
        if version != SCHEMA_VERSION:
            raise ShardError(f"{where}: field 'schema_version': this platform reads version {SCHEMA_VERSION}, got {version}")
        shards = []
        for i, entry in enumerate(need(data, "shards", list, "shards")):
            path = f"shards[{i}]"
            name = need(entry, "name", str, f"{path}.name")
            problem = shard_name_problem(name)
            if problem:
                raise ShardError(f"{where}: field '{path}.name': {name!r}: {problem}")
            shards.append(ShardEntry(
                name=name,
                samples=need(entry, "samples", int, f"{path}.samples"),
                bytes=need(entry, "bytes", int, f"{path}.bytes"),
                sha256=need(entry, "sha256", str, f"{path}.sha256"),
                input_sha256=entry.get("input_sha256", "") if isinstance(entry, dict) else "",
                skipped=tuple(dict(s) for s in entry.get("skipped", []) if isinstance(s, dict)),
            ))
        manifest = cls(
            dataset=need(data, "dataset", str, "dataset"),
            split=need(data, "split", str, "split"),
            task=need(data, "task", str, "task"),
            source=need(data, "source", str, "source"),
            licence=need(data, "licence", str, "licence"),
            access=need(data, "access", str, "access"),
            shards=shards,
            native_split=data.get("native_split", ""),
            shard_max_samples=need(data, "shard_max_samples", int, "shard_max_samples"),
            shard_max_bytes=need(data, "shard_max_bytes", int, "shard_max_bytes"),
            complete=need(data, "complete", bool, "complete"),
            notes=data.get("notes") or {},
        )
        totals = need(data, "totals", dict, "totals")
        for key, actual in (("shards", len(shards)), ("samples", manifest.samples), ("bytes", manifest.bytes)):
            if totals.get(key) != actual:
                raise ShardError(f"{where}: field 'totals.{key}': {totals.get(key)!r} disagrees with the shard list ({actual})")
        return manifest


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def manifest_url(url: str) -> str:
    """The manifest of a split given the split directory or the manifest itself."""
    return url if storage.basename(url) == MANIFEST_NAME else storage.join(url, MANIFEST_NAME)


def read_manifest(url: str) -> Manifest:
    """Read ``manifest.json`` of a split (``url``: the split directory or the manifest file)."""
    where = manifest_url(url)
    try:
        text = storage.read_text(where)
    except FileNotFoundError:
        raise ShardError(f"{where}: no manifest (not a shard split directory, or the build never finished a shard)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ShardError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    return Manifest.from_json(data, where)


def write_manifest(url: str, manifest: Manifest) -> None:
    """Write ``manifest.json`` into the split directory ``url`` (atomically on local disks)."""
    storage.write_bytes(manifest_url(url), manifest.dumps().encode("utf-8"))


def find_manifests(url: str, max_depth: int = 3) -> list[str]:
    """Manifest URLs at or below ``url`` (a manifest, a split, a dataset or a shard root), sorted."""
    if storage.basename(url) == MANIFEST_NAME:
        return [url]
    if storage.exists(storage.join(url, MANIFEST_NAME)):
        return [storage.join(url, MANIFEST_NAME)]
    found = []
    for rel in storage.list_files(url):
        parts = rel.split("/")
        if parts[-1] == MANIFEST_NAME and len(parts) - 1 <= max_depth:
            found.append(storage.join(url, rel))
    return sorted(found)


# --- streaming writer ----------------------------------------------------------------------------


class ShardWriter:
    """Write one split's samples into numbered shards and its ``manifest.json``.

    >>> with ShardWriter("s3://bucket/shards", "vqa_rad", "train", task="vqa", source=..., licence="CC0 1.0") as w:
    ...     w.write(ShardSample(key, record, image_bytes, "jpg"))

    A new shard starts when the current one holds ``max_samples`` samples or the next sample would
    push its size past ``max_bytes`` (bytes of the tar file). Samples are buffered in memory up to
    one shard, then the shard is written (atomically on local disks) and recorded in the manifest;
    the manifest is rewritten after every shard (``complete: false``) and finally on :meth:`close`.
    """

    def __init__(
        self,
        out: str,
        dataset: str,
        split: str,
        *,
        task: str,
        source: str = "",
        licence: str = "unknown",
        access: str = "open",
        native_split: str = "",
        max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
        max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
        notes: Mapping[str, Any] | None = None,
    ):
        if access not in ACCESS_CLASSES:
            raise ValueError(f"access must be one of {ACCESS_CLASSES}, got {access!r}")
        self.url = split_url(out, dataset, split)
        self.manifest = Manifest(
            dataset=dataset, split=split, task=task, source=source, licence=licence, access=access,
            native_split=native_split or split, shard_max_samples=max_samples, shard_max_bytes=max_bytes,
            complete=False, notes=dict(notes or {}),
        )
        self._budget = ShardBudget(max_samples, max_bytes)
        self._pending: list[ShardSample] = []
        self._keys: set[str] = set()
        self._closed = False

    def write(self, sample: ShardSample) -> None:
        """Add one sample (keys must be unique within the split)."""
        if self._closed:
            raise ShardError(f"{self.url}: ShardWriter is closed")
        if sample.key in self._keys:
            raise ShardError(f"{self.url}: duplicate sample key {sample.key!r}")
        self._keys.add(sample.key)
        size = sum(tar_member_size(len(payload)) for _, payload in sample.members())
        if not self._budget.fits(size):
            self._flush()
        self._budget.add(size)
        self._pending.append(sample)

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self.manifest.shards)
        name = shard_name(self.manifest.dataset, self.manifest.split, index)
        entry = write_shard(storage.join(self.url, name), self._pending)
        self.manifest.shards.append(entry)
        write_manifest(self.url, self.manifest)
        self._pending = []
        self._budget.reset()

    def close(self) -> Manifest:
        """Write the last shard and the final manifest; returns the manifest."""
        if not self._closed:
            self._flush()
            self.manifest.complete = True
            write_manifest(self.url, self.manifest)
            self._closed = True
        return self.manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardCheck:
    """Result of checking one shard file against its manifest entry (``problem`` empty when fine)."""

    url: str
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass
class VerifyReport:
    """Every shard checked by :func:`verify_shards`, plus manifest-level problems."""

    checks: list[ShardCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return self.problems + [f"{c.url}: {c.problem}" for c in self.checks if not c.ok]

    def summary(self) -> str:
        good = sum(c.ok for c in self.checks)
        lines = [f"{good}/{len(self.checks)} shards match their manifests"]
        lines += [f"  FAIL {line}" for line in self.failures]
        return "\n".join(lines)


def verify_shards(url: str) -> VerifyReport:
    """Recompute every shard's sha256 and size and compare them with the manifest(s) at or below
    ``url`` (a split directory, a manifest, a dataset directory or a whole shard root).

    Also reports incomplete manifests and ``.tar`` files that no manifest lists.
    """
    report = VerifyReport()
    manifests = find_manifests(url)
    if not manifests:
        report.problems.append(f"{url}: no {MANIFEST_NAME} found at or below this location")
        return report
    for where in manifests:
        try:
            manifest = read_manifest(where)
        except ShardError as err:
            report.problems.append(str(err))
            continue
        directory = where[: -len(MANIFEST_NAME)].rstrip("/")
        if not manifest.complete:
            report.problems.append(f"{where}: build incomplete (complete: false); rerun the build to finish it")
        listed = {s.name for s in manifest.shards}
        for entry in manifest.shards:
            shard = storage.join(directory, entry.name)
            try:
                sha, nbytes = file_sha256(shard)
            except FileNotFoundError:
                report.checks.append(ShardCheck(shard, "missing"))
                continue
            if nbytes != entry.bytes:
                report.checks.append(ShardCheck(shard, f"size {nbytes} bytes, manifest says {entry.bytes}"))
            elif sha != entry.sha256:
                report.checks.append(ShardCheck(shard, f"sha256 {sha[:12]}..., manifest says {entry.sha256[:12]}..."))
            else:
                report.checks.append(ShardCheck(shard))
        for rel in storage.list_files(directory, recursive=False):
            if rel.endswith(".tar") and rel not in listed:
                report.problems.append(f"{storage.join(directory, rel)}: shard not listed in {where}")
    return report


def shard_urls(url: str) -> list[str]:
    """URLs of every shard listed by the manifest(s) at or below ``url``, in manifest order."""
    out = []
    for where in find_manifests(url):
        manifest = read_manifest(where)
        directory = where[: -len(MANIFEST_NAME)].rstrip("/")
        out += [storage.join(directory, s.name) for s in manifest.shards]
    return out
