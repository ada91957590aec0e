"""Storage locations as URLs: local paths, ``file://`` and ``s3://``.

Every location the platform reads or writes is a URL string. This module is the one place that
turns such a string into a filesystem:

- :func:`filesystem` gives the fsspec filesystem and the path inside it (s3fs for ``s3://``);
- :func:`open_url`, :func:`read_bytes`, :func:`write_bytes`, :func:`list_files`, ... are thin
  helpers over it, so callers never branch on the scheme;
- :func:`pyarrow_filesystem` builds the ``pyarrow.fs`` filesystem Ray Data and Ray Train need
  (Ray does not read ``AWS_ENDPOINT_URL`` by itself, see FIELD_NOTES "Data and S3");
- :func:`register_webdataset_s3` teaches the ``webdataset`` library to open ``s3://`` URLs, for reading
  our shards with that library (the tests and benchmarks do; the platform reads them with its own tar
  reader and Ray Data, so ``webdataset`` is a dev extra, not a runtime dependency).

S3 is configured only through the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``),
so any S3-compatible store works (AWS S3, MinIO, Ceph, moto in the tests).
"""

from __future__ import annotations

import importlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import IO, Any, Mapping
from urllib.parse import urlparse

import fsspec

#: Schemes this module knows how to configure. Others still go through fsspec unchanged.
S3_SCHEMES = ("s3", "s3a")


#: The model registry's location (`serve/registry.py`; the audit trail lives under it too)
REGISTRY_ENV = "BIOMEDGPT_REGISTRY"
DEFAULT_REGISTRY = "registry"


def registry_url(url: str | None = None) -> str:
    """The registry location: `url`, else $BIOMEDGPT_REGISTRY, else ./registry."""
    return url or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def scheme(url: str) -> str:
    """The URL scheme: ``"file"`` for plain paths and ``file://`` URLs, else e.g. ``"s3"``."""
    url = os.fspath(url)
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return scheme(url) == "file"


def local_path(url: str) -> Path:
    """The absolute local path of a plain path or ``file://`` URL (ValueError for remote URLs)."""
    url = os.fspath(url)
    if not is_local(url):
        raise ValueError(f"{url}: not a local path or file:// URL")
    if url.startswith("file://"):
        url = urlparse(url).path
    return Path(url).expanduser().absolute()


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/``, keeping its scheme (``join("s3://b/p", "x")``)."""
    url = os.fspath(url)
    if is_local(url) and not url.startswith("file://"):
        return str(Path(url).joinpath(*parts))
    base = url.rstrip("/")
    rest = posixpath.join(*[p.strip("/") for p in parts if p]) if parts else ""
    return f"{base}/{rest}" if rest else base


def basename(url: str) -> str:
    """The last path component of a URL."""
    return posixpath.basename(os.fspath(url).rstrip("/"))


def s3_storage_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """s3fs keyword arguments from the standard AWS variables (absent variables are left to boto).

    ``AWS_ENDPOINT_URL`` selects an S3-compatible endpoint (MinIO, Ceph, moto); credentials come from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``); the region from
    ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``).
    """
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if env.get("AWS_ENDPOINT_URL"):
        client_kwargs["endpoint_url"] = env["AWS_ENDPOINT_URL"]
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["token"] = env["AWS_SESSION_TOKEN"]
    return options


def storage_options(url: str) -> dict[str, Any]:
    """fsspec keyword arguments for a URL's scheme (empty for local paths)."""
    return s3_storage_options() if scheme(url) in S3_SCHEMES else {}


