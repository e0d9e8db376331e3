"""NVlabs-layout drop-ins: NVlabsSynthesisLayer / NVlabsToRGBLayer and swap_nvlabs_modules.

The layers below (test_checkpoints_nvlabs' look-alikes, given NVlabs' full forward
signatures: noise_mode, gain) are written from NVlabs' documented math, with NVlabs' class
names, constructor attributes and parameter/buffer names:
a per-sample kernel weight * styles (unscaled), demodulated with eps 1e-8, a grouped conv
(up=2: transposed conv with the unflipped weight, then the [1, 3, 3, 1] FIR with padding 1 and
gain 4), + noise * noise_strength, lrelu(0.2)(x + bias) * sqrt(2) * gain, clamp(conv_clamp * gain).
Swapped layers must compute the same in float64. tests/test_checkpoints_nvlabs_upstream.py
repeats the comparison on NVlabs' own networks when their code is at hand.
"""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_checkpoints_nvlabs as lookalike  # NVlabs' names and gains

from refinestyle_kernels import NVlabsSynthesisLayer, NVlabsToRGBLayer, styled_conv2d, swap_nvlabs_modules
from triton_interpreter_bf16 import triton_test_device



def lrelu(x, gain):
    return F.leaky_relu(x, 0.2) * gain


class SynthesisLayer(lookalike.SynthesisLayer):  # NVlabs' name: what swap_nvlabs_modules looks for
    """test_checkpoints_nvlabs' look-alike with NVlabs' full forward signature."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, up=1, conv_clamp=None, activation="lrelu"):
        super().__init__(in_channels, out_channels, w_dim, resolution, up=up, conv_clamp=conv_clamp)
        self.activation = activation

    def forward(self, x, w, noise_mode="random", fused_modconv=True, gain=1):
        noise = None
        if noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = self.demodulated_conv(x, w)
        if noise is not None:
            x = x + noise
        x = lrelu(x + self.bias[None, :, None, None], self.act_gain * gain)
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp * gain, self.conv_clamp * gain)
        return x


class ToRGBLayer(lookalike.ToRGBLayer):
    def forward(self, x, w, fused_modconv=True):
        return super().forward(x, w)


class Block(nn.Module):
    def __init__(self, channels=6, w_dim=5, resolution=8, conv_clamp=None):
        super().__init__()
        self.conv0 = SynthesisLayer(channels, channels + 1, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(channels + 1, channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(channels, w_dim, conv_clamp=conv_clamp)

    def forward(self, x, w, **layer_kwargs):
        x = self.conv0(x, w, **layer_kwargs)
        x = self.conv1(x, w, **layer_kwargs)
        return x, self.torgb(x, w)


def _swapped_copy(module, backend="torch"):
    swapped = copy.deepcopy(module)
    names = swap_nvlabs_modules(swapped, backend=backend)
    return swapped, names


@pytest.mark.parametrize("conv_clamp", [None, 0.4])
@pytest.mark.parametrize("gain", [1, math.sqrt(0.5)])
@pytest.mark.parametrize("noise_mode", ["const", "none", "random"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_swapped_block_computes_nvlabs_math_in_float64(conv_clamp, gain, noise_mode, backend):
    torch.manual_seed(0)
    block = Block(conv_clamp=conv_clamp).double()
    swapped, names = _swapped_copy(block, backend)
    assert names == ["conv0", "conv1", "torgb"]
    assert isinstance(swapped.conv0, NVlabsSynthesisLayer) and isinstance(swapped.torgb, NVlabsToRGBLayer)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)  # the same random noise draws on both sides
    expected = block(x, w, noise_mode=noise_mode, gain=gain)
    torch.manual_seed(7)
    got = swapped(x, w, noise_mode=noise_mode, gain=gain)
    # NVlabs' random noise is float32 * a 0-d strength, which stays float32 even in a float64
    # network; the op scales it in float64
    tolerance = 1e-6 if noise_mode == "random" else 1e-10
    for ours, theirs in zip(got, expected):
        assert torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance), (ours - theirs).abs().max()
    if conv_clamp is None:  # clamping makes most gradients vanish: compare the unclamped ones
        probe = [torch.randn_like(t) for t in expected]
        wanted = ["conv0.weight", "conv1.bias", "torgb.affine.weight"] + (["conv1.noise_strength"] if noise_mode != "none" else [])
        grads = torch.autograd.grad(expected, [x, w, *(block.get_parameter(n) for n in wanted)], probe)
        swapped_grads = torch.autograd.grad(got, [x, w, *(swapped.get_parameter(n) for n in wanted)], probe)
        for ours, theirs in zip(swapped_grads, grads):
            assert torch.allclose(ours, theirs, rtol=max(tolerance, 1e-9), atol=max(tolerance, 1e-10))


def test_swap_keeps_state_flags_and_affine():
    torch.manual_seed(1)
    block = Block()
    block.conv1.weight.requires_grad_(False)
    block.eval()
    affine = block.conv0.affine
    before = {key: value.clone() for key, value in block.state_dict().items()}
    objects = dict(block.named_parameters())
    swapped = swap_nvlabs_modules(block)
    assert swapped == ["conv0", "conv1", "torgb"]
    after = block.state_dict()
    assert list(after) == list(before)  # NVlabs' keys, in NVlabs' order
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert block.conv0.affine is affine  # NVlabs' own FullyConnectedLayer is kept
    # the Parameter objects themselves: an optimizer built before the swap still steps them
    assert dict(block.named_parameters()).keys() == objects.keys()
    assert all(block.get_parameter(key) is parameter for key, parameter in objects.items())
    assert not block.conv1.weight.requires_grad and block.conv0.weight.requires_grad
    assert not block.training and not block.conv0.training
    assert swap_nvlabs_modules(block) == []  # already ours


def test_tokens_refine_the_kernels_as_the_op_does():
    torch.manual_seed(2)
    layer = NVlabsSynthesisLayer(6, 7, 5, 8, up=1, backend="reference").double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    w = torch.randn(2, 5, dtype=torch.float64)
    p, q = torch.randn(4, 7, dtype=torch.float64) * 0.1, torch.randn(4, 6, dtype=torch.float64) * 0.1
    scale = 1 / math.sqrt(6 * 9)  # rosinality's: tokens mean what they mean in our Generator
    expected = styled_conv2d(
        x, layer.weight, layer.affine(w), p, q, noise=layer.noise_const[None, None], noise_strength=layer.noise_strength,
        bias=layer.bias, activate=True, scale=scale, eps=1e-8 * scale**2, backend="reference",
    )  # fmt: skip
    assert torch.allclose(layer(x, w, "const", p=p, q=q), expected, rtol=1e-12, atol=1e-12)
    unrefined = layer(x, w, "const")
    layer.tokens = (p, q)  # for NVlabs' SynthesisBlock, which passes no tokens
    assert torch.allclose(layer(x, w, "const"), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unrefined, expected)
    # tokens that a graph made (trainable LayerTokens-style scaling) still let NVlabs' training
    # loop copy the network (G_ema = deepcopy(G)); the copy holds their values
    scaling = torch.ones(1, dtype=torch.float64, requires_grad=True)
    layer.tokens = (p * scaling, q * scaling)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert all(token.grad_fn is None for token in copied.tokens)
        assert torch.allclose(copied(x, w, "const"), expected, rtol=1e-12, atol=1e-12)
    assert layer.tokens[0].grad_fn is not None  # the original keeps its graph


def test_bad_layers_and_inputs_are_named():
    torch.manual_seed(3)
    relu = nn.Module()
    relu.layer = SynthesisLayer(4, 4, 5, 8, activation="relu")
    with pytest.raises(ValueError, match="layer: activation"):
        swap_nvlabs_modules(relu)
    other_filter = nn.Module()
    other_filter.layer = SynthesisLayer(4, 4, 5, 8)
    other_filter.layer.resample_filter.copy_(torch.full((4, 4), 1 / 16))
    with pytest.raises(ValueError, match="resample_filter"):
        swap_nvlabs_modules(other_filter)
    odd = nn.Module()
    odd.layer = SynthesisLayer(4, 4, 5, 8)
    del odd.layer.affine
    with pytest.raises(TypeError, match="layer: a SynthesisLayer without NVlabs'"):
        swap_nvlabs_modules(odd)
    stylegan3 = nn.Module()  # StyleGAN3's SynthesisLayer has NVlabs' weight and affine, no resolution
    stylegan3.layer = SynthesisLayer(4, 4, 5, 8)
    del stylegan3.layer.resolution
    with pytest.raises(TypeError, match="layer: a SynthesisLayer without `resolution`"):
        swap_nvlabs_modules(stylegan3)
    layer = NVlabsSynthesisLayer(4, 4, 5, 8, up=2)
    with pytest.raises(ValueError, match=r"x: expected \[B, 4, 4, 4\]"):
        layer(torch.randn(1, 4, 8, 8), torch.randn(1, 5))
    with pytest.raises(ValueError, match="w: expected"):
        layer(torch.randn(1, 4, 4, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="noise_mode"):
        layer(torch.randn(1, 4, 4, 4), torch.randn(1, 5), noise_mode="fixed")
    with pytest.raises(ValueError, match="gain"):
        layer(torch.randn(1, 4, 4, 4), torch.randn(1, 5), gain=0)
    for kwargs, name in ((dict(up=4), "up"), (dict(kernel_size=1), "kernel_size"),
                         (dict(resample_filter=[1, 2, 1]), "resample_filter"), (dict(conv_clamp=-1), "clamp")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            NVlabsSynthesisLayer(4, 4, 5, 8, **kwargs)
    with pytest.raises(ValueError, match="kernel_size"):
        NVlabsToRGBLayer(4, 3, 5, kernel_size=3)


def test_autocast_and_fp16_activations_run_in_the_activations_dtype():
    torch.manual_seed(4)
    layer = NVlabsSynthesisLayer(4, 4, 5, 8)
    to_rgb = NVlabsToRGBLayer(4, 3, 5)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, w, "const")
        rgb = to_rgb(out, w)
    assert out.dtype == rgb.dtype == torch.bfloat16
    reference = layer(x, w, "const")
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)
    # NVlabs' fp16 blocks cast the activations and keep float32 parameters
    assert layer(x.to(torch.bfloat16), w, "const").dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton backend needs CUDA or the Triton interpreter")  # fmt: skip
def test_swapped_block_on_the_triton_backend():
    torch.manual_seed(5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = Block(conv_clamp=0.6).to(device)
    swapped, _ = _swapped_copy(block, "triton")
    x, w = torch.randn(2, 6, 4, 4, device=device), torch.randn(2, 5, device=device)
    with torch.no_grad():
        expected = block(x, w, noise_mode="const")
        got = swapped(x, w, noise_mode="const")
    for ours, theirs in zip(got, expected):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_swapped_fp16_block_on_the_triton_backend(dtype):
    """NVlabs' fp16 blocks (num_fp16_res): half-precision activations into layers whose
    parameters stay float32, with conv_clamp. Through the Triton kernels the swapped block must
    land as close to the float64 truth as the torch backend does in the same dtype. Compiled
    on a GPU, interpreted on a CPU."""
    device = triton_test_device(dtype)
    torch.manual_seed(6)
    block = Block(channels=8, conv_clamp=0.6).double()
    x, w = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    x = x.to(dtype).double()  # the truth sees the activations the half-precision block gets
    with torch.no_grad():
        truth = block(x, w, noise_mode="const")
        errors = {}
        for backend in ("triton", "torch"):
            swapped, _ = _swapped_copy(block, backend)
            swapped.float().to(device)
            got = swapped(x.to(device, dtype), w.float().to(device), noise_mode="const")
            assert all(t.dtype == dtype for t in got)
            errors[backend] = [((g.double().cpu() - t).norm() / t.norm()).item() for g, t in zip(got, truth)]
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    for fused, plain in zip(errors["triton"], errors["torch"]):
        assert fused <= 2 * plain + 2 * unit, errors
