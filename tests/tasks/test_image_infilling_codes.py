"""VQGAN codes in the data pipeline: `shards build --codes` stores every image's codes (`codes.npy`) beside it,
locally and as a Ray Data actor-pool stage (byte-identical shards), resumably; `shards inspect` shows them; and
image infilling trains on them for an image folder (chexpert_small's layout and spec), through the data
pipeline's preprocessing; without codes it refuses them. Pretraining jobs under Ray Train on built codes:
tests/recipes/test_pretrain_recipes.py (every shipped recipe, from native sources)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fixture_files import fixture
from PIL import Image

from biomedgpt.cli import main
from biomedgpt.data.build import build_shards
from biomedgpt.data.dataset_spec import load_dataset_spec
from biomedgpt.data.pipeline import preprocess_batch, tokenizer_from_dir
from biomedgpt.data.shards import read_manifest, read_shard
from biomedgpt.model.vqgan import VQGANTokenizer, convert_taming_checkpoint
from biomedgpt.tasks import MissingFieldError
from biomedgpt.tasks.pretrain import needs_codes

REPO = Path(__file__).resolve().parents[2]
CASE_A = "vqgan/cases/a_gradient_noise_rgb"


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqgan") / "micro"
    convert_taming_checkpoint(fixture("vqgan/micro_vqgan_gumbel.npz"), out, config=fixture("vqgan/config.yaml"))
    return out


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> Path:
    """CheXpert-v1.0-small's layout: train/ and valid/ of patient/study/view JPEGs (and one PNG: case a)."""
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("valid", 2)):
        for i in range(n):
            d = root / split / f"patient{i:05d}" / "study1"
            d.mkdir(parents=True)
            arr = rng.integers(0, 256, (200 + 16 * i, 180, 3), dtype=np.uint8)
            Image.fromarray(arr).convert("L").save(d / "view1_frontal.jpg", quality=90)
    (root / "train" / "patient00000" / "study1" / "view2_lateral.png").write_bytes(
        fixture(f"{CASE_A}/input.png").read_bytes())
    return root


def samples(out: Path, split: str = "train") -> list[dict]:
    m = read_manifest(str(out / "chexpert_small" / split))
    return [s for e in m.shards for s in read_shard(str(out / "chexpert_small" / split / e.name))]


def test_only_image_records_need_codes():
    assert needs_codes("image") and not needs_codes("caption") and not needs_codes("text")


