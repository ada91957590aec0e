"""Boundary: the model registry never writes outside its folders, and never publishes a partial model.

- A version's manifest naming a file with `..`, an absolute path or a path through a symbolic link is
  refused before any byte is written (the cache copy of an S3 registry, a local registry's version).
- A registry export copies regular files only: a symbolic link in the source (whose target could be any
  file of the machine) is refused.
- A version not found is cached by the serving side for seconds, not for the life of the process.
- Claiming a version needs no conditional writes: on a store that ignores `If-None-Match` (an endpoint in
  front of moto that drops the header, as some S3-compatible stores do), concurrent exports still get
  distinct versions, each holding exactly its own files.
- A re-export of a registry version publishes only a complete one: an unpublished (crashed or running)
  export, or a version whose files differ from its manifest, is refused.

The registry treats a model directory's files as opaque bytes, so the model directories here are small
files with a model directory's names (config.json, model.safetensors, vocab.json).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

from biomedgpt.data import storage
from biomedgpt.serve.registry import ModelRef, Registry, RegistryError, UnknownModel
from biomedgpt.serve.sources import RegistrySource


def model_dir(root: Path, weights: bytes = b"weights") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"d_model": 8, "encoder_layers": 1}))
    (root / "model.safetensors").write_bytes(weights)
    (root / "vocab.json").write_text("{}")
    return root


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def add_to_manifest(reg: Registry, version_url: str, rel: str, data: bytes) -> None:
    """List `rel` in a published version's manifest, with `data` put where the registry would read it (when the
    store can hold that key: a `..` may climb above the bucket)."""
    try:
        storage.write_bytes(storage.join(version_url, rel), data)
    except OSError:
        pass
    manifest = json.loads(storage.read_text(storage.join(version_url, "manifest.json")))
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_bytes(storage.join(version_url, "manifest.json"), json.dumps(manifest).encode())


@pytest.mark.parametrize("where", ["dotdot", "absolute", "nested-dotdot"])
def test_a_manifest_path_outside_the_version_is_refused_before_writing(where, s3_bucket, tmp_path):
    reg = Registry(f"{s3_bucket}/registry")
    entry = reg.export(model_dir(tmp_path / "model"), "radiology", "vqa")
    cache = tmp_path / "cache"
    outside = tmp_path / "outside" / "planted.txt"
    rel = {"dotdot": "../../../../../../../../../../" + str(outside).lstrip("/"),
           "absolute": str(outside),
           "nested-dotdot": "tokenizer/../../../../../../../../../../../" + str(outside).lstrip("/")}[where]
    add_to_manifest(reg, entry.url, rel, b"planted")
    entry = reg.entry("radiology", "vqa", 1)
    with pytest.raises(RegistryError, match="not a relative path inside the version folder") as err:
        reg.local_dir(entry, cache_dir=cache)
    assert rel in str(err.value) and "manifest.json" in str(err.value)
    assert not outside.exists() and not outside.parent.exists()
    assert files_under(cache) == []


def test_a_symlink_in_a_local_version_is_refused(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    entry = reg.export(model_dir(tmp_path / "model"), "radiology", "vqa")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model")
    weights = Path(entry.url) / "model.safetensors"
    weights.unlink()
    weights.symlink_to(secret)
    with pytest.raises(RegistryError, match="model.safetensors is a symbolic link"):
        reg.local_dir(reg.entry("radiology", "vqa", 1))


def test_a_symlinked_cache_copy_is_refused(s3_bucket, tmp_path):
    reg = Registry(f"{s3_bucket}/registry")
    reg.export(model_dir(tmp_path / "model"), "radiology", "vqa")
    entry = reg.entry("radiology", "vqa", 1)
    cached = reg.local_dir(entry, cache_dir=tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    os.rename(cached, elsewhere)
    cached.symlink_to(elsewhere)  # the cached copy now points outside the cache
    with pytest.raises(RegistryError, match="symbolic link"):
        reg.local_dir(entry, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("link", ["file", "folder"])
def test_an_export_source_with_a_symlink_is_refused(link, tmp_path):
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("[default]\naws_secret_access_key = s3cr3t\n")
    src = model_dir(tmp_path / "model")
    if link == "file":
        (src / "notes.txt").symlink_to(secret)
    else:
        (src / "extra").symlink_to(secret.parent, target_is_directory=True)
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match="is a symbolic link"):
        reg.export(src, "radiology", "vqa")
    assert reg.versions("radiology", "vqa", published_only=False) == []
    assert not any(b"s3cr3t" in p.read_bytes() for p in files_under(tmp_path / "registry"))


def test_a_missing_exact_version_is_cached_for_seconds(tmp_path):
    url = str(tmp_path / "registry")
    source = RegistrySource(url, ttl=0.5)
    want = ModelRef("radiology", "vqa", 1)
    with pytest.raises(UnknownModel):
        source.resolve(want)
    Registry(url).export(model_dir(tmp_path / "model"), "radiology", "vqa")
    time.sleep(0.6)
    assert source.resolve(want).version == 1  # the miss was remembered for ttl seconds only
    assert source.resolve(want) is source.resolve(want)  # a found version is cached


def _read_chunked(rfile) -> bytes:
    body = b""
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            rfile.readline()
            return body
        body += rfile.read(size)
        rfile.readline()


@pytest.fixture
def store_without_conditional_writes(s3_bucket, moto_endpoint, monkeypatch):
    """The bucket behind an S3 endpoint that ignores conditional writes (drops If-None-Match / If-Match, as
    S3-compatible stores without them do) and answers every request after 20 ms, so that concurrent
    exports interleave. Yields the bucket URL, with AWS_ENDPOINT_URL pointing at that endpoint."""
    upstream = urlparse(moto_endpoint)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def forward(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                body = _read_chunked(self.rfile)
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            skip = {"if-none-match", "if-match", "host", "transfer-encoding", "expect", "connection", "content-length"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            headers["Content-Length"] = str(len(body))
            time.sleep(0.02)
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield s3_bucket
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_exports_get_distinct_versions_without_conditional_writes(store_without_conditional_writes,
                                                                            tmp_path):
    url = f"{store_without_conditional_writes}/registry"
    sources = [model_dir(tmp_path / f"model{i}", weights=f"weights of export {i}".encode()) for i in range(4)]
    entries, errors = [], []

    def export(src: Path) -> None:
        try:
            entries.append(Registry(url).export(src, "radiology", "race"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=export, args=(src,)) for src in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = [e.version for e in entries]
    assert len(set(versions)) == 4, versions
    reg = Registry(url)
    assert reg.versions("radiology", "race") == sorted(versions)
    for e in entries:
        published = reg.entry("radiology", "race", e.version)
        assert published.manifest == e.manifest and published.card["source"] == e.card["source"]
        local = reg.local_dir(published, cache_dir=tmp_path / "cache")  # every file checked against the manifest
        assert (local / "model.safetensors").read_bytes() == (Path(e.card["source"]) / "model.safetensors").read_bytes()


def test_a_re_export_publishes_only_a_complete_version(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    first = reg.export(model_dir(tmp_path / "model"), "radiology", "vqa")
    # an export that crashed (or is still running) after its claim and some files: no manifest
    crashed = Path(first.url).parent / "2"
    crashed.mkdir()
    (crashed / ".claim").write_text("{}")
    (crashed / "config.json").write_text(json.dumps({"d_model": 8}))
    (crashed / "model.safetensors").write_bytes(b"half of the wei")
    (crashed / "vocab.json").write_text("{}")
    with pytest.raises(RegistryError, match="without manifest.json"):
        reg.export(crashed, "radiology", "vqa-copy")
    # a published version whose file no longer matches its manifest
    tampered = tmp_path / "tampered"
    shutil.copytree(first.url, tampered)
    (tampered / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(RegistryError, match="model.safetensors: missing or differs from manifest.json"):
        reg.export(tampered, "radiology", "vqa-copy")
    assert reg.versions("radiology", "vqa-copy", published_only=False) == []
    copy = reg.export(first.url, "radiology", "vqa-copy")  # a complete version re-exports
    assert (Path(copy.url) / "model.safetensors").read_bytes() == b"weights"
