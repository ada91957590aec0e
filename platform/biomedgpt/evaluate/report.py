"""The evaluation's human-readable outputs: `results.md` (one table per task, the metrics each dataset
spec reports, then the task's `extra_columns`) and `report.html` (the same tables, then sample
predictions beside their images as embedded base64 thumbnails, ticked where the task judges them right
or wrong). Every text from data or models is HTML-escaped."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..tasks import get_task

SCALE_NOTE = ("Metrics are fractions in [0, 1] (papers print x100) except CIDEr, on its conventional x10 "
              "scale (papers print x100: 1.227 = 122.7).")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _decoding(d: dict[str, Any]) -> str:
    if d["method"] == "trie":
        return f"trie over {d['candidates']} answers, beam {d['beam_size']}"
    if d["method"] == "score":
        return f"best of {d['candidates']} class names (scored under the trie)"
    if d["method"] == "multilabel":
        return (f"list of {d['candidates']} class names in class order (list trie, beam {d['beam_size']}); "
                "AUC of the per-class scores")
    parts = [f"beam {d['beam_size']}", f"max {d['max_new_tokens']} tokens"]
    if d.get("no_repeat_ngram_size"):
        parts.append(f"no repeated {d['no_repeat_ngram_size']}-grams")
    if d.get("length_penalty", 1.0) != 1.0:
        parts.append(f"length penalty {d['length_penalty']}")
    return "free: " + ", ".join(parts)


def _tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(task title, header, rows) per task, in first-seen order."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in summary["datasets"]:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for task, rows in by_task.items():
        names: list[str] = []
        for r in rows:
            names += [n for n in r["reported"] if n not in names]
        family = get_task(task)
        extra = [c for c in family.extra_columns if any(c in r["metrics"] for r in rows)]
        header = ["dataset", "split", "n", *names, *extra, "decoding"]
        body = [[r["dataset"], r["split"], str(r["count"]), *[fmt(r["reported"].get(n)) for n in names],
                 *[fmt(r["metrics"].get(n)) for n in extra], _decoding(r["decoding"])] for r in rows]
        out.append((family.title or task, header, body))
    return out


def write_results_markdown(summary: dict[str, Any], path: Path) -> None:
    lines = [f"# Evaluation of {summary['model']}", "",
             f"Mode: {summary['mode']}; {len(summary['datasets'])} dataset(s); {summary['seconds']} s "
             f"({summary['workers']} Ray worker(s)); images {summary['image_size']} px. {SCALE_NOTE}", ""]
    for title, header, rows in _tables(summary):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    lines.append("Per-sample predictions: `predictions/<dataset>-<split>.jsonl`; references: "
                 "`references/<dataset>-<split>.jsonl` (`biomedgpt score` reads both).")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples td { max-width: 28em; }
.ok { color: #137333; } .bad { color: #b3261e; }
img { max-width: 160px; max-height: 160px; }
small { color: #666; }
"""


def write_html_report(summary: dict[str, Any], predictions: list[list[dict[str, Any]]],
                      thumbnails: list[dict[str, str]], path: Path, samples: int = 8) -> None:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e('Evaluation of ' + summary['model'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Evaluation of {e(summary['model'])}</h1>",
           f"<p>Job {e(summary['job'])} (team {e(summary['team'])}), mode <b>{e(summary['mode'])}</b>, "
           f"{len(summary['datasets'])} dataset(s), {e(str(summary['seconds']))} s on {summary['workers']} Ray "
           f"worker(s), images {summary['image_size']} px, created {e(summary['created'])}.</p>",
           f"<p><small>{e(SCALE_NOTE)}</small></p>"]
    for title, header, rows in _tables(summary):
        out.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            cells = []
            for i, c in enumerate(row):
                num = 2 <= i < len(row) - 1
                cells.append(f'<td class="num">{e(c)}</td>' if num else f"<td>{e(c)}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
    out.append("<h2>Sample predictions</h2>")
    for r, preds, thumbs in zip(summary["datasets"], predictions, thumbnails):
        out.append(f"<h3>{e(r['dataset'])} / {e(r['split'])} <small>({e(r['task'])}, first {min(samples, len(preds))} "
                   f"of {len(preds)})</small></h3>")
        out.append('<table class="samples"><tr><th>image</th><th>input</th><th>prediction</th><th>reference</th></tr>')
        family = get_task(r["task"])
        for p in preds[:samples]:
            thumb = thumbs.get(p["id"], "")
            if thumb.startswith("data:image/"):
                img = f'<img src="{e(thumb, quote=True)}" alt="{e(str(p["id"]), quote=True)}">'
            elif thumb:
                img = f"<small>{e(thumb)}</small>"
            else:
                img = "<small>no image</small>"
            ok = family.correct(p["prediction"], p.get("references"))
            mark = "" if ok is None else (' <span class="ok">&#10003;</span>' if ok else ' <span class="bad">&#10007;</span>')
            out.append(f"<tr><td>{img}</td><td>{e(p.get('instruction', ''))}<br><small>id {e(str(p['id']))}</small></td>"
                       f"<td>{e(family.answer_text(p['prediction']))}{mark}</td>"
                       f"<td>{e(family.reference_text(p.get('references')))}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
