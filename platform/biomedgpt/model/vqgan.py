"""The VQGAN image tokenizer of image infilling: the encode path of taming-transformers' `GumbelVQ`.

OFA and BiomedGPT train image infilling (masked image modelling) to predict the VQGAN codes of the centre
of each 256 px image: 16 x 16 = 256 ids in [0, 8192), row-major (index = 16 * row + col), computed by the
released `vqgan_gumbel_f8_8192` checkpoint of taming-transformers. This module reimplements what that
needs, in plain torch with taming's parameter names, for any config of the family (`ch`, `ch_mult`,
`num_res_blocks`, `attn_resolutions`, `resolution`, `z_channels`, `embed_dim`, `n_embed`):

- the `Encoder`: `conv_in`; per level `num_res_blocks` ResnetBlocks (GroupNorm(32, eps 1e-6), swish, 3x3
  conv, twice, a 1x1 `nin_shortcut` when the width changes), each followed by an AttnBlock when the
  level's *nominal* resolution (`resolution` halved per level, whatever the input size) is in
  `attn_resolutions`; a Downsample (zero pad right and bottom by 1, 3x3 stride-2 conv) after every
  level but the last; the middle (block, attention, block); GroupNorm, swish, 3x3 `conv_out`;
- `quant_conv` (1x1) and the Gumbel quantiser's `proj` (1x1 to `n_embed` logits);
- the code of a position: **argmax of the logits**. Taming's `GumbelQuantize` samples
  `gumbel_softmax(logits, hard=True)` even in eval mode, so the codes OFA/BiomedGPT stored are a random
  draw from softmax(logits) (irreproducible: they depend on the CUDA random state); ours are the
  deterministic mode of that distribution. The codebook (`quantize.embed`) is kept but does not pick codes.

The infilling recipe (`recipe_crop`): the image as RGB, resized to 256 x 256 with bicubic filtering when it
is not already (the aspect ratio is not kept, as BiomedGPT's preprocessing does), the centre box
(64, 64, 192, 192) cut out, values `2 * x / 255 - 1`. BiomedGPT's script also crops to the Otsu
foreground and re-encodes JPEGs first; that is not applied here.

A model directory (`save` / `VQGANTokenizer.from_pretrained`) is `config.json` (the taming params plus
provenance) and `model.safetensors`. `convert_taming_checkpoint` writes one from a taming checkpoint (a
Lightning `.ckpt` whose `state_dict` holds the weights, a plain state-dict `.pt`, or an `.npz` of arrays
by name) without running any code the file names: pickles go through `safe_pickle`'s exact-pair
unpickler, `.npz` files are read with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import safe_pickle

MODEL_TYPE = "vqgan_gumbel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: the infilling recipe: the image resized to RECIPE_SIZE square, then this centre box (left, upper, right, lower)
RECIPE_SIZE = 256
RECIPE_BOX = (64, 64, 192, 192)
#: prefixes of a taming GumbelVQ checkpoint that encoding does not use (named by the converter, never loaded)
IGNORED_PREFIXES = {"decoder.": "the decoder (reconstructions only)",
                    "post_quant_conv.": "the decoder's input convolution",
                    "loss.": "the training loss (discriminator, LPIPS)"}
#: namespaces whose classes a Lightning/taming checkpoint may pickle (callback states, hyper-parameters):
#: they load as inert placeholders; every other global is refused
PLACEHOLDER_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "taming")
#: the released vqgan_gumbel_f8_8192's model.yaml params (taming's heibox copy), for benchmarks and tests
GUMBEL_F8_8192 = {"kl_weight": 1e-8, "embed_dim": 256, "n_embed": 8192,
                  "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3,
                               "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2,
                               "attn_resolutions": [32], "dropout": 0.0}}


class VQGANError(ValueError):
    """A VQGAN config, checkpoint, model directory or image that cannot be used; the message names it."""


# -- config ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQGANConfig:
    """The architecture of a taming GumbelVQ (ddconfig fields, `embed_dim`, `n_embed`, `kl_weight`)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    resolution: int = 256
    in_channels: int = 3
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 8192
    dropout: float = 0.0
    kl_weight: float = 1e-8

    def __post_init__(self) -> None:
        ints = {"ch": self.ch, "num_res_blocks": self.num_res_blocks, "resolution": self.resolution,
                "in_channels": self.in_channels, "z_channels": self.z_channels, "embed_dim": self.embed_dim,
                "n_embed": self.n_embed}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VQGANError(f"VQGAN config: {name} must be a positive integer, got {value!r}")
        if not self.ch_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise VQGANError(f"VQGAN config: ch_mult must be a list of positive integers, got {list(self.ch_mult)}")
        if self.z_channels != self.embed_dim:
            raise VQGANError(f"VQGAN config: GumbelVQ needs z_channels == embed_dim (its quantiser projects "
                             f"z_channels), got {self.z_channels} and {self.embed_dim}")
        for width in {self.ch * m for m in self.ch_mult}:
            if width % 32:
                raise VQGANError(f"VQGAN config: every level's width (ch * ch_mult) must be a multiple of 32 "
                                 f"(GroupNorm with 32 groups), got {width}")

    @property
    def factor(self) -> int:
        """Pixels per code along a side (8 for f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def attn_levels(self) -> tuple[int, ...]:
        """Levels with attention: their nominal resolution (from `resolution`, not the input) is listed."""
        return tuple(i for i in range(len(self.ch_mult)) if self.resolution // 2 ** i in self.attn_resolutions)

    def to_taming(self) -> dict[str, Any]:
        """The `model.params` of a taming yaml."""
        return {"kl_weight": self.kl_weight, "embed_dim": self.embed_dim, "n_embed": self.n_embed,
                "ddconfig": {"double_z": False, "z_channels": self.z_channels, "resolution": self.resolution,
                             "in_channels": self.in_channels, "out_ch": 3, "ch": self.ch,
                             "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                             "attn_resolutions": list(self.attn_resolutions), "dropout": self.dropout}}

    @classmethod
    def from_taming(cls, data: Any, source: str = "<config>") -> "VQGANConfig":
        """From a taming config: the whole yaml (`model: {target, params}`), `model` or its `params`."""
        if not isinstance(data, Mapping):
            raise VQGANError(f"{source}: a taming config must be a mapping, got {type(data).__name__}")
        if "model" in data:
            data = data["model"]
        target = data.get("target") if isinstance(data, Mapping) else None
        if target is not None and target != "taming.models.vqgan.GumbelVQ":
            raise VQGANError(f"{source}: model.target is {target!r}; only taming.models.vqgan.GumbelVQ (the "
                             "Gumbel quantiser of vqgan_gumbel_f8_8192) is supported")
        if isinstance(data, Mapping) and "params" in data:
            data = data["params"]
        if not isinstance(data, Mapping) or not isinstance(data.get("ddconfig"), Mapping):
            raise VQGANError(f"{source}: no model.params.ddconfig (expected a taming GumbelVQ config)")
        dd = data["ddconfig"]
        if dd.get("double_z", False):
            raise VQGANError(f"{source}: ddconfig.double_z is true; GumbelVQ encoders have double_z: false")
        known = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                 "attn_resolutions", "dropout"}
        unknown = sorted(set(dd) - known)
        if unknown:
            raise VQGANError(f"{source}: ddconfig: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels") if k not in dd]
        missing += [k for k in ("embed_dim", "n_embed") if k not in data]
        if missing:
            raise VQGANError(f"{source}: missing {', '.join(missing)} (model.params / model.params.ddconfig)")
        try:
            return cls(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                       attn_resolutions=tuple(dd["attn_resolutions"]), resolution=dd.get("resolution", 256),
                       in_channels=dd.get("in_channels", 3), z_channels=dd["z_channels"],
                       embed_dim=data["embed_dim"], n_embed=data["n_embed"], dropout=float(dd.get("dropout", 0.0)),
                       kl_weight=float(data.get("kl_weight", 1e-8)))
        except TypeError as err:
            raise VQGANError(f"{source}: {err}") from None
        except VQGANError as err:
            raise VQGANError(f"{source}: {err}") from None

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], source: str = "<weights>") -> "VQGANConfig":
        """The architecture read off the weights' shapes; `resolution` is assumed 256 (it only places the
        attention: a level has attention when 256 / 2**level is one of the weights' attention levels)."""
        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise VQGANError(f"{source}: no {key!r}: not a taming GumbelVQ checkpoint (or give --config)")
            return tuple(sd[key].shape)

        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        if not levels or levels != list(range(len(levels))):
            raise VQGANError(f"{source}: no encoder.down.<level> weights in order: not a taming GumbelVQ checkpoint")
        ch = shape("encoder.conv_in.weight")[0]
        ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
        blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        attn = tuple(256 // 2 ** i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd))
        return cls(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, attn_resolutions=attn or (),
                   in_channels=shape("encoder.conv_in.weight")[1], z_channels=shape("encoder.conv_out.weight")[0],
                   embed_dim=shape("quant_conv.weight")[0], n_embed=shape("quantize.proj.weight")[0])


# -- the network (taming's names) ----------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (taming's AttnBlock; the same arithmetic through
    torch's fused attention)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))  # right and bottom only


class _Level(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        ch, mult = config.ch, (1,) + tuple(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        attn_levels = config.attn_levels
        block_in = ch
        for i, m in enumerate(config.ch_mult):
            level = _Level()
            block_in, block_out = ch * mult[i], ch * m
            for _ in range(config.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if i in attn_levels:
                    level.attn.append(AttnBlock(block_in))
            if i != len(config.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, config.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class GumbelQuantizeHead(nn.Module):
    """The parts of taming's GumbelQuantize that codes come from (`proj`) and the codebook (`embed`)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.z_channels, config.n_embed, 1)
        self.embed = nn.Embedding(config.n_embed, config.embed_dim)


class VQGANEncoder(nn.Module):
    """encoder -> quant_conv -> quantize.proj: the logits over the codebook at every position."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = GumbelQuantizeHead(config)

    def prequant(self, x: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(x)): (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_embed, H/f, W/f) logits of the codes."""
        return self.quantize.proj(self.prequant(x))

    def codes(self, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(B, H/f, W/f) int64 codes: the argmax of the logits (see the module doc), computed `chunk` images
        at a time after the encoder so that the B x n_embed x h x w logits are never all held at once."""
        z = self.prequant(x)
        return torch.cat([self.quantize.proj(z[i:i + chunk]).argmax(dim=1) for i in range(0, z.shape[0], chunk)])


# -- images -----------------------------------------------------------------------------------------------


def open_image(data: bytes | str | os.PathLike | Image.Image, source: str = "<image>") -> Image.Image:
    """An RGB PIL image from bytes, a path or an image (grayscale replicated to 3 channels)."""
    try:
        if isinstance(data, Image.Image):
            img = data
        elif isinstance(data, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(data)))
        else:
            img = Image.open(data)
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise VQGANError(f"{source}: not a readable image ({err})") from None


def recipe_crop(img: Image.Image) -> Image.Image:
    """The infilling recipe's input: RGB, resized to 256 x 256 bicubic when it is not (aspect ratio not
    kept), then the centre box (64, 64, 192, 192): 128 x 128."""
    img = img.convert("RGB")
    if img.size != (RECIPE_SIZE, RECIPE_SIZE):
        img = img.resize((RECIPE_SIZE, RECIPE_SIZE), Image.BICUBIC)
    return img.crop(RECIPE_BOX)


def to_input(img: Image.Image) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1]: ToTensor (x / 255) then 2x - 1, bit for bit as the reference."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return (arr * np.float32(2.0) - np.float32(1.0)).transpose(2, 0, 1).copy()


def prepare(data: bytes | str | os.PathLike | Image.Image, *, whole: bool = False, factor: int = 8,
            source: str = "<image>") -> np.ndarray:
    """The encoder input of one image: the infilling recipe's centre crop, or with `whole` the image as
    given (its sides must be multiples of `factor`, the model's pixels per code)."""
    img = open_image(data, source)
    if not whole:
        return to_input(recipe_crop(img))
    w, h = img.size
    if w % factor or h % factor:
        raise VQGANError(f"{source}: {w}x{h} pixels; --whole encodes the image as given, so its sides must be "
                         f"multiples of {factor} (the model's pixels per code); resize it, or leave out --whole "
                         f"for the infilling recipe (256 x 256, centre 128 x 128)")
    return to_input(img)


# -- the tokenizer -------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class VQGANTokenizer:
    """A loaded VQGAN model directory: images -> code grids."""

    def __init__(self, model: VQGANEncoder, *, path: str = "", device: str | torch.device = "cpu",
                 meta: Mapping[str, Any] | None = None) -> None:
        self.model = model.eval().to(device)
        self.config = model.config
        self.path = path
        self.device = torch.device(device)
        self.meta = dict(meta or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "VQGANTokenizer":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights.is_file():
            raise VQGANError(f"{folder}: not a VQGAN model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}; "
                             "make one with `biomedgpt vqgan convert`)")
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise VQGANError(f"{cfg_path}: not readable JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
            raise VQGANError(f"{cfg_path}: model_type must be {MODEL_TYPE!r} (a directory written by "
                             f"`biomedgpt vqgan convert`), got {meta.get('model_type') if isinstance(meta, dict) else meta!r}")
        config = VQGANConfig.from_taming(meta.get("taming"), f"{cfg_path}: taming")
        try:
            sd = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise VQGANError(f"{weights}: not a readable safetensors file ({err})") from None
        model = VQGANEncoder(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise VQGANError(f"{weights}: does not match {cfg_path} (missing {missing[:5]}, unexpected {unexpected[:5]})")
        bad = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
        if bad:
            raise VQGANError(f"{weights}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the config needs "
                             f"{tuple(expected[bad[0]].shape)}")
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        meta["weights_sha256"] = meta.get("weights_sha256") or _sha256_file(weights)
        return cls(model, path=str(folder), device=device, meta=meta)

    @property
    def fingerprint(self) -> str:
        """What identifies the codes this tokenizer gives: its weights' sha256 and the recipe."""
        return hashlib.sha256(json.dumps({"weights": self.meta.get("weights_sha256", ""),
                                          "taming": self.config.to_taming(), "codes": "argmax",
                                          "recipe": [RECIPE_SIZE, list(RECIPE_BOX)]},
                                         sort_keys=True).encode()).hexdigest()

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) int64 codes (on the CPU)."""
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        return self.model.codes(x).cpu()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        return self.model.logits(x).cpu()

    def encode(self, images: Sequence[bytes | str | os.PathLike | Image.Image], *, whole: bool = False,
               batch_size: int = 16, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Code grids (int64 (h, w), row-major) of `images`: the infilling recipe's 16 x 16, or with `whole`
        each image as given. Images of one size are encoded `batch_size` at a time."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        inputs = [prepare(img, whole=whole, factor=self.config.factor, source=name) for img, name in zip(images, names)]
        out: list[np.ndarray | None] = [None] * len(inputs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(x.shape, []).append(i)
        for idx in by_shape.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                codes = self.encode_tensor(np.stack([inputs[i] for i in part])).numpy()
                for i, c in zip(part, codes):
                    out[i] = c.astype(np.int64)
        return out  # type: ignore[return-value]


def codes_npy(codes: np.ndarray) -> bytes:
    """The `codes.npy` member of a shard sample: the grid as int16 (n_embed <= 32768) or int32, row-major."""
    arr = np.asarray(codes)
    arr = arr.astype(np.int16 if arr.size == 0 or int(arr.max()) < 2 ** 15 else np.int32)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# -- conversion of taming checkpoints ------------------------------------------------------------------


@dataclass
class VQGANConversion:
    """What `convert_taming_checkpoint` did: the keys it used, the ones it ignored (by prefix, with why),
    where the config came from."""

    source: str
    destination: str
    config_from: str
    used: int
    parameters: int
    ignored: dict[str, int] = field(default_factory=dict)
    other_entries: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _tensor_pickle() -> Any:
    allowed = dict(safe_pickle.tensor_allowed())
    return safe_pickle.restricted(allowed, PLACEHOLDER_ROOTS)


def read_taming_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, the checkpoint's other top-level entries) of a taming checkpoint: a Lightning `.ckpt`
    (weights under `state_dict`), a plain state-dict `.pt`, or an `.npz` of arrays by name. Nothing the
    file names runs: pickles go through the exact-pair unpickler (tensors, numpy arrays; Lightning and
    OmegaConf classes become inert placeholders), `.npz` through numpy with `allow_pickle=False`."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise VQGANError(f"{source}: not an .npz of numeric arrays ({err})") from None
        sd = {}
        for k, a in arrays.items():
            if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise VQGANError(f"{source}: array {k!r} has dtype {a.dtype}, not a number")
            sd[k] = torch.from_numpy(np.ascontiguousarray(a))
        return sd, []
    module = _tensor_pickle()
    try:
        obj = safe_pickle.naming_source(source, lambda: torch.load(source, map_location="cpu", weights_only=False,
                                                                   pickle_module=module))
    except safe_pickle.ForbiddenGlobalError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, IndexError) as err:
        raise VQGANError(f"{source}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, Mapping):
        raise VQGANError(f"{source}: holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint")
    others: list[str] = []
    if "state_dict" in obj:
        others = sorted(str(k) for k in obj if k != "state_dict")
        obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise VQGANError(f"{source}: 'state_dict' is a {type(obj).__name__}, not a mapping of tensors")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise VQGANError(f"{source}: entry {k!r} of the state dict is a {type(v).__name__}, not a tensor")
        sd[k] = v
    return sd, others


def load_taming_config(path: str | os.PathLike) -> VQGANConfig:
    """A taming `model.yaml` (or JSON) file's GumbelVQ config."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except (OSError, yaml.YAMLError) as err:
        raise VQGANError(f"{path}: not readable YAML ({err})") from None
    return VQGANConfig.from_taming(data, str(path))


def split_state_dict(sd: Mapping[str, torch.Tensor], model: VQGANEncoder, source: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the model's weights, ignored key counts per prefix); every key of `sd` is either used or ignored by a
    known prefix, and every weight the model needs is present with its shape, or VQGANError names the keys."""
    expected = model.state_dict()
    used = {k: v for k, v in sd.items() if k in expected}
    ignored: dict[str, int] = {}
    unknown = []
    for k in sd:
        if k in expected:
            continue
        prefix = next((p for p in IGNORED_PREFIXES if k.startswith(p)), None)
        if prefix is None:
            unknown.append(k)
        else:
            ignored[prefix] = ignored.get(prefix, 0) + 1
    missing = sorted(set(expected) - set(used))
    if missing or unknown:
        lines = [f"{source}: the weights do not match the GumbelVQ encoder of this config "
                 f"({len(missing)} missing, {len(unknown)} unknown keys)"]
        if missing:
            lines.append("missing: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unknown:
            lines.append("unknown (neither the encoder's nor a known unused part: "
                         + ", ".join(IGNORED_PREFIXES) + "): " + ", ".join(unknown[:20])
                         + (" ..." if len(unknown) > 20 else ""))
        raise VQGANError("\n".join(lines))
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(expected[k].shape)}" for k, v in used.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise VQGANError(f"{source}: shape mismatches (wrong config for these weights?): " + "; ".join(bad[:5]))
    for k, v in used.items():
        if not torch.is_floating_point(v) or not bool(torch.isfinite(v).all()):
            raise VQGANError(f"{source}: {k} is not a finite floating-point tensor")
    return {k: used[k].float().contiguous() for k in expected}, ignored


def save(model: VQGANEncoder, out: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write the model directory `out`: config.json (model_type, the taming params, provenance) and
    model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = {"model_type": MODEL_TYPE, "taming": model.config.to_taming(), "weights_sha256": _sha256_file(weights),
            "codes": "argmax of the Gumbel quantiser's logits (deterministic; the reference samples Gumbel noise)",
            "recipe": {"resize": [RECIPE_SIZE, RECIPE_SIZE], "resample": "bicubic", "box": list(RECIPE_BOX),
                       "values": "2 * x / 255 - 1", "order": "row-major"},
            **({"converted_from": dict(provenance)} if provenance else {})}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def convert_taming_checkpoint(src: str | os.PathLike, dst: str | os.PathLike,
                              config: str | os.PathLike | None = None) -> VQGANConversion:
    """A taming GumbelVQ checkpoint `src` -> model directory `dst`. The architecture comes from `config` (a
    taming model.yaml), else from the weights' shapes. Every key is used or ignored by name (decoder,
    post_quant_conv, loss); anything else is refused, as are missing weights and wrong shapes."""
    source = str(src)
    sd, others = read_taming_checkpoint(src)
    if config is not None:
        cfg, config_from = load_taming_config(config), str(config)
    else:
        cfg, config_from = VQGANConfig.from_state_dict(sd, source), "the weights' shapes (resolution 256 assumed)"
    model = VQGANEncoder(cfg)
    weights, ignored = split_state_dict(sd, model, source)
    model.load_state_dict(weights)
    report = VQGANConversion(source=source, destination=str(dst), config_from=config_from, used=len(weights),
                             parameters=sum(v.numel() for v in weights.values()), ignored=ignored,
                             other_entries=others)
    save(model, dst, {"source": Path(source).name, "sha256": _sha256_file(Path(source)), "config_from": config_from,
                      "used_keys": len(weights), "ignored_keys": ignored})
    return report


def random_model(config: VQGANConfig, seed: int = 0) -> VQGANEncoder:
    """A randomly initialised encoder (benchmarks and tests; torch's default initialisation)."""
    torch.manual_seed(seed)
    return VQGANEncoder(config).eval()


__all__ = ["GUMBEL_F8_8192", "VQGANConfig", "VQGANConversion", "VQGANEncoder", "VQGANError", "VQGANTokenizer",
           "codes_npy", "convert_taming_checkpoint", "prepare", "read_taming_checkpoint", "recipe_crop", "save",
           "to_input"]
