"""Shard building as Ray tasks on a local Ray (2 CPUs): byte-identical to the single-process build,
restartable (kept shards are not resubmitted), failures recorded, readable by tar and webdataset."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: local Ray on 127.0.0.1

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from biomedgpt.data.build import build_shards, new_manifest, plan_split, previous_entries
from biomedgpt.cli.shards import add_shards_commands
from biomedgpt.data.converters import open_converter
from biomedgpt.data.shards import ShardError, read_manifest, verify_shards


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*.tar"))}


def test_ray_build_is_byte_identical_and_restartable(local_ray, sample_vqa_rad: Path, tmp_path: Path, capsys):
    single, parallel = tmp_path / "single", tmp_path / "ray"
    build_shards("vqa_rad", str(sample_vqa_rad), str(single), shard_max_samples=50, progress=False)
    result = build_shards("vqa_rad", str(sample_vqa_rad), str(parallel), shard_max_samples=50, workers=2, progress=True)
    assert len(result.written) == 8 and result.kept == [] and list(result) == ["train", "test"]
    assert files_of(parallel) == files_of(single)  # every shard and both manifests, byte for byte
    err = capsys.readouterr().err
    assert "vqa_rad/train: 266 samples in 6 shards" in err and "6 written, 0 kept" in err

    # plain tar and the webdataset library read the Ray-built shards unchanged
    listing = subprocess.run(["tar", "-tf", str(parallel / "vqa_rad/test/vqa_rad-test-000000.tar")],
                             capture_output=True, text=True, check=True).stdout.split()
    assert listing[0].endswith(".json") and listing[1].endswith(".jpg") and len(listing) == 100
    import webdataset as wds

    samples = list(wds.WebDataset([str(p) for p in sorted((parallel / "vqa_rad/train").glob("*.tar"))], shardshuffle=False))
    assert len(samples) == 266 and all("json" in s and "jpg" in s for s in samples)

    # a rerun keeps everything; nothing is rewritten
    before = mtimes(parallel)
    again = build_shards("vqa_rad", str(sample_vqa_rad), str(parallel), shard_max_samples=50, parallel=True, progress=False)
    assert again.written == [] and len(again.kept) == 8 and mtimes(parallel) == before

    # a deleted shard and a damaged one (same size, one byte changed) are rebuilt, only they
    split = parallel / "vqa_rad/train"
    (split / "vqa_rad-train-000001.tar").unlink()
    damaged = split / "vqa_rad-train-000004.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    kept_before = {k: v for k, v in mtimes(parallel).items() if "000001" not in k and "000004" not in k}
    repaired = build_shards("vqa_rad", str(sample_vqa_rad), str(parallel), shard_max_samples=50, workers=2, progress=False)
    assert sorted(Path(u).name for u in repaired.written) == ["vqa_rad-train-000001.tar", "vqa_rad-train-000004.tar"]
    assert len(repaired.kept) == 6 and {k: v for k, v in mtimes(parallel).items() if k in kept_before} == kept_before
    assert files_of(parallel) == files_of(single) and verify_shards(str(parallel)).ok


def test_failed_task_is_reported_and_the_rest_recorded(local_ray, vqa_rad_copy: Path, tmp_path: Path):
    from biomedgpt.data.build import BuildResult
    from biomedgpt.data.ray_build import SplitJob, write_splits_ray

    out = tmp_path / "out"
    conv = open_converter("vqa_rad", str(vqa_rad_copy))
    plan = plan_split(conv, "train", str(out), shard_max_samples=50)
    victim = plan.shards[3].samples[0].image
    first_failing = min(s.index for s in plan.shards if any(x.image == victim for x in s.samples))
    saved = tmp_path / "saved.jpg"
    shutil.move(victim.url, saved)  # the image disappears after planning
    job = SplitJob(plan, new_manifest(plan, conv, str(vqa_rad_copy), "CC0 1.0", "open", {}, 50, 2**28), previous_entries(plan))
    with pytest.raises(ShardError, match=rf"vqa_rad-train-{first_failing:06d}\.tar: SourceFormatError: .*"
                                         r"synpic\d+\.jpg: image file disappeared"):
        write_splits_ray([job], BuildResult(), workers=1, progress=False)  # one at a time: stops at the failure
    partial = read_manifest(str(out / "vqa_rad/train"))
    done = [f"vqa_rad-train-{i:06d}.tar" for i in range(first_failing)]
    assert not partial.complete and [s.name for s in partial.shards] == done

    shutil.move(saved, victim.url)
    result = build_shards("vqa_rad", str(vqa_rad_copy), str(out), ["train"], shard_max_samples=50, workers=2, progress=False)
    assert sorted(Path(u).name for u in result.written) == [f"vqa_rad-train-{i:06d}.tar" for i in range(first_failing, 6)]
    assert len(result.kept) == first_failing and result["train"].complete and verify_shards(str(out)).ok


def test_cli_build_with_ray(local_ray, dev_data: Path, tmp_path: Path, capsys):
    parser = argparse.ArgumentParser(prog="biomedgpt")
    add_shards_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shards", "build", "pneumoniamnist", "--source", str(dev_data / "medmnist"),
                              "--out", str(tmp_path), "--split", "val", "--file", "npz=dev.npz",
                              "--shard-max-samples", "15", "--ray", "--workers", "2", "--quiet"])
    assert args.func(args) == 0
    assert "pneumoniamnist/val: 50 samples, 4 shards" in capsys.readouterr().out
    assert verify_shards(str(tmp_path)).ok
    with pytest.raises(ValueError, match="--workers: only with --ray"):
        bad = parser.parse_args(["shards", "build", "vqa_rad", "--source", "x", "--out", "y", "--workers", "2"])
        bad.func(bad)


def test_converted_images_are_identical_from_ray_tasks(local_ray, tmp_path: Path):
    """DICOMs converted to PNG inside Ray tasks give the same shards as in the driver."""
    import numpy as np
    from data_testing import write_dicom

    src = tmp_path / "src"
    for i in range(5):
        write_dicom(src / f"case{i}/slice.dcm", (np.arange(48, dtype=np.uint16).reshape(6, 8) * (i + 1)),
                    photometric="MONOCHROME1" if i % 2 else "MONOCHROME2", uid_suffix=100 + i)
    kwargs = dict(converter="dicom_folder", shard_max_samples=2, progress=False)
    build_shards("ct", str(src), str(tmp_path / "single"), **kwargs)
    result = build_shards("ct", str(src), str(tmp_path / "ray"), workers=2, **kwargs)
    assert len(result.written) == 3 and files_of(tmp_path / "ray") == files_of(tmp_path / "single")


def test_unusable_images_in_ray_tasks_are_skipped_like_in_the_driver(local_ray, tmp_path: Path):
    """A DICOM that does not convert, met inside a Ray task: the same shards, the same manifest (with the
    record named in notes.defects) as the single-process build; past the budget the build stops."""
    import numpy as np
    from data_testing import write_dicom

    from biomedgpt.data.plan import BadRecordsError

    src = tmp_path / "src"
    for i in range(6):
        write_dicom(src / f"case{i}/slice.dcm", np.arange(48, dtype=np.uint16).reshape(6, 8) * (i + 1), uid_suffix=100 + i)
    (src / "case3/slice.dcm").write_bytes(b"not a DICOM" * 20)
    kwargs = dict(converter="dicom_folder", shard_max_samples=2, progress=False)
    build_shards("ct", str(src), str(tmp_path / "single"), max_bad_fraction=0.2, **kwargs)
    result = build_shards("ct", str(src), str(tmp_path / "ray"), workers=2, max_bad_fraction=0.2, **kwargs)
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "single")
    assert result["train"].samples == 5 and [d["id"] for d in result["train"].notes["defects"]["skipped"]] == ["case3/slice"]
    with pytest.raises(BadRecordsError, match=r"ct/train: 1 of 6 source records .*/case3/slice\.dcm"):
        build_shards("ct", str(src), str(tmp_path / "strict"), workers=2, **kwargs)
    assert not read_manifest(str(tmp_path / "strict/ct/train")).complete
