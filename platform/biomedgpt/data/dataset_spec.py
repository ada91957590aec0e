"""``datasets_spec/*.yaml``: one typed, validated description per dataset.

A dataset spec says what a dataset is (task, the stages that use it, native format, where to obtain
it, citation, licence, access class), how its splits map from the release, the prompt BiomedGPT uses
for it, the metrics it is reported with, and where answer candidates for constrained decoding come
from. The shard builder reads ``source.converter``, ``source.files``/``source.options``, ``licence``
and ``access`` from it.

A dataset without a converter yet says so explicitly: ``source.converter: null`` together with
``source.converter_note`` (why, and what a converter would read). A missing ``converter`` key is an
error, so a spec can never lack a converter by accident.

Every error names the file, the field path and what was expected; unknown keys are errors.

>>> spec = load_dataset_spec("datasets_spec/vqa_rad.yaml")
>>> spec.prompt.instruction, spec.metrics
(' {question}?', ['vqa_accuracy_closed', 'vqa_accuracy_open', 'vqa_accuracy'])
"""

from __future__ import annotations

import dataclasses
import inspect
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from ..tasks import get_task, task_names
from ..yamlspec import Dialect, SchemaError, build
from .converters import CONVERTERS
from .converters.manifest import MANIFEST_CONVERTERS, ManifestConverter, check_manifest_options

#: Fine-tuning task families, then the pretraining-only record kinds: ``text`` (text infilling),
#: ``image`` (image infilling / masked image modelling) and ``detection`` (boxes + labels).
TASKS = ("vqa", "caption", "classify", "nli", "summarize", "text", "image", "detection")
#: What a dataset is used for: pretraining, fine-tuning (+ evaluation), or evaluation without
#: fine-tuning on it (zero-shot).
STAGES = ("pretrain", "finetune", "zero_shot")
PRETRAINING_TASKS = ("text", "image", "detection")
ACCESS = ("open", "credentialed")
SPLITS = ("train", "val", "test")
SPLIT_ROLES = ("train", "evaluate", "train_and_evaluate")
CANDIDATE_POLICIES = ("answers_of_splits", "class_names", "fixed", "none")

#: Metric names the evaluation code reports, per task.
METRICS: Mapping[str, tuple[str, ...]] = {
    "vqa": ("vqa_accuracy", "vqa_accuracy_closed", "vqa_accuracy_open"),
    "caption": ("bleu4", "rouge_l", "meteor", "cider"),
    "classify": ("accuracy", "f1_macro", "auc"),
    "nli": ("accuracy",),
    "summarize": ("rouge1", "rouge2", "rouge_l"),
    "text": (),
    "image": (),
    "detection": (),
}

#: Record fields a prompt may use, per task: the shard record of that task, plus, for the
#: pretraining objectives, what the objective derives from it (``masked``: the text with BART-style
#: ``<mask>`` spans; ``codes``: the VQGAN ``<code_i>`` tokens of the image centre; ``objects``: every
#: box as 4 ``<bin_i>`` tokens + its label).
PROMPT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "vqa": ("question", "answer", "organ"),
    "caption": ("caption",),
    "classify": ("label_name", "text"),  # text: the input of text-only classification records
    "nli": ("premise", "hypothesis", "label"),
    "summarize": ("text", "summary"),
    "text": ("text", "masked"),
    "image": ("codes",),
    "detection": ("objects",),
}


class DatasetSpecError(SchemaError):
    """A dataset spec that does not validate; the message names the file and the field path."""


#: How dataset-spec errors read: "<file>: field 'source.files': unknown key; expected one of: ...".
DIALECT = Dialect(error=DatasetSpecError, quote_fields=True, unknown="unknown key", list_known=True,
                  missing="missing (expected {expected})")


