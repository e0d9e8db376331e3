"""Memory accounting without a GPU: `benchmarks.memory`.

`LiveBytes` is checked against allocations whose sizes are known; the planner then runs the
whole 1024 px training step on meta tensors (no data, no compute), which is how the issue's
memory target (triton's peak training memory at most 0.6x the reference's) is tracked
between GPU sessions.
"""
from __future__ import annotations

import gc

import torch

from benchmarks.cases import GeneratorConfig, TokenSetting
from benchmarks.implementations import REFERENCE, TRITON
from benchmarks.memory import LiveBytes, planned_generator_memory
from refinestyle_kernels import styled_conv2d

MIB = 2**20


def test_live_bytes_counts_new_storages_and_their_release():
    x = torch.randn(256, 1024, requires_grad=True)  # 1 MiB, made before: never counted
    with LiveBytes() as live:
        doubled = x * 2  # +1 MiB
        rectified = doubled.relu()  # +1 MiB (saved for its backward)
        flat = x.detach().view(-1)  # a view of an old storage: 0
        flat.mul_(1)  # in place: 0
        del doubled  # mul by a number saves nothing: -1 MiB
        rectified.sum().backward()  # relu's grad (+1 MiB), then x.grad (+1 MiB); the first dies
    assert live.peak_bytes == 3 * MIB + 8  # + the 4-byte sum and its gradient
    assert live.live_bytes == 2 * MIB  # rectified and x.grad (the sum is gone)
    kept = rectified
    del rectified, x
    gc.collect()
    assert live.live_bytes == 2 * MIB  # `kept` holds its storage, and through its graph x
    del kept
    assert live.live_bytes == 0


def test_triton_backend_on_meta_tensors_allocates_and_launches_nothing():
    with torch.device("meta"):
        x = torch.empty(2, 8, 16, 16, requires_grad=True)
        weight = torch.empty(8, 8, 3, 3)
        styles = torch.empty(2, 8, requires_grad=True)
        p, q = torch.empty(2, 4, 8, requires_grad=True), torch.empty(2, 4, 8, requires_grad=True)
    out = styled_conv2d(x, weight, styles, p, q, upsample=True, activate=True, backend="triton")
    assert out.device.type == "meta" and out.shape == (2, 8, 32, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape and p.grad.shape == p.shape and q.grad.shape == q.shape


def test_memory_target_holds_in_the_plan_of_the_headline_step():
    """Batch 8, bf16, 1024 px, L = 32 per sample (and L = 256 shared): at most 0.6x."""
    for tokens in (TokenSetting(32, shared=False), TokenSetting(256, shared=True)):
        plans = {
            impl.name: planned_generator_memory(GeneratorConfig(1024), 8, torch.bfloat16, tokens, impl)
            for impl in (REFERENCE, TRITON)
        }
        ratio = plans["triton"]["peak_bytes"] / plans["reference"]["peak_bytes"]
        assert ratio <= 0.6, f"{tokens.label}: planned peak {ratio:.2f}x the reference's"
        assert plans["triton"]["after_forward_bytes"] < plans["reference"]["after_forward_bytes"]
