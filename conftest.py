"""Test set-up shared by every test module.

Without a GPU the Triton kernels run in the Triton interpreter, which must be
switched on before any kernel is defined, so before refinestyle_kernels is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets its share of the cores: OpenMP threads of two
# workers fighting over two cores made small training steps 20x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_configure(config):
    """Stop at once, with the fix, where the interpreter cannot run the kernels: else every
    Triton test fails on its own with the same obscure error."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from refinestyle_kernels.backend import triton_interpreter_problem

        problem = triton_interpreter_problem()
        if problem:
            raise pytest.UsageError(problem)
        # the interpreter's own tl.dot multiplies bfloat16 bit patterns and its fp32 -> bf16 cast
        # truncates; tests/ fixes both, so the kernels' bf16 paths are checked here too
        # (tests/triton_interpreter_bf16.py)
        import triton_interpreter_bf16

        triton_interpreter_bf16.install()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`). Their ops are tiny: with two test
    workers on two cores, extra OpenMP threads only spin against each other and the tests run
    an order of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """fp32 without TF32 on a GPU, in cuBLAS, cuDNN and (through cudnn.allow_tf32) the Triton
    dots: the tests compare fp32 results with fp32 tolerances. PyTorch's default lets cuDNN
    convolutions use TF32, which on an H100 put errors of 1e-3 into comparisons at 1e-4.
    Tests of the TF32 path ask for it themselves (TRITON_FP32_PRECISION="tf32")."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
