"""Department adapters: LoRA on the model's `nn.Linear` layers with the `peft` library.

Training (`add_lora`): peft injects LoRA layers into the named projections of a loaded base model in
place (`inject_adapter_in_model`, adapter "default"); only the LoRA weights, and the modules `trainable`
names (peft's `modules_to_save`: e.g. layer norms), require gradients. `DEFAULT_TARGETS` are the attention
and FFN projections of every encoder and decoder layer (self- and cross-attention).

An adapter directory (what export writes, peft's own format): `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors`; `to_peft_dir` writes one from the trainable state of a training run.

Serving (`AdapterSet`): one base model with any number of adapters loaded (the first through peft, the
next added to the LoRA layers peft made, `attach_lora`), and `route(names)`: within the block every LoRA
layer applies, per input row, the adapter of the row's sample ("__base__" = the base alone), all rows in one
batched step over the stacked weights of the batch's adapters (`Stacked`; peft's own mixed-batch
`adapter_names` forward, a Python loop over the adapters, only where that step does not apply). Rows follow
samples through beam search (k consecutive rows per sample) and through constrained scoring
(`routing.sample_rows`). Training, merging and export use peft alone.
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
from peft.tuners.lora import Linear as LoraLinear
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


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` without bias over `weight` as given, frozen, in eval mode. Made without `nn.Linear.__init__`,
    which would first allocate and initialise a weight of its own (~0.1 ms a module, even on the meta device)."""
    module = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(module)
    module.in_features, module.out_features = int(weight.shape[1]), int(weight.shape[0])
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.register_parameter("bias", None)
    module.training = False
    return module


def attach_lora(layer: LoraLinear, name: str, rank: int, alpha: float, dropout: float, a: torch.Tensor,
                b: torch.Tensor) -> None:
    """Register one plain LoRA adapter on a LoRA layer peft made, for inference: `a` (rank x in) and `b`
    (out x rank), already where and in the dtype the layer's base weight is. It sets the entries peft's
    `update_layer` makes for the adapter and nothing else: `update_layer` also sets every adapter already in the
    layer again (`set_adapter` walks them all, `_move_adapter_to_device_of_base_layer` their parameters) and
    initialises weights that a file then overwrites, a cost that grows with the adapters resident."""
    layer.r[name] = rank
    layer.lora_alpha[name] = alpha
    layer.scaling[name] = alpha / rank
    layer.lora_dropout[name] = (nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()).eval()
    layer.lora_A[name] = _frozen_linear(a)
    layer.lora_B[name] = _frozen_linear(b)
    layer.lora_bias[name] = False
    layer.use_rslora[name] = False
    layer.use_dora[name] = False


#: a layer whose adapters in the batch the batched LoRA step does not cover: peft's mixed-batch forward answers
PEFT_PATH = "peft"


class Stacked:
    """One LoRA layer's weights for the adapters of a batch that it holds, side by side: `a` (R x in) their A
    matrices one under another, `b` (out x R) their B matrices one beside another (R: the sum of their ranks);
    per column of the R, `owner` the index of its adapter in the batch and `scale` that adapter's scaling. `key`:
    the (owner, rank, scaling) pattern, which the layers of a model mostly share (their row masks too)."""

    __slots__ = ("a", "b", "owner", "scale", "key")

    def __init__(self, layer: LoraLinear, members: Sequence[tuple[int, str]]) -> None:
        with torch.no_grad():
            a = [layer.lora_A[n].weight for _, n in members]
            b = [layer.lora_B[n].weight for _, n in members]
            self.a = a[0] if len(a) == 1 else torch.cat(a)  # one adapter: its own weights, no copy
            self.b = b[0] if len(b) == 1 else torch.cat(b, dim=1)
            ranks = [w.shape[0] for w in a]
            self.owner = torch.tensor([j for (j, _), r in zip(members, ranks) for _ in range(r)], dtype=torch.long,
                                      device=self.a.device)
            self.scale = torch.tensor([float(layer.scaling[n]) for (_, n), r in zip(members, ranks) for _ in range(r)],
                                      dtype=self.a.dtype, device=self.a.device)
        self.key = tuple((j, r, float(layer.scaling[n])) for (j, n), r in zip(members, ranks))


def stack_layer(layer: LoraLayer, batch: Sequence[str]) -> Stacked | str | None:
    """`layer`'s `Stacked` weights for the adapters `batch` names (peft names, in the batch's index order); None
    when it holds none of them (the base layer alone), `PEFT_PATH` when one of them is not a plain LoRA on a plain
    peft `Linear` (DoRA and other variants, a LoRA bias, a merged or disabled layer): peft's own mixed-batch
    forward."""
    members = [(j, n) for j, n in enumerate(batch) if n in layer.lora_A]
    if not members:
        return None
    if (type(layer) is not LoraLinear or layer.merged or layer.disable_adapters
            or getattr(layer, "fan_in_fan_out", False)
            or any(n in layer.lora_variant or layer.lora_bias.get(n) for _, n in members)):
        return PEFT_PATH
    return Stacked(layer, members)


