"""The model registry: versioned, immutable model directories on object storage.

Layout under the registry URL (a local path, ``file://`` or ``s3://``; `--registry`, else
``$BIOMEDGPT_REGISTRY``, else ``registry/`` under the current directory)::

    <registry>/<department>/<name>/<version>/
        config.json  model.safetensors  tokenizer files  answers.json (candidate answers / labels)
        training.json   what the run recorded (task, image size, training data, step)
        model_card.json the model card as data: id, training data, metrics, licences, files
        README.md       the same card for people
        .claim          who claimed this version (local registries: written first, exclusively)
        .claims/<nonce> who claimed this version (object stores: one object per claimant)
        manifest.json   every file with its size and sha256, written LAST: the version exists from then on

A model id is ``<department>/<name>@<version>`` (``stanford-like-radiology/vqa-rad@3``); ``@latest``
(or no ``@``) resolves to the highest published version. The department is the team name of
cluster/tenants.yaml, whose API keys may use the models.

Publishing never overwrites: an export first claims the next free version number, so concurrent
exports get distinct versions; it then writes the files and finally ``manifest.json``. Readers see a
version only once its manifest exists, so a half-written or crashed export is never served (its number
stays burned). Locally the claim is ``<version>/.claim`` created exclusively (a temporary file linked
into place, which never replaces), and so is the manifest. On object stores, which need not honour
conditional writes (``If-None-Match``), the claim needs only read-after-write consistency (AWS S3,
MinIO and Ceph give it): the exporter writes ``<version>/.claims/<nonce>``, a name no one else writes,
then lists the version's folder; the claim holds when that listing shows nothing but its own object.
Two claimants cannot both hold a version: each would have listed before the other wrote, yet each
wrote before it listed (a holder never withdraws its claim). A claimant that sees another claim
withdraws its own, waits a random while and tries the same number again, or the next one if the
version is still held.

Nothing the registry writes lands outside its folders: a manifest's file names must be relative paths
without ``..`` or empty parts (checked before any byte is written, and every destination must resolve
inside the version folder), symbolic links are refused in a source and in a local version, and a
registry version given as a source must be published (its manifest present and matching every file).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..data import storage
from ..data.storage import DEFAULT_REGISTRY, REGISTRY_ENV, registry_url  # noqa: F401  (this module's API)
from ..modeldir import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD, CHECKPOINT_META, CONFIG, WEIGHTS, ModelMeta,
                        adapter_base, adapter_dir_of, export_checkpoint, merge_adapter, read_adapter_config,
                        read_model_meta)

CACHE_ENV = "BIOMEDGPT_MODEL_CACHE"
MANIFEST = "manifest.json"
CLAIM = ".claim"
CLAIMS = ".claims"
CARD_JSON = CARD
CARD_MD = "README.md"
DEFAULT_LICENCE = "Apache-2.0"
NAME = r"[a-z0-9][a-z0-9._-]{0,62}"
_ID = re.compile(rf"^(?:(?P<department>{NAME})/)?(?P<name>{NAME})(?:@(?P<version>latest|[1-9][0-9]{{0,8}}))?$")
REPO = Path(__file__).resolve().parents[3]


class RegistryError(ValueError):
    """A registry operation failed; the message names the registry location and the model."""


class UnknownModel(RegistryError):
    """No such model or version in the registry."""


class BadModelId(RegistryError):
    """A string that is not a model id."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model id: department, name and version (None = latest)."""

    department: str
    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str, default_department: str | None = None) -> "ModelRef":
        """`dept/name@3`, `dept/name@latest`, `dept/name`; `name@3` / `name` when a default department is given."""
        m = _ID.match(text.strip()) if isinstance(text, str) else None
        if not m or (m.group("department") is None and default_department is None):
            raise BadModelId(f"{text!r} is not a model id (expected <department>/<name>[@<version>|@latest], "
                             "lower-case letters, digits, '.', '_' or '-')")
        version = m.group("version")
        return cls(m.group("department") or default_department, m.group("name"),
                   None if version in (None, "latest") else int(version))

    def __str__(self) -> str:
        return f"{self.department}/{self.name}@{'latest' if self.version is None else self.version}"


