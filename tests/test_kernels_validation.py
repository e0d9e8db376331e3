"""Bad input to the op: a ValueError/TypeError that names the argument; nothing broadcasts silently."""
import numpy as np
import pytest
import torch

import refinestyle_kernels as rk
from refinestyle_kernels import modulated_conv2d, resolve_backend, styled_conv2d, use_backend


def good(**overrides):
    args = dict(
        x=torch.randn(2, 4, 5, 5),
        weight=torch.randn(6, 4, 3, 3),
        styles=torch.randn(2, 4),
        p=torch.randn(2, 3, 6),
        q=torch.randn(2, 3, 4),
    )
    args.update(overrides)
    return args


def call(**overrides):
    kwargs = good(**overrides)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("x", "weight", "styles", "p", "q")}
    return styled_conv2d(kwargs["x"], kwargs["weight"], kwargs["styles"], kwargs["p"], kwargs["q"], backend="torch", **options)


def test_good_input_runs():
    assert call().shape == (2, 6, 5, 5)


@pytest.mark.parametrize(
    "overrides, error, names",
    [
        (dict(x=torch.randn(4, 5, 5)), ValueError, "x"),
        (dict(x=torch.randn(2, 4, 5, 5).long()), TypeError, "x"),
        (dict(x=[1, 2]), TypeError, "x"),
        (dict(weight=torch.randn(1, 6, 4, 3, 3)), ValueError, "weight"),
        (dict(weight=torch.randn(6, 5, 3, 3)), ValueError, "weight"),
        (dict(weight=torch.randn(6, 4, 5, 5)), ValueError, "weight"),
        (dict(weight=torch.randn(6, 4, 3, 1)), ValueError, "weight"),
        (dict(styles=torch.randn(1, 4)), ValueError, "styles"),
        (dict(styles=torch.randn(2, 5)), ValueError, "styles"),
        (dict(styles=torch.randn(4)), ValueError, "styles"),
        (dict(q=None), ValueError, "p, q"),
        (dict(p=None), ValueError, "p, q"),
        (dict(p=torch.randn(2, 5, 6)), ValueError, "p, q"),  # L mismatch
        (dict(p=torch.randn(2, 3, 7)), ValueError, "p"),  # Cout mismatch
        (dict(q=torch.randn(2, 3, 5)), ValueError, "q"),  # Cin mismatch
        (dict(p=torch.randn(1, 3, 6), q=torch.randn(1, 3, 4)), ValueError, "p, q"),  # batch 1 != 2, no broadcast
        (dict(p=torch.randn(3, 6)), ValueError, "p, q"),  # shared p with per-sample q
        (dict(p=torch.randn(2, 3, 6).double()), TypeError, "p"),  # mixed dtypes
        (dict(styles=torch.randn(2, 4).half()), TypeError, "styles"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(clamp=-1.0), ValueError, "clamp"),
        (dict(noise=torch.randn(2, 1, 5, 5)), ValueError, "noise_strength"),
        (dict(noise=torch.randn(2, 1, 4, 5), noise_strength=torch.ones(1)), ValueError, "noise"),
        (dict(noise=torch.randn(3, 1, 5, 5), noise_strength=torch.ones(1)), ValueError, "noise"),
        (dict(noise=torch.randn(2, 2, 5, 5), noise_strength=torch.ones(1)), ValueError, "noise"),
        (dict(noise=torch.randn(2, 1, 5, 5), noise_strength=torch.ones(2)), ValueError, "noise_strength"),
        (dict(bias=torch.randn(5)), ValueError, "bias"),
        (dict(bias=torch.randn(1, 6, 1, 1)), ValueError, "bias"),
        (dict(weight=torch.randn(6, 4, 1, 1), upsample=True), ValueError, "upsample"),
        (dict(backend="cuda"), ValueError, "backend"),
        # degenerate channels, and scalars that are not positive finite numbers or flags
        (dict(x=torch.randn(2, 0, 5, 5), weight=torch.randn(6, 0, 3, 3), styles=torch.randn(2, 0), p=None, q=None),
         ValueError, "weight"),
        (dict(weight=torch.randn(0, 4, 3, 3), p=None, q=None), ValueError, "weight"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps=True), TypeError, "eps"),
        (dict(clamp="1.0"), TypeError, "clamp"),
        (dict(noise=torch.randn(2, 1, 5, 5), noise_strength="0.3"), TypeError, "noise_strength"),
        (dict(demodulate="no"), TypeError, "demodulate"),
        (dict(activate=1), TypeError, "activate"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, names):
    backend = overrides.pop("backend", None)
    if backend is not None:
        with pytest.raises(error, match=names):
            modulated_conv2d(*good().values(), backend=backend)
        return
    with pytest.raises(error) as info:
        call(**overrides)
    assert str(info.value).startswith(names), str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put a tensor on another device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="styles"):
        call(styles=torch.randn(2, 4, device="cuda"))


