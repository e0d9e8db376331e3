"""Does the op work on this machine? The environment, and each backend against the float64 reference.

    python -m refinestyle_kernels                     # report + check every backend this machine runs
    python -m refinestyle_kernels --dtype fp32,bf16   # also in bf16 (CUDA)
    python -m refinestyle_kernels --no-check          # the report only

After `pip install`, this says which backend `backend="auto"` picks here, what stands in the
way of the Triton kernels (no Triton, no CUDA, an interpreter that cannot run), and whether
each backend's forward and backward agree with the literal formula computed in float64 on
small random layers. It makes no speed claim: `python -m benchmarks` measures speed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass

import torch

from refinestyle_kernels.backend import (
    BACKENDS,
    resolve_backend,
    triton_available,
    triton_interpreted,
    triton_interpreter_bf16_problem,
    triton_interpreter_problem,
)
from refinestyle_kernels.ops.modulated_conv2d import styled_conv2d
from refinestyle_kernels.ops.styled_conv2d_to_rgb import styled_conv2d_to_rgb

__all__ = ["CheckResult", "TOLERANCES", "environment_report", "self_check", "main"]

# Relative error allowed against the float64 reference: fp32 runs without TF32; the half
# types lose about 1e-2 through a demodulated layer (docs/kernels.md, Tests), a broken kernel ~1.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# In a half type a backend may also be off by up to this many times the reference backend's own
# error in that type, on the same inputs: on an H100 the bf16 gradients of every backend, the
# reference's too, came out 3e-2 to 7e-2 from float64, most of it the rounding of g and out.
ROUNDING_FACTOR = 2.0
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}



@dataclass(frozen=True)
class _Layer:
    name: str
    kernel: int = 3
    upsample: bool = False
    demodulate: bool = True  # False: a toRGB (1x1, 3 output channels, no activation)
    tokens: str | None = "per-sample"  # "per-sample", "shared" or None
    to_rgb: bool = False  # the conv and the toRGB reading its output, as one op (the generator's path)


_LAYERS = (
    _Layer("3x3 conv, per-sample tokens"),
    _Layer("upsampling 3x3 conv, shared tokens", upsample=True, tokens="shared"),
    _Layer("toRGB (1x1, no demodulation)", kernel=1, demodulate=False, tokens=None),
    _Layer("3x3 conv + its toRGB, one op", to_rgb=True),
)


@dataclass
class CheckResult:
    """One backend on one layer in one dtype: the worst relative error over the output(s) and the
    gradients of x, styles, p, q (and the toRGB's styles), against the float64 reference on the
    same inputs; `errors` holds each one. `tolerance`: TOLERANCES[dtype], in a half type raised
    to ROUNDING_FACTOR x the reference backend's own worst error in that type."""

    backend: str
    case: str
    dtype: str
    device: str
    max_rel_error: float | None
    tolerance: float
    passed: bool
    errors: dict
    failure: str | None = None


def environment_report() -> dict:
    """What decides how the op runs here: versions, devices, the backend "auto" picks, problems."""
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "devices": [],
        "triton": None,
        "triton_interpret": triton_interpreted(),
        "auto_backend": {"cpu": resolve_backend("auto", "cpu")},
        "problems": [],
    }
    try:
        import numpy

        report["numpy"] = numpy.__version__
    except ImportError:
        report["numpy"] = None
    if triton_available():
        import triton

        report["triton"] = triton.__version__
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(index)
        report["devices"].append({"index": index, "name": torch.cuda.get_device_name(index),
                                  "capability": f"{major}.{minor}"})
        if major < 8:
            report["problems"].append(
                f"cuda:{index} is sm_{major}{minor}: bf16 needs sm_80 or newer, and the kernels are tuned for sm_80+"
            )
    if torch.cuda.is_available():
        report["auto_backend"]["cuda"] = resolve_backend("auto", "cuda")
        if not triton_available():
            report["problems"].append(
                'CUDA is available but Triton does not import: backend="auto" falls back to the plain-PyTorch '
                '"torch" backend (pip install triton for the fused kernels)'
            )
        if triton_interpreted():
            report["problems"].append("TRITON_INTERPRET=1 is set: the Triton kernels run in the slow interpreter")
    if triton_interpreted() and triton_interpreter_problem():
        report["problems"].append(triton_interpreter_problem())
    elif triton_interpreted() and triton_interpreter_bf16_problem():
        report["problems"].append(triton_interpreter_bf16_problem())
    return report


def _runnable_backends(device: torch.device) -> list[str]:
    """The concrete backends that can run on `device` here (reference always can)."""
    runnable = []
    for backend in ("reference", "torch", "triton"):
        try:
            resolve_backend(backend, device)
        except RuntimeError:
            continue
        runnable.append(backend)
    return runnable


