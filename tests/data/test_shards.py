"""ShardWriter and manifests: plain tar and the webdataset library read every sample back; output is
deterministic; verify_shards catches damage; manifests are validated."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from data_testing import tiny_jpeg, tiny_png

from biomedgpt.data.shards import (ShardError, ShardSample, ShardWriter, image_as_stored, make_key, read_manifest,
                                   read_shard, verify_shards)


def make_samples(n: int) -> list[ShardSample]:
    out = []
    for i in range(n):
        record = {"task": "vqa", "dataset": "toy", "split": "train", "id": str(i),
                  "question": f"Is this image {i} normal?", "answer": "yes", "answer_type": "closed", "organ": "héad"}
        if i % 5 == 4:
            out.append(ShardSample(make_key("toy", str(i)), record))  # text only
        elif i % 2:
            out.append(ShardSample(make_key("toy", str(i)), record, tiny_png(i), "png"))
        else:
            out.append(ShardSample(make_key("toy", str(i)), record, tiny_jpeg(i), "jpg"))
    return out


def write(out: Path, samples, **kwargs):
    with ShardWriter(str(out), "toy", "train", task="vqa", source="unit test", licence="CC0 1.0", **kwargs) as writer:
        for s in samples:
            writer.write(s)
    return writer.manifest


def test_round_trip_through_tarfile(tmp_path: Path):
    samples = make_samples(11)
    manifest = write(tmp_path, samples, max_samples=4)
    split_dir = tmp_path / "toy" / "train"
    assert [s.name for s in manifest.shards] == [f"toy-train-{i:06d}.tar" for i in range(3)]
    assert [s.samples for s in manifest.shards] == [4, 4, 3] and manifest.samples == 11 and manifest.complete
    seen = []
    for entry in manifest.shards:
        path = split_dir / entry.name
        assert path.stat().st_size == entry.bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile() for m in members)
            for m in members:
                key, ext = m.name.split(".", 1)
                seen.append((key, ext, tar.extractfile(m).read()))
    by_key = {}
    for key, ext, data in seen:
        by_key.setdefault(key, {})[ext] = data
    assert list(by_key) == [s.key for s in samples]  # order kept, one group per key
    for s in samples:
        got = by_key[s.key]
        assert json.loads(got["json"]) == dict(s.record)
        assert got.get(s.image_ext) == s.image if s.image else set(got) == {"json"}


def test_round_trip_through_webdataset(tmp_path: Path):
    import webdataset as wds

    samples = make_samples(13)
    manifest = write(tmp_path, samples, max_samples=5)
    urls = [str(tmp_path / "toy" / "train" / s.name) for s in manifest.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(got) == 13 == manifest.samples
    for sample, source in zip(got, samples):
        assert sample["__key__"] == source.key
        assert json.loads(sample["json"]) == dict(source.record)
        if source.image is not None:
            assert sample[source.image_ext] == source.image
    decoded = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("pil")))
    assert decoded["json"]["id"] == "0" and decoded["jpg"].size == (8, 8)


def test_shards_are_deterministic(tmp_path: Path):
    a = write(tmp_path / "a", make_samples(9), max_samples=4)
    b = write(tmp_path / "b", make_samples(9), max_samples=4)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a/toy/train/manifest.json").read_bytes() == (tmp_path / "b/toy/train/manifest.json").read_bytes()


def test_max_bytes_cuts_shards(tmp_path: Path):
    big = [ShardSample(make_key("toy", str(i)), {"id": str(i)}, b"\xff\xd8\xff" + bytes(30_000), "jpg") for i in range(7)]
    manifest = write(tmp_path, big, max_bytes=80_000)  # 2 samples: 71,680 bytes, 3: 102,400
    assert all(s.bytes <= 80_000 for s in manifest.shards)
    assert [s.samples for s in manifest.shards] == [2, 2, 2, 1]
    lone = write(tmp_path / "lone", big[:2], max_bytes=20_480)  # larger than the limit: one per shard
    assert [s.samples for s in lone.shards] == [1, 1]


def test_manifest_schema(tmp_path: Path):
    write(tmp_path, make_samples(3))
    data = json.loads((tmp_path / "toy/train/manifest.json").read_text())
    assert data["schema_version"] == 1 and data["licence"] == "CC0 1.0" and data["access"] == "open"
    assert data["totals"] == {"shards": 1, "samples": 3, "bytes": data["shards"][0]["bytes"]}
    assert set(data["shards"][0]) == {"name", "samples", "bytes", "sha256", "input_sha256"}
    assert read_manifest(str(tmp_path / "toy/train")).samples == 3
    assert read_manifest(str(tmp_path / "toy/train/manifest.json")).dataset == "toy"


def test_manifest_errors_name_file_and_field(tmp_path: Path):
    split = tmp_path / "toy/train"
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(split))
    write(tmp_path, make_samples(2))
    path = split / "manifest.json"
    data = json.loads(path.read_text())
    del data["shards"][0]["sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"manifest\.json: field 'shards\[0\]\.sha256': missing"):
        read_manifest(str(split))
    data["shards"][0]["sha256"] = "0" * 64
    data["totals"]["samples"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"field 'totals\.samples': 99 disagrees with the shard list \(2\)"):
        read_manifest(str(split))
    path.write_text("{not json")
    with pytest.raises(ShardError, match="invalid JSON at line 1"):
        read_manifest(str(split))


def test_verify_shards_detects_damage(tmp_path: Path):
    manifest = write(tmp_path, make_samples(10), max_samples=3)
    assert verify_shards(str(tmp_path)).ok and len(verify_shards(str(tmp_path)).checks) == 4
    split = tmp_path / "toy/train"
    shard = split / manifest.shards[1].name
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    (split / manifest.shards[2].name).unlink()
    (split / "toy-train-000099.tar").write_bytes(b"")
    report = verify_shards(str(split))
    assert not report.ok
    failures = "\n".join(report.failures)
    assert f"{manifest.shards[1].name}: sha256" in failures
    assert f"{manifest.shards[2].name}: missing" in failures
    assert "toy-train-000099.tar: shard not listed" in failures
    assert "2/4 shards match" in report.summary()


def test_keys_and_images():
    assert make_key("vqa_rad", "123") == "vqa_rad-123"
    odd = make_key("slake", "xmlab1/source.jpg")
    assert "." not in odd and "/" not in odd and odd != make_key("slake", "xmlab1_source_jpg")
    assert len(make_key("x", "y" * 300)) <= 90
    jpeg, png = tiny_jpeg(), tiny_png()
    assert image_as_stored(jpeg) == (jpeg, "jpg") and image_as_stored(png) == (png, "png")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (4, 4), 3).save(buf, format="GIF")
    data, ext = image_as_stored(buf.getvalue(), "x.gif")
    assert ext == "png" and Image.open(io.BytesIO(data)).size == (4, 4)
    with pytest.raises(ShardError, match="x.bin: not a readable image"):
        image_as_stored(b"nope", "x.bin")
    with pytest.raises(ShardError, match="contain no '.'"):
        ShardSample("a.b", {}).members()


def test_read_shard_groups_members(tmp_path: Path):
    manifest = write(tmp_path, make_samples(5))
    got = list(read_shard(str(tmp_path / "toy/train" / manifest.shards[0].name)))
    assert [g["__key__"] for g in got] == [f"toy-{i}" for i in range(5)]
    assert set(got[4]) == {"__key__", "json"} and "jpg" in got[0] and "png" in got[1]


def test_writer_rejects_duplicate_keys(tmp_path: Path):
    sample = make_samples(1)[0]
    writer = ShardWriter(str(tmp_path), "toy", "train", task="vqa")
    writer.write(sample)
    with pytest.raises(ShardError, match="duplicate sample key 'toy-0'"):
        writer.write(sample)
