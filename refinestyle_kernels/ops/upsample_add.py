"""upsample_add: base + upfirdn2d(x, kernel, up, pad), the toRGB skip branch of StyleGAN2.

Every toRGB layer past the first adds its output to the previous block's image, upsampled 2x
with the [1, 3, 3, 1] FIR filter. In PyTorch that is a depthwise transposed convolution on
3 channels plus an addition; cuDNN runs it through layout transforms and generic kernels, and
on the H100 in session 24 the eight upsamples of a 1024 px, batch 8, bf16 training step took
about 2.7 ms of its 40 ms of kernel time (`python -m benchmarks.profile`), where the bytes they
move take well under 0.1 ms.

The Triton backend computes each output pixel as a gather: the taps of the zero-inserted
input that fall on a real input pixel (KH * KW / up^2 of them), summed in fp32, plus base,
rounded once; the backward gathers the adjoint (the same taps, stride `up` over the output
gradient). One read and one write per pass, no layout change, any strides.

- `upsample_add`: the public op (validation, backend choice, autograd).
- `reference_upsample_add`: what the other backends run, and the tests' truth: `upfirdn2d`
  (plain PyTorch) and an addition.
- Eager mode runs `_UpsampleAddFunction`; torch.compile sees the custom op
  `refinestyle_kernels::upsample_add_triton` with its own backward op, so compiled
  generators keep the kernels.
"""
from __future__ import annotations

import contextlib

import torch

from refinestyle_kernels.backend import resolve_backend, triton_interpreter_bf16_problem
from refinestyle_kernels.ops import modulated_conv2d as _conv_op
from refinestyle_kernels.ops.modulated_conv2d import (
    _alloc,
    _cdiv,
    _derived_from_weight,
    _differentiable_once,
    _interpreted,
    _observe_launch,
    tl,
    triton,
)
from refinestyle_kernels.ops.upfirdn2d import check_upfirdn2d_arguments, upfirdn2d

# The Triton path unrolls the filter's taps: filters up to this size per axis run there,
# larger ones (no StyleGAN2 config has one) through `reference_upsample_add`.
MAX_TAPS = 8
# switch for A/B runs (`python -m benchmarks --kernel-option UPSAMPLE_ADD_TRITON=0`): False sends
# the Triton backend's skip branch through `reference_upsample_add`, as before session 25
UPSAMPLE_ADD_TRITON = True
# Output tile of a forward program and input tile of a backward program (rows, columns), at 4
# warps. Small tiles keep many gathers in flight: ptxas for sm_90a (`python -m
# benchmarks.kernel_audit`) gives the forward 48 registers at 4 x 128 (10 programs an SM)
# against 172 at 16 x 64 (2), and the backward 56 at 4 x 64 (9) against 96 at 16 x 32 (5).
FORWARD_BLOCK = (4, 128)
BACKWARD_BLOCK = (4, 64)


def upsample_add(
    x: torch.Tensor,
    kernel: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    up: int = 2,
    pad: tuple[int, int] = (2, 1),
    backend: str = "auto",
) -> torch.Tensor:
    """base + upfirdn2d(x, kernel, up=up, down=1, pad=pad): StyleGAN2's toRGB skip branch
    (rosinality's `out + self.upsample(skip)`) as one pass.

    Args:
        x: [B, C, H, W] floating-point tensor, the image to upsample (the previous block's
            RGB), any strides.
        kernel: [kh, kw] floating-point FIR filter on x's device, convolution order, already
            scaled (rosinality's `Upsample.kernel`: the [1, 3, 3, 1] outer product normalised
            to sum up^2). Used rounded to x's dtype, as `upfirdn2d` uses it. A kernel that
            requires a gradient (with grad mode on) runs through `reference_upsample_add`.
        base: None or [B, C, OH, OW] in x's dtype and on x's device, added to the result
            (the toRGB's own output), any strides.
        up: positive integer upsampling factor, both axes.
        pad: (before, after) integers, applied to both axes after the zero insertion;
            negative crops.
        backend: "auto", "triton", "torch" or "reference" (see `refinestyle_kernels.backend`).
            "torch" and "reference" run `reference_upsample_add`; so does "triton" for
            filters larger than `MAX_TAPS` per axis.

    Returns:
        [B, C, OH, OW] in x's dtype, OH = H * up + pad[0] + pad[1] - kh + 1 (OW alike), both
        at least 1. Differentiable in x and base (and in kernel on the fallback path); the
        Triton path differentiates once.
    """
    _check_arguments(x, kernel, base, up, pad)
    backend = resolve_backend(backend, x.device)
    kernel_fixed = not (kernel.requires_grad and torch.is_grad_enabled())
    if backend != "triton" or not UPSAMPLE_ADD_TRITON or not kernel_fixed or max(kernel.shape) > MAX_TAPS:
        return reference_upsample_add(x, kernel, base, up=up, pad=pad)
    # (read at call time: benchmarks/stand_in_driver.py adds "cpu" to compile the GPU path)
    if x.device.type not in _conv_op.KERNEL_DEVICE_TYPES and not (x.device.type == "cpu" and _interpreted()):
        return reference_upsample_add(x, kernel, base, up=up, pad=pad)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and triton_interpreter_bf16_problem():
        return reference_upsample_add(x, kernel, base, up=up, pad=pad)  # this interpreter rounds bf16 wrongly
    # the taps as upfirdn2d uses them (rounded to x's dtype), flipped to correlation order, in
    # fp32; made once per filter buffer and dtype
    taps = _derived_from_weight(
        kernel, ("upsample_add taps", x.dtype), lambda k: k.to(x.dtype).flip(0, 1).float().contiguous()
    )
    pad0, pad1 = int(pad[0]), int(pad[1])
    if torch.compiler.is_compiling():  # torch.compile sees one opaque op and its backward op
        return _upsample_add_op(x, taps, base, up, pad0, pad1)
    if torch.is_grad_enabled() and (x.requires_grad or (base is not None and base.requires_grad)):
        return _UpsampleAddFunction.apply(x, taps, base, up, pad0, pad1)
    return _upsample_add_forward(x, taps, base, up, pad0, pad1)


