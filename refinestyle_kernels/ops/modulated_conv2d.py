"""The refined modulated convolution of StyleGAN2 + RefineStyle, and the whole StyledConv layer.

For each sample b, with style s_b [Cin] and scaled tokens p_b [L, Cout], q_b [L, Cin]:

    K_b   = scale * W0 * s_b  +  (p_b^T q_b) expanded over the k x k taps
    K_b  *= rsqrt(sum_{i,kh,kw} K_b^2 + eps)      per output channel, if demodulate
    y_b   = conv2d(x_b, K_b, padding=k//2)        or rosinality's upsampling conv (2H x 2W)

Three backends compute it:

- "reference": the literal formula. It materialises the [B, Cout, Cin, k, k]
  per-sample kernels and runs one grouped convolution. Float64-capable; the truth
  in tests and the baseline in benchmarks.
- "torch": the separated form in PyTorch ops. Everything in K_b but the
  demodulation is linear, so

      y = d * ( conv(x * s, scale*W0) + U @ box(V @ x) ),   U = p^T, V = q,

  with one weight shared by the batch and d [B, Cout] in closed form from
  S1 = sum_taps W0 and S2 = sum_taps W0^2 (see `demodulation_coefficients`).
  `box` is the k x k all-ones depthwise conv on the L projected channels (the
  stride-2 transposed one for the upsampling layer). No per-sample kernel is built.
- "triton": the same separated form in fused Triton kernels (below the
  `Triton backend` marker), the CUDA default.

`styled_conv2d` is the whole StyledConv/ToRGB layer: the conv, then
noise * strength + bias, leaky ReLU(0.2) * sqrt(2), and an optional clamp; the
Triton backend does all of it in the conv's epilogue.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from refinestyle_kernels.backend import resolve_backend
from refinestyle_kernels.ops.upfirdn2d import make_blur_kernel, upfirdn2d

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
# rosinality's upsampling conv: conv_transpose2d(stride 2) then this FIR, times 4, pad (1, 1)
UPSAMPLE_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
UPSAMPLE_BLUR_PAD = (1, 1)
UPSAMPLE_FACTOR = 2


# ----------------------------------------------------------------------------------------------
# Public API


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    *,
    demodulate: bool = True,
    upsample: bool = False,
    eps: float = 1e-8,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Modulated (and optionally demodulated) convolution with a low-rank kernel residual.

    Args:
        x: [B, Cin, H, W] input activations, float32/float16/bfloat16 (float64 on the
            reference and torch backends); NCHW or channels_last.
        weight: [Cout, Cin, k, k] static kernel W0 with k in {1, 3}: the raw parameter,
            without the equalized-lr `scale` (rosinality's `weight[0]`). Same dtype as x.
        styles: [B, Cin] modulation s (the output of the layer's affine `modulation`).
        p: None, [B, L, Cout] per-sample or [L, Cout] shared tokens, already multiplied
            by the scaling vector A.
        q: None, [B, L, Cin] per-sample or [L, Cin] shared tokens, already multiplied by
            B. p and q come together, with the same L and both shared or both per-sample.
            The residual added to every tap of K_b is p_b^T q_b [Cout, Cin].
        demodulate: normalise each output channel of K_b to unit L2 norm (eps inside the
            rsqrt). False for toRGB.
        upsample: rosinality's upsampling conv (k must be 3): conv_transpose2d with
            stride 2 and the transposed kernel, then the [1, 3, 3, 1] blur (x4, pad
            (1, 1)); output 2H x 2W.
        eps: positive constant added to the squared norm before the rsqrt.
        scale: multiplier of W0 (not of the residual); None means 1/sqrt(Cin*k*k).
        backend: "auto", "triton", "torch" or "reference" (see the module docstring).

    Returns:
        [B, Cout, H', W'] in x's dtype, H' = 2H and W' = 2W when upsample else H, W.
    """
    return styled_conv2d(
        x,
        weight,
        styles,
        p,
        q,
        activate=False,
        demodulate=demodulate,
        upsample=upsample,
        eps=eps,
        scale=scale,
        backend=backend,
    )


