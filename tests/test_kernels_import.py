"""Importing the package never fails: no GPU, no nvcc, no (usable) Triton."""
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("broken", ["missing", "raising"])
def test_import_without_triton_uses_the_torch_backend(broken):
    blocker = (
        "sys.modules['triton'] = None"  # import triton -> ImportError
        if broken == "missing"
        else "import types; sys.meta_path.insert(0, type('B', (), {'find_spec': staticmethod("
        "lambda name, *a: (_ for _ in ()).throw(RuntimeError('broken triton')) if name.split('.')[0] == 'triton' else None)})())"
    )
    result = run_python(
        f"""
        import sys
        import torch
        {blocker}
        import refinestyle_kernels as rk
        import refinestyle_kernels.modules
        layer = rk.StyledConv(4, 4, 3, 8, upsample=True)
        out = layer(torch.randn(2, 4, 3, 3), torch.randn(2, 8))
        assert out.shape == (2, 4, 6, 6)
        print("ok", rk.resolve_backend("auto", torch.device("cpu")))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok torch" in result.stdout


def test_import_without_cuda_does_not_touch_the_gpu():
    result = run_python(
        """
        import torch
        import refinestyle_kernels
        assert not torch.cuda.is_initialized()
        print("ok")
        """,
        {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "triton_version,numpy_version,refused",
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.10.1", "2.5.0", False)],
)
def test_an_interpreter_that_cannot_run_is_refused_with_its_fix(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter fails on NumPy >= 2.4 with an obscure TypeError in every
    kernel; the triton backend on CPU tensors says so, and how to fix it, before any launch."""
    import numpy
    import torch
    import triton

    from refinestyle_kernels import backend

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(backend._probes, "interpreter_problem", raising=False)  # probe again, restored after
    try:
        problem = backend.triton_interpreter_problem()
        if refused:
            assert "numpy<2.4" in problem and triton_version in problem
            with pytest.raises(RuntimeError, match="numpy<2.4"):
                backend.resolve_backend("triton", torch.device("cpu"))
        else:
            assert problem is None
            assert backend.resolve_backend("triton", torch.device("cpu")) == "triton"
    finally:
        backend._probes.pop("interpreter_problem", None)
