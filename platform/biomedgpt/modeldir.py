"""A model directory and what it says about its model; and how a run checkpoint becomes one.

A model directory (`biomedgpt export`, `biomedgpt convert`, a registry version) holds:

    config.json  model.safetensors  tokenizer files
    answers.json     the answer candidates / labels of the run (a list of texts), if it had any
    candidates.json  {task: answers} of a run that mixed several constrained tasks
    training.json    what the run recorded (checkpoint meta: run, team, task, size, image size, source
                     length, training data, step; a multi-label model's `multi_label` and `classes`)
    model_card.json  a registry version's model card (its `tasks` list what it may be asked)

`read_model_meta` is the one reader of these files, and `ModelMeta` the one set of defaults of a
directory that records nothing (image size 256, source length 80, no task: a converted official
checkpoint, served as a generalist). Evaluation, serving and the registry all read a model through it.

A run checkpoint (`<run>/checkpoint-N`, written by `train.checkpoints.StepCheckpointer`) holds the
Lightning state (`lightning/` sharded or `lightning.ckpt`), `biomedgpt.json` (the checkpoint meta, which
export writes as training.json) and `assets/` (tokenizer, answers); `export_checkpoint` turns it into a
model directory. Nothing here imports Lightning or Ray.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .tasks import get_task, task_names

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ANSWERS = "answers.json"
CANDIDATES = "candidates.json"
TRAINING = "training.json"
CARD = "model_card.json"
#: the files of a model directory a worker needs besides the tokenizer's
MODEL_FILES = (CONFIG, WEIGHTS, ANSWERS, TRAINING)
CHECKPOINT_META = "biomedgpt.json"
#: an adapter directory (peft's format; `model/adapters.py`)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ASSETS_DIR = "assets"

DEFAULT_IMAGE_SIZE = 256
DEFAULT_SOURCE_LENGTH = 80


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else default


@dataclass(frozen=True)
class ModelMeta:
    """What a model directory (or a registry model card) says about its model.

    `tasks`: the task families the model was trained for (the card's list, else training.json's task;
    empty when nothing is recorded). `answers`: its answer candidates (answers.json). `classes`: the
    classes, in class order, of a multi-label classification model (None otherwise)."""

    tasks: tuple[str, ...] = ()
    image_size: int = DEFAULT_IMAGE_SIZE
    max_source_length: int = DEFAULT_SOURCE_LENGTH
    size: str | None = None
    run: str | None = None
    train_data: tuple[str, ...] = ()
    answers: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    #: training.json as written (the checkpoint meta), for what the fields above leave out
    training: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def multi_label(self) -> bool:
        return self.classes is not None

    @property
    def generalist(self) -> bool:
        """Whether the model may be asked any task: nothing records what it was trained for (a converted
        official checkpoint), or it was trained on a generalist family (`Task.generalist`: pretraining)."""
        return not self.tasks or any(t in task_names() and get_task(t).generalist for t in self.tasks)

    def trained_for(self, task: str) -> bool:
        """Whether the model was trained for `task`, or is a generalist."""
        return task in self.tasks or self.generalist

    @classmethod
    def from_training(cls, training: Mapping[str, Any], answers: Any = None) -> "ModelMeta":
        """From training.json (the checkpoint meta) and answers.json's list."""
        t = training or {}
        classes = tuple(t["classes"]) if t.get("multi_label") and t.get("classes") else None
        return cls(tasks=(t["task"],) if t.get("task") else (),
                   image_size=int(t.get("image_size") or DEFAULT_IMAGE_SIZE),
                   max_source_length=int(t.get("max_source_length") or DEFAULT_SOURCE_LENGTH),
                   size=t.get("size"), run=t.get("run"), train_data=tuple(t.get("train_data") or ()),
                   answers=tuple(answers) if answers else None, classes=classes, training=dict(t))

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "ModelMeta":
        """From a registry model card (`card_fields` plus the registry's own fields)."""
        classes = tuple(card["classes"]) if card.get("multi_label") and card.get("classes") else None
        return cls(tasks=tuple(card.get("tasks") or ()), image_size=int(card.get("image_size") or DEFAULT_IMAGE_SIZE),
                   max_source_length=int(card.get("max_source_length") or DEFAULT_SOURCE_LENGTH),
                   size=card.get("size"), run=card.get("run"),
                   train_data=tuple(d.get("dataset") for d in card.get("training_data") or () if isinstance(d, dict)),
                   answers=tuple(card["answers"]) if card.get("answers") else None, classes=classes)

    def card_fields(self) -> dict[str, Any]:
        """The model card fields that come from the model directory (the registry adds data, metrics,
        licences and the id)."""
        out: dict[str, Any] = {"tasks": list(self.tasks), "size": self.size, "image_size": self.image_size,
                               "max_source_length": self.max_source_length,
                               "answers": list(self.answers) if self.answers else None}
        if self.classes is not None:  # multi-label classification (ChestMNIST): the label set, in class order
            out.update(multi_label=True, classes=list(self.classes))
        return out


