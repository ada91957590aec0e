"""The README's section "Running on a cluster": its commands are the ones we built, with files and
names that exist (as tests/test_readme.py does for the rest of the README)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cluster_testing import cluster_parser

from biomedgpt.cluster.validate import load_documents

REPO = Path(__file__).resolve().parents[2]
_TEXT = (REPO / "README.md").read_text()
README = _TEXT[_TEXT.index("## Running on a cluster"):]
README = README[:README.index("\n## ", 1)]


def commands() -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        out += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


def test_readme_walks_from_render_to_a_served_model():
    cmds = commands()
    order = ["biomedgpt cluster render", "biomedgpt cluster validate", "docker build", "kubectl apply -k k8s/",
             "biomedgpt k8s rayjob", "kubectl apply -k k8s/overlays/", "ray up"]
    positions = [next(i for i, c in enumerate(cmds) if c.startswith(o)) for o in order]
    assert positions == sorted(positions)
    teams = {shlex.split(c)[3].split("/")[-1].split("-")[0] for c in cmds if c.startswith("biomedgpt k8s rayjob")}
    assert len(teams) >= 2, "two institutions submit"


def test_biomedgpt_commands_parse():
    from biomedgpt.cli import build_parser

    main = build_parser()
    for cmd in commands():
        if not cmd.startswith("biomedgpt "):
            continue
        argv = shlex.split(cmd.split("|")[0])[1:]
        parser = cluster_parser() if argv[0] in ("cluster", "k8s") else main
        args = parser.parse_args(argv)
        assert callable(args.func), cmd


@pytest.mark.parametrize("cmd", [c for c in commands() if c.startswith("biomedgpt k8s rayjob")])
def test_rayjob_pipelines_run(cmd, capsys, validator, tenants, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the checkout
    assert cmd.endswith("| kubectl apply -f -")
    argv = shlex.split(cmd.split("|")[0])[1:]
    args = cluster_parser().parse_args(argv)
    assert args.func(args) == 0
    docs = load_documents(capsys.readouterr().out)
    assert validator.validate(docs, cmd) == []
    rayjob = docs[1]
    # the names the README then uses to follow the job
    ns, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
    assert f"kubectl -n {ns} get rayjob {name}" in README


def test_files_and_images_the_readme_names_exist(tenants, builds):
    cmds = commands()
    for cmd in cmds:
        words = shlex.split(cmd.split("|")[0])
        if words[:2] == ["kubectl", "apply"] and words[2] == "-k":
            assert (REPO / words[3] / "kustomization.yaml").is_file(), cmd
        if words[:2] in (["ray", "up"], ["ray", "down"]):
            assert (REPO / words[2]).is_file(), cmd
        if words[:2] == ["docker", "build"]:
            assert (REPO / words[words.index("-f") + 1]).is_file()
            assert words[words.index("-t") + 1] == tenants.image
        if words[:2] == ["docker", "push"]:
            assert words[2] == tenants.image
        if words[:3] == ["ray", "job", "submit"]:
            spec = words[words.index("run") + 1]
            assert spec.startswith("/home/ray/biomedgpt/") and (REPO / spec.removeprefix("/home/ray/biomedgpt/")).is_file()
    # the served model's RayService and its Serve service, as the overlay builds them
    service = next(o for o in builds[REPO / "k8s" / "overlays" / "stanford-like-radiology"] if o["kind"] == "RayService")
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    assert f"kubectl -n {ns} get rayservice {name}" in README
    assert f"svc/{name}-serve-svc" in README
