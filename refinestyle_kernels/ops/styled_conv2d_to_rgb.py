"""A plain StyledConv layer and the toRGB layer that reads its output, as one op.

In StyleGAN2's synthesis network the last conv of every block feeds two layers: the next
block's upsampling conv and the block's toRGB (a 1x1 modulated conv to K = 3 channels, not
demodulated). Run as two layers, the training step's backward then moves three
activation-sized tensors that carry no information of their own: the toRGB writes its input
gradient, autograd adds it to the next block's gradient in a separate kernel, and the conv's
epilogue backward reads the sum back. At 1024 px, batch 8, bf16 that is about 4 GB of the step's
29 GB (`python -m benchmarks.traffic`).

The toRGB's adjoint is tiny per pixel (K = 3 values times a [K, Cout] matrix), so the Triton
backend computes it in the conv's epilogue-backward kernel, in registers:

    grad out = grad_next + sum_k grad_rgb[k] * (rgb_scale * rgb_weight[k] * rgb_styles)

and in the same pass the sums over pixels of out * grad_rgb[k] ([B, K, Cout]), from which
the toRGB's style and weight gradients follow by two small products.

In the forward, layers of at most `RGB_EPILOGUE_MAX_COUT` = 128 channels (256 px to 1024 px
in config-f), where one tile of the conv holds every output channel of its pixels, compute the
toRGB in the conv's epilogue from the tile as stored, so the toRGB does not read out back
(about 0.9 GB of a 1024 px, batch 8, bf16 training step). Wider layers run the toRGB as its
own 1x1 conv launch.

Eager mode runs the pair as an autograd.Function, torch.compile as a custom op with its own
backward op (`refinestyle_kernels::styled_conv2d_to_rgb_triton`), so compiled generators keep
both fusions. The other backends and batches past the launch limit run the two layers one
after the other (`composed_styled_conv2d_to_rgb`), which is also this op's reference.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from refinestyle_kernels.backend import resolve_backend
from refinestyle_kernels.ops import modulated_conv2d as _conv_op
from refinestyle_kernels.ops.modulated_conv2d import (
    MAX_LAUNCH_BATCH,
    _backend_for_call,
    _check_flag,
    _check_like,
    _check_positive,
    _check_tensor,
    _clamp_bound,
    _derived_from_weight,
    _differentiable_once,
    _gradients_wanted,
    _in_fake_layouts,
    _merge_deferred_demodulation,
    _needs_with_deferred,
    _save_with_deferred,
    _saved_with_deferred,
    _triton_arguments,
    _triton_backward,
    _styled_conv2d_triton_backward_fake,
    _triton_forward,
    _validate,
    styled_conv2d,
)


def styled_conv2d_to_rgb(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    *,
    rgb_weight: torch.Tensor,
    rgb_styles: torch.Tensor,
    rgb_bias: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    noise_strength: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    activate: bool = True,
    clamp: float | None = None,
    rgb_clamp: float | None = None,
    demodulate: bool = True,
    eps: float = 1e-8,
    scale: float | None = None,
    rgb_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain (not upsampling) StyledConv and the toRGB reading its output:

        out = styled_conv2d(x, weight, styles, p, q, noise=..., bias=..., activate=..., clamp=...)
        rgb = styled_conv2d(out, rgb_weight, rgb_styles, bias=rgb_bias, activate=False,
                            clamp=rgb_clamp, demodulate=False, scale=rgb_scale)

    Args:
        x, weight, styles, p, q, noise, noise_strength, bias, activate, clamp, demodulate,
            eps, scale, backend: as in `styled_conv2d` (upsample is always False).
        rgb_weight: [K, Cout, 1, 1] the toRGB's 1x1 kernel (rosinality's `to_rgb.conv.weight[0]`,
            K = 3), x's dtype.
        rgb_styles: [B, Cout] the toRGB's modulation (its affine applied to its w row), x's
            dtype.
        rgb_bias: None or [K] in x's dtype (rosinality's `to_rgb.bias` flattened), added
            before rgb_clamp.
        rgb_clamp: None or a positive float: the toRGB's conv + bias clamped to [-rgb_clamp,
            rgb_clamp] (NVlabs' conv_clamp).
        rgb_scale: multiplier of rgb_weight; None means 1/sqrt(Cout).

    Returns:
        (out [B, Cout, H, W], rgb [B, K, H, W]), both in x's dtype. The skip branch of
        StyleGAN2's toRGB (rgb + upsample(previous rgb)) is left to the caller.
    """
    layer = _validate(x, weight, styles, p, q, noise, noise_strength, bias, clamp, demodulate, False, eps, scale)
    _check_flag("activate", activate)
    rgb_scale = _validate_rgb(x, weight, rgb_weight, rgb_styles, rgb_bias, rgb_clamp, rgb_scale)
    arguments = dict(
        p=p, q=q, rgb_weight=rgb_weight, rgb_styles=rgb_styles, rgb_bias=rgb_bias, noise=noise,
        noise_strength=noise_strength, bias=bias, activate=activate, clamp=clamp, rgb_clamp=rgb_clamp,
        demodulate=demodulate, eps=eps, scale=scale, rgb_scale=rgb_scale,
    )  # fmt: skip
    backend = _backend_for_call(resolve_backend(backend, x.device), noise)
    if backend != "triton" or x.shape[0] > MAX_LAUNCH_BATCH:  # larger batches run in chunks, layer by layer
        return composed_styled_conv2d_to_rgb(styled_conv2d)(x, weight, styles, **arguments, backend=backend)
    x, weight, styles, p, q, noise, noise_strength, bias, scale = layer
    layer, deferred = _triton_arguments(
        x, weight, styles, p, q, demodulate=demodulate, upsample=False, eps=eps, scale=scale, noise=noise,
        noise_strength=noise_strength, bias=bias, activate=activate, clamp=clamp,
    )  # fmt: skip
    rgb_options = (float(rgb_scale), float(rgb_clamp) if rgb_clamp is not None else None)
    rgb_bias = rgb_bias.contiguous() if rgb_bias is not None else None
    pair = (*layer, rgb_weight, rgb_styles, rgb_bias, *rgb_options)
    if torch.compiler.is_compiling():  # torch.compile traces the custom op
        return _styled_conv2d_to_rgb_op(*pair)
    if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in pair)):
        with torch.no_grad():  # inference: no autograd node (and nothing deferred: see _triton_arguments)
            return _pair_forward(*pair)[:2]
    return _StyledConv2dToRGBFunction.apply(*pair, deferred)


