"""Where the time of one benchmark case goes, kernel by kernel (torch.profiler, CUDA).

    python -m benchmarks.profile                       # the headline case, every plain impl + triton
    python -m benchmarks.profile --impls triton --batch 8 --size 1024 --tokens 32 --mode fwdbwd
    python -m benchmarks.profile --impls triton --layer convs.1 --cprofile   # host-side overhead

For each implementation the case runs a few times untimed (compilation, autotuning),
then `--steps` times under torch.profiler. The report lists the wall time per step
(CUDA events), the summed GPU kernel time per step, and the kernels that take the most
of it, grouped by name; for the triton backend also per layer call (the op's profiler ranges,
`PROFILE_RANGES`: "conv 128->128 256x256 backward" and the kernels inside it). With `--cprofile` it also lists the Python functions that take the
most host time per step (cProfile), for cases whose wall time exceeds their kernel time. This is a diagnostic, not a benchmark: profiling adds overhead
to every launch, so take times from `python -m benchmarks`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.cases import Case, GeneratorConfig, parse_tokens
from benchmarks.implementations import select
from benchmarks.workloads import make_workload, patched_op
from refinestyle_kernels.ops import modulated_conv2d as op_module


def _kernel_table(profiler, steps: int, top: int) -> list[dict]:
    """GPU kernels grouped by name: total ms per step, calls per step, share."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = totals[event.name[:110]]
        entry[0] += event.device_time_total / 1000.0
        entry[1] += 1
    total = sum(ms for ms, _ in totals.values()) or 1.0
    rows = [
        {"kernel": name, "ms_per_step": ms / steps, "calls_per_step": calls / steps, "share": ms / total}
        for name, (ms, calls) in totals.items()
    ]
    rows.sort(key=lambda row: -row["ms_per_step"])
    return rows[:top] if top else rows


RANGE_PREFIX = "refinestyle "


def _kernels_under(event) -> list:
    """The GPU kernels the profiler linked to a CPU event or to any event inside it."""
    found = list(getattr(event, "kernels", ()))
    for child in getattr(event, "cpu_children", ()):
        found += _kernels_under(child)
    return found


def _layer_table(events, steps: int) -> list[dict]:
    """Kernel time per layer call: for every profiler range the op opens around a layer's
    forward or backward (`modulated_conv2d.PROFILE_RANGES`, named `RANGE_PREFIX` ...), the
    kernels launched inside it, summed per step and grouped by kernel name. Rows: range,
    ms_per_step, calls_per_step (range entries), kernels ({name: ms per step}); slowest first.
    Kernels launched outside every range (the demodulation of eager training, autograd's own
    additions, the reference's ops) are in no row."""
    rows: dict[str, dict] = {}
    for event in events:
        if not event.name.startswith(RANGE_PREFIX) or any(
            parent.name.startswith(RANGE_PREFIX) for parent in _parents(event)
        ):  # fmt: skip
            continue
        row = rows.setdefault(event.name, {"range": event.name[len(RANGE_PREFIX):], "ms_per_step": 0.0,
                                           "calls_per_step": 0.0, "kernels": defaultdict(float)})  # fmt: skip
        row["calls_per_step"] += 1 / steps
        for kernel in _kernels_under(event):
            ms = kernel.duration / 1000.0 / steps
            row["ms_per_step"] += ms
            row["kernels"][kernel.name[:60]] += ms
    table = sorted(rows.values(), key=lambda row: -row["ms_per_step"])
    for row in table:
        row["kernels"] = dict(sorted(row["kernels"].items(), key=lambda item: -item[1]))
    return table


def _parents(event):
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        yield parent
        parent = getattr(parent, "cpu_parent", None)


