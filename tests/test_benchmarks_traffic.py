"""The traffic plan without a GPU: `benchmarks.traffic`.

The plan counts, on meta tensors, what every kernel launch of a training step reads and
writes. These tests check the byte count of a tensor, one launch against its hand count,
that the meta plan is exactly what a real run issues (the Triton kernels run in the
interpreter, which needs TRITON_INTERPRET=1, set by conftest.py on machines without a GPU),
and the command line.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import traffic
from benchmarks.cases import GeneratorConfig, TokenSetting
from benchmarks.flops import generator_layers
from benchmarks.implementations import REFERENCE, TRITON
from refinestyle_kernels.ops import modulated_conv2d as op_module

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="a real run of the Triton path on the CPU needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)",
)

SMALL = GeneratorConfig(16, channel_multiplier=1, channel_max=8, style_dim=8, n_mlp=1)


def test_addressed_bytes_counts_expanded_dimensions_once():
    assert traffic.addressed_bytes(torch.empty(3, 5, dtype=torch.bfloat16)) == 30
    assert traffic.addressed_bytes(torch.empty(1, 7).expand(4, 7)) == 28
    assert traffic.addressed_bytes(torch.empty(2, 3, 4).permute(2, 0, 1)) == 96
    assert traffic.addressed_bytes(torch.empty((), dtype=torch.float64)) == 8


def test_forward_conv_launch_moves_what_the_hand_count_says():
    """The last plain conv's forward launch (unrefined, bf16), which also computes the block's
    toRGB: x, the tap-major weight, styles, d ([B, Cout] fp32: the launch's alpha and beta, read
    once), the shared noise map, its strength and the bias in, and the toRGB's styled kernel ([B, 3, Cout] fp32) and
    bias; the output out and the image out. Nothing else runs the toRGB."""
    batch = 2
    launches = traffic.planned_generator_traffic(SMALL, batch, torch.bfloat16, TokenSetting(0, False), TRITON)
    spec = next(s for s in generator_layers(16, 1, 8)[0] if s.name == "convs.3")
    assert spec.out_channel <= op_module.RGB_EPILOGUE_MAX_COUT
    (conv,) = [
        l for l in launches if l.layer == f"{spec.name}+to_rgbs.1" and l.phase == "forward" and l.kernel.startswith("conv_gemm")
    ]
    pixels = spec.out_size**2
    reads = (
        2 * batch * pixels * spec.in_channel  # x
        + 2 * 9 * spec.in_channel * spec.out_channel  # W0 taps
        + 2 * batch * spec.in_channel  # styles
        + 4 * batch * spec.out_channel  # d, as alpha (times the weight scale) and as beta
        + 2 * pixels + 2 + 2 * spec.out_channel  # noise, strength, bias
        + 4 * batch * 3 * spec.out_channel + 2 * 3  # the toRGB's mix and bias
    )
    writes = 2 * batch * pixels * spec.out_channel + 2 * batch * pixels * 3
    assert (conv.read_bytes, conv.write_bytes) == (reads, writes)


def test_the_w_plus_rows_cost_one_backward_launch():
    """The synthesis network splits w+ into its rows once (unbind): their gradients are stacked
    by one launch, not zero-filled and summed row by row."""
    launches = traffic.planned_generator_traffic(SMALL, 2, torch.float32, TokenSetting(0, False), TRITON)
    other = [l.kernel for l in launches if l.layer == "other" and l.phase == "backward"]
    assert other == ["aten.stack"], other


@pytest.mark.parametrize("implementation", [TRITON, REFERENCE], ids=lambda i: i.name)
def test_every_conv_launch_belongs_to_its_layer(implementation):
    """Every layer launches one conv forward and one backward. A conv run with its toRGB as
    one op is one layer "convs.N+to_rgbs.M": on the triton path a single forward conv (the
    toRGB is in its epilogue, at most RGB_EPILOGUE_MAX_COUT channels, as here) and a single
    backward conv (the toRGB's adjoint is in the conv's epilogue backward)."""
    launches = traffic.planned_generator_traffic(SMALL, 2, torch.float32, TokenSetting(4, False), implementation)
    convs, _ = generator_layers(16, 1, 8)
    pairs = {"conv1": "to_rgb1", "convs.1": "to_rgbs.0", "convs.3": "to_rgbs.1"}
    expected = {spec.name: (1, 1) for spec in convs if spec.name not in pairs}
    expected.update({f"{conv}+{rgb}": (1, 1) for conv, rgb in pairs.items()})
    assert max(spec.out_channel for spec in convs) <= op_module.RGB_EPILOGUE_MAX_COUT
    layers = {l.layer for l in launches} - {"other"}
    assert layers == set(expected), layers
    conv_kernel = "conv_gemm" if implementation is TRITON else "aten.convolution"
    assert not any(l.kernel.startswith(conv_kernel) for l in launches if l.layer == "other")
    for layer, counts in expected.items():
        for phase, count in zip(("forward", "backward"), counts):
            kernels = [l.kernel for l in launches if l.layer == layer and l.phase == phase]
            if implementation is TRITON:
                assert sum(k.startswith(conv_kernel) for k in kernels) == count, (layer, phase, kernels)
            else:  # the reference's upsampling layer runs two convs, each backward one or two
                assert any(k.startswith(conv_kernel) for k in kernels), (layer, phase, kernels)
    by_layer = traffic.per_layer(launches)
    floors = traffic.floor_bytes(SMALL, 2, torch.float32, TokenSetting(4, False))
    for layer in expected:  # no layer can move less than its floor
        moved = by_layer[layer]["forward"]["bytes"] + by_layer[layer]["backward"]["bytes"]
        assert moved >= traffic.layer_floor(floors, layer), layer


@needs_interpreter
@pytest.mark.parametrize("tokens", [TokenSetting(0, False), TokenSetting(3, False), TokenSetting(3, True)], ids=lambda t: t.short)
def test_meta_plan_is_what_a_real_run_launches(monkeypatch, tokens):
    """The plan on meta tensors lists the same launches, layers and bytes as the same step run
    for real on the CPU (Triton interpreted), and every kernel that ran is in it. TMA is off in both: it applies only where data
    exists and would size the grad-s buffers by row strips instead of 2-D blocks."""
    from refinestyle.generator import Generator
    from refinestyle.refinement import Refinement

    import triton.runtime.interpreter as interpreter

    monkeypatch.setattr(op_module, "CONV_TMA", False)
    recorders = []
    run_kernel = interpreter.GridExecutor.__call__

    kernels_run = []

    def run_kernel_unrecorded(self, *args, **kwargs):  # the interpreter's own torch work is not the step's
        kernels_run.append(self.fn.__name__)
        for recorder in recorders:
            recorder.paused = True
        try:
            return run_kernel(self, *args, **kwargs)
        finally:
            for recorder in recorders:
                recorder.paused = False

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", run_kernel_unrecorded)
    batch = 2
    planned = traffic.planned_generator_traffic(SMALL, batch, torch.float32, tokens, TRITON)

    torch.manual_seed(0)
    model = Generator(SMALL.size, SMALL.style_dim, SMALL.n_mlp, channel_multiplier=1, channel_max=8).requires_grad_(False)
    model.backend = "triton"
    w_plus = torch.randn(batch, model.n_latent, SMALL.style_dim, requires_grad=True)
    refinement = None
    if tokens.num_tokens:
        lead = () if tokens.shared else (batch,)
        shapes = model.layer_shapes()
        ps = [torch.randn(*lead, tokens.num_tokens, cout, requires_grad=True) for _, cout in shapes]
        qs = [torch.randn(*lead, tokens.num_tokens, cin, requires_grad=True) for cin, _ in shapes]
        refinement = Refinement(ps, qs, model.num_layers)

    grad_image = torch.randn(batch, 3, SMALL.size, SMALL.size)
    leaves = [w_plus, *(refinement.p if refinement is not None else ()), *(refinement.q if refinement is not None else ())]

    def step():
        for leaf in leaves:
            leaf.grad = None
        image = model.synthesis(w_plus, refinement=refinement, randomize_noise=False)
        image.backward(grad_image)

    step()  # the plan records the second step too (frozen-weight caches warm)
    with traffic.recording(model) as recorder:
        recorders.append(recorder)
        kernels_run.clear()
        step()
    real = [(l.phase, l.layer, l.kernel, l.read_bytes, l.write_bytes) for l in recorder.launches]
    plan = [(l.phase, l.layer, l.kernel, l.read_bytes, l.write_bytes) for l in planned]
    assert plan == real
    # every kernel that ran was reported by its launch site (none is missing from the plan)
    assert len(kernels_run) == sum(not l.kernel.startswith("aten.") for l in recorder.launches) > 0


def test_command_line_prints_and_writes_the_plan(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    code = traffic.main(
        ["--size", "16", "--batch", "2", "--dtype", "float32", "--tokens", "4", "--impls", "reference,triton",
         "--layers", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "triton: traffic by kernel" in text and "conv_gemm[mode 0]" in text and "convs.3" in text
    document = json.loads(out.read_text())
    assert set(document["implementations"]) == {"reference", "triton"}
    for plan in document["implementations"].values():
        totals = plan["totals"]
        assert totals["bytes"] == sum(l["read_bytes"] + l["write_bytes"] for l in plan["launches"])
        assert totals["kernels"] == len(plan["launches"]) > 0
    with pytest.raises(SystemExit):
        traffic.main(["--bandwidth", "0"])


@pytest.mark.parametrize("tokens", [TokenSetting(0, False), TokenSetting(4, False), TokenSetting(8, True)])
def test_layer_calls_hold_every_layer_pass_once(tokens):
    """`benchmarks.profile.planned_layer_calls`: the op's ranges (one per layer call) split the
    step's model FLOPs and roofline bytes exactly, each conv and toRGB pass in one range, and
    hold every Triton launch but the demodulation's (which runs before the op)."""
    from benchmarks.cases import Case
    from benchmarks.flops import generator_flops
    from benchmarks.profile import _range_prefix, _range_shape, planned_layer_calls

    batch = 2
    case = Case(group="generator", generator=SMALL, batch=batch, dtype="bfloat16", mode="forward_backward", tokens=tokens)
    calls = planned_layer_calls(case, TRITON)
    convs, torgbs = SMALL.layers()
    # every conv has a forward and a backward call; the skip upsample's calls have no roofline
    for spec in convs:
        for phase in ("forward", "backward"):
            (call,) = [c for label, c in calls.items() if _range_shape(label) == _range_prefix(spec) and c["phase"] == phase]
            assert spec.name in call["layer"].split("+")
    assert all((c["roofline_bytes"] is None) == label.startswith("skip upsample") for label, c in calls.items())
    assert _range_shape("conv 8->8 8x8 up backward") == "conv 8->8 8x8 up"
    assert _range_shape("conv 8->8 8x8 +toRGB forward") == "conv 8->8 8x8"
    wanted = 0
    for backward in (False, True):
        totals = generator_flops(SMALL.size, batch, tokens.num_tokens, shared_tokens=tokens.shared, backward=backward,
                                 channel_multiplier=SMALL.channel_multiplier, channel_max=SMALL.channel_max)  # fmt: skip
        wanted += totals["conv"] + totals["fir"] + totals["low_rank"]
    assert sum(c["flops"] for c in calls.values()) == wanted > 0
    floors = traffic.floor_bytes(SMALL, batch, torch.bfloat16, tokens)
    assert sum(c["roofline_bytes"] or 0 for c in calls.values()) == sum(floors.values())
    launches = traffic.planned_generator_traffic(SMALL, batch, torch.bfloat16, tokens, TRITON)
    outside = {launch.kernel for launch in launches if launch.range_label is None and not launch.kernel.startswith("aten.")}
    # (with shared tokens the demodulation's backward sums its token gradients over the batch)
    assert outside <= {"demodulation", "demodulation_backward", *(("sum_partials",) if tokens.shared else ())}
    assert sum(c["bytes"] for c in calls.values()) == sum(l.bytes for l in launches if l.range_label is not None)
    assert op_module.PROFILE_RANGES is False and op_module.open_profile_range() is None  # both restored


