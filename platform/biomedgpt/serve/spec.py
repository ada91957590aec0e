"""The serving spec (`jobs/serve/*.yaml`) and the Ray Serve deploy config generated from it.

One YAML file describes a serving application: where the registry is, whose API keys it accepts
(cluster/tenants.yaml), the ingress, the multiplexed model deployment (models per replica, dynamic
batching, autoscaling, resources) and the request limits. It is loaded as strictly as job specs
(`biomedgpt.spec`): unknown keys are errors naming the file and the field path, types and ranges are
checked.

    spec = load_serve_spec("jobs/serve/radiology.yaml")
    config = deploy_config(spec)        # the YAML `serve deploy` / `serve run` / a RayService accept
    app = build_app_from_spec(spec)     # biomedgpt.serve.app: the same application, bound in Python

The deploy config names `biomedgpt.serve.app:app_builder` with the whole spec as `args`, and repeats
the deployments' settings (replicas, autoscaling, actor resources) in its `deployments` list, so
`serve deploy` and `serve.run(build_app_from_spec(spec))` run the same thing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..spec import SpecError, _build

INGRESS_DEPLOYMENT = "BiomedGPTIngress"
MODELS_DEPLOYMENT = "BiomedGPTModels"
IMPORT_PATH = "biomedgpt.serve.app:app_builder"
#: The environment of the Ray processes that serve, set before Ray starts (Ray reads it in each process at
#: start): Serve's throughput-optimised mode (Ray >= 2.55; gRPC between replicas, buffered request logs,
#: user code and handle routing on each replica's own event loop), without the mode's direct ingress, which
#: serves an HAProxy in front of each node (none here: a Serve proxy stays on every node) and holds every
#: stop for its 30 s drain period. `biomedgpt serve` sets it when it starts Ray; the RayService containers
#: (k8s/base/rayservice) carry it.
SERVE_RAY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def apply_serve_ray_env() -> None:
    """Put `SERVE_RAY_ENV` into this process's environment before it starts Ray (Ray's processes read it at
    start), keeping values already set (RAY_SERVE_THROUGHPUT_OPTIMIZED=0 turns the mode off)."""
    import os

    for name, value in SERVE_RAY_ENV.items():
        os.environ.setdefault(name, value)


@dataclass
class HttpSpec:
    """Where Serve's HTTP proxy listens (loopback unless the spec says otherwise)."""

    host: str = "127.0.0.1"
    port: int = 8000


@dataclass
class IngressSpec:
    """The FastAPI ingress: authentication, input checks, model resolution."""

    replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 256


@dataclass
class BatchSpec:
    """Dynamic batching (`@serve.batch`): requests for the same model within `wait_timeout_s` form one batch."""

    max_batch_size: int = 16
    wait_timeout_s: float = 0.01