def reference_upsample_add(
    x: torch.Tensor, kernel: torch.Tensor, base: torch.Tensor | None = None, *, up: int = 2, pad=(2, 1)
) -> torch.Tensor:
    """`upsample_add` in plain PyTorch: `upfirdn2d(x, kernel, up=up, pad=pad)`, plus base when
    given (two roundings in a half type, as rosinality's ToRGB). Arguments as `upsample_add`'s."""
    upsampled = upfirdn2d(x, kernel, up=up, down=1, pad=tuple(pad))
    return upsampled if base is None else base + upsampled


def _check_arguments(x, kernel, base, up, pad) -> None:
    out_h, out_w = check_upfirdn2d_arguments(x, kernel, up, 1, pad)
    if base is not None:
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"base: expected None or a tensor [B, C, OH, OW], got {type(base).__name__}")
        expected = (x.shape[0], x.shape[1], out_h, out_w)
        if tuple(base.shape) != expected:
            raise ValueError(f"base: expected [B, C, OH, OW] = {list(expected)}, got {list(base.shape)}")
        if base.dtype != x.dtype or base.device != x.device:
            raise TypeError(
                f"base: expected x's dtype {x.dtype} on {x.device}, got {base.dtype} on {base.device}"
            )


def _profile_range(direction: str, channels: int, height: int, width: int):
    """A profiler range for a launch on a [B, channels, height, width] skip when the op module's
    `PROFILE_RANGES` is set, else a no-op."""
    if not _conv_op.PROFILE_RANGES:
        return contextlib.nullcontext()
    return _conv_op.profile_range(f"skip upsample {channels}ch {height}x{width} {direction}")


def _upsample_add_forward(x, taps, base, up, pad0, pad1) -> torch.Tensor:
    """The forward launch: [B, C, OH, OW] contiguous in x's dtype."""
    with _profile_range("forward", x.shape[1], x.shape[2], x.shape[3]):
        return _launch_upsample_add(x, taps, base, up, pad0, pad1)


def _launch_upsample_add(x, taps, base, up, pad0, pad1) -> torch.Tensor:
    batch, channels, height, width = x.shape
    kh, kw = taps.shape
    out_h, out_w = height * up + pad0 + pad1 - kh + 1, width * up + pad0 + pad1 - kw + 1
    out = _alloc((batch, channels, out_h, out_w), x.dtype, x.device)
    _observe_launch("upsample_add", (x, taps, base), (out,))
    if x.device.type == "meta" or out.numel() == 0:
        return out
    block_h, block_w = FORWARD_BLOCK
    tiles = _cdiv(out_h, block_h) * _cdiv(out_w, block_w)
    base_arg = base if base is not None else out  # not read without HAS_BASE
    base_strides = base.stride() if base is not None else (0, 0, 0, 0)
    _upsample_add_kernel[(batch * channels * tiles,)](
        x, taps, base_arg, out, channels, height, width, out_h, out_w, *x.stride(), *base_strides,
        UP=up, PAD=pad0, KH=kh, KW=kw, HAS_BASE=base is not None, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
    )  # fmt: skip
    return out


