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


def write_dicom(path: Path, pixels, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                slope: float | None = None, intercept: float | None = None, window: tuple[float, float] | None = None,
                modality: str = "CT", uid_suffix: int = 1) -> Path:
    """A small uncompressed DICOM file (explicit VR little endian) with the given uint16/int16 pixels,
    written with pydicom the way scanners and TCIA releases store them (fixed UIDs: same bytes)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    pixels = np.asarray(pixels)
    uid = f"1.2.826.0.1.3680043.8.498.{uid_suffix}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = modality
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope = str(slope)
    if intercept is not None:
        ds.RescaleIntercept = str(intercept)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def raw_batch(shards_root: str, n: int = 5):
    """The first `n` samples of the first VQA-RAD train shard under `shards_root`, as the raw batch
    `preprocess_batch` takes (json and jpg columns), and the samples themselves."""
    import numpy as np

    from biomedgpt.data.shards import read_shard
    from biomedgpt.data.stream import list_shards

    rows = []
    for sample in read_shard(list_shards(shards_root, "vqa_rad", "train")[0].url):
        rows.append(sample)
        if len(rows) == n:
            break
    return {"json": np.array([r["json"] for r in rows], dtype=object),
            "jpg": np.array([r.get("jpg") for r in rows], dtype=object)}, rows


def skipped(conv, *splits: str) -> str:
    """Read `splits` of a converter (default: every split it has) to the end; the records it skipped as
    unusable, described one per line (the converter's RecordDefect.describe())."""
    for split in splits or conv.splits():
        for _ in conv.records(split):
            pass
    return "\n".join(d.describe() for by_place in conv.defects.values() for d in by_place.values())