@dataclass
class AutoscalingSpec:
    """Ray Serve autoscaling of the model deployment (replicas follow ongoing requests per replica)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0


@dataclass
class ModelsSpec:
    """The multiplexed model deployment: each replica keeps the `max_models_per_replica` most recently used
    models (LRU) and batches requests per model. Each model and every input runs on `device` (auto: CUDA
    when the replica has a GPU, `num_gpus`; cuda needs num_gpus > 0) in `dtype` (float32 | bfloat16 |
    float16)."""

    max_models_per_replica: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int = 1
    max_ongoing_requests: int = 64
    batch: BatchSpec = field(default_factory=BatchSpec)
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)


@dataclass
class Limits:
    """Request limits (`requests.py` checks them); larger or longer input gets a 4xx naming the field."""

    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_question_chars: int = 1000
    max_text_chars: int = 20_000
    max_labels: int = 100
    max_label_chars: int = 200


@dataclass
class ServeAppSpec:
    """A serving application over the model registry. With `model_dir` instead of a registry it serves that one
    model directory (as `biomedgpt serve MODEL_DIR`), under the department `team` (or `local`)."""

    kind: Literal["serve"]
    name: str
    registry: str | None = None
    model_dir: str | None = None
    team: str | None = None
    tenants: str | None = None
    auth: bool = True
    route_prefix: str = "/"
    latest_ttl_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)
    http: HttpSpec = field(default_factory=HttpSpec)
    ingress: IngressSpec = field(default_factory=IngressSpec)
    models: ModelsSpec = field(default_factory=ModelsSpec)
    limits: Limits = field(default_factory=Limits)
    description: str = ""
    source: str = field(default="<dict>", metadata={"internal": True})

    def validate(self) -> None:
        f = self.source

        def fail(where: str, msg: str, value: Any) -> SpecError:
            return SpecError(f"{f}: {where}: {msg}, got {value!r}")

        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", self.name):
            raise fail("name", "lower-case letters, digits, '.', '_' or '-'", self.name)
        if self.registry and self.model_dir:
            raise SpecError(f"{f}: registry, model_dir: give one of them (a registry, or one model directory)")
        if self.model_dir is None and not self.auth:
            raise SpecError(f"{f}: auth: a registry app serves several departments and needs API keys (auth: true)")
        if self.models.device == "cuda" and not self.models.num_gpus:
            raise SpecError(f"{f}: models.device: cuda needs models.num_gpus > 0 (Ray gives a replica a GPU only "
                            "then); or device: auto")
        if not self.route_prefix.startswith("/"):
            raise fail("route_prefix", "must start with '/'", self.route_prefix)
        if not 1 <= self.http.port <= 65535:
            raise fail("http.port", "must be in 1..65535", self.http.port)
        a, m = self.models.autoscaling, self.models
        checks = [
            (self.ingress.replicas >= 1, "ingress.replicas", "must be >= 1", self.ingress.replicas),
            (self.ingress.num_cpus >= 0, "ingress.num_cpus", "must be >= 0", self.ingress.num_cpus),
            (self.ingress.max_ongoing_requests >= 1, "ingress.max_ongoing_requests", "must be >= 1",
             self.ingress.max_ongoing_requests),
            (m.max_models_per_replica >= 1, "models.max_models_per_replica", "must be >= 1", m.max_models_per_replica),
            (m.num_cpus >= 0, "models.num_cpus", "must be >= 0", m.num_cpus),
            (m.num_gpus >= 0, "models.num_gpus", "must be >= 0", m.num_gpus),
            (m.torch_threads >= 1, "models.torch_threads", "must be >= 1", m.torch_threads),
            (m.max_ongoing_requests >= 1, "models.max_ongoing_requests", "must be >= 1", m.max_ongoing_requests),
            (m.batch.max_batch_size >= 1, "models.batch.max_batch_size", "must be >= 1", m.batch.max_batch_size),
            (m.batch.wait_timeout_s >= 0, "models.batch.wait_timeout_s", "must be >= 0", m.batch.wait_timeout_s),
            (a.min_replicas >= 0, "models.autoscaling.min_replicas", "must be >= 0", a.min_replicas),
            (a.max_replicas >= max(1, a.min_replicas), "models.autoscaling.max_replicas",
             "must be >= 1 and >= min_replicas", a.max_replicas),
            (a.initial_replicas is None or a.min_replicas <= a.initial_replicas <= a.max_replicas,
             "models.autoscaling.initial_replicas", "must lie in [min_replicas, max_replicas]", a.initial_replicas),
            (a.target_ongoing_requests > 0, "models.autoscaling.target_ongoing_requests", "must be > 0",
             a.target_ongoing_requests),
            (self.latest_ttl_s >= 0, "latest_ttl_s", "must be >= 0", self.latest_ttl_s),
        ]
        for lf in dataclasses.fields(Limits):
            value = getattr(self.limits, lf.name)
            checks.append((value >= 1, f"limits.{lf.name}", "must be >= 1", value))
        for ok, where, msg, value in checks:
            if not ok:
                raise fail(where, msg, value)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


def serve_spec_from_dict(data: Any, source: str = "<dict>") -> ServeAppSpec:
    spec = _build(ServeAppSpec, data, "", source)
    spec.source = source
    spec.validate()
    return spec


def load_serve_spec(path: str | Path) -> ServeAppSpec:
    """Read and validate a serving spec (raises SpecError naming the file and the field path)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise SpecError(f"{p}: cannot read serving spec: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    return serve_spec_from_dict(data, str(p))


def autoscaling_config(spec: ServeAppSpec) -> dict[str, Any]:
    a = spec.models.autoscaling
    out: dict[str, Any] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                           "target_ongoing_requests": a.target_ongoing_requests,
                           "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    if a.initial_replicas is not None:
        out["initial_replicas"] = a.initial_replicas
    return out


def deployment_options(spec: ServeAppSpec) -> dict[str, dict[str, Any]]:
    """Per deployment, the options both the deploy config and `build_app_from_spec` apply."""
    m = spec.models
    models_actor: dict[str, Any] = {"num_cpus": m.num_cpus}
    if m.num_gpus:
        models_actor["num_gpus"] = m.num_gpus
    return {
        INGRESS_DEPLOYMENT: {"num_replicas": spec.ingress.replicas,
                             "max_ongoing_requests": spec.ingress.max_ongoing_requests,
                             "ray_actor_options": {"num_cpus": spec.ingress.num_cpus}},
        MODELS_DEPLOYMENT: {"autoscaling_config": autoscaling_config(spec),
                            "max_ongoing_requests": m.max_ongoing_requests,
                            "ray_actor_options": models_actor},
    }


def deploy_config(spec: ServeAppSpec) -> dict[str, Any]:
    """The Ray Serve config file (`serve deploy` / `serve run` / RayService serveConfigV2) of a spec."""
    app: dict[str, Any] = {"name": spec.name, "route_prefix": spec.route_prefix, "import_path": IMPORT_PATH,
                           "args": {"spec": spec.to_dict(), "source": spec.source},
                           "deployments": [{"name": name, **opts} for name, opts in deployment_options(spec).items()]}
    if spec.env:
        app["runtime_env"] = {"env_vars": dict(spec.env)}
    return {"proxy_location": "HeadOnly" if spec.http.host in ("127.0.0.1", "localhost") else "EveryNode",
            "http_options": {"host": spec.http.host, "port": spec.http.port},
            "applications": [app]}


def dump_deploy_config(spec: ServeAppSpec) -> str:
    header = (f"# Ray Serve config generated from {spec.source} by `biomedgpt serve-config`: do not edit,\n"
              f"# regenerate. Run with `serve run FILE` (local) or `serve deploy FILE` (a running cluster).\n")
    return header + yaml.safe_dump(deploy_config(spec), sort_keys=False)
