"""The Ray Serve application: a FastAPI ingress in front of a multiplexed, batching model deployment.

    POST /v1/<task>     one endpoint per task family that serves (tasks/: its `request_fields`):
      /v1/vqa           image + question                -> answer (+ candidate scores with answers.json)
      /v1/caption       image                           -> caption
      /v1/classify      image [+ labels]                -> label + scores (the model's label set if no labels)
      /v1/nli           premise + hypothesis            -> entailment | neutral | contradiction + scores
      /v1/summarize     text                            -> summary
    GET  /v1/models     the caller's department's models
    GET  /healthz       liveness; OpenAPI at /docs and /openapi.json

Bodies are JSON (images as base64 strings) or multipart/form-data (the image as a file part). DICOM
is accepted wherever an image is. The model is chosen per request by the field `model` (JSON or form),
else the query parameter `?model=`, else the header `serve_multiplexed_model_id`: a registry id
`<department>/<name>@<version>` or `@latest`, or `<name>[@version]` within the caller's department;
omitted, the department's only model (its latest version). Every answer names the model id and
version it came from. A model is asked only the tasks it was trained for (its card's tasks), unless
it is a generalist or the body says `"zero_shot": true`; else 422 naming its tasks.

The rooms: `sources.py` (where models come from: the registry or one model directory), `schemas.py`
(the API's bodies and answers), `requests.py` (limits, reading and checking a request, the model query
it becomes), `engine.py` (a model answering a batch of queries) and, here, the two deployments:
- `BiomedGPTIngress` (FastAPI): API key `<key-id>.<secret>` -> department (`biomedgpt.tenancy.keys`: the
  scrypt hash stored under the key's id in cluster/tenants.yaml or in the key file `api_keys`, the
  department's mounted Secret, reloaded when it changes; with `team` only that department's keys), 401
  without a valid key, 429 after too many failures from one client address; 403 for another department's
  model or for a model trained on credentialed data the caller's department is not granted
  (`tenancy.model_data_refusal`); 404 for an unknown one (checked here, so the model deployment never sees
  an unknown id); the request read and
  checked (`requests.py`), preprocessing exactly as training does; then one call to
- `BiomedGPTModels`: `@serve.multiplexed` loader (LRU, `max_models_per_replica`) over the source, each
  model on the spec's `models.device` in `models.dtype`, and `@serve.batch`: concurrent requests for
  the same model are answered by one batched model call (`engine.run_batch`); autoscaled on ongoing
  requests.

What cannot be answered now is a retryable JSON error, never a bare 500: a model that cannot be loaded
(checksum, missing file, bad config), storage that fails, memory that runs out, a full queue
(`max_queued_requests`) -> 503; no answer within `ingress.request_timeout_s` -> 504; both with
`"retryable": true` and `Retry-After`. The model replica counts the tokens of what the client sent with
the model's own tokenizer (`engine.check_query`): over the limits -> 413. Scores that are not finite
are sent as null.

`build_app_from_spec` / `app_builder` (a `serve deploy` config's import path) build the application;
`start(model_dir)` / `build_app(model_dir, team=...)` serve one exported model directory (what
`biomedgpt serve MODEL_DIR` and the demo do): the same application over a one-model source.
"""

import asyncio
import collections
import concurrent.futures
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from ..audit import audit_root
from ..console import reroute
from ..spec import ServeAppSpec, serve_spec_from_dict
from ..tasks import Task, get_task, task_names
from ..tenancy import load_tenants, parse_api_key
from .auth import Gate, check_model, client_address
from .engine import QueryRefused, check_query, ensure_adapters, evict_adapters, load_model, out_of_memory, run_batch
from .registry import BadModelId, ModelEntry, ModelRef, RegistryError, UnknownModel
from .requests import ApiError, AskedModel, bad, prepare, read_fields, unavailable
from .schemas import ERRORS, Answer, ModelList, body_doc
from .sources import DirectorySource, make_source
from . import trail
from .spec import INGRESS_DEPLOYMENT, MODELS_DEPLOYMENT, deployment_options, http_options

