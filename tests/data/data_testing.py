"""Helpers for the data tests: small images and image trees under the names a release refers to."""

from __future__ import annotations

import io
from pathlib import Path


def tiny_jpeg(value: int = 128, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(buf, format="JPEG")
    return buf.getvalue()


def tiny_png(value: int = 7, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def write_images(root: Path, names, data: bytes) -> None:
    """The same small image under every referenced name (the datasets without shipped images)."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