def styled_conv2d(
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
    backend: str = "auto",
) -> torch.Tensor:
    """A whole StyledConv (or ToRGB) layer in one op: `modulated_conv2d`, then the epilogue.

        out = act(modulated_conv2d(x, weight, styles, p, q) + noise_strength * noise + bias)

    with act = leaky_relu(0.2) * sqrt(2) when `activate`, then clamped to [-clamp, clamp]
    when `clamp` is given (NVlabs' conv_clamp).

    Args:
        x, weight, styles, p, q, demodulate, upsample, eps, scale, backend: as in
            `modulated_conv2d`.
        noise: None or [B, 1, H', W'] / [1, 1, H', W'] per-pixel noise at the output
            resolution (rosinality draws it at random when it is not given; this op adds
            none when it is None).
        noise_strength: the learned scalar (rosinality's `noise.weight`, shape [1]), a
            Python float, or None. Required when noise is given.
        bias: None or [Cout], added before the activation (`activate.bias`, or ToRGB's
            bias flattened).
        activate: apply leaky ReLU(0.2) * sqrt(2).
        clamp: None or a positive float.

    Returns:
        [B, Cout, H', W'] in x's dtype.
    """
    args = _validate(x, weight, styles, p, q, noise, noise_strength, bias, clamp, demodulate, upsample, eps, scale)
    x, weight, styles, p, q, noise, noise_strength, bias, scale = args
    backend = resolve_backend(backend, x.device)
    implementation = {
        "reference": _styled_conv2d_reference,
        "torch": _styled_conv2d_torch,
        "triton": _styled_conv2d_triton,
    }[backend]
    out = implementation(
        x,
        weight,
        styles,
        p,
        q,
        demodulate=demodulate,
        upsample=upsample,
        eps=eps,
        scale=scale,
        noise=noise,
        noise_strength=noise_strength,
        bias=bias,
        activate=activate,
        clamp=clamp,
    )
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Input validation: every public entry point goes through here; nothing broadcasts silently.