def test_layer_floors_divide_each_calls_time_by_its_plan():
    """`benchmarks.profile.add_floors`: the floor of a call is the longer of its bytes at the copy
    peak and its FLOPs at the matmul peak; the ratio is per call (a range entered twice a step
    has twice its time per step); a row without a plan is left as it is."""
    from benchmarks.profile import _layer_lines, add_floors

    calls = {
        "conv 8->8 16x16 forward": {"layer": "convs.3", "phase": "forward", "kernels": 1, "bytes": 4e9,
                                    "flops": 1e12, "roofline_bytes": 2e9},  # fmt: skip
        "skip upsample 3ch 8x8 forward": {"layer": "to_rgbs.1", "phase": "forward", "kernels": 1, "bytes": 1e9,
                                          "flops": 0, "roofline_bytes": None},  # fmt: skip
    }
    rows = [
        {"range": "conv 8->8 16x16 forward", "ms_per_step": 8.0, "calls_per_step": 2.0, "kernels": {"k": 8.0}},
        {"range": "skip upsample 3ch 8x8 forward", "ms_per_step": 1.0, "calls_per_step": 1.0, "kernels": {"k": 1.0}},
        {"range": "conv 4->4 8x8 forward", "ms_per_step": 1.0, "calls_per_step": 1.0, "kernels": {}},
    ]
    add_floors(rows, calls, peak_flops=1e15, peak_bytes_per_s=2e12)
    conv, skip, unplanned = rows
    assert conv["planned_ms"] == pytest.approx(2.0) and conv["x_planned"] == pytest.approx(2.0)  # 4 GB at 2 TB/s
    assert conv["roofline_ms"] == pytest.approx(1.0) and conv["x_roofline"] == pytest.approx(4.0)  # 1 TFLOP at 1 PFLOP/s
    assert skip["planned_ms"] == pytest.approx(0.5) and "roofline_ms" not in skip
    assert set(unplanned) == {"range", "ms_per_step", "calls_per_step", "kernels"}
    lines = _layer_lines(rows, kernel_ms=12.0, top=10)
    assert "10.00 of 12.00 ms/step" in lines[0] and "4.50 ms for the launches" in lines[1]
    assert lines[4].split()[:6] == ["1.000", "1.0x", "0.500", "2.0", "skip", "upsample"]