def composed_styled_conv2d_to_rgb(op: Callable) -> Callable:
    """`styled_conv2d_to_rgb` as two calls of `op` (a callable with `styled_conv2d`'s
    signature): the unfused route, the reference of the fused one, and how the benchmarks run
    plain-PyTorch implementations of the layer through the generator."""

    def composed(x, weight, styles, p=None, q=None, *, rgb_weight, rgb_styles, rgb_bias=None, rgb_clamp=None,
                 rgb_scale=None, **layer):  # fmt: skip
        out = op(x, weight, styles, p, q, upsample=False, **layer)
        layer_options = {name: layer[name] for name in ("eps", "backend") if name in layer}
        rgb = op(
            out, rgb_weight, rgb_styles, bias=rgb_bias, activate=False, clamp=rgb_clamp, demodulate=False,
            scale=rgb_scale, **layer_options,
        )  # fmt: skip
        return out, rgb

    return composed


def _validate_rgb(x, weight, rgb_weight, rgb_styles, rgb_bias, rgb_clamp, rgb_scale) -> float:
    """Checks the toRGB's arguments against the conv's x [B, Cin, H, W] and weight [Cout, ...];
    returns rgb_scale (1/sqrt(Cout) when None)."""
    batch, out_channels = x.shape[0], weight.shape[0]
    _check_tensor("rgb_weight", rgb_weight, (4,), f"[K, Cout={out_channels}, 1, 1]")
    if rgb_weight.shape[1:] != (out_channels, 1, 1) or rgb_weight.shape[0] < 1:
        raise ValueError(f"rgb_weight: expected [K, Cout={out_channels}, 1, 1], got {tuple(rgb_weight.shape)}")
    _check_tensor("rgb_styles", rgb_styles, (2,), f"[B={batch}, Cout={out_channels}]")
    if tuple(rgb_styles.shape) != (batch, out_channels):
        raise ValueError(f"rgb_styles: expected [B={batch}, Cout={out_channels}], got {tuple(rgb_styles.shape)}")
    channels = rgb_weight.shape[0]
    if rgb_bias is not None:
        _check_tensor("rgb_bias", rgb_bias, (1,), f"[K={channels}]")
        if rgb_bias.shape[0] != channels:
            raise ValueError(f"rgb_bias: expected [K={channels}], got {tuple(rgb_bias.shape)}")
    _check_like({"rgb_weight": rgb_weight, "rgb_styles": rgb_styles, "rgb_bias": rgb_bias}, x, "x")
    if rgb_clamp is not None:
        _check_positive("rgb_clamp", rgb_clamp, "None or a positive finite number")
    if rgb_scale is None:
        return 1.0 / math.sqrt(out_channels)
    return _check_positive("rgb_scale", rgb_scale, "None or a positive finite number")


