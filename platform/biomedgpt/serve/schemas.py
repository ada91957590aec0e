"""The serving API's schemas: request bodies (built from each task's `request_fields`), answers, errors
and model listings, for validating JSON bodies and for the OpenAPI document.

A task's request body (`request_model(task)`) has `model` and `zero_shot` always, `top_k` when the
task decodes over candidates, `image` when it reads images, then the task's own fields; tasks with an
image also take multipart/form-data (`body_doc`).
"""

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..tasks import Task

MODEL_DOC = ("model id: `<department>/<name>@<version>` or `@latest`, or `<name>[@version]` in your department; "
             "omitted: your department's only model")
ZERO_SHOT_DOC = ("ask a model that was not trained for this task (and is no generalist) anyway; without it such "
                 "a request gets 422 naming the model's tasks")
IMAGE_DOC = "the image (JPEG, PNG, TIFF, BMP, WebP, GIF or DICOM bytes) in base64"
TOP_K_DOC = "how many candidate scores to return"


class Score(BaseModel):
    candidate: str
    log_prob: float
    probability: float = Field(..., description="softmax of the log-probabilities over the candidates; for a "
                                                "multi-label model, the probability that the image shows this "
                                                "class (each class on its own)")


class Answer(BaseModel):
    model: str = Field(..., description="the model id that answered, with its version")
    version: int
    task: str
    answer: str
    decoding: str = Field(..., description="trie (scored candidates), multilabel (a list of the model's "
                                           "classes), beam or greedy")
    scores: Optional[List[Score]] = None
    label: Optional[str] = Field(None, description="NLI: entailment, neutral or contradiction")
    labels: Optional[List[str]] = Field(None, description="classification by a multi-label model (no labels "
                                                          "sent): the classes found, in class order, empty for "
                                                          "none; `answer` is them joined by ', ' or 'no finding'")


class ErrorBody(BaseModel):
    detail: str = Field(..., description="what is wrong, starting with the field it concerns")
    field: Optional[str] = None


class ModelInfo(BaseModel):
    id: str
    department: str
    name: str
    version: int
    created: Optional[str] = None
    tasks: List[str]
    size: Optional[str] = None
    image_size: int
    answers: int
    training_data: List[Optional[str]]
    metrics: Dict[str, Any]
    licence: Optional[str] = None
    latest: bool
    kind: str = Field("model", description="`model` (full weights) or `adapter` (LoRA weights served on `base`)")
    base: Optional[str] = Field(None, description="an adapter's base model (registry id)")
    adapter_bytes: Optional[int] = None


class ResidentModel(BaseModel):
    model: str
    adapters: List[str] = Field(default_factory=list, description="the adapters loaded on it, least recently used "
                                                                  "first")
    adapter_bytes: int = 0


class ModelList(BaseModel):
    department: str
    models: List[ModelInfo]
    resident: List[ResidentModel] = Field(default_factory=list, description="what a model replica holds now (bases "
                                          "and their adapters) among the caller's department's and shared models")


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "bad input (undecodable or truncated image, empty or overlong text, ...)"),
    (401, "no API key, or not a valid one (keys are <key-id>.<secret>)"),
    (403, "the model belongs to another department, or was trained on credentialed data the caller's department "
          "is not granted"),
    (404, "no such model"),
    (413, "upload or image too large (bytes or pixels)"),
    (415, "unsupported Content-Type"),
    (422, "body does not match the schema (missing or unknown field, wrong type, bad JSON), or the model was not "
          "trained for the task (send zero_shot: true to ask it anyway)"),
    (429, "too many failed API keys from this client address (Retry-After says when to try again)"))}

_REQUEST_MODELS: Dict[str, type] = {}


def request_model(task: Task) -> type:
    """The pydantic model of `POST /v1/<task>`'s JSON body (unknown fields are errors)."""
    if task.name not in _REQUEST_MODELS:
        fields: Dict[str, Any] = {"model": (Optional[str], Field(None, description=MODEL_DOC)),
                                  "zero_shot": (bool, Field(False, description=ZERO_SHOT_DOC))}
        if task.decoding.constrained:
            fields["top_k"] = (int, Field(5, ge=1, le=100, description=TOP_K_DOC))
        for f in task.request_fields:
            kind = List[str] if f.kind == "labels" else str
            fields[f.name] = (kind, Field(..., description=f.description)) if f.required else \
                (Optional[kind], Field(None, description=f.description))
        if task.has_image:
            fields["image"] = (str, Field(..., description=IMAGE_DOC))
        name = "".join(part.capitalize() for part in task.name.split("_")) + "Request"
        _REQUEST_MODELS[task.name] = create_model(name, __config__=ConfigDict(extra="forbid"), **fields)
    return _REQUEST_MODELS[task.name]


def _multipart(task: Task) -> Dict[str, Any]:
    props: Dict[str, Any] = {"image": {"type": "string", "format": "binary",
                                       "description": "the image file (JPEG, PNG, TIFF, BMP, WebP, GIF or DICOM)"},
                             "model": {"type": "string", "description": MODEL_DOC},
                             "zero_shot": {"type": "boolean", "description": ZERO_SHOT_DOC}}
    for f in task.request_fields:
        props[f.name] = {"type": "array", "items": {"type": "string"},
                         "description": f"{f.description} (repeat the field, or one JSON array / comma-separated "
                                        "list)"} if f.kind == "labels" else {"type": "string"}
    if task.decoding.constrained:
        props["top_k"] = {"type": "integer", "minimum": 1, "maximum": 100}
    required = ["image", *[f.name for f in task.request_fields if f.required]]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def body_doc(task: Task) -> Dict[str, Any]:
    """The OpenAPI request body of `POST /v1/<task>`: JSON, and multipart/form-data for tasks with an image."""
    content: Dict[str, Any] = {"application/json": {"schema": request_model(task).model_json_schema()}}
    if task.has_image:
        content["multipart/form-data"] = {"schema": _multipart(task)}
    return {"requestBody": {"required": True, "content": content}}