@dataclass(frozen=True)
class ManifestSplitSpec:
    """How a manifest's rows are split: by a column naming each row's split, or by shares of a stable hash
    (``ratio``, e.g. ``{train: 0.8, val: 0.1, test: 0.1}``, and its ``seed``)."""

    column: str | None = None
    ratio: dict[str, float] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class ManifestSpec:
    """A department's own data as a manifest (``biomedgpt datasets new`` writes this section; the
    ``manifest_<task>`` converters read it, see ``data/converters/manifest.py``)."""

    file: str
    """The manifest (CSV, TSV or JSON Lines), relative to the source folder; image paths in it are
    relative to its own folder."""
    columns: dict[str, str]
    """Record field -> manifest column (``question: Question``, ``answer: Finding``, ``image: path``)."""
    split: ManifestSplitSpec
    location: str = ""
    """Where the source folder is, so that ``shards build`` needs no ``--source``: a path relative to this
    spec file's folder, an absolute path or a URL; empty: give ``--source``."""
    label_separator: str = "|"
    """Between the class names of a multi-label (``labels``) cell."""
    window: str | list[float] = "auto"
    """DICOM windowing: ``auto``, ``minmax`` or ``[center, width]``."""

    def converter_options(self) -> dict[str, Any]:
        """The ``manifest_<task>`` converter's keyword options."""
        return {"manifest": self.file, "columns": dict(self.columns), "split_column": self.split.column,
                "split_ratio": dict(self.split.ratio) or None, "seed": self.split.seed,
                "label_separator": self.label_separator, "window": self.window}

    def source_url(self, spec_file: str) -> str | None:
        """The source folder from ``location`` (relative: against the folder of ``spec_file``)."""
        if not self.location:
            return None
        if "://" in self.location or Path(self.location).is_absolute():
            return self.location
        return str((Path(spec_file).resolve().parent / self.location).resolve())


@dataclass(frozen=True)
class SourceSpec:
    """Where the data comes from and how the converter reads it."""

    format: str
    """The native release format, in words (files and their layout)."""
    converter: str | None
    """Registered converter name (``biomedgpt.data.converters.CONVERTERS``), or null (explicitly:
    the key must be present) for a dataset without a converter yet, with ``converter_note``."""
    obtain: str
    """Where to obtain the release (URL)."""
    instructions: str = ""
    """How to obtain/unpack it (credentials, scripts), when more than a download."""
    files: dict[str, str] = field(default_factory=dict)
    """Converter file-role overrides (role -> path relative to the source)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Converter keyword options (e.g. SLAKE ``languages``)."""
    converter_note: str = ""
    """Required when ``converter`` is null: why there is none yet and what one would read."""
    codes: str | None = None
    """A VQGAN model directory (``biomedgpt vqgan convert``) whose codes the build stores beside each image
    (``codes.npy``; image infilling's targets); ``--codes`` overrides it. Relative to where the build runs."""
    max_bad_fraction: float | None = None
    """Share of a split's source records the build may skip as unusable (empty answers, missing images,
    unreadable rows) before it fails; null: the platform's default (1%)."""
    manifest: ManifestSpec | None = None
    """A department's own data (converters ``manifest_<task>``): the manifest, its column mapping and
    split. Loading the spec adds its settings to ``options`` (what the converter is given)."""


@dataclass(frozen=True)
class SplitSpec:
    """One canonical split and how it is cut from the release."""

    native: str
    """The release's name or rule for this split (file, key or field value)."""
    role: Literal["train", "evaluate", "train_and_evaluate"] = "train"
    """What the split is used for."""
    description: str = ""


@dataclass(frozen=True)
class PromptSpec:
    """The BiomedGPT instruction (encoder text) and target (decoder text) templates."""

    instruction: str
    target: str
    note: str = ""


@dataclass(frozen=True)
class AnswerCandidates:
    """Where the candidate answers for trie-constrained decoding come from.

    ``answers_of_splits``: every distinct normalised answer in ``splits``; ``class_names``: the
    dataset's label names; ``fixed``: ``values``; ``none``: free generation.
    """

    policy: Literal["answers_of_splits", "class_names", "fixed", "none"]
    splits: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """One ``datasets_spec/<name>.yaml``."""

    name: str
    task: Literal["vqa", "caption", "classify", "nli", "summarize", "text", "image", "detection"]
    stages: list[Literal["pretrain", "finetune", "zero_shot"]]
    description: str
    source: SourceSpec
    citation: str
    licence: str
    access: Literal["open", "credentialed"]
    splits: dict[str, SplitSpec]
    prompt: PromptSpec
    metrics: list[str]
    answer_candidates: AnswerCandidates
    notes: str = ""
    path: str = field(default="", compare=False, metadata={"internal": True})
    """The file it was loaded from (not a YAML key)."""


