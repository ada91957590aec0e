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
        unit_kwargs = kwargs
        if param_dtype is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unit.modules()):
            # Batch norm (the ResNet backbone) computes in float32: its running statistics are float32
            # buffers, which CUDA's kernels refuse beside low-precision weights and inputs. Its output is
            # cast back to the compute dtype for the layers after it.
            unit_kwargs = dict(kwargs, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                      reduce_dtype=torch.float32,
                                                                      output_dtype=param_dtype))
        fully_shard(unit, **unit_kwargs)
    fully_shard(model, **kwargs)
    return model
