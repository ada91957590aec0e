"""BiomedGPT's pretraining objectives as one task family, `pretrain`: each shard record becomes ONE
example of one objective (the training stream turns one row into one example).

| objective          | instruction                                                      | target                      |
|--------------------|------------------------------------------------------------------|-----------------------------|
| `caption`          | ` what does the image describe?`                                 | ` {caption}`                |
| `itm`              | ` does the image describe " {caption} "?` (own or another's)     | ` yes` / ` no`              |
| `vqa`              | ` {question}?`                                                   | ` {answer}`                 |
| `grounding`        | ` which region does the text " {text} " describe?`               | 4 `<bin_i>`                 |
| `grounded_caption` | ` what does the region describe? region:` + 4 `<bin_i>`          | ` {text}`                   |
| `text_infilling`   | ` what is the complete text of " {masked} "?`                    | ` {text}`                   |
| `image_infilling`  | ` what is the image in the middle part?` (centre blanked)        | 256 `<code_i>`              |
| `detection`        | ` what are the objects in the image?`                            | per object 4 `<bin_i>` + label |

Texts are normalised as OFA does (lower case; captions and region texts without punctuation, at most
`max_caption_words` words as targets and `max_prompt_words` inside instructions; questions as the
`vqa` family; texts to infill as `pre_caption`, at most `max_text_words` words). A box (x0, y0, x1, y1
normalised to [0, 1]) is written `<bin_round(v * 999)>` per coordinate.

Which objectives a record can serve follows from its `task` field (`RECORD_OBJECTIVES`): caption records
(image-text pairs) -> captioning, image-text matching, and, when they carry exactly one box, grounding and
grounded captioning; vqa -> VQA; grounding (boxes + caption or label(s)) -> grounding, grounded
captioning; detection (boxes + labels) -> detection (and, when configured, grounding / grounded
captioning of a uniquely labelled object); text -> text infilling; image -> image infilling (needs the
VQGAN codes: a `codes.npy` member or a `codes` field). Any record with an image and codes may be given
image infilling by configuring it for its task.

The objective of a record is drawn with the proportions configured for its record task (`objectives`,
defaults `DEFAULT_OBJECTIVES`) among those the record supports, from a generator seeded by (`seed`,
`salt`, dataset/split/id): the same record, seed and salt always give the same example. The stream may
pass its epoch as `salt` so that a record serves different objectives in different epochs.

Image-text matching negatives come from other records: `example(record, negatives=[...])` takes a pool
of other captions (the data pipeline passes the captions of the other records of the same batch); a
negative is drawn from the pool minus captions equal to the record's own. Without a usable negative the
ITM example is a positive.

Loss weights (`Example.weight`, the `loss_weight` column): the official weighting, 1 for the image-text
objectives and 2 for the second group (text infilling, image infilling, detection); `loss_weights`
overrides it per objective.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Mapping, Sequence

from .base import Decoding, Example, MissingFieldError, Task, clean_text, pre_caption, register, require
from .caption import caption_target
from .infilling import center_codes, load_codes, whole_word_mask
from .vqa import VQATask

CAPTION = " what does the image describe?"
ITM = ' does the image describe " {} "?'
GROUNDING = ' which region does the text " {} " describe?'
GROUNDED_CAPTION = " what does the region describe? region:"
TEXT_INFILLING = ' what is the complete text of " {} "?'
IMAGE_INFILLING = " what is the image in the middle part?"
DETECTION = " what are the objects in the image?"

IMAGE_TEXT_OBJECTIVES = ("caption", "itm", "vqa", "grounding", "grounded_caption")
SECOND_GROUP_OBJECTIVES = ("text_infilling", "image_infilling", "detection")
OBJECTIVES = IMAGE_TEXT_OBJECTIVES + SECOND_GROUP_OBJECTIVES

#: The official loss weighting: the second group's loss counts twice.
OFFICIAL_LOSS_WEIGHTS: dict[str, float] = {**{o: 1.0 for o in IMAGE_TEXT_OBJECTIVES},
                                           **{o: 2.0 for o in SECOND_GROUP_OBJECTIVES}}

#: Objectives each record task can serve.
RECORD_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "caption": ("caption", "itm", "grounding", "grounded_caption", "image_infilling"),
    "vqa": ("vqa", "image_infilling"),
    "grounding": ("grounding", "grounded_caption", "image_infilling"),
    "detection": ("detection", "grounding", "grounded_caption", "image_infilling"),
    "text": ("text_infilling",),
    "image": ("image_infilling",),
}

#: Default proportions of the objectives per record task. A caption record gives captioning, a positive
#: and a negative ITM example in equal shares (OFA makes all three of every pair), and grounding and
#: grounded captioning as often as captioning when it carries one box.
DEFAULT_OBJECTIVES: dict[str, dict[str, float]] = {
    "caption": {"caption": 1.0, "itm": 2.0, "grounding": 1.0, "grounded_caption": 1.0},
    "vqa": {"vqa": 1.0},
    "grounding": {"grounding": 1.0, "grounded_caption": 1.0},
    "detection": {"detection": 1.0},
    "text": {"text_infilling": 1.0},
    "image": {"image_infilling": 1.0},
}


#: Objectives whose target is the record's VQGAN codes (a `codes.npy` member or a `codes` field).
CODE_OBJECTIVES = ("image_infilling",)


def needs_codes(record_task: str) -> bool:
    """Whether records of `record_task` are useless to pretraining without VQGAN codes: every objective they
    serve by default needs them (image records: image infilling). The shard build asks this of a dataset."""
    live = [o for o, w in DEFAULT_OBJECTIVES.get(record_task, {}).items() if w > 0]
    return bool(live) and all(o in CODE_OBJECTIVES for o in live)


def record_key(record: Mapping[str, Any]) -> str:
    return f"{record.get('dataset')}/{record.get('split')}/{record.get('id')}"


def _name(record: Mapping[str, Any]) -> str:
    return f"record {record.get('id', '?')!r} of {record.get('dataset', '?')}"


def record_captions(record: Mapping[str, Any]) -> list[str]:
    caps = record.get("captions")
    if isinstance(caps, list) and any(str(c).strip() for c in caps):
        return [clean_text(c) for c in caps if str(c).strip()]
    cap = record.get("caption")
    return [clean_text(cap)] if isinstance(cap, str) and cap.strip() else []


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def record_objects(record: Mapping[str, Any]) -> list[tuple[list[float], str | None]]:
    """(box, label) pairs of a record: `boxes` (a list of boxes, or one box) with `labels` (one per box)
    or one `label_name`/`label` text for all of them; label None where the record has none."""
    boxes = record.get("boxes")
    if boxes is None and record.get("box") is not None:
        boxes = record["box"]
    if boxes is None or (isinstance(boxes, list) and not boxes):
        return []
    if _is_box(boxes):
        boxes = [boxes]
    if not isinstance(boxes, list) or not all(_is_box(b) for b in boxes):
        raise ValueError(f"{_name(record)}: 'boxes' must be a list of [x0, y0, x1, y1] boxes, got {boxes!r}")
    labels = record.get("labels")
    if labels is None:
        single = record.get("label_name") if record.get("label_name") is not None else record.get("label")
        labels = [single if isinstance(single, str) else None] * len(boxes)  # one label for every box
    if not isinstance(labels, list) or len(labels) != len(boxes):
        raise ValueError(f"{_name(record)}: {len(boxes)} boxes but labels {labels!r}; give one label per box")
    return [([float(v) for v in b], clean_text(str(lab)).lower() if lab is not None and str(lab).strip() else None)
            for b, lab in zip(boxes, labels)]


@register
class PretrainTask(Task):
    """The pretraining mixture of objectives (see the module doc). Options: `objectives` (per record task,
    objective -> proportion, replacing that task's defaults; or a list of objective names, which keeps
    the default proportions of those only), `seed`, `loss_weights` (objective -> weight, over the
    official ones), `mask_ratio` / `poisson_lambda` (text infilling), `itm_negative_ratio`, the word
    limits and the numbers of bins and codes (the tokenizer's)."""

    name = "pretrain"
    has_image = True
    decoding = Decoding(constrained=False, beam_size=5, max_new_tokens=32)
    metrics: tuple[str, ...] = ()
    input_fields: tuple[str, ...] = ()
    #: a training objective: its datasets have no evaluation, and a model trained on it may be asked any task
    evaluated = False
    generalist = True
    seeded = True
    #: `example` takes the batch context (negatives, codes, salt) the data pipeline passes.
    uses_batch_context = True

    def __init__(self, objectives: Mapping[str, Mapping[str, float]] | Sequence[str] | None = None, seed: int = 0,
                 loss_weights: Mapping[str, float] | None = None, mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0, itm_negative_ratio: float = 0.5, max_caption_words: int = 30,
                 max_prompt_words: int = 80, max_text_words: int = 30, num_bins: int = 1000,
                 num_codes: int = 8192) -> None:
        self.objectives = resolve_objectives(objectives)
        self.seed = int(seed)
        unknown = sorted(set(loss_weights or {}) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"loss_weights: unknown objective(s) {', '.join(unknown)}; known: {', '.join(OBJECTIVES)}")
        self.loss_weights = {**OFFICIAL_LOSS_WEIGHTS, **{k: float(v) for k, v in (loss_weights or {}).items()}}
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        if poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be > 0, got {poisson_lambda}")
        if not 0.0 <= itm_negative_ratio <= 1.0:
            raise ValueError(f"itm_negative_ratio must be in [0, 1], got {itm_negative_ratio}")
        self.mask_ratio, self.poisson_lambda = float(mask_ratio), float(poisson_lambda)
        self.itm_negative_ratio = float(itm_negative_ratio)
        self.max_caption_words, self.max_prompt_words = max_caption_words, max_prompt_words
        self.max_text_words = max_text_words
        self.num_bins, self.num_codes = num_bins, num_codes
        self._vqa_family = VQATask(max_question_words=max_prompt_words)

    # -- the Task interface --------------------------------------------------------------------

    def instruction(self, record: dict[str, Any]) -> str:
        return self.example(record).instruction

    def example(self, record: dict[str, Any], *, negatives: Iterable[str] = (), codes: Any = None, salt: int = 0,
                objective: str | None = None) -> Example:
        """The record's example: of `objective` when given, else of the objective drawn for (seed, salt,
        record). `negatives`: other records' captions (ITM); `codes`: the record's VQGAN codes
        (`codes.npy` bytes or ids; the record's `codes` field otherwise)."""
        if codes is None and record.get("codes") is not None:
            codes = record["codes"]
        ctx = {"negatives": list(negatives), "codes": codes}
        if objective is None:
            objective = self.choose(record, codes=codes, salt=salt)
        elif objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        else:
            reason = self.missing(objective, record, codes)
            if reason:
                raise MissingFieldError(reason)
        ex = getattr(self, "_" + objective)(record, ctx, self._rng(record, salt, objective))
        ex.weight = self.loss_weights[objective]
        # the official pretraining samples patches of the image-text group only (its criterion sets
        # sample_patch_num on sample[0]); infilling needs the whole blanked image, detection every box
        ex.sample_patches = objective in IMAGE_TEXT_OBJECTIVES and ex.has_image
        ex.meta = {"id": str(record.get("id", "")), "dataset": record.get("dataset"), "objective": objective,
                   **ex.meta}
        return ex

    # -- choosing ------------------------------------------------------------------------------

    def _rng(self, record: Mapping[str, Any], salt: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}|{salt}|{record_key(record)}|{purpose}")

    def proportions(self, record: Mapping[str, Any]) -> dict[str, float]:
        """The configured objective proportions of the record's task."""
        task = record.get("task")
        if task not in RECORD_OBJECTIVES:
            raise ValueError(f"{_name(record)}: pretraining has no objective for record task {task!r}; it reads "
                             f"records of task {', '.join(RECORD_OBJECTIVES)}")
        return self.objectives.get(task, {})

    def supported(self, record: Mapping[str, Any], codes: Any = None) -> dict[str, float]:
        """The objectives (with their proportions) the record can serve now."""
        if codes is None:
            codes = record.get("codes")
        return {o: w for o, w in self.proportions(record).items() if w > 0 and not self.missing(o, record, codes)}

    def choose(self, record: Mapping[str, Any], *, codes: Any = None, salt: int = 0) -> str:
        props = self.proportions(record)
        if codes is None:
            codes = record.get("codes")
        live = {o: w for o, w in props.items() if w > 0}
        if not live:
            raise ValueError(f"{_name(record)}: no pretraining objective is configured for {record.get('task')!r} "
                             "records (objectives)")
        reasons = {o: self.missing(o, record, codes) for o in live}
        options = [(o, w) for o, w in live.items() if not reasons[o]]
        if not options:
            first = max(live, key=live.__getitem__)
            raise MissingFieldError(reasons[first])
        total = sum(w for _, w in options)
        x = self._rng(record, salt, "objective").random() * total
        for o, w in options:
            x -= w
            if x < 0:
                return o
        return options[-1][0]

    def missing(self, objective: str, record: Mapping[str, Any], codes: Any = None) -> str | None:
        """Why `record` cannot serve `objective` (a message naming the record), or None."""
        name = _name(record)
        if objective in ("caption", "itm"):
            return None if record_captions(record) else f"{objective} {name} has no 'caption' field"
        if objective == "vqa":
            for key in ("question", "answer"):
                if record.get(key) is None or not str(record[key]).strip():
                    return f"VQA {name} has no {key!r} field"
            return None
        if objective == "text_infilling":
            return None if str(record.get("text") or "").strip() else f"text-infilling {name} has no 'text' field"
        if objective == "image_infilling":
            if codes is None:
                return (f"image-infilling {name} has no VQGAN codes (no 'codes.npy' member and no 'codes' field): "
                        "image infilling needs the 256 codes of the image centre; build the shards with codes "
                        "(`biomedgpt shards build ... --codes MODEL_DIR`, a VQGAN from `biomedgpt vqgan convert`; "
                        "or from the official image.tsv with the ofa_tsv_image converter) or leave "
                        "image_infilling out of the objectives")
            return None
        objects = record_objects(record)
        if objective == "detection":
            if not objects:
                return f"detection {name} has no 'boxes' field"
            if any(lab is None for _, lab in objects):
                return f"detection {name} has no 'labels' field (one label per box)"
            return None
        if objective in ("grounding", "grounded_caption"):
            if not self._regions(record, objects, unique=objective == "grounding"):
                what = "a uniquely labelled box" if objective == "grounding" else "a labelled box"
                return (f"{objective.replace('_', ' ')} {name} has no region to use: it needs one box with a "
                        f"'caption', or {what} ('boxes' + 'labels')")
            return None
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")

    @staticmethod
    def _regions(record: Mapping[str, Any], objects: list[tuple[list[float], str | None]],
                 unique: bool) -> list[tuple[list[float], str]]:
        """(box, text) pairs a region objective may use: the one box of a record with a caption, else the
        labelled boxes (for grounding only those whose label no other box has)."""
        captions = record_captions(record)
        if captions and len(objects) == 1:
            return [(objects[0][0], captions[0])]
        labelled = [(b, lab) for b, lab in objects if lab]
        if unique:
            counts: dict[str, int] = {}
            for _, lab in labelled:
                counts[lab] = counts.get(lab, 0) + 1
            labelled = [(b, lab) for b, lab in labelled if counts[lab] == 1]
        return labelled

    # -- the objectives ------------------------------------------------------------------------

    def _bins(self, record: Mapping[str, Any], box: Sequence[float]) -> str:
        from ..model.tokenizer import box_to_bin_tokens

        try:
            return box_to_bin_tokens(box, self.num_bins)
        except ValueError as err:
            raise ValueError(f"{_name(record)}: box {list(box)}: {err}") from None

    def _prompt_text(self, text: str) -> str:
        return caption_target(text, self.max_prompt_words)

    def _caption(self, record, ctx, rng) -> Example:
        caps = record_captions(record)
        return Example(CAPTION, " " + caption_target(caps[0], self.max_caption_words), True,
                       {"references": caps})

    def _itm(self, record, ctx, rng) -> Example:
        own = self._prompt_text(record_captions(record)[0])
        pool = sorted({p for p in (self._prompt_text(c) for c in ctx["negatives"] if str(c).strip()) if p and p != own})
        negative = bool(pool) and rng.random() < self.itm_negative_ratio
        caption = rng.choice(pool) if negative else own
        answer = "no" if negative else "yes"
        return Example(ITM.format(caption), " " + answer, True, {"answer": answer})

    def _vqa(self, record, ctx, rng) -> Example:
        ex = self._vqa_family.example(record)
        return Example(ex.instruction, ex.target, True, {"answer": ex.meta["answer"]})

    def _grounding(self, record, ctx, rng) -> Example:
        box, text = rng.choice(self._regions(record, record_objects(record), unique=True))
        return Example(GROUNDING.format(self._prompt_text(text)), " " + self._bins(record, box), True,
                       {"box": box, "text": text})

    def _grounded_caption(self, record, ctx, rng) -> Example:
        box, text = rng.choice(self._regions(record, record_objects(record), unique=False))
        return Example(f"{GROUNDED_CAPTION} {self._bins(record, box)}", " " + caption_target(text, self.max_caption_words),
                       True, {"box": box, "text": text})

    def _detection(self, record, ctx, rng) -> Example:
        parts = [f"{self._bins(record, box)} {label}" for box, label in record_objects(record)]
        return Example(DETECTION, " " + " ".join(parts), True, {"objects": len(parts)})

    def _text_infilling(self, record, ctx, rng) -> Example:
        require(record, "text-infilling", "text")
        text = pre_caption(record["text"], self.max_text_words)
        if not text:
            raise MissingFieldError(f"text-infilling {_name(record)} has no text left after normalisation")
        masked = whole_word_mask(text.split(" "), rng, self.mask_ratio, self.poisson_lambda)
        return Example(TEXT_INFILLING.format(masked.text), " " + text, False,
                       {"masked_words": masked.masked_words, "words": len(text.split(" "))})

    def _image_infilling(self, record, ctx, rng) -> Example:
        try:
            codes = center_codes(load_codes(ctx["codes"]), self.num_codes)
        except ValueError as err:
            raise ValueError(f"image-infilling {_name(record)}: {err}") from None
        return Example(IMAGE_INFILLING, " " + " ".join(f"<code_{c}>" for c in codes), True,
                       image_op="mask_center", decoder_codes=True)


def resolve_objectives(objectives: Mapping[str, Mapping[str, float]] | Sequence[str] | None
                       ) -> dict[str, dict[str, float]]:
    """Per record task, objective -> proportion: the defaults, with `objectives` applied (a mapping
    replaces the given record tasks' proportions; a list of objective names keeps only those)."""
    out = {t: dict(p) for t, p in DEFAULT_OBJECTIVES.items()}
    if objectives is None:
        return out
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, Mapping):
        names = list(objectives)
        unknown = sorted(set(names) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"objectives: unknown objective(s) {', '.join(unknown)}; known: {', '.join(OBJECTIVES)}")
        return {t: {o: w for o, w in p.items() if o in names} for t, p in out.items()}
    for task, props in objectives.items():
        if task not in RECORD_OBJECTIVES:
            raise ValueError(f"objectives.{task}: unknown record task; known: {', '.join(RECORD_OBJECTIVES)}")
        if not isinstance(props, Mapping):
            raise ValueError(f"objectives.{task}: expected a mapping objective -> proportion, got {props!r}")
        for o, w in props.items():
            if o not in RECORD_OBJECTIVES[task]:
                raise ValueError(f"objectives.{task}.{o}: {task} records can serve "
                                 f"{', '.join(RECORD_OBJECTIVES[task])}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"objectives.{task}.{o}: a proportion must be a number >= 0, got {w!r}")
        out[task] = {o: float(w) for o, w in props.items()}
    return out
