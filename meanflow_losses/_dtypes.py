"""The library's one notion of half precision and of the arithmetic dtype for it.

float16 and bfloat16 carry too few digits for a loss, a normalisation statistic or a JVP's difference terms; every
module that computes such a quantity upcasts half inputs to float32 with :func:`upcast` (or computes in
:func:`compute_dtype`) and recognises half tensors by :data:`HALF_DTYPES` / :func:`is_half`, so that the decision
lives in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HALF_DTYPES", "compute_dtype", "is_half", "upcast"]

#: The half-precision floating dtypes.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_half(x: Tensor | torch.dtype) -> bool:
    """Whether a tensor (or dtype) is float16 or bfloat16."""
    return (x if isinstance(x, torch.dtype) else x.dtype) in HALF_DTYPES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for tensors of ``dtype``: float64 stays, anything narrower becomes float32."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: Tensor) -> Tensor:
    """Cast a half-precision tensor to float32; float32 and float64 tensors pass through unchanged."""
    return x.float() if x.dtype in HALF_DTYPES else x
