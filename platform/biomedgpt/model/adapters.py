"""Department adapters: LoRA on the model's `nn.Linear` layers with the `peft` library.

Training (`add_lora`): peft injects LoRA layers into the named projections of a loaded base model in
place (`inject_adapter_in_model`, adapter "default"); only the LoRA weights, and the modules `trainable`
names (peft's `modules_to_save`: e.g. layer norms), require gradients. `DEFAULT_TARGETS` are the attention
and FFN projections of every encoder and decoder layer (self- and cross-attention).

An adapter directory (what export writes, peft's own format): `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors`; `to_peft_dir` writes one from the trainable state of a training run.

Serving (`AdapterSet`): one base model with any number of adapters loaded (`PeftModel.load_adapter`),
and `route(names)`: within the block every LoRA layer gets, per input row, the adapter of the row's
sample (peft's mixed-batch `adapter_names`; "__base__" = the base alone). Rows follow samples through
beam search (k consecutive rows per sample) and through constrained scoring (`routing.sample_rows`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import load_file
from torch import nn

from .routing import current_rows

#: the attention (self and cross) and FFN projections of every encoder and decoder layer
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MIN_RANK, MAX_RANK = 1, 256
BASE = "__base__"


def module_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(names of the nn.Linear modules, names of every module) of `model`."""
    linear, every = set(), set()
    for name, module in model.named_modules():
        if not name:
            continue
        every.add(name)
        if isinstance(module, nn.Linear):
            linear.add(name)
    return linear, every


def matches(target: str, names: set[str]) -> bool:
    """Whether `target` names a module as peft matches it: the whole name or a dotted suffix of it."""
    return any(n == target or n.endswith("." + target) for n in names)


def suffixes(names: set[str]) -> list[str]:
    """Every dotted suffix of the names (what a target may spell), for suggestions."""
    out = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return sorted(out)


def nearest(target: str, names: set[str], n: int = 3) -> list[str]:
    """The spellings of real modules closest to `target` (difflib)."""
    options = [s for s in suffixes(names) if not s[0].isdigit()]
    leaves = sorted({s.rsplit(".", 1)[-1] for s in options})
    return (difflib.get_close_matches(target, options, n=n, cutoff=0.5)
            or sorted({s for s in options if target in s and s.count(".") <= 1}, key=len)[:n] or leaves[:n])


