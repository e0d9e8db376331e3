"""The Triton backend of the fused refined modulated convolution, against the float64 reference.

On a machine without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1,
set by conftest.py) on CPU tensors in float32, and in float16/bfloat16 (bfloat16 with the
interpreter's tl.dot fixed by tests/triton_interpreter_bf16.py). With a GPU the same cases
run compiled on CUDA, in float32 (exact fp32 dots, and TF32) and in float16/bfloat16; the
interpreter-only cases are then skipped (the interpreter is switched on only when there is
no GPU).

Every case draws fresh random inputs and a random output gradient, runs forward and
backward, and compares the output and every gradient with the `reference` backend in
float64 by ||a - ref|| / ||ref||. Buffers the Triton path allocates are poisoned with
NaN, so an element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import refinestyle_kernels
from refinestyle_kernels import modulated_conv2d, styled_conv2d
from refinestyle_kernels.ops import modulated_conv2d as op_module
from kernel_cases import bound_between_values_near_the_median, random_routes, use_routes
from triton_interpreter_bf16 import triton_test_device

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED,
    reason="the interpreter cases need TRITON_INTERPRET=1, which conftest.py sets only on machines without a GPU",
)
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA GPU here: the compiled Triton kernels are tested only on a GPU"
)

# the interpreter computes tl.dot in numpy at fp32 or better
TOLERANCE = {"interpreted": 2e-5, "ieee": 1e-4, "tf32": 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Layer:
    batch: int = 3
    in_channels: int = 5
    out_channels: int = 6
    height: int = 5
    width: int = 7
    kernel: int = 3
    upsample: bool = False
    demodulate: bool = True
    tokens: str | None = "per_sample"  # None, "shared" or "per_sample"
    num_tokens: int = 7
    noise: str | None = "per_sample"  # None, "shared" ([1, 1, H', W']) or "per_sample"
    bias: bool = True
    activate: bool = True
    clamp: float | None = None
    channels_last: bool = False
    train_weight: bool = True

    def __str__(self):
        return (
            f"B{self.batch}-{self.in_channels}to{self.out_channels}-{self.height}x{self.width}-k{self.kernel}"
            f"{'-up' if self.upsample else ''}{'' if self.demodulate else '-nodemod'}"
            f"-{self.tokens or 'notokens'}{self.num_tokens if self.tokens else ''}"
            f"-noise_{self.noise}{'-bias' if self.bias else ''}{'-act' if self.activate else ''}"
            f"{f'-clamp{self.clamp}' if self.clamp else ''}{'-NHWC' if self.channels_last else ''}"
            f"{'' if self.train_weight else '-frozenW'}"
        )


# Every layer type, with and without the fused epilogue, shared/per-sample/no tokens, L in
# {1, 7, 32, 256}, odd sizes, channel counts past the block sizes, NCHW and channels_last.
LAYERS = [
    Layer(),  # 3x3 plain, the whole StyledConv epilogue
    Layer(upsample=True),  # 3x3 upsampling, whole epilogue
    Layer(kernel=1, demodulate=False, out_channels=3, tokens=None, noise=None, activate=False),  # toRGB
    Layer(kernel=1, tokens="shared", num_tokens=1, noise="shared", clamp=0.7),  # 1x1 refined
    Layer(tokens="shared", num_tokens=32, noise=None, bias=False, activate=False, channels_last=True),  # plain op
    Layer(upsample=True, tokens="shared", num_tokens=1, noise="shared", clamp=0.5, channels_last=True),
    Layer(upsample=True, tokens=None, demodulate=False, noise=None, bias=False, activate=False, train_weight=False),
    Layer(tokens=None, clamp=0.4, train_weight=False),
    Layer(batch=2, tokens="shared", noise="shared", bias=False, activate=False, clamp=0.6),  # clamp, no activation
    Layer(batch=2, height=2, width=3, tokens="shared", num_tokens=256, noise=None),  # L = 256
    Layer(batch=1, height=2, width=2, upsample=True, num_tokens=256, noise=None, bias=False),  # L = 256, up
    # 64 < L < channels: the low-rank loop over several L blocks (L > channels is refactored)
    Layer(batch=1, in_channels=96, out_channels=100, height=5, width=4, num_tokens=80, noise=None),
    # past the interpreter's 64-wide N and K blocks and its M tiles (99 and 153 pixels)
    Layer(batch=2, in_channels=70, out_channels=66, height=9, width=11, num_tokens=32, train_weight=False),
    Layer(batch=1, in_channels=17, out_channels=19, height=17, width=9, num_tokens=7, channels_last=True),
    Layer(batch=1, in_channels=33, out_channels=70, height=6, width=5, upsample=True, tokens="shared", num_tokens=7),
    # 64 < L <= channels shared: d from the tokens' residual p^T q
    Layer(batch=2, in_channels=70, out_channels=72, height=3, width=4, tokens="shared", num_tokens=66),
    # the blur's row tiles: two column blocks and several row chunks forward, more backward
    Layer(batch=1, in_channels=8, out_channels=40, height=5, width=16, upsample=True, noise="shared", clamp=0.8),
]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return ((value - reference).norm() / reference.norm()).item()


def make_inputs(layer: Layer, seed: int) -> dict:
    """Fresh random float64 inputs on the CPU, as styled_conv2d's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    out_h, out_w = (2 * layer.height, 2 * layer.width) if layer.upsample else (layer.height, layer.width)
    inputs = dict(
        x=rand(layer.batch, layer.in_channels, layer.height, layer.width),
        weight=rand(layer.out_channels, layer.in_channels, layer.kernel, layer.kernel),
        styles=rand(layer.batch, layer.in_channels) * 0.5 + 1.0,
        p=None,
        q=None,
        noise=None,
        noise_strength=None,
        bias=rand(layer.out_channels) * 0.3 if layer.bias else None,
    )
    if layer.tokens:
        # residual comparable to the modulated kernel, so the low-rank path matters
        token_scale = (layer.num_tokens * layer.in_channels) ** -0.25
        lead = () if layer.tokens == "shared" else (layer.batch,)
        inputs["p"] = rand(*lead, layer.num_tokens, layer.out_channels, scale=token_scale)
        inputs["q"] = rand(*lead, layer.num_tokens, layer.in_channels, scale=token_scale)
    if layer.noise:
        inputs["noise"] = rand(layer.batch if layer.noise == "per_sample" else 1, 1, out_h, out_w)
        inputs["noise_strength"] = rand(1) * 0.5
    return inputs


def run_layer(layer: Layer, inputs: dict, backend: str, dtype, device, grad_seed: int):
    """Forward and backward of one layer; returns the output and the gradients by name."""
    leaves = {}
    for name, value in inputs.items():
        if value is None:
            continue
        value = value.to(device=device, dtype=dtype)
        if name == "x" and layer.channels_last:
            value = value.contiguous(memory_format=torch.channels_last)
        if name != "noise" and (name != "weight" or layer.train_weight):
            value.requires_grad_(True)
        leaves[name] = value
    args = {name: leaves.get(name) for name in inputs}
    out = styled_conv2d(
        **args,
        activate=layer.activate,
        clamp=layer.clamp,
        demodulate=layer.demodulate,
        upsample=layer.upsample,
        backend=backend,
    )
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    wanted = [name for name, value in leaves.items() if value.requires_grad]
    grads = torch.autograd.grad(out, [leaves[name] for name in wanted], grad_out.to(device=device, dtype=dtype))
    return out, dict(zip(wanted, grads))


def check_layer(layer: Layer, dtype, device, tolerance: float, seed: int = 0):
    # the reference sees the inputs rounded to `dtype`: the comparison measures the kernels
    inputs = {k: v.to(dtype).double() if v is not None else None for k, v in make_inputs(layer, seed).items()}
    expected, expected_grads = run_layer(layer, inputs, "reference", torch.float64, "cpu", grad_seed=seed + 1)
    if layer.clamp:  # the clamp (and its zero gradient) must be exercised on both sides
        clamped = expected.abs() >= layer.clamp
        assert clamped.any() and not clamped.all(), "the case's clamp never or always binds"
    out, grads = run_layer(layer, inputs, "triton", dtype, device, grad_seed=seed + 1)
    assert out.shape == expected.shape and out.dtype == dtype and out.device.type == device
    errors = {"out": relative_error(out, expected)}
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        assert grad.shape == expected_grads[name].shape, name
        errors[name] = relative_error(grad, expected_grads[name])
    bounds = dict.fromkeys(errors, tolerance)
    if dtype in (torch.float16, torch.bfloat16):
        # or within twice the reference backend's own error in this dtype (H100: 3e-2 to 4e-2 for
        # bf16 gradients of the larger layers, about as much as every backend's)
        rounded, rounded_grads = run_layer(layer, inputs, "reference", dtype, device, grad_seed=seed + 1)
        own = {"out": relative_error(rounded, expected)}
        own.update({name: relative_error(grad, expected_grads[name]) for name, grad in rounded_grads.items()})
        bounds = {name: max(tolerance, 2 * own[name]) for name in errors}
    bad = {name: error for name, error in errors.items() if not error <= bounds[name]}  # NaN fails too
    assert not bad, f"{layer}: relative errors above {bounds}: {bad} (all: {errors})"
    return errors


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    monkeypatch.setattr(op_module, "POISON_BUFFERS", True)


@needs_interpreter
@pytest.mark.parametrize("layer", LAYERS, ids=str)
def test_interpreted_forward_and_backward_match_reference(layer):
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"])


def random_layer(seed: int) -> Layer:
    """A layer drawn at random: channel counts and sizes from 1 up past the interpreter's 64-wide
    blocks, every epilogue option, L from 1 to past the fused projection's 64 and past the
    channel counts, in any combination; the clamp is set by the test, where it binds. At least
    two input channels: with one, demodulation cancels the style and the weight's scale, their
    gradients are 0 and a relative error compares rounding noise."""
    rng = random.Random(seed)
    kernel = rng.choice([1, 3, 3])
    return Layer(
        batch=rng.randint(1, 3), in_channels=rng.randint(2, 80), out_channels=rng.randint(1, 80),
        height=rng.randint(1, 12), width=rng.randint(1, 12), kernel=kernel,
        upsample=kernel == 3 and rng.random() < 0.4, demodulate=rng.random() < 0.8,
        tokens=rng.choice([None, "shared", "per_sample"]), num_tokens=rng.choice([1, 2, 5, 16, 33, 64, 65, 100]),
        noise=rng.choice([None, "shared", "per_sample"]), bias=rng.random() < 0.7, activate=rng.random() < 0.6,
        clamp=1.0 if rng.random() < 0.3 else None, channels_last=rng.random() < 0.5, train_weight=rng.random() < 0.5,
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("seed", range(12))
def test_interpreted_random_layers_match_reference(seed, monkeypatch):
    """Combinations no hand-written case names: each seed draws a layer (`random_layer`) and the
    routes it takes (`kernel_cases.random_routes`: fused or separate projection and token
    products, loads, reduction and blur splits, demodulation). A clamp,
    when drawn, is set between two |output| values near the median of the unclamped reference, so
    that it binds on about half of the outputs and on none exactly at the bound (where the
    gradient depends on the rounding)."""
    layer = random_layer(seed)
    if layer.clamp is not None:
        inputs = {k: v.float().double() if v is not None else None for k, v in make_inputs(layer, seed).items()}
        unclamped = dataclasses.replace(layer, clamp=None)
        out, _ = run_layer(unclamped, inputs, "reference", torch.float64, "cpu", grad_seed=seed + 1)
        layer = dataclasses.replace(layer, clamp=bound_between_values_near_the_median(out))
    # compiled fp32's bound: over hundreds of draws, a scalar gradient (noise strength, a style of
    # a two-channel layer) summed with cancellation reached 2.8e-5, above the hand-written cases' 2e-5
    use_routes(monkeypatch, random_routes(seed))
    check_layer(layer, torch.float32, "cpu", TOLERANCE["ieee"], seed=seed)


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(num_tokens=4),  # fewer tokens than channels: no identity factor (see the next test)
        Layer(upsample=True, tokens="shared", num_tokens=4, channels_last=True),
        Layer(kernel=1, num_tokens=1, clamp=0.7, train_weight=False),
        Layer(batch=2, in_channels=70, out_channels=66, height=9, width=11, num_tokens=32),
    ],
    ids=str,
)
def test_interpreted_separate_projection_matches_reference(layer, monkeypatch):
    """The wide-layer path: z = q x as its own GEMM, box-summed inside the conv kernel."""
    projections = []
    monkeypatch.setattr(op_module, "FUSED_PROJECTION_MAX_COUT", 0)
    monkeypatch.setattr(op_module, "_project", lambda *a: projections.append(1) or PROJECT(*a))
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"])
    assert len(projections) >= 1  # the forward took the separate path


PROJECT = op_module._project


