"""Step checkpoints from a Lightning run and their export to a model directory (no Ray here: the
report function is replaced by one that records what would be reported)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.modeldir import export_checkpoint, lightning_checkpoint_path
from biomedgpt.train.checkpoints import StepCheckpointer
from biomedgpt.train.module import BiomedGPTModule


def tiny_config() -> dict:
    cfg = BiomedGPTConfig(vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, resnet_type="resnet18",
                          dropout=0.0)
    return json.loads(cfg.to_json_string(use_diff=False))


class Batches:
    """An iterable of batches (a plain list would be read by Lightning as several loaders)."""

    def __init__(self, n: int) -> None:
        self.items = list(batches(n))

    def __iter__(self):
        return iter(self.items)


def batches(n: int = 100):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(4, 300, (2, 6), generator=g)
        labels = torch.randint(4, 300, (2, 4), generator=g)
        yield {"input_ids": ids, "patch_images": torch.randn(2, 3, 32, 32, generator=g),
               "patch_masks": torch.ones(2, dtype=torch.bool),
               "decoder_input_ids": torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1]], 1),
               "labels": labels}


@pytest.mark.parametrize("fsdp", [False, True], ids=["single-file", "fsdp2-distributed"])
def test_step_checkpoints_export_to_a_loadable_model(fsdp, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    reports: list[tuple[dict, Path | None, str | None]] = []
    kept: dict[str, Path] = {}

    def report(metrics, checkpoint_dir, name):
        reports.append((metrics, checkpoint_dir, name))
        if checkpoint_dir is not None:  # what Ray does: persist the directory under its name
            import shutil

            kept[name] = Path(shutil.copytree(checkpoint_dir, tmp_path / "storage" / name))

    cfg = tiny_config()
    module = BiomedGPTModule(model_config=cfg, lr=1e-3, max_steps=5, warmup_ratio=0.2, fsdp=fsdp, log_every=1)
    meta = {"run": "unit", "model_config": cfg, "image_size": 32, "max_source_length": 6, "size": "custom",
            "train_data": ["synthetic/train"]}
    assets = {"answers.json": b'["yes", "no"]', "tokenizer/marker.txt": b"tokenizer files go here"}
    ckpt = StepCheckpointer(every=2, max_steps=5, sharded=fsdp, meta=meta, assets=assets, report=report)
    if fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    else:
        strategy = "auto"
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=5, logger=False,
                        callbacks=[ckpt], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, train_dataloaders=Batches(10))

    names = [n for _, d, n in reports if d is not None]
    assert names == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000005"]
    assert all(d is not None for _, d, _ in reports)  # nothing between checkpoints (a report may block the step)
    assert [int(m["step"]) for m, _, _ in reports] == [2, 4, 5]
    last = kept["checkpoint-00000005"]
    assert lightning_checkpoint_path(last).name == ("lightning" if fsdp else "lightning.ckpt")
    assert not any((tmp_path / "tmp").rglob("*.distcp")), "local checkpoint staging was not cleaned up"

    out = export_checkpoint(last, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "answers.json").read_text() == '["yes", "no"]'
    assert (out / "marker.txt").is_file() and "synthetic/train" in (out / "README.md").read_text()
    exported = BiomedGPTForConditionalGeneration.from_pretrained(out).eval()
    trained = module.model
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    else:
        full = trained.state_dict()
    ours = exported.state_dict()
    for key in ("encoder.layers.0.fc1.weight", "decoder.layer_norm.weight", "encoder.embed_tokens.weight"):
        torch.testing.assert_close(ours[key], full[key].float(), atol=0, rtol=0)
    b = next(batches(1))
    with torch.no_grad():
        logits = exported(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits
    assert torch.isfinite(logits).all()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_evaluation_of_a_run_takes_its_newest_complete_checkpoint(tmp_path, monkeypatch):
    """A run directory whose newest checkpoint-* lacks its metadata (biomedgpt.json, written last, so an
    upload cut short has none): evaluating the run exports the newest complete checkpoint, not the partial
    one and not an older one."""
    import shutil

    from biomedgpt.evaluate.job import resolve_model_dir
    from biomedgpt.modeldir import checkpoint_model_state

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"

    def report(metrics, checkpoint_dir, name):
        if checkpoint_dir is not None:  # what Ray does: persist the directory under its name
            shutil.copytree(checkpoint_dir, run / name)

    cfg = tiny_config()
    module = BiomedGPTModule(model_config=cfg, lr=1e-3, max_steps=6, warmup_ratio=0.2, log_every=1)
    meta = {"run": "partial", "model_config": cfg, "image_size": 32, "max_source_length": 6, "size": "custom"}
    ckpt = StepCheckpointer(every=2, max_steps=6, sharded=False, meta=meta, assets={}, report=report)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, callbacks=[ckpt],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=Batches(10))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006"]
    (run / "checkpoint-00000006" / "biomedgpt.json").unlink()  # the newest: weights uploaded, metadata not

    out = resolve_model_dir(str(run), tmp_path / "work")
    assert json.loads((out / "training.json").read_text())["step"] == 4
    exported = BiomedGPTForConditionalGeneration.from_pretrained(out).state_dict()
    for step, same in ((4, True), (6, False)):
        state = checkpoint_model_state(run / f"checkpoint-{step:08d}")
        key = "encoder.layers.0.fc1.weight"
        assert torch.equal(exported[key], state[key].float()) is same, step


def test_two_runs_of_one_name_stage_their_checkpoints_apart(tmp_path, monkeypatch):
    """Ranks write a checkpoint in a local folder before Ray Train uploads it: the folder is the same for
    every rank of a run (a node's ranks write their shards into one folder) and another for a run of the
    same name with other outputs (two departments' `demo-vqa-rad`, or a test beside `make demo`), which a
    folder named by the run alone made overwrite each other's files; the per-user root is private and a
    root that is a link to elsewhere is refused."""
    import os
    import tempfile

    from biomedgpt.train.checkpoints import staging_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = staging_folder("demo-vqa-rad", "/home/radiology/runs/demo")
    assert a == staging_folder("demo-vqa-rad", "/home/radiology/runs/demo")
    b = staging_folder("demo-vqa-rad", "s3://cardiology/runs/demo")
    assert a != b and a.parent == b.parent and a.name.startswith("demo-vqa-rad-")
    assert staging_folder("../../etc", "x").parent == a.parent  # a run name cannot climb out of the root
    assert (a.parent.stat().st_mode & 0o777) == 0o700
    uid = os.getuid()
    (tmp_path / f"biomedgpt-checkpoints-{uid}").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / f"biomedgpt-checkpoints-{uid}").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="not this user's own"):
        staging_folder("demo-vqa-rad", "/home/radiology/runs/demo")
