"""`styled_conv2d_to_rgb`: a plain StyledConv and its toRGB, with the toRGB's backward fused into
the conv's epilogue backward on the Triton backend, against the two layers run one after the
other by the float64 reference backend.

Without a GPU the Triton cases run in the interpreter (CPU tensors, fp32, fp16 and bf16); with
one they run compiled on CUDA in the same dtypes. Every case draws random inputs and random gradients for
both outputs (or for the image alone, as in the network's last block) and compares the two
outputs and every gradient by ||a - ref|| / ||ref||.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import pytest
import torch

from refinestyle_kernels import styled_conv2d_to_rgb
from refinestyle_kernels.ops import modulated_conv2d as op_module
from refinestyle_kernels.ops import styled_conv2d_to_rgb as rgb_module
from kernel_cases import bound_between_values_near_the_median, random_routes, use_routes
from triton_interpreter_bf16 import triton_test_device

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="the interpreter cases need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here: compiled kernels are tested only on a GPU")


@dataclass(frozen=True)
class Pair:
    batch: int = 2
    in_channels: int = 5
    out_channels: int = 6
    height: int = 5
    width: int = 7
    tokens: str | None = "per_sample"
    num_tokens: int = 3
    noise: bool = True
    clamp: float | None = None
    rgb_clamp: float | None = None
    rgb_channels: int = 3
    rgb_bias: bool = True
    grad_out: bool = True  # False: out feeds only the toRGB (the last block)
    train_weights: bool = True
    activate: bool = True

    def __str__(self):
        return (
            f"B{self.batch}-{self.in_channels}to{self.out_channels}to{self.rgb_channels}-{self.height}x{self.width}"
            f"-{self.tokens or 'notokens'}{'-noise' if self.noise else ''}"
            f"{f'-clamp{self.clamp}' if self.clamp else ''}{f'-rgbclamp{self.rgb_clamp}' if self.rgb_clamp else ''}"
            f"{'' if self.rgb_bias else '-nobias'}{'' if self.grad_out else '-imageonly'}"
            f"{'' if self.train_weights else '-frozen'}{'' if self.activate else '-linear'}"
        )


PAIRS = [
    Pair(),
    Pair(grad_out=False),  # the last block: out's only consumer is the toRGB
    Pair(tokens="shared", clamp=0.6, rgb_clamp=0.4, noise=False),
    Pair(tokens=None, rgb_bias=False, train_weights=False, grad_out=False, rgb_clamp=0.3),
    Pair(tokens="shared", activate=False, clamp=0.5),  # the plain op's epilogue: clamp without activation
    # a 128-wide column block in the interpreter (N > 64) and several pixel tiles
    Pair(batch=1, in_channels=9, out_channels=70, height=9, width=11, num_tokens=7, rgb_channels=4),
    # wider than one N tile: the toRGB's forward is its own launch
    Pair(batch=2, in_channels=4, out_channels=130, height=3, width=4, rgb_clamp=0.8, grad_out=False),
]


def make_inputs(pair: Pair, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inputs = dict(
        x=rand(pair.batch, pair.in_channels, pair.height, pair.width),
        weight=rand(pair.out_channels, pair.in_channels, 3, 3),
        styles=rand(pair.batch, pair.in_channels) * 0.5 + 1.0,
        p=None,
        q=None,
        noise=rand(pair.batch, 1, pair.height, pair.width) if pair.noise else None,
        noise_strength=rand(1) * 0.5 if pair.noise else None,
        bias=rand(pair.out_channels) * 0.3,
        rgb_weight=rand(pair.rgb_channels, pair.out_channels, 1, 1),
        rgb_styles=rand(pair.batch, pair.out_channels) * 0.5 + 1.0,
        rgb_bias=rand(pair.rgb_channels) * 0.3 if pair.rgb_bias else None,
    )
    if pair.tokens:
        lead = () if pair.tokens == "shared" else (pair.batch,)
        scale = (pair.num_tokens * pair.in_channels) ** -0.25
        inputs["p"] = rand(*lead, pair.num_tokens, pair.out_channels, scale=scale)
        inputs["q"] = rand(*lead, pair.num_tokens, pair.in_channels, scale=scale)
    return inputs


def column_major(value: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions' strides swapped (as a transposed view
    has them); differentiable, so the gradient reaches the contiguous leaf."""
    return value.transpose(-1, -2).contiguous().transpose(-1, -2)


