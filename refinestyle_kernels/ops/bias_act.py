"""fused_leaky_relu: bias add, leaky ReLU(0.2) and the sqrt(2) gain (rosinality's FusedLeakyReLU).

Used by the mapping network's EqualLinear layers, where it is a few thousand
elements per sample; the convolution layers do the same in `styled_conv2d`'s
epilogue instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float = 0.2, scale: float = math.sqrt(2)
) -> torch.Tensor:
    """leaky_relu(x + bias, negative_slope) * scale.

    x: [B, C] or [B, C, *spatial] float tensor.
    bias: None or [C], same dtype and device as x; added along dim 1.
    """
    if x.ndim < 2:
        raise ValueError(f"x: expected [B, C, ...], got {tuple(x.shape)}")
    if bias is not None:
        if bias.ndim != 1 or bias.shape[0] != x.shape[1]:
            raise ValueError(f"bias: expected [C={x.shape[1]}], got {tuple(bias.shape)}")
        x = x + bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale
