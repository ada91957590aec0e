"""The files the tests read from the repository's own tests/fixtures/ (see its README.md for what each
is and where it comes from).

Most fixtures are plain files. The large ones are stored compressed and unpacked on first use into a
cache folder of the system's temp directory (keyed by the packed file's sha256, so concurrent test
sessions and changed fixtures never see each other's copies):

- ``NAME.xz``: xz of NAME;
- ``NAME.s2.xz`` / ``NAME.s4.xz``: xz of NAME after a byte shuffle in 2- or 4-byte lanes (all first
  bytes of each float16/float32 word, then all second bytes ...), which compresses weights and
  activations about 10% better than xz alone. Unpacked, they are the original bytes.

``fixture("ofa/micro_state_dict.safetensors")`` gives a path to the unpacked file whichever way it is
stored; ``fixture("crds")`` a folder with every file of tests/fixtures/crds/ unpacked.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PACKED_SUFFIXES = ((".s2.xz", 2), (".s4.xz", 4), (".xz", 1))


def packed_name(rel: str) -> tuple[str, int]:
    """(the name the tests use, shuffle lanes) of a stored file name; lanes 0: stored as is."""
    for suffix, lanes in PACKED_SUFFIXES:
        if rel.endswith(suffix):
            return rel[: -len(suffix)], lanes
    return rel, 0


def unpack(data: bytes, lanes: int) -> bytes:
    data = lzma.decompress(data)
    if lanes > 1:
        import numpy as np

        n = len(data) // lanes * lanes
        data = np.frombuffer(data[:n], dtype=np.uint8).reshape(lanes, -1).T.tobytes() + data[n:]
    return data


def _cache_root() -> Path:
    root = Path(tempfile.gettempdir()) / f"biomedgpt-test-fixtures-{os.getuid() if hasattr(os, 'getuid') else 0}"
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.lru_cache(maxsize=None)
def _unpacked(packed: Path, lanes: int) -> Path:
    data = packed.read_bytes()
    target = _cache_root() / hashlib.sha256(data).hexdigest()[:20] / packed_name(packed.name)[0]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(unpack(data, lanes))
        os.replace(tmp, target)  # atomic: another session unpacking the same file writes the same bytes
    return target


@functools.lru_cache(maxsize=None)
def _folder(rel: str) -> Path:
    source = FIXTURES / rel
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not any(packed_name(p.name)[1] for p in files):
        return source
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(source).as_posix().encode() + b"\0" + p.read_bytes())
    target = _cache_root() / digest.hexdigest()[:20] / Path(rel).name
    if not target.is_dir():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        for p in files:
            logical = packed_name(p.relative_to(source).as_posix())[0]
            (tmp / logical).parent.mkdir(parents=True, exist_ok=True)
            (tmp / logical).write_bytes(fixture(f"{rel}/{logical}").read_bytes())
        try:
            os.replace(tmp, target)
        except OSError:  # another session got there first
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
    return target


def fixture(rel: str) -> Path:
    """The path of tests/fixtures/<rel> (a file or a folder), unpacked when it is stored compressed."""
    path = FIXTURES / rel
    if path.is_dir():
        return _folder(rel)
    if path.is_file():
        return path
    for suffix, lanes in PACKED_SUFFIXES:
        packed = path.with_name(path.name + suffix)
        if packed.is_file():
            return _unpacked(packed, lanes)
    raise FileNotFoundError(f"{path}: no such test fixture (see tests/fixtures/README.md)")
