"""Run a suite: every case through every implementation, guarded, timed, measured.

For each case: draw input set 0, compute the truth (the reference in float64) and
the reference's own error in the case's dtype (which sets the guard's tolerance);
then for each implementation: build it (torch.compile, CUDA graph), run it once
and check its output (and gradients) against the truth, measure its peak memory
over one call, draw the rotating input sets and time it. A wrong Triton result
raises FatalCorrectnessError and ends the run; any other failure is recorded and
the run goes on.
"""
from __future__ import annotations

import contextlib
import datetime as _datetime
import gc
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters as dynamo_counters

from benchmarks.cases import HEADLINE, Case, TokenSetting
from benchmarks.flops import cross_check_layer, layer_bytes, layer_flops, roofline_floor_seconds
from benchmarks.implementations import REFERENCE, TORCH, Implementation
from benchmarks.memory import planned_generator_memory
from benchmarks.traffic import planned_generator_traffic
from benchmarks.timing import (
    DTYPES,
    CorrectnessError,
    TimingSettings,
    compare,
    measure_peak_memory,
    measure_peaks,
    relative_error,
    synchronize,
    time_calls,
    tolerance_for,
)
from benchmarks.workloads import GeneratorWorkload, Workload, make_workload, patched_op
from refinestyle_kernels.ops import modulated_conv2d as op_module

SCHEMA = "refinestyle-bench/1"


def source_checkout(package_dir: Path = Path(__file__).resolve().parent) -> Path | None:
    """The project's source tree when `package_dir` (the benchmarks package) sits in one, else None
    (an installed copy in site-packages)."""
    root = package_dir.parent
    is_ours = (root / "setup.py").is_file() and (root / "refinestyle_kernels").is_dir()
    return root if is_ours and package_dir.name == "benchmarks" else None


def default_results_dir(package_dir: Path = Path(__file__).resolve().parent) -> Path:
    """benchmarks/results/ of a source checkout (committed with the code); for an installed copy,
    ./refinestyle-bench-results in the working directory, never inside site-packages."""
    root = source_checkout(package_dir)
    return root / "benchmarks" / "results" if root is not None else Path("refinestyle-bench-results")


RESULTS_DIR = default_results_dir()


class FatalCorrectnessError(CorrectnessError):
    """A guarded (Triton) implementation produced a wrong result: the run stops."""


# ----------------------------------------------------------------------------------------------
# Environment


def environment(device: torch.device) -> dict:
    """Device name, library versions and settings that every number depends on."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - Triton is optional off Linux
        triton_version = None
    env = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "git_commit": _git_commit(),
        "package_version": _package_version(),
        # other work on the machine skews CPU timings; recorded so a reader can tell
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
        )
    else:
        env.update(device_name=f"CPU ({env['cpu']}, {env['cpu_threads']} threads)", l2_cache_bytes=None)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_commit(package_dir: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit of the source checkout the code runs from; None for an installed copy (whose
    site-packages may sit inside some other repository) or outside git."""
    root = source_checkout(package_dir)
    if root is None:
        return None
    try:
        git = ["git", "-C", str(root)]
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5)
        if not top.stdout.strip() or Path(top.stdout.strip()).resolve() != root.resolve():
            return None
        out = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - git missing
        return None


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("refinestyle-kernels")
    except Exception:  # noqa: BLE001 - running from a checkout that was never installed
        return None


def device_slug(env: dict) -> str:
    """File-name part for the device, e.g. "nvidia-h100-80gb-hbm3" or "cpu-intel-xeon-platinum-8375c"."""
    name = env["device_name"] if env["device_type"] == "cuda" else "cpu-" + env["cpu"]
    name = re.sub(r"\((r|tm)\)|cpu @.*|@.*", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug or env["device_type"]


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20))
    return 32 << 20


# ----------------------------------------------------------------------------------------------
# Work and roofline of a case


