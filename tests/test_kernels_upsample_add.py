"""`upsample_add` (base + upfirdn2d(x, kernel, up, pad), the toRGB skip branch): the Triton
kernels against the float64 PyTorch reference, forward and both gradients, on random inputs.

Without a GPU the Triton cases run in the interpreter (CPU tensors); with one, compiled on CUDA.
Each case compares by ||a - ref|| / ||ref||.
"""
from __future__ import annotations

import pytest
import torch

from refinestyle_kernels import ToRGB, make_blur_kernel
from refinestyle_kernels.ops import upsample_add as upsample_module
from refinestyle_kernels.ops.upsample_add import reference_upsample_add, upsample_add
from triton_interpreter_bf16 import triton_test_device

SKIP_KERNEL = make_blur_kernel([1, 3, 3, 1]) * 4  # rosinality's Upsample.kernel


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (B, C, H, W, up, pad, kernel shape or None for the skip's): the skip's own shape at two sizes
# (past one forward tile of 4 x 128 and one backward tile of 4 x 64 both ways), odd sizes,
# other factors, cropping pads, non-square and non-separable filters
CASES = [
    (2, 3, 4, 4, 2, (2, 1), None),
    (1, 3, 10, 70, 2, (2, 1), None),
    (2, 2, 5, 7, 2, (1, 1), (4, 4)),
    (1, 2, 6, 5, 3, (1, -1), (3, 5)),
    (2, 1, 3, 3, 1, (1, 1), (3, 3)),
    (1, 2, 9, 33, 2, (-1, 2), (4, 2)),
    (1, 1, 2, 3, 4, (3, 3), (8, 8)),
]


def make_case(case, dtype, device, seed=0):
    batch, channels, height, width, up, pad, kernel_shape = case
    generator = torch.Generator().manual_seed(seed)
    kernel = SKIP_KERNEL if kernel_shape is None else torch.randn(kernel_shape, generator=generator)
    x = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    out_h = height * up + pad[0] + pad[1] - kernel.shape[0] + 1
    out_w = width * up + pad[0] + pad[1] - kernel.shape[1] + 1
    base = torch.randn(batch, channels, out_h, out_w, generator=generator, dtype=torch.float64)
    grad = torch.randn(batch, channels, out_h, out_w, generator=generator, dtype=torch.float64)
    return x, kernel.double(), base, grad, (x, kernel, base, grad)


def run(fn, x, kernel, base, grad, dtype, device, **options):
    x = x.detach().to(device, dtype, copy=True).requires_grad_(True)
    base = base.detach().to(device, dtype, copy=True).requires_grad_(True) if base is not None else None
    out = fn(x, kernel.to(device, dtype if dtype != torch.float64 else torch.float64), base, **options)
    out.backward(grad.to(device, dtype))
    return out.detach(), x.grad, (base.grad if base is not None else None)


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}-{c[2]}x{c[3]}-up{c[4]}-pad{c[5][0]}_{c[5][1]}")
def test_triton_matches_the_float64_reference(case, with_base):
    device = triton_test_device(torch.float32)
    x, kernel, base, grad, _ = make_case(case, torch.float32, device)
    base = base if with_base else None
    up, pad = case[4], case[5]
    truth = run(reference_upsample_add, x, kernel, base, grad, torch.float64, "cpu", up=up, pad=pad)
    got = run(upsample_add, x, kernel.float(), base, grad, torch.float32, device, up=up, pad=pad, backend="triton")
    assert got[0].shape == truth[0].shape and got[0].dtype == torch.float32
    for name, a, b in zip(("out", "grad x", "grad base"), got, truth):
        if b is None:
            assert a is None
            continue
        assert relative_error(a.cpu(), b) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types_round_once_and_stay_within_the_references_rounding(dtype, monkeypatch):
    """In a half type the kernel sums in fp32 and rounds once (the reference rounds the
    upsample and then the sum): at most the reference's own error in that dtype, with margin."""
    device = triton_test_device(dtype)
    launched = []
    launch = upsample_module._launch_upsample_add
    monkeypatch.setattr(upsample_module, "_launch_upsample_add", lambda *a: launched.append(1) or launch(*a))
    x, kernel, base, grad, _ = make_case((2, 3, 8, 12, 2, (2, 1), None), dtype, device, seed=3)
    truth = run(reference_upsample_add, x, kernel, base, grad, torch.float64, "cpu", up=2, pad=(2, 1))
    half_reference = run(reference_upsample_add, x, kernel, base, grad, dtype, "cpu", up=2, pad=(2, 1))
    got = run(upsample_add, x, kernel.to(dtype), base, grad, dtype, device, up=2, pad=(2, 1), backend="triton")
    assert launched  # the kernel ran (not the reference path)
    for a, own, b in zip(got, half_reference, truth):
        assert a.dtype == dtype
        assert relative_error(a.cpu(), b) <= 2 * relative_error(own, b) + 1e-3


