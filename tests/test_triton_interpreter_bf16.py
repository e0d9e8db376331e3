"""tests/triton_interpreter_bf16.py: the Triton interpreter, as the tests run it, computes
bfloat16 dots and float32 -> bfloat16 casts as a GPU does (checked against torch's own); and
where an interpreter gets them wrong, the op says so instead of computing (the package's probe,
`refinestyle_kernels.backend.triton_interpreter_bf16_problem`)."""
from __future__ import annotations

import os

import pytest
import torch

import triton_interpreter_bf16

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="only the interpreter (TRITON_INTERPRET=1) needs the fix"
)


def test_the_fix_is_installed_for_the_test_session():
    assert triton_interpreter_bf16.installed()
    assert triton_interpreter_bf16.install()  # a second call keeps the one fix


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, z_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        x = tl.load(x_ptr + offsets)
        tl.store(y_ptr + offsets, x.to(tl.bfloat16))  # the cast a kernel writes
        tl.store(z_ptr + offsets, x)  # the store's implicit cast to the pointer's dtype

    return dot_kernel, cast_kernel


def test_bfloat16_dot_is_the_fp32_product_of_the_values():
    dot_kernel, _ = _kernels()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen).bfloat16()
    b = torch.randn(32, 16, generator=gen).bfloat16()
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-5)


def test_float32_to_bfloat16_rounds_to_nearest_even_like_torch():
    _, cast_kernel = _kernels()
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1000, generator=gen) * 10.0 ** torch.randint(-3, 4, (1000,), generator=gen)
    # exact ties (odd and even last kept bit), values that round up into the next binade,
    # signed zeros, infinities and NaN
    ties = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2 - 2.0**-9, 255.5, 0.0, -0.0])
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    x = torch.cat([values, ties, special, torch.zeros(1024 - 1010)])
    y = torch.empty(1024, dtype=torch.bfloat16)
    z = torch.empty(1024, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, z, N=1024)
    expected = x.to(torch.bfloat16)
    nan = x.isnan()
    for got in (y, z):
        assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
        assert got[nan].isnan().all()


def _broken(monkeypatch, part: str) -> None:
    """Put one of the interpreter's bf16 faults back (as Triton 3.6-3.9 have them)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if part == "dot":
        def bit_pattern_dot(self, a, b, d, *args):
            return interpreter.TensorHandle(np.matmul(a.data, b.data, dtype=d.data.dtype) + d.data, d.dtype.scalar)

        monkeypatch.setattr(builder, "create_dot", bit_pattern_dot)
    else:
        fixed_cast, fixed_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

        def truncate(src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
                return interpreter.TensorHandle((bits >> np.uint32(16)).astype(np.uint16), tl.bfloat16)
            return None

        def cast_impl(self, src, dst_type):
            truncated = truncate(src, dst_type)
            return fixed_cast(self, src, dst_type) if truncated is None else truncated

        def fp_to_fp(self, src, dst_type, rounding_mode):
            truncated = truncate(src, dst_type)
            return fixed_fp_to_fp(self, src, dst_type, rounding_mode) if truncated is None else truncated

        monkeypatch.setattr(builder, "cast_impl", cast_impl)
        monkeypatch.setattr(builder, "create_fp_trunc", cast_impl)
        monkeypatch.setattr(builder, "create_fp_to_fp", fp_to_fp)


@pytest.mark.parametrize("part", ["dot", "cast"])
def test_the_op_refuses_bfloat16_where_the_interpreter_gets_it_wrong(part, monkeypatch):
    """A user debugging in the interpreter (say, autocast to bf16 on the CPU) gets an error that
    says why, not numbers near 1e10 or quietly truncated ones."""
    from refinestyle_kernels import backend, styled_conv2d

    monkeypatch.setattr(backend, "_probes", {})  # probe afresh, and again after the test
    assert backend.triton_interpreter_bf16_problem() is None  # with the tests' fix
    _broken(monkeypatch, part)
    monkeypatch.setattr(backend, "_probes", {})
    problem = backend.triton_interpreter_bf16_problem()
    assert problem and "triton-lang/triton#11584" in problem
    x, weight, styles = torch.randn(1, 4, 3, 3), torch.randn(4, 4, 3, 3), torch.randn(1, 4)
    with pytest.raises(RuntimeError, match=r'x: backend="triton" on bfloat16 CPU tensors: .*bfloat16 wrongly'):
        styled_conv2d(x.bfloat16(), weight.bfloat16(), styles.bfloat16(), backend="triton")
    # float32 and float16 are unaffected
    for dtype in (torch.float32, torch.float16):
        out = styled_conv2d(x.to(dtype), weight.to(dtype), styles.to(dtype), backend="triton")
        expected = styled_conv2d(x.to(dtype).double(), weight.to(dtype).double(), styles.to(dtype).double(), backend="reference")
        assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-3
