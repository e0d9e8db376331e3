"""The rosinality-named modules: state_dict names, layer math, autocast and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import RecordedOps, literal_per_sample, relative_error
from refinestyle_kernels import EqualLinear, LayerTokens, StyledConv, ToRGB, upfirdn2d

ROSINALITY_STYLED_CONV_UP = {
    "conv.weight": (1, 6, 4, 3, 3),
    "conv.modulation.weight": (4, 8),
    "conv.modulation.bias": (4,),
    "conv.blur.kernel": (4, 4),
    "noise.weight": (1,),
    "activate.bias": (6,),
}
ROSINALITY_TO_RGB = {
    "bias": (1, 3, 1, 1),
    "upsample.kernel": (4, 4),
    "conv.weight": (1, 3, 6, 1, 1),
    "conv.modulation.weight": (6, 8),
    "conv.modulation.bias": (6,),
}


def test_state_dict_names_and_shapes_are_rosinalitys():
    conv = StyledConv(4, 6, 3, 8, upsample=True)
    rgb = ToRGB(6, 8)
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == ROSINALITY_STYLED_CONV_UP
    assert {k: tuple(v.shape) for k, v in rgb.state_dict().items()} == ROSINALITY_TO_RGB
    # the blur buffers hold rosinality's filters (sum 4 for both)
    assert torch.allclose(conv.state_dict()["conv.blur.kernel"].sum(), torch.tensor(4.0))
    assert torch.allclose(rgb.state_dict()["upsample.kernel"].sum(), torch.tensor(4.0))


def test_state_dict_round_trip_strict():
    source = StyledConv(4, 6, 3, 8, upsample=True)
    with torch.no_grad():
        source.noise.weight.fill_(0.3)
        source.activate.bias.normal_()
    target = StyledConv(4, 6, 3, 8, upsample=True)
    target.load_state_dict(source.state_dict(), strict=True)
    x, w, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 8), torch.randn(2, 1, 6, 6)
    assert torch.equal(target(x, w, noise), source(x, w, noise))
    with pytest.raises(RuntimeError):
        StyledConv(4, 5, 3, 8, upsample=True).load_state_dict(source.state_dict(), strict=True)


def test_equal_linear_matches_rosinality_math():
    torch.manual_seed(0)
    layer = EqualLinear(5, 3, bias_init=1, lr_mul=0.01, activation="fused_lrelu")
    x = torch.randn(4, 5)
    expected = F.leaky_relu(x @ (layer.weight * 0.01 / math.sqrt(5)).t() + layer.bias * 0.01, 0.2) * math.sqrt(2)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(4, 6))


@pytest.mark.parametrize("bias", [True, False])
def test_style_affine_is_one_matmul_with_rosinalitys_math(bias):
    """The affine of every modulated conv (no activation) scales the weight and the bias
    inside one addmm instead of in two extra launches; the gradients are the formula's."""
    torch.manual_seed(0)
    layer = EqualLinear(5, 3, bias=bias, bias_init=1, lr_mul=0.5).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with RecordedOps() as ops:
        y = layer(x)
    assert [name.split(".")[0] for name in ops.names if name.split(".")[0] not in ("t", "transpose")] == (
        ["addmm"] if bias else ["mm", "mul"]
    ), ops.names
    expected = x @ (layer.weight * 0.5 / math.sqrt(5)).t() + (layer.bias * 0.5 if bias else 0)
    assert torch.allclose(y, expected, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-12)


def test_frozen_style_affine_backward_is_one_matmul():
    """Frozen (RefineStyle's generator): weight * scale is made once and kept, so the forward is
    one addmm and the backward to the input one mm (no scaling launch); the values are
    rosinality's F.linear(x, weight * scale, bias * lr_mul). A changed weight is picked up."""
    torch.manual_seed(2)
    layer = EqualLinear(5, 3, bias_init=1, lr_mul=0.5).double().requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    layer(x)  # makes and keeps the scaled weight
    grad_y = torch.randn(4, 3, dtype=torch.float64)
    with RecordedOps() as forward:
        y = layer(x)
    with RecordedOps() as backward:
        (grad,) = torch.autograd.grad(y, [x], grad_y)
    assert [name for name in forward.names if name != "t"] == ["addmm"], forward.names
    assert [name for name in backward.names if name not in ("t", "transpose")] == ["mm"], backward.names
    expected = F.linear(x, layer.weight * layer.scale, layer.bias * layer.lr_mul)
    assert torch.allclose(y, expected, atol=1e-12)
    assert torch.allclose(grad, torch.autograd.grad(expected, [x], grad_y)[0], atol=1e-12)
    with torch.no_grad():
        layer.weight.mul_(2)  # a new version of the frozen weight: the kept scaled copy is stale
    assert torch.allclose(layer(x), F.linear(x, layer.weight * layer.scale, layer.bias * layer.lr_mul), atol=1e-12)


