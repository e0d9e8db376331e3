"""`python -m refinestyle_kernels`: the environment report and the backends' check against float64."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refinestyle_kernels import selfcheck
from refinestyle_kernels.backend import triton_interpreted
from refinestyle_kernels.ops import modulated_conv2d as op_module

REPO = Path(__file__).resolve().parents[1]


def test_every_runnable_backend_passes_on_every_layer():
    results = selfcheck.self_check("cpu")
    expected = {"reference", "torch"} | ({"triton"} if triton_interpreted() else set())
    assert {result.backend for result in results} == expected
    assert len(results) == 4 * len(expected)
    for result in results:
        assert result.passed, result
        assert result.failure is None
        # the output and the gradients of x, styles (and p, q where the layer has tokens)
        assert {"out", "grad_x", "grad_styles"} <= set(result.errors)
        assert result.max_rel_error < 1e-5
    pair = [result for result in results if "toRGB, one op" in result.case]
    assert pair and all({"rgb", "grad_rgb_styles", "grad_p", "grad_q"} <= set(result.errors) for result in pair)


def test_a_wrong_backend_fails_its_check(monkeypatch):
    right = op_module._styled_conv2d_torch

    def one_percent_off(*args, **kwargs):
        return right(*args, **kwargs) * 1.01

    monkeypatch.setattr(op_module, "_styled_conv2d_torch", one_percent_off)
    results = selfcheck.self_check("cpu", backends=["torch", "reference"])
    assert all(not r.passed for r in results if r.backend == "torch")
    assert all(r.passed for r in results if r.backend == "reference")
    assert all(r.errors["out"] == pytest.approx(0.01, rel=1e-3) for r in results if r.backend == "torch")


def test_a_backend_that_cannot_run_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU tensors needs the interpreter
    (result, *_) = selfcheck.self_check("cpu", backends=["triton"])
    assert not result.passed and result.max_rel_error is None
    assert "interpreter" in result.failure


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="dtypes"):
        selfcheck.self_check("cpu", dtypes=(torch.bfloat16,))
    with pytest.raises(ValueError, match="dtypes"):
        selfcheck.self_check("cpu", dtypes=(torch.float64,))
    with pytest.raises(ValueError, match="backends"):
        selfcheck.self_check("cpu", backends=["auto"])
    with pytest.raises(TypeError, match="backends"):
        selfcheck.self_check("cpu", backends="torch")
    with pytest.raises(TypeError, match="dtypes"):
        selfcheck.self_check("cpu", dtypes=torch.float32)
    with pytest.raises(ValueError, match="channels"):
        selfcheck.self_check("cpu", channels=0)
    with pytest.raises(ValueError, match="device"):  # every check failed there, as if the kernels were wrong
        selfcheck.self_check("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            selfcheck.self_check("cuda")


def test_the_report_names_what_decides_the_backend(monkeypatch):
    report = selfcheck.environment_report()
    assert report["torch"] == torch.__version__
    assert report["auto_backend"]["cpu"] == "torch"
    if not torch.cuda.is_available():
        assert report["devices"] == [] and "cuda" not in report["auto_backend"]
    # a CUDA machine without Triton: auto falls back to torch, and the report says so
    monkeypatch.setattr(selfcheck, "triton_available", lambda: False)
    monkeypatch.setattr(selfcheck, "resolve_backend", lambda backend, device: "torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    problems = selfcheck.environment_report()["problems"]
    assert any("Triton does not import" in problem for problem in problems)


def test_the_command_exits_nonzero_on_a_failed_check(monkeypatch, tmp_path, capsys):
    assert selfcheck.main(["--backends", "reference,torch", "--json", str(tmp_path / "ok.json")]) == 0
    saved = json.loads((tmp_path / "ok.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert len(saved["checks"]) == 8 and all(check["passed"] for check in saved["checks"])
    right = op_module._styled_conv2d_torch
    monkeypatch.setattr(op_module, "_styled_conv2d_torch", lambda *a, **k: right(*a, **k).flip(-1))
    assert selfcheck.main(["--backends", "torch"]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        selfcheck.main(["--dtype", "fp64"])
    assert exit_info.value.code == 2
    assert selfcheck.main(["--no-check"]) == 0
    with pytest.raises(SystemExit) as info:  # torch's own RuntimeError was a traceback
        selfcheck.main(["--device", "foo"])
    assert info.value.code == 2
    capsys.readouterr()
    for bad_json in (tmp_path / "missing" / "out.json", tmp_path):  # was a traceback after the checks had run
        with pytest.raises(SystemExit) as info:
            selfcheck.main(["--backends", "torch", "--json", str(bad_json)])
        assert info.value.code == 2
        captured = capsys.readouterr()
        assert "--json" in captured.err and "checks passed" not in captured.out


def test_python_dash_m_runs_it():
    completed = subprocess.run([sys.executable, "-m", "refinestyle_kernels", "--backends", "reference,torch"],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "8 of 8 checks passed" in completed.stdout
    assert 'backend="auto" picks: cpu: torch' in completed.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled Triton kernels in fp32 and bf16")
def test_every_backend_passes_on_cuda():
    results = selfcheck.self_check("cuda", dtypes=(torch.float32, torch.bfloat16, torch.float16))
    assert {result.backend for result in results} == {"reference", "torch", "triton"}
    assert all(result.passed for result in results), [r for r in results if not r.passed]


def test_half_precision_tolerance_allows_twice_the_references_own_rounding():
    """In bf16 every backend, the reference too, is some 3e-2 off float64 on these layers (H100,
    session 24): a backend passes within the floor or within ROUNDING_FACTOR x the reference
    backend's own error in that dtype, whichever is larger."""
    layer = selfcheck._LAYERS[0]
    device = torch.device("cpu")
    inputs = selfcheck._layer_inputs(layer, torch.bfloat16, device, 8, 6)
    truth = selfcheck._forward_backward(layer, inputs, "reference", torch.float64)
    floor = selfcheck.TOLERANCES[torch.bfloat16]
    assert selfcheck._tolerance(layer, inputs, truth, torch.float32) == selfcheck.TOLERANCES[torch.float32]
    # bf16 rounding alone: the reference is a few 1e-2 off (2.6e-2 here, on the CPU)
    assert floor <= selfcheck._tolerance(layer, inputs, truth, torch.bfloat16) < 0.1
    shifted = {name: value * 1.5 for name, value in truth.items()}  # every output a third off the truth
    assert selfcheck._tolerance(layer, inputs, shifted, torch.bfloat16) == pytest.approx(
        selfcheck.ROUNDING_FACTOR / 3, rel=0.05)