def case_work(case: Case, peaks: dict | None) -> dict:
    """Model FLOPs (separated form), least bytes and roofline floor of a case.

    The generator's numbers are sums over its convs (every one refined with the case's
    tokens) and toRGBs; its floor is the sum of the per-layer floors, each toRGB's without
    the activation it shares with its block's last conv (`layer_bytes(input_resident=True)`:
    a fused pair moves it once). Returns
    {"model_flops", "model_bytes", "floor_ms"} (floor_ms None without peaks).
    """
    element_size = DTYPES[case.dtype].itemsize
    if case.layer is not None:
        layers = [case.layer]
    else:
        convs, torgbs = case.generator.layers()
        layers = convs + torgbs
    flops = nbytes = floor = 0.0
    peak_flops = peak_bytes = None
    if peaks:
        peak_flops = peaks["matmul_flops_per_s"].get(case.dtype)
        peak_bytes = peaks.get("copy_bytes_per_s")
    for spec in layers:
        tokens = case.tokens.num_tokens if spec.refinable else 0
        kwargs = {"shared_tokens": case.tokens.shared}
        layer_flop = layer_flops(spec, case.batch, tokens, **kwargs)["total"]
        if case.backward:
            layer_flop += layer_flops(spec, case.batch, tokens, backward=True, **kwargs)["total"]
        layer_byte = layer_bytes(
            spec, case.batch, tokens, element_size=element_size, backward=case.backward,
            input_resident=case.layer is None and spec.kind != "conv", **kwargs,
        )  # fmt: skip
        flops += layer_flop
        nbytes += layer_byte
        if peak_flops and peak_bytes:
            floor += roofline_floor_seconds(layer_flop, layer_byte, peak_flops, peak_bytes)
    return {
        "model_flops": int(flops),
        "model_bytes": int(nbytes),
        "floor_ms": floor * 1e3 if peak_flops and peak_bytes else None,
    }


# ----------------------------------------------------------------------------------------------
# One implementation bound to one workload


def applicable(implementation: Implementation, case: Case, device: torch.device) -> str | None:
    """None when the implementation runs on this case, else the reason it does not."""
    if implementation.needs_cuda and device.type != "cuda":
        return "needs CUDA"
    if implementation.cuda_graph and case.group != "generator":
        return "CUDA graphs are captured for whole-generator cases only"
    return None