@needs_interpreter
@pytest.mark.parametrize("scale_weight", [False, True], ids=["styles-on-A", "styles-on-W"])
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=12, out_channels=10, height=6, width=37, num_tokens=5),
        Layer(batch=1, in_channels=12, out_channels=10, height=5, width=19, upsample=True, tokens="shared"),
    ],
    ids=str,
)
def test_interpreted_two_dimensional_pixel_blocks_and_style_placement(layer, scale_weight, monkeypatch):
    """Grids several pixel blocks wide, partial blocks on both edges, for the forward (styles on
    the A or the W tile), the transposed conv's phases and grad x's per-block reductions."""
    launched = []
    launch = op_module._launch_conv_gemm

    def probe(*args, **kwargs):
        launched.append((kwargs["grid_hw"], args[1] is not None))
        return launch(*args, **kwargs)

    monkeypatch.setattr(op_module, "CONV_SCALE_WEIGHT", scale_weight)
    monkeypatch.setattr(op_module, "_launch_conv_gemm", probe)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=4)
    # every launch's grid is wider than its pixel block, and the forward scaled by the styles
    assert all(grid_w > 16 for (_, grid_w), _ in launched)  # 16: the widest pixel block
    assert any(scaled for _, scaled in launched)


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=12, out_channels=20, height=6, width=37, num_tokens=5),
        Layer(batch=1, in_channels=16, out_channels=12, height=5, width=40, tokens="shared", noise=None),
        Layer(batch=1, in_channels=16, out_channels=4, height=3, width=33, kernel=1, num_tokens=3, clamp=0.5),
        # 16 fp32 channels are a narrow row (64 bytes): the forward's strips are 256 pixels
        Layer(batch=1, in_channels=16, out_channels=8, height=2, width=150, num_tokens=3, noise=None),
    ],
    ids=str,
)
def test_interpreted_tma_loads_match_reference(layer, monkeypatch):
    """The stride-1 launches load their input by TMA where it applies (channels-last rows
    16-byte aligned, a strip within a row): zero fill at the image's edges, strips past the
    row's end, the forward (styles on W) and grad x (with its per-block reductions)."""
    tma_launches = []
    descriptor = op_module._tma_descriptor

    def probe(a, mode, grid_w, reduce_pixels):
        made = descriptor(a, mode, grid_w, reduce_pixels)
        tma_launches.append((mode, made is not None, made.block_shape[2] if made is not None else None))
        return made

    monkeypatch.setattr(op_module, "_tma_descriptor", probe)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=6)
    stride_one = [used for mode, used, _ in tma_launches if mode == 0]
    assert stride_one and all(stride_one), tma_launches  # every stride-1 launch took TMA
    assert not any(used for mode, used, _ in tma_launches if mode != 0)  # never the stride-2 ones
    if layer.width > 128:  # the forward's strip spans 256 pixels, past the row's end
        assert (0, True, 256) in tma_launches, tma_launches


def test_tma_applies_only_where_its_constraints_hold(monkeypatch):
    monkeypatch.setattr(op_module, "_interpreted", lambda: True)
    rows = torch.zeros(2, 6, 40, 16)
    assert op_module._tma_descriptor(rows, 0, 40, None).block_shape == [1, 1, 64, 16]
    wide = torch.zeros(1, 4, 256, 64)  # a row is at most 128 bytes of channels: 32 fp32, 64 bf16
    assert op_module._tma_descriptor(wide, 0, 256, None).block_shape == [1, 1, 128, 32]
    assert op_module._tma_descriptor(wide.bfloat16(), 0, 256, None).block_shape == [1, 1, 128, 64]
    # rows of at most 64 bytes (16 fp32 or 32 bf16 channels): strips of up to 256 pixels
    narrow = torch.zeros(1, 2, 512, 16)
    assert op_module._tma_descriptor(narrow, 0, 512, None).block_shape == [1, 1, 256, 16]
    assert op_module._tma_descriptor(narrow[:, :, :200].contiguous(), 0, 200, None).block_shape == [1, 1, 256, 16]
    assert op_module._tma_descriptor(narrow[:, :, :100].contiguous(), 0, 100, None).block_shape == [1, 1, 128, 16]
    assert op_module._tma_descriptor(torch.zeros(1, 2, 512, 32).bfloat16(), 0, 512, None).block_shape == [1, 1, 256, 32]
    assert op_module._tma_descriptor(torch.zeros(1, 2, 512, 32), 0, 512, None).block_shape == [1, 1, 128, 32]
    assert op_module._tma_descriptor(rows, 0, 40, 6 * 40).block_shape == [1, 1, 64, 16]  # reducing: its M tile
    assert op_module._tma_descriptor(rows, 1, 40, None) is None  # stride 2: no strips
    assert op_module._tma_descriptor(torch.zeros(2, 6, 40, 10), 0, 40, None) is None  # 40-byte rows
    assert op_module._tma_descriptor(rows[:, :, :20], 0, 20, None) is None  # not contiguous
    assert op_module._tma_descriptor(torch.zeros(2, 6, 8, 16), 0, 8, None) is None  # strips under 16 pixels
    monkeypatch.setattr(op_module, "CONV_TMA", False)
    assert op_module._tma_descriptor(rows, 0, 40, None) is None
    monkeypatch.setattr(op_module, "_interpreted", lambda: False)
    monkeypatch.setattr(op_module, "CONV_TMA", True)
    assert op_module._tma_descriptor(rows, 0, 40, None) is None  # a CPU tensor outside the interpreter


def test_pixel_blocks_are_about_square_and_cover_the_grid():
    assert [op_module._tile_width(m, 1024) for m in (16, 32, 64, 128, 256)] == [4, 8, 8, 16, 16]
    assert op_module._tile_width(128, 5) == 8 and op_module._tile_width(16, 1) == 1
    for grid_h, grid_w, block_m in [(5, 37, 128), (1024, 1024, 64), (3, 3, 16), (513, 513, 128)]:
        tile_w = op_module._tile_width(block_m, grid_w)
        tiles = op_module._pixel_tiles(grid_h, grid_w, block_m)
        assert tiles * block_m >= grid_h * grid_w  # every pixel has a block
        assert tiles == math.ceil(grid_h / (block_m // tile_w)) * math.ceil(grid_w / tile_w)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("in_channels,out_channels", [(6, 9), (9, 6)])
def test_more_tokens_than_channels_are_refactored_to_the_same_residual(shared, in_channels, out_channels):
    gen = torch.Generator().manual_seed(3)
    lead = () if shared else (2,)
    p = torch.randn(*lead, 20, out_channels, generator=gen, dtype=torch.float64)
    q = torch.randn(*lead, 20, in_channels, generator=gen, dtype=torch.float64)
    p_new, q_new = op_module._reduced_rank_tokens(p, q)
    assert p_new.shape[-2] == q_new.shape[-2] == min(in_channels, out_channels)
    assert p_new.shape[:-2] == q_new.shape[:-2] == lead
    torch.testing.assert_close(p_new.mT @ q_new, p.mT @ q)


@needs_interpreter
def test_wide_token_sets_reach_the_kernels_refactored(monkeypatch):
    """L = 256 on a 12-channel layer: the kernels see 12 tokens, and the result is unchanged."""
    seen = []
    launch = op_module._launch_conv_gemm
    monkeypatch.setattr(op_module, "_launch_conv_gemm", lambda *a, **k: seen.append(a[4].shape[1]) or launch(*a, **k))
    check_layer(Layer(batch=2, in_channels=12, out_channels=16, height=4, width=3, num_tokens=256), torch.float32,
                "cpu", TOLERANCE["interpreted"])
    assert seen and set(seen) == {12}


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=6, out_channels=9, height=4, width=5, tokens="shared", num_tokens=20),  # q = I
        Layer(batch=2, in_channels=9, out_channels=6, height=4, width=5, num_tokens=20),  # p = I, per sample
        Layer(batch=1, in_channels=6, out_channels=9, height=3, width=4, upsample=True, tokens="shared", num_tokens=20),
        Layer(batch=1, in_channels=9, out_channels=6, height=3, width=4, upsample=True, num_tokens=20),
    ],
    ids=str,
)
def test_identity_token_factor_is_not_projected(layer, monkeypatch):
    """More tokens than channels on the separate route (as at 128 channels with L = 256): one
    refactored factor is the identity, so z = x and gz = g are read as they are, without a
    projection GEMM, with the reference's results."""
    projections, reductions = [], []
    monkeypatch.setattr(op_module, "FUSED_PROJECTION_MAX_COUT", 0)
    monkeypatch.setattr(op_module, "_project", lambda *a: projections.append(a[1].shape) or PROJECT(*a))
    reduce = op_module._sum_over_pixels
    monkeypatch.setattr(op_module, "_sum_over_pixels", lambda a, b, **k: reductions.append((a, b)) or reduce(a, b, **k))
    recognised = []
    is_identity = op_module._is_identity
    monkeypatch.setattr(op_module, "_is_identity", lambda t: recognised.append(is_identity(t)) or recognised[-1])
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"])
    identity_q = layer.in_channels <= layer.out_channels
    if identity_q:  # z = q x is never formed: grad p reduces x itself
        assert projections == []
    else:  # z = q x is projected once (p = I takes no gradient), and gz = g p^T is g itself
        assert len(projections) == 1
    assert any(recognised), "the identity factor was not recognised"
    assert reductions and all(a.dtype == b.dtype for a, b in reductions)
    assert op_module._is_identity(op_module._reduced_rank_tokens(torch.randn(20, 9), torch.randn(20, 6))[1])
    assert not op_module._is_identity(torch.eye(6))  # only the refactoring's own factor is recognised


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a CUDA GPU")
@pytest.mark.parametrize(
    "batch,in_channels,out_channels,num_tokens,shared",
    [(2, 5, 6, 7, False), (3, 70, 66, 32, False), (2, 17, 90, 1, False), (1, 9, 12, 64, False),
     (2, 20, 30, 0, False), (3, 70, 20, 13, True), (1, 6, 5, 4, True),
     # wider shared sets go through their residual p^T q: L past 64, and past the channels
     (3, 70, 90, 80, True), (2, 12, 10, 100, True)],
)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_triton_demodulation_matches_the_torch_one(batch, in_channels, out_channels, num_tokens, shared, precision,
                                                   monkeypatch):  # fmt: skip
    """d and its gradients for styles, p and q against `_Demodulation` (fp32 on both sides), at
    the blocks of either precision of the kernels' dots: in the interpreter (which computes
    both alike) or compiled on a GPU, where 3xTF32 is allowed 10x the error of exact fp32."""
    monkeypatch.setattr(op_module, "DEMODULATION_PRECISION", precision)
    device = "cpu" if INTERPRETED else "cuda"
    gen = torch.Generator().manual_seed(batch * in_channels + num_tokens)
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=gen).to(device)
    styles = (torch.randn(batch, in_channels, generator=gen) * 0.5 + 1).to(device).requires_grad_()
    leaves = [styles]
    p = q = None
    if num_tokens:
        lead = () if shared else (batch,)
        p = (torch.randn(*lead, num_tokens, out_channels, generator=gen) * 0.3).to(device).requires_grad_()
        q = (torch.randn(*lead, num_tokens, in_channels, generator=gen) * 0.3).to(device).requires_grad_()
        leaves += [p, q]
    scale = (in_channels * 9) ** -0.5
    grad = torch.randn(batch, out_channels, generator=gen).to(device)
    expected = op_module._Demodulation.apply(weight, styles, p, q, scale, 1e-8)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    assert op_module._triton_demodulation_applies(weight, styles, p)
    demod = op_module._TritonDemodulation.apply(weight, styles, p, q, scale, 1e-8)
    grads = torch.autograd.grad(demod, leaves, grad)
    loose = 10.0 if precision == "tf32x3" and not INTERPRETED else 1.0
    assert relative_error(demod, expected) < 1e-6 * loose
    for value, reference in zip(grads, expected_grads):
        assert value.dtype == reference.dtype and relative_error(value, reference) < 1e-5 * loose


def test_demodulation_blocks_follow_the_precision_and_refuse_an_unknown_one(monkeypatch):
    # 512 channels, L = 32: 16 output blocks of 32 a sample in the forward (8 of 64 until session 28)
    assert op_module._demodulation_blocks(512, 512, 32, backward=False, precision="ieee") == (32, 16, 32, 4)
    assert op_module._demodulation_blocks(512, 512, 32, backward=True, precision="tf32x3") == (16, 32, 32, 4)
    monkeypatch.setattr(op_module, "DEMODULATION_PRECISION", "tf32")
    with pytest.raises(ValueError, match="DEMODULATION_PRECISION"):
        op_module._demodulation_blocks(512, 512, 32, backward=False)


@needs_interpreter
def test_triton_demodulation_refuses_wide_per_sample_tokens():
    """Past 64 tokens only a shared set has the residual route; a per-sample one is an error,
    never silently flattened into one set."""
    weight, styles = torch.randn(6, 5, 3, 3), torch.randn(2, 5)
    p, q = torch.randn(2, 65, 6), torch.randn(2, 65, 5)
    assert not op_module._triton_demodulation_applies(weight, styles, p)
    with pytest.raises(ValueError, match="p: the Triton demodulation takes at most 64 per-sample tokens"):
        op_module._TritonDemodulation.apply(weight, styles, p, q, 1.0, 1e-8)


