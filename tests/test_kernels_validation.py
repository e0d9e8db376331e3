"""Bad input to the op: a ValueError/TypeError that names the argument; nothing broadcasts silently."""
import pytest
import torch

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
