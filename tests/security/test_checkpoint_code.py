"""Boundary: checkpoints never run code.

Each crafted checkpoint names a global that runs code when it is unpickled: `os.system`, `builtins.exec`,
numpy's `runstring`, a dotted attribute path under an innocent module (`torch` + `serialization.os.system`,
which protocol 4 resolves attribute by attribute) and `torch.hub.load` (which imports a `hubconf.py` from
torch's hub cache, offline). The payload would create a marker file. Every load the platform does of a
pickle-based file refuses them with an error naming the global, and the marker never appears:
`biomedgpt convert` of a fairseq `.pt`, `biomedgpt export` / `registry export` of a run checkpoint (a full
Lightning checkpoint, or a sharded one whose distributed-checkpoint `.metadata` is the payload), resuming
training from a run checkpoint, and the initial weights of `model.init`. `test_payloads_are_live` proves
each payload does run code when loaded the unsafe way, so that the refusals are not vacuous.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

from biomedgpt.cli import main
from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model.convert import convert
from biomedgpt.model.safe_pickle import ForbiddenGlobalError
from biomedgpt.modeldir import export_checkpoint
from biomedgpt.serve.registry import Registry
from biomedgpt.train.checkpoints import fit_from_checkpoint
from biomedgpt.train.module import BiomedGPTModule


@dataclass(frozen=True)
class Call:
    """Pickles as the global `module.name` called with `args`: what a malicious checkpoint holds."""

    module: str
    name: str
    args: tuple


class ForgingPickler(pickle._Pickler):
    """Python's pickler, writing a `Call` as GLOBAL (STACK_GLOBAL at protocol 4) + arguments + REDUCE."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_call(self, obj: Call) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.save(obj.args)
        self.write(pickle.REDUCE)

    dispatch[Call] = save_call


forging = types.SimpleNamespace(Pickler=ForgingPickler, __name__="forging")


def hubconf_cache(root: Path, marker: Path) -> None:
    """torch's hub cache with the repository evil/repo at ref main, whose hubconf.py writes the marker."""
    repo = root / "hub" / "evil_repo_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")


def payload(kind: str, marker: Path) -> tuple[Call, int, str]:
    """(the call, the pickle protocol, the global an error must name)."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    if kind == "os.system":
        return Call("os", "system", (f"touch {marker}",)), 2, "os.system"
    if kind == "builtins.exec":
        return Call("builtins", "exec", (code,)), 2, "builtins.exec"
    if kind == "numpy-runstring":
        return (Call("numpy.testing._private.utils", "runstring", (code, {})), 2,
                "numpy.testing._private.utils.runstring")
    if kind == "dotted-path":
        return Call("torch", "serialization.os.system", (f"touch {marker}",)), 4, "torch.serialization.os.system"
    if kind == "torch.hub.load":
        return Call("torch.hub", "load", ("evil/repo:main", "model")), 2, "torch.hub.load"
    raise AssertionError(kind)


PAYLOADS = ["os.system", "builtins.exec", "numpy-runstring", "dotted-path", "torch.hub.load"]


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """The file a payload would create; torch's hub cache (TORCH_HOME) holds the evil hubconf.py."""
    path = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hubconf_cache(tmp_path / "torch-home", path)
    yield path
    sys.modules.pop("hubconf", None)


def save(obj, path: Path, proto: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, pickle_module=forging, pickle_protocol=proto)
    return path


def tiny_weights() -> dict:
    return {"encoder.embed_tokens.weight": torch.zeros(4, 2)}


def refused(err: pytest.ExceptionInfo, name: str, path: Path) -> None:
    assert isinstance(err.value, ForbiddenGlobalError)
    assert err.value.global_name == name and name in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(kind, tmp_path, marker):
    """Loaded the unsafe way (a plain unpickler), each crafted checkpoint runs its code."""
    call, proto, _ = payload(kind, marker)
    pt = save({"model": call}, tmp_path / "evil.pt", proto)
    try:
        torch.load(pt, weights_only=False)
    except Exception:  # noqa: BLE001 - torch.hub.load fails after importing hubconf.py (no such entry)
        pass
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_convert_refuses_a_fairseq_checkpoint_naming_a_forbidden_global(kind, tmp_path, marker, capsys):
    call, proto, name = payload(kind, marker)
    pt = save({"model": tiny_weights(), "cfg": {"model": argparse.Namespace(encoder_embed_dim=2)},
               "extra_state": {"metrics": call}}, tmp_path / "src" / "checkpoint.pt", proto)
    with pytest.raises(ForbiddenGlobalError) as err:
        convert(pt, tmp_path / "out")
    refused(err, name, pt)
    assert main(["convert", str(pt), str(tmp_path / "out-cli")]) == 2
    assert f"the pickle names the global {name}" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "out-cli").exists()