def test_profile_command_prints_the_floors_and_the_tuned_conv_launches(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.profile` end to end with the GPU parts stood in (the profile itself,
    the peaks, the autotuner's record): the per-layer table with its floors and the conv-launch
    table are printed, and the JSON holds both, so a GPU session's stage 1 cannot stop at them.
    Lone conv configs are timed while it profiles (every launch shape in the table), and the
    setting is given back afterwards."""
    from benchmarks import profile

    timing_lone_configs = []

    def fake_profile_case(case, name, steps, warmup, top, host, peaks):
        timing_lone_configs.append(profile.op_module.TIME_UNTUNED_CONV_LAUNCHES)
        layers = [{"range": "conv 8->8 16x16 forward", "ms_per_step": 2.0, "calls_per_step": 1.0, "kernels": {"k": 2.0}}]
        calls = {"conv 8->8 16x16 forward": {"layer": "convs.3", "phase": "forward", "kernels": 1, "bytes": 1e9,
                                             "flops": 1e9, "roofline_bytes": 5e8}}  # fmt: skip
        profile.add_floors(layers, calls, peaks["flops_per_s"], peaks["bytes_per_s"])
        kernels = [{"kernel": "k", "ms_per_step": 2.0, "calls_per_step": 1.0, "share": 1.0}]
        return {"case": case.case_id, "implementation": name, "wall_ms": 3.0, "kernel_ms": 2.0, "peak_gib": 1.0,
                "kernels": kernels, "layers": layers, "host": []}  # fmt: skip

    tuned = [dict(MODE=0, K=8, N=8, GRID_HW=(16, 16), L=4, a_dtype="torch.bfloat16", BLOCK_M=64, BLOCK_N=16,
                  BLOCK_K=16, num_warps=4, tuned_ms=0.25, least_bytes=5e8, flops=1e9)]  # fmt: skip
    monkeypatch.setattr(profile.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profile, "measure_peaks", lambda device, dtypes, settings: {
        "matmul_flops_per_s": {"bfloat16": 5e14}, "copy_bytes_per_s": 2e12})  # fmt: skip
    monkeypatch.setattr(profile, "profile_case", fake_profile_case)
    monkeypatch.setattr(profile.op_module, "autotuned_conv_configs", lambda: tuned)
    monkeypatch.setattr(profile.op_module, "TIME_UNTUNED_CONV_LAUNCHES", False)
    path = tmp_path / "profile.json"
    assert profile.main(["--impls", "triton", "--size", "16", "--json", str(path)]) == 0
    assert timing_lone_configs == [True] and profile.op_module.TIME_UNTUNED_CONV_LAUNCHES is False
    out = capsys.readouterr().out
    assert "device peaks: 500 TFLOP/s (bfloat16 matmul), 2.00 TB/s (copy)" in out
    assert "0.500   4.0    0.250   8.0  conv 8->8 16x16 forward" in out  # 1 GB at 2 TB/s; 0.5 GB
    assert "Conv launches as the autotuner timed them (1 shapes): 0.25 ms in all, 0.25 ms at the floor" in out
    (saved,) = json.loads(path.read_text())
    assert saved["layers"][0]["x_planned"] == pytest.approx(4.0) and saved["conv_launches"][0]["tuned_ms"] == 0.25
