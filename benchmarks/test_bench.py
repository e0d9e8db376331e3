"""The benchmark cases through pytest-benchmark: `python -m pytest benchmarks/ --benchmark-only`.

Each test is one (case, implementation) of the suite `python -m benchmarks` runs,
with the same inputs, the same correctness guard (a wrong result fails the test
before anything is timed) and rotating input buffers. Timing: every round starts
after a torch.cuda.synchronize() in pytest-benchmark's setup and ends with one
inside the timed call, so the wall-clock timer measures the GPU work of exactly
that call (a CUDA-synchronised timer).

With CUDA: the GPU suite (select with -k, e.g. -k "generator/1024px and b8 and bf16").
Without CUDA those cases skip, and the reduced CPU suite's cases run instead, but
only under --benchmark-only (so a plain `pytest` never spends minutes here).
Rounds: REFINESTYLE_BENCH_ROUNDS (default 30 on CUDA, 3 on the CPU).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from benchmarks import implementations as impl_module
from benchmarks.cases import cpu_suite, gpu_suite
from benchmarks.runner import Bound, _tolerances, _truth, applicable, cache_bytes, case_work, guard_precision
from benchmarks.timing import compare, synchronize
from benchmarks.workloads import GeneratorWorkload, make_workload

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _params():
    params = []
    gpu_impls = impl_module.select(list(impl_module.GPU_DEFAULT))
    no_cuda = pytest.mark.skipif(not CUDA, reason="GPU suite: needs a CUDA device (the CPU suite's cases run instead)")
    for case in gpu_suite().cases():
        for impl in gpu_impls:
            if applicable(impl, case, torch.device("cuda")) is None:
                params.append(pytest.param(case, impl, id=f"{case.case_id}-{impl.name}", marks=no_cuda))
    cpu_impls = impl_module.select(list(impl_module.CPU_DEFAULT))
    on_cuda = pytest.mark.skipif(CUDA, reason="reduced CPU suite: the GPU suite runs on this machine")
    for case in cpu_suite().cases():
        for impl in cpu_impls:
            params.append(pytest.param(case, impl, id=f"cpu:{case.case_id}-{impl.name}", marks=on_cuda))
    return params


@pytest.fixture(scope="module", autouse=True)
def _tf32():
    if CUDA:  # as `python -m benchmarks` does by default (recorded there; TF32 floors in the guard)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    yield
    GeneratorWorkload.clear_models()


@pytest.mark.parametrize("case,implementation", _params())
def test_case(benchmark, request, case, implementation):
    if not CUDA and not request.config.getoption("benchmark_only"):
        pytest.skip("CPU benchmark cases run only with --benchmark-only")
    workload = make_workload(case, DEVICE)
    workload.ensure_sets(1)
    truth, truth_source = _truth(workload)
    tolerances, _ = _tolerances(workload, truth, guard_precision(case, DEVICE))
    bound = Bound(workload, implementation)
    try:
        outputs = bound.first_outputs()
        errors = compare(
            f"{implementation.name} on {case.case_id}",
            {name: outputs[name].detach() for name in truth},
            truth,
            tolerances,
        )
        del outputs
        workload.ensure_sets(workload.num_rotating_sets(cache_bytes(DEVICE)))
        calls = itertools.count()

        def setup():
            synchronize(DEVICE)
            return (next(calls),), {}

        def call(index):
            bound.step(index)
            synchronize(DEVICE)

        rounds = int(os.environ.get("REFINESTYLE_BENCH_ROUNDS", 30 if CUDA else 3))
        benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=min(rounds, 3), iterations=1)
        benchmark.extra_info.update(case.as_dict())
        benchmark.extra_info.update(case_work(case, None))
        benchmark.extra_info.update(
            implementation=implementation.name, rel_error=errors, truth=truth_source, rotating_sets=bound.rotating_sets
        )
    finally:
        bound.close()
        workload.sets.clear()
