"""Request inputs of the serving API: limits, image decoding (JPEG/PNG/... and DICOM) and the errors.

Everything a client can send wrong becomes an `ApiError` (a 4xx status and a message that starts
with the field it is about); nothing here raises anything else for bad input, so a replica keeps
serving. Images are checked before their pixels are decoded: the pixel count from the header against
`max_image_pixels` (decompression bombs), then a full decode (truncated or corrupt files).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF", "MPO")


@dataclass(frozen=True)
class Limits:
    """Request limits (the serve spec's `limits` section)."""

    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_question_chars: int = 1000
    max_text_chars: int = 20_000
    max_labels: int = 100
    max_label_chars: int = 200


class ApiError(Exception):
    """A client error: HTTP `status` and a message naming the field (`"image: ..."`)."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail}
        if self.field:
            out["field"] = self.field
        return out


def bad(field: str, problem: str, status: int = 400) -> ApiError:
    return ApiError(status, f"{field}: {problem}", field)


def decode_base64(data: str, field: str = "image") -> bytes:
    if not isinstance(data, str):
        raise bad(field, "expected a base64 string", 422)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad(field, f"not valid base64 ({err})") from None
    return raw


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_image(data: bytes, limits: Limits, field: str):
    import pydicom
    from PIL import Image

    from ..data.converters.dicom import dicom_pixels_to_uint8

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged headers warn before they fail
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many types for damaged files
        raise bad(field, f"not a readable DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise bad(field, "DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise bad(field, "DICOM file lacks Rows/Columns") from None
    if rows < 1 or cols < 1:
        raise bad(field, f"DICOM image has {rows}x{cols} pixels")
    if rows * cols * frames > limits.max_image_pixels:
        raise bad(field, f"DICOM image has {cols}x{rows}x{frames} pixels, more than the limit of "
                         f"{limits.max_image_pixels:,}", 413)
    try:
        array = dicom_pixels_to_uint8(ds)
    except Exception as err:  # unsupported transfer syntax, truncated pixel data, odd photometrics
        raise bad(field, f"DICOM pixel data not decodable ({err})") from None
    return Image.fromarray(array)


def open_image(data: bytes, limits: Limits, field: str = "image", draft_size: int | None = None):
    """A fully decoded PIL image (RGB) from upload bytes: JPEG, PNG, TIFF, BMP, WebP, GIF or DICOM."""
    from PIL import Image

    if not data:
        raise bad(field, "empty")
    if len(data) > limits.max_upload_bytes:
        raise bad(field, f"{len(data)} bytes exceeds the {limits.max_upload_bytes} byte limit", 413)
    if is_dicom(data):
        return _dicom_image(data, limits, field).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            raise bad(field, f"{err}", 413) from None
        except Exception as err:  # PIL raises many types for bytes that are no image
            raise bad(field, f"cannot decode image ({len(data)} bytes): not a JPEG, PNG, TIFF, BMP, WebP, GIF "
                             f"or DICOM file ({type(err).__name__})") from None
        width, height = img.size
        if width < 1 or height < 1:
            raise bad(field, f"image has {width}x{height} pixels")
        if width * height > limits.max_image_pixels:
            raise bad(field, f"image has {width}x{height} = {width * height:,} pixels, more than the limit of "
                             f"{limits.max_image_pixels:,} (decompression bomb?)", 413)
        try:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # as training decodes (data/transforms.py)
            img.load()
            return img.convert("RGB")
        except Exception as err:
            raise bad(field, f"cannot decode image: truncated or corrupt {img.format} data "
                             f"({type(err).__name__}: {err})") from None


def image_array(data: bytes, image_size: int, limits: Limits, field: str = "image") -> np.ndarray:
    """(3, image_size, image_size) float32 normalised pixels, exactly as training preprocesses."""
    from ..data.transforms import image_to_array

    return image_to_array(open_image(data, limits, field, draft_size=image_size), image_size)


def text_field(value: Any, field: str, max_chars: int, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise bad(field, "field required", 422)
        return None
    if not isinstance(value, str):
        raise bad(field, f"expected a string, got {type(value).__name__}", 422)
    text = value.strip()
    if not text:
        raise bad(field, "empty")
    if len(text) > max_chars:
        raise bad(field, f"longer than {max_chars} characters ({len(text)})")
    if "\x00" in text:
        raise bad(field, "contains a NUL character")
    return text


def label_list(value: Any, limits: Limits, field: str = "labels") -> list[str] | None:
    """Candidate labels: a list of distinct non-empty strings (None when absent)."""
    if value is None:
        return None
    if isinstance(value, str):  # multipart: a JSON array or comma-separated names
        import json

        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as err:
                raise bad(field, f"not a JSON array ({err})") from None
        else:
            value = [part for part in text.split(",")]
    if not isinstance(value, list):
        raise bad(field, "expected a list of strings", 422)
    if not value:
        raise bad(field, "empty list")
    if len(value) > limits.max_labels:
        raise bad(field, f"{len(value)} labels, more than the limit of {limits.max_labels}")
    out: list[str] = []
    for i, item in enumerate(value):
        text = text_field(item, f"{field}[{i}]", limits.max_label_chars)
        norm = " ".join(text.lower().replace("_", " ").split())
        if norm in out:
            raise bad(f"{field}[{i}]", f"duplicate label {text!r}")
        out.append(norm)
    return out