def test_tensors_on_different_devices_meta():
    # the meta device stands in for a second device on a machine without a GPU
    with pytest.raises(ValueError, match="^q: expected device"):
        call(q=torch.randn(2, 3, 4, device="meta"))


def test_backend_auto_resolution_and_override():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("reference", cpu) == "reference"
    with use_backend("reference"):
        assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("auto", cpu) == "torch"


def test_numpy_scalars_are_numbers():
    tensors = good()
    out = call(**tensors, scale=np.float32(0.5), eps=np.float64(1e-8))
    torch.testing.assert_close(out, call(**tensors, scale=0.5, eps=1e-8))


def test_resolve_backend_takes_a_device_name():
    assert resolve_backend("auto", "cpu") == "torch"


DEMODULATION = dict(weight=torch.randn(5, 4, 3, 3), styles=torch.randn(2, 4), p=None, q=None, scale=0.1, eps=1e-8)


@pytest.mark.parametrize(
    "overrides, error, names",
    [
        (dict(p=torch.randn(2, 5), q=torch.randn(2, 2, 4)), ValueError, "p, q"),  # shared p, per-sample q
        (dict(p=torch.randn(1, 2, 5), q=torch.randn(1, 2, 4)), ValueError, "p, q"),  # batch 1 for B=2
        (dict(p=torch.randn(2, 2, 5)), ValueError, "p, q"),  # p without q
        (dict(p=torch.randn(2, 5), q=torch.randn(3, 4)), ValueError, "p, q"),  # L mismatch
        (dict(styles=torch.randn(4)), ValueError, "styles"),
        (dict(styles=torch.randn(2, 3)), ValueError, "styles"),
        (dict(styles=torch.randn(2, 4).double()), TypeError, "styles"),
        (dict(styles=torch.randn(2, 4, device="meta")), ValueError, "styles"),  # device: ValueError, as the op
        (dict(styles=torch.randn(0, 4)), ValueError, "styles"),  # empty batch, refused as the op does
        (dict(p=torch.randn(0, 5), q=torch.randn(0, 4)), ValueError, "p, q"),  # L=0
        (dict(weight=torch.randn(5, 4, 0, 0)), ValueError, "weight"),  # no taps: energy 0, d = 1/sqrt(eps)
        (dict(weight=torch.randn(5, 4, 3, 3).long()), TypeError, "weight"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(scale=0.0), ValueError, "scale"),
    ],
)
def test_demodulation_coefficients_refuses_bad_input(overrides, error, names):
    args = dict(DEMODULATION, **overrides)
    with pytest.raises(error) as info:
        rk.demodulation_coefficients(*args.values())
    assert str(info.value).startswith(names), str(info.value)


