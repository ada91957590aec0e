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


def test_install_and_test_commands_are_what_ci_runs():
    cmds = commands()
    assert cmds[:2] == ["make install", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must run the README's test command"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: install$", makefile, flags=re.M)
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