def _pair_forward(
    x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp,
    rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp,
):  # fmt: skip
    """The pair's forward on the normalised arguments (`_triton_arguments` and the toRGB's):
    one `_triton_forward` launch for the conv with the toRGB in its epilogue (at most
    `RGB_EPILOGUE_MAX_COUT` channels, a toRGB of at most `RGB_EPILOGUE_MAX_CHANNELS`), else the
    conv and then the toRGB on its output.
    Returns (out, rgb, mix): mix [B, K, Cout] fp32 = rgb_scale * rgb_weight * rgb_styles."""
    mix = _rgb_mix(rgb_weight, rgb_styles, rgb_scale)
    conv = (x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp)
    # read at call time: a switch for A/B runs
    if weight.shape[0] <= _conv_op.RGB_EPILOGUE_MAX_COUT and rgb_weight.shape[0] <= _conv_op.RGB_EPILOGUE_MAX_CHANNELS:
        out, rgb = _triton_forward(*conv, rgb=(mix, rgb_bias, rgb_clamp))
    else:
        out = _triton_forward(*conv)
        rgb = _triton_forward(
            out, rgb_weight, rgb_styles, None, None, None, None, None, rgb_bias, rgb_scale, False, False, rgb_clamp
        )  # fmt: skip
    return out, rgb, mix


def _rgb_scaled(rgb_weight, rgb_scale) -> torch.Tensor:
    """[K, Cout] fp32: rgb_scale * the 1x1 kernel, cached while the weight is frozen."""
    return _derived_from_weight(
        rgb_weight, ("rgb_scaled", rgb_scale), lambda w: (rgb_scale * w[:, :, 0, 0].float()).contiguous()
    )


def _rgb_mix(rgb_weight, rgb_styles, rgb_scale) -> torch.Tensor:
    """[B, K, Cout] fp32, contiguous: rgb_scale * the 1x1 kernel * the styles."""
    # fp32 by type promotion; a broadcast product keeps its operands' strides (a transposed
    # weight or styles view), and the kernels read mix as a contiguous [B, K, Cout] array
    return (_rgb_scaled(rgb_weight, rgb_scale)[None] * rgb_styles[:, None, :]).contiguous()


def _pair_backward(
    grad_out, grad_rgb, out, rgb, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample,
    activate, clamp, rgb_weight, rgb_styles, rgb_scale, rgb_clamp, mix, needs, rgb_needs, placeholders,
):  # fmt: skip
    """The pair's gradients: the conv's eight in `_triton_backward`'s order (x, styles, weight, p,
    q, demod, strength, bias), then the toRGB's (rgb_weight, rgb_styles, rgb_bias). needs and
    rgb_needs say which are wanted; the others are None, or empty tensors with placeholders
    (the custom op must return tensors). grad_out is None where out feeds only the toRGB,
    grad_rgb None where nothing uses the image."""
    conv = (out, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp, needs)
    absent = x.new_empty(0) if placeholders else None
    if grad_rgb is None:  # only out's other consumer sends a gradient
        return (*_triton_backward(grad_out, *conv, placeholders=placeholders), absent, absent, absent)
    *conv_grads, products = _triton_backward(
        grad_out, *conv, placeholders=placeholders, rgb=(grad_rgb, mix, rgb, rgb_clamp)
    )
    # products [B, K, Cout] = sum over pixels of out * grad_rgb (clamp-masked): the toRGB's
    # per-sample weight gradient, before rgb_scale and the styles
    grad_rgb_weight = grad_rgb_styles = grad_rgb_bias = absent
    if rgb_needs[0]:
        grad_rgb_weight = rgb_scale * (products * rgb_styles[:, None, :]).sum(0)
        grad_rgb_weight = grad_rgb_weight.to(rgb_weight.dtype)[:, :, None, None]
    if rgb_needs[1]:
        grad_rgb_styles = (products * _rgb_scaled(rgb_weight, rgb_scale)[None]).sum(1).to(rgb_styles.dtype)
    if rgb_needs[2]:
        passed = grad_rgb.float()
        if rgb_clamp is not None:
            passed = torch.where(rgb.abs() < _clamp_bound(rgb_clamp, rgb.dtype), passed, 0.0)
        grad_rgb_bias = passed.sum((0, 2, 3)).to(rgb.dtype)
    return (*conv_grads, grad_rgb_weight, grad_rgb_styles, grad_rgb_bias)