# strided views a caller may pass: channels_last activations, transposed kernels and styles
STRIDED_VIEWS = {
    "x": lambda x: x.contiguous(memory_format=torch.channels_last),
    "weight": lambda w: w.transpose(0, 1).contiguous().transpose(0, 1),
    "styles": column_major,
    "p": column_major,
    "q": column_major,
    "rgb_weight": lambda w: column_major(w[:, :, 0, 0])[:, :, None, None],
    "rgb_styles": column_major,
}


def run_pair(pair: Pair, inputs: dict, backend: str, dtype, device, seed: int, strided: bool = False):
    leaves = {}
    for name, value in inputs.items():
        if value is None:
            continue
        value = value.to(device=device, dtype=dtype)
        frozen = name in ("weight", "rgb_weight", "rgb_bias") and not pair.train_weights
        if name != "noise" and not frozen:
            value.requires_grad_(True)
        leaves[name] = value
    args = {name: leaves.get(name) for name in inputs}
    if strided:
        args = {name: STRIDED_VIEWS[name](value) if name in STRIDED_VIEWS and value is not None else value
                for name, value in args.items()}  # fmt: skip
    out, rgb = styled_conv2d_to_rgb(
        **args, activate=pair.activate, clamp=pair.clamp, rgb_clamp=pair.rgb_clamp, backend=backend
    )
    gen = torch.Generator().manual_seed(seed)
    grad_rgb = torch.randn(rgb.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    outputs, grads = [rgb], [grad_rgb]
    if pair.grad_out:
        outputs.append(out)
        grads.append(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
    wanted = [name for name, value in leaves.items() if value.requires_grad]
    results = torch.autograd.grad(outputs, [leaves[name] for name in wanted], grads)
    return out, rgb, dict(zip(wanted, results))


def relative_error(value, reference) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return ((value - reference).norm() / reference.norm()).item()


def check_pair(pair: Pair, dtype, device, tolerance: float, seed: int = 0, strided: bool = False):
    inputs = {k: v.to(dtype).double() if v is not None else None for k, v in make_inputs(pair, seed).items()}
    out_ref, rgb_ref, grads_ref = run_pair(pair, inputs, "reference", torch.float64, "cpu", seed + 1)
    for bound, value in ((pair.clamp, out_ref), (pair.rgb_clamp, rgb_ref)):
        if bound:  # both sides of each clamp are exercised
            clamped = value.abs() >= bound
            assert clamped.any() and not clamped.all(), "the case's clamp never or always binds"
    out, rgb, grads = run_pair(pair, inputs, "triton", dtype, device, seed + 1, strided=strided)
    assert set(grads) == set(grads_ref)
    errors = {"out": relative_error(out, out_ref), "rgb": relative_error(rgb, rgb_ref)}
    for name, grad in grads.items():
        assert grad.shape == grads_ref[name].shape, name
        errors[name] = relative_error(grad, grads_ref[name])
    bad = {name: error for name, error in errors.items() if not error <= tolerance}
    assert not bad, f"{pair}: relative errors above {tolerance}: {bad} (all: {errors})"


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    monkeypatch.setattr(op_module, "POISON_BUFFERS", True)


@needs_interpreter
@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_interpreted_pair_matches_the_two_reference_layers(pair):
    check_pair(pair, torch.float32, "cpu", 2e-5)


@needs_interpreter
@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[1], PAIRS[3], PAIRS[5]], ids=str)
def test_interpreted_pair_sums_the_torgb_over_several_pixel_blocks_a_program(pair, monkeypatch):
    """The toRGB's per-sample sums (its weight and style gradients) when each epilogue backward
    program walks 3 pixel blocks of 1-4 pixels, some past the image."""
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_BLOCK_VALUES", 64)
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MAX_TILES", 3)
    monkeypatch.setattr(op_module, "EPILOGUE_BACKWARD_MIN_PROGRAMS", 1)
    check_pair(pair, torch.float32, "cpu", 2e-5)


