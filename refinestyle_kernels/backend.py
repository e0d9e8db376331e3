"""Which implementation of the op runs: "reference", "torch" or "triton".

"auto" (the default everywhere) resolves to "triton" for CUDA tensors when Triton
is importable, else to "torch". `set_backend` and `use_backend` change what "auto"
means for the whole process (for example to benchmark or debug a model without
touching its code).
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")

_default_backend = "auto"

# Results of the environment probes below, filled on first use. A plain dict rather than
# functools.lru_cache: torch.compile traces through lru_cache wrappers (and warns), but reads a
# filled dict as a constant.
_probes: dict = {}


def triton_available() -> bool:
    """True when Triton imports cleanly. Asked only when a backend is resolved, never at import."""
    if "triton_available" not in _probes:
        try:
            import triton  # noqa: F401

            _probes["triton_available"] = True
        except Exception:  # a missing, broken or mismatched install must not break the torch path
            _probes["triton_available"] = False
    return _probes["triton_available"]


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), which works on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None. Triton before 3.7 turns a 1-element
    array into a Python int in its interpreter, which NumPy 2.4 refuses (every kernel that
    loops to a runtime bound fails with "only 0-dimensional arrays can be converted")."""
    if "interpreter_problem" not in _probes:
        _probes["interpreter_problem"] = _find_interpreter_problem()
    return _probes["interpreter_problem"]


def _find_interpreter_problem() -> str | None:
    try:
        import numpy
        import triton
    except Exception:
        return None  # triton_available() reports a missing Triton
    triton_version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2] if part.isdigit())
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        return (
            f"the Triton {triton.__version__} interpreter does not run with NumPy {numpy.__version__}: "
            "pip install 'numpy<2.4' (or Triton >= 3.7)"
        )
    return None


def triton_interpreter_bf16_problem() -> str | None:
    """Why the Triton interpreter would compute bfloat16 wrongly, or None (also None when not
    interpreting). The interpreter keeps bfloat16 as uint16 bit patterns: its tl.dot multiplies
    them, and its float32 -> bfloat16 cast truncates (triton-lang/triton#11584). Found by
    running both on a tiny kernel once, so a Triton that fixes them (or the test suite's own
    fix, tests/triton_interpreter_bf16.py) passes."""
    if not triton_interpreted():
        return None
    if "interpreter_bf16_problem" not in _probes:
        _probes["interpreter_bf16_problem"] = _find_interpreter_bf16_problem()
    return _probes["interpreter_bf16_problem"]


def _find_interpreter_bf16_problem() -> str | None:
    if not triton_available() or triton_interpreter_problem():
        return None  # reported by triton_available / triton_interpreter_problem
    import triton
    import triton.language as tl

    @triton.jit
    def probe(a_ptr, b_ptr, product_ptr, cast_ptr, SIZE: tl.constexpr):
        rows, columns = tl.arange(0, SIZE)[:, None], tl.arange(0, SIZE)[None, :]
        a = tl.load(a_ptr + rows * SIZE + columns)
        b = tl.load(b_ptr + rows * SIZE + columns)
        tl.store(product_ptr + rows * SIZE + columns, tl.dot(a, b))
        tl.store(cast_ptr + rows * SIZE + columns, (a.to(tl.float32) * 1.005859375).to(tl.bfloat16))

    size = 16
    a = (torch.arange(size * size, dtype=torch.float32).reshape(size, size) % 5 - 2).bfloat16()
    b = torch.eye(size, dtype=torch.bfloat16)
    product = torch.empty(size, size)
    cast = torch.empty(size, size, dtype=torch.bfloat16)
    try:
        probe[(1,)](a, b, product, cast, SIZE=size)
    except Exception as error:  # an interpreter that cannot run bf16 at all
        return f"the Triton {triton.__version__} interpreter cannot run bfloat16 kernels ({type(error).__name__}: {error})"
    # 1.005859375 = 1 + 3 * 2^-9 lies above halfway between two bfloat16 values: rounding to
    # nearest gives 1 + 2^-7 (times the integer a), truncation gives a itself
    expected_cast = (a.float() * 1.005859375).bfloat16()
    if not torch.equal(product, a.float()) or not torch.equal(cast.view(torch.int16), expected_cast.view(torch.int16)):
        return (
            f"the Triton {triton.__version__} interpreter computes bfloat16 wrongly (tl.dot multiplies the bit "
            "patterns and float32 -> bfloat16 truncates: triton-lang/triton#11584); use float32 or float16 in "
            "the interpreter, or a GPU"
        )
    return None


def check_backend(backend: str) -> str:
    """`backend` itself if it names a backend (one of BACKENDS, "auto" included); else ValueError."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def set_backend(backend: str) -> None:
    """Set what backend="auto" resolves to for the whole process ("auto" restores the default rule)."""
    global _default_backend
    _default_backend = check_backend(backend)


def get_backend() -> str:
    """The process-wide choice that backend="auto" resolves through."""
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: backend="auto" means `backend` inside the block."""
    global _default_backend
    previous = _default_backend
    _default_backend = check_backend(backend)
    try:
        yield
    finally:
        _default_backend = previous


def resolve_backend(backend: str, device) -> str:
    """The concrete backend for tensors on `device`.

    backend: one of BACKENDS; device: a torch.device or its name. "auto" follows
    set_backend/use_backend, then picks "triton" on CUDA when Triton is available and
    "torch" otherwise. An explicit
    "triton" on CPU tensors is allowed only under TRITON_INTERPRET=1 (tests); on meta tensors
    it allocates its outputs and buffers and launches nothing (shape and memory planning).
    """
    backend = check_backend(backend)
    if not isinstance(device, torch.device):  # a name, "cuda:0"
        device = torch.device(device)
    if backend == "auto":
        backend = _default_backend
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError('backend="triton" needs the triton package (pip install triton)')
        if device.type not in ("cuda", "meta") and not triton_interpreted():
            raise RuntimeError(
                'backend="triton" needs CUDA tensors; on the CPU it runs only in the Triton '
                "interpreter (set TRITON_INTERPRET=1 before importing refinestyle_kernels)"
            )
        problem = triton_interpreter_problem() if device.type == "cpu" else None
        if problem:
            raise RuntimeError(f'backend="triton" on CPU tensors: {problem}')
    return backend