# --- dataset-spec rules ---------------------------------------------------------------------------


def _check(spec: DatasetSpec, file: str) -> None:
    def error(where: str, message: str) -> DatasetSpecError:
        return DatasetSpecError(f"{file}: field '{where}': {message}")

    stem = Path(file).stem
    if spec.name != stem:
        raise error("name", f"must equal the file name {stem!r}, got {spec.name!r}")
    for key in ("description", "citation", "licence"):
        if not getattr(spec, key).strip():
            raise error(key, "must not be empty")
    if not spec.source.obtain.strip():
        raise error("source.obtain", "must say where to obtain the data")

    if not spec.stages:
        raise error("stages", f"at least one of {', '.join(STAGES)}")
    if len(set(spec.stages)) != len(spec.stages):
        raise error("stages", f"listed twice: {spec.stages}")
    pretrain_only = set(spec.stages) == {"pretrain"}
    if spec.task in PRETRAINING_TASKS and not pretrain_only:
        raise error("stages", f"{spec.task!r} records are a pretraining objective: stages must be [pretrain]")

    if spec.source.converter is None:
        if not spec.source.converter_note.strip():
            raise error("source.converter_note", "a spec with 'converter: null' must say why there is no converter "
                                                 "yet and what one would read")
        for key in ("files", "options"):
            if getattr(spec.source, key):
                raise error(f"source.{key}", "only used with a converter (source.converter is null)")
    else:
        conv = CONVERTERS.get(spec.source.converter)
        if conv is None:
            raise error("source.converter", f"no converter named {spec.source.converter!r}; known: {', '.join(sorted(CONVERTERS))}")
        if conv.task != spec.task:
            raise error("task", f"{spec.task!r} but converter {conv.name!r} produces {conv.task!r} records")
        if not getattr(conv, "generic", False) and conv.name != spec.name:
            raise error("source.converter", f"converter {conv.name!r} reads one dataset only ({conv.name}); a spec "
                                            "of another dataset must name a generic converter")
        for role in spec.source.files:
            if role not in conv.file_roles:
                raise error(f"source.files.{role}", f"unknown file role; converter {conv.name!r} reads {sorted(conv.file_roles)}")
        params = inspect.signature(conv.__init__).parameters
        for option in spec.source.options:
            if option not in params or option in ("self", "source", "files"):
                allowed = [p for p in params if p not in ("self", "source", "files")]
                raise error(f"source.options.{option}", f"not an option of converter {conv.name!r}; options: {allowed}")

    _check_manifest(spec, error)

    if spec.source.max_bad_fraction is not None and not 0 <= spec.source.max_bad_fraction < 1:
        raise error("source.max_bad_fraction", f"must be in [0, 1), got {spec.source.max_bad_fraction}")

    if not spec.splits:
        raise error("splits", "at least one split")
    for split in spec.splits:
        if split not in SPLITS:
            raise error(f"splits.{split}", f"split names are canonical: {', '.join(SPLITS)}")

    allowed_fields = PROMPT_FIELDS[spec.task]
    for key in ("instruction", "target"):
        template = getattr(spec.prompt, key)
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None]
        except ValueError as err:
            raise error(f"prompt.{key}", f"not a valid template ({err})") from None
        for name in names:
            if name not in allowed_fields:
                raise error(f"prompt.{key}", f"unknown placeholder {{{name}}}; {spec.task} records offer "
                                             f"{', '.join('{' + f + '}' for f in allowed_fields)}")

    if not spec.metrics and not pretrain_only:
        raise error("metrics", "at least one metric (only pretraining-only sources may have none)")
    for i, metric in enumerate(spec.metrics):
        if metric not in METRICS[spec.task]:
            raise error(f"metrics[{i}]", f"unknown metric {metric!r} for task {spec.task}; known: {', '.join(METRICS[spec.task])}")

    cand = spec.answer_candidates
    if cand.policy == "answers_of_splits":
        if not cand.splits:
            raise error("answer_candidates.splits", "policy answers_of_splits needs the splits to collect answers from")
        for i, split in enumerate(cand.splits):
            if split not in spec.splits:
                raise error(f"answer_candidates.splits[{i}]", f"{split!r} is not one of this dataset's splits {list(spec.splits)}")
    elif cand.splits:
        raise error("answer_candidates.splits", f"only used with policy answers_of_splits, not {cand.policy}")
    if cand.policy == "fixed" and not cand.values:
        raise error("answer_candidates.values", "policy fixed needs the list of values")
    if cand.policy != "fixed" and cand.values:
        raise error("answer_candidates.values", f"only used with policy fixed, not {cand.policy}")
    family = get_task(spec.task) if spec.task in task_names() else None
    if cand.policy == "class_names" and (family is None or family.unspecified_candidates != "class_names"):
        raise error("answer_candidates.policy", "class_names applies only to datasets of a task that answers with "
                                                "class names (classification)")


