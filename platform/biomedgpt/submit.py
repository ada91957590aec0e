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

from .audit import audited_admit
from .spec import OUTPUT_ROOT_ENV, load_spec
from .tenancy import ADMISSION_ENV, load_tenants

# A head that just started may have no job agent yet: retry that many times, that many seconds apart.
AGENT_RETRIES, AGENT_RETRY_S = 5, 5.0

# Variables forwarded to the job: where object storage is (credentials come from the cluster's own
# identity, not from the submitting laptop) and the local-Ray switch of single-machine clusters.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                 "BIOMEDGPT_VERBOSE")
# Variables that change what admission decides where the job runs: the policy file, whether local paths are
# judged as the cluster's, and where a submitted job's relative paths land. The cluster's own values rule
# there; a submission made while one of them is set is refused rather than admitted here under another policy.
NEVER_FORWARDED_ENV = (*ADMISSION_ENV, OUTPUT_ROOT_ENV)


class ForwardingRefused(ValueError):
    """`biomedgpt submit` was run with a variable set that would change the job's admission."""


def refuse_admission_env(env: dict[str, str] | None = None) -> None:
    """ForwardingRefused naming each variable of NEVER_FORWARDED_ENV that is set (non-empty)."""
    env = os.environ if env is None else env
    found = [k for k in NEVER_FORWARDED_ENV if env.get(k, "").strip()]
    if found:
        raise ForwardingRefused(
            f"{', '.join(found)} set: submit does not forward variables that change admission "
            f"({', '.join(NEVER_FORWARDED_ENV)}); the job is admitted where it runs by the cluster's own policy and "
            f"settings, so admitting it here under others would say nothing. Unset {' and '.join(found)} and submit again")


def _git_ignored(path: Path, repo: Path) -> bool:
    """Whether git ignores `path` (Ray leaves git-ignored files out of the uploaded working dir)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


class ClusterUnavailable(Exception):
    """The cluster's job API cannot take the job now (nothing listens, no job agent, auth refused):
    one line naming the address and what to do; `biomedgpt submit` exits 3 with it."""


def _unavailable(address: str, err: BaseException) -> ClusterUnavailable:
    """Ray's error of a failed job API call, in one line that says what to do."""
    text = str(err)
    if "No available agent" in text:
        return ClusterUnavailable(
            f"the Ray cluster at {address} has no job agent ready (the head may still be starting, or its "
            "dashboard agent died): wait a minute and submit again; `ray status` and the head's "
            "dashboard_agent.log say more")
    if "401" in text or "Unauthorized" in text or "token" in text.lower():
        return ClusterUnavailable(
            f"the Ray cluster at {address} refused the request ({text.splitlines()[0][:120]}): it uses token "
            "auth: export RAY_AUTH_MODE=token with the head's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    return ClusterUnavailable(
        f"cannot reach the Ray job API at {address} ({text.splitlines()[0][:160] if text else type(err).__name__}): "
        "start the head (`ray start --head --dashboard-host=127.0.0.1`) or give --address the dashboard's URL "
        "(http://HOST:8265 by default)")


def job_id_for(team: str, name: str) -> str:
    return f"{team}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def submit(spec_path: str, address: str, working_dir: str = ".", follow: bool = True) -> int:
    """Submit the job; with `follow`, print its log until it ends and return 0 if it succeeded."""
    refuse_admission_env()  # before anything else: the admission below must be the one the cluster makes
    spec = load_spec(spec_path)  # refused here, before anything touches the cluster
    if spec.kind == "serve":
        raise ValueError(f"{spec_path}: a serving spec is deployed with `biomedgpt serve-config` + `serve deploy` "
                         "(or a RayService), not submitted as a job")
    audited_admit("submit", spec, load_tenants())  # the job admits itself again where it runs (BIOMEDGPT_ON_CLUSTER)
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

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as err:  # nothing listens there, or it is not a Ray job API
        raise _unavailable(address, err) from None
    job_id = job_id_for(spec.team, spec.name)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    for attempt in range(AGENT_RETRIES + 1):
        try:
            client.submit_job(
                entrypoint=f"biomedgpt run {shlex.quote(entry_spec)}", submission_id=job_id,
                runtime_env={"working_dir": str(wd), "env_vars": env},
                metadata={"team": spec.team, "run": spec.name, "kind": spec.kind},
            )
            break
        except (ConnectionError, RuntimeError) as err:  # a head that just started may have no job agent yet
            if "No available agent" not in str(err) or attempt == AGENT_RETRIES:
                raise _unavailable(address, err) from None
            print(f"[submit] the cluster's job agent is not up yet; retrying in {AGENT_RETRY_S:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(AGENT_RETRY_S)
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
