"""Host (Python + dispatch) time of one layer's forward+backward, with the GPU work taken out.

    python -m benchmarks.host_overhead                     # on a machine without a GPU
    TRITON_INTERPRET=1 python -m benchmarks.host_overhead  # on a GPU machine (CPU tensors)
    python -m benchmarks.host_overhead --triton-launches   # and Triton's own launch path

The whole 1024 px training step on the H100 was host-bound (BENCHMARKS.md): its low-resolution
layers cost more CPU time to issue than GPU time to run. This probe measures that host cost
per implementation on tiny CPU tensors. By default the Triton launches are replaced by no-ops,
so the `triton` row is the torch glue around the kernels: validation, demodulation, layout,
token products and autograd. With --triton-launches the probe runs again in a fresh process
where every launch goes through Triton's real launch path (argument binding, specialisation,
the autotuner's choice, the kernel cache) to a stand-in driver that reports an H100 and
launches nothing (benchmarks/stand_in_driver.py): that row is the whole host cost except the
CUDA launch call itself, a few microseconds a kernel. The kernels compile for sm_90 first (tens
of seconds, not timed). The numbers are relative: a GPU machine's CPU may be slower than this one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# set in the child process that --triton-launches starts: kernels compiled, launched to a stand-in
STAND_IN_LAUNCHES = os.environ.get("REFINESTYLE_STAND_IN_LAUNCHES") == "1"
if STAND_IN_LAUNCHES:
    os.environ.pop("TRITON_INTERPRET", None)
    from benchmarks import stand_in_driver

    STAND_IN = stand_in_driver.install()
elif not torch.cuda.is_available():  # the triton backend takes CPU tensors only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from refinestyle_kernels import styled_conv2d  # noqa: E402
from refinestyle_kernels.ops import modulated_conv2d as op_module  # noqa: E402

from benchmarks.nvlabs_style import nvlabs_styled_conv2d  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# the op module's Triton kernels that are launched directly (kernel[grid](...)), and its launch helpers
STUBBED_KERNELS = ("_blur_kernel", "_epilogue_backward_kernel", "_epilogue_products_kernel", "_pixel_products_kernel",
                   "_demodulation_kernel", "_demodulation_backward_kernel", "_sum_partials_kernel")  # fmt: skip
STUBBED_LAUNCHERS = ("_launch_conv_gemm",)


def _no_launch(a, a_scale, w, z, r, *args, x=None, sum_x=True, token_products=False, **kwargs):
    """`_launch_conv_gemm` without the launch: only the per-block sums it returns for grad s, and
    with token_products the token gradients' per-program partials [B, R, L, K] and [B, R, L, N]."""
    sums = None if (x is None or not sum_x) else torch.zeros(a.shape[0], 1, w.shape[2])
    if not token_products:
        return sums
    batch, rank = a.shape[0], r.shape[1]  # r [B or 1, L, N]
    return sums, torch.zeros(batch, 1, rank, w.shape[1]), torch.zeros(batch, 1, rank, w.shape[2])


def _stub_triton_launches() -> None:
    for name in STUBBED_LAUNCHERS:
        setattr(op_module, name, _no_launch)
    for name in STUBBED_KERNELS:
        setattr(op_module, name, _NoLaunch())


def layer_step(op, batch: int, channels: int, size: int, tokens: int, upsample: bool) -> Callable[[], None]:
    """One forward+backward call of a layer on CPU tensors, as a function of no arguments.

    op: a callable with `styled_conv2d`'s signature. The layer is a 3x3 StyledConv: x
    [batch, channels, size, size] fp32, weight [channels, channels, 3, 3] (frozen), styles
    [batch, channels], per-sample tokens p, q [batch, tokens, channels] (none when tokens is
    0), noise, noise strength and bias; upsample doubles the output size. Gradients flow to x,
    styles, tokens, noise strength and bias.
    """
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=generator).requires_grad_(grad)

    out_size = 2 * size if upsample else size
    x = randn(batch, channels, size, size, grad=True)
    weight = randn(channels, channels, 3, 3)
    styles = randn(batch, channels, grad=True)
    p = randn(batch, tokens, channels, grad=True) if tokens else None
    q = randn(batch, tokens, channels, grad=True) if tokens else None
    noise = randn(batch, 1, out_size, out_size)
    noise_strength = randn(1, grad=True)
    bias = randn(channels, grad=True)
    grad_out = randn(batch, channels, out_size, out_size)

    def step():
        out = op(x, weight, styles, p, q, noise=noise, noise_strength=noise_strength, bias=bias, activate=True, upsample=upsample)
        out.backward(grad_out)

    return step


def host_time_us(op, batch: int, channels: int, size: int, tokens: int, upsample: bool, calls: int) -> float:
    """Mean wall time, in microseconds, of one `layer_step` call (same arguments); `calls`
    timed calls follow max(5, calls // 10) warm-up calls."""
    step = layer_step(op, batch, channels, size, tokens, upsample)
    for _ in range(max(5, calls // 10)):
        step()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return 1e6 * (time.perf_counter() - start) / calls


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_op_count(op, batch: int, channels: int, size: int, tokens: int, upsample: bool) -> int:
    """How many aten ops one `layer_step` call (same arguments) dispatches below autograd, after
    a warm-up call: each costs host time, ~20 us apiece on the H100 machine (BENCHMARKS.md)."""
    step = layer_step(op, batch, channels, size, tokens, upsample)
    step()
    with _CountOps() as counter:
        step()
    return counter.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=4, help="L per sample (0: unrefined)")
    parser.add_argument("--upsample", action="store_true")
    parser.add_argument("--triton-launches", action="store_true",
                        help="time the triton row with Triton's own launch path (binding, specialisation, kernel "
                             "cache) to a stand-in driver, in a fresh process; compiles the kernels for sm_90 first")
    args = parser.parse_args(argv)
    if args.triton_launches and not STAND_IN_LAUNCHES:
        env = dict(os.environ, REFINESTYLE_STAND_IN_LAUNCHES="1")
        env.pop("TRITON_INTERPRET", None)
        child = list(sys.argv[1:] if argv is None else argv)
        return subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", *child], env=env).returncode
    torch.set_num_threads(1)
    if STAND_IN_LAUNCHES:
        stand_in_driver.run_on_cpu_tensors()
        triton_row = "triton (Triton launch path)"
    else:
        _stub_triton_launches()
        triton_row = "triton (launches stubbed)"
    implementations = {
        triton_row: lambda *a, **k: styled_conv2d(*a, backend="triton", **k),
        "torch": lambda *a, **k: styled_conv2d(*a, backend="torch", **k),
        "nvlabs": nvlabs_styled_conv2d,
        "reference": lambda *a, **k: styled_conv2d(*a, backend="reference", **k),
    }
    print(f"host time per layer fwd+bwd (B=2, 8 channels, 4x4, L={args.tokens}, 1 CPU thread):")
    for name, op in implementations.items():
        micros = host_time_us(op, 2, 8, 4, args.tokens, args.upsample, args.calls)
        launched = STAND_IN.launches if STAND_IN_LAUNCHES else 0
        ops = aten_op_count(op, 2, 8, 4, args.tokens, args.upsample)
        # aten_op_count runs two steps: a warm-up and the counted one
        launches = f"  {(STAND_IN.launches - launched) // 2:3d} Triton launches" if STAND_IN_LAUNCHES else ""
        print(f"  {name:28s} {micros:8.0f} us  {ops:4d} aten ops{launches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