@contextlib.contextmanager
def _exact_fp32():
    """fp32 without TF32 (cuBLAS, cuDNN and, through cudnn.allow_tf32, the Triton dots)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _layer_inputs(layer: _Layer, dtype: torch.dtype, device: torch.device, channels: int, size: int,
                  batch: int = 2, tokens: int = 8, seed: int = 0) -> dict:
    """Random inputs of one layer, rounded to `dtype` (the reference then sees the same values)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(dtype).to(device)

    out_channels = channels if layer.demodulate else 3
    out_size = 2 * size if layer.upsample else size
    token_shape = (batch, tokens) if layer.tokens == "per-sample" else (tokens,)
    inputs = {
        "x": randn(batch, channels, size, size),
        "weight": randn(out_channels, channels, layer.kernel, layer.kernel),
        "styles": randn(batch, channels, std=0.5) + 1,
        "p": randn(*token_shape, out_channels, std=0.1) if layer.tokens else None,
        "q": randn(*token_shape, channels, std=0.1) if layer.tokens else None,
        "bias": randn(out_channels, std=0.1),
        "grad_out": randn(batch, out_channels, out_size, out_size),
    }
    if layer.demodulate:
        inputs["noise"], inputs["noise_strength"] = randn(batch, 1, out_size, out_size), 0.1
    if layer.to_rgb:
        inputs.update(rgb_weight=randn(3, out_channels, 1, 1), rgb_styles=randn(batch, out_channels, std=0.5) + 1,
                      rgb_bias=randn(3, std=0.1), grad_rgb=randn(batch, 3, out_size, out_size))
    return inputs


def _forward_backward(layer: _Layer, inputs: dict, backend: str, dtype: torch.dtype) -> dict:
    """The layer's output(s) and the gradients of x, styles, p, q (and rgb_styles), computed in
    `dtype` by `backend`; the weights are frozen, as in RefineStyle's training."""
    leaves = {name: inputs[name].to(dtype).detach().requires_grad_(True)
              for name in ("x", "styles", "p", "q", "rgb_styles") if inputs.get(name) is not None}
    arguments = dict(
        noise=inputs["noise"].to(dtype) if "noise" in inputs else None, noise_strength=inputs.get("noise_strength"),
        bias=inputs["bias"].to(dtype), activate=layer.demodulate, demodulate=layer.demodulate, backend=backend,
    )
    conv = (leaves["x"], inputs["weight"].to(dtype), leaves["styles"], leaves.get("p"), leaves.get("q"))
    if layer.to_rgb:
        outputs = dict(zip(("out", "rgb"), styled_conv2d_to_rgb(
            *conv, rgb_weight=inputs["rgb_weight"].to(dtype), rgb_styles=leaves["rgb_styles"],
            rgb_bias=inputs["rgb_bias"].to(dtype), **arguments)))
    else:
        outputs = {"out": styled_conv2d(*conv, upsample=layer.upsample, **arguments)}
    torch.autograd.backward(list(outputs.values()), [inputs[f"grad_{name}"].to(dtype) for name in outputs])
    return {**{name: value.detach() for name, value in outputs.items()},
            **{f"grad_{name}": leaf.grad for name, leaf in leaves.items()}}


def _tolerance(layer: _Layer, inputs: dict, truth: dict, dtype: torch.dtype) -> float:
    """TOLERANCES[dtype]; in a half type at least ROUNDING_FACTOR x the worst error of the
    reference backend run in that type (its materialised kernels and grouped conv)."""
    if dtype == torch.float32:
        return TOLERANCES[dtype]
    try:
        rounded = _forward_backward(layer, inputs, "reference", dtype)
    except Exception:  # noqa: BLE001 - the reference's own check reports why; keep the floor
        return TOLERANCES[dtype]
    worst = max(_relative_error(rounded.get(name), truth[name]) for name in truth)
    return max(TOLERANCES[dtype], ROUNDING_FACTOR * worst) if math.isfinite(worst) else TOLERANCES[dtype]


