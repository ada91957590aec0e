"""`biomedgpt submit SPEC --address URL`: `ray job submit --working-dir . -- biomedgpt run SPEC`, with
the spec validated first, a job id naming the team and run, token auth when the cluster uses it,
and the job's log followed until it ends (exit code 0 only when the job succeeded)."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .spec import load_spec
from .tenancy import admit, load_tenants

# Variables forwarded to the job: where object storage is (credentials come from the cluster's own
# identity, not from the submitting laptop) and the local-Ray switch of single-machine clusters.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def _git_ignored(path: Path, repo: Path) -> bool:
    """Whether git ignores `path` (Ray leaves git-ignored files out of the uploaded working dir)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def job_id_for(team: str, name: str) -> str:
    return f"{team}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def submit(spec_path: str, address: str, working_dir: str = ".", follow: bool = True) -> int:
    """Submit the job; with `follow`, print its log until it ends and return 0 if it succeeded."""
    spec = load_spec(spec_path)  # refused here, before anything touches the cluster
    if spec.kind == "serve":
        raise ValueError(f"{spec_path}: a serving spec is deployed with `biomedgpt serve-config` + `serve deploy` "
                         "(or a RayService), not submitted as a job")
    admit(spec, load_tenants())  # the job admits itself again where it runs (BIOMEDGPT_ON_CLUSTER)
    wd = Path(working_dir).resolve()
    path = Path(spec_path).resolve()
    try:
        entry_spec = str(path.relative_to(wd))
        if _git_ignored(path, wd):
            raise ValueError(f"{spec_path}: ignored by .gitignore, so Ray would not upload it with the working dir; "
                             "keep job specs in a tracked folder such as jobs/")
    except ValueError as err:
        if "gitignore" in str(err):
            raise  # outside the uploaded folder: only valid where the path exists on the cluster
        entry_spec = str(path)
        print(f"[submit] note: {spec_path} is outside the working dir {wd}; the cluster must see it at {path}",
              file=sys.stderr)
    token_file = Path.home() / ".ray" / "auth_token"
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    # ray: heavy (~2 s), and it reads RAY_AUTH_MODE (set just above) when imported
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = job_id_for(spec.team, spec.name)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    for attempt in range(6):
        try:
            client.submit_job(
                entrypoint=f"biomedgpt run {shlex.quote(entry_spec)}", submission_id=job_id,
                runtime_env={"working_dir": str(wd), "env_vars": env},
                metadata={"team": spec.team, "run": spec.name, "kind": spec.kind},
            )
            break
        except RuntimeError as err:  # a head that just started may have no job agent yet
            if "No available agent" not in str(err) or attempt == 5:
                raise
            print("[submit] the cluster's job agent is not up yet; retrying in 5 s", file=sys.stderr, flush=True)
            time.sleep(5)
    print(f"[submit] job {job_id} submitted to {address} (team {spec.team}, run {spec.name})", flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"[submit] job {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