log = logging.getLogger("ray.serve")  # a replica's log file; details the answer leaves out go here
#: the errors of reading a model source (local disk, S3 through s3fs: both raise OSError subclasses; a
#: registry file that does not parse: RegistryError)
STORAGE_ERRORS = (OSError, RegistryError)

api = FastAPI(title="BiomedGPT", version="0.2",
              description="Biomedical vision-language model API: VQA, captioning, classification, NLI and "
                          "summarisation by registered BiomedGPT models. Send `Authorization: Bearer <key>` (or "
                          "`X-API-Key`); choose the model with `model` (`<department>/<name>@<version|latest>`).")


api.add_middleware(trail.RequestTrail)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    """A defect of ours, not of the request: JSON all the same, the details in the replica's log."""
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error ({type(err).__name__}); the details are in the serving logs"},
                        status_code=500)


def finite(value: Any) -> Any:
    """`value` with every non-finite float (a NaN or infinite score) replaced by None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def error_answer(err: Dict[str, Any]) -> ApiError:
    """The ApiError of an error the model deployment answered with (`BiomedGPTModels.infer`)."""
    return ApiError(int(err["status"]), str(err["detail"]), err.get("field"), retry_after_s=err.get("retry_after_s"))


def served_tasks() -> List[Task]:
    """The task families with an endpoint: those that describe a request (`Task.summary`)."""
    return [t for t in (get_task(n) for n in task_names()) if t.summary]


class BiomedGPTIngress:
    def __init__(self, models, spec: Dict[str, Any], source: str = "<dict>") -> None:
        self.spec = serve_spec_from_dict(spec, source)
        self.models = models
        self.source = make_source(self.spec)
        self.limits = self.spec.limits
        self.single = isinstance(self.source, DirectorySource)
        self.team = self.spec.team  # set: this app answers that department only (every RayService sets it)
        # the policy (dataset grants) every answer is checked against, API keys or not
        self.tenants = load_tenants(self.spec.tenants)
        if self.team and self.team not in self.tenants.teams:
            raise ValueError(f"{self.tenants.path}: no team {self.team!r} to serve for ({source}: team)")
        self.gate = Gate(self.spec, self.tenants, needs_keys=self.spec.auth and (not self.single or bool(self.team)))
        trail.use(trail.request_trail(self.spec))  # one line per /v1 request (`RequestTrail`)

    # -- who is asking ---------------------------------------------------------------------------

    async def department(self, request: Request) -> Optional[str]:
        """The caller's department from its API key (`auth.Gate`): 401 without a valid one, 429 once the client's
        address has failed too often; None when this app serves without keys. Noted for the audit trail with
        the key's id (a key that failed: the id it claims)."""
        if self.gate.keys is None:
            department = self.source.entry.department if self.single and self.team else None
            trail.note(request, department=self._who(department))
            return department
        try:
            match = await asyncio.to_thread(self.gate.caller, request.headers, client_address(request))
        except ApiError:
            claimed = parse_api_key(self.gate.presented_key(request.headers))
            if claimed:
                trail.note(request, claimed_key_id=claimed[0])
            raise
        trail.note(request, department=match.team, key_id=match.key_id)
        return match.team

    def _who(self, department: Optional[str]) -> str:
        """The department whose models a caller sees (`local` for a keyless app over a model directory)."""
        if department is not None:
            return department
        return self.source.entry.department if self.single else "local"

    # -- which model -----------------------------------------------------------------------------

    async def resolve(self, requested: Optional[str], caller: Optional[str]) -> ModelEntry:
        """The model a request names, if the caller's department may be served it: its own department's model
        (403 otherwise), and one trained on credentialed data only for a department granted that data (403)."""
        department = self._who(caller)
        entry = await self._find(requested, department)
        check_model(entry, caller, self.tenants)
        return entry

    async def _find(self, requested: Optional[str], department: str) -> ModelEntry:
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
        except STORAGE_ERRORS as err:
            log.warning("resolving %s failed: %s: %s", ref, type(err).__name__, err)
            raise unavailable("model", f"{ref}: the model registry could not be read ({type(err).__name__}); "
                                       "retry later") from None

    # -- the endpoints ---------------------------------------------------------------------------

    async def handle(self, request: Request, task_name: str) -> JSONResponse:
        """`POST /v1/<task_name>`: who asks, what (`requests.read_fields`), of which model; the query the
        task makes of it (`requests.prepare`); the answer as the task presents it."""
        task = get_task(task_name)
        department = await self.department(request)
        fields = await read_fields(request, task, self.limits)
        requested = fields.get("model") or request.query_params.get("model") or \
            request.headers.get("serve_multiplexed_model_id")
        trail.note(request, requested=str(requested)[:200] if requested else None)
        entry = await self.resolve(requested, department)
        trail.note(request, model=entry.id)
        query = await prepare(task, fields, AskedModel(entry.id, entry.meta), self.limits)
        target = entry
        if entry.kind == "adapter":  # answered on a replica holding its base, in the base's batches
            target = await self.base_of(entry, department)
            query.adapter = entry.id
        result = await self.ask(target, query, asked=entry.id)
        out = Answer(model=entry.id, version=entry.version, task=task.name, **task.present(result))
        return JSONResponse(finite(out.model_dump(exclude_none=True)))

    async def base_of(self, adapter: ModelEntry, caller: Optional[str]) -> ModelEntry:
        """The base model an adapter is served on: a registry model of the adapter's department or of a department
        in `models.shared_bases` (403 otherwise), which the caller's department may be served (its training data:
        403), with the weights the adapter was trained on (503 when it changed or is missing)."""
        base_id = adapter.base
        try:
            ref = ModelRef.parse(base_id or "")
        except BadModelId:
            raise ApiError(503, f"model: {adapter.id}: its base {base_id!r} is not a model of this registry; an "
                                "adapter is served on a registry base", "model") from None
        shared = set(self.spec.models.shared_bases)
        if ref.department != adapter.department and ref.department not in shared:
            raise bad("model", f"{adapter.id}: its base {base_id} belongs to department {ref.department!r}, which "
                               f"shares no bases with others (models.shared_bases: {sorted(shared) or 'none'})", 403)
        try:
            base = await asyncio.to_thread(self.source.resolve, ref)
        except UnknownModel:
            raise ApiError(503, f"model: {adapter.id}: its base {base_id} is missing from {self.source.describe()}",
                           "model") from None
        except STORAGE_ERRORS as err:
            log.warning("resolving %s (base of %s) failed: %s: %s", ref, adapter.id, type(err).__name__, err)
            raise unavailable("model", f"{adapter.id}: the model registry could not be read "
                                       f"({type(err).__name__}); retry later") from None
        if base.kind != "model":
            raise ApiError(503, f"model: {adapter.id}: its base {base.id} is not a full model", "model")
        sha = ((base.manifest.get("files") or {}).get("model.safetensors") or {}).get("sha256")
        if sha != adapter.card.get("base_sha256"):
            raise ApiError(503, f"model: {adapter.id}: its base {base.id} is not the one it was trained on (its "
                                "weights differ)", "model")
        check_model(base, caller, self.tenants)
        return base

    async def ask(self, entry: ModelEntry, query, asked: Optional[str] = None) -> Dict[str, Any]:
        """The model deployment's answer to `query`, within `ingress.request_timeout_s` (504 after it); a
        full queue or a lost replica is 503, an error the model replica answered is raised as its ApiError.
        `entry`: the multiplexed model (an adapter's base); `asked`: the id the request named."""
        timeout = self.spec.ingress.request_timeout_s
        response = self.models.options(multiplexed_model_id=entry.id).infer.remote(query)
        name = asked or entry.id

        async def answer():
            return await response

        try:
            result = await asyncio.wait_for(answer(), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise unavailable("model", f"{name} did not answer within {timeout:g} s", status=504) from None
        except BackPressureError:
            raise unavailable("model", f"{name}: too many requests are waiting for it; retry later") from None
        except RayActorError as err:
            log.warning("the replica serving %s was lost: %s", name, err)
            raise unavailable("model", f"{name}: the replica serving it was lost; retry") from None
        if isinstance(result, dict) and "error" in result:
            raise error_answer(result["error"])
        return result

    @api.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"status": "ok", "source": self.source.describe()}
        if self.single:
            out["model"] = self.source.entry.id
        return out

    @api.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
    async def list_models(self, request: Request) -> JSONResponse:
        department = self._who(await self.department(request))
        try:
            entries = await asyncio.to_thread(self.source.list, department)
        except STORAGE_ERRORS as err:
            log.warning("listing %s's models failed: %s: %s", department, type(err).__name__, err)
            raise unavailable("models", f"the model registry could not be read ({type(err).__name__}); "
                                        "retry later") from None
        latest: Dict[str, int] = {}
        for e in entries:
            latest[e.name] = max(latest.get(e.name, 0), e.version)
        models = [dict(e.summary(), latest=e.version == latest[e.name]) for e in entries]
        return JSONResponse({"department": department, "models": models,
                             "resident": await self.resident(department)})

    async def resident(self, department: str) -> List[Dict[str, Any]]:
        """What a model replica holds now (Serve routes this to one replica): its models of the caller's department
        or of a shared one (`models.shared_bases`), each with the caller's department's adapters loaded on it."""
        if self.single:
            return []
        try:
            stats = await asyncio.wait_for(self.models.stats.remote(), 5.0)
        except Exception as err:  # the listing stands without it
            log.warning("asking a model replica what it holds failed: %s: %s", type(err).__name__, err)
            return []
        visible = {department, *self.spec.models.shared_bases}
        out = []
        for model_id in stats.get("resident", []):
            adapters = [a for a in (stats.get("adapters") or {}).get(model_id, []) if a.split("/", 1)[0] == department]
            if model_id.split("/", 1)[0] in visible or adapters:
                out.append({"model": model_id, "adapters": adapters,
                            "adapter_bytes": int((stats.get("adapter_bytes") or {}).get(model_id, 0))})
        return out


