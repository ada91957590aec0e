"""`score()` on prediction/reference files of every task, its input errors, and the `score` subcommand
run end to end in a child process through `add_score_parser`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from biomedgpt.metrics.caption import caption_metrics
from biomedgpt.evaluate.score import ScoreInputError, add_score_parser, score

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def vqa_files(tmp_path):
    preds = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": "Yes"}, {"id": "q2", "prediction": "the liver"},
                                          {"id": "q3", "prediction": "two"}])
    refs = _write(tmp_path / "r.jsonl", [{"id": "q3", "references": "3", "answer_type": "OPEN"},
                                         {"id": "1", "references": ["yes"], "answer_type": "closed"},
                                         {"id": "q2", "references": "Liver", "answer_type": "open", "organ": "ABD"}])
    return preds, refs


def test_vqa(vqa_files):
    result = score("vqa", *vqa_files)
    assert result == {"accuracy": pytest.approx(2 / 3), "closed_accuracy": 1.0, "open_accuracy": 0.5,
                      "count": 3, "closed_count": 1, "open_count": 2}


def test_caption_equals_caption_metrics_in_reference_file_order(tmp_path, our_meteor):
    refs = [{"id": "b", "references": ["The heart is normal in size.", "Normal heart size."]},
            {"id": "a", "references": ["No pleural effusion (arrow)."]},
            {"id": "c", "references": ["Mild cardiomegaly; lungs clear."]}]
    preds = [{"id": "a", "prediction": "No effusion."}, {"id": "c", "prediction": "Cardiomegaly, mild."},
             {"id": "b", "prediction": "Heart size is normal."}]
    result = score("caption", _write(tmp_path / "p.jsonl", preds), _write(tmp_path / "r.jsonl", refs),
                   meteor=our_meteor)
    expected = caption_metrics(["Heart size is normal.", "No effusion.", "Cardiomegaly, mild."],
                               [r["references"] for r in refs], meteor=our_meteor)
    assert result == {**expected, "count": 3}
    assert 0 <= result["meteor"] <= 1 and 0 <= result["bleu_4"] <= 1 and result["cider_d"] >= 0


@pytest.mark.parametrize("task", ["classify", "nli"])
def test_classify_and_nli(tmp_path, task):
    preds = _write(tmp_path / "p.jsonl", [{"id": i, "prediction": p} for i, p in enumerate([" yes", "no", "maybe", "no"])])
    refs = _write(tmp_path / "r.jsonl", [{"id": i, "references": r} for i, r in enumerate(["yes", "no", "no", "maybe"])])
    result = score(task, preds, refs)
    assert result["accuracy"] == 0.5 and result["count"] == 4
    assert result["macro_f1"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_summarize(tmp_path):
    preds = _write(tmp_path / "p.jsonl", [{"id": "m1", "prediction": "What are the side effects of metformin?"}])
    refs = _write(tmp_path / "r.jsonl", [{"id": "m1", "references": ["What are metformin's side effects?"]}])
    result = score("summarize", preds, refs)
    assert set(result) == {"rouge1", "rouge2", "rougeL", "count"} and 0 < result["rouge1"] <= 1


@pytest.mark.parametrize("pred_lines, ref_lines, message", [
    (['{"prediction": "yes"}'], [{"id": 1, "references": "yes", "answer_type": "closed"}],
     r"p\.jsonl:1: missing field 'id'"),
    ([{"id": 1, "prediction": "yes"}, {"id": 2, "prediction": "no"}],
     [{"id": 1, "references": "yes", "answer_type": "closed"}], r"p\.jsonl:2: id 2 is not in .*r\.jsonl"),
    ([{"id": 1, "prediction": "yes"}], [{"id": 1, "references": "yes", "answer_type": "closed"},
                                        {"id": 2, "references": "no", "answer_type": "closed"}],
     r"r\.jsonl:2: id 2 has no prediction in .*p\.jsonl"),
    ([{"id": 1, "prediction": "yes"}, "", {"id": "1", "prediction": "no"}],
     [{"id": 1, "references": "yes", "answer_type": "closed"}], r"p\.jsonl:3: duplicate id '1' \(first on line 1\)"),
    ([{"id": 1, "prediction": ["yes"]}], [{"id": 1, "references": "yes", "answer_type": "closed"}],
     r"p\.jsonl:1: field 'prediction' must be a string, got array"),
    ([{"id": 1.5, "prediction": "yes"}], [{"id": 1, "references": "yes", "answer_type": "closed"}],
     r"p\.jsonl:1: field 'id' must be a string or an integer, got number"),
    ([{"id": 1, "prediction": "yes"}], [{"id": 1, "references": "yes"}], r"r\.jsonl:1: missing field 'answer_type'"),
    ([{"id": 1, "prediction": "yes"}], [{"id": 1, "references": "yes", "answer_type": "binary"}],
     r"r\.jsonl:1: field 'answer_type' must be \"closed\" or \"open\", got 'binary'"),
    ([{"id": 1, "prediction": "yes"}], [{"id": 1, "references": [], "answer_type": "open"}],
     r"r\.jsonl:1: field 'references' must be a string or a non-empty list of strings, got an empty list"),
    (['{"id": 1, "prediction": "yes"'], [{"id": 1, "references": "yes", "answer_type": "open"}],
     r"p\.jsonl:1: not valid JSON"),
    (['["id", 1]'], [{"id": 1, "references": "yes", "answer_type": "open"}],
     r"p\.jsonl:1: expected a JSON object, got array"),
    ([], [{"id": 1, "references": "yes", "answer_type": "open"}], r"p\.jsonl: no records"),
])
def test_vqa_input_errors_name_file_line_and_field(tmp_path, pred_lines, ref_lines, message):
    preds = _write(tmp_path / "p.jsonl", pred_lines)
    refs = _write(tmp_path / "r.jsonl", ref_lines)
    with pytest.raises(ScoreInputError, match=message):
        score("vqa", preds, refs)


def test_task_specific_reference_types(tmp_path):
    preds = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": "a caption"}])
    with pytest.raises(ScoreInputError, match=r"r\.jsonl:1: field 'references' must be a non-empty list of "
                                              r"strings, got string"):
        score("caption", preds, _write(tmp_path / "r.jsonl", [{"id": 1, "references": "a caption"}]), meteor=False)
    with pytest.raises(ScoreInputError, match=r"r\.jsonl:1: field 'references' must be a non-empty list of "
                                              r"strings, got a list with a number"):
        score("summarize", preds, _write(tmp_path / "r.jsonl", [{"id": 1, "references": ["x", 3]}]))
    with pytest.raises(ScoreInputError, match=r"r\.jsonl:1: field 'references' must be a string, got array"):
        score("nli", preds, _write(tmp_path / "r.jsonl", [{"id": 1, "references": ["yes"]}]))
    with pytest.raises(ScoreInputError, match=r"r\.jsonl:1: field 'references' must be a string, got number"):
        score("classify", preds, _write(tmp_path / "r.jsonl", [{"id": 1, "references": 3}]))
    with pytest.raises(ScoreInputError, match=r"missing\.jsonl: file not found"):
        score("classify", preds, tmp_path / "missing.jsonl")


# A `biomedgpt`-like program with the score subcommand, as cli.py wires it.
_PROGRAM = textwrap.dedent("""
    import argparse, sys
    from biomedgpt.evaluate.score import add_score_parser
    parser = argparse.ArgumentParser(prog="biomedgpt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_score_parser(sub)
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
""")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROGRAM, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_cli_prints_metrics_as_json(vqa_files, tmp_path):
    preds, refs = vqa_files
    proc = _run_cli("score", "--task", "vqa", "--predictions", str(preds), "--references", str(refs))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == score("vqa", preds, refs)

    cap_preds = _write(tmp_path / "cp.jsonl", [{"id": "x", "prediction": "The heart is normal."}])
    cap_refs = _write(tmp_path / "cr.jsonl", [{"id": "x", "references": ["Heart size is normal.", "Normal heart."]}])
    proc = _run_cli("score", "--task", "caption", "--predictions", str(cap_preds), "--references", str(cap_refs),
                    "--no-meteor")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == score("caption", cap_preds, cap_refs, meteor=False)


def test_cli_input_error_exits_2_naming_file_line_field(tmp_path):
    preds = _write(tmp_path / "p.jsonl", [{"id": 1, "prediction": 3}])
    refs = _write(tmp_path / "r.jsonl", [{"id": 1, "references": "yes"}])
    proc = _run_cli("score", "--task", "nli", "--predictions", str(preds), "--references", str(refs))
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"biomedgpt score: error: {preds}:1: field 'prediction' must be a string, got number" in proc.stderr


def test_parser_help_and_choices():
    import argparse

    parser = argparse.ArgumentParser(prog="biomedgpt")
    sub = parser.add_subparsers(dest="command")
    score_parser = add_score_parser(sub)
    assert "cider_d" in score_parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "--task", "ocr", "--predictions", "p", "--references", "r"])
