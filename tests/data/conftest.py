"""Fixtures for the data tests: image trees for the annotation-only datasets of tests/fixtures/data (the
subsets themselves: `dev_data`, `vqa_rad_release` and the S3 endpoint, moto on 127.0.0.1, are in
tests/conftest.py), and the VQA-RAD demo sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_testing import tiny_jpeg, tiny_png, write_images

REPO = Path(__file__).resolve().parents[2]
SAMPLE_VQA_RAD = REPO / "datasets_spec" / "samples" / "vqa_rad"


@pytest.fixture(scope="session")
def sample_vqa_rad() -> Path:
    return SAMPLE_VQA_RAD


@pytest.fixture(scope="session")
def slake_images(dev_data: Path, tmp_path_factory) -> Path:
    """imgs/<img_name> for every image named in the SLAKE subset (dev.json)."""
    root = tmp_path_factory.mktemp("slake") / "imgs"
    records = json.loads((dev_data / "slake/dev.json").read_text(encoding="utf-8"))
    write_images(root, sorted({r["img_name"] for r in records}), tiny_jpeg(90))
    return root


@pytest.fixture(scope="session")
def pathvqa_images(dev_data: Path, tmp_path_factory) -> Path:
    """images/<split>/<img_id>.jpg for every image of the PathVQA subset (dev.json)."""
    root = tmp_path_factory.mktemp("pathvqa") / "images"
    records = json.loads((dev_data / "pathvqa/dev.json").read_text(encoding="utf-8"))
    names = [f"{r['img_id'].split('_')[0]}/{r['img_id']}.jpg" for r in records]
    write_images(root, names, tiny_jpeg(40))
    return root


@pytest.fixture(scope="session")
def iu_xray_images(dev_data: Path, tmp_path_factory) -> Path:
    """images/<study>/<n>.png for every path of the IU X-ray subset (dev.json)."""
    root = tmp_path_factory.mktemp("iu_xray") / "images"
    data = json.loads((dev_data / "iu_xray/dev.json").read_text(encoding="utf-8"))
    write_images(root, sorted({p for studies in data.values() for s in studies for p in s["image_path"]}), tiny_png(60))
    return root


@pytest.fixture(scope="session")
def roco_images(dev_data: Path, tmp_path_factory) -> Path:
    """images/ROCO_<n>.jpg for every line of the ROCO subset (dev_captions.txt)."""
    root = tmp_path_factory.mktemp("roco") / "images"
    lines = (dev_data / "roco/dev_captions.txt").read_text(encoding="utf-8").splitlines()
    write_images(root, [f"{line.split(chr(9))[0]}.jpg" for line in lines if line.strip()], tiny_jpeg(200))
    return root


@pytest.fixture
def vqa_rad_copy(sample_vqa_rad: Path, tmp_path: Path) -> Path:
    """A writable copy of the VQA-RAD demo sample (for tests that break or change the source)."""
    dest = tmp_path / "vqa_rad_src"
    shutil.copytree(sample_vqa_rad, dest)
    return dest