@needs_interpreter
def test_triton_demodulation_passes_no_gradient_where_the_energy_is_clamped():
    """sum K^2 >= 0 exactly; where float cancellation makes the closed form negative, d is
    clamped to eps^-1/2 and passes no gradient. Planted here: a negative saved energy."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    styles = torch.randn(2, 3, generator=gen).requires_grad_()
    p = torch.randn(2, 5, 4, generator=gen).requires_grad_()
    q = torch.randn(2, 5, 3, generator=gen).requires_grad_()
    demod = op_module._TritonDemodulation.apply(weight, styles, p, q, 1.0, 1e-8)
    energy = demod.grad_fn.saved_tensors[5]
    energy.data[:, 0] = -1e-3  # (.data: no version bump, the backward reads the planted value)
    for channel, passes in ((0, False), (1, True)):
        grad = torch.zeros(2, 4)
        grad[:, channel] = 1.0
        grads = torch.autograd.grad(demod, [styles, p, q], grad, retain_graph=True)
        assert all((g.abs().max() > 0) == passes for g in grads), channel


@needs_interpreter
def test_triton_backend_uses_the_triton_demodulation_where_it_applies(monkeypatch):
    calls = []
    monkeypatch.setattr(op_module._TritonDemodulation, "apply", lambda *a: calls.append(1) or DEMOD_APPLY(*a))
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(Layer(num_tokens=4), seed=4).items()}
    styled_conv2d(**inputs, backend="triton")  # frozen weight, per-sample tokens
    styled_conv2d(**dict(inputs, p=inputs["p"][0], q=inputs["q"][0]), backend="triton")  # shared
    assert calls == [1, 1]
    narrow = dict(inputs, p=torch.randn(3, 65, 6), q=torch.randn(3, 65, 5))  # refactored to 5 tokens first
    styled_conv2d(**narrow, backend="triton")
    assert calls == [1, 1, 1]
    wide = {k: v.float() if v is not None else None
            for k, v in make_inputs(Layer(in_channels=66, out_channels=70, height=3, width=3, num_tokens=65), 5).items()}
    styled_conv2d(**wide, backend="triton")
    styled_conv2d(**dict(inputs, weight=inputs["weight"].requires_grad_()), backend="triton")
    assert calls == [1, 1, 1]  # 64 < L <= channels per sample and a trained weight take demodulation_coefficients
    styled_conv2d(**dict(wide, p=wide["p"][0], q=wide["q"][0]), backend="triton")
    assert calls == [1, 1, 1, 1]  # the same 65 tokens shared: through their residual


DEMOD_APPLY = op_module._TritonDemodulation.apply


@needs_interpreter
@pytest.mark.parametrize(
    "layer, in_kernel",
    [
        (Layer(num_tokens=4, train_weight=False), (True, True)),  # per sample: s, p, q added as stored
        (Layer(upsample=True, num_tokens=4, train_weight=False), (True, True)),
        (Layer(tokens="shared", num_tokens=3, train_weight=False), (True, False)),  # shared: summed after
        (Layer(num_tokens=7, train_weight=False), (True, False)),  # refactored: q is the identity (no grad)
        (Layer(tokens=None, train_weight=False), (True, False)),
        # 64 < L shared: d through the residual p^T q
        (Layer(batch=2, in_channels=70, out_channels=72, height=3, width=4, tokens="shared", num_tokens=66,
               train_weight=False), (True, False)),  # fmt: skip
    ],
    ids=lambda value: str(value) if isinstance(value, Layer) else None,
)
def test_deferred_demodulation_adds_its_gradients_in_the_kernel(layer, in_kernel, monkeypatch):
    """In eager training the layer's Function runs the demodulation's backward itself, adding
    the gradients of s, p and q through d to the conv's in the kernel where their layout allows
    (per-sample tokens), and no `_TritonDemodulation` autograd node is recorded. The gradients
    are the float64 reference's."""
    applied, accumulated = [], []
    monkeypatch.setattr(op_module._TritonDemodulation, "apply", lambda *a: applied.append(1) or DEMOD_APPLY(*a))
    original = op_module._demodulation_backward

    def probe(saved, options, grad_demod, needs, accumulate=(None, None, None)):
        result = original(saved, options, grad_demod, needs, accumulate)
        accumulated.append(tuple(given is not None and given is got for given, got in zip(accumulate, result)))
        return result

    monkeypatch.setattr(op_module, "_demodulation_backward", probe)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=21)
    assert not applied
    styles_in_place, tokens_in_place = in_kernel
    assert accumulated == [(styles_in_place, tokens_in_place, tokens_in_place)], accumulated



@needs_interpreter
def test_fused_projection_writes_no_projected_input(monkeypatch):
    """Up to FUSED_PROJECTION_MAX_COUT output channels the forward never materialises z."""
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(Layer(num_tokens=32), seed=2).items()}
    monkeypatch.setattr(op_module, "_project", lambda *a: pytest.fail("z was materialised"))
    with torch.no_grad():
        styled_conv2d(**inputs, backend="triton")


@needs_interpreter
def test_interpreted_matches_torch_backend_and_plain_op():
    """modulated_conv2d (no epilogue) through the triton backend equals the torch backend."""
    layer = Layer(tokens="shared", noise=None, bias=False, activate=False)
    inputs = make_inputs(layer, seed=5)
    args = {k: inputs[k].float() if inputs[k] is not None else None for k in ("x", "weight", "styles", "p", "q")}
    fused = modulated_conv2d(**args, backend="triton")
    plain = modulated_conv2d(**args, backend="torch")
    assert relative_error(fused, plain) < TOLERANCE["interpreted"]


@needs_interpreter
def test_triton_backend_runs_the_triton_kernels(monkeypatch):
    """The comparison above would pass for a silent fallback to torch: count the launches."""
    launched = []
    names = ("_conv_gemm_kernel", "_blur_kernel", "_epilogue_backward_kernel", "_epilogue_products_kernel",
             "_pixel_products_kernel", "_sum_partials_kernel")  # fmt: skip
    for name in names:
        kernel = getattr(op_module, name)

        class Probe:  # kernel[grid](...) -> record the name, then launch for real
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(op_module, name, Probe(kernel, name))
    check_layer(Layer(upsample=True), torch.float32, "cpu", TOLERANCE["interpreted"], seed=9)
    # forward: transposed-conv gather, blur + epilogue; backward: epilogue backward + blur^T, and
    # the grad-x conv, which sums the token gradients too (no pixel products)
    assert launched.count("_conv_gemm_kernel") == 2, launched
    assert launched.count("_blur_kernel") == 2, launched
    assert launched.count("_epilogue_backward_kernel") == 0 and "_pixel_products_kernel" not in launched, launched
    launched.clear()
    check_layer(Layer(), torch.float32, "cpu", TOLERANCE["interpreted"], seed=9)
    # forward: the conv with its epilogue; backward: epilogue backward, grad-x conv with the
    # token gradients, whose per-program sums are finished in one launch: grad p and grad s
    # (7 tokens > 5 input channels: q is the refactoring's identity, with no gradient)
    finish = ["_sum_partials_kernel"]
    assert launched == ["_conv_gemm_kernel", "_epilogue_backward_kernel", "_conv_gemm_kernel", *finish], launched
    launched.clear()
    check_layer(Layer(tokens=None), torch.float32, "cpu", TOLERANCE["interpreted"], seed=9)
    assert launched == ["_conv_gemm_kernel", "_epilogue_backward_kernel", "_conv_gemm_kernel", finish[0]], launched
    # switched off (for A/B runs), with the same results: the token products in the epilogue
    # backward, then in their own kernel
    launched.clear()
    monkeypatch.setattr(op_module, "CONV_TOKEN_PRODUCTS_MAX_K", 0)
    check_layer(Layer(), torch.float32, "cpu", TOLERANCE["interpreted"], seed=9)
    assert launched == ["_conv_gemm_kernel", "_epilogue_products_kernel", "_conv_gemm_kernel", finish[0]], launched
    launched.clear()
    monkeypatch.setattr(op_module, "EPILOGUE_PRODUCTS_MAX_CHANNELS", 0)
    check_layer(Layer(), torch.float32, "cpu", TOLERANCE["interpreted"], seed=9)
    expected = ["_conv_gemm_kernel", "_epilogue_backward_kernel", "_pixel_products_kernel", finish[0], "_conv_gemm_kernel",
                finish[0]]  # fmt: skip
    assert launched == expected, launched


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=12, out_channels=20, height=6, width=37, num_tokens=5),
        Layer(batch=2, in_channels=12, out_channels=20, height=6, width=37, tokens="shared", clamp=0.6),
        Layer(batch=1, in_channels=70, out_channels=66, height=9, width=11, num_tokens=9, noise=None),
    ],
    ids=str,
)
def test_interpreted_epilogue_products_over_several_pixel_ranges(layer, monkeypatch):
    """The fused epilogue backward + token products kernel with its pixels split over several
    programs, the last range and block partly outside the image (splits of at least 16
    pixels instead of 1024), and for 70 channels a 128-wide tile of 16-pixel blocks. (Up to 64
    output channels the grad-x conv would sum the token gradients itself: switched off here;
    past 64 channels the route skips the kernel by default since session 25: switched on.)"""
    monkeypatch.setattr(op_module, "CONV_TOKEN_PRODUCTS_MAX_K", 0)
    monkeypatch.setattr(op_module, "EPILOGUE_PRODUCTS_MAX_CHANNELS", op_module.EPILOGUE_PRODUCTS_KERNEL_MAX_CHANNELS)
    monkeypatch.setattr(op_module, "PIXEL_REDUCTION_MIN_PIXELS", 16)
    launched = []
    original = op_module._launch_epilogue_products

    def probe(*args, **kwargs):
        sums, products = original(*args, **kwargs)
        launched.append(sums.shape[2])  # the number of pixel ranges
        return sums, products

    monkeypatch.setattr(op_module, "_launch_epilogue_products", probe)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=13)
    assert len(launched) == 1 and launched[0] > 1, launched


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=12, out_channels=20, height=7, width=37, num_tokens=5, clamp=0.6),
        Layer(batch=1, in_channels=9, out_channels=70, height=5, width=7, tokens="shared", noise="shared"),
        Layer(batch=3, in_channels=5, out_channels=3, height=4, width=4, tokens=None, demodulate=False, bias=False),
    ],
    ids=str,
)
def test_interpreted_epilogue_backward_walks_several_pixel_blocks_a_program(layer, monkeypatch):
    """`_epilogue_backward_kernel` with 3 pixel blocks a program (blocks of 1 to 4 pixels), so
    that every program sums several blocks into one row of sums and the last program of each
    sample walks blocks past the image; N blocks of 64 and a partial one at 70 channels."""
    monkeypatch.setattr(op_module, "EPILOGUE_PRODUCTS_MAX_CHANNELS", 0)  # the plain epilogue backward
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_BLOCK_VALUES", 64)
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MAX_TILES", 3)
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MIN_PROGRAMS", 1)
    shapes = []
    original = op_module._launch_epilogue_backward

    def probe(grad, out, g, **kwargs):
        sums = original(grad, out, g, **kwargs)
        block_m, _ = op_module._pointwise_blocks(out.shape[2] * out.shape[3], out.shape[1], 64)
        shapes.append((sums.shape[2], -(-out.shape[2] * out.shape[3] // block_m)))  # (programs, blocks) a sample
        return sums

    monkeypatch.setattr(op_module, "_launch_epilogue_backward", probe)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=17)
    assert len(shapes) == 1, shapes
    programs, blocks = shapes[0]
    assert programs == -(-blocks // 3) and blocks % 3 != 0, shapes


@needs_interpreter
@pytest.mark.parametrize("prefetch", [False, True], ids=["loads-in-place", "prefetch"])
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=6, out_channels=20, height=5, width=4, upsample=True, clamp=0.6),
        Layer(batch=1, in_channels=9, out_channels=70, height=5, width=19, upsample=True, tokens="shared", noise="shared"),
    ],
    ids=str,
)
def test_interpreted_blur_walks_rows_with_and_without_loading_ahead(layer, prefetch, monkeypatch):
    """The upsampling blur and its adjoint in the epilogue backward (`_blur_kernel`), 3 output
    rows a program: row programs start inside the image, warm their window up on rows another
    program outputs, and the last ones run past the image's bottom. With PREFETCH each program
    loads its next source row (and the forward's next noise row) one iteration ahead, including
    the rows past its last one, which it must not load."""
    monkeypatch.setattr(op_module, "BLUR_MAX_ROWS", 3)
    monkeypatch.setattr(op_module, "BLUR_MIN_PROGRAMS", 10**9)  # keep 3 rows however few programs
    monkeypatch.setattr(op_module, "BLUR_PREFETCH", prefetch)
    launches = []
    original = op_module._launch_blur

    def probe(src, dst, **kwargs):
        launches.append((kwargs.get("saved") is not None, dst.shape[1]))
        return original(src, dst, **kwargs)

    monkeypatch.setattr(op_module, "_launch_blur", probe)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=23)
    # the forward blur and the blurred epilogue backward, each over more than one row program
    assert sorted(backward for backward, _ in launches) == [False, True], launches
    assert all(rows > 3 and rows % 3 != 0 for _, rows in launches), launches


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=9, out_channels=20, height=5, width=7, num_tokens=3),
        Layer(batch=1, in_channels=70, out_channels=12, height=4, width=6, upsample=True, tokens="shared"),
    ],
    ids=str,
)
def test_interpreted_tap_loads_in_narrow_copies_match_reference(layer, monkeypatch):
    """The loads a box's taps re-read, 8 bytes a copy (`TAP_LOAD_BYTES`, the default under Triton
    3.6): the conv's input tile and the pixel products' boxed tile, through offsets whose
    contiguity reads as runs of 2 fp32 values, with blocks past the channels masked (9 and 70
    channels)."""
    monkeypatch.setattr(op_module, "TAP_LOAD_BYTES", 8)
    # the token products by the boxed pixel products, not in the epilogue or the grad-x conv
    monkeypatch.setattr(op_module, "EPILOGUE_PRODUCTS_MAX_CHANNELS", 0)
    monkeypatch.setattr(op_module, "CONV_TOKEN_PRODUCTS_MAX_K", 0)
    assert op_module._tap_vector(4) == 2
    vectors = []
    for name in ("_conv_gemm_kernel", "_pixel_products_kernel"):

        class Probe:  # kernel[grid](...) -> record the copy width, then launch for real
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    vectors.append((kwargs.get("BOX"), kwargs.get("A_VECTOR", kwargs.get("TAP_VECTOR"))))
                    return self.kernel[grid](*args, **kwargs)

                return launch

        monkeypatch.setattr(op_module, name, Probe(getattr(op_module, name)))
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=29)
    boxed = {box for box, vector in vectors if box is not None and box >= 0 and vector == 2}
    assert (None, 2) in vectors and boxed, vectors


