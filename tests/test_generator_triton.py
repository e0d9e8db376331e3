"""A tiny refined generator through the Triton backend (the interpreter on CPU), forward and backward, vs torch."""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from refinestyle.generator import Generator
from refinestyle.refinement import Refinement, RefinementTokens, refinement_layer_shapes
from refinestyle_kernels.backend import triton_available
from kernel_cases import record_launches
from triton_interpreter_bf16 import triton_test_device

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton, and on the CPU the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)",
)


def test_refined_generator_triton_matches_torch_forward_and_backward(monkeypatch):
    launches = record_launches(monkeypatch)
    torch.manual_seed(0)
    generator = Generator(16, style_dim=8, n_mlp=1, channels={4: 8, 8: 6, 16: 5}).to(DEVICE)
    generator.requires_grad_(False)
    tokens = RefinementTokens.for_generator(generator, num_refined=3, num_tokens=3, scale_init=0.3)
    w_plus = torch.randn(2, generator.n_latent, 8, device=DEVICE)
    noise = [n.repeat(2, 1, 1, 1) for n in generator.make_noise()]

    results = {}
    for backend in ("triton", "torch"):
        generator.backend = backend
        tokens.zero_grad()
        latent = w_plus.clone().requires_grad_(True)
        image = generator.synthesis(latent, refinement=tokens(), noise=noise)
        image.square().mean().backward()
        results[backend] = [image.detach(), latent.grad] + [p.grad.clone() for p in tokens.parameters()]
    assert {"conv_gemm[mode 0]", "conv_gemm[mode 1]"} <= set(launches)  # the fused kernels ran, both ways
    tolerance = 1e-4  # fp32 without TF32 on a GPU too (conftest.py's exact_float32)
    for fast, slow in zip(results["triton"], results["torch"]):
        assert slow.abs().sum() > 0
        assert ((fast - slow).norm() / slow.norm()).item() < tolerance


@pytest.mark.parametrize("shared", [False, True])
def test_refined_generator_compiles_into_one_graph(shared):
    """torch.compile(fullgraph=True) of the whole refined synthesis, forward and backward: the
    benchmark's compile-triton variants compile without fullgraph, where a graph break (torch
    2.11 could not trace the autocast check of every layer) silently splits the network into
    per-layer graphs. The compiled gradients equal the eager ones."""
    torch.manual_seed(1)
    generator = Generator(16, style_dim=8, n_mlp=1, channels={4: 8, 8: 6, 16: 5}).to(DEVICE)
    generator.requires_grad_(False)
    generator.backend = "triton"
    lead = () if shared else (2,)
    shapes = refinement_layer_shapes(generator)
    p = [0.3 * torch.randn(*lead, 3, c_out, device=DEVICE) for _, c_out in shapes]
    q = [0.3 * torch.randn(*lead, 3, c_in, device=DEVICE) for c_in, _ in shapes]
    w_plus = torch.randn(2, generator.n_latent, 8, device=DEVICE)
    noise = [n.repeat(2, 1, 1, 1) for n in generator.make_noise()]

    def step(latent, p, q):
        refinement = Refinement(p, q, generator.num_layers)
        return generator.synthesis(latent, refinement=refinement, noise=noise).square().mean()

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)):
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_(True) for t in (w_plus, *p, *q)]
        run(leaves[0], leaves[1 : 1 + len(p)], leaves[1 + len(p) :]).backward()
        results.append([leaf.grad for leaf in leaves])
    # eager training defers d's gradients into the layer's own kernels, the compiled graph keeps
    # them as separate nodes: the fp32 sums differ in their order only
    for compiled, eager in zip(results[1], results[0]):
        assert eager.abs().sum() > 0
        assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_refined_generator_under_autocast_is_as_close_to_float64_as_the_reference(dtype, monkeypatch):
    """What `--bf16` training runs: the refined synthesis under autocast, forward and backward
    to w+ and the tokens. Through the Triton kernels it must land as close to the float64
    truth as the literal formula does in the same dtype: a wrong cast, a truncation or an
    intermediate kept in the wrong precision lands several times farther. Compiled on a GPU,
    interpreted on a CPU.

    The image is compared one to one. The gradients are compared by their median error: where
    a pre-activation lies within rounding of the leaky ReLU's kink, each implementation may
    pass the other slope, which moves single gradients of this tiny network by up to 50% (for
    the reference too, depending on the seed) but not the typical one."""
    device = triton_test_device(dtype)
    torch.manual_seed(2)
    generator = Generator(16, style_dim=8, n_mlp=1, channels={4: 8, 8: 6, 16: 5}).to(device)
    generator.requires_grad_(False)
    tokens = RefinementTokens.for_generator(generator, num_refined=3, num_tokens=3, scale_init=0.3).to(device)
    w_plus = torch.randn(2, generator.n_latent, 8, device=device)
    noise = [n.repeat(2, 1, 1, 1) for n in generator.make_noise()]
    gradient = torch.randn(2, 3, 16, 16, device=device)

    def run(backend: str, autocast_dtype=None):
        generator.backend = backend
        tokens.zero_grad()
        latent = w_plus.clone().requires_grad_(True)
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            image = generator.synthesis(latent, refinement=tokens(), noise=noise)
        assert image.dtype == (autocast_dtype or torch.float64)
        image.backward(gradient.to(image.dtype))
        return [image.detach(), latent.grad] + [p.grad.clone() for p in tokens.parameters()]

    generator.double()  # the truth: the literal formula in float64
    tokens.double()
    w_plus, noise, gradient = w_plus.double(), [n.double() for n in noise], gradient.double()
    truth = run("reference")
    generator.float()  # float32 parameters, as `--bf16` training keeps them
    tokens.float()
    w_plus, noise, gradient = w_plus.float(), [n.float() for n in noise], gradient.float()
    errors = {}
    launches = record_launches(monkeypatch)
    for backend in ("triton", "reference"):
        results = run(backend, dtype)
        assert backend != "triton" or {"conv_gemm[mode 0]", "conv_gemm[mode 1]"} <= set(launches)
        errors[backend] = [((r.double() - t).norm() / t.norm()).item() for r, t in zip(results, truth)]
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]  # the dtype's rounding step at 1
    fused, literal = errors["triton"], errors["reference"]
    assert fused[0] <= 2 * literal[0] + 2 * unit, ("image", errors)
    assert all(error < 1 for error in fused), errors  # finite, and no gradient lost
    assert statistics.median(fused[1:]) <= 2 * statistics.median(literal[1:]) + 2 * unit, ("gradients", errors)
