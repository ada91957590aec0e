"""Bad-data counts reach the run: the training callback puts the streams' counts (and positions moved
by bad rows) into every checkpoint, writes logs/data_errors.json, restores them on resume without
double counting, and the run report shows them by dataset and shard."""

from __future__ import annotations

import json

import pytest

from biomedgpt.data.stream import BadDataError, ErrorBudget, ShardInfo, ShardStream, _Read, merge_data_errors


def stream(rank=0, world=1, budget=ErrorBudget(max_bad_samples=5)):
    shards = [ShardInfo(f"s3://b/vqa_rad/train/vqa_rad-train-{i:06d}.tar", "vqa_rad", "train", 20) for i in range(4)]
    return ShardStream([(shards, 1.0)], rank=rank, world=world, batch_size=4, seed=0, preprocess={},
                       columns=("input_ids",), error_budget=budget)


def test_counts_travel_through_checkpoints_and_into_the_report(tmp_path):
    from biomedgpt.train.ray_trainer import DataPosition
    from biomedgpt.train.report import write_report

    s = stream()
    read = _Read(s.groups[0][0][2], epoch=0, offset=40)
    s._count_bad(read, 43, 1, "vqa_rad_000017", "ImageDecodeError: record '17' of vqa_rad: cannot decode image", {0: 5})
    s._count_bad(read, 50, 10, "vqa_rad_000020+", "ShardReadError: read 10 of the 20 samples", {0: 15})
    s._count_bad(read, 43, 1, "vqa_rad_000017", "again after a resume: not counted twice", {0: 5})
    assert s.bad_samples == 11
    s.seek({"epoch": 0, "batches": 3, "rows": 14})
    assert s.position == {"epoch": 0, "batches": 3, "rows": 14}

    run = tmp_path / "run"
    cb = DataPosition(s, str(run / "logs"))
    state = cb.state_dict()
    assert state["position"] == {"epoch": 0, "batches": 3, "rows_by_rank": [14]}
    written = json.loads((run / "logs" / "data_errors.json").read_text())
    assert written["bad_samples"] == 11 and written["by_dataset"] == {"vqa_rad": 11}
    (shard,) = written["shards"]
    assert shard["shard"].endswith("vqa_rad-train-000002.tar") and shard["reasons"] == {
        "ImageDecodeError": 1, "ShardReadError": 10}

    # resume: rank 0 keeps the totals, every rank its already-counted rows of the current epoch
    resumed = [stream(rank=r, world=1) for r in range(1)][0]
    DataPosition(resumed).load_state_dict(state)
    assert resumed.position == {"epoch": 0, "batches": 3, "rows": 14} and resumed.bad_samples == 11
    resumed._count_bad(read, 43, 1, "vqa_rad_000017", "met again", {0: 15})
    assert resumed.bad_samples == 11
    other = stream(rank=1, world=2)
    other.restore_data_errors(state["data_errors"], keep_counts=False)
    assert other.bad_samples == 0
    assert merge_data_errors([resumed.data_errors(), other.data_errors()])["bad_samples"] == 11

    (run / "logs" / "metrics.csv").write_text("step,train/loss,train/bad_samples\n0,2.0,0\n9,1.5,11\n")
    write_report(run)
    report = (run / "report.md").read_text()
    assert "## Bad data" in report and "11 bad sample(s) skipped" in report
    assert "| vqa_rad | s3://b/vqa_rad/train/vqa_rad-train-000002.tar | 11 | ImageDecodeError 1, ShardReadError 10 |" in report


def test_the_budget_counts_per_rank_and_epoch():
    s = stream(budget=ErrorBudget(max_bad_samples=2, max_bad_fraction=0.5))
    assert s.budget.allowance(40) == 2 and ErrorBudget(None, 0.05).allowance(40) == 2
    assert ErrorBudget(None, None).allowance(40) == 0 and ErrorBudget(10, 0.01).allowance(1000) == 10
    read0, read1 = _Read(s.groups[0][0][0], 0, 0), _Read(s.groups[0][0][0], 1, 0)
    allowance = {0: 2, 1: 2}
    s._count_bad(read0, 1, 1, "a", "ValueError: x", allowance)
    s._count_bad(read0, 2, 1, "b", "ValueError: x", allowance)
    s._count_bad(read1, 1, 1, "a", "ValueError: x", allowance)  # the next epoch has its own budget
    with pytest.raises(BadDataError, match=r"rank 0 met 3 bad sample\(s\) in epoch 0, more than the 2 .*"
                                           r"shard s3://b/vqa_rad/train/vqa_rad-train-000000.tar, key 'c'"):
        s._count_bad(read0, 3, 1, "c", "MissingFieldError: VQA record 'c' has no 'question' field", allowance)
