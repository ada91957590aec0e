"""Named sizes: exact parameter counts, one-to-one key mapping onto the reference, `model info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fixture_files import fixture

from biomedgpt.model import SIZES, BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.model.state_dict_adapter import ours_to_fairseq, reference_key_shapes

EXPECTED = {"small": 33_488_336, "medium": 92_892_000, "base": 182_238_536}
REFERENCE_FILE = {"small": "tiny", "medium": "medium", "base": "base"}


def meta_model(size: str) -> BiomedGPTForConditionalGeneration:
    with torch.device("meta"):
        return BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_size(size))


@pytest.mark.parametrize("size", list(EXPECTED))
def test_parameter_counts_and_keys_match_reference(size):
    model = meta_model(size)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[size]
    ref = json.loads(fixture(f"reference/ofa_keys_{REFERENCE_FILE[size]}.json").read_text())
    assert ref["total_parameters_unique"] == EXPECTED[size]
    ours = reference_key_shapes(model)
    theirs = {k: tuple(v["shape"]) for k, v in ref["keys"].items()}
    assert set(ours) == set(theirs), f"keys differ: {sorted(set(ours) ^ set(theirs))[:10]}"
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    # the fairseq names listed by the reference are what our renaming gives
    for key, meta in ref["keys"].items():
        assert ours_to_fairseq(key) == meta["fairseq_name"], key


def test_larger_sizes_are_defined():
    assert list(SIZES)[-2:] == ["large", "xlarge"]
    large, xlarge = (sum(p.numel() for p in meta_model(s).parameters()) for s in ("large", "xlarge"))
    assert 440e6 < large < 500e6 and 900e6 < xlarge < 960e6
    assert BiomedGPTConfig.from_size("xlarge").encoder_layers == 24


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model size 'huge'.*small"):
        BiomedGPTConfig.from_size("huge")


def _model_info_with_peak_rss(size: str) -> tuple[dict, int]:
    """Run `biomedgpt model info SIZE --json` in a child that reports its own peak RSS (KiB)."""
    code = (
        "import resource, sys\n"
        "from biomedgpt.cli import main\n"
        f"rc = main(['model', 'info', '{size}', '--json'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout), int(out.stderr.strip().splitlines()[-1])


def test_model_info_cli_prints_config_and_count_without_allocating():
    info, peak_base = _model_info_with_peak_rss("base")
    _, peak_small = _model_info_with_peak_rss("small")
    assert info["parameters"] == EXPECTED["base"]
    assert info["config"]["model_type"] == "biomedgpt" and info["config"]["d_model"] == 768
    # float32 weights would be 729 MB for base against 134 MB for small: the peaks must not differ so
    growth_mib = (peak_base - peak_small) / 1024
    assert growth_mib < 100, f"model info base peaks {growth_mib:.0f} MiB above small: weights were allocated"
    # the printed config is the one a saved checkpoint carries
    cfg = BiomedGPTConfig(**{k: v for k, v in info["config"].items() if k not in ("model_type", "transformers_version")})
    assert cfg.to_dict() == BiomedGPTConfig.from_size("base").to_dict()
