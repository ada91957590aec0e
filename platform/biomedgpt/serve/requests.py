"""Requests of the serving API, from the HTTP body to the model query: within the serving spec's
`limits` (`spec.Limits`), reading a JSON or multipart body against the task's request schema,
checking each field (text lengths, label lists, image decoding of JPEG/PNG/... and DICOM), whether the
model may be asked the task at all, and the `Query` the task makes of it (`prepare`).

Everything a client can send wrong becomes an `ApiError` (a 4xx status and a message that starts
with the field it is about); nothing here raises anything else for bad input, so a replica keeps
serving. Images are checked before their pixels are decoded: the pixel count from the header against
`max_image_pixels` (decompression bombs), then a full decode (truncated or corrupt files).

A request for a task the model was not trained for (its training task, or the tasks its model card
lists) gets 422 naming the model's tasks, unless the model is a generalist (a pretrained checkpoint, or
one that records no task) or the body asks for it with `"zero_shot": true` (`Task.serves`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from pydantic import ValidationError
from starlette.requests import Request

from ..modeldir import ModelMeta
from ..spec import Limits
from ..tasks import RequestError, Task
from .engine import Query
from .schemas import request_model

IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF", "MPO")


class ApiError(Exception):
    """An error answer: HTTP `status` and a message naming the field (`"image: ..."`). `retry_after_s`
    marks it retryable (a 503 or 504: the model could not be loaded, storage failed, memory ran out,
    the queue is full, time ran out): the body says `"retryable": true` and `Retry-After` is sent."""

    def __init__(self, status: int, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(max(1, int(-(-retry_after_s // 1)))))

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail}
        if self.field:
            out["field"] = self.field
        if self.retry_after_s is not None:
            out["retryable"] = True
        return out


def unavailable(field: str, problem: str, retry_after_s: float = 5.0, status: int = 503) -> ApiError:
    """A retryable error: the request was fine, the service could not answer it now."""
    return ApiError(status, f"{field}: {problem}", field, retry_after_s=retry_after_s)


def bad(field: str, problem: str, status: int = 400) -> ApiError:
    return ApiError(status, f"{field}: {problem}", field)


def decode_base64(data: str, field: str = "image") -> bytes:
    if not isinstance(data, str):
        raise bad(field, "expected a base64 string", 422)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad(field, f"not valid base64 ({err})") from None
    return raw


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_image(data: bytes, limits: Limits, field: str):
    import pydicom
    from PIL import Image

    from ..data.converters.dicom import dicom_pixels_to_uint8

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged headers warn before they fail
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many types for damaged files
        raise bad(field, f"not a readable DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise bad(field, "DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise bad(field, "DICOM file lacks Rows/Columns") from None
    if rows < 1 or cols < 1:
        raise bad(field, f"DICOM image has {rows}x{cols} pixels")
    if rows * cols * frames > limits.max_image_pixels:
        raise bad(field, f"DICOM image has {cols}x{rows}x{frames} pixels, more than the limit of "
                         f"{limits.max_image_pixels:,}", 413)
    try:
        array = dicom_pixels_to_uint8(ds)
    except Exception as err:  # unsupported transfer syntax, truncated pixel data, odd photometrics
        raise bad(field, f"DICOM pixel data not decodable ({err})") from None
    return Image.fromarray(array)


def open_image(data: bytes, limits: Limits, field: str = "image", draft_size: int | None = None):
    """A fully decoded PIL image (RGB) from upload bytes: JPEG, PNG, TIFF, BMP, WebP, GIF or DICOM."""
    from PIL import Image

    if not data:
        raise bad(field, "empty")
    if len(data) > limits.max_upload_bytes:
        raise bad(field, f"{len(data)} bytes exceeds the {limits.max_upload_bytes} byte limit", 413)
    if is_dicom(data):
        return _dicom_image(data, limits, field).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # PIL warns from MAX_IMAGE_PIXELS and refuses from twice that: both are over the cap here
            raise bad(field, f"over the pixel cap of {limits.max_image_pixels:,} pixels ({err})", 413) from None
        except Exception as err:  # PIL raises many types for bytes that are no image
            raise bad(field, f"cannot decode image ({len(data)} bytes): not a JPEG, PNG, TIFF, BMP, WebP, GIF "
                             f"or DICOM file ({type(err).__name__})") from None
        width, height = img.size
        if width < 1 or height < 1:
            raise bad(field, f"image has {width}x{height} pixels")
        if width * height > limits.max_image_pixels:
            raise bad(field, f"image has {width}x{height} = {width * height:,} pixels, more than the limit of "
                             f"{limits.max_image_pixels:,} (decompression bomb?)", 413)
        try:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # as training decodes (data/transforms.py)
            img.load()
            return img.convert("RGB")
        except Exception as err:
            raise bad(field, f"cannot decode image: truncated or corrupt {img.format} data "
                             f"({type(err).__name__}: {err})") from None


def image_array(data: bytes, image_size: int, limits: Limits, field: str = "image") -> np.ndarray:
    """(3, image_size, image_size) float32 normalised pixels, exactly as training preprocesses."""
    from ..data.transforms import image_to_array

    return image_to_array(open_image(data, limits, field, draft_size=image_size), image_size)


def text_field(value: Any, field: str, max_chars: int, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise bad(field, "field required", 422)
        return None
    if not isinstance(value, str):
        raise bad(field, f"expected a string, got {type(value).__name__}", 422)
    text = value.strip()
    if not text:
        raise bad(field, "empty")
    if len(text) > max_chars:
        raise bad(field, f"longer than {max_chars} characters ({len(text)})")
    if "\x00" in text:
        raise bad(field, "contains a NUL character")
    return text


def label_list(value: Any, limits: Limits, field: str = "labels") -> list[str] | None:
    """Candidate labels: a list of distinct non-empty strings (None when absent)."""
    if value is None:
        return None
    if isinstance(value, str):  # multipart: a JSON array or comma-separated names
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as err:
                raise bad(field, f"not a JSON array ({err})") from None
        else:
            value = [part for part in text.split(",")]
    if not isinstance(value, list):
        raise bad(field, "expected a list of strings", 422)
    if not value:
        raise bad(field, "empty list")
    if len(value) > limits.max_labels:
        raise bad(field, f"{len(value)} labels, more than the limit of {limits.max_labels}")
    out: list[str] = []
    for i, item in enumerate(value):
        text = text_field(item, f"{field}[{i}]", limits.max_label_chars)
        norm = " ".join(text.lower().replace("_", " ").split())
        if norm in out:
            raise bad(f"{field}[{i}]", f"duplicate label {text!r}")
        out.append(norm)
    return out


# -- the body -----------------------------------------------------------------------------------------


def _validation_detail(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "body"
    kind = first.get("type", "")
    msg = {"missing": "field required", "extra_forbidden": "unknown field"}.get(kind, first.get("msg", "invalid"))
    return bad(loc, msg, 422)


async def read_body(request: Request, cap: int) -> bytes:
    """The body, at most `cap` bytes (413 beyond, from Content-Length before reading when it is sent)."""
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


def _flag(value: str, field: str) -> bool:
    text = value.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise bad(field, f"expected true or false, got {value!r}", 422)


async def read_fields(request: Request, task: Task, limits: Limits) -> dict[str, Any]:
    """The request's fields (the image as bytes) from a JSON or multipart body, checked against the task's
    request schema (`schemas.request_model`): 415 for another Content-Type, 413 over the upload limit,
    422 for bad JSON, unknown or missing fields and wrong types."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    model_cls = request_model(task)
    ctype = request.headers.get("content-type") or ""
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime not in ("application/json", "multipart/form-data"):
        kinds = "application/json" + (" or multipart/form-data" if "image" in model_cls.model_fields else "")
        raise ApiError(415, f"Content-Type: {mime or 'missing'} is not supported; send {kinds}", "Content-Type")
    body = await read_body(request, limits.max_upload_bytes + 65536)
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
        form = await Request(request.scope, receive).form(
            max_files=2, max_fields=64, max_part_size=max(limits.max_text_chars * 4, 65536))
    except MultiPartException as err:
        raise bad("body", f"malformed multipart/form-data ({err.message})") from None
    except Exception as err:  # starlette raises HTTPException(400) for malformed forms
        raise bad("body", f"malformed multipart/form-data ({getattr(err, 'detail', err)})") from None
    known = set(model_cls.model_fields)
    lists = {f.name for f in task.request_fields if f.kind == "labels"}
    fields: dict[str, Any] = {}
    for key in form.keys():
        if key not in known:
            raise bad(key, "unknown field", 422)
        values = form.getlist(key)
        if key in lists:
            fields[key] = ([v for v in values if isinstance(v, str)] if len(values) > 1
                           else (values[0] if isinstance(values[0], str) else None))
            continue
        if len(values) > 1:
            raise bad(key, "given more than once", 422)
        value = values[0]
        if key == "image":
            if isinstance(value, UploadFile):
                data = await value.read(limits.max_upload_bytes + 1)
                if len(data) > limits.max_upload_bytes:
                    raise bad("image", f"more than the {limits.max_upload_bytes} byte limit", 413)
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
        elif key == "zero_shot":
            fields[key] = _flag(value, key)
        else:
            fields[key] = value
    for name, info in model_cls.model_fields.items():
        if info.is_required() and name not in fields:
            raise bad(name, "field required", 422)
    if "image" in known and "image" not in fields:
        raise bad("image", "field required", 422)
    return fields


