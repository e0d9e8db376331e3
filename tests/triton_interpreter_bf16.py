"""Make the Triton interpreter compute bfloat16 as a GPU does (tests only).

The interpreter keeps bfloat16 tensors as their uint16 bit patterns, and the maintainers call
bfloat16 arithmetic unsupported in it (triton-lang/triton#11584). Two of its operations matter
to our kernels, which do every other piece of arithmetic in fp32 after a cast:

- tl.dot multiplies the integer bit patterns (values near 1e10 for inputs near 1). A GPU's
  bf16 tensor-core product is exact and accumulates in fp32; converting both operands to fp32
  and multiplying in fp32 does the same.
- A float32 -> bfloat16 cast truncates (rounds toward zero), where the GPU rounds to nearest
  even. Truncation doubles the error of every bf16 store and biases it toward zero, so a layer
  came out twice as far from the float64 truth as on a GPU, and a small network four times.

With both fixed, the kernels' bf16 paths (which operands they keep in bf16, where they round)
can be checked on a CPU against the float64 reference, as on a GPU.
"""
from __future__ import annotations

import numpy as np


def _value(handle, bfloat16) -> np.ndarray:
    if handle.dtype.scalar == bfloat16:
        # bfloat16 is the top half of a float32: widening is exact
        return (handle.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return handle.data


def install() -> bool:
    """Patch the interpreter's tl.dot for bfloat16 operands; False where its internals differ
    from what this patch expects (then bfloat16 cases cannot run in the interpreter)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle_type = getattr(interpreter, "TensorHandle", None)
    original = getattr(builder, "create_dot", None)
    if original is None or handle_type is None:
        return False
    if getattr(original, "_refinestyle_bf16", False):
        return True

    def create_dot(self, a, b, d, *args, **kwargs):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original(self, a, b, d, *args, **kwargs)
        product = np.matmul(_value(a, tl.bfloat16), _value(b, tl.bfloat16), dtype=d.data.dtype)
        return handle_type(product + d.data, d.dtype.scalar)

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle_type(_round_to_bfloat16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    original_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        rtz = getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and (rtz is None or rounding_mode != rtz.RTZ):
            return handle_type(_round_to_bfloat16(src.data), tl.bfloat16)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    create_dot._refinestyle_bf16 = True
    builder.create_dot = create_dot
    # fp_trunc is an alias of cast_impl bound at class creation: rebind it too
    builder.cast_impl = builder.create_fp_trunc = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    return True


def _round_to_bfloat16(data: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(data)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def installed() -> bool:
    """Whether the interpreter's tl.dot now computes bfloat16 operands by value."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    return getattr(getattr(builder, "create_dot", None), "_refinestyle_bf16", False)


def triton_test_device(dtype) -> str:
    """The device a Triton test runs `dtype` on: "cuda" (compiled) where there is a GPU, else
    "cpu" in the interpreter; skips the test where neither can run it."""
    import os

    import pytest
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA GPU and no Triton interpreter (TRITON_INTERPRET=1)")
    if dtype == torch.bfloat16 and not installed():
        pytest.skip("this Triton's interpreter could not be taught bfloat16 tl.dot (tests/triton_interpreter_bf16.py)")
    return "cpu"
