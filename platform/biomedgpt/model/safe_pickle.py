"""Pickles that never run code: an unpickler that resolves exact `(module, name)` pairs only.

A pickle names the functions and classes it calls (GLOBAL opcodes); whoever may write a checkpoint may
name any importable callable (`os.system`, `builtins.exec`, `torch.hub.load`, numpy's `runstring`) or a
dotted path under an innocent module (`argparse` + `_os.system`). `ExactUnpickler` resolves a global only
when the pair is in its allow-list, from the objects this module imported itself (never by importing or
walking the names the pickle supplies), and refuses every other one with `ForbiddenGlobalError`, which
names the global. Classes of a few foreign namespaces (fairseq's meters and task objects, which we do
not install) may instead become inert placeholders: they keep the arguments and state they are given
and call nothing.

Used for fairseq `.pt` checkpoints (`state_dict_adapter.load_fairseq_checkpoint`) and for the
`.metadata` pickle of torch distributed checkpoints (`check_dcp_metadata`, which torch itself reads with
plain `pickle.load`); Lightning's and Hugging Face's files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import pathlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle names a global that is not on the allow-list; loading it could run code."""

    def __init__(self, global_name: str, source: str | None = None) -> None:
        self.global_name = global_name
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}refused to load: the pickle names the global {global_name}, which a checkpoint "
                         "may not name (only the exact classes and functions of weights, configs and meters are "
                         "allowed; loading it could run code)")

    def __reduce__(self) -> tuple:  # errors travel pickled (from Ray workers): keep the global and the file
        return (type(self), (self.global_name, self.source))


_BUILTIN_TYPES = (set, frozenset, dict, list, tuple, int, float, bool, str, bytes, bytearray, complex, slice, range)