@pytest.mark.parametrize("upsample", [False, True])
def test_styled_conv_is_rosinalitys_layer(upsample):
    torch.manual_seed(1)
    layer = StyledConv(4, 5, 3, 8, upsample=upsample, backend="reference").double()
    tokens = LayerTokens(4, 5, num_tokens=3, scale_init=0.2).double()
    with torch.no_grad():
        layer.noise.weight.fill_(0.7)
        layer.activate.bias.normal_()
    size = 6 if upsample else 3
    x, w, noise = torch.randn(2, 4, 3, 3).double(), torch.randn(2, 8).double(), torch.randn(2, 1, size, size).double()
    p, q = tokens()
    for backend in ("reference", "torch"):
        layer.backend = backend
        out = layer(x, w, noise, p, q)
        styles = layer.conv.modulation(w)
        ref = literal_per_sample(
            x, layer.conv.weight[0], styles, p, q, upsample=upsample, noise=noise,
            noise_strength=layer.noise.weight, bias=layer.activate.bias, activate=True,
        )
        assert relative_error(out, ref) < 1e-12, backend


def test_to_rgb_adds_the_upsampled_skip():
    torch.manual_seed(2)
    rgb = ToRGB(4, 8).double()
    with torch.no_grad():
        rgb.bias.normal_()
    x, w, skip = torch.randn(2, 4, 6, 6).double(), torch.randn(2, 8).double(), torch.randn(2, 3, 3, 3).double()
    styles = rgb.conv.modulation(w)
    expected = literal_per_sample(x, rgb.conv.weight[0], styles, demodulate=False) + rgb.bias
    expected = expected + upfirdn2d(skip, rgb.upsample.kernel, up=2, pad=(2, 1))
    assert relative_error(rgb(x, w, skip), expected) < 1e-12


def test_layer_tokens_shapes_and_scaling():
    tokens = LayerTokens(in_channel=6, out_channel=4, num_tokens=5, scale_init=0.01)
    p, q = tokens()
    assert p.shape == (5, 4) and q.shape == (5, 6)
    assert torch.allclose(p, 0.01 * tokens.P) and torch.allclose(q, 0.01 * tokens.Q)
    assert sum(t.numel() for t in tokens.parameters()) == 5 * (4 + 6) + 2 * 5
    with pytest.raises(ValueError, match="num_tokens"):
        LayerTokens(6, 4, 0)


def test_autocast_runs_in_bfloat16():
    torch.manual_seed(3)
    layer = StyledConv(4, 5, 3, 8)
    x, w, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 8), torch.randn(2, 1, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, w, noise)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, layer(x, w, noise)) < 3e-2


class TinyRefinedBlock(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.conv = StyledConv(4, 6, 3, 8, upsample=True, backend=backend)
        self.rgb = ToRGB(6, 8, upsample=False, backend=backend)
        self.tokens = LayerTokens(4, 6, num_tokens=3, scale_init=0.1)

    def forward(self, x, w, noise):
        p, q = self.tokens()
        return self.rgb(self.conv(x, w, noise, p, q), w)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_traces_without_graph_breaks(compiler, grad):
    """Also without a graph to record, where the torch backend computes in place."""
    torch.manual_seed(4)
    torch._dynamo.reset()
    model = TinyRefinedBlock("torch")
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    x, w, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 8), torch.randn(2, 1, 6, 6)
    with torch.set_grad_enabled(grad):
        out = compiled(x, w, noise)
        assert relative_error(out, model(x, w, noise)) < 1e-5
    if grad:
        out.square().mean().backward()
        assert model.tokens.P.grad is not None and model.tokens.P.grad.abs().sum() > 0