def test_epilogue_backward_programs_walk_more_blocks_only_where_enough_programs_remain(monkeypatch):
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MAX_TILES", 32)
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MIN_PROGRAMS", 2112)
    assert op_module._epilogue_backward_tiles(1) == 1
    assert op_module._epilogue_backward_tiles(2112 * 2 - 1) == 1
    assert op_module._epilogue_backward_tiles(2112 * 5) == 5
    assert op_module._epilogue_backward_tiles(8 * 65536) == 32  # the 1024 px layer at batch 8
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MAX_TILES", 1)
    assert op_module._epilogue_backward_tiles(8 * 65536) == 1
    # 512 values a block: 8 pixels of 64 channels, 16 of 32; never a block past one sample's pixels
    assert op_module._pointwise_blocks(512 * 512, 64, 512) == (8, 64)
    assert op_module._pointwise_blocks(1024 * 1024, 32, 512) == (16, 32)
    assert op_module._pointwise_blocks(16, 512, 512) == (8, 64)
    assert op_module._pointwise_blocks(16, 512, 16) == (1, 64)
    assert op_module._pointwise_blocks(4, 3, 512) == (16, 16)
    for bad in (0, 8, 48, 1000):  # a tile of a non-power-of-two size would fail inside Triton
        with pytest.raises(ValueError, match="EPILOGUE_BACKWARD_BLOCK_VALUES"):
            op_module._pointwise_blocks(4, 3, bad)


@needs_interpreter
def test_layers_past_64_channels_form_their_token_products_apart_from_the_epilogue(monkeypatch):
    """Since session 25 a plain layer of 65-128 channels on the fused token route (config-f's
    256 px layer) runs the epilogue backward and the pixel products as two kernels: on the H100
    the one-kernel route took 4.1 ms there (BENCHMARKS.md). The one-kernel route stays a switch."""
    calls = []
    for name in ("_launch_epilogue_products", "_launch_epilogue_backward"):
        original = getattr(op_module, name)
        monkeypatch.setattr(op_module, name, lambda *a, _name=name, _f=original, **k: calls.append(_name) or _f(*a, **k))
    layer = Layer(batch=1, in_channels=72, out_channels=72, height=5, width=6, num_tokens=4)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=3)
    assert calls == ["_launch_epilogue_backward"]
    calls.clear()
    monkeypatch.setattr(op_module, "EPILOGUE_PRODUCTS_MAX_CHANNELS", 128)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=3)
    assert calls == ["_launch_epilogue_products"]


@needs_interpreter
@pytest.mark.parametrize(
    "max_tiles, box_by_mma", [(1, True), (4, True), (4, False)], ids=["one-block", "four-blocks", "four-blocks-dot-a-step"]
)
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=12, out_channels=20, height=20, width=23, num_tokens=5),
        Layer(batch=2, in_channels=12, out_channels=20, height=20, width=23, tokens="shared", clamp=0.6),
        Layer(batch=1, in_channels=70, out_channels=40, height=9, width=11, num_tokens=9, noise=None),
        Layer(batch=2, in_channels=10, out_channels=12, height=10, width=11, upsample=True, num_tokens=6),
        Layer(batch=1, in_channels=10, out_channels=12, height=10, width=11, upsample=True, tokens="shared"),
    ],
    ids=str,
)
def test_interpreted_token_products_in_the_grad_x_conv(layer, max_tiles, box_by_mma, monkeypatch):
    """The grad-x conv's token gradients (TOKEN_PRODUCTS): one pixel block a program, or up to four
    with the last program's blocks partly past the grid (20 x 23 px: nine 8 x 8 blocks, three
    programs), two N tiles (70 input channels), the upsampling layer's stride-2 box, shared
    tokens summed over the batch; box(a) summed by a dot in the step loop (BOX_BY_MMA: by
    default at every tile here) or grad p's products a step. No other kernel forms M."""
    monkeypatch.setattr(op_module, "CONV_PRODUCTS_MAX_TILES", max_tiles)
    monkeypatch.setattr(op_module, "CONV_PRODUCTS_BOX_BY_MMA", box_by_mma)
    monkeypatch.setattr(op_module, "CONV_PRODUCTS_MIN_PROGRAMS", 1)
    launches = []
    monkeypatch.setattr(op_module, "LAUNCH_OBSERVER", lambda kernel, reads, writes: launches.append((kernel, writes)))
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=17)
    kernels = [kernel for kernel, _ in launches]
    assert "pixel_products" not in kernels and "epilogue_products" not in kernels, kernels
    mode = 1 if layer.upsample else 0
    grad_x_writes = [writes for kernel, writes in launches if kernel == f"conv_gemm[mode {mode}]"][-1]
    # grad p's per-program sums [B, programs, N tiles, L, K] (the observer drops absent buffers)
    grad_p_sums = [t for t in grad_x_writes if t is not None and t.dim() == 5]
    assert len(grad_p_sums) == 1, "the grad-x launch summed no token products"
    if layer.height == 20:  # 9 pixel blocks a sample: 9 programs, or 3 of up to 4 blocks
        assert grad_p_sums[0].shape[1] == (3 if max_tiles == 4 else 9), grad_p_sums[0].shape
    if layer.in_channels == 70:
        assert grad_p_sums[0].shape[2] == 2, grad_p_sums[0].shape


@needs_interpreter
@pytest.mark.parametrize("upsample", [False, True], ids=["plain", "up"])
@pytest.mark.parametrize("trained", ["x", "tokens-only"])
def test_token_products_without_the_style_or_input_gradient(upsample, trained, monkeypatch):
    """Without grad styles the grad-x conv loads x for the token products alone (no sums of x);
    without grad x and grad styles it does not run, and M is formed as before."""
    layer = Layer(batch=2, in_channels=9, out_channels=11, height=6, width=7, upsample=upsample)
    inputs = {k: v.float() for k, v in make_inputs(layer, 3).items() if v is not None}
    launches = []
    monkeypatch.setattr(op_module, "LAUNCH_OBSERVER", lambda kernel, reads, writes: launches.append(kernel))
    results = {}
    for backend in ("reference", "triton"):
        leaves = {k: v.clone().requires_grad_(k in ("p", "q") or (k == "x" and trained == "x")) for k, v in inputs.items()}
        out = styled_conv2d(**leaves, upsample=upsample, backend=backend)
        wanted = [name for name, value in leaves.items() if value.requires_grad]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        results[backend] = dict(zip(wanted, torch.autograd.grad(out, [leaves[n] for n in wanted], grad_out)))
    assert set(results["triton"]) == {"p", "q"} | ({"x"} if trained == "x" else set())
    for name, grad in results["triton"].items():
        assert relative_error(grad, results["reference"][name]) < 1e-4, name
    grad_x_launches = sum(kernel.startswith("conv_gemm[mode") for kernel in launches) - 1
    assert grad_x_launches == (1 if trained == "x" else 0), launches
    assert ("pixel_products" in launches or "epilogue_products" in launches) == (trained == "tokens-only"), launches


