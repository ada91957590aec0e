"""Ray cluster-launcher configs (`ray up cluster/launcher/*.yaml`) for machines without Kubernetes.

They are checked the way `ray up` checks them, offline: the raw file against the schema shipped in
the Ray package (`ray/autoscaler/ray-schema.json`), then Ray's own preparation (`prepare_config`: the
provider's defaults, on-prem head/worker IPs) and `validate_config` on the result.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def ray_schema_path() -> Path:
    import ray.autoscaler  # heavy (~2 s): imported only when launcher configs are checked

    return Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def launcher_problems(config: Any, source: str = "<config>") -> list[str]:
    """Problems of one cluster-launcher config ([] when `ray up` would accept it)."""
    schema = json.loads(ray_schema_path().read_text())
    out = []
    for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        out.append(f"{source}: {where}: {err.message}")
    if out:
        return out
    from ray.autoscaler._private.util import prepare_config, validate_config  # heavy: see ray_schema_path

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (Exception, SystemExit) as err:  # noqa: BLE001 (Ray aborts through its CLI logger)
        out.append(f"{source}: Ray refuses it: {type(err).__name__}: {err}")
    for cmd in config.get("docker", {}).get("run_options", []) + config.get("head_start_ray_commands", []):
        if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in str(cmd):
            out.append(f"{source}: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 pins Ray to one machine; clusters need 1")
    return out


def load_launcher_config(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())
