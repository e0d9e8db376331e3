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
  stride-2 transposed one for the upsampling layer). No per-sample kernel is built,
  except for 1x1 layers with Cout <= H * W (every toRGB): a 1x1 conv is a batched GEMM
  either way, and its per-sample [Cout, Cin] matrix costs less than the pass over x
  that modulating x takes.
- "triton": the same separated form in fused Triton kernels (below the
  `Triton backend` marker), the CUDA default.

`styled_conv2d` is the whole StyledConv/ToRGB layer: the conv, then
noise * strength + bias, leaky ReLU(0.2) * sqrt(2), and an optional clamp; the
Triton backend does all of it in the conv's epilogue.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from refinestyle_kernels.backend import resolve_backend, triton_interpreter_bf16_problem
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
        p: None, [B, L, Cout] per-sample or [L, Cout] shared tokens (L >= 1), already
            multiplied by the scaling vector A.
        q: None, [B, L, Cin] per-sample or [L, Cin] shared tokens, already multiplied by
            B. p and q come together, with the same L and both shared or both per-sample.
            The residual added to every tap of K_b is p_b^T q_b [Cout, Cin].
        Every tensor argument has x's dtype and device; B, Cin, Cout, H and W are >= 1.
        demodulate: normalise each output channel of K_b to unit L2 norm (eps inside the
            rsqrt). False for toRGB.
        upsample: rosinality's upsampling conv (k must be 3): conv_transpose2d with
            stride 2 and the transposed kernel, then the [1, 3, 3, 1] blur (x4, pad
            (1, 1)); output 2H x 2W.
        eps: positive finite Python (or NumPy) number added to the squared norm before
            the rsqrt.
        scale: multiplier of W0 (not of the residual): None, meaning 1/sqrt(Cin*k*k), or
            a positive finite Python (or NumPy) number.
        backend: "auto", "triton", "torch" or "reference" (see the module docstring).

    Returns:
        [B, Cout, H', W'] in x's dtype, H' = 2H and W' = 2W when upsample else H, W.
        The triton backend returns it channels_last (its kernels' layout), the others in
        the layout PyTorch's convolutions give.
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
            resolution, x's dtype (rosinality draws it at random when it is not given;
            this op adds none when it is None). Noise that requires a gradient (a
            projector optimises it) runs the layer on the torch backend, whose backward
            gives it one: the Triton kernels do not.
        noise_strength: the learned scalar (rosinality's `noise.weight`: shape [1] or
            [], x's dtype and device), a Python float, or None. Required when noise is
            given; ignored when it is not.
        bias: None or [Cout] in x's dtype, added before the activation (`activate.bias`,
            or ToRGB's bias flattened).
        activate: True or False: apply leaky ReLU(0.2) * sqrt(2).
        clamp: None or a positive finite number.

    Returns:
        [B, Cout, H', W'] in x's dtype.
    """
    args = _validate(x, weight, styles, p, q, noise, noise_strength, bias, clamp, demodulate, upsample, eps, scale)
    _check_flag("activate", activate)
    x, weight, styles, p, q, noise, noise_strength, bias, scale = args
    backend = _backend_for_call(resolve_backend(backend, x.device), noise)
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


def _backend_for_call(backend: str, noise: torch.Tensor | None) -> str:
    """The backend that runs this call: "torch" instead of "triton" when noise needs a gradient,
    which the Triton kernels do not compute (rosinality's and NVlabs' projectors optimise the
    noise maps); the torch backend's autograd gives it, through the same separated form."""
    if backend == "triton" and noise is not None and noise.requires_grad and torch.is_grad_enabled():
        return "torch"
    return backend


# ----------------------------------------------------------------------------------------------
# Input validation: every public entry point goes through here; nothing broadcasts silently.


def _check_tensor(name: str, value, ndim: tuple[int, ...], expected: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {expected}, got {type(value).__name__}")
    if value.ndim not in ndim:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {expected}, got dtype {value.dtype}")


def _check_positive(name: str, value, expected: str = "a positive finite number") -> float:
    """A Python or NumPy real number > 0 and finite, as a float (bools and tensors refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _check_token_pair(p, q) -> None:
    """Both token sets or neither, each a float tensor of rank 2 (shared) or 3 (per sample)."""
    if (p is None) != (q is None):
        raise ValueError("p, q: give both token sets or neither (got only " + ("p)" if q is None else "q)"))
    if p is not None:
        _check_tensor("p", p, (2, 3), "[B, L, Cout] or [L, Cout]")
        _check_tensor("q", q, (2, 3), "[B, L, Cin] or [L, Cin]")


def _check_like(tensors: dict, like: torch.Tensor, like_name: str) -> None:
    """Every tensor in {name: tensor or None} has like's dtype (else TypeError) and device
    (else ValueError); the message names the tensor and `like_name`."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} ({like_name}'s), got {tensor.dtype}")
        if tensor.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} ({like_name}'s), got {tensor.device}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def _validate(x, weight, styles, p, q, noise, noise_strength, bias, clamp, demodulate, upsample, eps, scale):
    _check_tensor("x", x, (4,), "[B, Cin, H, W]")
    _check_tensor("weight", weight, (4,), "[Cout, Cin, k, k] (rosinality's weight[0])")
    _check_tensor("styles", styles, (2,), "[B, Cin]")
    batch, in_channels, height, width = x.shape
    out_channels, weight_in, kernel_h, kernel_w = weight.shape
    if kernel_h != kernel_w or kernel_h not in (1, 3):
        raise ValueError(f"weight: expected a square k x k kernel with k in {{1, 3}}, got {kernel_h} x {kernel_w}")
    if out_channels == 0 or in_channels == 0:
        raise ValueError(f"weight: expected at least one input and one output channel, got {tuple(weight.shape)}")
    if weight_in != in_channels:
        raise ValueError(
            f"weight: expected [Cout, Cin={in_channels}, k, k] to match x's channels, got {tuple(weight.shape)}"
        )
    if tuple(styles.shape) != (batch, in_channels):
        raise ValueError(f"styles: expected [B={batch}, Cin={in_channels}], got {tuple(styles.shape)}")
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"x: expected a non-empty [B, Cin, H, W], got {tuple(x.shape)}")
    _check_token_pair(p, q)
    if p is not None:
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
            raise ValueError("p, q: expected at least one token, got L=0")
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
        if isinstance(noise_strength, bool) or not isinstance(noise_strength, numbers.Real):
            raise TypeError(
                f"noise_strength: expected a tensor of shape [1] or a real number, got {type(noise_strength).__name__}"
            )
        if not math.isfinite(noise_strength):  # a learned tensor may go non-finite in training: not checked
            raise ValueError(f"noise_strength: expected a finite number, got {noise_strength}")
        noise_strength = torch.tensor([float(noise_strength)], dtype=x.dtype, device=x.device)
    if noise is None:  # (a strength without noise adds nothing, as rosinality's NoiseInjection with noise 0)
        noise_strength = None
    if bias is not None:
        _check_tensor("bias", bias, (1,), f"[Cout={out_channels}]")
        if bias.shape[0] != out_channels:
            raise ValueError(f"bias: expected [Cout={out_channels}], got {tuple(bias.shape)}")
    if clamp is not None:
        _check_positive("clamp", clamp, "None or a positive finite number")
    _check_positive("eps", eps)
    if scale is None:
        scale = 1.0 / math.sqrt(in_channels * kernel_h * kernel_w)
    else:
        scale = _check_positive("scale", scale, "None or a positive finite number")
    _check_flag("demodulate", demodulate)
    _check_flag("upsample", upsample)
    tensors = {"weight": weight, "styles": styles, "p": p, "q": q, "noise": noise}
    _check_like(dict(tensors, noise_strength=noise_strength, bias=bias), x, "x")
    return x, weight, styles, p, q, noise, noise_strength, bias, float(scale)


# ----------------------------------------------------------------------------------------------
# Shared pieces


_UPSAMPLE_BLUR_KERNELS: dict = {}


def upsample_blur_kernel(dtype, device) -> torch.Tensor:
    """The [4, 4] FIR of rosinality's upsampling conv: [1,3,3,1] outer product, sum 1, times 4.

    Cached per (dtype, device): building it copies from host memory, which CUDA graph
    capture forbids. Under torch.compile it is traced as a constant instead.
    """
    if torch.compiler.is_compiling():
        return make_blur_kernel(UPSAMPLE_BLUR_TAPS, dtype=dtype, device=device) * UPSAMPLE_FACTOR**2
    key = (dtype, torch.device(device))
    kernel = _UPSAMPLE_BLUR_KERNELS.get(key)
    if kernel is None:
        # a normal tensor even when first asked for under inference_mode, so autograd can save it later
        with torch.inference_mode(False), torch.no_grad():
            kernel = make_blur_kernel(UPSAMPLE_BLUR_TAPS, dtype=dtype, device=device) * UPSAMPLE_FACTOR**2
        _UPSAMPLE_BLUR_KERNELS[key] = kernel
    return kernel