@needs_interpreter
@pytest.mark.parametrize("pair", [PAIRS[0], PAIRS[2], PAIRS[5]], ids=str)
def test_interpreted_pair_reads_strided_views(pair):
    """channels_last x and transposed views of the kernels, styles and tokens (`STRIDED_VIEWS`),
    the toRGB's included: its mix of rgb_weight and rgb_styles is read as one contiguous array."""
    check_pair(pair, torch.float32, "cpu", 2e-5, strided=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bound", [0.4, 0.7])  # neither is representable in fp16 or bf16
def test_half_precision_rgb_clamp_blocks_the_gradient(dtype, bound):
    """The toRGB's clamp, as the conv's own: pixels it binds pass no gradient, also when the
    bound rounds below itself in the output's dtype. With grad_rgb = 1, grad rgb_bias[k] counts
    the pixels of image channel k the clamp left alone, and the conv's gradients are those of
    the unclamped pair given that mask as grad_rgb (the float64 reference says which pixels).
    Compiled on a GPU, interpreted without one."""
    device = triton_test_device(dtype)
    pair = Pair(batch=2, in_channels=8, out_channels=8, height=12, width=12, tokens=None, noise=False,
                activate=False)  # fmt: skip
    inputs = {k: v.to(dtype) if v is not None else None for k, v in make_inputs(pair, seed=5).items()}
    wide = {k: v.double() if v is not None else None for k, v in inputs.items()}
    bias = wide["bias"].requires_grad_(True)
    _, rgb = styled_conv2d_to_rgb(**dict(wide, bias=bias), activate=False, backend="reference")
    unclamped = (rgb.detach().abs() < bound).double()
    assert 0.2 < unclamped.mean().item() < 0.8, "the clamp should bind on about half the pixels"
    (expected_bias_grad,) = torch.autograd.grad(rgb, bias, unclamped)
    inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
    bias, rgb_bias = inputs["bias"].requires_grad_(True), inputs["rgb_bias"].requires_grad_(True)
    _, rgb = styled_conv2d_to_rgb(**dict(inputs, bias=bias, rgb_bias=rgb_bias), activate=False, rgb_clamp=bound,
                                  backend="triton")  # fmt: skip
    bias_grad, rgb_bias_grad = torch.autograd.grad(rgb, (bias, rgb_bias), torch.ones_like(rgb))
    # a pixel within rounding of the bound may fall either way: allow 2% of the pixels
    assert (rgb_bias_grad.double().cpu() - unclamped.sum((0, 2, 3))).abs().max().item() <= 0.02 * rgb[:, 0].numel()
    assert relative_error(bias_grad, expected_bias_grad) < 5e-2  # the mask inside the conv's epilogue backward


def random_pair(seed: int) -> Pair:
    """A conv + toRGB pair drawn at random: channel counts from 1 to past one 128-wide N tile (the
    toRGB then leaves the conv's epilogue), any size, token and epilogue setting; a drawn clamp
    is set by the test, where it binds. At least two input channels, as in `random_layer` of
    test_kernels_triton.py."""
    rng = random.Random(seed)
    return Pair(
        batch=rng.randint(1, 3), in_channels=rng.randint(2, 72), out_channels=rng.choice([1, 3, 8, 33, 64, 70, 130]),
        height=rng.randint(1, 10), width=rng.randint(1, 10), tokens=rng.choice([None, "shared", "per_sample"]),
        num_tokens=rng.choice([1, 3, 16, 65]), noise=rng.random() < 0.6, clamp=1.0 if rng.random() < 0.3 else None,
        rgb_clamp=1.0 if rng.random() < 0.3 else None, rgb_channels=rng.choice([1, 3, 4]),
        rgb_bias=rng.random() < 0.7, grad_out=rng.random() < 0.5, train_weights=rng.random() < 0.5,
        activate=rng.random() < 0.7,
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("seed", range(8))
def test_interpreted_random_pairs_match_the_two_reference_layers(seed, monkeypatch):
    """Combinations no hand-written case names (`random_pair`, and the routes of
    `kernel_cases.random_routes`, the toRGB in its conv's epilogue or not); a drawn clamp is set between two |values|
    near the median of what it clamps in the reference, so that it binds on about half of them and
    on none exactly at the bound."""
    pair = random_pair(seed)
    inputs = {k: v.float().double() if v is not None else None for k, v in make_inputs(pair, seed).items()}
    if pair.clamp is not None:
        out, _, _ = run_pair(dataclasses.replace(pair, clamp=None, rgb_clamp=None), inputs, "reference",
                             torch.float64, "cpu", seed + 1)  # fmt: skip
        pair = dataclasses.replace(pair, clamp=bound_between_values_near_the_median(out))
    if pair.rgb_clamp is not None:
        _, rgb, _ = run_pair(dataclasses.replace(pair, rgb_clamp=None), inputs, "reference", torch.float64, "cpu", seed + 1)
        pair = dataclasses.replace(pair, rgb_clamp=bound_between_values_near_the_median(rgb))
    use_routes(monkeypatch, random_routes(seed))
    check_pair(pair, torch.float32, "cpu", 1e-4, seed=seed)  # as the random layers', for sums that cancel


@needs_interpreter
@pytest.mark.parametrize(
    "pair", [Pair(train_weights=False), Pair(tokens="shared", train_weights=False, grad_out=False)], ids=str
)
def test_deferred_demodulation_in_the_pair(pair, monkeypatch):
    """Frozen weights in eager training: the pair's Function runs the conv's demodulation
    backward itself (no `_TritonDemodulation` node), with the reference's gradients."""
    applied = []
    apply = op_module._TritonDemodulation.apply
    monkeypatch.setattr(op_module._TritonDemodulation, "apply", lambda *a: applied.append(1) or apply(*a))
    check_pair(pair, torch.float32, "cpu", 2e-5, seed=4)
    assert not applied


@needs_interpreter
@pytest.mark.parametrize(
    "out_channels, rgb_channels, switched_off, forward_launches",
    [(6, 3, False, 1), (130, 3, False, 2), (6, 3, True, 2), (6, 16, False, 1), (6, 17, False, 2)],
)
def test_the_toRGB_runs_inside_the_conv_launches(out_channels, rgb_channels, switched_off, forward_launches, monkeypatch):
    """Forward: the toRGB is computed in the conv's epilogue where one tile holds every channel
    (at most RGB_EPILOGUE_MAX_COUT; 0 switches it off) and the toRGB has at most
    RGB_EPILOGUE_MAX_CHANNELS (16, its dot's width), else it is a second launch; either way the
    results match the reference. Backward: one epilogue-backward launch serves both layers, and
    nothing runs the toRGB's own transposed conv: the backward launches only the conv's grad-x
    kernel."""
    if switched_off:
        monkeypatch.setattr(op_module, "RGB_EPILOGUE_MAX_COUT", 0)
    pair = Pair(tokens=None, noise=False, out_channels=out_channels, height=3, width=4, rgb_channels=rgb_channels)
    check_pair(pair, torch.float32, "cpu", 2e-5, seed=8)
    inputs = make_inputs(pair)
    launches = []
    previous = op_module.LAUNCH_OBSERVER
    op_module.LAUNCH_OBSERVER = lambda kernel, reads, writes: launches.append(kernel)
    try:
        leaves = {k: v.float().requires_grad_(k != "noise") for k, v in inputs.items() if v is not None}
        args = {name: leaves.get(name) for name in inputs}
        out, rgb = styled_conv2d_to_rgb(**args, backend="triton")
        forward = list(launches)
        launches.clear()
        torch.autograd.grad([out, rgb], list(leaves.values()), [torch.ones_like(out), torch.ones_like(rgb)])
    finally:
        op_module.LAUNCH_OBSERVER = previous
    assert forward.count("conv_gemm[mode 0]") == forward_launches, forward
    assert launches.count("epilogue_backward") == 1, launches
    assert launches.count("conv_gemm[mode 0]") == 1, launches  # grad x of the conv only


@needs_interpreter
def test_inference_runs_the_fused_forward():
    """Without gradients the pair is still one launch, with the reference's results."""
    pair = Pair()
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(pair).items()}
    launches = []
    previous = op_module.LAUNCH_OBSERVER
    op_module.LAUNCH_OBSERVER = lambda kernel, reads, writes: launches.append(kernel)
    try:
        with torch.no_grad():
            out, rgb = styled_conv2d_to_rgb(**inputs, backend="triton")
    finally:
        op_module.LAUNCH_OBSERVER = previous
    assert launches.count("conv_gemm[mode 0]") == 1, launches
    out_ref, rgb_ref = styled_conv2d_to_rgb(**make_inputs(pair), backend="reference")
    assert relative_error(out, out_ref) < 2e-5 and relative_error(rgb, rgb_ref) < 2e-5


@needs_interpreter
def test_batches_past_the_launch_limit_compose_the_two_layers(monkeypatch):
    pair = Pair()
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(pair).items()}
    inputs["styles"].requires_grad_(True)  # a training call: the pair's autograd.Function (inference skips it)
    calls = []
    monkeypatch.setattr(rgb_module._StyledConv2dToRGBFunction, "apply", lambda *a: calls.append(a) or (None, None))
    monkeypatch.setattr(rgb_module, "MAX_LAUNCH_BATCH", 1)  # batch 2 runs in chunks, layer by layer
    out, rgb = styled_conv2d_to_rgb(**inputs, backend="triton")
    assert not calls and out.shape == (2, 6, 5, 7) and rgb.shape == (2, 3, 5, 7)
    monkeypatch.setattr(rgb_module, "MAX_LAUNCH_BATCH", 2)
    styled_conv2d_to_rgb(**inputs, backend="triton")
    assert len(calls) == 1


