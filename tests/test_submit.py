"""`biomedgpt submit` against a cluster that cannot take the job: one clear line, exit 3, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = "jobs/demo/vqa_rad.yaml"


def cli_env() -> dict[str, str]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    return env


def test_submit_to_an_address_where_nothing_listens(tmp_path):
    from biomedgpt.session import free_port

    address = f"http://127.0.0.1:{free_port()}"  # free: nothing listens there
    proc = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "submit", DEMO, "--address", address],
                          capture_output=True, text=True, timeout=180, env=cli_env(), cwd=REPO)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("biomedgpt submit: error:")]
    assert len(lines) == 1, proc.stderr
    assert f"cannot reach the Ray job API at {address}" in lines[0] and "ray start --head" in lines[0]


class _NoAgentClient:
    """A job API whose head is up but has no job agent yet (Ray's HTTP 500 of that case)."""

    calls = 0

    def __init__(self, address: str, *args, **kwargs) -> None:
        self.address = address

    def submit_job(self, **kwargs):
        type(self).calls += 1
        raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                           "please try again later..")


def test_submit_to_a_head_without_a_job_agent_retries_then_says_so(monkeypatch, capsys):
    import ray.job_submission

    from biomedgpt import submit as submit_mod
    from biomedgpt.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _NoAgentClient)
    monkeypatch.setattr(submit_mod, "AGENT_RETRY_S", 0.0)
    _NoAgentClient.calls = 0
    assert main(["submit", DEMO, "--address", "http://127.0.0.1:8265"]) == 3
    err = capsys.readouterr().err
    assert _NoAgentClient.calls == submit_mod.AGENT_RETRIES + 1
    final = [ln for ln in err.splitlines() if ln.startswith("biomedgpt submit: error:")]
    assert len(final) == 1 and "the Ray cluster at http://127.0.0.1:8265 has no job agent ready" in final[0]
    assert "submit again" in final[0] and "Traceback" not in err


@pytest.mark.parametrize("message", ["Request failed with status code 401: Unauthorized."])
def test_submit_refused_by_token_auth_says_how_to_authenticate(monkeypatch, capsys, message):
    import ray.job_submission

    from biomedgpt.cli import main

    class Refusing(_NoAgentClient):
        def submit_job(self, **kwargs):
            raise RuntimeError(message)

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Refusing)
    assert main(["submit", DEMO, "--address", "http://127.0.0.1:8265"]) == 3
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=token" in err and "Traceback" not in err
