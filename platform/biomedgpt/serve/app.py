"""The Ray Serve application: a FastAPI ingress in front of a multiplexed, batching model deployment.

    POST /v1/vqa        image + question                -> answer (+ candidate scores with answers.json)
    POST /v1/caption    image                           -> caption
    POST /v1/classify   image [+ labels]                -> label + scores (the model's label set if no labels)
    POST /v1/nli        premise + hypothesis            -> entailment | neutral | contradiction + scores
    POST /v1/summarize  text                            -> summary
    GET  /v1/models     the caller's department's models
    GET  /healthz       liveness; OpenAPI at /docs and /openapi.json

Bodies are JSON (images as base64 strings) or multipart/form-data (the image as a file part). DICOM
is accepted wherever an image is. The model is chosen per request by the field `model` (JSON or form),
else the query parameter `?model=`, else the header `serve_multiplexed_model_id`: a registry id
`<department>/<name>@<version>` or `@latest`, or `<name>[@version]` within the caller's department;
omitted, the department's only model (its latest version). Every answer names the model id and
version it came from.

Deployments (built by `build_app_from_spec`, or by `app_builder` from a `serve deploy` config):
- `BiomedGPTIngress` (FastAPI): API key -> department (cluster/tenants.yaml: scrypt hashes, checked
  with `biomedgpt.tenancy`), 401 without a valid key; 403 for another department's model; 404 for an
  unknown one (checked here, so the model deployment never sees an unknown id); request limits and
  image decoding (see `inputs.py`); preprocessing exactly as training does; then one call to
- `BiomedGPTModels`: `@serve.multiplexed` loader (LRU, `max_models_per_replica`) over the registry,
  and `@serve.batch`: concurrent requests for the same model are answered by one batched model call
  (`engine.run_batch`); autoscaled on ongoing requests.

`start(model_dir)` / `build_app(model_dir, team=...)` serve one exported model directory (what
`biomedgpt serve MODEL_DIR` and the demo do): the same application over a one-model source.
"""

import asyncio
import collections
import concurrent.futures
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from .inputs import ApiError, Limits, bad, decode_base64, image_array, label_list, text_field
from .registry import BadModelId, ModelEntry, ModelRef, Registry, UnknownModel, registry_url
from ..spec import ServeAppSpec, serve_spec_from_dict
from .spec import INGRESS_DEPLOYMENT, MODELS_DEPLOYMENT, deployment_options

# --------------------------------------------------------------------------------------------------
# Where models come from: the registry, or one model directory
# --------------------------------------------------------------------------------------------------


class RegistrySource:
    """Models of a registry; `@latest` resolutions are cached for `ttl` seconds, exact versions for good
    (versions are immutable)."""

    def __init__(self, url: str, ttl: float = 5.0) -> None:
        self.registry = Registry(url)
        self.ttl = ttl
        self._cache: "collections.OrderedDict[tuple, tuple[float, Any]]" = collections.OrderedDict()

    def describe(self) -> str:
        return f"registry {self.registry.url}"

    def _cached(self, key: tuple, ttl: float, compute):
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            value = hit[1]
        else:
            try:
                value = compute()
            except UnknownModel as err:
                value = err
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
    """One exported model directory, known as `<department>/<name>@1` (name: the run that trained it)."""

    def __init__(self, model_dir: str, department: str) -> None:
        self.path = Path(model_dir)
        meta_file = self.path / "training.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        name = re.sub(r"[^a-z0-9._-]+", "-", str(meta.get("run") or self.path.name).lower()).strip("-._") or "model"
        answers_file = self.path / "answers.json"
        answers = json.loads(answers_file.read_text()) if answers_file.is_file() else None
        card = {"tasks": [meta.get("task") or "vqa"], "size": meta.get("size"), "image_size": meta.get("image_size", 256),
                "max_source_length": meta.get("max_source_length", 80), "answers": answers,
                "training_data": [{"dataset": d} for d in meta.get("train_data", [])], "metrics": {},
                "licence": None}
        if meta.get("multi_label") and meta.get("classes"):
            card.update(multi_label=True, classes=list(meta["classes"]))
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
    if spec.model_dir:
        return DirectorySource(spec.model_dir, spec.team or "local")
    return RegistrySource(registry_url(spec.registry), spec.latest_ttl_s)


