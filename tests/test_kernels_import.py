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
