"""The training plan: built from a validated spec on the driver, carried to the Ray Train workers as plain
data (pickled by Ray), with the spec's length resolved into optimizer steps."""

from __future__ import annotations

import pickle
from pathlib import Path

import yaml

from biomedgpt.data.stream import ErrorBudget
from biomedgpt.spec import TrainerSpec, spec_from_dict
from biomedgpt.train.plan import TrainPlan, plan_training
from tests_paths import REPO


def demo_spec(shards: str, tmp_path: Path, **trainer):
    data = yaml.safe_load((REPO / "jobs" / "demo" / "vqa_rad.yaml").read_text())
    data["data"]["shards"] = shards
    data["data"].pop("build", None)
    data["output"]["storage"] = str(tmp_path / "runs")
    data["trainer"].update(trainer)
    return spec_from_dict(data, "vqa_rad.yaml")


def test_the_plan_is_typed_plain_data_that_survives_pickling(demo_shards, tmp_path):
    spec = demo_spec(demo_shards, tmp_path)
    run_dir = tmp_path / "runs" / spec.team / spec.name
    plan = plan_training(spec, run_dir)
    assert isinstance(plan, TrainPlan) and isinstance(plan.trainer, TrainerSpec)
    assert plan.max_steps == spec.trainer.max_steps and plan.trainer.lr == spec.trainer.lr
    assert plan.name == spec.name and plan.storage == str(run_dir.parent.resolve())
    assert isinstance(plan.data.error_budget, ErrorBudget)
    assert [s.dataset for shards, _ in plan.data.groups for s in shards] == ["vqa_rad"] * len(plan.data.groups[0][0])
    assert {"tokenizer/tokenizer.json", "answers.json", "candidates.json"} <= set(plan.assets)
    assert (run_dir / "assets" / "answers.json").is_file()
    # Ray ships the plan to every worker by pickling it: it must come back equal, with no code inside
    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan and copy is not plan


def test_epochs_become_optimizer_steps_in_the_plan(demo_shards, tmp_path):
    spec = demo_spec(demo_shards, tmp_path, max_steps=None, epochs=2, workers=1, batch_size=8, grad_accumulation=2)
    plan = plan_training(spec, tmp_path / "run")
    assert plan.trainer.epochs is None and plan.max_steps >= 1
    one = plan_training(demo_spec(demo_shards, tmp_path, max_steps=None, epochs=1, workers=1, batch_size=8,
                                  grad_accumulation=2), tmp_path / "run1")
    assert plan.max_steps in (2 * one.max_steps, 2 * one.max_steps + 1)


def test_the_plan_resolves_strategy_auto(demo_shards, tmp_path, capsys):
    plan = plan_training(demo_spec(demo_shards, tmp_path, strategy="auto"), tmp_path / "run")
    # the demo model (a few M parameters) fits any device many times over: replicated, not sharded
    assert plan.trainer.strategy == "ddp"
    assert "strategy: ddp (auto: " in capsys.readouterr().out
    explicit = plan_training(demo_spec(demo_shards, tmp_path), tmp_path / "run2")
    assert explicit.trainer.strategy == "fsdp"  # the demo spec asks for FSDP2 by name