def test_products_blocks_and_tiles_per_program():
    for n, k in [(32, 32), (64, 32), (64, 64), (128, 64), (5, 3)]:
        block_n, block_k, warps = op_module._products_blocks(n, k)
        assert block_k >= k and block_n == op_module._products_block_n(n) and warps in (4, 8)
    # enough programs for the GPU first, then as many blocks per program as allowed
    assert op_module._tiles_per_program(8, 4096, 1) == op_module.CONV_PRODUCTS_MAX_TILES
    assert op_module._tiles_per_program(1, 64, 1) == 1
    tiles = op_module._tiles_per_program(2, 2048, 1)
    assert tiles > 1 and 2 * -(-2048 // tiles) >= op_module.CONV_PRODUCTS_MIN_PROGRAMS


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("over_batch", [False, True], ids=["per-sample", "over-batch"])
@pytest.mark.parametrize("shape", [(3, 37, 5, 7), (2, 9, 300), (1, 1, 4)], ids=str)
def test_sum_partials_matches_a_float64_sum(shape, over_batch, dtype):
    """`_sum_partials`: rows in several blocks (37 > 32), inner sizes past one 256-wide block,
    a single row; summed in fp32 and rounded once (to nearest, as on a GPU: the tests fix the
    interpreter's truncating bf16 cast), so within an fp32 sum's error of the float64 sum plus
    half an ulp of the output dtype."""
    partials = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    result = op_module._sum_partials(partials, dtype, over_batch=over_batch)
    exact = partials.double().sum((0, 1) if over_batch else 1)
    assert result.dtype == dtype and result.shape == exact.shape
    rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    error = (result.double() - exact).abs()
    assert torch.all(error <= rounding * exact.abs() + 1e-5 * (1 + exact.abs())), error.max()


@needs_interpreter
def test_sum_partials_together_finishes_each_job_as_alone():
    """Three jobs of different shapes, dtypes and reductions in one launch (a layer's grad s, p
    and q partials), and a job with no rows beside another: each result has the shape and
    dtype `_sum_partials` of that job alone gives, and is within one rounding of the float64
    sum (the launch's block sizes, so the fp32 summation order, may differ from the job alone)."""
    gen = torch.Generator().manual_seed(3)
    jobs = [
        (torch.randn(3, 5, 300, generator=gen), torch.float32, False),  # grad s: [B, R, Cin]
        (torch.randn(3, 37, 4, 9, generator=gen), torch.bfloat16, True),  # shared grad p, over the batch
        (torch.randn(3, 2, 4, 7, generator=gen), torch.float16, False),  # per-sample grad q
    ]
    together = op_module._sum_partials_together(jobs)
    rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
    for (partials, dtype, over_batch), result in zip(jobs, together):
        alone = op_module._sum_partials(partials, dtype, over_batch=over_batch)
        assert result.dtype == alone.dtype == dtype and result.shape == alone.shape
        exact = partials.double().sum((0, 1) if over_batch else 1)
        error = (result.double() - exact).abs()
        assert torch.all(error <= rounding[dtype] * exact.abs() + 1e-5 * (1 + exact.abs())), error.max()
    no_rows = torch.zeros(2, 0, 5)
    empty, summed = op_module._sum_partials_together([(no_rows, torch.float32, False), jobs[0]])
    assert torch.equal(empty, torch.zeros(2, 5)) and torch.equal(summed, together[0])
    with pytest.raises(ValueError, match="jobs: expected 1 to 3"):
        op_module._sum_partials_together(jobs + jobs[:1])


def test_sum_partials_refuses_what_it_cannot_read_and_plans_on_meta():
    with pytest.raises(ValueError, match="partials"):
        op_module._sum_partials(torch.zeros(2, 3, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match="partials"):
        op_module._sum_partials(torch.zeros(4, 3).t(), torch.float32)
    planned = op_module._sum_partials(torch.empty(2, 5, 3, 4, device="meta"), torch.bfloat16, over_batch=True)
    assert planned.shape == (3, 4) and planned.dtype == torch.bfloat16 and planned.device.type == "meta"


@pytest.mark.parametrize("upsample", [False, True], ids=["plain", "upsampling"])
def test_layer_glue_launches(upsample, monkeypatch):
    """What a refined layer launches besides its kernels, planned on meta tensors (bf16,
    channels-last x, frozen weight): no constant fills, and no casts or scalings of alpha, beta or
    the finished sums (the kernels take them as they are: `alpha_scale`, `_sum_partials`), and
    no autograd additions of the demodulation's gradients of s, p and q to the conv's (the
    demodulation backward adds them as it stores: `_merge_deferred_demodulation`). The backward's
    only torch op is grad d's sum over the epilogue's pixel blocks."""
    from benchmarks.traffic import TrafficRecorder

    layer = Layer(batch=2, in_channels=16, out_channels=16, height=8, width=8, num_tokens=4, upsample=upsample)
    inputs = make_inputs(layer, seed=3)
    leaves = {name: inputs[name].to("meta", torch.bfloat16) for name in ("x", "weight", "styles", "p", "q")}
    leaves["x"] = leaves["x"].contiguous(memory_format=torch.channels_last)
    for name in ("x", "styles", "p", "q"):
        leaves[name].requires_grad_(True)
    epilogue = {name: inputs[name].to("meta", torch.bfloat16) for name in ("noise", "noise_strength", "bias")}
    monkeypatch.setattr(op_module, "POISON_BUFFERS", False)  # the tests' NaN fills are launches too

    def step():
        for leaf in leaves.values():
            leaf.grad = None
        out = styled_conv2d(**leaves, **epilogue, upsample=upsample, activate=True, backend="triton")
        out.backward(torch.empty_like(out))

    step()  # the steady state: what the op derives from the frozen weight is cached by now
    recorder = TrafficRecorder()
    monkeypatch.setattr(op_module, "LAUNCH_OBSERVER", recorder.observe_launch)
    with recorder:
        step()
    kernels = [launch.kernel for launch in recorder.launches]
    glue = {phase: sorted(l.kernel for l in recorder.launches if l.phase == phase and l.kernel.startswith("aten."))
            for phase in ("forward", "backward")}  # fmt: skip
    assert kernels.count("sum_partials") == 1, kernels  # grad p, grad q and grad s, finished together
    assert glue == {"forward": [], "backward": ["aten.sum"]}, glue
    assert kernels.count("demodulation") == kernels.count("demodulation_backward") == 1, kernels


def test_epilogue_products_blocks_hold_every_channel():
    for in_channels, out_channels in [(3, 5), (32, 32), (64, 64), (70, 66), (128, 128), (32, 128)]:
        block_p, block_l, block_n, warps = op_module._epilogue_products_blocks(in_channels, out_channels)
        assert block_l >= in_channels and block_n >= out_channels
        assert block_p in (16, 32) and warps in (8, 16)


def autotuned_with_timer(do_bench):
    """The conv kernel autotuned as `_tuned_conv_gemm` does, timed by `do_bench` (a stand-in)."""
    import triton

    return triton.autotune(
        configs=op_module._CONV_CONFIGS,
        key=op_module.CONV_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": op_module._prune_conv_configs},
        do_bench=do_bench,
    )(op_module._conv_gemm_kernel)


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=40, out_channels=20, height=9, width=11, num_tokens=7),
        Layer(batch=2, in_channels=40, out_channels=20, height=7, width=8, upsample=True, tokens="shared"),
        # 32 channels on 16 x 16 pixels: the K = 32 tiles of the 1024 px layers, up to 256 x 32 x 32
        Layer(batch=1, in_channels=32, out_channels=32, height=16, width=16, num_tokens=4),
    ],
    ids=str,
)
@pytest.mark.parametrize("time_lone_configs", [False, True], ids=["lone-untimed", "lone-timed"])
def test_autotuned_launch_path_runs_every_pruned_config(layer, time_lone_configs, monkeypatch):
    """The GPU path launches the conv kernel through triton.autotune. With a stand-in timer the
    autotuner runs here too: every config that survives pruning is launched (in the
    interpreter), the last one benchmarked wins, and the result must match the reference.
    Before it benchmarks, every one of those configs was compiled in parallel (a warm-up run,
    which compiles on a GPU and does nothing in the interpreter)."""
    import triton.testing

    launches = itertools.count()
    runs = {True: set(), False: set()}  # configs run with warmup=True (compile only) and for real
    kernel = op_module._conv_gemm_kernel
    run = kernel.run

    def recording_run(*args, grid, warmup, **kwargs):
        config = tuple(sorted((k, v) for k, v in kwargs.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "TILE_W",
                                                                          "SCALE_WEIGHT", "A_TMA", "num_warps")))
        runs[warmup].add((kwargs["MODE"], kwargs["REDUCE_X"], config))
        return run(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    monkeypatch.setattr(op_module, "CONV_COMPILE_THREADS", 4)
    monkeypatch.setattr(op_module, "_CONV_BEST_CONFIG", {})  # tune afresh, whatever ran before
    monkeypatch.setattr(op_module, "_CONV_TUNED_LAUNCH", {})
    timed = []

    def stand_in_timer(kernel_call, quantiles):
        kernel_call()
        elapsed = -float(next(launches))  # each config "faster" than the one before
        timed.append(elapsed)
        return [elapsed] * len(quantiles)

    lone_timed = []

    def stand_in_lone_timer(kernel_call, quantiles):  # triton.testing.do_bench, for lone configs
        kernel_call()
        lone_timed.append(1000.0 + len(lone_timed))
        return [lone_timed[-1]] * len(quantiles)

    tuned = autotuned_with_timer(stand_in_timer)
    monkeypatch.setattr(op_module, "_conv_gemm_tuned", tuned)
    monkeypatch.setattr(op_module, "_interpreted", lambda: False)  # take the GPU branch of the launcher
    monkeypatch.setattr(op_module, "TIME_UNTUNED_CONV_LAUNCHES", time_lone_configs)
    monkeypatch.setattr(triton.testing, "do_bench", stand_in_lone_timer)
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"])
    assert next(launches) > 2  # forward and grad x were each tuned over more than one config
    assert len(runs[True]) > 2 and runs[True] == runs[False]
    # each tuned shape records its winner's time (the last config timed for it: the fastest
    # here), how many configs were timed, every timed config fastest first, and its bytes and
    # FLOPs (JSON: autotuned_conv_configs)
    recorded = op_module.autotuned_conv_configs()
    assert len(recorded) == len(op_module._CONV_BEST_CONFIG) >= 2
    assert sum(entry["configs_timed"] for entry in recorded) == len(timed)
    ends = list(itertools.accumulate(entry["configs_timed"] for entry in recorded))
    lone = iter(lone_timed)
    wanted = [timed[end - 1] if entry["configs_timed"] else (next(lone) if time_lone_configs else None)
              for entry, end in zip(recorded, ends)]  # fmt: skip
    assert [entry["tuned_ms"] for entry in recorded] == wanted and any(wanted)
    assert next(lone, None) is None  # each lone config was timed once, when it was first launched
    for entry in recorded:
        rows = entry["timings"]
        assert len(rows) == (entry["configs_timed"] or (1 if time_lone_configs else 0))
        assert [row["ms"] for row in rows] == sorted(row["ms"] for row in rows)
        if rows:  # the fastest is the one chosen, with its tile
            assert rows[0]["ms"] == entry["tuned_ms"]
            assert all(rows[0][name] == entry[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "TILE_W", "num_warps"))
    assert all(entry["least_bytes"] > 0 and entry["flops"] > 0 for entry in recorded)
    if layer.in_channels == 32:  # the K = 32 tiles, up to the longest, ran
        forward_tiles = {dict(config)["BLOCK_M"] for mode, reduce_x, config in runs[False] if mode == 0 and not reduce_x}
        assert {128, 256} <= forward_tiles, forward_tiles


@needs_interpreter
def test_the_autotuner_tunes_each_batch_bucket_once(monkeypatch):
    """Which tile fills the GPU depends on how many programs the batch makes: a batch of 8 must
    not run the tile tuned for a batch of 1. Batches with the same power of two share a choice."""
    benchmarked = []

    def stand_in_timer(kernel_call, quantiles):
        kernel_call()
        benchmarked.append(1)
        return [1.0] * len(quantiles)

    tuned = autotuned_with_timer(stand_in_timer)
    monkeypatch.setattr(op_module, "_conv_gemm_tuned", tuned)
    monkeypatch.setattr(op_module, "_interpreted", lambda: False)
    monkeypatch.setattr(op_module, "CONV_COMPILE_THREADS", 0)
    monkeypatch.setattr(op_module, "_CONV_BEST_CONFIG", {})
    buckets = []
    for batch in (1, 2, 3, 4):
        before = len(benchmarked)
        check_layer(Layer(batch=batch, in_channels=20, out_channels=16, height=6, width=6, tokens=None, train_weight=False),
                    torch.float32, "cpu", TOLERANCE["interpreted"])  # fmt: skip
        buckets.append(len(benchmarked) > before)
    assert buckets == [True, True, True, False]  # 3 tunes for bucket 4; 4 reuses its choice
    fields = op_module.CONV_BEST_CONFIG_KEY_FIELDS
    tuned_buckets = [dict(zip(fields, key))["BATCH_BUCKET"] for key in op_module._CONV_BEST_CONFIG]
    assert sorted(tuned_buckets) == [1, 1, 2, 2, 4, 4]  # the forward and the grad-x launch of each


@needs_interpreter
def test_a_failed_parallel_compile_leaves_the_compiling_to_the_autotuner(monkeypatch):
    tuned = autotuned_with_timer(lambda kernel_call, quantiles: [kernel_call() or 1.0] * len(quantiles))

    def broken_warmup(*args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(tuned, "warmup", broken_warmup)
    monkeypatch.setattr(op_module, "_conv_gemm_tuned", tuned)
    monkeypatch.setattr(op_module, "_interpreted", lambda: False)
    monkeypatch.setattr(op_module, "CONV_COMPILE_THREADS", 4)
    monkeypatch.setattr(op_module, "_CONV_BEST_CONFIG", {})
    with pytest.warns(UserWarning, match="in parallel failed: RuntimeError.'no compiler today'"):
        check_layer(Layer(batch=1, tokens=None), torch.float32, "cpu", TOLERANCE["interpreted"])


@needs_interpreter
def test_frozen_weight_costs_no_weight_gradient(monkeypatch):
    """With weight.requires_grad False the weight-gradient conv never runs."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the weight gradient was computed for a frozen weight")

    monkeypatch.setattr(op_module, "_weight_gradient", must_not_run)
    check_layer(Layer(train_weight=False), torch.float32, "cpu", TOLERANCE["interpreted"], seed=3)
    with pytest.raises(AssertionError, match="frozen weight"):  # and the probe does fire when it should
        check_layer(Layer(train_weight=True), torch.float32, "cpu", TOLERANCE["interpreted"], seed=3)


@needs_interpreter
@pytest.mark.parametrize("upsample", [False, True])
def test_interpreted_non_contiguous_inputs_match_reference(upsample):
    """Every tensor argument a strided view (slices, transposes, stride-0 expanded tokens as
    refinestyle.Refinement.expand makes them) and a non-contiguous output gradient: the
    kernels must follow the strides or the launcher must make the tensors contiguous."""
    layer = Layer(upsample=upsample, tokens="shared", num_tokens=3)
    base = {k: v.float() if v is not None else None for k, v in make_inputs(layer, seed=13).items()}
    batch = layer.batch
    leaves = {name: base[name].clone().requires_grad_(True) for name in ("x", "weight", "styles", "p", "q", "bias")}

    def views(leaves, dtype):  # the same values, laid out with strides the kernels must not assume
        x, weight, styles = leaves["x"], leaves["weight"], leaves["styles"]
        p, q, bias = leaves["p"], leaves["q"], leaves["bias"]
        return dict(
            x=torch.stack([x, x], dim=-1)[..., 1],  # last-dim stride 2
            weight=weight.transpose(0, 1).contiguous().transpose(0, 1),  # [Cout, Cin] strides swapped
            styles=torch.stack([styles, styles], dim=0)[1].t().contiguous().t(),  # column-major
            p=p.unsqueeze(0).expand(batch, -1, -1),  # per-sample tokens with batch stride 0
            q=q.t().contiguous().t().unsqueeze(0).expand(batch, -1, -1),
            noise=torch.stack([base["noise"], base["noise"]], dim=-1).to(dtype)[..., 0],
            noise_strength=base["noise_strength"].to(dtype),
            bias=torch.stack([bias, bias], dim=-1)[:, 1],  # stride 2
        )

    grad_out = torch.randn(*reversed(make_grad_shape(layer)), generator=torch.Generator().manual_seed(3)).permute(3, 2, 1, 0)
    results = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        cast = {name: leaf.detach().to(dtype).requires_grad_(True) for name, leaf in leaves.items()}
        args = views(cast, dtype)
        contiguous = [n for n in ("x", "weight", "styles", "p", "q", "noise", "bias") if args[n].is_contiguous()]
        assert not contiguous, contiguous
        out = styled_conv2d(**args, upsample=upsample, backend=backend)
        grads = torch.autograd.grad(out, list(cast.values()), grad_out.to(dtype))
        results[backend] = (out, dict(zip(cast, grads)))
    (expected, expected_grads), (out, grads) = results["reference"], results["triton"]
    errors = {"out": relative_error(out, expected)}
    errors.update({name: relative_error(grads[name], expected_grads[name]) for name in grads})
    assert max(errors.values()) < TOLERANCE["interpreted"], errors


def make_grad_shape(layer: Layer) -> tuple:
    factor = 2 if layer.upsample else 1
    return (layer.batch, layer.out_channels, layer.height * factor, layer.width * factor)


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=5),
        Layer(batch=3, upsample=True, tokens="shared", noise="shared", channels_last=True),
        Layer(batch=5, num_tokens=4, train_weight=False),  # the Triton demodulation, once for all chunks
    ],
    ids=str,
)
def test_batches_past_the_grid_limit_run_in_chunks(layer, monkeypatch):
    """CUDA grids hold at most 65535 programs in the dimension that carries the batch: larger
    batches are split. With the limit lowered to 2 the chunked result must still be exact, and
    d is computed once for the whole batch (a differentiable node the chunks share)."""
    calls, demodulations = [], []
    op = op_module._styled_conv2d_triton_call
    forward = op_module._demodulation_forward
    monkeypatch.setattr(op_module, "MAX_LAUNCH_BATCH", 2)
    monkeypatch.setattr(op_module, "_styled_conv2d_triton_call", lambda x, *a: calls.append(x.shape[0]) or op(x, *a))
    monkeypatch.setattr(op_module, "_demodulation_forward", lambda *a: demodulations.append(1) or forward(*a))
    check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=4)
    assert calls == [2] * (layer.batch // 2) + [1] * (layer.batch % 2)
    assert len(demodulations) == (0 if layer.train_weight else 1)


@needs_interpreter
@pytest.mark.parametrize("upsample", [False, True])
def test_triton_backend_never_builds_per_sample_kernels(upsample, monkeypatch):
    """No tensor of B*Cout*Cin*k*k elements is made, forward or backward (weight trained too).

    The custom ops hide their insides from a dispatch mode outside them, so the probe is
    switched on inside the forward and backward implementations themselves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):  # the numel of the largest floating tensor made
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for value in result if isinstance(result, (tuple, list)) else [result]:
                # (the interpreter's own copies of its arguments are raw uint8 bytes)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.largest = max(self.largest, value.numel())
            return result

    largest = []

    def probed(function):
        def run(*args, **kwargs):
            with LargestAllocation() as mode:
                result = function(*args, **kwargs)
            largest.append(mode.largest)
            return result

        return run

    monkeypatch.setattr(op_module, "_triton_forward", probed(op_module._triton_forward))
    monkeypatch.setattr(op_module, "_triton_backward", probed(op_module._triton_backward))
    # per-sample kernels would be 8*64*64*9 = 295k elements; activations are 8*64*8*8 = 33k at most
    layer = Layer(batch=8, in_channels=64, out_channels=64, height=4, width=4, upsample=upsample, num_tokens=4)
    with LargestAllocation() as outside:
        errors = check_layer(layer, torch.float32, "cpu", TOLERANCE["interpreted"], seed=6)
    assert len(largest) == 2, largest  # the probe saw the forward and the backward
    per_sample_kernels = 8 * 64 * 64 * 9
    assert max(largest) < per_sample_kernels / 4, largest
    assert "weight" in errors  # the weight gradient was computed, without per-sample kernels too
    assert outside.largest >= per_sample_kernels  # the reference inside check_layer does build them


@needs_interpreter
def test_output_is_channels_last_in_input_dtype():
    layer = Layer(noise=None)
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(layer, seed=7).items()}
    out = styled_conv2d(**inputs, backend="triton")
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)