def test_other_backends_compose_the_two_layers():
    pair = Pair()
    inputs = make_inputs(pair)
    out, rgb = styled_conv2d_to_rgb(**inputs, backend="torch")
    from refinestyle_kernels import styled_conv2d

    conv_args = {k: v for k, v in inputs.items() if not k.startswith("rgb_")}
    expected = styled_conv2d(**conv_args, backend="reference")
    expected_rgb = styled_conv2d(
        expected, inputs["rgb_weight"], inputs["rgb_styles"], bias=inputs["rgb_bias"], activate=False,
        demodulate=False, backend="reference",
    )  # fmt: skip
    assert relative_error(out, expected) < 1e-12 and relative_error(rgb, expected_rgb) < 1e-12


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rgb_weight=torch.zeros(3, 5, 1, 1)), r"rgb_weight: expected \[K, Cout=6, 1, 1\]"),
        (dict(rgb_weight=torch.zeros(3, 6, 3, 3)), r"rgb_weight: expected \[K, Cout=6, 1, 1\]"),
        (dict(rgb_styles=torch.zeros(2, 5)), r"rgb_styles: expected \[B=2, Cout=6\]"),
        (dict(rgb_styles=torch.zeros(6)), r"rgb_styles: expected \[B=2, Cout=6\]"),
        (dict(rgb_bias=torch.zeros(4)), r"rgb_bias: expected \[K=3\]"),
        (dict(rgb_clamp=-1.0), r"rgb_clamp: expected None or a positive finite number"),
        (dict(rgb_scale=0.0), r"rgb_scale: expected None or a positive finite number"),
        (dict(bias=torch.zeros(5)), r"bias: expected \[Cout=6\]"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(Pair()).items()}
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        styled_conv2d_to_rgb(**inputs, backend="torch")