def read_model_meta(model_dir: str | Path) -> ModelMeta:
    """The metadata of a model directory: training.json, answers.json and, for a registry version,
    model_card.json (whose `tasks` list wins: an export may name the tasks of a model)."""
    d = Path(model_dir)
    meta = ModelMeta.from_training(read_json(d / TRAINING, {}), read_json(d / ANSWERS))
    card = read_json(d / CARD, {})
    if card.get("tasks"):
        meta = replace(meta, tasks=tuple(card["tasks"]))
    return meta


def materialise(files: Mapping[str, bytes], directory: Path) -> tuple[Path, Path]:
    """Write a model bundle ({relative path: bytes}, the tokenizer under `tokenizer/`) into `directory`;
    returns (model directory, tokenizer directory)."""
    for rel, data in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return directory, directory / "tokenizer"


# -- run checkpoints ---------------------------------------------------------------------------------


def lightning_checkpoint_path(checkpoint_dir: Path) -> Path:
    """The path to hand to `trainer.fit(ckpt_path=...)` for a checkpoint directory."""
    if (checkpoint_dir / "lightning").is_dir():
        return checkpoint_dir / "lightning"
    if (checkpoint_dir / "lightning.ckpt").is_file():
        return checkpoint_dir / "lightning.ckpt"
    raise FileNotFoundError(f"{checkpoint_dir}: no lightning/ or lightning.ckpt inside; not a BiomedGPT checkpoint")


def read_checkpoint_meta(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / CHECKPOINT_META
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {CHECKPOINT_META}; not a BiomedGPT checkpoint")
    return json.loads(path.read_text())


def checkpoint_model_state(checkpoint_dir: Path, ema: bool = False) -> dict[str, Any]:
    """The full model state dict (keys without the LightningModule's `model.` prefix) of a checkpoint,
    consolidated from its shards in this process (no process group needed). `ema`: the moving-average
    weights the run kept (train/module.py's `ema.` buffers) replace the model's parameters and floating
    buffers (integer buffers stay the model's)."""
    sd = _lightning_state_dict(checkpoint_dir)
    model = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items() if not k.startswith("ema.")}
    if ema:
        averaged = {k[len("ema."):].replace("-", "."): v for k, v in sd.items() if k.startswith("ema.")}
        if not averaged:
            raise ValueError(f"{checkpoint_dir}: the run kept no EMA weights (trainer.ema.enabled was false)")
        from .model import BiomedGPTForConditionalGeneration  # transformers: only when exporting

        tied = BiomedGPTForConditionalGeneration._tied_weights_keys  # {tied name: source name}
        for name in list(model):
            source = tied.get(name, name)
            if source in averaged:
                model[name] = averaged[source]
    return model


def check_checkpoint_pickles(checkpoint_dir: Path) -> Path:
    """The Lightning checkpoint of a run checkpoint directory, after refusing a distributed checkpoint
    whose `.metadata` names a global that is not distributed-checkpoint metadata (torch reads that file
    with plain `pickle.load`: on resume, and when a sharded checkpoint is consolidated). Its other
    files are read with `torch.load(weights_only=True)` by whoever loads them."""
    from .model.safe_pickle import check_dcp_metadata  # torch: only when a checkpoint is read

    path = lightning_checkpoint_path(checkpoint_dir)
    if path.is_dir():
        check_dcp_metadata(path)
    return path