def test_strided_inputs_are_read_as_they_are():
    """x as a channel slice of a wider tensor, base and the output gradient channels last: no
    copy needed, same results."""
    device = triton_test_device(torch.float32)
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 5, 6, 10, generator=generator)
    x = wide[:, 1:4]
    base = torch.randn(2, 3, 12, 20, generator=generator).contiguous(memory_format=torch.channels_last)
    kernel = SKIP_KERNEL
    truth = reference_upsample_add(x.double(), kernel.double(), base.double())
    got = upsample_add(x.to(device), kernel.to(device), base.to(device), backend="triton")
    assert relative_error(got.cpu(), truth) < 1e-6
    # and a channels-last output gradient (as the next layer's backward may send it)
    grad = torch.randn(2, 3, 12, 20, generator=generator).contiguous(memory_format=torch.channels_last)
    x_leaf = x.detach().double().requires_grad_(True)
    (truth_grad,) = torch.autograd.grad(reference_upsample_add(x_leaf, kernel.double(), None), x_leaf, grad.double())
    x_leaf = x.detach().to(device).requires_grad_(True)
    out = upsample_add(x_leaf, kernel.to(device), None, backend="triton")
    (got_grad,) = torch.autograd.grad(out, x_leaf, grad.to(device))
    assert not grad.is_contiguous() and relative_error(got_grad.cpu(), truth_grad) < 1e-6


def test_gradient_of_a_trained_kernel_goes_through_the_reference():
    """A filter that requires a gradient (never StyleGAN2's buffer) takes the PyTorch path, which
    differentiates it; so do "torch" and "reference"."""
    device = triton_test_device(torch.float32)
    x, kernel, base, grad, _ = make_case((1, 2, 4, 5, 2, (2, 1), (4, 4)), torch.float32, device, seed=7)
    kernel = kernel.float().to(device).requires_grad_(True)
    out = upsample_add(x.float().to(device), kernel, base.float().to(device), backend="triton")
    out.backward(grad.float().to(device))
    truth_kernel = kernel.detach().double().cpu().requires_grad_(True)
    reference_upsample_add(x, truth_kernel, base).backward(grad)
    assert relative_error(kernel.grad.cpu(), truth_kernel.grad) < 1e-5
    for backend in ("torch", "reference"):
        assert torch.equal(
            upsample_add(x, kernel.detach().double().cpu(), base, backend=backend),
            reference_upsample_add(x, kernel.detach().double().cpu(), base),
        )


def test_switched_off_the_triton_backend_runs_the_reference(monkeypatch):
    """UPSAMPLE_ADD_TRITON = False (the A/B switch) launches nothing."""
    device = triton_test_device(torch.float32)
    launched = []
    monkeypatch.setattr(upsample_module, "_upsample_add_forward", lambda *a: launched.append(a))
    x = torch.randn(1, 3, 4, 4, device=device)
    monkeypatch.setattr(upsample_module, "UPSAMPLE_ADD_TRITON", False)
    out = upsample_add(x, SKIP_KERNEL.to(device), backend="triton")
    assert out.shape == (1, 3, 8, 8) and not launched
    monkeypatch.setattr(upsample_module, "UPSAMPLE_ADD_TRITON", True)
    upsample_add(x, SKIP_KERNEL.to(device), backend="triton")
    assert launched


