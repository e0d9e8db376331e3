"""Where the time of one benchmark case goes, kernel by kernel (torch.profiler, CUDA).

    python -m benchmarks.profile                       # the headline case, every plain impl + triton
    python -m benchmarks.profile --impls triton --batch 8 --size 1024 --tokens 32 --mode fwdbwd
    python -m benchmarks.profile --impls triton --layer convs.1 --cprofile   # host-side overhead

For each implementation the case runs a few times untimed (compilation, autotuning),
then `--steps` times under torch.profiler. The report lists the wall time per step
(CUDA events), the summed GPU kernel time per step, and the kernels that take the most
of it, grouped by name. For the triton backend it also lists:

- the time per layer call (the op's profiler ranges, `PROFILE_RANGES`: "conv 128->128
  256x256 backward" and the kernels inside it), each against two floors at the device's
  peaks, measured first (`--no-peaks` skips them): the bytes and FLOPs of the call's own
  launches as `benchmarks.traffic` plans them on meta tensors ("planned": how slow the
  kernels are), and the layer's roofline ("roofline": how far the kernel structure is from
  a fully fused layer);
- the conv kernel's launch shapes as its autotuner timed them in the warm-up, against
  their floors (`benchmarks.report.conv_launch_table`).

With `--cprofile` it also lists the Python functions that take the most host time per step
(cProfile), for cases whose wall time exceeds their kernel time. This is a diagnostic, not a
benchmark: profiling adds overhead to every launch, so take times from `python -m benchmarks`.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.cases import Case, GeneratorConfig, parse_tokens
from benchmarks.flops import LayerSpec, layer_bytes, layer_flops
from benchmarks.implementations import Implementation, select
from benchmarks.report import conv_launch_table
from benchmarks.timing import DTYPES, TimingSettings, dtype_name, measure_peaks
from benchmarks.traffic import per_range, planned_generator_traffic
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


def _range_prefix(spec: LayerSpec) -> str:
    """The shape part of the op's range label for a call of this layer (`layer_call_shape`)."""
    return op_module.layer_call_shape(spec.in_channel, spec.out_channel, spec.in_size, spec.in_size, spec.upsample)


def _range_shape(label: str) -> str:
    """A range label without its direction and " +toRGB": "conv 64->32 512x512 up"."""
    shape = label.rsplit(" ", 1)[0]
    return shape.removesuffix(" +toRGB")


def _specs_in_range(label: str, layer: str, specs: dict[str, LayerSpec]) -> list[LayerSpec]:
    """The layers whose work a range holds: the conv or toRGB the label names, and with
    " +toRGB" the toRGB of the pair too; none for the skip upsample's ranges."""
    parts = [specs[name] for name in layer.split("+") if name in specs]
    named = [spec for spec in parts if _range_prefix(spec) == _range_shape(label)]
    if named and " +toRGB " in label:
        named += [spec for spec in parts if spec.kind == "torgb"]
    return named


def planned_layer_calls(case: Case, implementation: Implementation) -> dict[str, dict]:
    """What each layer call of a generator case must do, planned on meta tensors (no GPU).

    For every range the op opens (`modulated_conv2d.profile_range`; the keys are its labels
    without RANGE_PREFIX): "layer" and "phase" (from `benchmarks.traffic`), "kernels" and
    "bytes" (the launches inside it and the least bytes they move, `planned_generator_traffic`),
    "flops" (the model FLOPs of its layers' pass: `layer_flops`' conv, fir and low-rank parts;
    the demodulation runs outside the ranges) and "roofline_bytes" (`layer_bytes` of that pass,
    a toRGB reading its input from its conv's registers; None for the skip upsample's ranges,
    which the roofline folds into the toRGB). An empty dict for a layer case.
    """
    if case.group != "generator":
        return {}
    dtype = DTYPES[case.dtype]
    launches = planned_generator_traffic(case.generator, case.batch, dtype, case.tokens, implementation, case.backward)
    convs, torgbs = case.generator.layers()
    specs = {spec.name: spec for spec in convs + torgbs}
    element_size = torch.empty((), dtype=dtype).element_size()
    calls = per_range(launches)
    for label, call in calls.items():
        backward = call["phase"] == "backward"
        flops, roofline = 0, 0
        named = _specs_in_range(label, call["layer"], specs)
        for spec in named:
            tokens = case.tokens.num_tokens if spec.refinable else 0
            parts = layer_flops(spec, case.batch, tokens, shared_tokens=case.tokens.shared, backward=backward)
            flops += parts["conv"] + parts["fir"] + parts["low_rank"]
            moved = functools.partial(
                layer_bytes, spec, case.batch, tokens, shared_tokens=case.tokens.shared,
                element_size=element_size, input_resident=spec.kind == "torgb",
            )  # fmt: skip
            roofline += moved(backward=True) - moved(backward=False) if backward else moved(backward=False)
        call["flops"] = flops
        call["roofline_bytes"] = roofline if named else None
    return calls


