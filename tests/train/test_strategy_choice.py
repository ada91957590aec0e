"""`trainer.strategy: auto` (the default): DDP when the model's training state fits comfortably on one
device, FSDP2 otherwise; explicit choices stand. GPU workers reserve `cpus_per_worker` CPUs too."""

from __future__ import annotations

import json

import pytest

from biomedgpt.model import BiomedGPTConfig
from biomedgpt.spec import TrainerSpec
from biomedgpt.train.plan import (ASSUMED_GPU_MEMORY, STATE_BYTES_PER_PARAM, choose_strategy, count_parameters,
                                  device_memory)
from biomedgpt.train.ray_trainer import scaling_config

GIB = 2**30


def config(size: str) -> dict:
    return json.loads(BiomedGPTConfig.from_size(size).to_json_string(use_diff=False))


def test_auto_is_the_default_and_explicit_choices_stand():
    assert TrainerSpec().strategy == "auto"
    for explicit in ("ddp", "fsdp"):
        assert choose_strategy(TrainerSpec(strategy=explicit), config("demo")) == (explicit, "as the spec says")


def test_parameters_are_counted_without_building_weights():
    from biomedgpt.model import BiomedGPTForConditionalGeneration

    cfg = config("demo")
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig(**{k: v for k, v in cfg.items()
                                                                 if k not in ("model_type", "transformers_version")}))
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, memory_gib, expected", [
    ("base", 16, "ddp"),       # 182M parameters: ~2.9 GiB of state, well within a quarter of 16 GiB
    ("base", 8, "fsdp"),       # ... but not of 8 GiB
    ("xlarge", 16, "fsdp"),    # ~0.9B parameters: ~14 GiB of state
    ("xlarge", 141, "ddp"),    # fits an H200
])
def test_auto_picks_ddp_when_the_training_state_fits_comfortably(size, memory_gib, expected):
    strategy, why = choose_strategy(TrainerSpec(use_gpu=True), config(size), memory=(memory_gib * GIB, "test"))
    assert strategy == expected, why
    assert why.startswith("auto: ") and f"{memory_gib:.1f} GiB" in why


def test_the_rule_is_state_bytes_against_a_quarter_of_the_device():
    params = count_parameters(config("small"))
    state = params * STATE_BYTES_PER_PARAM
    assert choose_strategy(TrainerSpec(), config("small"), memory=(4 * state, "x"))[0] == "ddp"
    assert choose_strategy(TrainerSpec(), config("small"), memory=(4 * state - 1, "x"))[0] == "fsdp"


def test_device_memory_without_a_visible_gpu_assumes_16_gib_and_cpu_workers_share_the_host():
    import torch

    if not torch.cuda.is_available():
        assert device_memory(TrainerSpec(use_gpu=True)) == (ASSUMED_GPU_MEMORY, "a GPU assumed to have 16 GiB")
    one, _ = device_memory(TrainerSpec(workers=1))
    two, why = device_memory(TrainerSpec(workers=2))
    assert two == one // 2 and "2 worker(s)" in why


def test_gpu_workers_reserve_their_cpus_too():
    gpu = scaling_config(TrainerSpec(workers=2, use_gpu=True, cpus_per_worker=6))
    assert gpu.num_workers == 2 and gpu.use_gpu
    assert gpu.resources_per_worker == {"CPU": 6, "GPU": 1}
    cpu = scaling_config(TrainerSpec(workers=2, cpus_per_worker=0.5))
    assert cpu.resources_per_worker == {"CPU": 0.5} and not cpu.use_gpu