def _add_task_endpoints(cls) -> None:
    """One `POST /v1/<task>` per served task family (documented with its request schema), as methods of the
    ingress class so that Serve binds them to its replicas."""
    def for_task(name: str):
        async def endpoint(self, request: Request) -> JSONResponse:
            return await self.handle(request, name)

        return endpoint

    for task in served_tasks():
        endpoint = for_task(task.name)
        endpoint.__name__ = f"post_{task.name}"
        endpoint.__qualname__ = f"{cls.__qualname__}.{endpoint.__name__}"
        setattr(cls, endpoint.__name__, endpoint)
        api.post(f"/v1/{task.name}", response_model=Answer, responses=ERRORS, openapi_extra=body_doc(task),
                 summary=task.summary)(endpoint)


_add_task_endpoints(BiomedGPTIngress)
#: the ingress class itself, before Serve wraps it: its methods run without Ray (tests drive them)
PlainIngress = BiomedGPTIngress
BiomedGPTIngress = serve.deployment(name=INGRESS_DEPLOYMENT)(serve.ingress(api)(BiomedGPTIngress))


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
        self.loaded: Dict[str, Any] = {}  # model id -> LoadedModel, while Serve's LRU holds it
        self.adapter_dirs: Dict[str, Path] = {}
        self.adapter_loads: "collections.Counter[str]" = collections.Counter()
        self.adapter_load_s: "collections.deque[float]" = collections.deque(maxlen=1000)
        self.batch_sizes: "collections.deque[int]" = collections.deque(maxlen=10000)

    async def _load(self, model_id: str) -> _Resident:
        ref = ModelRef.parse(model_id)
        loop = asyncio.get_running_loop()
        m = self.spec.models

        def work():
            entry = self.source.resolve(ref)
            return load_model(self.source.local_dir(entry), entry.id, threads=m.torch_threads, device=m.device,
                              dtype=m.dtype)

        loaded = await loop.run_in_executor(self._pool, work)
        self.loads[model_id] += 1
        self.resident.append(model_id)
        self.loaded[model_id] = loaded
        return _Resident(loaded, self._unloaded)

    def _unloaded(self, model_id: str) -> None:
        if model_id in self.resident:
            self.resident.remove(model_id)
        self.loaded.pop(model_id, None)

    async def adapter_dir(self, adapter_id: str, base_id: str) -> Path:
        """The local directory of an adapter version served on `base_id` (the registry's verified copy; versions
        are immutable, so found once); a retryable `unavailable` when it cannot be had now."""
        known = self.adapter_dirs.get(adapter_id)
        if known is not None:
            return known

        def work() -> Path:
            entry = self.source.resolve(ModelRef.parse(adapter_id))
            if entry.kind != "adapter" or entry.base != base_id:
                raise RegistryError(f"{adapter_id} is not an adapter of {base_id}")
            return self.source.local_dir(entry)

        try:
            folder = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except Exception as err:  # the request is fine, the adapter is not servable now
            log.warning("fetching adapter %s failed: %s: %s", adapter_id, type(err).__name__, err)
            raise unavailable("model", f"{adapter_id} could not be loaded ({type(err).__name__}); retry later") from None
        self.adapter_dirs[adapter_id] = folder
        return folder

    def use_adapters(self, loaded, queries: List[Any]) -> Dict[str, Dict[str, Any]]:
        """Load the batch's adapters that are not loaded on its base (on the event loop, between model calls: peft
        changes the model's modules), then unload least recently used ones beyond `max_adapters_per_replica` and
        `max_adapter_bytes` (never one of this batch). Returns {adapter id: error} for those that failed."""
        m = self.spec.models
        wanted = {q.adapter: self.adapter_dirs.get(q.adapter) for q in queries if q.adapter}
        failed: Dict[str, Dict[str, Any]] = {}
        for adapter_id, folder in wanted.items():
            try:
                if folder is None:
                    raise FileNotFoundError("not fetched")
                t0 = time.perf_counter()
                if ensure_adapters(loaded, {adapter_id: folder}):
                    self.adapter_loads[adapter_id] += 1
                    self.adapter_load_s.append(time.perf_counter() - t0)
            except Exception as err:
                log.warning("loading adapter %s on %s failed: %s: %s", adapter_id, loaded.model_id,
                            type(err).__name__, err)
                what = "ran out of memory" if out_of_memory(err) else f"could not be loaded ({type(err).__name__})"
                failed[adapter_id] = {"status": 503, "detail": f"model: {adapter_id} {what}; retry later",
                                      "field": "model", "retry_after_s": 5.0}
        evict_adapters([lm for lm in self.loaded.values()], m.max_adapters_per_replica, m.max_adapter_bytes,
                       keep=set(wanted))
        return failed

    async def resident_model(self, model_id: str) -> _Resident:
        """The loaded model (from the LRU, or loaded now); a model that cannot be loaded (a checksum that
        differs, a missing or unreadable file, a bad config, storage down, memory short) is a retryable
        `unavailable` ApiError naming it, the details in the replica's log."""
        try:
            return await self.get_model(model_id)
        except Exception as err:  # anything loading raises: the request is fine, the model is not servable now
            log.warning("loading %s failed: %s: %s", model_id, type(err).__name__, err)
            what = "ran out of memory" if out_of_memory(err) else f"could not be loaded ({type(err).__name__})"
            raise unavailable("model", f"{model_id} {what}; retry later") from None

    async def infer(self, query) -> Dict[str, Any]:
        """One request's answer, or `{"error": ...}` (status, detail, field, retry_after_s) for the ingress
        to send: the model loaded and the query's token limits checked before it joins a batch, so one bad
        request never fails the others."""
        model_id = serve.get_multiplexed_model_id()
        try:
            resident = await self.resident_model(model_id)
            if getattr(query, "adapter", None):
                await self.adapter_dir(query.adapter, model_id)
            check_query(resident.loaded, query, self.spec.limits)
        except ApiError as err:
            return {"error": {"status": err.status, "detail": err.detail, "field": err.field,
                              "retry_after_s": err.retry_after_s}}
        except QueryRefused as err:
            return {"error": {"status": err.status, "detail": str(err), "field": err.field}}
        return await self.infer_batch(query)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer_batch(self, queries: List[Any]) -> List[Dict[str, Any]]:
        model_id = serve.get_multiplexed_model_id()
        try:
            resident = await self.resident_model(model_id)
        except ApiError as err:
            return [{"error": {"status": err.status, "detail": err.detail, "field": err.field,
                               "retry_after_s": err.retry_after_s}}] * len(queries)
        self.batch_sizes.append(len(queries))
        # On the event loop, not in a thread: the decoding loop is Python-heavy and would hold the GIL against
        # the loop anyway, starving request intake; blocking here lets the requests that arrive meanwhile queue
        # up and form the next batch whole.
        failed = self.use_adapters(resident.loaded, queries) if any(q.adapter for q in queries) else {}
        if failed:
            ok = [i for i, q in enumerate(queries) if q.adapter not in failed]
            answers: List[Dict[str, Any]] = [{"error": failed[q.adapter]} if q.adapter in failed else {}
                                             for q in queries]
            if ok:
                for i, res in zip(ok, await self._answer(resident, model_id, [queries[i] for i in ok])):
                    answers[i] = res
            return answers
        return await self._answer(resident, model_id, queries)

    async def _answer(self, resident: _Resident, model_id: str, queries: List[Any]) -> List[Dict[str, Any]]:
        try:
            return run_batch(resident.loaded, queries)
        except Exception as err:
            if not out_of_memory(err):
                raise
            log.warning("a batch of %d on %s ran out of memory: %s", len(queries), model_id, err)
            return [{"error": {"status": 503, "detail": f"model: {model_id} ran out of memory on this replica; "
                                                        "retry later", "field": "model", "retry_after_s": 5.0}}
                    ] * len(queries)

    async def stats(self) -> Dict[str, Any]:
        """Loaded models (LRU order), loads per model and batch sizes seen: for tests and benchmarks."""
        sizes = list(self.batch_sizes)
        return {"resident": list(self.resident), "loads": dict(self.loads), "batches": len(sizes),
                "requests": sum(sizes), "max_batch": max(sizes, default=0),
                "max_models_per_replica": self.spec.models.max_models_per_replica,
                "adapters": {mid: list(lm.adapter_meta) for mid, lm in self.loaded.items()},
                "adapter_bytes": {mid: lm.adapter_bytes() for mid, lm in self.loaded.items()},
                "adapter_loads": dict(self.adapter_loads), "adapter_load_s": list(self.adapter_load_s)}

    async def reset_stats(self) -> None:
        self.batch_sizes.clear()


