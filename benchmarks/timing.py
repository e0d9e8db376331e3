"""Timers, device peaks and the correctness guard.

Timing method (the same on every device):

- warm up first: a first call (it compiles what needs compiling, and its time is
  reported separately), then further calls for `warmup_ms` (the CPU suite uses
  none: its calls are long and nothing there compiles);
- the number of timed calls follows from the warm-up estimate: enough for
  `min_time_ms` of measurement, at least `min_reps`, at most `max_reps`;
- each timed call gets the next of several input buffer sets in turn (rotating
  buffers), so no call finds its inputs or weights still in the L2 cache from the
  call before;
- on CUDA each call is timed by a pair of CUDA events around it (the GPU's own
  clock), on the CPU by time.perf_counter; we report the median and the 20th and
  80th percentiles of the per-call times.

Peaks for the roofline are measured in the same process, on the same device, just
before the cases: a large matmul per dtype and a large device-to-device copy.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class TimingSettings:
    """How long to warm up and measure each case.

    warmup_ms: wall time of warm-up calls after the first call.
    min_time_ms: measure for about this long.
    min_reps, max_reps: bounds on the number of timed calls.
    """

    warmup_ms: float = 25.0
    min_time_ms: float = 200.0
    min_reps: int = 10
    max_reps: int = 1000

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    """Per-call times of one case, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    reps: int
    first_call_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile of `values` (fraction in [0, 1])."""
    if not values:
        raise ValueError("values: expected at least one value")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    step: Callable[[int], object],
    device: torch.device,
    settings: TimingSettings,
    *,
    first_call_ms: float | None = None,
) -> Timing:
    """Time step(i) for i = 0, 1, 2, ...; step picks input set i % n itself.

    step: runs one call of the case on input set i (modulo its number of sets).
    device: where the work runs (CUDA events there, perf_counter on the CPU).
    settings: warm-up and measurement lengths.
    first_call_ms: the caller already made the first call (compiling what needs it) and
        took this long; None makes and times that first call here.
    """
    call = 0
    if first_call_ms is None:
        synchronize(device)
        started = time.perf_counter()
        step(call)
        call += 1
        synchronize(device)
        first_call_ms = (time.perf_counter() - started) * 1e3

    # warm-up, which also estimates the per-call time (from the first call when there is none)
    estimate_ms = first_call_ms
    if settings.warmup_ms > 0:
        warm_calls = 0
        started = time.perf_counter()
        while True:
            step(call)
            call += 1
            warm_calls += 1
            synchronize(device)
            elapsed_ms = (time.perf_counter() - started) * 1e3
            if elapsed_ms >= settings.warmup_ms:
                break
        estimate_ms = elapsed_ms / warm_calls
    estimate_ms = max(estimate_ms, 1e-3)
    reps = int(min(max(settings.min_time_ms / estimate_ms, settings.min_reps), settings.max_reps))
    reps = max(reps, 1)

    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for rep in range(reps):
            starts[rep].record()
            step(call)
            ends[rep].record()
            call += 1
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    else:
        for rep in range(reps):
            started = time.perf_counter()
            step(call)
            times.append((time.perf_counter() - started) * 1e3)
            call += 1
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=percentile(times, 0.2),
        p80_ms=percentile(times, 0.8),
        min_ms=min(times),
        mean_ms=statistics.fmean(times),
        reps=reps,
        first_call_ms=first_call_ms,
    )


def measure_peak_memory(step: Callable[[], object], device: torch.device) -> tuple[object, dict[str, int | None]]:
    """Run step() once and measure its peak device memory.

    Returns (step's result, {"peak_bytes", "extra_bytes"}); both None off CUDA.
    peak_bytes: torch.cuda.max_memory_allocated during the call (it includes whatever
        was allocated before: the model, the one input set that exists at that point,
        the guard's reference outputs).
    extra_bytes: the peak minus what was allocated before the call: the outputs,
        saved activations and workspaces the implementation itself needs.
    """
    if device.type != "cuda":
        return step(), {"peak_bytes": None, "extra_bytes": None}
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return result, {"peak_bytes": int(peak), "extra_bytes": int(peak - before)}


def measure_peaks(device: torch.device, dtypes: list[torch.dtype], settings: TimingSettings | None = None) -> dict:
    """Measure the device's matmul throughput per dtype and its copy bandwidth.

    Returns {"matmul_flops_per_s": {dtype name: float}, "copy_bytes_per_s": float,
    "matmul_size": int, "copy_bytes": int}. The matmul is n x n x n (n = 8192 on
    CUDA, 1024 on the CPU), counted as 2 n^3 FLOPs; the copy moves a buffer of
    1 GiB (64 MiB on the CPU) and is counted as read + write. Each uses its
    fastest 20% of calls (the 20th percentile), the attainable peak.
    """
    settings = settings or TimingSettings(warmup_ms=50.0, min_time_ms=300.0, min_reps=5, max_reps=200)
    on_cuda = device.type == "cuda"
    size = 8192 if on_cuda else 1024
    result: dict = {"matmul_flops_per_s": {}, "matmul_size": size}
    for dtype in dtypes:
        operands = [
            (torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype))
            for _ in range(2)
        ]
        timing = time_calls(lambda i: torch.matmul(*operands[i % 2]), device, settings)
        result["matmul_flops_per_s"][dtype_name(dtype)] = 2 * size**3 / (timing.p20_ms * 1e-3)
        del operands
    copy_bytes = (1 << 30) if on_cuda else (64 << 20)
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty_like(source)
    timing = time_calls(lambda i: target.copy_(source), device, settings)
    result["copy_bytes_per_s"] = 2 * copy_bytes / (timing.p20_ms * 1e-3)
    result["copy_bytes"] = copy_bytes
    del source, target
    return result


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# The correctness guard


class CorrectnessError(AssertionError):
    """An implementation's result differs from the reference by more than the tolerance."""


#: the least relative error we tolerate per dtype; above it, the tolerance is
#: GUARD_FACTOR times the error the reference itself makes in the case's dtype
GUARD_FLOOR = {"float32": 1e-4, "tfloat32": 2e-3, "bfloat16": 2e-2, "float16": 2e-3}
GUARD_FACTOR = 4.0
GUARD_CEILING = 0.25


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """||value - truth|| / ||truth|| in float64 (inf on a NaN or a shape mismatch)."""
    if value.shape != truth.shape:
        return math.inf
    value = value.detach().double()
    truth = truth.detach().double()
    if not torch.isfinite(value).all():
        return math.inf
    denominator = truth.norm().item()
    return (value - truth).norm().item() / max(denominator, 1e-30)


def tolerance_for(precision: str, reference_error: float) -> float:
    """The guard's tolerance: max(floor of the precision, GUARD_FACTOR x the reference's own error)."""
    return min(max(GUARD_FLOOR[precision], GUARD_FACTOR * reference_error), GUARD_CEILING)


def compare(
    name: str, values: dict[str, torch.Tensor], truths: dict[str, torch.Tensor], tolerances: dict[str, float]
) -> dict[str, float]:
    """Relative errors of `values` against `truths`, per output; CorrectnessError when any exceeds its tolerance.

    name: the implementation and case, for the error message.
    values, truths: {output name: tensor} with the same keys (the output, and the
        gradients of a forward+backward case).
    tolerances: {output name: largest acceptable relative error}.
    """
    errors = {key: relative_error(values[key], truths[key]) for key in truths}
    failed = {key: err for key, err in errors.items() if not err <= tolerances[key]}
    if failed:
        details = ", ".join(f"{key}: {err:.3g} > {tolerances[key]:.3g}" for key, err in failed.items())
        raise CorrectnessError(f"{name}: result differs from the reference ({details})")
    return errors
