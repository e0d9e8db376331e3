"""Smoke runs of the CPU suite (`python -m benchmarks`) on a tiny generator: outputs, schema, guard."""
import csv
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import implementations as impl_module
from benchmarks.__main__ import main
from benchmarks.cases import HEADLINE
from benchmarks.implementations import Implementation
from benchmarks.runner import _git_commit, add_speedups, default_results_dir, evaluate_targets, source_checkout
from benchmarks.timing import CorrectnessError, compare, percentile, tolerance_for
from refinestyle_kernels import styled_conv2d
from refinestyle_kernels.ops import modulated_conv2d as op_module

TINY = [
    "--suite", "cpu",
    "--layer-size", "16", "--sizes", "16",
    "--channel-max", "8", "--style-dim", "16", "--n-mlp", "1",
    "--min-time-ms", "0", "--min-reps", "2", "--max-reps", "2", "--warmup-ms", "0",
    "--quiet",
]  # fmt: skip

RECORD_KEYS = {
    "case_id", "group", "implementation", "family", "status", "batch", "dtype", "mode", "num_tokens",
    "token_sharing", "median_ms", "p20_ms", "p80_ms", "reps", "speedup_vs_reference", "speedup_vs_best_plain",
    "model_flops", "model_bytes", "tflops", "floor_ms", "pct_of_roofline", "peak_mem_bytes", "rel_error",
    "tolerance", "truth",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _only_json(folder):
    files = sorted(folder.glob("*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def test_cpu_suite_smoke_run_writes_every_report(tmp_path, capsys, monkeypatch):
    # the autotuner's choices are per process: other tests in this worker may have made some
    monkeypatch.setattr(op_module, "_CONV_BEST_CONFIG", {})
    argv = TINY + ["--layers", "conv1,convs.0,to_rgbs.1", "--tokens", "0,4,6s", "--mode", "fwd,fwdbwd",
                   "--impls", "reference,nvlabs,torch",
                   "--out", str(tmp_path)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "GPU suite was NOT run" in stdout and "REDUCED CPU SUITE" in stdout

    path, run = _only_json(tmp_path)
    assert path.name.startswith("cpu-") and run["created"][:10] in path.name
    assert run["schema"] == "refinestyle-bench/1"
    assert run["suite"] == "cpu" and run["gpu_suite_run"] is False and run["complete"] is True
    assert run["fatal_error"] is None
    env = run["environment"]
    for key in ("device_name", "torch", "triton", "python", "cpu_threads", "tf32_matmul"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert run["peaks"]["matmul_flops_per_s"]["float32"] > 0 and run["peaks"]["copy_bytes_per_s"] > 0
    assert [impl["name"] for impl in run["implementations"]] == ["reference", "nvlabs", "torch"]
    assert run["flop_check"] and all(check["ok"] for check in run["flop_check"])
    assert {t["target"] for t in run["targets"]} >= {"speedup_vs_reference", "peak_memory_ratio"}
    assert all(t["met"] is None for t in run["targets"])  # no GPU: the targets are not measured
    assert run["autotuned_conv_configs"] == [] and "Conv autotuner: nothing tuned" in stdout

    results = run["results"]
    # 3 layers (toRGB unrefined only) x 2 modes, + generator with 3 token settings x 2 modes, x 3 implementations
    assert len(results) == (2 * 3 + 1) * 2 * 3 + 3 * 2 * 3
    assert {r["group"] for r in results} == {"layer", "generator"}
    assert {(r["num_tokens"], r["token_sharing"]) for r in results} == {(0, "none"), (4, "per_sample"), (6, "shared")}
    for record in results:
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert record["status"] == "ok", record
        assert record["reps"] == 2
        assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["model_flops"] > 0 and record["model_bytes"] > 0
        assert record["floor_ms"] > 0 and 0 < record["pct_of_roofline"]
        assert record["tflops"] == pytest.approx(record["model_flops"] / (record["median_ms"] * 1e-3) / 1e12)
        assert record["peak_mem_bytes"] is None  # measured on CUDA only
        if record["group"] == "generator":  # planned on meta tensors everywhere
            assert record["planned_peak_mem_bytes"] > 0
            assert record["planned_bytes"] > 0 and record["planned_launches"] > 0
        else:
            assert record["planned_peak_mem_bytes"] is None
            assert record["planned_bytes"] is None and record["planned_launches"] is None
        assert record["truth"] == "reference/float64"
        # the guard compared the output and, for fwd+bwd, every gradient
        expected = {"out"}
        if record["mode"] == "forward_backward":
            expected |= {"grad_x", "grad_styles"} if record["group"] == "layer" else {"grad_w_plus"}
            if record["num_tokens"]:
                expected |= {"grad_p", "grad_q"}
        assert set(record["rel_error"]) == expected
        assert all(record["rel_error"][k] <= record["tolerance"][k] < 1e-3 for k in expected)
        if record["implementation"] == "reference":
            assert record["speedup_vs_reference"] == 1.0

    with path.with_suffix(".csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results) and float(rows[0]["median_ms"]) == results[0]["median_ms"]
    markdown = path.with_suffix(".md").read_text()
    assert "Whole synthesis network" in markdown and "Per layer" in markdown and "GPU SUITE WAS NOT RUN" in markdown
    png = path.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # the report subcommand redraws the same tables from the JSON
    assert main(["report", str(path), "--no-plot"]) == 0
    assert "generator 16px" in capsys.readouterr().out


def test_autotuned_conv_choices_are_recorded_by_name(monkeypatch):
    """The JSON records each autotuned launch's choice (the GPU session's evidence on where the
    styles belong), and the report sums it up."""
    import triton

    from benchmarks.report import _autotune_line
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    def config(on_w):
        kwargs = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, TILE_W=16, SCALE_WEIGHT=on_w, A_TMA=False)
        return triton.Config(kwargs, num_warps=4, num_stages=3)

    forward_key = (0, 3, 64, 32, 32, (1024, 1024), 128, 8, True, True, True, True, False, 3, False, 1, None, 0,
                   torch.bfloat16, torch.bfloat16, torch.bfloat16, None)  # fmt: skip
    grad_x_key = (1, 3, 32, 64, 32, (512, 512), 0, 8, True, False, False, True, True, 0, True, 16, None, 4,
                  torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16)  # fmt: skip
    assert len(forward_key) == len(op_module.CONV_BEST_CONFIG_KEY_FIELDS)
    monkeypatch.setattr(op_module, "_CONV_BEST_CONFIG", {forward_key: config(True), grad_x_key: config(False)})
    chosen = op_module.autotuned_conv_configs()
    assert chosen[0]["MODE"] == 0 and chosen[0]["GRID_HW"] == (1024, 1024) and chosen[0]["a_dtype"] == "torch.bfloat16"
    assert chosen[0]["SCALE_WEIGHT"] is True and chosen[0]["num_stages"] == 3 and chosen[1]["REDUCE_X"] is True
    assert chosen[0]["RGB_CHANNELS"] == 3 and chosen[1]["RGB_CHANNELS"] == 0
    assert chosen[0]["TOKEN_PRODUCTS"] is False and chosen[1]["TILES_PER_PROGRAM"] == 16
    assert chosen[0]["BATCH_BUCKET"] == 8
    assert chosen[0]["A_VECTOR"] == 0 and chosen[1]["A_VECTOR"] == 4
    line = _autotune_line({"autotuned_conv_configs": chosen})
    assert "2 launch shapes tuned" in line and "W tile in 1 of the 1 forward shapes" in line


def test_conv_launch_flops_count_every_product_the_kernel_issues():
    """`_conv_launch_flops`, by hand: 1 sample on a 2 x 3 grid, 3x3 taps, K = 4, N = 5, L = 2."""
    from refinestyle_kernels.ops.modulated_conv2d import _conv_launch_flops

    def flops(**kwargs):
        options = dict(batch=1, grid_hw=(2, 3), ksize=3, k=4, n=5, rank=0, phases=1, fused_projection=False,
                       token_products=False, rgb_channels=0)  # fmt: skip
        return _conv_launch_flops(**{**options, **kwargs})

    assert flops() == 2 * 6 * 9 * 4 * 5  # the conv: 1080 MACs
    # the transposed conv's four phases share the grid's 9 taps; box(z) @ r runs per output pixel
    assert flops(rank=2, phases=4) == 2 * (1080 + 24 * 2 * 5)
    assert flops(rank=2, phases=4, fused_projection=True) == 2 * (1080 + 240 + 6 * 9 * 4 * 2)  # + a @ q^T a tap
    # a grad-x launch's token products: u = x r^T, then grad p a tap and grad q a pixel
    assert flops(rank=2, token_products=True) == 2 * (1080 + 6 * 2 * 5 + 6 * (5 * 2 + 9 * 2 * 4 + 2 * 5))
    assert flops(rgb_channels=3) == 2 * (1080 + 6 * 5 * 3)


def test_conv_launch_table_ranks_the_tuned_launches_against_their_floors():
    """The report's conv-launch table: slowest first, achieved GB/s and TFLOP/s, and each launch's
    floor (least bytes at the copy peak or FLOPs at its dtype's matmul peak), how many configs
    were timed and the next best of them; shapes that were not timed (one config left) are not
    in it; no timed shape, no table."""
    from benchmarks.report import conv_launch_table

    def launch(mode, ms, nbytes, flops, **flags):
        return dict(MODE=mode, K=64, N=32, GRID_HW=(513, 513), L=32, a_dtype="torch.bfloat16", BLOCK_M=128,
                    BLOCK_N=32, BLOCK_K=64, num_warps=4, A_TMA=False, SCALE_WEIGHT=True, tuned_ms=ms,
                    least_bytes=nbytes, flops=flops, **flags)  # fmt: skip

    run = {
        "peaks": {"copy_bytes_per_s": 2e12, "matmul_flops_per_s": {"bfloat16": 5e14}},
        "autotuned_conv_configs": [
            launch(0, 0.5, 1e9, 1e11, timings=[dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=4, ms=0.5)]),
            launch(2, 2.0, 1e8, 5e11, HAS_A_SCALE=True, HAS_LOWRANK=True, FUSE_PROJECTION=True,  # floor 1 ms (FLOPs)
                   timings=[dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=4, ms=2.0),
                            dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, A_TMA=True, ms=2.5),
                            dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=32, num_warps=8, ms=3.0)]),
            launch(1, None, 1e9, 1e9),  # not timed
        ],
    }
    text = conv_launch_table(run)
    lines = text.splitlines()
    assert lines[0].startswith("Conv launches as the autotuner timed them (2 shapes): 2.50 ms in all, 1.50 ms at the floor")
    slow, fast = lines[3], lines[4]
    assert slow.startswith("convT x2 64->32 on 513x513, A*s, +proj L32") and fast.startswith("conv 64->32 on 513x513")
    assert slow.split()[-10:] == ["2.000", "50", "250", "1.000", "2.0x", "3", "64x32x64", "w8", "TMA", "+25%"]
    assert fast.split()[-7:] == ["0.500", "2000", "200", "0.500", "1.0x", "1", "-"]
    assert "| conv launch (tuned) |" in conv_launch_table(run, markdown=True)
    assert conv_launch_table({"autotuned_conv_configs": [launch(0, None, 1, 1)]}) is None


def _drops_residual(x, weight, styles, p=None, q=None, **kwargs):
    """A plausible bug: the low-rank residual silently ignored."""
    return styled_conv2d(x, weight, styles, None, None, **kwargs)


def _with_wrong(monkeypatch, fatal):
    wrong = Implementation("wrong", "fused" if fatal else "plain", "torch", op=_drops_residual, fatal_on_wrong=fatal)
    known = dict(impl_module.registry(), wrong=wrong)
    monkeypatch.setattr(impl_module, "registry", lambda: known)


def test_correctness_guard_fails_the_run_loudly(tmp_path, monkeypatch, capsys):
    _with_wrong(monkeypatch, fatal=True)
    argv = TINY + ["--groups", "layer", "--layers", "convs.0", "--tokens", "4", "--impls", "torch,wrong",
                   "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "CORRECTNESS GUARD FAILED" in captured.err and "wrong on layer/" in captured.err
    _, run = _only_json(tmp_path)
    assert run["complete"] is False and "differs from the reference" in run["fatal_error"]
    wrong = [r for r in run["results"] if r["implementation"] == "wrong"]
    assert len(wrong) == 1 and wrong[0]["status"] == "wrong"
    assert "median_ms" not in wrong[0] and wrong[0]["rel_error"]["out"] > 0.1  # no time for a wrong result
    # the case's other implementation was measured before the guard stopped the run
    assert [r["status"] for r in run["results"] if r["implementation"] == "torch"] == ["ok"]


def test_wrong_plain_variant_is_reported_not_timed_and_the_run_goes_on(tmp_path, monkeypatch):
    _with_wrong(monkeypatch, fatal=False)
    argv = TINY + ["--groups", "layer", "--layers", "conv1", "--tokens", "0,4", "--impls", "wrong,torch",
                   "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 3
    _, run = _only_json(tmp_path)
    assert run["complete"] is True
    status = {(r["implementation"], r["num_tokens"]): r["status"] for r in run["results"]}
    # without tokens dropping them changes nothing; with tokens the guard catches it
    assert status == {("wrong", 0): "ok", ("torch", 0): "ok", ("wrong", 4): "wrong", ("torch", 4): "ok"}


def test_each_finished_implementation_is_on_disk_before_the_next_one_runs(tmp_path, monkeypatch):
    """A device call's time limit kills the suite from outside, mid-case: what it timed of that
    case must already be in the JSON, not only the cases it finished."""
    seen = []

    def peeks_at_the_json(*args, **kwargs):
        if not seen:  # its first call: the guard's
            files = list(tmp_path.glob("*.json"))
            run = json.loads(files[0].read_text()) if files else {"results": []}
            seen.append((run.get("partial_case"), [(r["implementation"], r["status"]) for r in run["results"]]))
        return styled_conv2d(*args, **kwargs)

    peek = Implementation("peek", "plain", "torch", op=peeks_at_the_json)
    known = dict(impl_module.registry(), peek=peek)
    monkeypatch.setattr(impl_module, "registry", lambda: known)
    argv = TINY + ["--groups", "layer", "--layers", "convs.1", "--tokens", "4", "--impls", "reference,torch,peek",
                   "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 0
    case_id, finished = seen[0]
    assert case_id.startswith("layer/") and finished == [("reference", "ok"), ("torch", "ok")]
    from benchmarks import report

    partial = {**json.loads(next(tmp_path.glob("*.json")).read_text()), "partial_case": case_id}
    assert f"Stopped from outside inside {case_id}" in report.markdown_report(partial)
    _, run = _only_json(tmp_path)
    assert run["complete"] is True and "partial_case" not in run
    assert [r["implementation"] for r in run["results"]] == ["reference", "torch", "peek"]
    torch_record = run["results"][1]
    assert torch_record["speedup_vs_reference"] > 0 and torch_record["tflops"] > 0


def test_a_failing_variant_or_truth_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    from benchmarks import workloads

    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    known = dict(impl_module.registry(), broken=Implementation("broken", "plain", "torch", op=broken))
    monkeypatch.setattr(impl_module, "registry", lambda: known)
    real_truth = workloads.LayerWorkload.truth

    def truth_fails_for_conv1(self):
        if self.spec.name == "conv1":
            raise RuntimeError("out of luck")
        return real_truth(self)

    monkeypatch.setattr(workloads.LayerWorkload, "truth", truth_fails_for_conv1)
    argv = TINY + ["--groups", "layer", "--layers", "conv1,convs.1", "--tokens", "4", "--impls", "torch,broken",
                   "--no-plot", "--out", str(tmp_path)]
    assert main(argv) == 0
    _, run = _only_json(tmp_path)
    assert run["complete"] is True
    status = {(r["layer_name"], r["implementation"]): (r["status"], r["error"]) for r in run["results"]}
    assert status[("conv1", "torch")][0] == "error" and "no reference result" in status[("conv1", "torch")][1]
    assert status[("convs.1", "torch")] == ("ok", None)
    assert status[("convs.1", "broken")] == ("error", "RuntimeError: kernel launch failed")


def test_compiled_variants_report_their_graph_breaks(tmp_path, monkeypatch, capsys):
    """A compiled variant records how many graphs torch.compile made of the case and why it
    broke it up; a break is warned about and listed in the markdown, not hidden in the time."""
    from benchmarks import runner
    from benchmarks.implementations import compiled

    def breaks_the_graph(*args, **kwargs):
        torch._dynamo.graph_break()
        return styled_conv2d(*args, backend="torch", **kwargs)

    breaking = compiled(Implementation("breaking", "plain", "torch", op=breaks_the_graph))
    known = dict(impl_module.registry(), **{breaking.name: breaking})
    monkeypatch.setattr(impl_module, "registry", lambda: known)
    # the eager backend: the graph capture is what is checked, not Inductor's code
    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(runner.torch, "compile", compile_eagerly)
    argv = TINY + ["--groups", "layer", "--layers", "conv1", "--tokens", "4", "--mode", "fwd",
                   "--impls", "torch,compile-torch,compile-breaking", "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    argv.remove("--quiet")
    assert main(argv) == 0
    _, run = _only_json(tmp_path)
    records = {r["implementation"]: r for r in run["results"]}
    assert records["compile-torch"]["status"] == "ok" and records["compile-torch"]["graph_breaks"] == 0
    assert records["compile-torch"]["compiled_graphs"] == 1
    assert "graph_breaks" not in records["torch"]
    broken = records["compile-breaking"]
    assert broken["status"] == "ok" and broken["graph_breaks"] >= 1 and broken["compiled_graphs"] >= 1
    assert "graph_break" in broken["graph_break_reasons"][0]
    assert "compile-breaking on layer/" in capsys.readouterr().err
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert "Compiled with graph breaks" in markdown and "compile-breaking" in markdown
    assert "compile-torch on" not in markdown


def test_compare_and_tolerances():
    truth = {"out": torch.randn(50, dtype=torch.float64)}
    close = {"out": truth["out"] * (1 + 1e-6)}
    assert compare("x", close, truth, {"out": 1e-4})["out"] == pytest.approx(1e-6, rel=1e-3)
    with pytest.raises(CorrectnessError, match="out: "):
        compare("x", {"out": truth["out"] * 1.01}, truth, {"out": 1e-4})
    with pytest.raises(CorrectnessError):
        compare("x", {"out": torch.full((50,), math.nan)}, truth, {"out": 1.0})
    assert tolerance_for("bfloat16", 1e-3) == 2e-2 and tolerance_for("bfloat16", 1e-2) == pytest.approx(4e-2)
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.2) == pytest.approx(1.2)


def test_selection_errors_are_clear():
    with pytest.raises(SystemExit, match="unknown"):
        main(TINY + ["--impls", "reference,cudnn-magic"])
    with pytest.raises(SystemExit, match="--tokens"):
        main(TINY + ["--tokens", "lots"])
    with pytest.raises(SystemExit, match="unknown layer"):
        main(TINY + ["--layers", "convs.99"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            main(TINY + ["--suite", "headline"])
        main(["--suite", "gpu", "--list", "--quiet"])  # listing the GPU cases works anywhere


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (conftest.py sets it without a GPU)"
)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_implementation_runs_through_the_suite(tmp_path, monkeypatch, dtype):
    """On CUDA the suite times backend="triton" per layer and through the generator. Here the same
    path (workload, generator modules on the triton backend, correctness guard, report) runs with
    the kernels in the Triton interpreter: it must reach the kernels and pass the guard, also in
    bf16, the headline's dtype, where the guard's tolerance comes from the reference's own bf16
    error (a guard that failed a correct fused path would stop a GPU run before any timing)."""
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    launches = []
    forward = op_module._triton_forward
    monkeypatch.setattr(op_module, "_triton_forward", lambda *a: launches.append(1) or forward(*a))
    interpreted = dataclasses.replace(impl_module.TRITON, needs_cuda=False)
    known = dict(impl_module.registry(), triton=interpreted)
    monkeypatch.setattr(impl_module, "registry", lambda: known)
    argv = TINY + ["--layers", "convs.0", "--tokens", "4", "--mode", "fwdbwd", "--batch", "2",
                   "--impls", "reference,triton", "--no-plot", "--no-peaks", "--min-reps", "1", "--max-reps", "1",
                   "--dtype", dtype, "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    _, run = _only_json(tmp_path)
    assert {r["dtype"] for r in run["results"]} == {"bfloat16" if dtype == "bf16" else "float32"}
    triton_records = [r for r in run["results"] if r["implementation"] == "triton"]
    assert {r["group"] for r in triton_records} == {"layer", "generator"}
    assert all(r["status"] == "ok" and r["family"] == "fused" for r in triton_records), triton_records
    assert all(r["speedup_vs_reference"] is not None for r in triton_records)
    assert len(launches) >= 2  # the layer case and the generator's convs went through the kernels


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1", reason="the probe runs the triton backend on CPU tensors (interpreter mode)"
)
def test_host_overhead_probe_times_every_implementation(monkeypatch):
    """benchmarks.host_overhead runs each layer implementation fwd+bwd with the Triton launches stubbed."""
    from benchmarks import host_overhead
    from refinestyle_kernels import styled_conv2d
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    launches = []
    monkeypatch.setattr(
        op_module, "_launch_conv_gemm", lambda *a, **k: launches.append("conv") or host_overhead._no_launch(*a, **k)
    )

    class BlurProbe(host_overhead._NoLaunch):
        def __getitem__(self, grid):
            launches.append("blur")
            return super().__getitem__(grid)

    for kernel in host_overhead.STUBBED_KERNELS:
        monkeypatch.setattr(op_module, kernel, BlurProbe() if kernel == "_blur_kernel" else host_overhead._NoLaunch())
    for backend in ("triton", "torch"):
        micros = host_overhead.host_time_us(
            lambda *a, **k: styled_conv2d(*a, backend=backend, **k), 2, 8, 4, 4, upsample=True, calls=3
        )
        assert 0 < micros < 1e6
    assert "conv" in launches and "blur" in launches  # the triton path reached its (stubbed) launches
    counts = {
        backend: host_overhead.aten_op_count(
            lambda *a, backend=backend, **k: styled_conv2d(*a, backend=backend, **k), 2, 8, 4, 4, upsample=False
        )
        for backend in ("triton", "reference")
    }
    assert 0 < counts["triton"] < counts["reference"]  # 66 against 90 when this was written


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_host_overhead_probe_times_tritons_own_launch_path():
    """--triton-launches: a fresh process outside the interpreter, every launch through Triton's
    real launch path to the stand-in driver (benchmarks/stand_in_driver.py), which counts them."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_overhead", "--triton-launches", "--calls", "3"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        name: (int(ops), int(launches))
        for name, ops, launches in re.findall(r"  (\S+).*?\d+ us\s+(\d+) aten ops\s+(\d+) Triton launches", result.stdout)
    }
    assert set(rows) == {"triton", "torch", "nvlabs", "reference"}, result.stdout
    assert rows["triton"][1] >= 5 and rows["reference"][1] == 0  # the fwd+bwd's kernels, each launched
    assert rows["triton"][0] < rows["reference"][0], result.stdout


def _headline_record(implementation: str, family: str, median_ms: float, memory: int, **overrides) -> dict:
    record = dict(HEADLINE, implementation=implementation, family=family, status="ok", median_ms=median_ms,
                  floor_ms=6.0, peak_mem_extra_bytes=memory, case_id="generator/1024px/b8/bf16/fwd+bwd/L32")
    record.update(overrides)
    if record["num_tokens"] == 0:
        record["case_id"] = record["case_id"].replace("L32", "L0")
    return record


def test_targets_take_the_fastest_fused_variant_and_the_eager_op_for_memory():
    records = [
        _headline_record("reference", "reference", 100.0, 10),
        _headline_record("nvlabs", "plain", 80.0, 12),
        _headline_record("triton", "fused", 60.0, 5),
        _headline_record("triton+graph", "fused", 20.0, 9),
        _headline_record("triton", "fused", 55.0, 5, num_tokens=0, token_sharing="none"),
        _headline_record("triton+graph", "fused", 18.0, 9, num_tokens=0, token_sharing="none"),
    ]
    add_speedups(records)
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["speedup_vs_reference"]["implementation"] == "triton+graph"
    assert targets["speedup_vs_reference"]["value"] == pytest.approx(5.0) and targets["speedup_vs_reference"]["met"]
    assert targets["speedup_vs_best_plain"]["value"] == pytest.approx(4.0)
    assert targets["time_over_floor"]["value"] == pytest.approx(20.0 / 6.0) and not targets["time_over_floor"]["met"]
    assert targets["refinement_overhead"]["value"] == pytest.approx(20.0 / 18.0 - 1)  # graph over graph
    assert targets["peak_memory_ratio"]["implementation"] == "triton"
    assert targets["peak_memory_ratio"]["value"] == pytest.approx(0.5) and targets["peak_memory_ratio"]["met"]


def test_targets_count_the_reference_as_plain_pytorch_and_skip_records_that_failed():
    """The reference is itself a plain-PyTorch variant (here the fastest one), and a fused
    record whose output was wrong, or that failed, never stands for the fused path however
    fast it was."""
    records = [
        _headline_record("reference", "reference", 50.0, 10),
        _headline_record("nvlabs", "plain", 80.0, 12),
        _headline_record("triton", "fused", 40.0, 5),
        _headline_record("triton+graph", "fused", 10.0, 9, status="wrong"),
        _headline_record("compile-triton", "fused", 5.0, 9, status="failed"),
    ]
    add_speedups(records)
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["speedup_vs_reference"]["implementation"] == "triton"
    assert targets["speedup_vs_best_plain"]["value"] == pytest.approx(50.0 / 40.0)


def test_the_plain_target_waits_for_every_plain_variant_and_the_overhead_for_a_pair():
    """'The fastest plain-PyTorch variant' is known once the issue's plain variants were timed (a run
    cut short after the fused ones would compare against the reference alone); the refinement's
    cost takes the fastest fused variant timed both refined and unrefined."""
    from benchmarks.report import _targets_text

    records = [
        _headline_record("reference", "reference", 100.0, 10),
        _headline_record("nvlabs", "plain", 80.0, 12),
        _headline_record("triton", "fused", 60.0, 5),
        _headline_record("triton+graph", "fused", 30.0, 9),
        _headline_record("compile-triton+graph", "fused", 20.0, 9),  # its unrefined case was cut short
        _headline_record("triton", "fused", 50.0, 5, num_tokens=0, token_sharing="none"),
        _headline_record("triton+graph", "fused", 27.0, 9, num_tokens=0, token_sharing="none"),
    ]
    add_speedups(records)
    targets = {t["target"]: t for t in evaluate_targets(records)}
    plain = targets["speedup_vs_best_plain"]
    assert plain["value"] == pytest.approx(4.0) and plain["met"] is None
    assert plain["note"].startswith("provisional: torch, compile-reference, compile-torch, torch+graph not timed")
    assert "provisional" in _targets_text({"targets": list(targets.values())}, markdown=True)
    overhead = targets["refinement_overhead"]
    assert overhead["implementation"] == "triton+graph" and overhead["value"] == pytest.approx(30.0 / 27.0 - 1)

    records += [_headline_record(name, "plain", 40.0, 12)
                for name in ("torch", "compile-reference", "compile-torch", "torch+graph")]  # fmt: skip
    add_speedups(records)
    plain = {t["target"]: t for t in evaluate_targets(records)}["speedup_vs_best_plain"]
    assert plain["value"] == pytest.approx(2.0) and plain["met"] is True
    assert plain["note"] == "against torch of compile-reference, compile-torch, nvlabs, reference, torch, torch+graph"


def test_merged_runs_keep_one_record_per_case_and_implementation(tmp_path, capsys):
    """Runs merged by `report` (oldest first): the last measurement of a (case, implementation)
    replaces the earlier ones, so the targets, the markdown and the speedups read the same
    record; a later record without a time does not replace a timed one."""
    from benchmarks.__main__ import merged_results

    older = [_headline_record("reference", "reference", 100.0, 10), _headline_record("triton", "fused", 60.0, 5),
             _headline_record("triton", "fused", 50.0, 5, num_tokens=0, token_sharing="none")]  # fmt: skip
    newer = [_headline_record("triton", "fused", 40.0, 5),
             dict(_headline_record("reference", "reference", 0.0, 0), status="failed", median_ms=None)]  # fmt: skip
    merged = merged_results([{"results": older}, {"results": newer}])
    assert len(merged) == 3
    by_key = {(r["implementation"], r["num_tokens"]): r for r in merged}
    assert by_key[("triton", 32)]["median_ms"] == 40.0 and by_key[("reference", 32)]["median_ms"] == 100.0
    add_speedups(merged)
    targets = {t["target"]: t for t in evaluate_targets(merged)}
    assert targets["speedup_vs_reference"]["value"] == pytest.approx(2.5)
    assert targets["refinement_overhead"]["value"] == pytest.approx(40.0 / 50.0 - 1)
    # a later wrong result is not hidden by an earlier time
    wrong = dict(_headline_record("triton", "fused", 0.0, 0), status="wrong", median_ms=None)
    merged = merged_results([{"results": older}, {"results": [wrong]}])
    assert {(r["implementation"], r["num_tokens"]): r for r in merged}[("triton", 32)]["status"] == "wrong"


def test_report_refuses_to_merge_runs_of_other_settings(tmp_path, capsys):
    """An A/B run (--kernel-option) or another machine's run merged into one report would pass
    its numbers off as the same run's: refused, naming what differs."""
    from benchmarks.__main__ import main, merge_conflicts

    environment = {"device_name": "NVIDIA H100", "torch": "2.11.0", "triton": "3.6.0", "kernel_options": {}}
    plain = {"environment": environment}
    ab = {"environment": dict(environment, kernel_options={"CONV_TOKEN_PRODUCTS_MAX_K": 0})}
    assert merge_conflicts([plain, dict(plain, environment=dict(environment, kernel_options=None))]) == []
    assert merge_conflicts([plain, ab]) == ["kernel_options: None / {'CONV_TOKEN_PRODUCTS_MAX_K': 0}"]
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    run = json.loads(sorted(results.glob("cpu-*.json"))[0].read_text())
    paths = []
    for name, env in (("a.json", run["environment"]), ("b.json", dict(run["environment"], triton="0.0"))):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(dict(run, environment=env)))
    assert main(["report", *map(str, paths), "--no-plot"]) == 2
    assert "differ in triton: " in capsys.readouterr().err


def test_a_refinement_that_costs_nothing_is_a_measured_target():
    """An overhead of exactly 0 is a value that meets the target, not 'not measured'."""
    records = [_headline_record("reference", "reference", 100.0, 10), _headline_record("triton", "fused", 50.0, 5),
               _headline_record("triton", "fused", 50.0, 5, num_tokens=0, token_sharing="none")]  # fmt: skip
    add_speedups(records)
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["refinement_overhead"]["value"] == 0.0 and targets["refinement_overhead"]["met"] is True


def test_generator_cases_cross_check_the_flops_of_each_of_their_layers():
    """A run of generator cases alone still records FlopCounterMode checks: one per layer of the
    network (toRGBs unrefined), whose analytic counts the network's FLOPs add up."""
    from benchmarks.cases import Case, GeneratorConfig, TokenSetting
    from benchmarks.runner import flop_checks

    config = GeneratorConfig(16, channel_max=8, style_dim=16)
    case = Case("generator", config, 2, "float32", "forward_backward", TokenSetting(4, False))
    checks = flop_checks([case, case])
    convs, torgbs = config.layers()
    assert len(checks) == len(convs) + len(torgbs) and all(check["ok"] for check in checks)
    assert {check["num_tokens"] for check in checks} == {0, 4}


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sizes", "100"], "size: expected a power of two"),
        (["--batch", "0"], "batch: expected a positive integer"),
        (["--layers", ","], "--layers: expected comma-separated layer names"),
        (["--impls", "triton"], "--impls: no implementation left"),  # needs CUDA, skipped here
    ],
)
def test_bad_narrowing_stops_before_any_case_runs(options, message, monkeypatch):
    if torch.cuda.is_available() and options[0] == "--impls":
        pytest.skip("triton runs on this machine")
    with pytest.raises(SystemExit, match=message):
        main(TINY + options)


def test_cuda_graphs_capture_every_generator_case_and_no_layer_case():
    from benchmarks.cases import headline_suite
    from benchmarks.runner import applicable

    graph = impl_module.select(["triton+graph"])[0]
    cases = headline_suite().cases()
    assert {case.group for case in cases} == {"layer", "generator"}
    for case in cases:
        reason = applicable(graph, case, torch.device("cuda"))
        assert (reason is None) == (case.group == "generator"), case.case_id
        assert applicable(graph, case, torch.device("cpu")) == "needs CUDA"


def test_gpu_session_script_names_real_cases(capsys, monkeypatch):
    """benchmarks/gpu_session.sh (the next GPU session's three calls) rejects a bad stage, the
    layers its third stage times exist in the suite, and its A/B run's kernel options apply."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    result = subprocess.run(["bash", str(script), "5"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
    layers = re.search(r'^layers="([^"]+)"', script.read_text(), re.MULTILINE).group(1)
    assert main(["--suite", "headline", "--groups", "layer", "--layers", layers, "--list"]) == 0
    listed = capsys.readouterr().out
    for name in layers.split(","):
        assert f"/{name}/" in listed, name
    from benchmarks.__main__ import apply_kernel_options

    options = re.findall(r"--kernel-option (\S+)", script.read_text())
    assert options
    from refinestyle_kernels.ops import upsample_add as upsample_module

    for option in options:  # restored after the test
        name = option.partition("=")[0]
        module = upsample_module if hasattr(upsample_module, name) else op_module
        monkeypatch.setattr(module, name, getattr(module, name))
    assert set(apply_kernel_options(options)) == {option.partition("=")[0] for option in options}


# stands in for python3 in gpu_session.sh: writes the files each command would write, as
# `report.write_all` names them for --output (.json, .csv, .md, and .png unless --no-plot)
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$1" in
-c) exit 1 ;;  # no xdist
-) cat >/dev/null; echo "torch, triton, a stand-in GPU"; exit 0 ;;
esac
args=("$@"); plot=1
for arg in "$@"; do [ "$arg" = --no-plot ] && plot=0; done
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
    --json) touch "${args[i + 1]}" ;;
    --output)
        stem="${args[i + 1]%.json}"
        touch "$stem.json" "$stem.csv" "$stem.md"
        [ "$plot" = 1 ] && touch "$stem.png" ;;
    esac
done
exit 0
"""


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
@pytest.mark.parametrize("stage", ["1", "2", "3", "4"])
def test_gpu_session_stage_leaves_at_most_what_the_device_tool_brings_back(stage, tmp_path):
    """The device tool returns at most 8 files from $OUT (/work/.library/device/README.md); a
    stage that wrote more would lose some of its results."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out)}
    result = subprocess.run(["bash", str(script), stage], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    written = sorted(path.name for path in out.rglob("*") if path.is_file())
    assert 0 < len(written) <= 8, written
    if stage == "3":
        assert {"headline-layers.json", "capture-check.log", "headline-generator-compile-reference.json"} <= set(written)
    if stage == "4":
        assert {"ab-all-on.json", "ab-tap-loads-l2.json", "ab-epilogue-products-128.json", "ab-loads-unpipelined.json",
                "ab-epilogue-backward-one-block.json", "ab-blur-loads-in-place.json", "ab-demodulation-tf32x3.json",
                "ab-upsample-add-off.json"} <= set(written)  # fmt: skip
    if stage == "2":
        assert {"headline-generator.json", "headline-generator-compile-torch.json",
                "headline-generator-triton+graph.json"} <= set(written)  # fmt: skip


def test_kernel_options_are_set_for_the_run_and_recorded(tmp_path, capsys, monkeypatch):
    """--kernel-option switches a tuning constant of the op module (an A/B run of a fusion) and
    the JSON and the banner say so; unknown names and unparsable values stop the run."""
    from refinestyle_kernels.ops import upsample_add as upsample_module

    for name in ("RGB_EPILOGUE_MAX_COUT", "TRITON_AUTOTUNE"):  # restored after the test
        monkeypatch.setattr(op_module, name, getattr(op_module, name))
    monkeypatch.setattr(upsample_module, "UPSAMPLE_ADD_TRITON", True)
    argv = TINY + ["--groups", "generator", "--tokens", "0", "--mode", "fwd", "--impls", "torch", "--no-plot",
                   "--kernel-option", "RGB_EPILOGUE_MAX_COUT=0", "--kernel-option", "TRITON_AUTOTUNE=false",
                   "--kernel-option", "UPSAMPLE_ADD_TRITON=0", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert op_module.RGB_EPILOGUE_MAX_COUT == 0 and op_module.TRITON_AUTOTUNE is False
    assert upsample_module.UPSAMPLE_ADD_TRITON is False
    _, run = _only_json(tmp_path)
    assert run["environment"]["kernel_options"] == {
        "RGB_EPILOGUE_MAX_COUT": 0, "TRITON_AUTOTUNE": False, "UPSAMPLE_ADD_TRITON": False
    }
    assert "Kernel options changed for this run" in capsys.readouterr().out
    for bad, message in (("NOT_A_CONSTANT=1", "NAME one of"), ("RGB_EPILOGUE_MAX_COUT", "NAME=VALUE"),
                         ("RGB_EPILOGUE_MAX_COUT=wide", "of type int"), ("TRITON_AUTOTUNE=maybe", "of type bool"),
                         ("LAUNCH_OBSERVER=1", "NAME one of")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            main(TINY + ["--kernel-option", bad, "--list"])


def test_results_go_to_the_checkout_or_the_working_directory_never_site_packages(tmp_path):
    """A source checkout keeps its results (and records its commit) in benchmarks/results; an installed
    copy writes ./refinestyle-bench-results and records no commit, even inside another git repository."""
    repo = Path(__file__).resolve().parents[1]
    assert source_checkout(repo / "benchmarks") == repo
    assert default_results_dir(repo / "benchmarks") == repo / "benchmarks" / "results"
    installed = tmp_path / "site-packages" / "benchmarks"
    installed.mkdir(parents=True)
    (tmp_path / "site-packages" / "refinestyle_kernels").mkdir()
    assert source_checkout(installed) is None
    assert default_results_dir(installed) == Path("refinestyle-bench-results")  # relative: the working directory
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "other project"], check=True)
    assert _git_commit(installed) is None
    commit = _git_commit(repo / "benchmarks")
    if (repo / ".git").exists():
        assert commit is not None and len(commit) == 40


def test_capture_check_refuses_bad_arguments_and_a_machine_without_a_gpu(monkeypatch, capsys):
    """benchmarks.capture_check (the next GPU session's look at the failing +graph variants) names a
    bad argument, and says it needs a GPU instead of failing inside torch.cuda."""
    from benchmarks import capture_check

    with pytest.raises(SystemExit) as info:
        capture_check.main(["--size", "100"])
    assert info.value.code == 2 and "--size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        capture_check.main(["--impl", "triton+graph"])  # it captures itself: eager implementations only
    assert info.value.code == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert capture_check.main(["--impl", "reference"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_failed_variant_records_the_error_that_started_the_chain():
    """When a capture breaks, torch.cuda.graph's exit raises "operation failed due to a previous
    error during capture" and hides the call that broke it (session 24 recorded only that). The
    record leads with the first error and where it was raised."""
    from benchmarks.runner import describe_error, first_error

    class Capture:  # ends its capture on exit, failing if the block failed, as torch.cuda.graph does
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            if exc[0] is not None:
                raise RuntimeError("operation failed due to a previous error during capture")

    def synchronizing_call():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError) as info:
        with Capture():
            synchronizing_call()
    error = info.value
    assert "previous error" in str(error)
    assert "not permitted" in str(first_error(error))
    text = describe_error(error)
    assert text.startswith("first error: RuntimeError: operation not permitted when stream is capturing")
    assert "in synchronizing_call" in text.splitlines()[0]
    assert text.splitlines()[1] == "then: RuntimeError: operation failed due to a previous error during capture"
    plain = ValueError("bad input")
    assert describe_error(plain) == "ValueError: bad input" and first_error(plain) is plain
    assert len(describe_error(ValueError("x" * 5000))) == 2000


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on CPU tensors needs the interpreter")
def test_profile_ranges_name_each_layer_call_only_when_switched_on():
    """`modulated_conv2d.PROFILE_RANGES` (set by benchmarks.profile) puts each layer's Triton
    forward and backward, and the toRGB skip's upsample, in a profiler range named after its
    shape; off (the default) there is none."""
    from refinestyle_kernels import upsample_add
    from refinestyle_kernels.ops import modulated_conv2d

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    weight, styles = torch.randn(5, 3, 3, 3, generator=generator), torch.randn(2, 3, generator=generator)
    skip = torch.randn(2, 3, 2, 2, generator=generator, requires_grad=True)
    kernel = torch.ones(4, 4) / 4

    def names(switch):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(modulated_conv2d, "PROFILE_RANGES", switch)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                out = styled_conv2d(x, weight, styles, backend="triton")
                image = upsample_add(skip, kernel, out[:, :3], backend="triton")
                image.square().sum().backward()
        return {event.name for event in profiler.events() if event.name.startswith("refinestyle ")}

    assert names(False) == set()
    assert names(True) == {
        "refinestyle conv 3->5 4x4 forward", "refinestyle conv 3->5 4x4 backward",
        "refinestyle skip upsample 3ch 2x2 forward", "refinestyle skip upsample 3ch 2x2 backward",
    }  # fmt: skip


def test_profile_layer_table_sums_the_kernels_inside_each_outermost_range():
    """benchmarks.profile's per-layer table: kernels linked to a range or to any event inside it,
    per step, grouped by name; a range inside another counts once, in the outer one."""
    from types import SimpleNamespace

    from benchmarks.profile import _layer_table

    def event(name, kernels=(), children=()):
        node = SimpleNamespace(name=name, kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels],
                               cpu_children=list(children), cpu_parent=None)  # fmt: skip
        for child in children:
            child.cpu_parent = node
        return node

    launch = event("cuLaunchKernel", kernels=[("_conv_gemm_kernel", 3000.0)])
    inner = event("refinestyle conv 3->5 4x4 forward", kernels=[("_blur_kernel", 1000.0)])
    outer = event("refinestyle conv 5->5 8x8 up forward", kernels=[("_conv_gemm_kernel", 2000.0)],
                  children=[launch, inner])  # fmt: skip
    other = event("refinestyle conv 5->5 8x8 up forward", kernels=[("_conv_gemm_kernel", 2000.0)])
    stray = event("aten::add", kernels=[("elementwise", 500.0)])
    rows = _layer_table([outer, launch, inner, other, stray], steps=2)
    assert [row["range"] for row in rows] == ["conv 5->5 8x8 up forward"]
    (row,) = rows
    assert row["calls_per_step"] == 1.0 and row["ms_per_step"] == pytest.approx(4.0)
    assert row["kernels"] == {"_conv_gemm_kernel": pytest.approx(3.5), "_blur_kernel": pytest.approx(0.5)}