def _upsample_add_backward(grad, taps, up, pad0, height, width) -> torch.Tensor:
    """grad x [B, C, height, width] (contiguous, grad's dtype) from grad of the output
    [B, C, OH, OW] (any strides): the adjoint of the forward's upsampling FIR."""
    with _profile_range("backward", grad.shape[1], height, width):
        return _launch_upsample_add_backward(grad, taps, up, pad0, height, width)


def _launch_upsample_add_backward(grad, taps, up, pad0, height, width) -> torch.Tensor:
    batch, channels, out_h, out_w = grad.shape
    kh, kw = taps.shape
    grad_x = _alloc((batch, channels, height, width), grad.dtype, grad.device)
    _observe_launch("upsample_add_backward", (grad, taps), (grad_x,))
    if grad.device.type == "meta" or grad_x.numel() == 0:
        return grad_x
    block_h, block_w = BACKWARD_BLOCK
    tiles = _cdiv(height, block_h) * _cdiv(width, block_w)
    _upsample_add_backward_kernel[(batch * channels * tiles,)](
        grad, taps, grad_x, channels, height, width, out_h, out_w, *grad.stride(),
        UP=up, PAD=pad0, KH=kh, KW=kw, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
    )  # fmt: skip
    return grad_x


class _UpsampleAddFunction(torch.autograd.Function):
    """Eager autograd of the Triton path: grad x by the adjoint kernel, grad base = grad."""

    @staticmethod
    def forward(ctx, x, taps, base, up, pad0, pad1):
        _setup_context(ctx, (x, taps, base, up, pad0, pad1), None)
        return _upsample_add_forward(x, taps, base, up, pad0, pad1)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad):
        return _gradients(ctx, grad, _upsample_add_backward)


def _setup_context(ctx, inputs, output):
    """What both autograd paths keep: the taps, and (up, pad0, H, W) of x."""
    x, taps, base, up, pad0, _ = inputs
    ctx.save_for_backward(taps)
    ctx.options = (up, pad0, x.shape[2], x.shape[3])


def _gradients(ctx, grad, backward):
    """(grad x, None, grad base, None, None, None): grad x by `backward` (the launch or its
    custom op, with `_upsample_add_backward`'s arguments), grad base is grad itself."""
    (taps,) = ctx.saved_tensors
    up, pad0, height, width = ctx.options
    grad_x = backward(grad, taps, up, pad0, height, width) if ctx.needs_input_grad[0] else None
    return grad_x, None, grad if ctx.needs_input_grad[2] else None, None, None, None


# --- torch.library registration, for torch.compile


@torch.library.custom_op(
    "refinestyle_kernels::upsample_add_triton",
    mutates_args=(),
    schema="(Tensor x, Tensor taps, Tensor? base, int up, int pad0, int pad1) -> Tensor",
)
def _upsample_add_op(
    x: torch.Tensor, taps: torch.Tensor, base: torch.Tensor | None, up: int, pad0: int, pad1: int
) -> torch.Tensor:
    """`_upsample_add_forward` as a custom op."""
    return _upsample_add_forward(x, taps, base, up, pad0, pad1)


@_upsample_add_op.register_fake
def _(x, taps, base, up, pad0, pad1):
    batch, channels, height, width = x.shape
    kh, kw = taps.shape
    return x.new_empty((batch, channels, height * up + pad0 + pad1 - kh + 1, width * up + pad0 + pad1 - kw + 1))


@torch.library.custom_op(
    "refinestyle_kernels::upsample_add_triton_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor taps, int up, int pad0, int height, int width) -> Tensor",
)
def _upsample_add_backward_op(
    grad: torch.Tensor, taps: torch.Tensor, up: int, pad0: int, height: int, width: int
) -> torch.Tensor:
    """`_upsample_add_backward` as a custom op."""
    return _upsample_add_backward(grad, taps, up, pad0, height, width)


@_upsample_add_backward_op.register_fake
def _(grad, taps, up, pad0, height, width):
    return grad.new_empty((grad.shape[0], grad.shape[1], height, width))


def _op_backward(ctx, grad):
    return _gradients(ctx, grad, torch.ops.refinestyle_kernels.upsample_add_triton_backward)


_upsample_add_op.register_autograd(_op_backward, setup_context=_setup_context)


# --- Triton kernels

