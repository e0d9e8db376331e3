"""upfirdn2d: upsample, FIR-filter and downsample a batch of images (rosinality/NVlabs semantics).

The FIR filters of StyleGAN2 are tiny and separable and this op is never the
bottleneck next to the convolutions, so it is plain PyTorch on every backend.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def make_blur_kernel(taps: Sequence[float], dtype=torch.float32, device=None) -> torch.Tensor:
    """The 2-D FIR kernel of a 1-D tap list (outer product), normalised to sum 1. Returns [n, n]."""
    kernel = torch.as_tensor(taps, dtype=dtype, device=device)
    if kernel.ndim != 1 or kernel.numel() < 1:
        raise ValueError(f"taps: expected a non-empty 1-D list of filter taps, got shape {tuple(kernel.shape)}")
    kernel = kernel[None, :] * kernel[:, None]
    return kernel / kernel.sum()


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a 2-D FIR kernel, downsample.

    x: [B, C, H, W] float tensor.
    kernel: [kh, kw] filter of x's dtype and device (convolution, i.e. flipped, as rosinality's).
    up, down: integer factors, the same along both axes.
    pad: (before, after) padding applied to both axes after upsampling; negative crops.
    Returns [B, C, (H*up + pad0 + pad1 - kh) // down + 1, (W*up + pad0 + pad1 - kw) // down + 1].
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected [B, C, H, W], got {tuple(x.shape)}")
    if kernel.ndim != 2:
        raise ValueError(f"kernel: expected [kh, kw], got {tuple(kernel.shape)}")
    if up < 1 or down < 1:
        raise ValueError(f"up, down: expected positive integers, got {up}, {down}")
    batch, channels, height, width = x.shape
    filter_buffer = kernel
    kernel = kernel.to(x.dtype)
    pad0, pad1 = pad
    kh, kw = kernel.shape
    # the same result as one depthwise transposed conv where its padding can express `pad`:
    # no zero-inserted and padded copies (4x the input each), one read and one write
    transposed_pad = (kh - 1 - pad0, kw - 1 - pad0)
    output_pad = up - 1 + pad1 - pad0
    if up > 1 and down == 1 and min(transposed_pad) >= 0 and 0 <= output_pad < up:
        # a module's filter buffer is constant: its depthwise weight is made once and kept
        from refinestyle_kernels.ops.modulated_conv2d import _derived_from_weight  # (imports this module)

        weight = _derived_from_weight(
            filter_buffer,
            ("depthwise", channels, x.dtype),
            lambda k: k.to(x.dtype)[None, None].expand(channels, 1, kh, kw).contiguous(),
        )
        return F.conv_transpose2d(
            x, weight, stride=up, padding=transposed_pad, output_padding=output_pad, groups=channels
        )
    if up > 1:
        # zero insertion: every input pixel followed by up-1 zeros along each axis
        x = x.reshape(batch * channels, 1, height, 1, width, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(batch, channels, height * up, width * up)
    x = F.pad(x, (max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)))
    x = x[
        :,
        :,
        max(-pad0, 0) : x.shape[2] - max(-pad1, 0),
        max(-pad0, 0) : x.shape[3] - max(-pad1, 0),
    ]
    weight = torch.flip(kernel, [0, 1])[None, None].expand(channels, 1, *kernel.shape)
    x = F.conv2d(x, weight, groups=channels)
    return x[:, :, ::down, ::down]