@needs_interpreter
def test_torch_library_registration_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of both custom ops."""
    layer = Layer(batch=2, in_channels=3, out_channels=4, height=3, width=4, num_tokens=2, clamp=0.8)
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(layer, seed=11).items()}
    demod = refinestyle_kernels.demodulation_coefficients(
        inputs["weight"], inputs["styles"], inputs["p"], inputs["q"], 1 / math.sqrt(27), 1e-8
    )
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")] + [demod]
    args += [inputs["noise"], inputs["noise_strength"], inputs["bias"], 1 / math.sqrt(27), False, True, 0.8]
    for index in (0, 1, 2, 3, 4, 5, 7, 8):
        args[index] = args[index].detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.refinestyle_kernels.styled_conv2d_triton.default, args)


@needs_interpreter
@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=2, in_channels=6, out_channels=5, height=4, width=3, num_tokens=3),
        Layer(batch=2, in_channels=6, out_channels=5, height=3, width=4, num_tokens=3, tokens="shared"),
        Layer(batch=2, in_channels=6, out_channels=5, height=3, width=3, num_tokens=3, upsample=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused route", "separate route"])
def test_backward_op_returns_the_layouts_its_fake_declares(layer, fused, monkeypatch):
    """torch.compile builds its graphs on the fake implementation's layouts and asserts them on the
    real outputs: each gradient of the backward op must have the strides the fake promises (an
    H100 run of the compiled generator found grad p of the separate route's upsampling layers
    transposed)."""
    if not fused:  # the route of layers wider than the fused projection holds
        monkeypatch.setattr(op_module, "FUSED_PROJECTION_MAX_COUT", 0)
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(layer, seed=12).items()}
    scale = 1 / math.sqrt(inputs["weight"][0].numel())
    demod = refinestyle_kernels.demodulation_coefficients(inputs["weight"], inputs["styles"], inputs["p"], inputs["q"],
                                                          scale, 1e-8)  # fmt: skip
    tensors = [inputs[k] for k in ("x", "weight", "styles", "p", "q")] + [demod]
    tensors += [inputs["noise"], inputs["noise_strength"], inputs["bias"]]
    options = [scale, layer.upsample, True, None]
    out = torch.ops.refinestyle_kernels.styled_conv2d_triton(*tensors, *options)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last)
    needs = [True, True, True, True, True, True, layer.noise is not None, True]
    real = torch.ops.refinestyle_kernels.styled_conv2d_triton_backward(grad, out, *tensors, *options, needs)
    fake = op_module._styled_conv2d_triton_backward_fake(grad, out, *tensors, *options, needs)
    for index, (value, declared) in enumerate(zip(real, fake)):
        assert value.shape == declared.shape, index
        if value.numel() > 1:
            assert value.stride() == declared.stride(), (index, value.shape, value.stride(), declared.stride())


def compiled_block(device, dtype, compile_backend):
    """A StyledConv with shared RefineStyle tokens then a ToRGB, on the triton backend, compiled."""
    torch.manual_seed(0)
    conv = refinestyle_kernels.StyledConv(6, 5, 3, 8, upsample=True, backend="triton").to(device, dtype)
    to_rgb = refinestyle_kernels.ToRGB(5, 8, upsample=False, backend="triton").to(device, dtype)
    tokens = refinestyle_kernels.LayerTokens(6, 5, num_tokens=4, scale_init=0.3).to(device, dtype)
    conv.requires_grad_(False)  # RefineStyle: the generator is frozen, the tokens train

    def block(x, w, noise):
        p, q = tokens()
        return to_rgb(conv(x, w, noise, p, q), w)

    x = torch.randn(2, 6, 3, 5, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 8, device=device, dtype=dtype)
    noise = torch.randn(2, 1, 6, 10, device=device, dtype=dtype)
    eager = block(x, w, noise)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, tokens.P, tokens.A])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    out = compiled(x, w, noise)
    grads = torch.autograd.grad(out.square().sum(), [x, tokens.P, tokens.A])
    return (eager, *eager_grads), (out, *grads)


@needs_interpreter
def test_torch_compile_fullgraph_traces_the_triton_ops():
    """torch.compile(fullgraph=True) captures the layer with the custom ops, forward and backward.

    On the CPU the kernels run in the interpreter, so the graph goes through AOTAutograd with
    the fake implementations (backend "aot_eager") rather than Inductor's C++ codegen."""
    expected, got = compiled_block("cpu", torch.float32, "aot_eager")
    for value, reference in zip(got, expected):
        assert relative_error(value, reference) < 1e-5


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid_hw, n, k", [((4, 4), 512, 4608), ((5, 5), 512, 4608), ((64, 64), 3, 64), ((1024, 1024), 32, 288)])
def test_autotune_pruning_fits_every_layer_shape(grid_hw, n, k, reduce, dtype):
    """The GPU autotuner only tries tiles that fit; reducing launches get the tile their buffer
    assumes; every tile gets its pixel block's width, and launches that scale A by the styles
    try both placements of the scale."""
    weight = torch.empty(0, dtype=dtype)
    named = {"GRID_H": grid_hw[0], "GRID_W": grid_hw[1], "N": n, "K": k, "w_ptr": weight}
    scale_a = not reduce  # the forward scales A; grad x (the reducing launch) does not
    kept = op_module._prune_conv_configs(op_module._CONV_CONFIGS, named, REDUCE_X=reduce, HAS_A_SCALE=scale_a)
    pixels = grid_hw[0] * grid_hw[1]
    assert kept
    tiles_tried = {}
    for config in kept:
        tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_stages)
        tiles_tried.setdefault(tile, set()).add(config.kwargs["SCALE_WEIGHT"])
        assert config.kwargs["TILE_W"] == op_module._tile_width(config.kwargs["BLOCK_M"], grid_hw[1])
        # the main loop drops its K and N masks only where every block is whole
        assert config.kwargs["EVEN_K"] == (k % config.kwargs["BLOCK_K"] == 0)
        assert config.kwargs["EVEN_N"] == (n % config.kwargs["BLOCK_N"] == 0)
        # and loads the projection and style tiles once only where one K block holds every channel
        assert config.kwargs["SINGLE_K_BLOCK"] == (k <= config.kwargs["BLOCK_K"])
    assert all(placements == ({False, True} if scale_a else {False}) for placements in tiles_tried.values())
    for config in kept:
        block = config.kwargs
        assert min(block["BLOCK_M"], block["BLOCK_N"], block["BLOCK_K"]) >= 16  # tl.dot's minimum
        tiles = block["BLOCK_M"] * block["BLOCK_K"] + block["BLOCK_K"] * block["BLOCK_N"]
        assert config.num_stages * tiles * weight.element_size() <= op_module.CONV_SHARED_MEMORY_BUDGET
        assert block["BLOCK_N"] <= max(16, 2 * n) and block["BLOCK_K"] <= max(16, 2 * k)
        if reduce:
            assert block["BLOCK_M"] == op_module._reduce_block_m(pixels)
        else:
            assert block["BLOCK_M"] <= max(16, 2 * pixels)


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_the_32_channel_forward_is_tuned_over_its_own_tiles():
    """The 1024 px layers have K = 32 input channels, which no K = 64 tile fits: their forward
    (with the toRGB: one N tile over all 32 channels) is tuned over the K = 32 tiles, TMA
    loads included, where it once had a single untuned 64 x 32 x 32 tile. Wider layers never
    see those tiles."""
    weight = torch.empty(0, dtype=torch.bfloat16)
    # its rows are narrow (64 bytes): TMA strips of 256 pixels
    strip, block_k = op_module._tma_block(1024, 32, weight.element_size(), None)
    assert (strip, block_k) == (256, 32)
    named = {"GRID_H": 1024, "GRID_W": 1024, "N": 32, "K": 32, "w_ptr": weight, "TMA_BLOCK_M": strip}
    kept = op_module._prune_conv_configs(op_module._CONV_CONFIGS, named, RGB_CHANNELS=3, HAS_A_SCALE=True)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in kept}
    assert tiles == {(64, 32, 32, 4), (128, 32, 32, 4), (128, 32, 32, 8), (256, 32, 32, 8), (256, 32, 32, 4)}
    tma = {(c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["TILE_W"]) for c in kept if c.kwargs["A_TMA"]}
    assert tma == {(256, 4, 256), (256, 8, 256)}
    for k in (64, 512):
        named = dict(named, N=k, K=k)
        wide = op_module._prune_conv_configs(op_module._CONV_CONFIGS, named, HAS_A_SCALE=True)
        assert all(c.kwargs["BLOCK_K"] == 64 or c.kwargs["BLOCK_N"] == 128 for c in wide)


def test_token_product_launches_refuse_what_they_cannot_sum():
    """A token-product launch forms grad q from the fused projection and grad p from one K
    block: a projected z, an upsampling launch or too many channels is refused by name, before
    anything is launched (meta tensors)."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    a, w = torch.empty(2, 8, 8, 16, **meta), torch.empty(9, 16, 16, **meta)
    x, out = torch.empty(2, 8, 8, 16, **meta), torch.empty(2, 8, 8, 16, **meta)
    q, r = torch.empty(2, 4, 16, **meta), torch.empty(2, 4, 16, **meta)
    alpha, beta = torch.empty(2, 16, **meta), torch.empty(2, 16, dtype=torch.float32, device="meta")
    common = dict(ksize=3, in_hw=(8, 8), out_hw=(8, 8), grid_hw=(8, 8), box_z=True, x=x, token_products=True)
    op_module._launch_conv_gemm(a, None, w, None, r, alpha, beta, out, mode=0, q=q, **common)  # accepted
    z = torch.empty(2, 8, 8, 4, **meta)
    with pytest.raises(ValueError, match="no z.*z True"):
        op_module._launch_conv_gemm(a, None, w, z, r, alpha, beta, out, mode=0, q=q, **common)
    with pytest.raises(ValueError, match="MODE 2"):
        op_module._launch_conv_gemm(a, None, w, None, r, alpha, beta, out, mode=2, q=q, **common)


def test_conv_launches_refuse_a_sample_past_int32_offsets():
    """The conv kernel addresses one sample's input and the weight with int32 offsets: a sample
    of more than 2**31 - 1 values (with a pixel of margin), or such a weight, is refused by name,
    the largest sample that fits is accepted (meta tensors: nothing is allocated or launched)."""
    meta = dict(device="meta", dtype=torch.bfloat16)

    def launch(height, width, channels, out_channels=16):
        a, w = torch.empty(1, height, width, channels, **meta), torch.empty(9, channels, out_channels, **meta)
        out, alpha = torch.empty(1, height, width, out_channels, **meta), torch.empty(1, out_channels, **meta)
        hw = (height, width)
        op_module._launch_conv_gemm(a, None, w, None, None, alpha, alpha, out, mode=0, ksize=3, in_hw=hw, out_hw=hw,
                                    grid_hw=hw, box_z=True)  # fmt: skip

    limit = op_module.CONV_MAX_SAMPLE_VALUES
    launch(limit // (2050 * 64) - 2, 2048, 64)  # (h + 2) * 2050 * 64 <= 2**31 - 1
    with pytest.raises(ValueError, match=r"int32: x of 16382x2048 pixels and 64 channels"):
        launch(16382, 2048, 64)  # 16384 * 2050 * 64 > 2**31 - 1
    with pytest.raises(ValueError, match=r"or a weight of 2415919104 values"):
        launch(4, 4, 16384, out_channels=16384)  # 9 * 16384 * 16384 > 2**31 - 1


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
@pytest.mark.parametrize("reduce_x", [False, True])
def test_autotune_pruning_gives_token_product_launches_their_reducing_tile(reduce_x):
    """A grad-x launch with the token products reads x and reduces per tile whether or not grad s
    is asked for (REDUCE_X): its one config has the reducing launch's M tile. Without grad s the
    pruner once gave it BLOCK_M None, which only a GPU's autotuner reached (H100, session 24)."""
    named = {"GRID_H": 64, "GRID_W": 64, "N": 32, "K": 32, "w_ptr": torch.empty(0, dtype=torch.bfloat16)}
    kept = op_module._prune_conv_configs(op_module._CONV_CONFIGS, named, REDUCE_X=reduce_x, TOKEN_PRODUCTS=True,
                                         HAS_A_SCALE=False)  # fmt: skip
    assert kept
    for config in kept:
        assert config.kwargs["BLOCK_M"] == op_module._reduce_block_m(64 * 64)
        assert config.kwargs["TILE_W"] == op_module._tile_width(config.kwargs["BLOCK_M"], 64)


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
@pytest.mark.parametrize("n, k, dtype, warps, box_by_mma_warps", [
    (32, 32, torch.bfloat16, {4}, {4}),  # 64 x 32 x 32: 4 warps, box(a) by wgmma
    (64, 32, torch.bfloat16, {8, 4}, set()),  # past it: 8 warps, and 4 timed against them in 16-bit types
    (64, 64, torch.float16, {8, 4}, {8}),  # box(a) by wgmma only at 8 warps (4 would spill)
    (64, 64, torch.float32, {8}, {8}),  # fp32 operands: 8 only
])  # fmt: skip
def test_token_product_launches_time_four_warps_against_eight(n, k, dtype, warps, box_by_mma_warps):
    named = {"GRID_H": 256, "GRID_W": 256, "N": n, "K": k, "w_ptr": torch.empty(0, dtype=dtype)}
    kept = op_module._prune_conv_configs(op_module._CONV_CONFIGS, named, REDUCE_X=True, TOKEN_PRODUCTS=True,
                                         HAS_A_SCALE=False)  # fmt: skip
    block_n, block_k, _ = op_module._products_blocks(n, k)
    assert {config.num_warps for config in kept} == warps
    for config in kept:  # the tile the partial sums' buffer was sized for, whatever the warps
        assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]) == (64, block_n, block_k)
        assert config.kwargs["BOX_BY_MMA"] == (config.num_warps in box_by_mma_warps), config