def test_demodulation_coefficients_take_a_non_square_kernel():
    """Not an op input, but the formula holds for any kh x kw: check it against the literal kernel."""
    weight, styles = torch.randn(5, 4, 1, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    p, q = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    kernels = 0.1 * weight[None] * styles[:, None, :, None, None] + (p.transpose(1, 2) @ q)[..., None, None]
    expected = (kernels.square().sum((2, 3, 4)) + 1e-8).rsqrt()
    torch.testing.assert_close(rk.demodulation_coefficients(weight, styles, p, q, 0.1, 1e-8), expected)


@pytest.mark.parametrize(
    "call_upfirdn, error, names",
    [
        (lambda x, k: rk.upfirdn2d(x, k.to("meta"), pad=(1, 1)), ValueError, "kernel"),  # was uninitialised memory
        (lambda x, k: rk.upfirdn2d(x.long(), k, pad=(1, 1)), TypeError, "x"),  # was all zeros
        (lambda x, k: rk.upfirdn2d(x, k.long(), pad=(1, 1)), TypeError, "kernel"),
        (lambda x, k: rk.upfirdn2d(x, k, up=2.0, pad=(1, 1)), ValueError, "up"),
        (lambda x, k: rk.upfirdn2d(x, k, up=True, pad=(1, 1)), ValueError, "up"),
        (lambda x, k: rk.upfirdn2d(x, k, down=0), ValueError, "down"),
        (lambda x, k: rk.upfirdn2d(x, k, pad=1), ValueError, "pad"),
        (lambda x, k: rk.upfirdn2d(x, k, pad=(1, 1, 1)), ValueError, "pad"),
        (lambda x, k: rk.upfirdn2d(x, k, pad=(-3, -3)), ValueError, "pad, kernel"),
        (lambda x, k: rk.make_blur_kernel([1, -1]), ValueError, "taps"),
        (lambda x, k: rk.fused_leaky_relu(x, torch.zeros(5, dtype=torch.float64)), TypeError, "bias"),
        (lambda x, k: rk.fused_leaky_relu(x.long(), None), TypeError, "x"),
        (lambda x, k: rk.fused_leaky_relu([1.0, 2.0], None), ValueError, "x"),
    ],
)
def test_filter_and_activation_ops_refuse_bad_input(call_upfirdn, error, names):
    x, kernel = torch.randn(2, 5, 6, 6), rk.make_blur_kernel([1, 3, 3, 1])
    with pytest.raises(error) as info:
        call_upfirdn(x, kernel)
    assert str(info.value).startswith(names), str(info.value)


def test_upfirdn2d_differentiates_a_filter_that_requires_grad():
    """The upsampling fast path keeps a made-once depthwise weight without a gradient; a
    trainable filter takes the general path, with the same values."""
    x = torch.randn(2, 3, 5, 5)
    kernel = rk.make_blur_kernel([1, 3, 3, 1]) * 4
    fixed = rk.upfirdn2d(x, kernel, up=2, pad=(2, 1))
    trainable = kernel.clone().requires_grad_()
    out = rk.upfirdn2d(x, trainable, up=2, pad=(2, 1))
    torch.testing.assert_close(out, fixed)
    out.square().sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def _modules():
    conv = rk.StyledConv(4, 5, 3, 6)
    to_rgb = rk.ToRGB(5, 6)
    x, w = torch.randn(2, 4, 6, 6), torch.randn(2, 6)
    return conv, to_rgb, x, w


@pytest.mark.parametrize(
    "use, error, names",
    [
        (lambda conv, rgb, x, w: rgb(conv(x, w), w, torch.randn(1, 3, 3, 3)), ValueError, "skip"),  # batch broadcast
        (lambda conv, rgb, x, w: rgb(conv(x, w), w, torch.randn(2, 1, 3, 3)), ValueError, "skip"),  # channels
        (lambda conv, rgb, x, w: rgb(conv(x, w), w, torch.randn(2, 3, 6, 6)), ValueError, "skip"),  # resolution
        (lambda conv, rgb, x, w: conv.forward_to_rgb(rgb, x, w, w, torch.randn(1, 3, 3, 3)), ValueError, "skip"),
        (lambda conv, rgb, x, w: conv(torch.randn(4, 6, 6), w), ValueError, "input"),
        (lambda conv, rgb, x, w: conv(torch.randn(2, 3, 6, 6), w), ValueError, "input"),
        (lambda conv, rgb, x, w: conv(x, torch.randn(2, 5)), ValueError, "style"),
        (lambda conv, rgb, x, w: conv(x, torch.randn(1, 6)), ValueError, "style"),
        (lambda conv, rgb, x, w: conv(x, w.double()), TypeError, "style"),
        (lambda conv, rgb, x, w: conv.forward_to_rgb(rgb, x, w, torch.randn(2, 7)), ValueError, "rgb_style"),
        (lambda conv, rgb, x, w: conv.forward_to_rgb(rgb, x, w, w.double()), TypeError, "rgb_style"),
        (lambda conv, rgb, x, w: conv(x, w, None, [[0.1] * 5], [[0.1] * 4]), TypeError, "p"),
        (lambda conv, rgb, x, w: rk.NoiseInjection()(x, torch.randn(2, 4, 1, 1)), ValueError, "noise"),
        (lambda conv, rgb, x, w: rk.ModulatedConv2d(4, 5, 1, 6, upsample=True), ValueError, "upsample"),
        (lambda conv, rgb, x, w: rk.ModulatedConv2d(0, 5, 3, 6), ValueError, "in_channel"),
        (lambda conv, rgb, x, w: rk.StyledConv(4, 5, 3, 6, clamp=-1.0), ValueError, "clamp"),
        (lambda conv, rgb, x, w: rk.ToRGB(5, 6, clamp=0), ValueError, "clamp"),
        (lambda conv, rgb, x, w: rk.LayerTokens(4, 5, 2.5), ValueError, "num_tokens"),
    ],
)
def test_modules_refuse_bad_input(use, error, names):
    with pytest.raises(error) as info:
        use(*_modules())
    assert str(info.value).startswith(names), str(info.value)


def test_module_flags_and_a_non_finite_noise_strength_are_refused_by_name():
    from refinestyle_kernels import ModulatedConv2d, StyledConv

    with pytest.raises(TypeError, match="upsample: expected True or False"):
        ModulatedConv2d(6, 5, 3, 8, upsample="no")
    with pytest.raises(TypeError, match="demodulate: expected True or False"):
        StyledConv(6, 5, 3, 8, demodulate=0)
    x, weight, styles = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), torch.randn(2, 4)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_strength: expected a finite number"):
            styled_conv2d(x, weight, styles, noise=torch.randn(2, 1, 5, 5), noise_strength=bad, backend="torch")
