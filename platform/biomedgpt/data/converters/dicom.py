"""DICOM images as 8-bit PNG: the one place pixel values of a DICOM file are turned into an image.

Shards hold JPEG or PNG (DESIGN.md), so a DICOM is converted when its shard is written:

1. the modality LUT: ``RescaleSlope``/``RescaleIntercept`` (e.g. CT values to Hounsfield units);
2. the VOI window: the file's first ``WindowCenter``/``WindowWidth`` pair with the linear function of
   DICOM PS3.3 C.11.2.1.2 (``window="auto"``, the default); without a window in the file, or with
   ``window="minmax"``, the image's own minimum..maximum; ``window=(center, width)`` forces one;
3. scaled to 0..255 (so 12/16-bit data becomes 8-bit), and inverted for ``MONOCHROME1`` (where 0 is
   white), so that bone is bright in every output;
4. encoded as a grayscale PNG (deterministic bytes). Colour DICOMs (RGB, YBR) are converted to RGB
   8-bit without windowing. Multi-frame files give their first frame.

A file that cannot be converted raises :class:`~.base.UnusableImageError`: the build skips its record
(a defect, counted against the error budget) instead of stopping.

Needs ``pydicom`` (declared in pyproject.toml). Compressed transfer syntaxes are decoded by pydicom's
own backends (Pillow covers JPEG baseline and JPEG 2000); JPEG-LS/lossless JPEG need extra plugins.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from .. import storage
from .base import SourceFormatError, UnusableImageError, encode_png

WINDOW_MODES = ("auto", "minmax")


def _first(value: Any) -> float | None:
    """A DICOM numeric value that may be multi-valued (``MultiValue``): its first entry."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return None
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return None


def window_to_uint8(values, center: float | None = None, width: float | None = None):
    """Map real-valued pixels to uint8 0..255.

    With ``center``/``width`` (``width`` >= 1): the DICOM linear VOI function, values below the
    window 0, above it 255. Without: linear from the minimum to the maximum of ``values`` (a
    constant image gives all zeros).
    """
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if center is not None and width is not None and width >= 1:
        low = center - 0.5 - (width - 1) / 2
        high = center - 0.5 + (width - 1) / 2
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, y))
    else:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        y = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def dicom_pixels_to_uint8(ds, window: str | tuple[float, float] = "auto"):
    """The 8-bit image array of a parsed DICOM dataset (see the module docstring for the steps)."""
    import numpy as np

    try:
        array = ds.pixel_array
    except Exception as err:  # pydicom raises several types for missing/undecodable pixel data
        raise ValueError(f"pixel data not readable ({type(err).__name__}: {err})") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        array = array[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            array = convert_color_space(array, photometric, "RGB")
        array = np.asarray(array)
        if array.dtype != np.uint8:
            array = window_to_uint8(array)
        return np.ascontiguousarray(array)
    if samples != 1:
        raise ValueError(f"SamplesPerPixel {samples} is not supported (expected 1 or 3)")
    values = np.asarray(array, dtype=np.float64)
    slope = _first(getattr(ds, "RescaleSlope", None))
    intercept = _first(getattr(ds, "RescaleIntercept", None))
    values = values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    if isinstance(window, tuple):
        center, width = window
    elif window == "auto":
        center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    elif window == "minmax":
        center = width = None
    else:
        raise ValueError(f"window must be one of {WINDOW_MODES} or (center, width), got {window!r}")
    out = window_to_uint8(values, center, width)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def dicom_to_png(data: bytes, window: str | tuple[float, float] = "auto", source: str = "<dicom>") -> bytes:
    """PNG bytes (8-bit grayscale or RGB) of the DICOM file content ``data``; ``source`` names the
    file in errors."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError) as err:
        raise UnusableImageError(source, f"not a readable DICOM file ({err})") from None
    if "PixelData" not in ds:
        raise UnusableImageError(source, "DICOM file has no pixel data")
    try:
        return encode_png(dicom_pixels_to_uint8(ds, window))
    except ValueError as err:
        raise UnusableImageError(source, str(err)) from None


@dataclass(frozen=True)
class DicomImage:
    """A DICOM file at ``url`` (``size`` bytes), converted to PNG when read.

    ``size`` is the DICOM file's size: the planner budgets shards with it (the PNG is usually
    smaller, so shards come out somewhat under ``shard_max_bytes``) and the input digest uses it.
    """

    url: str
    size: int
    window: str | tuple[float, float] = "auto"

    def read(self) -> bytes:
        try:
            data = storage.read_bytes(self.url)
        except FileNotFoundError:
            raise SourceFormatError(self.url, "image file disappeared after the source was listed") from None
        return dicom_to_png(data, self.window, self.url)

    @property
    def name(self) -> str:
        return self.url


def is_dicom_name(name: str) -> bool:
    """DICOM file names as releases ship them: ``.dcm``/``.dicom`` (any case)."""
    return name.lower().endswith((".dcm", ".dicom"))