def lora_config(rank: int, alpha: float, dropout: float, target_modules: Sequence[str],
                trainable: Sequence[str] = ()) -> LoraConfig:
    return LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(target_modules),
                      modules_to_save=list(trainable) or None, bias="none")


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """LoRA layers injected into `model` in place (adapter "default"); every other parameter frozen except the
    `modules_to_save` copies. Returns the same model."""
    model = inject_adapter_in_model(config, model, adapter_name="default")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or "modules_to_save" in name)
    return model


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def to_peft_dir(base: nn.Module, config: LoraConfig, trainable_state: Mapping[str, torch.Tensor], out_dir: Path,
                where: str) -> Path:
    """Write peft's adapter directory from the trainable state of a training run (keys as `add_lora` names them,
    on the base model itself): a PeftModel over `base` gets the state, then `save_pretrained`."""
    peft_model = PeftModel(base, config, adapter_name="default")
    expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    state = {f"base_model.model.{k}": v for k, v in trainable_state.items()}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - {n for n, _ in peft_model.named_parameters()})
    if missing or unknown:
        raise ValueError(f"{where}: the checkpoint's adapter state does not fit its adapter config "
                         f"(missing {missing[:3]}, unknown {unknown[:3]})")
    peft_model.load_state_dict(state, strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def merge(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The base with the adapter folded into its weights (a plain model again)."""
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="default", is_trainable=False)
    return peft_model.merge_and_unload()


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable adapter config: {err}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be LORA")
    return data


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class AdapterSet:
    """A base model (in place) and the adapters loaded into it, by id; see the module docstring.

    The first adapter goes through `PeftModel.from_pretrained`, which wraps the targeted projections in peft's
    `LoraLayer`s. Each further plain LoRA adapter whose targets are already wrapped is added layer by layer
    (`LoraLayer.update_layer`, its weights copied from its `adapter_model.safetensors`, its config registered in
    the PeftModel) and unloaded the same way (`LoraLayer.delete_adapter`): peft's `load_adapter`/`delete_adapter`
    walk every parameter of the model for each adapter, so their cost grows with the adapters already resident
    (~0.3 s at 64 on the demo size) where this stays a few ms. Anything else (rank or alpha patterns, DoRA,
    `modules_to_save`, a target not yet wrapped) is loaded by peft itself."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.peft: PeftModel | None = None
        self.names: dict[str, str] = {}  # adapter id -> peft adapter name (a module key: no dots)
        self.sizes: dict[str, int] = {}  # adapter id -> bytes of its weights
        self._count = 0
        self._layers: dict[str, LoraLayer] | None = None  # module path -> peft's LoRA layer (cached)
        self._hooked: list[nn.Module] | None = None  # the modules `route` gives adapter names to (cached)
        self._unwrapped: set[str] = set()  # linear modules peft has not wrapped (cached with the layers)
        self._direct: set[str] = set()  # peft names of the adapters added layer by layer

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self.names

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def _lora_layers(self) -> dict[str, LoraLayer]:
        if self._layers is None:
            modules = list(self.model.named_modules())
            self._layers = {n: m for n, m in modules if isinstance(m, LoraLayer)}
            self._hooked = [m for _, m in modules if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
            self._unwrapped = {n for n, m in modules if isinstance(m, nn.Linear) and ".lora_" not in n
                               and not n.endswith(".base_layer")}
        return self._layers

    def _forget_layers(self) -> None:
        self._layers = self._hooked = None

    def load(self, adapter_id: str, adapter_dir: str | Path) -> str:
        """Load the adapter directory under `adapter_id` (once); returns its peft name."""
        if adapter_id in self.names:
            return self.names[adapter_id]
        read_adapter_config(adapter_dir)
        self._count += 1
        name = f"adapter{self._count}"
        param = next(self.model.parameters())
        size = self._add_direct(name, Path(adapter_dir), param) if self.peft is not None else None
        if size is None:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name,
                                                      is_trainable=False)
            else:
                self.peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
            self._forget_layers()
            for module in self._lora_layers().values():  # the adapter's weights where the base's are, in its dtype
                if name in module.lora_A:
                    module.lora_A[name].to(device=param.device, dtype=param.dtype)
                    module.lora_B[name].to(device=param.device, dtype=param.dtype)
            size = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if f".{name}." in n)
            self.model.eval()
        self.names[adapter_id] = name
        self.sizes[adapter_id] = size
        return name

    def _add_direct(self, name: str, adapter_dir: Path, param: torch.Tensor) -> int | None:
        """Add a plain LoRA adapter to the LoRA layers already there (class docstring); returns the bytes of its
        weights, or None (nothing changed) when it is not such an adapter."""
        assert self.peft is not None
        config = LoraConfig.from_pretrained(str(adapter_dir))
        targets = config.target_modules
        if (not isinstance(targets, (list, set, tuple)) or config.modules_to_save or config.use_dora
                or config.rank_pattern or config.alpha_pattern or config.lora_bias or config.use_rslora
                or config.layers_to_transform is not None or getattr(config, "target_parameters", None)):
            return None
        layers = self._lora_layers()
        wanted = {path: layer for path, layer in layers.items() if any(path == t or path.endswith("." + t)
                                                                        for t in targets)}
        if any(matches(t, self._unwrapped) and not any(p == t or p.endswith("." + t) for p in wanted) for t in targets):
            return None  # a target that peft has not wrapped yet
        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        expected = {f"base_model.model.{path}.lora_{ab}.weight" for path in wanted for ab in "AB"}
        if not wanted or set(state) != expected:
            return None
        config.init_lora_weights = False  # the weights come from the file
        config.inference_mode = True
        size = 0
        with torch.no_grad():
            for path, layer in wanted.items():
                layer.update_layer(name, config.r, lora_alpha=config.lora_alpha, config=config, target_name=path)
                for module in (layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]):
                    module.eval()  # the model is served in eval mode: no dropout on the new adapter either
                for ab, module in (("A", layer.lora_A[name]), ("B", layer.lora_B[name])):
                    weight = state[f"base_model.model.{path}.lora_{ab}.weight"]
                    if tuple(weight.shape) != tuple(module.weight.shape):
                        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: {path}.lora_{ab} has shape "
                                         f"{tuple(weight.shape)}, the model's layer {tuple(module.weight.shape)}")
                    module.to(device=param.device, dtype=param.dtype)
                    module.weight.copy_(weight)
                    module.weight.requires_grad_(False)
                    size += module.weight.numel() * module.weight.element_size()
        self.peft.peft_config[name] = config
        self._direct.add(name)
        return size

    def unload(self, adapter_id: str) -> None:
        name = self.names.pop(adapter_id, None)
        self.sizes.pop(adapter_id, None)
        if name is None or self.peft is None:
            return
        if name in self._direct:
            self._direct.discard(name)
            self.peft.peft_config.pop(name, None)
            with warnings.catch_warnings():  # "adapter X was active ...": serving names adapters per sample
                warnings.simplefilter("ignore")
                for layer in self._lora_layers().values():
                    if name in layer.lora_A:
                        layer.delete_adapter(name)
        else:
            self.peft.delete_adapter(name)
            self._forget_layers()

    def names_for(self, adapter_ids: Sequence[str | None]) -> list[str]:
        """Per sample, the peft name of its adapter (None: the base alone)."""
        out = []
        for a in adapter_ids:
            if a is None:
                out.append(BASE)
            elif a not in self.names:
                raise KeyError(f"adapter {a} is not loaded")
            else:
                out.append(self.names[a])
        return out

    @contextmanager
    def route(self, adapter_ids: Sequence[str | None]) -> Iterator[None]:
        """Within the block, each sample of the model's calls goes through its own adapter (see the module
        docstring). With no adapter loaded, nothing to do."""
        if self.peft is None:
            if any(a is not None for a in adapter_ids):
                raise KeyError("no adapter is loaded")
            yield
            return
        names = self.names_for(adapter_ids)

        def per_row(n: int) -> list[str]:
            rows = current_rows()
            row_names = names if rows is None else [names[int(i)] for i in rows.tolist()]
            if len(row_names) == n:
                return row_names
            if row_names and n % len(row_names) == 0:  # beam search: k consecutive rows per sample
                k = n // len(row_names)
                return [x for x in row_names for _ in range(k)]
            raise RuntimeError(f"a batch of {n} rows for {len(row_names)} samples: cannot route adapters")

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            kwargs["adapter_names"] = per_row(x.shape[0])
            return args, kwargs

        self._lora_layers()
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self._hooked or []]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