def test_meta_tensors_get_the_output_shape_and_launch_nothing():
    x = torch.empty(2, 3, 16, 16, device="meta")
    base = torch.empty(2, 3, 32, 32, device="meta", requires_grad=True)
    out = upsample_add(x.requires_grad_(True), SKIP_KERNEL.to("meta"), base, backend="triton")
    assert out.shape == (2, 3, 32, 32) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, k, b: upsample_add(x[0], k, b), "x: expected a [B, C, H, W] tensor"),
        (lambda x, k, b: upsample_add(x.int(), k, b), "x: expected a floating-point tensor"),
        (lambda x, k, b: upsample_add(x, k[0], b), "kernel: expected a non-empty [kh, kw] tensor"),
        (lambda x, k, b: upsample_add(x, k, b[:, :2]), "base: expected [B, C, OH, OW] = [2, 3, 8, 10]"),
        (lambda x, k, b: upsample_add(x, k, b.double()), "base: expected x's dtype"),
        (lambda x, k, b: upsample_add(x, k, b, up=0), "up: expected a positive integer"),
        (lambda x, k, b: upsample_add(x, k, b, pad=(1,)), "pad: expected (before, after) integers"),
        (lambda x, k, b: upsample_add(x, k, None, pad=(-5, -5)), "leaves no output pixels"),
        (lambda x, k, b: upsample_add(x, k, b, backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_named(call, message):
    x = torch.randn(2, 3, 4, 5)
    base = torch.randn(2, 3, 8, 10)
    with pytest.raises((ValueError, TypeError)) as info:
        call(x, SKIP_KERNEL, base)
    assert message in str(info.value)


def test_custom_ops_pass_opcheck():
    """Schema, fake implementations and autograd registration of the ops torch.compile sees."""
    device = triton_test_device(torch.float32)
    taps = SKIP_KERNEL.flip(0, 1).contiguous().to(device)
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    base = torch.randn(2, 3, 8, 10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.refinestyle_kernels.upsample_add_triton.default, (x, taps, base, 2, 2, 1))
    torch.library.opcheck(torch.ops.refinestyle_kernels.upsample_add_triton.default, (x, taps, None, 2, 2, 1))
    grad = torch.randn(2, 3, 8, 10, device=device)
    torch.library.opcheck(torch.ops.refinestyle_kernels.upsample_add_triton_backward.default, (grad, taps, 2, 2, 4, 5))


def test_torgb_skip_branch_matches_across_backends():
    """ToRGB's skip branch on the Triton backend (through `upsample_add`) against the float64
    reference backend: the image and the gradient reaching the skip."""
    device = triton_test_device(torch.float32)
    torch.manual_seed(0)
    layer = ToRGB(6, 8)
    with torch.no_grad():
        layer.bias.normal_()
    reference = layer.double()
    triton_layer = ToRGB(6, 8, backend="triton").to(device)
    triton_layer.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    reference.backend = "reference"
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    style = torch.randn(2, 8, dtype=torch.float64)
    skip = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    grad = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    truth_skip = skip.clone().requires_grad_(True)
    truth = reference(x, style, truth_skip)
    truth.backward(grad)
    got_skip = skip.float().to(device).requires_grad_(True)
    got = triton_layer(x.float().to(device), style.float().to(device), got_skip)
    got.backward(grad.float().to(device))
    assert relative_error(got.detach().cpu(), truth.detach()) < 1e-5
    assert relative_error(got_skip.grad.cpu(), truth_skip.grad) < 1e-5


def test_compiled_torgb_keeps_the_skip_kernels_in_one_graph(monkeypatch):
    """torch.compile (fullgraph) of a Triton ToRGB with a skip: the custom ops trace without a
    break and give the eager results. Backend "aot_eager" runs the aten graph without Inductor."""
    device = triton_test_device(torch.float32)
    calls = []
    forward = upsample_module._upsample_add_forward
    monkeypatch.setattr(upsample_module, "_upsample_add_forward", lambda *a: calls.append(1) or forward(*a))
    torch.manual_seed(1)
    layer = ToRGB(4, 8, backend="triton").to(device)
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    style = torch.randn(2, 8, device=device)
    skip = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    eager = layer(x, style, skip)
    eager_grads = torch.autograd.grad(eager.square().sum(), (x, skip))
    compiled = torch.compile(lambda *args: layer(*args), backend="aot_eager", fullgraph=True)
    out = compiled(x, style, skip)
    grads = torch.autograd.grad(out.square().sum(), (x, skip))
    assert len(calls) >= 2  # the compiled graph ran the kernel too
    assert relative_error(out.detach(), eager.detach()) < 1e-6
    for a, b in zip(grads, eager_grads):
        assert relative_error(a, b) < 1e-6
