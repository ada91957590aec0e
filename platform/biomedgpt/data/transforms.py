"""Image and text preprocessing shared by training, evaluation and serving (so a served model sees
exactly what it was trained on).

Images: decoded with PIL (JPEG decoded at a reduced DCT scale when much larger than the target, which
is ~3x faster than a full decode), converted to RGB, resized to image_size x image_size with bicubic
filtering and normalised with mean 0.5 / std 0.5 per channel, as the official recipes do.

Training only (the job spec's `data.augment`): :class:`Augment` adds the fine-tuning recipes' random
resized crop, horizontal flip, RandAugment and random erasing, deterministic given a seed. Evaluation
and serving call `load_image` without it and see exactly the plain transform.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MEAN = 0.5
STD = 0.5


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def load_image(data: bytes, image_size: int, augment: "Augment | None" = None,
               rng: random.Random | None = None) -> np.ndarray:
    """(3, image_size, image_size) float32 normalised pixels from encoded image bytes; with `augment`
    (training only) the image is augmented with random choices drawn from `rng`."""
    try:
        img = Image.open(io.BytesIO(data))
        draft = image_size if augment is None else int(image_size * augment.draft_factor)
        img.draft("RGB", (draft, draft))
        img = img.convert("RGB")
    except Exception as err:  # PIL raises many types for bad input
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {err}") from err
    if augment is None:
        return image_to_array(img, image_size)
    if rng is None:
        raise ValueError("load_image: augment needs an rng (training augmentation is seeded)")
    arr = image_to_array(augment.apply(img, image_size, rng), image_size)
    return augment.erase(arr, rng)


def image_to_array(img: Image.Image, image_size: int) -> np.ndarray:
    img = img.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1).copy()


def pad_sequences(seqs: Sequence[Sequence[int]], pad: int, length: int | None = None) -> np.ndarray:
    """Right-pad token id lists into an int64 array (B, length)."""
    length = length or max((len(s) for s in seqs), default=1)
    out = np.full((len(seqs), max(length, 1)), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s[:length]
    return out


def encode_pair(tokenizer: Any, instruction: str, target: str, max_source_length: int, max_target_length: int
                ) -> tuple[list[int], list[int], list[int]]:
    """Source ids ([bos] text [eos]), decoder input ids ([bos] target) and labels (target [eos])."""
    src = tokenizer.encode_source(instruction, max_length=max_source_length)
    tgt = tokenizer.encode_text(target)[: max_target_length - 1]
    return src, [tokenizer.bos_token_id] + tgt, tgt + [tokenizer.eos_token_id]


# -- training augmentations (CPU workers; never in evaluation or serving) ---------------------------

#: RandAugment's operations (timm's "increasing" set, PIL only): name -> uses a magnitude.
RANDAUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize", "Contrast",
                   "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
FILL = (128, 128, 128)  # mid-grey (0 after normalisation) where affine ops uncover the border
MAX_LEVEL = 10.0


@dataclass(frozen=True)
class Augment:
    """Training-time image augmentation, as the official fine-tuning recipes do (timm's
    `rand-m9-mstd0.5-inc1` RandAugment after a random resized crop and a horizontal flip, then random
    erasing), in PIL and numpy only.

    - `crop_scale` / `crop_ratio`: random resized crop (area fraction and aspect range) to the target
      size; None: plain resize;
    - `hflip`: probability of a horizontal flip;
    - `randaugment_n` operations per image, drawn from `randaugment_ops`, at magnitude
      `randaugment_m` (0-10) plus gaussian noise of std `randaugment_mstd` per operation;
    - `random_erasing`: probability of replacing a random rectangle with per-pixel gaussian noise
      (after normalisation).

    Every random choice comes from the `random.Random` given to :meth:`apply`, so an augmentation is
    a pure function of (image, seed)."""

    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    randaugment_n: int = 0
    randaugment_m: float = 9.0
    randaugment_mstd: float = 0.0
    randaugment_ops: tuple[str, ...] = RANDAUGMENT_OPS
    random_erasing: float = 0.0

    def __post_init__(self) -> None:
        unknown = [op for op in self.randaugment_ops if op not in RANDAUGMENT_OPS]
        if unknown:
            raise ValueError(f"augment.randaugment.ops: unknown {unknown}; known: {', '.join(RANDAUGMENT_OPS)}")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"augment.random_resized_crop.scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augment.random_resized_crop.ratio: need 0 < low <= high, got {self.crop_ratio}")
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name}: a probability in [0, 1], got {getattr(self, name)}")
        if self.randaugment_n < 0 or not 0 <= self.randaugment_m <= MAX_LEVEL or self.randaugment_mstd < 0:
            raise ValueError("augment.randaugment: need n >= 0, 0 <= m <= 10, mstd >= 0")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "Augment | None":
        """From the job spec's `data.augment` mapping (see spec.AugmentSpec); None/empty: no augmentation.

        ``{"random_resized_crop": {"scale": [0.08, 1], "ratio": [0.75, 1.333]}, "hflip": 0.5,
        "randaugment": {"n": 2, "m": 9, "mstd": 0.5, "ops": [...]}, "random_erasing": 0.25}``"""
        if not config:
            return None
        known = {"random_resized_crop", "hflip", "randaugment", "random_erasing"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"augment: unknown option(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        crop = config.get("random_resized_crop")
        if crop:
            crop = {} if crop is True else dict(crop)
            kw["crop_scale"] = tuple(crop.get("scale") or (0.08, 1.0))
            kw["crop_ratio"] = tuple(crop.get("ratio") or (3 / 4, 4 / 3))
        hflip = config.get("hflip")
        kw["hflip"] = 0.5 if hflip is True else float(hflip or 0.0)
        ra = config.get("randaugment")
        if ra:
            ra = dict(ra)
            kw["randaugment_n"] = int(ra.get("n", 2))
            kw["randaugment_m"] = float(ra.get("m", 9))
            kw["randaugment_mstd"] = float(ra.get("mstd", 0.0) or 0.0)
            if ra.get("ops"):
                kw["randaugment_ops"] = tuple(ra["ops"])
        kw["random_erasing"] = float(config.get("random_erasing") or 0.0)
        aug = cls(**kw)
        return aug if aug.active else None

    @property
    def active(self) -> bool:
        return bool(self.crop_scale or self.hflip or self.randaugment_n or self.random_erasing)

    @property
    def draft_factor(self) -> float:
        """How much larger than the target to decode a JPEG so a crop keeps its resolution."""
        return 1.0 if self.crop_scale is None else min(4.0, 1.0 / math.sqrt(self.crop_scale[0]))

    def apply(self, img: Image.Image, image_size: int, rng: random.Random) -> Image.Image:
        """The augmented RGB image at image_size x image_size."""
        img = img.convert("RGB")
        if self.crop_scale is not None:
            box = self._crop_box(img.size, rng)
            img = img.resize((image_size, image_size), Image.BICUBIC, box=box)
        else:
            img = img.resize((image_size, image_size), Image.BICUBIC)
        if self.hflip and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for _ in range(self.randaugment_n):
            op = rng.choice(self.randaugment_ops)
            m = self.randaugment_m
            if self.randaugment_mstd:
                m = min(MAX_LEVEL, max(0.0, rng.gauss(m, self.randaugment_mstd)))
            img = _apply_op(img, op, m / MAX_LEVEL, rng)
        return img

    def _crop_box(self, size: tuple[int, int], rng: random.Random) -> tuple[float, float, float, float]:
        """torchvision's RandomResizedCrop box: 10 tries at a random area and aspect, else a centre crop."""
        width, height = size
        area = width * height
        lo, hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        assert self.crop_scale is not None
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(lo, hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return (left, top, left + w, top + h)
        ratio = width / height
        if ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif ratio > self.crop_ratio[1]:
            h, w = height, int(round(height * self.crop_ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return (left, top, left + w, top + h)

    def erase(self, arr: np.ndarray, rng: random.Random) -> np.ndarray:
        """timm's RandomErasing (mode "pixel", one rectangle of 2-1/3 of the area, aspect 0.3-3.3) on a
        normalised (3, S, S) array, with probability `random_erasing`."""
        if not self.random_erasing or rng.random() >= self.random_erasing:
            return arr
        _, height, width = arr.shape
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(0.02, 1 / 3)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                noise = np.random.default_rng(rng.getrandbits(63)).standard_normal((arr.shape[0], h, w))
                arr[:, top:top + h, left:left + w] = noise.astype(arr.dtype)
                break
        return arr


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _apply_op(img: Image.Image, op: str, level: float, rng: random.Random) -> Image.Image:
    """One RandAugment operation at `level` in [0, 1] (timm's increasing magnitude mappings)."""
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Rotate":
        return img.rotate(_signed(30.0 * level, rng), resample=Image.BILINEAR, fillcolor=FILL)
    if op == "Solarize":
        return ImageOps.solarize(img, 256 - int(256 * level))
    if op == "Posterize":
        return ImageOps.posterize(img, max(1, 8 - int(4 * level)))
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = max(0.1, min(1.9, 1.0 + _signed(0.9 * level, rng)))
        enhancer = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                    "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}[op]
        return enhancer(img).enhance(factor)
    if op in ("ShearX", "ShearY"):
        s = _signed(0.3 * level, rng)
        matrix = (1, s, 0, 0, 1, 0) if op == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)
    if op in ("TranslateX", "TranslateY"):
        t = _signed(0.45 * level, rng)
        matrix = (1, 0, t * img.size[0], 0, 1, 0) if op == "TranslateX" else (1, 0, 0, 0, 1, t * img.size[1])
        return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown RandAugment operation {op!r}")


def augment_rng(seed: int, sample: int) -> random.Random:
    """The random source of one sample's augmentation: a function of (epoch seed, sample id) only."""
    return random.Random((int(seed) << 64) ^ int(sample))