def add_floors(layers: list[dict], calls: dict[str, dict], peak_flops: float, peak_bytes_per_s: float) -> None:
    """Give each row of `_layer_table` its plan (`planned_layer_calls`) and two floors, in place:
    "planned_ms", the least time of the call's own launches (their bytes at the copy peak or
    their FLOPs at the matmul peak, whichever is longer: how far the kernels are from what they
    must move), and "roofline_ms", the same with the roofline's bytes (how far the layer's
    kernel structure is from a fully fused one). A row without a plan is left as it is."""
    for row in layers:
        call = calls.get(row["range"])
        if call is None:
            continue
        per_call_ms = row["ms_per_step"] / max(row["calls_per_step"], 1e-9)
        compute_ms = 1e3 * call["flops"] / peak_flops
        row["planned"] = {key: call[key] for key in ("layer", "phase", "kernels", "bytes", "flops", "roofline_bytes")}
        row["planned_ms"] = max(compute_ms, 1e3 * call["bytes"] / peak_bytes_per_s)
        row["x_planned"] = per_call_ms / row["planned_ms"] if row["planned_ms"] else None
        if call["roofline_bytes"] is not None:
            row["roofline_ms"] = max(compute_ms, 1e3 * call["roofline_bytes"] / peak_bytes_per_s)
            row["x_roofline"] = per_call_ms / row["roofline_ms"] if row["roofline_ms"] else None


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