# -- the query ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AskedModel:
    """The model a request names, as a task sees it (`tasks.base.ServedModel`)."""

    id: str
    meta: ModelMeta

    @property
    def answers(self) -> tuple[str, ...] | None:
        return self.meta.answers

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self.meta.classes

    def trained_for(self, task: str) -> bool:
        return self.meta.trained_for(task)


def check_task(task: Task, model: AskedModel, zero_shot: bool) -> None:
    """422 when `model` may not be asked `task` (`Task.serves`) and the request does not ask for zero-shot."""
    if zero_shot or task.serves(model):
        return
    tasks = ", ".join(model.meta.tasks) or "none recorded"
    raise bad("model", f"{model.id} was trained for {tasks}, not {task.name}: ask a model of that task, or send "
                       "\"zero_shot\": true to ask this one anyway", 422)


def task_fields(task: Task, fields: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """The task's request fields checked: texts (empty, overlong, NUL: 400) and label lists."""
    out: dict[str, Any] = {}
    for f in task.request_fields:
        if f.kind == "labels":
            out[f.name] = label_list(fields.get(f.name), limits, f.name)
        else:
            out[f.name] = text_field(fields.get(f.name), f.name, getattr(limits, f.limit), required=f.required)
    return out


async def prepare(task: Task, fields: Mapping[str, Any], model: AskedModel, limits: Limits) -> Query:
    """The model query of a request whose body `read_fields` read: the task checked against the model
    (`check_task`), its fields checked, the record and candidates the task makes of them
    (`Task.request`), the image decoded and preprocessed as training does (in a thread)."""
    check_task(task, model, bool(fields.get("zero_shot")))
    values = task_fields(task, fields, limits)
    try:
        asked = task.request(values, model)
    except RequestError as err:
        raise bad(err.field, err.problem, err.status) from None
    image = None
    if task.has_image:
        raw = fields.get("image")
        if raw is None:
            raise bad("image", "field required", 422)
        image = await asyncio.to_thread(image_array, raw, model.meta.image_size, limits)
    texts = {f.name: values[f.name] for f in task.request_fields if f.kind != "labels" and values.get(f.name)}
    label_field = next((f.name for f in task.request_fields if f.kind == "labels" and values.get(f.name)), None)
    return Query(task=task.name, instruction=task.instruction(asked.record), image=image, candidates=asked.candidates,
                 top_k=int(fields.get("top_k") or 5), multi_label=asked.multi_label, texts=texts,
                 labels=tuple(values[label_field]) if label_field else None, labels_field=label_field or "labels")