def _torch_tensor_pairs() -> dict[tuple[str, str], Any]:
    """Tensors and parameters as torch pickles them, dtypes, sizes and devices."""
    from torch import _utils

    pairs: dict[tuple[str, str], Any] = {
        ("torch._utils", name): getattr(_utils, name)
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state")
        if hasattr(_utils, name)
    }
    pairs[("torch", "Size")] = torch.Size
    pairs[("torch", "device")] = torch.device
    pairs[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    pairs[("collections", "OrderedDict")] = collections.OrderedDict
    pairs[("_codecs", "encode")] = codecs.encode  # bytes pickled by Python 3 at protocol 2
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            pairs[("torch", name)] = value
    for t in _BUILTIN_TYPES:
        pairs[("builtins", t.__name__)] = t
        pairs[("__builtin__", t.__name__)] = t  # protocol-2 pickles written by Python 2
    return pairs


def _numpy_pairs() -> dict[tuple[str, str], Any]:
    """numpy scalars, dtypes and arrays (fairseq's meters keep numpy floats), under numpy 1's and 2's names."""
    try:
        import numpy
    except ImportError:  # numpy is optional for torch; a checkpoint naming it then cannot load
        return {}
    multiarray = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
    pairs: dict[tuple[str, str], Any] = {("numpy", "dtype"): numpy.dtype, ("numpy", "ndarray"): numpy.ndarray}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs[(module, "scalar")] = multiarray.scalar
        pairs[(module, "_reconstruct")] = multiarray._reconstruct
    dtypes = getattr(numpy, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                pairs[("numpy.dtypes", name)] = getattr(dtypes, name)
    return pairs


def tensor_allowed() -> dict[tuple[str, str], Any]:
    """Tensors, dtypes, sizes, ordered dicts and numpy arrays and scalars: what a state dict or a Lightning
    checkpoint's numeric parts pickle (taming's VQGAN checkpoints, model/vqgan.py)."""
    pairs = _torch_tensor_pairs()
    pairs.update(_numpy_pairs())
    return pairs


def fairseq_allowed() -> dict[tuple[str, str], Any]:
    """What a fairseq/OFA checkpoint pickles besides tensors: argparse Namespaces (`args`, `cfg.model`),
    ordered dicts, numpy scalars of the meters, paths."""
    pairs = _torch_tensor_pairs()
    pairs.update(_numpy_pairs())
    pairs[("argparse", "Namespace")] = argparse.Namespace
    pairs[("pathlib", "PosixPath")] = pathlib.PosixPath
    pairs[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    return pairs


#: namespaces whose classes a fairseq checkpoint may pickle and we never import: they load as placeholders
FAIRSEQ_PLACEHOLDER_ROOTS = ("fairseq", "omegaconf")


def dcp_allowed() -> dict[tuple[str, str], Any]:
    """What torch's distributed-checkpoint `.metadata` pickles: its metadata dataclasses, the storage index,
    sizes, dtypes, layouts and memory formats."""
    from torch.distributed.checkpoint import filesystem, metadata

    pairs: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
        if hasattr(metadata, name)
    }
    pairs[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    pairs[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    pairs[("pathlib", "PosixPath")] = pathlib.PosixPath
    pairs[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            pairs[("torch", name)] = value
    pairs[("collections", "OrderedDict")] = collections.OrderedDict
    for t in _BUILTIN_TYPES:
        pairs[("builtins", t.__name__)] = t
    return pairs


class Placeholder:
    """Stands in for a class of a foreign namespace the checkpoint names (fairseq's meters, task objects):
    it keeps the arguments and the state it is given and calls nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class ExactUnpickler(pickle.Unpickler):
    """Resolves exactly the `(module, name)` pairs of `allowed` (a class attribute set by `restricted`);
    a pair under one of `placeholder_roots` becomes a `Placeholder` subclass; any other global raises
    ForbiddenGlobalError naming it. No module is imported and no attribute looked up on its behalf."""

    allowed: Mapping[tuple[str, str], Any] = {}
    placeholder_roots: tuple[str, ...] = ()

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self.allowed:
            return self.allowed[key]
        if module.split(".")[0] in self.placeholder_roots and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            cache = self.__dict__.setdefault("_placeholders", {})
            if key not in cache:
                cache[key] = type(name, (Placeholder,), {"__module__": f"biomedgpt.placeholder.{module}"})
            return cache[key]
        raise ForbiddenGlobalError(f"{module}.{name}")


def restricted(allowed: Mapping[tuple[str, str], Any], placeholder_roots: Iterable[str] = ()) -> Any:
    """A pickle module (what `torch.load(pickle_module=...)` takes) whose Unpickler is an ExactUnpickler."""
    unpickler = type("RestrictedUnpickler", (ExactUnpickler,),
                     {"allowed": dict(allowed), "placeholder_roots": tuple(placeholder_roots)})

    class Module:
        Unpickler = unpickler
        __name__ = "biomedgpt_exact_pickle"

        @staticmethod
        def load(f: io.IOBase, **kwargs: Any) -> Any:
            return unpickler(f, **kwargs).load()

        @staticmethod
        def loads(data: bytes, **kwargs: Any) -> Any:
            return unpickler(io.BytesIO(data), **kwargs).load()

    return Module


def naming_source(source: str, fn: Callable[[], Any]) -> Any:
    """Run `fn`; a ForbiddenGlobalError it raises comes back naming `source` (the file)."""
    try:
        return fn()
    except ForbiddenGlobalError as err:
        raise ForbiddenGlobalError(err.global_name, source) from None


def check_dcp_metadata(checkpoint: str | Path) -> None:
    """Refuse a torch distributed checkpoint (a folder) whose `.metadata` pickles (torch reads them with plain
    `pickle.load`, on resume and on consolidation) name anything but distributed-checkpoint metadata."""
    folder = Path(checkpoint)
    module = restricted(dcp_allowed())
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".metadata") and path.is_file():
            naming_source(str(path), lambda: module.loads(path.read_bytes()))


#: how torch's weights-only unpickler names a global it refuses ("Unsupported global: GLOBAL x.y was not an
#: allowed global", "Trying to load unsupported GLOBAL os.system whose module os is blocked")
_TORCH_REFUSAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load_weights_only(path: str | Path, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)`; a refusal comes back as ForbiddenGlobalError naming the file and
    the global (torch's own message advises `weights_only=False`, which we never take)."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise refusal(str(path), err) from None


def refusal(source: str, err: pickle.UnpicklingError) -> pickle.UnpicklingError:
    """torch's weights-only refusal of the file `source` as a ForbiddenGlobalError naming the file and the
    global: the first global of the file outside torch's weights-only allow-list (`first_forbidden_global`;
    torch's own message does not name one it meets through STACK_GLOBAL), else the one its message names."""
    found = first_forbidden_global(source) if Path(source).is_file() else None
    if found is None:
        m = _TORCH_REFUSAL.search(str(err))
        found = m.group(1) if m else None
    if found is not None:
        return ForbiddenGlobalError(found, source)
    return pickle.UnpicklingError(f"{source}: refused by the weights-only loader: {str(err).splitlines()[0]}")


class _Inert:
    """What every allowed global becomes while a pickle is only scanned: calling, building or filling it
    does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _weights_only_globals() -> set[str]:
    """The globals torch's weights-only loader accepts (its defaults and `add_safe_globals`), by dotted name."""
    from torch import _weights_only_unpickler as wou

    names = set(getattr(wou, "_get_allowed_globals", dict)())
    names.update(getattr(wou, "_get_user_allowed_globals", dict)())
    names.update(f"{m}.{n}" for m, n in _torch_tensor_pairs())
    return names


class _Scanner(pickle.Unpickler):
    """Reads a pickle's opcodes with every allowed global replaced by `_Inert` (nothing is called) and raises
    ForbiddenGlobalError at the first other one."""

    allowed: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" in self.allowed or "Storage" in name:  # torch names storage types by class
            return _Inert
        raise ForbiddenGlobalError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return None


def first_forbidden_global(path: str | Path) -> str | None:
    """The first global a torch file (zip or legacy) names outside torch's weights-only allow-list, found without
    calling anything; None if there is none (or the file is not a pickle torch wrote)."""
    scanner = type("Scanner", (_Scanner,), {"allowed": _weights_only_globals()})
    streams: list[io.BytesIO] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                streams = [io.BytesIO(zf.read(n)) for n in zf.namelist() if n.endswith("data.pkl")]
        else:
            streams = [io.BytesIO(Path(path).read_bytes())]
    except (OSError, zipfile.BadZipFile):
        return None
    for stream in streams:
        for _ in range(4):  # a legacy file holds its magic number, protocol, system info, then the object
            try:
                scanner(stream).load()
            except ForbiddenGlobalError as err:
                return err.global_name
            except Exception:  # noqa: BLE001 - not a pickle (a legacy file's raw storage bytes): nothing more to scan
                break
    return None