# --------------------------------------------------------------------------------------------------
# Building and starting
# --------------------------------------------------------------------------------------------------


def build_app_from_spec(spec: ServeAppSpec):
    """The application a serving spec describes (the same deployments and options as its deploy config)."""
    opts = deployment_options(spec)
    data = spec.to_dict()
    if spec.audit.enabled and not spec.audit.root:  # fixed here, so every replica writes where the driver says
        data["audit"]["root"] = audit_root(spec.registry)
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
    reroute()  # Serve's import gave `ray.serve` its own terminal handler
    serve.start(http_options=http_options(model_dir_spec(model_dir, team, tenants_path), host, port))
    serve.run(build_app(model_dir, team, tenants_path), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def start_spec(spec: ServeAppSpec, host: Optional[str] = None, port: Optional[int] = None) -> str:
    """Deploy a serving spec on the connected Ray cluster (Serve's HTTP proxy on the spec's host and port unless
    given); returns the base URL once the app is ready."""
    host = host or spec.http.host
    port = port or spec.http.port
    reroute()  # Serve's import gave `ray.serve` its own terminal handler
    serve.start(http_options=http_options(spec, host, port))
    serve.run(build_app_from_spec(spec), name=spec.name, route_prefix=spec.route_prefix, blocking=False)
    return f"http://{host}:{port}{spec.route_prefix.rstrip('/')}"


def stop(name: str = "biomedgpt") -> None:
    serve.delete(name)
    serve.shutdown()