class AdapterSet:
    """A base model (in place) and the adapters loaded into it, by id; see the module docstring.

    Loading. The first adapter goes through `PeftModel.from_pretrained`, which wraps the targeted projections in
    peft's `LoraLayer`s. Each further plain LoRA adapter whose targets are already wrapped (peft `Linear`s) is added
    layer by layer (`attach_lora`: the entries peft's `update_layer` would make, its weights from its
    `adapter_model.safetensors`; its config registered in the PeftModel) and unloaded the same way
    (`LoraLayer.delete_adapter`): peft's `load_adapter`/`delete_adapter` walk every parameter of the model for each
    adapter, and its `update_layer` sets every adapter of a layer again, costs that grow with the adapters resident
    (~0.3 s at 64 on the demo size) where this stays a few ms whatever the count. Anything else (rank or alpha
    patterns, DoRA, `modules_to_save`, a target not yet wrapped, another layer type) is loaded by peft itself.

    Serving (`route`). Peft's mixed-batch forward (`adapter_names`) loops in Python over a batch's adapters in
    every LoRA layer call, one masked sub-batch at a time. Within `route` each peft `Linear` answers instead with
    one batched LoRA step for all rows: `base(x) + ((x @ A_cat^T) * mask) @ B_cat^T`, where `A_cat`/`B_cat` are the
    layer's weights of the batch's adapters side by side (`Stacked`) and `mask` (rows x R) keeps, for each row, the
    columns of its own adapter times that adapter's scaling (none: the base alone, "__base__"). The same sums as
    peft's per-adapter `B(A(x)) * scaling` (up to float rounding); dropout is off at inference. The stacked weights
    are made on a layer's first call for a set of adapters and kept while the next batches name the same set: a
    cache of the current batch's adapters only (at most a batch's worth of their weights), dropped whenever an
    adapter is loaded or unloaded. Layers `stack_layer` leaves to peft get its `adapter_names`, as do the
    `modules_to_save` wrappers. Training, merging and export keep using peft as it is."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.peft: PeftModel | None = None
        self.names: dict[str, str] = {}  # adapter id -> peft adapter name (a module key: no dots)
        self.sizes: dict[str, int] = {}  # adapter id -> bytes of its weights
        self._count = 0
        self._layers: dict[str, LoraLayer] | None = None  # module path -> peft's LoRA layer (cached)
        self._hooked: list[nn.Module] | None = None  # the `modules_to_save` wrappers `route` names adapters to (cached)
        self._unwrapped: set[str] = set()  # linear modules peft has not wrapped (cached with the layers)
        self._direct: set[str] = set()  # peft names of the adapters added layer by layer
        #: the stacked weights of the last batch's adapters: (their peft names, {layer: Stacked | PEFT_PATH | None})
        self._stacks: tuple[tuple[str, ...], dict[nn.Module, Stacked | str | None]] | None = None

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self.names

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def _lora_layers(self) -> dict[str, LoraLayer]:
        if self._layers is None:
            modules = list(self.model.named_modules())
            self._layers = {n: m for n, m in modules if isinstance(m, LoraLayer)}
            self._hooked = [m for _, m in modules if isinstance(m, AuxiliaryTrainingWrapper)]
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
        self._stacks = None
        self._count += 1
        name = f"adapter{self._count}"
        param = next(self.model.parameters())
        size = self._add_direct(name, Path(adapter_dir)) if self.peft is not None else None
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

    def _add_direct(self, name: str, adapter_dir: Path) -> int | None:
        """Add a plain LoRA adapter to the LoRA layers already there (`attach_lora`, class docstring); returns the
        bytes of its weights, or None (nothing changed) when it is not such an adapter. A weight of the wrong shape
        is refused before any layer changes."""
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
        if any(type(layer) is not LoraLinear for layer in wanted.values()):
            return None
        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        expected = {f"base_model.model.{path}.lora_{ab}.weight" for path in wanted for ab in "AB"}
        if not wanted or set(state) != expected:
            return None
        for path, layer in wanted.items():
            for ab, shape in (("A", (config.r, layer.in_features)), ("B", (layer.out_features, config.r))):
                weight = state[f"base_model.model.{path}.lora_{ab}.weight"]
                if tuple(weight.shape) != shape:
                    raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: {path}.lora_{ab} has shape "
                                     f"{tuple(weight.shape)}, the model's layer {shape}")
        size = 0
        with torch.no_grad():
            for path, layer in wanted.items():
                base = layer.get_base_layer().weight
                a, b = (state[f"base_model.model.{path}.lora_{ab}.weight"].to(device=base.device, dtype=base.dtype,
                                                                                copy=True) for ab in "AB")
                attach_lora(layer, name, config.r, config.lora_alpha, config.lora_dropout, a, b)
                size += a.numel() * a.element_size() + b.numel() * b.element_size()
        config.init_lora_weights = False  # the weights came from the file
        config.inference_mode = True
        self.peft.peft_config[name] = config
        self._direct.add(name)
        return size

    def unload(self, adapter_id: str) -> None:
        """Unload an adapter: its weights leave the LoRA layers, and the batched path's stacked weights (which may
        hold a copy of them) are dropped."""
        name = self.names.pop(adapter_id, None)
        self.sizes.pop(adapter_id, None)
        if name is None or self.peft is None:
            return
        self._stacks = None
        if name in self._direct:
            self._direct.discard(name)
            self.peft.peft_config.pop(name, None)
            with warnings.catch_warnings():  # "adapter X was active ...": serving names adapters per sample
                warnings.simplefilter("ignore")
                for layer in self._lora_layers().values():
                    if name in layer.lora_A:
                        if name in layer.active_adapters:
                            # no other adapter made active: peft's `set_adapter` would walk every adapter of the
                            # layer (~30 ms a model at 64 resident), and serving names adapters per row anyway
                            layer._active_adapter = [a for a in layer.active_adapters if a != name]
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

    def stacks_for(self, batch: tuple[str, ...]) -> dict[nn.Module, Stacked | str | None]:
        """The per-layer stacked weights of the adapters `batch` names (peft names), filled as layers are called:
        those of the last batch when it named the same adapters, else a new (empty) cache in its place."""
        if self._stacks is None or self._stacks[0] != batch:
            self._stacks = (batch, {})
        return self._stacks[1]

    @contextmanager
    def route(self, adapter_ids: Sequence[str | None]) -> Iterator[None]:
        """Within the block, each sample of the model's calls goes through its own adapter, all rows of a LoRA
        layer in one batched step (class docstring). With no adapter loaded, nothing to do."""
        if self.peft is None:
            if any(a is not None for a in adapter_ids):
                raise KeyError("no adapter is loaded")
            yield
            return
        names = self.names_for(adapter_ids)
        batch = tuple(sorted({n for n in names if n != BASE}))  # the batch's adapters (sorted: the cache's key)
        index = {n: j for j, n in enumerate(batch)}
        sample_adapter = torch.tensor([index.get(n, -1) for n in names], dtype=torch.long)  # -1: the base alone
        stacks = self.stacks_for(batch)
        masks: dict[tuple, tuple[Any, torch.Tensor]] = {}  # (Stacked.key, rows, id of current_rows) -> (it, mask)

        def per_row(n: int) -> list[str]:
            """Per row of a call of `n` rows, the peft name of its adapter (peft's `adapter_names`)."""
            rows = current_rows()
            row_names = names if rows is None else [names[int(i)] for i in rows.tolist()]
            if len(row_names) == n:
                return row_names
            if row_names and n % len(row_names) == 0:  # beam search: k consecutive rows per sample
                k = n // len(row_names)
                return [x for x in row_names for _ in range(k)]
            raise RuntimeError(f"a batch of {n} rows for {len(row_names)} samples: cannot route adapters")

        def row_adapters(n: int, rows: torch.Tensor | None) -> torch.Tensor:
            """Per row, the index of its adapter in `batch` (-1: none); as `per_row`."""
            per_sample = sample_adapter if rows is None else sample_adapter[rows.to("cpu", torch.long)]
            if per_sample.numel() == n:
                return per_sample
            if per_sample.numel() and n % per_sample.numel() == 0:
                return per_sample.repeat_interleave(n // per_sample.numel())
            raise RuntimeError(f"a batch of {n} rows for {per_sample.numel()} samples: cannot route adapters")

        def mask_for(st: Stacked, n: int) -> torch.Tensor:
            """(rows x R): each row's own adapter's columns at its scaling, zero elsewhere (cached for the block;
            the rows tensor is held with it, so that its id is not reused)."""
            rows = current_rows()
            key = (st.key, n, None if rows is None else id(rows))
            hit = masks.get(key)
            if hit is None or hit[0] is not rows:
                owner = row_adapters(n, rows).to(st.owner.device)
                hit = masks[key] = (rows, (owner[:, None] == st.owner[None, :]).to(st.scale.dtype) * st.scale)
            return hit[1]

        def batched(layer: LoraLayer):
            def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                st = stacks[layer] if layer in stacks else stacks.setdefault(layer, stack_layer(layer, batch))
                if st is PEFT_PATH:
                    return type(layer).forward(layer, x, *args, adapter_names=per_row(x.shape[0]), **kwargs)
                result = layer.base_layer(x, *args, **kwargs)
                if st is None:
                    return result
                mask = mask_for(st, x.shape[0])
                if x.dim() > 2:
                    mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
                h = torch.nn.functional.linear(x.to(st.a.dtype), st.a) * mask
                return result + torch.nn.functional.linear(h, st.b).to(result.dtype)
            return forward

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            kwargs["adapter_names"] = per_row(x.shape[0])
            return args, kwargs

        layers = list(self._lora_layers().values())
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self._hooked or []]
        try:
            for layer in layers:  # an instance attribute: nn.Module calls it in place of the class's forward
                layer.forward = batched(layer)
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
            for h in handles:
                h.remove()