class Bound:
    """An implementation ready to run a workload: eager, compiled or a captured CUDA graph."""

    def __init__(self, workload: Workload, implementation: Implementation):
        self.workload = workload
        self.implementation = implementation
        self._stack = contextlib.ExitStack()
        if isinstance(workload, GeneratorWorkload):
            self._stack.enter_context(patched_op(implementation.op))
        forward = workload.forward_fn(implementation)
        if implementation.compiled:
            torch._dynamo.reset()  # every case compiles afresh: no recompile limits, no stale guards
            dynamo_counters.clear()  # and counts its own graph breaks (`compile_report`)
            forward = torch.compile(forward, dynamic=False)
        self.forward = forward
        self.graph = None
        self.static_outputs = None

    def first_outputs(self) -> dict[str, torch.Tensor]:
        """Run input set 0 once (compiling or capturing first) and return the outputs."""
        if not self.implementation.cuda_graph:
            return self.workload.run(self.forward, self.workload.sets[0])
        inputs = self.workload.sets[0]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up outside the capture: autotuning, lazy init
                self.workload.run(self.forward, inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = self.workload.run(self.forward, inputs)
        self.graph.replay()
        return self.static_outputs

    def step(self, index: int):
        if self.graph is not None:
            self.graph.replay()
            return self.static_outputs
        sets = self.workload.sets
        return self.workload.run(self.forward, sets[index % len(sets)])

    def compile_report(self) -> dict:
        """For a compiled implementation, after its first call: how many graphs torch.compile made
        and where it broke the case into them (the first reasons, shortened). A break is not an
        error, but every graph is entered from Python: one per layer brings the host time back."""
        breaks = dynamo_counters["graph_break"]
        return {
            "compiled_graphs": int(dynamo_counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [reason.splitlines()[0][:200] for reason, _ in breaks.most_common(3)],
        }

    @property
    def rotating_sets(self) -> int:
        return 1 if self.graph is not None else len(self.workload.sets)

    def close(self) -> None:
        self.graph = None
        self.static_outputs = None
        self._stack.close()
        if self.implementation.compiled:
            torch._dynamo.reset()


def first_error(error: BaseException) -> BaseException:
    """The exception that started `error`'s chain: the innermost of its `__cause__` / `__context__`
    links. A capture that fails inside `torch.cuda.graph` raises again when the context ends the
    capture ("operation failed due to a previous error during capture"), and that second error
    hides the first, which names the call that broke the capture."""
    seen = {id(error)}
    while True:
        earlier = error.__cause__ or error.__context__
        if earlier is None or id(earlier) in seen:
            return error
        seen.add(id(earlier))
        error = earlier


def describe_error(error: BaseException, limit: int = 2000) -> str:
    """`Type: message` of a failed variant, and when it was raised while handling an earlier
    exception, that first one too, with the innermost frame it was raised from (file:line in
    function), at most `limit` characters."""
    text = f"{type(error).__name__}: {error}"
    first = first_error(error)
    if first is not error:
        where = ""
        frames = traceback.extract_tb(first.__traceback__) if first.__traceback__ is not None else []
        if frames:
            frame = frames[-1]
            where = f" (raised at {Path(frame.filename).name}:{frame.lineno} in {frame.name})"
        # the first error leads: it is the cause; the final one only says the capture was spoilt
        text = f"first error: {type(first).__name__}: {first}{where}\nthen: {text}"
    return text[:limit]


def _free_memory(device: torch.device, thorough: bool = False) -> None:
    """Give back what a variant left. Reference counting frees tensors at once; the
    (slow) cycle collection and cache flush only after failures and compiled variants."""
    if thorough:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if thorough:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# One case


@dataclass
class RunOptions:
    device: torch.device
    settings: TimingSettings
    seed: int = 0
    log: Callable[[str], None] = print


def guard_precision(case: Case, device: torch.device) -> str:
    if case.dtype == "float32" and device.type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        return "tfloat32"
    return case.dtype


def run_case(
    case: Case,
    implementations: list[Implementation],
    options: RunOptions,
    on_record: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Guard, measure and time every applicable implementation on one case.

    Returns one record per implementation that applies. Raises FatalCorrectnessError
    (after appending the failing record to the list it carries) when a guarded
    implementation is wrong. on_record(records) is called as each implementation is done,
    with the case's records so far (each one final).
    """
    device = options.device
    workload = make_workload(case, device, options.seed)
    workload.ensure_sets(1)
    base = case.as_dict()
    records: list[dict] = []
    try:
        try:
            truth, truth_source = _truth(workload)
        except Exception as error:  # noqa: BLE001 - without a truth nothing is checked, so nothing is timed
            message = f"no reference result to check against: {type(error).__name__}: {error}"[:2000]
            options.log(f"error: {case.case_id}: {message.splitlines()[0]}")
            for implementation in implementations:
                if applicable(implementation, case, device) is None:
                    record = dict(base)
                    record.update(implementation=implementation.name, family=implementation.family,
                                  status="error", error=message, truth=None)
                    records.append(record)
            return records
        precision = guard_precision(case, device)
        tolerances = reference_errors = None
        # the eager reference goes first: its own error in the case's dtype sets the tolerances
        implementations = sorted(implementations, key=lambda impl: impl != REFERENCE)
        for implementation in implementations:
            reason = applicable(implementation, case, device)
            if reason is not None:
                continue
            if tolerances is None and implementation != REFERENCE:
                tolerances, reference_errors = _tolerances(workload, truth, precision)
            record = dict(base)
            record.update(
                implementation=implementation.name,
                family=implementation.family,
                status="error",
                error=None,
                truth=truth_source,
            )
            records.append(record)
            bound = None
            failed = False
            try:
                bound = Bound(workload, implementation)
                synchronize(device)
                first_started = time.perf_counter()
                if implementation.cuda_graph:
                    # a graph's memory is allocated at capture: measure warm-up + capture
                    outputs, memory = measure_peak_memory(bound.first_outputs, device)
                else:
                    outputs = bound.first_outputs()
                synchronize(device)
                first_call_ms = (time.perf_counter() - first_started) * 1e3
                if implementation.compiled:
                    record.update(bound.compile_report())
                    if record["graph_breaks"]:
                        options.log(
                            f"warning: {implementation.name} on {case.case_id}: {record['graph_breaks']} graph "
                            f"breaks, {record['compiled_graphs']} graphs; first: {record['graph_break_reasons'][0]}"
                        )
                values = {name: outputs[name].detach() for name in truth}
                del outputs
                if tolerances is None:  # this is the reference
                    reference_errors = {name: relative_error(values[name], truth[name]) for name in truth}
                    tolerances = {name: tolerance_for(precision, err) for name, err in reference_errors.items()}
                record["tolerance"] = tolerances
                record["reference_rel_error"] = reference_errors
                try:
                    errors = compare(f"{implementation.name} on {case.case_id}", values, truth, tolerances)
                except CorrectnessError as error:
                    record["rel_error"] = {name: relative_error(values[name], truth[name]) for name in truth}
                    record["status"] = "wrong"
                    record["error"] = str(error)
                    if implementation.fatal_on_wrong:
                        raise FatalCorrectnessError(str(error)) from error
                    options.log(f"WRONG RESULT (not timed): {error}")
                    continue
                finally:
                    del values
                record["rel_error"] = errors
                record["max_rel_error"] = max(errors.values())
                if device.type != "cuda":
                    memory = {"peak_bytes": None, "extra_bytes": None}
                elif not implementation.cuda_graph:
                    _, memory = measure_peak_memory(lambda: bound.step(0), device)
                record["peak_mem_bytes"] = memory["peak_bytes"]
                record["peak_mem_extra_bytes"] = memory["extra_bytes"]
                record.update(_plans(case, implementation))
                workload.ensure_sets(workload.num_rotating_sets(cache_bytes(device)))
                timing = time_calls(bound.step, device, options.settings, first_call_ms=first_call_ms)
                record.update(timing.as_dict())
                record["rotating_sets"] = bound.rotating_sets
                record["status"] = "ok"
            except FatalCorrectnessError:
                raise
            except Exception as error:  # noqa: BLE001 - one failing variant must not end the run
                failed = True
                record["status"] = "error"
                record["error"] = describe_error(error)
                options.log(f"error: {implementation.name} on {case.case_id}: {record['error'].splitlines()[0]}")
            finally:
                if bound is not None:
                    bound.close()
                del bound
                workload.drop_sets(1)
                _free_memory(device, thorough=failed or implementation.compiled)
                if on_record is not None:
                    on_record(records)
    except FatalCorrectnessError as error:
        error.records = records
        raise
    finally:
        workload.sets.clear()
        _free_memory(device, thorough=device.type == "cuda")
    return records


def _plans(case: Case, implementation: Implementation) -> dict:
    """What `benchmarks.memory` and `benchmarks.traffic` plan for the case on meta tensors, for
    the eager form of the implementation (generator cases; Nones otherwise or if a plan fails):
    the peak memory, and the least HBM bytes and kernel launches. With the median time the
    bytes give the bandwidth a case achieves on the bytes it cannot avoid."""
    plans = {"planned_peak_mem_bytes": None, "planned_bytes": None, "planned_launches": None}
    if case.group != "generator":
        return plans
    step = (case.generator, case.batch, getattr(torch, case.dtype), case.tokens, implementation)
    try:  # a plan is a cross-check; it never fails a run
        plans["planned_peak_mem_bytes"] = planned_generator_memory(*step, backward=case.backward)["peak_bytes"]
        launches = planned_generator_traffic(*step, backward=case.backward)
        plans.update(planned_bytes=sum(launch.bytes for launch in launches), planned_launches=len(launches))
    except Exception:  # noqa: BLE001
        pass
    return plans


def _truth(workload: Workload) -> tuple[dict, str]:
    """The reference's outputs in float64 (float32 without TF32 for big generators).

    Falls back to the torch backend in the same precision when the reference cannot
    run (out of memory): in float64 the two agree to ~1e-15, which the layer cases
    of every run check again.
    """
    dtype_name = str(workload.truth_dtype()).replace("torch.", "")
    try:
        return workload.truth(), f"reference/{dtype_name}"
    except torch.cuda.OutOfMemoryError:
        _free_memory(workload.device, thorough=True)
        inputs = workload.cast(workload.sets[0], workload.truth_dtype())
        outputs = workload.run(workload.forward_fn(TORCH, workload.truth_dtype()), inputs)
        return {name: value.detach() for name, value in outputs.items()}, f"torch/{dtype_name}"


def _tolerances(workload: Workload, truth: dict, precision: str) -> tuple[dict, dict]:
    """Per-output tolerance from the reference's own error in the case's dtype (the floor if it cannot run)."""
    try:
        bound = Bound(workload, REFERENCE)
        try:
            outputs = bound.first_outputs()
            errors = {name: relative_error(outputs[name], truth[name]) for name in truth}
        finally:
            bound.close()
    except Exception:  # noqa: BLE001 - e.g. out of memory: fall back to the floors
        errors = {name: 0.0 for name in truth}
        _free_memory(workload.device, thorough=True)
    return {name: tolerance_for(precision, error) for name, error in errors.items()}, errors


# ----------------------------------------------------------------------------------------------
# Derived numbers


def annotate(records: list[dict], case: Case, peaks: dict | None) -> None:
    """Add work, TFLOP/s and roofline (`case_work`) and the speedups (`add_speedups`) to the
    records of one case, in place."""
    work = case_work(case, peaks)
    for record in records:
        record.update(work)
        record.setdefault("tflops", None)
        record.setdefault("pct_of_roofline", None)
        if record["status"] != "ok":
            continue
        record["tflops"] = work["model_flops"] / (record["median_ms"] * 1e-3) / 1e12
        if work["floor_ms"]:
            record["pct_of_roofline"] = 100.0 * work["floor_ms"] / record["median_ms"]
    add_speedups(records)


def add_speedups(records: list[dict]) -> None:
    """Speedups against the reference and against the fastest plain-PyTorch variant of the
    same case (records grouped by case_id; also used after merging runs), in place."""
    by_case: dict[str, list[dict]] = {}
    for record in records:
        by_case.setdefault(record["case_id"], []).append(record)
    for case_records in by_case.values():
        ok = [r for r in case_records if r["status"] == "ok"]
        reference = next((r for r in ok if r["implementation"] == REFERENCE.name), None)
        plain = [r for r in ok if r["family"] in ("reference", "plain")]
        best_plain = min(plain, key=lambda r: r["median_ms"]) if plain else None
        for record in case_records:
            record["speedup_vs_reference"] = record["speedup_vs_best_plain"] = record["best_plain"] = None
            if record["status"] != "ok":
                continue
            if reference is not None:
                record["speedup_vs_reference"] = reference["median_ms"] / record["median_ms"]
            if best_plain is not None:
                record["speedup_vs_best_plain"] = best_plain["median_ms"] / record["median_ms"]
                record["best_plain"] = best_plain["implementation"]


TARGETS = (
    ("speedup_vs_reference", ">=", 4.0, "whole network fwd+bwd, bf16, B=8, 1024 px, L=32: triton vs reference"),
    ("speedup_vs_best_plain", ">=", 1.3, "same case: triton vs the fastest plain-PyTorch variant"),
    ("time_over_floor", "<=", 2.0, "same case: triton's median over the roofline floor"),
    ("refinement_overhead", "<=", 0.12, "triton L=32 over triton unrefined, same case otherwise"),
    ("peak_memory_ratio", "<=", 0.6, "same case: triton's peak training memory over the reference's"),
)


# the fused variants the targets may be met by, eager first
FUSED_VARIANTS = ("triton", "compile-triton", "triton+graph", "compile-triton+graph")
# the plain-PyTorch variants the issue names; "the fastest plain variant" is only known once each
# was timed (and, when the fused variant stands as a CUDA graph, the torch backend's graph too)
ISSUE_PLAIN_VARIANTS = ("reference", "nvlabs", "torch", "compile-reference", "compile-torch")


def evaluate_targets(records: list[dict]) -> list[dict]:
    """The issue's targets on the headline case (None where it was not measured)."""

    def find(implementation: str, **overrides) -> dict | None:
        wanted = dict(HEADLINE, **overrides)
        for record in records:
            if record["implementation"] == implementation and record["status"] == "ok" and all(
                record.get(key) == value for key, value in wanted.items()
            ):
                return record
        return None

    # the fastest fused variant of the headline case stands for our implementation (a user
    # can run the eager op, compile around it or graph the training step); the memory target
    # takes the eager op, since a graph's private pool and a compile cache are not the op's
    fused = [find(name) for name in FUSED_VARIANTS]
    fused = [record for record in fused if record is not None]
    triton = min(fused, key=lambda record: record["median_ms"]) if fused else None
    reference = find("reference")
    eager = find("triton")
    # the refinement's cost: the fastest fused variant timed both refined and unrefined
    pairs = [(record, find(record["implementation"], num_tokens=0, token_sharing="none")) for record in fused]
    pairs = [pair for pair in pairs if pair[1] is not None]
    refined, unrefined = min(pairs, key=lambda pair: pair[0]["median_ms"]) if pairs else (None, None)
    # which plain variants the "fastest plain" was chosen from
    timed_plain = sorted({
        record["implementation"] for record in records
        if record["family"] in ("reference", "plain") and find(record["implementation"]) is not None
    })  # fmt: skip
    required_plain = list(ISSUE_PLAIN_VARIANTS)
    if triton is not None and triton["implementation"].endswith("+graph"):
        required_plain.append("torch+graph")
    untimed_plain = [name for name in required_plain if name not in timed_plain]
    def ratio(numerator, denominator):
        """numerator / denominator, or None where either was not measured (or is 0: no ratio)."""
        return numerator / denominator if numerator is not None and denominator else None

    triton_ms = triton and triton["median_ms"]
    over_unrefined = ratio(refined and refined["median_ms"], unrefined and unrefined["median_ms"])
    values = {
        "speedup_vs_reference": triton and triton["speedup_vs_reference"],
        "speedup_vs_best_plain": triton and triton["speedup_vs_best_plain"],
        "time_over_floor": ratio(triton_ms, triton and triton["floor_ms"]),
        "refinement_overhead": None if over_unrefined is None else over_unrefined - 1,
        # the memory the implementations themselves need (activations, workspaces); the
        # frozen weights and the inputs are the same for both and are left out
        "peak_memory_ratio": ratio(eager and eager["peak_mem_extra_bytes"],
                                   reference and reference["peak_mem_extra_bytes"]),  # fmt: skip
    }
    results = []
    for name, comparison, threshold, description in TARGETS:
        value = values[name]
        met = None if value is None else (value >= threshold if comparison == ">=" else value <= threshold)
        source = {"peak_memory_ratio": eager, "refinement_overhead": refined}.get(name, triton)
        note = None
        if name == "speedup_vs_best_plain" and value is not None:
            note = f"against {triton['best_plain']} of {', '.join(timed_plain)}"
            if untimed_plain:  # a plain variant not timed could be the fastest: no verdict yet
                met, note = None, f"provisional: {', '.join(untimed_plain)} not timed; {note}"
        results.append(
            {"target": name, "comparison": comparison, "threshold": threshold, "value": value, "met": met,
             "description": description, "implementation": source and source["implementation"], "note": note}
        )
    return results


# ----------------------------------------------------------------------------------------------
# A whole suite


def flop_checks(cases: list[Case]) -> list[dict]:
    """FlopCounterMode cross-checks (meta tensors) of every distinct layer shape the cases time:
    a layer case's layer, and each layer of a generator case's network (its toRGBs unrefined),
    whose counts the network's FLOPs are the sum of."""
    seen, checks = set(), []
    for case in cases:
        if case.layer is not None:
            layers = [(case.layer, case.tokens)]
        else:
            convs, torgbs = case.generator.layers()
            layers = [(spec, case.tokens if spec.refinable else TokenSetting(0, False)) for spec in convs + torgbs]
        for layer, tokens in layers:
            key = (layer, case.batch, tokens, case.backward)
            if key in seen:
                continue
            seen.add(key)
            checks.append(
                cross_check_layer(
                    layer, case.batch, tokens.num_tokens, shared_tokens=tokens.shared, backward=case.backward
                )
            )
    return checks


def new_run(suite: str, cases: list[Case], implementations: list[Implementation], options: RunOptions, argv) -> dict:
    env = environment(options.device)
    return {
        "schema": SCHEMA,
        "suite": suite,
        "gpu_suite_run": suite == "gpu" and options.device.type == "cuda",
        "complete": False,
        "stopped_early": None,
        "fatal_error": None,
        "created": _datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "finished": None,
        "duration_s": None,
        "command": list(argv) if argv is not None else sys.argv[1:],
        "environment": env,
        "settings": {**options.settings.as_dict(), "seed": options.seed},
        "peaks": None,
        "implementations": [
            {"name": impl.name, "family": impl.family, "description": impl.description} for impl in implementations
        ],
        "num_cases": len(cases),
        "flop_check": [],
        # the Triton conv kernel's autotuned choice per launch shape (tile, styles on A or W)
        "autotuned_conv_configs": [],
        "results": [],
        "targets": [],
    }


def run_suite(
    run: dict,
    cases: list[Case],
    implementations: list[Implementation],
    options: RunOptions,
    *,
    save: Callable[[dict], None] | None = None,
    max_seconds: float | None = None,
    measure_device_peaks: bool = True,
    progress: bool = True,
) -> dict:
    """Run every case; fill `run` (see new_run) in place and call save(run) after each case.

    Within a case, save gets a copy of the run with the case's finished implementations
    added (and `partial_case` naming it) as each one is done: a run killed from outside (a
    device call's time limit) keeps every implementation it timed, not only whole cases.
    Raises FatalCorrectnessError after saving when a guarded implementation is wrong.
    """
    started = time.perf_counter()
    device = options.device
    run["flop_check"] = flop_checks(cases)
    bad = [check for check in run["flop_check"] if not check["ok"]]
    if bad:
        options.log(f"warning: analytic FLOPs differ from FlopCounterMode for {len(bad)} layer shapes")
    if measure_device_peaks:
        dtypes = sorted({case.dtype for case in cases})
        quick = options.settings.min_time_ms < 100  # smoke runs: a rough peak is enough
        peak_settings = TimingSettings(0.0, 0.0, 1, 2) if quick else None
        run["peaks"] = measure_peaks(device, [DTYPES[name] for name in dtypes], peak_settings)
    iterator = cases
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(cases, desc="benchmark cases", unit="case", file=sys.stderr, dynamic_ncols=True)
        iterator = bar
    log = options.log
    try:
        for case in iterator:
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                run["stopped_early"] = f"time limit of {max_seconds:.0f} s reached before {case.case_id}"
                log(run["stopped_early"])
                break
            if bar is not None:
                bar.set_postfix_str(case.case_id)

            def save_partial(case_records: list[dict], case: Case = case) -> None:
                annotate(case_records, case, run["peaks"])
                results = run["results"] + case_records
                save({**run, "results": results, "partial_case": case.case_id, "targets": evaluate_targets(results)})

            try:
                records = run_case(case, implementations, options, save_partial if save is not None else None)
            except FatalCorrectnessError as error:
                annotate(error.records, case, run["peaks"])
                run["results"].extend(error.records)
                run["fatal_error"] = str(error)
                raise
            annotate(records, case, run["peaks"])
            run["results"].extend(records)
            run["autotuned_conv_configs"] = op_module.autotuned_conv_configs()
            for record in records:
                log(_one_line(record))
            if save is not None:
                save(run)
        else:
            run["complete"] = True
    finally:
        if bar is not None:
            bar.close()
        GeneratorWorkload.clear_models()
        run["targets"] = evaluate_targets(run["results"])
        run["finished"] = _datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        run["duration_s"] = time.perf_counter() - started
        if save is not None:
            save(run)
    return run


def _one_line(record: dict) -> str:
    head = f"{record['case_id']:<48} {record['implementation']:<18}"
    if record["status"] != "ok":
        return f"{head} {record['status'].upper()}: {record['error']}"
    speed = record["speedup_vs_reference"]
    speed = f"{speed:5.2f}x ref" if speed else ""
    return f"{head} {record['median_ms']:10.3f} ms  {speed}"


def default_results_path(run: dict, directory: Path | str = RESULTS_DIR) -> Path:
    """benchmarks/results/<device>_<date>.json, with -2, -3, ... when that exists already."""
    directory = Path(directory)
    date = run["created"][:10]
    stem = f"{device_slug(run['environment'])}_{date}"
    path = directory / f"{stem}.json"
    counter = 2
    while path.exists():
        path = directory / f"{stem}-{counter}.json"
        counter += 1
    return path
