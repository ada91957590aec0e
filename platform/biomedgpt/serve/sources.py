"""Where served models come from: a model registry (`RegistrySource`) or one exported model directory
(`DirectorySource`, what `biomedgpt serve MODEL_DIR` serves). Both resolve a `ModelRef` to a
`ModelEntry` (its model card says what the model is), list a department's models, and give the local
directory a model replica loads."""

import collections
import re
import time
from pathlib import Path
from typing import Any, List

from ..modeldir import read_model_meta
from ..spec import ServeAppSpec
from .registry import ModelEntry, ModelRef, Registry, UnknownModel, registry_url


class RegistrySource:
    """Models of a registry; `@latest` resolutions are cached for `ttl` seconds, exact versions found for good
    (versions are immutable), and a version not found (yet: an export may be publishing it) for `ttl` seconds."""

    def __init__(self, url: str, ttl: float = 5.0) -> None:
        self.registry = Registry(url)
        self.ttl = ttl
        self._cache: "collections.OrderedDict[tuple, tuple[float, Any]]" = collections.OrderedDict()

    def describe(self) -> str:
        return f"registry {self.registry.url}"

    def _cached(self, key: tuple, ttl: float, compute):
        """`compute()` cached for `ttl` seconds; an UnknownModel it raises, for at most `self.ttl` seconds."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            value = hit[1]
        else:
            try:
                value = compute()
            except UnknownModel as err:
                value, ttl = err, min(ttl, self.ttl)
            self._cache[key] = (now + ttl, value)
            while len(self._cache) > 1024:
                self._cache.popitem(last=False)
        if isinstance(value, Exception):
            raise value
        return value

    def resolve(self, ref: ModelRef) -> ModelEntry:
        exact = ref.version is not None
        return self._cached(("resolve", ref), 1e9 if exact else self.ttl, lambda: self.registry.resolve(ref))

    def list(self, department: str) -> List[ModelEntry]:
        return self._cached(("list", department), self.ttl, lambda: self.registry.list(department))

    def local_dir(self, entry: ModelEntry) -> Path:
        return self.registry.local_dir(entry)


class DirectorySource:
    """One exported model directory, known as `<department>/<name>@1` (name: the run that trained it), with
    the card its metadata makes (`read_model_meta`)."""

    def __init__(self, model_dir: str, department: str) -> None:
        self.path = Path(model_dir)
        meta = read_model_meta(self.path)
        name = re.sub(r"[^a-z0-9._-]+", "-", str(meta.run or self.path.name).lower()).strip("-._") or "model"
        card = dict(meta.card_fields(), training_data=[{"dataset": d} for d in meta.train_data], metrics={},
                    licence=None)
        self.entry = ModelEntry(department, name[:63], 1, str(self.path), {"created": None}, card)

    def describe(self) -> str:
        return f"model directory {self.path}"

    def resolve(self, ref: ModelRef) -> ModelEntry:
        e = self.entry
        if (ref.department, ref.name) != (e.department, e.name) or ref.version not in (None, e.version):
            raise UnknownModel(f"no model {ref}; this app serves {e.id}")
        return e

    def list(self, department: str) -> List[ModelEntry]:
        return [self.entry] if department == self.entry.department else []

    def local_dir(self, entry: ModelEntry) -> Path:
        return self.path


def make_source(spec: ServeAppSpec):
    """The model source a serving spec names: its model directory, else its registry."""
    if spec.model_dir:
        return DirectorySource(spec.model_dir, spec.team or "local")
    return RegistrySource(registry_url(spec.registry), spec.latest_ttl_s)
