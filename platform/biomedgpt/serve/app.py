"""The Ray Serve application: a FastAPI ingress over one exported model directory.

    POST /v1/vqa   {"question": "...", "image": "<base64 JPEG/PNG bytes>"}
                   -> {"answer": "...", "model": "<name>", "decoding": "trie"|"beam"}
    GET  /healthz  -> {"status": "ok", "model": "<name>"}

When the app serves a department (`team`), every /v1 request needs one of that department's API
keys from cluster/tenants.yaml (the same file job admission reads), as `Authorization: Bearer <key>`
or `X-API-Key: <key>`: none or a wrong one gets 401.

Requests are preprocessed with the same transforms as training (data/transforms.py) and decoded as
the evaluation decodes (trie over the model's answers.json, else beam search). Bad input gets a 4xx
JSON error naming the problem; the replica keeps serving.
"""


import base64
import binascii
import json
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, Field
from ray import serve

MAX_IMAGE_BYTES = 20 * 2**20
MAX_QUESTION_CHARS = 1000

api = FastAPI(title="BiomedGPT", description="Biomedical vision-language model API", version="0.1")


class VQARequest(BaseModel):
    question: str = Field(..., description="the question about the image")
    image: str = Field(..., description="the image, JPEG or PNG bytes in base64")


class VQAResponse(BaseModel):
    answer: str
    model: str
    decoding: str


def decode_request_image(data: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise HTTPException(status_code=400, detail=f"image: not valid base64 ({err})") from None
    if not raw:
        raise HTTPException(status_code=400, detail="image: empty")
    if len(raw) > MAX_IMAGE_BYTES:
        raise HTTPException(status_code=413, detail=f"image: {len(raw)} bytes exceeds the {MAX_IMAGE_BYTES} byte limit")
    return raw


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class BiomedGPTService:
    def __init__(self, model_dir: str, team: Optional[str] = None, tenants_path: Optional[str] = None) -> None:
        import torch

        from ..evaluate.predict import load_model_dir

        torch.set_num_threads(1)
        self.model_dir = Path(model_dir)
        self.model, self.tok, self.answers = load_model_dir(self.model_dir)
        meta_file = self.model_dir / "training.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        # the run that made the model names it; a converted checkpoint is named by its directory
        self.name = str(meta.get("run") or self.model_dir.name)
        self.team = team
        self.tenants = None
        if team:
            from ..tenancy import load_tenants

            self.tenants = load_tenants(tenants_path)
            if team not in self.tenants.teams:
                raise ValueError(f"{self.tenants.path}: no team {team!r} to serve for")
        self._verified: dict[str, bool] = {}
        self.image_size = int(meta.get("image_size", 256))
        self.max_source_length = int(meta.get("max_source_length", 80))

    def authorize(self, authorization: Optional[str], x_api_key: Optional[str]) -> None:
        """401 unless the request carries one of the served department's API keys."""
        if self.tenants is None:
            return
        key = x_api_key
        if not key and authorization and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not key:
            raise HTTPException(status_code=401, detail="an API key is required (Authorization: Bearer <key>)")
        if key not in self._verified:  # scrypt costs ~50 ms: remember verdicts per key
            from ..tenancy import verify_api_key

            self._verified[key] = verify_api_key(self.team, key, self.tenants)
        if not self._verified[key]:
            raise HTTPException(status_code=401, detail=f"the API key is not one of team {self.team!r}'s keys")

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.name}

    @api.post("/v1/vqa", response_model=VQAResponse)
    def vqa(self, req: VQARequest, authorization: Optional[str] = Header(default=None),
            x_api_key: Optional[str] = Header(default=None)) -> VQAResponse:
        from ..data.transforms import ImageDecodeError, load_image
        from ..evaluate.predict import predict_vqa

        self.authorize(authorization, x_api_key)
        question = req.question.strip()
        if not question:
            raise HTTPException(status_code=400, detail="question: empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise HTTPException(status_code=400, detail=f"question: longer than {MAX_QUESTION_CHARS} characters")
        image = decode_request_image(req.image)
        try:
            load_image(image, 16)  # validate before queuing the model work
        except ImageDecodeError as err:
            raise HTTPException(status_code=400, detail=f"image: {err}") from None
        decoding = "trie" if self.answers else "beam"
        record: dict[str, Any] = {"id": "request", "question": question, "answer": "", "_image": image}
        (pred,) = predict_vqa(self.model, self.tok, [record], image_size=self.image_size,
                              max_source_length=self.max_source_length, answers=self.answers, decoding=decoding,
                              beam_size=1 if decoding == "trie" else 5, batch_size=1)
        return VQAResponse(answer=pred["prediction"], model=self.name, decoding=decoding)


def build_app(model_dir: str, team: Optional[str] = None, tenants_path: Optional[str] = None):
    """The Serve application bound to one model directory; with `team`, requests need that department's
    API keys (cluster/tenants.yaml, or `tenants_path`)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; not a model directory (see `biomedgpt export`)")
    if tenants_path is not None:
        tenants_path = str(Path(tenants_path).resolve())
    return BiomedGPTService.bind(str(Path(model_dir).resolve()), team, tenants_path)


def start(model_dir: str, host: str = "127.0.0.1", port: int = 8000, name: str = "biomedgpt",
          team: Optional[str] = None, tenants_path: Optional[str] = None) -> str:
    """Deploy on the connected Ray cluster; returns the base URL once the app is ready."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model_dir, team, tenants_path), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop(name: str = "biomedgpt") -> None:
    serve.delete(name)
    serve.shutdown()