@dataclass
class ModelEntry:
    """One published version: where it lives and its manifest and model card."""

    department: str
    name: str
    version: int
    url: str
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    card: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def id(self) -> str:
        return f"{self.department}/{self.name}@{self.version}"

    @property
    def meta(self) -> ModelMeta:
        """What the model card says about the model (tasks, image size, answers, classes)."""
        return ModelMeta.from_card(self.card)

    @property
    def kind(self) -> str:
        """`model` (full weights) or `adapter` (LoRA weights over the base the card names)."""
        return "adapter" if self.card.get("kind") == "adapter" else "model"

    @property
    def base(self) -> str | None:
        """An adapter's base: a registry id `<department>/<name>@<version>`, or a model directory URL."""
        return self.card.get("base") if self.kind == "adapter" else None

    def summary(self) -> dict[str, Any]:
        """What `GET /v1/models` and `biomedgpt registry list --json` show."""
        c, m = self.card, self.meta
        return {"id": self.id, "department": self.department, "name": self.name, "version": self.version,
                "created": self.manifest.get("created"), "tasks": list(m.tasks), "size": c.get("size"),
                "image_size": m.image_size, "answers": len(m.answers) if m.answers else 0,
                "training_data": [d.get("dataset") for d in c.get("training_data", [])],
                "metrics": c.get("metrics", {}), "licence": c.get("licence"), "kind": self.kind, "base": self.base,
                "adapter_bytes": c.get("adapter_bytes") if self.kind == "adapter" else None}


#: local version folders whose files matched their manifest: (folder, file stats) -> True. A file changed since
#: (size or mtime) is hashed again; an unchanged one is not, so a model the LRU evicted reloads without rehashing.
_VERIFIED: dict[tuple[str, tuple], bool] = {}


def verify_local_files(folder: Path, entry: "ModelEntry") -> None:
    """Every file of a local version folder has its manifest's size and sha256 (a file changed or removed
    after export is a RegistryError naming it, before a byte of it is loaded)."""
    stats = []
    for rel, info in sorted(entry.manifest["files"].items()):
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            raise RegistryError(f"{entry.url}/{rel}: missing (the manifest lists it)") from None
        if st.st_size != info["size"]:
            raise RegistryError(f"{entry.url}/{rel}: {st.st_size} bytes, the manifest says {info['size']}")
        stats.append((rel, st.st_size, st.st_mtime_ns))
    key = (str(folder), tuple(stats))
    if key in _VERIFIED:
        return
    for rel, info in entry.manifest["files"].items():
        if _sha256(folder / rel) != info["sha256"]:
            raise RegistryError(f"{entry.url}/{rel}: sha256 differs from the manifest (changed after export)")
    _VERIFIED[key] = True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


_BAD_PART = re.compile(r"^$|^\.\.?$")


def safe_relpath(rel: Any, where: str) -> str:
    """`rel` if it is a relative POSIX path inside its folder (no leading '/', drive or backslash, no '..', '.' or
    empty parts, no NUL); else RegistryError naming `where` and the path."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel
            or re.match(r"^[A-Za-z]:", rel) or any(_BAD_PART.match(p) for p in rel.split("/"))):
        raise RegistryError(f"{where}: file {rel!r} is not a relative path inside the version folder (absolute, "
                            "'..', '.' or empty parts); refused before writing anything")
    return rel


def manifest_files(manifest: Any, where: str) -> dict[str, dict[str, Any]]:
    """The `files` of a manifest ({relative path: {"size", "sha256"}}), every path checked (`safe_relpath`)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise RegistryError(f"{where}: files: missing or not a mapping")
    for rel, info in files.items():
        safe_relpath(rel, f"{where}: files")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise RegistryError(f"{where}: files.{rel}: no sha256")
    return files


def _inside(root: Path, path: Path, what: str) -> None:
    """Refuse `path` if it, or a folder between `root` and it, is a symbolic link, or if it resolves outside `root`."""
    current = path
    while current != root and root in current.parents:
        if current.is_symlink():
            raise RegistryError(f"{what}: {current} is a symbolic link; refused")
        current = current.parent
    if not path.resolve().is_relative_to(root.resolve()):
        raise RegistryError(f"{what}: {path} resolves outside {root}; refused")