def test_build_with_codes_local_and_ray_resumable_and_inspect(vqgan_dir, chexpert, tmp_path, capsys):
    spec = load_dataset_spec(REPO / "datasets_spec" / "chexpert_small.yaml")
    local = tmp_path / "local"
    result = build_shards("chexpert_small", str(chexpert), str(local), spec=spec, shard_max_samples=2,
                          codes=str(vqgan_dir), codes_batch_size=3, progress=False)
    assert result["train"].samples == 6 and result["val"].samples == 2 and len(result.written) == 4
    tok = VQGANTokenizer.from_pretrained(vqgan_dir, device="cpu")
    rows = samples(local)
    for row in rows:
        image = row.get("jpg") or row.get("png")
        stored = np.load(io.BytesIO(row["codes.npy"]), allow_pickle=False)
        assert stored.shape == (16, 16) and stored.dtype == np.int16
        assert np.array_equal(stored, tok.encode([image])[0])
    case_a = next(r for r in rows if "png" in r)
    ref = np.load(fixture(f"{CASE_A}/codes.npy"))
    ties = {tuple(p) for p in json.loads(fixture(f"{CASE_A}/meta.json").read_text())["near_ties"]["positions_row_col"]}
    diff = {tuple(p) for p in np.argwhere(np.load(io.BytesIO(case_a["codes.npy"])) != ref)}
    assert diff <= ties  # the reference's codes of the case, through the build
    note = result["train"].notes["codes"]
    assert note["member"] == "codes.npy" and note["grid"] == [16, 16] and note["model"] == str(vqgan_dir)

    # resumable: the same build keeps every shard; one without codes rewrites them (no codes.npy)
    again = build_shards("chexpert_small", str(chexpert), str(local), spec=spec, shard_max_samples=2,
                         codes=str(vqgan_dir), progress=False)
    assert len(again.kept) == 4 and not again.written

    # the Ray Data stage (actor pool) writes the same bytes; its rerun keeps them
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = tmp_path / "ray"
        r1 = build_shards("chexpert_small", str(chexpert), str(on_ray), spec=spec, shard_max_samples=2,
                          codes=str(vqgan_dir), codes_batch_size=3, parallel=True, workers=2, progress=False)
        assert len(r1.written) == 4
        for split in ("train", "val"):
            a, b = read_manifest(str(local / "chexpert_small" / split)), read_manifest(str(on_ray / "chexpert_small" / split))
            assert [e.sha256 for e in a.shards] == [e.sha256 for e in b.shards] and b.complete
            assert b.notes["codes"] == a.notes["codes"]
        r2 = build_shards("chexpert_small", str(chexpert), str(on_ray), spec=spec, shard_max_samples=2,
                          codes=str(vqgan_dir), parallel=True, workers=2, progress=False)
        assert len(r2.kept) == 4 and not r2.written
    finally:
        ray.shutdown()

    # shards inspect shows the codes
    assert main(["shards", "inspect", str(local / "chexpert_small" / "train"), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "codes: codes.npy beside each image, 16x16 row-major" in shown
    assert "    codes: 16x16 int16: " in shown
    assert main(["shards", "inspect", str(local / "chexpert_small" / "train"), "-n", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["splits"]["chexpert_small/train"]
    assert data["codes"]["grid"] == [16, 16] and data["examples"][0]["__codes__"]["shape"] == [16, 16]

    plain = build_shards("chexpert_small", str(chexpert), str(local), spec=spec, shard_max_samples=2, progress=True)
    assert len(plain.written) == 4 and all("codes.npy" not in r for r in samples(local))
    assert "built without them they cannot be trained on (pass --codes MODEL_DIR" in capsys.readouterr().err


def test_an_image_the_vqgan_cannot_read_is_a_named_defect(vqgan_dir, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(src / "good.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)  # a JPEG signature, then nothing
    result = build_shards("chexpert_small", str(src), str(tmp_path / "out"), converter="image_folder",
                          codes=str(vqgan_dir), max_bad_fraction=0.6, progress=False, licence="test", access="open")
    defects = result["train"].notes["defects"]
    assert result["train"].samples == 1 and defects["count"] == 1
    assert defects["skipped"][0]["file"].endswith("broken.jpg") and "no VQGAN codes" in defects["skipped"][0]["reason"]


def test_the_cli_takes_codes(vqgan_dir, chexpert, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", "build", "chexpert_small", "--source", str(chexpert), "--out", str(out), "--split", "val",
                 "--spec", str(REPO / "datasets_spec" / "chexpert_small.yaml"), "--codes", str(vqgan_dir),
                 "--quiet"]) == 0
    assert all("codes.npy" in r for r in samples(out, "val"))
    assert main(["shards", "build", "chexpert_small", "--source", str(chexpert), "--out", str(out), "--split", "val",
                 "--codes", str(tmp_path), "--quiet"]) == 2
    assert "not a VQGAN model directory" in capsys.readouterr().err


def test_image_infilling_trains_on_the_built_codes(vqgan_dir, chexpert, tmp_path, pretrain_tokenizer_dir):
    spec = load_dataset_spec(REPO / "datasets_spec" / "chexpert_small.yaml")
    out = tmp_path / "shards"
    build_shards("chexpert_small", str(chexpert), str(out), ["train"], spec=spec, codes=str(vqgan_dir), progress=False)
    rows = samples(out)
    cols = sorted({k for r in rows for k in r if k != "__key__"})
    batch = {c: np.array([r.get(c) for r in rows], dtype=object) for c in cols}
    args = dict(task_name="pretrain", tokenizer_dir=pretrain_tokenizer_dir, image_size=256, max_source_length=32,
                max_target_length=257)
    got = preprocess_batch(batch, **args)
    tok = tokenizer_from_dir(pretrain_tokenizer_dir)
    assert got["code_masks"].all() and (got["loss_weight"] == 2.0).all()
    for i, row in enumerate(rows):
        codes = np.load(io.BytesIO(row["codes.npy"])).reshape(-1)
        assert got["labels"][i][:256].tolist() == [tok.code_offset + int(c) for c in codes]
        assert (got["patch_images"][i][:, 64:192, 64:192] == 0).all()  # the centre the codes describe, blanked
    # the same images without codes: image infilling refuses them, saying how to build them
    bare = {k: v for k, v in batch.items() if k != "codes.npy"}
    with pytest.raises(MissingFieldError, match=r"has no VQGAN codes .*--codes MODEL_DIR"):
        preprocess_batch(bare, **args)
