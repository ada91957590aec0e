"""The sharding policy: which modules FSDP2 wraps (each encoder/decoder layer and the image
backbone, then the root, which holds the shared embedding)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """`fully_shard` every sharding unit of `model`, then the root, on the data-parallel `mesh`.

    `param_dtype` (e.g. torch.bfloat16 on GPUs) turns on FSDP2 mixed precision: parameters are cast
    for compute, gradients reduced in float32.
    """
    kwargs = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in model.sharding_units():
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model