def _host_table(steps: int, step, top: int) -> list[dict]:
    """cProfile over `steps` calls: the functions with the most own time, per step."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [
        {"function": f"{path.split('/')[-1]}:{line}({name})", "own_ms": own * 1e3 / steps, "cumulative_ms": cumulative * 1e3 / steps,
         "calls_per_step": calls / steps}
        for (path, line, name), (_, calls, own, cumulative, _) in stats.items()
    ]
    rows.sort(key=lambda row: -row["own_ms"])
    return rows[:top]


def profile_case(case: Case, implementation_name: str, steps: int, warmup: int, top: int, host: bool = False) -> dict:
    """Run `case` with one implementation on CUDA and say where its time goes.

    case: a layer or generator `Case`; implementation_name: a name from
    `benchmarks.implementations.registry()`; steps: profiled calls after `warmup` untimed
    ones; top: how many rows of each table to keep; host: also profile the Python side.
    Returns {"case", "implementation", "wall_ms" (per step, CUDA events, outside the
    profiler), "kernel_ms" (summed GPU kernel time per step), "peak_gib", "kernels" (rows of
    kernel, ms_per_step, calls_per_step, share), "host" (rows of function, own_ms,
    cumulative_ms, calls_per_step; empty unless host)}.
    """
    device = torch.device("cuda")
    (implementation,) = select([implementation_name])
    workload = make_workload(case, device)
    workload.ensure_sets(1)
    inputs = workload.sets[0]
    forward = workload.forward_fn(implementation)
    if implementation.compiled:
        forward = torch.compile(forward)

    def step():
        return workload.run(forward, inputs)

    with patched_op(implementation.op):
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        wall_ms = start.elapsed_time(end) / steps
        torch.cuda.reset_peak_memory_stats()
        # CPU activity too, for the op's per-layer ranges (`PROFILE_RANGES`) that the kernels link to
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        op_module.PROFILE_RANGES = True
        try:
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
        finally:
            op_module.PROFILE_RANGES = False
        peak = torch.cuda.max_memory_allocated()
        host_rows = _host_table(steps, step, top) if host else []
    kernels = _kernel_table(profiler, steps, 0)
    layers = _layer_table(profiler.events(), steps)
    workload.release(implementation)
    return {
        "case": case.case_id,
        "implementation": implementation_name,
        "wall_ms": wall_ms,
        "kernel_ms": sum(row["ms_per_step"] for row in kernels),
        "peak_gib": peak / 2**30,
        "kernels": kernels[:top],
        "layers": layers,
        "host": host_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="reference,nvlabs,torch,triton")
    parser.add_argument("--size", type=int, default=1024, help="generator size")
    parser.add_argument("--layer", default=None, help="profile this layer of the generator (e.g. convs.1) instead of the whole network")
    parser.add_argument("--cprofile", action="store_true", help="also list the host (Python) time per function")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    parser.add_argument("--tokens", default="32", help="one setting as in python -m benchmarks --tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.profile needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    (tokens,) = parse_tokens(args.tokens)
    config = GeneratorConfig(args.size)
    layer = None
    if args.layer:
        convs, to_rgbs = config.layers()
        by_name = {spec.name: spec for spec in convs + to_rgbs}
        if args.layer not in by_name:
            parser.error(f"--layer: expected one of {sorted(by_name)}, got {args.layer!r}")
        layer = by_name[args.layer]
        if not layer.refinable:
            (tokens,) = parse_tokens("0")
    case = Case(
        group="layer" if layer else "generator",
        generator=config,
        batch=args.batch,
        dtype=args.dtype,
        mode="forward" if args.mode == "fwd" else "forward_backward",
        tokens=tokens,
        layer=layer,
    )
    results = []
    for name in args.impls.split(","):
        result = profile_case(case, name.strip(), args.steps, args.warmup, args.top, args.cprofile)
        results.append(result)
        print(
            f"\n== {result['case']}  {name}: {result['wall_ms']:.2f} ms/step wall, "
            f"{result['kernel_ms']:.2f} ms/step in kernels, peak {result['peak_gib']:.2f} GiB"
        )
        for row in result["kernels"]:
            print(f"  {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x {100 * row['share']:5.1f}%  {row['kernel']}")
        if result["layers"]:
            attributed = sum(row["ms_per_step"] for row in result["layers"])
            print(f"  by layer call ({attributed:.2f} of {result['kernel_ms']:.2f} ms/step inside the op's ranges):")
        for row in result["layers"][: args.top]:
            slowest = ", ".join(f"{name} {ms:.2f}" for name, ms in list(row["kernels"].items())[:3])
            print(f"  {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x  {row['range']}: {slowest}")
        if result["host"]:
            print("  host time per step (own / cumulative ms, calls):")
        for row in result["host"]:
            print(f"  {row['own_ms']:8.3f} {row['cumulative_ms']:8.3f} {row['calls_per_step']:7.1f}x  {row['function']}")
        sys.stdout.flush()
        if args.json:  # after each implementation: a run cut short keeps what it profiled
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