def filesystem(url: str, *, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it.

    ``fresh=True`` bypasses fsspec's instance cache: use it in code that may run after a fork
    (s3fs instances hold an event loop and are not fork-safe).
    """
    url = os.fspath(url)
    if is_local(url):
        return fsspec.filesystem("file"), str(local_path(url))
    options = storage_options(url)
    if fresh:
        options["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> IO:
    """Open a URL like ``open()`` (binary or text mode)."""
    fs, path = filesystem(url)
    return fs.open(path, mode, **kwargs)


def read_bytes(url: str) -> bytes:
    """The whole content of a URL."""
    fs, path = filesystem(url)
    return fs.cat_file(path)


def invalidate(url: str) -> None:
    """Forget what the filesystem's listing cache knows of ``url`` and below: s3fs answers "not found" from a
    listing it cached before another writer (or thread) created the object."""
    if not is_local(url):
        fs, path = filesystem(url)
        fs.invalidate_cache(path)


def read_text(url: str, encoding: str = "utf-8") -> str:
    """The whole content of a URL decoded as text."""
    return read_bytes(url).decode(encoding)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url``, replacing it; local writes are atomic (temporary file + rename)."""
    if is_local(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # open() rather than mkstemp so the file gets the usual umask permissions, not 0600
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def exists(url: str) -> bool:
    """True if a file or directory exists at ``url``."""
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    """True if ``url`` is a directory (or, on object stores, a prefix with objects under it)."""
    fs, path = filesystem(url)
    return fs.isdir(path)


def size(url: str) -> int:
    """Size of the file at ``url`` in bytes."""
    fs, path = filesystem(url)
    return int(fs.size(path))


def modified_ns(url: str) -> int | None:
    """Modification time in ns for local files (None for object stores); used in restart checks."""
    if is_local(url):
        return local_path(url).stat().st_mtime_ns
    return None


def makedirs(url: str) -> None:
    """Create a directory and its parents (a no-op on object stores, which have no directories)."""
    if is_local(url):
        local_path(url).mkdir(parents=True, exist_ok=True)


def remove(url: str) -> None:
    """Delete the file at ``url`` (no error if it is already gone)."""
    fs, path = filesystem(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def list_files(url: str, *, recursive: bool = True) -> dict[str, int]:
    """Files under the directory ``url``: relative POSIX path -> size in bytes (sorted by path).

    One listing call per directory tree, so it stays cheap on object stores (no request per file).
    Returns an empty dict when the directory does not exist.
    """
    fs, root = filesystem(url)
    root = root.rstrip("/")
    try:
        if recursive:
            found = fs.find(root, detail=True)
        else:
            found = {info["name"]: info for info in fs.ls(root, detail=True) if info.get("type") == "file"}
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    prefix = root + "/"
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        name = name.replace(os.sep, "/") if is_local(url) else name
        rel = name[len(prefix):] if name.startswith(prefix) else posixpath.basename(name)
        out[rel] = int(info.get("size") or 0)
    return dict(sorted(out.items()))


def list_dirs(url: str) -> list[str]:
    """Names of the folders (object stores: common prefixes) directly under ``url``, sorted; empty when
    ``url`` does not exist."""
    fs, root = filesystem(url)
    try:
        entries = fs.ls(root.rstrip("/") or root, detail=True)
    except FileNotFoundError:
        return []
    names = {posixpath.basename(str(e["name"]).replace(os.sep, "/").rstrip("/"))
             for e in entries if e.get("type") == "directory"}
    return sorted(n for n in names if n)


def upload_dir(directory: str | Path, url: str) -> int:
    """Copy every file under the local `directory` to the same relative path under `url` (replacing
    what is there); returns the number of files. A no-op when `url` is that very directory."""
    root = Path(directory)
    if is_local(url) and local_path(url).resolve() == root.resolve():
        return 0
    n = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        write_bytes(join(url, path.relative_to(root).as_posix()), path.read_bytes())
        n += 1
    return n


def download_dir(url: str, directory: str | Path) -> int:
    """Copy every file under `url` into the local `directory` (same relative paths); returns the
    number of files (0 when `url` does not exist)."""
    root = Path(directory)
    n = 0
    for rel in list_files(url):
        if not rel or rel.endswith("/"):  # a folder marker object of an object store
            continue
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(join(url, rel)))
        n += 1
    return n


# --- Ray / pyarrow ------------------------------------------------------------------------------


def pyarrow_filesystem(url: str, env: Mapping[str, str] | None = None):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Data / Ray Train from a URL.

    For ``s3://bucket/prefix`` this is a ``pyarrow.fs.S3FileSystem`` configured from the AWS
    variables (endpoint host and scheme split from ``AWS_ENDPOINT_URL``) and the path
    ``bucket/prefix`` without the scheme, which is what ``RunConfig(storage_path=...,
    storage_filesystem=...)`` and ``ray.data.read_webdataset(..., filesystem=...)`` expect.
    Local paths give a ``LocalFileSystem`` and the absolute path.
    """
    import pyarrow.fs as pafs  # pyarrow ships with Ray; imported here so storage stays light

    env = os.environ if env is None else env
    url = os.fspath(url)
    if is_local(url):
        return pafs.LocalFileSystem(), str(local_path(url))
    if scheme(url) not in S3_SCHEMES:
        raise ValueError(f"{url}: no pyarrow filesystem for scheme {scheme(url)!r} (expected a local path or s3://)")
    kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), url.split("://", 1)[1].rstrip("/")


def pyarrow_path(url: str) -> str:
    """The path of ``url`` inside its :func:`pyarrow_filesystem` (``bucket/key`` for ``s3://``, the
    absolute path for local files), without building a filesystem."""
    url = os.fspath(url)
    if is_local(url):
        return str(local_path(url))
    if scheme(url) not in S3_SCHEMES:
        raise ValueError(f"{url}: no pyarrow filesystem for scheme {scheme(url)!r} (expected a local path or s3://)")
    return url.split("://", 1)[1].rstrip("/")


# --- webdataset -----------------------------------------------------------------------------------


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: Any) -> IO:
    """``webdataset.gopen`` handler for ``s3://`` URLs, built on fsspec.

    The filesystem is created inside the call, bypassing fsspec's instance cache, because s3fs
    objects are not fork-safe and webdataset may open shards in forked DataLoader workers.
    """
    if mode not in ("rb", "wb"):
        raise ValueError(f"{url}: gopen_s3 supports modes 'rb' and 'wb', not {mode!r}")
    fs, path = filesystem(url, fresh=True)
    return fs.open(path, mode, block_size=max(bufsize, 5 * 2**20))


def register_webdataset_s3() -> None:
    """Register :func:`gopen_s3` for ``s3://`` (and ``s3a://``) in ``webdataset.gopen``; idempotent."""
    # `webdataset.gopen` the attribute is the function; the module holding the table is imported by name
    wds_gopen = importlib.import_module("webdataset.gopen")
    for name in S3_SCHEMES:
        wds_gopen.gopen_schemes[name] = gopen_s3