def _epilogue(y, noise, noise_strength, bias, activate, clamp, in_place=False):
    """out = act(y + strength * noise + bias), then clamp. y [B, Cout, H', W'];
    in_place: overwrite y, a fresh tensor no autograd graph records."""
    if in_place:
        if noise is not None:
            y.addcmul_(noise, noise_strength.reshape(1, 1, 1, 1))
        if bias is not None:
            y.add_(bias.reshape(1, -1, 1, 1))
        if activate:
            F.leaky_relu_(y, LRELU_SLOPE).mul_(LRELU_GAIN)
        if clamp is not None:
            y.clamp_(-clamp, clamp)
        return y
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

    Args:
        weight: [Cout, Cin, kh, kw] static kernel W0 (without `scale`), floating point, non-empty.
            Any kernel size: the residual's energy counts kh * kw taps.
        styles: [B, Cin] modulation s with B >= 1, weight's dtype and device.
        p, q: both None, or the scaled tokens as in `modulated_conv2d`: [B, L, Cout] and
            [B, L, Cin] per sample, or [L, Cout] and [L, Cin] shared, L >= 1; weight's dtype
            and device.
        scale: multiplier of W0, a positive finite number (1/sqrt(Cin*k*k) in StyleGAN2).
        eps: positive finite number added to sum K^2 before the rsqrt.

    Returns:
        [B, Cout], computed and returned in float32 at least (float64 stays float64).
        Differentiable in weight, styles, p and q.
    """
    _validate_demodulation(weight, styles, p, q, scale, eps)
    return _demodulation_coefficients(weight, styles, p, q, float(scale), float(eps))


def _validate_demodulation(weight, styles, p, q, scale, eps) -> None:
    _check_tensor("weight", weight, (4,), "[Cout, Cin, k, k]")
    _check_tensor("styles", styles, (2,), "[B, Cin]")
    out_channels, in_channels = weight.shape[:2]
    if weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty [Cout, Cin, k, k], got {tuple(weight.shape)}")
    batch = styles.shape[0]
    if styles.shape[1] != in_channels:
        raise ValueError(f"styles: expected [B, Cin={in_channels}] (weight's Cin), got {tuple(styles.shape)}")
    if batch == 0:
        raise ValueError(f"styles: expected a non-empty batch [B, Cin={in_channels}], got {tuple(styles.shape)}")
    _check_token_pair(p, q)
    if p is not None:
        lead = (batch,) if p.ndim == 3 else ()
        num_tokens = p.shape[-2]
        if tuple(p.shape) != (*lead, num_tokens, out_channels) or tuple(q.shape) != (*lead, num_tokens, in_channels):
            form = "[B, L, C] per sample" if lead else "[L, C] shared"
            raise ValueError(
                f"p, q: expected {form} with B={batch}, the same L, Cout={out_channels} and Cin={in_channels}, "
                f"got p {tuple(p.shape)} and q {tuple(q.shape)}"
            )
        if num_tokens < 1:
            raise ValueError("p, q: expected at least one token, got L=0")
    _check_like({"styles": styles, "p": p, "q": q}, weight, "weight")
    _check_positive("scale", scale)
    _check_positive("eps", eps)


def _demodulation_coefficients(weight, styles, p, q, scale: float, eps: float) -> torch.Tensor:
    """`demodulation_coefficients` without the argument checks (the op has made them)."""
    if torch.compiler.is_compiling():  # traced: plain ops, autograd does the backward
        return _demodulation_traced(weight, styles, p, q, scale, eps)
    return _Demodulation.apply(weight, styles, p, q, scale, eps)


def _demodulation_traced(weight, styles, p, q, scale, eps):
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


# (id of the weight's storage owner, the view's geometry, what) -> (weakref to the owner, the
# weight's _version, the derived tensors): tensors derived from a weight that is not being
# trained (tap sums, kernel layouts), reused until it changes in place (the version counter,
# which a view shares with its base, moves), an optimizer steps it (fused optimizers leave the
# version as it was) or its owner is freed (the weakref's callback drops the entry; a new tensor
# that gets the same id is not mistaken for it). RefineStyle keeps W0
# frozen, so each layer derives them once instead of in every call. The owner is the view's
# base: the modules pass `self.weight[0]` (rosinality's weight is [1, Cout, Cin, k, k]), a new
# view every call. A change through `param.data` has its own version counter and is not seen:
# `clear_weight_cache` is for that.
_WEIGHT_DERIVED: dict = {}


def clear_weight_cache() -> None:
    """Forget every tensor derived from a frozen weight (tap sums, kernel layouts, casts).

    The op derives these once per frozen weight (`requires_grad=False`) and keeps them until
    the weight changes in place, an optimizer steps it, or it is freed. An in-place change
    made through `param.data`
    (as rosinality's `accumulate` makes its EMA update) has a version counter of its own, so
    it is not seen: call this after such a change, or change the weight under
    `torch.no_grad()` instead (`param.mul_(...)`), which is seen.
    """
    _WEIGHT_DERIVED.clear()


def _forget_when_freed(key):
    return lambda _dead_owner: _WEIGHT_DERIVED.pop(key, None)


def _forget_what_an_optimizer_stepped(optimizer, _args, _kwargs) -> None:
    """Optimizer step post-hook, for every optimizer: fused optimizers (`fused=True`) write their
    parameters without moving the version counter, so a weight frozen between two steps (a GAN
    loop's discriminator phase) would keep the tensors derived before the step."""
    if not _WEIGHT_DERIVED:
        return
    stepped = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    for key in [key for key in _WEIGHT_DERIVED if key[0] in stepped]:
        _WEIGHT_DERIVED.pop(key, None)


register_optimizer_step_post_hook(_forget_what_an_optimizer_stepped)


def _derived_from_weight(weight: torch.Tensor, what: tuple, make):
    """make(weight) for a frozen weight, cached under `what`; recomputed when weight needs grad."""
    if weight.requires_grad or torch.compiler.is_compiling():
        return make(weight.detach())
    if weight.is_inference():  # no version counter to tell an in-place change by
        return make(weight)
    owner = weight._base if weight._base is not None else weight
    # the data pointer too: `param.data = other` swaps the storage but keeps the object and version
    key = (id(owner), weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, what)
    cached = _WEIGHT_DERIVED.get(key)
    if cached is not None and cached[0]() is owner and cached[1] == weight._version:
        return cached[2]
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        return make(weight)  # a captured kernel does not run: what it makes now is not kept
    # entries of this owner made from another storage (before a `param.data = other`) are stale
    for stale in [k for k in _WEIGHT_DERIVED if k[0] == key[0] and k[5] == what and k[1] != key[1]]:
        _WEIGHT_DERIVED.pop(stale, None)
    # plain tensors even under torch.inference_mode: inference tensors could not be saved for
    # the backward of a later call with autograd on
    with torch.inference_mode(False):
        derived = make(weight)
        # the entry holds the storage it was made from, so that storage cannot be freed and its
        # address handed to another tensor that would then find this entry under its key
        storage_holder = weight.detach()
    _WEIGHT_DERIVED[key] = (weakref.ref(owner, _forget_when_freed(key)), weight._version, derived, storage_holder)
    return derived


def _tap_sums(weight: torch.Tensor, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """S1 = sum_taps W0 and S2 = sum_taps W0^2, [Cout, Cin] in compute_dtype."""

    def make(weight):
        wide = weight.to(compute_dtype)
        return wide.sum((2, 3)), wide.square().sum((2, 3))

    return _derived_from_weight(weight, ("tap_sums", compute_dtype), make)


class _Demodulation(torch.autograd.Function):
    """`demodulation_coefficients` with a hand-written backward: autograd through the formula
    records ~40 small ops a layer, and at batch 8 their host time exceeded the GPU time of
    every layer up to 64 px (see BENCHMARKS.md). Tokens are handled as [1 or B, L, C]."""

    @staticmethod
    def forward(ctx, weight, styles, p, q, scale, eps):
        # in float32 at least, also under autocast (which would round the matmuls to bf16)
        device_type = weight.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return _Demodulation._forward(ctx, weight, styles, p, q, scale, eps)
        return _Demodulation._forward(ctx, weight, styles, p, q, scale, eps)

    @staticmethod
    def _forward(ctx, weight, styles, p, q, scale, eps):
        compute_dtype = torch.promote_types(weight.dtype, torch.float32)
        s1, s2 = _tap_sums(weight, compute_dtype)
        styles_c = styles.to(compute_dtype)
        energy = (styles_c.square() @ s2.t()).mul_(scale**2)
        p3 = q3 = styled_q = lowrank_u = gram_p = None
        if p is not None:
            p3 = (p if p.ndim == 3 else p[None]).to(compute_dtype)
            q3 = (q if q.ndim == 3 else q[None]).to(compute_dtype)
            styled_q = q3 * styles_c[:, None, :]  # [B, L, Cin]
            lowrank_u = styled_q @ s1.t()  # [B, L, Cout]
            gram_p = (q3 @ q3.transpose(1, 2)) @ p3  # [1 or B, L, Cout]
            energy += (p3 * lowrank_u).sum(1).mul_(2 * scale)
            energy += (p3 * gram_p).sum(1).mul_(weight.shape[2] * weight.shape[3])
        positive = energy > 0  # sum K^2 >= 0 exactly; clamping only removes cancellation below 0
        demod = torch.rsqrt(energy.clamp_min_(0) + eps)
        ctx.save_for_backward(
            weight, styles_c, p3, q3, styled_q, lowrank_u, gram_p, demod, positive, s1, s2, styles, p, q
        )
        ctx.options = (scale, p is not None and p.ndim == 2, styles.dtype, p.dtype if p is not None else None, eps)
        return demod

    @staticmethod
    def backward(ctx, grad_demod):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative will follow
            return _Demodulation._backward_to_differentiate(ctx, grad_demod)
        weight, styles, p3, q3, styled_q, lowrank_u, gram_p, demod, positive, s1, s2 = ctx.saved_tensors[:11]
        scale, shared, styles_dtype, token_dtype, _ = ctx.options
        need_weight, need_styles, need_p, need_q = ctx.needs_input_grad[:4]
        taps = weight.shape[2] * weight.shape[3]
        # d = (E + eps)^-1/2: dE = -d^3 / 2 * grad d (zero where E was clamped)
        grad_energy = grad_demod.to(demod.dtype) * demod.pow(3) * -0.5 * positive
        grad_weight = grad_styles = grad_p = grad_q = None
        if need_styles:
            grad_styles = (grad_energy @ s2).mul_(styles).mul_(2 * scale**2)
        if p3 is not None:
            weighted_p = grad_energy[:, None, :] * p3  # [B, L, Cout]
            cross_v = weighted_p @ s1  # [B, L, Cin]: d cross / d (q * s)
            if need_styles:
                grad_styles += (q3 * cross_v).sum(1).mul_(2 * scale)
            # the residual term sum_l p (q q^T p) has no styles in it: with shared tokens its
            # gradients need only the batch's total dE
            residual_energy = grad_energy.sum(0, keepdim=True) if shared else grad_energy  # [1 or B, Cout]
            if need_p:
                grad_p = lowrank_u.mul(2 * scale).mul_(grad_energy[:, None, :])
                grad_p = grad_p.sum(0, keepdim=True) if shared else grad_p
                grad_p += gram_p.mul(2 * taps).mul_(residual_energy[:, None, :])
                grad_p = (grad_p[0] if shared else grad_p).to(token_dtype)
            if need_q:
                # residual = sum_o dE_o p_o^T (q q^T) p_o: its q-gradient is 2 (p diag(dE) p^T) q
                outer = (residual_energy[:, None, :] * p3) @ p3.transpose(1, 2)  # [1 or B, L, L]
                grad_q = (cross_v * styles[:, None, :]).mul_(2 * scale)
                grad_q = grad_q.sum(0, keepdim=True) if shared else grad_q
                grad_q += (outer @ q3).mul_(2 * taps)
                grad_q = (grad_q[0] if shared else grad_q).to(token_dtype)
        if need_weight:  # E depends on W0 through S2 = sum W0^2 and S1 = sum W0 over the taps
            grad_s2 = (grad_energy.t() @ styles.square()).mul_(scale**2)  # [Cout, Cin]
            grad_weight = weight.to(grad_s2.dtype) * (2 * grad_s2)[:, :, None, None]
            if p3 is not None:
                grad_s1 = weighted_p.flatten(0, 1).t() @ styled_q.flatten(0, 1)  # [Cout, Cin]
                grad_weight += grad_s1.mul_(2 * scale)[:, :, None, None]
            grad_weight = grad_weight.to(weight.dtype)
        if grad_styles is not None:
            grad_styles = grad_styles.to(styles_dtype)
        return grad_weight, grad_styles, grad_p, grad_q, None, None

    @staticmethod
    def _backward_to_differentiate(ctx, grad_demod):
        """The backward as autograd's own graph of the closed form, on the inputs themselves, so
        that it can be differentiated again (path-length regularisation, NVlabs' Greg phase)."""
        weight, styles, p, q = (ctx.saved_tensors[0], *ctx.saved_tensors[11:])
        scale, eps = ctx.options[0], ctx.options[4]
        inputs = [(t, need) for t, need in zip((weight, styles, p, q), ctx.needs_input_grad[:4])]
        wanted = [t for t, need in inputs if need]
        demod = _demodulation_traced(weight, styles, p, q, scale, eps)
        grads = iter(torch.autograd.grad(demod, wanted, grad_demod, create_graph=True, allow_unused=True))
        return (*(next(grads) if need else None for _, need in inputs), None, None)


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
    # Without a graph to record (inference, or every input frozen), each step after the conv
    # overwrites the conv's fresh result instead of allocating its own: one pass over memory
    # a step, and on the CPU no page faults for a fresh tensor a step (glibc maps every
    # allocation above 32 MB anew: 0.27 ms a MB on this CPU, more than the step's arithmetic).
    in_place = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, styles, p, q, noise, noise_strength, bias)
    ))  # fmt: skip
    if _torch_modulates_the_matrix(kernel, upsample, weight.shape[0], x.shape[2] * x.shape[3]):
        y = _modulated_conv1x1_torch(x, weight, styles, p, q, demodulate=demodulate, eps=eps, scale=scale)
        in_place = in_place and y.dtype == x.dtype
        return _epilogue(y, noise, noise_strength, bias, activate, clamp, in_place=in_place)
    styled_x = x * styles[:, :, None, None]
    if upsample:
        y = F.conv_transpose2d(styled_x, (weight * scale).transpose(0, 1), stride=UPSAMPLE_FACTOR, padding=0)
    else:
        y = F.conv2d(styled_x, weight * scale, padding=kernel // 2)
    del styled_x
    in_place = in_place and y.dtype == x.dtype  # autocast's conv result: the steps promote it, as before
    if p is not None:
        if q.ndim == 2:  # shared tokens: V @ x and U @ (.) are 1x1 convs
            boxed = _box(F.conv2d(x, q[:, :, None, None]), kernel, upsample)
            p_t = p.t()
        else:
            boxed = _box(torch.einsum("blc,bchw->blhw", q, x), kernel, upsample)
            p_t = p.transpose(1, 2)
        channels_last = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        if in_place and (y.is_contiguous() or channels_last):  # y += p^T box(q x), one batched GEMM into y
            batch, out_channels = y.shape[:2]
            p_t = p_t.expand(batch, *p_t.shape[-2:])  # [B, Cout, L]
            boxed = boxed.reshape(batch, boxed.shape[1], -1)  # [B, L, pixels]
            # out= rather than baddbmm_: FlopCounterMode counts baddbmm, not its in-place form
            if channels_last:  # as [B, pixels, Cout]
                y3 = y.permute(0, 2, 3, 1).view(batch, -1, out_channels)
                torch.baddbmm(y3, boxed.mT, p_t.mT, out=y3)
            else:
                y3 = y.view(batch, out_channels, -1)
                torch.baddbmm(y3, p_t, boxed, out=y3)
        elif q.ndim == 2:
            y = y + F.conv2d(boxed, p_t[:, :, None, None])
        else:
            y = y + torch.einsum("bol,blhw->bohw", p_t, boxed)
        del boxed
    if upsample:
        y = upfirdn2d(y, upsample_blur_kernel(y.dtype, y.device), pad=UPSAMPLE_BLUR_PAD)
    if demodulate:
        d = _demodulation_coefficients(weight, styles, p, q, scale, eps).to(y.dtype)[:, :, None, None]
        y = y.mul_(d) if in_place else y * d
    return _epilogue(y, noise, noise_strength, bias, activate, clamp, in_place=in_place)


def _torch_modulates_the_matrix(kernel: int, upsample: bool, out_channels: int, pixels: int) -> bool:
    """Whether the torch backend runs a layer as `_modulated_conv1x1_torch`: a 1x1 conv whose
    per-sample [Cout, Cin] matrices are no bigger than x (Cout <= H * W; every toRGB)."""
    return kernel == 1 and not upsample and out_channels <= pixels


def _modulated_conv1x1_torch(x, weight, styles, p, q, *, demodulate, eps, scale):
    """The torch backend's 1x1 conv (the toRGB): y_b = K_b x_b as one batched GEMM.

    A 1x1 conv is a GEMM over pixels whether its weight is shared or per sample, so where the
    [Cout, Cin] matrix is no bigger than x it is modulated (B * Cout * Cin multiplies, with the residual and the
    demodulation folded in, as the reference does it) instead of x (a pass over the activation: at 256 px the toRGB ran at
    0.25x the reference's speed on the CPU for it). Channels-last x gives a channels-last y.
    """
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    kernels = (scale * weight.reshape(out_channels, in_channels))[None] * styles[:, None, :]  # [B, Cout, Cin]
    if p is not None:
        kernels = kernels + p.transpose(-1, -2) @ q  # [(B,) Cout, Cin]: broadcasts over B when shared
    if demodulate:  # from the matrix itself: Cout * Cin values a sample, as cheap as the closed form
        energy = kernels.to(torch.promote_types(kernels.dtype, torch.float32)).square().sum(-1, keepdim=True)
        kernels = kernels * torch.rsqrt(energy + eps).to(kernels.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():  # as [B, pixels, Cin]
        pixels_last = x.permute(0, 2, 3, 1).reshape(batch, height * width, in_channels)
        y = torch.bmm(pixels_last, kernels.transpose(1, 2))
        return y.view(batch, height, width, out_channels).permute(0, 3, 1, 2)
    y = torch.bmm(kernels, x.reshape(batch, in_channels, height * width))
    return y.view(batch, out_channels, height, width)


# === Triton backend ===
# The separated form of the op in fused Triton kernels, their autograd and their
# torch.library registration. Called by `styled_conv2d` with the normalised arguments of
# `_validate`. Design notes (docs/kernels.md has the long version):
#
# Forward, plain 3x3 / 1x1 layer (one kernel, `_conv_gemm_kernel`, MODE 0):
#     an implicit GEMM over channels-last activations: M = the pixels of one sample
#     (a tile never straddles two samples, so s_b, d_b and p_b are uniform over it),
#     N = Cout, K = Cin x taps. The input tile is scaled by s_b as it is loaded; the
#     weight [taps, Cin, Cout] is the one W0 shared by the whole batch. The low-rank
#     term rides in the same program: z = q_b x (an [B, H, W, L] projection, one
#     batched GEMM in torch) is box-summed over the taps in registers and hit by p_b
#     with one more tl.dot. Epilogue: * d (and * scale), + strength * noise + bias,
#     leaky ReLU * sqrt(2), clamp, store in x's dtype. fp32 accumulation always.
# Forward, upsampling layer (two kernels):
#     `_conv_gemm_kernel` MODE 2 is the stride-2 transposed conv as a gather, split in
#     the four output phases (even/odd row x even/odd column) so that every program
#     runs only the taps that hit its phase (4 + 2 + 2 + 1 of the 9): no MAC is wasted
#     on the zeros of the dilated input. It writes T [B, 2H+1, 2W+1, Cout] in x's dtype
#     (times d); `_blur_kernel` applies the 4x4 [1,3,3,1] FIR with pad (1, 1), separably
#     (a rolling window of filtered rows), and the epilogue.
# Backward:
#     `_epilogue_backward_kernel` turns grad_out and the saved output into
#     g = grad of the conv result (times d), and reduces over pixels the partial sums of
#     grad bias, grad noise strength and grad d (the pre-activation is recovered from
#     the saved output: leaky ReLU is invertible, clamped pixels have zero gradient).
#     For the upsampling layer `_blur_kernel` does the same and takes g on back through
#     the FIR's adjoint to T's grid in one pass (g itself is never stored).
#     `_conv_gemm_kernel` MODE 0 (flipped taps) or MODE 1 (stride-2 gather, the adjoint
#     of the transposed conv) gives grad x = s * scale * conv^T(g) + box^T(g p_b^T) q_b,
#     and, in the same epilogue, the partial sums over pixels of x * conv^T(g) that
#     make the conv part of grad s. The small [B, L, C]-sized products (grad p, grad q)
#     are batched GEMMs in torch; grad d goes back through `demodulation_coefficients`
#     by autograd (tiny [B, Cout]-sized ops). The weight gradient is computed only when
#     weight.requires_grad (RefineStyle freezes the generator): one dense conv weight
#     gradient (aten.convolution_backward, cuDNN on CUDA) of g against x * s, shared
#     by the batch, never a per-sample kernel.
#
# Precision: operands are loaded in x's dtype (fp16/bf16 go to tl.dot as they are),
# everything accumulates in fp32; the intermediates that reach memory (T, g, z) are stored
# in x's dtype, each rounded once from its fp32 sum, and their sums over taps and pixels
# are taken in fp32 again by the kernels that read them. fp32 inputs use
# TF32 tensor-core dots when `TRITON_FP32_PRECISION` is "tf32", exact fp32 ("ieee")
# when it is "ieee"; None (the default) follows torch.backends.cudnn.allow_tf32, the
# switch PyTorch's own convolutions obey (True by default).

try:  # importing the package must never fail for want of a usable Triton
    import triton
    import triton.language as tl
except Exception as _triton_error:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: Exception | None = _triton_error
else:
    _TRITON_IMPORT_ERROR = None

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - depends on the Triton version
    TensorDescriptor = None

# None: follow torch.backends.cudnn.allow_tf32; "tf32" or "ieee" force the choice for fp32 inputs.
TRITON_FP32_PRECISION: str | None = None

# 1-D taps of the upsampling blur, normalised so the 2-D outer product sums to UPSAMPLE_FACTOR**2.
_BLUR_TAPS_1D = tuple(t / sum(UPSAMPLE_BLUR_TAPS) * UPSAMPLE_FACTOR for t in UPSAMPLE_BLUR_TAPS)

# Layers with at most this many output channels (at most two N tiles recompute it) project
# x onto the L tokens inside the conv kernel instead of writing z = q x [B, H, W, L]
# and reading it back: the high-resolution layers are memory-bound and z is as big as
# their output. Wider layers are compute-bound; there one batched GEMM for z is cheaper
# than recomputing it for every N tile. L > 64 always uses the separate GEMM.
FUSED_PROJECTION_MAX_COUT = 128

# `styled_conv2d_to_rgb` computes the toRGB in the conv's epilogue, from the stored output tile,
# when one N tile spans every output channel (the widest tile is 128: the 256 px to 1024 px
# layers of config-f); the toRGB then never reads the activation back. Wider layers launch it
# as its own 1x1 conv.
RGB_EPILOGUE_MAX_COUT = 128
# ... and where the toRGB has at most this many output channels: the epilogue computes it as one
# dot padded to 16 columns (config-f's toRGB has 3).
RGB_EPILOGUE_MAX_CHANNELS = 16

# False: launch the conv kernels with one heuristic tile config instead of autotuning them on
# the first call of every shape (quicker start-up, e.g. for tests; a bit slower kernels).
TRITON_AUTOTUNE = True

# True: keep the autotuner's choices on disk (Triton's cache directory, keyed by the kernel's
# source, the GPU and the launch shape), so only the first process on a machine pays for the
# tuning (27-75 s for the first 1024 px training step on the H100).
TRITON_AUTOTUNE_DISK_CACHE = True

# Software-pipelining depth of the `_conv_gemm_kernel` launches that are not autotuned (the
# autotuned ones try the depths in `_CONV_SHAPES`).
CONV_NUM_STAGES = 3

# Where the launches that are not autotuned apply the styles: True scales the W tile in
# registers (both MMA operands stay in shared memory), False the A tile (A becomes a register
# operand, which ptxas serialises on Hopper for their 64 x 64 tile; see
# `python -m benchmarks.kernel_audit`). The autotuned launches try both.
CONV_SCALE_WEIGHT = True

# Whether the stride-1 launches of the conv kernel may load the input tile with the Hopper
# tensor-memory accelerator (TMA) instead of pointer gathers: one bulk copy of a 1 x BLOCK_M
# strip of pixels per step, zero-filled outside the image, straight into the shared memory the
# wgmma reads (no per-element address arithmetic, no register copy of A). Needs sm_90 (or the
# interpreter), channels-last rows 16-byte aligned, and the styles on W. The autotuner tries it
# next to the pointer variants; the untuned path uses it where it applies.
CONV_TMA = True

# Bytes a thread copies per asynchronous copy of a tile that the taps of a 3x3 box re-read: the
# conv's input tile, the pixel products' boxed tile (TMA loads are bulk copies through L2). The
# nine taps' tiles of a pixel block overlap, so their loads are meant to hit L1 (`.ca`). Triton
# 3.9 keeps that cache modifier on a 16-byte cp.async; Triton 3.6 (torch 2.11's, the GPU
# machine's) lowers every 16-byte cp.async to `.cg`, which bypasses L1, and honours `.ca` only on
# narrower copies (checked in the PTX for sm_90a): there every tap re-reads its tile from L2.
# 8: copies of 8 bytes (`.ca`, twice the copy instructions); 16: as wide as the layout allows.
# The default is 8 under Triton versions before 3.9, else 16 (`_default_tap_load_bytes`).


def _triton_version() -> tuple[int, int]:
    if triton is None:
        return (0, 0)
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def _default_tap_load_bytes(version: tuple[int, int]) -> int:
    return 8 if version < (3, 9) else 16


TAP_LOAD_BYTES: int = _default_tap_load_bytes(_triton_version())


def _tap_vector(element_size: int) -> int:
    """Elements per copy of a tile the box's taps re-read (`A_VECTOR` of `_conv_gemm_kernel`,
    `TAP_VECTOR` of `_pixel_products_kernel`), or 0 for as wide as the layout allows (see
    `TAP_LOAD_BYTES`)."""
    if TAP_LOAD_BYTES not in (4, 8, 16):
        raise ValueError(f"TAP_LOAD_BYTES: expected 4, 8 or 16, got {TAP_LOAD_BYTES!r}")
    return 0 if TAP_LOAD_BYTES == 16 else max(1, TAP_LOAD_BYTES // element_size)


# Shared memory the autotuner lets a config's pipelined tiles take (num_stages x (A tile + W
# tile)): the H100 has 227 KB per block, and the epilogue's layout conversions need some too.
CONV_SHARED_MEMORY_BUDGET = 160 * 1024

# Software-pipelining depth of the memory-bound kernels' loops: the epilogue backward's pixel
# blocks, the pixel products' pixel blocks (with a box, its taps). Triton pipelines a loop's
# plain loads (cp.async into shared memory, issued this many iterations ahead) only in a
# `tl.range(..., num_stages=N)` loop whose loaded values are used in their own iteration; in a
# plain `range` loop without a dot fed by its loads it issues each iteration's loads when the
# iteration starts, so every iteration waits out the memory latency (Triton 3.6 and 3.9 alike;
# the "loads" column of `benchmarks.kernel_audit` says which launches load by cp.async). 1: the
# unpipelined loops of sessions up to 26.
LOAD_STAGES = 3

# `_epilogue_backward_kernel`: pixel blocks of at most this many values (pixels x channels), and
# programs that each walk up to EPILOGUE_BACKWARD_MAX_TILES consecutive blocks (fewer where that
# would leave under EPILOGUE_BACKWARD_MIN_PROGRAMS programs), keeping the small gradients' terms
# in registers and storing one row of sums a program. With LOAD_STAGES = 3, blocks of 512 values
# take 64-96 registers (5-8 programs an SM); 1024 took 93-143 (Triton 3.9, sm_90a). Until
# session 26 each program ran one block of 2048 values (1024 without an output gradient): for
# the 1024 px layer 262,144 programs, each ending in six cross-warp reductions, and 0.2 GB of
# per-block sums written next to 1.2 GB of activations, then read back to finish the sums.
EPILOGUE_BACKWARD_BLOCK_VALUES = 512
EPILOGUE_BACKWARD_MAX_TILES = 32
EPILOGUE_BACKWARD_MIN_PROGRAMS = 2112  # 16 per H100 SM

# The autotuner's cache key: everything that changes which tile is fastest (Triton adds the
# dtypes of the tensor arguments itself).
CONV_AUTOTUNE_KEY = [
    "N", "K", "L", "GRID_H", "GRID_W", "TMA_BLOCK_M", "BATCH_BUCKET", "MODE", "KSIZE", "HAS_A_SCALE", "HAS_LOWRANK", "BOX_Z", "FUSE_PROJECTION",
    "REDUCE_X", "RGB_CHANNELS", "TOKEN_PRODUCTS", "TILES_PER_PROGRAM", "INPUT_PRECISION",
]  # fmt: skip

# CUDA limits grid dimensions 1 and 2 to 65535 programs; the batch is dimension 1 or 2 of every
# launch, so larger batches are run in chunks of this many samples.
MAX_LAUNCH_BATCH = 65535

# Tests set this to True: every buffer the Triton path allocates starts as NaN, so an element
# a kernel forgets to write shows up in the result instead of passing as leftover memory.
POISON_BUFFERS = False


# A profiling switch (benchmarks/profile.py): when True, each layer's forward and backward
# launches run inside a torch.profiler range named after the layer's shape
# ("refinestyle conv 128->128 256x256 backward"), so a profile can say which layer's kernels
# take the time. False (the default) costs one global lookup per layer call.
PROFILE_RANGES = False

# A planning hook (benchmarks/traffic.py): when set, every kernel launch site calls it with
# (kernel name, tensors the launch reads, tensors it writes), also on meta tensors, where
# nothing is launched. None (the default) costs one global lookup per launch.
LAUNCH_OBSERVER = None


def layer_call_shape(in_channels: int, out_channels: int, height: int, width: int, upsample: bool) -> str:
    """The shape part of a layer call's profile range: "conv Cin->Cout HxW[ up]" (input H x W)."""
    return f"conv {in_channels}->{out_channels} {height}x{width}{' up' if upsample else ''}"


def profile_range_label(direction: str, x: torch.Tensor, out_channels: int, upsample: bool, rgb: bool = False) -> str:
    """The profiler range of one layer call: `layer_call_shape`, then " +toRGB" where the call
    also runs its toRGB, then the direction (x: the layer's input [B, Cin, H, W];
    `PROFILE_RANGES`), opened as "refinestyle " + that."""
    shape = layer_call_shape(x.shape[1], out_channels, x.shape[2], x.shape[3], upsample)
    return f"{shape}{' +toRGB' if rgb else ''} {direction}"


_OPEN_RANGES = threading.local()  # .labels: the profile ranges open in this thread, innermost last


@contextlib.contextmanager
def profile_range(label: str):
    """A profiler range named "refinestyle " + label around the block, also kept on a per-thread
    stack that `open_profile_range` reads: the traffic planner (benchmarks/traffic.py) labels
    each launch with it, so the profile's kernel time and the planned bytes meet per layer call."""
    stack = _OPEN_RANGES.__dict__.setdefault("labels", [])
    stack.append(label)
    try:
        with torch.profiler.record_function(f"refinestyle {label}"):
            yield
    finally:
        stack.pop()


def open_profile_range() -> str | None:
    """The innermost `profile_range` open in this thread (its label), or None."""
    stack = getattr(_OPEN_RANGES, "labels", None)
    return stack[-1] if stack else None


def _profiled(direction: str, x_index: int, weight_index: int, upsample_index: int):
    """Run the wrapped layer function inside a profiler range when `PROFILE_RANGES` is set."""

    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            if not PROFILE_RANGES:
                return function(*args, **kwargs)
            label = profile_range_label(
                direction, args[x_index], args[weight_index].shape[0], bool(args[upsample_index]),
                kwargs.get("rgb") is not None,
            )  # fmt: skip
            with profile_range(label):
                return function(*args, **kwargs)

        return call

    return wrap


def addressed_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements `tensor` addresses: an expanded (stride-0) dimension counts
    once. What a launch must move of it at the least (the launch records and benchmarks/traffic.py)."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


def _least_bytes(reads, writes) -> int:
    """Bytes a launch must move at the least: each distinct tensor it reads or writes, once."""
    distinct = {id(t): t for t in (*reads, *writes) if isinstance(t, torch.Tensor)}
    return sum(addressed_bytes(t) for t in distinct.values())


def _observe_launch(kernel: str, reads, writes) -> None:
    if LAUNCH_OBSERVER is not None:

        def tensors(group):  # a tensor passed twice (alpha and beta both d) is read once
            found = {id(t): t for t in group if isinstance(t, torch.Tensor)}
            return list(found.values())

        LAUNCH_OBSERVER(kernel, tensors(reads), tensors(writes))


def _alloc(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


# key -> a small constant tensor the Triton path reuses on every call (`_kept_constant`)
_CONSTANTS: dict = {}


def _kept_constant(key: tuple, make) -> torch.Tensor:
    """make() once per key (which names the device), then the same tensor: a constant made on
    every call would cost a kernel launch each time. While a CUDA graph is being captured a
    fresh one is made and not kept: a kernel captured is not run, so a kept one would hold
    garbage for every later eager call."""
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = make()
        if not (constant.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _CONSTANTS[key] = constant
    return constant


def _ones(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """[rows, columns] fp32 ones with stride 0: the alpha or beta of a launch that has none."""
    return _kept_constant(("ones", device), lambda: torch.ones((1, 1), dtype=torch.float32, device=device)).expand(
        rows, columns
    )


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grid arithmetic: `triton.cdiv` is a constexpr function whose
    call from Python costs microseconds, a dozen times a layer."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _reduce_block_m(pixels: int) -> int:
    """The M tile of launches whose per-tile partial sums are reduced afterwards. It is a
    function of the pixel count alone, so every launch (autotuned or not) writes every row
    of the partial-sum buffer its caller sized with it."""
    return min(64, max(16, _next_pow2(pixels)))


def _tile_width(block_m: int, grid_w: int) -> int:
    """Columns of `_conv_gemm_kernel`'s 2-D pixel block: about square (16 x 8 for 128 pixels,
    8 x 8 for 64), and no wider than the pixel grid."""
    return min(1 << (block_m.bit_length() // 2), _next_pow2(grid_w), block_m)


def _pixel_tiles(grid_h: int, grid_w: int, block_m: int, tile_w: int | None = None) -> int:
    """How many 2-D pixel blocks of `block_m` pixels, `tile_w` (default `_tile_width`) wide,
    `_conv_gemm_kernel` tiles a grid_h x grid_w grid with."""
    tile_w = tile_w or _tile_width(block_m, grid_w)
    return -(-grid_h // (block_m // tile_w)) * -(-grid_w // tile_w)


# Pixels a TMA strip of the conv kernel's input may span: 128, and 256 for the narrow layers
# whose pixel rows (channels x element size, rounded up to a power of two) are at most
# CONV_TMA_NARROW_ROW_BYTES (config-f's 1024 px forward: 32 bf16 channels). There the conv
# issues more instructions than it moves bytes or multiplies, and the instructions a pixel costs
# fall with the pixels a program takes: with TMA loads, 65 warp instructions a pixel at
# 128 x 32 x 32 (4 warps), 44 at 256 x 32 x 32 (`python -m benchmarks.kernel_audit --families
# "one K block"`, Triton 3.6).
CONV_TMA_STRIP = 128
CONV_TMA_NARROW_STRIP = 256
CONV_TMA_NARROW_ROW_BYTES = 64


def _tma_block(grid_w: int, k: int, element_size: int, reduce_pixels: int | None) -> tuple[int, int]:
    """(strip length, BLOCK_K) of the conv kernel's TMA loads: a whole row of up to
    `CONV_TMA_STRIP` pixels (`CONV_TMA_NARROW_STRIP` for narrow rows), or the M tile a reducing
    launch must use; at most 128 bytes of channels per pixel (64 in bf16, 32 in fp32), the
    widest row a 128-byte-swizzled TMA box may have."""
    block_k = min(128 // element_size, max(16, _next_pow2(k)))
    if reduce_pixels is not None:
        return _reduce_block_m(reduce_pixels), block_k
    strip = CONV_TMA_NARROW_STRIP if block_k * element_size <= CONV_TMA_NARROW_ROW_BYTES else CONV_TMA_STRIP
    return min(strip, _next_pow2(grid_w)), block_k


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_descriptor(a: torch.Tensor, mode: int, grid_w: int, reduce_pixels: int | None):
    """A TMA descriptor of the conv kernel's input a [B, H, W, K] (channels last) for the
    stride-1 launches, or None where TMA does not apply: off (`CONV_TMA`), an old Triton, no
    sm_90 GPU (the interpreter emulates it), rows not 16-byte aligned, or strips that would
    not fit in a row (the strip must not wrap onto the next one)."""
    if not CONV_TMA or TensorDescriptor is None or mode != 0 or not a.is_contiguous():
        return None
    if not (_interpreted() or _has_tma(a.device)):
        return None
    block_m, block_k = _tma_block(grid_w, a.shape[3], a.element_size(), reduce_pixels)
    if block_m < 16 or block_m > _next_pow2(grid_w) or (a.shape[3] * a.element_size()) % 16 or a.data_ptr() % 16:
        return None
    return TensorDescriptor.from_tensor(a, [1, 1, block_m, block_k])


def _fp32_input_precision() -> str:
    choice = TRITON_FP32_PRECISION
    if choice is None:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    if choice not in ("tf32", "ieee"):
        raise ValueError(f'TRITON_FP32_PRECISION: expected None, "tf32" or "ieee", got {choice!r}')
    return choice


if triton is not None:

    @triton.jit
    def _in_runs(BLOCK: tl.constexpr, VECTOR: tl.constexpr):
        """tl.arange(0, BLOCK), as offsets whose contiguity Triton reads as runs of VECTOR
        elements (0: the whole block), so that it copies them VECTOR elements at a time
        (`TAP_LOAD_BYTES`). The values are the same."""
        lanes = tl.arange(0, BLOCK)
        if VECTOR > 0:
            lanes = (lanes // VECTOR) * VECTOR + lanes % VECTOR
        return lanes

    @triton.jit
    def _apply_epilogue(
        acc,
        b,
        out_y,
        out_x,
        m_ok,
        offs_n,
        n_ok,
        noise_ptr,
        noise_strength_ptr,
        bias_ptr,
        stride_noise_b,
        stride_noise_h,
        stride_noise_w,
        clamp_value,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
    ):
        """acc [BLOCK_M, BLOCK_N] fp32 -> act(acc + strength * noise + bias), clamped."""
        noise = 0.0
        strength = 0.0
        bias = 0.0
        if HAS_NOISE:
            noise = tl.load(
                noise_ptr + b * stride_noise_b + out_y * stride_noise_h + out_x * stride_noise_w,
                mask=m_ok,
                other=0.0,
            )
            strength = tl.load(noise_strength_ptr).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        return _epilogue_of(acc, noise, strength, bias, clamp_value, HAS_NOISE, HAS_BIAS, ACTIVATE, HAS_CLAMP)

    @triton.jit
    def _epilogue_of(
        acc,  # [BLOCK_M, BLOCK_N] fp32
        noise,  # [BLOCK_M] any float dtype, if HAS_NOISE
        strength,  # fp32 scalar, if HAS_NOISE
        bias,  # [BLOCK_N] fp32, if HAS_BIAS
        clamp_value,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
    ):
        """`_apply_epilogue` from values its caller has loaded."""
        if HAS_NOISE:
            acc += strength * noise.to(tl.float32)[:, None]
        if HAS_BIAS:
            acc += bias[None, :]
        if ACTIVATE:
            acc = tl.where(acc > 0, acc, acc * 0.2) * 1.4142135623730951
        if HAS_CLAMP:
            acc = tl.minimum(tl.maximum(acc, -clamp_value), clamp_value)
        return acc

    # BATCH_BUCKET only keys the autotuner: not specialised, so each batch size reuses the binaries
    @triton.jit(do_not_specialize=["BATCH_BUCKET"])
    def _conv_gemm_kernel(
        a_ptr,  # [B, IN_H, IN_W, K] activations, channels last, contiguous
        a_desc,  # TMA descriptor of a, block [1, 1, TMA_BLOCK_M, BLOCK_K], if A_TMA (else unused)
        a_scale_ptr,  # [B, K] multiplier of a as it is loaded (the styles), if HAS_A_SCALE
        w_ptr,  # [KSIZE*KSIZE, K, N] weight, contiguous
        z_ptr,  # [B, IN_H, IN_W, L] (BOX_Z) or [B, OUT_H, OUT_W, L], a's dtype: the projected low-rank input
        r_ptr,  # [B or 1, L, N] low-rank output map (p for the forward, q for grad x)
        q_ptr,  # [B or 1, L, K] projection of a, if FUSE_PROJECTION (then z_ptr is unused)
        alpha_ptr,  # [B, N] multiplier of the conv part (strided, any float dtype), times alpha_scale
        beta_ptr,  # [B, N] fp32 multiplier of the low-rank part (strided)
        out_ptr,  # [B, OUT_H, OUT_W, N] channels last, contiguous
        noise_ptr,
        noise_strength_ptr,
        bias_ptr,
        x_ptr,  # [B, OUT_H, OUT_W, N] contiguous, if REDUCE_X
        reduce_ptr,  # [B, CHUNKS, N] fp32: sum over a program's pixels of x * conv part * alpha_scale, if REDUCE_X
        rgb_mix_ptr,  # [B, RGB_CHANNELS, N] fp32: the toRGB's styled 1x1 kernel, if RGB_CHANNELS
        rgb_bias_ptr,  # [RGB_CHANNELS] the toRGB's bias, if HAS_RGB_BIAS
        rgb_ptr,  # [B, OUT_H, OUT_W, RGB_CHANNELS] (strided) the toRGB's output, if RGB_CHANNELS
        grad_p_ptr,  # [B, CHUNKS, N_TILES, L, K] fp32: each program's token products for grad p, if TOKEN_PRODUCTS
        grad_q_ptr,  # [B, CHUNKS, L, N] fp32: each program's token products for grad q, if TOKEN_PRODUCTS
        IN_H,
        IN_W,
        OUT_H,
        OUT_W,
        GRID_H,  # the pixel grid a program tiles: OUT_H x OUT_W, or one phase's (IN_H+1) x (IN_W+1)
        GRID_W,
        TMA_BLOCK_M,  # a_desc's strip length, 0 without a descriptor (unused here: an autotuning key)
        BATCH_BUCKET,  # the batch rounded up to a power of two (unused here: an autotuning key)
        K,
        N,
        L,
        stride_rb,
        stride_qb,
        stride_alpha_b,
        stride_alpha_n,
        stride_beta_b,
        stride_beta_n,
        stride_noise_b,
        stride_noise_h,
        stride_noise_w,
        clamp_value,
        stride_rgb_b,
        stride_rgb_h,
        stride_rgb_w,
        stride_rgb_c,
        rgb_clamp_value,  # the toRGB's clamp bound, if HAS_RGB_CLAMP
        alpha_scale,  # fp32 factor of alpha (and of the REDUCE_X sums): the layer's weight scale
        MODE: tl.constexpr,  # 0: stride 1, same padding; 1: stride 2, no padding; 2: stride-2 transposed (phases)
        KSIZE: tl.constexpr,
        HAS_A_SCALE: tl.constexpr,
        HAS_LOWRANK: tl.constexpr,
        BOX_Z: tl.constexpr,  # sum z over the taps (else z is already at the output grid)
        FUSE_PROJECTION: tl.constexpr,  # box(z) = sum over taps of (a tile) @ q^T, in registers; L <= BLOCK_L
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        REDUCE_X: tl.constexpr,
        RGB_CHANNELS: tl.constexpr,  # > 0: also the toRGB of the stored output (needs BLOCK_N >= N)
        HAS_RGB_BIAS: tl.constexpr,
        HAS_RGB_CLAMP: tl.constexpr,
        TOKEN_PRODUCTS: tl.constexpr,  # grad p and grad q of the forward's tokens (grad-x launches, one K block)
        TILES_PER_PROGRAM: tl.constexpr,  # pixel blocks a program runs (CHUNKS = ceil(blocks / this))
        INPUT_PRECISION: tl.constexpr,
        SCALE_WEIGHT: tl.constexpr,  # apply a_scale to the W tile (B operand) instead of the A tile
        A_TMA: tl.constexpr,  # load A by TMA (MODE 0, TILE_W == BLOCK_M: the block is one row strip)
        A_VECTOR: tl.constexpr,  # > 0: A's pointer loads copy this many elements at a time (`TAP_LOAD_BYTES`)
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: the main loop's loads need no K mask
        EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: nor its W loads an N mask
        SINGLE_K_BLOCK: tl.constexpr,  # K <= BLOCK_K: the projection and style tiles are loaded once
        BOX_BY_MMA: tl.constexpr,  # token products: sum box(a) by wgmma in the step loop (`_box_by_mma`)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_L: tl.constexpr,
        TILE_W: tl.constexpr,  # the BLOCK_M pixels form a (BLOCK_M // TILE_W) x TILE_W block of the grid
    ):
        """out = alpha * alpha_scale * conv(a * a_scale, w) + beta * (box(z) @ r), then the epilogue.
        With RGB_CHANNELS, also rgb = clamp(out @ mix^T + rgb_bias): the toRGB layer that reads
        out, computed from the tile as stored (one N tile holds every channel), so out is not
        read back from memory.

        With TOKEN_PRODUCTS (a grad-x launch: a is the output gradient g, q_ptr the forward's p,
        r_ptr its q, x_ptr its input) the program also sums the token gradients of the forward's
        low-rank branch over its pixels: grad p = (x q^T)^T box(g) and grad q = box(g p^T)^T x.
        box(g) is the sum over taps of the A tiles the conv loads anyway, so neither x nor g is
        read again for them.

        One program: TILES_PER_PROGRAM consecutive 2-D blocks of BLOCK_M pixels of one sample
        (axis 1) x BLOCK_N output channels. 2-D blocks (16 x 8 for 128 pixels) make the nine taps' shifted A tiles overlap
        in all but a one-pixel rim, and the A loads go through L1 (.ca) to reuse them. Axis 0
        runs over the N tiles fastest, so the programs that read the same A tiles run together
        and all but the first find them in L2 (A is the large operand: W is [taps, K, N]).
        """
        TILE_H: tl.constexpr = BLOCK_M // TILE_W
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_n = tl.program_id(0) % n_tiles
        # with TILES_PER_PROGRAM > 1 a program runs that many consecutive pixel blocks and keeps
        # its per-block sums (REDUCE_X, TOKEN_PRODUCTS) in registers, storing them once
        chunk = tl.program_id(0) // n_tiles
        b = tl.program_id(1).to(tl.int64)
        tiles_w = tl.cdiv(GRID_W, TILE_W)
        m_tiles = tl.cdiv(GRID_H, TILE_H) * tiles_w
        all_m_tiles = m_tiles * (4 if MODE == 2 else 1)
        chunks = tl.cdiv(all_m_tiles, TILES_PER_PROGRAM)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if FUSE_PROJECTION or TOKEN_PRODUCTS:
            offs_l = tl.arange(0, BLOCK_L)
            l_ok = offs_l < L
        # A program over several pixel blocks keeps grad s's terms unreduced until its last block
        # where that costs at most 16 registers a thread (4 warps): summed a block, across the
        # threads, they cost ~80 instructions a block (`benchmarks.kernel_audit`). Larger tiles
        # spilled with them (64 x 64 at 4 warps) and sum each block.
        X_SUMS_UNREDUCED: tl.constexpr = TILES_PER_PROGRAM > 1 and BLOCK_M * BLOCK_N <= 2048
        if REDUCE_X and X_SUMS_UNREDUCED:
            x_sums = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        elif REDUCE_X and TILES_PER_PROGRAM > 1:
            x_sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
        # Without BOX_BY_MMA, grad p's products a step are u^T a, L = 32 rows: mma.sync, not wgmma.
        # Where the K block has the 64 rows a wgmma takes, they are summed transposed instead,
        # [K, L] += a^T u, with a^T read from the A tile's shared memory and u stored there once a
        # block (`benchmarks.kernel_audit`: 64 x 64 x 64 at 4 warps, 16 mma.sync a step -> none)
        GRAD_P_TRANSPOSED: tl.constexpr = TOKEN_PRODUCTS and not BOX_BY_MMA and BLOCK_K >= 64
        if TOKEN_PRODUCTS:
            # grad p [L, K] = sum over pixels of (x r^T)^T box(a), partial over this N tile's
            # channels of x; grad q [L, N] = sum over pixels of box(a q^T)^T x = z_box^T x
            if GRAD_P_TRANSPOSED:
                grad_p_sums = tl.zeros((BLOCK_K, BLOCK_L), dtype=tl.float32)
            else:
                grad_p_sums = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
            grad_q_sums = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
            # the projection back onto x's channels, r [L, N], for the products' u = x r^T
            r_rows = tl.load(
                r_ptr + b * stride_rb + offs_l[:, None] * N + offs_n[None, :],
                mask=l_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
        # the token products sum the A tiles of every tap into one [L, K] tile: one K block
        tl.static_assert(SINGLE_K_BLOCK or not TOKEN_PRODUCTS)
        # grad p's products u^T a, one a step, have L rows: with L = 32 too few for a Hopper
        # wgmma, and the compiler made each 16 mma.sync and 13 shared-memory loads (a quarter of
        # the 1024 px layer's step loop). With BOX_BY_MMA the step loop sums box(a) instead, one
        # more wgmma a step (a @ I), and u^T box(a) is one dot a block (`_box_by_mma`).
        tl.static_assert(TOKEN_PRODUCTS or not BOX_BY_MMA)
        if BOX_BY_MMA:
            offs_k_eye = tl.arange(0, BLOCK_K)
            # from fp32, not bool: the interpreter turns a bool into a 16-bit float bit for bit
            eye = tl.where(offs_k_eye[:, None] == offs_k_eye[None, :], 1.0, 0.0).to(a_ptr.dtype.element_ty)
        # With one K block the projection and style tiles are the same at every step: loaded once
        # here, they leave the step loop one load stream (and its shared-memory ring) fewer each.
        if SINGLE_K_BLOCK:
            offs_k_whole = tl.arange(0, BLOCK_K)
            k_whole_ok = (offs_k_whole < K) | EVEN_K
            if FUSE_PROJECTION:
                q_whole = tl.load(
                    q_ptr + b * stride_qb + offs_l[None, :] * K + offs_k_whole[:, None],
                    mask=k_whole_ok[:, None] & l_ok[None, :],
                    other=0.0,
                )
            if HAS_A_SCALE:
                s_whole = tl.load(a_scale_ptr + b * K + offs_k_whole, mask=k_whole_ok, other=0.0).to(tl.float32)
        # W's tile offsets within a K block; a step adds its tap's and K block's rows to them
        w_tile = tl.arange(0, BLOCK_K)[:, None] * N + offs_n[None, :]
        if TILES_PER_PROGRAM > 1:
            # Loaded once: the compiler would hoist this load's address tensor (a [BLOCK_L, BLOCK_N]
            # tile of 64-bit pointers is 32 registers a thread at 4 warps) out of the block loop
            # and keep it live through the main loop, which spilled (`benchmarks.kernel_audit`).
            if FUSE_PROJECTION:
                beta_n = tl.load(beta_ptr + b * stride_beta_b + offs_n * stride_beta_n, mask=n_ok, other=0.0)
                r_beta = tl.load(
                    r_ptr + b * stride_rb + offs_l[:, None] * N + offs_n[None, :],
                    mask=l_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )
                r_beta = (r_beta.to(tl.float32) * beta_n[None, :]).to(r_beta.dtype)
        for tile_index in range(TILES_PER_PROGRAM):
            # a block past the last one (pid_m >= all_m_tiles) has its rows below the grid: m_ok
            # masks its pixels, and x's zeros there keep whatever A it reads out of every sum
            pid_m = chunk * TILES_PER_PROGRAM + tile_index
            phase_y = 0
            phase_x = 0
            if MODE == 2:
                phase = pid_m // m_tiles
                pid_m = tl.where(phase < 4, pid_m % m_tiles, m_tiles)
                phase_y = phase // 2
                phase_x = phase % 2
            offs_m = tl.arange(0, BLOCK_M)
            grid_y = (pid_m // tiles_w) * TILE_H + offs_m // TILE_W
            grid_x = (pid_m % tiles_w) * TILE_W + offs_m % TILE_W
            if MODE == 2:
                out_y = 2 * grid_y + phase_y
                out_x = 2 * grid_x + phase_x
            else:
                out_y = grid_y
                out_x = grid_x
            m_ok = (grid_y < GRID_H) & (grid_x < GRID_W) & (out_y < OUT_H) & (out_x < OUT_W)

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if FUSE_PROJECTION:
                z_box = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
            if BOX_BY_MMA:
                a_box = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            x_offsets = ((b * OUT_H + out_y) * OUT_W + out_x)[:, None] * N + offs_n[None, :]
            if TOKEN_PRODUCTS:  # u = x r^T, a dot operand in the loop (x is loaded again after it, from L1/L2)
                x_rows = tl.load(x_ptr + x_offsets, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                u = tl.dot(x_rows, tl.trans(r_rows.to(x_rows.dtype)), input_precision=INPUT_PRECISION).to(x_rows.dtype)
                u_t = tl.trans(u)
            # The taps that feed this program's pixels: all KSIZE x KSIZE, or in MODE 2 those of
            # its phase (ky = phase_y + 2 ty, kx = phase_x + 2 tx).
            if MODE == 2:
                taps_y = (KSIZE - phase_y + 1) // 2
                taps_x = (KSIZE - phase_x + 1) // 2
            else:
                taps_y = KSIZE
                taps_x = KSIZE
            taps = taps_y * taps_x
            # One flat loop over (K block, tap) with one A tile and one W tile per step, so the
            # software pipeliner can keep num_stages steps of loads in flight (an unrolled tap loop
            # multi-buffers all nine pairs and overflows shared memory). Consecutive steps read
            # shifted, overlapping A tiles of the same K block: L1/L2 hits.
            # The input pixel that feeds an output pixel through a tap is a fixed pixel of this
            # block, (tap_y, tap_x), shifted by a step's (shift_y, shift_x); so A's address is
            # a per-pixel offset set here plus a number per step. (Computing each pixel's address
            # at each step, in 64 bits, took about half of a small tile's step loop in SASS.)
            if MODE == 0:
                tap_y = out_y - KSIZE // 2
                tap_x = out_x - KSIZE // 2
            elif MODE == 1:
                tap_y = 2 * out_y
                tap_x = 2 * out_x
            else:
                tap_y = grid_y
                tap_x = grid_x
            # int32 within one sample: the host checks that it holds fewer than 2**31 values
            a_pixels = (tap_y * IN_W + tap_x) * K
            a_sample = a_ptr + b * IN_H * IN_W * K
            # (K block, tap row, tap column) are counters carried from step to step: dividing the
            # step index by the taps and by their row length at every step cost ~15 instructions
            k0 = tl.zeros([], dtype=tl.int32)
            ty = tl.zeros([], dtype=tl.int32)
            tx = tl.zeros([], dtype=tl.int32)
            for step in range(0, tl.cdiv(K, BLOCK_K) * taps):
                if MODE == 2:
                    ky = phase_y + 2 * ty
                    kx = phase_x + 2 * tx
                    shift_y = -ty
                    shift_x = -tx
                else:
                    ky = ty
                    kx = tx
                    shift_y = ty
                    shift_x = tx
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = (offs_k < K) | EVEN_K  # all true (and folded away) when every K block is whole
                if A_TMA:  # one row strip, zero-filled where it leaves the image or K
                    strip_y = (pid_m // tiles_w) + (ky - KSIZE // 2)
                    strip_x = (pid_m % tiles_w) * BLOCK_M + (kx - KSIZE // 2)
                    a = a_desc.load([b.to(tl.int32), strip_y, strip_x, k0]).reshape(BLOCK_M, BLOCK_K)
                else:
                    in_y = tap_y + shift_y
                    in_x = tap_x + shift_x
                    pix_ok = m_ok & (in_y >= 0) & (in_y < IN_H) & (in_x >= 0) & (in_x < IN_W)
                    a_rows = a_sample + (a_pixels + ((shift_y * IN_W + shift_x) * K + k0))
                    a = tl.load(
                        a_rows[:, None] + _in_runs(BLOCK_K, A_VECTOR)[None, :],
                        mask=pix_ok[:, None] & k_ok[None, :],
                        other=0.0,
                        cache_modifier=".ca",
                    )
                w = tl.load(
                    w_ptr + ((ky * KSIZE + kx) * K + k0) * N + w_tile,
                    mask=k_ok[:, None] & (n_ok | EVEN_N)[None, :],
                    other=0.0,
                )
                if FUSE_PROJECTION:  # the low-rank input box(q a) = sum over taps of (a tile) q^T
                    if SINGLE_K_BLOCK:
                        q_t = q_whole
                    else:
                        q_t = tl.load(
                            q_ptr + b * stride_qb + offs_l[None, :] * K + offs_k[:, None],
                            mask=k_ok[:, None] & l_ok[None, :],
                            other=0.0,
                        )
                    z_box = tl.dot(a.to(q_t.dtype), q_t, z_box, input_precision=INPUT_PRECISION)
                if BOX_BY_MMA:  # one K block (BLOCK_K >= K): the sum over taps is box(a)
                    a_box = tl.dot(a.to(eye.dtype), eye, a_box, input_precision=INPUT_PRECISION)
                elif GRAD_P_TRANSPOSED:
                    grad_p_sums = tl.dot(tl.trans(a.to(u.dtype)), u, grad_p_sums, input_precision=INPUT_PRECISION)
                elif TOKEN_PRODUCTS:
                    grad_p_sums = tl.dot(u_t, a.to(u_t.dtype), grad_p_sums, input_precision=INPUT_PRECISION)
                if HAS_A_SCALE:
                    if SINGLE_K_BLOCK:
                        s = s_whole
                    else:
                        s = tl.load(a_scale_ptr + b * K + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                    # Scaling A makes it a register operand of the MMA; ptxas then serialises the
                    # Hopper wgmma chain for some tiles (C7515). Scaling W keeps both operands in
                    # shared memory, at the cost of a W tile written back per step. The autotuner
                    # tries both (`python -m benchmarks.kernel_audit` shows which tiles serialise).
                    if SCALE_WEIGHT:
                        w = (w.to(tl.float32) * s[:, None]).to(w.dtype)
                    else:
                        a = a.to(tl.float32) * s[None, :]
                acc = tl.dot(a.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)
                tx += 1
                row_done = tx == taps_x
                tx = tl.where(row_done, 0, tx)
                ty = tl.where(row_done, ty + 1, ty)
                taps_done = ty == taps_y
                ty = tl.where(taps_done, 0, ty)
                k0 = tl.where(taps_done, k0 + BLOCK_K, k0)

            if REDUCE_X or TOKEN_PRODUCTS:
                x_tile = tl.load(x_ptr + x_offsets, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if TOKEN_PRODUCTS:
                grad_q_sums = tl.dot(tl.trans(z_box.to(x_tile.dtype)), x_tile, grad_q_sums, input_precision=INPUT_PRECISION)
            if BOX_BY_MMA:  # box(a) rounded to a's dtype, as the pixel products round their boxed tiles
                grad_p_sums = tl.dot(u_t, a_box.to(u_t.dtype), grad_p_sums, input_precision=INPUT_PRECISION)
            if REDUCE_X:  # the conv part of grad s: sum over pixels of x * conv^T(g) * scale, before alpha
                if X_SUMS_UNREDUCED:
                    x_sums += x_tile.to(tl.float32) * acc
                else:
                    x_terms = tl.sum(x_tile.to(tl.float32) * acc, axis=0) * alpha_scale
                    if TILES_PER_PROGRAM == 1:
                        tl.store(reduce_ptr + (b * chunks + chunk) * N + offs_n, x_terms, mask=n_ok)
                    else:
                        x_sums += x_terms

            alpha = tl.load(alpha_ptr + b * stride_alpha_b + offs_n * stride_alpha_n, mask=n_ok, other=0.0)
            acc = acc * (alpha.to(tl.float32) * alpha_scale)[None, :]

            if FUSE_PROJECTION:
                if TILES_PER_PROGRAM > 1:
                    r = r_beta
                else:
                    r = tl.load(
                        r_ptr + b * stride_rb + offs_l[:, None] * N + offs_n[None, :],
                        mask=l_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    # beta goes onto r so the dot accumulates into acc: a second [BLOCK_M, BLOCK_N]
                    # fp32 tile would cost 64 registers a thread (spills at 128 x 128)
                    beta = tl.load(beta_ptr + b * stride_beta_b + offs_n * stride_beta_n, mask=n_ok, other=0.0)
                    r = (r.to(tl.float32) * beta[None, :]).to(r.dtype)
                acc = tl.dot(z_box.to(r.dtype), r, acc, input_precision=INPUT_PRECISION)
            elif HAS_LOWRANK:
                beta = tl.load(beta_ptr + b * stride_beta_b + offs_n * stride_beta_n, mask=n_ok, other=0.0)
                # not pipelined: each step's nine boxed z loads would be multi-buffered (~300 KB of
                # shared memory at BLOCK_M = 128 in fp32), and the loop is short next to the main one
                for l0 in tl.range(0, L, BLOCK_L, num_stages=1):
                    offs_l = l0 + tl.arange(0, BLOCK_L)
                    l_ok = offs_l < L
                    if BOX_Z:
                        z_box = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
                        # one tap at a time (a rolled loop): nine [BLOCK_M, BLOCK_L] fp32 loads in
                        # flight need ~290 registers a thread at BLOCK_M = 128 and spill to local
                        # memory, three (one row) still spill at 4 warps (`benchmarks.kernel_audit`)
                        for tap in tl.range(0, KSIZE * KSIZE, num_stages=1):
                            ky = tap // KSIZE
                            kx = tap % KSIZE
                            use_tap = True
                            if MODE == 0:
                                in_y = out_y + (ky - KSIZE // 2)
                                in_x = out_x + (kx - KSIZE // 2)
                            elif MODE == 1:
                                in_y = 2 * out_y + ky
                                in_x = 2 * out_x + kx
                            else:
                                use_tap = ((ky % 2) == phase_y) & ((kx % 2) == phase_x)
                                in_y = grid_y - (ky // 2)
                                in_x = grid_x - (kx // 2)
                            if use_tap:
                                pix_ok = m_ok & (in_y >= 0) & (in_y < IN_H) & (in_x >= 0) & (in_x < IN_W)
                                z_box += tl.load(
                                    z_ptr + ((b * IN_H + in_y) * IN_W + in_x)[:, None] * L + offs_l[None, :],
                                    mask=pix_ok[:, None] & l_ok[None, :],
                                    other=0.0,
                                )
                    else:
                        z_box = tl.load(
                            z_ptr + ((b * OUT_H + out_y) * OUT_W + out_x)[:, None] * L + offs_l[None, :],
                            mask=m_ok[:, None] & l_ok[None, :],
                            other=0.0,
                        )
                    r = tl.load(
                        r_ptr + b * stride_rb + offs_l[:, None] * N + offs_n[None, :],
                        mask=l_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    r = (r.to(tl.float32) * beta[None, :]).to(r.dtype)  # beta onto r, as above
                    acc = tl.dot(z_box.to(r.dtype), r, acc, input_precision=INPUT_PRECISION)

            acc = _apply_epilogue(
                acc, b, out_y, out_x, m_ok, offs_n, n_ok, noise_ptr, noise_strength_ptr, bias_ptr,
                stride_noise_b, stride_noise_h, stride_noise_w, clamp_value,
                HAS_NOISE, HAS_BIAS, ACTIVATE, HAS_CLAMP,
            )  # fmt: skip
            out_rows = out_ptr + ((b * OUT_H + out_y) * OUT_W + out_x) * N
            stored = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_rows[:, None] + offs_n[None, :], stored, mask=m_ok[:, None] & n_ok[None, :])
            if RGB_CHANNELS > 0:
                # The toRGB reads out as stored, rounded to its dtype, in one dot with the mix (in
                # that dtype, as the reference's modulated 1x1 weight is; fp32 exactly): on the tensor
                # cores, where three products and a cross-thread sum per value took 17% of the
                # 1024 px forward's instructions (`python -m benchmarks.kernel_audit`).
                rgb_rows = rgb_ptr + b * stride_rgb_b + out_y * stride_rgb_h + out_x * stride_rgb_w
                RGB_BLOCK: tl.constexpr = 16  # the toRGB's channels, padded to a dot's narrowest N
                tl.static_assert(RGB_CHANNELS <= RGB_BLOCK)
                offs_rgb = tl.arange(0, RGB_BLOCK)
                rgb_ok = offs_rgb < RGB_CHANNELS
                # columns past N hold act(noise) but meet a zero mix
                mix_t = tl.load(
                    rgb_mix_ptr + (b * RGB_CHANNELS + offs_rgb[None, :]) * N + offs_n[:, None],
                    mask=n_ok[:, None] & rgb_ok[None, :],
                    other=0.0,
                )
                if stored.dtype == tl.float32:
                    rgb = tl.dot(stored, mix_t, input_precision="ieee")
                else:
                    rgb = tl.dot(stored, mix_t.to(stored.dtype))
                if HAS_RGB_BIAS:
                    rgb += tl.load(rgb_bias_ptr + offs_rgb, mask=rgb_ok, other=0.0).to(tl.float32)[None, :]
                if HAS_RGB_CLAMP:
                    rgb = tl.minimum(tl.maximum(rgb, -rgb_clamp_value), rgb_clamp_value)
                tl.store(
                    rgb_rows[:, None] + offs_rgb[None, :] * stride_rgb_c,
                    rgb.to(rgb_ptr.dtype.element_ty),
                    mask=m_ok[:, None] & rgb_ok[None, :],
                )

        if REDUCE_X and X_SUMS_UNREDUCED:
            tl.store(reduce_ptr + (b * chunks + chunk) * N + offs_n, tl.sum(x_sums, axis=0) * alpha_scale, mask=n_ok)
        elif REDUCE_X and TILES_PER_PROGRAM > 1:
            tl.store(reduce_ptr + (b * chunks + chunk) * N + offs_n, x_sums, mask=n_ok)
        if TOKEN_PRODUCTS:
            offs_kp = tl.arange(0, BLOCK_K)
            grad_p_rows = ((b * chunks + chunk) * n_tiles + pid_n) * L + offs_l
            if GRAD_P_TRANSPOSED:
                tl.store(
                    grad_p_ptr + grad_p_rows[None, :] * K + offs_kp[:, None],
                    grad_p_sums,
                    mask=l_ok[None, :] & (offs_kp < K)[:, None],
                )
            else:
                tl.store(
                    grad_p_ptr + grad_p_rows[:, None] * K + offs_kp[None, :],
                    grad_p_sums,
                    mask=l_ok[:, None] & (offs_kp < K)[None, :],
                )
            tl.store(
                grad_q_ptr + ((b * chunks + chunk) * L + offs_l)[:, None] * N + offs_n[None, :],
                grad_q_sums,
                mask=l_ok[:, None] & n_ok[None, :],
            )

    @triton.jit
    def _epilogue_gradient(
        grad_rows,  # [BLOCK_M] pointers to the pixels' grad of the output (channel 0)
        out_rows,  # [BLOCK_M] pointers to the pixels' saved output (channel 0)
        noise_at,  # [BLOCK_M] pointers to the pixels' noise, if HAS_NOISE
        pix_ok,  # [BLOCK_M] which pixels exist: the others give 0
        sum_ok,  # [BLOCK_M] which of them enter the sums
        stride_gn,
        stride_on,
        demod,  # [BLOCK_N] fp32: the sample's d at offs_n, as `_epilogue_constants` loads it
        strength,  # fp32 scalar: the noise strength
        bias,  # [BLOCK_N] fp32
        offs_n,
        n_ok,
        clamp_value,
        extra_grad,  # [BLOCK_M, BLOCK_N] fp32 added to the output's gradient, if HAS_EXTRA_GRAD
        loaded_out,  # [BLOCK_M, BLOCK_N] fp32: the saved output already loaded by the caller, if OUT_LOADED
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        HAS_EXTRA_GRAD: tl.constexpr,
        OUT_LOADED: tl.constexpr,
    ):
        """Backward of the epilogue out = clamp(act(d * conv + strength * noise + bias)) at
        BLOCK_M pixels: (g, bias_terms, noise_terms, demod_terms), all [BLOCK_M, BLOCK_N] fp32:
        g = d * grad of the pre-activation, and the terms whose sums over pixels make grad
        bias, grad strength and grad d (zero where a term is absent or not sum_ok). Unreduced,
        so that a caller visiting many rows reduces once at the end. The output's gradient is
        the one at grad_rows (if HAS_GRAD) plus extra_grad (if HAS_EXTRA_GRAD): a second
        consumer's gradient, added here rather than in memory."""
        mask = pix_ok[:, None] & n_ok[None, :]
        if HAS_GRAD:
            grad = tl.load(grad_rows[:, None] + offs_n[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
            if HAS_EXTRA_GRAD:
                grad += extra_grad
        else:
            grad = extra_grad
        if OUT_LOADED:
            out = loaded_out
        else:
            out = tl.load(out_rows[:, None] + offs_n[None, :] * stride_on, mask=mask, other=0.0).to(tl.float32)
        noise = 0.0
        if HAS_NOISE:
            noise = tl.load(noise_at, mask=pix_ok, other=0.0)
        return _epilogue_gradient_of(
            grad, out, noise, sum_ok, demod, strength, bias, clamp_value, HAS_DEMOD, HAS_NOISE, HAS_BIAS, ACTIVATE,
            HAS_CLAMP,
        )  # fmt: skip

    @triton.jit
    def _epilogue_gradient_of(
        grad,  # [BLOCK_M, BLOCK_N] fp32: the output's gradient
        out,  # [BLOCK_M, BLOCK_N] fp32: the saved output
        noise,  # [BLOCK_M] the pixels' noise (any float dtype), if HAS_NOISE
        sum_ok,  # [BLOCK_M] which pixels enter the sums
        demod,  # [BLOCK_N] fp32 d (1 past N), if HAS_DEMOD
        strength,  # fp32 scalar: the noise strength, if HAS_NOISE
        bias,  # [BLOCK_N] fp32, if HAS_BIAS
        clamp_value,
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
    ):
        """`_epilogue_gradient` from values its caller has loaded (same results)."""
        if HAS_CLAMP:  # clamped pixels pass no gradient; clamp_value is the bound as out's dtype
            grad = tl.where(tl.abs(out) < clamp_value, grad, 0.0)  # rounds it (see _clamp_bound)
        pre = out  # the pre-activation, recovered from the output (leaky ReLU is invertible)
        if ACTIVATE:
            grad = grad * tl.where(out > 0, 1.4142135623730951, 0.2 * 1.4142135623730951)
            pre = tl.where(out > 0, out * 0.7071067811865476, out * (0.7071067811865476 / 0.2))
        bias_terms = tl.where(sum_ok[:, None], grad, 0.0)
        noise_terms = tl.zeros_like(bias_terms)
        demod_terms = tl.zeros_like(bias_terms)
        if HAS_BIAS:
            pre -= bias[None, :]
        if HAS_NOISE:
            noise = noise.to(tl.float32)
            noise_terms = bias_terms * noise[:, None]
            pre -= strength * noise[:, None]
        if HAS_DEMOD:
            # pre = d * conv: grad d = sum grad * pre / d, divided once a channel when the sums
            # are stored (`_store_epilogue_sums`): a division a value cost ~8 instructions
            demod_terms = bias_terms * pre
            grad = grad * demod[None, :]  # grad conv = grad * d
        return grad, bias_terms, noise_terms, demod_terms

    @triton.jit
    def _epilogue_constants(
        demod_row,  # pointer to the sample's d [N] fp32, if HAS_DEMOD
        noise_strength_ptr,  # pointer to the noise strength (one value), if HAS_NOISE
        bias_ptr,  # pointer to the bias [N], if HAS_BIAS
        offs_n,
        n_ok,
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        """(demod [BLOCK_N] fp32, 1 where absent, strength fp32 scalar, bias [BLOCK_N] fp32, 0
        where absent): the epilogue's per-channel values, which a program over one channel block
        loads once rather than once a pixel block (in its loop, Triton's pipeliner would copy
        them through shared memory every time)."""
        demod = tl.full(offs_n.shape, 1.0, dtype=tl.float32)
        if HAS_DEMOD:
            demod = tl.load(demod_row + offs_n, mask=n_ok, other=1.0)
        strength = 0.0
        if HAS_NOISE:
            strength = tl.load(noise_strength_ptr).to(tl.float32)
        bias = tl.zeros(offs_n.shape, dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        return demod, strength, bias

    @triton.jit
    def _store_epilogue_sums(
        sums_ptr,  # [3, B, TILES, N] fp32: the planes of grad bias, grad strength and grad d
        b,
        tile,
        tiles,
        offs_n,
        n_ok,
        N,
        bias_terms,  # [BLOCK, BLOCK_N] fp32 terms of `_epilogue_gradient`, summed here over axis 0
        noise_terms,
        demod_terms,
        demod_row,  # pointer to the sample's d [N] fp32, if HAS_DEMOD: the demod terms' divisor
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        """One tile's sums of the small gradients' terms (the absent terms' planes stay unwritten):
        grad bias, grad strength, and grad d = the demod terms' sum / d."""
        sums = sums_ptr + (b * tiles + tile) * N + offs_n
        plane = tl.num_programs(2) * tiles * N  # the batch is the grid's axis 2
        if HAS_BIAS:
            tl.store(sums, tl.sum(bias_terms, axis=0), mask=n_ok)
        if HAS_NOISE:
            tl.store(sums + plane, tl.sum(noise_terms, axis=0), mask=n_ok)
        if HAS_DEMOD:
            demod = tl.load(demod_row + offs_n, mask=n_ok, other=1.0)
            tl.store(sums + 2 * plane, tl.sum(demod_terms, axis=0) / demod, mask=n_ok)

    @triton.jit
    def _blur_source_row(
        src_ptr, saved_ptr, noise_ptr,
        b,
        src_y,  # the source row
        end_y,  # the program's source rows end before this one: past it, load nothing (a prefetch)
        load_x,  # [BLOCK_W] the forward's output columns, or the backward's source columns
        offs_n, n_ok, SRC_H, SRC_W, DST_H, DST_W, PAD,
        stride_sb, stride_sh, stride_sw, stride_sn, stride_vb, stride_vh, stride_vw, stride_vn,
        stride_noise_b, stride_noise_h, stride_noise_w,
        TAPS: tl.constexpr, EPILOGUE_BACKWARD: tl.constexpr, HAS_NOISE: tl.constexpr,
    ):  # fmt: skip
        """What `_blur_kernel` loads for one source row, as loaded (zero outside the image):
        the forward's TAPS = 4 column-shifted [BLOCK_W, BLOCK_N] tiles of src (columns
        load_x + c - PAD) and the noise [BLOCK_W] of the output row that row completes; the
        backward's output gradient, saved output, 0.0, 0.0 and noise at the source columns
        load_x. The noise is 0.0 without HAS_NOISE."""
        # masks from [BLOCK_W] vectors: the interpreter rejects a scalar-and-vector mask
        live = src_y + 0 * load_x < end_y
        row_ok = live & (src_y + 0 * load_x >= 0) & (src_y + 0 * load_x < SRC_H)
        noise = 0.0
        if EPILOGUE_BACKWARD:
            pix_ok = row_ok & (load_x >= 0) & (load_x < SRC_W)
            mask = pix_ok[:, None] & n_ok[None, :]
            # a row's base pointer (it moves each row) plus offsets within the row (they do not)
            grad_offsets = (load_x * stride_sw)[:, None] + offs_n[None, :] * stride_sn
            out_offsets = (load_x * stride_vw)[:, None] + offs_n[None, :] * stride_vn
            grad = tl.load(src_ptr + (b * stride_sb + src_y * stride_sh) + grad_offsets, mask=mask, other=0.0)
            out = tl.load(saved_ptr + (b * stride_vb + src_y * stride_vh) + out_offsets, mask=mask, other=0.0)
            if HAS_NOISE:
                noise = tl.load(
                    noise_ptr + b * stride_noise_b + src_y * stride_noise_h + load_x * stride_noise_w, mask=pix_ok, other=0.0
                )  # fmt: skip
            return grad, out, 0.0, 0.0, noise
        else:
            tl.static_assert(TAPS == 4, "one tile per tap")
            row = src_ptr + (b * stride_sb + src_y * stride_sh)  # plus offsets within the row, as above
            rows = row + offs_n[None, :] * stride_sn
            shifted = load_x - PAD
            tap0 = tl.load(rows + (shifted * stride_sw)[:, None],
                           mask=(row_ok & (shifted >= 0) & (shifted < SRC_W))[:, None] & n_ok[None, :], other=0.0)
            shifted += 1
            tap1 = tl.load(rows + (shifted * stride_sw)[:, None],
                           mask=(row_ok & (shifted >= 0) & (shifted < SRC_W))[:, None] & n_ok[None, :], other=0.0)
            shifted += 1
            tap2 = tl.load(rows + (shifted * stride_sw)[:, None],
                           mask=(row_ok & (shifted >= 0) & (shifted < SRC_W))[:, None] & n_ok[None, :], other=0.0)
            shifted += 1
            tap3 = tl.load(rows + (shifted * stride_sw)[:, None],
                           mask=(row_ok & (shifted >= 0) & (shifted < SRC_W))[:, None] & n_ok[None, :], other=0.0)
            if HAS_NOISE:
                dst_y = src_y + PAD - (TAPS - 1)  # the output row this source row completes
                noise_ok = live & (dst_y + 0 * load_x >= 0) & (dst_y + 0 * load_x < DST_H) & (load_x < DST_W)
                noise = tl.load(
                    noise_ptr + b * stride_noise_b + dst_y * stride_noise_h + load_x * stride_noise_w, mask=noise_ok,
                    other=0.0,
                )  # fmt: skip
            return tap0, tap1, tap2, tap3, noise

    @triton.jit
    def _blur_kernel(
        src_ptr,  # [B, SRC_H, SRC_W, N] any strides: what is blurred (the output gradient if EPILOGUE_BACKWARD)
        saved_ptr,  # [B, SRC_H, SRC_W, N] any strides: the saved output, if EPILOGUE_BACKWARD
        taps_ptr,  # [TAPS] fp32: the separable 1-D filter, in the order it meets src
        dst_ptr,  # [B, DST_H, DST_W, N] contiguous
        demod_ptr,  # [B, N] fp32, if EPILOGUE_BACKWARD and HAS_DEMOD
        noise_ptr,  # [B or 1, 1, H, W] on dst's grid (forward) or src's (EPILOGUE_BACKWARD), if HAS_NOISE
        noise_strength_ptr,
        bias_ptr,
        sums_ptr,  # [3, B, TILES, N] fp32 out: per-program sums for grad bias, strength, d (EPILOGUE_BACKWARD)
        SRC_H,
        SRC_W,
        DST_H,
        DST_W,
        N,
        PAD,
        ROWS,  # output rows per program
        stride_sb,
        stride_sh,
        stride_sw,
        stride_sn,
        stride_vb,
        stride_vh,
        stride_vw,
        stride_vn,
        stride_noise_b,
        stride_noise_h,
        stride_noise_w,
        clamp_value,
        TAPS: tl.constexpr,
        EPILOGUE_BACKWARD: tl.constexpr,  # src is the output gradient: blur the epilogue's gradient
        INPUT_PRECISION: tl.constexpr,  # of the band dot for fp32 (EPILOGUE_BACKWARD)
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PREFETCH: tl.constexpr,  # load source row i + 1 before filtering row i
    ):
        """dst[y, x] = sum over (a, c) of f[a] f[c] src[y + a - PAD, x + c - PAD], then (forward)
        the epilogue: the upsampling layer's 4x4 FIR, or its adjoint with flipped taps.

        Separable and row-rolling: a program walks down ROWS output rows of one BLOCK_W-pixel
        column block and one BLOCK_N channel block, filters each source row along x once
        (TAPS shifted loads, L1 hits) and keeps the last TAPS - 1 filtered rows in registers
        for the filter along y: 2 x TAPS multiply-adds a value instead of TAPS^2.

        With EPILOGUE_BACKWARD the source values are the epilogue's gradient, computed from the
        output gradient and the saved output once per pixel (never stored), and filtered along
        x by a [BLOCK_W, BLOCK_W] banded matrix in one dot: the program reads BLOCK_W source
        columns and writes the BLOCK_W - 3 outputs they cover whole (blocks overlap by 3
        columns). Each source pixel enters the small gradients' sums in exactly one program."""
        tl.static_assert(TAPS == 4, "the rolling window holds TAPS - 1 = 3 filtered rows")
        n_blocks = tl.cdiv(N, BLOCK_N)
        pid_w = tl.program_id(0) // n_blocks
        pid_n = tl.program_id(0) % n_blocks
        pid_r = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_j = tl.arange(0, BLOCK_W)
        if EPILOGUE_BACKWARD:  # BLOCK_W source columns, of which the first BLOCK_W - 3 outputs are whole
            x0 = pid_w * (BLOCK_W - (TAPS - 1))
            offs_x = x0 + offs_j
            x_ok = (offs_j < BLOCK_W - (TAPS - 1)) & (offs_x < DST_W)
            # the filter along x as a banded matrix: band[j, k] = f[k - j] (source column x0 - PAD + k)
            diagonal = offs_j[None, :] - offs_j[:, None]
            band = tl.where(diagonal == 0, tl.load(taps_ptr), 0.0)
            band = tl.where(diagonal == 1, tl.load(taps_ptr + 1), band)
            band = tl.where(diagonal == 2, tl.load(taps_ptr + 2), band)
            band = tl.where(diagonal == 3, tl.load(taps_ptr + 3), band).to(dst_ptr.dtype.element_ty)
            src_x = x0 - PAD + offs_j
            # the source columns this program sums the small gradients over: its own outputs'
            own_x = (offs_j >= PAD) & (offs_j < BLOCK_W - (TAPS - 1) + PAD)
        else:
            offs_x = pid_w * BLOCK_W + offs_j
            x_ok = offs_x < DST_W
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        y0 = pid_r * ROWS
        f0 = tl.load(taps_ptr)
        f1 = tl.load(taps_ptr + 1)
        f2 = tl.load(taps_ptr + 2)
        f3 = tl.load(taps_ptr + 3)
        h0 = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)  # filtered source rows y-PAD, y+1-PAD, y+2-PAD
        h1 = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        h2 = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        # the small gradients' terms, summed over rows here and over the block's pixels at the end
        bias_terms = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        noise_terms = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        demod_terms = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        strength = 0.0
        if HAS_NOISE:
            strength = tl.load(noise_strength_ptr).to(tl.float32)
        bias = 0.0
        if HAS_BIAS and not EPILOGUE_BACKWARD:  # the backward reloads it a row (below)
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        # where a source row's values are loaded: x for the forward's four column shifts, the
        # source columns for the backward's band
        load_x = src_x if EPILOGUE_BACKWARD else offs_x
        rows_in = ROWS + TAPS - 1
        if PREFETCH:
            # Row i + 1's loads are issued before row i is filtered, so they are in flight during
            # that work. Triton's pipeliner does not take this loop's loads (its filtered rows are
            # carried into the next iteration), and at 3-5 programs an SM too few loads are in
            # flight to cover the memory latency otherwise.
            ahead0, ahead1, ahead2, ahead3, ahead_noise = _blur_source_row(
                src_ptr, saved_ptr, noise_ptr, b, y0 - PAD, y0 - PAD + rows_in, load_x, offs_n, n_ok, SRC_H, SRC_W, DST_H,
                DST_W, PAD, stride_sb, stride_sh, stride_sw, stride_sn, stride_vb, stride_vh, stride_vw, stride_vn,
                stride_noise_b, stride_noise_h, stride_noise_w, TAPS, EPILOGUE_BACKWARD, HAS_NOISE,
            )  # fmt: skip
        for i in range(0, rows_in):
            src_y = y0 + i - PAD
            if PREFETCH:
                row0, row1, row2, row3, row_noise = ahead0, ahead1, ahead2, ahead3, ahead_noise
                ahead0, ahead1, ahead2, ahead3, ahead_noise = _blur_source_row(
                    src_ptr, saved_ptr, noise_ptr, b, src_y + 1, y0 - PAD + rows_in, load_x, offs_n, n_ok, SRC_H, SRC_W,
                    DST_H, DST_W, PAD, stride_sb, stride_sh, stride_sw, stride_sn, stride_vb, stride_vh, stride_vw,
                    stride_vn, stride_noise_b, stride_noise_h, stride_noise_w, TAPS, EPILOGUE_BACKWARD, HAS_NOISE,
                )  # fmt: skip
            else:
                row0, row1, row2, row3, row_noise = _blur_source_row(
                    src_ptr, saved_ptr, noise_ptr, b, src_y, y0 - PAD + rows_in, load_x, offs_n, n_ok, SRC_H, SRC_W, DST_H, DST_W,
                    PAD, stride_sb, stride_sh, stride_sw, stride_sn, stride_vb, stride_vh, stride_vw, stride_vn,
                    stride_noise_b, stride_noise_h, stride_noise_w, TAPS, EPILOGUE_BACKWARD, HAS_NOISE,
                )  # fmt: skip
            if EPILOGUE_BACKWARD:
                # the epilogue's gradient once per source pixel of the row, then filtered along x
                # by the band (a tensor-core dot): no pixel is recomputed per tap
                # (masks from [BLOCK_W] vectors: the interpreter rejects a scalar-and-vector mask)
                own = (src_y + 0 * offs_j >= 0) & (src_y + 0 * offs_j < SRC_H) & (src_x >= 0) & (src_x < SRC_W)
                own = own & own_x & (src_y + 0 * offs_j >= y0) & (src_y + 0 * offs_j < y0 + ROWS)
                # d and the bias are loaded again each row (L1 hits): held across the loop in the
                # tile's layout, they took ~40 more registers a thread (`benchmarks.kernel_audit`)
                demod = 1.0
                if HAS_DEMOD:
                    demod = tl.load(demod_ptr + b * N + offs_n, mask=n_ok, other=1.0)
                row_bias = 0.0
                if HAS_BIAS:
                    row_bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                values, pixel_bias, pixel_noise, pixel_demod = _epilogue_gradient_of(
                    row0.to(tl.float32), row1.to(tl.float32), row_noise, own, demod, strength, row_bias, clamp_value,
                    HAS_DEMOD, HAS_NOISE, HAS_BIAS, ACTIVATE, HAS_CLAMP,
                )  # fmt: skip
                bias_terms += pixel_bias
                noise_terms += pixel_noise
                demod_terms += pixel_demod
                # rounded to x's dtype, like the stored g of an unfused pass
                filtered = tl.dot(band, values.to(dst_ptr.dtype.element_ty), input_precision=INPUT_PRECISION)
            else:
                filtered = f0 * row0.to(tl.float32) + f1 * row1.to(tl.float32)
                filtered += f2 * row2.to(tl.float32) + f3 * row3.to(tl.float32)
            # output row y = y0 + i - (TAPS - 1) reads the filtered source rows y - PAD .. y + 3 - PAD
            y = y0 + i - (TAPS - 1)
            acc = f0 * h0 + f1 * h1 + f2 * h2 + f3 * filtered
            y_ok = (y + 0 * offs_x >= y0) & (y + 0 * offs_x < DST_H)  # the first TAPS - 1 rows warm up
            if not EPILOGUE_BACKWARD:
                acc = _epilogue_of(acc, row_noise, strength, bias, clamp_value, HAS_NOISE, HAS_BIAS, ACTIVATE, HAS_CLAMP)
            dst_rows = dst_ptr + ((b * DST_H + y) * DST_W + offs_x) * N
            tl.store(
                dst_rows[:, None] + offs_n[None, :],
                acc.to(dst_ptr.dtype.element_ty),
                mask=(x_ok & y_ok)[:, None] & n_ok[None, :],
            )
            h0 = h1
            h1 = h2
            h2 = filtered
        if EPILOGUE_BACKWARD:
            tiles = tl.num_programs(0) // n_blocks * tl.num_programs(1)
            tile = pid_r * (tl.num_programs(0) // n_blocks) + pid_w
            _store_epilogue_sums(
                sums_ptr, b, tile, tiles, offs_n, n_ok, N, bias_terms, noise_terms, demod_terms, demod_ptr + b * N,
                HAS_DEMOD, HAS_NOISE, HAS_BIAS,
            )  # fmt: skip

    @triton.jit
    def _torgb_adjoint(
        out,  # [BLOCK, BLOCK_N] fp32: the conv's saved output at the block's pixels
        b,
        out_y,  # [BLOCK] the pixels
        out_x,
        pix_ok,  # [BLOCK]
        offs_n,
        n_ok,
        N,
        rgb_grad_ptr,  # [B, RGB_CHANNELS, H, W] grad of the toRGB's output, any strides
        rgb_out_ptr,  # [B, RGB_CHANNELS, H, W] the toRGB's saved output, any strides, if RGB_CLAMP
        rgb_mix_ptr,  # [B, RGB_CHANNELS, N] fp32 contiguous: rgb_scale * rgb_weight * rgb_styles
        stride_rgb_b,
        stride_rgb_c,
        stride_rgb_h,
        stride_rgb_w,
        stride_rgbo_b,
        stride_rgbo_c,
        stride_rgbo_h,
        stride_rgbo_w,
        rgb_clamp_value,
        rgb_mixes,  # mix[k, offs_n] of channels 0-3, as `_rgb_mixes_of` loads them once a program
        rgb_terms,  # the running sums of out * grad_rgb[k], as `_rgb_sums_of` takes them
        RGB_CHANNELS: tl.constexpr,
        RGB_CLAMP: tl.constexpr,
        BLOCK_RGB: tl.constexpr,
    ):
        """The toRGB layer's backward at BLOCK pixels of the conv output it reads: (grad
        [BLOCK, BLOCK_N] fp32 = sum_k grad_rgb[k] * mix[k, :], the gradient it sends to out,
        rgb_terms with the block's out * grad_rgb[k] added), with grad_rgb zero where the
        toRGB's clamp binds (bound as in `_clamp_bound`)."""
        terms0, terms1, terms2, terms3, wider = rgb_terms
        offs_rgb = tl.arange(0, BLOCK_RGB)
        grad = tl.zeros_like(out)
        for k in tl.static_range(RGB_CHANNELS):
            grad_k = tl.load(
                rgb_grad_ptr + b * stride_rgb_b + k * stride_rgb_c + out_y * stride_rgb_h + out_x * stride_rgb_w,
                mask=pix_ok, other=0.0,
            ).to(tl.float32)  # fmt: skip
            if RGB_CLAMP:
                rgb = tl.load(
                    rgb_out_ptr + b * stride_rgbo_b + k * stride_rgbo_c + out_y * stride_rgbo_h
                    + out_x * stride_rgbo_w, mask=pix_ok, other=0.0,
                ).to(tl.float32)  # fmt: skip
                grad_k = tl.where(tl.abs(rgb) < rgb_clamp_value, grad_k, 0.0)
            if k < 4:
                mix = rgb_mixes[k]
            else:
                mix = tl.load(rgb_mix_ptr + (b * RGB_CHANNELS + k) * N + offs_n, mask=n_ok, other=0.0)
            grad += grad_k[:, None] * mix[None, :]
            # The first four channels' terms stay unreduced until the program's last block:
            # summed over the block's pixels here, they took cross-thread shuffles and barriers,
            # ~30% of the 1024 px launch's instructions (`benchmarks.kernel_audit`).
            term = out * grad_k[:, None]
            if k == 0:
                terms0 += term
            elif k == 1:
                terms1 += term
            elif k == 2:
                terms2 += term
            elif k == 3:
                terms3 += term
            else:
                wider += tl.where(offs_rgb[:, None] == k, tl.sum(term, axis=0)[None, :], 0.0)
        return grad, (terms0, terms1, terms2, terms3, wider)

    @triton.jit
    def _rgb_mixes_of(rgb_mix_ptr, b, offs_n, n_ok, N, RGB_CHANNELS: tl.constexpr):
        """mix[k, offs_n] of sample b's toRGB channels 0-3 ([BLOCK_N] fp32 each, zero past
        RGB_CHANNELS), loaded once by a program over one channel block (in its loop, Triton's
        pipeliner would copy them through shared memory every pixel block)."""
        row = rgb_mix_ptr + b * RGB_CHANNELS * N + offs_n
        mix0 = tl.load(row, mask=n_ok & (RGB_CHANNELS > 0), other=0.0)
        mix1 = tl.load(row + N, mask=n_ok & (RGB_CHANNELS > 1), other=0.0)
        mix2 = tl.load(row + 2 * N, mask=n_ok & (RGB_CHANNELS > 2), other=0.0)
        mix3 = tl.load(row + 3 * N, mask=n_ok & (RGB_CHANNELS > 3), other=0.0)
        return mix0, mix1, mix2, mix3

    @triton.jit
    def _epilogue_program_setup(
        demod_ptr, noise_strength_ptr, bias_ptr, rgb_mix_ptr, b, offs_n, n_ok, N,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RGB: tl.constexpr, HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, RGB_CHANNELS: tl.constexpr,
    ):  # fmt: skip
        """What a program of `_epilogue_backward_kernel` or `_epilogue_products_kernel` sets up
        before its block loop: the zero running sums of the bias, noise and d terms ([BLOCK,
        BLOCK_N] fp32 each) and of the toRGB's (`_no_rgb_terms`), the per-channel values
        (`_epilogue_constants`) and the toRGB's mix (`_rgb_mixes_of`). Arguments as the kernels'."""
        terms = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        constants = _epilogue_constants(
            demod_ptr + b * N, noise_strength_ptr, bias_ptr, offs_n, n_ok, HAS_DEMOD, HAS_NOISE, HAS_BIAS
        )
        mixes = _rgb_mixes_of(rgb_mix_ptr, b, offs_n, n_ok, N, RGB_CHANNELS)
        return terms, terms, terms, _no_rgb_terms(BLOCK, BLOCK_N, BLOCK_RGB), constants, mixes

    @triton.jit
    def _no_rgb_terms(BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_RGB: tl.constexpr):
        """Zero running sums for `_torgb_adjoint`: four [BLOCK, BLOCK_N] fp32 tiles of unreduced
        terms (toRGB channels 0-3) and [BLOCK_RGB, BLOCK_N] fp32 sums of channels 4 and up."""
        terms = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
        return terms, terms, terms, terms, tl.zeros((BLOCK_RGB, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def _rgb_sums_of(rgb_terms, k: tl.constexpr):
        """[BLOCK_N] fp32: the sum over pixels of out * grad_rgb[k] that `_torgb_adjoint`'s
        running sums hold."""
        terms0, terms1, terms2, terms3, wider = rgb_terms
        if k == 0:
            total = tl.sum(terms0, axis=0)
        elif k == 1:
            total = tl.sum(terms1, axis=0)
        elif k == 2:
            total = tl.sum(terms2, axis=0)
        elif k == 3:
            total = tl.sum(terms3, axis=0)
        else:
            total = tl.sum(tl.where(tl.arange(0, wider.shape[0])[:, None] == k, wider, 0.0), axis=0)
        return total

    @triton.jit
    def _block_gradient(
        grad_ptr, out_ptr, noise_ptr, rgb_grad_ptr, rgb_out_ptr, rgb_mix_ptr,
        epilogue_constants,  # (demod, strength, bias) of the program's channels (`_epilogue_constants`)
        b,
        out_y,  # [BLOCK] the block's pixels
        out_x,
        pix_ok,  # [BLOCK]
        offs_n,
        n_ok,
        N,
        stride_gb, stride_gn, stride_gh, stride_gw, stride_ob, stride_on, stride_oh, stride_ow,
        stride_noise_b, stride_noise_h, stride_noise_w,
        stride_rgb_b, stride_rgb_c, stride_rgb_h, stride_rgb_w, stride_rgbo_b, stride_rgbo_c, stride_rgbo_h,
        stride_rgbo_w,
        clamp_value,
        rgb_clamp_value,
        rgb_mixes,  # the toRGB's mix of channels 0-3 (`_rgb_mixes_of`)
        rgb_terms,  # the toRGB's running sums (`_no_rgb_terms`)
        HAS_DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr, HAS_GRAD: tl.constexpr, RGB_CHANNELS: tl.constexpr, RGB_CLAMP: tl.constexpr,
        BLOCK_RGB: tl.constexpr,
    ):  # fmt: skip
        """`_epilogue_gradient` at one block of sample b's pixels, with the adjoint of the toRGB
        that also reads out added to out's gradient when RGB_CHANNELS > 0 (`_torgb_adjoint`):
        (g, bias_terms, noise_terms, demod_terms, rgb_terms with the block's terms added when
        there is a toRGB). Arguments as `_epilogue_backward_kernel`'s."""
        out_rows = out_ptr + b * stride_ob + out_y * stride_oh + out_x * stride_ow
        rgb_grad = tl.zeros((out_y.shape[0], offs_n.shape[0]), dtype=tl.float32)
        out = rgb_grad  # loaded below when the toRGB's sums need it; else `_epilogue_gradient` loads it
        if RGB_CHANNELS > 0:
            out = tl.load(
                out_rows[:, None] + offs_n[None, :] * stride_on, mask=pix_ok[:, None] & n_ok[None, :], other=0.0
            ).to(tl.float32)
            rgb_grad, rgb_terms = _torgb_adjoint(
                out, b, out_y, out_x, pix_ok, offs_n, n_ok, N, rgb_grad_ptr, rgb_out_ptr, rgb_mix_ptr,
                stride_rgb_b, stride_rgb_c, stride_rgb_h, stride_rgb_w, stride_rgbo_b, stride_rgbo_c,
                stride_rgbo_h, stride_rgbo_w, rgb_clamp_value, rgb_mixes, rgb_terms, RGB_CHANNELS, RGB_CLAMP,
                BLOCK_RGB,
            )  # fmt: skip
        demod, strength, bias = epilogue_constants
        g, bias_terms, noise_terms, demod_terms = _epilogue_gradient(
            grad_ptr + b * stride_gb + out_y * stride_gh + out_x * stride_gw,
            out_rows,
            noise_ptr + b * stride_noise_b + out_y * stride_noise_h + out_x * stride_noise_w,
            pix_ok, pix_ok, stride_gn, stride_on, demod, strength, bias,
            offs_n, n_ok, clamp_value, rgb_grad, out, HAS_DEMOD, HAS_NOISE, HAS_BIAS, ACTIVATE, HAS_CLAMP,
            HAS_GRAD=HAS_GRAD, HAS_EXTRA_GRAD=RGB_CHANNELS > 0, OUT_LOADED=RGB_CHANNELS > 0,
        )  # fmt: skip
        return g, bias_terms, noise_terms, demod_terms, rgb_terms

    @triton.jit
    def _epilogue_backward_kernel(
        grad_ptr,  # [B, N, OUT_H, OUT_W] grad of the output, any strides, if HAS_GRAD
        out_ptr,  # [B, N, OUT_H, OUT_W] the saved output, any strides
        demod_ptr,  # [B, N] fp32 contiguous, if HAS_DEMOD
        noise_ptr,
        noise_strength_ptr,
        bias_ptr,
        rgb_grad_ptr,  # [B, RGB_CHANNELS, OUT_H, OUT_W] grad of the toRGB's output, any strides
        rgb_out_ptr,  # [B, RGB_CHANNELS, OUT_H, OUT_W] the toRGB's saved output, any strides, if RGB_CLAMP
        rgb_mix_ptr,  # [B, RGB_CHANNELS, N] fp32 contiguous: rgb_scale * rgb_weight * rgb_styles
        g_ptr,  # [B, OUT_H, OUT_W, N] out (x's dtype): grad of the conv result before * d, times d
        sums_ptr,  # [3 + RGB_CHANNELS, B, CHUNKS, N] fp32 out: per-program sums (see below)
        OUT_H,
        OUT_W,
        N,
        TILES_PER_PROGRAM,  # consecutive pixel blocks a program walks (CHUNKS = ceil(blocks / this))
        stride_gb,
        stride_gn,
        stride_gh,
        stride_gw,
        stride_ob,
        stride_on,
        stride_oh,
        stride_ow,
        stride_noise_b,
        stride_noise_h,
        stride_noise_w,
        stride_rgb_b,
        stride_rgb_c,
        stride_rgb_h,
        stride_rgb_w,
        stride_rgbo_b,
        stride_rgbo_c,
        stride_rgbo_h,
        stride_rgbo_w,
        clamp_value,
        rgb_clamp_value,
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        RGB_CHANNELS: tl.constexpr,
        RGB_CLAMP: tl.constexpr,
        LOAD_STAGES: tl.constexpr,  # pixel blocks whose loads are in flight (`LOAD_STAGES`)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_RGB: tl.constexpr,  # >= RGB_CHANNELS
    ):
        """Backward of the epilogue: out = clamp(act(d * conv + strength * noise + bias)).

        With RGB_CHANNELS > 0, out also feeds a toRGB layer rgb = clamp(rgb_scale * conv1x1(out
        * rgb_styles, rgb_weight) + rgb_bias): its adjoint, sum_k grad_rgb[k] * mix[k, :], is
        added to out's gradient in registers, and the sums planes 3 + k hold the sums over
        pixels of out * grad_rgb[k] (clamp-masked): the toRGB's per-sample weight gradient,
        from which the style and weight gradients follow. Sums planes 0-2: grad bias, grad
        strength, grad d.

        Program (chunk, N block, sample): TILES_PER_PROGRAM consecutive blocks of BLOCK_M
        pixels (blocks past the image are masked out), their loads pipelined LOAD_STAGES deep;
        the terms of the sums stay unreduced in registers until the last block."""
        chunk = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        chunks = tl.num_programs(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        plane = tl.num_programs(2) * chunks * N
        bias_sums, noise_sums, demod_sums, rgb_terms, epilogue_constants, rgb_mixes = _epilogue_program_setup(
            demod_ptr, noise_strength_ptr, bias_ptr, rgb_mix_ptr, b, offs_n, n_ok, N, BLOCK_M, BLOCK_N, BLOCK_RGB,
            HAS_DEMOD, HAS_NOISE, HAS_BIAS, RGB_CHANNELS,
        )  # fmt: skip
        for tile in tl.range(0, TILES_PER_PROGRAM, num_stages=LOAD_STAGES):
            offs_m = (chunk * TILES_PER_PROGRAM + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
            out_y = offs_m // OUT_W
            out_x = offs_m % OUT_W
            m_ok = offs_m < OUT_H * OUT_W
            g, bias_terms, noise_terms, demod_terms, rgb_terms = _block_gradient(
                grad_ptr, out_ptr, noise_ptr, rgb_grad_ptr, rgb_out_ptr, rgb_mix_ptr, epilogue_constants, b, out_y,
                out_x, m_ok, offs_n, n_ok, N, stride_gb, stride_gn, stride_gh, stride_gw,
                stride_ob, stride_on, stride_oh, stride_ow, stride_noise_b, stride_noise_h, stride_noise_w,
                stride_rgb_b, stride_rgb_c, stride_rgb_h, stride_rgb_w, stride_rgbo_b, stride_rgbo_c, stride_rgbo_h,
                stride_rgbo_w, clamp_value, rgb_clamp_value, rgb_mixes, rgb_terms, HAS_DEMOD, HAS_NOISE, HAS_BIAS, ACTIVATE,
                HAS_CLAMP, HAS_GRAD, RGB_CHANNELS, RGB_CLAMP, BLOCK_RGB,
            )  # fmt: skip
            bias_sums += bias_terms
            noise_sums += noise_terms
            demod_sums += demod_terms
            g_rows = g_ptr + ((b * OUT_H + out_y) * OUT_W + out_x) * N
            tl.store(
                g_rows[:, None] + offs_n[None, :], g.to(g_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :]
            )
        _store_epilogue_sums(
            sums_ptr, b, chunk, chunks, offs_n, n_ok, N, bias_sums, noise_sums, demod_sums, demod_ptr + b * N,
            HAS_DEMOD, HAS_NOISE, HAS_BIAS,
        )  # fmt: skip
        for k in tl.static_range(RGB_CHANNELS):
            tl.store(sums_ptr + (3 + k) * plane + (b * chunks + chunk) * N + offs_n, _rgb_sums_of(rgb_terms, k), mask=n_ok)

    @triton.jit
    def _boxed_tile(
        a_base,  # [BLOCK_L, 1] pointers to a's channels of the sample (pixel 0)
        out_y,  # [BLOCK_P] the pixels of b's grid
        out_x,
        p_ok,  # [BLOCK_P]
        l_ok,  # [BLOCK_L]
        A_H,
        A_W,
        stride_ay,
        stride_ax,
        BOX: tl.constexpr,
        KSIZE: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_P: tl.constexpr,
        TAP_STAGES: tl.constexpr,  # taps whose loads are in flight
    ):
        """box(a) at BLOCK_P pixels of b's grid, transposed: [BLOCK_L, BLOCK_P] fp32. BOX as in
        `_pixel_products_kernel`: -1 a is on b's grid, 0 same-padded, 1 stride 2. The box is
        summed one tap at a time, as `_conv_gemm_kernel`'s BOX_Z."""
        if BOX < 0:
            a_box = tl.load(
                a_base + (out_y * stride_ay + out_x * stride_ax)[None, :].to(tl.int64),
                mask=l_ok[:, None] & p_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        else:
            a_box = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
            for tap in tl.range(0, KSIZE * KSIZE, num_stages=TAP_STAGES):
                ky = tap // KSIZE
                kx = tap % KSIZE
                if BOX == 0:
                    in_y = out_y + (ky - KSIZE // 2)
                    in_x = out_x + (kx - KSIZE // 2)
                else:
                    in_y = 2 * out_y + ky
                    in_x = 2 * out_x + kx
                tap_ok = p_ok & (in_y >= 0) & (in_y < A_H) & (in_x >= 0) & (in_x < A_W)
                a_box += tl.load(
                    a_base + (in_y * stride_ay + in_x * stride_ax)[None, :].to(tl.int64),
                    mask=l_ok[:, None] & tap_ok[None, :],
                    other=0.0,
                    cache_modifier=".ca",  # neighbouring taps read the same pixels: L1 hits
                ).to(tl.float32)
        return a_box

    @triton.jit
    def _pixel_products_kernel(
        a_ptr,  # [B, A_H, A_W, L] any strides
        b_ptr,  # [B, OUT_H * OUT_W, C] any strides, a's dtype
        partial_ptr,  # [B, SPLITS, L, C] fp32 out: box(a)^T b over one split's pixels
        A_H,
        A_W,
        OUT_H,
        OUT_W,
        L,
        C,
        stride_ab,
        stride_ay,
        stride_ax,
        stride_al,
        stride_bb,
        stride_bp,
        stride_bc,
        PIXELS_PER_SPLIT,  # a multiple of BLOCK_P
        BOX: tl.constexpr,  # -1: a is on b's grid as it is; else the box's MODE (see below)
        KSIZE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        LOAD_STAGES: tl.constexpr,  # pixel blocks (or, with a box, taps) whose loads are in flight
        BLOCK_P: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_C: tl.constexpr,
        TAP_VECTOR: tl.constexpr,  # > 0: a box's tap loads copy this many elements at a time (`TAP_LOAD_BYTES`)
    ):
        """Split-K box(a)^T b over the pixels of b's grid: program (tile, split, b) sums one
        pixel range. The all-ones KSIZE x KSIZE box is summed on the fly from a's taps, in
        fp32, like `_conv_gemm_kernel`'s BOX_Z: BOX 0 same-padded (a on b's grid), 1 stride 2
        (a on the (2 OUT_H + 1)-grid)."""
        c_tiles = tl.cdiv(C, BLOCK_C)
        pid_l = tl.program_id(0) // c_tiles
        pid_c = tl.program_id(0) % c_tiles
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        l_ok = offs_l < L
        c_ok = offs_c < C
        pixels = OUT_H * OUT_W
        start = split * PIXELS_PER_SPLIT
        stop = tl.minimum(start + PIXELS_PER_SPLIT, pixels)
        a_base = a_ptr + b * stride_ab + (pid_l * BLOCK_L + _in_runs(BLOCK_L, TAP_VECTOR))[:, None] * stride_al
        acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        # Triton pipelines only innermost loops: with a box, the loop over its taps
        for p0 in tl.range(start, stop, BLOCK_P, num_stages=LOAD_STAGES if BOX < 0 else 1):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < stop
            out_y = offs_p // OUT_W
            out_x = offs_p % OUT_W
            a_t = _boxed_tile(
                a_base, out_y, out_x, p_ok, l_ok, A_H, A_W, stride_ay, stride_ax, BOX, KSIZE, BLOCK_L, BLOCK_P,
                LOAD_STAGES,
            ).to(a_ptr.dtype.element_ty)  # rounded like a boxed tensor in a's dtype
            b_tile = tl.load(
                b_ptr + b * stride_bb + offs_p[:, None].to(tl.int64) * stride_bp + offs_c[None, :] * stride_bc,
                mask=p_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a_t, b_tile, acc, input_precision=INPUT_PRECISION)
        splits = tl.num_programs(1)
        out = partial_ptr + ((b * splits + split) * L + offs_l[:, None]) * C + offs_c[None, :]
        tl.store(out, acc, mask=l_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _sum_rows(partial_ptr, out_ptr, OUTER, ROWS, INNER, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
        """out[o, i] = sum over r of partial[o, r, i] for program (i block, o), if it is in range."""
        if (tl.program_id(1) < OUTER) & (tl.program_id(0) * BLOCK_I < INNER):
            outer = tl.program_id(1).to(tl.int64)
            offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
            i_ok = offs_i < INNER
            acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=tl.float32)
            for r0 in range(0, ROWS, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                acc += tl.load(
                    partial_ptr + (outer * ROWS + offs_r)[:, None] * INNER + offs_i[None, :],
                    mask=(offs_r < ROWS)[:, None] & i_ok[None, :],
                    other=0.0,
                )
            total = tl.sum(acc, axis=0)
            tl.store(out_ptr + outer * INNER + offs_i, total.to(out_ptr.dtype.element_ty), mask=i_ok)

    @triton.jit
    def _sum_partials_kernel(
        partial_ptr,  # [OUTER, ROWS, INNER] fp32 contiguous
        out_ptr,  # [OUTER, INNER] contiguous, any float dtype
        OUTER,
        ROWS,
        INNER,
        partial1_ptr,  # a second and a third such job (program_id(2) picks the job)
        out1_ptr,
        OUTER1,
        ROWS1,
        INNER1,
        partial2_ptr,
        out2_ptr,
        OUTER2,
        ROWS2,
        INNER2,
        BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        """out[o, i] = sum over r of partial[o, r, i], in fp32 and in a fixed order (the same
        result every run), rounded once to out's dtype; up to three such sums of different
        shapes and dtypes in one launch. Program (i block, o, job)."""
        job = tl.program_id(2)
        if job == 0:
            _sum_rows(partial_ptr, out_ptr, OUTER, ROWS, INNER, BLOCK_R, BLOCK_I)
        elif job == 1:
            _sum_rows(partial1_ptr, out1_ptr, OUTER1, ROWS1, INNER1, BLOCK_R, BLOCK_I)
        else:
            _sum_rows(partial2_ptr, out2_ptr, OUTER2, ROWS2, INNER2, BLOCK_R, BLOCK_I)

    @triton.jit
    def _epilogue_products_kernel(
        grad_ptr,  # [B, N, H, W] grad of the output, any strides, if HAS_GRAD
        out_ptr,  # [B, N, H, W] the saved output, any strides
        demod_ptr,  # [B, N] fp32 contiguous, if HAS_DEMOD
        noise_ptr,
        noise_strength_ptr,
        bias_ptr,
        rgb_grad_ptr,  # [B, RGB_CHANNELS, H, W] grad of the toRGB's output, any strides
        rgb_out_ptr,  # [B, RGB_CHANNELS, H, W] the toRGB's saved output, any strides, if RGB_CLAMP
        rgb_mix_ptr,  # [B, RGB_CHANNELS, N] fp32 contiguous: rgb_scale * rgb_weight * rgb_styles
        x_ptr,  # [B, H, W, CIN] the conv's input, any strides
        g_ptr,  # [B, H, W, N] out (x's dtype): grad of the conv result before * d, times d
        sums_ptr,  # [3 + RGB_CHANNELS, B, SPLITS, N] fp32 out: per-program sums
        partial_ptr,  # [B, SPLITS, CIN, N] fp32 out: box(x)^T g over one split's pixels
        OUT_H,
        OUT_W,
        N,
        CIN,
        stride_gb,
        stride_gn,
        stride_gh,
        stride_gw,
        stride_ob,
        stride_on,
        stride_oh,
        stride_ow,
        stride_noise_b,
        stride_noise_h,
        stride_noise_w,
        stride_rgb_b,
        stride_rgb_c,
        stride_rgb_h,
        stride_rgb_w,
        stride_rgbo_b,
        stride_rgbo_c,
        stride_rgbo_h,
        stride_rgbo_w,
        stride_xb,
        stride_xy,
        stride_xx,
        stride_xc,
        PIXELS_PER_SPLIT,  # a multiple of BLOCK_P
        clamp_value,
        rgb_clamp_value,
        HAS_DEMOD: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACTIVATE: tl.constexpr,
        HAS_CLAMP: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        RGB_CHANNELS: tl.constexpr,
        RGB_CLAMP: tl.constexpr,
        KSIZE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_L: tl.constexpr,  # >= CIN
        BLOCK_N: tl.constexpr,  # >= N
        BLOCK_RGB: tl.constexpr,  # >= RGB_CHANNELS
    ):
        """`_epilogue_backward_kernel` and the token gradients' `_pixel_products_kernel` (same
        box) of a plain layer in one pass, so g is not read back: program (split, 1, b) walks
        one range of the sample's pixels, BLOCK_P at a time, with every output channel and
        every input channel in its tile. Per block it forms g (and the toRGB's adjoint, as
        `_epilogue_backward_kernel` does), stores it for the grad-x conv, and adds box(x)^T g
        to its [CIN, N] product; the small gradients' terms are summed in registers and stored
        once per program, not once per tile. Sums planes as `_epilogue_backward_kernel`'s."""
        split = tl.program_id(0)
        b = tl.program_id(2).to(tl.int64)
        splits = tl.num_programs(0)
        pixels = OUT_H * OUT_W
        start = split * PIXELS_PER_SPLIT
        stop = tl.minimum(start + PIXELS_PER_SPLIT, pixels)
        offs_n = tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_l = tl.arange(0, BLOCK_L)
        l_ok = offs_l < CIN
        x_base = x_ptr + b * stride_xb + offs_l[:, None] * stride_xc
        products = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        bias_sums, noise_sums, demod_sums, rgb_terms, epilogue_constants, rgb_mixes = _epilogue_program_setup(
            demod_ptr, noise_strength_ptr, bias_ptr, rgb_mix_ptr, b, offs_n, n_ok, N, BLOCK_P, BLOCK_N, BLOCK_RGB,
            HAS_DEMOD, HAS_NOISE, HAS_BIAS, RGB_CHANNELS,
        )  # fmt: skip
        for p0 in tl.range(start, stop, BLOCK_P, num_stages=1):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < stop
            out_y = offs_p // OUT_W
            out_x = offs_p % OUT_W
            g, bias_terms, noise_terms, demod_terms, rgb_terms = _block_gradient(
                grad_ptr, out_ptr, noise_ptr, rgb_grad_ptr, rgb_out_ptr, rgb_mix_ptr, epilogue_constants, b, out_y,
                out_x, p_ok, offs_n, n_ok, N, stride_gb, stride_gn, stride_gh, stride_gw,
                stride_ob, stride_on, stride_oh, stride_ow, stride_noise_b, stride_noise_h, stride_noise_w,
                stride_rgb_b, stride_rgb_c, stride_rgb_h, stride_rgb_w, stride_rgbo_b, stride_rgbo_c, stride_rgbo_h,
                stride_rgbo_w, clamp_value, rgb_clamp_value, rgb_mixes, rgb_terms, HAS_DEMOD, HAS_NOISE, HAS_BIAS, ACTIVATE,
                HAS_CLAMP, HAS_GRAD, RGB_CHANNELS, RGB_CLAMP, BLOCK_RGB,
            )  # fmt: skip
            bias_sums += bias_terms
            noise_sums += noise_terms
            demod_sums += demod_terms
            g_tile = g_ptr + ((b * OUT_H + out_y) * OUT_W + out_x)[:, None] * N + offs_n[None, :]
            g_ok = p_ok[:, None] & n_ok[None, :]
            tl.store(g_tile, g.to(g_ptr.dtype.element_ty), mask=g_ok)
            # Read the tile back (from L2: nothing reaches DRAM twice) instead of keeping it, so
            # the epilogue's tiles can die before the box's: 141 registers against 158 kept at
            # 32 channels, 227 against 240 at 128 (Triton 3.9, `benchmarks.kernel_audit`).
            tl.debug_barrier()  # the tile was stored by other threads of the program
            g = tl.load(g_tile, mask=g_ok, other=0.0)
            x_box = _boxed_tile(
                x_base, out_y, out_x, p_ok, l_ok, OUT_H, OUT_W, stride_xy, stride_xx, 0, KSIZE, BLOCK_L, BLOCK_P, 1
            ).to(x_ptr.dtype.element_ty)  # rounded like a boxed tensor in x's dtype
            products = tl.dot(x_box, g, products, input_precision=INPUT_PRECISION)
        partial = partial_ptr + ((b * splits + split) * CIN + offs_l[:, None]) * N + offs_n[None, :]
        tl.store(partial, products, mask=l_ok[:, None] & n_ok[None, :])
        _store_epilogue_sums(
            sums_ptr, b, split, splits, offs_n, n_ok, N, bias_sums, noise_sums, demod_sums, demod_ptr + b * N,
            HAS_DEMOD, HAS_NOISE, HAS_BIAS,
        )  # fmt: skip
        sums = sums_ptr + (b * splits + split) * N + offs_n
        plane = tl.num_programs(2) * splits * N
        for k in tl.static_range(RGB_CHANNELS):
            tl.store(sums + (3 + k) * plane, _rgb_sums_of(rgb_terms, k), mask=n_ok)

    @triton.jit
    def _demodulation_kernel(
        styles_ptr,  # [B, CIN] contiguous
        s1_ptr,  # [COUT, CIN] fp32 contiguous: sum over the taps of W0
        s2_ptr,  # [COUT, CIN] fp32 contiguous: sum over the taps of W0^2
        p_ptr,  # [B or 1, L, COUT], rows contiguous, if HAS_TOKENS
        q_ptr,  # [B or 1, L, CIN], rows contiguous, if HAS_TOKENS
        demod_ptr,  # [B, COUT] fp32 out: d
        energy_ptr,  # [B, COUT] fp32 out: sum K^2 before the clamp (the backward's mask)
        u_ptr,  # [B, L, COUT] fp32 out: (q * s) S1^T, if HAS_TOKENS
        gp_ptr,  # [B, L, COUT] fp32 out: (q q^T) p, if HAS_TOKENS
        t_ptr,  # [COUT, CIN] fp32: S1 * (p^T q) of tokens shared by the batch, if HAS_RESIDUAL
        c_ptr,  # [COUT] fp32: taps * sum_i (p^T q)^2, if HAS_RESIDUAL
        CIN,
        COUT,
        L,
        stride_tokens_b,  # 0 for tokens shared by the batch, else L * C of the tensor
        stride_q_b,
        scale,
        eps,
        taps,
        HAS_TOKENS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,  # shared tokens as their residual R = p^T q (any L)
        BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_L: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # of the fp32 dots: "ieee" (FMA) or "tf32x3" (tensor cores)
    ):
        """d = rsqrt(max(E, 0) + eps), E = scale^2 (s^2) S2^T + 2 scale sum_l p u + taps sum_l p gp
        (per-sample tokens), or E = scale^2 (s^2) S2^T + 2 scale s T^T + c (shared ones, through
        their residual: T = S1 * R, c = taps * rowsum(R^2)), for one sample (axis 1) and BLOCK_O
        output channels (axis 0); exact fp32 dots."""
        b = tl.program_id(1).to(tl.int64)
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = offs_o < COUT
        offs_l = tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        styled_energy = tl.zeros((BLOCK_O,), dtype=tl.float32)
        cross = tl.zeros((BLOCK_O,), dtype=tl.float32)
        u = tl.zeros((BLOCK_L, BLOCK_O), dtype=tl.float32)
        gram = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        for i0 in range(0, CIN, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < CIN
            s = tl.load(styles_ptr + b * CIN + offs_i, mask=i_ok, other=0.0).to(tl.float32)
            w_mask = o_ok[:, None] & i_ok[None, :]
            s2 = tl.load(s2_ptr + offs_o[:, None] * CIN + offs_i[None, :], mask=w_mask, other=0.0)
            styled_energy += tl.sum(s2 * (s * s)[None, :], axis=1)
            if HAS_RESIDUAL:
                t = tl.load(t_ptr + offs_o[:, None] * CIN + offs_i[None, :], mask=w_mask, other=0.0)
                cross += tl.sum(t * s[None, :], axis=1)
            if HAS_TOKENS:
                s1 = tl.load(s1_ptr + offs_o[:, None] * CIN + offs_i[None, :], mask=w_mask, other=0.0)
                q = tl.load(
                    q_ptr + b * stride_q_b + offs_l[:, None] * CIN + offs_i[None, :],
                    mask=l_ok[:, None] & i_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                u = tl.dot(q * s[None, :], tl.trans(s1), u, input_precision=DOT_PRECISION)
                gram = tl.dot(q, tl.trans(q), gram, input_precision=DOT_PRECISION)
        energy = styled_energy * (scale * scale)
        if HAS_RESIDUAL:
            energy += 2.0 * scale * cross + tl.load(c_ptr + offs_o, mask=o_ok, other=0.0)
        if HAS_TOKENS:
            token_mask = l_ok[:, None] & o_ok[None, :]
            token_offsets = (b * L + offs_l[:, None]) * COUT + offs_o[None, :]
            p = tl.load(
                p_ptr + b * stride_tokens_b + offs_l[:, None] * COUT + offs_o[None, :], mask=token_mask, other=0.0
            ).to(tl.float32)
            gp = tl.dot(gram, p, input_precision=DOT_PRECISION)
            energy += 2.0 * scale * tl.sum(p * u, axis=0) + taps * tl.sum(p * gp, axis=0)
            tl.store(u_ptr + token_offsets, u, mask=token_mask)
            tl.store(gp_ptr + token_offsets, gp, mask=token_mask)
        tl.store(energy_ptr + b * COUT + offs_o, energy, mask=o_ok)
        demod = 1.0 / tl.sqrt_rn(tl.maximum(energy, 0.0) + eps)
        tl.store(demod_ptr + b * COUT + offs_o, demod, mask=o_ok)

    @triton.jit
    def _energy_gradient(grad_demod_ptr, demod_ptr, energy_ptr, offsets, mask):
        """dE = -d^3 / 2 * grad d where the energy E > 0, else 0 (d was clamped there)."""
        grad_demod = tl.load(grad_demod_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        demod = tl.load(demod_ptr + offsets, mask=mask, other=0.0)
        energy = tl.load(energy_ptr + offsets, mask=mask, other=0.0)
        return tl.where(energy > 0, grad_demod * demod * demod * demod * -0.5, 0.0)

    @triton.jit
    def _demodulation_backward_kernel(
        grad_demod_ptr,  # [B, COUT] contiguous
        demod_ptr,  # [B, COUT] fp32
        energy_ptr,  # [B, COUT] fp32
        styles_ptr,  # [B, CIN] contiguous
        s1_ptr,
        s2_ptr,
        p_ptr,
        q_ptr,
        u_ptr,
        gp_ptr,
        grad_styles_ptr,  # [B, CIN] out, styles' dtype (added to, if ACCUMULATE_STYLES)
        grad_p_ptr,  # [B, L, COUT] out, if HAS_TOKENS (per sample also for shared tokens; added to, if ACCUMULATE_TOKENS)
        grad_q_ptr,  # [B, L, CIN] out, if HAS_TOKENS (added to, if ACCUMULATE_TOKENS)
        t_ptr,  # [COUT, CIN] fp32, if HAS_RESIDUAL (as the forward)
        grad_energy_ptr,  # [B, COUT] fp32 out: dE, if HAS_RESIDUAL (for the gradients of T and c)
        CIN,
        COUT,
        L,
        stride_tokens_b,  # of p: 0 for shared tokens
        stride_q_b,
        scale,
        taps,
        HAS_TOKENS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        ACCUMULATE_STYLES: tl.constexpr,  # add to what grad_styles_ptr holds (the conv's part)
        ACCUMULATE_TOKENS: tl.constexpr,  # add to what grad_p_ptr and grad_q_ptr hold
        BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_L: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # of the fp32 dots: "ieee" (FMA) or "tf32x3" (tensor cores)
    ):
        """grad styles and grad q for BLOCK_I input channels (the first cdiv(CIN, BLOCK_I)
        programs of axis 0), or grad p (HAS_TOKENS) or dE (HAS_RESIDUAL) for BLOCK_O output
        channels (the rest); axis 1: the sample."""
        b = tl.program_id(1).to(tl.int64)
        i_blocks = tl.cdiv(CIN, BLOCK_I)
        offs_l = tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        if tl.program_id(0) < i_blocks:
            offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
            i_ok = offs_i < CIN
            s = tl.load(styles_ptr + b * CIN + offs_i, mask=i_ok, other=0.0).to(tl.float32)
            energy_s2 = tl.zeros((BLOCK_I,), dtype=tl.float32)  # sum_o dE S2
            energy_t = tl.zeros((BLOCK_I,), dtype=tl.float32)  # sum_o dE T
            cross = tl.zeros((BLOCK_L, BLOCK_I), dtype=tl.float32)  # (dE * p) S1
            outer = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)  # (dE * p) p^T
            for o0 in range(0, COUT, BLOCK_O):
                offs_o = o0 + tl.arange(0, BLOCK_O)
                o_ok = offs_o < COUT
                grad_energy = _energy_gradient(grad_demod_ptr, demod_ptr, energy_ptr, b * COUT + offs_o, o_ok)
                w_mask = o_ok[:, None] & i_ok[None, :]
                s2 = tl.load(s2_ptr + offs_o[:, None] * CIN + offs_i[None, :], mask=w_mask, other=0.0)
                energy_s2 += tl.sum(grad_energy[:, None] * s2, axis=0)
                if HAS_RESIDUAL:
                    t = tl.load(t_ptr + offs_o[:, None] * CIN + offs_i[None, :], mask=w_mask, other=0.0)
                    energy_t += tl.sum(grad_energy[:, None] * t, axis=0)
                if HAS_TOKENS:
                    s1 = tl.load(s1_ptr + offs_o[:, None] * CIN + offs_i[None, :], mask=w_mask, other=0.0)
                    p = tl.load(
                        p_ptr + b * stride_tokens_b + offs_l[:, None] * COUT + offs_o[None, :],
                        mask=l_ok[:, None] & o_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    weighted_p = p * grad_energy[None, :]
                    cross = tl.dot(weighted_p, s1, cross, input_precision=DOT_PRECISION)
                    outer = tl.dot(weighted_p, tl.trans(p), outer, input_precision=DOT_PRECISION)
            grad_styles = 2.0 * scale * scale * s * energy_s2 + 2.0 * scale * energy_t
            if HAS_TOKENS:
                q_mask = l_ok[:, None] & i_ok[None, :]
                q_offsets = (b * L + offs_l[:, None]) * CIN + offs_i[None, :]
                q = tl.load(
                    q_ptr + b * stride_q_b + offs_l[:, None] * CIN + offs_i[None, :], mask=q_mask, other=0.0
                ).to(tl.float32)
                grad_styles += 2.0 * scale * tl.sum(q * cross, axis=0)
                # the residual sum_o dE_o p_o^T (q q^T) p_o has q-gradient 2 (p diag(dE) p^T) q
                grad_q = 2.0 * scale * s[None, :] * cross + 2.0 * taps * tl.dot(outer, q, input_precision=DOT_PRECISION)
                if ACCUMULATE_TOKENS:
                    grad_q += tl.load(grad_q_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
                tl.store(grad_q_ptr + q_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=q_mask)
            if ACCUMULATE_STYLES:
                grad_styles += tl.load(grad_styles_ptr + b * CIN + offs_i, mask=i_ok, other=0.0).to(tl.float32)
            tl.store(grad_styles_ptr + b * CIN + offs_i, grad_styles.to(grad_styles_ptr.dtype.element_ty), mask=i_ok)
        else:
            if HAS_TOKENS:
                offs_o = (tl.program_id(0) - i_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
                o_ok = offs_o < COUT
                grad_energy = _energy_gradient(grad_demod_ptr, demod_ptr, energy_ptr, b * COUT + offs_o, o_ok)
                token_mask = l_ok[:, None] & o_ok[None, :]
                token_offsets = (b * L + offs_l[:, None]) * COUT + offs_o[None, :]
                u = tl.load(u_ptr + token_offsets, mask=token_mask, other=0.0)
                gp = tl.load(gp_ptr + token_offsets, mask=token_mask, other=0.0)
                grad_p = 2.0 * grad_energy[None, :] * (scale * u + taps * gp)
                if ACCUMULATE_TOKENS:
                    grad_p += tl.load(grad_p_ptr + token_offsets, mask=token_mask, other=0.0).to(tl.float32)
                tl.store(grad_p_ptr + token_offsets, grad_p.to(grad_p_ptr.dtype.element_ty), mask=token_mask)
            if HAS_RESIDUAL:
                offs_o = (tl.program_id(0) - i_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
                o_ok = offs_o < COUT
                grad_energy = _energy_gradient(grad_demod_ptr, demod_ptr, energy_ptr, b * COUT + offs_o, o_ok)
                tl.store(grad_energy_ptr + b * COUT + offs_o, grad_energy, mask=o_ok)

    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 128x128 / 128x64 / 64x128 tiles for the
    # big GEMMs, narrow N tiles for few output channels (toRGB, the 1024 px layers), short M
    # tiles for the 4x4 and 8x8 layers (a tile never spans two samples). The flat (K block,
    # tap) loop holds one A and one W tile per step, so 3-4 pipeline stages cost 3-4 tile
    # pairs of shared memory; `_prune_conv_configs` drops what would not fit.
    # The K = 32 tiles are for the 32-channel layers (1024 px): the K = 64 ones do not fit
    # them, and until session 25 their forward had one untuned 64x32x32 tile and no TMA
    # (`_prune_conv_configs` keeps these only where K <= 32). ptxas for sm_90a: 68-130
    # registers, no spills, 2-7 programs an SM (`python -m benchmarks.kernel_audit`).
    _CONV_SHAPES = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 3),
        (128, 32, 64, 4, 3),
        (64, 32, 64, 4, 4),
        (128, 16, 64, 4, 3),
        (64, 16, 64, 4, 4),
        (32, 64, 64, 4, 3),
        (32, 128, 64, 4, 3),
        (16, 64, 64, 4, 3),
        (16, 128, 64, 4, 3),
        (64, 32, 32, 4, 3),
        (128, 32, 32, 4, 3),
        (128, 32, 32, 8, 3),
        (256, 32, 32, 8, 3),
        (256, 32, 32, 4, 3),
    ]
    _CONV_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for m, n, k, w, st in _CONV_SHAPES
    ]

    def _prune_conv_configs(configs, named_args, **kwargs):
        """Keep the configs that fit the problem: no N or K tile far wider than N or K, no K tile
        of a narrow (< 128) N tile narrower than K (up to 64), no M tile longer than one
        sample's pixels, short M tiles only for small images; launches
        that reduce per tile get exactly `_reduce_block_m`; launches with the toRGB epilogue get
        one N tile over every channel. Each kept config gets its pixel
        block's width (`_tile_width`) and, for launches that scale A, is tried with the scale
        on A and on W."""
        pixels = named_args["GRID_H"] * named_args["GRID_W"]
        n_cap = max(16, _next_pow2(named_args["N"]))
        k_cap = max(16, _next_pow2(named_args["K"]))
        m_cap = max(16, _next_pow2(pixels))
        # token products: one K block, and the N tiles their partial sums were sized for
        products = bool(kwargs.get("TOKEN_PRODUCTS", named_args.get("TOKEN_PRODUCTS")))
        # a launch that reads x reduces per tile (`_launch_conv_gemm`): grad s (REDUCE_X), the
        # token products, or both; a products launch without grad s has REDUCE_X off
        reducing = products or kwargs.get("REDUCE_X", named_args.get("REDUCE_X"))
        reduce_m = _reduce_block_m(pixels) if reducing else None
        whole_n = bool(kwargs.get("RGB_CHANNELS", named_args.get("RGB_CHANNELS")))

        element = named_args["w_ptr"].element_size()

        def fits(config):
            m, n, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
            if config.num_stages * (m * k + k * n) * element > CONV_SHARED_MEMORY_BUDGET:
                return False
            if n < 128 and k < min(64, k_cap):  # a narrow tile's K block is as wide as K allows (to 64)
                return False
            if whole_n and n != n_cap:
                return False
            if reduce_m is not None:
                return m == reduce_m and n <= n_cap and k <= k_cap
            return n <= n_cap and k <= k_cap and m <= m_cap and (m >= 64 or pixels <= 1024)

        kept = [config for config in configs if fits(config)]
        if products:  # one tile: the partial sums' buffer and the registers fix it (`_products_blocks`)
            block_n, block_k, warps = _products_blocks(named_args["N"], named_args["K"])
            # Past 64 x 32 x 32 the tile takes 8 warps, so each warp has half the work it would have
            # at 4: in 16-bit types 4 warps also fit (252-255 registers a thread, the same warps an SM)
            # and issue 26-42% fewer instructions a pixel (`benchmarks.kernel_audit`, "token
            # products"), but Triton 3.6 spills up to 132 bytes at some of them: both are timed.
            tried = (warps, 4) if warps == 8 and element == 2 else (warps,)
            kept = [
                triton.Config(
                    {"BLOCK_M": reduce_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                    num_warps=tried_warps,
                    num_stages=CONV_NUM_STAGES,
                )
                for tried_warps in tried
            ]
        if not kept:
            m = reduce_m or min(64, m_cap)
            kept = [
                triton.Config(
                    {"BLOCK_M": m, "BLOCK_N": n_cap if whole_n else _products_block_n(n_cap), "BLOCK_K": min(64, k_cap)},
                    num_warps=4,
                    num_stages=CONV_NUM_STAGES,
                )
            ]
        scale_a = kwargs.get("HAS_A_SCALE", named_args.get("HAS_A_SCALE"))
        tma_m = named_args.get("TMA_BLOCK_M", 0)

        def tile_width(config):  # a reducing launch's blocks must be the ones its buffer counts
            if reduce_m is not None and tma_m:
                return tma_m
            return _tile_width(config.kwargs["BLOCK_M"], named_args["GRID_W"])

        variants = [  # (config, TILE_W, SCALE_WEIGHT, A_TMA)
            (config, tile_width(config), on_w, False) for config in kept for on_w in ((False, True) if scale_a else (False,))
        ]
        # the TMA loads, for the tiles of the descriptor's block (its strip is the M tile), with
        # the styles on W (on A they would take A through registers again)
        variants += [
            (config, tma_m, bool(scale_a), True)
            for config in kept
            if tma_m and config.kwargs["BLOCK_M"] == tma_m and config.kwargs["BLOCK_K"] == min(128 // element, k_cap)
        ]
        return [
            triton.Config(
                dict(config.kwargs, TILE_W=tile_w, SCALE_WEIGHT=on_w, A_TMA=tma,
                     **_whole_blocks(named_args["K"], named_args["N"], config.kwargs["BLOCK_K"], config.kwargs["BLOCK_N"]),
                     BOX_BY_MMA=_box_by_mma(products, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                                            config.kwargs["BLOCK_K"], config.num_warps)),
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
            for config, tile_w, on_w, tma in variants
        ]


_conv_gemm_tuned = None

# A grad-x launch of a fused-route layer sums the forward's token gradients itself
# (TOKEN_PRODUCTS) where one K block holds every output channel of the layer: then the sum
# over taps of the A tiles it loads is box(g), and x is loaded for grad s anyway. In config-f
# these are the 512 px and 1024 px layers (32 and 64 channels); 0 switches it off.
CONV_TOKEN_PRODUCTS_MAX_K = 64
# Such a launch runs up to this many pixel blocks per program, so its [L, K] + [L, N] fp32
# partial sums are stored once per 1024 pixels instead of once per 64 ...
CONV_PRODUCTS_MAX_TILES = 16
# ... while keeping at least this many programs (8 per H100 SM).
CONV_PRODUCTS_MIN_PROGRAMS = 1056
# Such a launch sums box(a) by wgmma at the tiles that fit it (`_box_by_mma`); False: never.
CONV_PRODUCTS_BOX_BY_MMA = True


def _products_block_n(n: int) -> int:
    """BLOCK_N of the conv launches that do not autotune it: the token-product launches (their
    grad p partial sums have one row per N tile, sized before the launch) and the untuned path."""
    return min(64, max(16, _next_pow2(n)))


def _products_blocks(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of a token-product launch (BLOCK_M is `_reduce_block_m`):
    one K block of every output channel, and the warps at which ptxas fits the kernel without
    spills for sm_90a (`python -m benchmarks.kernel_audit`): 4 warps up to 64 x 32 x 32 tiles
    (255 registers with box(a) summed by wgmma: 2 programs an SM), 8 past it (182-242: 1
    program). The per-program products and the block loop around the main loop cost ~100
    registers over the plain grad-x launch; both cases keep 8 warps an SM. Past 64 x 32 x 32
    the autotuner also times 4 warps in 16-bit types (`_prune_conv_configs`)."""
    block_n, block_k = _products_block_n(n), max(16, _next_pow2(k))
    return block_n, block_k, (4 if block_n * block_k <= 1024 else 8)


def _box_by_mma(token_products: bool, block_m: int, block_n: int, block_k: int, num_warps: int) -> bool:
    """BOX_BY_MMA of a conv launch: whether a token-product launch sums box(a) by wgmma in its
    step loop (one more [BLOCK_M, BLOCK_K] fp32 accumulator) instead of one L-row dot a step.

    Where ptxas fits it without spills for sm_90a under Triton 3.6 and 3.9
    (`python -m benchmarks.kernel_audit --families "token products"`): at 4 warps, tiles whose
    output and box accumulators hold at most 4096 values (64 x 32 x 32: 86-99 instructions
    issued a pixel, from 101-107); at 8 warps, 64 x 64 x 64 (209-227, from 223-239).
    64 x 64 x 32 at 8 warps spilled 16-92 bytes with it, the 64-wide tiles at 4 warps 16-472
    (those with a 64-channel K block sum grad p's products transposed instead,
    `GRAD_P_TRANSPOSED`). Never where `CONV_PRODUCTS_BOX_BY_MMA` is False (an A/B, and the
    tests of the dots a step)."""
    if not (token_products and CONV_PRODUCTS_BOX_BY_MMA):
        return False
    if num_warps == 4:
        return block_m * (block_n + block_k) <= 4096
    return (block_m, block_n, block_k, num_warps) == (64, 64, 64, 8)


def _tiles_per_program(batch: int, m_tiles: int, n_tiles: int) -> int:
    """Pixel blocks per program of a token-product launch: the largest power of two up to
    `CONV_PRODUCTS_MAX_TILES` that keeps `CONV_PRODUCTS_MIN_PROGRAMS` programs (at least 1)."""
    tiles = 1
    while tiles < CONV_PRODUCTS_MAX_TILES and batch * -(-m_tiles // (2 * tiles)) * n_tiles >= CONV_PRODUCTS_MIN_PROGRAMS:
        tiles *= 2
    return tiles


def _whole_blocks(k: int, n: int, block_k: int, block_n: int) -> dict:
    """EVEN_K, EVEN_N and SINGLE_K_BLOCK of a conv launch: whether K and N are whole numbers of
    its blocks, so that its main loop loads without masks (config-f's channel counts always
    are), and whether one K block holds every input channel (the 32-channel layers at 32-wide
    K blocks; every token-product launch), so that the step loop reuses one projection and
    style tile."""
    return dict(EVEN_K=k % block_k == 0, EVEN_N=n % block_n == 0, SINGLE_K_BLOCK=k <= block_k)


# The conv kernel addresses one sample's input (a per-pixel offset and a per-step shift) and the
# weight in int32, so each must hold fewer values (the input with a pixel of margin on every side).
CONV_MAX_SAMPLE_VALUES = 2**31 - 1


def _tuned_conv_gemm():
    """The autotuned `_conv_gemm_kernel`, built on first use: some Triton versions ask the GPU
    driver for a benchmarker when an autotuner is made, and importing must work without one."""
    global _conv_gemm_tuned
    if _conv_gemm_tuned is None:
        options = {}
        if TRITON_AUTOTUNE_DISK_CACHE and "cache_results" in inspect.signature(triton.autotune).parameters:
            options["cache_results"] = True  # Triton >= 3.2
        _conv_gemm_tuned = triton.autotune(
            configs=_CONV_CONFIGS,
            key=CONV_AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_conv_configs},
            **options,
        )(_conv_gemm_kernel)
    return _conv_gemm_tuned


def _launch_conv_gemm(
    a, a_scale, w, z, r, alpha, beta, out, *, mode, ksize, in_hw, out_hw, grid_hw, box_z, q=None,
    noise=None, noise_strength=None, bias=None, activate=False, clamp=None, x=None, rgb=None, sum_x=True,
    token_products=False, alpha_scale=1.0,
):  # fmt: skip
    """Launch `_conv_gemm_kernel`; tensors as its argument comments say (all on one device).
    alpha [B, N] may be of any float dtype and strides (stride 0 for a constant); the conv part
    is multiplied by alpha * alpha_scale.

    The low-rank term is off when r is None; with r, give either z (the projected input) or
    q (the projection, fused into the kernel; needs L <= 64). With x, the launch also sums
    x * (the conv part) * alpha_scale over each program's pixel blocks (one block, or up to
    `CONV_PRODUCTS_MAX_TILES` with token_products), and returns those partial sums
    [B, programs, N] fp32 (the buffer is sized here: how many blocks there are depends on the
    loads the launch uses); `_sum_partials` finishes them.
    With rgb = (mix [B, K, N] fp32, rgb_bias [K] or None, rgb_out [B, OUT_H, OUT_W, K] (any
    strides), rgb_clamp or None), the launch also writes the toRGB of its output (MODE 0,
    N <= `RGB_EPILOGUE_MAX_COUT`: the N tile spans every channel). sum_x=False skips the sums
    of x (x is then only for the token products).

    token_products (a grad-x launch, MODE 0 or 1, with q, r and x; K <= `CONV_TOKEN_PRODUCTS_MAX_K`):
    the launch also sums the forward's token gradients over pixels, per program in fp32: then it
    returns (the sums of x or None, grad p's partials [B, R, L, K], grad q's [B, R', L, N]),
    each finished by a sum over dim 1 (`_sum_partials`); see the kernel."""
    pixels = grid_hw[0] * grid_hw[1]
    batch, n, k = a.shape[0], w.shape[2], w.shape[1]
    if (in_hw[0] + 2) * (in_hw[1] + 2) * k > CONV_MAX_SAMPLE_VALUES or w.numel() > CONV_MAX_SAMPLE_VALUES:
        raise ValueError(
            f"the triton backend indexes one sample's input and the weight in int32: x of {in_hw[0]}x{in_hw[1]} "
            f"pixels and {k} channels per sample, or a weight of {w.numel()} values, is too large (at most "
            f"{CONV_MAX_SAMPLE_VALUES} values each, the input with a pixel of margin)"
        )
    if token_products and (
        mode == 2 or x is None or q is None or r is None or z is not None or k > CONV_TOKEN_PRODUCTS_MAX_K
    ):  # (their grad q is formed from the fused projection: z must be None)
        raise ValueError(
            f"token products need a MODE 0/1 launch with x, q and r, no z, and K <= {CONV_TOKEN_PRODUCTS_MAX_K}, "
            f"got MODE {mode}, K={k}, x {x is not None}, q {q is not None}, r {r is not None}, z {z is not None}"
        )
    reduce_pixels = pixels if x is not None else None
    a_desc = _tma_descriptor(a, mode, grid_hw[1], reduce_pixels) if a.device.type != "meta" else None
    if token_products and a_desc is not None and a_desc.block_shape[3] < k:
        a_desc = None  # the products need the whole K in one A tile (fp32 rows wider than 32 channels)
    sum_x = sum_x and x is not None
    partial = grad_p_sums = grad_q_sums = None
    tiles_per_program = 1
    if x is not None:  # a reducing launch runs one M tile; with TMA its pixel blocks are row strips
        block_m = _reduce_block_m(pixels)
        tile_w = block_m if a_desc is not None else _tile_width(block_m, grid_hw[1])
        m_tiles = _pixel_tiles(*grid_hw, block_m, tile_w)
        if token_products:
            tiles_per_program = _tiles_per_program(batch, m_tiles, -(-n // _products_block_n(n)))
        chunks = -(-m_tiles // tiles_per_program)
        if sum_x:
            partial = _alloc((batch, chunks, n), torch.float32, a.device)
        if token_products:
            rank = r.shape[1]
            n_tiles = -(-n // _products_block_n(n))
            grad_p_sums = _alloc((batch, chunks, n_tiles, rank, k), torch.float32, a.device)
            grad_q_sums = _alloc((batch, chunks, rank, n), torch.float32, a.device)
    rgb_mix, rgb_bias, rgb_out, rgb_clamp = rgb if rgb is not None else (None, None, None, None)
    if rgb is not None and (mode != 0 or w.shape[2] > RGB_EPILOGUE_MAX_COUT or rgb[0].shape[1] > RGB_EPILOGUE_MAX_CHANNELS):
        raise ValueError(
            f"the toRGB epilogue needs MODE 0, N <= {RGB_EPILOGUE_MAX_COUT} and at most {RGB_EPILOGUE_MAX_CHANNELS} "
            f"toRGB channels, got {mode}, {w.shape[2]} and {rgb[0].shape[1]}"
        )
    reads = (a, a_scale, w, z, r, q if z is None else None, alpha, beta, noise, noise_strength, bias, x, rgb_mix, rgb_bias)
    writes = (out, partial, rgb_out, grad_p_sums, grad_q_sums)
    _observe_launch(f"conv_gemm[mode {mode}]", reads, writes)

    def result():
        if not token_products:
            return partial
        return partial, grad_p_sums.flatten(1, 2), grad_q_sums

    if a.device.type == "meta":  # meta tensors hold no data: nothing to compute
        return result()
    lowrank = r is not None
    fuse_projection = lowrank and z is None
    rank = r.shape[1] if lowrank else 1
    if fuse_projection and rank > 64:
        raise ValueError(f"the fused projection holds L <= 64 tokens in registers, got L={rank}")
    precision = _fp32_input_precision() if w.dtype == torch.float32 else None
    tma_block_m = a_desc.block_shape[2] if a_desc is not None else 0
    # how many programs fill the GPU, so which tile is fastest, depends on the batch too
    batch_bucket = _next_pow2(batch)
    dummy = alpha
    noise_strides = noise.stride()[:1] + noise.stride()[2:] if noise is not None else (0, 0, 0)
    if noise is not None and noise.shape[0] == 1:
        noise_strides = (0,) + noise_strides[1:]
    args = (
        a, a_desc if a_desc is not None else a, a_scale if a_scale is not None else dummy, w, z if z is not None else dummy, r if lowrank else dummy,
        q if fuse_projection else dummy, alpha, beta, out,
        noise if noise is not None else dummy, noise_strength if noise_strength is not None else dummy,
        bias if bias is not None else dummy, x if x is not None else dummy, partial if partial is not None else dummy,
        rgb_mix if rgb is not None else dummy, rgb_bias if rgb_bias is not None else dummy,
        rgb_out if rgb is not None else dummy, grad_p_sums if token_products else dummy,
        grad_q_sums if token_products else dummy, in_hw[0], in_hw[1], out_hw[0], out_hw[1], grid_hw[0], grid_hw[1], tma_block_m, batch_bucket, k, n, rank,
        (r.stride(0) if r.shape[0] > 1 else 0) if lowrank else 0,
        (q.stride(0) if q.shape[0] > 1 else 0) if fuse_projection else 0,
        alpha.stride(0), alpha.stride(1), beta.stride(0), beta.stride(1),
        *noise_strides, float(clamp) if clamp is not None else 0.0,
        *(rgb_out.stride() if rgb is not None else (0, 0, 0, 0)),
        float(rgb_clamp) if rgb_clamp is not None else 0.0, float(alpha_scale),
    )  # fmt: skip
    flags = dict(
        MODE=mode,
        KSIZE=ksize,
        HAS_A_SCALE=a_scale is not None,
        HAS_LOWRANK=lowrank,
        BOX_Z=box_z,
        FUSE_PROJECTION=fuse_projection,
        HAS_NOISE=noise is not None,
        HAS_BIAS=bias is not None,
        ACTIVATE=activate,
        HAS_CLAMP=clamp is not None,
        REDUCE_X=partial is not None,
        RGB_CHANNELS=rgb_mix.shape[1] if rgb is not None else 0,
        HAS_RGB_BIAS=rgb_bias is not None,
        HAS_RGB_CLAMP=rgb_clamp is not None,
        TOKEN_PRODUCTS=token_products,
        TILES_PER_PROGRAM=tiles_per_program,
        INPUT_PRECISION=precision,
        A_VECTOR=_tap_vector(a.element_size()),
        BLOCK_L=min(64, max(16, _next_pow2(rank))),
    )
    phases = 4 if mode == 2 else 1

    def grid(meta):
        chunks = _cdiv(phases * _pixel_tiles(*grid_hw, meta["BLOCK_M"], meta["TILE_W"]), tiles_per_program)
        return (chunks * _cdiv(n, meta["BLOCK_N"]), batch)

    if _interpreted() or not TRITON_AUTOTUNE:
        # the interpreter pays per program, not per element: one big tile
        block_m = min(128 if _interpreted() else 64, max(16, _next_pow2(pixels)))
        if x is not None:
            block_m = _reduce_block_m(pixels)
        block_k = min(64, max(16, _next_pow2(k)))
        if a_desc is not None:  # the descriptor's block is the A tile
            block_m, block_k = a_desc.block_shape[2], a_desc.block_shape[3]
        num_warps = 4
        if token_products:
            _, block_k, num_warps = _products_blocks(n, k)
        blocks = dict(
            BLOCK_M=block_m,
            BLOCK_N=max(16, _next_pow2(n)) if rgb is not None else _products_block_n(n),
            BLOCK_K=block_k,
            TILE_W=block_m if a_desc is not None else _tile_width(block_m, grid_hw[1]),
            SCALE_WEIGHT=(CONV_SCALE_WEIGHT or a_desc is not None) and a_scale is not None,
            A_TMA=a_desc is not None,
        )
        blocks.update(_whole_blocks(k, n, blocks["BLOCK_K"], blocks["BLOCK_N"]))
        blocks["BOX_BY_MMA"] = _box_by_mma(token_products, block_m, blocks["BLOCK_N"], block_k, num_warps)
        _conv_gemm_kernel[grid(blocks)](*args, **flags, **blocks, num_warps=num_warps, num_stages=CONV_NUM_STAGES)
    else:
        # after the first launch of a shape, skip triton.autotune's per-call bookkeeping (~0.2 ms
        # of host time a launch, more than the GPU time of a low-resolution layer)
        key = (
            mode, ksize, k, n, rank, grid_hw, tma_block_m, batch_bucket, flags["BOX_Z"], flags["FUSE_PROJECTION"], flags["HAS_A_SCALE"],
            lowrank, partial is not None, flags["RGB_CHANNELS"], token_products, tiles_per_program, precision,
            flags["A_VECTOR"], a.dtype,
            w.dtype, out.dtype, z.dtype if z is not None else None,
        )  # fmt: skip
        config = _CONV_BEST_CONFIG.get(key)
        if config is None:
            tuner = _tuned_conv_gemm()
            _compile_configs_in_parallel(tuner, args, grid, flags)
            tuner.configs_timings = None  # set again only if this launch's configs are timed (or read from disk)
            tuner[grid](*args, **flags)
            best = tuner.best_config
            timings = getattr(tuner, "configs_timings", None)
            if not timings and TIME_UNTUNED_CONV_LAUNCHES:  # one config left: time it as the autotuner would
                from triton.testing import do_bench

                timings = {best: do_bench(
                    lambda: _conv_gemm_kernel[grid(best.kwargs)](*args, **flags, **best.all_kwargs()),
                    quantiles=(0.5, 0.2, 0.8),
                )}  # fmt: skip
            _CONV_BEST_CONFIG[key] = best
            _CONV_TUNED_LAUNCH[key] = dict(
                tuned_ms=_tuned_ms(timings, best),
                configs_timed=len(getattr(tuner, "configs_timings", None) or ()),
                timings=_config_timings(timings),
                least_bytes=_least_bytes(reads, writes),
                flops=_conv_launch_flops(batch, grid_hw, ksize, k, n, rank if lowrank else 0, phases,
                                         fuse_projection, token_products, flags["RGB_CHANNELS"]),
            )  # fmt: skip
        else:
            _conv_gemm_kernel[grid(config.kwargs)](*args, **flags, **config.all_kwargs())
    return result()


# Threads that compile a launch shape's autotune configs before the autotuner benchmarks them:
# None for one per CPU core (at most 32), 0 or 1 to leave the compiling to the autotuner.
CONV_COMPILE_THREADS = None


def _compile_configs_in_parallel(tuner, args: tuple, grid, flags: dict) -> None:
    """Compile every config `tuner` will benchmark for this launch, in parallel threads.

    triton.autotune compiles each config when it first runs it, one after the other: about 10
    configs per launch shape and 34 launch shapes in a config-f training step, near a second
    each, so minutes before the first step ends. Triton's compiler releases the GIL in its
    passes and runs ptxas as a subprocess, so threads overlap (2 threads: 2x on 2 cores, here).
    The kernels land in the JIT's cache, where the autotuner then finds them.
    `triton.AsyncCompileMode` (Triton >= 3.5) runs the warm-up's compiles in the pool; where it
    is missing or fails, the autotuner compiles as before."""
    threads = CONV_COMPILE_THREADS if CONV_COMPILE_THREADS is not None else min(32, os.cpu_count() or 1)
    if threads <= 1 or not hasattr(triton, "AsyncCompileMode"):
        return
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
            tuner.warmup(*args, grid=grid, **flags)  # compiles each pruned config; launches nothing
    except Exception as error:  # the autotuner compiles (and reports a real failure) on its own
        warnings.warn(f"compiling the conv kernel's autotune configs in parallel failed: {error!r}", stacklevel=2)


# (launch shape and dtypes) -> the triton.Config the autotuner chose for it
_CONV_BEST_CONFIG: dict = {}
# When True (`python -m benchmarks` on a GPU, `benchmarks.profile` while it profiles), a launch
# shape that pruning left one config is timed once anyway, as the autotuner times the others, so
# every shape shows in `autotuned_conv_configs`: the token-product launches of the 512 and
# 1024 px layers have one tile each (two where TMA loads apply).
TIME_UNTUNED_CONV_LAUNCHES = False
# the same keys -> what tuning measured of that launch (`autotuned_conv_configs`)
_CONV_TUNED_LAUNCH: dict = {}


def _median_ms(timing) -> float:
    """One config's time in Triton's `configs_timings`: [median, p20, p80] or ms."""
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def _config_timings(timings: dict | None) -> list[dict]:
    """Every timed config of one launch shape as {its tile fields, num_warps, num_stages, ms},
    fastest first: how much the autotuner's choice mattered (`autotuned_conv_configs`)."""
    rows = [dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, ms=_median_ms(timing))
            for config, timing in (timings or {}).items()]  # fmt: skip
    return sorted(rows, key=lambda row: row["ms"])


def _tuned_ms(timings: dict | None, best) -> float | None:
    """The chosen config's median time (ms) among the timings of one launch shape ({config:
    [median, p20, p80]} or {config: ms}, as Triton's `configs_timings`), or None where nothing
    was timed (one config after pruning, `TIME_UNTUNED_CONV_LAUNCHES` off)."""
    if not timings or best not in timings:
        return None
    return _median_ms(timings[best])


def _conv_launch_flops(batch, grid_hw, ksize, k, n, rank, phases, fused_projection, token_products, rgb_channels) -> int:
    """FLOPs (2 x MACs) of one `_conv_gemm_kernel` launch's products: the conv (every grid pixel
    meets KSIZE^2 taps, over the four phases of MODE 2 too), the low-rank branch (the fused
    projection per tap, box(z) @ r per output pixel), the token products (u = x r^T, grad p's
    per-tap products, grad q's) and the toRGB epilogue."""
    grid_pixels = batch * grid_hw[0] * grid_hw[1]
    out_pixels = grid_pixels * phases
    macs = grid_pixels * ksize * ksize * k * n
    if rank:
        macs += out_pixels * rank * n
        if fused_projection:
            macs += grid_pixels * ksize * ksize * k * rank
    if token_products:
        macs += grid_pixels * (n * rank + ksize * ksize * rank * k + rank * n)
    macs += out_pixels * n * rgb_channels
    return 2 * macs


# the fields of those keys, in order (benchmarks record the choices by name)
CONV_BEST_CONFIG_KEY_FIELDS = (
    "MODE", "KSIZE", "K", "N", "L", "GRID_HW", "TMA_BLOCK_M", "BATCH_BUCKET", "BOX_Z", "FUSE_PROJECTION", "HAS_A_SCALE", "HAS_LOWRANK", "REDUCE_X",
    "RGB_CHANNELS", "TOKEN_PRODUCTS", "TILES_PER_PROGRAM", "INPUT_PRECISION", "A_VECTOR", "a_dtype", "w_dtype", "out_dtype",
    "z_dtype",
)  # fmt: skip


def autotuned_conv_configs() -> list[dict]:
    """What the conv kernel's autotuner chose in this process, one dict per launch shape: the
    launch's fields (`CONV_BEST_CONFIG_KEY_FIELDS`, dtypes as strings), the chosen config's
    BLOCK_M/N/K, TILE_W, SCALE_WEIGHT, A_TMA, num_warps and num_stages, and what tuning
    measured: tuned_ms (the chosen config's median in the autotuner's own timing, Triton's
    do_bench, which empties the L2 cache between calls; None where one config was left and
    `TIME_UNTUNED_CONV_LAUNCHES` is off), configs_timed (by the autotuner), timings (every
    timed config's tile fields, num_warps, num_stages and median ms, fastest first; with
    `TIME_UNTUNED_CONV_LAUNCHES` also a lone config's), least_bytes (every tensor the launch
    reads or writes, once) and flops (2 x the MACs of its products, `_conv_launch_flops`)."""
    chosen = []
    for key, config in _CONV_BEST_CONFIG.items():
        entry = {name: str(value) if isinstance(value, torch.dtype) else value
                 for name, value in zip(CONV_BEST_CONFIG_KEY_FIELDS, key)}  # fmt: skip
        entry.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        entry.update(_CONV_TUNED_LAUNCH.get(key, {}))
        chosen.append(entry)
    return chosen


def _pointwise_blocks(pixels: int, channels: int, max_values: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of `_epilogue_backward_kernel`: at most max_values values (a power of
    two, at least 16), BLOCK_N up to 64 channels."""
    if max_values < 16 or max_values & (max_values - 1):
        raise ValueError(f"EPILOGUE_BACKWARD_BLOCK_VALUES: expected a power of two of at least 16, got {max_values}")
    block_n = min(64, max(16, _next_pow2(channels)))
    return max(1, min(_reduce_block_m(pixels), max_values // block_n)), block_n


_BLUR_TAPS_BY_DEVICE: dict = {}


def _blur_taps(device, flipped: bool = False) -> torch.Tensor:
    """The 1-D blur taps on `device` (reversed if flipped, for the adjoint), made once per
    device: a host-to-device copy per call would synchronise the stream and break CUDA-graph
    capture."""
    key = (device, flipped)
    if key not in _BLUR_TAPS_BY_DEVICE:
        taps = _BLUR_TAPS_1D[::-1] if flipped else _BLUR_TAPS_1D
        _BLUR_TAPS_BY_DEVICE[key] = torch.tensor(taps, dtype=torch.float32, device=device)
    return _BLUR_TAPS_BY_DEVICE[key]


# a blur program walks this many output rows at most; fewer when that leaves the GPU idle
BLUR_MAX_ROWS = 32
# load each source row one iteration ahead (False: where it is used, as before session 28)
BLUR_PREFETCH = True
BLUR_MIN_PROGRAMS = 1056  # 8 per H100 SM


def _blur_blocks(batch: int, dst_h: int, dst_w: int, channels: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_W, BLOCK_N, ROWS, column blocks) of `_blur_kernel`. Row tiles of 1024 values keep it
    at <= 128 registers a thread without spills at 4 warps (`benchmarks.kernel_audit`). The
    backward's blocks are 16 or 32 source columns (its band dot needs >= 16) that overlap by
    TAPS - 1. ROWS is as many rows a program as still give BLUR_MIN_PROGRAMS programs: each
    program re-filters TAPS - 1 rows to warm its window up."""
    overlap = len(_BLUR_TAPS_1D) - 1
    if backward:
        block_w = 16 if dst_w <= 16 - overlap else 32
        block_n = min(max(16, _next_pow2(channels)), 1024 // block_w)
        column_blocks = _cdiv(dst_w, block_w - overlap)
    else:
        block_n = min(64, max(16, _next_pow2(channels)))
        block_w = min(_next_pow2(dst_w), 1024 // block_n)
        column_blocks = _cdiv(dst_w, block_w)
    programs = column_blocks * _cdiv(channels, block_n) * batch
    rows = BLUR_MAX_ROWS
    while rows > 4 and programs * _cdiv(dst_h, rows) < BLUR_MIN_PROGRAMS:
        rows //= 2
    return block_w, block_n, rows, column_blocks


def _launch_blur(
    src, dst, *, saved=None, demod=None, noise=None, noise_strength=None, bias=None, activate=False, clamp=None
):  # fmt: skip
    """`_blur_kernel` into dst [B, DST_H, DST_W, N] (contiguous) from src [B, SRC_H, SRC_W, N]
    (any strides).

    Forward (saved None): the upsampling layer's blur of src, then the epilogue (noise
    [B or 1, 1, DST_H, DST_W], noise_strength [1], bias [N], activate, clamp as in
    `styled_conv2d`); returns None.
    Backward (saved given): src is the gradient of the epilogue's output and saved that output
    [B, SRC_H, SRC_W, N]; dst = the blur's adjoint of d (demod [B, N] fp32) times the gradient
    of the pre-activation. Returns the per-program sums [3, B, TILES, N] fp32 for grad bias,
    grad noise strength and grad d (the planes of the absent terms are not written).
    """
    backward = saved is not None  # the adjoint: flipped taps, pad TAPS - 1 - PAD
    name = "epilogue_backward_blurred" if backward else "blur"
    batch, src_h, src_w, channels = src.shape
    dst_h, dst_w = dst.shape[1], dst.shape[2]
    block_w, block_n, rows, column_blocks = _blur_blocks(batch, dst_h, dst_w, channels, backward)
    grid = (column_blocks * _cdiv(channels, block_n), _cdiv(dst_h, rows), batch)
    sums = _alloc((3, batch, column_blocks * grid[1], channels), torch.float32, src.device) if backward else None
    _observe_launch(name, (src, saved, demod, noise, noise_strength, bias), (dst, sums))
    if src.device.type == "meta":
        return sums
    taps = _blur_taps(src.device, flipped=backward)
    pad = len(_BLUR_TAPS_1D) - 1 - UPSAMPLE_BLUR_PAD[0] if backward else UPSAMPLE_BLUR_PAD[0]
    noise_strides = (0, 0, 0)
    if noise is not None:
        noise_strides = (noise.stride(0) if noise.shape[0] > 1 else 0, noise.stride(2), noise.stride(3))
    dummy = taps
    _blur_kernel[grid](
        src, saved if backward else dummy, taps, dst, demod if demod is not None else dummy,
        noise if noise is not None else dummy, noise_strength if noise_strength is not None else dummy,
        bias if bias is not None else dummy, sums if backward else dummy,
        src_h, src_w, dst_h, dst_w, channels, pad, rows, *src.stride(), *(saved.stride() if backward else (0,) * 4),
        *noise_strides, (_clamp_bound(clamp, saved.dtype) if backward else float(clamp)) if clamp is not None else 0.0,
        TAPS=len(_BLUR_TAPS_1D), EPILOGUE_BACKWARD=backward,
        INPUT_PRECISION=_fp32_input_precision() if dst.dtype == torch.float32 else None, HAS_DEMOD=demod is not None,
        HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, ACTIVATE=activate, HAS_CLAMP=clamp is not None,
        BLOCK_W=block_w, BLOCK_N=block_n, PREFETCH=BLUR_PREFETCH, num_warps=4,
    )  # fmt: skip
    return sums


def _as_batched_tokens(tokens: torch.Tensor | None) -> torch.Tensor | None:
    """[L, C] shared or [B, L, C] per-sample tokens -> [1 or B, L, C] contiguous."""
    if tokens is None:
        return None
    return (tokens[None] if tokens.ndim == 2 else tokens).contiguous()


def _project(x_nhwc: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """z = q_b x: [B, H, W, Cin] x [1 or B, L, Cin] (one dtype) -> [B, H, W, L] in that dtype
    (one GEMM, summed in fp32 and rounded once; the kernels that read z sum its box in fp32)."""
    batch, height, width, channels = x_nhwc.shape
    if q3.shape[0] == 1:  # shared tokens: one [B*H*W, Cin] x [Cin, L] product
        z = torch.mm(x_nhwc.reshape(-1, channels), q3[0].t())
    else:
        z = torch.bmm(x_nhwc.reshape(batch, height * width, channels), q3.transpose(1, 2))
    return z.reshape(batch, height, width, q3.shape[1])


# Programs `_sum_over_pixels` aims to launch: a few waves of an H100's 132 SMs, so a
# reduction over a million pixels is split across the whole GPU ...
PIXEL_REDUCTION_PROGRAMS = 528
# ... but each program sums at least this many pixels (16 steps of 64), so small layers do
# not pay for more partial sums than pixels.
PIXEL_REDUCTION_MIN_PIXELS = 1024

# The box `_sum_over_pixels` applies to its first operand (the `BOX` of `_pixel_products_kernel`)
BOX_NONE, BOX_SAME, BOX_STRIDE2 = -1, 0, 1


def _sum_over_pixels(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    box: int = BOX_NONE,
    ksize: int = 1,
    over_batch: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """box(a)^T b per sample, summed in fp32: a [B, A_H, A_W, L] (any strides), b [B, H, W, C]
    (rows packed: stride(1) == W * stride(2)), both of one float dtype -> [B, L, C] summed over
    b's H x W pixels, or [L, C] summed over the batch too when over_batch (shared tokens),
    rounded once to `dtype`.

    box: how a reaches b's grid through the low-rank branch's all-ones ksize x ksize box:
    BOX_NONE (a is on b's grid), BOX_SAME (same padding) or BOX_STRIDE2 (a on the
    (2H+1) x (2W+1) grid of an upsampling layer's transposed conv, b on its input grid; the
    products of that layer are summed this way round, over the input's pixels). The box is
    summed on the fly, so the boxed tensor, as large as an activation when L = C, never exists.

    The token gradients are such products with up to 2^20 pixels and L, C <= 64: as a batched
    GEMM that is one output tile per sample reducing over a million pixels, a handful of thread
    blocks (cuBLAS chose no split-K: 3 ms a layer on an H100). `_pixel_products_kernel` splits
    the pixels across ~`PIXEL_REDUCTION_PROGRAMS` programs that write fp32 partial products,
    summed by `_sum_partials` (deterministic, unlike atomics).
    """
    batch, out_h, out_w, channels = b.shape
    a_h, a_w, rank = a.shape[1], a.shape[2], a.shape[3]
    pixels = out_h * out_w
    block_l = min(64, max(16, _next_pow2(rank)))
    block_c = min(64, max(16, _next_pow2(channels)))
    block_p = 64
    tiles = _cdiv(rank, block_l) * _cdiv(channels, block_c)
    splits = min(_cdiv(pixels, PIXEL_REDUCTION_MIN_PIXELS), PIXEL_REDUCTION_PROGRAMS // (batch * tiles))
    pixels_per_split = _cdiv(_cdiv(pixels, max(1, splits)), block_p) * block_p
    splits = _cdiv(pixels, pixels_per_split)
    partials = _alloc((batch, splits, rank, channels), torch.float32, a.device)
    stride_bb, stride_by, stride_bx, stride_bc = b.stride()
    if stride_by != out_w * stride_bx:
        raise ValueError(f"b: expected its rows packed (stride(1) == W * stride(2)), got strides {b.stride()}")
    _observe_launch("pixel_products", (a, b), (partials,))
    if a.device.type != "meta":
        _pixel_products_kernel[(tiles, splits, batch)](
            a, b, partials, a_h, a_w, out_h, out_w, rank, channels, *a.stride(), stride_bb, stride_bx, stride_bc,
            pixels_per_split, BOX=box, KSIZE=ksize,
            INPUT_PRECISION=_fp32_input_precision() if a.dtype == torch.float32 else None,
            LOAD_STAGES=LOAD_STAGES, BLOCK_P=block_p, BLOCK_L=block_l, BLOCK_C=block_c,
            TAP_VECTOR=_tap_vector(a.element_size()) if box >= 0 else 0, num_warps=4,
        )  # fmt: skip
    return _sum_partials(partials, dtype, over_batch=over_batch)


def _sum_partials(partials: torch.Tensor, dtype: torch.dtype, *, over_batch: bool = False) -> torch.Tensor:
    """The sums a launch left per program, finished: partials [B, R, *S] fp32 contiguous ->
    [B, *S] (or [*S] summed over B too, when over_batch) in `dtype`, summed in fp32 and rounded
    once. One launch of `_sum_partials_kernel`, where torch takes two (sum, then the cast).
    """
    return _sum_partials_together([(partials, dtype, over_batch)])[0]


def _sum_partials_together(jobs: list) -> list:
    """`_sum_partials` of up to three (partials, dtype, over_batch) jobs, in one launch: a
    layer's grad s, grad p and grad q partials are finished together (each launch costs ~25 us
    of host time, more than these sums' GPU time). Returns the sums in the jobs' order."""
    if not 1 <= len(jobs) <= 3:
        raise ValueError(f"jobs: expected 1 to 3 (partials, dtype, over_batch) jobs, got {len(jobs)}")
    prepared, outs = [], []
    for partials, dtype, over_batch in jobs:
        if partials.dtype != torch.float32 or not partials.is_contiguous() or partials.ndim < 2:
            raise ValueError(
                f"partials: expected a contiguous fp32 [B, R, ...] tensor, got {partials.dtype} {tuple(partials.shape)}"
            )
        batch, rows, *inner_shape = partials.shape
        outer = 1 if over_batch else batch
        out = torch.empty(((outer,) if not over_batch else ()) + tuple(inner_shape), dtype=dtype, device=partials.device)
        outs.append(out)
        prepared.append((partials, out, outer, rows * batch // outer, math.prod(inner_shape)))
    _observe_launch("sum_partials", tuple(job[0] for job in prepared), tuple(outs))
    if prepared[0][0].device.type == "meta":  # meta tensors hold no data: nothing to compute
        return outs
    for _, out, _, rows, _ in prepared:
        if rows == 0:
            out.zero_()
    prepared = [job for job in prepared if job[1].numel() > 0 and job[3] > 0]
    if not prepared:
        return outs
    block_i = min(256, _next_pow2(max(job[4] for job in prepared)))
    block_r = min(_next_pow2(max(job[3] for job in prepared)), max(1, 2048 // block_i))
    grid = (max(_cdiv(job[4], block_i) for job in prepared), max(job[2] for job in prepared), len(prepared))
    slots = prepared + [prepared[0]] * (3 - len(prepared))  # unused slots: no program runs them
    _sum_partials_kernel[grid](*(value for job in slots for value in job), BLOCK_R=block_r, BLOCK_I=block_i, num_warps=4)
    return outs


# A plain layer whose token gradients take the fused route (M = box(x)^T g) runs its epilogue
# backward and that product in one kernel (`_epilogue_products_kernel`) when one tile can hold
# every input and output channel of BLOCK_P pixels (the kernel holds up to 128). In config-f
# only the 256 px layer (128 channels) would take it: the 512 and 1024 px layers sum their
# token gradients in the grad-x conv. There, on the H100 in session 24, it took 4.1 ms in one
# launch, and the refined layer 4.52 ms against 1.95 ms unrefined, where the separate route's
# two kernels (`_epilogue_backward_kernel`, `_pixel_products_kernel`) ran every other layer's
# work at a fraction of that. So the limit is 64 (session 25); stage 4 of
# benchmarks/gpu_session.sh times 128 against it.
EPILOGUE_PRODUCTS_MAX_CHANNELS = 64
# what the kernel's tile can hold at all (`_epilogue_products_blocks`)
EPILOGUE_PRODUCTS_KERNEL_MAX_CHANNELS = 128


def _epilogue_products_blocks(in_channels: int, out_channels: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_L, BLOCK_N, num_warps) of `_epilogue_products_kernel`: every channel in
    the tile, and the pixel block and warps at which ptxas fits the kernel without spills
    (`python -m benchmarks.kernel_audit`, sm_90a): 117 registers at 32 channels (BLOCK_P 32,
    8 warps), 125 at 64 (16, 8 warps), 128 at 128 (16, 16 warps): 16 warps an SM each. At 4
    warps and 64-pixel blocks it took 255 and spilled 0.5-2.6 KB."""
    block_l = max(16, _next_pow2(in_channels))
    block_n = max(16, _next_pow2(out_channels))
    widest = max(block_l, block_n)
    return (32 if widest <= 32 else 16), block_l, block_n, (16 if widest > 64 else 8)


def _launch_epilogue_products(
    grad, out, g, x, *, ksize, demod, noise, noise_strength, bias, activate, clamp, rgb=None
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`_launch_epilogue_backward` and `_sum_over_pixels(x, g, box=BOX_SAME)` of a plain layer in
    one launch. x [B, H, W, Cin] (any strides), the conv's input; the other arguments as
    `_launch_epilogue_backward`'s. Returns (sums [3 + K, B, SPLITS, N] fp32, laid out like
    `_launch_epilogue_backward`'s per-tile sums, and M [B, Cin, N] fp32 = box(x)^T g per sample)."""
    batch, out_channels, out_h, out_w = out.shape
    in_channels = x.shape[3]
    if max(in_channels, out_channels) > EPILOGUE_PRODUCTS_KERNEL_MAX_CHANNELS:
        raise ValueError(
            f"_launch_epilogue_products holds at most {EPILOGUE_PRODUCTS_KERNEL_MAX_CHANNELS} channels a tile"
        )
    rgb_grad, rgb_mix, rgb_out, _ = rgb if rgb is not None else (None, None, None, None)
    if grad is None and rgb_grad is None:
        raise ValueError("_launch_epilogue_products: neither grad nor a toRGB gradient was given")
    rgb_channels = rgb_grad.shape[1] if rgb_grad is not None else 0
    block_p, block_l, block_n, num_warps = _epilogue_products_blocks(in_channels, out_channels)
    pixels = out_h * out_w
    splits = min(_cdiv(pixels, PIXEL_REDUCTION_MIN_PIXELS), max(1, PIXEL_REDUCTION_PROGRAMS // batch))
    pixels_per_split = _cdiv(_cdiv(pixels, splits), block_p) * block_p
    splits = _cdiv(pixels, pixels_per_split)
    sums = _alloc((3 + rgb_channels, batch, splits, out_channels), torch.float32, out.device)
    partials = _alloc((batch, splits, in_channels, out_channels), torch.float32, out.device)
    _observe_launch(
        "epilogue_products",
        (grad, out, demod, noise, noise_strength, bias, rgb_grad, rgb_mix, rgb_out, x),
        (g, sums, partials),
    )  # fmt: skip
    if out.device.type == "meta":  # meta tensors hold no data: nothing to compute
        return sums, partials.sum(1)
    pointers, strides, bounds, flags = _epilogue_backward_parts(
        grad, out, sums, demod=demod, noise=noise, noise_strength=noise_strength, bias=bias, activate=activate,
        clamp=clamp, rgb=rgb,
    )  # fmt: skip
    _epilogue_products_kernel[(splits, 1, batch)](
        *pointers, x, g, sums, partials, out_h, out_w, out_channels, in_channels, *strides, *x.stride(),
        pixels_per_split, *bounds, **flags, KSIZE=ksize,
        INPUT_PRECISION=_fp32_input_precision() if x.dtype == torch.float32 else None,
        BLOCK_P=block_p, BLOCK_L=block_l, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return sums, partials.sum(1)


# Per-sample token sets up to this size get the Triton demodulation (`_TritonDemodulation`):
# the gram q q^T [L, L] and the products [L, BLOCK] live in registers. Wider shared sets go
# through their residual R = p^T q instead, for any L.
TRITON_DEMODULATION_MAX_TOKENS = 64

# The demodulation kernels' fp32 dots: "ieee" on the FMA units, exact fp32; "tf32x3" on the tensor
# cores, each operand split into two TF32 parts (three MMAs a product: near-fp32 accuracy).
DEMODULATION_PRECISION = "ieee"


def _demodulation_precision() -> str:
    if DEMODULATION_PRECISION not in ("ieee", "tf32x3"):
        raise ValueError(f'DEMODULATION_PRECISION: expected "ieee" or "tf32x3", got {DEMODULATION_PRECISION!r}')
    return DEMODULATION_PRECISION

# the device types whose tensors the Triton kernels take as they come (besides CPU tensors in
# the interpreter); benchmarks/stand_in_driver.py adds "cpu" to time and compile the GPU path
KERNEL_DEVICE_TYPES = ("cuda", "meta")


def _shared_tokens(p: torch.Tensor) -> bool:
    """Whether tokens p ([L, C] or [B, L, C]) are one set for the whole batch."""
    return p.ndim == 2 or p.shape[0] == 1


def _triton_demodulation_applies(weight, styles, p) -> bool:
    """Whether `_TritonDemodulation` computes d here: eager mode, a frozen weight (it gives no
    weight gradient), no tokens, L <= TRITON_DEMODULATION_MAX_TOKENS tokens or shared ones,
    data on a device the kernels run on. Everything else goes to `demodulation_coefficients`."""
    if triton is None or torch.compiler.is_compiling() or weight.requires_grad:
        return False
    # meta tensors: planned like CUDA ones (benchmarks.memory, benchmarks.traffic); nothing runs
    if weight.device.type not in KERNEL_DEVICE_TYPES and not (weight.device.type == "cpu" and _interpreted()):
        return False
    if weight.dtype == torch.float64 or styles.dtype == torch.float64:
        return False
    if p is None:
        return True
    return p.dtype != torch.float64 and (p.shape[-2] <= TRITON_DEMODULATION_MAX_TOKENS or _shared_tokens(p))


def _demodulation_blocks(
    in_channels: int, out_channels: int, rank: int, backward: bool, precision: str | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_I, BLOCK_L, num_warps) of the demodulation kernels. Their fp32 dots take
    register-hungry layouts (at 64 x 64 x 32 the forward spilled 1.2 KB a thread); these blocks
    keep both kernels free of spills for L <= 64 on sm_90, with Triton 3.6 and 3.9, in either
    `DEMODULATION_PRECISION` (precision: that setting's value, or None for its current one;
    `python -m benchmarks.kernel_audit --families demodulation` compiles both).
    The forward's programs each sum over every input channel, so its output blocks are small
    enough to give the GPU 128 programs at 512 channels and batch 8 (64 until session 28)."""
    block_l = max(16, _next_pow2(rank))
    wide = block_l >= 64
    if (precision or _demodulation_precision()) == "tf32x3":  # MMA operand layouts: smaller blocks fit
        if backward:
            block_o, block_i = 16, 32
        else:
            block_o, block_i = 32, 16
    elif backward:
        block_o, block_i = 64, (32 if wide else 64)
    else:
        block_o, block_i = (16 if wide else 32), 16
    block_o = min(block_o, max(16, _next_pow2(out_channels)))
    return block_o, min(block_i, max(16, _next_pow2(in_channels))), block_l, 8 if wide else 4


def _demodulation_forward(weight, styles, p, q, scale, eps) -> tuple[torch.Tensor, tuple, tuple]:
    """d [B, Cout] fp32 by `_demodulation_kernel` (see `_TritonDemodulation`), with what its
    backward needs: (d, saved tensors, options) for `_demodulation_backward`. No autograd."""
    batch, in_channels = styles.shape
    out_channels = weight.shape[0]
    taps = float(weight.shape[2] * weight.shape[3])
    token_shapes = (p.shape, q.shape, p.dtype, q.dtype) if p is not None else None
    s1, s2 = _tap_sums(weight, torch.float32)
    styles = styles.contiguous()
    residual = p is not None and p.shape[-2] > TRITON_DEMODULATION_MAX_TOKENS
    if residual and not _shared_tokens(p):
        raise ValueError(
            f"p: the Triton demodulation takes at most {TRITON_DEMODULATION_MAX_TOKENS} per-sample tokens "
            f"(more only when shared, [L, Cout]), got {tuple(p.shape)}"
        )
    rank = p.shape[-2] if p is not None and not residual else 1
    device = styles.device
    demod = _alloc((batch, out_channels), torch.float32, device)
    energy = _alloc((batch, out_channels), torch.float32, device)
    u = gp = r = t = c = None
    token_strides = (0, 0)
    if residual:  # shared tokens, any L: through R = p^T q, once for the batch
        p = p.reshape(-1, out_channels).float()
        q = q.reshape(-1, in_channels).float()
        r = p.t() @ q
        t = s1 * r
        c = r.square().sum(1).mul_(taps)
    elif p is not None:
        p, q = _as_batched_tokens(p), _as_batched_tokens(q)
        token_strides = (p.stride(0) if p.shape[0] > 1 else 0, q.stride(0) if q.shape[0] > 1 else 0)
        u = _alloc((batch, rank, out_channels), torch.float32, device)
        gp = _alloc((batch, rank, out_channels), torch.float32, device)
    block_o, block_i, block_l, warps = _demodulation_blocks(in_channels, out_channels, rank, backward=False)
    _observe_launch("demodulation", (styles, s1, s2, p, q, t, c), (demod, energy, u, gp))
    if device.type != "meta":  # meta tensors hold no data: nothing to compute
        tokens = not residual and p is not None
        _demodulation_kernel[(_cdiv(out_channels, block_o), batch)](
            styles, s1, s2, p if tokens else s1, q if tokens else s1, demod, energy,
            u if u is not None else demod, gp if gp is not None else demod,
            t if residual else s1, c if residual else demod,
            in_channels, out_channels, rank, *token_strides, float(scale), float(eps), taps,
            HAS_TOKENS=tokens, HAS_RESIDUAL=residual,
            BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_L=block_l, DOT_PRECISION=_demodulation_precision(), num_warps=warps,
        )  # fmt: skip
    saved = (weight, styles, p, q, demod, energy, u, gp, r, t)
    return demod, saved, (float(scale), token_strides, token_shapes, residual)


def _demodulation_backward(saved, options, grad_demod, needs, accumulate=(None, None, None)) -> tuple:
    """(grad styles, grad p, grad q) of `_demodulation_forward`'s d, None where needs (three
    bools) says not wanted. accumulate: for each of the three, None or a gradient from another
    path (styles' dtype and shape; p's and q's) that the result is added to, in the kernel where
    its layout allows (per-sample tokens, contiguous): then that tensor is updated in place and
    returned, and no separate add is launched."""
    weight, styles, p, q, demod, energy, u, gp, r, t = saved
    scale, token_strides, token_shapes, residual = options
    batch, in_channels = styles.shape
    out_channels = weight.shape[0]
    taps = float(weight.shape[2] * weight.shape[3])
    tokens = p is not None and not residual
    s1, s2 = _tap_sums(weight, torch.float32)
    rank = p.shape[1] if tokens else 1
    shared = tokens and p.shape[0] == 1 and batch > 1
    need_styles, need_p, need_q = needs
    add_styles, add_p, add_q = accumulate
    p_shape, q_shape, p_dtype, q_dtype = token_shapes if token_shapes is not None else (None,) * 4

    def in_place(given, shape, dtype):  # whether the kernel can add into `given` as it stores
        return given is not None and given.is_contiguous() and given.shape == shape and given.dtype == dtype

    into_styles = need_styles and in_place(add_styles, styles.shape, styles.dtype)
    # per-sample tokens only: shared ones are summed over the batch after the kernel
    into_tokens = (
        tokens and not shared and need_p and need_q
        and in_place(add_p, (batch, rank, out_channels), p_dtype) and in_place(add_q, (batch, rank, in_channels), q_dtype)
    )  # fmt: skip
    grad_styles = add_styles if into_styles else _alloc(styles.shape, styles.dtype, styles.device)
    grad_p = grad_q = grad_energy = None
    if into_tokens:
        grad_p, grad_q = add_p, add_q
    elif tokens:  # per sample; shared tokens sum them over the batch afterwards, in fp32
        token_dtype = torch.float32 if shared else p_dtype
        grad_p = _alloc((batch, rank, out_channels), token_dtype, p.device)
        grad_q = _alloc((batch, rank, in_channels), token_dtype, q.device)
    if residual:
        grad_energy = _alloc((batch, out_channels), torch.float32, styles.device)
    block_o, block_i, block_l, warps = _demodulation_blocks(in_channels, out_channels, rank, backward=True)
    programs = _cdiv(in_channels, block_i) + (_cdiv(out_channels, block_o) if p is not None else 0)
    grad_demod = grad_demod.contiguous()
    added_to = ([grad_styles] if into_styles else []) + ([grad_p, grad_q] if into_tokens else [])
    _observe_launch(
        "demodulation_backward", (grad_demod, demod, energy, styles, s1, s2, p, q, u, gp, t, *added_to),
        (grad_styles, grad_p, grad_q, grad_energy),
    )  # fmt: skip
    if styles.device.type != "meta":  # meta tensors hold no data: nothing to compute
        _demodulation_backward_kernel[(programs, batch)](
            grad_demod, demod, energy, styles, s1, s2,
            p if tokens else s1, q if tokens else s1, u if u is not None else demod,
            gp if gp is not None else demod, grad_styles,
            grad_p if grad_p is not None else demod, grad_q if grad_q is not None else demod,
            t if residual else s1, grad_energy if residual else demod,
            in_channels, out_channels, rank, *token_strides, scale, taps,
            HAS_TOKENS=tokens, HAS_RESIDUAL=residual, ACCUMULATE_STYLES=into_styles, ACCUMULATE_TOKENS=into_tokens,
            BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_L=block_l, DOT_PRECISION=_demodulation_precision(), num_warps=warps,
        )  # fmt: skip
    if residual and (need_p or need_q):
        # E = ... + 2 scale s (S1 * R)^T + taps rowsum(R^2): grad R = S1 * grad T + 2 taps sum_b dE * R
        grad_t = (grad_energy.t() @ styles.float()).mul_(2 * scale)  # [Cout, Cin]
        grad_r = grad_t.mul_(s1).add_(r * grad_energy.sum(0).mul_(2 * taps)[:, None])
        grad_p = (q @ grad_r.t()).to(p_dtype).reshape(p_shape)  # R = p^T q: grad p = q grad_R^T
        grad_q = (p @ grad_r).to(q_dtype).reshape(q_shape)
    elif shared:  # back to [L, C], summed over the batch in fp32 and rounded once
        grad_p, grad_q = _sum_partials_together([(grad_p[None], p_dtype, True), (grad_q[None], q_dtype, True)])
        grad_p, grad_q = grad_p.reshape(p_shape), grad_q.reshape(q_shape)
    elif tokens and not into_tokens and grad_p.shape != p_shape:
        grad_p, grad_q = grad_p.reshape(p_shape), grad_q.reshape(q_shape)
    if need_styles and add_styles is not None and not into_styles:
        grad_styles = add_styles + grad_styles
    if need_p and add_p is not None and not into_tokens:
        grad_p = add_p + grad_p
    if need_q and add_q is not None and not into_tokens:
        grad_q = add_q + grad_q
    return grad_styles if need_styles else None, grad_p if need_p else None, grad_q if need_q else None


def _differentiable_once(backward):
    """torch's once_differentiable for a Triton Function's backward, which is written by hand and
    has no derivative of its own; a backward with create_graph=True (a second derivative to come)
    is refused at once, saying which backends give one."""
    once = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                'backend="triton" differentiates once; for a second derivative (create_graph=True, as '
                'path-length regularisation takes) run that forward with backend="torch" or "reference", '
                'e.g. under refinestyle_kernels.use_backend("torch")'
            )
        return once(ctx, *grads)

    return checked


class _TritonDemodulation(torch.autograd.Function):
    """`demodulation_coefficients` for the Triton backend in two kernel launches, forward and
    backward, instead of ~50 small torch ops: at 8-128 px the layer's host time was the step's
    time (BENCHMARKS.md). Frozen weight; tokens [B, L, C] per sample (L <= 64), [L, C] shared
    (any L), or none; d in fp32.

    Token sets of at most 64 tokens run through the kernels' token path (the gram q q^T and
    the products u, gp per sample). Wider shared sets (the L = 256 domain adapters on the
    256-512 channel layers) enter as their residual R = p^T q [Cout, Cin], computed once for
    the batch: E = scale^2 (s^2) S2^T + 2 scale s (S1 * R)^T + taps * rowsum(R^2), and the
    backward takes grad R from the kernel's dE with three small matmuls.

    In eager training the layer's own autograd.Function runs `_demodulation_forward` and
    `_demodulation_backward` itself instead (`_triton_arguments`, `_merge_deferred_demodulation`), so that the
    gradients of s, p and q through d are added to the conv's inside the kernel rather than
    by three autograd additions per layer."""

    @staticmethod
    def forward(ctx, weight, styles, p, q, scale, eps):
        demod, saved, options = _demodulation_forward(weight, styles, p, q, scale, eps)
        ctx.save_for_backward(*saved)
        ctx.options = options
        return demod

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_demod):
        grads = _demodulation_backward(ctx.saved_tensors, ctx.options, grad_demod, ctx.needs_input_grad[1:4])
        return (None, *grads, None, None)


def _weight_gradient(g_conv, x, weight, styles, scale, upsample):
    """grad W0 = scale * (the weight gradient of one dense conv of x * s, shared by the batch).

    g_conv [B, H_c, W_c, Cout] (x's dtype): grad of the conv result (T's grid when upsampling);
    x [B, Cin, H, W]; weight [Cout, Cin, k, k]; styles [B, Cin]. Runs only when
    weight.requires_grad (RefineStyle freezes W0): cuDNN's (or the CPU's) conv
    weight-gradient, never a per-sample kernel.
    """
    kernel = weight.shape[-1]
    styled_x = x * styles[:, :, None, None]
    g_nchw = g_conv.permute(0, 3, 1, 2).to(x.dtype)
    # cuDNN follows the backend's fp32 precision setting, not only torch's TF32 flag
    exact = x.dtype == torch.float32 and _fp32_input_precision() == "ieee" and torch.backends.cudnn.allow_tf32
    if not exact:
        return _dense_weight_gradient(g_nchw, styled_x, weight, kernel, scale, upsample)
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _dense_weight_gradient(g_nchw, styled_x, weight, kernel, scale, upsample)
    finally:
        torch.backends.cudnn.allow_tf32 = True


def _dense_weight_gradient(g_nchw, styled_x, weight, kernel, scale, upsample):
    if upsample:
        _, grad, _ = torch.ops.aten.convolution_backward(
            g_nchw, styled_x, weight.transpose(0, 1), None, [UPSAMPLE_FACTOR] * 2, [0, 0], [1, 1], True, [0, 0], 1,
            [False, True, False],
        )  # fmt: skip
        grad = grad.transpose(0, 1)
    else:
        _, grad, _ = torch.ops.aten.convolution_backward(
            g_nchw, styled_x, weight, None, [1, 1], [kernel // 2] * 2, [1, 1], False, [0, 0], 1, [False, True, False]
        )
    return (grad * scale).to(weight.dtype).contiguous()


@_profiled("forward", x_index=0, weight_index=1, upsample_index=10)
def _triton_forward(
    x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp, rgb=None
):  # fmt: skip
    """The forward of the Triton op; arguments as `_styled_conv2d_triton_op`. Returns channels_last.

    With rgb = (mix [B, K, Cout] fp32, rgb_bias [K] or None, rgb_clamp or None) on a plain layer
    of at most `RGB_EPILOGUE_MAX_COUT` channels, the same launch also computes the toRGB of the
    output, clamp(out @ mix^T + rgb_bias), and this returns (out, rgb [B, K, H, W]), both in x's
    dtype and channels_last."""
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel, _ = weight.shape
    if rgb is not None and (upsample or out_channels > RGB_EPILOGUE_MAX_COUT):
        raise ValueError(f"the toRGB epilogue needs a plain layer of at most {RGB_EPILOGUE_MAX_COUT} channels")
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    w_taps = _derived_from_weight(
        weight, ("taps_forward",), lambda w: w.permute(2, 3, 1, 0).reshape(kernel * kernel, in_channels, out_channels).contiguous()
    )
    # the conv part is multiplied by alpha * scale (the launch's alpha_scale), the low-rank one by beta
    if demod is not None:
        alpha = beta = demod.float().contiguous()
    else:
        alpha = beta = _ones(batch, out_channels, x.device)
    p3, q3 = _as_batched_tokens(p), _as_batched_tokens(q)
    z = None
    if p3 is not None and not (out_channels <= FUSED_PROJECTION_MAX_COUT and q3.shape[1] <= 64):
        # in x's dtype, as cuBLAS rounds it anyway: an fp32 copy would be one more launch and
        # twice the bytes of the nine boxed loads, for no extra precision
        z = x_nhwc if _is_identity(q) else _project(x_nhwc, q3)
    styles = styles.contiguous()
    epilogue = dict(noise=noise, noise_strength=noise_strength, bias=bias, activate=activate, clamp=clamp)
    if upsample:
        t_h, t_w = 2 * height + 1, 2 * width + 1
        # the transposed conv's result in x's dtype, as the reference rounds it too
        transposed = _alloc((batch, t_h, t_w, out_channels), x.dtype, x.device)
        _launch_conv_gemm(
            x_nhwc, styles, w_taps, z, p3, alpha, beta, transposed, mode=2, ksize=kernel,
            in_hw=(height, width), out_hw=(t_h, t_w), grid_hw=(height + 1, width + 1), box_z=True, q=q3,
            alpha_scale=scale,
        )  # fmt: skip
        out = _alloc((batch, out_channels, 2 * height, 2 * width), x.dtype, x.device, torch.channels_last)
        _launch_blur(transposed, out.permute(0, 2, 3, 1), **epilogue)
    else:
        out = _alloc((batch, out_channels, height, width), x.dtype, x.device, torch.channels_last)
        rgb_launch = None
        if rgb is not None:
            mix, rgb_bias, rgb_clamp = rgb
            image = _alloc((batch, mix.shape[1], height, width), x.dtype, x.device, torch.channels_last)
            rgb_launch = (mix, rgb_bias, image.permute(0, 2, 3, 1), rgb_clamp)
        _launch_conv_gemm(
            x_nhwc, styles, w_taps, z, p3, alpha, beta, out.permute(0, 2, 3, 1), mode=0, ksize=kernel,
            in_hw=(height, width), out_hw=(height, width), grid_hw=(height, width), box_z=True, q=q3, **epilogue,
            rgb=rgb_launch, alpha_scale=scale,
        )  # fmt: skip
        if rgb is not None:
            return out, image
    return out


@functools.lru_cache(maxsize=None)
def _clamp_bound(clamp: float, dtype: torch.dtype) -> float:
    """The clamp bound as a clamped output stores it. The backward tells clamped pixels by
    |out| < bound; against the unrounded bound a half-precision output clamped to bf16(0.7) =
    0.69921875 would look unclamped and pass its gradient."""
    return float(torch.tensor(clamp, dtype=torch.float64).to(dtype))


def _epilogue_backward_parts(grad, out, dummy, *, demod, noise, noise_strength, bias, activate, clamp, rgb):
    """What `_epilogue_backward_kernel` and `_epilogue_products_kernel` take alike, in their
    order: (pointers: grad, out, demod, noise, noise_strength, bias, rgb_grad, rgb_out, rgb_mix;
    dummy where absent), (strides of grad, out, noise, rgb_grad, rgb_out), (the clamp bounds as
    out's and rgb's dtypes store them), and the constexpr flags. Arguments as
    `_launch_epilogue_backward`'s."""
    rgb_grad, rgb_mix, rgb_out, rgb_clamp = rgb if rgb is not None else (None, None, None, None)
    noise_strides = (0, 0, 0)
    if noise is not None:
        noise_strides = (noise.stride(0) if noise.shape[0] > 1 else 0, noise.stride(2), noise.stride(3))
    rgb_clamped = rgb_out is not None and rgb_clamp is not None
    rgb_channels = rgb_grad.shape[1] if rgb_grad is not None else 0
    pointers = tuple(t if t is not None else dummy for t in (grad, out, demod, noise, noise_strength, bias, rgb_grad))
    pointers += (rgb_out if rgb_clamped else dummy, rgb_mix if rgb_mix is not None else dummy)
    strides = (
        *(grad.stride() if grad is not None else (0, 0, 0, 0)), *out.stride(), *noise_strides,
        *(rgb_grad.stride() if rgb_grad is not None else (0, 0, 0, 0)), *(rgb_out.stride() if rgb_clamped else (0, 0, 0, 0)),
    )  # fmt: skip
    bounds = (
        _clamp_bound(clamp, out.dtype) if clamp is not None else 0.0,
        _clamp_bound(rgb_clamp, rgb_out.dtype) if rgb_clamped else 0.0,
    )
    flags = dict(
        HAS_DEMOD=demod is not None, HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, ACTIVATE=activate,
        HAS_CLAMP=clamp is not None, HAS_GRAD=grad is not None, RGB_CHANNELS=rgb_channels, RGB_CLAMP=rgb_clamped,
        BLOCK_RGB=max(1, _next_pow2(rgb_channels)),
    )  # fmt: skip
    return pointers, strides, bounds, flags


def _launch_epilogue_backward(
    grad, out, g, *, demod, noise, noise_strength, bias, activate, clamp, rgb=None
) -> torch.Tensor:  # fmt: skip
    """`_epilogue_backward_kernel`: g [B, H, W, N] (contiguous, x's dtype) = d * the gradient of
    the pre-activation, from grad and the saved out [B, N, H, W] (any strides); arguments as
    `_launch_blur`'s backward. grad may be None when rgb is given (out feeds only the toRGB).

    rgb: None, or the toRGB layer that also reads out, as (grad_rgb [B, K, H, W] any strides,
    mix [B, K, N] fp32 contiguous = rgb_scale * rgb_weight * rgb_styles, rgb_out [B, K, H, W] the
    toRGB's saved output or None, rgb_clamp float or None): its adjoint joins grad in registers.

    Returns the per-program sums [3 + K, B, CHUNKS, N] fp32 (K = 0 without rgb): grad bias,
    grad strength, grad d, then per toRGB channel k the sums of out * grad_rgb[k]. Each program
    sums `_epilogue_backward_tiles` pixel blocks (CHUNKS = ceil(blocks / that)).
    """
    batch, out_channels, out_h, out_w = out.shape
    block_m, block_n = _pointwise_blocks(out_h * out_w, out_channels, EPILOGUE_BACKWARD_BLOCK_VALUES)
    m_tiles = _cdiv(out_h * out_w, block_m)
    n_tiles = _cdiv(out_channels, block_n)
    tiles_per_program = _epilogue_backward_tiles(m_tiles * n_tiles * batch)
    chunks = _cdiv(m_tiles, tiles_per_program)
    rgb_grad, rgb_mix, rgb_out, _ = rgb if rgb is not None else (None, None, None, None)
    if grad is None and rgb_grad is None:
        raise ValueError("_launch_epilogue_backward: neither grad nor a toRGB gradient was given")
    rgb_channels = rgb_grad.shape[1] if rgb_grad is not None else 0
    sums = _alloc((3 + rgb_channels, batch, chunks, out_channels), torch.float32, out.device)
    _observe_launch(
        "epilogue_backward", (grad, out, demod, noise, noise_strength, bias, rgb_grad, rgb_mix, rgb_out), (g, sums)
    )
    if out.device.type == "meta":  # meta tensors hold no data: nothing to compute
        return sums
    pointers, strides, bounds, flags = _epilogue_backward_parts(
        grad, out, sums, demod=demod, noise=noise, noise_strength=noise_strength, bias=bias, activate=activate,
        clamp=clamp, rgb=rgb,
    )  # fmt: skip
    _epilogue_backward_kernel[(chunks, n_tiles, batch)](
        *pointers, g, sums, out_h, out_w, out_channels, tiles_per_program, *strides, *bounds, **flags,
        LOAD_STAGES=LOAD_STAGES, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return sums


def _epilogue_backward_tiles(blocks: int) -> int:
    """Pixel blocks a program of `_epilogue_backward_kernel` walks, for a launch of `blocks`
    (pixel block, N block, sample) blocks: up to EPILOGUE_BACKWARD_MAX_TILES, while at least
    EPILOGUE_BACKWARD_MIN_PROGRAMS programs remain."""
    return max(1, min(EPILOGUE_BACKWARD_MAX_TILES, blocks // max(1, EPILOGUE_BACKWARD_MIN_PROGRAMS)))


@_profiled("backward", x_index=2, weight_index=3, upsample_index=12)
def _triton_backward(
    grad, out, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp, needs,
    placeholders=True, rgb=None,
):  # fmt: skip
    """All gradients of `_triton_forward`; needs = which of (x, styles, weight, p, q, demod,
    noise_strength, bias) are wanted. Returns them in that order; for the rest empty tensors
    (the custom op must return tensors), or None when placeholders is False (eager autograd).

    rgb: None, or a toRGB layer that also reads out (plain layers only), as in
    `_launch_epilogue_backward`; its adjoint joins grad (which may then be None) in the
    epilogue backward. The result then has a ninth entry: the sums over pixels of
    out * grad_rgb [B, K, Cout] fp32, the toRGB's per-sample weight gradient."""
    if rgb is not None and upsample:
        raise ValueError("_triton_backward: a toRGB adjoint is fused into plain layers only, not upsampling ones")
    need_x, need_styles, need_weight, need_p, need_q, need_demod, need_strength, need_bias = needs
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel, _ = weight.shape
    out_h, out_w = out.shape[2], out.shape[3]
    device = x.device

    def empty():  # a gradient nobody wants; made into a placeholder at the end if asked for
        return None

    # 1. epilogue backward: g_conv = grad of the conv result, times d, and the sums over pixels
    # for the small gradients. The upsampling layer goes back through its blur in the same pass,
    # onto the transposed conv's grid, so the output-sized gradient is never stored.
    # g_conv and everything derived from it are kept in x's dtype: the grad-x kernel feeds them
    # to its dots in that dtype anyway, and at 1024 px an fp32 g is a 1 GB round trip per layer.
    grad_dtype = x.dtype
    demod32 = demod.float().contiguous() if demod is not None else None
    epilogue = dict(demod=demod32, noise=noise, noise_strength=noise_strength, bias=bias, activate=activate, clamp=clamp)
    p3, q3 = _as_batched_tokens(p), _as_batched_tokens(q)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    # the token gradients' route (step 3): fused, through M = box(x)^T g, or separate
    fused = p3 is not None and in_channels <= FUSED_PROJECTION_MAX_COUT and p3.shape[1] <= 64
    # on the fused route, the grad-x conv (step 4) sums the token gradients itself where one K
    # block holds the layer's output channels; else step 1 or 3 forms M
    conv_products = fused and (need_p or need_q) and (need_x or need_styles) and out_channels <= CONV_TOKEN_PRODUCTS_MAX_K
    products = None  # M per sample, when step 1 makes it
    if upsample:
        g_conv = _alloc((batch, 2 * height + 1, 2 * width + 1, out_channels), grad_dtype, device)
        sums = _launch_blur(grad.permute(0, 2, 3, 1), g_conv, saved=out.permute(0, 2, 3, 1), **epilogue)
    elif (
        fused and (need_p or need_q) and not conv_products
        and max(in_channels, out_channels) <= min(EPILOGUE_PRODUCTS_MAX_CHANNELS, EPILOGUE_PRODUCTS_KERNEL_MAX_CHANNELS)
    ):  # fmt: skip
        # with M in the same pass, so g is not read back for it
        g_conv = _alloc((batch, out_h, out_w, out_channels), grad_dtype, device)
        sums, products = _launch_epilogue_products(grad, out, g_conv, x_nhwc, ksize=kernel, **epilogue, rgb=rgb)
    else:
        g_conv = _alloc((batch, out_h, out_w, out_channels), grad_dtype, device)
        sums = _launch_epilogue_backward(grad, out, g_conv, **epilogue, rgb=rgb)
    grad_bias = sums[0].sum((0, 1)).to(bias.dtype) if (bias is not None and need_bias) else empty()
    grad_strength = (
        sums[1].sum().reshape(1).to(noise_strength.dtype) if (noise is not None and need_strength) else empty()
    )
    grad_demod = sums[2].sum(1) if (demod is not None and need_demod) else empty()
    grad_rgb_mix = sums[3:].sum(2).transpose(0, 1) if rgb is not None else None
    del sums  # per pixel block: at 1024 px as large as a tenth of an activation, not kept for steps 3-5

    # 3. the low-rank branch. Two routes, chosen like the forward's projection:
    # - fused (the grad-x launch's output, Cin, at most FUSED_PROJECTION_MAX_COUT and L <= 64):
    #   both token gradients come from one per-sample matrix M = sum over the conv's pixels of
    #   box(x)^T g [Cin, Cout]: grad p = q M and grad q = p M^T (box and projection commute),
    #   and the grad-x kernel projects g onto p itself. No [B, pixels, L] tensor exists: at
    #   1024 px with L = 32 each would be as large as an activation.
    # - separate: z = q x for grad p, then gz = g p^T for grad q and grad x, one at a time,
    #   their boxes summed on the fly by the kernels that read them.
    grad_p, grad_q = empty(), empty()
    gz = None
    if p3 is not None:
        shared = p3.shape[0] == 1
        if fused and (need_p or need_q) and not conv_products:
            if products is None and upsample:
                # M = x^T (the stride-2 box of g, on x's grid): a quarter of the pixels and MACs
                # of box_T(x)^T g over the transposed conv's grid, where most box taps are masked
                products = _sum_over_pixels(g_conv, x_nhwc, box=BOX_STRIDE2, ksize=kernel, over_batch=shared).mT
            elif products is None:
                products = _sum_over_pixels(x_nhwc, g_conv, box=BOX_SAME, ksize=kernel, over_batch=shared)  # M
            elif shared:
                products = products.sum(0)
            if need_p:
                grad_p = torch.matmul(q3.to(products.dtype), products).to(p.dtype).reshape(p.shape)
            if need_q:
                grad_q = torch.matmul(p3.to(products.dtype), products.mT).to(q.dtype).reshape(q.shape)
        if not fused and need_p:  # grad p = sum over the conv's pixels of box(q x)^T g
            z = x_nhwc if _is_identity(q) else _project(x_nhwc, q3.to(grad_dtype))
            if upsample:  # over z's pixels, as the fused route's M: z^T (the stride-2 box of g)
                grad_p = _sum_over_pixels(
                    g_conv, z, box=BOX_STRIDE2, ksize=kernel, over_batch=shared, dtype=p.dtype
                ).mT
            else:
                grad_p = _sum_over_pixels(z, g_conv, box=BOX_SAME, ksize=kernel, over_batch=shared, dtype=p.dtype)
            del z
            grad_p = grad_p.reshape(p.shape)
        if not fused and (need_q or need_x or need_styles) and _is_identity(p):
            gz = g_conv  # g p^T with p the identity factor
        elif not fused and (need_q or need_x or need_styles):  # gz = g p^T, on the conv's grid
            conv_pixels = g_conv.shape[1] * g_conv.shape[2]
            gz = torch.matmul(g_conv.reshape(batch, conv_pixels, out_channels), p3.to(grad_dtype).transpose(1, 2))
            gz = gz.reshape(batch, g_conv.shape[1], g_conv.shape[2], -1)
        if not fused and need_q:  # grad q = sum over x's pixels of box^T(gz)^T x
            box = BOX_STRIDE2 if upsample else BOX_SAME
            grad_q = _sum_over_pixels(gz, x_nhwc, box=box, ksize=kernel, over_batch=shared, dtype=q.dtype)
            grad_q = grad_q.reshape(q.shape)

    # 4. grad x (conv^T with W0 + the low-rank adjoint) and the conv part of grad styles
    grad_x, grad_styles = empty(), empty()
    if need_x or need_styles:
        if upsample:  # adjoint of the transposed stride-2 conv: a stride-2 conv with the same taps
            w_taps = _derived_from_weight(
                weight, ("taps_adjoint_up",),
                lambda w: w.permute(2, 3, 0, 1).reshape(kernel * kernel, out_channels, in_channels).contiguous(),
            )  # fmt: skip
            mode = 1
        else:  # adjoint of the same-padded conv: the same conv with flipped taps
            w_taps = _derived_from_weight(
                weight, ("taps_adjoint",),
                lambda w: w.flip(2, 3).permute(2, 3, 0, 1).reshape(kernel * kernel, out_channels, in_channels).contiguous(),
            )  # fmt: skip
            mode = 0
        # grad x = conv^T(g) * s * scale: alpha = s (styles) and alpha_scale = scale
        grad_x_nhwc = _alloc((batch, height, width, in_channels), x.dtype, device)
        partial_styles = _launch_conv_gemm(
            g_conv, None, w_taps, gz, q3, styles, _ones(batch, in_channels, device), grad_x_nhwc, mode=mode,
            ksize=kernel, in_hw=(g_conv.shape[1], g_conv.shape[2]), out_hw=(height, width), grid_hw=(height, width),
            box_z=True, q=p3.to(grad_dtype) if fused else None, x=x_nhwc if (need_styles or conv_products) else None,
            sum_x=need_styles, token_products=conv_products, alpha_scale=scale,
        )  # fmt: skip
        # the launch's per-program sums, finished in one launch: grad s, and with the token
        # products grad p = q M and grad q = p M^T (shared tokens: summed over the batch too)
        partial_sums = {}
        if conv_products:
            partial_styles, partial_p, partial_q = partial_styles
            shared = p3.shape[0] == 1
            if need_p:
                partial_sums["p"] = (partial_p, p.dtype, shared)
            if need_q:
                partial_sums["q"] = (partial_q, q.dtype, shared)
        if need_styles:
            partial_sums["styles"] = (partial_styles, styles.dtype, False)
        finished = dict(zip(partial_sums, _sum_partials_together(list(partial_sums.values())))) if partial_sums else {}
        if "p" in finished:
            grad_p = finished["p"].reshape(p.shape)
        if "q" in finished:
            grad_q = finished["q"].reshape(q.shape)
        if need_styles:
            grad_styles = finished["styles"]
        if need_x:
            grad_x = grad_x_nhwc.permute(0, 3, 1, 2)
    del gz

    # 5. the weight gradient, only when asked: one dense conv weight-gradient against x * s
    grad_weight = _weight_gradient(g_conv, x, weight, styles, scale, upsample) if need_weight else empty()
    grads = (grad_x, grad_styles, grad_weight, grad_p, grad_q, grad_demod, grad_strength, grad_bias)
    if placeholders:  # the custom op's outputs: tensors that do not alias each other
        grads = tuple(x.new_empty(0) if g is None else g for g in grads)
    if rgb is not None:
        grads = (*grads, grad_rgb_mix)
    return grads


# --- torch.library registration: opaque to torch.compile, with fake (meta) implementations

_FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor styles, Tensor? p, Tensor? q, Tensor? demod, Tensor? noise, "
    "Tensor? noise_strength, Tensor? bias, float scale, bool upsample, bool activate, float? clamp) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor out, Tensor x, Tensor weight, Tensor styles, Tensor? p, Tensor? q, Tensor? demod, "
    "Tensor? noise, Tensor? noise_strength, Tensor? bias, float scale, bool upsample, bool activate, float? clamp, "
    "bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("refinestyle_kernels::styled_conv2d_triton", mutates_args=(), schema=_FORWARD_SCHEMA)
def _styled_conv2d_triton_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    p: Optional[torch.Tensor],
    q: Optional[torch.Tensor],
    demod: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    noise_strength: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: float,
    upsample: bool,
    activate: bool,
    clamp: Optional[float],
) -> torch.Tensor:
    """The fused layer on the normalised arguments; demod [B, Cout] fp32 or None (no demodulation)."""
    return _triton_forward(x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp)


@_styled_conv2d_triton_op.register_fake
def _(x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp):
    factor = UPSAMPLE_FACTOR if upsample else 1
    shape = (x.shape[0], weight.shape[0], x.shape[2] * factor, x.shape[3] * factor)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op(
    "refinestyle_kernels::styled_conv2d_triton_backward", mutates_args=(), schema=_BACKWARD_SCHEMA
)
def _styled_conv2d_triton_backward_op(
    grad: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    p: Optional[torch.Tensor],
    q: Optional[torch.Tensor],
    demod: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    noise_strength: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: float,
    upsample: bool,
    activate: bool,
    clamp: Optional[float],
    needs: List[bool],
) -> tuple[torch.Tensor, ...]:
    """Gradients of the fused layer for (x, styles, weight, p, q, demod, noise_strength, bias)."""
    grads = _triton_backward(
        grad, out, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp, needs
    )
    return _in_fake_layouts(grads)


def _in_fake_layouts(grads: tuple) -> tuple:
    """The backward ops' gradients in the layouts their fake implementations declare: grad x
    channels-last, every other one contiguous. torch.compile's graphs are built on the fake
    layouts and assert them; this copies only what a launch left in another layout (grad p of
    the separate route's upsampling layers comes out transposed, which only a GPU run showed)."""
    first, *rest = grads
    if first.ndim == 4:
        first = first.contiguous(memory_format=torch.channels_last)
    return (first, *(g.contiguous() for g in rest))


@_styled_conv2d_triton_backward_op.register_fake
def _styled_conv2d_triton_backward_fake(
    grad, out, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp, needs
):  # fmt: skip
    need_x, need_styles, need_weight, need_p, need_q, need_demod, need_strength, need_bias = needs
    def nothing():
        return x.new_empty(0)

    def like(wanted, tensor):
        return torch.empty_like(tensor, memory_format=torch.contiguous_format) if wanted and tensor is not None else nothing()

    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last) if need_x else nothing()
    grad_demod = torch.empty(demod.shape, dtype=torch.float32, device=x.device) if need_demod and demod is not None else nothing()
    return (
        grad_x, like(need_styles, styles), like(need_weight, weight), like(need_p, p), like(need_q, q),
        grad_demod, like(need_strength and noise is not None, noise_strength), like(need_bias, bias),
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp = inputs
    ctx.save_for_backward(x, weight, styles, p, q, demod, noise, noise_strength, bias, output)
    ctx.options = (scale, upsample, activate, clamp)


def _gradients(ctx, grad, backward):
    (x, weight, styles, p, q, demod, noise, noise_strength, bias, out), deferred = _saved_with_deferred(ctx)
    wanted = ctx.needs_input_grad
    # inputs: x, weight, styles, p, q, demod, noise, noise_strength, bias, (options);
    # the backward op's order: x, styles, weight, p, q, demod, noise_strength, bias
    needs = [wanted[0], wanted[2], wanted[1], wanted[3], wanted[4], wanted[5], wanted[7], wanted[8]]
    computed = _needs_with_deferred(needs, deferred)
    grads = backward(grad, out, x, weight, styles, p, q, demod, noise, noise_strength, bias, *ctx.options, computed)
    return _gradients_wanted(_merge_deferred_demodulation(grads, needs, deferred), needs)


def _save_with_deferred(ctx, tensors: tuple, deferred) -> None:
    """save_for_backward of a layer Function's tensors, then those of a deferred demodulation."""
    saved, options = deferred if deferred is not None else ((), None)
    ctx.save_for_backward(*tensors, *saved)
    ctx.layer_tensors = len(tensors)
    ctx.deferred_options = options


def _saved_with_deferred(ctx) -> tuple[tuple, tuple | None]:
    """(the layer's saved tensors, the deferred demodulation's (saved, options) or None)."""
    saved = ctx.saved_tensors
    count = getattr(ctx, "layer_tensors", len(saved))  # the custom ops' contexts defer nothing
    options = getattr(ctx, "deferred_options", None)
    return saved[:count], ((saved[count:], options) if options is not None else None)


def _needs_with_deferred(needs: list, deferred) -> list:
    """The backward op's needs, with grad d asked for where a deferred demodulation turns it
    into gradients of styles, p or q (its d input needs none: d was made without autograd)."""
    if deferred is None:
        return needs
    computed = list(needs)
    computed[5] = needs[1] or needs[3] or needs[4]
    return computed


def _merge_deferred_demodulation(grads, needs: list, deferred) -> tuple:
    """grads of the backward op (x, styles, weight, p, q, demod, ...) with d's backward added to
    those of styles, p and q, in the demodulation kernel (one launch, no autograd additions)."""
    if deferred is None or not (needs[1] or needs[3] or needs[4]):
        return grads
    saved, options = deferred
    grads = list(grads)
    grads[1], grads[3], grads[4] = _demodulation_backward(
        saved, options, grads[5], (needs[1], needs[3], needs[4]), accumulate=(grads[1], grads[3], grads[4])
    )
    return tuple(grads)


def _gradients_wanted(grads, needs) -> tuple:
    """The backward op's gradients (x, styles, weight, p, q, demod, strength, bias), None where
    not needed, in the forward op's input order (x, weight, styles, p, q, demod, noise,
    noise_strength, bias, then None for its four options)."""
    grad_x, grad_styles, grad_weight, grad_p, grad_q, grad_demod, grad_strength, grad_bias = (
        g if need else None for g, need in zip(grads, needs)
    )
    return grad_x, grad_weight, grad_styles, grad_p, grad_q, grad_demod, None, grad_strength, grad_bias, None, None, None, None


def _backward(ctx, grad):
    return _gradients(ctx, grad, torch.ops.refinestyle_kernels.styled_conv2d_triton_backward)


_styled_conv2d_triton_op.register_autograd(_backward, setup_context=_setup_context)


class _StyledConv2dTritonFunction(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode: a custom op's Python
    dispatch (argument normalisation, alias checks, redispatch) cost ~1.2 ms of host time per
    call on the H100 machine, 10x the GPU time of a 4x4-8x8 layer. torch.compile traces the
    custom ops instead (see `_styled_conv2d_triton`)."""

    @staticmethod
    def forward(
        ctx, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp, deferred
    ):  # fmt: skip
        out = _triton_forward(x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp)
        _save_with_deferred(ctx, (x, weight, styles, p, q, demod, noise, noise_strength, bias, out), deferred)
        ctx.options = (scale, upsample, activate, clamp)
        return out

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad):
        return (*_gradients(ctx, grad, functools.partial(_triton_backward, placeholders=False)), None)


def _styled_conv2d_triton_call(*args, deferred=None):
    """The Triton layer on `_styled_conv2d_triton_op`'s arguments: the custom op under
    torch.compile, the plain autograd.Function in eager mode (deferred: see `_triton_arguments`)."""
    if torch.compiler.is_compiling():
        return _styled_conv2d_triton_op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _StyledConv2dTritonFunction.apply(*args, deferred)
    with torch.no_grad():
        return _triton_forward(*args)


def _reduced_rank_tokens(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dW = p^T q with min(Cin, Cout) tokens: p [.., L, Cout], q [.., L, Cin] ->
    (q^T p, I) when Cin <= Cout, else (I, p^T q); differentiable in p and q.

    With more tokens than channels (L = 256 on the 32-128 channel layers of a domain adapter)
    the factored branch would carry more than dW itself: its [B, pixels, L] projections would
    be up to 8x an activation at 1024 px. Refactored, L <= 64 there, and the kernels fuse it.
    """
    out_channels, in_channels = p.shape[-1], q.shape[-1]
    lead = p.shape[:-2]
    if in_channels <= out_channels:
        identity = _identity_matrix(in_channels, q.dtype, q.device).expand(*lead, in_channels, in_channels)
        return q.mT @ p, identity
    identity = _identity_matrix(out_channels, p.dtype, p.device).expand(*lead, out_channels, out_channels)
    return identity, p.mT @ q


def _identity_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The identity `_reduced_rank_tokens` hands out, one per (size, dtype, device), so that
    `_is_identity` can recognise its views."""
    return _kept_constant(("identity", size, dtype, device), lambda: torch.eye(size, dtype=dtype, device=device))


def _is_identity(tokens: torch.Tensor | None) -> bool:
    """Whether tokens are (a view of) `_reduced_rank_tokens`' identity factor: then projecting
    onto them (z = q x, or gz = g p^T) is a copy, and the kernels can read x or g instead.
    Under torch.compile the factor is a traced tensor and is not recognised (the general path
    runs, with the same result)."""
    if tokens is None or tokens.shape[-1] != tokens.shape[-2]:
        return False
    base = tokens._base if tokens._base is not None else tokens
    return base is _CONSTANTS.get(("identity", tokens.shape[-1], tokens.dtype, tokens.device))


def _triton_arguments(
    x, weight, styles, p, q, *, demodulate, upsample, eps, scale, noise, noise_strength, bias, activate, clamp,
    defer_demodulation=True,
):  # fmt: skip
    """(`_styled_conv2d_triton_op`'s arguments from `styled_conv2d`'s validated ones, deferred):
    tokens refactored to at most min(Cin, Cout), the demodulation coefficients d [B, Cout] fp32
    (or None), the options as plain Python values.

    In eager training (autograd recording, not torch.compile) where the Triton demodulation
    applies, and unless defer_demodulation is False (a caller that will not run the layer as
    one autograd.Function), d is computed without autograd and deferred = (saved tensors, options) of
    `_demodulation_forward`: the layer's autograd.Function then takes d's backward on itself
    (`_merge_deferred_demodulation`). Otherwise deferred is None and d is differentiable."""
    if triton is None:
        raise RuntimeError(f'backend="triton": Triton could not be imported ({_TRITON_IMPORT_ERROR})')
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f'x: backend="triton" takes float32, float16 or bfloat16 tensors, got {x.dtype}')
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and triton_interpreter_bf16_problem():
        raise RuntimeError(f'x: backend="triton" on bfloat16 CPU tensors: {triton_interpreter_bf16_problem()}')
    if noise is not None and noise.requires_grad and torch.is_grad_enabled():  # _backend_for_call routes it
        raise ValueError('noise: backend="triton" gives no gradient for noise; pass noise.detach() (or use backend="torch")')
    if p is not None and p.shape[-2] > min(weight.shape[0], weight.shape[1]):
        p, q = _reduced_rank_tokens(p, q)  # the same residual, so the same d
    demod = deferred = None
    if demodulate and _triton_demodulation_applies(weight, styles, p):
        if defer_demodulation and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (styles, p, q)):
            with torch.no_grad():
                demod, saved, demod_options = _demodulation_forward(weight, styles, p, q, scale, eps)
            deferred = (saved, demod_options)
        else:
            demod = _TritonDemodulation.apply(weight, styles, p, q, scale, eps)
    elif demodulate:
        demod = _demodulation_coefficients(weight, styles, p, q, scale, eps)
    if bias is not None:
        bias = bias.contiguous()  # the kernels index bias[n] as bias_ptr + n
    options = (float(scale), bool(upsample), bool(activate), float(clamp) if clamp is not None else None)
    return (x, weight, styles, p, q, demod, noise, noise_strength, bias, *options), deferred


def _styled_conv2d_triton(
    x, weight, styles, p, q, *, demodulate, upsample, eps, scale, noise, noise_strength, bias, activate, clamp
):
    """The "triton" backend of `styled_conv2d` (arguments already validated by `_validate`).

    x [B, Cin, H, W] float32/float16/bfloat16, NCHW or channels_last, on CUDA (or on the CPU
    under TRITON_INTERPRET=1); weight [Cout, Cin, k, k]; styles [B, Cin]; p, q None or
    [L, C] / [B, L, C]; noise None or [B or 1, 1, H', W'] (no gradient); noise_strength
    [1] or None; bias [Cout] or None. Returns [B, Cout, H', W'] in x's dtype, channels_last.
    The demodulation coefficients d [B, Cout] come from `_TritonDemodulation` (frozen weight,
    at most 64 per-sample tokens or shared ones) or else from `demodulation_coefficients` in plain
    torch; autograd carries grad d back to weight, styles, p and q. Everything else runs in
    the custom ops above. Batches larger than `MAX_LAUNCH_BATCH` (CUDA's
    65535-program limit on the grid dimension that holds the batch) run in chunks.
    """
    batch = x.shape[0]
    arguments, deferred = _triton_arguments(
        x, weight, styles, p, q, demodulate=demodulate, upsample=upsample, eps=eps, scale=scale, noise=noise,
        noise_strength=noise_strength, bias=bias, activate=activate, clamp=clamp,
        defer_demodulation=batch <= MAX_LAUNCH_BATCH,  # chunks share one differentiable d
    )  # fmt: skip
    if batch <= MAX_LAUNCH_BATCH:
        return _styled_conv2d_triton_call(*arguments, deferred=deferred)
    x, weight, styles, p, q, demod, noise, noise_strength, bias, *options = arguments

    def rows(tensor, start, stop, per_sample):  # one chunk of the batch (shared tensors whole)
        return tensor[start:stop] if tensor is not None and per_sample(tensor) else tensor

    chunks = []
    for start in range(0, batch, MAX_LAUNCH_BATCH):
        stop = min(start + MAX_LAUNCH_BATCH, batch)
        chunks.append(
            _styled_conv2d_triton_call(
                x[start:stop], weight, styles[start:stop],
                rows(p, start, stop, lambda t: t.ndim == 3), rows(q, start, stop, lambda t: t.ndim == 3),
                rows(demod, start, stop, lambda t: True), rows(noise, start, stop, lambda t: t.shape[0] > 1),
                noise_strength, bias, *options,
            )  # fmt: skip
        )
    return torch.cat(chunks).contiguous(memory_format=torch.channels_last)