def test_mismatched_dtype_is_a_type_error():
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(Pair()).items()}
    inputs["rgb_styles"] = inputs["rgb_styles"].double()
    with pytest.raises(TypeError, match="rgb_styles: expected dtype torch.float32"):
        styled_conv2d_to_rgb(**inputs, backend="torch")


@needs_cuda
@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_compiled_fp32_pair_matches_the_two_reference_layers(pair, monkeypatch):
    monkeypatch.setattr(op_module, "TRITON_FP32_PRECISION", "ieee")
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)
    check_pair(pair, torch.float32, "cuda", 1e-4)


# PAIRS without the activation's kink and the clamps, named as run, each once: as in
# test_kernels_triton.py, a pre-activation within rounding of a kink lands on either side in
# half precision (the clamps in half precision: test_half_precision_rgb_clamp_blocks_the_gradient)
SMOOTH_PAIRS = list(dict.fromkeys(dataclasses.replace(p, activate=False, clamp=None, rgb_clamp=None) for p in PAIRS))


@pytest.mark.parametrize("pair", SMOOTH_PAIRS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_pair_matches_the_two_reference_layers(pair, dtype, monkeypatch):
    """Compiled on a GPU, in the interpreter without one."""
    device = triton_test_device(dtype)
    monkeypatch.setattr(op_module, "TRITON_AUTOTUNE", False)
    check_pair(pair, dtype, device, 1e-2 if dtype == torch.float16 else 3e-2)


def module_pair(backend: str, dtype=torch.float32):
    """A plain StyledConv with per-sample tokens, its ToRGB (with a skip input) and inputs."""
    import refinestyle_kernels

    torch.manual_seed(0)
    conv = refinestyle_kernels.StyledConv(6, 5, 3, 8, backend=backend).to(dtype)
    to_rgb = refinestyle_kernels.ToRGB(5, 8, backend=backend).to(dtype)
    with torch.no_grad():  # non-trivial biases and noise strength (rosinality starts them at 0)
        conv.activate.bias.normal_()
        conv.noise.weight.fill_(0.4)
        to_rgb.bias.normal_()
    conv.requires_grad_(False)
    to_rgb.requires_grad_(False)
    x = torch.randn(2, 6, 4, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 8, dtype=dtype, requires_grad=True)
    w_rgb = torch.randn(2, 8, dtype=dtype, requires_grad=True)
    p = (0.3 * torch.randn(2, 3, 5, dtype=dtype)).requires_grad_(True)
    q = (0.3 * torch.randn(2, 3, 6, dtype=dtype)).requires_grad_(True)
    noise = torch.randn(2, 1, 4, 6, dtype=dtype)
    skip = torch.randn(2, 3, 2, 3, dtype=dtype, requires_grad=True)
    return conv, to_rgb, (x, w, w_rgb, p, q, noise, skip)


def pair_outputs_and_gradients(run, inputs):
    x, w, w_rgb, p, q, noise, skip = inputs
    out, image = run(x, w, w_rgb, p, q, noise, skip)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, image)]
    leaves = [x, w, w_rgb, p, q, skip]
    return (out, image, *torch.autograd.grad([out, image], leaves, grads))