def _relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    if value is None or not torch.isfinite(value).all():
        return float("inf")
    return ((value.double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def self_check(device: str | torch.device | None = None, dtypes=(torch.float32,), backends=None,
               channels: int | None = None, size: int | None = None) -> list[CheckResult]:
    """Every backend that runs on `device`, on four small random layers, against float64.

    device: "cpu", "cuda", "cuda:N" or a torch.device (default: cuda when available).
    dtypes: torch dtypes out of float32, float16, bfloat16 (half types need CUDA).
    backends: names out of "reference", "torch", "triton" (default: every one that runs on
        the device; an unavailable one named here is reported as failed, with the reason).
    channels, size: the layers' Cin = Cout and input H = W (default 64 and 16 on CUDA, 16 and 8
        on the CPU, where the Triton interpreter is slow).
    Returns one CheckResult per (backend, layer, dtype): a 3x3 conv with per-sample tokens,
    an upsampling conv with shared tokens, a toRGB, and a 3x3 conv with the toRGB that reads
    its output as one op (`styled_conv2d_to_rgb`, the generator's path), each forward and
    backward (grads of x, styles, p, q, rgb_styles; the weights frozen) against the reference
    backend in float64 on the same rounded inputs.
    """
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # torch's "Expected one of cpu, cuda, ... device type"
        raise ValueError(f"device: {device!r} is not a device (cpu, cuda, cuda:N): {error}") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, xpu...: no backend here checks values there
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} was asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device} was asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    if isinstance(dtypes, torch.dtype) or isinstance(backends, str):
        raise TypeError("dtypes, backends: expected sequences, e.g. (torch.float32,) and ['torch'], not one item")
    for name, value in (("channels", channels), ("size", size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
    for dtype in dtypes:
        if dtype not in TOLERANCES:
            raise ValueError(f"dtypes: expected float32, float16 or bfloat16, got {dtype}")
        if dtype != torch.float32 and device.type != "cuda":
            raise ValueError(f"dtypes: {dtype} is checked on CUDA only (the CPU has no fast half path to check)")
    runnable = _runnable_backends(device)
    if backends is None:
        backends = runnable
    for backend in backends:
        if backend not in BACKENDS or backend == "auto":
            raise ValueError(f"backends: expected names out of reference, torch, triton, got {backend!r}")
    on_cuda = device.type == "cuda"
    channels = channels or (64 if on_cuda else 16)
    size = size or (16 if on_cuda else 8)
    results = []
    with _exact_fp32():
        for layer in _LAYERS:
            for dtype in dtypes:
                inputs = _layer_inputs(layer, dtype, device, channels, size)
                truth = _forward_backward(layer, inputs, "reference", torch.float64)
                tolerance = _tolerance(layer, inputs, truth, dtype)
                for backend in backends:
                    result = CheckResult(backend, layer.name, str(dtype).replace("torch.", ""), str(device), None,
                                         tolerance, False, {})
                    try:
                        resolve_backend(backend, device)
                        values = _forward_backward(layer, inputs, backend, dtype)
                        result.errors = {name: _relative_error(values.get(name), truth[name]) for name in truth}
                        result.max_rel_error = max(result.errors.values())
                        result.passed = result.max_rel_error <= result.tolerance
                    except Exception as error:  # report every backend, whatever one of them raises
                        result.failure = f"{type(error).__name__}: {error}"
                    results.append(result)
    return results


def _print_report(report: dict) -> None:
    print(f"python {report['python']}, torch {report['torch']} (CUDA {report['torch_cuda'] or 'none'}), "
          f"triton {report['triton'] or 'not importable'}, numpy {report['numpy']}")
    for device in report["devices"]:
        print(f"cuda:{device['index']}: {device['name']} (sm_{device['capability'].replace('.', '')})")
    if not report["devices"]:
        print("no CUDA device")
    print("backend=\"auto\" picks: " + ", ".join(f"{kind}: {name}" for kind, name in report["auto_backend"].items()))
    for problem in report["problems"]:
        print(f"WARNING: {problem}")


def main(argv: list[str] | None = None) -> int:
    """`python -m refinestyle_kernels`: print the environment report, then run `self_check`.
    Exit status 0 when every check passes, 1 when one fails."""
    parser = argparse.ArgumentParser(prog="python -m refinestyle_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", help="comma-separated: fp32, fp16, bf16 (half types on CUDA)")
    parser.add_argument("--backends", default=None, help="comma-separated: reference, torch, triton (default: all that run here)")
    parser.add_argument("--no-check", action="store_true", help="print the environment report only")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the report and the results as JSON")
    args = parser.parse_args(argv)
    if args.json:  # checked before the checks run, not after
        args.json = os.path.expanduser(args.json)
        if os.path.isdir(args.json):
            parser.error(f"--json: expected a file name, got the folder {args.json!r}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            parser.error(f"--json: the folder of {args.json!r} does not exist")
    try:
        dtypes = [DTYPE_NAMES[name] for name in args.dtype.split(",")]
    except KeyError as error:
        parser.error(f"--dtype: expected fp32, fp16 or bf16, got {error.args[0]!r}")
    report = environment_report()
    _print_report(report)
    results = []
    if not args.no_check:
        try:
            results = self_check(args.device, dtypes, args.backends.split(",") if args.backends else None)
        except ValueError as error:
            parser.error(str(error))
        print(f"\n{'backend':10} {'dtype':9} {'layer':36} {'max rel error':>13}  tolerance")
        for result in results:
            error = "-" if result.max_rel_error is None else f"{result.max_rel_error:.2e}"
            verdict = "ok" if result.passed else "FAILED"
            print(f"{result.backend:10} {result.dtype:9} {result.case:36} {error:>13}  {result.tolerance:.1e}  {verdict}")
            if result.failure:
                print(f"    {result.failure}")
        failed = sum(not result.passed for result in results)
        print(f"\n{len(results) - failed} of {len(results)} checks passed" + (f"; {failed} FAILED" if failed else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": report, "checks": [asdict(result) for result in results]}, handle, indent=2)
    return 1 if any(not result.passed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
