"""dtypes: the names users give them in configs and flags, and the precision the losses compute in."""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The floating-point dtypes a model can be loaded or run in, by name."""
DTYPE_CHOICES = ("auto", *DTYPES)
"""The accepted values of a dtype setting: a name of `DTYPES`, or "auto" (keep or load the stored dtype)."""


def torch_dtype(name: str) -> torch.dtype | str:
    """The `torch.dtype` named `name` (a key of `DTYPES`), or "auto" as it is (what `from_pretrained` accepts)."""
    return DTYPES.get(name, "auto")


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a loss reads `tensor` in: float64 stays float64, anything else is read in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def upcast(tensor: Tensor) -> Tensor:
    """`tensor` in its `compute_dtype` (itself, not a copy, when it already is)."""
    return tensor.to(compute_dtype(tensor))