def test_box_by_mma_only_at_the_tiles_audited_to_fit_it(monkeypatch):
    """`_box_by_mma` at config-f's token-product tiles: 64 x 32 x 32 at 4 warps and 64 x 64 x 64
    at 8, not the tiles that spilled with it (`benchmarks.kernel_audit`); never for a launch
    without token products, nor with `CONV_PRODUCTS_BOX_BY_MMA` off. Every other launch's
    configs carry it False."""
    box = op_module._box_by_mma
    assert box(True, 64, 32, 32, 4) and box(True, 64, 16, 32, 4) and box(True, 64, 64, 64, 8)
    assert not box(True, 64, 64, 32, 8) and not box(True, 64, 64, 32, 4) and not box(True, 64, 64, 64, 4)
    assert not box(False, 64, 32, 32, 4)
    monkeypatch.setattr(op_module, "CONV_PRODUCTS_BOX_BY_MMA", False)
    assert not box(True, 64, 32, 32, 4)
    monkeypatch.undo()
    named = {"GRID_H": 64, "GRID_W": 64, "N": 32, "K": 32, "w_ptr": torch.empty(0, dtype=torch.bfloat16)}
    plain = op_module._prune_conv_configs(op_module._CONV_CONFIGS, named, REDUCE_X=True, HAS_A_SCALE=False)
    assert plain and not any(config.kwargs["BOX_BY_MMA"] for config in plain)


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs CUDA or the Triton interpreter")
def test_noise_that_needs_a_gradient_gets_one_from_the_triton_backend():
    """Projectors (rosinality's, NVlabs') optimise the noise maps; the Triton kernels compute no
    noise gradient, so such a call runs on the torch backend: the reference's gradients, conv and pair."""
    from refinestyle_kernels.ops.styled_conv2d_to_rgb import styled_conv2d_to_rgb

    device = "cuda" if HAS_CUDA else "cpu"
    generator = torch.Generator().manual_seed(0)
    shapes = ((2, 3, 4, 4), (5, 3, 3, 3), (2, 3), (3, 5, 1, 1), (2, 5), (2, 1, 4, 4))
    x, weight, styles, rgb_weight, rgb_styles, noise_base = (
        torch.randn(*shape, generator=generator).to(device) for shape in shapes
    )
    for pair in (False, True):
        grads = {}
        for backend in ("reference", "triton"):
            noise = noise_base.clone().requires_grad_(True)
            if pair:
                out, rgb = styled_conv2d_to_rgb(x, weight, styles, rgb_weight=rgb_weight, rgb_styles=rgb_styles,
                                                noise=noise, noise_strength=0.7, backend=backend)  # fmt: skip
                loss = out.square().sum() + rgb.sum()
            else:
                loss = styled_conv2d(x, weight, styles, noise=noise, noise_strength=0.7, backend=backend).square().sum()
            (grads[backend],) = torch.autograd.grad(loss, noise)
        assert grads["reference"].abs().max() > 0
        torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # no gradient wanted: the Triton kernels run
        styled_conv2d(x, weight, styles, noise=noise_base.clone().requires_grad_(True), noise_strength=0.7,
                      backend="triton")  # fmt: skip


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs CUDA or the Triton interpreter")
def test_a_second_derivative_through_the_triton_backend_is_refused_by_name():
    """The Triton backward is written by hand: create_graph=True (a second derivative to come) is
    refused at the first backward, naming the backends that give one; conv and pair alike."""
    from refinestyle_kernels.ops.styled_conv2d_to_rgb import styled_conv2d_to_rgb

    device = "cuda" if HAS_CUDA else "cpu"
    generator = torch.Generator().manual_seed(1)
    shapes = ((2, 3, 4, 4), (5, 3, 3, 3), (3, 5, 1, 1), (2, 5))
    x, weight, rgb_weight, rgb_styles = (torch.randn(*shape, generator=generator).to(device) for shape in shapes)
    styles = torch.randn(2, 3, generator=generator).to(device).requires_grad_(True)
    outputs = [
        styled_conv2d(x, weight, styles, backend="triton"),
        styled_conv2d_to_rgb(x, weight, styles, rgb_weight=rgb_weight, rgb_styles=rgb_styles, backend="triton")[1],
    ]
    for out in outputs:
        with pytest.raises(RuntimeError, match='differentiates once.*backend="torch" or "reference"'):
            torch.autograd.grad(out.square().sum(), styles, create_graph=True)
    (first,) = torch.autograd.grad(styled_conv2d(x, weight, styles, backend="triton").square().sum(), styles)
    assert first.abs().max() > 0  # a plain backward is unaffected