def run_checkpoint(root: Path) -> Path:
    """A run checkpoint folder (biomedgpt.json, assets/) for the demo-size model, without its Lightning state."""
    ckpt = root / "checkpoint-00000010"
    ckpt.mkdir(parents=True)
    cfg = BiomedGPTConfig.from_size("demo", vocab_size=64)
    meta = {"run": "evil", "team": "demo", "size": "demo", "model_config": json.loads(cfg.to_json_string(use_diff=False)),
            "task": "vqa", "step": 10, "format": "full"}
    (ckpt / "biomedgpt.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize("kind", PAYLOADS)
def test_export_refuses_a_run_checkpoint_naming_a_forbidden_global(kind, tmp_path, marker):
    call, proto, name = payload(kind, marker)
    ckpt = run_checkpoint(tmp_path / "run")
    lightning = save({"state_dict": {"model.x": torch.zeros(1)}, "global_step": 10, "loops": call},
                     ckpt / "lightning.ckpt", proto)
    with pytest.raises(ForbiddenGlobalError) as err:
        export_checkpoint(ckpt, tmp_path / "export")
    refused(err, name, lightning)
    registry = Registry(str(tmp_path / "registry"))
    with pytest.raises(ForbiddenGlobalError):
        registry.export(ckpt, "demo", "evil")
    assert not marker.exists() and not (tmp_path / "registry").exists()


def sharded_checkpoint(ckpt: Path, call: Call, proto: int) -> Path:
    """A sharded (distributed) Lightning checkpoint whose `.metadata` carries the payload inside genuine metadata."""
    import torch.distributed.checkpoint as dcp

    folder = ckpt / "lightning"
    dcp.save({"state_dict": {"model.x": torch.zeros(2)}}, checkpoint_id=str(folder), no_dist=True)
    genuine = pickle.loads((folder / ".metadata").read_bytes())
    genuine.planner_data = call
    with open(folder / ".metadata", "wb") as fh:
        ForgingPickler(fh, protocol=proto).dump(genuine)
    return folder / ".metadata"


@pytest.mark.parametrize("kind", PAYLOADS)
def test_export_refuses_a_sharded_checkpoint_whose_metadata_names_a_forbidden_global(kind, tmp_path, marker):
    call, proto, name = payload(kind, marker)
    ckpt = run_checkpoint(tmp_path / "run")
    metadata = sharded_checkpoint(ckpt, call, proto)
    with pytest.raises(ForbiddenGlobalError) as err:
        export_checkpoint(ckpt, tmp_path / "export")
    refused(err, name, metadata)
    assert not marker.exists()


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=1)


def tiny_trainer(max_steps: int = 2) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("kind", ["os.system", "dotted-path", "torch.hub.load"])
@pytest.mark.parametrize("form", ["full", "sharded"])
def test_resume_refuses_a_run_checkpoint_naming_a_forbidden_global(kind, form, tmp_path, marker):
    call, proto, name = payload(kind, marker)
    ckpt = run_checkpoint(tmp_path / "run")
    if form == "full":
        bad = save({"state_dict": Tiny().state_dict(), "global_step": 1, "epoch": 0, "loops": call,
                    "pytorch-lightning_version": L.__version__}, ckpt / "lightning.ckpt", proto)
    else:
        bad = sharded_checkpoint(ckpt, call, proto)
    with pytest.raises(ForbiddenGlobalError) as err:
        fit_from_checkpoint(tiny_trainer(), Tiny(), batches(), ckpt)
    refused(err, name, bad)
    assert not marker.exists()


def test_resume_still_restores_a_genuine_checkpoint(tmp_path):
    """The weights-only resume takes a checkpoint Lightning wrote (optimizer, loops and callback state)."""
    trainer = tiny_trainer()
    module = Tiny()
    trainer.fit(module, train_dataloaders=batches())
    ckpt = run_checkpoint(tmp_path / "run")
    trainer.save_checkpoint(ckpt / "lightning.ckpt", weights_only=False)
    resumed = tiny_trainer(max_steps=3)
    fit_from_checkpoint(resumed, Tiny(), batches(), ckpt)
    assert resumed.global_step == 3


