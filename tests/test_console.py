"""The console is for people: libraries' logs go to a file unless --verbose, progress is a bar or a
line per tenth, the platform's own warnings are silenced (biomedgpt.console, train/progress.py)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from biomedgpt import console
from biomedgpt.console import Progress, libraries_to_file, quiet_warnings, set_verbose, verbose


@pytest.fixture
def clean_loggers(monkeypatch):
    """Leave the library loggers and the verbose switch as they were."""
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
             for name in console.LIBRARY_LOGGERS}
    yield
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.propagate = propagate
    logging.captureWarnings(False)


def test_library_logs_go_to_the_file_not_the_terminal(tmp_path, clean_loggers):
    terminal = io.StringIO()
    ray_train = logging.getLogger("ray.train")
    ray_train.addHandler(logging.StreamHandler(terminal))
    ray_train.setLevel(logging.INFO)
    log = libraries_to_file(tmp_path / "logs" / "driver.log")
    assert log == tmp_path / "logs" / "driver.log"
    ray_train.info("Reporting training result 3: TrainingReport(...)")
    logging.getLogger("lightning.pytorch").warning("GPU available: False")
    for h in ray_train.handlers:
        h.flush()
    text = log.read_text()
    assert "Reporting training result 3" in text and "GPU available: False" in text
    assert terminal.getvalue() == ""
    # routing twice (a retry, the demo's second phase) keeps one file handler per logger
    libraries_to_file(tmp_path / "logs" / "again.log")
    assert sum(isinstance(h, logging.FileHandler) for h in ray_train.handlers) == 1


def test_verbose_keeps_the_libraries_on_the_terminal(tmp_path, clean_loggers):
    set_verbose(True)
    assert verbose()
    assert libraries_to_file(tmp_path / "driver.log") is None
    assert not (tmp_path / "driver.log").exists()
    set_verbose(False)
    assert not verbose()


def test_verbose_flag_before_or_after_the_command(monkeypatch, capsys, clean_loggers):
    from biomedgpt.cli import main

    assert main(["model", "info", "demo", "--verbose"]) == 0
    assert verbose()
    set_verbose(False)
    assert main(["-v", "model", "info", "demo"]) == 0
    assert verbose()
    set_verbose(False)
    assert main(["model", "info", "demo"]) == 0
    assert not verbose()
    assert "BiomedGPT-demo" in capsys.readouterr().out


def test_the_platforms_own_warnings_are_silenced(clean_loggers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", UserWarning)
        warnings.warn("something about the user's data", UserWarning)
    assert [str(w.message) for w in caught] == ["something about the user's data"]


def test_progress_without_a_terminal_prints_a_line_per_tenth():
    out = io.StringIO()
    with Progress(50, "evaluate", unit="sample", stream=out) as bar:
        for _ in range(25):
            bar.update(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith("[biomedgpt] evaluate: 6/50 samples") and "ETA" in lines[0]
    assert lines[-1].startswith("[biomedgpt] evaluate: 50/50 samples") and "ETA" not in lines[-1]


def test_training_progress_lines():
    from biomedgpt.train.progress import ProgressView, format_line

    step = {"kind": "step", "step": 40, "max_steps": 60, "loss": 6.56751, "lr": 3.68e-4, "samples_per_s": 9.2}
    assert format_line(step) == "[train] step 40/60  loss 6.5675  lr 3.68e-04  samples/s 9.2"
    assert format_line({"kind": "resume", "path": "/r/checkpoint-00000010"}) == "[train] resuming from /r/checkpoint-00000010"
    assert format_line({"kind": "fault", "text": "x at step 2"}) == "[fault] x at step 2"
    # the driver's view without a terminal: a step line per tenth of the steps and the last, with the ETA
    view = ProgressView(100)
    out = io.StringIO()
    view._bar = Progress(100, "train", unit="step", stream=out, every=10 ** 12)
    for s in range(1, 101):
        view.show({"kind": "step", "step": s, "max_steps": 100, "loss": 1.0})
    view.show({"kind": "warning", "text": "skipped bad data: shard-0003"})
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("[train] step ")]
    assert [int(line.split()[2].split("/")[0]) for line in steps] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert "ETA" in steps[5]
    assert lines[-1] == "[train] warning: skipped bad data: shard-0003"
