"""A stand-in Triton driver that reports an H100 (sm_90) and launches nothing.

With it, a process without a GPU runs Triton's real JIT path for every kernel launch: argument
binding and specialisation, the compile for sm_90 (ptxas included), and the launch-time checks
of shared memory and threads against an H100's limits; only the launch itself does nothing, so
outputs are left as allocated. Install it before the first kernel launch, in a process where
TRITON_INTERPRET is unset, and route the op's CUDA-only checks to it with `run_on_cpu_tensors`.

The tests use it to compile whole training steps for the GPU on CI (tests/test_kernels_triton.py);
`python -m benchmarks.host_overhead --triton-launches` uses it to time Triton's own launch path
(binding, specialisation, cache lookup) on the host, which the CUDA launch call then follows.
"""
from __future__ import annotations

H100_SHARED_MEMORY = 232448  # bytes a program may use (227 KiB)


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SHARED_MEMORY, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}  # fmt: skip

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads a program


class StandInHopper:
    utils = _Utils()

    def __init__(self):
        self.loaded: list[str] = []  # one entry per kernel binary loaded for a launch
        self.launches = 0  # launches that reached the (doing-nothing) launcher

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        return lambda fn, quantiles=None, **kwargs: [1.0] * (len(quantiles) if quantiles else 1)

    def launcher_cls(self, src, metadata):
        self.loaded.append(getattr(metadata, "name", "?"))

        def launch(*args):
            self.launches += 1

        return launch


def install() -> StandInHopper:
    """Make a new `StandInHopper` Triton's active driver for this process and return it (its
    `loaded` and `launches` count what reached it)."""
    from triton.runtime.driver import driver

    stand_in = StandInHopper()
    driver.set_active(stand_in)
    return stand_in


def run_on_cpu_tensors(tma: bool = False) -> None:
    """Let the op's triton backend take CPU tensors as if they were CUDA ones (its GPU branch:
    autotuned launches, TMA where `tma`), outside the interpreter."""
    from refinestyle_kernels.ops import modulated_conv2d as op
    from refinestyle_kernels.ops import styled_conv2d_to_rgb as pair
    from refinestyle_kernels.ops import upsample_add as skip

    op._interpreted = lambda: False
    for module in (op, pair, skip):
        resolve = module.resolve_backend  # the other backends resolve as before
        module.resolve_backend = lambda backend, device, resolve=resolve: (
            "triton" if backend == "triton" else resolve(backend, device)
        )
    op.triton_interpreter_bf16_problem = lambda: None
    op.KERNEL_DEVICE_TYPES = (*op.KERNEL_DEVICE_TYPES, "cpu")
    if tma:
        op._has_tma = lambda device: True