def _check_manifest(spec: DatasetSpec, error) -> None:
    """``source.manifest`` goes with a manifest converter (and it with it); its options are coherent."""
    conv = CONVERTERS.get(spec.source.converter or "")
    is_manifest = conv is not None and issubclass(conv, ManifestConverter)
    manifest = spec.source.manifest
    if manifest is None:
        if is_manifest:
            raise error("source.manifest", f"converter {conv.name!r} reads a manifest: say which file, its columns "
                                           "and its split (biomedgpt datasets new writes this section)")
        return
    if not is_manifest:
        raise error("source.manifest", "only with a manifest converter "
                                       f"({', '.join(c.name for c in MANIFEST_CONVERTERS.values())})")
    clash = sorted(set(spec.source.options) & set(manifest.converter_options()))
    if clash:
        raise error(f"source.options.{clash[0]}", "set in source.manifest")
    try:
        check_manifest_options(spec.task, manifest.file, manifest.columns, manifest.split.column,
                               manifest.split.ratio, manifest.label_separator)
    except ValueError as err:
        where, _, message = str(err).partition(": ")
        raise error(f"source.manifest.{'file' if where == 'manifest' else where}", message) from None
    if manifest.split.ratio and set(manifest.split.ratio) != set(spec.splits):
        raise error("source.manifest.split.ratio", f"splits {sorted(manifest.split.ratio)} but the spec's splits are "
                                                   f"{sorted(spec.splits)}")
    window = manifest.window
    if isinstance(window, str) and window not in ("auto", "minmax") or \
            isinstance(window, list) and (len(window) != 2 or window[1] < 1):
        raise error("source.manifest.window", f"auto, minmax or [center, width >= 1], got {window!r}")


def parse_dataset_spec(data: Any, file: str = "<dataset spec>") -> DatasetSpec:
    """Validate an already-parsed YAML document; ``file`` is used in error messages and for ``name``.
    A manifest section's settings are added to ``source.options`` (the converter's keyword options)."""
    spec = build(DatasetSpec, data, file=file, dialect=DIALECT)
    _check(spec, file)
    if spec.source.manifest is not None:
        options = {**spec.source.manifest.converter_options(), **spec.source.options}
        spec = dataclasses.replace(spec, source=dataclasses.replace(spec.source, options=options))
    return dataclasses.replace(spec, path=str(file))


def load_dataset_spec(path: str | Path) -> DatasetSpec:
    """Load and validate one ``datasets_spec/<name>.yaml``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetSpecError(f"{path}: file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DatasetSpecError(f"{path}: not valid YAML ({err})") from None
    return parse_dataset_spec(data, str(path))


def load_dataset_specs(directory: str | Path) -> dict[str, DatasetSpec]:
    """Every ``*.yaml`` directly in ``directory`` (the samples/ folder below it is not scanned)."""
    return {spec.name: spec for spec in (load_dataset_spec(p) for p in sorted(Path(directory).glob("*.yaml")))}