def limits_of(spec: ServeAppSpec) -> Limits:
    return Limits(**{k: getattr(spec.limits, k) for k in Limits.__dataclass_fields__})


# --------------------------------------------------------------------------------------------------
# The HTTP API (schemas are for validation of JSON bodies and for the OpenAPI document)
# --------------------------------------------------------------------------------------------------

api = FastAPI(title="BiomedGPT", version="0.2",
              description="Biomedical vision-language model API: VQA, captioning, classification, NLI and "
                          "summarisation by registered BiomedGPT models. Send `Authorization: Bearer <key>` (or "
                          "`X-API-Key`); choose the model with `model` (`<department>/<name>@<version|latest>`).")

MODEL_DOC = ("model id: `<department>/<name>@<version>` or `@latest`, or `<name>[@version]` in your department; "
             "omitted: your department's only model")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(None, description=MODEL_DOC)


class _Scored(_Body):
    top_k: int = Field(5, ge=1, le=100, description="how many candidate scores to return")


class VQARequest(_Scored):
    question: str = Field(..., description="the question about the image")
    image: str = Field(..., description="the image (JPEG, PNG, TIFF, BMP, WebP, GIF or DICOM bytes) in base64")


class CaptionRequest(_Body):
    image: str = Field(..., description="the image in base64 (JPEG, PNG, ... or DICOM)")


class ClassifyRequest(_Scored):
    image: str = Field(..., description="the image in base64 (JPEG, PNG, ... or DICOM)")
    labels: Optional[List[str]] = Field(None, description="candidate labels; omitted: the model's label set")


class NLIRequest(_Scored):
    premise: str
    hypothesis: str


class SummarizeRequest(_Body):
    text: str = Field(..., description="the text to summarise")


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


class ModelList(BaseModel):
    department: str
    models: List[ModelInfo]


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "bad input (undecodable or truncated image, empty or overlong text, ...)"),
    (401, "no API key, or not a valid one"),
    (403, "the model belongs to another department"),
    (404, "no such model"),
    (413, "upload or image too large (bytes or pixels)"),
    (415, "unsupported Content-Type"),
    (422, "body does not match the schema (missing or unknown field, wrong type, bad JSON)"))}


def _image_schema(doc: str) -> Dict[str, Any]:
    return {"type": "string", "format": "binary", "description": doc}


def _multipart(model_cls, text_fields: Dict[str, Dict[str, Any]], required: List[str]) -> Dict[str, Any]:
    props: Dict[str, Any] = {"image": _image_schema("the image file (JPEG, PNG, TIFF, BMP, WebP, GIF or DICOM)"),
                             "model": {"type": "string", "description": MODEL_DOC}}
    props.update(text_fields)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _body_doc(model_cls, multipart: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    content: Dict[str, Any] = {"application/json": {"schema": model_cls.model_json_schema()}}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}


TOP_K_FIELD = {"top_k": {"type": "integer", "minimum": 1, "maximum": 100}}

BODY_DOCS = {
    "vqa": _body_doc(VQARequest, _multipart(VQARequest, {"question": {"type": "string"}, **TOP_K_FIELD},
                                            ["image", "question"])),
    "caption": _body_doc(CaptionRequest, _multipart(CaptionRequest, {}, ["image"])),
    "classify": _body_doc(ClassifyRequest, _multipart(ClassifyRequest, {
        "labels": {"type": "array", "items": {"type": "string"},
                   "description": "candidate labels (repeat the field, or one JSON array / comma-separated list)"},
        **TOP_K_FIELD}, ["image"])),
    "nli": _body_doc(NLIRequest),
    "summarize": _body_doc(SummarizeRequest),
}
REQUEST_MODELS = {"vqa": VQARequest, "caption": CaptionRequest, "classify": ClassifyRequest, "nli": NLIRequest,
                  "summarize": SummarizeRequest}
