"""Converters from native dataset releases to shard records, and the registry naming them.

>>> conv = open_converter("vqa_rad", "/data/vqa_rad")
>>> conv.splits()
['train', 'test']
>>> rec = next(conv.records("train")); rec.record["answer"], rec.image.read()[:3]

``CONVERTERS`` maps dataset name -> converter class; every class carries its task, native format,
licence and access class, and the file roles it reads (``files=`` overrides their paths).
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import (ArrayImage, Converter, FileImage, ImageIndex, SourceFormatError, SourceRecord,
                   CANONICAL_SPLITS)
from .iu_xray import IuXrayConverter
from .medmnist import SUBSET_CONVERTERS, SUBSETS, MedMnistConverter
from .pathvqa import PathVqaConverter
from .roco import RocoConverter
from .slake import SlakeConverter
from .vqa_rad import VqaRadConverter

CONVERTERS: dict[str, type[Converter]] = {
    VqaRadConverter.name: VqaRadConverter,
    SlakeConverter.name: SlakeConverter,
    PathVqaConverter.name: PathVqaConverter,
    IuXrayConverter.name: IuXrayConverter,
    RocoConverter.name: RocoConverter,
    **SUBSET_CONVERTERS,
}


def register(cls: type[Converter]) -> type[Converter]:
    """Add a converter class to the registry under ``cls.name`` (usable as a decorator)."""
    if cls.name in CONVERTERS and CONVERTERS[cls.name] is not cls:
        raise ValueError(f"a converter named {cls.name!r} is already registered ({CONVERTERS[cls.name].__name__})")
    CONVERTERS[cls.name] = cls
    return cls


def converter_class(dataset: str) -> type[Converter]:
    """The converter class registered for ``dataset`` (KeyError naming the known datasets)."""
    try:
        return CONVERTERS[dataset]
    except KeyError:
        raise KeyError(f"no converter for dataset {dataset!r}; known: {', '.join(sorted(CONVERTERS))}") from None


def open_converter(dataset: str, source: str, files: Mapping[str, str] | None = None, **options: Any) -> Converter:
    """An instance of ``dataset``'s converter reading ``source`` (a directory URL).

    ``files`` overrides file-role paths (see each converter's ``file_roles``); ``options`` are the
    converter's keyword options (e.g. ``languages`` for SLAKE, ``views`` for IU X-ray,
    ``on_missing_image``).
    """
    cls = converter_class(dataset)
    try:
        return cls(source, files, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"{dataset}: {err}") from None
        raise


__all__ = [
    "ArrayImage", "CANONICAL_SPLITS", "CONVERTERS", "Converter", "FileImage", "ImageIndex", "IuXrayConverter",
    "MedMnistConverter", "PathVqaConverter", "RocoConverter", "SUBSETS", "SlakeConverter", "SourceFormatError",
    "SourceRecord", "VqaRadConverter", "converter_class", "open_converter", "register",
]