def _needs(wanted) -> tuple[list, list]:
    """needs_input_grad of the pair's 18 inputs -> (the conv's needs in the backward op's order,
    the toRGB's: rgb_weight, rgb_styles, rgb_bias)."""
    return [wanted[0], wanted[2], wanted[1], wanted[3], wanted[4], wanted[5], wanted[7], wanted[8]], list(wanted[13:16])


def _gradients_in_input_order(grads, needs, rgb_needs) -> tuple:
    """`_pair_backward`'s result -> one gradient (or None) per input of the pair's forward."""
    rgb_grads = tuple(g if need else None for g, need in zip(grads[8:], rgb_needs))
    return (*_gradients_wanted(grads[:8], needs), *rgb_grads, None, None)


class _StyledConv2dToRGBFunction(torch.autograd.Function):
    """The pair in eager mode (see `_StyledConv2dTritonFunction` for why not the custom op):
    `_pair_forward`, then `_pair_backward`, whose epilogue backward carries the toRGB's adjoint."""

    @staticmethod
    def forward(
        ctx, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp,
        rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp, deferred,
    ):  # fmt: skip
        out, rgb, mix = _pair_forward(
            x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp,
            rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp,
        )  # fmt: skip
        ctx.set_materialize_grads(False)  # out may feed nothing else (the last block): grad None
        tensors = (x, weight, styles, p, q, demod, noise, noise_strength, bias, out, rgb, rgb_weight, rgb_styles, mix)
        _save_with_deferred(ctx, tensors, deferred)
        ctx.options = (scale, upsample, activate, clamp, rgb_scale, rgb_clamp)
        return out, rgb

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out, grad_rgb):
        tensors, deferred = _saved_with_deferred(ctx)
        x, weight, styles, p, q, demod, noise, noise_strength, bias, out, rgb, rgb_weight, rgb_styles, mix = tensors
        scale, upsample, activate, clamp, rgb_scale, rgb_clamp = ctx.options
        if grad_out is None and grad_rgb is None:
            return (None,) * len(ctx.needs_input_grad)
        needs, rgb_needs = _needs(ctx.needs_input_grad)
        grads = _pair_backward(
            grad_out, grad_rgb, out, rgb, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale,
            upsample, activate, clamp, rgb_weight, rgb_styles, rgb_scale, rgb_clamp, mix,
            _needs_with_deferred(needs, deferred), rgb_needs, placeholders=False,
        )  # fmt: skip
        grads = (*_merge_deferred_demodulation(grads[:8], needs, deferred), *grads[8:])
        return (*_gradients_in_input_order(grads, needs, rgb_needs), None)


# --- torch.library registration, for torch.compile: the pair is one opaque op with its own
# backward op, so a compiled generator keeps both fusions

_PAIR_ARGUMENTS = (
    "Tensor x, Tensor weight, Tensor styles, Tensor? p, Tensor? q, Tensor? demod, Tensor? noise, "
    "Tensor? noise_strength, Tensor? bias, float scale, bool upsample, bool activate, float? clamp, "
    "Tensor rgb_weight, Tensor rgb_styles, Tensor? rgb_bias, float rgb_scale, float? rgb_clamp"
)


