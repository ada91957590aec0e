"""The Ray Serve application builder the RayService manifests name (`import_path` in serveConfigV2).

    applications:
      - import_path: biomedgpt.cluster.serve_entry:app_builder
        args: {model: s3://bucket/.../export/, team: stanford-like-radiology}

`model` is an exported model directory (`biomedgpt export`, a run's `export/`) as a URL or local path;
a remote one is copied to the node's disk first (once per URL). `team` names the department whose
API keys (cluster/tenants.yaml) the serving layer checks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "BIOMEDGPT_MODEL_CACHE"


def local_model_dir(model: str) -> Path:
    """A local copy of a model directory URL (the path itself when it is local)."""
    from ..data import storage

    if storage.is_local(model):
        return storage.local_path(model)
    cache = Path(os.environ.get(CACHE_ENV, Path(tempfile.gettempdir()) / "biomedgpt-models"))
    target = cache / hashlib.sha256(model.encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        fs, path = storage.filesystem(model)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
        partial.rename(target)
    return target


def app_builder(args: dict[str, Any]):
    """Serve's application builder: args `model` (required) and `team`."""
    from ..serve.app import build_app

    if not isinstance(args, dict) or not args.get("model"):
        raise ValueError("serveConfigV2 args: `model` (an exported model directory URL) is required")
    return build_app(str(local_model_dir(str(args["model"]))), team=args.get("team"))
