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
from .bionlp import NcbiBioNlpConverter
from .cbis_ddsm import CbisDdsmCalcConverter, CbisDdsmMassConverter
from .chest_xray import McCxrConverter, RsnaPneumoniaConverter, SzCxrConverter
from .deeplesion import DeepLesionConverter
from .dicom import DicomImage, dicom_to_png
from .image_folder import DicomFolderConverter, ImageFolderConverter
from .iu_xray import IuXrayConverter
from .manifest import MANIFEST_CONVERTERS, ManifestConverter
from .medmnist import SUBSET_CONVERTERS, SUBSETS, MedMnistConverter
from .mednli import MedNliConverter
from .mimic_cxr import MimicCxrConverter
from .oia_ddr import OiaDdrConverter
from .ofa_tsv import OFA_TSV_CONVERTERS, TsvImage
from .pathvqa import PathVqaConverter
from .peir_gross import PeirGrossConverter
from .roco import RocoConverter
from .seer import SeerConverter
from .slake import SlakeConverter
from .summarize import HealthCareMagicConverter, MeQSumConverter, SummarizeTableConverter
from .text_corpus import MedicatConverter, TextCorpusConverter
from .trec_ct import Trec2022Converter
from .vqa_rad import VqaRadConverter

CONVERTERS: dict[str, type[Converter]] = {
    VqaRadConverter.name: VqaRadConverter,
    SlakeConverter.name: SlakeConverter,
    PathVqaConverter.name: PathVqaConverter,
    IuXrayConverter.name: IuXrayConverter,
    RocoConverter.name: RocoConverter,
    **SUBSET_CONVERTERS,
    MimicCxrConverter.name: MimicCxrConverter,
    PeirGrossConverter.name: PeirGrossConverter,
    CbisDdsmMassConverter.name: CbisDdsmMassConverter,
    CbisDdsmCalcConverter.name: CbisDdsmCalcConverter,
    MedNliConverter.name: MedNliConverter,
    MeQSumConverter.name: MeQSumConverter,
    HealthCareMagicConverter.name: HealthCareMagicConverter,
    SummarizeTableConverter.name: SummarizeTableConverter,
    SzCxrConverter.name: SzCxrConverter,
    McCxrConverter.name: McCxrConverter,
    RsnaPneumoniaConverter.name: RsnaPneumoniaConverter,
    MedicatConverter.name: MedicatConverter,
    DeepLesionConverter.name: DeepLesionConverter,
    OiaDdrConverter.name: OiaDdrConverter,
    Trec2022Converter.name: Trec2022Converter,
    SeerConverter.name: SeerConverter,
    NcbiBioNlpConverter.name: NcbiBioNlpConverter,
    TextCorpusConverter.name: TextCorpusConverter,
    ImageFolderConverter.name: ImageFolderConverter,
    DicomFolderConverter.name: DicomFolderConverter,
    **{cls.name: cls for cls in OFA_TSV_CONVERTERS},
    **{cls.name: cls for cls in MANIFEST_CONVERTERS.values()},
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


def open_converter(dataset: str, source: str, files: Mapping[str, str] | None = None, *,
                   converter: str | None = None, **options: Any) -> Converter:
    """An instance of ``dataset``'s converter reading ``source`` (a directory URL).

    ``files`` overrides file-role paths (see each converter's ``file_roles``); ``options`` are the
    converter's keyword options (e.g. ``languages`` for SLAKE, ``views`` for IU X-ray,
    ``on_missing_image``). ``converter`` names a generic converter (``ofa_tsv_vqa``,
    ``summarize_table``, ``dicom_folder`` ...) that reads ``dataset``: its records and shards are then
    named ``dataset``.
    """
    cls = converter_class(converter or dataset)
    try:
        instance = cls(source, files, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"{converter or dataset}: {err}") from None
        raise
    if converter and converter != dataset:
        instance.dataset_name = dataset
    return instance


__all__ = [
    "ArrayImage", "CANONICAL_SPLITS", "CONVERTERS", "CbisDdsmCalcConverter", "CbisDdsmMassConverter", "Converter",
    "DicomFolderConverter", "DicomImage", "FileImage", "HealthCareMagicConverter", "ImageFolderConverter", "ImageIndex",
    "IuXrayConverter", "MANIFEST_CONVERTERS", "ManifestConverter", "MeQSumConverter", "MedNliConverter", "MimicCxrConverter", "NcbiBioNlpConverter",
    "OiaDdrConverter", "PeirGrossConverter", "SeerConverter", "Trec2022Converter",
    "SummarizeTableConverter", "TsvImage", "dicom_to_png",
    "MedMnistConverter", "PathVqaConverter", "RocoConverter", "SUBSETS", "SlakeConverter", "SourceFormatError",
    "SourceRecord", "VqaRadConverter", "converter_class", "open_converter", "register",
]
