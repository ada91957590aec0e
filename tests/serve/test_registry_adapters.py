"""Adapters in the model registry: an adapter run's checkpoint exports as an adapter version (peft's files,
training.json, model card) naming its base by registry id and sha256; list/show say kind, base and adapter
size; a missing or changed base is refused; `--merge` publishes a standalone model whose logits are the
adapter's over its base (1e-5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from serve_helpers import make_adapter_checkpoint, make_model_dir

from biomedgpt.serve.registry import Registry, RegistryError

BASE_DEPT = "stanford-like-radiology"


@pytest.fixture
def registry_with_base(tmp_path, demo_tokenizer_dir) -> tuple[Registry, Path]:
    reg = Registry(str(tmp_path / "registry"))
    base_src = make_model_dir(tmp_path / "base-src", demo_tokenizer_dir, seed=5)
    entry = reg.export(base_src, BASE_DEPT, "base")
    return reg, reg.local_dir(entry)


def logits_of(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (2, 7), generator=g)
    dec = torch.randint(4, 300, (2, 4), generator=g)
    images = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        return model(input_ids=ids, patch_images=images, patch_masks=torch.ones(2, dtype=torch.bool),
                     decoder_input_ids=dec, use_cache=False).logits


def test_adapter_versions_name_their_base_and_merge(registry_with_base, tmp_path, capsys, monkeypatch):
    from peft import PeftModel

    from biomedgpt.cli import main
    from biomedgpt.model import BiomedGPTForConditionalGeneration

    reg, base_dir = registry_with_base
    ckpt = make_adapter_checkpoint(tmp_path / "runs" / "lora-a", base_dir, base_id=f"{BASE_DEPT}/base@1")
    entry = reg.export(ckpt, BASE_DEPT, "vqa-lora")
    assert entry.kind == "adapter" and entry.base == f"{BASE_DEPT}/base@1"
    folder = reg.local_dir(entry)
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json", "model_card.json", "README.md",
            "answers.json", "tokenizer.json"} <= files and "model.safetensors" not in files
    card = entry.card
    assert card["base_sha256"] == reg.resolve(f"{BASE_DEPT}/base@1").manifest["files"]["model.safetensors"]["sha256"]
    assert card["adapter_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
    assert card["adapter"]["rank"] == 4 and "q_proj" in card["adapter"]["target_modules"]
    assert card["adapter_bytes"] < (base_dir / "model.safetensors").stat().st_size / 5
    summary = entry.summary()
    assert summary["kind"] == "adapter" and summary["base"] == f"{BASE_DEPT}/base@1"

    # list / show through the CLI
    monkeypatch.setenv("BIOMEDGPT_REGISTRY", reg.url)
    assert main(["registry", "list"]) == 0
    table = capsys.readouterr().out
    assert "KIND" in table and "BASE" in table
    row = next(line for line in table.splitlines() if "vqa-lora@1" in line)
    assert "adapter (" in row and f"{BASE_DEPT}/base@1" in row
    assert main(["registry", "show", f"{BASE_DEPT}/vqa-lora@1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "adapter" and shown["base"] == f"{BASE_DEPT}/base@1"

    # --merge: a standalone model with the same logits as the adapter over its base
    assert main(["registry", "export", str(ckpt), "--department", BASE_DEPT, "--name", "vqa-merged",
                 "--team", BASE_DEPT, "--merge"]) == 0
    capsys.readouterr()
    merged = reg.resolve(f"{BASE_DEPT}/vqa-merged@1")
    assert merged.kind == "model" and merged.card["merged_from"]["base"] == f"{BASE_DEPT}/base@1"
    merged_model = BiomedGPTForConditionalGeneration.from_pretrained(reg.local_dir(merged)).eval()
    alone = PeftModel.from_pretrained(BiomedGPTForConditionalGeneration.from_pretrained(base_dir).eval(),
                                      str(folder)).eval()
    base_only = BiomedGPTForConditionalGeneration.from_pretrained(base_dir).eval()
    expected = logits_of(alone)
    assert (expected - logits_of(base_only)).abs().max() > 1e-3, "the adapter changes nothing"
    torch.testing.assert_close(logits_of(merged_model), expected, atol=1e-5, rtol=1e-5)


def test_adapters_of_a_missing_or_changed_base_are_refused(registry_with_base, tmp_path, demo_tokenizer_dir):
    reg, base_dir = registry_with_base
    missing = make_adapter_checkpoint(tmp_path / "runs" / "missing", base_dir, base_id=f"{BASE_DEPT}/nobase@1")
    with pytest.raises(RegistryError, match="nobase@1 is missing"):
        reg.export(missing, BASE_DEPT, "lora")
    # another base under the recorded id: its weights are not the adapter's base
    other = reg.export(make_model_dir(tmp_path / "other", demo_tokenizer_dir, seed=9), BASE_DEPT, "base")
    changed = make_adapter_checkpoint(tmp_path / "runs" / "changed", base_dir, base_id=other.id)
    with pytest.raises(RegistryError, match="has changed"):
        reg.export(changed, BASE_DEPT, "lora")
    # named by its directory (no registry id): refused once the directory's weights change or vanish
    copy = tmp_path / "base-copy"
    shutil.copytree(base_dir, copy)
    by_path = make_adapter_checkpoint(tmp_path / "runs" / "by-path", copy)
    assert reg.export(by_path, BASE_DEPT, "lora-by-path").base == str(copy)
    (copy / "model.safetensors").write_bytes((base_dir / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RegistryError, match="has changed"):
        reg.export(by_path, BASE_DEPT, "lora-by-path")
    (copy / "model.safetensors").unlink()
    with pytest.raises(RegistryError, match="is missing"):
        reg.export(by_path, BASE_DEPT, "lora-by-path")
    with pytest.raises(RegistryError, match="--merge is for adapters"):
        reg.export(base_dir, BASE_DEPT, "x", merge=True)
    assert reg.versions(BASE_DEPT, "lora") == []