@needs_interpreter
def test_forward_to_rgb_is_the_two_module_calls():
    """The generator's fused call gives the results and gradients of calling the StyledConv,
    then the ToRGB on its output with the skip input (both as separate Triton layers)."""
    conv, to_rgb, inputs = module_pair("triton")

    def fused(x, w, w_rgb, p, q, noise, skip):
        return conv.forward_to_rgb(to_rgb, x, w, w_rgb, skip, noise=noise, p=p, q=q)

    def separate(x, w, w_rgb, p, q, noise, skip):
        out = conv(x, w, noise, p, q)
        return out, to_rgb(out, w_rgb, skip)

    for got, expected in zip(pair_outputs_and_gradients(fused, inputs), pair_outputs_and_gradients(separate, inputs)):
        assert relative_error(got, expected) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("grad_out", [True, False], ids=["both-outputs", "image-only"])
def test_torch_compile_traces_the_pair_as_one_custom_op(grad_out):
    """Under torch.compile(fullgraph=True) the pair is one custom op with its own backward op:
    the same launches as eager mode (one conv launch forward, one epilogue-backward launch
    for both layers) and the same results, also when only the image is differentiated."""
    conv, to_rgb, inputs = module_pair("triton")
    conv.requires_grad_(True)  # every gradient of the pair: the conv's and the toRGB's weights too
    to_rgb.requires_grad_(True)

    def fused(x, w, w_rgb, p, q, noise, skip):
        out, image = conv.forward_to_rgb(to_rgb, x, w, w_rgb, skip, noise=noise, p=p, q=q)
        return (out, image) if grad_out else (out.detach(), image)

    def run(function):
        launches = []
        previous = op_module.LAUNCH_OBSERVER
        op_module.LAUNCH_OBSERVER = lambda kernel, reads, writes: launches.append(kernel)
        try:
            x, w, w_rgb, p, q, noise, skip = inputs
            out, image = function(x, w, w_rgb, p, q, noise, skip)
            gen = torch.Generator().manual_seed(3)
            outputs = [image, out] if grad_out else [image]
            grads = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in outputs]
            leaves = [x, w, w_rgb, p, q, skip, *conv.parameters(), *to_rgb.parameters()]
            results = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
        finally:
            op_module.LAUNCH_OBSERVER = previous
        return (out, image, *results), launches

    expected, eager_launches = run(fused)
    torch._dynamo.reset()
    got, compiled_launches = run(torch.compile(fused, fullgraph=True, backend="aot_eager"))
    kernels = [k for k in compiled_launches if not k.startswith("aten.")]
    assert kernels == [k for k in eager_launches if not k.startswith("aten.")], (kernels, eager_launches)
    # the grad-x conv sums the token gradients (TOKEN_PRODUCTS) after the epilogue backward
    assert kernels.count("conv_gemm[mode 0]") == 2 and kernels.count("epilogue_backward") == 1, kernels
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert relative_error(a, b) < 1e-5


@needs_interpreter
def test_pair_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the pair's custom op."""
    import math

    import refinestyle_kernels

    pair = Pair(batch=2, in_channels=3, out_channels=4, height=3, width=4, num_tokens=2, clamp=0.8, rgb_clamp=0.5)
    inputs = {k: v.float() if v is not None else None for k, v in make_inputs(pair, seed=11).items()}
    scale = 1 / math.sqrt(27)
    demod = refinestyle_kernels.demodulation_coefficients(inputs["weight"], inputs["styles"], inputs["p"], inputs["q"],
                                                          scale, 1e-8)  # fmt: skip
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")] + [demod]
    args += [inputs["noise"], inputs["noise_strength"], inputs["bias"], scale, False, True, 0.8]
    args += [inputs["rgb_weight"], inputs["rgb_styles"], inputs["rgb_bias"], 0.5, 0.5]
    for index in (0, 1, 2, 3, 4, 5, 7, 8, 13, 14, 15):
        args[index] = args[index].detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.refinestyle_kernels.styled_conv2d_to_rgb_triton.default, args)
