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

    x: [B, C] or [B, C, *spatial] floating-point tensor.
    bias: None or [C], same dtype and device as x; added along dim 1.
    negative_slope: slope of the negative part (StyleGAN2: 0.2).
    scale: gain applied after the activation (StyleGAN2: sqrt(2), which keeps the
        activations' second moment).
    Returns a tensor of x's shape, dtype and device.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x: expected a [B, C, ...] tensor, got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.ndim != 1 or bias.shape[0] != x.shape[1]:
            raise ValueError(f"bias: expected a [C={x.shape[1]}] tensor, got {tuple(getattr(bias, 'shape', ())) or type(bias).__name__}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(
                f"bias: expected x's dtype and device ({x.dtype}, {x.device}), got {bias.dtype}, {bias.device}"
            )
        x = x + bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale
