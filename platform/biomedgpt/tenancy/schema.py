"""The JSON schema of `cluster/tenants.yaml` (draft 2020-12).

The schema fixes the shape (keys, types, name patterns, closed objects); `biomedgpt.tenancy` adds the
rules a schema cannot say (quota arithmetic, references between sections). `biomedgpt cluster render`
writes it beside tenants.yaml as `tenants.schema.json` so editors can complete and check the file.
"""

from __future__ import annotations

from typing import Any

#: Kubernetes-style names: they become namespaces, queue and flavor names (RFC 1123 labels).
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 30}
#: A Kubernetes quantity (`12`, `500m`, `1536Gi`).
QUANTITY_REF = {"$ref": "#/$defs/quantity"}
QUANTITY = {
    "oneOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti|Pi)?$"},
    ]
}
#: A storage location: a URL (s3://, gs://, file://, ...) or an absolute path; prefixes end with "/".
PREFIX = {"type": "string", "pattern": r"^([a-z][a-z0-9+.-]*://[^\s]+|/[^\s]*)/$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
CIDR = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$"
#: A serving API key's id: the part of `<key-id>.<secret>` before the dot.
KEY_ID = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$", "maxLength": 63}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "BiomedGPT shared cluster: tenants",
    "description": "Who shares the cluster: institutions, departments (teams), GPU quotas, storage, dataset "
                   "grants, serving keys. Read by `biomedgpt cluster render`, job admission and serving.",
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "cluster", "priorities", "credentials", "institutions"],
    "properties": {
        "version": {"const": 1},
        "datasetSpecs": {"type": "string", "description": "folder of datasets_spec/*.yaml, relative to this file"},
        "servingSpec": {"type": "string", "minLength": 1,
                        "description": "the serving spec (jobs/serve/*.yaml) every department's RayService "
                                       "runs, with the department's `serving` registry and replicas; relative to "
                                       "this file"},
        "cluster": {"$ref": "#/$defs/cluster"},
        "priorities": {
            "description": "Kueue WorkloadPriorityClasses; every job kind maps to exactly one",
            "type": "object",
            "minProperties": 1,
            "propertyNames": NAME,
            "additionalProperties": {"$ref": "#/$defs/priority"},
        },
        "credentials": {
            "description": "data-use credentials (e.g. PhysioNet) and the credentialed datasets each unlocks",
            "type": "object",
            "propertyNames": NAME,
            "additionalProperties": {"$ref": "#/$defs/credential"},
        },
        "local": {"$ref": "#/$defs/local"},
        "institutions": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": NAME,
            "additionalProperties": {"$ref": "#/$defs/institution"},
        },
    },
    "$defs": {
        "name": NAME,
        "quantity": QUANTITY,
        "prefix": PREFIX,
        "cluster": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "cohort", "image", "rayVersion", "cpu", "gpuTypes"],
            "properties": {
                "name": NAME,
                "cohort": {**NAME, "description": "the Kueue cohort every institution's ClusterQueue joins"},
                "image": {"type": "string", "minLength": 1, "description": "the image cluster/Dockerfile builds"},
                "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
                "cpu": {
                    "description": "the CPU and memory the tenants share (one ResourceFlavor without node labels)",
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["flavor", "cpus", "memory"],
                    "properties": {"flavor": NAME, "cpus": {"$ref": "#/$defs/quantity"},
                                   "memory": {"$ref": "#/$defs/quantity"}},
                },
                "gpuTypes": {
                    "description": "one ResourceFlavor per GPU type; `gpus` is the cluster's inventory",
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": NAME,
                    "additionalProperties": {"$ref": "#/$defs/gpuType"},
                },
                "sharedReadPrefixes": {
                    "description": "readable by every team (open-data shards, released checkpoints)",
                    "type": "array", "items": {"$ref": "#/$defs/prefix"}, "uniqueItems": True,
                },
                "containerDefaults": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["cpu", "memory"],
                    "properties": {"cpu": {"$ref": "#/$defs/quantity"}, "memory": {"$ref": "#/$defs/quantity"},
                                   "ephemeralStorage": {"$ref": "#/$defs/quantity"}},
                },
                "network": {"$ref": "#/$defs/network"},
            },
        },
        "network": {
            "description": "what the tenant namespaces' NetworkPolicies let through besides a department's own Ray "
                           "pods: DNS, object storage, the API server (autoscaler), the KubeRay operator "
                           "(dashboard/job API of the heads) and the ingress namespace (serve port only)",
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "dnsNamespace": NAME,
                "dnsPodLabels": {**LABELS, "minProperties": 1},
                "ingressNamespace": NAME,
                "operatorNamespace": NAME,
                "operatorPodLabels": {**LABELS, "minProperties": 1},
                "objectStorage": {"$ref": "#/$defs/egress"},
                "apiServer": {"$ref": "#/$defs/egress"},
            },
        },
        "egress": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cidrs", "ports"],
            "properties": {
                "cidrs": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": CIDR}},
                "except": {"type": "array", "items": {"type": "string", "pattern": CIDR}},
                "ports": {"type": "array", "minItems": 1, "uniqueItems": True,
                          "items": {"type": "integer", "minimum": 1, "maximum": 65535}},
            },
        },
        "gpuType": {
            "type": "object",
            "additionalProperties": False,
            "required": ["gpus", "gpusPerNode", "nodeLabels", "cpusPerGpu", "memoryPerGpu"],
            "properties": {
                "description": {"type": "string"},
                "gpus": {"type": "integer", "minimum": 1},
                "gpusPerNode": {"type": "integer", "minimum": 1},
                "nodeLabels": {**LABELS, "minProperties": 1},
                "cpusPerGpu": {"type": "integer", "minimum": 1},
                "memoryPerGpu": {"$ref": "#/$defs/quantity"},
            },
        },
        "priority": {
            "type": "object",
            "additionalProperties": False,
            "required": ["value", "kinds"],
            "properties": {
                "value": {"type": "integer", "minimum": 0, "maximum": 1000000000},
                "kinds": {"type": "array", "minItems": 1, "uniqueItems": True,
                          "items": {"enum": ["serve", "finetune", "evaluate", "pretrain"]}},
                "description": {"type": "string"},
            },
        },
        "credential": {
            "type": "object",
            "additionalProperties": False,
            "required": ["description", "datasets"],
            "properties": {
                "description": {"type": "string", "minLength": 1},
                "datasets": {"type": "array", "uniqueItems": True,
                             "items": {"type": "string", "pattern": "^[a-z0-9_]+$"}},
                "readPrefixes": {"type": "array", "items": {"$ref": "#/$defs/prefix"}, "uniqueItems": True},
            },
        },
        "grants": {
            "description": "datasets a team may read: `open` (all open datasets, or a list), `credentialed` (each "
                           "needs a credential the team holds)",
            "type": "object",
            "additionalProperties": False,
            "required": ["open"],
            "properties": {
                "open": {"oneOf": [{"const": "all"},
                                   {"type": "array", "uniqueItems": True,
                                    "items": {"type": "string", "pattern": "^[a-z0-9_]+$"}}]},
                "credentialed": {"type": "array", "uniqueItems": True,
                                 "items": {"type": "string", "pattern": "^[a-z0-9_]+$"}},
            },
        },
        "local": {
            "description": "runs outside the cluster (`biomedgpt run` on a workstation, CI, the demo)",
            "type": "object",
            "additionalProperties": False,
            "required": ["anyLocalPath"],
            "properties": {
                "anyLocalPath": {"type": "boolean",
                                 "description": "local runs may read and write any local path or file:// URL"},
                "teams": {
                    "description": "teams that exist only for local runs (no namespace, no quota)",
                    "type": "object",
                    "propertyNames": NAME,
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["datasets"],
                        "properties": {"description": {"type": "string"}, "datasets": {"$ref": "#/$defs/grants"}},
                    },
                },
            },
        },
        "limit": {
            "type": "object",
            "additionalProperties": False,
            "required": ["nominal"],
            "properties": {
                "nominal": {"$ref": "#/$defs/quantity"},
                "borrowingLimit": {"$ref": "#/$defs/quantity"},
                "lendingLimit": {"$ref": "#/$defs/quantity"},
            },
        },
        "institution": {
            "type": "object",
            "additionalProperties": False,
            "required": ["displayName", "groups", "quota", "departments"],
            "properties": {
                "displayName": {"type": "string", "minLength": 1},
                "groups": {"description": "identity-provider groups bound to the namespace's submitter Role",
                           "type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "fairShareWeight": {"type": "number", "minimum": 0},
                "quota": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["cpu", "memory", "gpus"],
                    "properties": {
                        "cpu": {"$ref": "#/$defs/limit"},
                        "memory": {"$ref": "#/$defs/limit"},
                        "gpus": {"type": "object", "propertyNames": NAME,
                                 "additionalProperties": {"$ref": "#/$defs/limit"}},
                        "ephemeralStorage": {**QUANTITY_REF, "description": "ResourceQuota of the namespace's "
                                             "ephemeral storage (requests and limits; default 4Ti)"},
                    },
                },
                "departments": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": NAME,
                    "additionalProperties": {"$ref": "#/$defs/department"},
                },
            },
        },
        "department": {
            "type": "object",
            "additionalProperties": False,
            "required": ["storage", "datasets"],
            "properties": {
                "description": {"type": "string"},
                "storage": {"description": "prefixes the team may read and write (run storage, shards, models)",
                            "type": "array", "minItems": 1, "uniqueItems": True, "items": {"$ref": "#/$defs/prefix"}},
                "credentials": {"type": "array", "uniqueItems": True, "items": NAME},
                "datasets": {"$ref": "#/$defs/grants"},
                "serviceAccountAnnotations": {
                    **LABELS, "description": "annotations of the department's own ServiceAccount "
                                             "(<department>-biomedgpt-ray): its cloud identity, e.g. an IAM role "
                                             "that reaches only the department's storage"},
                "serving": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "the department's RayService (k8s/overlays/<team>/): servingSpec over this "
                                   "registry; an API key reaches only its own department's models",
                    "required": ["registry", "gpuType"],
                    "properties": {
                        "registry": {"type": "string", "minLength": 1,
                                     "description": "the model registry URL the RayService serves (`biomedgpt "
                                                    "registry export --registry URL`), under the department's "
                                                    "storage prefixes (its own registry) or a shared read prefix"},
                        "gpuType": NAME,
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                    },
                },
                "apiKeys": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["id", "hash"],
                        "properties": {
                            "id": KEY_ID,
                            "hash": {"type": "string",
                                     "pattern": r"^scrypt\$n=[0-9]+,r=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$"},
                            "description": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}