def test_bad_inputs_for_the_triton_backend():
    x = torch.randn(2, 3, 4, 4)
    weight, styles = torch.randn(5, 3, 3, 3), torch.randn(2, 3)
    if INTERPRETED or HAS_CUDA:
        device = "cuda" if HAS_CUDA else "cpu"
        with pytest.raises(TypeError, match="x: .*float64"):
            styled_conv2d(x.double().to(device), weight.double().to(device), styles.double().to(device), backend="triton")
    with pytest.raises(ValueError, match="TRITON_FP32_PRECISION"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(op_module, "TRITON_FP32_PRECISION", "fast")
            op_module._fp32_input_precision()


# The interpreter accepts code the compiler rejects (and the reverse), and it has no shared
# memory to run out of. Triton compiles for a GPU without one: AST -> TTIR -> TTGIR -> LLVM ->
# PTX -> cubin (ptxas ships with Triton). This builds the two most intricate variants for
# Hopper (sm_90) in a fresh process, outside the interpreter, with the largest tile the
# autotuner may keep at its pipelining depth, and checks that they fit the H100's shared
# memory (227 KB per block) and that the main loop is pipelined. (An earlier kernel unrolled
# the nine taps inside the K loop; the pipeliner multi-buffered every tap's tiles and asked
# for up to 790 KB, an OutOfResources error at every launch.)
COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    from benchmarks.kernel_audit import FAMILIES, OTHER_KERNELS, compile_conv_for_hopper
    from refinestyle_kernels.ops import modulated_conv2d as m

    H100_SHARED_MEMORY = 232448  # bytes per block (opt-in maximum)

    def largest_config(element_size):  # the config with the most pipelined shared memory that is kept
        fitting = [shape for shape in m._CONV_SHAPES
                   if shape[4] * (shape[0] * shape[2] + shape[2] * shape[1]) * element_size
                   <= m.CONV_SHARED_MEMORY_BUDGET]
        return max(fitting, key=lambda shape: shape[4] * (shape[0] * shape[2] + shape[2] * shape[1]))

    def check(kernel):
        assert kernel.asm["cubin"]
        shared = kernel.metadata.shared
        assert shared <= H100_SHARED_MEMORY, f"needs {shared} bytes of shared memory, the H100 has {H100_SHARED_MEMORY}"
        return shared

    shared = []
    # every launch family of the conv kernel (forward of the upsampling layer with its phase
    # taps behind a runtime branch, the styles on A and on W, grad x with the low-rank adjoint
    # boxed on the fly and the grad-s reduction), bf16, with the largest tile the autotuner keeps
    for family in FAMILIES:
        for label, flags in family.variants():
            kernel = compile_conv_for_hopper(flags, largest_config(2), "bf16", family.grid_w)
            # the flat (K block, tap) loop is software-pipelined: its loads are asynchronous copies
            # (TMA bulk copies for the TMA variant)
            copy = "async_tma_copy_global_to_local" if flags["A_TMA"] else "async_copy_global_to_local"
            assert copy in kernel.asm["ttgir"], f"{label}: the main loop is not pipelined"
            shared.append(check(kernel))
    # fp32 with TF32 dots (the widest operands) and the whole epilogue, clamp included
    # and K and N not whole numbers of the tile (every load masked)
    flags = dict(FAMILIES[-1].flags, SCALE_WEIGHT=False, A_TMA=False, INPUT_PRECISION="tf32", HAS_NOISE=True, HAS_BIAS=True,
                 ACTIVATE=True, HAS_CLAMP=True, EVEN_K=False, EVEN_N=False)
    shared.append(check(compile_conv_for_hopper(flags, largest_config(4), "fp32")))
    # the pixel products in every box mode, the blur, the epilogue backward and the demodulation
    shared += [check(case.compile()) for case in OTHER_KERNELS]
    print("compiled for sm_90; shared memory", shared)
    """
)


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_kernels_compile_for_hopper_without_a_gpu():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "compiled for sm_90" in result.stdout, result.stderr[-3000:]


PARALLEL_COMPILE_WITHOUT_A_GPU = textwrap.dedent(
    """
    import os, tempfile
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # compile for real, not from a cache
    import torch
    from benchmarks import stand_in_driver

    stand_in_driver.install()
    stand_in_driver.run_on_cpu_tensors()
    from refinestyle_kernels.ops import modulated_conv2d as op

    op.CONV_COMPILE_THREADS = 2
    tuner = op._tuned_conv_gemm()
    calls = []

    class Benchmarking(Exception):
        pass

    def stop_before_benchmarking(*args, **kwargs):
        calls.append((args, kwargs))
        raise Benchmarking

    tuner.run = stop_before_benchmarking
    batch, channels, size = 2, 64, 32
    x = torch.randn(batch, size, size, channels, dtype=torch.bfloat16)
    w = torch.randn(9, channels, channels, dtype=torch.bfloat16)
    styles, ones = torch.randn(batch, channels, dtype=torch.bfloat16), torch.ones(batch, channels)
    out = torch.empty_like(x)
    try:
        op._launch_conv_gemm(x, styles, w, None, None, ones, ones, out, mode=0, ksize=3, in_hw=(size, size),
                             out_hw=(size, size), grid_hw=(size, size), box_z=True)
    except Benchmarking:
        pass
    kernel_cache = op._conv_gemm_kernel.device_caches[0][0]
    compiled = len(kernel_cache)
    # what the autotuner's benchmark runs look up: every pruned config, each already compiled
    (args, kwargs), = calls
    kwargs = dict(kwargs)
    grid, _ = kwargs.pop("grid"), kwargs.pop("warmup")
    tuner.nargs = dict(zip(tuner.arg_names, args))
    configs = tuner.prune_configs(kwargs)
    for config in configs:
        op._conv_gemm_kernel.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
    print("configs", len(configs), "compiled before benchmarking", compiled, "after", len(kernel_cache))
    # other batches key the autotuner afresh (BATCH_BUCKET 1 and 16 would be specialisations of
    # their own) but need no new binaries
    for batch in (1, 16):
        x = torch.randn(batch, size, size, channels, dtype=torch.bfloat16)
        styles, ones = torch.randn(batch, channels, dtype=torch.bfloat16), torch.ones(batch, channels)
        try:
            op._launch_conv_gemm(x, styles, w, None, None, ones, ones, torch.empty_like(x), mode=0, ksize=3,
                                 in_hw=(size, size), out_hw=(size, size), grid_hw=(size, size), box_z=True)
        except Benchmarking:
            pass
    print("tuned", len(calls), "batches; compiled in all", len(kernel_cache))
    """
)

TRAINING_STEP_WITHOUT_A_GPU = textwrap.dedent(
    """
    import os, tempfile
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    import torch
    from benchmarks import stand_in_driver

    hopper = stand_in_driver.install()
    stand_in_driver.run_on_cpu_tensors(tma=True)
    from refinestyle_kernels.ops import modulated_conv2d as op
    from refinestyle.generator import Generator
    from refinestyle.refinement import RefinementTokens

    op.TRITON_AUTOTUNE = False  # one config a launch: the autotuned ones are the parallel-compile test's
    torch.manual_seed(0)
    # config-f's channel counts at every route's threshold, at small sizes: 512 ... 32 channels
    generator = Generator(64, style_dim=64, n_mlp=1, channels={4: 512, 8: 256, 16: 128, 32: 64, 64: 32},
                          backend="triton").to(torch.bfloat16).requires_grad_(False)
    tokens = RefinementTokens.for_generator(generator, num_refined=generator.num_layers, num_tokens=32,
                                            scale_init=0.1).to(torch.bfloat16)
    w_plus = torch.randn(2, generator.n_latent, 64, dtype=torch.bfloat16, requires_grad=True)
    noise = [n.repeat(2, 1, 1, 1).bfloat16() for n in generator.make_noise()]
    image = generator.synthesis(w_plus, refinement=tokens(), noise=noise)
    image.float().square().mean().backward()
    conv_kernels = op._conv_gemm_kernel.device_caches[0][0]
    tma = sum("tensordesc" in str(key) for key in conv_kernels)
    print("launched", len(hopper.loaded), "kernels;", len(conv_kernels), "conv kernels;", tma, "with TMA loads")
    from refinestyle_kernels.ops import upsample_add as up
    skip = [len(kernel.device_caches[0][0]) for kernel in (up._upsample_add_kernel, up._upsample_add_backward_kernel)]
    print("skip upsample kernels", *skip)
    """
)


def _run_without_a_gpu(script: str) -> str:
    """Run a script in a fresh process outside the interpreter; its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [root, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_a_refined_bf16_training_step_compiles_and_passes_the_launch_checks_without_a_gpu():
    """Every kernel launch of a refined bf16 training step (forward, and backward to w+ and the
    tokens) through Triton's real JIT: argument binding and specialisation as the launches make
    them, the compile for sm_90, and the launch-time limits of an H100 (shared memory, threads),
    with a stand-in driver (benchmarks/stand_in_driver.py) whose launches do nothing. The channel
    counts (512 to 32) take every route the 1024 px network takes: the separate and the fused
    projection, the toRGB in the conv's epilogue, the epilogue and grad-x token products, TMA
    loads, the toRGB skip's upsample. This catches what the interpreter cannot: a kernel ptxas rejects, an argument the JIT
    binds differently, a tile that exceeds the H100's shared memory at launch."""
    output = _run_without_a_gpu(TRAINING_STEP_WITHOUT_A_GPU)
    launched, conv, tma = map(int, re.search(r"launched (\d+) kernels; (\d+) conv kernels; (\d+) with TMA", output).groups())
    assert launched >= 30 and conv >= 15 and tma >= 1, output
    forward, backward = map(int, re.search(r"skip upsample kernels (\d+) (\d+)", output).groups())
    assert forward >= 1 and backward >= 1, output  # the toRGB skip's `upsample_add`, both ways


@pytest.mark.skipif(op_module.triton is None or not hasattr(op_module.triton, "AsyncCompileMode"),
                    reason="needs Triton >= 3.5 (triton.AsyncCompileMode)")  # fmt: skip
def test_autotune_configs_compile_in_parallel_into_the_cache_the_autotuner_reads():
    """`_compile_configs_in_parallel` for real, not in the interpreter: in a fresh process with a
    stand-in driver that reports an H100 (nothing launches), the first autotuned launch of a
    shape compiles every config that survives pruning before the autotuner benchmarks any, and
    the autotuner's own lookups then find each one compiled under the same key."""
    output = _run_without_a_gpu(PARALLEL_COMPILE_WITHOUT_A_GPU)
    words = output.split()
    configs, before, after = (int(words[words.index(name) + 1]) for name in ("configs", "benchmarking", "after"))
    assert configs > 1 and before == configs and after == configs, output
    tuned, compiled = (int(words[words.index(name) + 1]) for name in ("tuned", "all"))
    assert tuned == 3 and compiled == configs, output


# ----------------------------------------------------------------------------------------------
# Compiled on CUDA (skipped without a GPU)


def smooth(layer: Layer) -> Layer:
    """The layer without leaky ReLU and clamp, for gradient checks at reduced precision.

    Where a pre-activation lies within rounding error of 0 (or of the clamp bound), any
    implementation at TF32/fp16/bf16 may land on the other side than the float64 reference
    and pass 5x (or no) gradient there; on these few-hundred-pixel layers one such pixel
    moves a gradient's relative error by several percent. The kinks themselves are checked
    exactly in fp32 (IEEE) and by `test_half_precision_clamp_blocks_the_gradient`.
    """
    return dataclasses.replace(layer, activate=False, clamp=None)


# LAYERS as the half-precision tests run them: named as run, each once
SMOOTH_LAYERS = list(dict.fromkeys(smooth(layer) for layer in LAYERS))


@needs_cuda
@pytest.mark.parametrize("layer", LAYERS, ids=str)
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_compiled_fp32_matches_reference(layer, precision, monkeypatch):
    monkeypatch.setattr(op_module, "TRITON_FP32_PRECISION", precision)
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)  # one config: the large cases autotune
    check_layer(layer if precision == "ieee" else smooth(layer), torch.float32, "cuda", TOLERANCE[precision])


@pytest.mark.parametrize("layer", SMOOTH_LAYERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_reference(layer, dtype, monkeypatch):
    """Compiled on a GPU; in the interpreter without one, where the kernels' half-precision
    paths (which operands they keep in fp16/bf16, where they round) are the same code."""
    device = triton_test_device(dtype)
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)
    check_layer(layer, dtype, device, TOLERANCE[dtype])


@pytest.mark.parametrize(
    "layer",
    [
        Layer(batch=1, in_channels=70, out_channels=40, height=9, width=11, num_tokens=9, noise=None),
        Layer(batch=2, in_channels=12, out_channels=20, height=10, width=11, num_tokens=5),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_token_products_summed_a_step(layer, dtype, monkeypatch):
    """The grad-x launch's token products without box(g) by wgmma (`CONV_PRODUCTS_BOX_BY_MMA`
    off, as the 4-warp 64-wide tiles run them) in 16-bit types: grad p's products a step, as
    [K, L] += a^T u where the K block has 64 channels (40 here: wgmma-sized on a GPU), as
    [L, K] += u^T a where it has 32. Smooth layers, against float64."""
    device = triton_test_device(dtype)
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)
    monkeypatch.setattr(op_module, "CONV_PRODUCTS_BOX_BY_MMA", False)
    monkeypatch.setattr(op_module, "CONV_PRODUCTS_MIN_PROGRAMS", 1)
    launches = []
    monkeypatch.setattr(op_module, "LAUNCH_OBSERVER", lambda kernel, reads, writes: launches.append(kernel))
    check_layer(smooth(layer), dtype, device, TOLERANCE[dtype])
    assert "pixel_products" not in launches and "epilogue_products" not in launches, launches


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_random_layers_match_reference(seed, dtype, monkeypatch):
    """`random_layer`'s and `random_routes`' draws (other seeds than the fp32 test's) in fp16 and
    bf16, made smooth."""
    device = triton_test_device(dtype)
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)
    use_routes(monkeypatch, random_routes(1000 + seed))
    check_layer(smooth(random_layer(1000 + seed)), dtype, device, TOLERANCE[dtype], seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bound", [0.4, 0.7])  # neither is representable in fp16 or bf16
def test_half_precision_clamp_blocks_the_gradient(dtype, bound):
    """Pixels the clamp binds pass no gradient, also when the bound rounds below itself in
    the output's dtype. With grad_out = 1 and no activation, grad bias[c] counts the pixels
    of channel c the clamp left alone; the float64 reference's pre-activations say which.
    Compiled on a GPU, interpreted without one (the half-precision tests above are smooth:
    no clamp)."""
    device = triton_test_device(dtype)
    layer = Layer(batch=2, in_channels=16, out_channels=8, height=16, width=16, tokens=None, noise=None, activate=False)
    inputs = {k: v.to(dtype) if v is not None else None for k, v in make_inputs(layer, seed=3).items()}
    inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
    with torch.no_grad():
        pre = styled_conv2d(
            **{k: v.double().cpu() if v is not None else None for k, v in inputs.items()}, activate=False,
            backend="reference",
        )  # fmt: skip
    unclamped = (pre.abs() < bound).sum((0, 2, 3)).double()
    assert 0.2 < unclamped.sum().item() / pre.numel() < 0.8, "the clamp should bind on about half the pixels"
    bias = inputs["bias"].requires_grad_(True)
    out = styled_conv2d(**dict(inputs, bias=bias), activate=False, clamp=bound, backend="triton")
    (grad_bias,) = torch.autograd.grad(out, bias, torch.ones_like(out))
    # a pixel within rounding of the bound may fall either way: allow 2% of the pixels
    assert (grad_bias.double().cpu() - unclamped).abs().max().item() <= 0.02 * pre[:, 0].numel()


@needs_cuda
@pytest.mark.parametrize(
    "layer",
    [  # config-f-like channel counts at small sizes: many K and N tiles, several M tiles
        Layer(batch=4, in_channels=512, out_channels=512, height=8, width=8, num_tokens=32, noise="shared"),
        Layer(batch=4, in_channels=512, out_channels=256, height=16, width=16, upsample=True, num_tokens=32),
        Layer(batch=2, in_channels=32, out_channels=32, height=96, width=80, num_tokens=32, train_weight=False),
        Layer(batch=2, in_channels=64, out_channels=3, height=64, width=64, kernel=1, demodulate=False, tokens=None),
    ],
    ids=str,
)
def test_compiled_large_layers_match_reference(layer, monkeypatch):
    monkeypatch.setattr(op_module, "TRITON_FP32_PRECISION", "ieee")
    check_layer(layer, torch.float32, "cuda", TOLERANCE["ieee"])
    check_layer(layer, torch.bfloat16, "cuda", TOLERANCE[torch.bfloat16])


@needs_cuda
@pytest.mark.parametrize("loads", ["pointer, styles on A", "pointer, styles on W", "tma"])
@pytest.mark.parametrize(
    "layer",
    [  # rows of 40-96 pixels and 8-aligned channels: the stride-1 launches can take TMA
        Layer(batch=2, in_channels=64, out_channels=32, height=12, width=96, num_tokens=32, noise="shared"),
        Layer(batch=2, in_channels=32, out_channels=64, height=9, width=40, tokens="shared", clamp=0.6),
    ],
    ids=str,
)
def test_compiled_load_and_style_variants_match_reference(layer, loads, monkeypatch):
    """Each variant the autotuner chooses among, forced through the untuned path: the autotuner
    only ever runs the fastest, so a wrong but slow variant would otherwise go unnoticed."""
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)
    monkeypatch.setattr(op_module, "TRITON_FP32_PRECISION", "ieee")
    monkeypatch.setattr(op_module, "CONV_TMA", loads == "tma")
    monkeypatch.setattr(op_module, "CONV_SCALE_WEIGHT", loads != "pointer, styles on A")
    used = []
    descriptor = op_module._tma_descriptor
    monkeypatch.setattr(op_module, "_tma_descriptor", lambda *a: used.append(descriptor(*a)) or used[-1])
    check_layer(smooth(layer), torch.bfloat16, "cuda", TOLERANCE[torch.bfloat16])
    check_layer(layer, torch.float32, "cuda", TOLERANCE["ieee"])
    assert any(d is not None for d in used) == (loads == "tma"), used


@needs_cuda
def test_compiled_torch_compile_inductor():
    expected, got = compiled_block("cuda", torch.float32, "inductor")
    for value, reference in zip(got, expected):
        assert relative_error(value, reference) < 1e-4


@pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("upsample", [False, True])
def test_frozen_weight_layouts_follow_in_place_updates(upsample):
    """The kernel layouts and tap sums of a frozen weight are cached per weight tensor: an
    in-place update (an optimizer step, load_state_dict) must reach the next call."""
    device = "cuda" if HAS_CUDA else "cpu"
    layer = Layer(upsample=upsample, train_weight=False)
    inputs = {k: v.float().to(device) if v is not None else None for k, v in make_inputs(layer, seed=5).items()}
    weight = inputs["weight"]
    for step in range(2):
        x = inputs["x"].clone().requires_grad_(True)
        kwargs = dict(inputs, x=x, upsample=upsample)
        out = styled_conv2d(**kwargs, backend="triton")
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
        expected = styled_conv2d(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}, backend="reference")
        assert relative_error(out, expected) < 1e-4, step
        x64 = inputs["x"].double().requires_grad_(True)
        (expected_grad,) = torch.autograd.grad(
            styled_conv2d(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in dict(kwargs, x=x64).items()}, backend="reference"),
            x64, torch.ones_like(expected),
        )  # fmt: skip
        assert relative_error(grad_x, expected_grad) < 1e-4, step
        with torch.no_grad():
            weight.mul_(-1.5).add_(0.1)  # the next step must see the new weight


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
@pytest.mark.parametrize("disk_cache", [True, False])
def test_autotuner_keeps_its_choices_on_disk(disk_cache, monkeypatch):
    """The first 1024 px training step spent 27-75 s tuning on the H100: by default the choices
    are cached on disk (Triton's cache directory), so later processes skip that."""
    import inspect

    if "cache_results" not in inspect.signature(op_module.triton.autotune).parameters:
        pytest.skip("this Triton's autotuner has no disk cache (Triton < 3.2)")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton turns the disk cache off in the interpreter
    monkeypatch.setattr(op_module, "_conv_gemm_tuned", None)
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE_DISK_CACHE", disk_cache)
    assert op_module._tuned_conv_gemm().cache_results is disk_cache