NLI_LABELS = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _validation_detail(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "body"
    kind = first.get("type", "")
    msg = {"missing": "field required", "extra_forbidden": "unknown field"}.get(kind, first.get("msg", "invalid"))
    return bad(loc, msg, 422)


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > cap:
                raise bad("body", f"{declared} bytes exceeds the upload limit of {cap} bytes", 413)
        except ValueError:
            raise bad("Content-Length", f"not a number: {declared!r}") from None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise bad("body", f"more than the upload limit of {cap} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class BiomedGPTIngress:
    def __init__(self, models, spec: Dict[str, Any], source: str = "<dict>") -> None:
        self.spec = serve_spec_from_dict(spec, source)
        self.models = models
        self.source = make_source(self.spec)
        self.limits = limits_of(self.spec)
        self.tenants = None
        self.single = isinstance(self.source, DirectorySource)
        needs_keys = self.spec.auth and (not self.single or bool(self.spec.team))
        if needs_keys:
            from ..tenancy import load_tenants

            self.tenants = load_tenants(self.spec.tenants)
            if self.single and self.spec.team not in self.tenants.teams:
                raise ValueError(f"{self.tenants.path}: no team {self.spec.team!r} to serve for")
        self._key_teams: "collections.OrderedDict[bytes, Optional[str]]" = collections.OrderedDict()

    # -- who is asking ---------------------------------------------------------------------------

    def _team_of_key(self, key: str) -> Optional[str]:
        from ..tenancy import verify_api_key

        if self.single:
            return self.spec.team if verify_api_key(self.spec.team, key, self.tenants) else None
        for name, team in self.tenants.teams.items():
            if team.api_keys and verify_api_key(name, key, self.tenants):
                return name
        return None

    async def department(self, request: Request) -> str:
        """The caller's department from its API key (401 without a valid one)."""
        if self.tenants is None:
            return self.source.entry.department if self.single else "local"
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization")
        if not key and auth and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            raise ApiError(401, "Authorization: an API key is required (Authorization: Bearer <key> or X-API-Key)",
                           "Authorization")
        fp = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        if fp not in self._key_teams:  # scrypt costs ~50 ms per stored key: remember verdicts
            self._key_teams[fp] = await asyncio.to_thread(self._team_of_key, key)
            while len(self._key_teams) > 4096:
                self._key_teams.popitem(last=False)
        team = self._key_teams[fp]
        if team is None:
            what = f"one of team {self.spec.team!r}'s keys" if self.single else "a valid API key of any department"
            raise ApiError(401, f"Authorization: the API key is not {what}", "Authorization")
        return team

    # -- which model -----------------------------------------------------------------------------

    async def resolve(self, requested: Optional[str], department: str) -> ModelEntry:
        if requested is None or (isinstance(requested, str) and not requested.strip()):
            models = await asyncio.to_thread(self.source.list, department)
            names = sorted({m.name for m in models})
            if len(names) != 1:
                listing = ", ".join(names) if names else "none"
                raise bad("model", f"required: department {department!r} has {len(names)} models ({listing})", 422)
            requested = f"{department}/{names[0]}@latest"
        if len(requested) > 200:
            raise bad("model", "longer than 200 characters", 404)
        try:
            ref = ModelRef.parse(requested, department)
        except BadModelId as err:
            raise bad("model", f"no such model: {err}", 404) from None
        if ref.department != department:
            raise bad("model", f"{requested!r} belongs to department {ref.department!r}; this API key is "
                               f"department {department!r}'s", 403)
        try:
            return await asyncio.to_thread(self.source.resolve, ref)
        except UnknownModel:
            raise bad("model", f"no model {str(ref)!r} in {self.source.describe()}", 404) from None

    # -- what was sent ---------------------------------------------------------------------------

    async def payload(self, request: Request, task: str) -> Dict[str, Any]:
        """The request's fields (image as bytes) from a JSON or multipart body."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request as StarletteRequest

        ctype = request.headers.get("content-type") or ""
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime not in ("application/json", "multipart/form-data"):
            kinds = "application/json" + (" or multipart/form-data" if "image" in REQUEST_MODELS[task].model_fields
                                          else "")
            raise ApiError(415, f"Content-Type: {mime or 'missing'} is not supported; send {kinds}", "Content-Type")
        body = await _read_body(request, self.limits.max_upload_bytes + 65536)
        model_cls = REQUEST_MODELS[task]
        if mime == "application/json":
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError) as err:
                raise bad("body", f"not valid JSON ({err})", 422) from None
            if not isinstance(data, dict):
                raise bad("body", f"expected a JSON object, got {type(data).__name__}", 422)
            try:
                parsed = model_cls.model_validate(data)
            except ValidationError as err:
                raise _validation_detail(err) from None
            fields = parsed.model_dump()
            if "image" in fields:
                fields["image"] = decode_base64(fields["image"])
            return fields
        sent = False

        async def receive():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, receive).form(
                max_files=2, max_fields=64, max_part_size=max(self.limits.max_text_chars * 4, 65536))
        except MultiPartException as err:
            raise bad("body", f"malformed multipart/form-data ({err.message})") from None
        except Exception as err:  # starlette raises HTTPException(400) for malformed forms
            raise bad("body", f"malformed multipart/form-data ({getattr(err, 'detail', err)})") from None
        known = set(model_cls.model_fields)
        fields: Dict[str, Any] = {}
        for key in form.keys():
            if key not in known:
                raise bad(key, "unknown field", 422)
            values = form.getlist(key)
            if key == "labels":
                fields[key] = ([v for v in values if isinstance(v, str)] if len(values) > 1
                               else (values[0] if isinstance(values[0], str) else None))
                continue
            if len(values) > 1:
                raise bad(key, "given more than once", 422)
            value = values[0]
            if key == "image":
                if isinstance(value, UploadFile):
                    data = await value.read(self.limits.max_upload_bytes + 1)
                    if len(data) > self.limits.max_upload_bytes:
                        raise bad("image", f"more than the {self.limits.max_upload_bytes} byte limit", 413)
                    fields["image"] = data
                else:
                    fields["image"] = decode_base64(value)
            elif isinstance(value, UploadFile):
                raise bad(key, "expected a text field, got a file", 422)
            elif key == "top_k":
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise bad("top_k", f"expected an integer, got {value!r}", 422) from None
                if not 1 <= fields[key] <= 100:
                    raise bad("top_k", "must be in 1..100", 422)
            else:
                fields[key] = value
        for name, info in model_cls.model_fields.items():
            if info.is_required() and name not in fields:
                raise bad(name, "field required", 422)
        if "image" in known and "image" not in fields:
            raise bad("image", "field required", 422)
        return fields

    # -- the endpoints ---------------------------------------------------------------------------

    async def handle(self, request: Request, task_name: str) -> JSONResponse:
        from ..tasks import get_task
        from .engine import Query

        department = await self.department(request)
        fields = await self.payload(request, task_name)
        requested = fields.get("model") or request.query_params.get("model") or \
            request.headers.get("serve_multiplexed_model_id")
        entry = await self.resolve(requested, department)
        task = get_task(task_name)
        lim = self.limits
        record: Dict[str, Any] = {}
        candidates = None
        multi_label = False
        if task_name == "vqa":
            record["question"] = text_field(fields.get("question"), "question", lim.max_question_chars)
            candidates = tuple(entry.answers) if entry.answers else None
        elif task_name == "nli":
            record["premise"] = text_field(fields.get("premise"), "premise", lim.max_text_chars)
            record["hypothesis"] = text_field(fields.get("hypothesis"), "hypothesis", lim.max_text_chars)
            from ..tasks.nli import ANSWERS

            candidates = tuple(ANSWERS)
        elif task_name == "summarize":
            record["text"] = text_field(fields.get("text"), "text", lim.max_text_chars)
        elif task_name == "classify":
            labels = label_list(fields.get("labels"), lim)
            if labels is None:
                if entry.multi_label_classes:  # a multi-label model answers with the list of its findings
                    labels, multi_label = entry.multi_label_classes, True
                elif not entry.answers:
                    raise bad("labels", f"required: model {entry.id} has no label set (answers.json)")
                else:
                    labels = list(entry.answers)
            candidates = tuple(labels)
        image = None
        if task.has_image:
            raw = fields.get("image")
            if raw is None:
                raise bad("image", "field required", 422)
            image = await asyncio.to_thread(image_array, raw, entry.image_size, lim)
        query = Query(task=task_name, instruction=task.instruction(record), image=image, candidates=candidates,
                      top_k=int(fields.get("top_k") or 5), multi_label=multi_label)
        result = await self.models.options(multiplexed_model_id=entry.id).infer.remote(query)
        out = Answer(model=entry.id, version=entry.version, task=task_name, answer=result["answer"],
                     decoding=result["decoding"], scores=result["scores"], labels=result.get("labels"))
        if task_name == "nli":
            out.label = NLI_LABELS.get(out.answer, out.answer)
            for s in out.scores or []:
                s.candidate = NLI_LABELS.get(s.candidate, s.candidate)
        return JSONResponse(out.model_dump(exclude_none=True))

    @api.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"status": "ok", "source": self.source.describe()}
        if self.single:
            out["model"] = self.source.entry.id
        return out

    @api.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
    async def list_models(self, request: Request) -> JSONResponse:
        department = await self.department(request)
        entries = await asyncio.to_thread(self.source.list, department)
        latest: Dict[str, int] = {}
        for e in entries:
            latest[e.name] = max(latest.get(e.name, 0), e.version)
        models = [dict(e.summary(), latest=e.version == latest[e.name]) for e in entries]
        return JSONResponse({"department": department, "models": models})

    @api.post("/v1/vqa", response_model=Answer, responses=ERRORS, openapi_extra=BODY_DOCS["vqa"],
              summary="Answer a question about an image")
    async def vqa(self, request: Request) -> JSONResponse:
        return await self.handle(request, "vqa")

    @api.post("/v1/caption", response_model=Answer, responses=ERRORS, openapi_extra=BODY_DOCS["caption"],
              summary="Describe an image (report generation / captioning)")
    async def caption(self, request: Request) -> JSONResponse:
        return await self.handle(request, "caption")

    @api.post("/v1/classify", response_model=Answer, responses=ERRORS, openapi_extra=BODY_DOCS["classify"],
              summary="Classify an image among candidate labels (default: the model's label set)")
    async def classify(self, request: Request) -> JSONResponse:
        return await self.handle(request, "classify")

    @api.post("/v1/nli", response_model=Answer, responses=ERRORS, openapi_extra=BODY_DOCS["nli"],
              summary="Does the premise entail the hypothesis?")
    async def nli(self, request: Request) -> JSONResponse:
        return await self.handle(request, "nli")

    @api.post("/v1/summarize", response_model=Answer, responses=ERRORS, openapi_extra=BODY_DOCS["summarize"],
              summary="Summarise a text")
    async def summarize(self, request: Request) -> JSONResponse:
        return await self.handle(request, "summarize")


# --------------------------------------------------------------------------------------------------
# The model deployment: multiplexed (LRU) and batching
# --------------------------------------------------------------------------------------------------


class _Resident:
    """A loaded model in a replica's LRU; Serve calls __del__ when it evicts it."""

    def __init__(self, loaded, on_unload) -> None:
        self.loaded = loaded
        self._on_unload = on_unload

    def __del__(self) -> None:
        cb, self._on_unload = getattr(self, "_on_unload", None), None
        if cb is not None:
            cb(self.loaded.model_id)


@serve.deployment(name=MODELS_DEPLOYMENT)
class BiomedGPTModels:
    def __init__(self, spec: Dict[str, Any], source: str = "<dict>") -> None:
        import torch

        self.spec = serve_spec_from_dict(spec, source)
        self.source = make_source(self.spec)
        m = self.spec.models
        torch.set_num_threads(m.torch_threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="biomedgpt-model")
        self.infer_batch.set_max_batch_size(m.batch.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(m.batch.wait_timeout_s)

        async def load(model_id: str) -> _Resident:
            return await self._load(model_id)

        # multiplexing wired at init so the LRU size comes from the spec (Serve detects it on the instance)
        self.get_model = serve.multiplexed(max_num_models_per_replica=m.max_models_per_replica)(load)
        self.loads: "collections.Counter[str]" = collections.Counter()
        self.resident: List[str] = []
        self.batch_sizes: "collections.deque[int]" = collections.deque(maxlen=10000)

    async def _load(self, model_id: str) -> _Resident:
        from .engine import load_model

        ref = ModelRef.parse(model_id)
        loop = asyncio.get_running_loop()

        def work():
            entry = self.source.resolve(ref)
            return load_model(self.source.local_dir(entry), entry.id, threads=self.spec.models.torch_threads)

        loaded = await loop.run_in_executor(self._pool, work)
        self.loads[model_id] += 1
        self.resident.append(model_id)
        return _Resident(loaded, self._unloaded)

    def _unloaded(self, model_id: str) -> None:
        if model_id in self.resident:
            self.resident.remove(model_id)

    async def infer(self, query) -> Dict[str, Any]:
        return await self.infer_batch(query)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_batch(self, queries: List[Any]) -> List[Dict[str, Any]]:
        from .engine import run_batch

        resident = await self.get_model(serve.get_multiplexed_model_id())
        self.batch_sizes.append(len(queries))
        # On the event loop, not in a thread: the decoding loop is Python-heavy and would hold the GIL against
        # the loop anyway, starving request intake; blocking here lets the requests that arrive meanwhile queue
        # up and form the next batch whole.
        return run_batch(resident.loaded, queries)

    async def stats(self) -> Dict[str, Any]:
        """Loaded models (LRU order), loads per model and batch sizes seen: for tests and benchmarks."""
        sizes = list(self.batch_sizes)
        return {"resident": list(self.resident), "loads": dict(self.loads), "batches": len(sizes),
                "requests": sum(sizes), "max_batch": max(sizes, default=0),
                "max_models_per_replica": self.spec.models.max_models_per_replica}

    async def reset_stats(self) -> None:
        self.batch_sizes.clear()


# --------------------------------------------------------------------------------------------------
# Building and starting
# --------------------------------------------------------------------------------------------------


def build_app_from_spec(spec: ServeAppSpec):
    """The application a serving spec describes (the same deployments and options as its deploy config)."""
    opts = deployment_options(spec)
    data = spec.to_dict()
    models = BiomedGPTModels.options(**opts[MODELS_DEPLOYMENT]).bind(data, spec.source)
    return BiomedGPTIngress.options(**opts[INGRESS_DEPLOYMENT]).bind(models, data, spec.source)


def app_builder(args: Dict[str, Any]):
    """Serve's application builder (`import_path: biomedgpt.serve.app:app_builder` in a deploy config made by
    `biomedgpt serve-config`): args `spec` (the serving spec as a mapping) and `source` (its file name)."""
    if not isinstance(args, dict) or not isinstance(args.get("spec"), dict):
        raise ValueError("serve config args: `spec` (a serving spec mapping, see `biomedgpt serve-config`) is required")
    return build_app_from_spec(serve_spec_from_dict(args["spec"], str(args.get("source") or "<serve config args>")))


def model_dir_spec(model_dir: str, team: Optional[str] = None, tenants_path: Optional[str] = None,
                   name: str = "biomedgpt") -> ServeAppSpec:
    """The serving spec of one model directory (what `biomedgpt serve MODEL_DIR` runs)."""
    data: Dict[str, Any] = {"kind": "serve", "name": name, "model_dir": str(Path(model_dir).resolve()), "team": team,
                            "tenants": str(Path(tenants_path).resolve()) if tenants_path else None,
                            "auth": bool(team), "models": {"max_models_per_replica": 1}}
    return serve_spec_from_dict(data, f"<model directory {model_dir}>")


def build_app(model_dir: str, team: Optional[str] = None, tenants_path: Optional[str] = None):
    """The Serve application over one model directory; with `team`, requests need that department's API keys
    (cluster/tenants.yaml, or `tenants_path`)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; not a model directory (see `biomedgpt export`)")
    return build_app_from_spec(model_dir_spec(model_dir, team, tenants_path))


def start(model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str = "biomedgpt",
          team: Optional[str] = None, tenants_path: Optional[str] = None) -> str:
    """Deploy one model directory on the connected Ray cluster; returns the base URL once the app is ready."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model_dir, team, tenants_path), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def start_spec(spec: ServeAppSpec, host: Optional[str] = None, port: Optional[int] = None) -> str:
    """Deploy a serving spec on the connected Ray cluster (Serve's HTTP proxy on the spec's host and port unless
    given); returns the base URL once the app is ready."""
    host = host or spec.http.host
    port = port or spec.http.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app_from_spec(spec), name=spec.name, route_prefix=spec.route_prefix, blocking=False)
    return f"http://{host}:{port}{spec.route_prefix.rstrip('/')}"


def stop(name: str = "biomedgpt") -> None:
    serve.delete(name)
    serve.shutdown()