@torch.library.custom_op(
    "refinestyle_kernels::styled_conv2d_to_rgb_triton", mutates_args=(), schema=f"({_PAIR_ARGUMENTS}) -> (Tensor, Tensor)"
)
def _styled_conv2d_to_rgb_op(
    x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp,
    rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp,
):  # fmt: skip
    """`_pair_forward` as a custom op: (out, rgb)."""
    out, rgb, _ = _pair_forward(
        x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp,
        rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp,
    )  # fmt: skip
    return out, rgb


@_styled_conv2d_to_rgb_op.register_fake
def _(x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample, activate, clamp,
      rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp):  # fmt: skip
    batch, _, height, width = x.shape
    out = torch.empty((batch, weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)  # fmt: skip
    rgb = torch.empty((batch, rgb_weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)  # fmt: skip
    return out, rgb


@torch.library.custom_op(
    "refinestyle_kernels::styled_conv2d_to_rgb_triton_backward",
    mutates_args=(),
    schema=(
        f"(Tensor? grad_out, Tensor? grad_rgb, Tensor out, Tensor rgb, {_PAIR_ARGUMENTS}, bool[] needs, "
        "bool[] rgb_needs) -> Tensor[]"
    ),
)
def _styled_conv2d_to_rgb_backward_op(
    grad_out, grad_rgb, out, rgb, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample,
    activate, clamp, rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp, needs, rgb_needs,
):  # fmt: skip
    """`_pair_backward` as a custom op: 11 tensors, empty where a gradient is not wanted."""
    grads = _pair_backward(
        grad_out, grad_rgb, out, rgb, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample,
        activate, clamp, rgb_weight, rgb_styles, rgb_scale, rgb_clamp, _rgb_mix(rgb_weight, rgb_styles, rgb_scale),
        needs, rgb_needs, placeholders=True,
    )  # fmt: skip
    # the outputs of a custom op may not alias each other: each placeholder its own tensor
    # (and each in the layout the fake implementation declares)
    return list(_in_fake_layouts([g if need else x.new_empty(0) for g, need in zip(grads, [*needs, *rgb_needs])]))


@_styled_conv2d_to_rgb_backward_op.register_fake
def _(grad_out, grad_rgb, out, rgb, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample,
      activate, clamp, rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp, needs, rgb_needs):  # fmt: skip
    conv = _styled_conv2d_triton_backward_fake(
        grad_out if grad_out is not None else out, out, x, weight, styles, p, q, demod, noise, noise_strength, bias,
        scale, upsample, activate, clamp, needs,
    )  # fmt: skip
    wanted = grad_rgb is not None
    rgb_grads = [
        torch.empty_like(tensor, memory_format=torch.contiguous_format) if need and wanted and tensor is not None
        else x.new_empty(0)
        for tensor, need in zip((rgb_weight, rgb_styles, rgb_bias), rgb_needs)
    ]  # fmt: skip
    return [*conv, *rgb_grads]


def _setup_pair_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9], *output, inputs[13], inputs[14], inputs[15])
    ctx.options = (*inputs[9:13], inputs[16], inputs[17])


def _pair_op_backward(ctx, grad_out, grad_rgb):
    x, weight, styles, p, q, demod, noise, noise_strength, bias, out, rgb, rgb_weight, rgb_styles, rgb_bias = (
        ctx.saved_tensors
    )
    scale, upsample, activate, clamp, rgb_scale, rgb_clamp = ctx.options
    if grad_out is None and grad_rgb is None:
        return (None,) * len(ctx.needs_input_grad)
    needs, rgb_needs = _needs(ctx.needs_input_grad)
    if grad_rgb is None:  # the toRGB's parameters get no gradient from nothing
        rgb_needs = [False, False, False]
    grads = torch.ops.refinestyle_kernels.styled_conv2d_to_rgb_triton_backward(
        grad_out, grad_rgb, out, rgb, x, weight, styles, p, q, demod, noise, noise_strength, bias, scale, upsample,
        activate, clamp, rgb_weight, rgb_styles, rgb_bias, rgb_scale, rgb_clamp, needs, rgb_needs,
    )  # fmt: skip
    return _gradients_in_input_order(grads, needs, rgb_needs)


_styled_conv2d_to_rgb_op.register_autograd(_pair_op_backward, setup_context=_setup_pair_context)


__all__ = ["composed_styled_conv2d_to_rgb", "styled_conv2d_to_rgb"]