if triton is not None:

    @triton.jit
    def _upsample_add_kernel(
        x_ptr,  # [B, C, H, W] any strides
        taps_ptr,  # [KH, KW] fp32 contiguous: the filter in correlation order (flipped)
        base_ptr,  # [B, C, OUT_H, OUT_W] any strides, if HAS_BASE
        out_ptr,  # [B, C, OUT_H, OUT_W] contiguous, out
        C,
        H,
        W,
        OUT_H,
        OUT_W,
        stride_xb,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_bb,
        stride_bc,
        stride_bh,
        stride_bw,
        UP: tl.constexpr,
        PAD: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        HAS_BASE: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """out[oy, ox] = base + sum over taps of taps[ky, kx] * up(x)[oy + ky - PAD, ox + kx - PAD],
        where up(x)[u, v] = x[u / UP, v / UP] when both divide and 0 otherwise. Program (plane
        b * C + c, tile), flattened: one BLOCK_H x BLOCK_W tile of one output plane."""
        pid = tl.program_id(0)
        tiles_w = tl.cdiv(OUT_W, BLOCK_W)
        tiles = tl.cdiv(OUT_H, BLOCK_H) * tiles_w
        plane = pid // tiles
        tile = pid % tiles
        b = (plane // C).to(tl.int64)
        c = (plane % C).to(tl.int64)
        oy = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        ox = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        out_ok = (oy < OUT_H)[:, None] & (ox < OUT_W)[None, :]
        x_plane = x_ptr + b * stride_xb + c * stride_xc
        acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        for ky in tl.static_range(KH):
            u = oy + (ky - PAD)
            # (u >= 0 first: the remainder of a negative u is never looked at)
            row_ok = (u >= 0) & (u < H * UP) & (u % UP == 0)
            rows = tl.where(row_ok, u, 0) // UP
            for kx in tl.static_range(KW):
                v = ox + (kx - PAD)
                col_ok = (v >= 0) & (v < W * UP) & (v % UP == 0)
                cols = tl.where(col_ok, v, 0) // UP
                tap = tl.load(taps_ptr + ky * KW + kx)
                values = tl.load(
                    x_plane + rows[:, None] * stride_xh + cols[None, :] * stride_xw,
                    mask=row_ok[:, None] & col_ok[None, :] & out_ok, other=0.0,
                )  # fmt: skip
                acc += tap * values.to(tl.float32)
        if HAS_BASE:
            base = tl.load(
                base_ptr + b * stride_bb + c * stride_bc + oy[:, None] * stride_bh + ox[None, :] * stride_bw,
                mask=out_ok, other=0.0,
            )  # fmt: skip
            acc += base.to(tl.float32)
        out = out_ptr + ((b * C + c) * OUT_H + oy[:, None]) * OUT_W + ox[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _upsample_add_backward_kernel(
        grad_ptr,  # [B, C, OUT_H, OUT_W] any strides: grad of the output
        taps_ptr,  # [KH, KW] fp32 contiguous, as the forward's
        grad_x_ptr,  # [B, C, H, W] contiguous, out
        C,
        H,
        W,
        OUT_H,
        OUT_W,
        stride_gb,
        stride_gc,
        stride_gh,
        stride_gw,
        UP: tl.constexpr,
        PAD: tl.constexpr,
        KH: tl.constexpr,
        KW: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """grad_x[iy, ix] = sum over taps of taps[ky, kx] * grad[iy * UP + PAD - ky, ix * UP + PAD - kx]
        (taps outside the output add nothing): the forward's adjoint. Program (plane, tile) as
        the forward's, over the input's pixels."""
        pid = tl.program_id(0)
        tiles_w = tl.cdiv(W, BLOCK_W)
        tiles = tl.cdiv(H, BLOCK_H) * tiles_w
        plane = pid // tiles
        tile = pid % tiles
        b = (plane // C).to(tl.int64)
        c = (plane % C).to(tl.int64)
        iy = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        ix = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        in_ok = (iy < H)[:, None] & (ix < W)[None, :]
        grad_plane = grad_ptr + b * stride_gb + c * stride_gc
        acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        for ky in tl.static_range(KH):
            oy = iy * UP + (PAD - ky)
            row_ok = (oy >= 0) & (oy < OUT_H)
            for kx in tl.static_range(KW):
                ox = ix * UP + (PAD - kx)
                col_ok = (ox >= 0) & (ox < OUT_W)
                tap = tl.load(taps_ptr + ky * KW + kx)
                values = tl.load(
                    grad_plane + oy[:, None] * stride_gh + ox[None, :] * stride_gw,
                    mask=row_ok[:, None] & col_ok[None, :] & in_ok, other=0.0,
                )  # fmt: skip
                acc += tap * values.to(tl.float32)
        grad_x = grad_x_ptr + ((b * C + c) * H + iy[:, None]) * W + ix[None, :]
        tl.store(grad_x, acc.to(grad_x_ptr.dtype.element_ty), mask=in_ok)


__all__ = ["reference_upsample_add", "upsample_add"]
