"""The README's commands work (as litgpt's tests/test_readme.py does for its README)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    lines = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def test_the_two_commands_and_ci():
    cmds = commands()
    assert cmds[:2] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must run the README's test command"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: install$", makefile, flags=re.M)
    assert re.search(r"^demo: install\n\t\$\(VENV\)/bin/biomedgpt demo$", makefile, flags=re.M)
    assert "torch==$(TORCH_VERSION)" in makefile and "TORCH_VERSION := 2.13.0" in makefile


def test_model_info_commands_in_readme_run():
    info = [c for c in commands() if c.startswith(".venv/bin/biomedgpt model info")]
    assert info, "README shows no model info command"
    for cmd in info:
        args = shlex.split(cmd)[1:]
        out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", *args], capture_output=True, text=True, check=True)
        if "--json" in args:
            assert json.loads(out.stdout)["parameters"] == 182_238_536
        else:
            assert "33,488,336 parameters" in out.stdout


def test_readme_parameter_table_matches_model_info(capsys):
    from biomedgpt.cli import main

    rows = re.findall(r"^\| (small|medium|base|large|xlarge) \|.*\| ([\d,]+) \|$", README, flags=re.M)
    assert len(rows) == 5
    for size, count in rows:
        assert main(["model", "info", size, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["parameters"] == int(count.replace(",", "")), size


def test_convert_commands_parse():
    conv = [shlex.split(c)[1:] for c in commands() if c.startswith(".venv/bin/biomedgpt convert")]
    assert len(conv) >= 3
    from biomedgpt.cli import build_parser

    for args in conv:
        parsed = build_parser().parse_args(args)
        assert parsed.command == "convert" and parsed.dst


def test_python_example_runs():
    (block,) = code_blocks("python")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.Size([1, 2, 59457])" in out.stdout


def test_job_commands_in_readme(tmp_path):
    """The README's job commands: the spec validates, the shard commands run, the others parse;
    `ray job submit` is the command tests/test_slice.py runs against a local head."""
    from biomedgpt.cli import build_parser
    from biomedgpt.spec import load_spec

    cmds = [c for c in commands() if c.startswith(("biomedgpt ", "ray "))]
    run = [c for c in cmds if c.startswith("biomedgpt run ")]
    assert run and all(load_spec(REPO / shlex.split(c)[2]) for c in run)
    submit = [c for c in cmds if c.startswith("ray job submit")]
    assert submit and shlex.split(submit[0])[-4:] == ["--", "biomedgpt", "run", "jobs/demo/vqa_rad.yaml"]
    assert "--working-dir ." in submit[0]
    for cmd in cmds:
        args = shlex.split(cmd)
        if args[:2] == ["biomedgpt", "shards"] and "runs/shards" in cmd:  # the Jobs section's local examples
            args = [a.replace("runs/shards", str(tmp_path / "shards")) for a in args]
            out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", *args[1:]], capture_output=True, text=True,
                                 cwd=REPO, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
        elif args[0] == "biomedgpt":
            if "|" in args:  # a pipeline (biomedgpt k8s rayjob ... | kubectl apply -f -): parse our part
                args = args[:args.index("|")]
            parsed = build_parser().parse_args(args[1:])
            assert parsed.command == args[1]
    assert (tmp_path / "shards" / "vqa_rad" / "train" / "manifest.json").is_file()
