"""Storage URLs, locally and against a real S3 endpoint (moto's server on 127.0.0.1): shards built
straight to s3://, read back by fsspec, the webdataset library and pyarrow (what Ray uses)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from biomedgpt.data import storage
from biomedgpt.data.build import build_shards
from biomedgpt.data.inspect import inspect_shards
from biomedgpt.data.shards import read_manifest, shard_urls, verify_shards


def test_local_urls(tmp_path: Path):
    url = f"file://{tmp_path}"
    assert storage.scheme(url) == "file" and storage.scheme(str(tmp_path)) == "file"
    assert storage.scheme("s3://b/k") == "s3" and not storage.is_local("s3://b/k")
    assert storage.local_path(url) == tmp_path
    assert storage.join("s3://bucket/prefix/", "a", "b.tar") == "s3://bucket/prefix/a/b.tar"
    assert storage.join(url, "x") == f"file://{tmp_path}/x"
    storage.write_bytes(storage.join(url, "d/e/f.bin"), b"abc")
    assert storage.read_bytes(str(tmp_path / "d/e/f.bin")) == b"abc"
    assert (tmp_path / "d/e/f.bin").stat().st_mode & 0o044  # readable by others: not a 0600 temp file
    assert storage.list_files(url) == {"d/e/f.bin": 3}
    assert storage.list_files(str(tmp_path / "missing")) == {}
    assert not list((tmp_path / "d/e").glob(".*partial"))
    storage.remove(str(tmp_path / "d/e/f.bin"))
    storage.remove(str(tmp_path / "d/e/f.bin"))  # already gone: fine


def test_aws_variables_configure_s3fs_and_pyarrow():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "eu-west-1"}
    assert storage.s3_storage_options(env) == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}, "key": "k", "secret": "s"}
    fs, path = storage.pyarrow_filesystem("s3://bucket/shards/vqa_rad/", env)
    assert path == "bucket/shards/vqa_rad" and type(fs).__name__ == "S3FileSystem"
    assert fs.region == "eu-west-1"
    fs, path = storage.pyarrow_filesystem("/tmp/x", {})
    assert type(fs).__name__ == "LocalFileSystem" and path == "/tmp/x"
    with pytest.raises(ValueError, match="no pyarrow filesystem for scheme 'gs'"):
        storage.pyarrow_filesystem("gs://b/k", env)


def test_shards_on_s3_round_trip(sample_vqa_rad: Path, s3_bucket: str):
    import pyarrow.fs as pafs
    import webdataset as wds

    out = f"{s3_bucket}/shards"
    result = build_shards("vqa_rad", str(sample_vqa_rad), out, shard_max_samples=100, progress=False)
    assert result["train"].samples == 266 and len(result.written) == 4

    # fsspec: listing, manifest, checksums
    listed = storage.list_files(out)
    assert "vqa_rad/train/manifest.json" in listed and "vqa_rad/test/vqa_rad-test-000000.tar" in listed
    assert read_manifest(f"{out}/vqa_rad/train").to_json() == result["train"].to_json()
    assert verify_shards(out).ok and len(verify_shards(out).checks) == 4

    # restart against S3: nothing rewritten
    again = build_shards("vqa_rad", str(sample_vqa_rad), out, shard_max_samples=100, progress=False)
    assert again.written == [] and len(again.kept) == 4

    # the webdataset library through our s3:// opener
    storage.register_webdataset_s3()
    urls = shard_urls(f"{out}/vqa_rad/train")
    assert all(u.startswith("s3://") for u in urls)
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 266
    first = json.loads(samples[0]["json"])
    assert samples[0]["jpg"] == (sample_vqa_rad / "VQA_RAD Image Folder" / first["image"]).read_bytes()

    # pyarrow (Ray Data's filesystem) from the AWS variables alone
    fs, root = storage.pyarrow_filesystem(out)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/vqa_rad/test", recursive=True))
    assert sorted(Path(i.path).name for i in infos) == ["manifest.json", "vqa_rad-test-000000.tar"]
    with fs.open_input_stream(f"{root}/vqa_rad/test/vqa_rad-test-000000.tar") as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            assert sum(1 for m in tar if m.name.endswith(".json")) == 69

    assert inspect_shards(out, n=1).counts == {"vqa_rad/test": 69, "vqa_rad/train": 266}


def test_s3_damage_is_detected(sample_vqa_rad: Path, s3_bucket: str):
    out = f"{s3_bucket}/shards"
    build_shards("vqa_rad", str(sample_vqa_rad), out, ["test"], progress=False)
    shard = f"{out}/vqa_rad/test/vqa_rad-test-000000.tar"
    storage.write_bytes(shard, storage.read_bytes(shard)[:-10240])
    report = verify_shards(out)
    assert not report.ok and "vqa_rad-test-000000.tar: size" in report.failures[0]
    assert storage.modified_ns(shard) is None and storage.exists(shard) and not storage.exists(f"{out}/nope")
