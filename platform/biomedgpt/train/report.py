"""The run report: loss and learning-rate curves as PNG and the final metrics, from the run's
`logs/metrics.csv` (Lightning's CSV logger), written into the run folder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a Lightning CSV log (rows hold a subset of the columns)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0)) + 1  # Lightning logs the 0-based step of the batch
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v):
                    series.setdefault(key, []).append((step, v))
    return series


def attempt_logs(log_dir: Path) -> list[Path]:
    """The CSV logs of a run, oldest first: one `metrics.attempt-N.csv` per earlier attempt (kept when
    a run is resumed or retried), then the current `metrics.csv`."""
    def number(p: Path) -> int:
        return int(p.name.split("-")[-1].split(".")[0])

    earlier = sorted(log_dir.glob("metrics.attempt-*.csv"), key=number)
    current = log_dir / "metrics.csv"
    return earlier + ([current] if current.is_file() else [])


def read_run_metrics(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The metrics of every attempt of a run, by step; a later attempt's value of a step (replayed
    after a resume from an earlier checkpoint) replaces the earlier one."""
    merged: dict[str, dict[int, float]] = {}
    for path in attempt_logs(log_dir):
        for key, points in read_metrics(path).items():
            merged.setdefault(key, {}).update(points)
    return {k: sorted(v.items()) for k, v in merged.items()}


def keep_earlier_attempt(log_dir: Path) -> None:
    """Move an existing `metrics.csv` aside as the next `metrics.attempt-N.csv` (Lightning's CSV logger
    deletes the file it finds when a resumed or retried run starts logging again)."""
    current = log_dir / "metrics.csv"
    if current.is_file():
        n = len(attempt_logs(log_dir))
        current.rename(log_dir / f"metrics.attempt-{n}.csv")


def _plot(points: list[tuple[int, float]], title: str, ylabel: str, out: Path, log_y: bool = False) -> None:
    # matplotlib: heavy (~1 s), needed only once the run's curves are drawn; the Agg backend (no display)
    # must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs, ys = zip(*points)
    ax.plot(xs, ys, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def data_errors_section(path: Path, max_shards: int = 20) -> list[str]:
    """The report's "Bad data" section from the training streams' `data_errors.json` (ray_trainer's
    DataPosition writes it): samples skipped, by dataset and by shard, with example keys."""
    lines = ["", "## Bad data", ""]
    if not path.is_file():
        return lines + ["No data error report (data_errors.json) in this run."]
    errors = json.loads(path.read_text())
    total = int(errors.get("bad_samples", 0))
    if not total:
        return lines + ["No bad samples: every training sample read was decoded and used."]
    lines += [f"{total} bad sample(s) skipped (undecodable, missing fields, or lost in unreadable shards); "
              "by dataset: " + ", ".join(f"{k} {v}" for k, v in errors.get("by_dataset", {}).items()) + ".", "",
              "| dataset | shard | skipped | reasons | example |", "|---|---|---|---|---|"]
    shards = sorted(errors.get("shards", []), key=lambda s: -int(s["count"]))
    for s in shards[:max_shards]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.get("reasons", {}).items()))
        example = (s.get("examples") or [""])[0].replace("|", "\\|")
        lines.append(f"| {s['dataset']} | {s['shard']} | {s['count']} | {reasons} | {example[:200]} |")
    if len(shards) > max_shards:
        lines.append(f"| ... | {len(shards) - max_shards} more shard(s) in logs/data_errors.json | | | |")
    return lines


def write_report(run_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write loss.png, lr.png and report.json/report.md into `run_dir`; returns the final metrics."""
    run = Path(run_dir)
    series = read_run_metrics(run / "logs")
    final = {k: v[-1][1] for k, v in series.items()}
    final["steps"] = max((pts[-1][0] for pts in series.values()), default=0)
    if "train/loss" in series:
        _plot(series["train/loss"], f"{run.name}: training loss", "loss", run / "loss.png")
        final["first_loss"] = series["train/loss"][0][1]
    if "train/lr" in series:
        _plot(series["train/lr"], f"{run.name}: learning rate", "learning rate", run / "lr.png")
    if extra:
        final.update(extra)
    (run / "report.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    lines = [f"# Run {run.name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(final.items())]
    lines += ["", "![training loss](loss.png)", "", "![learning rate](lr.png)"]
    lines += data_errors_section(run / "logs" / "data_errors.json")
    (run / "report.md").write_text("\n".join(lines) + "\n")
    return final
