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


def _plot(points: list[tuple[int, float]], title: str, ylabel: str, out: Path, log_y: bool = False) -> None:
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


def write_report(run_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write loss.png, lr.png and report.json/report.md into `run_dir`; returns the final metrics."""
    run = Path(run_dir)
    series = read_metrics(run / "logs" / "metrics.csv")
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
    (run / "report.md").write_text("\n".join(lines) + "\n")
    return final