def profile_case(
    case: Case, implementation_name: str, steps: int, warmup: int, top: int, host: bool = False, peaks: dict | None = None
) -> dict:
    """Run `case` with one implementation on CUDA and say where its time goes.

    case: a layer or generator `Case`; implementation_name: a name from
    `benchmarks.implementations.registry()`; steps: profiled calls after `warmup` untimed
    ones; top: how many rows of each table to keep; host: also profile the Python side;
    peaks: {"flops_per_s", "bytes_per_s"} of the device (`measure_peaks`), for the floors of
    the per-layer table (`add_floors`; none without).
    Returns {"case", "implementation", "wall_ms" (per step, CUDA events, outside the
    profiler), "kernel_ms" (summed GPU kernel time per step), "peak_gib", "kernels" (rows of
    kernel, ms_per_step, calls_per_step, share), "layers" (rows of `_layer_table`, with
    `add_floors`' keys when peaks are given), "host" (rows of function, own_ms,
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
    if layers and peaks:
        add_floors(layers, planned_layer_calls(case, implementation), peaks["flops_per_s"], peaks["bytes_per_s"])
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


def _layer_lines(layers: list[dict], kernel_ms: float, top: int) -> list[str]:
    """The per-layer table as text: time per step, calls, the two floors of `add_floors` where
    known (ms per call, and how many times the call's time they are), the slowest kernels."""
    attributed = sum(row["ms_per_step"] for row in layers)
    lines = [f"by layer call ({attributed:.2f} of {kernel_ms:.2f} ms/step of kernels inside the op's ranges)"]
    if any("planned_ms" in row for row in layers):
        planned = sum(row.get("planned_ms", 0.0) * row["calls_per_step"] for row in layers)
        roofline = sum(row.get("roofline_ms", 0.0) * row["calls_per_step"] for row in layers)
        lines.append(f"floors per step: {planned:.2f} ms for the launches' own bytes and FLOPs (planned), "
                     f"{roofline:.2f} ms for the layers' roofline; x = the call's time over that floor")  # fmt: skip
        lines.append(f"{'ms/step':>8s} {'calls':>6s} {'planned':>8s} {'x':>5s} {'roofline':>8s} {'x':>5s}  layer call: slowest kernels (ms/step)")
    for row in layers[:top]:
        slowest = ", ".join(f"{name} {ms:.2f}" for name, ms in list(row["kernels"].items())[:3])
        floors = ""
        for key in ("planned", "roofline"):
            if f"{key}_ms" in row:
                ratio = row.get(f"x_{key}")
                floors += f" {row[f'{key}_ms']:8.3f} {ratio:5.1f}" if ratio is not None else f" {row[f'{key}_ms']:8.3f} {'':5s}"
            elif "planned_ms" in row:
                floors += f" {'':8s} {'':5s}"
        lines.append(f"{row['ms_per_step']:8.3f} {row['calls_per_step']:5.1f}x{floors}  {row['range']}: {slowest}")
    return lines


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
    parser.add_argument("--no-peaks", action="store_true",
                        help="skip measuring the device's peaks, and so the per-layer floors (saves a few seconds)")
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
    peaks = None
    if not args.no_peaks:
        dtype = DTYPES[args.dtype]
        quick = TimingSettings(warmup_ms=20.0, min_time_ms=100.0, min_reps=5, max_reps=50)
        measured = measure_peaks(torch.device("cuda"), [dtype], quick)
        peaks = {"flops_per_s": measured["matmul_flops_per_s"][dtype_name(dtype)], "bytes_per_s": measured["copy_bytes_per_s"]}
        print(f"device peaks: {peaks['flops_per_s'] / 1e12:.0f} TFLOP/s ({args.dtype} matmul), "
              f"{peaks['bytes_per_s'] / 1e12:.2f} TB/s (copy)")  # fmt: skip
    timing_lone_configs = op_module.TIME_UNTUNED_CONV_LAUNCHES
    op_module.TIME_UNTUNED_CONV_LAUNCHES = True  # the conv launch table lists every shape
    try:
        return _profile_and_print(args, case, peaks)
    finally:
        op_module.TIME_UNTUNED_CONV_LAUNCHES = timing_lone_configs


def _profile_and_print(args, case: Case, peaks: dict | None) -> int:
    """`main`'s profiling: each implementation of --impls on the case, its tables printed and,
    with --json, saved after each one."""
    results = []
    for name in args.impls.split(","):
        result = profile_case(case, name.strip(), args.steps, args.warmup, args.top, args.cprofile, peaks)
        result["device_peaks"] = peaks
        results.append(result)
        print(
            f"\n== {result['case']}  {name}: {result['wall_ms']:.2f} ms/step wall, "
            f"{result['kernel_ms']:.2f} ms/step in kernels, peak {result['peak_gib']:.2f} GiB"
        )
        for row in result["kernels"]:
            print(f"  {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x {100 * row['share']:5.1f}%  {row['kernel']}")
        if result["layers"]:
            print("  " + "\n  ".join(_layer_lines(result["layers"], result["kernel_ms"], args.top)))
        # the conv kernel's launch shapes as its autotuner timed them in this process's warm-up
        tuned = op_module.autotuned_conv_configs()
        if tuned and not any("conv_launches" in earlier for earlier in results[:-1]):
            result["conv_launches"] = tuned
            suite_peaks = None
            if peaks:
                suite_peaks = {"copy_bytes_per_s": peaks["bytes_per_s"], "matmul_flops_per_s": {args.dtype: peaks["flops_per_s"]}}
            table = conv_launch_table({"autotuned_conv_configs": tuned, "peaks": suite_peaks})
            if table:
                print("  " + "\n  ".join(table.splitlines()))
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
