"""The Ray Serve deploy config generated from a serving spec (`jobs/serve/*.yaml`).

One YAML file describes a serving application: where the registry is, whose API keys it accepts
(cluster/tenants.yaml), the ingress, the multiplexed model deployment (models per replica, dynamic
batching, autoscaling, resources) and the request limits. Its schema, `ServeAppSpec`, lives with the
other job kinds in `biomedgpt.spec` (loaded as strictly: unknown keys are errors naming the file and
the field path, types and ranges are checked); this module turns it into what Ray Serve runs.

    spec = load_serve_spec("jobs/serve/cluster.yaml")     # biomedgpt.spec
    config = deploy_config(spec)        # the YAML `serve deploy` / `serve run` / a RayService accept
    app = build_app_from_spec(spec)     # biomedgpt.serve.app: the same application, bound in Python

The deploy config names `biomedgpt.serve.app:app_builder` with the whole spec as `args`, and repeats
the deployments' settings (replicas, autoscaling, actor resources) in its `deployments` list, so
`serve deploy` and `serve.run(build_app_from_spec(spec))` run the same thing.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from ..spec import ServeAppSpec

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
    for name, value in SERVE_RAY_ENV.items():
        os.environ.setdefault(name, value)


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
                             "max_queued_requests": spec.ingress.max_queued_requests,
                             "ray_actor_options": {"num_cpus": spec.ingress.num_cpus}},
        MODELS_DEPLOYMENT: {"autoscaling_config": autoscaling_config(spec),
                            "max_ongoing_requests": m.max_ongoing_requests,
                            "max_queued_requests": m.max_queued_requests,
                            "ray_actor_options": models_actor},
    }


#: Serve's own HTTP timeout is this much above the ingress's: the ingress answers 504 in JSON first, and
#: Serve's plain 408 only catches a request stuck before the ingress saw it
SERVE_TIMEOUT_MARGIN_S = 5.0


def http_options(spec: ServeAppSpec, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Serve's HTTP proxy options of a spec (host and port may be overridden, as `biomedgpt serve` does)."""
    return {"host": host or spec.http.host, "port": port or spec.http.port,
            "request_timeout_s": spec.ingress.request_timeout_s + SERVE_TIMEOUT_MARGIN_S}


def deploy_config(spec: ServeAppSpec) -> dict[str, Any]:
    """The Ray Serve config file (`serve deploy` / `serve run` / RayService serveConfigV2) of a spec."""
    app: dict[str, Any] = {"name": spec.name, "route_prefix": spec.route_prefix, "import_path": IMPORT_PATH,
                           "args": {"spec": spec.to_dict(), "source": spec.source},
                           "deployments": [{"name": name, **opts} for name, opts in deployment_options(spec).items()]}
    if spec.env:
        app["runtime_env"] = {"env_vars": dict(spec.env)}
    return {"proxy_location": "HeadOnly" if spec.http.host in ("127.0.0.1", "localhost") else "EveryNode",
            "http_options": http_options(spec),
            "applications": [app]}


def dump_deploy_config(spec: ServeAppSpec) -> str:
    header = (f"# Ray Serve config generated from {spec.source} by `biomedgpt serve-config`: do not edit,\n"
              f"# regenerate. Run with `serve run FILE` (local) or `serve deploy FILE` (a running cluster).\n")
    return header + yaml.safe_dump(deploy_config(spec), sort_keys=False)
