"""A job's session: the Ray it runs on, where its files are made, what it reports.

Shared by every job kind (training, evaluation, serving, the demo), so that none of them imports
another's driver:

    started = ensure_ray()          # the cluster in RAY_ADDRESS, or a local Ray on 127.0.0.1
    local = staging_dir(spec)       # where a run on object storage makes its files before uploading
    say("training: ...")            # one progress line
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .console import VERBOSE_ENV, cluster_messages_to_logs, say, verbose

# Ports Ray components take by default; an ephemeral port handed to Ray must not be one of them.
RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8265, 10001, 44217, 44227, 52365, 52366, 62365})


@dataclass
class RunResult:
    """What `biomedgpt run` reports: the run directory (a URL on object storage), the latest checkpoint,
    the exported model and the metrics of training and evaluation."""

    run_dir: str
    checkpoint: str | None = None
    export_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no Ray component claims by default."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


#: Ray Train switches for a Ray this process starts on one machine (ensure_ray); a cluster keeps its own.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to the cluster in RAY_ADDRESS (as under `ray job submit`) or start a fresh local Ray on
    127.0.0.1 with its dashboard (Ray Train needs it). Returns True when this call started Ray.

    Without RAY_ADDRESS, Ray's own default would follow the pointer file of the last `ray start`
    (`<tmp>/ray/ray_current_cluster`), which outlives a head that died or was killed: every later run
    would then fail at once ("When connecting to an existing cluster, num_cpus and num_gpus must not
    be provided"). `address="local"` ignores that file: a local run always starts its own Ray."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: set first
    import ray  # heavy (~2 s), and the variable above must be set before it is imported

    cluster_messages_to_logs()  # what the cluster pushes to this driver goes to the run's logs/ with the rest
    if ray.is_initialized():
        return False
    # The workers' own output reaches this terminal only with --verbose; the platform's progress comes
    # through train/progress.py, and each worker's log stays in the run's logs/ and Ray's session logs.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=verbose(), configure_logging=False)
        return True
    port = free_port()
    # Train workers ask the dashboard's state API whether the controller lives (FIELD_NOTES): they get
    # its address through the runtime env only, so nothing started later by this process inherits it.
    env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # One machine, nothing to drain and no metrics scraper: Ray Train's preemption watcher (an actor
    # polling node drains) and its Prometheus metrics callbacks would only take CPU from the run.
    env_vars.update(LOCAL_RAY_TRAIN_ENV)
    for name, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # the metrics switch is read by the trainer in this process
    if verbose():
        env_vars[VERBOSE_ENV] = "1"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": env_vars}, log_to_driver=verbose(), configure_logging=False)
    return True


# A Ray log file bigger than this is named in logs/ray/README.txt instead of copied.
KEEP_RAY_LOG_MAX_BYTES = 20 * 2**20


def keep_ray_logs(dest: str | os.PathLike[str]) -> Path | None:
    """Copy the local Ray session's logs (every worker's and actor's output, Serve's and Ray Data's
    logs) into `dest/ray/` before Ray is shut down, so a run keeps them beside its own; a file over
    KEEP_RAY_LOG_MAX_BYTES is listed in `dest/ray/README.txt` with its path instead. None when this
    process has no local Ray session."""
    import ray

    try:
        node = ray._private.worker._global_node  # Ray keeps no public handle on its session folder
        src = Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:
        src = None
    if src is None or not src.is_dir():
        return None
    out = Path(dest) / "ray"
    left_out: list[str] = []
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        target = out / path.relative_to(src)
        try:
            if path.stat().st_size > KEEP_RAY_LOG_MAX_BYTES:
                left_out.append(f"{path} ({path.stat().st_size} bytes)")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        except OSError as err:  # a file Ray is still writing or has just rotated
            left_out.append(f"{path} ({err.strerror or err})")
    if left_out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "README.txt").write_text("Ray's session logs not copied here (too big, or unreadable):\n"
                                        + "\n".join(left_out) + "\n")
    return out


def submitted_job() -> str | None:
    """The submission id when this process is the driver of a job submitted through Ray's job API
    (`ray job submit`, `biomedgpt submit`): Ray's job supervisor gives the driver its job config
    (RAY_JOB_CONFIG_JSON_ENV_VAR) and runs it in the working dir it unpacked under the session's
    `runtime_resources/`. None for a local run."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            job = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        except (ValueError, AttributeError):
            job = None
        if job:
            return str(job)
    if "runtime_resources" in Path.cwd().parts:
        return "?"
    return None


def localize(spec: Any) -> Any:
    """The spec with its relative paths made absolute once, here on the driver, so that every process of
    the job opens the same files (spec.resolve_paths); says which base it took. Under Ray's job API the
    base is the unpacked working dir, and what the job writes goes under $BIOMEDGPT_OUTPUT_ROOT (default
    ~/biomedgpt-runs), which outlives the job."""
    from .spec import OUTPUT_ROOT_ENV, output_root, resolve_paths

    job = submitted_job()
    base = Path.cwd()
    resolved, info = resolve_paths(spec, base, outputs=output_root() if job else None)
    if job is None:
        say(f"paths: relative paths of {spec.source} resolve against {base} (the current directory of "
            f"`biomedgpt run`); run directory {resolved.run_dir}")
    else:
        say(f"paths: relative paths of {spec.source} resolve against {base} (the working dir Ray unpacked for "
            f"job {job}); what the job writes at a relative path goes under {info.outputs} (${OUTPUT_ROOT_ENV}, "
            f"default ~/biomedgpt-runs; Ray deletes the working dir with its session); run directory "
            f"{resolved.run_dir}")
    return resolved


def staging_dir(spec: Any) -> Path:
    """The local folder where a run on object storage makes its files before uploading them
    ($BIOMEDGPT_STAGING, default <tmp>/biomedgpt-staging/<team>/<name>-<hash of the run's URL>): two runs
    of one team and name with other outputs (two buckets, two prefixes) never share it."""
    base = Path(os.environ.get("BIOMEDGPT_STAGING") or Path(tempfile.gettempdir()) / "biomedgpt-staging")
    key = hashlib.sha256(str(spec.run_dir).encode()).hexdigest()[:12]
    return base / spec.team / f"{spec.name}-{key}"
