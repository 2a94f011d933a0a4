"""Sharding a model over the ranks of a launch (FSDP2).

torch.distributed.tensor is imported only by a run that shards (half a second of every
process start otherwise): a tensor is a DTensor only once that module is loaded.
"""

import sys

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
