"""The NVlabs-style plain-PyTorch layer: a baseline variant that exists only in the benchmarks.

NVlabs' stylegan2-ada-pytorch computes the modulated conv without per-sample
kernels when `fused_modconv=False`: scale the activations by the styles, run one
dense convolution with the shared weight, and scale the result by the
demodulation coefficients, which it gets from the materialised per-sample weights
(elementwise work, no convolution). This module writes that recipe for our op,
with RefineStyle's low-rank term added in PyTorch:

    y = d * ( conv(x * s, scale * W0) + U @ box(V @ x) ),   U = p^T, V = q
    d = rsqrt( sum_{i,taps} (scale * W0 * s + p^T q)^2 + eps )   (materialised, as NVlabs)

It is independent of the torch backend (different ops, the demodulation from the
materialised kernel rather than the closed form), so it also cross-checks that
backend. The benchmark compares it against the reference like every other variant.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from refinestyle_kernels.ops.modulated_conv2d import (
    UPSAMPLE_BLUR_PAD,
    UPSAMPLE_FACTOR,
    _epilogue,
    _validate,
    upsample_blur_kernel,
)
from refinestyle_kernels.ops.upfirdn2d import upfirdn2d


def nvlabs_styled_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    *,
    noise: torch.Tensor | None = None,
    noise_strength: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    activate: bool = True,
    clamp: float | None = None,
    demodulate: bool = True,
    upsample: bool = False,
    eps: float = 1e-8,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`refinestyle_kernels.styled_conv2d`'s layer, computed the NVlabs way (see the module docstring).

    Arguments and result as in `refinestyle_kernels.styled_conv2d` (x [B, Cin, H, W],
    weight [Cout, Cin, k, k], styles [B, Cin], p [B, L, Cout] or [L, Cout], q [B, L, Cin]
    or [L, Cin], noise [B or 1, 1, H', W'], bias [Cout]); `backend` is accepted and
    ignored so that this function can stand in for the op. Inputs are validated and the
    epilogue applied by the op's own helpers, so only the conv and d differ.
    """
    x, weight, styles, p, q, noise, noise_strength, bias, scale = _validate(
        x, weight, styles, p, q, noise, noise_strength, bias, clamp, demodulate, upsample, eps, scale
    )
    batch, in_channels = styles.shape
    out_channels, _, kernel, _ = weight.shape
    shared_weight = weight * scale

    # scale activations, one dense conv with the weight shared by the batch
    styled_x = x * styles.reshape(batch, in_channels, 1, 1)
    if upsample:
        y = F.conv_transpose2d(styled_x, shared_weight.transpose(0, 1), stride=UPSAMPLE_FACTOR)
    else:
        y = F.conv2d(styled_x, shared_weight, padding=kernel // 2)

    if p is not None:
        y = y + _low_rank_branch(x, p, q, kernel, upsample)
    if upsample:
        y = upfirdn2d(y, upsample_blur_kernel(y.dtype, y.device), pad=UPSAMPLE_BLUR_PAD)

    if demodulate:
        # NVlabs' dcoefs: the squared norm of the materialised per-sample kernel
        kernels = shared_weight[None] * styles.reshape(batch, 1, in_channels, 1, 1)
        if p is not None:
            residual = torch.matmul(p.transpose(-1, -2), q)  # [(B,) Cout, Cin]
            kernels = kernels + residual.reshape(-1, out_channels, in_channels, 1, 1)
        dcoefs = (kernels.square().sum(dim=(2, 3, 4)) + eps).rsqrt()
        y = y * dcoefs.reshape(batch, out_channels, 1, 1)

    return _epilogue(y, noise, noise_strength, bias, activate, clamp)


def _low_rank_branch(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor, kernel: int, upsample: bool) -> torch.Tensor:
    """conv(x, p^T q expanded over the k x k taps) as U @ box(V @ x), in matmuls.

    Returns [B, Cout, H', W'] before the blur: H' = H for the plain conv, 2H + 1 for the
    stride-2 transposed conv (the blur that follows brings it to 2H).
    """
    batch, in_channels, height, width = x.shape
    num_tokens = q.shape[-2]
    # V @ x: [(B,) L, Cin] x [B, Cin, H*W] -> [B, L, H*W]
    projected = torch.matmul(q, x.reshape(batch, in_channels, height * width))
    projected = projected.reshape(batch, num_tokens, height, width)
    if kernel > 1:
        ones = projected.new_ones(num_tokens, 1, kernel, kernel)
        if upsample:
            projected = F.conv_transpose2d(projected, ones, stride=UPSAMPLE_FACTOR, groups=num_tokens)
        else:
            projected = F.conv2d(projected, ones, padding=kernel // 2, groups=num_tokens)
    out_h, out_w = projected.shape[2], projected.shape[3]
    # U @ (.): [(B,) Cout, L] x [B, L, H'*W'] -> [B, Cout, H'*W']
    expanded = torch.matmul(p.transpose(-1, -2), projected.reshape(batch, num_tokens, out_h * out_w))
    return expanded.reshape(batch, p.shape[-1], out_h, out_w)
