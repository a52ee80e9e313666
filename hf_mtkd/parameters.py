"""Model sizes: the one parameter count every part of hf_mtkd uses (cards, teacher records, logs)."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """
    Number of parameters of `model`, shared ones counted once, at their full size also when DeepSpeed ZeRO-3 has
    partitioned them (a partitioned parameter's `numel()` is 0 outside a gather; its `ds_numel` is its full size).
    """
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
