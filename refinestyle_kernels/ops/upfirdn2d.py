"""upfirdn2d: upsample, FIR-filter and downsample a batch of images (rosinality/NVlabs semantics).

The FIR filters of StyleGAN2 are tiny and separable and this op is never the
bottleneck next to the convolutions, so it is plain PyTorch on every backend.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def make_blur_kernel(taps: Sequence[float], dtype=torch.float32, device=None) -> torch.Tensor:
    """The 2-D FIR kernel of a 1-D tap list (outer product), normalised to sum 1.

    taps: n finite real numbers (a sequence or a 1-D tensor) whose sum is not zero,
        e.g. StyleGAN2's (1, 3, 3, 1).
    dtype, device: of the result (a floating-point dtype; default float32 on the CPU).
    Returns [n, n].
    """
    kernel = torch.as_tensor(taps, dtype=dtype, device=device)
    if kernel.ndim != 1 or kernel.numel() < 1:
        raise ValueError(f"taps: expected a non-empty 1-D list of filter taps, got shape {tuple(kernel.shape)}")
    if not kernel.is_floating_point():
        raise TypeError(f"dtype: expected a floating-point dtype, got {kernel.dtype}")
    if not isinstance(taps, torch.Tensor):  # (checked on the host values: no device sync, nothing traced)
        values = [float(t) for t in taps]
        if not all(math.isfinite(v) for v in values) or sum(values) == 0:
            raise ValueError(f"taps: expected finite taps with a non-zero sum, got {values}")
    kernel = kernel[None, :] * kernel[:, None]
    return kernel / kernel.sum()


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a 2-D FIR kernel, downsample.

    x: [B, C, H, W] floating-point tensor.
    kernel: [kh, kw] floating-point filter on x's device (convolution, i.e. flipped, as
        rosinality's), used in x's dtype. Differentiable in x and, when it requires a
        gradient, in kernel.
    up, down: positive integer factors, the same along both axes.
    pad: (before, after) integer padding applied to both axes after upsampling; negative crops.
    Returns [B, C, (H*up + pad0 + pad1 - kh) // down + 1, (W*up + pad0 + pad1 - kw) // down + 1]
    in x's dtype; both sizes must be at least 1.
    """
    check_upfirdn2d_arguments(x, kernel, up, down, pad)
    batch, channels, height, width = x.shape
    filter_buffer = kernel
    kernel = kernel.to(x.dtype)
    pad0, pad1 = pad
    kh, kw = kernel.shape
    # the same result as one depthwise transposed conv where its padding can express `pad`:
    # no zero-inserted and padded copies (4x the input each), one read and one write
    transposed_pad = (kh - 1 - pad0, kw - 1 - pad0)
    output_pad = up - 1 + pad1 - pad0
    fixed_filter = not (kernel.requires_grad and torch.is_grad_enabled())  # the kept weight has no gradient
    if up > 1 and down == 1 and min(transposed_pad) >= 0 and 0 <= output_pad < up and fixed_filter:
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


def check_upfirdn2d_arguments(x, kernel, up: int, down: int, pad) -> tuple[int, int]:
    """Validate `upfirdn2d`'s arguments (as its docstring gives them), raising ValueError or
    TypeError that name the argument; return the output's (height, width)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x: expected a [B, C, H, W] tensor, got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not isinstance(kernel, torch.Tensor) or kernel.ndim != 2 or min(kernel.shape) < 1:
        got = tuple(getattr(kernel, "shape", ())) or type(kernel).__name__
        raise ValueError(f"kernel: expected a non-empty [kh, kw] tensor, got {got}")
    if not kernel.is_floating_point():
        raise TypeError(f"kernel: expected a floating-point tensor, got {kernel.dtype}")
    if kernel.device != x.device:
        raise ValueError(f"kernel: expected x's device {x.device}, got {kernel.device}")
    for name, factor in (("up", up), ("down", down)):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{name}: expected a positive integer, got {factor!r}")
    if (
        not isinstance(pad, (tuple, list)) or len(pad) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pad)
    ):  # fmt: skip
        raise ValueError(f"pad: expected (before, after) integers, got {pad!r}")
    _, _, height, width = x.shape
    out_h, out_w = ((size * up + pad[0] + pad[1] - k) // down + 1 for size, k in zip((height, width), kernel.shape))
    if min(out_h, out_w) < 1:
        raise ValueError(
            f"pad, kernel: a {tuple(kernel.shape)} kernel on {height} x {width} upsampled by {up} and padded by "
            f"{tuple(pad)} leaves no output pixels"
        )
    return out_h, out_w
