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
    with Progress(50, "evaluate", unit="sample", stream=out, after_s=0) as bar:
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
    view._bar = Progress(100, "train", unit="step", stream=out, every=10 ** 12, after_s=0)
    for s in range(1, 101):
        view.show({"kind": "step", "step": s, "max_steps": 100, "loss": 1.0})
    view.show({"kind": "warning", "text": "skipped bad data: shard-0003"})
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("[train] step ")]
    assert [int(line.split()[2].split("/")[0]) for line in steps] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert "ETA" in steps[5]
    assert lines[-1] == "[train] warning: skipped bad data: shard-0003"


def test_progress_of_unknown_size_prints_by_time_not_by_count(monkeypatch):
    """Planning reads sources of unknown size (183M sentences for pretraining): a line every interval,
    never one per hundred records."""
    clock = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with Progress(None, "plan pubmed/train", unit="record", stream=out, interval_s=30) as bar:
        for _ in range(100_000):
            bar.update(1)
            clock[0] += 0.001  # 1000 records/s: 100 s in all
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    quick = io.StringIO()
    with Progress(69, "write vqa_rad/test", unit="sample", stream=quick) as bar:  # done in well under 2 s
        bar.update(69)
    assert quick.getvalue() == ""
    counts = [int(line.split("plan pubmed/train: ")[1].split()[0]) for line in lines]
    assert [round(c, -3) for c in counts] == [30000, 60000, 90000], lines
    assert "records/s" in lines[0] and "ETA" not in lines[0]


def test_progress_postfix_goes_beside_the_bar_or_on_each_line():
    out = io.StringIO()
    bar = Progress(10, "train", unit="step", stream=out, after_s=0)
    assert not bar.interactive  # a StringIO is no terminal
    bar.postfix("loss 2.3456")
    bar.moveto(10)
    assert out.getvalue().rstrip().endswith("loss 2.3456")


def test_serves_own_terminal_handler_is_rerouted(tmp_path, clean_loggers):
    """Ray Serve gives `ray.serve` its own terminal handler when it is imported, after the run chose its
    log file: `reroute` (called by serve.app before Serve starts) sends its records back to the file."""
    log = libraries_to_file(tmp_path / "driver.log")
    terminal = io.StringIO()
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(logging.StreamHandler(terminal))  # what `import ray.serve` does
    serve_logger.setLevel(logging.INFO)
    assert console.reroute() == log
    serve_logger.info("Started Serve in namespace 'serve'.")
    for h in serve_logger.handlers:
        h.flush()
    assert terminal.getvalue() == ""
    assert "Started Serve in namespace" in log.read_text()


def test_transformers_export_bar_is_off(monkeypatch, clean_loggers):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    import transformers.utils.logging as hf_logging

    quiet_warnings()
    assert not hf_logging.is_progress_bar_enabled()
    import huggingface_hub

    huggingface_hub.utils.enable_progress_bars()
    hf_logging.enable_progress_bar()


def test_what_the_cluster_pushes_to_the_driver_goes_to_the_log_file(tmp_path, clean_loggers, capfd, monkeypatch):
    """Ray's driver prints what the raylet pushes to it ("(raylet) Task ServeController.graceful_shutdown
    failed ..." whenever Serve shuts down) from its own thread, past the logging handlers: once a log file is
    chosen it goes there; under --verbose, and for the workers' own output, it stays on the terminal."""
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # undone after the test
    monkeypatch.setattr(console, "_LOG_FILE", None)
    console.cluster_messages_to_logs()
    # the thread that prints the messages looks the printer up in its module when it prints
    assert ray_worker.listen_error_messages.__globals__["print_to_stdstream"] is ray_worker.print_to_stdstream
    notice = "Task ServeController.graceful_shutdown failed. There are infinite retries remaining"
    message = {"lines": [notice], "pid": "raylet", "is_err": False}
    ray_worker.print_to_stdstream(message, ignore_prefix=False)
    assert notice in capfd.readouterr().out  # no log file chosen: the terminal, as before
    log = libraries_to_file(tmp_path / "driver.log")
    ray_worker.print_to_stdstream(dict(message, lines=[notice + " (2)"]), ignore_prefix=False)
    assert capfd.readouterr().out == ""
    assert notice + " (2)" in log.read_text()
    ray_worker.print_to_stdstream({"lines": ["a worker's print"], "pid": 1234, "is_err": False,
                                   "ip": "127.0.0.1", "task_name": "t", "actor_name": ""}, ignore_prefix=True)
    assert "a worker's print" in capfd.readouterr().out
    set_verbose(True)
    other = "Node 7f3a was marked dead"  # Ray's deduplicator would hold back a line like the first
    ray_worker.print_to_stdstream(dict(message, lines=[other]), ignore_prefix=False)
    assert other in capfd.readouterr().out
