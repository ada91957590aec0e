"""The README's commands work (as litgpt's tests/test_readme.py does for its README)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from biomedgpt.cli import build_parser

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


CLI = [sys.executable, "-m", "biomedgpt.cli"]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Where the launcher config puts this repository on its servers (cluster/launcher/*.yaml file_mounts).
CLUSTER_CHECKOUT = "/home/ray/biomedgpt/"


def cli_commands() -> list[tuple[str, list[str]]]:
    """(README line, arguments after `biomedgpt`) of every `biomedgpt` command in README's bash blocks:
    `.venv/bin/biomedgpt ...`, our part of a pipeline, and the command after `--` of `ray job submit`."""
    out = []
    for line in commands():
        args = shlex.split(line)
        if "|" in args:
            args = args[:args.index("|")]
        if args[0] == "ray" and "--" in args:
            args = args[args.index("--") + 1:]
        if args[0] in ("biomedgpt", ".venv/bin/biomedgpt"):
            out.append((line, args[1:]))
    return out


def command_path(args: list[str]) -> tuple[str, ...]:
    """The (sub)command words of an argument list: ("registry", "list"), ("run",) ..."""
    parser, path = build_parser(), []
    for word in args:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        path.append(word)
        parser = subs[0].choices[word]
    return tuple(path)


def readme_line(prefix: str) -> list[str]:
    """The arguments of the one README command that starts with `biomedgpt <prefix>`."""
    found = [args for line, args in cli_commands() if line.startswith("biomedgpt " + prefix)]
    assert len(found) == 1, f"README should show one `biomedgpt {prefix}` command, shows {len(found)}"
    return found[0]


_GROUPED = """
import contextlib, io, json, sys
from biomedgpt.cli import main
out = {}
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = main(argv)
        except SystemExit as stop:
            rc = stop.code
    out[" ".join(argv)] = [rc, buf.getvalue()]