def _lightning_state_dict(checkpoint_dir: Path) -> dict[str, Any]:
    """The LightningModule's state dict of a checkpoint (sharded or full), in this process. Nothing in it
    runs code: the distributed checkpoint's metadata is checked first, every pickle is weights-only."""
    # torch: only when a checkpoint is read (metadata readers such as the serving ingress stay light)
    import torch

    from .model.safe_pickle import torch_load_weights_only

    path = check_checkpoint_pickles(checkpoint_dir)
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "full.pt"
            dcp_to_torch_save(str(path), str(out))
            state = torch_load_weights_only(out, map_location="cpu")
    else:
        state = torch_load_weights_only(path, map_location="cpu")
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{path}: no state_dict in the Lightning checkpoint")
    return {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` = config.json + model.safetensors + tokenizer files + answers.json (if the run
    had answer candidates) + README.md (model card: training data, step, metrics) + training.json (the
    checkpoint meta). A run that kept EMA weights (trainer.ema) exports them, as the official recipes
    evaluate and release the EMA model."""
    # torch and the model code: only when a checkpoint is exported (see _lightning_state_dict)
    import torch

    from .model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from .model.state_dict_adapter import convert_state_dict

    ckpt = Path(checkpoint_dir)
    meta = read_checkpoint_meta(ckpt)
    if meta.get("adapter"):
        return export_adapter_checkpoint(ckpt, meta, Path(out_dir))
    cfg = dict(meta["model_config"])
    cfg.pop("model_type", None)
    cfg.pop("transformers_version", None)
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg))
    sd = convert_state_dict(checkpoint_model_state(ckpt, ema=bool(meta.get("ema"))), model, str(ckpt))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
    model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    assets = ckpt / ASSETS_DIR
    if (assets / "tokenizer").is_dir():
        for f in (assets / "tokenizer").iterdir():
            shutil.copy2(f, out / f.name)
    for name in (ANSWERS, CANDIDATES):
        if (assets / name).is_file():
            shutil.copy2(assets / name, out / name)
    card = [f"# {meta.get('run', 'BiomedGPT model')}", "",
            f"BiomedGPT ({meta.get('size', 'custom')} size) trained by the BiomedGPT platform.", "",
            f"- step: {meta.get('step')}",
            f"- weights: {'EMA (moving average) of the training weights' if meta.get('ema') else 'the training weights'}",
            f"- training data: {', '.join(meta.get('train_data', [])) or 'unknown'}",
            f"- licence of the training data: {meta.get('data_licence', 'see the datasets_spec of each dataset')}",
            f"- metrics at export: {json.dumps(meta.get('metrics', {}), sort_keys=True)}"]
    (out / "README.md").write_text("\n".join(card) + "\n")
    (out / TRAINING).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


# -- adapters ------------------------------------------------------------------------------------------


def adapter_dir_of(path: str | Path) -> bool:
    """Whether `path` is an adapter directory (peft's adapter_config.json, no full weights)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """An adapter directory's adapter_config.json (peft's LoraConfig as JSON), checked to be a LoRA one."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable adapter config: {err}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be LORA")
    return data


def _copy_assets(ckpt: Path, out: Path) -> None:
    assets = ckpt / ASSETS_DIR
    if (assets / "tokenizer").is_dir():
        for f in (assets / "tokenizer").iterdir():
            shutil.copy2(f, out / f.name)
    for name in (ANSWERS, CANDIDATES):
        if (assets / name).is_file():
            shutil.copy2(assets / name, out / name)


def export_adapter_checkpoint(ckpt: Path, meta: dict[str, Any], out: Path) -> Path:
    """An adapter run's checkpoint (trainable state only) -> an adapter directory: adapter_config.json +
    adapter_model.safetensors (peft's format), the tokenizer files and answers of the run, training.json (the
    checkpoint meta, naming the base: init, registry id, sha256) and README.md."""
    # torch, peft and the model code: only when a checkpoint is exported
    import torch

    from .model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from .model.adapters import lora_config, to_peft_dir

    a = meta["adapter"]
    cfg = {k: v for k, v in meta["model_config"].items() if k not in ("model_type", "transformers_version")}
    state = checkpoint_model_state(ckpt)
    base = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**cfg))  # its weights are not written: only the shapes
    config = lora_config(a["rank"], a["alpha"], a["dropout"], a["target_modules"], a.get("trainable") or ())
    out.mkdir(parents=True, exist_ok=True)
    to_peft_dir(base, config, {k: v.float() if v.is_floating_point() else v for k, v in state.items()
                               if isinstance(v, torch.Tensor)}, out, str(ckpt))
    _copy_assets(ckpt, out)
    b = meta.get("base") or {}
    card = [f"# {meta.get('run', 'BiomedGPT adapter')}", "",
            f"A LoRA adapter (rank {a['rank']}, alpha {a['alpha']}) of a BiomedGPT base, trained by the BiomedGPT "
            "platform.", "",
            f"- base: {b.get('id') or b.get('init')} (model.safetensors sha256 {b.get('sha256')})",
            f"- adapted modules: {', '.join(a['target_modules'])}"
            + (f"; trained in full: {', '.join(a['trainable'])}" if a.get("trainable") else ""),
            f"- step: {meta.get('step')}",
            f"- training data: {', '.join(meta.get('train_data', [])) or 'unknown'}",
            f"- metrics at export: {json.dumps(meta.get('metrics', {}), sort_keys=True)}"]
    (out / "README.md").write_text("\n".join(card) + "\n")
    (out / TRAINING).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def adapter_base(adapter_dir: str | Path) -> dict[str, Any]:
    """The base an adapter directory names (training.json's `base`: init, id, sha256)."""
    training = read_json(Path(adapter_dir) / TRAINING, {})
    base = training.get("base") if isinstance(training, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str):
        raise ValueError(f"{adapter_dir}/{TRAINING}: no base (an adapter directory names its base model and its "
                         "sha256)")
    return base


def check_base(base_dir: str | Path, sha256: str, what: str) -> None:
    """The base model directory must hold the weights an adapter was trained on (their sha256)."""
    from .model.adapters import sha256_file  # hashing: only when an adapter meets its base

    weights = Path(base_dir) / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{what}: the base {base_dir} has no {WEIGHTS}")
    if sha256_file(weights) != sha256:
        raise ValueError(f"{what}: the base {base_dir} has changed: its {WEIGHTS} is not the one the adapter was "
                         f"trained on (sha256 {sha256[:12]}...)")


def merge_adapter(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> Path:
    """A standalone model directory: the base with the adapter folded into its weights (peft's merge), the
    adapter's tokenizer, answers and training.json (which records what was merged)."""
    from .model import BiomedGPTForConditionalGeneration
    from .model.adapters import merge

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    base = adapter_base(adapter_dir)
    check_base(base_dir, base["sha256"], str(adapter_dir))
    model = BiomedGPTForConditionalGeneration.from_pretrained(base_dir, use_safetensors=True).eval()
    merged = merge(model, adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    for f in adapter_dir.iterdir():
        if f.is_file() and f.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING, CARD, "README.md", "manifest.json"):
            shutil.copy2(f, out / f.name)
    training = read_json(adapter_dir / TRAINING, {})
    training = {k: v for k, v in training.items() if k not in ("adapter", "base")}
    training["merged"] = {"adapter": read_json(adapter_dir / TRAINING, {}).get("adapter"), "base": base}
    (out / TRAINING).write_text(json.dumps(training, indent=2, sort_keys=True))
    (out / "README.md").write_text(f"# {training.get('run', 'BiomedGPT model')}\n\nA BiomedGPT base "
                                   f"({base.get('id') or base.get('init')}) with a LoRA adapter merged into its "
                                   "weights by the BiomedGPT platform.\n")
    return out