def _check_tensor(name: str, value, ndim: tuple[int, ...], expected: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {expected}, got {type(value).__name__}")
    if value.ndim not in ndim:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {expected}, got dtype {value.dtype}")


def _validate(x, weight, styles, p, q, noise, noise_strength, bias, clamp, demodulate, upsample, eps, scale):
    _check_tensor("x", x, (4,), "[B, Cin, H, W]")
    _check_tensor("weight", weight, (4,), "[Cout, Cin, k, k] (rosinality's weight[0])")
    _check_tensor("styles", styles, (2,), "[B, Cin]")
    batch, in_channels, height, width = x.shape
    out_channels, weight_in, kernel_h, kernel_w = weight.shape
    if kernel_h != kernel_w or kernel_h not in (1, 3):
        raise ValueError(f"weight: expected a square k x k kernel with k in {{1, 3}}, got {kernel_h} x {kernel_w}")
    if weight_in != in_channels:
        raise ValueError(
            f"weight: expected [Cout, Cin={in_channels}, k, k] to match x's channels, got {tuple(weight.shape)}"
        )
    if tuple(styles.shape) != (batch, in_channels):
        raise ValueError(f"styles: expected [B={batch}, Cin={in_channels}], got {tuple(styles.shape)}")
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"x: expected a non-empty [B, Cin, H, W], got {tuple(x.shape)}")
    if (p is None) != (q is None):
        raise ValueError("p, q: give both token sets or neither (got only " + ("p)" if q is None else "q)"))
    if p is not None:
        _check_tensor("p", p, (2, 3), "[B, L, Cout] or [L, Cout]")
        _check_tensor("q", q, (2, 3), "[B, L, Cin] or [L, Cin]")
        if p.ndim != q.ndim:
            raise ValueError(
                f"p, q: expected both per-sample ([B, L, C]) or both shared ([L, C]), "
                f"got p {tuple(p.shape)} and q {tuple(q.shape)}"
            )
        if p.shape[-1] != out_channels:
            raise ValueError(f"p: expected last dim Cout={out_channels}, got shape {tuple(p.shape)}")
        if q.shape[-1] != in_channels:
            raise ValueError(f"q: expected last dim Cin={in_channels}, got shape {tuple(q.shape)}")
        if p.shape[-2] != q.shape[-2]:
            raise ValueError(f"p, q: expected the same number of tokens L, got p {tuple(p.shape)}, q {tuple(q.shape)}")
        if p.shape[-2] < 1:
            raise ValueError(f"p, q: expected at least one token, got L=0")
        if p.ndim == 3 and (p.shape[0] != batch or q.shape[0] != batch):
            raise ValueError(
                f"p, q: per-sample tokens need batch B={batch}, got p {tuple(p.shape)}, q {tuple(q.shape)} "
                "(pass [L, C] for tokens shared by the batch)"
            )
    if upsample and kernel_h != 3:
        raise ValueError(f"upsample: the upsampling conv needs a 3x3 weight, got k={kernel_h}")
    out_h, out_w = (height * UPSAMPLE_FACTOR, width * UPSAMPLE_FACTOR) if upsample else (height, width)
    if noise is not None:
        _check_tensor("noise", noise, (4,), f"[B or 1, 1, {out_h}, {out_w}]")
        if noise.shape[0] not in (1, batch) or tuple(noise.shape[1:]) != (1, out_h, out_w):
            raise ValueError(f"noise: expected [B={batch} or 1, 1, {out_h}, {out_w}], got {tuple(noise.shape)}")
        if noise_strength is None:
            raise ValueError("noise_strength: required when noise is given (rosinality's noise.weight, shape [1])")
    if isinstance(noise_strength, torch.Tensor):
        if noise_strength.numel() != 1 or noise_strength.ndim > 1:
            raise ValueError(f"noise_strength: expected a scalar or shape [1], got {tuple(noise_strength.shape)}")
        noise_strength = noise_strength.reshape(1)
    elif noise_strength is not None:
        noise_strength = torch.tensor([float(noise_strength)], dtype=x.dtype, device=x.device)
    if noise is None:
        noise_strength = None
    if bias is not None:
        _check_tensor("bias", bias, (1,), f"[Cout={out_channels}]")
        if bias.shape[0] != out_channels:
            raise ValueError(f"bias: expected [Cout={out_channels}], got {tuple(bias.shape)}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and clamp > 0):
        raise ValueError(f"clamp: expected None or a positive number, got {clamp!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(in_channels * kernel_h * kernel_w)
    elif not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected None or a positive number, got {scale!r}")
    tensors = {"x": x, "weight": weight, "styles": styles, "p": p, "q": q, "noise": noise}
    tensors.update({"noise_strength": noise_strength, "bias": bias})
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {tensor.device}")
    return x, weight, styles, p, q, noise, noise_strength, bias, float(scale)


# ----------------------------------------------------------------------------------------------
# Shared pieces


def upsample_blur_kernel(dtype, device) -> torch.Tensor:
    """The [4, 4] FIR of rosinality's upsampling conv: [1,3,3,1] outer product, sum 1, times 4."""
    return make_blur_kernel(UPSAMPLE_BLUR_TAPS, dtype=dtype, device=device) * UPSAMPLE_FACTOR**2


def _epilogue(y, noise, noise_strength, bias, activate, clamp):
    """out = act(y + strength * noise + bias), then clamp. y [B, Cout, H', W']."""
    if noise is not None:
        y = y + noise_strength.reshape(1, 1, 1, 1) * noise
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    if activate:
        y = F.leaky_relu(y, LRELU_SLOPE) * LRELU_GAIN
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y


def demodulation_coefficients(
    weight: torch.Tensor,
    styles: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """d [B, Cout] = rsqrt(sum_{i,taps} K_b^2 + eps) without building K_b.

    With dW = p^T q, S1 = sum_taps W0 and S2 = sum_taps W0^2 ([Cout, Cin]):

        sum K^2 = scale^2 (s^2) @ S2^T
                + 2 scale sum_l p[l,o] ((q * s) @ S1^T)[l,o]
                + k*k sum_l p[l,o] ((q q^T) @ p)[l,o]

    weight [Cout, Cin, k, k]; styles [B, Cin]; p [B or -, L, Cout]; q [B or -, L, Cin].
    Computed in float32 at least (float64 stays float64); returns that dtype.
    """
    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    weight = weight.to(compute_dtype)
    styles = styles.to(compute_dtype)
    taps = weight.shape[2] * weight.shape[3]
    s2 = weight.square().sum((2, 3))
    energy = scale**2 * (styles.square() @ s2.t())
    if p is not None:
        p = p.to(compute_dtype)
        q = q.to(compute_dtype)
        s1 = weight.sum((2, 3))
        styled_q = q * styles[:, None, :]  # [B, L, Cin]
        cross = (p * (styled_q @ s1.t())).sum(-2)  # [B, Cout]
        gram = q @ q.transpose(-1, -2)  # [(B,) L, L]
        residual = (p * (gram @ p)).sum(-2)  # [(B,) Cout]
        energy = energy + 2 * scale * cross + taps * residual
    # sum K^2 >= 0 exactly; the clamp only removes float cancellation below zero
    return torch.rsqrt(energy.clamp_min(0) + eps)


# ----------------------------------------------------------------------------------------------
# Reference backend: the literal formula


def _styled_conv2d_reference(
    x, weight, styles, p, q, *, demodulate, upsample, eps, scale, noise, noise_strength, bias, activate, clamp
):
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel, _ = weight.shape
    kernels = scale * weight[None] * styles[:, None, :, None, None]  # [B, Cout, Cin, k, k]
    if p is not None:
        residual = p.transpose(-1, -2) @ q  # [(B,) Cout, Cin]
        if residual.ndim == 2:
            residual = residual[None]
        kernels = kernels + residual[:, :, :, None, None]
    if demodulate:
        kernels = kernels * torch.rsqrt(kernels.square().sum((2, 3, 4)) + eps)[:, :, None, None, None]
    grouped_x = x.reshape(1, batch * in_channels, height, width)
    if upsample:
        transposed = kernels.transpose(1, 2).reshape(batch * in_channels, out_channels, kernel, kernel)
        y = F.conv_transpose2d(grouped_x, transposed, stride=UPSAMPLE_FACTOR, padding=0, groups=batch)
        y = y.reshape(batch, out_channels, y.shape[2], y.shape[3])
        y = upfirdn2d(y, upsample_blur_kernel(y.dtype, y.device), pad=UPSAMPLE_BLUR_PAD)
    else:
        y = F.conv2d(grouped_x, kernels.reshape(batch * out_channels, in_channels, kernel, kernel), padding=kernel // 2, groups=batch)
        y = y.reshape(batch, out_channels, height, width)
    return _epilogue(y, noise, noise_strength, bias, activate, clamp)


# ----------------------------------------------------------------------------------------------
# Torch backend: the separated form in PyTorch ops (autograd differentiates it)


def _box(t: torch.Tensor, kernel: int, upsample: bool) -> torch.Tensor:
    """The k x k all-ones depthwise conv (stride-2 transposed when upsampling) on [B, L, H, W]."""
    if kernel == 1:
        return t
    ones = torch.ones(t.shape[1], 1, kernel, kernel, dtype=t.dtype, device=t.device)
    if upsample:
        return F.conv_transpose2d(t, ones, stride=UPSAMPLE_FACTOR, groups=t.shape[1])
    return F.conv2d(t, ones, padding=kernel // 2, groups=t.shape[1])


def _styled_conv2d_torch(
    x, weight, styles, p, q, *, demodulate, upsample, eps, scale, noise, noise_strength, bias, activate, clamp
):
    kernel = weight.shape[-1]
    styled_x = x * styles[:, :, None, None]
    if upsample:
        y = F.conv_transpose2d(styled_x, (weight * scale).transpose(0, 1), stride=UPSAMPLE_FACTOR, padding=0)
    else:
        y = F.conv2d(styled_x, weight * scale, padding=kernel // 2)
    if p is not None:
        if q.ndim == 2:  # shared tokens: V @ x and U @ (.) are 1x1 convs
            projected = F.conv2d(x, q[:, :, None, None])
            y = y + F.conv2d(_box(projected, kernel, upsample), p.t()[:, :, None, None])
        else:
            projected = torch.einsum("blc,bchw->blhw", q, x)
            y = y + torch.einsum("blo,blhw->bohw", p, _box(projected, kernel, upsample))
    if upsample:
        y = upfirdn2d(y, upsample_blur_kernel(y.dtype, y.device), pad=UPSAMPLE_BLUR_PAD)
    if demodulate:
        d = demodulation_coefficients(weight, styles, p, q, scale, eps)
        y = y * d.to(y.dtype)[:, :, None, None]
    return _epilogue(y, noise, noise_strength, bias, activate, clamp)


# === Triton backend ===
# Owned by the kernels work: fused forward/backward kernels, their autograd Function and
# torch.library registration. Called with the normalised arguments of `_validate`.


def _styled_conv2d_triton(
    x, weight, styles, p, q, *, demodulate, upsample, eps, scale, noise, noise_strength, bias, activate, clamp
):
    raise NotImplementedError("the Triton backend is not written yet")