def test_model_init_never_unpickles(tmp_path, marker):
    """`model.init` is a model directory; its weights are read from model.safetensors only, never from a pickle."""
    call, proto, _ = payload("os.system", marker)
    init = tmp_path / "init"
    cfg = BiomedGPTConfig.from_size("demo", vocab_size=64)
    cfg.save_pretrained(init)
    save({"encoder.embed_tokens.weight": call}, init / "pytorch_model.bin", proto)
    module = BiomedGPTModule(model_config=json.loads(cfg.to_json_string(use_diff=False)), init_dir=str(init))
    with pytest.raises(OSError, match="model.safetensors"):
        module.build_model()
    assert not marker.exists()
    BiomedGPTForConditionalGeneration(cfg).save_pretrained(init)  # the safetensors beside the pickle is what loads
    assert module.build_model() is not None and not marker.exists()


class TrainMeter:
    """Stands for a fairseq class a genuine checkpoint pickles; saved under fairseq's module name."""

    def __init__(self) -> None:
        self.avg = 2.5


TrainMeter.__module__ = "fairseq.logging.meters"


def test_a_genuine_fairseq_checkpoint_loads_with_inert_placeholders(tmp_path, monkeypatch):
    """fairseq's own classes (not installed here) load as placeholders that keep their state and call nothing;
    Namespaces, tensors and numpy values load as themselves; a dotted name under fairseq is still refused."""
    import numpy as np

    from biomedgpt.model.safe_pickle import Placeholder
    from biomedgpt.model.state_dict_adapter import load_fairseq_checkpoint

    fairseq = {name: types.ModuleType(name) for name in ("fairseq", "fairseq.logging", "fairseq.logging.meters")}
    fairseq["fairseq.logging.meters"].TrainMeter = TrainMeter
    for name, module in fairseq.items():
        monkeypatch.setitem(sys.modules, name, module)
    pt = tmp_path / "checkpoint.pt"
    torch.save({"model": tiny_weights(), "args": argparse.Namespace(arch="ofa_base"),
                "extra_state": {"meter": TrainMeter(), "sum": np.float64(7.0), "history": np.arange(3)}}, pt)
    ckpt = load_fairseq_checkpoint(str(pt))
    meter = ckpt["extra_state"]["meter"]
    assert isinstance(meter, Placeholder) and type(meter).__name__ == "TrainMeter" and meter.state == {"avg": 2.5}
    assert ckpt["args"].arch == "ofa_base" and torch.equal(ckpt["model"]["encoder.embed_tokens.weight"], torch.zeros(4, 2))
    assert ckpt["extra_state"]["sum"] == 7.0 and list(ckpt["extra_state"]["history"]) == [0, 1, 2]
    evil = save({"model": Call("fairseq", "logging.os.system", ("true",))}, tmp_path / "evil.pt", 4)
    with pytest.raises(ForbiddenGlobalError, match=r"fairseq\.logging\.os\.system"):
        load_fairseq_checkpoint(str(evil))


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("form", ["ckpt", "pt"])
def test_vqgan_convert_refuses_a_taming_checkpoint_naming_a_forbidden_global(kind, form, tmp_path, marker, capsys):
    """`biomedgpt vqgan convert` of a taming checkpoint: a Lightning .ckpt whose callbacks hold the payload, or a
    state-dict .pt with the payload among the tensors, is refused naming the global; nothing runs."""
    from biomedgpt.model.vqgan import convert_taming_checkpoint

    call, proto, name = payload(kind, marker)
    if form == "ckpt":
        obj = {"state_dict": {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, "callbacks": {"cb": call}}
    else:
        obj = {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3), "quant_conv.weight": call}
    src = save(obj, tmp_path / "src" / f"last.{form}", proto)
    with pytest.raises(ForbiddenGlobalError) as err:
        convert_taming_checkpoint(src, tmp_path / "out")
    refused(err, name, src)
    assert main(["vqgan", "convert", str(src), str(tmp_path / "out-cli")]) == 2
    assert f"the pickle names the global {name}" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "out-cli").exists()
