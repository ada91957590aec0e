"""MedMNIST v2 (Yang et al. 2023), the 2D subsets: small standardised classification datasets.

Native layout: one ``<subset>.npz`` per subset (``pneumoniamnist.npz``; MedMNIST+ also ships
``<subset>_64.npz``, ``_128``, ``_224``) with arrays ``{train,val,test}_images`` (uint8, N x H x W
or N x H x W x 3) and ``{train,val,test}_labels`` (N x 1, or N x 14 multi-hot for ChestMNIST).
The class names are not in the file: they come from the ``medmnist`` package's INFO table, copied
below as data (:data:`SUBSETS`). An ``info.json`` beside the file, if present, must agree with it.

Images are arrays, not JPEG/PNG files, so each is encoded losslessly as PNG. Records: ``label`` (int)
and ``label_name``; for the multi-label ChestMNIST, ``label`` is the list of positive class indices
and ``label_name`` the list of their names (empty lists: no finding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

from .. import storage
from .base import ArrayImage, Converter, SourceFormatError, SourceRecord, load_json, load_npz

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Subset:
    """One MedMNIST 2D subset: task kind, channels and class names (index order)."""

    task: str  # "multi-class" | "binary-class" | "multi-label, binary-class" | "ordinal-regression"
    n_channels: int
    labels: tuple[str, ...]

    @property
    def multi_label(self) -> bool:
        return self.task.startswith("multi-label")


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")

#: Class names of every MedMNIST v2 2D subset, as in the medmnist package's INFO (v2/v3).
SUBSETS: Mapping[str, Subset] = {
    "pathmnist": Subset("multi-class", 3, (
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
        "cancer-associated stroma", "colorectal adenocarcinoma epithelium")),
    "chestmnist": Subset("multi-label, binary-class", 1, (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
        "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")),
    "dermamnist": Subset("multi-class", 3, (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
        "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions")),
    "octmnist": Subset("multi-class", 1, ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": Subset("binary-class", 1, ("normal", "pneumonia")),
    "retinamnist": Subset("ordinal-regression", 3, ("0", "1", "2", "3", "4")),
    "breastmnist": Subset("binary-class", 1, ("malignant", "normal, benign")),
    "bloodmnist": Subset("multi-class", 3, (
        "basophil", "eosinophil", "erythroblast", "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte", "monocyte", "neutrophil", "platelet")),
    "tissuemnist": Subset("multi-class", 1, (
        "Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
        "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb")),
    "organamnist": Subset("multi-class", 1, _ORGANS),
    "organcmnist": Subset("multi-class", 1, _ORGANS),
    "organsmnist": Subset("multi-class", 1, _ORGANS),
}

MEDMNIST_PLUS_SIZES = (28, 64, 128, 224)


class MedMnistConverter(Converter):
    """Converter for one MedMNIST 2D subset; the registry holds one subclass per subset."""

    name = "medmnist"
    subset = ""
    task = "classify"
    native_format = "MedMNIST .npz ({train,val,test}_images uint8, {train,val,test}_labels)"
    licence = "CC BY 4.0"
    access = "open"
    file_roles = {"npz": "", "info": "info.json"}

    def __init__(self, source: str, files=None, *, size: int | None = None, on_missing_image: str = "error"):
        super().__init__(source, files, on_missing_image=on_missing_image)
        if self.subset not in SUBSETS:
            raise ValueError(f"medmnist: unknown subset {self.subset!r}; 2D subsets: {sorted(SUBSETS)}")
        if size is not None and size not in MEDMNIST_PLUS_SIZES:
            raise ValueError(f"{self.name}: size must be one of {MEDMNIST_PLUS_SIZES}, got {size}")
        self.info = SUBSETS[self.subset]
        if not self.files["npz"]:
            self.files["npz"] = self._find_npz(size)
        self._checked_info = False

    def _find_npz(self, size: int | None) -> str:
        names = [f"{self.subset}.npz"] if size in (None, 28) else []
        if size is not None and size != 28:
            names.append(f"{self.subset}_{size}.npz")
        for name in names:
            if storage.exists(storage.join(self.source, name)):
                return name
        candidates = sorted(n for n in storage.list_files(self.source, recursive=False)
                            if n.startswith(f"{self.subset}_") and n.endswith(".npz"))
        if size is None and len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise SourceFormatError(self.source, f"several {self.subset} files {candidates}: choose one with size=...")
        raise SourceFormatError(self.source, f"{names[0]} not found (or pass files={{'npz': ...}})")

    def _arrays(self) -> dict:
        file = self.url("npz")
        try:
            arrays = load_npz(file)
        except FileNotFoundError:
            raise SourceFormatError(file, "file not found") from None
        except (ValueError, OSError) as err:
            raise SourceFormatError(file, f"not a readable .npz ({err})") from None
        if not self._checked_info:
            self._check_info()
            self._checked_info = True
        return arrays

    def _check_info(self) -> None:
        """An info.json beside the data (optional) must describe this subset with the same classes."""
        file = self.url("info")
        if not storage.exists(file):
            return
        info = load_json(file)
        if not isinstance(info, dict):
            raise SourceFormatError(file, f"expected an object keyed by subset, got {type(info).__name__}")
        if self.subset not in info:
            others = sorted(k for k in info if k in SUBSETS)
            if others:
                raise SourceFormatError(file, f"describes {others}, not {self.subset}")
            return
        labels = info[self.subset].get("label") if isinstance(info[self.subset], dict) else None
        if labels is None:
            return
        if not isinstance(labels, dict):
            raise SourceFormatError(file, "expected an object {index: name}", field=f"{self.subset}.label")
        expected = {str(i): name for i, name in enumerate(self.info.labels)}
        for key in sorted(set(labels) | set(expected), key=lambda k: (len(k), k)):
            if labels.get(key) != expected.get(key):
                raise SourceFormatError(
                    file, f"{labels.get(key)!r} disagrees with MedMNIST's class name {expected.get(key)!r}",
                    field=f"{self.subset}.label.{key}")

    def splits(self) -> list[str]:
        arrays = self._arrays()
        return [s for s in SPLITS if f"{s}_images" in arrays or f"{s}_labels" in arrays]

    def records(self, split: str) -> Iterator[SourceRecord]:
        self.require_split(split)
        file = self.url("npz")
        arrays = self._arrays()
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                raise SourceFormatError(file, "missing array", field=key)
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype.name != "uint8" or images.ndim not in (3, 4):
            raise SourceFormatError(file, f"expected uint8 N x H x W (x 3) images, got {images.dtype} {images.shape}",
                                    field=f"{split}_images")
        if len(labels) != len(images):
            raise SourceFormatError(file, f"{len(labels)} labels for {len(images)} images", field=f"{split}_labels")
        n_classes = len(self.info.labels)
        labels = labels.reshape(len(labels), -1)
        width = n_classes if self.info.multi_label else 1
        if labels.shape[1] != width:
            raise SourceFormatError(file, f"expected {width} label column(s), got shape {labels.shape}",
                                    field=f"{split}_labels")
        for i in range(len(images)):
            with self.guard(split, i) as guard:
                guard.id = f"{split}_{i:06d}"
                row = labels[i]
                if self.info.multi_label:
                    if not set(int(v) for v in row) <= {0, 1}:
                        raise SourceFormatError(file, f"expected 0/1 values, got {row.tolist()}", record=f"record {i}",
                                            field=f"{split}_labels[{i}]")
                    positive = [j for j, v in enumerate(row) if int(v) == 1]
                    label: int | list[int] = positive
                    label_name: str | list[str] = [self.info.labels[j] for j in positive]
                else:
                    value = int(row[0])
                    if not 0 <= value < n_classes:
                        raise SourceFormatError(file, f"label {value} outside 0..{n_classes - 1}", record=f"record {i}",
                                            field=f"{split}_labels[{i}]")
                    label, label_name = value, self.info.labels[value]
                yield SourceRecord(self.make_record(
                    split, f"{split}_{i:06d}", label=label, label_name=label_name, subset=self.subset,
                    image=f"{split}_images[{i}]",
                ), ArrayImage(file, f"{split}_images", i))


def _subset_converters() -> dict[str, type[MedMnistConverter]]:
    out = {}
    for subset in SUBSETS:
        cls = type(f"{subset.capitalize()}Converter", (MedMnistConverter,), {
            "name": subset, "subset": subset, "__module__": __name__,
            "__doc__": f"MedMNIST {subset} (2D), from {subset}.npz.",
        })
        out[subset] = cls
    return out


#: One converter class per 2D subset, named after it (``pneumoniamnist`` ...). Module-level names so
#: that instances pickle (shard writing may run in Ray tasks).
SUBSET_CONVERTERS: Mapping[str, type[MedMnistConverter]] = _subset_converters()
globals().update({cls.__name__: cls for cls in SUBSET_CONVERTERS.values()})


def label_names(subset: str) -> list[str]:
    """Class names of a 2D subset in label-index order."""
    return list(SUBSETS[subset].labels)
