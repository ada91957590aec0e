"""The run report: curves as PNG and the final metrics from the CSV log."""

from __future__ import annotations

import json

from biomedgpt.train.report import read_metrics, write_report


def test_report_from_a_lightning_csv_log(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = ["epoch,step,train/grad_norm,train/loss,train/lr,train/samples_per_s"]
    for step in range(0, 40):
        rows.append(f"0,{step},1.0,{5.0 - step * 0.1:.3f},{1e-3 * (1 - step / 40):.6f},"
                    + ("" if step % 10 else "30.5"))
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    series = read_metrics(logs / "metrics.csv")
    assert series["train/loss"][0] == (1, 5.0) and len(series["train/samples_per_s"]) == 4
    final = write_report(tmp_path, extra={"seconds": 12.5})
    assert final["steps"] == 40 and final["first_loss"] == 5.0 and abs(final["train/loss"] - 1.1) < 1e-9
    for png in ("loss.png", "lr.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["seconds"] == 12.5
    assert "![training loss](loss.png)" in (tmp_path / "report.md").read_text()


def test_resumed_runs_keep_the_logs_of_every_attempt(tmp_path):
    from biomedgpt.train.report import keep_earlier_attempt, read_run_metrics

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text("step,train/loss\n4,3.0\n9,2.0\n14,1.5\n")
    keep_earlier_attempt(logs)  # a resume from the checkpoint of step 10 replays step 15
    assert not (logs / "metrics.csv").exists() and (logs / "metrics.attempt-1.csv").is_file()
    (logs / "metrics.csv").write_text("step,train/loss\n14,1.4\n19,1.0\n")
    keep_earlier_attempt(logs)
    (logs / "metrics.csv").write_text("step,train/loss\n24,0.5\n")
    assert read_run_metrics(logs)["train/loss"] == [(5, 3.0), (10, 2.0), (15, 1.4), (20, 1.0), (25, 0.5)]
    assert write_report(tmp_path)["steps"] == 25
