"""LoRA adapters in training (no Ray here: the Lightning path the Ray Train workers run, with the report
function replaced, as tests/train/test_checkpoints.py does): only adapter parameters train, the base stays
as `model.init` has it, step checkpoints hold the trainable state only and name the base, a resume
restores it (DDP's single file and FSDP2's sharded checkpoints), and export writes peft's adapter
directory whose outputs are the trained module's; a changed base is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model.adapters import DEFAULT_TARGETS, sha256_file
from biomedgpt.modeldir import checkpoint_model_state, export_checkpoint, merge_adapter
from biomedgpt.train.checkpoints import StepCheckpointer, fit_from_checkpoint
from biomedgpt.train.module import BiomedGPTModule
from test_checkpoints import Batches, batches, tiny_config


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("base")
    BiomedGPTForConditionalGeneration(BiomedGPTConfig(**{k: v for k, v in tiny_config().items()
                                                         if k not in ("model_type", "transformers_version")})
                                      ).save_pretrained(out)
    return out


def adapter_settings(base_dir: Path, trainable=("image_proj",)) -> dict:
    return {"method": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(DEFAULT_TARGETS),
            "trainable": list(trainable),
            "base": {"init": str(base_dir), "id": None, "sha256": sha256_file(base_dir / "model.safetensors")}}


def train(tmp_path: Path, base_dir: Path, adapter: dict, *, fsdp: bool, steps: int, resume: Path | None = None,
          name: str = "run"):
    kept: dict[str, Path] = {}

    def report(metrics, checkpoint_dir, ckpt_name):
        if checkpoint_dir is not None:  # what Ray does: persist the directory under its name
            kept[ckpt_name] = Path(shutil.copytree(checkpoint_dir, tmp_path / name / ckpt_name))

    cfg = tiny_config()
    module = BiomedGPTModule(model_config=cfg, init_dir=str(base_dir), lr=5e-2, max_steps=steps, warmup_ratio=0.0,
                             fsdp=fsdp, log_every=1, adapter=adapter)
    meta = {"run": name, "model_config": cfg, "image_size": 32, "max_source_length": 6, "size": "custom",
            "train_data": ["synthetic/train"], "adapter": {k: v for k, v in adapter.items() if k != "base"},
            "base": adapter["base"], "task": "vqa"}
    ckpt = StepCheckpointer(every=2, max_steps=steps, sharded=fsdp, meta=meta, assets={"answers.json": b'["yes"]'},
                            report=report)
    if fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    else:
        strategy = "auto"
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, logger=False,
                        callbacks=[ckpt], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    if resume is None:
        trainer.fit(module, train_dataloaders=Batches(10))
    else:
        fit_from_checkpoint(trainer, module, Batches(10), resume)
    return module, kept


def full_state(module: BiomedGPTModule) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.model.state_dict().items()}


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp-file", "fsdp2-sharded"])
def test_only_adapters_train_checkpoints_hold_them_and_resume(fsdp, base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    adapter = adapter_settings(base_dir)
    module, kept = train(tmp_path, base_dir, adapter, fsdp=fsdp, steps=4)
    trained = full_state(module)
    base = BiomedGPTForConditionalGeneration.from_pretrained(base_dir).state_dict()

    # only LoRA weights and the module trained in full (image_proj's copy) have gradients; the base is unchanged
    grads = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n or ".modules_to_save." in n for n in grads), sorted(grads)[:5]
    assert any("image_proj.modules_to_save" in n for n in grads)
    for name, value in base.items():
        if name in trained:  # untouched modules keep their names
            torch.testing.assert_close(trained[name], value, atol=0, rtol=0)
        elif name.replace(".weight", ".base_layer.weight") in trained:  # LoRA-wrapped projections
            torch.testing.assert_close(trained[name.replace(".weight", ".base_layer.weight")], value, atol=0, rtol=0)
    lora_b = [k for k in trained if "lora_B" in k]
    assert any(trained[k].abs().sum() > 0 for k in lora_b), "the adapters did not train"

    # checkpoints: the trainable state only, and the base named by sha256
    assert sorted(kept) == ["checkpoint-00000002", "checkpoint-00000004"]
    last = kept["checkpoint-00000004"]
    state = checkpoint_model_state(last)
    assert set(state) == grads, sorted(set(state) ^ grads)[:5]
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    assert size < (base_dir / "model.safetensors").stat().st_size
    meta = json.loads((last / "biomedgpt.json").read_text())
    assert meta["base"]["sha256"] == sha256_file(base_dir / "model.safetensors")

    # resume from step 2: the adapter state, optimizer and step come back; the base again from init
    resumed, kept2 = train(tmp_path, base_dir, adapter, fsdp=fsdp, steps=4, resume=kept["checkpoint-00000002"],
                           name="resumed")
    assert sorted(kept2) == ["checkpoint-00000004"], "the resumed run went on from step 2"
    again = full_state(resumed)
    for name in grads:
        assert again[name].shape == trained[name].shape
    for name in base:
        key = name if name in again else name.replace(".weight", ".base_layer.weight")
        if key in again:
            torch.testing.assert_close(again[key], base[name], atol=0, rtol=0)

    # export: peft's adapter directory; loaded alone with peft, the same logits as the trained module
    out = export_checkpoint(last, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json", "answers.json"} <= names
    assert "model.safetensors" not in names
    from peft import PeftModel

    alone = PeftModel.from_pretrained(BiomedGPTForConditionalGeneration.from_pretrained(base_dir), str(out)).eval()
    reference = BiomedGPTForConditionalGeneration(module.model.config).eval()
    b = next(batches(1))
    inputs = {k: v for k, v in b.items() if k != "labels"}
    module.model.eval()
    with torch.no_grad():
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True))
            from biomedgpt.model.adapters import add_lora, lora_config

            add_lora(reference, lora_config(4, 8.0, 0.0, DEFAULT_TARGETS, ["image_proj"]))
            reference.load_state_dict(sd)
            expected = reference.eval()(**inputs, use_cache=False).logits
        else:
            expected = module.model(**inputs, use_cache=False).logits
        got = alone(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # merged into the base: a standalone model with the same logits
    merged = merge_adapter(out, base_dir, tmp_path / "merged")
    with torch.no_grad():
        m = BiomedGPTForConditionalGeneration.from_pretrained(merged).eval()(**inputs, use_cache=False).logits
    torch.testing.assert_close(m, expected, atol=1e-5, rtol=1e-5)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_a_changed_base_is_refused(base_dir, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(base_dir, changed)
    adapter = adapter_settings(changed)
    model = BiomedGPTForConditionalGeneration.from_pretrained(changed)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(changed)
    module = BiomedGPTModule(model_config=tiny_config(), init_dir=str(changed), max_steps=2, adapter=adapter)
    with pytest.raises(ValueError, match="changed since the run was planned"):
        module.build_model()