def check_no_symlinks(folder: Path, source: str) -> None:
    """Refuse a source folder holding a symbolic link (its target, anywhere on the machine, would be published)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for entry in (*dirnames, *filenames):
            if os.path.islink(os.path.join(dirpath, entry)):
                rel = Path(dirpath, entry).relative_to(folder).as_posix()
                raise RegistryError(f"{source}: {rel} is a symbolic link; a registry export copies regular files only")


def check_published_version(folder: Path, source: str) -> None:
    """A registry version given as an export source must be complete: its manifest present and every file it
    lists there with the size and sha256 it records (a crashed or running export is never re-published)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise RegistryError(f"{source}: a registry version without {MANIFEST} (an unpublished, possibly partial "
                            "export); refused")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{source}/{MANIFEST}: unreadable: {err}") from None
    files = manifest_files(manifest, f"{source}/{MANIFEST}")
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file() or _sha256(path) != info["sha256"]:
            raise RegistryError(f"{source}/{rel}: missing or differs from {MANIFEST}; refused (a partial or altered "
                                "registry version)")


def create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` to `url` only if nothing is there yet (atomically); False if it already exists."""
    if storage.is_local(url):
        path = storage.local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # fails if the name exists: never replaces
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    fs, path = storage.filesystem(url)
    try:
        fs.pipe_file(path, data, mode="create")  # S3: PUT with If-None-Match: *
        return True
    except FileExistsError:
        return False
    except OSError as err:  # some s3fs versions surface 412 Precondition Failed as a plain OSError
        if "PreconditionFailed" in str(err) or "412" in str(err):
            return False
        raise


# ----------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------


def _dataset_info(dataset: str) -> dict[str, Any]:
    """Licence, access class and citation of a dataset from datasets_spec/<name>.yaml (if described)."""
    path = REPO / "datasets_spec" / f"{dataset}.yaml"
    if not path.is_file():
        return {"dataset": dataset, "licence": "unknown (no datasets_spec entry)"}
    from ..data.dataset_spec import load_dataset_spec

    spec = load_dataset_spec(path)
    return {"dataset": dataset, "licence": spec.licence, "access": spec.access, "citation": spec.citation.strip()}


def check_multi_label_classes(model_dir: Path, meta: ModelMeta, source: str) -> None:
    """A multi-label model's classes (training.json) must decode as lists with its tokenizer (`MultiLabelTrie`):
    checked at export, so that serving never meets a label set it cannot answer with."""
    if not meta.multi_label:
        return
    from ..model.constrained import MultiLabelTrie
    from ..model.tokenizer import BiomedGPTTokenizer
    from ..tasks.classify import NO_FINDING

    try:
        MultiLabelTrie.from_texts(BiomedGPTTokenizer.from_pretrained(model_dir), list(meta.classes), NO_FINDING)
    except (ValueError, TypeError) as err:
        raise RegistryError(f"{source}: training.json's multi-label classes cannot be answered as a list with the "
                            f"model's tokenizer: {err}") from None


def build_card(model_dir: Path, meta: ModelMeta, metrics: dict[str, Any], licence: str,
               source: str, description: str = "", tasks: list[str] | None = None) -> dict[str, Any]:
    """The model card (as data) of a model directory (`meta`: `read_model_meta` of it). `tasks`: what the
    model may be asked (default: the task it was trained on; none recorded: a generalist)."""
    # an adapter directory has no config.json: its run recorded the base's architecture
    cfg = json.loads((model_dir / CONFIG).read_text()) if (model_dir / CONFIG).is_file() else \
        dict(meta.training.get("model_config") or {})
    training = meta.training
    train_data = []
    for item in meta.train_data:
        dataset, _, split = str(item).partition("/")
        train_data.append(dict(_dataset_info(dataset), split=split or None))
    return {
        **meta.card_fields(),
        "description": description or (f"BiomedGPT fine-tuned by run {meta.run!r}" if meta.run else "BiomedGPT model"),
        "tasks": list(tasks or meta.tasks),
        "size": meta.size or cfg.get("size") or "custom",
        "run": meta.run, "team": training.get("team"), "step": training.get("step"),
        "training_data": train_data,
        "metrics": metrics,
        "licence": licence,
        "data_licences": {d["dataset"]: d["licence"] for d in train_data},
        "credentialed_data": sorted(d["dataset"] for d in train_data if d.get("access") == "credentialed"),
        "model_config": {k: cfg.get(k) for k in ("d_model", "encoder_layers", "decoder_layers", "vocab_size",
                                                  "resnet_type") if k in cfg},
        "source": source,
        "exported_by": f"{getpass.getuser()}@{socket.gethostname()}",
    }


def card_markdown(card: dict[str, Any]) -> str:
    lines = [f"# {card['id']}", "", card.get("description", ""), "",
             f"- tasks: {', '.join(card.get('tasks') or []) or 'any (no training task recorded: a generalist)'}",
             f"- size: {card.get('size')} (image size {card.get('image_size')} px)",
             f"- created: {card.get('created')} from `{card.get('source')}`",
             f"- licence of the model: {card.get('licence')}", "", "## Training data", ""]
    if card.get("training_data"):
        lines += ["| dataset | split | licence | access |", "|---|---|---|---|"]
        lines += [f"| {d['dataset']} | {d.get('split') or '-'} | {d.get('licence')} | {d.get('access', '-')} |"
                  for d in card["training_data"]]
        if card.get("credentialed_data"):
            lines += ["", "Trained on credentialed data (" + ", ".join(card["credentialed_data"]) +
                      "): use is bound by those data-use agreements."]
    else:
        lines.append("Not recorded (the source carried no training.json).")
    lines += ["", "## Metrics", ""]
    if card.get("metrics"):
        lines += ["```json", json.dumps(card["metrics"], indent=2, sort_keys=True), "```"]
    else:
        lines.append("No evaluation found beside the source.")
    answers = card.get("answers")
    lines += ["", "## Candidate answers", "",
              f"{len(answers)} (closed-set decoding over answers.json)" if answers else "none (free generation)"]
    return "\n".join(lines) + "\n"


def _find_metrics(source: Path, is_checkpoint: bool) -> dict[str, Any]:
    """The evaluation of the run beside a source: `<run>/eval/metrics.json` (runner.py's layout: a checkpoint
    is `<run>/checkpoint-N`, the exported model `<run>/export`), or metrics.json inside a model directory."""
    candidates = [source / "metrics.json"] if not is_checkpoint else []
    candidates.append(source.parent / "eval" / "metrics.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    return {}


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------


def check_export_owner(team: str, department: str, tenants: Any) -> None:
    """An export into `department` is the exporter's team's only if the team is that department of the tenants
    file: a team cannot publish into another department's models (whose callers it would then answer)."""
    owner = tenants.teams.get(team)
    if owner is None:
        raise RegistryError(f"--team {team!r}: not a team of {tenants.path} ({', '.join(sorted(tenants.teams))})")
    if owner.local_only or owner.name != department:
        raise RegistryError(f"--department {department!r}: team {team!r} does not own it (a team exports only into "
                            f"its own department; {team!r} is "
                            f"{'a local-only team with no department' if owner.local_only else owner.where}; "
                            f"policy: {tenants.path})")


class Registry:
    """Model directories under one URL (see the module docstring for the layout and the protocol)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = registry_url(url).rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def _url(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    # -- reading ---------------------------------------------------------------------------------

    def _scan(self, department: str | None = None) -> dict[tuple[str, str], dict[int, set[str]]]:
        """{(department, name): {version: names of the marker files present}}: one listing per department
        folder (of `department` only when given), so what else lies under the registry (its `_audit/` trail)
        is never listed."""
        out: dict[tuple[str, str], dict[int, set[str]]] = {}
        for dept in [department] if department is not None else storage.list_dirs(self.url):
            if not re.fullmatch(NAME, dept):
                continue  # not written by an export (which checks it): never a path component of ours
            for rel in storage.list_files(self._url(dept)):
                parts = rel.split("/")
                if len(parts) != 3 or not parts[1].isdigit():
                    continue
                name, ver, fname = parts
                if not re.fullmatch(NAME, name):
                    continue
                out.setdefault((dept, name), {}).setdefault(int(ver), set()).add(fname)
        return out

    def versions(self, department: str, name: str, *, published_only: bool = True) -> list[int]:
        prefix = self._url(department, name)
        found: dict[int, set[str]] = {}
        for rel in storage.list_files(prefix):
            ver, _, fname = rel.partition("/")
            if ver.isdigit() and fname:  # any object claims the number; only a top-level manifest publishes it
                found.setdefault(int(ver), set()).add(fname)
        return sorted(v for v, names in found.items() if MANIFEST in names or not published_only)

    def entry(self, department: str, name: str, version: int) -> ModelEntry:
        url = self._url(department, name, str(version))
        for attempt in (1, 2):
            try:
                manifest = json.loads(storage.read_text(storage.join(url, MANIFEST)))
                card = json.loads(storage.read_text(storage.join(url, CARD_JSON)))
                break
            except FileNotFoundError:
                if attempt == 2 or storage.is_local(url):
                    raise UnknownModel(f"{self.url}: no model {department}/{name}@{version}") from None
                storage.invalidate(url)  # a listing cached before the version was published: ask the store
        return ModelEntry(department, name, version, url, manifest, card)

    def resolve(self, ref: str | ModelRef, default_department: str | None = None) -> ModelEntry:
        """The published version a model id names (`@latest` or no version: the highest)."""
        if not isinstance(ref, ModelRef):
            ref = ModelRef.parse(ref, default_department)
        if ref.version is None:
            versions = self.versions(ref.department, ref.name)
            if not versions:
                raise UnknownModel(f"{self.url}: no model {ref.department}/{ref.name}")
            return self.entry(ref.department, ref.name, versions[-1])
        return self.entry(ref.department, ref.name, ref.version)

    def list(self, department: str | None = None, *, all_versions: bool = True) -> list[ModelEntry]:
        """Published models (of one department), sorted by id; only the latest of each with all_versions=False."""
        out = []
        for (dept, name), versions in sorted(self._scan(department).items()):
            if department is not None and dept != department:
                continue
            published = sorted(v for v, names in versions.items() if MANIFEST in names)
            for v in (published if all_versions else published[-1:]):
                out.append(self.entry(dept, name, v))
        return out

    def local_dir(self, entry: ModelEntry, cache_dir: str | Path | None = None) -> Path:
        """A local directory with the version's files: the registry path itself when the registry is local
        (refused if a file of its manifest is a symbolic link or lies outside the version folder), else a
        verified copy in the cache (versions are immutable, so a cached copy never goes stale). The
        manifest's file names are checked before any byte is written, and every destination must resolve
        inside the version's folder of the cache."""
        where = storage.join(entry.url, MANIFEST)
        files = manifest_files(entry.manifest, where)
        if storage.is_local(entry.url):
            root = storage.local_path(entry.url)
            for rel in files:
                _inside(root, root / rel, f"{where}: {rel!r}")
            verify_local_files(root, entry)
            return root
        for what, value in (("department", entry.department), ("name", entry.name)):
            if not re.fullmatch(NAME, value or ""):
                raise RegistryError(f"{where}: {what} {value!r} is not a registry name; refused")
        cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "biomedgpt-models")
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        target = cache / key / entry.department / entry.name / str(int(entry.version))
        if target.exists() or target.is_symlink():
            _inside(cache, target, f"{CACHE_ENV} {cache}: cached copy {target}")
            if (target / MANIFEST).is_file():
                return target
        partial = target.with_name(f".{entry.version}.{uuid.uuid4().hex[:8]}.partial")
        partial.mkdir(parents=True)
        try:
            _inside(cache, partial, f"{CACHE_ENV} {cache}")
            for rel, info in files.items():
                dest = partial / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _inside(partial, dest, f"{where}: {rel!r}")
                with open(dest, "xb") as fh:  # never follows or replaces what is there
                    fh.write(storage.read_bytes(storage.join(entry.url, rel)))
                if _sha256(dest) != info["sha256"]:
                    raise RegistryError(f"{entry.url}/{rel}: sha256 differs from the manifest (corrupt copy)")
            (partial / MANIFEST).write_text(json.dumps(entry.manifest, indent=2, sort_keys=True))
            try:
                partial.rename(target)
            except OSError:  # another process finished the same copy first
                if not (target / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target

    # -- writing ---------------------------------------------------------------------------------

    def export(self, source: str | Path, department: str, name: str, *, licence: str | None = None,
               metrics: dict[str, Any] | None = None, description: str = "", tasks: list[str] | None = None,
               team: str | None = None, tenants: Any = None, merge: bool = False, base: str | None = None
               ) -> ModelEntry:
        """Publish a new version of `department/name` from a run checkpoint (`<run>/checkpoint-N`) or a model
        directory (with config.json, from `biomedgpt convert`/`export`); returns the published entry. With `team`
        (the exporter's team; `biomedgpt registry export` always gives it) the team must own the department
        (`check_export_owner`, against `tenants`)."""
        if team is not None:
            check_export_owner(team, department, tenants)
        for what, value in (("department", department), ("name", name)):
            if not re.fullmatch(NAME, value or ""):
                raise RegistryError(f"{what} {value!r}: must be lower-case letters, digits, '.', '_' or '-' "
                                    "(at most 63 characters, starting with a letter or digit)")
        if tasks:
            from ..tasks import task_names

            unknown = [t for t in tasks if t not in task_names()]
            if unknown:
                raise RegistryError(f"task {unknown[0]!r}: not a task family ({', '.join(task_names())})")
        with tempfile.TemporaryDirectory(prefix="biomedgpt-registry-") as tmp:
            staged, meta, found_metrics, source_desc = self._stage(str(source), Path(tmp))
            adapter = adapter_dir_of(staged)
            if not adapter and (merge or base):
                raise RegistryError(f"{source}: {'--merge' if merge else '--base'} is for adapters; this is a full model")
            if adapter:
                base_ref, base_dir = self.adapter_base(staged, str(source), base, fetch=merge)
                if merge:
                    merged = Path(tmp) / "merged"
                    merge_adapter(staged, base_dir, merged)
                    staged, meta = merged, read_model_meta(merged)
            check_multi_label_classes(staged, meta, str(source))
            card = build_card(staged, meta, metrics if metrics is not None else found_metrics,
                              licence or DEFAULT_LICENCE, source_desc, description, tasks)
            if adapter and merge:
                card["merged_from"] = {"base": base_ref["ref"], "base_sha256": base_ref["sha256"]}
            elif adapter:
                config = json.loads((staged / ADAPTER_CONFIG).read_text())
                card.update(kind="adapter", base=base_ref["ref"], base_sha256=base_ref["sha256"],
                            adapter_bytes=(staged / ADAPTER_WEIGHTS).stat().st_size,
                            adapter={"method": "lora", "rank": config.get("r"), "alpha": config.get("lora_alpha"),
                                     "target_modules": sorted(config.get("target_modules") or []),
                                     "trainable": config.get("modules_to_save") or []})
            return self._publish(staged, department, name, card)

    def adapter_base(self, adapter_dir: Path, source: str, base: str | None = None, *, fetch: bool = False
                     ) -> tuple[dict[str, str], Path | None]:
        """({"ref": registry id or model directory URL, "sha256"}, its local directory when `fetch`) of the base an
        adapter directory names (training.json's `base`; `base`, a registry id, overrides where to find it). A
        base that is missing, or whose weights are not those the adapter was trained on, is refused."""
        try:
            recorded = adapter_base(adapter_dir)
        except ValueError as err:
            raise RegistryError(str(err)) from None
        sha = recorded["sha256"]
        ref = base or recorded.get("id")
        if ref:
            try:
                entry = self.resolve(ref)
            except BadModelId as err:
                raise RegistryError(f"--base: {err}") from None
            except UnknownModel:
                raise RegistryError(f"{source}: the adapter's base {ref} is missing from {self.url}; publish the base "
                                    "first (or name it with --base)") from None
            if entry.kind != "model":
                raise RegistryError(f"{source}: the adapter's base {entry.id} is itself an adapter")
            found = (entry.manifest.get("files") or {}).get(WEIGHTS, {}).get("sha256")
            if found != sha:
                raise RegistryError(f"{source}: the adapter's base {entry.id} has changed: its {WEIGHTS} is not the one "
                                    f"the adapter was trained on (sha256 {sha[:12]}...)")
            return {"ref": entry.id, "sha256": sha}, (self.local_dir(entry) if fetch else None)
        url = recorded.get("init")
        if not isinstance(url, str) or not url:
            raise RegistryError(f"{source}: training.json names no base (id or model directory)")
        weights = storage.join(url, WEIGHTS)
        try:
            if storage.is_local(url):
                found = _sha256(storage.local_path(weights))
            else:
                found = hashlib.sha256(storage.read_bytes(weights)).hexdigest()
        except (FileNotFoundError, OSError):
            raise RegistryError(f"{source}: the adapter's base {url} is missing ({WEIGHTS} not found)") from None
        if found != sha:
            raise RegistryError(f"{source}: the adapter's base {url} has changed: its {WEIGHTS} is not the one the "
                                f"adapter was trained on (sha256 {sha[:12]}...)")
        if not fetch:
            return {"ref": url, "sha256": sha}, None
        if storage.is_local(url):
            return {"ref": url, "sha256": sha}, storage.local_path(url)
        local = adapter_dir.parent / "base"
        storage.download_dir(url, local)
        check_no_symlinks(local, url)
        return {"ref": url, "sha256": sha}, local


    def _stage(self, source: str, tmp: Path) -> tuple[Path, ModelMeta, dict[str, Any], str]:
        """A local model directory for the source (exported if it is a checkpoint), its metadata and the
        metrics found beside it."""
        local: Path
        if storage.is_local(source):
            local = storage.local_path(source)
            if not local.is_dir():
                raise RegistryError(f"{source}: no such directory (expected a run checkpoint or a model directory)")
        else:  # a checkpoint or model directory on object storage: copy it (and the run's eval) first
            fs, path = storage.filesystem(source)
            if not fs.isdir(path):
                raise RegistryError(f"{source}: no such directory (expected a run checkpoint or a model directory)")
            local = tmp / "source" / (storage.basename(source) or "model")
            local.mkdir(parents=True)
            for rel in storage.list_files(source):
                dest = local / safe_relpath(rel, source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _inside(local, dest, f"{source}: {rel!r}")
                dest.write_bytes(storage.read_bytes(storage.join(source, rel)))
            parent = path.rstrip("/").rsplit("/", 1)[0]
            if fs.exists(parent + "/eval/metrics.json"):
                (local.parent / "eval").mkdir(parents=True, exist_ok=True)
                fs.get(parent + "/eval/metrics.json", str(local.parent / "eval" / "metrics.json"))
        check_no_symlinks(local, source)
        if any((local / marker).exists() for marker in (MANIFEST, CLAIM, CLAIMS)):
            check_published_version(local, source)
        if (local / CHECKPOINT_META).is_file():
            model_dir = tmp / "model"
            export_checkpoint(local, model_dir)
            is_checkpoint = True
        elif (local / CONFIG).is_file():
            model_dir = tmp / "model"
            shutil.copytree(local, model_dir, ignore=shutil.ignore_patterns(MANIFEST, CLAIM, CLAIMS, CARD_JSON, ".*"))
            is_checkpoint = False
        elif (local / ADAPTER_CONFIG).is_file():
            model_dir = tmp / "model"
            shutil.copytree(local, model_dir, ignore=shutil.ignore_patterns(MANIFEST, CLAIM, CLAIMS, CARD_JSON, ".*"))
            is_checkpoint = False
        else:
            raise RegistryError(f"{source}: neither a run checkpoint ({CHECKPOINT_META}), a model directory "
                                f"(config.json) nor an adapter directory ({ADAPTER_CONFIG}); see `biomedgpt export` "
                                "and `biomedgpt convert`")
        if adapter_dir_of(model_dir):
            if not (model_dir / ADAPTER_WEIGHTS).is_file():
                raise RegistryError(f"{source}: no {ADAPTER_WEIGHTS} in the adapter directory")
            try:
                read_adapter_config(model_dir)
            except ValueError as err:
                raise RegistryError(f"{source}: {err}") from None
        elif not (model_dir / WEIGHTS).is_file():
            raise RegistryError(f"{source}: no model.safetensors in the model directory")
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
            raise RegistryError(f"{source}: no tokenizer files in the model directory (a served model needs them)")
        return model_dir, read_model_meta(model_dir), _find_metrics(local, is_checkpoint), source

    def _publish(self, staged: Path, department: str, name: str, card: dict[str, Any]) -> ModelEntry:
        claim = json.dumps({"by": card["exported_by"], "pid": os.getpid(), "at": _now(),
                            "nonce": uuid.uuid4().hex}).encode()
        version = self._claim(department, name, claim)
        url = self._url(department, name, str(version))
        card = dict(card, id=f"{department}/{name}@{version}", department=department, name=name, version=version,
                    created=_now())
        (staged / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True))
        (staged / CARD_MD).write_text(card_markdown(card))
        files = {}
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            rel = path.relative_to(staged).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            storage.write_bytes(storage.join(url, rel), path.read_bytes())
        manifest = {"format": 1, "id": card["id"], "department": department, "name": name, "version": version,
                    "created": card["created"], "files": files}
        if not self._write_manifest(url, json.dumps(manifest, indent=2, sort_keys=True).encode()):
            raise RegistryError(f"{url}: {MANIFEST} appeared while this export held the claim; the registry is being "
                                "written by something that does not follow the protocol")
        return ModelEntry(department, name, version, url, manifest, card)

    def _claim(self, department: str, name: str, claim: bytes) -> int:
        """Claim the next free version of `department/name` (see the module docstring); returns its number."""
        existing = self.versions(department, name, published_only=False)
        version = (existing[-1] if existing else 0) + 1
        local = storage.is_local(self.url)
        mine = f"{CLAIMS}/{uuid.uuid4().hex}"
        for _ in range(1000):
            folder = self._url(department, name, str(version))
            if local:
                if create_exclusive(storage.join(folder, CLAIM), claim):
                    return version
                version += 1  # taken by a concurrent export: the next one
                continue
            storage.write_bytes(storage.join(folder, mine), claim)
            present = self._fresh_list(folder)
            if mine not in present:
                raise RegistryError(f"{folder}/{mine}: the claim just written is not listed; the store must list what "
                                    "it has written (read-after-write consistency) for versions to be claimed")
            if present == {mine}:
                return version
            # another claim is there: withdraw ours, wait a random while, and take the next number only if the
            # version is still held (its holder never withdraws; claimants that saw each other all withdraw)
            storage.remove(storage.join(folder, mine))
            time.sleep(random.uniform(0.01, 0.1))
            if self._fresh_list(folder):
                version += 1
        raise RegistryError(f"{self.url}: could not claim a version of {department}/{name}")

    @staticmethod
    def _fresh_list(folder: str) -> set[str]:
        """The objects under `folder` as the store lists them now (fsspec's listing cache bypassed)."""
        fs, path = storage.filesystem(folder)
        fs.invalidate_cache(path)
        return set(storage.list_files(folder))

    def _write_manifest(self, url: str, data: bytes) -> bool:
        """Publish: the manifest, never over one that is there (locally an exclusive create; on object stores the
        claim makes this export the version's only writer, and an existing manifest is refused)."""
        target = storage.join(url, MANIFEST)
        if storage.is_local(url):
            return create_exclusive(target, data)
        fs, path = storage.filesystem(target)
        fs.invalidate_cache(path.rsplit("/", 1)[0])
        if fs.exists(path):
            return False
        storage.write_bytes(target, data)
        return True


def format_table(entries: Iterable[ModelEntry]) -> str:
    rows = [("MODEL", "KIND", "BASE", "TASKS", "SIZE", "CREATED", "TRAINING DATA", "METRICS")]
    for e in entries:
        s = e.summary()
        metrics = s["metrics"]
        brief = ""
        if isinstance(metrics, dict) and metrics:
            first_key = next(iter(metrics))
            first = metrics[first_key]
            if isinstance(first, dict):
                nums = {k: v for k, v in first.items() if isinstance(v, (int, float)) and k != "count"}
                brief = f"{first_key}: " + ", ".join(f"{k} {v:.3f}" for k, v in list(nums.items())[:2])
            elif isinstance(first, (int, float)):
                brief = f"{first_key} {first:.3f}"
        kind = s["kind"] if s["kind"] == "model" else f"adapter ({_bytes(s['adapter_bytes'])})"
        rows.append((s["id"], kind, s["base"] or "-", ",".join(s["tasks"]), str(s["size"]), str(s["created"] or "-"),
                     ",".join(x for x in s["training_data"] if x) or "-", brief or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