print(json.dumps(out))
"""


def test_readme_commands_parse_and_their_help_shows_their_flags():
    """Every `biomedgpt` command of the README parses, and `biomedgpt <command> --help` (run like a user's,
    all in one interpreter to keep it quick) lists every flag the README gives it; `model info` runs."""
    cmds = cli_commands()
    assert len(cmds) >= 25
    paths = {}
    for line, args in cmds:
        parsed = build_parser().parse_args(args)  # a renamed flag or a removed command: SystemExit(2)
        assert parsed.command == args[0], line
        paths.setdefault(command_path(args), set()).update(a.split("=")[0] for a in args if a.startswith("-"))
    assert {("run",), ("submit",), ("shards", "build"), ("shards", "inspect"), ("score",), ("registry", "list"),
            ("model", "info"), ("serve",), ("evaluate",), ("k8s", "rayjob")} <= set(paths)
    argvs = [[*p, "--help"] for p in sorted(paths)] + [["--help"]]
    info = [args for _, args in cmds if command_path(args) == ("model", "info")]
    out = subprocess.run([*CLI[:1], "-c", _GROUPED, json.dumps(argvs + info)], capture_output=True, text=True,
                         cwd=REPO, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    for path, flags in paths.items():
        rc, text = results[" ".join([*path, "--help"])]
        assert rc == 0 and text.startswith("usage: biomedgpt " + " ".join(path)), (path, text[:200])
        for flag in flags:
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", text), f"`biomedgpt {' '.join(path)} --help` lacks {flag}"
    top = results["--help"][1]
    assert results["--help"][0] == 0 and all(re.search(rf"^    {re.escape(p[0])}\b", top, flags=re.M) for p in paths)
    for args in info:
        rc, text = results[" ".join(args)]
        assert rc == 0, args
        if "--json" in args:
            assert json.loads(text)["parameters"] == 182_238_536
        else:
            assert "33,488,336 parameters" in text


def readme_specs() -> list[tuple[str, str, Path]]:
    """(README line, command, spec file) of every spec a README command names."""
    out = []
    for line, args in cli_commands():
        path = command_path(args)
        rest = args[len(path):]
        for before, a in zip([""] + rest, rest):
            if a.endswith((".yaml", ".yml")) and not before.startswith("-"):  # not an option's value (-o out.yaml)
                local = REPO / (a[len(CLUSTER_CHECKOUT):] if a.startswith(CLUSTER_CHECKOUT) else a)
                out.append((line, " ".join(path), local))
    return out


def test_every_spec_a_readme_command_names_validates_and_is_admitted():
    """Job specs of `run`, `submit` and `k8s rayjob` load and pass admission (cluster/jobs/ specs as cluster runs,
    the others as a workstation's), serving specs of `serve` and `serve-config` load: e.g. the paper's evaluation
    (`biomedgpt run jobs/evaluate/paper.yaml`) is admitted as documented."""
    from biomedgpt.spec import load_serve_spec, load_spec
    from biomedgpt.tenancy import admit, load_tenants

    tenants = load_tenants(REPO / "cluster" / "tenants.yaml")
    specs = readme_specs()
    jobs = set()
    for line, cmd, path in specs:
        assert path.is_file(), f"README: {line}: {path} does not exist"
        if cmd in ("run", "submit", "k8s rayjob"):
            spec = load_spec(path)
            admit(spec, tenants, on_cluster=path.parent == REPO / "cluster" / "jobs")  # raises AdmissionError
            jobs.add(path.relative_to(REPO).as_posix())
        elif cmd in ("serve", "serve-config"):
            load_serve_spec(path)
        else:
            raise AssertionError(f"README: {line}: no check for a spec of `biomedgpt {cmd}`")
    assert {"jobs/demo/vqa_rad.yaml", "jobs/evaluate/paper.yaml", "jobs/evaluate/demo_export.yaml",
            "cluster/jobs/mayo-like-radiology-slake.yaml"} <= jobs
    for line in commands():  # the cluster launcher's configs (`ray up FILE`) exist
        if line.startswith(("ray up ", "ray down ")):
            assert (REPO / shlex.split(line)[2]).is_file(), line


def test_ray_job_submit_line():
    """`ray job submit` is the command tests/test_slice.py runs against a local head."""
    submit = [c for c in commands() if c.startswith("ray job submit --address http://127.0.0.1")]
    assert submit and shlex.split(submit[0])[-4:] == ["--", "biomedgpt", "run", "jobs/demo/vqa_rad.yaml"]
    assert "--working-dir ." in submit[0]


def test_readme_shards_score_and_registry_commands_run(tmp_path):
    """The README's cheap commands run as a user runs them: subprocesses in the repository root with the
    paths as written, except output locations (the shard root runs/shards, which would be written into the
    checkout, and the registry, `registry/` of the current directory by default, given as
    $BIOMEDGPT_REGISTRY, the documented variable) and the inputs of `score` (a run's predictions and references,
    generated here)."""
    shards = tmp_path / "shards"
    build = readme_line("shards build vqa_rad --source datasets_spec/samples/")
    assert "runs/shards" in build
    build = [a.replace("runs/shards", str(shards)) for a in build]
    inspect = [a.replace("runs/shards", str(shards)) for a in readme_line("shards inspect runs/shards/")]

    score = readme_line("score ")
    pred, ref = tmp_path / "pred.jsonl", tmp_path / "ref.jsonl"
    pred.write_text('{"id": "1", "prediction": "yes"}\n{"id": "2", "prediction": "right lung"}\n')
    ref.write_text('{"id": "1", "references": "yes", "answer_type": "closed"}\n'
                   '{"id": "2", "references": ["left lung"], "answer_type": "open"}\n')
    score[score.index("--predictions") + 1], score[score.index("--references") + 1] = str(pred), str(ref)

    registry = tmp_path / "registry"
    registry.mkdir()
    listing = [args for _, args in cli_commands() if command_path(args) == ("registry", "list")]
    assert listing and all("--registry" not in args for args in listing)
    env = {**ENV, "BIOMEDGPT_REGISTRY": str(registry)}

    def start(args, **kw):
        return subprocess.Popen([*CLI, *args], cwd=REPO, env=kw.get("env", ENV), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(proc):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (proc.args, err[-2000:])
        return out

    running = [start(build), start(score)] + [start(args, env=env) for args in listing]
    built, scored, *listed = (finish(p) for p in running)
    assert (shards / "vqa_rad" / "train" / "manifest.json").is_file(), built
    metrics = json.loads(scored)
    assert (metrics["accuracy"], metrics["closed_accuracy"], metrics["open_accuracy"], metrics["count"]) == (0.5, 1.0, 0.0, 2)
    for args, text in zip(listing, listed):
        assert (json.loads(text) == []) if "--json" in args else ("no models in" in text), (args, text)
    shown = finish(start(inspect))
    assert "train" in shown and "test" in shown, shown
